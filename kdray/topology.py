"""Who learns from whom. A topology is a list of sources per peer; the exchange ships signals only along it."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Topology:
    """``sources[k]``: the peers whose signals peer k receives. ``kind`` is for logs and docs."""

    kind: str
    sources: tuple[tuple[int, ...], ...]

    @property
    def num_peers(self) -> int:
        return len(self.sources)

    def sources_of(self, k: int) -> tuple[int, ...]:
        return self.sources[k]

    def sinks_of(self, k: int) -> tuple[int, ...]:
        """The peers that need peer k's signals."""
        return tuple(j for j, src in enumerate(self.sources) if k in src)

    def edges(self) -> list[tuple[int, int]]:
        """``(source, receiver)`` pairs."""
        return [(s, k) for k, src in enumerate(self.sources) for s in src]


def no_exchange(num_peers: int) -> Topology:
    return Topology("none", tuple(() for _ in range(num_peers)))


def all_to_all(num_peers: int) -> Topology:
    """DML: every peer learns from every other peer."""
    return Topology(
        "all_to_all", tuple(tuple(j for j in range(num_peers) if j != k) for k in range(num_peers))
    )


def ring(num_peers: int) -> Topology:
    """AFD's cyclic scheme: peer k learns from peer (k - 1) mod K (1 -> 2 -> ... -> K -> 1)."""
    return Topology("ring", tuple(((k - 1) % num_peers,) for k in range(num_peers)))


def teacher_student(num_peers: int, teachers: list[int]) -> Topology:
    """Every non-teacher peer learns from all teachers; teachers learn from nobody."""
    return Topology(
        "teacher_student",
        tuple(() if k in teachers else tuple(teachers) for k in range(num_peers)),
    )
