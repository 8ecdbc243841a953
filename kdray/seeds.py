"""Derived seeds: every random stream of a run is a pure function of the run seed and a purpose."""

from __future__ import annotations

import contextlib
import hashlib

import torch


def seed_for(seed: int, *parts: object) -> int:
    """A stable 63-bit seed derived from the run seed and a purpose (independent of Python's hash salt)."""
    digest = hashlib.sha256(repr((seed, *parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


@contextlib.contextmanager
def seeded(seed: int):
    """Run a block under a fixed global torch seed, restoring the caller's RNG state after."""
    state = torch.get_rng_state()
    torch.manual_seed(seed)
    try:
        yield
    finally:
        torch.set_rng_state(state)
