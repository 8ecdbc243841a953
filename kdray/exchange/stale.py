"""The stale exchange: codistillation with stale weights (Anil, Pereyra, Passos, Ormandi, Dahl, Hinton, "Large scale
distributed neural network training through online distillation", ICLR 2018, section 2).

Every ``engine.stale_every`` steps each trainable peer ships its weights (network and private state) to the peers
that learn from it, point to point. Between shipments a peer computes its sources' signals itself: it runs its stale
copy of each source on its own batch, so nothing moves on the other steps. The traffic per step falls from the
signals (which grow with the batch and the feature maps) to the weights divided by ``stale_every``.

Burn-in (the paper trains each model alone before distillation starts): for the first ``engine.stale_burn_in`` steps
``distilling`` is False and the step weights every loss term except the method's task terms
(``Method.task_terms``, default ``("ce",)``) by 0, so the peers train on the labels only while the copies warm up.
The other terms are still computed and logged.

With ``stale_every: 1`` the copies are refreshed before every step and the signals are exactly the fresh ones: the
run equals the collective exchange's (a test holds this).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from kdray.exchange.base import DistributedExchange, SignalLayout, weights_of
from kdray.methods.base import Phase, Signals
from kdray.population import PeerRuntime, build_peer


def _weights(peer: PeerRuntime) -> dict[str, torch.Tensor]:
    return weights_of({"net": peer.net.model, "state": peer.state})


class StaleExchange(DistributedExchange):
    name = "stale"

    def __init__(self, *args, cfg, every: int, burn_in: int = 0, **kwargs):
        super().__init__(*args, **kwargs)
        self.cfg, self.every, self.burn_in = cfg, every, burn_in
        self.local: dict[int, PeerRuntime] = {}
        self.copies: dict[int, PeerRuntime] = {}
        self.block: int | None = None  # step // every of the last shipment

    def attach(self, peers: list[PeerRuntime]) -> None:
        self.local = {p.index: p for p in peers}
        edges = {e for ph in self.method.phases() for e in self.method.phase_topology(ph).edges()}
        # (source, receiver) pairs across processes; frozen sources never change, so their copies never need shipping
        self.plan = sorted((s, r) for s, r in edges if s != r and not (s in self.local and r in self.local))
        for s in sorted({s for s, r in self.plan if r in self.local}):
            copy = build_peer(self.cfg, self.method, s, self.device)
            for p in (q for m in copy.modules() for q in m.parameters()):
                p.requires_grad_(False)
            copy.optimizers.clear()
            copy.train_mode()
            self.copies[s] = copy
        self.plan = [(s, r) for s, r in self.plan if not self.cfg.peers[s].frozen]

    def distilling(self, step: int) -> bool:
        return step >= self.burn_in

    # ------------------------------------------------------------------ shipping weights
    def _ship(self) -> None:
        ops, received = [], {}
        sent = {}
        for s, r in self.plan:
            if s in self.local and r not in self.local:
                if s not in sent:
                    weights = _weights(self.local[s])
                    sent[s] = SignalLayout.of(weights).pack(weights)
                ops.append(dist.P2POp(dist.isend, sent[s], r, self.group))
            elif r in self.local and s not in self.local and s not in received:
                layout = SignalLayout.of(_weights(self.copies[s]))
                received[s] = (layout, torch.empty(layout.nbytes, dtype=torch.uint8, device=self.device))
                ops.append(dist.P2POp(dist.irecv, received[s][1], s, self.group))
        if ops:
            for work in dist.batch_isend_irecv(ops):
                work.wait()
        for s, (layout, buf) in received.items():
            self._load_copy(s, layout.unpack(buf, f"peer {s}'s weights"))
            self.meter.bytes += buf.numel()

    @torch.no_grad()
    def _load_copy(self, s: int, weights: dict[str, torch.Tensor]) -> None:
        target = _weights(self.copies[s])  # state_dict tensors share storage with the copy's parameters
        for name, value in weights.items():
            target[name].copy_(value)

    # ------------------------------------------------------------------ signals
    def exchange(self, phase: Phase, step: int, published: dict[int, Signals], inputs=None):
        self.meter.step(step)
        with self.meter.timed():
            block = step // self.every
            if block != self.block:
                self._ship()
                self.block = block
            topo = self.method.phase_topology(phase)
            computed: dict[int, Signals] = {}
            out: dict[int, dict[int, Signals]] = {}
            for k in published:
                out[k] = {}
                for s in topo.sources_of(k):
                    if s in published:
                        out[k][s] = published[s]
                        continue
                    if s not in computed:
                        computed[s] = self._signals_of(s, phase, inputs)
                    out[k][s] = computed[s]
        return out

    @torch.no_grad()
    def _signals_of(self, s: int, phase: Phase, inputs: torch.Tensor | None) -> Signals:
        if inputs is None:
            raise ValueError("the stale exchange needs the phase inputs to run its copies")
        copy = self.copies[s]
        signals = self.method.publish(phase, s, copy.net(inputs.detach()), copy.state)
        return {k: v.detach() for k, v in signals.items()}

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        return {
            "block": self.block,
            "copies": {
                str(s): {k: v.clone() for k, v in _weights(c).items()} for s, c in self.copies.items()
            },
        }

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        self.block = sd.get("block")
        for s, weights in sd.get("copies", {}).items():
            if int(s) in self.copies:
                self._load_copy(int(s), weights)
