"""K peers x M workers equals K peers x 1 worker at the same global batch (the spec of data-parallel peers).

Each case runs the RayEngine worker's wiring without Ray: K x M gloo processes (forked), each building the process
groups of :mod:`kdray.engines.data_parallel`, its peer's shard of the population, the collective exchange on its
shard group, synced BatchNorm over its peer group, and the same StepRunner as every engine; the reference is the
whole population in one process (K x 1). After the steps, every peer's network, private state (AFD's
discriminators and transfer layers) and BatchNorm statistics must agree.

The bound, float64: the two sides differ only in summation order (a global batch's mean computed as the mean of
two shard means; BatchNorm statistics as sums of per-shard sums, and E[x^2] - E[x]^2 against torch's kernel), each
~1e-16 relative. The tiny networks (parameters O(1)) amplify such differences by far less than 1e4 over four SGD
steps at lr 0.1 (measured: see the test's assertion message), so 1e-9 has orders of magnitude of margin on any x86
CPU, while a wrong shard, a missing gradient average (a 2x gradient) or unsynced statistics move parameters by
1e-3 or more in the first step.

Data-free populations (DFAD, MAD) add one amplifier: the generator's Adam (lr 1e-3, eps 1e-8). A convolution's
bias followed by BatchNorm has an exact gradient of 0 (BatchNorm removes any per-channel constant), so what each side
computes for it is rounding noise |g| <~ 1e-15, which Adam turns into a step of up to lr |g| / eps ~ 1e-10, different
on the two sides. Four generator steps: <~ 4e-10 < 1e-9 (measured: 7e-12 for DFAD, 2e-11 for MAD, on exactly those
biases and the running means after them); the other parameters stay at the 1e-15 of the cases without a generator.
"""

from __future__ import annotations

import copy
import os
import tempfile
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from kdray.config import load_config
from kdray.metrics import MetricSums
from kdray.population import Population
from kdray.step import StepRunner

TOL = 1e-9
STEPS = 4


def _raw(tiny_raw: dict, method: str, peers: int, workers: int, sync_bn: bool = True) -> dict:
    raw = copy.deepcopy(tiny_raw)
    small = {"arch": "resnet8", "arch_kwargs": {"width": 4}}
    raw["peers"] = [copy.deepcopy(small) for _ in range(peers)]
    raw["method"] = {"name": method}
    if method in ("dfad", "mad"):  # a frozen teacher (peer 0, the fixture's checkpoint) and K - 1 students
        raw["peers"][0].update(frozen=True, checkpoint_peer="net")
        raw["method"].update(nz=8, ngf=4, student_steps=2)
    if method == "mad":  # labels drawn with the noise and a class-embedding (the teacher's label term)
        raw["method"]["conditional"] = True
    if method == "afd":  # a heterogeneous ring: the maps differ in channels, transfer layers bridge them
        raw["peers"][1] = {"arch": "resnet14", "arch_kwargs": {"width": 8}}
        raw["method"]["transfer"] = "auto"
    raw["train"].update({"epochs": 1, "threads": 1, "dtype": "float64", "steps_per_epoch": STEPS})
    raw["engine"] = {"name": "ray", "placement": {"workers_per_peer": workers, "sync_bn": sync_bn}}
    return raw


def _state(pop: Population) -> dict[str, torch.Tensor]:
    """Every local peer's network, private state and per-sample buffers, and the shared module (a generator, MAD's
    EMA copy: one replica per worker, every one equal to the one replica of K x 1)."""
    out = {}
    if pop.shared is not None:
        out.update({f"shared.{k}": v.detach().clone() for k, v in pop.shared.module.state_dict().items()})
    for p in pop.peers:
        for part, module in (("net", p.net.model), ("state", p.state)):
            if module is not None:
                out.update(
                    {f"{p.name}.{part}.{k}": v.detach().clone() for k, v in module.state_dict().items()}
                )
        out.update({f"{p.name}.buffers.{k}": v.clone() for k, v in p.buffers.items()})
    return out


