"""The Python API; the CLI is a thin layer over it.

import kdray
result = kdray.train("configs/demo.yaml", overrides=["train.epochs=1"], out="runs/quick")
result.summary["peers"][0]["val_acc"], result.summary["peers"][0]["test_acc"]

A config with ``stages:`` runs every stage in order (:mod:`kdray.stages`); ``train`` dispatches to it. One
population's run is :mod:`kdray.run`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kdray.checkpoint import check_compatible, load_checkpoint, resolve_checkpoint_path
from kdray.config import ExperimentConfig, apply_overrides, read_raw, validate
from kdray.errors import KdrayError
from kdray.run import RunResult, evaluate, predict, run_population
from kdray.stages import is_staged, run_stages

__all__ = ["RunResult", "evaluate", "predict", "train"]


def _resolve(config, overrides, resume) -> tuple[ExperimentConfig | dict, dict | None, Path | None]:
    payload = ckpt_file = None
    if resume is not None:
        ckpt_file = resolve_checkpoint_path(resume)
        payload = load_checkpoint(ckpt_file)
        if config is None:
            config = payload["config"]
    if isinstance(config, ExperimentConfig):
        return (
            (validate(apply_overrides(config.to_dict(), overrides)) if overrides else config),
            payload,
            ckpt_file,
        )
    return apply_overrides(read_raw(config), overrides), payload, ckpt_file


def train(
    config: str | Path | dict[str, Any] | ExperimentConfig | None,
    overrides: list[str] | None = None,
    out: str | Path | None = None,
    resume: str | Path | None = None,
    callbacks: list | None = None,
    parent_run_id: str | None = None,
) -> RunResult:
    """Train a population (or every stage of a staged config). Everything is validated (config, data, tracking
    store, resume checkpoint) before the output folder is created, so bad input never leaves a half-written run.

    ``parent_run_id``: nest this run's MLflow run under that run (a study's trials under the study)."""
    if resume is not None and config is None and is_staged(resume):
        return run_stages(None, overrides, out, resume=resume, parent_run_id=parent_run_id)
    if config is not None and not isinstance(config, ExperimentConfig):
        raw = apply_overrides(read_raw(config), overrides)
        if is_staged(raw):
            if resume is not None:  # run_stages would continue from the folder's stages.yaml, not this file
                raise KdrayError(
                    f"--resume {resume} with a staged config file: a staged run continues from its own "
                    "stages.yaml; give --resume RUN_DIR (with any --set overrides) and no config file"
                )
            return run_stages(raw, None, out, parent_run_id=parent_run_id)
        config, overrides = raw, None
    cfg, payload, ckpt_file = _resolve(config, overrides, resume)
    if not isinstance(cfg, ExperimentConfig):
        cfg = validate(cfg)
    if payload is not None:
        check_compatible(payload, cfg.to_dict(), str(resume))
        out = out or ckpt_file.parent.parent
    return run_population(cfg, out, payload, callbacks, parent_run_id)
