"""One population's run: its folder, its MLflow run, the engine's training, the test split once, the summary;
and a saved population read back (evaluate, predict). :mod:`kdray.api` and :mod:`kdray.stages` build on it.

Selection. Which epoch a run reports, and the last epoch's test accuracy beside the selected one's.

``data.select_on`` chooses ``best.pt``, the checkpoint the test split is evaluated on at the end:

- ``val`` (default): the epoch of the best mean validation accuracy of the trainable peers;
- ``last``: no selection: ``best.pt`` is the last epoch (the validation split, if any, is still evaluated every epoch,
  for the curves);
- ``test``: the best epoch on the test split (only when said: the test numbers are then not an unbiased estimate).

Whatever selected ``best.pt``, the summary also reports the last epoch's test accuracy (:func:`test_last_epoch`), so
that a reader sees what selection changed. ``docs/compare.md`` says when each choice is right."""

from __future__ import annotations

import json
import signal
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from kdray.checkpoint import copy_checkpoint, resolve_checkpoint_path, write_atomic
from kdray.config import ExperimentConfig, check_keys_act_here
from kdray.errors import ConfigError, KdrayError
from kdray.exporter import log_models
from kdray.population import population_from_checkpoint
from kdray.registry import ENGINES
from kdray.tracking import Tracker


@dataclass
class RunResult:
    out_dir: Path
    summary: dict[str, Any]

    @property
    def checkpoint(self) -> Path:
        return self.out_dir / "checkpoints" / "last.pt"


def prepare_out_dir(name: str, out: str | Path | None, resuming: bool) -> Path:
    """The run folder: ``out``, or ``runs/<name>-<time>``. An existing run is never overwritten."""
    if out is None:
        out = Path("runs") / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"
    out = Path(out)
    for path in (out, *out.parents):
        if path.exists() and not path.is_dir():
            where = "is a file" if path == out else f"is inside '{path}', which is a file"
            raise KdrayError(f"--out '{out}' {where}, not a folder; choose a folder for the run")
    if not resuming and (out / "checkpoints" / "last.pt").exists():
        raise KdrayError(
            f"--out '{out}' already holds a run (checkpoints/last.pt); resume it with --resume {out}, "
            "or choose another --out"
        )
    return out


