"""The per-process part of a population, and the epoch loop every engine runs.

``PopulationProcess`` holds the peers that live in this process (all of them for ``LocalEngine``, one for a Ray
worker), the shared module, the data and the step runner. ``EpochLoop`` trains it epoch by epoch, evaluates,
checkpoints and logs; what differs between engines is passed in: the exchange, how sums from several processes are
added up, and who writes files.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from kdray.checkpoint import save_checkpoint
from kdray.config import ExperimentConfig
from kdray.data import build_data
from kdray.errors import DivergedError
from kdray.methods import method_class
from kdray.population import (
    Exchange,
    LocalExchange,
    PeerRuntime,
    StepRunner,
    build_peer,
    build_shared,
    evaluate_peers,
    lr_factor,
    population_spec,
    resolve_device,
)
from kdray.tracking import Tracker


class PopulationProcess:
    def __init__(
        self,
        cfg: ExperimentConfig,
        local_ids: list[int] | None = None,
        exchange_factory: Callable[[Any], Exchange] | None = None,
        device: torch.device | None = None,
    ):
        self.cfg = cfg
        self.device = device or resolve_device(cfg.train.device)
        if cfg.train.threads:
            torch.set_num_threads(cfg.train.threads)
        self.data = build_data(cfg.data, cfg.seed)
        steps = self.data.steps_per_epoch()
        if cfg.train.max_steps_per_epoch:
            steps = min(steps, cfg.train.max_steps_per_epoch)
        self.steps_per_epoch = steps
        self.pop = population_spec(cfg, self.data.spec, steps)
        self.method = method_class(cfg.method.name)(cfg.method, self.pop)
        ids = list(range(cfg.num_peers)) if local_ids is None else local_ids
        self.peers: list[PeerRuntime] = [build_peer(cfg, self.method, k, self.device) for k in ids]
        self.shared = build_shared(cfg, self.method, self.device)
        self.exchange = (exchange_factory or LocalExchange)(self.method)
        self.exchange.attach(self.peers)
        self.runner = StepRunner(cfg, self.method, self.peers, self.shared, self.exchange, self.device)

    def set_epoch_lr(self, epoch: int) -> float:
        factor = lr_factor(self.cfg.train.schedule, epoch, self.cfg.train.epochs)
        for p in self.peers:
            p.set_lr(factor)
        if self.shared is not None:
            self.shared.set_lr(factor)
        return factor

    def steps(self, epoch: int, start_step: int = 0) -> Iterator[tuple[int, dict[str, Tensor]]]:
        """Train the steps ``start_step .. steps_per_epoch - 1`` of ``epoch``, yielding (step in epoch, metrics)."""
        self.set_epoch_lr(epoch)
        for p in self.peers:
            p.train_mode()
        for i, batch in enumerate(
            self.data.train_batches(epoch, start_step=start_step, max_steps=self.steps_per_epoch - start_step)
        ):
            local_step = start_step + i
            step = epoch * self.steps_per_epoch + local_step
            yield local_step, self.runner.step(batch.to(self.device), epoch, step)

    def train_steps(
        self, epoch: int, start_step: int = 0, on_step: Callable[[int, dict], None] | None = None
    ):
        """Train the steps ``start_step .. steps_per_epoch - 1`` of ``epoch``; returns summed metrics and the count."""
        sums: dict[str, Tensor] = {}
        n = 0
        for local_step, metrics in self.steps(epoch, start_step):
            add_metrics(sums, metrics)
            n += 1
            if on_step is not None:
                on_step(local_step, metrics)
        return sums, n

    def evaluate(self) -> dict[str, Any]:
        return evaluate_peers(self.peers, self.data, self.device)

    def state_dict(self) -> dict[str, Any]:
        return {
            "peers": {p.name: p.state_dict() for p in self.peers},
            "shared": self.shared.state_dict() if self.shared is not None else None,
        }

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        for p in self.peers:
            p.load_state_dict(sd["peers"][p.name])
        if self.shared is not None and sd.get("shared") is not None:
            self.shared.load_state_dict(sd["shared"])


def add_metrics(sums: dict[str, Tensor], metrics: dict[str, Tensor]) -> None:
    for k, v in metrics.items():
        sums[k] = sums.get(k, 0) + v


def summarise_eval(cfg: ExperimentConfig, ev: dict[str, Any]) -> dict[str, float]:
    """Turn summed evaluation counts into per-peer and ensemble metrics."""
    out: dict[str, float] = {}
    n = ev["n"]
    for k, c in ev["correct"].items():
        name = cfg.peers[k].name
        out[f"{name}/val_acc"] = float(c) / n
        out[f"{name}/val_loss"] = float(ev["loss"][k]) / n
    if ev.get("ensemble_correct") is not None:
        out["ensemble/val_acc"] = float(ev["ensemble_correct"]) / n
    elif ev.get("probs_sum") is not None:
        out["ensemble/val_acc"] = float((ev["probs_sum"].argmax(1) == ev["labels"]).double().mean())
    return out


@dataclass
class LoopState:
    epoch: int = 0  # epochs completed
    history: list[dict[str, float]] = field(default_factory=list)
    best: dict[str, Any] = field(default_factory=lambda: {"metric": float("-inf"), "epoch": -1})


def score(cfg: ExperimentConfig, metrics: dict[str, float]) -> float:
    """The number 'best' refers to: the mean validation accuracy of the trainable peers."""
    accs = [
        metrics[f"{p.name}/val_acc"] for p in cfg.peers if not p.frozen and f"{p.name}/val_acc" in metrics
    ]
    return sum(accs) / len(accs) if accs else float("nan")


def epoch_means(sums: dict[str, Tensor], n: int) -> dict[str, float]:
    return {k: float(v) / max(n, 1) for k, v in sums.items()}


EpochCallback = Callable[[dict[str, float], Path], None]
"""Called after every epoch with the epoch's metrics and the path of the checkpoint just written (Tune reports)."""


