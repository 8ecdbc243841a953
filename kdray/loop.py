"""The epoch loop, one plain function that both engines run: train the epoch's steps, merge the metrics, evaluate,
checkpoint, emit.

What differs between engines is passed in as two small objects:

- a :class:`Collective`: how this process's numbers meet the other processes' (``InProcess``: there are none;
  on Ray workers, the process group). Every rank gets the same merged numbers, so every rank takes the same
  decisions (best epoch, stop).
- a :class:`Sink`: where progress goes (``LocalSink``: a progress bar, MLflow and the epoch callbacks; on Ray
  workers: the driver's live view and Ray Train's reports).

Checkpoints: at every epoch end and every ``train.checkpoint_every_steps`` steps (and when a stop is requested),
the population's state is gathered to the writer (the only process, or rank 0) and written atomically
(:func:`checkpoint_payload` builds every file's payload) to ``<out>/checkpoints/last.pt`` (and ``best.pt`` when
the selection metric improved), with where the loop stands (:class:`Progress`), so ``--resume`` continues exactly,
mid-epoch included. Where every process sees the checkpoint folder (``Collective.writes_parts``), each process
writes its own part there instead, and rank 0 writes ``last.pt`` as a manifest of the parts.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from kdray.checkpoint import manifest_files, merge_parts, prune_parts, save_checkpoint, save_part
from kdray.config import ExperimentConfig
from kdray.errors import DivergedError, KdrayError
from kdray.evaluation import evaluate, merge_eval, summarise_eval
from kdray.metrics import MetricSums, merge_states, non_finite
from kdray.plots import generator_preview, save_image_grid
from kdray.population import Population
from kdray.step import StepRunner


class Stopped(KdrayError):
    """The run stopped at a safe point because it was asked to (Ctrl-C, SIGTERM); it can be resumed."""

    exit_code = 130


@dataclass
class Progress:
    """Where the loop stands: what a checkpoint must hold to continue exactly."""

    epoch: int = 0  # epochs completed
    step_in_epoch: int = 0  # steps of epoch ``epoch`` already trained (a mid-epoch checkpoint)
    partial: MetricSums = field(default_factory=MetricSums)  # their metrics
    history: list[dict[str, float]] = field(default_factory=list)
    best: dict[str, Any] = field(default_factory=lambda: {"metric": float("-inf"), "epoch": -1})

    def state(self) -> dict[str, Any]:
        """Where the loop stands within the epoch (a checkpoint holds ``history`` and ``best`` once, at its top)."""
        return {"epoch": self.epoch, "step_in_epoch": self.step_in_epoch, "partial": self.partial.state()}

    @classmethod
    def from_checkpoint(cls, payload: dict[str, Any]) -> Progress:
        progress = payload.get("progress") or {}
        return cls(
            epoch=int(payload["epoch"]),
            step_in_epoch=int(progress.get("step_in_epoch", 0)),
            partial=MetricSums.from_state(progress.get("partial")),
            history=list(payload.get("history", [])),
            best=dict(payload.get("best") or {"metric": float("-inf"), "epoch": -1}),
        )


class Collective(Protocol):
    """How the processes of one population meet. ``check_every``: steps between stop checks (each one is a
    collective on Ray workers). ``writes_parts``: every process writes its own part of a checkpoint into the
    (shared) checkpoint folder and rank 0 a manifest (:mod:`kdray.checkpoint`), instead of gathering the
    population's state to rank 0."""

    rank: int
    world: int
    check_every: int
    writes_parts: bool

    def all_gather(self, obj: Any) -> list[Any]: ...

    def gather(self, obj: Any) -> list[Any] | None:
        """Every rank's ``obj`` on rank 0 (the writer); None elsewhere."""
        ...


class InProcess:
    """The collective of a population that lives in one process: there is nobody else."""

    rank, world, check_every = 0, 1, 1
    writes_parts = False

    def all_gather(self, obj: Any) -> list[Any]:
        return [obj]

    def gather(self, obj: Any) -> list[Any]:
        return [obj]


class Sink(Protocol):
    def epoch_started(self, epoch: int, start_step: int, steps: int) -> None: ...

    def step_done(self, epoch: int, step_in_epoch: int, step: int, metrics: MetricSums) -> None: ...

    def checkpointed(self, own: dict[str, Any], progress: Progress, path: Path | None) -> None:
        """After every checkpoint, with this process's own part as a checkpoint payload (Ray workers report it to
        Ray Train here); ``path``: the population's file, on the writer."""
        ...

    def epoch_done(self, metrics: dict[str, float], progress: Progress, path: Path | None) -> None: ...

    def stop_requested(self) -> bool: ...


