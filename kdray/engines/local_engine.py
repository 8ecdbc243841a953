"""LocalEngine: every peer in one process, signals handed over by reference; the loop of :mod:`kdray.loop` with
the in-process collective and a sink that is the progress bar, MLflow and the epoch callbacks."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from kdray.engines.base import Engine
from kdray.engines.display import (
    EpochBar,
    StepWindow,
    live_listeners,
    progress_text,
    report_epoch,
    write_step_row,
)
from kdray.loop import InProcess, Progress, restore, train_epochs
from kdray.metrics import MetricSums
from kdray.population import Population
from kdray.registry import ENGINES
from kdray.step import StepRunner


class LocalSink:
    """Progress bar, per-step and per-epoch MLflow metrics, epoch lines and the epoch callbacks."""

    def __init__(self, engine: LocalEngine, t0: float):
        self.engine, self.cfg, self.t0 = engine, engine.cfg, t0
        self.bar = EpochBar(self.cfg, live_listeners(engine.callbacks))
        self.window = StepWindow(self.cfg.train.log_every_steps)
        self.live = MetricSums()  # the bar's running means (since the last postfix)
        self.first_step_s: float | None = None  # from the engine's start to the end of the first step

    def epoch_started(self, epoch: int, start_step: int, steps: int) -> None:
        self.bar.start(epoch, start_step, steps)

    def step_done(self, epoch: int, step_in_epoch: int, step: int, metrics: MetricSums) -> None:
        if self.first_step_s is None:
            self.first_step_s = time.perf_counter() - self.t0
        self.live.merge(metrics)
        postfix = None
        if step_in_epoch % 10 == 0:  # converting to floats synchronises a GPU: not every step
            postfix, self.live = progress_text(self.cfg, self.live.means()), MetricSums()
        self.bar.advance(step_in_epoch + 1, postfix)
        row = self.window.add(step, metrics)
        if row is not None:
            write_step_row(self.engine.tracker, self.engine.out_dir, step + 1, row)

    def checkpointed(self, own: dict[str, Any], progress: Progress, path: Path | None) -> None:
        pass

    def epoch_done(self, metrics: dict[str, float], progress: Progress, path: Path | None) -> None:
        self.bar.close()
        report_epoch(self.engine, self.bar, progress.epoch, metrics, path)

    def stop_requested(self) -> bool:
        return self.engine.stop()


@ENGINES.register
class LocalEngine(Engine):
    name = "local"
    summary = "every peer in this process"

    def run(self, resume: dict[str, Any] | None = None) -> dict[str, Any]:
        t0 = time.perf_counter()
        if self.cfg.train.threads:
            torch.set_num_threads(self.cfg.train.threads)
        pop = Population(self.cfg, data=self.data)
        runner = StepRunner(pop)
        progress = restore(pop, runner, resume) if resume is not None else Progress()
        sink = LocalSink(self, t0)
        meta = {"config": self.cfg.to_dict(), "mlflow_run_id": self.tracker.run_id}
        try:
            train_epochs(pop, runner, progress, InProcess(), sink, self.out_dir / "checkpoints", meta)
        finally:
            sink.bar.close()
        return {
            "history": progress.history,
            "best": progress.best,
            "peer_params": {p.name: pop.spec.peers[p.index].num_params for p in pop.peers},
            "wall_s": time.perf_counter() - t0,
            "first_step_after_engine_start_s": sink.first_step_s,
            "steps_per_epoch": pop.steps_per_epoch,
        }