def _train(pop: Population, runner: StepRunner, epochs: int) -> MetricSums:
    """Train; the steps' metrics, as sums and counts (a worker's share of the population's)."""
    metrics = MetricSums()
    for epoch in range(epochs):
        for i, batch in enumerate(pop.batches(epoch)):
            metrics.merge(runner.step(batch, epoch, epoch * pop.steps_per_epoch + i))
    return metrics


def _reference(raw: dict) -> tuple[dict[str, torch.Tensor], Population]:
    one = copy.deepcopy(raw)
    one["engine"] = {"name": "local"}
    pop = Population(load_config(one))
    _train(pop, StepRunner(pop), raw["train"]["epochs"])
    return _state(pop), pop


def _worker(rank: int, world: int, init_file: str, raw: dict, results) -> None:
    """One of the K x M workers, built as the RayEngine builds its workers."""
    from kdray.engines.data_parallel import build_worker
    from kdray.plots import generator_preview

    # a collective that one rank never joins fails within a minute instead of hanging the suite
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world, timeout=timedelta(seconds=60)
    )
    torch.set_num_threads(1)
    cfg = load_config(raw)
    worker = build_worker(cfg, rank, torch.device("cpu"))
    pop, groups = worker.pop, worker.groups
    metrics = _train(pop, worker.runner, cfg.train.epochs)
    results[rank] = (groups.peer, groups.shard, _shard_size(pop), _state(pop))
    results[("metrics", rank)] = metrics.state()
    results[("stats", rank)] = worker.exchange.stats()
    # the loop draws a generator's preview on rank 0 alone: its BatchNorm must not wait for rank 1
    if rank == 0:
        results["preview"] = generator_preview(pop, 0)
    dist.destroy_process_group()


def _shard_size(pop: Population) -> int:
    """The samples one step of this worker trains on: its shard of a data set's batch, or of a generator's."""
    batch = next(iter(pop.batches(0)))
    if batch is not None:
        return len(batch.y)
    rng = torch.Generator().manual_seed(0)
    return len(pop.method.draw(rng, pop.shared.module)[0])


def _k_by_m(raw: dict) -> tuple[dict[int, tuple], dict]:
    """Every rank's (peer, shard, samples per step, state), and the extras: rank 0's generator preview
    (``preview``) and every rank's exchange figures (``stats``)."""
    world = load_config(raw).num_workers
    with tempfile.TemporaryDirectory() as tmp:
        manager = mp.Manager()
        results = manager.dict()
        # fork: the children inherit the imported modules; every process runs one torch thread
        mp.start_processes(
            _worker, args=(world, os.path.join(tmp, "pg"), raw, results), nprocs=world, join=True,
            start_method="fork",
        )  # fmt: skip
        got = dict(results)
        manager.shutdown()
    metrics = MetricSums()  # every rank's shares merged, as the loop merges them
    for r in range(world):
        metrics.merge(MetricSums.from_state(got.pop(("metrics", r))))
    extras = {
        "preview": got.pop("preview"), "stats": {r: got.pop(("stats", r)) for r in range(world)},
        "metrics": metrics.means(),
    }  # fmt: skip
    return got, extras


