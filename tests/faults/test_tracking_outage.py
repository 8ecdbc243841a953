"""A tracking server (``tracking.uri: http://127.0.0.1:PORT``) stopped mid-run stops nothing: training goes on, what
the run logs meanwhile is kept in ``<run>/tracking_backlog.jsonl`` (one warning line, not one per metric) and written
to the server when it answers again, or, when it came back only after the run ended, by ``kdray tracking replay``.
Nothing is lost: every epoch's and every step's metrics are in MLflow afterwards, once each.

The server is a real ``mlflow server`` on 127.0.0.1, its store and artifacts in the test's folder, started and stopped
(by its own process group) by the test. The runs wait at chosen epochs (``KDRAY_FAULT=hold-epochs:...``,
tests/faults/hooks) while the test stops or restarts the server, so the outage falls where the test says.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from pathlib import Path

import pytest

import kdray.tracking as tr
from kdray.cli import main

from .conftest import env, kdray_proc, tiny, without_ray_forwarded, write_yaml

pytestmark = pytest.mark.slow

CATEGORIES: dict[str, Counter] = {}
REPORT_LABEL = "server"  # the "file" of this module's rows in $KDRAY_FAULTS_REPORT


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """``mlflow server`` on 127.0.0.1:port with its own store under ``root``; stop() ends its process group only."""

    def __init__(self, root: Path, port: int):
        self.root, self.port, self.proc = root, port, None
        self.uri = f"http://127.0.0.1:{port}"

    def start(self, timeout: float = 180) -> None:
        cmd = [
            sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(self.port),
            "--workers", "1", "--backend-store-uri", f"sqlite:///{self.root / 'server.db'}",
            "--artifacts-destination", str(self.root / "artifacts"),
        ]  # fmt: skip
        log = (self.root / "server.log").open("a")
        self.proc = subprocess.Popen(
            cmd, cwd=self.root, env=env(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, (self.root / "server.log").read_text()[-2000:]
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                time.sleep(0.2)
        raise AssertionError(f"mlflow server not up in {timeout} s")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(
                self.proc.pid, signal.SIGTERM
            )  # the group of the server this test started, nothing else
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.proc = None


def _wait_file(path: Path, procs, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        for p in procs:
            assert p.poll() is None, f"a run ended first: {p.stderr.read()[-2000:]}"
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.02)


def _assert_nothing_lost(client, out: Path, epochs: int) -> None:
    """The run FINISHED, every epoch's metrics at steps 1..epochs and every row of steps.jsonl at its step, once."""
    summary = json.loads((out / "summary.json").read_text())
    run = client.get_run(summary["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    assert [h["epoch"] for h in summary["history"]] == list(range(1, epochs + 1))
    for key in summary["history"][0]:
        if key == "epoch":
            continue
        history = client.get_metric_history(run.info.run_id, key)
        assert sorted(m.step for m in history) == list(range(1, epochs + 1)), key
        assert {m.step: m.value for m in history} == pytest.approx(
            {h["epoch"]: h[key] for h in summary["history"]}
        )
    rows = [json.loads(line) for line in (out / "steps.jsonl").read_text().splitlines()]
    assert rows
    for key in rows[0]:
        if key == "step":
            continue
        history = client.get_metric_history(run.info.run_id, f"step/{key}")
        assert sorted(m.step for m in history) == [r["step"] for r in rows], key
    assert "config.yaml" in {a.path for a in client.list_artifacts(run.info.run_id)}
    assert not (out / tr.BACKLOG_FILE).exists()


def test_a_server_stopped_mid_run_loses_nothing(tmp_path, capsys):
    root = tmp_path / "server"
    root.mkdir()
    server = Server(root, _free_port())
    epochs = 4
    raw = tiny(epochs=epochs, log_every_steps=2)  # 3 step rows an epoch (steps.jsonl and MLflow's step/...)
    raw["tracking"] = {"enabled": True, "uri": server.uri, "experiment": "outage", "log_models": False}
    config = write_yaml(tmp_path / "tracked.yaml", raw)
    holds = {"back": tmp_path / "hold-back", "late": tmp_path / "hold-late"}
    # back: the server stops after epoch 1 and is back after epoch 3 (the run writes the backlog itself);
    # late: a 2-epoch run stopped after epoch 1 ends during the outage (the backlog is replayed afterwards)
    outs = {"back": tmp_path / "runs" / "back", "late": tmp_path / "runs" / "late"}
    procs = {}
    try:
        server.start()
        procs["back"] = kdray_proc(
            "train", config, "--out", outs["back"],
            env=env(KDRAY_FAULT="hold-epochs:1,3", KDRAY_FAULT_DIR=str(holds["back"])),
        )  # fmt: skip
        procs["late"] = kdray_proc(
            "train", config, "--out", outs["late"], "--set", "train.epochs=2",
            env=env(KDRAY_FAULT="hold-epochs:1", KDRAY_FAULT_DIR=str(holds["late"])),
        )  # fmt: skip
        for name in procs:
            _wait_file(holds[name] / "held-1", procs.values())
        server.stop()
        for name in procs:
            (holds[name] / "go-1").touch()
        late_out, late_err = procs["late"].communicate(timeout=300)
        assert procs["late"].returncode == 0, late_err
        _wait_file(holds["back"] / "held-3", [procs["back"]])
        # epochs 2 and 3 are in the file while the server is away
        kept = tr.read_backlog(outs["back"] / tr.BACKLOG_FILE)
        kept_epochs = {
            m[3] for op in kept if op["op"] == "metrics" for m in op["metrics"] if m[0] == "peer0/val_acc"
        }
        assert kept_epochs == {2, 3}
        server.start()
        (holds["back"] / "go-3").touch()
        back_out, back_err = procs["back"].communicate(timeout=300)
        assert procs["back"].returncode == 0, back_err

        # one warning line for the whole outage (the run then says once that the server answers again)
        back_lines = back_err.strip().splitlines()
        assert len(back_lines) == 2 and "warning" in back_lines[0], back_err
        assert "Connection refused" in back_lines[0] and str(outs["back"] / tr.BACKLOG_FILE) in back_lines[0]
        assert "answers again" in back_lines[1] and "warning" not in back_lines[1], back_err
        # the run that ended during the outage: the outage's line and the one naming the file and the command
        late_warnings = [line for line in late_err.strip().splitlines() if "warning" in line]
        assert len(late_warnings) == 2 and "kdray tracking replay" in late_warnings[1], late_err
        assert (outs["late"] / tr.BACKLOG_FILE).is_file()

        capsys.readouterr()
        assert main(["tracking", "replay", str(outs["late"])]) == 0
        assert "written to the tracking server" in capsys.readouterr().out

        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri=server.uri)
        _assert_nothing_lost(client, outs["back"], epochs)
        _assert_nothing_lost(client, outs["late"], 2)
        CATEGORIES["tracking server stopped mid-run (back before the end / after it: replayed)"] = Counter(
            tried=2, survived=2, lost=0
        )
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()
                p.communicate()
        server.stop()


def test_a_backlog_replays_in_order_and_only_outages_are_kept(tmp_path, monkeypatch, capsys):
    """The logic without a server: an outage keeps the calls (in memory and in the file) behind one warning,
    writes them in order once the server answers, and any other error is raised at once."""
    from kdray.config import TrackingConfig

    class Client:
        def __init__(self):
            self.down, self.calls = False, []

        def log_batch(self, run_id, metrics=(), params=()):
            if self.down:
                raise tr.TrackingError("API request to http://x/api failed with exception Connection refused")
            self.calls += [(m.key, m.step) for m in metrics]

        def set_terminated(self, run_id, status):
            if self.down:
                raise tr.TrackingError("API request to http://x/api failed with error code 503 != 200")
            self.calls.append(("end", status))

    tracker = tr.Tracker(TrackingConfig(uri="http://127.0.0.1:9"), tmp_path)
    tracker._client, tracker.run_id = Client(), "r1"
    clock = [0.0]
    monkeypatch.setattr(tr.time, "monotonic", lambda: clock[0])
    tracker.log_metrics({"a": 1.0}, step=1)
    tracker._client.down = True
    tracker.log_metrics({"a": 2.0}, step=2)
    tracker.log_metrics({"a": 3.0}, step=3)
    assert [op["metrics"][0][3] for op in tr.read_backlog(tmp_path / tr.BACKLOG_FILE)] == [2, 3]
    tracker._client.down = False
    clock[0] = tr.RECONNECT_EVERY_S - 1  # not tried again yet: kept behind the others
    tracker.log_metrics({"a": 4.0}, step=4)
    assert tracker._client.calls == [("a", 1)]
    clock[0] = tr.RECONNECT_EVERY_S + 1
    tracker.log_metrics({"a": 5.0}, step=5)
    tracker.end()
    assert tracker._client.calls == [("a", 1), ("a", 2), ("a", 3), ("a", 4), ("a", 5), ("end", "FINISHED")]
    assert not (tmp_path / tr.BACKLOG_FILE).exists()
    err = without_ray_forwarded(capsys.readouterr().err).strip().splitlines()
    assert len(err) == 2 and "warning" in err[0] and "answers again: the 3 call(s)" in err[1], err

    sqlite = tr.Tracker(TrackingConfig(uri="sqlite:////tmp/never.db"), tmp_path)
    sqlite._client, sqlite.run_id = Client(), "r2"
    sqlite._client.down = True  # a store that is not a server: the error is the run's, as before
    with pytest.raises(tr.TrackingError, match="Connection refused"):
        sqlite.log_metrics({"a": 1.0}, step=1)


def test_a_resumed_run_writes_the_backlog_its_server_missed_first(tmp_path):
    """``kdray train --resume`` of a run that ended during an outage writes its backlog (all but its old end, the
    resumed run ends itself) into the reopened run before anything new, and removes the file."""
    from kdray.config import TrackingConfig

    class Client:
        def __init__(self):
            self.calls = []

        def get_run(self, run_id):
            return None

        def update_run(self, run_id, status):
            self.calls.append(("reopen", run_id))

        def log_batch(self, run_id, metrics=(), params=()):
            self.calls += [(run_id, m.key, m.step) for m in metrics]

        def set_terminated(self, run_id, status):
            self.calls.append(("end", status))

    ops = [
        {"run_id": "r1", "uri": "http://127.0.0.1:9", "op": "metrics", "metrics": [["a", 2.0, 1, 2]]},
        {"run_id": "r1", "uri": "http://127.0.0.1:9", "op": "end", "status": "FINISHED"},
    ]
    (tmp_path / tr.BACKLOG_FILE).write_text("".join(json.dumps(op) + "\n" for op in ops) + '{"cut sho')
    tracker = tr.Tracker(TrackingConfig(uri="http://127.0.0.1:9"), tmp_path)
    tracker._client = Client()
    assert tracker.start("tiny", resume_run_id="r1") == "r1"
    tracker.log_metrics({"a": 3.0}, step=3)
    assert tracker._client.calls == [("reopen", "r1"), ("r1", "a", 2), ("r1", "a", 3)]
    assert not (tmp_path / tr.BACKLOG_FILE).exists()


def test_a_study_trial_keeps_training_through_an_outage_and_says_so_once(tmp_path, monkeypatch, capsys):
    """A ``kdray tune`` trial's per-epoch objective on its MLflow run: while the server cannot be reached, the trial
    goes on (the epoch is in its history file), one warning line; once it is back, epochs are logged again. Any
    other error is raised as before."""
    import requests

    import kdray.search.mlflow_study as ms
    from kdray.search.trial import TuneReporter

    logged, state = [], {"down": True}

    def find(uri, parent, out):
        if state["down"]:
            raise requests.ConnectionError("refused")
        return "run-1"

    def log_epoch(uri, run_id, objective, values, epoch):
        logged.append((run_id, epoch, objective))

    monkeypatch.setattr(ms, "find_trial_run", find)
    monkeypatch.setattr(ms, "log_trial_epoch", log_epoch)
    reporter = object.__new__(TuneReporter)  # only what _log_epoch reads
    reporter.cfg = type(
        "C", (), {"tracking": type("T", (), {"uri": "http://127.0.0.1:9", "enabled": True})}
    )()
    reporter.plan = type("P", (), {"parent_run_id": "parent"})()
    reporter.out, reporter.trial_id = tmp_path, "t1"
    reporter._run_id, reporter._looked_up, reporter._outage_warned = None, False, False
    reporter._log_epoch(0.5, {}, 1)
    reporter._log_epoch(0.6, {}, 2)
    state["down"] = False
    reporter._log_epoch(0.7, {}, 3)
    assert logged == [("run-1", 3, 0.7)]
    warnings = [line for line in capsys.readouterr().err.splitlines() if "cannot be reached" in line]
    assert len(warnings) == 1 and "trial t1's objective for epoch 1" in warnings[0]
    state["down"] = True
    reporter._run_id, reporter._looked_up = None, False
    monkeypatch.setattr(ms, "find_trial_run", lambda *a: (_ for _ in ()).throw(ValueError("a real error")))
    with pytest.raises(ValueError, match="a real error"):
        reporter._log_epoch(0.8, {}, 4)
