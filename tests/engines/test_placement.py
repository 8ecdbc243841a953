"""``engine.placement.group_by``: the driver's plan of which node each worker of a K x M population runs on, on
made-up clusters (no Ray started); the loopback multi-node run is ``test_ray_multinode.py``."""

from __future__ import annotations

import copy
import time

import pytest

from kdray.config import load_config
from kdray.engines import placement as placement_module
from kdray.engines.placement import (
    Node,
    check_worker_nodes,
    groups_of,
    plan_workers,
    planned_placement,
    spread,
)
from kdray.errors import ConfigError, PlacementError

HALF = {"CPU": 0.5}


def _cfg(tiny_raw: dict, group_by: str, peers: int = 2, workers: int = 2, **placement):
    raw = copy.deepcopy(tiny_raw)
    raw["peers"] = [{"arch": "resnet8", "arch_kwargs": {"width": 4}} for _ in range(peers)]
    raw["engine"] = {
        "name": "ray",
        "placement": {"workers_per_peer": workers, "group_by": group_by, "cpus_per_peer": 0.5, **placement},
    }
    return load_config(raw)


def _nodes(*free: dict[str, float]) -> list[Node]:
    return [Node(f"id{i}", f"10.0.0.{i + 1}", dict(f)) for i, f in enumerate(free)]


def test_the_layout_numbers_the_ranks_group_by_group(tiny_raw):
    """Ray Train numbers workers node by node, so the workers that share a node need consecutive ranks."""
    assert _cfg(tiny_raw, "none", 3, 2).worker_layout() == [(0, 0), (0, 1), (1, 0), (1, 1), (2, 0), (2, 1)]
    assert _cfg(tiny_raw, "peer", 3, 2).worker_layout() == [(0, 0), (0, 1), (1, 0), (1, 1), (2, 0), (2, 1)]
    assert _cfg(tiny_raw, "shard", 3, 2).worker_layout() == [(0, 0), (1, 0), (2, 0), (0, 1), (1, 1), (2, 1)]
    shard = _cfg(tiny_raw, "shard", 3, 2).worker_layout()
    assert groups_of(shard, "shard") == [[0, 1, 2], [3, 4, 5]]
    assert groups_of(_cfg(tiny_raw, "peer", 3, 2).worker_layout(), "peer") == [[0, 1], [2, 3], [4, 5]]
    with pytest.raises(ValueError, match="contiguous"):
        groups_of(shard, "peer")  # peer 0's ranks are 0 and 3


@pytest.mark.parametrize(
    ("capacity", "groups", "counts"),
    [
        ([1, 1, 1], 2, [1, 1, 0]),  # one group per node, the earlier nodes on a tie
        ([1, 3], 2, [1, 1]),  # spread first, even where one node could take both
        ([1, 3], 3, [1, 2]),
        ([3, 1], 4, [3, 1]),  # as even as the room allows
        ([2, 2], 3, [2, 1]),
        ([1, 0, 2], 2, [1, 0, 1]),  # a full node takes nothing
        ([0, 1, 4], 2, [0, 1, 1]),
        ([1, 1, 4], 1, [0, 0, 1]),  # one group: on the roomiest node
        ([1, 1], 3, None),
        ([0, 0], 1, None),
    ],
)
def test_groups_spread_over_the_nodes_as_evenly_as_their_room_allows(capacity, groups, counts):
    assert spread(capacity, groups) == counts


