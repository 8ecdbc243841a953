"""MLflow tracking: one run per population, an embedded SQLite store by default (no server).

Default store: ``sqlite:///<output root>/mlflow.db`` with artifacts in ``<output root>/mlartifacts``, where the output
root is the parent of the run folder (``runs/`` for ``--out runs/quick``), so every run of a project lands in one
store: ``mlflow ui --backend-store-uri sqlite:///runs/mlflow.db``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from kdray.config import TrackingConfig
from kdray.errors import TrackingError

# Fail fast on an unreachable server instead of MLflow's default minutes of retries.
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")


def default_uri(out_dir: Path) -> str:
    return f"sqlite:///{out_dir.resolve().parent / 'mlflow.db'}"


class Tracker:
    """A thin wrapper over ``MlflowClient`` (explicit run ids, no global active-run state, safe in workers)."""

    def __init__(self, cfg: TrackingConfig, out_dir: Path):
        self.cfg = cfg
        self.out_dir = Path(out_dir)
        self.uri = cfg.uri or default_uri(self.out_dir)
        self.run_id: str | None = None
        self._client = None

    @property
    def enabled(self) -> bool:
        return self.cfg.enabled

    def check(self) -> None:
        """Make sure the store answers, before any training starts."""
        if not self.enabled:
            return
        from mlflow.tracking import MlflowClient

        try:
            self._client = MlflowClient(tracking_uri=self.uri)
            self._client.search_experiments(max_results=1)
        except Exception as exc:  # noqa: BLE001 - any failure here means: cannot track
            first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
            raise TrackingError(
                f"tracking.uri '{self.uri}' cannot be reached ({first}); start the server, fix the URI, "
                "or set tracking.uri: null for the embedded store"
            ) from None

    @property
    def client(self):
        if self._client is None:
            self.check()
        return self._client

    def _experiment_id(self) -> str:
        exp = self.client.get_experiment_by_name(self.cfg.experiment)
        if exp is not None:
            return exp.experiment_id
        artifacts = None
        if self.uri.startswith("sqlite:///"):
            artifacts = (Path(self.uri.removeprefix("sqlite:///")).parent / "mlartifacts").resolve().as_uri()
        return self.client.create_experiment(self.cfg.experiment, artifact_location=artifacts)

    def start(
        self, run_name: str, resume_run_id: str | None = None, parent_run_id: str | None = None
    ) -> str | None:
        """Open the run (or reopen ``resume_run_id``: a resumed population continues its run, no duplicate)."""
        if not self.enabled:
            return None
        if resume_run_id:
            try:
                self.client.get_run(resume_run_id)
                self.client.update_run(resume_run_id, status="RUNNING")
                self.run_id = resume_run_id
                return self.run_id
            except Exception:  # noqa: BLE001 - the old store is gone: start a fresh run, say so in its tags
                pass
        tags = {"mlflow.runName": run_name}
        if parent_run_id:
            tags["mlflow.parentRunId"] = parent_run_id
        run = self.client.create_run(self._experiment_id(), run_name=run_name, tags=tags)
        self.run_id = run.info.run_id
        return self.run_id

    def log_params(self, params: dict[str, Any]) -> None:
        if not self.run_id:
            return
        from mlflow.entities import Param

        items = [Param(k, str(v)[:6000]) for k, v in params.items()]
        existing = self.client.get_run(self.run_id).data.params
        items = [p for p in items if p.key not in existing]  # a resumed run cannot re-log params
        for i in range(0, len(items), 100):
            self.client.log_batch(self.run_id, params=items[i : i + 100])

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        if not self.run_id or not metrics:
            return
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k.replace("@", "_"), float(v), now, step) for k, v in metrics.items()]
        for i in range(0, len(items), 500):
            self.client.log_batch(self.run_id, metrics=items[i : i + 500])

    def log_artifact(self, path: str | Path, subdir: str | None = None) -> None:
        if self.run_id and Path(path).exists():
            self.client.log_artifact(self.run_id, str(path), subdir)

    def set_tags(self, tags: dict[str, str]) -> None:
        if self.run_id:
            for k, v in tags.items():
                self.client.set_tag(self.run_id, k, v)

    def end(self, status: str = "FINISHED") -> None:
        if self.run_id:
            self.client.set_terminated(self.run_id, status=status)
