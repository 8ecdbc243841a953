"""RayEngine against LocalEngine: the same seed on CPU gives the same parameters for every peer (the central
invariant), through each exchange, across a worker killed from outside, with a shared generator, with per-sample
buffers and with a population fed by a generator; placement errors; loopback.

The comparisons run in float64 with one torch thread per process on both sides: summation-order differences
(an all-reduce of the generator's gradient parts against one backward through all of them) are then ~1e-16
relative, far below the tolerance, on any CPU. At equal float32 thread counts the engines also agree; with 2 local
threads against 1 per worker a DML pair drifted by up to 6e-2 in 8 steps (docs/architecture.md).

Each Ray run costs ~20 s of fixed overhead on two cores (controller, placement group, worker processes importing
torch), so each run here proves several things at once.
"""

from __future__ import annotations

import copy
import ipaddress
import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest

import kdray
from kdray.checkpoint import load_checkpoint
from kdray.methods import METHODS
from tests.toy_methods import TOY_METHODS, register_for_ray

pytestmark = pytest.mark.ray

TOL = 1e-9  # float64


def _population(raw: dict, method: str) -> dict:
    raw = copy.deepcopy(raw)
    small = {"arch": "resnet8", "arch_kwargs": {"width": 4}}
    raw["peers"] = [copy.deepcopy(small) for _ in range(3)]
    raw["method"] = {"name": method}
    if method == "afd":  # a heterogeneous ring of three: the feature maps differ in channels
        raw["peers"][1] = {"arch": "resnet14", "arch_kwargs": {"width": 8}}
        raw["method"]["transfer"] = "auto"
    raw["train"].update({"epochs": 2, "threads": 1, "dtype": "float64", "steps_per_epoch": 4})
    return raw


def _compare_states(ray_ckpt: dict, local_ckpt: dict) -> float:
    """Largest absolute difference over every peer's network, private state and buffers, and the shared module."""
    worst = 0.0
    pairs = []
    for name, local in local_ckpt["peers"].items():
        for part in ("net", "state", "buffers"):
            pairs.append((ray_ckpt["peers"][name][part], local[part]))
    if local_ckpt.get("shared") is not None:
        pairs.append((ray_ckpt["shared"]["module"], local_ckpt["shared"]["module"]))
    for got, want in pairs:
        assert set(got) == set(want)
        for k, v in want.items():
            if v.is_floating_point():
                worst = max(worst, (got[k].double() - v.double()).abs().max().item() if v.numel() else 0.0)
            else:
                assert torch_equal(got[k], v), k
    return worst


def torch_equal(a, b) -> bool:
    import torch

    return torch.equal(a, b)


def _kill_rank_at_epoch_end(out_dir: Path, rank: int):
    """An epoch callback that SIGKILLs one worker process from outside, as a lost node would, at the first epoch
    end (the workers are then already in the next epoch)."""
    done = []

    def callback(metrics, checkpoint):
        if done:
            return
        placement = json.loads((out_dir / "ray_run.json").read_text())["placement"]
        pid = next(w["pid"] for w in placement if w["rank"] == rank)
        os.kill(pid, signal.SIGKILL)
        done.append(pid)

    return callback


def _run_pair(raw: dict, tmp_path: Path, resume_epoch: int | None = None, kill: bool = False, **engine):
    local = kdray.train(raw, out=tmp_path / "local")
    ray_raw = copy.deepcopy(raw)
    ray_raw["engine"] = {"name": "ray", "placement": {"cpus_per_peer": 0.5}, **engine}
    if kill:
        callbacks = [_kill_rank_at_epoch_end(tmp_path / "ray", rank=1)]
        return local, kdray.train(ray_raw, out=tmp_path / "ray", callbacks=callbacks)
    if resume_epoch is None:
        return local, kdray.train(ray_raw, out=tmp_path / "ray")
    first = copy.deepcopy(raw)
    first["train"]["epochs"] = resume_epoch
    kdray.train(first, out=tmp_path / "ray")
    return local, kdray.train(ray_raw, resume=tmp_path / "ray")


def _peer_metrics(history: list[dict]) -> list[dict]:
    return [{k: v for k, v in h.items() if not k.startswith(("exchange/", "train/step_ms"))} for h in history]