def test_peer_keeps_each_peers_workers_on_one_node_and_the_peers_apart(tiny_raw):
    cfg = _cfg(tiny_raw, "peer", 2, 2)
    plan = plan_workers(cfg.worker_layout(), "peer", _nodes({"CPU": 1}, {"CPU": 1}), HALF)
    assert plan.node_ids == ["id0", "id0", "id1", "id1"]
    assert plan.node_ips == ["10.0.0.1"] * 2 + ["10.0.0.2"] * 2
    assert plan.label_selector() == [{"ray.io/node-id": n} for n in plan.node_ids]
    # three peers on two nodes with room for two each: two peers share a node, consecutive ranks
    cfg = _cfg(tiny_raw, "peer", 3, 2)
    plan = plan_workers(cfg.worker_layout(), "peer", _nodes({"CPU": 2}, {"CPU": 2}), HALF)
    assert plan.node_ids == ["id0"] * 4 + ["id1"] * 2
    # what is free counts, not what the node has: node 0 is busy
    plan = plan_workers(
        cfg.worker_layout(), "peer", _nodes({"CPU": 0.5}, {"CPU": 1}, {"CPU": 2}, {"CPU": 1}), HALF
    )
    assert plan.node_ids == ["id1"] * 2 + ["id2"] * 2 + ["id3"] * 2


def test_shard_keeps_shard_m_of_every_peer_on_one_node(tiny_raw):
    cfg = _cfg(tiny_raw, "shard", 2, 2)
    layout = cfg.worker_layout()
    plan = plan_workers(layout, "shard", _nodes({"CPU": 1}, {"CPU": 1}), HALF)
    on = dict(zip(layout, plan.node_ids, strict=True))
    assert on[(0, 0)] == on[(1, 0)] != on[(0, 1)] == on[(1, 1)]
    # GPUs: each shard group (two peers, one GPU each) needs a node with two
    need = {"CPU": 1, "GPU": 1}
    plan = plan_workers(
        layout, "shard", _nodes({"CPU": 8, "GPU": 1}, {"CPU": 8, "GPU": 2}, {"CPU": 8, "GPU": 4}), need
    )
    assert plan.node_ids == ["id1", "id1", "id2", "id2"]


def test_ray_trains_own_numbering_gives_every_rank_its_planned_node(tiny_raw):
    """Ray's own rank assignment (2.55 and 2.60's ``WorkerGroup._assign_worker_ranks``: grouped by node in bundle order, then
    by GPU id) run on workers at the planned nodes: rank r lands on node_ids[r], for both groupings. A plan that
    interleaved the nodes (peer-major ranks with shard grouping) would not survive it: the guard below."""
    import dataclasses

    from ray.train.v2._internal.execution.worker_group.worker import ActorMetadata, Worker
    from ray.train.v2._internal.execution.worker_group.worker_group import WorkerGroup

    # Ray 2.60 sorts by each worker's bundle index; 2.55 keeps the workers in creation (= bundle) order
    bundle = "placement_group_bundle_index" in {f.name for f in dataclasses.fields(Worker)}

    def ranks_after_ray(node_ids: list[str], gpu_ids: list[int]) -> list[str]:
        workers = [
            Worker(
                None,
                ActorMetadata("h", n, n, i, {"GPU": [g]}),
                {},
                **({"placement_group_bundle_index": i} if bundle else {}),
            )  # fmt: skip
            for i, (n, g) in enumerate(zip(node_ids, gpu_ids, strict=True))
        ]
        ranked = WorkerGroup._assign_worker_ranks(workers)
        return [w.metadata.node_id for w in sorted(ranked, key=lambda w: w.distributed_context.world_rank)]

    nodes = _nodes({"CPU": 2, "GPU": 2}, {"CPU": 2, "GPU": 2})
    for group_by in ("peer", "shard"):
        plan = plan_workers(
            _cfg(tiny_raw, group_by, 2, 2).worker_layout(), group_by, nodes, {"CPU": 1, "GPU": 1}
        )
        # GPU ids handed out in any order within a node: Ray sorts a node's workers by them, which stays on the node
        assert ranks_after_ray(plan.node_ids, [1, 0, 1, 0]) == plan.node_ids
    interleaved = ["id0", "id1", "id0", "id1"]  # shard m of each peer on node m, ranks peer by peer
    assert ranks_after_ray(interleaved, [0, 0, 1, 1]) != interleaved