def check_finite(metrics: dict[str, float], epoch: int) -> None:
    bad = sorted(k for k, v in metrics.items() if not math.isfinite(v))
    if bad:
        raise DivergedError(
            f"training diverged in epoch {epoch + 1}: {bad[0]} = {metrics[bad[0]]} ({len(bad)} non-finite metric(s))"
        )


def wallclock() -> float:
    return time.perf_counter()


class EpochLoop:
    """The epoch loop every engine runs: train the steps, merge the metrics, evaluate, checkpoint, report.

    As written the whole population lives in this process (``LocalEngine``). A Ray worker runs a subclass on its one
    peer: ``merge_metrics`` / ``merge_eval`` join its sums with the other workers' (every rank gets the same numbers,
    so every rank takes the same decisions), ``population_state`` gathers every peer to rank 0, the only writer of
    ``checkpoints/last.pt``, and the ``before_*`` / ``after_*`` hooks report.
    """

    def __init__(
        self,
        cfg: ExperimentConfig,
        proc: PopulationProcess,
        ckpt_dir: Path,
        config: dict[str, Any],
        run_id: str | None,
        t0: float,
    ):
        self.cfg, self.proc, self.ckpt_dir = cfg, proc, Path(ckpt_dir)
        self.config, self.run_id, self.t0 = config, run_id, t0
        self.first_step_s: float | None = None
        self.sums: dict[str, Tensor] = {}  # this epoch's summed step metrics so far
        self.n = 0

    # ------------------------------------------------------------------ what engines override
    def before_epoch(self, epoch: int) -> None:
        pass

    def after_step(self, epoch: int, local_step: int, metrics: dict[str, Tensor]) -> None:
        pass

    def after_train_steps(self, epoch: int) -> None:
        pass

    def merge_metrics(self, sums: dict[str, Tensor], n: int) -> dict[str, float]:
        return epoch_means(sums, n)

    def merge_eval(self, ev: dict[str, Any]) -> dict[str, Any]:
        return ev

    def extra_metrics(self) -> dict[str, float]:
        return {}

    def population_state(self) -> dict[str, Any] | None:
        """Every peer's state for ``last.pt``; None in processes that do not write it."""
        return self.proc.state_dict()

    def after_epoch(self, metrics: dict[str, float], state: LoopState, checkpoint: Path | None) -> None:
        pass

    # ------------------------------------------------------------------ the loop
    def run(
        self, state: LoopState, start_step: int = 0, sums: dict[str, Tensor] | None = None, n: int = 0
    ) -> LoopState:
        """Train from ``state.epoch`` (and ``start_step`` inside it, with that epoch's ``sums`` so far) to the end."""
        self.sums, self.n = dict(sums or {}), n
        for epoch in range(state.epoch, self.cfg.train.epochs):
            self.before_epoch(epoch)
            for local_step, metrics in self.proc.steps(epoch, start_step):
                if self.first_step_s is None:
                    self.first_step_s = wallclock() - self.t0
                add_metrics(self.sums, metrics)
                self.n += 1
                self.after_step(epoch, local_step, metrics)
            self.after_train_steps(epoch)
            self.end_epoch(epoch, state)
            start_step, self.sums, self.n = 0, {}, 0
        return state

    def end_epoch(self, epoch: int, state: LoopState) -> None:
        cfg, proc = self.cfg, self.proc
        metrics = self.merge_metrics(self.sums, self.n)
        check_finite(metrics, epoch)
        metrics["lr_factor"] = proc.set_epoch_lr(epoch)
        if epoch + 1 == cfg.train.epochs or (epoch + 1) % cfg.train.eval_every == 0:
            metrics.update(summarise_eval(cfg, self.merge_eval(proc.evaluate())))
        metrics.update(self.extra_metrics())
        metrics["epoch"] = epoch + 1
        state.epoch = epoch + 1
        state.history.append(metrics)
        improved = score(cfg, metrics) > state.best["metric"]
        if improved:
            state.best = {"metric": score(cfg, metrics), "epoch": epoch + 1}
        population = self.population_state()
        path = None
        if population is not None:
            payload = {
                "config": self.config, "epoch": state.epoch, "step": state.epoch * proc.steps_per_epoch,
                "rng": torch.get_rng_state(), "mlflow_run_id": self.run_id, "history": state.history,
                "best": state.best, **population,
            }  # fmt: skip
            path = save_checkpoint(self.ckpt_dir / "last.pt", payload)
            if improved:
                save_checkpoint(self.ckpt_dir / "best.pt", payload)
        self.after_epoch(metrics, state, path)


class Engine:
    """What ``kdray.api.train`` needs of an engine: built from the config, the run folder, the tracker and the
    epoch callbacks; ``run(resume)`` returns the outcome dict that ``write_summary`` reads."""

    name: str

    def __init__(
        self,
        cfg: ExperimentConfig,
        out_dir: Path,
        tracker: Tracker,
        callbacks: list[EpochCallback] | None = None,
    ):
        self.cfg, self.out_dir, self.tracker = cfg, Path(out_dir), tracker
        self.callbacks = callbacks or []

    def run(self, resume: dict[str, Any] | None = None) -> dict[str, Any]:
        raise NotImplementedError
