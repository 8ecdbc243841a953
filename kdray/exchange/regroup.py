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

A signal must therefore be per-sample: its first dimension the shard's rows, or ``Method.input_blocks`` stacked
blocks of them (ACN's peer phase forwards ``[x, x~]``, MAD's student phase ``[G(z), G~(z')]``: each block is
gathered and scattered on its own, so the whole batch's signals are stacked as one worker stacks them); anything
else is refused with an :class:`ExchangeError` naming it. Published signals are detached, so nothing here carries a
gradient and the maths is that of one worker per peer: ``tests/engines/test_data_parallel.py`` holds
K x (M_0, M_1, ...) equal to K x 1.

A shared module (ACN's, DFAD's or MAD's generator) gets the population's gradient on every worker: each peer's
part is the mean over its workers (an all-reduce within the peer: the gradient of its loss on the global batch),
the parts are summed between the first workers (the wrapped exchange's sum, as for one worker per peer), and the
sum is broadcast within each peer.

Traffic: the exchange between leaders moves what K x 1 moves (``bytes_per_step`` on the first workers); the gather
and the scatter move, within each peer group, the peer's own rows in and its sources' rows out
(``group_bytes_per_step``, counted on the worker that receives: the leader for the gather, the others for the
scatter). A peer of one worker skips both.

The stale exchange needs none of this (it ships weights between the first workers and every worker runs its copies
on its own rows): it declares ``handles_peer_groups`` and is used as it is (not with a shared module: refused).
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

    averages_shared_grads = True

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
        # phase -> how many blocks of per-sample rows its signals stack (Method.input_blocks; set by the worker)
        self.blocks: dict[str, int] = {}
        self._sent: dict[str, SignalLayout] = {}  # phase -> the layout of a worker's published rows
        self._received: dict[str, tuple[SignalLayout, list[tuple[int, str]]]] = {}  # phase -> scatter layout

    # ------------------------------------------------------------------ delegated
    def attach(self, plan: ExchangePlan) -> None:
        if self.inner is not None:
            self.inner.attach(plan)

    def distilling(self, step: int) -> bool:
        return self.inner.distilling(step) if self.inner is not None else True

    def reduce_shared_grads(self, params: list[nn.Parameter]) -> None:
        """The shared module's gradient of the population: each peer's, the mean over its workers' shards (the
        gradient of its loss on the global batch), summed over the peers between their first workers (the wrapped
        exchange's sum), then broadcast within each peer, so every replica takes the same update (the step does not
        average it again: ``averages_shared_grads``). Within a peer every worker runs the same code, so a parameter
        has a gradient on all of its workers or on none."""
        params = [p for p in params if p.requires_grad]
        if not params:
            return
        with self.meter.timed():
            own = [p for p in params if p.grad is not None]
            if self.size > 1 and own:
                flat = torch.cat([p.grad.reshape(-1) for p in own])
                dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=self.group)
                flat.div_(self.size)
                self.group_bytes += flat.numel() * flat.element_size()
                _unflatten(flat, own)
            if self.inner is not None:
                before = self.inner.meter.bytes
                self.inner.reduce_shared_grads(params)
                self.meter.bytes += self.inner.meter.bytes - before
            if self.size > 1:  # the sum, from the first worker to the peer's others
                dtype = params[0].dtype
                has = torch.tensor([p.grad is not None for p in params], dtype=dtype, device=params[0].device)
                dist.broadcast(has, src=self.ranks[0], group=self.group)
                got = [p for p, h in zip(params, has.tolist()) if h > 0]
                if got:
                    flat = torch.cat(
                        [(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in got]
                    )
                    dist.broadcast(flat, src=self.ranks[0], group=self.group)
                    if self.inner is None:
                        self.group_bytes += flat.numel() * flat.element_size()
                    for p in got:
                        if p.grad is None:
                            p.grad = torch.zeros_like(p)
                    _unflatten(flat, got)

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
            sources = list(topology.sources_of(self.peer))
            # nothing to send or receive (independent training): no gather, no scatter
            if not mine and not sources:
                if self.inner is not None:
                    self._between(phase, topology, step, {self.peer: mine})
                return {self.peer: {}}
            blocks = self.blocks.get(phase, 1)
            rows = self._rows(phase, mine, blocks, inputs)
            whole = self._gather(phase, mine, blocks)
            received = None
            if self.inner is not None:
                received = self._between(phase, topology, step, {self.peer: whole})[self.peer]
            return {self.peer: self._scatter(phase, sources, received, rows, blocks)}

    def _between(self, phase: str, topology: Topology, step: int, published: dict[int, Signals]):
        """The wrapped exchange's round between the first workers; its bytes counted in this meter too."""
        before = self.inner.meter.bytes
        received = self.inner.exchange(phase, topology, step, published)
        self.meter.bytes += self.inner.meter.bytes - before
        return received

    def _rows(self, phase: str, mine: Signals, blocks: int = 1, inputs: torch.Tensor | None = None) -> int:
        """The rows of this worker's signals, checked to be every signal's first dimension, the rows of the phase's
        inputs, and ``blocks`` equal blocks of the shard's samples (per-sample signals)."""
        lengths = {name: (t.shape[0] if t.dim() else None) for name, t in mine.items()}
        rows = {n for n in lengths.values()}
        if inputs is not None and inputs.dim():
            rows.add(inputs.shape[0])
        if len(rows) > 1 or None in rows or any(n % blocks for n in rows):
            rows_in = f", its inputs {inputs.shape[0]} rows" if inputs is not None and inputs.dim() else ""
            raise ExchangeError(
                f"phase '{phase}': peer {self.peer} publishes {lengths} (first dimension per signal){rows_in}: "
                "peers of unequal numbers of workers exchange per-sample signals only (one row per row of the "
                f"phase's inputs, in {blocks} block(s): Method.input_blocks); give every peer the same number of "
                "workers"
            )
        return rows.pop() if rows else 0

    def _gather(self, phase: str, mine: Signals, blocks: int = 1) -> Signals:
        """Every worker's rows to the first worker, concatenated in shard order within each block (the global
        batch's rows: ``[block 1 of shards 1..M, block 2 of shards 1..M, ...]``, as one worker stacks them)."""
        layout = self._sent.get(phase)
        if layout is None:
            layout = self._sent[phase] = SignalLayout.of(mine)
        elif layout != SignalLayout.of(mine):
            raise ExchangeError(
                f"phase '{phase}': peer {self.peer}'s signals changed layout between steps (the exchange of peers "
                "of unequal numbers of workers needs fixed shapes per phase)"
            )
        send = layout.pack(mine, out=torch.zeros(layout.nbytes, dtype=torch.uint8, device=self.device))
        if self.inner is None:
            dist.gather(send, None, dst=self.ranks[0], group=self.group)
            return {}
        chunks = [torch.empty_like(send) for _ in range(self.size)]
        dist.gather(send, chunks, dst=self.ranks[0], group=self.group)
        self.group_bytes += send.numel() * (self.size - 1)
        parts = [layout.unpack(c, f"worker {m} of peer {self.peer}") for m, c in enumerate(chunks)]
        out = {}
        for name in mine:
            pieces = [p[name].chunk(blocks) for p in parts]  # worker m's block j: pieces[m][j]
            out[name] = torch.cat([pieces[m][j] for j in range(blocks) for m in range(self.size)])
        return out

    def _scatter(
        self, phase: str, sources: list[int], received: dict[int, Signals] | None, rows: int, blocks: int = 1
    ) -> dict[int, Signals]:
        """The first worker cuts each source's whole-batch signals into the peer's shards (within each block);
        worker m gets shard m of every block, stacked. The layout of what a worker gets is sent once per phase (a
        small object broadcast)."""
        known = self._received.get(phase)
        parts: list[dict[str, torch.Tensor]] | None = None
        if received is not None:
            parts = [{} for _ in range(self.size)]
            names: list[tuple[int, str]] = []
            # the global batch's rows (from the sources' signals when the peer itself publishes nothing)
            whole = rows * self.size or None
            for s in sources:
                for name, t in received[s].items():
                    whole = whole or (t.shape[0] if t.dim() else None)
                    if t.dim() == 0 or t.shape[0] != whole or whole % (self.size * blocks):
                        raise ExchangeError(
                            f"phase '{phase}': peer {s}'s signal '{name}' has shape {tuple(t.shape)}, not one row "
                            f"per sample of the global batch ({whole} rows in {blocks} block(s), split over "
                            f"{self.size} workers): peers of unequal numbers of workers exchange per-sample signals "
                            "only"
                        )
                    names.append((s, name))
                    n = whole // (self.size * blocks)  # a shard's rows of one block
                    for m in range(self.size):
                        parts[m][f"{s}/{name}"] = torch.cat(
                            [t[(j * self.size + m) * n : (j * self.size + m + 1) * n] for j in range(blocks)]
                        )
            if known is None:
                known = (SignalLayout.of(parts[0]), names)
        if phase not in self._received:
            box = [None if known is None else (known[0].describe(), known[1])]
            dist.broadcast_object_list(box, src=self.ranks[0], group=self.objects)
            desc, names = box[0]
            known = self._received[phase] = (SignalLayout.from_description(desc), [tuple(n) for n in names])
        layout, names = known
        out = torch.empty(layout.nbytes, dtype=torch.uint8, device=self.device)
        if parts is not None:
            packed = [layout.pack(b, out=torch.zeros_like(out)) for b in parts]
            dist.scatter(out, packed, src=self.ranks[0], group=self.group)
        else:
            dist.scatter(out, None, src=self.ranks[0], group=self.group)
            self.group_bytes += out.numel()
        signals = layout.unpack(out, f"the first worker of peer {self.peer}")
        return {s: {name: signals[f"{s}/{name}"] for s2, name in names if s2 == s} for s in sources}


def _unflatten(flat: torch.Tensor, params: list[nn.Parameter]) -> None:
    """Copy consecutive slices of ``flat`` into the gradients of ``params``."""
    offset = 0
    for p in params:
        n = p.numel()
        p.grad.copy_(flat[offset : offset + n].view_as(p.grad))
        offset += n
