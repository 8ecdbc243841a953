"""The capacity planner: can the Ray engine place an experiment's workers on the cluster at ``max_workers``?

Each peer is ``peers[i].workers`` Ray Train workers (one by default), each asking for ``engine.placement.cpus_per_peer``
CPUs and ``engine.placement.gpus_per_peer`` GPUs on one node; ``strict_spread`` needs as many nodes that can each
hold a worker as there are workers; ``pack``/``spread`` need room for all workers; ``gpus_per_peer * workers`` at
most the GPUs; ``engine.placement.group_by: peer | shard`` needs every group of workers whole on one node (the
engine's own planner, :func:`kdray.engines.placement.plan_workers`, run on the nodes at ``max_workers``). Node
resources come from each node type's ``resources`` (or, for the ``local`` provider, from
``metadata.kdray.node_resources``), because Ray detects them only when a node starts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from kdray.cluster.problems import Problem, key_path
from kdray.engines.placement import Node, groups_of, plan_workers, worker_resources
from kdray.errors import PlacementError


@dataclass
class NodeType:
    name: str
    role: str  # head | worker
    min_count: int
    max_count: int
    resources: dict[str, float] | None  # None: not declared (Ray detects it at launch)
    resources_key: str

    def slots(self, cpus: float, gpus: float) -> int:
        """How many peers (each ``cpus`` CPUs and ``gpus`` GPUs on one node) fit on one node of this type."""
        assert self.resources is not None
        counts = [math.floor(self.resources.get("CPU", 0) / cpus + 1e-9)] if cpus > 0 else []
        if gpus > 0:
            counts.append(math.floor(self.resources.get("GPU", 0) / gpus + 1e-9))
        return max(0, min(counts)) if counts else 10**6


def node_inventory(prepared: dict[str, Any], metadata: dict[str, Any]) -> list[NodeType]:
    types = prepared["available_node_types"]
    head = prepared["head_node_type"]
    if prepared["provider"]["type"] == "local":
        declared = metadata.get("node_resources") or {}
        workers = len(prepared["provider"].get("worker_ips") or [])
        key = "metadata.kdray.node_resources"
        return [
            NodeType("head", "head", 1, 1, declared.get("head"), f"{key}.head"),
            NodeType(
                "worker",
                "worker",
                min(types[head].get("min_workers", 0), workers),
                min(prepared.get("max_workers", workers), workers),
                declared.get("worker"),
                f"{key}.worker",
            ),
        ]
    nodes = []
    for name, spec in types.items():
        role = "head" if name == head else "worker"
        resources = {k: float(v) for k, v in (spec.get("resources") or {}).items()} or None
        lo, hi = (1, 1) if role == "head" else (spec.get("min_workers", 0), spec.get("max_workers", 0))
        nodes.append(
            NodeType(name, role, lo, hi, resources, key_path("available_node_types", name, "resources"))
        )
    return sorted(nodes, key=lambda n: n.role != "head")


def capacity_problems(
    cfg, nodes: list[NodeType], max_workers: int, provider: str = "aws"
) -> tuple[list[Problem], str]:
    """Can the Ray engine place ``cfg``'s peers on these nodes at ``max_workers``? Problems, and a one-line verdict."""
    eng = cfg.engine
    more_nodes = (
        "add machines to provider.worker_ips"
        if provider == "local"
        else "raise max_workers (and the node type's max_workers)"
    )
    k, cpus, gpus = cfg.num_workers, eng.placement.cpus_per_peer, eng.placement.gpus_per_peer
    # a K x 1 population speaks of peers; K x M of workers
    unit = "peers" if k == cfg.num_peers else "workers"
    one = unit[:-1]
    unknown = [n for n in nodes if n.resources is None and n.max_count > 0]
    if unknown:
        return [
            Problem(
                n.resources_key,
                "not declared: Ray detects a node's CPUs/GPUs only when it starts, so kdray cannot count offline; "
                "declare them, e.g. {CPU: 8, GPU: 1}",
            )
            for n in unknown
        ], "capacity: unknown"
    bundle = f"{{CPU: {cpus:g}, GPU: {gpus:g}}}"
    # The global max_workers caps the workers of all types together: count the roomiest types first.
    budget = max_workers
    fitting_nodes, slots, total_gpus = 0, 0, 0.0
    counts: list[tuple[NodeType, int]] = []
    for n in sorted(nodes, key=lambda n: (n.role != "head", -n.slots(cpus, gpus))):
        count = 1 if n.role == "head" else min(n.max_count, budget)
        if n.role != "head":
            budget -= count
        counts.append((n, count))
        per = n.slots(cpus, gpus)
        fitting_nodes += count if per > 0 else 0
        slots += count * per
        total_gpus += count * n.resources.get("GPU", 0)
    problems = []
    per_node = ", ".join(
        f"{n.name} x{1 if n.role == 'head' else n.max_count} ({n.slots(cpus, gpus)} each)"
        for n in nodes
        if n.max_count
    )
    if gpus * k > total_gpus:
        problems.append(
            Problem(
                "engine.placement.gpus_per_peer",
                f"{k} {unit} x {gpus:g} GPU = {gpus * k:g} GPUs, but the cluster has {total_gpus:g} at max_workers: "
                f"{more_nodes}, use GPU nodes, or lower engine.placement.gpus_per_peer",
            )
        )
    if eng.placement.strategy == "strict_spread":
        verdict = f"strict_spread: {k} {unit} need {k} nodes that each fit {bundle}; the cluster has {fitting_nodes}"
        if fitting_nodes < k:
            problems.append(
                Problem(
                    "engine.placement.strategy",
                    f"strict_spread puts each of the {k} {unit} on its own node, but at max_workers={max_workers} only "
                    f"{fitting_nodes} node(s) fit a {one} {bundle} ({per_node}): {more_nodes} or use engine.placement.strategy=pack",
                )
            )
    else:
        verdict = f"{eng.placement.strategy}: {k} {unit} of {bundle}; the cluster has room for {slots}"
        if slots < k:
            problems.append(
                Problem(
                    "engine.placement.strategy",
                    f"{k} {unit} of {bundle} do not fit: at max_workers={max_workers} there is room for {slots} "
                    f"({per_node}): {more_nodes} or lower engine.placement.cpus_per_peer / engine.placement.gpus_per_peer",
                )
            )
    if eng.placement.group_by != "none":
        problem, grouped = _group_problem(cfg, counts, more_nodes)
        verdict += f"; {grouped}"
        if problem is not None:
            problems.append(problem)
    return problems, verdict


def _group_problem(cfg, counts: list[tuple[NodeType, int]], more_nodes: str) -> tuple[Problem | None, str]:
    """``engine.placement.group_by``: the engine's planner on the nodes the cluster has at ``max_workers`` (each
    node type's nodes named ``<type>#<i>``, all free)."""
    nodes = [
        Node(f"{n.name}#{i + 1}", f"{n.name}#{i + 1}", dict(n.resources or {}))
        for n, count in counts
        for i in range(count)
    ]
    by = cfg.engine.placement.group_by
    layout = cfg.worker_layout()
    groups = groups_of(layout, by)
    try:
        plan = plan_workers(layout, by, nodes, worker_resources(cfg.engine))
    except PlacementError as e:
        return Problem(
            "engine.placement.group_by",
            f"{e} ({more_nodes})".replace(f"engine.placement.group_by={by}: ", f"{by}: "),
        ), (f"group_by {by}: {len(groups)} group(s) do not fit")
    used = len(set(plan.node_ids))
    return (
        None,
        f"group_by {by}: {len(groups)} group(s) of up to {max(map(len, groups))} workers on {used} node(s)",
    )
