"""The Ray exchanges without Ray: three gloo processes (torch.multiprocessing) exercise the collective and stale
exchanges and the shared-gradient sum; the actor exchange's store is exercised as a plain asyncio object."""

from __future__ import annotations

import asyncio
import copy
import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from kdray.exchange import SignalLayout
from kdray.exchange.actor import SignalStore
from kdray.exchange.base import ExchangeError
from kdray.topology import all_to_all, ring

WORLD = 3


# ------------------------------------------------------------------------------------------------- wire layout
def test_layout_round_trip_keeps_values_dtypes_and_shapes():
    signals = {
        "logits": torch.randn(5, 3),
        "feat": torch.randn(5, 2, 3, 3).to(torch.bfloat16),
        "index": torch.arange(5),
        "mask": torch.tensor([True, False, True]),
    }
    layout = SignalLayout.of(signals)
    buf = layout.pack(signals)
    assert buf.dtype == torch.uint8 and buf.numel() == layout.nbytes
    assert all(offset % 16 == 0 for _, _, _, offset in layout.entries)
    back = layout.unpack(buf.clone())
    for k, v in signals.items():
        assert back[k].dtype == v.dtype and back[k].shape == v.shape
        assert torch.equal(back[k], v)
    described = SignalLayout.from_description(layout.describe())
    assert described == layout and described.signature == layout.signature


def test_layout_refuses_a_buffer_of_another_layout():
    a = SignalLayout.of({"logits": torch.zeros(4, 3)})
    b = SignalLayout.of({"logits": torch.zeros(4, 5)})
    buf = b.pack({"logits": torch.ones(4, 5)})
    with pytest.raises(ExchangeError, match="changed layout"):
        a.unpack(buf)
    with pytest.raises(ExchangeError, match="layout says"):
        a.pack({"logits": torch.zeros(2, 3)})


# ------------------------------------------------------------------------------------- three gloo processes
def _signals(rank: int) -> dict[str, torch.Tensor]:
    # heterogeneous: every rank publishes a feature map of its own shape
    g = torch.Generator().manual_seed(rank)
    return {"logits": torch.randn(4, 3, generator=g), "feat": torch.randn(4, rank + 1, 2, 2, generator=g)}


def _ranks_main(rank: int, init_file: str, stale_raw: dict, results: dict) -> None:
    from kdray.exchange.collective import CollectiveExchange

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    torch.set_num_threads(1)
    out = {}
    cpu = torch.device("cpu")
    phase = "main"

    # all-to-all: one all_gather, every other peer's signals, exactly
    ex = CollectiveExchange(rank, WORLD, cpu)
    for step in range(2):
        got = ex.exchange(phase, all_to_all(WORLD), step, {rank: _signals(rank)})
        assert set(got) == {rank} and set(got[rank]) == set(range(WORLD)) - {rank}
        for s, signals in got[rank].items():
            for k, v in _signals(s).items():
                assert torch.equal(signals[k], v), (rank, s, k)
    out["all_to_all"] = ex.stats()

    # ring: peer k hears from k-1 only, and only that buffer arrives
    ex = CollectiveExchange(rank, WORLD, cpu)
    got = ex.exchange(phase, ring(WORLD), 0, {rank: _signals(rank)})
    src = (rank - 1) % WORLD
    assert set(got[rank]) == {src}
    assert all(torch.equal(got[rank][src][k], v) for k, v in _signals(src).items())
    out["ring"] = ex.stats()
    out["ring_expected"] = SignalLayout.of(_signals(src)).nbytes

    # split_wait: rank 2 arrives 0.3 s late; the others' exchange time is mostly waiting, and says so
    import time

    ex = CollectiveExchange(rank, WORLD, cpu, split_wait=True)
    ex.exchange(phase, all_to_all(WORLD), 0, {rank: _signals(rank)})  # layouts agreed, everyone in step
    ex.stats()
    if rank == 2:
        time.sleep(0.3)
    got = ex.exchange(phase, all_to_all(WORLD), 1, {rank: _signals(rank)})
    assert all(torch.equal(got[rank][s]["logits"], _signals(s)["logits"]) for s in got[rank])
    out["split"] = ex.stats()

    # shared gradients: the sum over ranks; a parameter without a gradient anywhere keeps None
    module = nn.ModuleDict({"a": nn.Linear(2, 2), "b": nn.Linear(2, 1), "c": nn.Linear(1, 1)})
    for p in module["a"].parameters():
        p.grad = torch.full_like(p, float(rank + 1))
    if rank == 1:
        for p in module["b"].parameters():
            p.grad = torch.full_like(p, 5.0)
    ex.reduce_shared_grads(list(module.parameters()))
    out["grad_a"] = module["a"].weight.grad.clone()
    out["grad_b"] = module["b"].weight.grad.clone()
    out["grad_c"] = module["c"].weight.grad
    out["stale"] = _stale_scenario(rank, stale_raw)
    out["generator_grads"] = _generator_grads(_acn_raw(), ranks=[rank])
    results[rank] = out
    dist.destroy_process_group()


