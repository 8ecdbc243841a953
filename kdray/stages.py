"""Stages: several populations trained one after another by one ``kdray train``, a later one using an earlier
one's trained peers.

A staged config is a base config plus a list of stages; each stage is a partial config merged over the base
(mappings merge key by key, lists such as ``peers`` are replaced), with a ``name``::

    name: tfkd-self
    data: {dataset: fashion_mnist, val_split: 0.1}
    train: {epochs: 10}
    stages:
      - name: teacher                       # stage 1: train the network from the labels
        method: {name: independent}
        peers: [{name: net, arch: resnet8}]
      - name: student                       # stage 2: distil from stage 1's final weights, frozen
        method: {name: kd, temperature: 6.0}
        peers:
          - {name: teacher, arch: resnet8, frozen: true, from_stage: teacher}
          - {name: student, arch: resnet8}

A peer's ``from_stage`` names an earlier stage; it loads that stage's final weights (``checkpoints/last.pt``;
``from_stage_checkpoint: best`` loads its selected epoch's, ``best.pt``; ``checkpoint_peer`` picks the peer when the
stage had several). Frozen, it is a teacher; trainable, it starts from those weights (a same-architecture copy).
Every stage is validated before anything is written.

``generations:`` (born-again networks, :mod:`kdray.generations`) is a staged config written for you.

Layout: ``<out>/stages.yaml`` (the staged config as run), ``<out>/stages.json`` (the MLflow parent run and each
stage's status), ``<out>/stages/<name>/`` (each stage's run folder, as a plain run's), ``<out>/summary.json``.
In MLflow: one parent run, one nested run per stage. ``kdray train --resume <out>`` skips the finished stages and
resumes the interrupted one from its last checkpoint.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import yaml

from kdray.checkpoint import load_checkpoint, write_atomic
from kdray.config import (
    ConfigError,
    ExperimentConfig,
    apply_overrides,
    check_keys_act_here,
    read_raw,
    validate,
)
from kdray.errors import KdrayError

STAGED_CONFIG = "stages.yaml"
STAGES_STATE = "stages.json"


def is_staged(source: Any) -> bool:
    """A raw config with ``stages:``, or a run folder of a staged run."""
    if isinstance(source, dict):
        return "stages" in source or "generations" in source
    folder = Path(source)
    return folder.is_dir() and (folder / STAGED_CONFIG).is_file()


def deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def stage_configs(raw: dict[str, Any]) -> list[tuple[str, ExperimentConfig]]:
    """Every stage's validated config, in order (``from_stage`` still unresolved)."""
    if "generations" in raw:
        from kdray.generations import expand_generations

        raw = expand_generations(raw)
    stages = raw.get("stages")
    if not isinstance(stages, list) or not stages:
        raise ConfigError("stages", stages, "a non-empty list of stages, each a mapping with a 'name'")
    base = {k: v for k, v in raw.items() if k != "stages"}
    names: list[str] = []
    out = []
    for i, stage in enumerate(stages):
        if not isinstance(stage, dict) or not isinstance(stage.get("name"), str) or not stage["name"]:
            raise ConfigError(f"stages.{i}.name", stage.get("name") if isinstance(stage, dict) else stage,
                              "every stage needs a name (a non-empty string)")  # fmt: skip
        name = stage["name"]
        if name in names:
            raise ConfigError(f"stages.{i}.name", name, f"stage names must be unique; taken: {names}")
        if "/" in name or name.startswith("."):
            raise ConfigError(f"stages.{i}.name", name, "a plain folder name (no '/', not starting with '.')")
        merged = deep_merge(base, {k: v for k, v in stage.items() if k != "name"})
        merged["name"] = f"{base.get('name', 'kdray')}-{name}"
        try:
            cfg = validate(merged, earlier_stages=list(names))
            check_keys_act_here(cfg)  # every stage before the first trains
        except ConfigError as exc:
            raise ConfigError(f"stages.{i} ({name}): {exc.key}", exc.value, exc.accepted) from None
        out.append((name, cfg))
        names.append(name)
    return out


def _resolved(cfg: ExperimentConfig, out_dir: Path, tracking_uri: str) -> ExperimentConfig:
    """The stage's config with every ``from_stage`` replaced by the path of that stage's final checkpoint, and the
    run's tracking store (a stage's run nests under the staged run's, in the same store)."""
    raw = cfg.to_dict()
    raw["tracking"]["uri"] = tracking_uri
    for i, peer in enumerate(raw["peers"]):
        if peer.get("from_stage"):
            which = peer.pop("from_stage_checkpoint", "last")
            path = out_dir / "stages" / peer.pop("from_stage") / "checkpoints" / f"{which}.pt"
            if which == "best" and not path.is_file():
                raise ConfigError(f"peers.{i}.from_stage_checkpoint", which,
                                  f"'last': {path} was not written (no epoch of that stage was scored)")  # fmt: skip
            peer["checkpoint"] = str(path)
            peer["from_stage"] = None
    return validate(raw)


def _finished(stage_dir: Path, cfg: ExperimentConfig) -> dict[str, Any] | None:
    try:
        summary = json.loads((stage_dir / "summary.json").read_text())
    except (OSError, ValueError):
        return None
    return summary if summary.get("epochs") == cfg.train.epochs else None


