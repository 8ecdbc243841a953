"""The method interface: per-peer maths over exchanged, detached signals.

A method never sees an engine, a process group or Ray. Per training step the engine runs the method's
:class:`Phase` list in order. For a phase with ``forward=True`` it

1. asks :meth:`Method.phase_inputs` for the input every peer sees (the batch, or generated images),
2. runs each local peer's network once (logits + the taps the method declared),
3. asks :meth:`Method.publish` what each peer ships, detaches it, and lets the exchange deliver to every peer the
   signals of its topology sources,
4. calls :meth:`Method.loss` per peer, sums ``weight * term`` over named terms and back-propagates,
5. steps the optimizer group the phase names, then calls :meth:`Method.after_phase` (memories, EMA copies).

Because a peer's loss only involves its own graph and detached signals, the same code gives the same numbers with all
peers in one process and with one peer per Ray worker. A ``scope="shared"`` phase trains a module shared by the whole
population (a generator): each peer contributes the loss terms that involve its own outputs (others detached); the
gradients of the parts are summed (in one process: by autograd; across workers: by an all-reduce). For pairwise
terms that sum equals the gradient of the joint loss exactly.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import torch
from torch import Tensor, nn

from kdray.config import ExperimentConfig, MethodConfig, OptimizerConfig
from kdray.errors import ConfigError
from kdray.topology import Topology

if TYPE_CHECKING:
    from kdray.data import Batch

Signals = dict[str, Tensor]


@dataclass(frozen=True)
class PeerSpec:
    """What a method may know about a peer before anything is built."""

    index: int
    name: str
    arch: str
    frozen: bool
    num_params: int
    tap_shapes: dict[str, tuple[int, ...]]  # per-sample shapes, "logits" included


@dataclass(frozen=True)
class PopulationSpec:
    peers: tuple[PeerSpec, ...]
    num_classes: int
    input_shape: tuple[int, int, int]
    seed: int
    epochs: int
    steps_per_epoch: int

    @property
    def num_peers(self) -> int:
        return len(self.peers)

    @property
    def trainable(self) -> list[int]:
        return [p.index for p in self.peers if not p.frozen]


@dataclass(frozen=True)
class Phase:
    """One update inside a training step.

    ``optimizer``: the optimizer group stepped after this phase's backward ("net" = the peer's network with the
    experiment's optimizer and schedule; other names come from :meth:`Method.optimizer_groups`).
    ``scope``: "peer" trains each trainable peer's own parameters; "shared" trains the population's shared module,
    with every peer (frozen ones too) contributing its part of the loss.
    ``forward``: False reuses the previous phase's outputs and received signals, detached (e.g. a discriminator
    update on the features the generator step just produced).
    ``every`` / ``repeat``: run on steps where ``step % every == 0``, ``repeat`` times in a row.
    """

    name: str
    optimizer: str = "net"
    scope: Literal["peer", "shared"] = "peer"
    forward: bool = True
    every: int = 1
    repeat: int = 1


@dataclass
class PeerContext:
    """Everything one peer's loss may use in one phase."""

    k: int
    phase: str
    out: Signals  # own outputs: "logits" + taps, with grad (detached when the phase reuses outputs)
    received: dict[int, Signals]  # source peer index -> its published signals, detached
    published: (
        Signals  # what this peer published in this phase: with grad, or detached when outputs are reused
    )
    batch: Batch
    inputs: Tensor  # what the networks saw in this phase
    state: nn.Module | None  # this peer's private modules and buffers
    shared: nn.Module | None  # the population's shared module (a generator), if any
    epoch: int
    step: int  # global step, counted from 0
    metrics: dict[str, float] = field(default_factory=dict)  # diagnostics the method wants logged

    def from_sources(self, key: str = "logits") -> list[Tensor]:
        return [signals[key] for _, signals in sorted(self.received.items())]