def _root_conftest():
    """tests/conftest.py by path: several conftest.py files share the module name 'conftest'."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "conftest.py"
    spec = importlib.util.spec_from_file_location("kdray_tests_conftest", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _stale_raw() -> dict:
    TINY = _root_conftest().TINY

    raw = copy.deepcopy(TINY)
    raw["peers"] = [copy.deepcopy(raw["peers"][0]) for _ in range(WORLD)]
    raw["train"]["threads"] = 1
    raw["train"]["steps_per_epoch"] = 5
    raw["engine"] = {"name": "ray", "exchange": {"name": "stale", "every": 2, "burn_in": 1}}
    return raw


def _acn_raw() -> dict:
    TINY = _root_conftest().TINY

    raw = copy.deepcopy(TINY)
    raw["peers"] = [copy.deepcopy(raw["peers"][0]) for _ in range(WORLD)]
    raw["method"] = {"name": "acn"}
    raw["engine"] = {"name": "ray", "exchange": "collective"}
    raw["train"]["dtype"] = "float64"  # the sums' order differs: compare far below float32's rounding
    return raw


def _generator_grads(raw: dict, ranks: list[int] | None) -> list[torch.Tensor]:
    """The shared generator's gradients as the step hands them to its optimizer, after one step of ACN: with the
    whole population in one process (``ranks=None``), or one peer per process with the collective exchange."""
    from kdray.config import load_config
    from kdray.exchange import Wiring, make_exchange
    from kdray.population import Population
    from kdray.replicas import exchange_plan
    from kdray.step import StepRunner

    cfg = load_config(raw)
    proc = Population(cfg, local_ids=ranks)
    runner = StepRunner(proc)
    if ranks is not None:
        runner.exchange = make_exchange(cfg.engine.exchange, Wiring(ranks[0], WORLD, torch.device("cpu")))
        runner.exchange.attach(exchange_plan(proc))
    captured = []
    reduce = runner.exchange.reduce_shared_grads

    def spy(params):
        reduce(params)
        captured.append([q.grad.clone() for q in params])

    runner.exchange.reduce_shared_grads = spy
    batch = next(iter(proc.batches(0)))
    runner.step(batch, 0, 0)
    assert len(captured) == 1
    return captured[0]


@pytest.fixture(scope="module")
def three_ranks() -> dict:
    """One group of three gloo processes runs every scenario (starting processes is the slow part)."""
    with tempfile.TemporaryDirectory() as tmp:
        init_file = os.path.join(tmp, "pg")
        manager = mp.Manager()
        results = manager.dict()
        mp.spawn(_ranks_main, args=(init_file, _stale_raw(), results), nprocs=WORLD, join=True)
        out = dict(results)
        manager.shutdown()
    return out


def test_collective_all_to_all_delivers_every_other_peer(three_ranks):
    for rank in range(WORLD):
        stats = three_ranks[rank]["all_to_all"]
        slot = max(SignalLayout.of(_signals(r)).nbytes for r in range(WORLD))
        assert stats["bytes_per_step"] == slot * (WORLD - 1)  # one all-gather of one slot per rank per step
        assert stats["ms_per_step"] > 0


def test_collective_ring_ships_to_one_neighbour_only(three_ranks):
    for rank in range(WORLD):
        assert three_ranks[rank]["ring"]["bytes_per_step"] == three_ranks[rank]["ring_expected"]


def test_split_wait_separates_waiting_for_a_late_peer_from_moving_bytes(three_ranks):
    for rank in (0, 1):  # they waited ~0.3 s for rank 2 at the barrier; the all-gather itself is quick
        split = three_ranks[rank]["split"]
        assert split["wait_ms_per_step"] >= 250
        assert split["ms_per_step"] - split["wait_ms_per_step"] < split["wait_ms_per_step"] / 2
    late = three_ranks[2]["split"]  # the late one finds the others there
    assert late["wait_ms_per_step"] < 150 and late["ms_per_step"] >= late["wait_ms_per_step"]
    assert "wait_ms_per_step" not in three_ranks[0]["all_to_all"]  # only when asked


def test_shared_gradients_are_summed_over_ranks(three_ranks):
    for rank in range(WORLD):
        r = three_ranks[rank]
        assert torch.equal(r["grad_a"], torch.full((2, 2), 1.0 + 2.0 + 3.0))
        assert torch.equal(
            r["grad_b"], torch.full((1, 2), 5.0)
        )  # only rank 1 had one; zeros stood in for the rest
        assert r["grad_c"] is None


# --------------------------------------------------------------------------------------------- stale weights
def _stale_scenario(rank: int, raw: dict) -> dict:
    from kdray.config import load_config
    from kdray.exchange import Wiring, make_exchange
    from kdray.population import Population
    from kdray.replicas import exchange_plan
    from kdray.step import StepRunner

    cfg = load_config(raw)
    proc = Population(cfg, local_ids=[rank])
    ex = make_exchange(cfg.engine.exchange, Wiring(rank, WORLD, torch.device("cpu")))
    ex.attach(exchange_plan(proc))
    runner = StepRunner(proc, ex)
    every = cfg.engine.exchange.every
    snapshots = {}
    for local_step, batch in enumerate(proc.batches(0)):
        runner.step(batch, 0, local_step)
        if local_step % every == every - 1:
            # the weights this peer will ship at the start of the next step
            snapshots[local_step + 1] = {
                k: v.clone() for k, v in proc.peers[0].net.model.state_dict().items()
            }
    copies = {
        s: {k: v.clone() for k, v in c.peer.net.model.state_dict().items()} for s, c in ex.copies.items()
    }
    return {"copies": copies, "snapshots": snapshots, "stats": ex.stats(), "state": ex.state_dict()}


def test_stale_exchange_ships_weights_every_n_steps(three_ranks):
    out = {rank: three_ranks[rank]["stale"] for rank in range(WORLD)}
    for rank in range(WORLD):
        r = out[rank]
        assert sorted(r["copies"]) == sorted(set(range(WORLD)) - {rank})  # DML: a copy of every other peer
        assert r["state"]["block"] == 2  # shipped at steps 0, 2 and 4
        for s, weights in r["copies"].items():
            shipped = out[s]["snapshots"][4]  # the source's weights after 4 steps
            for k, v in shipped.items():
                if "running" in k or "num_batches" in k:
                    continue  # the copy ran forward itself since: its BN statistics moved on, as they should
                assert torch.equal(weights[k], v), (rank, s, k)
        weight_bytes = sum(
            SignalLayout.of({k: v for k, v in out[s]["copies"][rank].items()}).nbytes - 16
            for s in range(WORLD)
            if s != rank
        )
        # three shipments in five steps, two sources each (the layouts include a 16-byte header per buffer)
        assert r["stats"]["bytes_per_step"] == pytest.approx(3 * (weight_bytes + 2 * 16) / 5, rel=0.05)


# ------------------------------------------------------------------------------------ the actor's store
def test_signal_store_waits_releases_and_forgets_failed_attempts():
    async def scenario():
        store = SignalStore(window=2)
        waiter = asyncio.create_task(store.get([("a", 0, 1), ("a", 0, 2)]))
        await asyncio.sleep(0.01)
        assert not waiter.done()  # waits until every key is there
        await store.put(("a", 0, 1), ["ref1"], consumers=2)
        await store.put(("a", 0, 2), ["ref2"], consumers=1)
        assert await asyncio.wait_for(waiter, 1) == ["ref1", "ref2"]
        assert await store.size() == 1  # ref2 had one consumer: gone; ref1 waits for its second
        assert await store.get([("a", 0, 1)]) == ["ref1"]
        assert await store.size() == 0
        for rnd in range(10):  # never consumed: only the last `window` rounds are kept
            await store.put(("a", rnd, 0), [f"r{rnd}"], consumers=1)
        assert await store.size() == 3
        await store.put(("b", 0, 0), ["new"], consumers=1)  # a restarted worker group starts clean
        assert await store.size() == 1

    asyncio.run(scenario())


def test_distributed_generator_gradients_equal_the_in_process_ones(three_ranks):
    """ACN's generator phase: each worker back-propagates its own peer's part, the all-reduce sums the parts; the
    sum equals what one process gets by back-propagating every part together."""
    whole = _generator_grads(_acn_raw(), ranks=None)
    assert any(g.abs().sum() > 0 for g in whole)
    for rank in range(WORLD):
        got = three_ranks[rank]["generator_grads"]
        assert len(got) == len(whole)
        for a, b in zip(got, whole):
            assert a.dtype == torch.float64
            assert torch.allclose(a, b, rtol=1e-10, atol=1e-13), (a - b).abs().max()


# ------------------------------------------------------------------------------------------------- burn-in
def test_burn_in_trains_on_the_task_terms_only(tiny_raw):
    """While the exchange is not distilling (the stale exchange's burn-in), a step equals one with every
    non-task weight at 0; the distillation terms are still computed and logged."""
    from kdray.config import load_config
    from kdray.exchange import LocalExchange
    from kdray.population import Population
    from kdray.step import StepRunner

    class BurningIn(LocalExchange):
        def distilling(self, step: int) -> bool:
            return step >= 2

    tiny_raw["train"]["steps_per_epoch"] = 3
    burn = Population(load_config(tiny_raw))
    burn_runner = StepRunner(burn, BurningIn())
    ce_only = copy.deepcopy(tiny_raw)
    ce_only["method"]["weights"] = {"ce": 1.0, "kl": 0.0}
    ref = Population(load_config(ce_only))
    ref_runner = StepRunner(ref)
    logged = []
    for step, (b1, b2) in enumerate(zip(burn.batches(0), ref.batches(0))):
        m_burn = burn_runner.step(b1, 0, step).means()
        ref_runner.step(b2, 0, step)
        logged.append(m_burn["peer0/loss_kl"])
        if step == 1:
            break
    for p, q in zip(burn.peers, ref.peers):
        for a, b in zip(p.net.parameters(), q.net.parameters()):
            assert torch.equal(a, b)
    assert all(v > 0 for v in logged)  # computed and logged during the burn-in
    # from step 2 on the method's weights apply again: the third step differs from a CE-only one
    burn_runner.step(next(iter(burn.batches(0, 2))), 0, 2)
    ref_runner.step(next(iter(ref.batches(0, 2))), 0, 2)
    assert any(
        not torch.equal(a, b) for a, b in zip(burn.peers[0].net.parameters(), ref.peers[0].net.parameters())
    )