# ---------------------------------------------------------------------------------------------------- merging
def process_state(pop: Population, runner: StepRunner, rank: int) -> dict[str, Any]:
    """This process's part of a checkpoint: its peers, the shared module, its exchange's state (keyed by rank)."""
    return {**pop.state_dict(), "exchange": {rank: runner.exchange.state_dict()}}


def checkpoint_payload(
    meta: dict[str, Any], progress: Progress, steps_per_epoch: int, state: dict[str, Any]
) -> dict[str, Any]:
    """What a checkpoint file holds (see :mod:`kdray.checkpoint`), built here for every writer: ``meta`` (the
    resolved config, the MLflow run id), where the loop stands, the history and the best epoch (once each), the
    global RNG, and ``state`` (a population's or one process's part, :func:`process_state`)."""
    return {
        **meta,
        "epoch": progress.epoch,
        "step": progress.epoch * steps_per_epoch + progress.step_in_epoch,
        "progress": progress.state(),
        "history": progress.history,
        "best": progress.best,
        "rng": torch.get_rng_state(),
        **state,
    }


def restore(pop: Population, runner: StepRunner, payload: dict[str, Any], rank: int = 0) -> Progress:
    """Restore this process's peers, exchange and RNG from a checkpoint payload; where the loop stands."""
    pop.load_state_dict(payload)
    runner.exchange.load_state_dict((payload.get("exchange") or {}).get(rank, {}))
    torch.set_rng_state(payload["rng"])
    return Progress.from_checkpoint(payload)


def exchange_figures(parts: list[dict[str, float]]) -> dict[str, float]:
    """Per-rank exchange figures -> the population's: bytes summed, times averaged over ranks."""
    if not parts or "bytes_per_step" not in parts[0]:
        return {}
    out = {
        "exchange/bytes_per_step": sum(p["bytes_per_step"] for p in parts),
        "exchange/ms_per_step": sum(p["ms_per_step"] for p in parts) / len(parts),
    }
    if any("group_bytes_per_step" in p for p in parts):  # within peer groups (K x M: stale, unequal M)
        out["exchange/group_bytes_per_step"] = sum(p.get("group_bytes_per_step", 0.0) for p in parts)
    waits = [p["wait_ms_per_step"] for p in parts if "wait_ms_per_step" in p]  # engine.exchange.split_wait
    if waits:  # (unequal workers per peer: only the peers' first workers wait for the other peers)
        out["exchange/wait_ms_per_step"] = sum(waits) / len(waits)
    return out


def score(cfg: ExperimentConfig, metrics: dict[str, float]) -> float:
    """The number 'best' refers to: the mean selection-split accuracy of the trainable peers."""
    accs = [
        metrics[f"{p.name}/val_acc"] for p in cfg.peers if not p.frozen and f"{p.name}/val_acc" in metrics
    ]
    return sum(accs) / len(accs) if accs else float("nan")


def check_finite(metrics: dict[str, float], epoch: int) -> None:
    bad = non_finite(metrics)
    if bad:
        raise DivergedError(
            f"training diverged in epoch {epoch + 1}: {bad[0]} = {metrics[bad[0]]} ({len(bad)} non-finite metric(s))"
        )


