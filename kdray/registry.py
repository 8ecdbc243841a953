"""Registries: a config's name (``method.name``, ``engine.name``, ``engine.exchange.name``) -> the class that
answers to it. A component registers itself where it is defined::

    @METHODS.register
    class DML(Method):
        name = "dml"

This module sits at the bottom of kdray (it imports nothing of kdray but the errors), so the config can dispatch a
name to its component without importing the layers above it. A registry knows the package that holds its built-in
components and imports that package by name the first time it is asked for a name (as a plug-in system loads its
entry points): every module of the package registers on import, so a new method, exchange or engine is its file.
Plug-ins outside kdray use the same decorator; their module must be imported before the config is validated.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

from kdray.errors import ConfigError

T = TypeVar("T")


class Registry(dict):
    """``name -> class``, filled by :meth:`register`. ``key``: the config key that names a component (for errors);
    ``package``: the package whose import registers the built-in components."""

    def __init__(self, kind: str, key: str, package: str, member: Callable[[str], bool] = lambda name: True):
        super().__init__()
        self.kind, self.key, self.package, self.member = kind, key, package, member
        self._loading = False
        self._loaded = False

    def load_builtins(self) -> None:
        """Import the package of the built-in components and each of its modules that ``member`` names, once
        (every such module registers what it defines)."""
        if self._loaded or self._loading:
            return
        self._loading = True
        try:
            package = importlib.import_module(self.package)
            for module in pkgutil.iter_modules(package.__path__):
                if self.member(module.name):
                    importlib.import_module(f"{self.package}.{module.name}")
            self._loaded = True
        finally:
            self._loading = False

    def register(self, cls: type[T]) -> type[T]:
        """Add a class under its ``name`` (a class decorator). Another class under a taken name is an error: two
        components would answer to one config."""
        name = cls.name  # type: ignore[attr-defined]
        taken = super().get(name)
        if taken is not None and taken is not cls and taken.__qualname__ != cls.__qualname__:
            raise ValueError(f"{self.kind} name '{name}' is taken by {taken.__module__}.{taken.__qualname__}")
        self[name] = cls
        return cls

    def lookup(self, name: Any) -> Any:
        """The class registered as ``name``; anything else is one :class:`ConfigError` listing the names."""
        self.load_builtins()
        if isinstance(name, str) and dict.__contains__(self, name):
            return dict.__getitem__(self, name)
        shown = name if isinstance(name, str | int | float | bool) or name is None else type(name).__name__
        raise ConfigError(self.key, shown, f"accepted: {self.names()}")

    def names(self) -> list[str]:
        self.load_builtins()
        return sorted(self)

    # Reading the registry as a mapping loads the built-in components first.
    def __getitem__(self, name: str) -> Any:
        self.load_builtins()
        return super().__getitem__(name)

    def __contains__(self, name: object) -> bool:
        self.load_builtins()
        return super().__contains__(name)

    def __iter__(self) -> Iterator[str]:
        self.load_builtins()
        return super().__iter__()

    def __len__(self) -> int:
        self.load_builtins()
        return super().__len__()

    def get(self, name: str, default: Any = None) -> Any:
        self.load_builtins()
        return super().get(name, default)

    def items(self):  # type: ignore[override]
        self.load_builtins()
        return super().items()

    def keys(self):  # type: ignore[override]
        self.load_builtins()
        return super().keys()

    def values(self):  # type: ignore[override]
        self.load_builtins()
        return super().values()


METHODS = Registry("method", "method.name", "kdray.methods", lambda m: m not in ("base", "registry"))
EXCHANGES = Registry("exchange", "engine.exchange.name", "kdray.exchange", lambda m: m != "base")
ENGINES = Registry("engine", "engine.name", "kdray.engines", lambda m: m.endswith("_engine"))