CASES = {
    # method, engine keys; DML through the collective exchange also loses a worker (killed from outside)
    "dml-collective-killed-worker": (
        "dml",
        {"exchange": "collective", "fault_tolerance": {"max_failures": 1}},
    ),
    # DML through the actor exchange starts from a LocalEngine checkpoint of epoch 1 (``--resume`` onto Ray)
    "dml-actor-resumed": ("dml", {"exchange": "actor"}),
    "afd-ring3-hetero-collective": ("afd", {"exchange": "collective"}),
    # rank 0 gathers the population's state and writes one last.pt (the others: each worker writes its own part)
    "acn-collective-gathered": (
        "acn",
        {"exchange": "collective", "session": {"checkpoint_writes": "gather"}},
    ),
    # per-sample buffers follow their peer onto its worker, and a restarted worker gets its memory back
    "pskd-collective-killed-worker": (
        "pskd",
        {"exchange": "collective", "fault_tolerance": {"max_failures": 1}},
    ),
    "toy_memory-collective": ("toy_memory", {"exchange": "collective"}),
    # a generator-fed population with an EMA generator; CS-KD's observing phase (the pairs' forward)
    "toy_generated-collective": ("toy_generated", {"exchange": "collective"}),
    # ... and resumed onto Ray from a LocalEngine checkpoint (its generator and EMA copy restored on the workers)
    "toy_generated-collective-resumed": ("toy_generated", {"exchange": "collective"}),
    "afd-ring3-hetero-actor": ("afd", {"exchange": "actor"}),
    "acn-actor": ("acn", {"exchange": "actor"}),
    "dml-stale-every-step": ("dml", {"exchange": {"name": "stale", "every": 1}}),
    "cskd-collective": ("cskd", {"exchange": "collective"}),
}
SLOW = {
    "afd-ring3-hetero-actor",
    "acn-actor",
    "dml-stale-every-step",
    "toy_memory-collective",
    "cskd-collective",
}


