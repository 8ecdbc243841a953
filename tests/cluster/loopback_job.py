"""Start a loopback Ray cluster, run ``kdray submit`` against it, record where things ran, stop it; write JSON.

    unshare -n -- python tests/cluster/loopback_job.py RESULT.json -- CONFIG [kdray submit options]

Meant to run in a private network namespace (``unshare -n``): Ray's GCS, raylets and agents listen on every
interface (0.0.0.0) whenever the node IP is not 127.0.0.1, and in a fresh namespace the only interface is loopback.
The result file holds: the submit's exit code and output, every listening socket and the namespace's addresses, the
Ray Train workers' nodes (from Ray's state API), the timings, and the processes left after the stop (none expected).
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(HERE))

from loopback import LoopbackCluster  # noqa: E402


def train_workers(cluster: LoopbackCluster) -> list[dict]:
    """The Ray Train workers the job ran (alive or dead), each with its node's IP."""
    os.environ.update({k: v for k, v in cluster.env.items() if k.startswith("RAY_")})
    from ray.util.state import list_actors, list_nodes

    nodes = {n.node_id: n.node_ip for n in list_nodes(address=cluster.dashboard_url, limit=100)}
    actors = list_actors(
        address=cluster.dashboard_url, filters=[("class_name", "=", "RayTrainWorker")], detail=True, limit=100
    )
    return [{"actor_id": a.actor_id, "node_ip": nodes.get(a.node_id), "state": a.state} for a in actors]


def become_subreaper() -> bool:
    """Make this process the reaper of its orphaned descendants (``PR_SET_CHILD_SUBREAPER``).

    ``ray start`` daemonizes: its GCS, raylets and agents outlive it and are re-parented. Without a subreaper they go
    to PID 1, and in a container whose PID 1 does not reap, every process the stop kills stays a zombie. As their
    subreaper this process collects them itself (``reap_children``)."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(36, 1, 0, 0, 0) == 0  # PR_SET_CHILD_SUBREAPER
    return False


def reap_children(timeout_s: float = 10.0) -> int:
    """Wait for every exited child (re-parented ones included) until none is left or ``timeout_s`` passes."""
    reaped, deadline = 0, time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            break
        if pid == 0:
            time.sleep(0.1)
        else:
            reaped += 1
    return reaped


def main(result_file: str, submit_args: list[str]) -> int:
    result: dict = {"timings": {}, "subreaper": become_subreaper()}
    t0 = time.monotonic()
    if os.environ.get("KDRAY_E2E_NETNS") == "1":
        subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    cluster = LoopbackCluster()
    try:
        cluster.start()
        result["timings"]["cluster_up_s"] = round(time.monotonic() - t0, 1)
        result["started_pids"] = sorted(cluster.pids())
        result["addresses"] = subprocess.run(["ip", "-o", "addr"], capture_output=True, text=True).stdout
        t1 = time.monotonic()
        proc = subprocess.run(
            [sys.executable, "-m", "kdray", "submit", "--address", cluster.dashboard_url, *submit_args],
            cwd=REPO,
            env=cluster.env,
            capture_output=True,
            text=True,
            timeout=360,
        )
        result["timings"]["job_s"] = round(time.monotonic() - t1, 1)
        result["submit_rc"], result["submit_output"] = proc.returncode, proc.stdout + proc.stderr
        result["listening"] = cluster.listening()  # after the job: the workers' ports too
        result["train_workers"] = train_workers(cluster)
    except Exception as exc:  # noqa: BLE001 - reported to the test, which fails with it
        result["error"] = f"{type(exc).__name__}: {exc}"
        result["logs"] = cluster.logs()
    finally:
        t2 = time.monotonic()
        cluster.stop()
        result["timings"]["stop_s"] = round(time.monotonic() - t2, 1)
        result["left_pids"] = sorted(cluster.pids())
        result["reaped"] = reap_children() if result["subreaper"] else 0
        result["timings"]["total_s"] = round(time.monotonic() - t0, 1)
        Path(result_file).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    if len(sys.argv) < 3 or sys.argv[2] != "--":
        raise SystemExit(__doc__)
    raise SystemExit(main(sys.argv[1], sys.argv[3:]))
