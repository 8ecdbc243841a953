"""A real three-node Ray cluster on loopback (``ray start``: head on 127.0.0.2, workers on 127.0.0.3 and 127.0.0.4),
an AFD ring of three with ``placement: strict_spread`` through the CLI: every peer runs on its own node, and the run
listens on loopback only. The test stops exactly the processes it started, by PID (SIGTERM, then SIGKILL after 5 s).
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

from kdray.engines.ports import PortPicker

# Real multi-node clusters on a shared 2-core machine can miss Ray's node-registration deadline: one rerun.
pytestmark = [pytest.mark.slow, pytest.mark.ray, pytest.mark.flaky(reruns=1)]

RAY = str(Path(sys.executable).parent / "ray")
NODES = ("127.0.0.2", "127.0.0.3", "127.0.0.4")
PAIR = ("127.0.0.5", "127.0.0.6")  # addresses of their own: a three-node cluster may run beside it


def _descendants(pids: set[int]) -> set[int]:
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(stat.parent.name))
    out, todo = set(), list(pids)
    while todo:
        pid = todo.pop()
        if pid not in out:
            out.add(pid)
            todo += children.get(pid, [])
    return out


def _stop(pids: set[int]) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and any(Path(f"/proc/{p}").exists() for p in pids):
            time.sleep(0.2)
        pids = {p for p in pids if Path(f"/proc/{p}").exists()}
        if not pids:
            return


@pytest.fixture
def loopback_cluster():
    """Head + two worker nodes, each a ``ray start --block`` of our own; yields the head's address."""
    yield from _loopback(NODES)


@pytest.fixture
def loopback_pair():
    """Head + one worker node (127.0.0.5, 127.0.0.6), one CPU each."""
    yield from _loopback(PAIR)


def _loopback(nodes: tuple[str, ...]):
    temp_dir = tempfile.mkdtemp(prefix="kdmn-", dir="/tmp")
    env = {
        k: v for k, v in os.environ.items() if k not in ("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "RAY_ADDRESS")
    }
    # a fresh token of its own, never ~/.ray/auth_token (absent on a fresh machine, and not ours to write)
    env.update(
        {
            "RAY_TMPDIR": temp_dir,
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN": secrets.token_hex(32),
            "RAY_USAGE_STATS_ENABLED": "0",
        }
    )
    picker = PortPicker()  # distinct across the cluster: two draws of a free port can return the same one
    port = picker.port(nodes[0])
    address = f"{nodes[0]}:{port}"
    worker_ports: list[range] = []

    def node_args(ip: str, name: str) -> list[str]:
        # several nodes on one machine: give each its own ports and folder (defaults such as the dashboard
        # agent's 52365 would collide)
        ports = {
            flag: picker.port(ip)
            for flag in ("node-manager", "object-manager", "dashboard-agent-listen", "dashboard-agent-grpc",
                         "runtime-env-agent", "metrics-export")
        }  # fmt: skip
        block = picker.block(41, ip)
        low = block.start
        worker_ports.append(block)
        return [
            f"--node-ip-address={ip}", *(f"--{flag}-port={p}" for flag, p in ports.items()),
            f"--min-worker-port={low}", f"--max-worker-port={low + 40}", f"--temp-dir={temp_dir}/{name}",
            "--block", "--num-cpus=1", "--num-gpus=0", "--object-store-memory=100000000", "--disable-usage-stats",
        ]  # fmt: skip

    def commands() -> list[list[str]]:
        head = [RAY, "start", "--head", f"--port={port}", f"--dashboard-host={nodes[0]}",
                f"--dashboard-port={picker.port(nodes[0])}", *node_args(nodes[0], "head")]  # fmt: skip
        return [head] + [[RAY, "start", f"--address={address}", *node_args(ip, f"node{i}")] for i, ip in enumerate(nodes[1:], 1)]  # fmt: skip

    started: list[subprocess.Popen] = []
    start_log = Path(temp_dir) / "ray_start.log"
    log = open(start_log, "w")  # noqa: SIM115 - closed below
    try:
        # Start the nodes one at a time and wait for each to say it is up: under load (a 2-core machine running
        # other work) a node can miss Ray's 30-second registration deadline and its `ray start` exits; the cluster
        # is then started again on fresh ports, up to three times, before the test fails naming the log.
        for attempt in range(3):
            if attempt:
                _stop(_descendants({p.pid for p in started}))
                started.clear()
                port = picker.port(nodes[0])
                address = f"{nodes[0]}:{port}"
                worker_ports.clear()
                log.write(f"--- kdray test: cluster start attempt {attempt + 1}\n")
                log.flush()
            if _start_nodes(commands(), env, log, start_log, started):
                break
        else:
            pytest.fail(
                "the loopback Ray cluster did not start in 3 attempts:\n" + start_log.read_text()[-3000:]
            )
        yield address, env, start_log, worker_ports
    finally:
        _stop(_descendants({p.pid for p in started}))
        log.close()
        import shutil

        shutil.rmtree(temp_dir, ignore_errors=True)


def _start_nodes(commands, env, log, start_log: Path, started: list[subprocess.Popen]) -> bool:
    """Run each ``ray start --block`` in turn, waiting (up to 120 s) for its "Ray runtime started." line; False as
    soon as one exits or stays silent (the caller stops what did start). Lines of an earlier attempt do not count."""
    before = start_log.read_text().count("Ray runtime started.")
    for n, cmd in enumerate(commands, before + 1):
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=log)
        started.append(proc)
        deadline = time.monotonic() + 120
        while start_log.read_text().count("Ray runtime started.") < n:
            if proc.poll() is not None or time.monotonic() > deadline:
                return False
            time.sleep(0.2)
    return True