@pytest.mark.parametrize(
    "case", [pytest.param(c, marks=[pytest.mark.slow] if c in SLOW else []) for c in CASES]
)
def test_ray_engine_matches_local_engine(case, tiny_raw, tmp_path, ray_local, monkeypatch, capfd):
    method, engine = CASES[case]
    for name, cls in TOY_METHODS.items():
        monkeypatch.setitem(METHODS, name, cls)
    register_for_ray()
    raw = _population(tiny_raw, method)
    raw["tracking"] = {"enabled": True}  # embedded store in tmp_path: the Ray run must keep one MLflow run
    if case.endswith("killed-worker"):
        raw["train"]["checkpoint_every_steps"] = 2
    if method == "pskd":
        raw["method"]["weights"] = {"kl": 1.0}  # PS-KD peers inside DML: memories and an exchange
    resumed = case.endswith("-resumed")
    if resumed:  # a 1-epoch run's schedule spans 1 epoch: continued to 2 it would differ from a 2-epoch run's
        raw["train"]["schedule"] = {"name": "constant"}
    local, ray = _run_pair(
        raw, tmp_path, resume_epoch=1 if resumed else None, kill="killed" in case, **engine
    )
    if resumed:
        assert ray.summary["engine"] == "ray" and ray.summary["epochs"] == 2

    ray_ckpt, local_ckpt = load_checkpoint(ray.checkpoint), load_checkpoint(local.checkpoint)
    assert _compare_states(ray_ckpt, local_ckpt) <= TOL
    # the same per-peer and ensemble metrics, epoch by epoch, restarts included
    for got, want in zip(
        _peer_metrics(ray.summary["history"]), _peer_metrics(local.summary["history"]), strict=True
    ):
        assert got.keys() == want.keys()
        for k in want:
            assert got[k] == pytest.approx(want[k], rel=1e-7, abs=1e-9), k
    assert ray.summary["test"]["peers"] == pytest.approx(local.summary["test"]["peers"], abs=1e-12)
    # last.pt is a LocalEngine-format population checkpoint: kdray eval reads it and agrees with the run
    report = kdray.evaluate(ray.checkpoint)
    assert [p["acc"] for p in report["peers"]] == [p["val_acc"] for p in ray.summary["peers"]]
    assert ray_ckpt["mlflow_run_id"] == ray.summary["mlflow_run_id"]

    # exchange figures are logged; one MLflow run per population (restarts included), every epoch logged once
    exchange = ray.summary["exchange"]
    assert exchange["name"] == (engine["exchange"] if isinstance(engine["exchange"], str) else "stale")
    if method != "cskd":  # CS-KD's peers learn from themselves: nothing crosses the wire
        assert exchange["bytes_per_step"] > 0
        assert 0 < exchange["ms_per_step"] < exchange["step_ms"]
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("kdray").experiment_id])
    assert ray.summary["mlflow_run_id"] in {r.info.run_id for r in runs}
    assert len(runs) == 2  # a resumed run continues its own MLflow run
    first_term = next(k for k in ray.summary["history"][-1] if k.startswith("peer0/loss_"))
    history = client.get_metric_history(ray.summary["mlflow_run_id"], first_term)
    assert [m.step for m in history] == [1, 2]  # a resumed run continues its MLflow run: epoch 1 is there
    assert history[-1].value == pytest.approx(local.summary["history"][-1][first_term], rel=1e-7)

    run_info = json.loads((ray.out_dir / "ray_run.json").read_text())
    # a killed worker's run has an epoch callback (the killer): auto then gathers, as for a tune trial's reporter
    asked = engine.get("session", {}).get("checkpoint_writes", "auto")
    _check_checkpoint_writes(ray, run_info, "gather" if "killed" in case and asked == "auto" else asked)
    assert [p["rank"] for p in run_info["placement"]] == [0, 1, 2]
    assert [p["peer"] for p in run_info["placement"]] == [p["name"] for p in ray.summary["peers"]]
    for worker in run_info["placement"]:  # taken in each worker while training: the process group included
        assert worker["listening"]
        for address in worker["listening"]:
            assert ipaddress.ip_address(address.rsplit(":", 1)[0]).is_loopback, (worker["rank"], address)
    # summary.json carries the same placement and where the start-up time went (every span known, none negative)
    assert ray.summary["ray"]["placement"] == run_info["placement"]
    assert ray.summary["ray"]["session"] == "existing"  # the session's Ray was used as it was
    startup = run_info["startup_s"]
    spans = [k for k in startup if k != "total"]
    assert spans[0] == "launch" and spans[-1] == "to_first_step"
    assert all(startup[k] is not None and startup[k] >= 0 for k in spans)
    assert sum(startup[k] for k in spans) == pytest.approx(startup["total"], abs=0.01)
    if "killed" in case:
        assert run_info["attempts"] == 2  # the group was restarted once and resumed from its last checkpoint
        assert len({p["pid"] for p in run_info["placement"]}) == 3
    # quiet by default: none of Ray Train's per-report and per-checkpoint lines reached the terminal
    time.sleep(1.0)  # Ray streams worker output to the driver with a short delay
    shown = capfd.readouterr()
    for chatter in ("TrainingReport(", "Checkpoint successfully created", "Token authentication is enabled"):
        assert chatter not in shown.out + shown.err, chatter


def _check_checkpoint_writes(ray, run_info: dict, asked: str) -> None:
    """On one node every worker sees the run folder: ``auto`` makes each write its own part; last.pt is then a
    manifest, and the parts left are exactly those last.pt and best.pt refer to (older steps pruned)."""
    import torch

    from kdray.checkpoint import PARTS, manifest_files

    writes = "gather" if asked == "gather" else "per_process"
    assert run_info["checkpoint_writes"] == writes == ray.summary["ray"]["checkpoint_writes"]
    ckpt = ray.out_dir / "checkpoints"
    manifest = torch.load(ckpt / "last.pt", weights_only=True)
    on_disk = {str(p.relative_to(ckpt)) for p in (ckpt / PARTS).rglob("*.pt")}
    if writes == "gather":
        assert (
            "parts" not in manifest
            and set(manifest["peers"]) == {p["name"] for p in ray.summary["peers"]}
            and not on_disk
        )
        return
    assert manifest["peers"] == {} and len(manifest["parts"]) == 3  # one part per worker, no state in last.pt
    assert on_disk == manifest_files(ckpt / "last.pt") | manifest_files(ckpt / "best.pt")


