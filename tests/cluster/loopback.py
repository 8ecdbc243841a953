"""A real multi-node Ray cluster on loopback addresses, started with ``ray start`` and stopped by PID.

The head listens on 127.0.0.2 (GCS, dashboard and Jobs API), each worker node on its own 127.0.0.x, so Ray sees as
many nodes as a real cluster would (distinct node IPs, node_rank 0..n-1). Everything stays private to the test:
its own temp dir (``RAY_TMPDIR``), free ports it picked, token authentication with a fresh token in the environment
(never ~/.ray/auth_token), and at the end only the processes it started are stopped (nothing is stopped by name).

By hand: ``python -m tests.cluster.loopback`` starts one and prints the address (Ctrl-C stops it).
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from kdray.engines.ports import PortPicker
from kdray.engines.ray_service import process_table, process_tree, signal_all

BIN = Path(sys.executable).parent


class LoopbackCluster:
    def __init__(
        self, worker_ips=("127.0.0.3", "127.0.0.4"), head_ip: str = "127.0.0.2", cpus_per_node: int = 1
    ):
        self.head_ip, self.worker_ips, self.cpus = head_ip, list(worker_ips), cpus_per_node
        # Short: Ray's unix socket paths must stay under ~107 characters.
        self.root = Path(tempfile.mkdtemp(prefix="kdr-", dir="/tmp"))
        self.token = secrets.token_hex(32)
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
        self.env.update(
            RAY_TMPDIR=str(self.root),
            RAY_AUTH_MODE="token",
            RAY_AUTH_TOKEN=self.token,
            RAY_USAGE_STATS_ENABLED="0",
            PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        )
        # every port distinct across the whole cluster: two draws of a free port can return the same one
        self.ports = PortPicker()
        self.gcs_port = self.ports.port(head_ip)
        self.dashboard_port = self.ports.port(head_ip)
        self.procs: list[subprocess.Popen] = []

    @property
    def address(self) -> str:
        return f"{self.head_ip}:{self.gcs_port}"

    @property
    def dashboard_url(self) -> str:
        return f"http://{self.head_ip}:{self.dashboard_port}"

    def _node_args(self, ip: str) -> list[str]:
        workers = self.ports.block(30, ip)
        return [
            f"--node-ip-address={ip}",
            f"--num-cpus={self.cpus}",
            "--num-gpus=0",
            "--object-store-memory=100000000",
            f"--node-manager-port={self.ports.port(ip)}",
            f"--object-manager-port={self.ports.port(ip)}",
            f"--dashboard-agent-listen-port={self.ports.port(ip)}",
            f"--dashboard-agent-grpc-port={self.ports.port(ip)}",
            f"--runtime-env-agent-port={self.ports.port(ip)}",
            f"--metrics-export-port={self.ports.port(ip)}",
            f"--min-worker-port={workers.start}",
            f"--max-worker-port={workers.stop - 1}",
            "--disable-usage-stats",
            "--block",
        ]

    def _spawn(self, args: list[str], name: str) -> subprocess.Popen:
        log = open(self.root / f"{name}.log", "wb")  # noqa: SIM115 - lives as long as the process
        proc = subprocess.Popen(
            # A temp dir per node, as on separate machines: nodes sharing one would tail each other's logs.
            [str(BIN / "ray"), "start", *args, f"--temp-dir={self.root / name}"],
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        self.procs.append(proc)
        return proc

    def _start_node(self, args: list[str], name: str, timeout_s: float, attempts: int) -> None:
        """Start one node and wait until it has registered. On a busy 2-core machine a node can miss Ray's fixed
        30 s registration deadline, and `ray start` gives up: then its processes are killed and it starts again."""
        for attempt in range(attempts):
            label = name if attempt == 0 else f"{name}-retry{attempt}"
            proc = self._spawn(args, label)
            try:
                self._wait_for(lambda label=label: self._started(label), timeout_s, f"node {name}", proc)
                return
            except RuntimeError:
                if attempt == attempts - 1:
                    raise
                signal_all(self._pids_under(self.root / label), signal.SIGKILL)
                self.procs.remove(proc)  # gone: only the live attempt's `ray start` is watched from here on

    def start(self, timeout_s: float = 90.0) -> LoopbackCluster:
        head = [
            "--head",
            f"--port={self.gcs_port}",
            "--include-dashboard=true",
            f"--dashboard-host={self.head_ip}",
            f"--dashboard-port={self.dashboard_port}",
            f"--ray-client-server-port={self.ports.port(self.head_ip)}",
        ]
        self._start_node(head + self._node_args(self.head_ip), "head", timeout_s, attempts=1)
        # One node at a time: nodes starting together on 2 cores often miss the registration deadline.
        for i, ip in enumerate(self.worker_ips, start=1):
            self._start_node(
                [f"--address={self.address}", *self._node_args(ip)], f"worker{i}", timeout_s, attempts=3
            )
        self._wait_for(lambda: self._listening(self.head_ip, self.dashboard_port), timeout_s, "the dashboard")
        return self

    def _wait_for(self, ready, timeout_s: float, what: str, proc: subprocess.Popen | None = None) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            dead = [p for p in ([proc] if proc else self.procs) if p.poll() is not None]
            if dead:
                raise RuntimeError(
                    f"`ray start` exited ({dead[0].args}); logs in {self.root}:\n{self.logs()}"
                )
            if ready():
                return
            time.sleep(0.5)
        raise TimeoutError(f"{what} not up after {timeout_s:g} s; logs in {self.root}:\n{self.logs()}")

    @staticmethod
    def _listening(ip: str, port: int) -> bool:
        with socket.socket() as s:
            s.settimeout(0.5)
            return s.connect_ex((ip, port)) == 0

    def _started(self, name: str) -> bool:
        """`ray start` says so once its node has registered with the GCS."""
        log = self.root / f"{name}.log"
        return log.exists() and "Ray runtime started." in log.read_text(errors="replace")

    def _pids_under(self, folder: Path) -> set[int]:
        return {pid for pid, (_, cmd) in process_table().items() if str(folder) in cmd}

    def pids(self) -> set[int]:
        """Every process this cluster started: the `ray start` trees, and anything carrying its private temp dir."""
        return process_tree([p.pid for p in self.procs], self.root)

    def listening(self) -> list[tuple[str, int, int]]:
        """``(ip, port, pid)`` of every TCP socket the cluster's processes listen on (from ``ss -tlnpH``)."""
        mine = self.pids()
        out = []
        text = subprocess.run(["ss", "-tlnpH"], capture_output=True, text=True, check=True).stdout
        for line in text.splitlines():
            fields = line.split()
            if len(fields) < 6:
                continue
            ip, _, port = fields[3].rpartition(":")
            for pid in map(int, re.findall(r"pid=(\d+)", fields[5])):
                if pid in mine:
                    out.append((ip.strip("[]"), int(port), pid))
        return out

    def logs(self, tail: int = 30) -> str:
        text = []
        for f in sorted(self.root.glob("*.log")):
            lines = f.read_text(errors="replace").splitlines()[-tail:]
            text.append(f"--- {f.name}\n" + "\n".join(lines))
        return "\n".join(text)

    def stop(self, grace_s: float = 5.0, keep_files: bool = False) -> None:
        """SIGTERM every process of this cluster, SIGKILL what is left after ``grace_s``; then remove the temp dir."""
        pids = self.pids()
        signal_all(pids, signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline and self._reap() and (pids & self.pids()):
            time.sleep(0.2)
        signal_all(pids | self.pids(), signal.SIGKILL)
        for proc in self.procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=grace_s)
        if not keep_files:
            shutil.rmtree(self.root, ignore_errors=True)

    def _reap(self) -> bool:
        for proc in self.procs:
            proc.poll()
        return True


if __name__ == "__main__":
    cluster = LoopbackCluster().start()
    print(
        f"RAY_AUTH_MODE=token RAY_AUTH_TOKEN={cluster.token} ray job submit --address {cluster.dashboard_url} ..."
    )
    print("listening:", sorted(cluster.listening()))
    try:
        while True:
            time.sleep(1)
    except KeyboardInterrupt:
        cluster.stop()
