"""The exchange interface, the in-process exchange, and what every Ray exchange shares: the wire layout of a set of
signals, the meter, and the shared-gradient sum.

An exchange moves published signals (detached named tensors) from the peers that publish them to the peers that learn
from them, along a :class:`~kdray.topology.Topology`. It knows nothing of what the signals mean, of methods or of
how peers are built: the population tells it which peers live in this process and, for the stale exchange, how to
run a stale copy of a source peer (:class:`ExchangePlan`).

A set of named tensors (one peer's published signals, or a peer's weights) travels as one flat ``uint8`` buffer:
an 8-byte signature of its layout, then each tensor's bytes at a 16-byte aligned offset. Both ends know the layout
(negotiated once per phase, or derived from the architecture), so only bytes move; the signature catches a layout
that changed under way instead of letting a receiver read garbage.
"""

from __future__ import annotations

import contextlib
import hashlib
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
import torch.distributed as dist
from torch import Tensor, nn

from kdray.config import Section
from kdray.errors import KdrayError
from kdray.topology import Topology

Signals = dict[str, Tensor]

HEADER_BYTES = 8
ALIGN = 16


class ExchangeError(KdrayError):
    """Signals cannot be exchanged as the method declares them."""


def _align(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


def _dtype(name: str) -> torch.dtype:
    return getattr(torch, name.removeprefix("torch."))


@dataclass(frozen=True)
class SignalLayout:
    """Names, shapes, dtypes and byte offsets of a set of tensors packed into one buffer (header included)."""

    entries: tuple[tuple[str, tuple[int, ...], str, int], ...]  # (name, shape, dtype, offset)
    nbytes: int  # header + payload, aligned

    @classmethod
    def of(cls, tensors: Mapping[str, Tensor]) -> SignalLayout:
        entries, offset = [], _align(HEADER_BYTES)
        for name in sorted(tensors):
            t = tensors[name]
            entries.append((name, tuple(t.shape), str(t.dtype), offset))
            offset = _align(offset + t.numel() * t.element_size())
        return cls(tuple(entries), offset)

    @property
    def signature(self) -> int:
        digest = hashlib.blake2b(repr(self.entries).encode(), digest_size=8).digest()
        return int.from_bytes(digest, "little", signed=True)

    def pack(self, tensors: Mapping[str, Tensor], out: Tensor | None = None) -> Tensor:
        """The tensors as one ``uint8`` buffer of ``nbytes`` (written into ``out`` when given)."""
        first = next(iter(tensors.values()), None)
        device = first.device if first is not None else torch.device("cpu")
        buf = torch.zeros(self.nbytes, dtype=torch.uint8, device=device) if out is None else out
        buf[:HEADER_BYTES] = torch.tensor([self.signature], dtype=torch.int64).view(torch.uint8)
        for name, shape, dtype, offset in self.entries:
            t = tensors[name]
            if tuple(t.shape) != shape or str(t.dtype) != dtype:
                raise ExchangeError(
                    f"signal '{name}' is {tuple(t.shape)} {t.dtype}, its layout says {shape} {dtype}"
                )
            flat = t.detach().contiguous().reshape(-1).view(torch.uint8)
            buf[offset : offset + flat.numel()] = flat
        return buf

    def unpack(self, buf: Tensor, source: str = "a peer") -> dict[str, Tensor]:
        """Views into ``buf`` (no copy); checks the signature first."""
        sig = int(buf[:HEADER_BYTES].cpu().view(torch.int64)[0])
        if sig != self.signature:
            raise ExchangeError(
                f"the signals from {source} changed layout between steps (the collective exchange needs fixed "
                "shapes per phase); use engine.exchange=actor for signals whose shapes vary"
            )
        out = {}
        for name, shape, dtype, offset in self.entries:
            dt = _dtype(dtype)
            size = torch.Size(shape).numel() * torch.empty((), dtype=dt).element_size()
            out[name] = buf[offset : offset + size].view(dt).view(shape)
        return out

    def describe(self) -> tuple:
        return self.entries, self.nbytes

    @classmethod
    def from_description(cls, desc: tuple) -> SignalLayout:
        entries, nbytes = desc
        return cls(tuple((n, tuple(s), d, o) for n, s, d, o in entries), nbytes)


class ExchangeMeter:
    """Bytes delivered to this peer and wall time spent exchanging, per training step."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.bytes = 0
        self.seconds = 0.0
        self.wait_seconds: float | None = (
            None  # part of ``seconds`` spent waiting for the slowest peer, if split
        )
        self.steps = 0
        self._last_step: int | None = None

    def step(self, step: int) -> None:
        if step != self._last_step:
            self._last_step = step
            self.steps += 1

    @contextlib.contextmanager
    def timed(self):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds += time.perf_counter() - start

    @contextlib.contextmanager
    def waiting(self):
        """Time spent waiting for the other peers (counted in ``seconds`` too, by the enclosing :meth:`timed`)."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self.wait_seconds = (self.wait_seconds or 0.0) + time.perf_counter() - start

    def summary(self) -> dict[str, float]:
        steps = max(self.steps, 1)
        out = {"bytes_per_step": self.bytes / steps, "ms_per_step": 1000.0 * self.seconds / steps}
        if self.wait_seconds is not None:
            out["wait_ms_per_step"] = 1000.0 * self.wait_seconds / steps
        return out


def weights_of(modules: Mapping[str, nn.Module | None]) -> dict[str, Tensor]:
    """Parameters and buffers of several modules under one namespace (``net.conv1.weight``, ``state.disc...``)."""
    out = {}
    for prefix, module in modules.items():
        if module is not None:
            out.update({f"{prefix}.{k}": v for k, v in module.state_dict().items()})
    return out


class Replica(Protocol):
    """A stale copy of a source peer that this process can run (the stale exchange's)."""

    def weights(self) -> dict[str, Tensor]:
        """The copy's parameters and buffers by name; the tensors share storage with the copy (copy_ into them)."""
        ...

    def signals(self, phase: str, inputs: Tensor) -> Signals:
        """What the source would publish in ``phase`` on ``inputs`` (detached)."""
        ...


@dataclass
class ExchangePlan:
    """What an exchange is told about the population once this process's peers are built."""

    local: list[int]  # the peers that live in this process
    edges: set[tuple[int, int]] = field(default_factory=set)  # (source, receiver) over every phase
    frozen: set[int] = field(default_factory=set)  # peers that never change (no need to ship them twice)
    replica: Callable[[int], Replica] | None = None  # builds a stale copy of a peer (stale exchange)
    live_weights: Callable[[int], dict[str, Tensor]] | None = (
        None  # a local peer's weights, as Replica.weights
    )


class Exchange:
    """Moves published signals between peers."""

    # True: reduce_shared_grads leaves the population's gradient on every worker, averaged within data-parallel
    # peers already (the regrouped exchange of peers of unequal numbers of workers); the step then skips its own
    # average over the peer's workers
    averages_shared_grads = False

    def attach(self, plan: ExchangePlan) -> None:
        """Called once, after this process's peers are built."""

    def exchange(
        self,
        phase: str,
        topology: Topology,
        step: int,
        published: dict[int, Signals],
        inputs: Tensor | None = None,
    ) -> dict[int, dict[int, Signals]]:
        """``published``: local peer -> its detached signals. Returns local peer -> {source peer -> signals}, the
        sources being those ``topology`` names. ``inputs``: what the networks saw in this phase (the stale exchange
        runs its copies of the source peers on it)."""
        raise NotImplementedError

    def distilling(self, step: int) -> bool:
        """False during a burn-in (stale exchange): the peers then train on the method's task terms only
        (``Method.task_terms``); every other term is computed and logged with weight 0."""
        return True

    def reduce_shared_grads(self, params: list[nn.Parameter]) -> None:
        """Sum the shared module's gradients over all processes (nothing to do when everything is local)."""

    def stats(self) -> dict[str, float]:
        return {}

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        pass


class LocalExchange(Exchange):
    """Every peer in this process: the signals are handed over by reference."""

    def exchange(self, phase, topology, step, published, inputs=None):
        return {k: {s: published[s] for s in topology.sources_of(k) if s in published} for k in published}


@dataclass
class Wiring:
    """Where one worker's exchange sits: its peer index (``rank``) among ``world`` peers, its device, the process
    group of the signals (gloo on CPU, nccl on GPU; None: the default group; with data-parallel peers, the group of
    shard m of every peer), a gloo group for small Python objects, the run (its name and Ray namespace, and the
    attempt: a fresh id after every restart), and, for a peer of several workers, its peer group (an exchange that
    ships one copy of something per peer, not per worker, hands it on there)."""

    rank: int
    world: int
    device: torch.device
    group: Any = None
    object_group: Any = None
    run_name: str = ""
    namespace: str | None = None
    attempt: str = ""
    global_ranks: list[int] | None = (
        None  # peer -> global rank of its worker in ``group`` (None: the identity)
    )
    # a data-parallel peer: the process group of its workers and their global ranks, shard order (None: one worker)
    peer_group: Any = None
    peer_ranks: list[int] | None = None

    def where(self) -> tuple:
        """The positional arguments of :class:`DistributedExchange`."""
        return (self.rank, self.world, self.device, self.group, self.object_group, self.global_ranks)


class DistributedExchange(Exchange):
    """An exchange between the ranks of a ``torch.distributed`` group: one peer per rank (rank = peer index).

    ``group``: the process group of the signals (gloo on CPU, nccl on GPU); ``object_group``: a gloo group for
    small Python objects (layouts). Shared-module gradients are always summed over ``group``.

    A subclass is one ``engine.exchange`` choice: it registers itself (``@EXCHANGES.register``) under its
    ``name``, carries its config section as ``Config`` (a :class:`~kdray.config.Section` whose ``name`` is the
    exchange's), and builds itself from that section (:meth:`create`). The driver may set up what the workers
    share before they start (:meth:`prepare`, e.g. the actor exchange's signal store).
    """

    name = "distributed"
    Config: type[Section] = Section
    # peers of unequal numbers of workers: False, the exchange moves per-sample signals between the peers' first
    # workers and :class:`~kdray.exchange.regroup.RegroupedExchange` gathers and scatters them within each peer;
    # True, it copes with the peer groups itself (the stale exchange: weights between first workers)
    handles_peer_groups = False

    @classmethod
    def create(cls, cfg: Section, wiring: Wiring) -> DistributedExchange:
        """This worker's exchange from its config section (``engine.exchange``)."""
        return cls(*wiring.where())

    @classmethod
    def prepare(cls, run_name: str, namespace: str | None) -> list[Any]:
        """On the driver, before the workers start: what the workers' exchanges will look up (Ray actors); the
        driver keeps the handles for the run and kills them at its end."""
        return []

    def __init__(
        self,
        rank: int,
        world: int,
        device: torch.device,
        group=None,
        object_group=None,
        global_ranks: list[int] | None = None,
    ):
        self.rank, self.world, self.device = rank, world, device
        self.group, self.object_group = group, object_group
        # peer -> the global rank of its worker in this group (point-to-point calls take global ranks); the
        # identity with one worker per peer, shard m of every peer with data-parallel peers
        self.global_ranks = global_ranks or list(range(world))
        self.meter = ExchangeMeter()

    def all_gather_objects(self, obj: Any) -> list[Any]:
        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, obj, group=self.object_group)
        return out

    def reduce_shared_grads(self, params: list[nn.Parameter]) -> None:
        """All-reduce (sum) of the shared module's gradients: every replica then takes the same update.

        A parameter that got no gradient on any rank keeps ``grad = None`` (the optimizer skips it, as in one
        process); one that got a gradient somewhere gets the sum, zeros standing in for the ranks without one.
        The sum runs in the parameters' own dtype (a float64 run stays float64 end to end).
        """
        params = [p for p in params if p.requires_grad]
        if not params or self.world == 1:
            return
        with self.meter.timed():
            dtype = params[0].dtype
            has = torch.tensor([p.grad is not None for p in params], dtype=dtype, device=params[0].device)
            flat = torch.cat(
                [
                    (p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).to(dtype)
                    for p in params
                ]
                + [has]
            )
            dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=self.group)
            self.meter.bytes += flat.numel() * flat.element_size()
            got = flat[-len(params) :].tolist()
            offset = 0
            for p, g in zip(params, got):
                n = p.numel()
                if g > 0:
                    p.grad = flat[offset : offset + n].view_as(p).to(p.dtype).clone()
                offset += n

    def stats(self) -> dict[str, float]:
        """This peer's exchange figures since the last call (the meter restarts)."""
        out = self.meter.summary()
        self.meter.reset()
        return out