class StopSignals:
    """Ctrl-C and SIGTERM (what schedulers and ``ray job stop`` send) ask the run to stop at its next safe point;
    a second Ctrl-C stops at once. Installed only in the main thread (signal handlers cannot be set elsewhere)."""

    def __init__(self) -> None:
        self.requested: str | None = None
        self._old: dict[int, Any] = {}

    def __call__(self) -> bool:
        return self.requested is not None

    def _handle(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if self.requested is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = name
        print(
            f"\nkdray: {name} received: stopping at the next safe point (Ctrl-C again to stop now)",
            flush=True,
        )

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._old.items():
            signal.signal(sig, handler)


def run_population(
    cfg: ExperimentConfig,
    out: str | Path | None,
    payload: dict[str, Any] | None = None,
    callbacks: list | None = None,
    parent_run_id: str | None = None,
) -> RunResult:
    """Train one population into ``out`` (resuming from ``payload`` when given)."""
    from kdray.data import build_data
    from kdray.engines.display import quiet_libraries
    from kdray.methods import method_class

    quiet_libraries(cfg.train.verbose)
    check_keys_act_here(cfg)  # train.amp where the peers would run on this machine's CPU
    if payload is not None:
        check_resume_workers(payload, cfg)
    out_dir = prepare_out_dir(cfg.name, out, resuming=payload is not None)
    with_train = method_class(cfg.method.name).data_source == "dataset"
    data = build_data(cfg.data, cfg.seed, with_train=with_train)  # a clear DataError here, before any write
    if cfg.engine.name != "ray":
        return _run_tracked(cfg, out_dir, data, payload, callbacks, parent_run_id)
    from kdray.engines.ray_runtime import early_local_ray

    # a private local Ray starts now, in a thread, while MLflow and the engine's imports take their seconds
    with early_local_ray(cfg.engine, cfg.num_workers):
        return _run_tracked(cfg, out_dir, data, payload, callbacks, parent_run_id)


def _saved_workers(raw: dict[str, Any]) -> list[tuple[int, bool]]:
    """Each peer's (workers, sync_bn) in a checkpoint's config (one worker per peer off the RayEngine)."""
    engine = raw.get("engine") or {}
    placement = engine.get("placement") or {}
    ray = engine.get("name") == "ray"
    default_m, default_bn = placement.get("workers_per_peer") or 1, placement.get("sync_bn", True)
    return [
        (int(p.get("workers") or default_m) if ray else 1,
         bool(default_bn if p.get("sync_bn") is None else p["sync_bn"]))
        for p in raw.get("peers") or []
    ]  # fmt: skip


def check_resume_workers(payload: dict[str, Any], cfg: ExperimentConfig) -> None:
    """Resuming a population on another number of workers per peer (K x M) re-shards the same global batches: the
    run continues exactly when both layouts compute K x 1's maths (``sync_bn`` wherever a peer has several
    workers) and the exchange keeps nothing per worker. Otherwise one :class:`ConfigError` naming the key, the
    checkpoint's number and the config's."""
    saved = _saved_workers(payload.get("config") or {})
    then = ((payload.get("config") or {}).get("engine") or {}).get("exchange")
    stale = "stale" in (cfg.engine.exchange.name, then.get("name") if isinstance(then, dict) else then)
    for k, ((m_then, bn_then), m_now) in enumerate(zip(saved, cfg.peer_workers)):
        if m_then == m_now:
            continue
        why = None
        if (m_then > 1 and not bn_then) or (m_now > 1 and not cfg.peer_sync_bn(k)):
            why = "with sync_bn: false a peer's maths depends on its number of workers (each normalises its shard)"
        elif stale:
            why = "the stale exchange keeps its weight copies per worker rank"
        if why:
            key = (
                f"peers.{k}.workers"
                if cfg.peers[k].workers is not None
                else "engine.placement.workers_per_peer"
            )
            raise ConfigError(
                key, m_now,
                f"the checkpoint trained peer '{cfg.peers[k].name}' on {m_then} worker(s), the config asks for "
                f"{m_now}, and the run would not continue exactly ({why}): resume with {key}={m_then}",
            )  # fmt: skip
    # group_by: shard numbers the ranks shard by shard (ExperimentConfig.worker_layout): the stale exchange's
    # per-rank state would go to other workers
    placement = (((payload.get("config") or {}).get("engine") or {}).get("placement")) or {}
    by_then, by_now = placement.get("group_by", "none"), cfg.engine.placement.group_by
    if stale and max(cfg.peer_workers) > 1 and (by_then == "shard") != (by_now == "shard"):
        raise ConfigError(
            "engine.placement.group_by", by_now,
            f"{by_then}, as the checkpoint was trained (the stale exchange keeps its weight copies per worker rank, "
            "and group_by: shard numbers the ranks shard by shard rather than peer by peer)",
        )  # fmt: skip


def _run_tracked(
    cfg: ExperimentConfig,
    out_dir: Path,
    data: Any,
    payload: dict[str, Any] | None,
    callbacks: list | None,
    parent_run_id: str | None,
) -> RunResult:
    """The MLflow run around the engine's run: the run folder, params and tags, then train, test once, summarise."""
    tracker = Tracker(cfg.tracking, out_dir)
    tracker.check()

    out_dir.mkdir(parents=True, exist_ok=True)
    write_atomic(out_dir / "config.yaml", yaml.safe_dump(cfg.to_dict(), sort_keys=False).encode())
    if data.noise is not None:
        write_atomic(out_dir / "label_noise.json", json.dumps(data.noise).encode())
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
        with StopSignals() as stop:
            engine = ENGINES.lookup(cfg.engine.name)(cfg, out_dir, tracker, callbacks, stop, data)
            outcome = engine.run(resume=payload)
        outcome["test"] = final_test(cfg, out_dir, outcome, tracker, data)
        outcome["test"]["last"] = test_last_epoch(out_dir, outcome, tracker)
        summary = write_summary(cfg, out_dir, outcome, run_id, data)
        _log_artifacts(tracker, out_dir)
        # tracking.log_models: the selected checkpoint's peers as MLflow models
        log_models(tracker, out_dir / "checkpoints" / outcome["test"]["checkpoint"])
        status = "FINISHED"
        return RunResult(out_dir, summary)
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    except KdrayError as exc:
        from kdray.loop import Stopped

        if isinstance(exc, Stopped):
            status = "KILLED"
        raise
    finally:
        tracker.end(status)


def final_test(
    cfg: ExperimentConfig, out_dir: Path, outcome: dict[str, Any], tracker: Tracker, data: Any = None
) -> dict[str, Any]:
    """The test split, evaluated once, on the selected population (``best.pt``: the epoch with the best
    validation score; ``last.pt`` when no epoch was scored), and logged to MLflow apart from the per-epoch metrics."""
    ckpt_dir = out_dir / "checkpoints"
    best = ckpt_dir / "best.pt"
    chosen = best if best.is_file() else ckpt_dir / "last.pt"
    report = evaluate(chosen, split="test", data=data)
    logged = {f"{p['name']}/test_{k}": p[k] for p in report["peers"] for k in ("acc", "loss", "ece")}
    if report["ensemble_acc"] is not None:
        logged.update(
            {"ensemble/test_acc": report["ensemble_acc"], "ensemble/test_ece": report["ensemble_ece"]}
        )
    tracker.log_metrics(logged, step=report["epoch"])
    return {
        "checkpoint": chosen.name,
        "epoch": report["epoch"],
        "peers": {p["name"]: p["acc"] for p in report["peers"]},
        "ece": {p["name"]: p["ece"] for p in report["peers"]},
        "ensemble_acc": report["ensemble_acc"],
        "ensemble_ece": report["ensemble_ece"],
    }


def test_last_epoch(out_dir: Path, outcome: dict[str, Any], tracker: Any) -> dict[str, Any]:
    """The test split on the last epoch's population (``last.pt``), in the shape of the selected one's
    (``outcome["test"]``); the same numbers, not evaluated again, when the selected checkpoint is the last epoch.
    Logged to MLflow as ``<peer>/last_epoch_test_acc`` (and ``_ece``, and the ensemble's)."""
    test = outcome["test"]
    history = outcome.get("history") or []
    last_epoch = history[-1]["epoch"] if history else test["epoch"]
    if test["checkpoint"] == "last.pt" or test["epoch"] == last_epoch:
        result = {k: test[k] for k in ("epoch", "peers", "ece", "ensemble_acc", "ensemble_ece")}
        result.update(checkpoint="last.pt", same_as_selected=True)
    else:
        report = evaluate(Path(out_dir) / "checkpoints" / "last.pt", split="test")
        result = {
            "checkpoint": "last.pt",
            "epoch": report["epoch"],
            "peers": {p["name"]: p["acc"] for p in report["peers"]},
            "ece": {p["name"]: p["ece"] for p in report["peers"]},
            "ensemble_acc": report["ensemble_acc"],
            "ensemble_ece": report["ensemble_ece"],
            "same_as_selected": False,
        }
    logged = {f"{name}/last_epoch_test_acc": acc for name, acc in result["peers"].items()}
    logged.update({f"{name}/last_epoch_test_ece": ece for name, ece in result["ece"].items()})
    if result["ensemble_acc"] is not None:
        logged.update({"ensemble/last_epoch_test_acc": result["ensemble_acc"],
                       "ensemble/last_epoch_test_ece": result["ensemble_ece"]})  # fmt: skip
    tracker.log_metrics(logged, step=result["epoch"])
    return result


def selection_note(cfg: ExperimentConfig, data) -> dict[str, Any]:
    if cfg.data.select_on == "last":
        note = {
            "split": "last",
            "samples": data.spec.val_len,
            "note": "no selection (data.select_on: last): best.pt is the last epoch; the test split is evaluated "
            "once, at the end",
        }
    elif cfg.data.select_on == "test":
        note = {
            "split": "test",
            "samples": data.spec.test_len,
            "note": "selected on the test split, as data.select_on: test asked: the test numbers are not an "
            "unbiased estimate",
        }
    else:
        note = {
            "split": "val",
            "samples": data.spec.val_len,
            "note": f"a validation split of {data.spec.val_len} samples carved from the training set "
            f"(data.val_split = {cfg.data.val_split}); the test split is evaluated once, at the end",
        }
    if data.test_is_train:
        note["note"] += (
            "; the ImageFolder has no train/ and val/ split: its test split is the training images"
        )
    return note


def write_summary(
    cfg: ExperimentConfig, out_dir: Path, outcome: dict[str, Any], run_id: str | None, data
) -> dict[str, Any]:
    from kdray.plots import plot_curves

    history = outcome["history"]
    last = history[-1] if history else {}
    test = outcome.get("test") or {"peers": {}}
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
                    (h[f"{p.name}/val_acc"] for h in history if f"{p.name}/val_acc" in h), default=None
                ),
                "test_acc": test["peers"].get(p.name),
                "test_ece": (test.get("ece") or {}).get(p.name),
            }
        )
    summary = {
        "name": cfg.name,
        "method": cfg.method.name,
        "engine": cfg.engine.name,
        "peers": peers,
        "ensemble_acc": last.get("ensemble/val_acc"),
        "ensemble_test_acc": test.get("ensemble_acc"),
        "selection": selection_note(cfg, data),
        "test": outcome.get("test"),
        "label_noise": (
            {k: data.noise[k] for k in ("kind", "rate", "corrupted", "of")}
            if data.noise is not None
            else None
        ),
        "epochs": last.get("epoch", 0),
        "steps_per_epoch": outcome.get("steps_per_epoch"),
        "wall_s": round(outcome["wall_s"], 3),
        "first_step_after_engine_start_s": outcome.get("first_step_after_engine_start_s"),
        "mlflow_run_id": run_id,
        "best": outcome["best"],
        "history": history,
        **{k: v for k, v in outcome.items() if k.startswith("exchange")},
    }
    if outcome.get("ray"):  # RayEngine: where each peer ran, how Ray was found, where the start-up time went
        summary["ray"] = {**outcome["ray"], "placement": outcome.get("placement")}
    write_atomic(out_dir / "summary.json", json.dumps(summary, indent=2).encode())
    if history:
        plot_curves(cfg, history, out_dir / "curves.png", out_dir, outcome.get("steps_per_epoch"))
    return summary


