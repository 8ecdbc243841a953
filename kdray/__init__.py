"""kdray: populations of networks that teach each other, orchestrated on Ray."""

from kdray.api import RunResult, evaluate, train
from kdray.config import ExperimentConfig, load_config
from kdray.errors import KdrayError

__version__ = "0.1.0"
__all__ = ["ExperimentConfig", "KdrayError", "RunResult", "__version__", "evaluate", "load_config", "train"]
