"""LocalEngine: every peer in one process, signals handed over by reference."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from kdray.config import ExperimentConfig
from kdray.engines.process import Engine, EpochLoop, LoopState, PopulationProcess, wallclock


class LocalEngine(Engine):
    name = "local"

    def run(self, resume: dict[str, Any] | None = None) -> dict[str, Any]:
        cfg = self.cfg
        t0 = wallclock()
        proc = PopulationProcess(cfg)
        state = LoopState()
        if resume is not None:
            proc.load_state_dict(resume)
            torch.set_rng_state(resume["rng"])
            state = LoopState(
                resume["epoch"], list(resume.get("history", [])), dict(resume.get("best", state.best))
            )
        loop = LocalLoop(self, proc, t0)
        loop.run(state)
        return {
            "history": state.history,
            "best": state.best,
            "peer_params": {p.name: proc.pop.peers[p.index].num_params for p in proc.peers},
            "wall_s": wallclock() - t0,
            "first_step_s": loop.first_step_s,
            "steps_per_epoch": proc.steps_per_epoch,
        }


class LocalLoop(EpochLoop):
    """The epoch loop with a progress bar, MLflow metrics and the epoch callbacks, all in this process."""

    def __init__(self, engine: LocalEngine, proc: PopulationProcess, t0: float):
        cfg = engine.cfg
        super().__init__(cfg, proc, engine.out_dir / "checkpoints", cfg.to_dict(), engine.tracker.run_id, t0)
        self.engine = engine
        self.bar: tqdm | None = None

    def before_epoch(self, epoch: int) -> None:
        cfg = self.cfg
        self.bar = tqdm(
            total=self.proc.steps_per_epoch, desc=f"epoch {epoch + 1}/{cfg.train.epochs}", leave=False,
            disable=not cfg.train.progress, dynamic_ncols=True,
        )  # fmt: skip

    def after_step(self, epoch: int, local_step: int, metrics: dict) -> None:
        self.bar.update(1)
        if local_step % 10 == 0 and not self.bar.disable:
            self.bar.set_postfix_str(progress_text(self.cfg, metrics))

    def after_train_steps(self, epoch: int) -> None:
        self.bar.close()

    def after_epoch(self, metrics: dict[str, float], state: LoopState, checkpoint: Path | None) -> None:
        self.engine.tracker.log_metrics({k: v for k, v in metrics.items() if k != "epoch"}, step=state.epoch)
        if self.cfg.train.progress:
            tqdm.write(epoch_line(self.cfg, metrics))
        for callback in self.engine.callbacks:
            callback(metrics, checkpoint)


def progress_text(cfg: ExperimentConfig, metrics: dict) -> str:
    parts = []
    for p in cfg.peers:
        if p.frozen:
            continue
        loss = sum(float(v) for k, v in metrics.items() if k.startswith(f"{p.name}/loss_"))
        acc = metrics.get(f"{p.name}/train_acc")
        parts.append(f"{p.name} {loss:.3f}" + (f"/{float(acc):.2f}" if acc is not None else ""))
    return " ".join(parts)


def epoch_line(cfg: ExperimentConfig, metrics: dict) -> str:
    accs = [
        f"{p.name} {metrics[f'{p.name}/val_acc']:.4f}" for p in cfg.peers if f"{p.name}/val_acc" in metrics
    ]
    ens = metrics.get("ensemble/val_acc")
    tail = f" | ensemble {ens:.4f}" if ens is not None else ""
    return f"epoch {metrics['epoch']}/{cfg.train.epochs}: val_acc " + ", ".join(accs) + tail