def test_auto_checkpoint_writes_gather_when_the_driver_reads_checkpoints_during_the_run():
    from kdray.engines.ray_engine import checkpoint_writes

    assert checkpoint_writes("auto", []) == "auto"
    assert (
        checkpoint_writes("auto", [print]) == "gather"
    )  # an epoch callback copies last.pt while workers go on
    assert checkpoint_writes("per_process", [print]) == "per_process"  # asked for: kept
    assert checkpoint_writes("gather", []) == "gather"


TEACHER_CASES = {
    # self-distillation from a frozen pre-trained copy on its own worker: progressive targets, KD, discriminator
    "aikd": ({"name": "aikd"}, 1),
    # data-free: a frozen teacher, two students and the shared generator (its gradient split across workers), EMA
    "mad": ({"name": "mad", "nz": 8, "ngf": 4, "student_steps": 2}, 2),
}


@pytest.mark.parametrize("case", list(TEACHER_CASES))
def test_frozen_teacher_methods_match_on_ray(case, tiny_raw, tmp_path, ray_local):
    """A frozen teacher is a peer like any other on the RayEngine: its worker only forwards and publishes."""
    small = {"arch": "resnet8", "arch_kwargs": {"width": 4}}
    teacher = copy.deepcopy(tiny_raw)
    teacher["peers"] = [{"name": "net", **small}]
    teacher["method"] = {"name": "independent"}
    teacher["train"].update({"epochs": 1, "steps_per_epoch": 3, "threads": 1})
    checkpoint = str(kdray.train(teacher, out=tmp_path / "teacher").checkpoint)

    method, students = TEACHER_CASES[case]
    raw = copy.deepcopy(tiny_raw)
    raw["peers"] = [
        {"name": "teacher", **small, "frozen": True, "checkpoint": checkpoint, "checkpoint_peer": "net"}
    ]
    raw["peers"] += [{"name": f"s{i}", **small} for i in range(students)]
    raw["method"] = method
    raw["train"].update({"epochs": 2, "threads": 1, "dtype": "float64", "steps_per_epoch": 4})
    local, ray = _run_pair(raw, tmp_path, exchange="collective")
    assert _compare_states(load_checkpoint(ray.checkpoint), load_checkpoint(local.checkpoint)) <= TOL
    for got, want in zip(
        _peer_metrics(ray.summary["history"]), _peer_metrics(local.summary["history"]), strict=True
    ):
        assert got.keys() == want.keys()
        for k in want:
            assert got[k] == pytest.approx(want[k], rel=1e-7, abs=1e-9), k
    placement = json.loads((ray.out_dir / "ray_run.json").read_text())["placement"]
    assert [p["peer"] for p in placement] == ["teacher"] + [f"s{i}" for i in range(students)]


def test_born_again_generations_run_on_ray_as_on_the_local_engine(tiny_raw, tmp_path, ray_local):
    """Stages on the RayEngine: each generation is a Ray run of its own (generation 2: the frozen generation-1 net
    and the student, one worker each), and the last generation ends where the LocalEngine's does."""
    raw = copy.deepcopy(tiny_raw)
    raw["peers"] = [{"name": "net", "arch": "resnet8", "arch_kwargs": {"width": 4}}]
    raw["method"] = {"name": "independent"}
    raw["generations"] = 2
    raw["train"].update({"epochs": 1, "threads": 1, "dtype": "float64", "steps_per_epoch": 3})
    kdray.train(raw, out=tmp_path / "local")
    on_ray = copy.deepcopy(raw)
    on_ray["engine"] = {"name": "ray", "placement": {"cpus_per_peer": 0.5}, "exchange": "collective"}
    kdray.train(on_ray, out=tmp_path / "ray")
    last = ("stages", "gen2", "checkpoints", "last.pt")
    got, want = (
        load_checkpoint(tmp_path.joinpath("ray", *last)),
        load_checkpoint(tmp_path.joinpath("local", *last)),
    )
    assert _compare_states(got, want) <= TOL
    placement = json.loads((tmp_path / "ray" / "stages" / "gen2" / "ray_run.json").read_text())["placement"]
    assert [p["peer"] for p in placement] == ["gen1_net", "net"]


