"""A study in MLflow: one parent run, one nested run per trial (created by ``kdray.train`` with the parent's id).

The parent holds the study's settings, its best value, and the artifacts (trials table, best config, best checkpoint,
plots), and with ``tracking.log_models`` the best trial's peers as MLflow models (``tracking.register`` registers
one; the trials themselves log none). Trials log their own params (the resolved config) and per-epoch metrics; the
trial adds the objective and the searched values per epoch (``hp/<key>``: PBT's schedule). A trial stopped by the scheduler never returns from
``kdray.train``, so the driver settles every trial run's final status and tags at the end.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from kdray.config import TrackingConfig
from kdray.tracking import Tracker, retry_busy

MLFLOW_STATUS = {"finished": "FINISHED", "stopped": "FINISHED", "diverged": "FAILED", "failed": "FAILED"}


def _client(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def find_trial_run(uri: str | None, parent_run_id: str | None, out_dir: Path) -> str | None:
    """The MLflow run ``kdray.train`` opened for the run folder ``out_dir`` (nested under ``parent_run_id``)."""
    if not uri or not parent_run_id:
        return None

    def find() -> str | None:
        client = _client(uri)
        experiment = client.get_run(parent_run_id).info.experiment_id
        runs = client.search_runs(
            [experiment],
            filter_string=f"tags.`mlflow.parentRunId` = '{parent_run_id}' and tags.`kdray.out` = '{out_dir}'",
            order_by=["attributes.start_time DESC"],
            max_results=1,
        )
        return runs[0].info.run_id if runs else None

    return retry_busy(uri, "finding a trial's run", find)


def delete_trial_run(uri: str | None, parent_run_id: str | None, out_dir: Path) -> None:
    run_id = find_trial_run(uri, parent_run_id, out_dir)
    if run_id:
        retry_busy(uri, "deleting a half-begun trial run", lambda: _client(uri).delete_run(run_id))


def log_trial_epoch(uri: str, run_id: str, objective: float, hp: dict[str, float], epoch: int) -> None:
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    items = [Metric("objective", float(objective), now, epoch)]
    items += [Metric(k, float(v), now, epoch) for k, v in hp.items()]
    retry_busy(uri, "logging a trial's epoch", lambda: _client(uri).log_batch(run_id, metrics=items))


class StudyTracking:
    """The study's parent run (reopened on ``--resume``) and the settling of its trial runs."""

    def __init__(self, cfg: TrackingConfig, study_dir: Path):
        self.tracker = Tracker(cfg, study_dir)

    @property
    def enabled(self) -> bool:
        return self.tracker.enabled

    @property
    def uri(self) -> str | None:
        return self.tracker.uri if self.enabled else None

    @property
    def run_id(self) -> str | None:
        return self.tracker.run_id

    def start(self, name: str, resume_run_id: str | None, params: dict[str, Any]) -> str | None:
        self.tracker.check()
        run_id = self.tracker.start(name, resume_run_id=resume_run_id)
        self.tracker.log_params(params)
        self.tracker.set_tags({"kdray.kind": "study"})
        return run_id

    def finish(self, study: dict[str, Any], artifacts: list[tuple[Path, str | None]], status: str) -> None:
        if not self.run_id:
            return
        trials = study["trials"]
        counts = {
            s: sum(t["status"] == s for t in trials) for s in ("finished", "stopped", "diverged", "failed")
        }
        metrics = {f"trials_{s}": float(n) for s, n in counts.items()}
        metrics["trials"] = float(len(trials))
        metrics["epochs_trained"] = float(study["compute"]["epochs_trained"])
        metrics["compute_saved_share"] = float(study["compute"]["saved_share"])
        if study["best"] is not None:
            metrics["best_objective"] = float(study["best"]["objective"])
        self.tracker.log_metrics(metrics, step=0)
        for i, t in enumerate(trials):
            if t["objective"] is not None:
                self.tracker.log_metrics({"trial_objective": t["objective"]}, step=i)
        self._settle_trials(trials)
        for path, subdir in artifacts:
            self.tracker.log_artifact(path, subdir)
        if study["best"] is not None:  # tracking.log_models / register: the best trial's peers, in this run
            from kdray.exporter import log_models

            log_models(self.tracker, Path(study["best"]["checkpoint"]))
        self.tracker.end(status)

    def _settle_trials(self, trials: list[dict[str, Any]]) -> None:
        from mlflow.entities import Param

        client = self.tracker.client
        uri = self.tracker.uri

        def settle(t: dict[str, Any], run_id: str) -> None:
            client.set_tag(run_id, "kdray.trial_id", t["trial_id"])
            client.set_tag(run_id, "kdray.tune_status", t["status"])
            existing = client.get_run(run_id).data.params
            params = [
                Param(f"tune.{k}", str(v)) for k, v in t["values"].items() if f"tune.{k}" not in existing
            ]
            if params:
                client.log_batch(run_id, params=params)
            client.set_terminated(run_id, status=MLFLOW_STATUS.get(t["status"], "KILLED"))

        for t in trials:
            run_id = t.get("mlflow_run_id")
            if run_id:
                retry_busy(uri, f"settling trial {t['trial_id']}'s run", lambda t=t, r=run_id: settle(t, r))

    def child_runs(self) -> list[Any]:
        if not self.run_id:
            return []
        client = self.tracker.client

        def children() -> list[Any]:
            experiment = client.get_run(self.run_id).info.experiment_id
            where = f"tags.`mlflow.parentRunId` = '{self.run_id}'"
            return client.search_runs([experiment], filter_string=where)

        return retry_busy(self.tracker.uri, "counting the trial runs", children)
