"""Distillation methods, one file each. ``METHODS`` maps a config's ``method.name`` to its class."""

from __future__ import annotations

from kdray.errors import ConfigError
from kdray.methods.acn import ACN
from kdray.methods.afd import AFD
from kdray.methods.base import Method, PeerContext, Phase, PopulationSpec
from kdray.methods.dml import DML
from kdray.methods.independent import Independent
from kdray.methods.kd import HintonKD

METHODS: dict[str, type[Method]] = {m.name: m for m in (Independent, DML, HintonKD, AFD, ACN)}


def register(method: type[Method]) -> type[Method]:
    """Add a method class to the registry (usable as a decorator by plug-ins)."""
    METHODS[method.name] = method
    return method


def method_class(name: str) -> type[Method]:
    try:
        return METHODS[name]
    except KeyError:
        raise ConfigError("method.name", name, f"accepted: {sorted(METHODS)}") from None


__all__ = ["METHODS", "Method", "PeerContext", "Phase", "PopulationSpec", "method_class", "register"]
