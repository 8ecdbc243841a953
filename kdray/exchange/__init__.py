"""Exchanges: how published signals travel between peers that live in different processes.

``LocalExchange`` (``kdray.population``) hands over references inside one process. Between Ray Train workers, one
peer per worker (rank = peer index), ``engine.exchange`` picks one of:

- ``collective`` (:mod:`kdray.exchange.collective`): ``torch.distributed`` all-gather of one flat buffer, or point
  to point along the topology (a ring ships to one neighbour only);
- ``actor`` (:mod:`kdray.exchange.actor`): ``ray.put`` + a named actor holding the object references;
- ``stale`` (:mod:`kdray.exchange.stale`): codistillation, weights shipped every N steps, signals recomputed
  locally from the stale copies.

Each counts the bytes delivered to its peer and the time it spends, per step (``stats()``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from kdray.config import ExperimentConfig
from kdray.exchange.base import DistributedExchange, ExchangeError, ExchangeMeter, SignalLayout

EXCHANGES = ("collective", "actor", "stale")


def exchange_factory(
    cfg: ExperimentConfig,
    rank: int,
    world: int,
    device: torch.device,
    *,
    group=None,
    object_group=None,
    store_name: str | None = None,
    attempt: str = "",
    namespace: str | None = None,
) -> Callable[[object], DistributedExchange]:
    """A factory ``method -> exchange`` for ``PopulationProcess`` (it builds the method, then the exchange)."""
    name = cfg.engine.exchange
    common = {"rank": rank, "world": world, "device": device, "group": group, "object_group": object_group}

    def make(method) -> DistributedExchange:
        if name == "collective":
            from kdray.exchange.collective import CollectiveExchange

            return CollectiveExchange(method, split_wait=cfg.engine.split_wait, **common)
        if name == "actor":
            from kdray.exchange.actor import ActorExchange

            return ActorExchange(
                method, store_name=store_name, attempt=attempt, namespace=namespace, **common
            )
        from kdray.exchange.stale import StaleExchange

        return StaleExchange(
            method, cfg=cfg, every=cfg.engine.stale_every, burn_in=cfg.engine.stale_burn_in, **common
        )

    return make


__all__ = [
    "EXCHANGES",
    "DistributedExchange",
    "ExchangeError",
    "ExchangeMeter",
    "SignalLayout",
    "exchange_factory",
]