def test_infeasible_placement_fails_fast_and_names_the_cluster(tiny_raw, tmp_path, ray_local):
    from kdray.errors import PlacementError

    raw = _population(tiny_raw, "dml")
    raw["engine"] = {
        "name": "ray",
        "placement": {"strategy": "strict_spread", "timeout_s": 2, "cpus_per_peer": 0.5},
    }
    start = time.monotonic()
    with pytest.raises(PlacementError) as err:
        kdray.train(raw, out=tmp_path / "run")
    assert time.monotonic() - start < 15
    message = str(err.value)
    assert "strict_spread" in message and "3 different nodes" in message and "1 node(s)" in message
    assert "\n" not in message


def _descendants(pid: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = set(), [pid]
    while todo:
        p = todo.pop()
        out.add(p)
        todo += children.get(p, [])
    return out


def test_local_ray_listens_on_loopback_only(ray_local):
    """Every socket the test session's Ray processes listen on is bound to 127.0.0.0/8 (``ss -tlnp``)."""
    mine = _descendants(os.getpid())
    listening = []
    for line in subprocess.run(
        ["ss", "-Htlnp"], capture_output=True, text=True, check=True
    ).stdout.splitlines():
        pids = {int(p) for p in re.findall(r"pid=(\d+)", line)}
        if pids & mine:
            listening.append(line.split()[3])
    assert len(listening) >= 3, (
        "expected the local Ray's servers (GCS, raylet, dashboard, ...) to be listening"
    )
    for address in listening:
        host = address.rsplit(":", 1)[0].strip("[]").removeprefix("::ffff:")
        assert ipaddress.ip_address(host).is_loopback, address


def test_a_stop_ends_a_fault_tolerant_ray_run_without_a_restart(tiny_raw, tmp_path, ray_local, monkeypatch):
    """Ray Train restarts the worker group on any exception a worker raises. A stop request (Ctrl-C, SIGTERM) is
    not a failure: with ``max_failures: -1`` a retried stop would train on in bursts and never end."""
    import ray

    from kdray.engines import ray_board
    from kdray.loop import Stopped

    raw = _population(tiny_raw, "dml")
    raw["train"]["epochs"] = 3
    raw["engine"] = {
        "name": "ray",
        "placement": {"cpus_per_peer": 0.5},
        "exchange": "collective",
        "fault_tolerance": {"max_failures": -1},
    }
    original = ray_board.create_board

    def create_board(*args, **kwargs):  # the user has asked to stop before the workers' first check
        # (not on the driver's first EpochDone: tiny epochs can all end before the driver's next poll)
        board = original(*args, **kwargs)
        ray.get(board.request_stop.remote())
        return board

    monkeypatch.setattr(ray_board, "create_board", create_board)
    with pytest.raises(Stopped, match="safe point"):
        kdray.train(raw, out=tmp_path / "run")
    assert json.loads((tmp_path / "run" / "ray_run.json").read_text())["attempts"] == 1  # no restart
    stopped = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")
    assert stopped["epoch"] < 3  # it stopped; it did not train on to the end


def test_a_dead_progress_board_is_one_line_naming_its_node_and_the_resume(ray_local, tmp_path):
    """The driver follows the workers through the board actor; if it dies (its node lost), the run ends with one
    KdrayError line naming the board's node and the resume command, not Ray's traceback. The board runs on the
    head (create_board), which ray_run.json records as ``board_node_ip``; the multi-node tests check it there."""
    import ray

    from kdray.engines.ray_board import create_board
    from kdray.engines.ray_engine import drain
    from kdray.errors import KdrayError

    board = create_board(ray.get_runtime_context().namespace)
    ip = ray.get(board.node_ip.remote())
    head = next(n for n in ray.nodes() if n["Alive"] and "node:__internal_head__" in n["Resources"])
    assert ip == head["NodeManagerAddress"]
    board.post.remote("an event")
    assert drain(board, out_dir=tmp_path, node_ip=ip) == ["an event"]
    ray.kill(board)
    with pytest.raises(KdrayError) as info:
        drain(board, out_dir=tmp_path, node_ip=ip)
    message = str(info.value)
    assert "\n" not in message and f"progress board on Ray node {ip} died mid-run" in message, message
    assert f"`kdray train --resume {tmp_path}`" in message, message


def test_the_live_bar_gives_the_exchange_time_and_its_share_of_the_step():
    from kdray.engines.ray_board import Live
    from kdray.engines.ray_engine import exchange_text

    ranks = [Live(0, 0, 5, 10, {}, 10.0, 200.0), Live(1, 0, 5, 10, {}, 20.0, 100.0)]
    assert exchange_text(ranks) == "exchange 15.0 ms/step (10% of the step)"  # 15 of a mean 150 ms step
    assert exchange_text([Live(0, 0, 5, 10, {}, 12.0)]) == "exchange 12.0 ms/step"  # no step time yet
    assert exchange_text([Live(0, 0, 0, 10, {}, None)]) == ""  # no exchange (a local-only method)


def test_a_worker_kdray_error_reaches_the_user_as_itself():
    """A KdrayError raised in a worker (a diverged loss, a bad checkpoint) comes out of RayEngine as that error,
    one line, not as Ray's wrapper with a traceback per worker."""
    from ray.train import ControllerError, WorkerGroupError

    from kdray.engines.ray_engine import user_error
    from kdray.errors import DivergedError

    diverged = DivergedError("training diverged in epoch 1: peer1/loss_kl = nan (1 non-finite metric(s))")
    assert (
        user_error(WorkerGroupError("worker 1 failed", {1: RuntimeError("other"), 2: diverged})) is diverged
    )
    wrapped = RuntimeError("task failed")
    wrapped.cause = diverged  # how Ray's task errors carry the original exception
    assert user_error(ControllerError(wrapped)) is diverged
    plain = WorkerGroupError("worker 0 failed", {0: ValueError("a bug")})
    assert user_error(plain) is plain


def test_an_unexpected_worker_error_names_its_rank_and_peer_in_full(tiny_raw):
    from ray.train import WorkerGroupError

    from kdray.config import load_config
    from kdray.engines.ray_engine import describe_failure

    cfg = load_config(tiny_raw)
    trace = (
        'Traceback (most recent call last):\n  File "step.py", line 1\nZeroDivisionError: division by zero'
    )
    text = describe_failure(WorkerGroupError("failed", {1: RuntimeError(trace)}), cfg)
    assert text.startswith("worker rank 1 (peer peer1) failed: RuntimeError: Traceback")
    assert "ZeroDivisionError: division by zero" in text  # the worker's traceback, whole


@pytest.mark.parametrize(
    ("exchange", "workers"),
    [("collective", (2, 2)), pytest.param("actor", (2, 2), marks=pytest.mark.slow), ("collective", (2, 1))],
    ids=["collective-2x2", "actor-2x2", "collective-2+1"],
)
def test_data_parallel_peers_on_ray_match_one_worker_per_peer_across_a_killed_worker(
    exchange, workers, tiny_raw, tmp_path, ray_local
):
    """K = 2 peers x M = 2 workers on the RayEngine (synced BatchNorm; the collective exchange per shard group, or
    the actor exchange keyed by worker), or peers of 2 and 1 workers (each round regrouped around the peers' first
    workers), against the LocalEngine's K x 1 at the same global batch; the second worker of the first peer is
    killed from outside after epoch 1 and the group resumes from its last checkpoint. Equal to 1e-9 in float64."""
    raw = _population(tiny_raw, "dml")
    raw["peers"] = raw["peers"][:2]
    raw["train"]["checkpoint_every_steps"] = 2
    local = kdray.train(raw, out=tmp_path / "local")
    ray_raw = copy.deepcopy(raw)
    ray_raw["peers"][0]["workers"], ray_raw["peers"][1]["workers"] = workers
    ray_raw["engine"] = {
        "name": "ray", "placement": {"cpus_per_peer": 0.5}, "fault_tolerance": {"max_failures": 1},
        "exchange": exchange,
    }  # fmt: skip
    ray = kdray.train(
        ray_raw, out=tmp_path / "ray", callbacks=[_kill_rank_at_epoch_end(tmp_path / "ray", rank=1)]
    )
    assert _compare_states(load_checkpoint(ray.checkpoint), load_checkpoint(local.checkpoint)) <= TOL
    for got, want in zip(
        _peer_metrics(ray.summary["history"]), _peer_metrics(local.summary["history"]), strict=True
    ):
        for k in want:
            assert got[k] == pytest.approx(want[k], rel=1e-7, abs=1e-9), k
    assert ray.summary["test"]["peers"] == pytest.approx(local.summary["test"]["peers"], abs=1e-12)
    run_info = json.loads((ray.out_dir / "ray_run.json").read_text())
    assert run_info["attempts"] == 2  # restarted once, resumed from the last checkpoint
    names = [p["name"] for p in ray.summary["peers"]]
    assert [(w["rank"], w["peer"], w["shard"]) for w in run_info["placement"]] == [
        (rank, names[peer], f"{shard + 1}/{workers[peer]}")
        for rank, (peer, shard) in enumerate((p, m) for p, count in enumerate(workers) for m in range(count))
    ]
    assert ray.summary["exchange"]["bytes_per_step"] > 0
    if workers[0] != workers[1]:  # peer 0's second worker's rows went through its first worker, both ways
        assert ray.summary["exchange"]["group_bytes_per_step"] > 0


def test_the_public_ray_train_path_matches_the_local_engine(tiny_raw, tmp_path, ray_local, monkeypatch):
    """With KDRAY_RAY_PUBLIC=1 (what any untested Ray release gets) the RayEngine runs on Ray Train's public
    TorchTrainer with kdray's torch backend config: the same parameters as the LocalEngine, on loopback only."""
    from kdray.engines import ray_private

    monkeypatch.setenv(ray_private.PUBLIC_ONLY_ENV, "1")
    raw = _population(tiny_raw, "dml")
    raw["peers"] = raw["peers"][:2]
    raw["train"]["epochs"] = 1
    local, ray = _run_pair(raw, tmp_path, exchange="collective")
    assert ray.summary["ray"]["trainer"] == "TorchTrainer"
    assert _compare_states(load_checkpoint(ray.checkpoint), load_checkpoint(local.checkpoint)) <= TOL
    for worker in json.loads((ray.out_dir / "ray_run.json").read_text())["placement"]:
        for address in worker["listening"]:
            assert ipaddress.ip_address(address.rsplit(":", 1)[0]).is_loopback, (worker["rank"], address)


def test_a_timm_peer_trains_on_ray_as_on_the_local_engine(tiny_raw, tmp_path, ray_local):
    """A DML pair of a timm network and a CIFAR ResNet-8, one peer per Ray Train worker: the same parameters as the
    LocalEngine's after two steps (float64, one thread per process), and they moved."""
    pytest.importorskip("timm")
    from tests.models.test_timm_models import timm_population

    raw = timm_population(tiny_raw)
    local, ray = _run_pair(raw, tmp_path, exchange="collective")
    ray_ckpt, local_ckpt = load_checkpoint(ray.checkpoint), load_checkpoint(local.checkpoint)
    assert _compare_states(ray_ckpt, local_ckpt) <= TOL
    assert ray.summary["engine"] == "ray" and ray.summary["peers"][0]["arch"] == "timm:test_efficientnet"
    history = ray.summary["history"][-1]
    assert 0 < history["effnet/loss_ce"] < float("inf")


def test_a_k_by_one_checkpoint_resumes_exactly_on_data_parallel_peers(tiny_raw, tmp_path, ray_local):
    """A checkpoint holds nothing of M: the LocalEngine's K x 1 checkpoint after epoch 1 resumes on the RayEngine
    with 2 workers per peer (synced BatchNorm) and ends equal to the LocalEngine's uninterrupted run (float64,
    1e-9). PS-KD inside DML: epoch 2 reads the per-sample tables of epoch 1, restored onto both workers of a peer.
    (Where another M would not continue exactly, the resume is refused: ``test_data_parallel.py``.)"""
    raw = _population(tiny_raw, "pskd")
    raw["peers"] = raw["peers"][:2]
    raw["method"]["weights"] = {"kl": 1.0}
    raw["train"]["schedule"] = {"name": "constant"}  # a 1-epoch run's schedule would span 1 epoch only
    placement = {"cpus_per_peer": 0.5, "workers_per_peer": 2}
    local, ray = _run_pair(raw, tmp_path, resume_epoch=1, exchange="collective", placement=placement)
    assert ray.summary["engine"] == "ray" and ray.summary["epochs"] == 2
    assert _compare_states(load_checkpoint(ray.checkpoint), load_checkpoint(local.checkpoint)) <= TOL
    run_info = json.loads((ray.out_dir / "ray_run.json").read_text())
    assert [w["shard"] for w in run_info["placement"]] == ["1/2", "2/2", "1/2", "2/2"]
