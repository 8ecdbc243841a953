"""One Tune trial = one population, trained by ``kdray.train`` inside the trial process.

The trial reports after every epoch (``ray.tune.report``) with a Tune checkpoint that holds the kdray population
checkpoint. When Tune hands the trial a checkpoint back, it resumes from it:

- its own (the study driver was killed and restored): ``kdray.train(resume=...)`` continues the run, same MLflow run;
- another trial's (PBT exploit): the donor's population state, step counter and history are copied into this
  trial's folder and training continues from there with this trial's (mutated) config in effect. Only the MLflow run
  id is rewritten, so the trial keeps logging into its own nested run.

With ``engine.name: ray`` the same function is the Ray Train driver: ``kdray.train`` starts the RayEngine, which runs
the workers and calls the same epoch callbacks in this process (the Tune-with-Train-V2 pattern in RAY_NOTES.md).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kdray.checkpoint import copy_checkpoint
from kdray.config import ExperimentConfig

OBJECTIVES = ("min_peer", "mean_peer", "ensemble")
CHECKPOINT_FILE = "population.pt"  # the kdray checkpoint inside a Tune checkpoint folder
TRIAL_META = "trial.json"  # who wrote a Tune checkpoint, at which epoch
HISTORY_FILE = "history.jsonl"  # in the trial folder: one line per reported epoch
PROGRESS_FILE = "progress.json"  # in the study folder: the driver's live view of every trial


def objective_value(cfg: ExperimentConfig, metrics: dict[str, float], metric: str) -> float:
    """The number the study maximises: the smallest or the mean validation accuracy of the trained peers, or the
    ensemble's (NaN when the epoch was not evaluated)."""
    if metric == "ensemble":
        return float(metrics.get("ensemble/val_acc", math.nan))
    accs = [
        metrics[f"{p.name}/val_acc"] for p in cfg.peers if not p.frozen and f"{p.name}/val_acc" in metrics
    ]
    if not accs:
        return math.nan
    return float(min(accs) if metric == "min_peer" else sum(accs) / len(accs))


def trained_params(cfg: ExperimentConfig) -> int:
    """Parameters of the peers the population trains (frozen teachers excluded): the size a multi-objective study
    minimises. Counted on models built on the meta device (no memory, no initialisation cost)."""
    import torch

    from kdray.data import build_data
    from kdray.models import count_params, create_model

    data = build_data(cfg.data, cfg.seed).spec
    with torch.device("meta"):
        return sum(
            count_params(create_model(p.arch, data.num_classes, data.in_channels, **p.arch_kwargs))
            for p in cfg.peers
            if not p.frozen
        )


# a trial posts its steps to the study's board at most this often (and at each epoch's start and end)
LIVE_EVERY_S = 0.5
_clock = time.monotonic  # (the tests replace this, not the process-wide time.monotonic)


@dataclass(frozen=True)
class TrialLive:
    """A trial's place in its epoch, posted to the study driver's board (the driver's per-trial bars)."""

    trial_id: str
    epoch: int  # 0-based
    epochs: int
    steps_done: int
    steps: int
    # the peers' running loss/accuracy (and a Ray trial's exchange share), as the run's own bar shows
    text: str


def board_name(study_name: str) -> str:
    """The named actor (0 CPUs) a study's trials post their live steps to."""
    return f"kdray-study-board-{study_name}"


@dataclass(frozen=True)
class TrialPlan:
    """Everything a trial needs besides the sampled values; built once by the study driver."""

    study_name: str
    study_dir: str  # absolute
    base_config: dict[str, Any]  # the user's config with --set applied (raw)
    keys: tuple[str, ...]  # the searched keys
    metric: str
    forced: dict[str, Any] = field(default_factory=dict)  # per-trial settings: threads, tracking store, ...
    parent_run_id: str | None = None
    cwd: str | None = None  # the driver's working directory: relative paths in the config (data.root) mean it

    def trial_dir(self, trial_id: str) -> Path:
        return Path(self.study_dir) / "trials" / trial_id

    def trial_config(self, values: dict[str, Any], trial_id: str) -> ExperimentConfig:
        from kdray.search.space import apply_values

        return apply_values(
            self.base_config, {**values, **self.forced, "name": f"{self.study_name}-{trial_id}"}
        )