class Method:
    """Base class. A subclass sets ``name``, ``Config``, ``terms`` and implements :meth:`loss`."""

    name: ClassVar[str]
    Config: ClassVar[type[MethodConfig]] = MethodConfig
    terms: ClassVar[tuple[str, ...]] = ()  # every loss term the method can produce (weights.<term> keys)
    # the terms a peer trains on before distillation starts (the stale exchange's burn-in weighs the others 0)
    task_terms: ClassVar[tuple[str, ...]] = ("ce",)
    min_peers: ClassVar[int] = 1
    max_peers: ClassVar[int | None] = None
    needs_frozen_teacher: ClassVar[bool] = False

    def __init__(self, cfg: MethodConfig, pop: PopulationSpec):
        self.cfg = cfg
        self.pop = pop
        self.topology = self.build_topology()

    # ------------------------------------------------------------------ config-time checks
    @classmethod
    def check_population(cls, cfg: ExperimentConfig) -> None:
        """Refuse populations the method cannot train (called while the config is validated)."""
        k = len(cfg.peers)
        if k < cls.min_peers:
            raise ConfigError(
                "peers", f"{k} peer(s)", f"method '{cls.name}' needs at least {cls.min_peers} peers"
            )
        if cls.max_peers is not None and k > cls.max_peers:
            raise ConfigError(
                "peers", f"{k} peers", f"method '{cls.name}' takes at most {cls.max_peers} peer(s)"
            )
        unknown = sorted(set(cfg.method.weights) - set(cls.terms))
        if unknown:
            raise ConfigError(
                f"method.weights.{unknown[0]}", cfg.method.weights[unknown[0]],
                f"method '{cls.name}' has loss terms {list(cls.terms)}",
            )  # fmt: skip
        frozen = [i for i, p in enumerate(cfg.peers) if p.frozen]
        if cls.needs_frozen_teacher and not frozen:
            raise ConfigError(
                "peers",
                "no frozen peer",
                f"method '{cls.name}' needs a teacher: a peer with frozen: true and checkpoint:",
            )
        for i in frozen:
            if not cfg.peers[i].checkpoint:
                raise ConfigError(
                    f"peers.{i}.checkpoint", None, "a frozen peer needs a kdray checkpoint to load"
                )
        if len(frozen) == k:
            raise ConfigError("peers", "all frozen", "at least one peer must be trainable")

    # ------------------------------------------------------------------ structure
    def build_topology(self) -> Topology:
        raise NotImplementedError

    @classmethod
    def required_taps(cls, cfg: MethodConfig) -> dict[str, str]:
        """Feature taps every network must expose: alias -> FX node name, or "default" (the last conv stage)."""
        return {}

    def phases(self) -> list[Phase]:
        return [Phase("main")]

    def phase_topology(self, phase: Phase) -> Topology:
        """Who receives whose signals in this phase (default: the method's topology for every phase)."""
        return self.topology

    def weight(self, term: str) -> float:
        return float(self.cfg.weights.get(term, 1.0))

    # ------------------------------------------------------------------ state
    def build_peer_state(self, k: int) -> nn.Module | None:
        """Private modules/buffers of peer k (discriminator, transfer layer, memory). Saved in checkpoints."""
        return None

    def build_shared_state(self) -> nn.Module | None:
        """A module shared by the population (replicated per worker, gradients summed)."""
        return None

    def optimizer_groups(
        self, k: int, net: nn.Module, state: nn.Module | None
    ) -> dict[str, tuple[list[nn.Parameter], OptimizerConfig]]:
        """Extra optimizer groups of peer k besides "net" (name -> params, optimizer settings)."""
        return {}

    def shared_optimizer(self, shared: nn.Module) -> OptimizerConfig | None:
        return None

    # ------------------------------------------------------------------ per step
    def phase_inputs(
        self, phase: Phase, batch: Batch, shared: nn.Module | None, rng: torch.Generator
    ) -> Tensor:
        """The input all peers see in this phase. ``rng`` is seeded from (seed, step): identical on every worker."""
        return batch.x

    def publish(self, phase: Phase, k: int, out: Signals, state: nn.Module | None) -> Signals:
        """What peer k ships to the peers that learn from it (the engine detaches it). Default: logits only."""
        return {"logits": out["logits"]}

    def loss(self, phase: Phase, ctx: PeerContext) -> dict[str, Tensor]:
        """Named, unweighted loss terms of one peer in one phase."""
        raise NotImplementedError

    @torch.no_grad()
    def after_phase(self, phase: Phase, ctx: PeerContext) -> None:
        """Called after the phase's optimizer step (memories, EMA copies)."""

    @torch.no_grad()
    def after_shared_step(self, phase: Phase, shared: nn.Module) -> None:
        """Called once per process after a shared phase's optimizer step (e.g. an EMA generator)."""


def frozen_parameters(modules: Iterable[nn.Module]) -> None:
    for module in modules:
        for p in module.parameters():
            p.requires_grad_(False)


def describe(method: type[Method]) -> dict[str, Any]:
    return {"name": method.name, "terms": list(method.terms), "min_peers": method.min_peers}
