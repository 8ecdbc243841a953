"""LocalEngine: every peer in one process, signals handed over by reference."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from kdray.checkpoint import save_checkpoint
from kdray.config import ExperimentConfig
from kdray.engines.process import (
    EpochCallback,
    LoopState,
    PopulationProcess,
    check_finite,
    epoch_means,
    score,
    summarise_eval,
    wallclock,
)
from kdray.tracking import Tracker


class LocalEngine:
    name = "local"

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
        first_step_s: float | None = None
        ckpt_dir = self.out_dir / "checkpoints"
        for epoch in range(state.epoch, cfg.train.epochs):
            bar = tqdm(
                total=proc.steps_per_epoch, desc=f"epoch {epoch + 1}/{cfg.train.epochs}", leave=False,
                disable=not cfg.train.progress, dynamic_ncols=True,
            )  # fmt: skip

            def on_step(i: int, metrics: dict, bar=bar) -> None:
                nonlocal first_step_s
                if first_step_s is None:
                    first_step_s = wallclock() - t0
                bar.update(1)
                if i % 10 == 0 and not bar.disable:
                    bar.set_postfix_str(progress_text(cfg, metrics))

            sums, n = proc.train_steps(epoch, on_step=on_step)
            bar.close()
            metrics = epoch_means(sums, n)
            check_finite(metrics, epoch)
            metrics["lr_factor"] = proc.set_epoch_lr(epoch)
            last = epoch + 1 == cfg.train.epochs
            if last or (epoch + 1) % cfg.train.eval_every == 0:
                metrics.update(summarise_eval(cfg, proc.evaluate()))
            metrics["epoch"] = epoch + 1
            state.epoch = epoch + 1
            state.history.append(metrics)
            self.tracker.log_metrics({k: v for k, v in metrics.items() if k != "epoch"}, step=epoch + 1)
            improved = score(cfg, metrics) > state.best["metric"]
            if improved:
                state.best = {"metric": score(cfg, metrics), "epoch": epoch + 1}
            payload = {
                "config": cfg.to_dict(), "epoch": state.epoch, "step": state.epoch * proc.steps_per_epoch,
                "rng": torch.get_rng_state(), "mlflow_run_id": self.tracker.run_id, "history": state.history,
                "best": state.best, **proc.state_dict(),
            }  # fmt: skip
            save_checkpoint(ckpt_dir / "last.pt", payload)
            if improved:
                save_checkpoint(ckpt_dir / "best.pt", payload)
            if cfg.train.progress:
                tqdm.write(epoch_line(cfg, metrics))
            for callback in self.callbacks:
                callback(metrics, ckpt_dir / "last.pt")
        return {
            "history": state.history,
            "best": state.best,
            "peer_params": {p.name: proc.pop.peers[p.index].num_params for p in proc.peers},
            "wall_s": wallclock() - t0,
            "first_step_s": first_step_s,
            "steps_per_epoch": proc.steps_per_epoch,
        }


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