def _write_json(path: Path, data: Any) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str))
    tmp.replace(path)


def _read_json(path: Path, default: Any) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return default


class TuneReporter:
    """The epoch callback: objective + kdray metrics + the current searched values to Tune, with a checkpoint.

    The last epoch is held back and reported after ``kdray.train`` returns (:meth:`report_final`): a scheduler stops
    a trial at its final report (ASHA at ``max_t``), and the run must first write its summary and close its MLflow
    run."""

    def __init__(self, plan: TrialPlan, cfg: ExperimentConfig, trial_id: str, values: dict[str, Any]):
        self.plan, self.cfg, self.trial_id, self.values = plan, cfg, trial_id, values
        self.out = plan.trial_dir(trial_id)
        self.final: tuple[dict[str, float], Path] | None = None
        self.engine_done_at: float | None = None  # the engine stops its clock right after its last callback
        self._run_id: str | None = None
        self._looked_up = False
        self._outage_warned = False
        self.params = float(trained_params(cfg))  # constant per trial; reported with every epoch
        self._board: Any = None  # the study's board actor (False: none to post to)
        self._live_at = 0.0
        self._live_text = ""

    def live(self, epoch: int, steps_done: int, steps: int, postfix: str | None) -> None:
        """The run's bar moved: post where the trial is to the study's board (fire and forget), at most every
        ``LIVE_EVERY_S`` seconds and at the end of each epoch."""
        if postfix is not None:
            self._live_text = postfix
        now = _clock()
        if now - self._live_at < LIVE_EVERY_S and steps_done not in (0, steps):
            return
        if self._board is None:
            try:
                import ray

                self._board = ray.get_actor(board_name(self.plan.study_name))
            except Exception:  # noqa: BLE001 - no study board (a trial run by hand, an old study): no live view
                self._board = False
        if self._board is False:
            return
        self._live_at = now
        event = TrialLive(self.trial_id, epoch, self.cfg.train.epochs, steps_done, steps, self._live_text)
        self._board.post.remote(event)

    def __call__(self, metrics: dict[str, float], checkpoint_path: Path) -> None:
        if int(metrics["epoch"]) >= self.cfg.train.epochs:
            self.final = (dict(metrics), Path(checkpoint_path))
            self.engine_done_at = time.time()
            return
        self.report(metrics, checkpoint_path)

    def report_final(self) -> None:
        if self.final is not None:
            self.report(*self.final)

    def _mlflow_run(self) -> str | None:
        """This trial's MLflow run (found by its run folder tag), to log the searched values per epoch."""
        if not self._looked_up:
            self._looked_up = True
            if self.cfg.tracking.enabled:
                from kdray.search.mlflow_study import find_trial_run

                self._run_id = find_trial_run(self.cfg.tracking.uri, self.plan.parent_run_id, self.out)
        return self._run_id

    def _log_epoch(self, objective: float, values: dict[str, float], epoch: int) -> None:
        """The objective and searched values of this epoch on the trial's MLflow run. A tracking server that cannot
        be reached stops nothing: the epoch stays in the trial's history file (and study.json), one warning says
        so, and the next epochs are logged when the server is back."""
        from kdray.search.mlflow_study import log_trial_epoch
        from kdray.tracking import is_outage

        uri = self.cfg.tracking.uri
        try:
            run_id = self._mlflow_run()
            if run_id:
                log_trial_epoch(uri, run_id, objective, values, epoch)
        except Exception as exc:  # noqa: BLE001 - an outage is classified, anything else raised as before
            if not is_outage(uri, exc):
                raise
            self._looked_up = self._run_id is not None  # look the run up again once the server is back
            if not self._outage_warned:
                self._outage_warned = True
                print(
                    f"kdray: warning: tracking server {uri} cannot be reached; trial {self.trial_id}'s objective "
                    f"for epoch {epoch} is not in MLflow (it is in {self.out / HISTORY_FILE} and study.json); "
                    "training goes on",
                    file=sys.stderr,
                )

    def report(self, metrics: dict[str, float], checkpoint_path: Path) -> None:
        from ray import tune

        epoch = int(metrics["epoch"])
        objective = objective_value(self.cfg, metrics, self.plan.metric)
        hp = {f"hp/{k}": v for k, v in self.values.items() if isinstance(v, (int, float))}
        replay = float(metrics.get("replay", 0.0))
        report = {"objective": objective, "params": self.params, "epoch": epoch, "replay": replay, **hp}
        report.update({k: float(v) for k, v in metrics.items() if k not in ("epoch", "replay")})
        # The trial's own record of every epoch it reported (Tune's progress.csv loses rows around PBT exploits).
        row = {"epoch": epoch, "objective": objective, "replay": bool(replay), "time": time.time(), **hp}
        row["metrics"] = {k: v for k, v in report.items() if "/" in k and not k.startswith("hp/")}
        with (self.out / HISTORY_FILE).open("a") as fh:
            fh.write(json.dumps(row) + "\n")
        self._log_epoch(objective, {**hp, "params": self.params}, epoch)
        folder = self.out / "tune_checkpoint"
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        copy_checkpoint(checkpoint_path, folder / CHECKPOINT_FILE)  # one file, even from per-process parts
        _write_json(folder / TRIAL_META, {"trial_id": self.trial_id, "epoch": epoch, "values": self.values})
        # Tune copies the folder into the study's storage before report returns (or stops this thread).
        tune.report(report, checkpoint=tune.Checkpoint.from_directory(str(folder)))


