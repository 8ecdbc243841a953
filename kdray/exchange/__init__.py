"""Exchanges: how published signals travel between peers that live in different processes.

``LocalExchange`` (:mod:`kdray.exchange.base`) hands over references inside one process. Between Ray Train workers, one
peer per worker (rank = peer index), ``engine.exchange`` picks one of:

- ``collective`` (:mod:`kdray.exchange.collective`): ``torch.distributed`` all-gather of one flat buffer, or point
  to point along the topology (a ring ships to one neighbour only);
- ``actor`` (:mod:`kdray.exchange.actor`): ``ray.put`` + a named actor holding the object references;
- ``stale`` (:mod:`kdray.exchange.stale`): codistillation, weights shipped every N steps, signals recomputed
  locally from the stale copies.

Each counts the bytes delivered to its peer and the time it spends, per step (``stats()``).
"""

from __future__ import annotations

import torch

from kdray.config import EngineConfig
from kdray.exchange.base import (
    DistributedExchange,
    Exchange,
    ExchangeError,
    ExchangeMeter,
    ExchangePlan,
    LocalExchange,
    Replica,
    SignalLayout,
    Signals,
)

EXCHANGES = ("collective", "actor", "stale")


def make_exchange(
    engine: EngineConfig,
    rank: int,
    world: int,
    device: torch.device,
    *,
    group=None,
    object_group=None,
    store_name: str | None = None,
    attempt: str = "",
    namespace: str | None = None,
) -> DistributedExchange:
    """The exchange ``engine.exchange`` names, for the rank-th of ``world`` processes (one peer per process)."""
    cfg = engine.exchange
    common = {"rank": rank, "world": world, "device": device, "group": group, "object_group": object_group}
    if cfg.name == "collective":
        from kdray.exchange.collective import CollectiveExchange

        return CollectiveExchange(split_wait=cfg.split_wait, **common)
    if cfg.name == "actor":
        from kdray.exchange.actor import ActorExchange

        return ActorExchange(store_name=store_name, attempt=attempt, namespace=namespace, **common)
    from kdray.exchange.stale import StaleExchange

    return StaleExchange(every=cfg.every, burn_in=cfg.burn_in, **common)


__all__ = [
    "EXCHANGES",
    "DistributedExchange",
    "Exchange",
    "ExchangeError",
    "ExchangeMeter",
    "ExchangePlan",
    "LocalExchange",
    "Replica",
    "SignalLayout",
    "Signals",
    "make_exchange",
]
