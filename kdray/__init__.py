"""kdray: populations of networks that teach each other, orchestrated on Ray.

The public names are imported on first use (PEP 562), so that importing one of kdray's modules does not import
torch: Ray Train's controller process unpickles kdray's backend config (``kdray.engines.ray_backend``), and it
never computes.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from kdray.version import __version__

__all__ = [
    "ExperimentConfig",
    "KdrayError",
    "RunResult",
    "__version__",
    "evaluate",
    "export",
    "load_config",
    "train",
]

_WHERE = {
    "RunResult": "kdray.api",
    "evaluate": "kdray.api",
    "train": "kdray.api",
    "export": "kdray.exporter",  # not kdray/export.py: importing it would shadow the function
    "ExperimentConfig": "kdray.config",
    "load_config": "kdray.config",
    "KdrayError": "kdray.errors",
}

if TYPE_CHECKING:
    from kdray.api import RunResult, evaluate, train
    from kdray.config import ExperimentConfig, load_config
    from kdray.errors import KdrayError
    from kdray.exporter import export


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        value = getattr(importlib.import_module(_WHERE[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'kdray' has no attribute '{name}'")
