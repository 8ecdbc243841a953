"""Exchanges: how published signals travel between peers that live in different processes.

``LocalExchange`` (:mod:`kdray.exchange.base`) hands over references inside one process. Between Ray Train workers, one
peer per worker (rank = peer index), ``engine.exchange`` picks one of the registered exchanges (each file registers
its class, its config section and its factory; a new exchange is a new file here):

- ``collective`` (:mod:`kdray.exchange.collective`): ``torch.distributed`` all-gather of one flat buffer, or point
  to point along the topology (a ring ships to one neighbour only);
- ``actor`` (:mod:`kdray.exchange.actor`): ``ray.put`` + a named actor holding the object references;
- ``stale`` (:mod:`kdray.exchange.stale`): codistillation, weights shipped every N steps, signals recomputed
  locally from the stale copies.

Each counts the bytes delivered to its peer and the time it spends, per step (``stats()``).
"""

from __future__ import annotations

from kdray.config import Section
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
    Wiring,
)
from kdray.registry import EXCHANGES


def make_exchange(cfg: Section, wiring: Wiring) -> DistributedExchange:
    """The exchange that the config section ``engine.exchange`` names, for one worker."""
    return EXCHANGES.lookup(cfg.name).create(cfg, wiring)


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
    "Wiring",
    "make_exchange",
]
