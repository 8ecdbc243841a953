"""Peers of unequal numbers of workers (peer i on M_i workers): gather, exchange, scatter.

With equal M, shard m of every peer holds the same samples and the exchange runs between them (a shard group).
With unequal M the shards do not line up (peer 0's worker 1 of 2 holds rows 32-63 of a global batch of 64, peer 1's
worker 1 of 4 rows 16-31), so each peer's signals are regrouped around its first worker:

1. **gather** within the peer group: every worker's rows of its published signals go to the peer's first worker,
   which concatenates them in shard order, i.e. the global batch's row order (``Batch.shard`` slices contiguously);
2. **exchange** between the first workers (one per peer, the group of "leaders"): the wrapped exchange
   (``collective`` or ``actor``) moves whole-batch signals exactly as it does for one worker per peer;
3. **scatter** within the peer group: the first worker cuts each received source's signals into the peer's M_i
   row blocks and sends block m to worker m, so each worker learns from the rows of the samples it holds.

A signal must therefore be per-sample (its first dimension the shard's rows); anything else is refused with an
:class:`ExchangeError` naming it. Published signals are detached, so nothing here carries a gradient and the maths
is that of one worker per peer: ``tests/engines/test_data_parallel.py`` holds K x (M_0, M_1, ...) equal to K x 1.

Traffic: the exchange between leaders moves what K x 1 moves (``bytes_per_step`` on the first workers); the gather
and the scatter move, within each peer group, the peer's own rows in and its sources' rows out
(``group_bytes_per_step``, counted on the worker that receives: the leader for the gather, the others for the
scatter). A peer of one worker skips both.

The stale exchange needs none of this (it ships weights between the first workers and every worker runs its copies
on its own rows): it declares ``handles_peer_groups`` and is used as it is.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from kdray.exchange.base import (
    DistributedExchange,
    Exchange,
    ExchangeError,
    ExchangeMeter,
    ExchangePlan,
    SignalLayout,
    Signals,
)
from kdray.topology import Topology


class RegroupedExchange(Exchange):
    """One worker's exchange in a population whose peers have unequal numbers of workers (module docstring).

    ``inner``: the exchange between the peers' first workers (None on the other workers); ``peer``: this worker's
    peer; ``group`` / ``objects``: the peer group (signals) and a gloo group of the same ranks (layouts);
    ``ranks``: the peer's workers' global ranks in shard order (``ranks[0]``, the leader, is the first worker)."""

    def __init__(
        self,
        inner: DistributedExchange | None,
        peer: int,
        device: torch.device,
        group: Any,
        objects: Any,
        ranks: list[int],
    ):
        self.inner, self.peer, self.device = inner, peer, device
        self.group, self.objects, self.ranks = group, objects, ranks
        self.size = len(ranks)
        self.shard = ranks.index(dist.get_rank()) if self.size > 1 else 0
        if (self.shard == 0) != (inner is not None):
            raise ValueError("the first worker of a peer, and it alone, exchanges between peers")
        self.group_bytes = 0
        self.meter = ExchangeMeter()  # this worker's whole round (gather, exchange, scatter)
        self._sent: dict[str, SignalLayout] = {}  # phase -> the layout of a worker's published rows
        self._received: dict[str, tuple[SignalLayout, list[tuple[int, str]]]] = {}  # phase -> scatter layout

    # ------------------------------------------------------------------ delegated
    def attach(self, plan: ExchangePlan) -> None:
        if self.inner is not None:
            self.inner.attach(plan)

    def distilling(self, step: int) -> bool:
        return self.inner.distilling(step) if self.inner is not None else True

    def reduce_shared_grads(self, params: list[nn.Parameter]) -> None:
        if any(p.requires_grad for p in params):
            raise ExchangeError(
                "a shared module (a generator) cannot be trained by peers of unequal numbers of workers"
            )

    def state_dict(self) -> dict[str, Any]:
        return self.inner.state_dict() if self.inner is not None else {}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        if self.inner is not None:
            self.inner.load_state_dict(sd)

    def stats(self) -> dict[str, float]:
        """The wrapped exchange's figures on the first worker (what crossed between peers), this worker's time in
        the whole gather-exchange-scatter, and the bytes it received within its peer group, per step."""
        steps = max(self.meter.steps, 1)
        out = dict(self.inner.stats()) if self.inner is not None else {"bytes_per_step": 0.0}
        out["ms_per_step"] = self.meter.summary()["ms_per_step"]
        out["group_bytes_per_step"] = self.group_bytes / steps
        self.group_bytes = 0
        self.meter.reset()
        return out

    # ------------------------------------------------------------------ the round
    def exchange(self, phase: str, topology: Topology, step: int, published: dict[int, Signals], inputs=None):
        if set(published) - {self.peer}:
            raise ExchangeError(f"a worker of peer {self.peer} publishes for peers {sorted(published)}")
        self.meter.step(step)
        with self.meter.timed():
            if self.size == 1:  # a peer of one worker: its rows are the global batch's
                return self._between(phase, topology, step, published)
            mine = published.get(self.peer)
            if mine is None:  # the peer does not forward in this phase (on all its workers alike)
                if self.inner is not None:  # ... but the other peers' leaders count on its leader
                    self._between(phase, topology, step, {})
                return {}
            rows = self._rows(phase, mine)
            sources = list(topology.sources_of(self.peer))
            whole = self._gather(phase, mine)
            received = None
            if self.inner is not None:
                received = self._between(phase, topology, step, {self.peer: whole})[self.peer]
            return {self.peer: self._scatter(phase, sources, received, rows)}

    def _between(self, phase: str, topology: Topology, step: int, published: dict[int, Signals]):
        """The wrapped exchange's round between the first workers; its bytes counted in this meter too."""
        before = self.inner.meter.bytes
        received = self.inner.exchange(phase, topology, step, published)
        self.meter.bytes += self.inner.meter.bytes - before
        return received

    def _rows(self, phase: str, mine: Signals) -> int:
        """The shard's rows, checked to be every signal's first dimension (a per-sample signal)."""
        lengths = {name: (t.shape[0] if t.dim() else None) for name, t in mine.items()}
        rows = {n for n in lengths.values()}
        if len(rows) > 1 or None in rows:
            raise ExchangeError(
                f"phase '{phase}': peer {self.peer} publishes {lengths} (first dimension per signal): peers of "
                "unequal numbers of workers exchange per-sample signals only (one row per sample of the shard); "
                "give every peer the same number of workers"
            )
        return rows.pop() if rows else 0

    def _gather(self, phase: str, mine: Signals) -> Signals:
        """Every worker's rows to the first worker, concatenated in shard order (the global batch's rows)."""
        layout = self._sent.get(phase)
        if layout is None:
            layout = self._sent[phase] = SignalLayout.of(mine)
        elif layout != SignalLayout.of(mine):
            raise ExchangeError(
                f"phase '{phase}': peer {self.peer}'s signals changed layout between steps (the exchange of peers "
                "of unequal numbers of workers needs fixed shapes per phase)"
            )
        send = (
            layout.pack(mine) if mine else torch.zeros(layout.nbytes, dtype=torch.uint8, device=self.device)
        )
        if self.inner is None:
            dist.gather(send, None, dst=self.ranks[0], group=self.group)
            return {}
        chunks = [torch.empty_like(send) for _ in range(self.size)]
        dist.gather(send, chunks, dst=self.ranks[0], group=self.group)
        self.group_bytes += send.numel() * (self.size - 1)
        parts = [layout.unpack(c, f"worker {m} of peer {self.peer}") for m, c in enumerate(chunks)]
        return {name: torch.cat([p[name] for p in parts]) for name in mine}

    def _scatter(
        self, phase: str, sources: list[int], received: dict[int, Signals] | None, rows: int
    ) -> dict[int, Signals]:
        """The first worker cuts each source's whole-batch signals into the peer's row blocks; worker m gets block
        m. The layout of a block is sent once per phase (a small object broadcast)."""
        known = self._received.get(phase)
        blocks: list[dict[str, torch.Tensor]] | None = None
        if received is not None:
            blocks = [{} for _ in range(self.size)]
            names: list[tuple[int, str]] = []
            # the global batch's rows (from the sources' signals when the peer itself publishes nothing)
            whole = rows * self.size or None
            for s in sources:
                for name, t in received[s].items():
                    whole = whole or (t.shape[0] if t.dim() else None)
                    if t.dim() == 0 or t.shape[0] != whole or whole % self.size:
                        raise ExchangeError(
                            f"phase '{phase}': peer {s}'s signal '{name}' has shape {tuple(t.shape)}, not one row "
                            f"per sample of the global batch ({whole}, split over {self.size} workers): peers of "
                            "unequal numbers of workers exchange per-sample signals only"
                        )
                    names.append((s, name))
                    for m, block in enumerate(t.split(whole // self.size)):
                        blocks[m][f"{s}/{name}"] = block
            if known is None:
                known = (SignalLayout.of(blocks[0]), names)
        if phase not in self._received:
            box = [None if known is None else (known[0].describe(), known[1])]
            dist.broadcast_object_list(box, src=self.ranks[0], group=self.objects)
            desc, names = box[0]
            known = self._received[phase] = (SignalLayout.from_description(desc), [tuple(n) for n in names])
        layout, names = known
        out = torch.empty(layout.nbytes, dtype=torch.uint8, device=self.device)
        if blocks is not None:
            packed = [layout.pack(b, out=torch.zeros_like(out)) for b in blocks]
            dist.scatter(out, packed, src=self.ranks[0], group=self.group)
        else:
            dist.scatter(out, None, src=self.ranks[0], group=self.group)
            self.group_bytes += out.numel()
        signals = layout.unpack(out, f"the first worker of peer {self.peer}")
        return {s: {name: signals[f"{s}/{name}"] for s2, name in names if s2 == s} for s in sources}