def _log_artifacts(tracker: Tracker, out_dir: Path) -> None:
    for name in ("config.yaml", "summary.json", "curves.png", "label_noise.json", "steps.jsonl"):
        tracker.log_artifact(out_dir / name)
    if tracker.cfg.log_checkpoint:
        with tempfile.TemporaryDirectory(
            prefix="kdray-ckpt-"
        ) as folder:  # one file, even from per-process parts
            tracker.log_artifact(copy_checkpoint(out_dir / "checkpoints" / "last.pt", Path(folder) / "last.pt"),
                                 "checkpoints")  # fmt: skip


def _split_for(cfg: ExperimentConfig, split: str) -> str:
    if split not in ("val", "test"):
        raise KdrayError(f"--split '{split}': accepted: val, test")
    # a run without a validation split: its per-epoch "val" numbers were the test split's
    return "test" if split == "val" and cfg.data.select_on == "test" else split


def predict(checkpoint: str | Path, split: str = "test") -> tuple[Any, Any]:
    """The mean softmax of a saved population's trainable peers on one split, and the labels (float32, int64)."""
    cfg, pop, _ = population_from_checkpoint(checkpoint)
    from kdray.evaluation import evaluate as evaluate_population

    ev = evaluate_population(pop, _split_for(cfg, split))
    trainable = sum(1 for p in cfg.peers if not p.frozen)
    return (ev["probs_sum"] / trainable).float(), ev["labels"]


