"""The collective exchange: signals over ``torch.distributed`` inside the Ray Train worker group (gloo on CPU, nccl
on GPU), one flat buffer per exchange round.

An all-to-all topology (every peer learns from every other: DML, ACN) is one ``all_gather`` of one buffer per rank.
Any other topology ships each buffer point to point to the peers that learn from it and to no one else: in AFD's
ring peer k sends to peer k+1 only, so the traffic per peer stays one buffer whatever the population size.
Layouts are agreed once per phase (the first step) with a small object all-gather; after that only bytes move.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.distributed as dist
from pydantic import Field

from kdray.config import Section
from kdray.exchange.base import DistributedExchange, ExchangeError, SignalLayout, Signals, Wiring
from kdray.registry import EXCHANGES
from kdray.topology import Topology


class CollectiveExchangeConfig(Section):
    """``engine.exchange: collective`` (the default)."""

    name: Literal["collective"] = "collective"
    split_wait: bool = Field(
        False,
        description="a timed barrier before each round splits waiting for the slowest peer "
        "(exchange/wait_ms_per_step) from moving bytes (diagnostic; one more small collective per round)",
    )


@EXCHANGES.register
class CollectiveExchange(DistributedExchange):
    """``split_wait``: a barrier before each exchange round, timed apart, splits the exchange's time into waiting
    for the slowest peer (``wait_ms_per_step``) and moving the bytes (the rest of ``ms_per_step``). A diagnostic: the
    barrier is one more small collective per round."""

    name = "collective"
    Config = CollectiveExchangeConfig

    def __init__(self, *args, split_wait: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.split_wait = split_wait
        self._layouts: dict[str, list[SignalLayout | None]] = {}

    @classmethod
    def create(cls, cfg: CollectiveExchangeConfig, wiring: Wiring) -> CollectiveExchange:
        return cls(*wiring.where(), split_wait=cfg.split_wait)

    def exchange(self, phase: str, topology: Topology, step: int, published: dict[int, Signals], inputs=None):
        if set(published) - {self.rank}:
            raise ExchangeError(
                f"rank {self.rank} publishes for peers {sorted(published)}: one peer per rank"
            )
        self.meter.step(step)
        topo = topology
        mine = published.get(self.rank)
        with self.meter.timed():
            if self.split_wait:
                with self.meter.waiting():
                    dist.barrier(group=self.group)
            layouts = self._negotiate(phase, mine, topo)
            if self._is_all_to_all(topo, layouts):
                signals = self._all_gather(layouts, mine)
            else:
                signals = self._point_to_point(topo, layouts, mine)
        return {k: {s: signals[s] for s in topo.sources_of(k)} for k in published}

    # ------------------------------------------------------------------ layouts
    def _negotiate(self, phase: str, mine: Signals | None, topo: Topology) -> list[SignalLayout | None]:
        local = SignalLayout.of(mine) if mine is not None else None
        layouts = self._layouts.get(phase)
        if layouts is None:
            described = self.all_gather_objects(local.describe() if local is not None else None)
            layouts = [SignalLayout.from_description(d) if d is not None else None for d in described]
            for k in range(self.world):
                for s in topo.sources_of(k):
                    if layouts[s] is None and layouts[k] is not None:
                        raise ExchangeError(
                            f"phase '{phase}': peer {k} learns from peer {s}, which publishes nothing"
                        )
            self._layouts[phase] = layouts
        elif local != layouts[self.rank]:
            raise ExchangeError(
                f"phase '{phase}': peer {self.rank}'s signals changed layout between steps (the collective "
                "exchange needs fixed shapes per phase); use engine.exchange=actor"
            )
        return layouts

    def _is_all_to_all(self, topo: Topology, layouts: list[SignalLayout | None]) -> bool:
        everyone = set(range(self.world))
        return all(
            layouts[r] is not None and set(topo.sinks_of(r)) == everyone - {r} for r in range(self.world)
        )

    # ------------------------------------------------------------------ transports
    def _all_gather(self, layouts: list[SignalLayout | None], mine: Signals) -> dict[int, Signals]:
        slot = max(layout.nbytes for layout in layouts)
        device = self.device
        send = torch.zeros(slot, dtype=torch.uint8, device=device)
        layouts[self.rank].pack(mine, out=send)
        gathered = torch.empty(self.world * slot, dtype=torch.uint8, device=device)
        dist.all_gather_single(gathered, send, group=self.group)
        self.meter.bytes += slot * (self.world - 1)
        chunks = gathered.split(slot)
        return {r: layouts[r].unpack(chunks[r], f"peer {r}") for r in range(self.world) if r != self.rank}

    def _point_to_point(
        self, topo: Topology, layouts: list[SignalLayout | None], mine: Signals | None
    ) -> dict[int, Signals]:
        ops, buffers = [], {}
        if mine is not None and topo.sinks_of(self.rank):
            send = layouts[self.rank].pack(mine)
            ops += [
                dist.P2POp(dist.isend, send, self.global_ranks[dst], self.group)
                for dst in topo.sinks_of(self.rank)
            ]
        for src in topo.sources_of(self.rank):
            if layouts[src] is not None:
                buffers[src] = torch.empty(layouts[src].nbytes, dtype=torch.uint8, device=self.device)
                ops.append(dist.P2POp(dist.irecv, buffers[src], self.global_ranks[src], self.group))
        if ops:
            for work in dist.batch_isend_irecv(ops):
                work.wait()
        self.meter.bytes += sum(b.numel() for b in buffers.values())
        return {s: layouts[s].unpack(b, f"peer {s}") for s, b in buffers.items()}