def _resume_point(ckpt_dir: Path, trial_id: str, out: Path, values: dict[str, Any]) -> tuple[Path, dict]:
    """The kdray checkpoint to resume from, and what it is. A donor's checkpoint (PBT) is copied into this trial's
    folder with this trial's MLflow run id, so the recipient logs into its own run."""

    from kdray.checkpoint import load_checkpoint, save_checkpoint

    meta = _read_json(ckpt_dir / TRIAL_META, {})
    source = ckpt_dir / CHECKPOINT_FILE
    if meta.get("trial_id", trial_id) == trial_id:
        return source, {"kind": "own", "epoch": meta.get("epoch")}
    payload = load_checkpoint(source)
    own_run = None
    own_last = out / "checkpoints" / "last.pt"
    if own_last.is_file():
        own_run = load_checkpoint(own_last).get("mlflow_run_id")
    payload["mlflow_run_id"] = own_run
    target = out / "checkpoints" / f"exploit-{meta['trial_id']}-epoch{payload['epoch']}.pt"
    save_checkpoint(target, payload)
    event = {
        "kind": "exploit",
        "donor": meta["trial_id"],
        "epoch": int(payload["epoch"]),
        "step": int(payload["step"]),
        "donor_values": meta.get("values", {}),
        "values": values,
        "donor_checkpoint": str(source),
        "copied_to": str(target),
        "time": time.time(),
    }
    log = _read_json(out / "exploits.json", [])
    _write_json(out / "exploits.json", [*log, event])
    return target, event


def _update_status(out: Path, **fields: Any) -> dict[str, Any]:
    """``trials/<id>/status.json``: the trial's own record (status, incarnations, timing), merged on each write."""
    path = out / "status.json"
    status = {**_read_json(path, {}), **fields}
    _write_json(path, status)
    return status


