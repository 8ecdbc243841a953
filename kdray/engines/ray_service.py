"""``kdray ray start | status | stop``: one local Ray kept running on loopback between runs, so that a run attaches
to it (about a second) instead of starting its own (several seconds of Ray start-up per run).

``kdray ray start`` launches ``ray start --head --block`` in the background on 127.0.0.1 only (node IP, GCS,
dashboard), in its own temp dir, with token authentication and a private token, and records its process id,
address and token in ``<dir>/service.json`` (mode 0600; ``<dir>`` is ``KDRAY_RAY_DIR`` or
``/tmp/kdray-<uid>-ray``). While it runs, every ``kdray train`` / ``kdray tune`` (and a Python process that has not
imported Ray yet) attaches to it, unless ``RAY_ADDRESS`` or ``engine.session.address`` names another cluster.
``kdray ray stop`` stops exactly the processes it started (by process id; nothing is ever stopped by name).
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from kdray.engines.ports import PortPicker
from kdray.errors import KdrayError

STATE_FILE = "service.json"


def service_dir() -> Path:
    return Path(os.environ.get("KDRAY_RAY_DIR") or f"/tmp/kdray-{os.getuid()}-ray")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    stat = Path(f"/proc/{pid}/stat")
    return not (stat.is_file() and stat.read_text().rsplit(")", 1)[-1].split()[0] == "Z")


def running() -> dict[str, Any] | None:
    """The service's state if its ``ray start`` process is alive, else None."""
    try:
        state = json.loads((service_dir() / STATE_FILE).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(state, dict) or not isinstance(state.get("pid"), int) or not _alive(state["pid"]):
        return None
    return state


def attach_environment() -> dict[str, str]:
    """The environment that attaches Ray to the running service (empty when there is none, or when
    ``RAY_ADDRESS`` already names a cluster). Set before Ray is imported: Ray reads its auth mode at import."""
    state = running()
    if state is None or os.environ.get("RAY_ADDRESS"):
        return {}
    return {"RAY_ADDRESS": state["address"], "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": state["token"]}


def start(cpus: int | None = None, object_store_mb: int = 300, timeout_s: float = 90.0) -> dict[str, Any]:
    """Start the service and wait until Ray says it is up; returns its state."""
    if running():
        state = running()
        raise KdrayError(
            f"a kdray Ray is already running at {state['address']} (pid {state['pid']}); `kdray ray stop` first"
        )
    root = service_dir()
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True, mode=0o700)
    token = secrets.token_hex(32)
    ports = PortPicker()  # distinct: two draws of a free port can return the same one
    port, dashboard, client = ports.port(), ports.port(), ports.port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(
        RAY_TMPDIR=str(root),
        RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",  # node IP 127.0.0.1, not rewritten to the machine's address
        RAY_AUTH_MODE="token",
        RAY_AUTH_TOKEN=token,
        RAY_USAGE_STATS_ENABLED="0",
        # the state API's address for the processes Ray starts: Train's placement-group cleaner calls that API
        # without one, and it fails when it finds more than one Ray on the machine (docs/benchmarks.md)
        RAY_API_SERVER_ADDRESS=f"http://127.0.0.1:{dashboard}",
    )
    ray = Path(sys.executable).parent / "ray"
    args = [
        str(ray), "start", "--head", "--node-ip-address=127.0.0.1", f"--port={port}",
        "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}",
        f"--ray-client-server-port={client}", f"--num-cpus={cpus or os.cpu_count() or 1}",
        f"--object-store-memory={object_store_mb * 2**20}", "--disable-usage-stats", "--block",
        f"--temp-dir={root / 'ray'}",
    ]  # fmt: skip
    log_path = root / "ray-start.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            args,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    deadline = time.monotonic() + timeout_s
    try:
        while "Ray runtime started." not in log_path.read_text(errors="replace"):
            if proc.poll() is not None or time.monotonic() > deadline:
                tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-15:])
                raise KdrayError(f"`ray start` did not come up on 127.0.0.1 (log {log_path}):\n{tail}")
            time.sleep(0.3)
    except BaseException:  # Ctrl-C too: its own session keeps `ray start` from the terminal's SIGINT
        _stop_tree(proc.pid, root)
        raise
    state = {
        "pid": proc.pid,
        "address": f"127.0.0.1:{port}",
        "dashboard": f"http://127.0.0.1:{dashboard}",
        "token": token,
        "root": str(root),
        "started": time.time(),
    }
    path = root / STATE_FILE
    path.touch(mode=0o600)
    path.write_text(json.dumps(state, indent=2))
    return state


