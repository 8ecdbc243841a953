"""Distillation methods, one file each; each registers itself (``@register``). ``METHODS`` maps a config's
``method.name`` to its class. Every module of this package is imported with it, so a new method is a new file."""

from __future__ import annotations

import importlib
import pkgutil

from kdray.methods.base import BufferSpec, Method, PeerContext, Phase, PopulationSpec
from kdray.methods.registry import METHODS, method_class, register

for _module in pkgutil.iter_modules(__path__):
    if _module.name not in ("base", "registry"):
        importlib.import_module(f"{__name__}.{_module.name}")

__all__ = [
    "METHODS",
    "BufferSpec",
    "Method",
    "PeerContext",
    "Phase",
    "PopulationSpec",
    "method_class",
    "register",
]
