"""The method registry: ``method.name`` in a config -> the class. A method registers itself where it is defined::

    @register
    class DML(Method):
        name = "dml"

Plug-ins outside kdray use the same decorator (their module must be imported before the config is loaded).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from kdray.errors import ConfigError

if TYPE_CHECKING:
    from kdray.methods.base import Method

METHODS: dict[str, type[Method]] = {}


def register(method: type[Method]) -> type[Method]:
    """Add a method class to the registry (a class decorator). Registering another class under a taken name is an
    error: two methods would answer to one config."""
    taken = METHODS.get(method.name)
    if taken is not None and taken is not method and taken.__qualname__ != method.__qualname__:
        raise ValueError(f"method name '{method.name}' is taken by {taken.__module__}.{taken.__qualname__}")
    METHODS[method.name] = method
    return method


def method_class(name: str) -> type[Method]:
    if not isinstance(name, str) or name not in METHODS:  # a list or a mapping is not a name (nor hashable)
        raise ConfigError("method.name", name, f"accepted: {sorted(METHODS)}")
    return METHODS[name]