# What a staged run's --resume may not change: the finished stages (the teachers of the later ones) were trained
# with these, and the later stages must see the same validation split and samples.
FIXED_ON_RESUME = ("seed", "data", "train.epochs", "stages", "generations", "peers")


def _check_resume_overrides(overrides: list[str] | None) -> None:
    for item in overrides or []:
        key = item.partition("=")[0].strip()
        if any(key == fixed or key.startswith(f"{fixed}.") for fixed in FIXED_ON_RESUME):
            raise ConfigError(
                key,
                item.partition("=")[2].strip(),
                "a staged run continues with the seed, data, epochs, stages and peers it started with (its finished "
                "stages were trained with them); start a new run to change them",
            )


def run_stages(
    raw: dict[str, Any] | None,
    overrides: list[str] | None,
    out: str | Path | None,
    resume: str | Path | None = None,
    parent_run_id: str | None = None,
):
    """Run every stage of a staged config in order (or continue a staged run folder)."""
    from kdray.run import RunResult, prepare_out_dir, run_population
    from kdray.tracking import Tracker, default_uri

    state: dict[str, Any] = {}
    if resume is not None:
        folder = Path(resume)
        _check_resume_overrides(overrides)
        raw = apply_overrides(read_raw(folder / STAGED_CONFIG), overrides)
        out = out or folder
        try:
            state = json.loads((folder / STAGES_STATE).read_text())
        except (OSError, ValueError):
            state = {}
    stages = stage_configs(raw)
    out_dir = Path(out) if out is not None else prepare_out_dir(raw.get("name", "kdray"), None, False)
    if resume is None and (out_dir / STAGED_CONFIG).exists():
        raise KdrayError(f"--out '{out_dir}' already holds a staged run; resume it with --resume {out_dir}")
    prepare_out_dir(raw.get("name", "kdray"), out_dir, resuming=True)  # refuses a file in the way

    first = stages[0][1]
    uri = first.tracking.uri or default_uri(out_dir)  # where a plain run in out_dir would keep its runs
    tracker = Tracker(first.tracking.model_copy(update={"uri": uri}), out_dir)
    tracker.check()
    out_dir.mkdir(parents=True, exist_ok=True)
    write_atomic(out_dir / STAGED_CONFIG, yaml.safe_dump(raw, sort_keys=False).encode())
    run_id = tracker.start(raw.get("name", "kdray"), resume_run_id=state.get("mlflow_run_id"),
                           parent_run_id=parent_run_id)  # fmt: skip
    tracker.set_tags({"kdray.stages": ",".join(n for n, _ in stages), "kdray.out": str(out_dir)})
    state = {"mlflow_run_id": run_id, "stages": state.get("stages", {})}
    summaries: dict[str, dict[str, Any]] = {}
    status = "FAILED"
    try:
        for name, cfg in stages:
            stage_dir = out_dir / "stages" / name
            done = _finished(stage_dir, cfg)
            if done is None:
                cfg = _resolved(cfg, out_dir, uri)
                last = stage_dir / "checkpoints" / "last.pt"
                payload = load_checkpoint(last) if last.is_file() else None
                if payload is None:  # an earlier attempt killed before its first checkpoint: close its run
                    tracker.close_abandoned_children(stage_dir)
                state["stages"][name] = "running"
                write_atomic(out_dir / STAGES_STATE, json.dumps(state, indent=2).encode())
                done = run_population(cfg, stage_dir, payload, parent_run_id=run_id).summary
            state["stages"][name] = "finished"
            write_atomic(out_dir / STAGES_STATE, json.dumps(state, indent=2).encode())
            summaries[name] = done
            tracker.log_metrics(
                # the stage's own peers (a frozen teacher is an earlier stage's)
                {
                    f"{name}/{p['name']}/test_acc": p["test_acc"]
                    for p in done["peers"]
                    if p.get("test_acc") is not None and not p.get("frozen")
                },
                step=len(summaries),
            )
        summary = {
            "name": raw.get("name", "kdray"),
            "stages": [
                {
                    "name": name,
                    "method": s["method"],
                    "run_folder": str(out_dir / "stages" / name),
                    "peers": [
                        {k: p.get(k) for k in ("name", "arch", "frozen", "best_val_acc", "test_acc")}
                        for p in s["peers"]
                    ],
                    "ensemble_test_acc": s.get("ensemble_test_acc"),
                    "mlflow_run_id": s.get("mlflow_run_id"),
                }
                for name, s in summaries.items()
            ],
            "mlflow_run_id": run_id,
        }
        if "generations" in raw:  # born-again generations: each one alone, and the ensembles of 1..k
            from kdray.generations import generation_report

            summary["generations"] = generation_report(out_dir, [name for name, _ in stages])
            for k, (alone, ensemble) in enumerate(
                zip(summary["generations"]["test_acc"], summary["generations"]["ensemble_test_acc"]), start=1
            ):
                tracker.log_metrics(
                    {"generation/test_acc": alone, "generation/ensemble_test_acc": ensemble}, step=k
                )
            tracker.log_artifact(out_dir / "generations.png")
        write_atomic(out_dir / "summary.json", json.dumps(summary, indent=2).encode())
        tracker.log_artifact(out_dir / "summary.json")
        tracker.log_artifact(out_dir / STAGED_CONFIG)
        status = "FINISHED"
        last_name = stages[-1][0]
        return RunResult(out_dir / "stages" / last_name, {**summaries[last_name], "staged": summary})
    finally:
        tracker.end(status)