# ------------------------------------------------------------------------------------------------------ the loop
def train_epochs(
    pop: Population,
    runner: StepRunner,
    progress: Progress,
    collective: Collective,
    sink: Sink,
    ckpt_dir: Path,
    meta: dict[str, Any],
) -> Progress:
    """Train ``pop`` with ``runner`` (its step and exchange) from where ``progress`` stands to the last epoch.
    ``meta``: what every checkpoint carries besides the state (the resolved config, the MLflow run id)."""
    cfg = pop.cfg
    steps_per_epoch, epochs = pop.steps_per_epoch, cfg.train.epochs
    every = cfg.train.checkpoint_every_steps
    select_split = cfg.data.eval_split

    def checkpoint(improved: bool = False) -> Path | None:
        mine = process_state(pop, runner, collective.rank)
        # a data-parallel peer's first worker writes it into the population's file (its workers hold the same)
        part = mine if pop.shard[0] == 0 else {**mine, "peers": {}}
        path = None
        if collective.writes_parts:  # each process writes its own part; only file names and digests travel
            step = progress.epoch * steps_per_epoch + progress.step_in_epoch
            part = part if collective.rank == 0 else {**part, "shared": None}
            entries = collective.gather(save_part(ckpt_dir, step, collective.rank, part))
            state = {"peers": {}, "shared": None, "exchange": {}, "parts": entries}
        else:
            parts = collective.gather(part)
            state = merge_parts(parts) if parts is not None else None
        if collective.rank == 0:
            payload = checkpoint_payload(meta, progress, steps_per_epoch, state)
            path = save_checkpoint(ckpt_dir / "last.pt", payload)
            if improved:
                save_checkpoint(ckpt_dir / "best.pt", payload)
            if collective.writes_parts:
                last, best = manifest_files(ckpt_dir / "last.pt"), manifest_files(ckpt_dir / "best.pt")
                if (
                    last is not None and best is not None
                ):  # a manifest unreadable now: prune nothing this time
                    prune_parts(ckpt_dir, step, last | best)
        sink.checkpointed(checkpoint_payload(meta, progress, steps_per_epoch, mine), progress, path)
        return path

    for epoch in range(progress.epoch, epochs):
        sink.epoch_started(epoch, progress.step_in_epoch, steps_per_epoch)
        started, first = time.perf_counter(), progress.step_in_epoch
        for i, batch in enumerate(pop.batches(epoch, progress.step_in_epoch), start=progress.step_in_epoch):
            step = epoch * steps_per_epoch + i
            metrics = runner.step(batch, epoch, step)
            progress.partial.merge(metrics)
            progress.step_in_epoch = i + 1
            sink.step_done(epoch, i, step, metrics)
            if i + 1 == steps_per_epoch:
                break
            stopping = (step + 1) % collective.check_every == 0 and any(
                collective.all_gather(sink.stop_requested())
            )
            if stopping or (every and (step + 1) % every == 0):
                checkpoint()
            if stopping:
                raise Stopped(
                    f"stopped at a safe point (epoch {epoch + 1}, step {i + 1}/{steps_per_epoch}); the checkpoint is in "
                    f"{ckpt_dir}; continue with: kdray train --resume {ckpt_dir.parent}"
                )
        step_ms = 1000.0 * (time.perf_counter() - started) / max(progress.step_in_epoch - first, 1)
        metrics = merge_states(collective.all_gather(progress.partial.state()))
        check_finite(metrics, epoch)
        for lrs in collective.all_gather(pop.learning_rates()):
            metrics.update(lrs)
        if select_split and (epoch + 1 == epochs or (epoch + 1) % cfg.train.eval_every == 0):
            ev = merge_eval(collective.all_gather(evaluate(pop, select_split)))
            metrics.update(summarise_eval(cfg, ev, "val"))
        ranks = collective.all_gather({**runner.exchange.stats(), "step_ms": step_ms})
        metrics.update(exchange_figures(ranks))
        metrics["train/step_ms"] = sum(r["step_ms"] for r in ranks) / len(ranks)
        metrics = {k: v for k, v in sorted(metrics.items())} | {"epoch": epoch + 1}
        progress.epoch, progress.step_in_epoch, progress.partial = epoch + 1, 0, MetricSums()
        progress.history.append(metrics)
        current = score(cfg, metrics)
        improved = cfg.data.select_on == "last" or (
            not math.isnan(current) and current > progress.best["metric"]
        )
        if improved:
            progress.best = {"metric": current, "epoch": epoch + 1}
        path = checkpoint(improved)
        if collective.rank == 0:
            images = generator_preview(pop, epoch)
            if images is not None:  # a generator's samples: samples/epoch<k>.png and samples.png, the latest
                save_image_grid(images, ckpt_dir.parent / "samples" / f"epoch{epoch + 1:03d}.png")
                save_image_grid(images, ckpt_dir.parent / "samples.png")
        sink.epoch_done(metrics, progress, path)
        if epoch + 1 < epochs and any(collective.all_gather(sink.stop_requested())):
            raise Stopped(
                f"stopped at a safe point (end of epoch {epoch + 1}); continue with: kdray train --resume "
                f"{ckpt_dir.parent}"
            )
    return progress