def _worst(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> float:
    mine = {k: v for k, v in want.items() if k.split(".")[0] in {k2.split(".")[0] for k2 in got}}
    assert set(got) == set(mine)
    worst = 0.0
    for k, v in mine.items():
        if v.is_floating_point():
            worst = max(worst, (got[k] - v).abs().max().item())
        else:
            assert torch.equal(got[k], v), k
    return worst


CASES = {
    "dml-2x2": ("dml", 2, 2),
    "afd-ring3-hetero-3x2": ("afd", 3, 2),
    "kd-teacher-frozen-2x2": ("kd", 2, 2),
    # per-sample memory: two epochs, so that the second reads what the first wrote (rows all-gathered per peer)
    "pskd-in-dml-2x2": ("pskd", 2, 2),
    # a shared generator: its gradient summed over the peers of a shard, averaged over the shards; its
    # BatchNorm over the global batch
    "acn-2x2": ("acn", 2, 2),
    # data-free: every worker draws the global batch's noise (and labels) and generates its shard of the images,
    # the generator's BatchNorm summed over the peer's workers; the generator's gradient summed over the peers of
    # a shard and averaged over the shards; a frozen teacher and two students, each on two workers
    "dfad-teacher-2-students-3x2": ("dfad", 3, 2),
    # ... and MAD's EMA generator (stepped identically on every worker) and class-conditional draws
    "mad-conditional-2x2": ("mad", 2, 2),
}


@pytest.fixture(scope="module")
def teacher_checkpoint(tmp_path_factory) -> str:
    """A ResNet-8 trained for 2 steps alone: the frozen teacher of the KD case."""
    import kdray
    from tests.conftest import TINY

    raw = copy.deepcopy(TINY)
    raw["peers"] = [{"name": "net", "arch": "resnet8", "arch_kwargs": {"width": 4}}]
    raw["method"] = {"name": "independent"}
    raw["train"].update({"epochs": 1, "steps_per_epoch": 2, "threads": 1, "dtype": "float64"})
    raw["tracking"] = {"enabled": False}
    return str(kdray.train(raw, out=tmp_path_factory.mktemp("teacher") / "run").checkpoint)


@pytest.mark.parametrize("case", list(CASES))
def test_k_peers_by_m_workers_equal_k_by_one(case, tiny_raw, request):
    method, peers, workers = CASES[case]
    raw = _raw(tiny_raw, method, peers, workers)
    if method in ("kd", "dfad", "mad"):  # a frozen teacher, on two workers like every peer (it only forwards)
        raw["peers"][0].update(
            frozen=True, checkpoint=request.getfixturevalue("teacher_checkpoint"), checkpoint_peer="net"
        )
    if method == "pskd":  # PS-KD peers inside DML: memories and an exchange
        raw["method"]["weights"] = {"kl": 1.0}
        raw["train"]["epochs"] = 2
    torch.set_num_threads(1)
    want, pop_ref = _reference(raw)
    got, extras = _k_by_m(raw)
    if method in ("dfad", "mad"):  # rank 0's preview: the K x 1 generator's, on 64 samples of its own
        from kdray.plots import generator_preview

        assert (extras["preview"] - generator_preview(pop_ref, 0)).abs().max() <= TOL
    else:
        assert extras["preview"] is None
    assert len(got) == peers * workers
    global_batch = raw["data"]["batch_size"]
    for rank, (peer, shard, batch, state) in sorted(got.items()):
        assert rank == peer * workers + shard  # ranks laid out peer by peer
        # each worker trains on its shard of the global batch (a generator's too)
        assert batch == global_batch // workers
        worst = _worst(state, want)
        assert worst <= TOL, f"rank {rank} (peer {peer}, shard {shard}): {worst:.3g}"
    # the workers of one peer hold the same network, statistics included (synced BatchNorm, averaged gradients)
    moved = max((state[k] - want[k]).abs().max().item() for _, _, _, state in got.values() for k in state)
    print(f"{case}: largest difference from K x 1 after {STEPS} steps: {moved:.3g}")


# peers of unequal numbers of workers: each peer's rows gathered to its first worker, exchanged between the first
# workers, scattered back (kdray/exchange/regroup.py); the stale exchange ships weights between first workers
UNEQUAL = {
    "dml-2+1": ("dml", [2, 1], "collective"),
    # nothing exchanged (each peer alone): no gather, no scatter
    "independent-2+1": ("independent", [2, 1], "collective"),
    # a ring (point to point between first workers) of three peers of two architectures, feature maps included
    "afd-ring3-hetero-1+2+4": ("afd", [1, 2, 4], "collective"),
    # per-sample memories all-gathered within a 4-worker peer, beside a peer of one worker
    "pskd-in-dml-4+1": ("pskd", [4, 1], "collective"),
    "kd-teacher-1-student-2": ("kd", [1, 2], "collective"),
    "dml-1+2-stale": ("dml", [1, 2], {"name": "stale", "every": 2, "burn_in": 1}),
    # a shared generator: each peer's gradient the mean over its workers, summed over the peers' first workers,
    # broadcast within each peer; its BatchNorm over the global batch within a peer of several workers
    "acn-2+1": ("acn", [2, 1], "collective"),
    # data-free: a one-worker teacher, students on 2 and 1 workers; MAD's EMA generator and labels
    "dfad-teacher-1-students-2+1": ("dfad", [1, 2, 1], "collective"),
    "mad-conditional-1+2": ("mad", [1, 2], "collective"),
}


@pytest.mark.parametrize("case", list(UNEQUAL))
def test_peers_of_unequal_workers_equal_k_by_one(case, tiny_raw, request):
    """K peers of M_0, M_1, ... workers equal K x 1 (float64, the bound of the equal-M cases: the regrouping only
    moves detached rows, so the maths differs from K x 1 by summation order alone). Bytes: what crosses between
    peers is exactly K x 1's, on the first workers; within a peer, the first worker receives the other workers'
    rows and each other worker its block of the sources' rows: counted exactly from the layouts."""
    from kdray.exchange import SignalLayout

    method, workers, exchange = UNEQUAL[case]
    raw = _raw(tiny_raw, method, len(workers), 1)
    raw["engine"]["exchange"] = exchange
    if method in ("kd", "dfad", "mad"):
        raw["peers"][0].update(
            frozen=True, checkpoint=request.getfixturevalue("teacher_checkpoint"), checkpoint_peer="net"
        )
    if method == "pskd":
        raw["method"]["weights"] = {"kl": 1.0}
        raw["train"]["epochs"] = 2
    one = copy.deepcopy(raw)  # K x 1 on the same wiring: the bytes between peers to compare with
    for p, m in zip(raw["peers"], workers):
        p["workers"] = m
    torch.set_num_threads(1)
    want_one, extras_one = _k_by_m(one)
    got, extras = _k_by_m(raw)
    if exchange == "collective":
        want, _ = _reference(one)
    else:  # the local engine has no stale exchange: K x 1 on the RayEngine's wiring is the reference
        want = {}
        for _, _, _, state in want_one.values():
            want.update(state)
    assert len(got) == sum(workers)
    batch = raw["data"]["batch_size"]
    if method in ("dfad", "mad"):  # rank 0's preview: the K x 1 generator's
        assert (extras["preview"] - extras_one["preview"]).abs().max() <= TOL
    # the population's metrics merged over every worker: K x 1's (the shared objective counted once per peer)
    shared = [k for k in extras_one["metrics"] if k.startswith("shared/")]
    assert bool(shared) == (method in ("acn", "dfad", "mad"))
    for key in shared:
        assert extras["metrics"][key] == pytest.approx(extras_one["metrics"][key], rel=1e-9, abs=1e-12), key
    worst = 0.0
    for rank, (peer, shard, rows, state) in sorted(got.items()):
        assert rows == batch // workers[peer]
        worst = max(worst, _worst(state, want))
        stats, alone = extras["stats"][rank], extras_one["stats"][peer]
        if shard == 0:  # what crossed between peers: exactly K x 1's
            assert stats["bytes_per_step"] == alone["bytes_per_step"], (rank, stats, alone)
        else:
            assert stats["bytes_per_step"] == 0, (rank, stats)
        if method == "independent":  # nothing between peers, nothing within them
            assert stats["bytes_per_step"] == stats["group_bytes_per_step"] == 0, (rank, stats)
        if exchange != "collective" or workers[peer] == 1 or method in ("acn", "dfad", "mad", "independent"):
            continue  # (a generator's gradient moves within the peers too: counted, not derived here)
        # within the peer: the first worker gets M - 1 shards of its own logits (and, AFD, feature maps); every
        # other worker one block of each source's, per round; DML's and KD's one round a step, AFD's two
        logits = SignalLayout.of({"logits": torch.zeros(rows, 4, dtype=torch.float64)}).nbytes
        if method == "afd":
            assert stats["group_bytes_per_step"] > (workers[peer] - 1 if shard == 0 else 1) * logits
            continue
        sources = len(raw["peers"]) - 1 if method != "kd" else 1
        if method == "kd" and peer == 0:  # the frozen teacher learns from nobody; it only sends
            expected = (workers[peer] - 1) * logits if shard == 0 else SignalLayout.of({}).nbytes
        else:
            names = {f"{s}/logits": torch.zeros(rows, 4, dtype=torch.float64) for s in range(sources)}
            expected = (workers[peer] - 1) * logits if shard == 0 else SignalLayout.of(names).nbytes
        assert stats["group_bytes_per_step"] == expected, (rank, stats, expected)
    assert worst <= TOL, worst
    print(f"{case}: largest difference from K x 1 after {STEPS} steps: {worst:.3g}")


def test_ranks_laid_out_shard_by_shard_train_the_same(tiny_raw):
    """``engine.placement.group_by: shard`` numbers the ranks shard by shard (shard m of every peer on one node):
    the process groups follow the layout, so 2 x 2 still equals 2 x 1, the collective exchange's and the stale
    one's (its weight copies handed on within each peer group, as in the test below) alike."""
    torch.set_num_threads(1)
    for exchange in ("collective", {"name": "stale", "every": 2, "burn_in": 1}):
        raw = _raw(tiny_raw, "dml", 2, 2)
        raw["engine"]["placement"]["group_by"] = "shard"
        raw["engine"]["exchange"] = exchange
        one = copy.deepcopy(raw)
        one["engine"]["placement"]["workers_per_peer"] = 1
        want, _ = _k_by_m(one)
        got, _ = _k_by_m(raw)
        assert [(r, peer, shard) for r, (peer, shard, _, _) in sorted(got.items())] == [
            (0, 0, 0), (1, 1, 0), (2, 0, 1), (3, 1, 1),
        ]  # fmt: skip
        for rank, (peer, _, _, state) in got.items():
            assert _worst(state, want[peer][3]) <= TOL, (exchange, rank)


def test_without_sync_bn_the_workers_normalise_their_shards_alone(tiny_raw):
    """The control that shows what the test above measures: with ``sync_bn: false`` the BatchNorm statistics of
    a shard differ from the global batch's, and the networks drift from K x 1 far past the bound."""
    raw = _raw(tiny_raw, "dml", 2, 2, sync_bn=False)
    torch.set_num_threads(1)
    want, _ = _reference(raw)
    got, _ = _k_by_m(raw)
    assert min(_worst(state, want) for _, _, _, state in got.values()) > 1e-4


def test_a_data_parallel_peer_refuses_what_it_cannot_shard(tiny_raw):
    from kdray.errors import ConfigError

    raw = _raw(tiny_raw, "dml", 2, 2)
    with pytest.raises(ConfigError, match="data.batch_size"):
        load_config(raw, ["data.batch_size=15"])
    load_config(raw, ["peers.0.workers=1"])  # unequal workers: regrouped (test above)
    load_config(raw, ["peers.0.workers=1", "method.name=acn"])  # ... a shared generator too
    with pytest.raises(
        ConfigError,
        match=r"^config key 'engine.placement.workers_per_peer' = 2: 1, as peer 'peer0' has .*'acn' .*stale",
    ):
        load_config(raw, ["peers.0.workers=1", "method.name=acn", "engine.exchange=stale"])
    load_config(raw, ["engine.exchange=stale"])  # one copy of the weights per peer group (test below)
    with pytest.raises(
        ConfigError, match="^config key 'engine.placement.workers_per_peer' = 2: 1 for .*class-pair"
    ):
        load_config(raw, ["method.name=cskd", "method.weights={}"])
    mad = _raw(tiny_raw, "mad", 2, 2)
    mad["peers"][0]["checkpoint"] = "teacher.pt"
    load_config(mad, ["data.batch_size=8", "method.ema_batch=half"])  # 4 of each generator: 2 per worker
    with pytest.raises(ConfigError, match=r"data.batch_size.*6.*ema_batch: half"):
        load_config(mad, ["data.batch_size=6", "method.ema_batch=half"])  # 3 of each generator
    local = copy.deepcopy(raw)
    local["engine"] = {"name": "local"}
    local["peers"][0]["workers"] = 2
    with pytest.raises(ConfigError, match=r"peers\.0\.workers"):
        load_config(local)


def test_born_again_generations_k_by_m_equal_k_by_one(tiny_raw, tmp_path):
    """Born-again networks (``generations: 2``, one network, the paper's setting): generation 1 trains alone;
    generation 2 distils it, frozen and loaded through ``from_stage`` from generation 1's final weights, into a
    fresh network of initial weights of its own. Every network on two workers in both generations (1 x 2, then
    2 x 2); each side's generation 2 learns from its own generation 1, and every worker of both generations
    equals K x 1's."""
    from kdray.checkpoint import save_checkpoint
    from kdray.stages import _resolved, stage_configs

    raw = _raw(tiny_raw, "independent", 1, 2)
    raw["peers"][0]["name"] = "net"
    raw["generations"] = {"count": 2}
    stages = stage_configs(raw)
    assert [name for name, _ in stages] == ["gen1", "gen2"]
    torch.set_num_threads(1)
    worst = {}
    for name, cfg in stages:
        finals = {}  # side -> the trained network's state (the next generation's teacher)
        for side in ("k_by_1", "k_by_m"):
            stage = _resolved(cfg, tmp_path / side, "sqlite:///unused.db").to_dict()
            student = len(stage["peers"]) - 1  # gen1: the network; gen2: teacher first, then the student
            if side == "k_by_1":
                want, _ = _reference(stage)
                finals[side] = want
                continue
            got, _ = _k_by_m(stage)
            assert len(got) == 2 * len(stage["peers"])
            worst[name] = max(_worst(state, want) for _, _, _, state in got.values())
            finals[side] = next(
                state for peer, shard, _, state in got.values() if (peer, shard) == (student, 0)
            )
        for side, state in finals.items():  # where from_stage finds them: stages/<name>/checkpoints/last.pt
            peer = cfg.peers[-1].name
            net = {k.split(".", 2)[2]: v for k, v in state.items() if k.startswith(f"{peer}.net.")}
            payload = {"config": cfg.to_dict(), "epoch": 1, "step": STEPS, "rng": torch.get_rng_state(),
                       "peers": {peer: {"net": net}}}  # fmt: skip
            save_checkpoint(tmp_path / side / "stages" / name / "checkpoints" / "last.pt", payload)
    assert max(worst.values()) <= TOL, worst
    print(f"born-again 1 x 2, then 2 x 2: largest difference from K x 1 per generation: {worst}")


def test_stale_exchange_ships_one_copy_per_peer_group(tiny_raw):
    """Codistillation with stale weights (shipped at steps 0 and 2 of 4, burn-in 1 step) on 2 x 2 equals the same
    on 2 x 1 (the RayEngine's wiring with one worker per peer: the local engine has no stale exchange). One copy
    of a peer's weights crosses to the other peer per shipment, to its first worker, which hands it on within its
    group; the copies run on each worker's shard with the peer's synced BatchNorm."""
    raw = _raw(tiny_raw, "dml", 2, 2)
    raw["engine"]["exchange"] = {"name": "stale", "every": 2, "burn_in": 1}
    one = copy.deepcopy(raw)
    one["engine"]["placement"]["workers_per_peer"] = 1
    torch.set_num_threads(1)
    want, want_extras = _k_by_m(one)
    got, extras = _k_by_m(raw)
    worst = 0.0
    for peer, _, _, state in got.values():
        worst = max(worst, _worst(state, want[peer][3]))
    assert worst <= TOL, worst
    # bytes: the first worker of each peer receives what one worker per peer receives; the second, nothing across
    # peer groups, and the same bytes handed on within its group
    for rank, (peer, shard, _, _) in got.items():
        stats, alone = extras["stats"][rank], want_extras["stats"][peer]
        assert alone["bytes_per_step"] > 0
        if shard == 0:
            assert stats["bytes_per_step"] == alone["bytes_per_step"]
            assert stats["group_bytes_per_step"] == 0
        else:
            assert stats["bytes_per_step"] == 0
            assert stats["group_bytes_per_step"] == alone["bytes_per_step"]
    print(f"stale 2 x 2: largest difference from 2 x 1 after {STEPS} steps: {worst:.3g}")


def test_resuming_on_another_number_of_workers_is_refused_where_it_would_not_be_exact(tiny_raw, tmp_path):
    """A checkpoint holds nothing of M, so a run may resume on another number of workers per peer when both
    layouts compute K x 1's maths (``sync_bn`` on; ``test_ray_engine.py`` resumes a K x 1 checkpoint on 2 x 2 and
    ends equal). Where it would not continue exactly, one line names the key, the checkpoint's M and the
    config's, before anything starts."""
    import kdray
    from kdray.errors import ConfigError
    from kdray.run import check_resume_workers

    raw = copy.deepcopy(tiny_raw)
    raw["train"].update(epochs=1, steps_per_epoch=2)
    kdray.train(raw, out=tmp_path / "run")  # K x 1 on the local engine
    ray = ["engine.name=ray"]
    with pytest.raises(ConfigError) as err:
        kdray.train(
            None, overrides=[*ray, "engine.placement.workers_per_peer=2", "engine.placement.sync_bn=false",
                             "train.epochs=2"], resume=tmp_path / "run",
        )  # fmt: skip
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith("config key 'engine.placement.workers_per_peer' = 2: ")
    assert "on 1 worker(s), the config asks for 2" in message and "sync_bn: false" in message
    assert message.endswith("resume with engine.placement.workers_per_peer=1")
    with pytest.raises(
        ConfigError, match=r"^config key 'peers\.0\.workers' = 2: .*1 worker\(s\).*stale exchange"
    ):
        kdray.train(
            None, overrides=[*ray, "peers.0.workers=2", "peers.1.workers=2", "engine.exchange=stale"],
            resume=tmp_path / "run",
        )  # fmt: skip

    def saved(workers: int, sync_bn: bool, exchange: str = "collective") -> dict:
        then = _raw(tiny_raw, "dml", 2, workers, sync_bn=sync_bn)
        then["engine"]["exchange"] = exchange
        return {"config": load_config(then).to_dict()}

    now = load_config(_raw(tiny_raw, "dml", 2, 1))
    check_resume_workers(saved(2, True), now)  # 2 x 2 -> 2 x 1, synced: the same maths
    check_resume_workers(saved(2, False), load_config(_raw(tiny_raw, "dml", 2, 2, sync_bn=False)))  # same M
    with pytest.raises(ConfigError, match=r"workers_per_peer' = 1: .*on 2 worker\(s\).*sync_bn: false"):
        check_resume_workers(saved(2, False), now)  # the checkpoint's shards normalised alone
    with pytest.raises(ConfigError, match="stale exchange"):
        check_resume_workers(saved(2, True, "stale"), now)
    # group_by: shard numbers the ranks otherwise: the stale exchange's per-rank state would reach other workers
    shard = _raw(tiny_raw, "dml", 2, 2)
    shard["engine"].update(exchange="stale", placement={**shard["engine"]["placement"], "group_by": "shard"})
    with pytest.raises(
        ConfigError, match=r"^config key 'engine.placement.group_by' = 'shard': none, as the "
    ):
        check_resume_workers(saved(2, True, "stale"), load_config(shard))
    shard["engine"]["exchange"] = "collective"
    check_resume_workers(saved(2, True), load_config(shard))  # nothing kept per rank
