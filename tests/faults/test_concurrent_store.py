"""Runs that share a tracking store never interfere: N ``kdray train`` processes started at once, each with its own
``--out`` under one parent (so one ``<parent>/mlflow.db``, new), all finish and all appear as N MLflow runs.

"At once" at its worst: a test-only hook (``KDRAY_FAULT=barrier:N``, tests/faults/hooks) holds every process just
before it opens the store until all N are there, so they meet the empty store at the same instant. Before the store
lock of kdray/tracking.py, 1 of 4 such runs survived (the others: "Online migration expected to match one row",
"table ... already exists"); docs/faults.md has the figures.
"""

from __future__ import annotations

from collections import Counter

import pytest

import kdray.tracking as tr

from .conftest import env, kdray_proc, tiny, write_yaml

N = 4
CATEGORIES: dict[str, Counter] = {}
REPORT_LABEL = "store"  # the "file" of this module's rows in $KDRAY_FAULTS_REPORT


def test_runs_started_at_once_share_a_new_store(tmp_path):
    raw = tiny(steps_per_epoch=2)
    raw["tracking"] = {"enabled": True, "experiment": "faults"}
    config = write_yaml(tmp_path / "tracked.yaml", raw)
    parent = tmp_path / "runs"
    hook = env(KDRAY_FAULT=f"barrier:{N}", KDRAY_FAULT_DIR=str(tmp_path / "barrier"))
    procs = [kdray_proc("train", config, "--out", parent / f"r{i}", env=hook) for i in range(N)]
    results = [(p.communicate(timeout=600), p.returncode) for p in procs]
    survived = sum(rc == 0 for _, rc in results)
    CATEGORIES[f"{N} runs at once, one new store"] = Counter(tried=N, survived=survived, lost=N - survived)
    assert survived == N, "\n".join(err[-600:] for (_, err), rc in results if rc != 0)

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{parent / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("faults")
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == N
    assert {r.info.status for r in runs} == {"FINISHED"}
    assert {r.data.tags["kdray.out"] for r in runs} == {str(parent / f"r{i}") for i in range(N)}
    assert all("peer0/val_acc" in r.data.metrics for r in runs)


def test_a_busy_store_is_retried_and_anything_else_is_not(monkeypatch):
    """The retry of every store call: "database is locked" is waited out; any other error, or a busy store that
    stays busy, is raised (a one-line TrackingError for the latter)."""
    monkeypatch.setattr(tr.time, "sleep", lambda s: None)
    uri = "sqlite:////tmp/never/mlflow.db"
    calls = []

    def locked_twice():
        calls.append(1)
        if len(calls) < 3:
            raise RuntimeError("(sqlite3.OperationalError) database is locked")
        return "done"

    assert tr.retry_busy(uri, "logging", locked_twice) == "done" and len(calls) == 3
    with pytest.raises(ValueError):
        tr.retry_busy(uri, "logging", lambda: (_ for _ in ()).throw(ValueError("no such table")))
    with pytest.raises(RuntimeError):  # a server store retries nothing itself (MLflow's own client does)
        tr.retry_busy("http://127.0.0.1:9", "logging", _always_locked)
    monkeypatch.setattr(tr, "RETRY_FOR_S", 0.0)
    with pytest.raises(tr.TrackingError, match="stayed busy.*--resume"):
        tr.retry_busy(uri, "logging metrics", _always_locked, run_open=True)


def _always_locked():
    raise RuntimeError("database is locked")