def _train_on_the_cluster(
    raw: dict, tmp_path: Path, loopback_cluster, name: str = "run", returncode: int = 0
) -> subprocess.CompletedProcess:
    """``kdray train`` into ``tmp_path/<name>`` on the loopback cluster, found through RAY_ADDRESS (no
    engine.session.address), as in a job started by ``ray job submit``."""
    address, env, start_log, _ = loopback_cluster
    config = tmp_path / f"{name}.yaml"
    config.write_text(yaml.safe_dump(raw))
    run = subprocess.run(
        [sys.executable, "-m", "kdray", "train", str(config), "--out", str(tmp_path / name)],
        env={**env, "RAY_ADDRESS": address}, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert run.returncode == returncode, (
        run.stderr[-2000:] + "\n--- ray start:\n" + start_log.read_text()[-2000:]
    )
    return run


def test_ring_of_three_spreads_over_three_loopback_nodes(loopback_cluster, tiny_raw, tmp_path):
    address, env, start_log, ray_worker_ports = loopback_cluster
    raw = tiny_raw
    raw["peers"] = [
        {"arch": "resnet8", "arch_kwargs": {"width": 4}},
        {"arch": "resnet14", "arch_kwargs": {"width": 8}},
        {"arch": "resnet8", "arch_kwargs": {"width": 4}},
    ]
    raw["method"] = {"name": "afd"}
    raw["train"]["threads"] = 1
    raw["train"]["steps_per_epoch"] = 4
    raw["engine"] = {
        "name": "ray", "placement": {"strategy": "strict_spread", "cpus_per_peer": 0.5, "timeout_s": 120},
    }  # fmt: skip
    _train_on_the_cluster(raw, tmp_path, loopback_cluster)
    info = json.loads((tmp_path / "run" / "ray_run.json").read_text())
    assert info["session"] == "attached"  # joined the three-node cluster; started no Ray of its own
    assert info["board_node_ip"] == NODES[0]  # the driver's progress board on the head
    placement = info["placement"]
    assert [p["rank"] for p in placement] == [0, 1, 2]
    assert len({p["node_id"] for p in placement}) == 3  # strict_spread: one peer per node
    assert sorted(p["node_ip"] for p in placement) == sorted(NODES)
    for worker in placement:
        # kdray's own sockets (the rendezvous store, gloo) are on loopback. Ray's core worker binds its gRPC server
        # to all interfaces unless the node IP is exactly 127.0.0.1 (Ray 2.60, C++), so on 127.0.0.2-4 that one
        # listener, in the node's worker-port range, is Ray's and the only exception.
        if worker["rank"] == 0:  # the rendezvous store, on the node's own address
            assert any(a.startswith(f"{worker['node_ip']}:") for a in worker["listening"])
        for listening in worker["listening"]:
            host, port = listening.rsplit(":", 1)
            if not ipaddress.ip_address(host).is_loopback:
                assert any(int(port) in r for r in ray_worker_ports), (worker["rank"], listening)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert all(p["val_acc"] is not None for p in summary["peers"])
    assert summary["exchange"]["bytes_per_step"] > 0


def test_two_peers_of_two_workers_across_loopback_nodes_equal_one_worker_each(
    loopback_cluster, tiny_raw, tmp_path
):
    """K = 2 peers x M = 2 workers spread over the loopback nodes (``spread``: the gradient all-reduces, the
    BatchNorm sums or the shard-to-shard exchange cross nodes); the run equals the LocalEngine's K x 1 at the same
    global batch, float64."""
    import kdray
    from kdray.checkpoint import load_checkpoint

    address, env, start_log, _ = loopback_cluster
    raw = tiny_raw
    raw["peers"] = [{"arch": "resnet8", "arch_kwargs": {"width": 4}} for _ in range(2)]
    raw["method"] = {"name": "dml"}
    raw["train"].update({"threads": 1, "steps_per_epoch": 4, "dtype": "float64"})
    local = kdray.train(raw, out=tmp_path / "local")
    raw["engine"] = {
        "name": "ray",
        "placement": {"strategy": "spread", "cpus_per_peer": 0.5, "timeout_s": 120, "workers_per_peer": 2},
    }
    _train_on_the_cluster(raw, tmp_path, loopback_cluster)
    placement = json.loads((tmp_path / "run" / "ray_run.json").read_text())["placement"]
    assert [(p["rank"], p["shard"]) for p in placement] == [(0, "1/2"), (1, "2/2"), (2, "1/2"), (3, "2/2")]
    # spread over the nodes (Ray Train orders ranks by node, so which pairs share one is Ray's choice)
    assert len({p["node_id"] for p in placement}) >= 2
    got = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")
    want = load_checkpoint(local.checkpoint)
    for name, peer in want["peers"].items():
        for k, v in peer["net"].items():
            if v.is_floating_point():
                assert (got["peers"][name]["net"][k] - v).abs().max().item() <= 1e-9, (name, k)


def test_group_by_peer_and_by_shard_put_every_worker_on_its_planned_node(loopback_pair, tiny_raw, tmp_path):
    """K = 2 peers x M = 2 workers on two loopback nodes of one CPU each (half a CPU per worker):
    ``group_by: peer`` puts each peer's two workers on one node (its all-reduce local), ``group_by: shard`` shard m
    of both peers on node m (the exchange local). Every worker reports the node it ran on: each is the node the
    driver planned for its rank, and both runs equal the LocalEngine's K x 1 at the same global batch (float64).
    A peer of four workers (two CPUs) fits on no node: refused before anything starts, in one line naming the
    nodes' free CPUs."""
    import kdray
    from kdray.checkpoint import load_checkpoint

    raw = tiny_raw
    raw["peers"] = [{"arch": "resnet8", "arch_kwargs": {"width": 4}} for _ in range(2)]
    raw["method"] = {"name": "dml"}
    raw["train"].update({"threads": 1, "steps_per_epoch": 4, "dtype": "float64"})
    want = load_checkpoint(kdray.train(raw, out=tmp_path / "local").checkpoint)
    together = {"peer": [("peer0", "1/2"), ("peer0", "2/2")], "shard": [("peer0", "1/2"), ("peer1", "1/2")]}
    for group_by, first_node in together.items():
        raw["engine"] = {
            "name": "ray",
            "placement": {
                "cpus_per_peer": 0.5,
                "timeout_s": 120,
                "workers_per_peer": 2,
                "group_by": group_by,
            },
        }
        _train_on_the_cluster(raw, tmp_path, loopback_pair, name=group_by)
        info = json.loads((tmp_path / group_by / "ray_run.json").read_text())
        plan, placement = info["placement_plan"], info["placement"]
        assert plan["group_by"] == group_by
        assert [p["rank"] for p in placement] == [0, 1, 2, 3]
        assert [p["node_id"] for p in placement] == plan["node_id"]  # every rank where it was planned
        assert [p["node_ip"] for p in placement] == plan["node_ip"]
        on = {(p["peer"], p["shard"]): p["node_ip"] for p in placement}
        assert {on[w] for w in first_node} == {plan["node_ip"][0]}  # the pair that shares a node
        assert {ip for w, ip in on.items() if w not in first_node} == {plan["node_ip"][3]}
        assert sorted(set(on.values())) == sorted(PAIR)  # the two groups on the two nodes
        got = load_checkpoint(tmp_path / group_by / "checkpoints" / "last.pt")
        for name, peer in want["peers"].items():
            for k, v in peer["net"].items():
                if v.is_floating_point():
                    assert (got["peers"][name]["net"][k] - v).abs().max().item() <= 1e-9, (group_by, name, k)
    raw["engine"]["placement"].update(group_by="peer", workers_per_peer=4, timeout_s=60)
    start = time.monotonic()
    run = _train_on_the_cluster(raw, tmp_path, loopback_pair, name="too-big", returncode=2)
    assert time.monotonic() - start < 60  # the nodes cannot grow: no wait for the timeout
    error = run.stderr.strip().splitlines()[-1]
    assert error.startswith("kdray: error: engine.placement.group_by=peer: 2 group(s) of 4 worker(s)"), error
    assert "no node has room for one group: the cluster has 2 node(s) with free " in error, error
    assert "127.0.0.5 (CPU 1, GPU 0)" in error and "127.0.0.6 (CPU 1, GPU 0)" in error, error


def _raylet_pids(ip: str, started_under: set[int]) -> list[int]:
    """The raylet of the node on ``ip``, among the processes this test's fixture started (never any other Ray)."""
    pids = []
    for pid in started_under:
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if argv and argv[0].endswith(b"raylet") and f"--node_ip_address={ip}".encode() in argv:
            pids.append(pid)
    return pids


def _kill_a_worker_node_mid_run(
    raw: dict, tmp_path: Path, loopback_cluster
) -> tuple[subprocess.Popen, str, str]:
    """``kdray train`` on the cluster; once its first checkpoint is written, SIGKILL the raylet of a node (not the
    head) that runs one of its workers. Returns the ended process, its stderr and the lost node's address."""
    address, env, start_log, _ = loopback_cluster
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(raw))
    run = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, "-m", "kdray", "train", str(config), "--out", str(run)],
        env={**env, "RAY_ADDRESS": address}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 240
        # training, a first checkpoint written, and where the workers run known
        while not ((run / "checkpoints" / "last.pt").exists() and (run / "ray_run.json").exists()):
            assert proc.poll() is None, proc.stderr.read()[-3000:] + start_log.read_text()[-2000:]
            assert time.monotonic() < deadline, "no checkpoint in time"
            time.sleep(0.1)
        info = json.loads((run / "ray_run.json").read_text())
        assert (
            info["board_node_ip"] == NODES[0]
        )  # on the head: losing another node leaves the driver its board
        victim = next(p["node_ip"] for p in info["placement"] if p["node_ip"] != NODES[0])
        ours = _descendants({os.getpid()})  # the fixture's `ray start` processes are this test's children
        pids = _raylet_pids(victim, ours)
        assert len(pids) == 1, (victim, pids)
        os.kill(pids[0], signal.SIGKILL)
        _, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    return proc, err, victim


