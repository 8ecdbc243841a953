"""What an exchange is told of a population (:class:`~kdray.exchange.ExchangePlan`): which peers live in this
process, who learns from whom over every phase, which peers never change, and, for the stale exchange, how to build
and run a frozen copy of a source peer (:class:`StaleCopy`). The glue between the population and the exchange: the
exchange never builds networks, the population never knows how its signals travel."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from kdray.exchange import ExchangePlan
from kdray.exchange.base import weights_of
from kdray.methods import Method
from kdray.methods.base import Signals
from kdray.models.sync_bn import convert_batchnorm
from kdray.population import PeerRuntime, Population, build_peer


class StaleCopy:
    """A frozen copy of a source peer for the stale exchange (:class:`kdray.exchange.Replica`)."""

    def __init__(self, peer: PeerRuntime, method: Method, phases: dict[str, Any]):
        self.peer, self.method, self.phases = peer, method, phases
        for p in (q for m in (peer.net, peer.state) if m is not None for q in m.parameters()):
            p.requires_grad_(False)
        peer.train_mode()

    def weights(self) -> dict[str, Tensor]:
        return weights_of({"net": self.peer.net.model, "state": self.peer.state})

    @torch.no_grad()
    def signals(self, phase: str, inputs: Tensor) -> Signals:
        published = self.method.publish(
            self.phases[phase], self.peer.index, self.peer.net(inputs), self.peer.state
        )
        return {k: v.detach() for k, v in published.items()}


def exchange_plan(pop: Population, norm_group: Any = None) -> ExchangePlan:
    """The plan of ``pop``'s peers, for ``exchange.attach``. ``norm_group``: this process is one of a
    data-parallel peer's workers and its BatchNorm sums statistics over that process group; the replicas it runs
    on its shard (the stale exchange's copies) do the same, so they normalise as one worker would."""
    method, cfg = pop.method, pop.cfg
    phases = {ph.name: ph for ph in method.phases()}

    def replica(s: int) -> StaleCopy:
        peer = build_peer(cfg, method, s, pop.device, with_optimizers=False)
        if norm_group is not None:
            for module in (peer.net, peer.state):
                if module is not None:
                    convert_batchnorm(module, norm_group)
        return StaleCopy(peer, method, phases)

    def local(k: int) -> PeerRuntime:
        return next(p for p in pop.peers if p.index == k)

    return ExchangePlan(
        local=[p.index for p in pop.peers],
        edges={e for ph in phases.values() for e in method.phase_topology(ph).edges()},
        frozen={p.index for p in pop.spec.peers if p.frozen},
        replica=replica,
        live_weights=lambda k: weights_of({"net": local(k).net.model, "state": local(k).state}),
    )
