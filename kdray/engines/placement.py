"""``engine.placement.group_by``: which node each Ray Train worker of a K peers x M workers population runs on.

Two kinds of traffic leave a worker every step (:mod:`kdray.engines.data_parallel`): its peer's gradient
all-reduce over the peer's M workers (as many bytes as the peer has trainable parameters), and the exchange of its
shard's signals with shard m of the other peers (logits and feature maps of the shard). Whichever is larger should
stay on one node:

- ``group_by: peer``: a *group* is one peer's M workers, on one node: the all-reduce stays local, only the
  exchange crosses nodes; the K groups go to different nodes where the cluster has room;
- ``group_by: shard``: a group is shard m of every peer (K workers), on one node: the exchange stays local, the
  all-reduces cross nodes; the M groups go to different nodes where it can.

The driver plans before the run starts (:func:`plan_workers`, a pure function of the layout and the nodes' free
resources) and pins each worker to its node by the label every Ray node carries, ``ray.io/node-id``, through Ray
Train V2's public ``ScalingConfig(label_selector=[one selector per worker])``.

Ray Train numbers its workers node by node: the nodes in the order of the workers' bundles (= ranks here), each
node's workers together (Ray 2.60, ``WorkerGroup._assign_worker_ranks``). Rank r therefore lands on the node
planned for it only when every node holds one contiguous run of ranks. So a node takes consecutive groups, and
the ranks are laid out group by group (``ExperimentConfig.worker_layout``: peer by peer, or with ``group_by: shard``
shard by shard). Every worker checks its node against the plan at start (:func:`check_worker_node`): a Ray that
numbered its workers otherwise fails with one line instead of training with the wrong traffic across nodes.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

from kdray.config import EngineConfig, ExperimentConfig
from kdray.errors import PlacementError

NODE_ID_LABEL = "ray.io/node-id"  # set by Ray on every node (ray._raylet.RAY_NODE_ID_KEY)
GROUP_OF = {"peer": "one per peer, its workers", "shard": "one per shard index, shard m of every peer"}


@dataclass(frozen=True)
class Node:
    """An alive Ray node: its id, address, and the resources free on it now."""

    node_id: str
    ip: str
    free: dict[str, float]
    total: dict[str, float] | None = None


@dataclass(frozen=True)
class Plan:
    """The node of every Ray Train rank (``node_ids[r]``, ``node_ips[r]``)."""

    group_by: str
    node_ids: list[str]
    node_ips: list[str]

    def label_selector(self) -> list[dict[str, str]]:
        """``ScalingConfig.label_selector``: one selector per worker, in rank order."""
        return [{NODE_ID_LABEL: node} for node in self.node_ids]

    def record(self) -> dict[str, Any]:
        """What ``ray_run.json`` keeps of the plan."""
        return {"group_by": self.group_by, "node_id": list(self.node_ids), "node_ip": list(self.node_ips)}


def groups_of(layout: list[tuple[int, int]], group_by: str) -> list[list[int]]:
    """The ranks of each group, in rank order: consecutive ranks of one peer (``peer``) or one shard (``shard``)."""
    key = 0 if group_by == "peer" else 1
    groups: list[list[int]] = []
    for rank, place in enumerate(layout):
        if groups and layout[groups[-1][0]][key] == place[key]:
            groups[-1].append(rank)
        else:
            groups.append([rank])
    if len({layout[g[0]][key] for g in groups}) != len(groups):
        raise ValueError(f"the layout does not keep each {group_by}'s ranks contiguous: {layout}")
    return groups


def room(free: dict[str, float], group_size: int, need: dict[str, float]) -> int:
    """How many groups of ``group_size`` workers, each asking for ``need``, fit in ``free``."""
    per_group = {k: v * group_size for k, v in need.items() if v > 0}
    if not per_group:  # asks for nothing (cpus_per_peer > 0 makes that impossible, but be total)
        return 10**9
    # a hair of slack: Ray's fractional resources are fixed-point (0.1 + 0.2 CPU fit in 0.3)
    return min(math.floor(free.get(k, 0.0) / v + 1e-9) for k, v in per_group.items())


def spread(capacity: list[int], groups: int) -> list[int] | None:
    """How many of ``groups`` consecutive groups each node takes: on as many nodes as there are groups where the
    cluster has room (the roomiest nodes first), then as evenly as the nodes' room allows (one more at a time to the
    node holding the fewest, ties to the roomier, then to the earlier). None when all nodes together hold fewer."""
    order = sorted(range(len(capacity)), key=lambda i: -capacity[i])  # stable: ties keep the cluster's order
    usable = [i for i in order if capacity[i] > 0][:groups]
    if sum(capacity[i] for i in usable) < groups:
        return None
    counts = [0] * len(capacity)
    for _ in range(groups):
        open_ = [i for i in usable if counts[i] < capacity[i]]
        best = min(open_, key=lambda i: (counts[i], -capacity[i], usable.index(i)))
        counts[best] += 1
    return counts


def _amounts(resources: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:g}" for k, v in resources.items()) or "nothing"


def describe(nodes: list[Node], need: dict[str, float]) -> str:
    """The cluster as the plan saw it: each node's free resources of the kinds the workers ask for."""
    kinds = list(dict.fromkeys(("CPU", "GPU", *need)))
    parts = [f"{n.ip} ({_amounts({k: n.free.get(k, 0.0) for k in kinds})})" for n in nodes]
    return f"{len(nodes)} node(s) with free " + "; ".join(parts)