def _node_loss_population(raw: dict, max_failures: int) -> dict:
    raw["train"].update({"threads": 1, "epochs": 2, "checkpoint_every_steps": 5, "dtype": "float64"})
    raw["data"]["synthetic"]["train_len"] = 512  # 30 steps an epoch
    raw["engine"] = {
        "name": "ray", "placement": {"strategy": "strict_spread", "cpus_per_peer": 0.5, "timeout_s": 120},
        "fault_tolerance": {"max_failures": max_failures},
    }  # fmt: skip
    return raw


def test_a_lost_worker_node_is_one_line_naming_it_and_the_last_checkpoint_is_intact(
    loopback_cluster, tiny_raw, tmp_path
):
    """A worker node's raylet SIGKILLed mid-run (``fault_tolerance.max_failures: 0``): one ``kdray: error:`` line,
    the run's last, naming the lost node's address, exit 2, and the last checkpoint loads."""
    from kdray.checkpoint import load_checkpoint

    proc, err, victim = _kill_a_worker_node_mid_run(
        _node_loss_population(tiny_raw, 0), tmp_path, loopback_cluster
    )
    run = tmp_path / "run"
    errors = [line for line in err.splitlines() if line.startswith("kdray: error:")]
    assert proc.returncode == 2 and len(errors) == 1, err[-3000:]
    assert f"Ray node {victim}" in errors[0] and "was lost mid-run" in errors[0], errors[0]
    assert f"kdray train --resume {run}" in errors[0]
    assert err.strip().splitlines()[-1] == errors[0]  # the run's last word
    ckpt = load_checkpoint(run / "checkpoints" / "last.pt")
    assert ckpt["step"] >= 5


def test_a_lost_worker_node_with_max_failures_continues_on_the_nodes_left(
    loopback_cluster, tiny_raw, tmp_path
):
    """The same loss with ``max_failures: 1``: the worker group restarts from the last checkpoint on the two nodes
    left (strict_spread still fits) and the run ends equal to the LocalEngine's (float64)."""
    import kdray
    from kdray.checkpoint import load_checkpoint

    raw = _node_loss_population(tiny_raw, 1)
    local = kdray.train({**raw, "engine": {"name": "local"}}, out=tmp_path / "local")
    proc, err, victim = _kill_a_worker_node_mid_run(raw, tmp_path, loopback_cluster)
    assert proc.returncode == 0, err[-3000:]
    info = json.loads((tmp_path / "run" / "ray_run.json").read_text())
    assert info["attempts"] == 2 and victim not in {p["node_ip"] for p in info["placement"]}
    got = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")
    want = load_checkpoint(local.checkpoint)
    assert (got["epoch"], got["step"]) == (want["epoch"], want["step"])
    for name, peer in want["peers"].items():
        for k, v in peer["net"].items():
            if v.is_floating_point():
                assert (got["peers"][name]["net"][k] - v).abs().max().item() <= 1e-9, (name, k)
