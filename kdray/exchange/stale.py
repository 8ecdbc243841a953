"""The stale exchange: codistillation with stale weights (Anil, Pereyra, Passos, Ormandi, Dahl, Hinton, "Large scale
distributed neural network training through online distillation", ICLR 2018, section 2).

Every ``engine.exchange.every`` steps each trainable peer ships its weights (network and private state) to the peers
that learn from it, point to point. Between shipments a peer computes its sources' signals itself: it runs its stale
copy of each source on its own batch, so nothing moves on the other steps. The traffic per step falls from the
signals (which grow with the batch and the feature maps) to the weights divided by ``every``.

Burn-in (the paper trains each model alone before distillation starts): for the first ``engine.exchange.burn_in`` steps
``distilling`` is False and the step weights every loss term except the method's task terms
(``Method.task_terms``, default ``("ce",)``) by 0, so the peers train on the labels only while the copies warm up.
The other terms are still computed and logged.

With ``every: 1`` the copies are refreshed before every step and the signals are exactly the fresh ones: the
run equals the collective exchange's (a test holds this).

Peers of several workers (K x M): one copy of a source's weights crosses to each receiving peer, not one per
worker. The first worker of the source's peer group sends it to the first worker of the receiver's (over shard 0's
group), which broadcasts it within its own peer group (a peer's workers are placed together, so that traffic stays
on their node). Every worker then runs its copy on its own shard, the copy's BatchNorm summing its statistics over
the peer group like the peer's own (``sync_bn``), so K x M equals K x 1 (``tests/engines/test_data_parallel.py``).
``bytes_per_step`` counts what crossed between peer groups (on the first workers); ``group_bytes_per_step`` what
the broadcasts delivered within the groups.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
import torch.distributed as dist
from pydantic import Field

from kdray.config import Section
from kdray.exchange.base import DistributedExchange, ExchangePlan, Replica, SignalLayout, Signals, Wiring
from kdray.registry import EXCHANGES
from kdray.topology import Topology


class StaleExchangeConfig(Section):
    """``engine.exchange: stale`` (codistillation)."""

    name: Literal["stale"]
    every: int = Field(50, ge=1, description="ship weights every N steps")
    burn_in: int = Field(0, ge=0, description="steps of task-only training before distillation starts")


@EXCHANGES.register
class StaleExchange(DistributedExchange):
    name = "stale"
    Config = StaleExchangeConfig
    handles_peer_groups = (
        True  # weights go first worker to first worker, whatever the peers' numbers of workers
    )

    @classmethod
    def create(cls, cfg: StaleExchangeConfig, wiring: Wiring) -> StaleExchange:
        return cls(
            *wiring.where(), every=cfg.every, burn_in=cfg.burn_in, peer_group=wiring.peer_group,
            peer_ranks=wiring.peer_ranks,
        )  # fmt: skip

    def __init__(
        self,
        *args,
        every: int,
        burn_in: int = 0,
        peer_group=None,
        peer_ranks: list[int] | None = None,
        **kwargs,
    ):
        super().__init__(*args, **kwargs)
        self.every, self.burn_in = every, burn_in
        # a peer of several workers: its group, and the global rank of its first worker (the one that ships)
        self.peer_group = peer_group if peer_ranks is not None and len(peer_ranks) > 1 else None
        self.first = (
            self.peer_group is None or dist.get_rank() == peer_ranks[0]  # type: ignore[index]
        )
        self.peer_ranks = peer_ranks
        self.group_bytes = 0
        self.local: set[int] = set()
        self.copies: dict[int, Replica] = {}
        self.shipping: list[tuple[int, int]] = []  # (source, receiver) pairs whose weights cross processes
        self.block: int | None = None  # step // every of the last shipment

    def attach(self, plan: ExchangePlan) -> None:
        if plan.replica is None or plan.live_weights is None:
            raise ValueError("the stale exchange needs the population to build replicas of its source peers")
        self.live_weights = plan.live_weights
        self.local = set(plan.local)
        # (source, receiver) pairs across processes; a frozen source never changes: its copy never needs shipping
        crossing = sorted(
            (s, r) for s, r in plan.edges if s != r and not (s in self.local and r in self.local)
        )
        for s in sorted({s for s, r in crossing if r in self.local}):
            self.copies[s] = plan.replica(s)
        self.shipping = [(s, r) for s, r in crossing if s not in plan.frozen]

    def distilling(self, step: int) -> bool:
        return step >= self.burn_in

    # ------------------------------------------------------------------ shipping weights
    def _ship(self) -> None:
        ops, received, sent = [], {}, {}
        for s, r in self.shipping if self.first else ():  # one copy per peer group: its first worker's
            if s in self.local and r not in self.local:
                if s not in sent:
                    weights = self.live_weights(s)
                    sent[s] = SignalLayout.of(weights).pack(weights)
                ops.append(dist.P2POp(dist.isend, sent[s], self.global_ranks[r], self.group))
            elif r in self.local and s not in self.local and s not in received:
                received[s] = self._empty(s)
                ops.append(dist.P2POp(dist.irecv, received[s][1], self.global_ranks[s], self.group))
        if ops:
            for work in dist.batch_isend_irecv(ops):
                work.wait()
        for _, buf in received.values():
            self.meter.bytes += buf.numel()
        if self.peer_group is not None:  # ... handed on to the peer's other workers
            incoming = sorted({s for s, r in self.shipping if r in self.local and s not in self.local})
            for s in incoming:
                if s not in received:
                    received[s] = self._empty(s)
                    self.group_bytes += received[s][1].numel()
                dist.broadcast(received[s][1], src=self.peer_ranks[0], group=self.peer_group)
        for s, (layout, buf) in received.items():
            self._load_copy(s, layout.unpack(buf, f"peer {s}'s weights"))

    def _empty(self, s: int) -> tuple[SignalLayout, torch.Tensor]:
        layout = SignalLayout.of(self.copies[s].weights())
        return layout, torch.empty(layout.nbytes, dtype=torch.uint8, device=self.device)

    @torch.no_grad()
    def _load_copy(self, s: int, weights: dict[str, torch.Tensor]) -> None:
        target = self.copies[s].weights()  # tensors sharing storage with the copy's parameters and buffers
        for name, value in weights.items():
            target[name].copy_(value)

    # ------------------------------------------------------------------ signals
    def exchange(self, phase: str, topology: Topology, step: int, published: dict[int, Signals], inputs=None):
        self.meter.step(step)
        with self.meter.timed():
            block = step // self.every
            if block != self.block:
                self._ship()
                self.block = block
            computed: dict[int, Signals] = {}
            out: dict[int, dict[int, Signals]] = {}
            for k in published:
                out[k] = {}
                for s in topology.sources_of(k):
                    if s in published:
                        out[k][s] = published[s]
                        continue
                    if s not in computed:
                        if inputs is None:
                            raise ValueError("the stale exchange needs the phase inputs to run its copies")
                        computed[s] = self.copies[s].signals(phase, inputs.detach())
                    out[k][s] = computed[s]
        return out

    def stats(self) -> dict[str, float]:
        steps = max(self.meter.steps, 1)
        group = {"group_bytes_per_step": self.group_bytes / steps} if self.peer_group is not None else {}
        self.group_bytes = 0
        return {**super().stats(), **group}

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        return {
            "block": self.block,
            "copies": {
                str(s): {k: v.clone() for k, v in c.weights().items()} for s, c in self.copies.items()
            },
        }

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        self.block = sd.get("block")
        for s, weights in sd.get("copies", {}).items():
            if int(s) in self.copies:
                self._load_copy(int(s), weights)