def evaluate(
    checkpoint: str | Path, overrides: list[str] | None = None, split: str = "val", data: Any = None
) -> dict[str, Any]:
    """Evaluate a saved population on one split ("val": the validation split carved from the training set;
    "test"): per-peer accuracy, loss and calibration error, and the trainable peers' ensemble's."""
    from kdray.evaluation import evaluate as evaluate_population
    from kdray.evaluation import summarise_eval

    if split not in ("val", "test"):
        raise KdrayError(f"--split '{split}': accepted: val, test")
    cfg, pop, payload = population_from_checkpoint(checkpoint, overrides, data)
    split = _split_for(cfg, split)
    metrics = summarise_eval(cfg, evaluate_population(pop, split), "eval")
    return {
        "checkpoint": str(resolve_checkpoint_path(checkpoint)),
        "epoch": payload["epoch"],
        "split": split,
        "peers": [
            {
                "name": p.name,
                "arch": p.arch,
                "acc": metrics[f"{p.name}/eval_acc"],
                "loss": metrics[f"{p.name}/eval_loss"],
                "ece": metrics[f"{p.name}/eval_ece"],
            }
            for p in cfg.peers
        ],
        "ensemble_acc": metrics.get("ensemble/eval_acc"),
        "ensemble_ece": metrics.get("ensemble/eval_ece"),
    }
