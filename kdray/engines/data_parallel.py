"""Peers that are themselves data-parallel (K peers x M workers) on one Ray Train worker group.

A population of K peers with M workers each is one worker group of K x M ranks, laid out peer by peer
(``ExperimentConfig.worker_layout``: rank -> (peer, shard)). Two kinds of process group, created on every rank in
the same order, once, at start (a torch.distributed rule):

- a **peer group** per peer: its M workers. The gradients of everything the peer trains (network, private method
  state) are averaged over it after every backward (what ``DistributedDataParallel`` does, written out so that a
  step's several phases and optimizers each average their own parameters), its BatchNorm layers sum their
  statistics over it (``sync_bn``, :mod:`kdray.models.sync_bn`), and the rows it writes into per-sample buffers
  are all-gathered over it, so its table stays one;
- a **shard group** per shard index m: shard m of every peer, in peer order (group rank = peer index). The exchange
  runs on it, so shard m's logits and feature maps go to shard m of the peers that learn from them, and nothing is
  gathered to one worker.

Peers of unequal numbers of workers (``peers[i].workers`` differ) have no common shards: there is one group of the
peers' first workers instead, and the exchange gathers each peer's rows to its first worker, exchanges whole-batch
signals between the first workers and scatters them back (:mod:`kdray.exchange.regroup`); the stale exchange ships
weights between the first workers as it does with equal M.

Worker m of a peer trains on the m-th slice of every global batch (``data.batch_size`` split in M): the epoch's
permutation and the augmentation are those of the whole batch, as with one worker. Losses are means over the
shard; the average over the peer group of the shards' gradients is the gradient of the global batch's mean, so a
step of K x M equals a step of K x 1 (exactly in float64 with ``sync_bn``; ``tests/engines/test_data_parallel.py``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import Tensor

from kdray.config import ExperimentConfig
from kdray.exchange import Exchange, Wiring, make_exchange
from kdray.exchange.regroup import RegroupedExchange
from kdray.models.sync_bn import convert_batchnorm
from kdray.population import Population
from kdray.registry import EXCHANGES
from kdray.replicas import exchange_plan
from kdray.step import StepRunner


@dataclass
class PeerGroup:
    """The workers of one data-parallel peer: ``size`` ranks, this worker being ``shard``."""

    group: object
    size: int
    shard: int
    ranks: list[int] = field(default_factory=list)  # the global ranks of the peer's workers, shard order
    objects: object = None  # a gloo group of the same ranks, for small Python objects (unequal M's layouts)
    bytes: int = field(default=0)  # gradient bytes all-reduced so far (benchmarks/data_parallel.py)
    seconds: float = field(default=0.0)  # time spent in those all-reduces

    def average(self, params: list[Tensor]) -> None:
        """Average the gradients of ``params`` over the peer's workers (one flat all-reduce). Every worker runs
        the same code on the same parameters, so a parameter has a gradient on all of them or on none."""
        params = [p for p in params if p.grad is not None]
        if self.size == 1 or not params:
            return
        start = time.perf_counter()
        flat = torch.cat([p.grad.reshape(-1) for p in params])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=self.group)
        flat.div_(self.size)
        self.bytes += flat.numel() * flat.element_size()
        self.seconds += time.perf_counter() - start
        offset = 0
        for p in params:
            n = p.numel()
            p.grad.copy_(flat[offset : offset + n].view_as(p.grad))
            offset += n

    def gather_rows(self, index: Tensor, values: Tensor) -> tuple[Tensor, Tensor]:
        """Every worker's (sample indices, rows) of a per-sample buffer write, concatenated in shard order: each
        worker writes every row of the global batch, so the peer's table is one, identical on all its workers
        (the PS-KD authors' DDP code gathers its memory the same way)."""
        if self.size == 1:
            return index, values
        indices = [torch.empty_like(index) for _ in range(self.size)]
        rows = [torch.empty_like(values) for _ in range(self.size)]
        dist.all_gather(indices, index.contiguous(), group=self.group)
        dist.all_gather(rows, values.contiguous(), group=self.group)
        return torch.cat(indices), torch.cat(rows)


@dataclass
class Groups:
    """This rank's place in a K x M worker group, and the process groups it needs."""

    peer: int
    shard: int
    peer_group: PeerGroup | None  # None: every peer has one worker (K x 1)
    shard_group: object  # the exchange's group (None: the default group, K x 1)
    shard_object_group: object  # gloo group of the same ranks, for small Python objects
    shard_ranks: list[int]  # global rank of shard ``shard`` of every peer, in peer order
    # peers of unequal numbers of workers: the exchange runs between the peers' first workers (shard_group is
    # their group on a first worker, None on the others) and regroups each peer's rows around its first worker
    unequal: bool = False


def create_groups(cfg: ExperimentConfig, rank: int, object_group) -> Groups:
    """Every rank creates every group, in the same order (peer groups, then shard groups)."""
    layout = cfg.worker_layout()
    peer, shard = layout[rank]
    workers = cfg.peer_workers
    if max(workers) == 1:
        return Groups(peer, shard, None, None, object_group, list(range(len(workers))))
    ranks_of = [[r for r, (k, _) in enumerate(layout) if k == p] for p in range(len(workers))]
    peer_groups = [dist.new_group(ranks) for ranks in ranks_of]
    gloo = dist.get_backend() == "gloo"
    if len(set(workers)) > 1:  # unequal: the peers' first workers exchange; each peer regroups its rows
        peer_objects = [
            g if gloo else dist.new_group(r, backend="gloo") for g, r in zip(peer_groups, ranks_of)
        ]
        leaders = [ranks[0] for ranks in ranks_of]
        leader_group = dist.new_group(leaders)
        leader_objects = leader_group if gloo else dist.new_group(leaders, backend="gloo")
        first = shard == 0
        group = PeerGroup(peer_groups[peer], workers[peer], shard, ranks_of[peer], peer_objects[peer])
        return Groups(
            peer, shard, group, leader_group if first else None, leader_objects if first else None, leaders,
            unequal=True,
        )  # fmt: skip
    shards = workers[0]
    shard_ranks = [[ranks_of[p][m] for p in range(len(workers))] for m in range(shards)]
    shard_groups = [dist.new_group(ranks) for ranks in shard_ranks]
    shard_object_groups = [
        g if gloo else dist.new_group(r, backend="gloo") for g, r in zip(shard_groups, shard_ranks)
    ]
    return Groups(
        peer, shard, PeerGroup(peer_groups[peer], workers[peer], shard, ranks_of[peer]),
        shard_groups[shard], shard_object_groups[shard], shard_ranks[shard],
    )  # fmt: skip


def sync_batchnorm(pop: Population, peer_group: PeerGroup, peer_sync_bn: bool) -> None:
    """BatchNorm over the global batch for this worker's modules: its peer's network and private state when the
    peer's ``sync_bn`` says so, and always a shared module (ACN's generator) fed the worker's shard of the batch:
    its statistics must be the global batch's on every worker, or the replicas that every peer steps identically
    would normalise differently."""
    modules = [pop.peers[0].net, pop.peers[0].state] if peer_sync_bn else []
    if pop.shared is not None:
        modules.append(pop.shared.module)
    for module in modules:
        if module is not None:
            convert_batchnorm(module, peer_group.group)


@dataclass
class Worker:
    """What one worker of a population trains with: its place and groups, its peer (or shard of it), its exchange
    and its step."""

    groups: Groups
    pop: Population
    exchange: Exchange
    runner: StepRunner


def build_worker(
    cfg: ExperimentConfig,
    rank: int,
    device: torch.device,
    object_group=None,
    *,
    run_name: str = "",
    namespace: str | None = None,
    attempt: str = "",
) -> Worker:
    """The worker of global ``rank`` in a process group already initialised: its process groups, its peer's shard
    of the population (synced BatchNorm where asked), the exchange ``engine.exchange`` names on its shard group, and
    the step. The RayEngine's workers, the K x M equivalence tests and ``benchmarks/data_parallel.py`` all build
    their workers here."""
    groups = create_groups(cfg, rank, object_group)
    peer, workers = groups.peer, cfg.peer_workers[groups.peer]
    # a peer of one worker among data-parallel ones (unequal M) needs no group: nothing to average or sync
    peer_group = groups.peer_group if groups.peer_group is not None and groups.peer_group.size > 1 else None
    wiring = Wiring(
        peer, cfg.num_peers, device, group=groups.shard_group, object_group=groups.shard_object_group,
        run_name=run_name, namespace=namespace, attempt=attempt, global_ranks=groups.shard_ranks,
        peer_group=peer_group.group if peer_group else None, peer_ranks=peer_group.ranks if peer_group else None,
    )  # fmt: skip
    exchange = (
        regrouped_exchange(cfg, wiring, groups)
        if groups.unequal
        else make_exchange(cfg.engine.exchange, wiring)
    )
    pop = Population(cfg, local_ids=[peer], device=device, shard=(groups.shard, workers))
    if isinstance(exchange, RegroupedExchange):  # how the phases stack their samples' rows
        exchange.blocks = {ph.name: pop.method.input_blocks(ph) for ph in pop.method.phases()}
    synced = peer_group is not None and cfg.peer_sync_bn(peer)
    if peer_group is not None:
        sync_batchnorm(pop, peer_group, cfg.peer_sync_bn(peer))
    # the stale exchange's copies of other peers run on this worker's shard: their BatchNorm like the peer's own
    exchange.attach(exchange_plan(pop, norm_group=peer_group.group if synced else None))
    return Worker(groups, pop, exchange, StepRunner(pop, exchange, peer_group))


def regrouped_exchange(cfg: ExperimentConfig, wiring: Wiring, groups: Groups) -> Exchange:
    """The exchange of a worker whose peers have unequal numbers of workers: the stale exchange as it is (weights
    between the peers' first workers); any other wrapped in :class:`RegroupedExchange`, built on the first worker
    of each peer only (the others never talk across peers)."""
    kind = EXCHANGES.lookup(cfg.engine.exchange.name)
    if kind.handles_peer_groups:
        return make_exchange(cfg.engine.exchange, wiring)
    inner = make_exchange(cfg.engine.exchange, wiring) if groups.shard == 0 else None
    group = groups.peer_group
    return RegroupedExchange(inner, groups.peer, wiring.device, group.group, group.objects, group.ranks)