def run_trial(config: dict[str, Any], plan: TrialPlan) -> None:
    """The Tune function trainable."""
    from ray import tune

    from kdray.errors import DivergedError

    entered = time.time()
    for name in ("ray.train", "ray.tune"):  # one INFO line per checkpoint otherwise
        logging.getLogger(name).setLevel(logging.WARNING)
    if plan.cwd and Path(plan.cwd).is_dir():
        os.chdir(plan.cwd)  # Tune starts trials in their own folder
    trial_id = tune.get_context().get_trial_id()
    out = plan.trial_dir(trial_id)
    values = {k: config[k] for k in plan.keys}
    cfg = plan.trial_config(values, trial_id)
    reporter = TuneReporter(plan, cfg, trial_id, values)
    checkpoint = tune.get_checkpoint()
    if checkpoint is None and out.exists():
        # Restarted without a checkpoint (killed before its first report): start over in a clean folder, and drop
        # the half-begun MLflow run so the study keeps one nested run per trial.
        if cfg.tracking.enabled:
            from kdray.search.mlflow_study import delete_trial_run

            delete_trial_run(cfg.tracking.uri, plan.parent_run_id, out)
        shutil.rmtree(out)
    if checkpoint is not None and (out / HISTORY_FILE).exists():
        # Epochs reported after the checkpoint we resume from are trained again: mark the old lines superseded.
        _truncate_history(out / HISTORY_FILE, trial_id, checkpoint)
    out.mkdir(parents=True, exist_ok=True)
    previous = _read_json(out / "status.json", {})
    incarnations = [
        *previous.get("incarnations", []),
        {"entered": entered, "values": values, "pid": os.getpid()},
    ]
    _update_status(out, trial_id=trial_id, status="running", values=values, incarnations=incarnations)
    # the trial's own epoch lines go to its folder (trials/<id>/output.log); the study's bar is the terminal's view
    log = (out / "output.log").open("a")
    try:
        with contextlib.redirect_stdout(log):
            result = _train_trial(checkpoint, cfg, out, reporter, plan, trial_id, values, incarnations)
    except DivergedError as exc:
        _update_status(out, status="diverged", error=str(exc))
        raise
    finally:
        log.close()
    timing = _timing(entered, reporter, result.summary)
    if "first_step_after_entry_s" in previous:  # keep the first incarnation's start-up time
        timing.pop("first_step_after_entry_s", None)
    _update_status(out, status="finished", **timing)
    reporter.report_final()


def _train_trial(checkpoint, cfg, out: Path, reporter, plan: TrialPlan, trial_id: str, values, incarnations):
    from kdray.api import train

    if checkpoint is None:
        return train(cfg, out=out, callbacks=[reporter], parent_run_id=plan.parent_run_id)
    with checkpoint.as_directory() as folder:
        source, event = _resume_point(Path(folder), trial_id, out, values)
        incarnations[-1]["resumed"] = event
        _update_status(out, incarnations=incarnations)
        result = train(cfg, out=out, resume=source, callbacks=[reporter], parent_run_id=plan.parent_run_id)
        if reporter.final is None and result.summary["history"]:
            # Nothing was left to train: this trial had finished when it was paused (PBT) or the driver was
            # killed, or it copied a donor that had. Report where it stands, flagged as no new epoch.
            if event["kind"] == "exploit":
                shutil.copy2(source, out / "checkpoints" / "last.pt")
            reporter.final = ({**result.summary["history"][-1], "replay": 1.0}, source)
    return result


def read_history(path: Path) -> list[dict[str, Any]]:
    rows = []
    if path.is_file():
        for line in path.read_text().splitlines():
            with contextlib.suppress(ValueError):
                rows.append(json.loads(line))
    return rows


def _truncate_history(path: Path, trial_id: str, checkpoint) -> None:
    """On a restore from this trial's own checkpoint at epoch e (driver killed), rows after e are re-trained."""
    with checkpoint.as_directory() as folder:
        meta = _read_json(Path(folder) / TRIAL_META, {})
    if meta.get("trial_id") != trial_id or meta.get("epoch") is None:
        return
    rows = read_history(path)
    kept, cut = [], False
    for row in rows:
        if cut or (row["epoch"] > meta["epoch"] and not row.get("replay")):
            cut = True
            row = {**row, "superseded": True}
        kept.append(row)
    path.write_text("".join(json.dumps(r) + "\n" for r in kept))


def _timing(entered: float, reporter: TuneReporter, summary: dict[str, Any]) -> dict[str, Any]:
    """Seconds from entering the trial to the first training step (config, data, models, MLflow run). The engine
    times its first step from its own start and stops its clock right after the last epoch callback returns."""
    wall, first = summary.get("wall_s"), summary.get("first_step_after_engine_start_s")
    if wall is None or first is None or reporter.engine_done_at is None:
        return {}
    engine_start = reporter.engine_done_at - wall
    return {"first_step_after_entry_s": round(engine_start + first - entered, 3), "train_wall_s": wall}
