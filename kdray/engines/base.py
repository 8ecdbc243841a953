"""What ``kdray.api.train`` needs of an engine, and the outcome it returns."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from kdray.config import ExperimentConfig
from kdray.tracking import Tracker

EpochCallback = Callable[[dict[str, float], Path], None]
"""Called after every epoch with the epoch's metrics and the path of the checkpoint just written (Tune reports)."""


class Engine:
    """Built from the config, the run folder, the tracker and the epoch callbacks; ``run(resume)`` trains and
    returns the outcome dict that ``write_summary`` reads: ``history``, ``best``, ``peer_params``, ``wall_s``,
    ``first_step_s``, ``steps_per_epoch`` (and engine-specific keys)."""

    name: str

    def __init__(
        self,
        cfg: ExperimentConfig,
        out_dir: Path,
        tracker: Tracker,
        callbacks: list[EpochCallback] | None = None,
        stop: Callable[[], bool] | None = None,
    ):
        self.cfg, self.out_dir, self.tracker = cfg, Path(out_dir), tracker
        self.callbacks = callbacks or []
        self.stop = stop or (lambda: False)  # True once the user asked the run to stop (Ctrl-C, SIGTERM)

    def run(self, resume: dict[str, Any] | None = None) -> dict[str, Any]:
        raise NotImplementedError
