"""``kdray ray start``: one local Ray kept running on loopback between runs; a run attaches to it; ``kdray ray stop``
stops exactly what it started."""

from __future__ import annotations

import contextlib
import copy
import ipaddress
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from kdray.engines import ray_private, ray_service

pytestmark = [pytest.mark.ray, pytest.mark.slow]
REPO = Path(__file__).resolve().parents[2]


def test_a_run_attaches_to_the_kept_ray_and_stop_stops_it_all(tiny_raw, tmp_path, monkeypatch):
    monkeypatch.setenv(
        "KDRAY_RAY_DIR", str(Path("/tmp") / f"kdsvc-{os.getpid()}")
    )  # short: Ray's socket paths
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    state = ray_service.start(cpus=2, object_store_mb=100)
    try:
        assert ray_service.running()["address"] == state["address"].replace("localhost", "127.0.0.1")
        with pytest.raises(Exception, match="already running"):
            ray_service.start()
        listening = []
        pids = ray_service.service_pids(state["pid"], Path(state["root"]))
        for line in subprocess.run(
            ["ss", "-Htlnp"], capture_output=True, text=True, check=True
        ).stdout.splitlines():
            if {int(p) for p in re.findall(r"pid=(\d+)", line)} & pids:
                listening.append(line.split()[3].rsplit(":", 1)[0].strip("[]").removeprefix("::ffff:"))
        assert listening and all(ipaddress.ip_address(a).is_loopback for a in listening), listening
        # the raylet, and so the workers it starts, is told the state API's address (Train's placement-group
        # cleaner asks it without one); processes that rename themselves overwrite /proc/PID/environ
        environs = []
        for pid in pids:
            with contextlib.suppress(OSError):
                if b"raylet/raylet" in (Path("/proc") / str(pid) / "cmdline").read_bytes():
                    environs.append((Path("/proc") / str(pid) / "environ").read_bytes().split(b"\0"))
        want = f"RAY_API_SERVER_ADDRESS={state['dashboard']}".encode()
        assert len(environs) == 1 and want in environs[0], state["dashboard"]

        raw = copy.deepcopy(tiny_raw)
        raw["engine"] = {"name": "ray", "placement": {"cpus_per_peer": 0.5}}
        config = tmp_path / "c.yaml"
        config.write_text(yaml.safe_dump(raw))
        env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
        run = subprocess.run(
            [sys.executable, "-m", "kdray", "train", str(config), "--out", str(tmp_path / "run")],
            env=env, cwd=REPO, capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        assert run.returncode == 0, run.stderr[-3000:]
        info = json.loads((tmp_path / "run" / "ray_run.json").read_text())
        assert info["session"] == "attached"  # no Ray of its own: the kept one
        assert all(w["node_ip"] == "127.0.0.1" for w in info["placement"])
        # the start-up shortcuts (kdray/engines/ray_private.py) on the Ray release they were tested on; any other
        # release in pyproject's range runs Ray's public trainer, which has neither
        shortcuts = ray_private.available()
        # the workers were started without a runtime environment (Train's controller-only variables left out)
        if shortcuts:
            assert [w["runtime_env"] for w in info["placement"]] == ["{}", "{}"]
        # each worker records its torch threads: Ray gives a worker of half a CPU one (OMP_NUM_THREADS)
        assert [w["threads"] for w in info["placement"]] == [1, 1]
        # the run's job ended with it (Ray removed its placement group): no Train cleaner actor was started for it
        listing = (
            "import ray; from ray.util.state import list_actors; ray.init(logging_level='error'); "
            "print(sorted({a.class_name for a in list_actors(limit=10000)}))"
        )
        actors = subprocess.run(
            [sys.executable, "-c", listing],
            env={**env, **ray_service.attach_environment(), "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"},
            capture_output=True, text=True, timeout=120, check=True,
        ).stdout  # fmt: skip
        if shortcuts:
            assert "ControllerWithSettings" in actors and "PlacementGroupCleaner" not in actors, actors
        else:
            assert "TrainController" in actors, actors
    finally:
        ray_service.stop()
    assert ray_service.running() is None
    assert not ray_service.service_pids(state["pid"], Path(state["root"]))  # every process it started is gone


def test_stop_never_signals_a_recorded_pid_that_is_no_longer_the_service(tmp_path):
    """The state file's pid may have been reused by an unrelated process (after a reboot, or a crash of the
    service): only a process whose command line carries the service's private dir is the service's."""
    root = tmp_path / "svc"
    stranger = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    ours = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", str(root / "ray")])
    try:
        time.sleep(0.5)  # both have exec'd: their command lines are readable
        assert ray_service.service_pids(stranger.pid, root) == {ours.pid}  # the stranger is left alone
        assert ray_service.service_pids(ours.pid, root) == {ours.pid}
    finally:
        for proc in (stranger, ours):
            proc.kill()
            proc.wait()