def stop(grace_s: float = 5.0) -> dict[str, Any] | None:
    """Stop the service's processes (SIGTERM, then SIGKILL after ``grace_s``); returns the state it had."""
    try:
        state = json.loads((service_dir() / STATE_FILE).read_text())
    except (OSError, ValueError):
        return None
    _stop_tree(int(state["pid"]), Path(state["root"]), grace_s)
    shutil.rmtree(state["root"], ignore_errors=True)
    return state


def process_table() -> dict[int, tuple[int, str]]:
    """pid -> (parent pid, command line) of this user's live processes (zombies excluded)."""
    table = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            if entry.stat().st_uid != os.getuid():
                continue
            stat = Path(f"/proc/{entry.name}/stat").read_text()
            fields = stat[stat.rindex(")") + 2 :].split()
            if fields[0] == "Z":
                continue
            cmd = (
                Path(f"/proc/{entry.name}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            )
            table[int(entry.name)] = (int(fields[1]), cmd)
        except (OSError, ValueError, IndexError):
            continue
    return table


def process_tree(roots: list[int], marker: Path) -> set[int]:
    """The processes ``roots``, their descendants, and every process whose command line carries ``marker`` (a
    private temp dir): what a Ray started by us consists of, and nothing else. Never this process."""
    table = process_table()
    children: dict[int, list[int]] = {}
    for p, (ppid, _) in table.items():
        children.setdefault(ppid, []).append(p)
    found, todo = set(), list(roots)
    while todo:
        p = todo.pop()
        if p in table and p not in found:
            found.add(p)
            todo += children.get(p, [])
    found |= {p for p, (_, cmd) in table.items() if str(marker) in cmd}
    found.discard(os.getpid())
    return found


def signal_all(pids: set[int], sig: int) -> None:
    """Send ``sig`` to each of ``pids``, ignoring those already gone."""
    for p in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(p, sig)


def service_pids(pid: int, root: Path) -> set[int]:
    """The ``ray start`` process, its descendants, and every process carrying the service's private temp dir.
    ``pid`` counts only while its command line carries that dir: a recorded pid since reused is not ours."""
    owned = str(root) in process_table().get(pid, (0, ""))[1]
    return process_tree([pid] if owned else [], root)


def _stop_tree(pid: int, root: Path, grace_s: float = 5.0) -> None:
    pids = service_pids(pid, root)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        signal_all(pids, sig)
        deadline = time.monotonic() + grace_s
        while sig == signal.SIGTERM and time.monotonic() < deadline and any(_alive(p) for p in pids):
            time.sleep(0.2)
        pids |= service_pids(pid, root)


def add_parser(sub) -> None:
    p = sub.add_parser(
        "ray", help="keep one local Ray running on 127.0.0.1 between runs (start | status | stop)"
    )
    p.add_argument("action", choices=["start", "status", "stop"])
    p.add_argument("--cpus", type=int, help="CPUs the local Ray offers (default: all)")
    p.add_argument("--object-store-mb", type=int, default=300)
    p.set_defaults(func=_cmd_ray)


def _cmd_ray(args) -> int:
    if args.action == "start":
        state = start(args.cpus, args.object_store_mb)
        print(f"kdray's Ray is up at {state['address']} (pid {state['pid']}, dashboard {state['dashboard']})")
        print(
            "every kdray train / tune now attaches to it (RAY_ADDRESS overrides); stop it with: kdray ray stop"
        )
        return 0
    if args.action == "status":
        state = running()
        if state is None:
            print("no kdray Ray is running (start one with: kdray ray start)")
            return 1
        print(
            f"kdray's Ray at {state['address']} (pid {state['pid']}), up {time.time() - state['started']:.0f} s"
        )
        return 0
    state = stop()
    print("stopped kdray's Ray" if state else "no kdray Ray was running")
    return 0