def plan_workers(
    layout: list[tuple[int, int]], group_by: str, nodes: list[Node], need: dict[str, float]
) -> Plan:
    """The node of every rank of ``layout`` (rank -> (peer, shard)): each group (:func:`groups_of`) whole on one
    node, the groups spread over the nodes (:func:`spread`), each node a contiguous run of ranks in the nodes' order.
    Raises :class:`PlacementError` naming the request and what the nodes have free when no such plan exists."""
    groups = groups_of(layout, group_by)
    size = max(len(g) for g in groups)
    capacity = [room(n.free, size, need) for n in nodes]
    counts = spread(capacity, len(groups))
    if counts is None:
        per_group = {k: v * size for k, v in need.items() if v > 0}
        why = (
            "no node has room for one group"
            if not any(capacity)
            else f"the nodes have room for {sum(capacity)} group(s)"
        )
        raise PlacementError(
            f"engine.placement.group_by={group_by}: {len(groups)} group(s) of {size} worker(s) "
            f"({GROUP_OF[group_by]}), each group on one node, {{{_amounts(need)}}} per worker "
            f"({{{_amounts(per_group)}}} per group); {why}: the cluster has {describe(nodes, need)}. Add nodes or "
            "larger ones, lower engine.placement.cpus_per_peer / gpus_per_peer, or set engine.placement.group_by: "
            "none"
        )
    node_ids: list[str] = []
    node_ips: list[str] = []
    next_group = 0
    for node, count in zip(nodes, counts, strict=True):
        for group in groups[next_group : next_group + count]:
            node_ids += [node.node_id] * len(group)
            node_ips += [node.ip] * len(group)
        next_group += count
    return Plan(group_by, node_ids, node_ips)


def cluster_nodes() -> list[Node]:
    """The alive nodes of the connected Ray and their free resources: Ray's per-node availability (a developer API,
    used on the Ray releases :mod:`~kdray.engines.ray_private` was tested on), else each node's total (public
    ``ray.nodes()``; the reservation that follows the plan finds out if some of it is taken)."""
    import ray

    from kdray.engines import ray_private

    alive = [n for n in ray.nodes() if n.get("Alive")]
    free = ray_private.free_resources_per_node() if ray_private.available() else {}
    nodes = []
    for n in alive:
        labels = n.get("Labels") or {}
        if labels.get(NODE_ID_LABEL) != n["NodeID"]:
            raise PlacementError(
                f"engine.placement.group_by needs Ray's node label {NODE_ID_LABEL} on every node; node "
                f"{n.get('NodeManagerAddress')} has labels {labels} (Ray {ray.__version__}): set "
                "engine.placement.group_by: none"
            )
        total = dict(n["Resources"])
        nodes.append(Node(n["NodeID"], n["NodeManagerAddress"], dict(free.get(n["NodeID"], total)), total))
    return nodes


def worker_resources(engine: EngineConfig) -> dict[str, float]:
    """What each Ray Train worker asks for (``engine.placement.cpus_per_peer`` / ``gpus_per_peer``)."""
    res = {"CPU": engine.placement.cpus_per_peer}
    if engine.placement.gpus_per_peer:
        res["GPU"] = engine.placement.gpus_per_peer
    return res


def planned_placement(cfg: ExperimentConfig, *, can_grow: bool, poll_s: float = 0.5) -> Plan | None:
    """The plan of a RayEngine run (None with ``group_by: none``), from the connected Ray's nodes. While no plan
    fits the nodes' free resources, look again until ``engine.placement.timeout_s`` has passed (workers of another
    run may finish, an autoscaler may add nodes); on a cluster that cannot grow (``can_grow=False``: every node on
    loopback) a request that not even the nodes' total resources could hold fails at once."""
    placement = cfg.engine.placement
    if placement.group_by == "none":
        return None
    need, layout = worker_resources(cfg.engine), cfg.worker_layout()
    groups = groups_of(layout, placement.group_by)
    size = max(len(g) for g in groups)
    deadline = time.monotonic() + placement.timeout_s
    while True:
        nodes = cluster_nodes()
        try:
            return plan_workers(layout, placement.group_by, nodes, need)
        except PlacementError:
            never = (
                not can_grow
                and spread([room(n.total or n.free, size, need) for n in nodes], len(groups)) is None
            )
            if never or time.monotonic() >= deadline:
                raise
        time.sleep(poll_s)


def check_worker_nodes(plan: dict[str, Any] | None, placement: list[dict[str, Any]]) -> None:
    """At the workers' start, on every rank (each holds every rank's record, ``placement[r]["node_id"]``): is each
    worker on the node the driver planned for its rank (``Plan.record()``)? Ray Train chose the ranks; a release
    that numbered them otherwise than node by node in bundle order would send the traffic ``group_by`` keeps local
    across nodes, so that is refused, on every rank alike, rather than trained through."""
    if plan is None:
        return
    for rank, where in enumerate(placement):
        if plan["node_id"][rank] != where["node_id"]:
            raise PlacementError(
                f"engine.placement.group_by={plan['group_by']}: Ray Train gave rank {rank} a worker on "
                f"{where['node_ip']}, but the plan put rank {rank} on {plan['node_ip'][rank]} (this Ray numbers "
                "its workers otherwise than kdray expects); set engine.placement.group_by: none"
            )
