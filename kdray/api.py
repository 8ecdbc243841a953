"""The Python API; the CLI is a thin layer over it.

import kdray
result = kdray.train("configs/demo.yaml", overrides=["train.epochs=1"], out="runs/quick")
result.summary["peers"][0]["val_acc"]
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from kdray.checkpoint import check_compatible, load_checkpoint, resolve_checkpoint_path
from kdray.config import ExperimentConfig, load_config, validate
from kdray.errors import KdrayError
from kdray.tracking import Tracker


@dataclass
class RunResult:
    out_dir: Path
    summary: dict[str, Any]

    @property
    def checkpoint(self) -> Path:
        return self.out_dir / "checkpoints" / "last.pt"


def _prepare_out_dir(cfg: ExperimentConfig, out: str | Path | None, resuming: bool) -> Path:
    if out is None:
        out = Path("runs") / f"{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    out = Path(out)
    if not resuming and (out / "checkpoints" / "last.pt").exists():
        raise KdrayError(
            f"--out '{out}' already holds a run (checkpoints/last.pt); resume it with --resume {out}, "
            "or choose another --out"
        )
    return out


def train(
    config: str | Path | dict[str, Any] | ExperimentConfig,
    overrides: list[str] | None = None,
    out: str | Path | None = None,
    resume: str | Path | None = None,
    callbacks: list | None = None,
    parent_run_id: str | None = None,
) -> RunResult:
    """Train a population. Everything is validated (config, data, tracking store, resume checkpoint) before the
    output folder is created, so bad input never leaves a half-written run behind.

    ``parent_run_id``: nest this run's MLflow run under that run (a study's trials under the study)."""
    from kdray.data import build_data

    payload = None
    if resume is not None:
        ckpt_file = resolve_checkpoint_path(resume)
        payload = load_checkpoint(ckpt_file)
        if config is None:
            config = payload["config"]
        out = out or ckpt_file.parent.parent
    if isinstance(config, ExperimentConfig):
        cfg = validate(load_config(config.to_dict(), overrides).to_dict()) if overrides else config
    else:
        cfg = load_config(config, overrides)
    if payload is not None:
        check_compatible(payload, cfg.to_dict(), str(resume))
    out_dir = _prepare_out_dir(cfg, out, resuming=payload is not None)
    build_data(cfg.data, cfg.seed)  # fails here (clear DataError) if the data cannot be found
    tracker = Tracker(cfg.tracking, out_dir)
    tracker.check()

    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    run_id = tracker.start(
        cfg.name,
        resume_run_id=payload.get("mlflow_run_id") if payload else None,
        parent_run_id=parent_run_id,
    )
    tracker.log_params(cfg.flat())
    tracker.set_tags(
        {"kdray.method": cfg.method.name, "kdray.engine": cfg.engine.name, "kdray.out": str(out_dir)}
    )
    status = "FAILED"
    try:
        if cfg.engine.name == "ray":
            from kdray.engines.ray_engine import RayEngine

            engine = RayEngine(cfg, out_dir, tracker, callbacks)
        else:
            from kdray.engines.local import LocalEngine

            engine = LocalEngine(cfg, out_dir, tracker, callbacks)
        outcome = engine.run(resume=payload)
        summary = write_summary(cfg, out_dir, outcome, run_id)
        _log_artifacts(tracker, out_dir)
        status = "FINISHED"
        return RunResult(out_dir, summary)
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        tracker.end(status)


def write_summary(
    cfg: ExperimentConfig, out_dir: Path, outcome: dict[str, Any], run_id: str | None
) -> dict[str, Any]:
    from kdray.plots import plot_curves

    last = outcome["history"][-1] if outcome["history"] else {}
    peers = []
    for p in cfg.peers:
        peers.append(
            {
                "name": p.name,
                "arch": p.arch,
                "frozen": p.frozen,
                "params": outcome["peer_params"].get(p.name),
                "val_acc": last.get(f"{p.name}/val_acc"),
                "val_loss": last.get(f"{p.name}/val_loss"),
                "best_val_acc": max(
                    (h[f"{p.name}/val_acc"] for h in outcome["history"] if f"{p.name}/val_acc" in h),
                    default=None,
                ),
            }
        )
    summary = {
        "name": cfg.name,
        "method": cfg.method.name,
        "engine": cfg.engine.name,
        "peers": peers,
        "ensemble_acc": last.get("ensemble/val_acc"),
        "epochs": last.get("epoch", 0),
        "steps_per_epoch": outcome.get("steps_per_epoch"),
        "wall_s": round(outcome["wall_s"], 3),
        "first_step_s": outcome.get("first_step_s"),
        "mlflow_run_id": run_id,
        "best": outcome["best"],
        "history": outcome["history"],
        **{k: v for k, v in outcome.items() if k.startswith("exchange")},
    }
    if outcome.get("ray"):  # RayEngine: where each peer ran, how Ray was found, where the start-up time went
        summary["ray"] = {**outcome["ray"], "placement": outcome.get("placement")}
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    if outcome["history"]:
        plot_curves(cfg, outcome["history"], out_dir / "curves.png")
    return summary


def _log_artifacts(tracker: Tracker, out_dir: Path) -> None:
    for name in ("config.yaml", "summary.json", "curves.png"):
        tracker.log_artifact(out_dir / name)
    if tracker.cfg.log_checkpoint:
        tracker.log_artifact(out_dir / "checkpoints" / "last.pt", "checkpoints")


def evaluate(checkpoint: str | Path, overrides: list[str] | None = None) -> dict[str, Any]:
    """Re-evaluate a saved population on its validation set: per-peer accuracy and loss, and the ensemble's."""
    from kdray.engines.process import PopulationProcess, summarise_eval

    payload = load_checkpoint(checkpoint)
    raw = payload["config"]
    cfg = load_config(raw, ["tracking.enabled=false", "train.progress=false", *(overrides or [])])
    proc = PopulationProcess(cfg)
    proc.load_state_dict(payload)
    metrics = summarise_eval(cfg, proc.evaluate())
    return {
        "checkpoint": str(resolve_checkpoint_path(checkpoint)),
        "epoch": payload["epoch"],
        "peers": [
            {
                "name": p.name,
                "arch": p.arch,
                "val_acc": metrics[f"{p.name}/val_acc"],
                "val_loss": metrics[f"{p.name}/val_loss"],
            }
            for p in cfg.peers
        ],
        "ensemble_acc": metrics.get("ensemble/val_acc"),
    }
