"""The engine contract: what ``kdray.api`` needs of an engine, and the outcome it returns.

An engine is a class in ``kdray/engines/<name>_engine.py``, registered under its ``name``
(``@ENGINES.register``), which ``engine.name`` in a config picks. It:

- lists the ``engine`` config sections it honours (``sections``); the config refuses the others, naming the key;
- is built from the config, the run folder, the MLflow tracker, the epoch callbacks, a stop flag and the data
  (loaded once by the caller; processes of its own load their own);
- trains in ``run(resume)``: builds the population's processes, and in each one runs the one loop,
  :func:`kdray.loop.train_epochs`, with a :class:`kdray.loop.Collective` (how its processes meet) and a
  :class:`kdray.loop.Sink` (where progress goes: bar, MLflow, callbacks); honours ``stop()`` at the loop's safe
  points (the loop raises :class:`kdray.loop.Stopped`); resumes exactly from a checkpoint payload (``resume``);
- returns the outcome that ``write_summary`` reads: ``history``, ``best``, ``peer_params``, ``wall_s``,
  ``first_step_after_engine_start_s``, ``steps_per_epoch`` (and engine-specific keys, e.g. ``ray``).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

from kdray.config import ExperimentConfig
from kdray.tracking import Tracker

EpochCallback = Callable[[dict[str, float], Path], None]
"""Called after every epoch with the epoch's metrics and the path of the checkpoint just written (Tune reports)."""


class Engine:
    """See the module's docstring for the contract."""

    name: ClassVar[str]
    sections: ClassVar[tuple[str, ...]] = ()  # the engine.<section> keys this engine honours
    summary: ClassVar[str] = ""  # one phrase: where the peers run

    def __init__(
        self,
        cfg: ExperimentConfig,
        out_dir: Path,
        tracker: Tracker,
        callbacks: list[EpochCallback] | None = None,
        stop: Callable[[], bool] | None = None,
        data: Any = None,
    ):
        self.cfg, self.out_dir, self.tracker = cfg, Path(out_dir), tracker
        self.data = (
            data  # the dataset's splits, loaded once by the caller (an engine in this process uses them)
        )
        self.callbacks = callbacks or []
        self.stop = stop or (lambda: False)  # True once the user asked the run to stop (Ctrl-C, SIGTERM)

    def run(self, resume: dict[str, Any] | None = None) -> dict[str, Any]:
        raise NotImplementedError