def test_a_request_no_node_can_hold_fails_naming_what_the_cluster_has(tiny_raw):
    cfg = _cfg(tiny_raw, "peer", 2, 4)  # a peer's 4 workers x 0.5 CPU: no node has 2 CPUs
    with pytest.raises(PlacementError) as err:
        plan_workers(cfg.worker_layout(), "peer", _nodes({"CPU": 1}, {"CPU": 1.5, "GPU": 1}), HALF)
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith("engine.placement.group_by=peer: 2 group(s) of 4 worker(s) (one per peer")
    assert "{CPU 0.5} per worker ({CPU 2} per group); no node has room for one group" in message
    assert "the cluster has 2 node(s) with free 10.0.0.1 (CPU 1, GPU 0); 10.0.0.2 (CPU 1.5, GPU 1)" in message
    assert message.endswith("or set engine.placement.group_by: none")
    # room for one group of two: says how many fit
    with pytest.raises(PlacementError, match=r"the nodes have room for 1 group\(s\)"):
        plan_workers(cfg.worker_layout(), "peer", _nodes({"CPU": 2}, {"CPU": 1}), HALF)


def test_planning_waits_for_room_until_the_timeout_unless_the_cluster_can_never_hold_it(
    tiny_raw, monkeypatch
):
    nodes = _nodes({"CPU": 1}, {"CPU": 1})
    monkeypatch.setattr(placement_module, "cluster_nodes", lambda: nodes)
    cfg = _cfg(tiny_raw, "peer", 2, 4, timeout_s=0.6)  # 2 CPUs per peer
    start = time.monotonic()
    with pytest.raises(PlacementError, match="no node has room"):
        planned_placement(cfg, can_grow=False, poll_s=0.05)  # loopback: no node will come
    assert time.monotonic() - start < 0.3
    start = time.monotonic()
    with pytest.raises(PlacementError, match="no node has room"):
        planned_placement(cfg, can_grow=True, poll_s=0.05)  # an autoscaler might add one
    assert 0.6 <= time.monotonic() - start < 3
    # the nodes' workers of another run hold the CPUs now; they will be free again: wait, then plan
    busy = [Node(n.node_id, n.ip, {"CPU": 0.0}, {"CPU": 2.0}) for n in nodes]
    seen = iter([busy, busy, _nodes({"CPU": 2}, {"CPU": 2})])
    monkeypatch.setattr(placement_module, "cluster_nodes", lambda: next(seen))
    plan = planned_placement(cfg, can_grow=False, poll_s=0.05)
    assert plan.node_ids == ["id0"] * 4 + ["id1"] * 4
    assert planned_placement(_cfg(tiny_raw, "none"), can_grow=False) is None


def test_every_worker_refuses_a_rank_off_its_planned_node():
    plan = {"group_by": "shard", "node_id": ["a", "a", "b", "b"], "node_ip": ["1", "1", "2", "2"]}
    check_worker_nodes(plan, [{"node_id": n, "node_ip": ""} for n in "aabb"])
    check_worker_nodes(None, [{"node_id": n, "node_ip": ""} for n in "abab"])
    with pytest.raises(
        PlacementError, match=r"^engine.placement.group_by=shard: Ray Train gave rank 1 a worker on 2"
    ):
        check_worker_nodes(plan, [{"node_id": n, "node_ip": i} for n, i in zip("abab", "1212", strict=True)])


def test_group_by_needs_the_pack_strategy(tiny_raw):
    with pytest.raises(ConfigError, match=r"^config key 'engine.placement.strategy' = 'spread': pack, with "):
        _cfg(tiny_raw, "peer", strategy="spread")
    with pytest.raises(ConfigError, match="group_by"):
        load_config(copy.deepcopy(tiny_raw), ["engine.placement.group_by=peer"])  # the local engine
    with pytest.raises(ConfigError, match="engine.placement.group_by"):
        _cfg(tiny_raw, "rack")
