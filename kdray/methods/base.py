"""The method interface: per-peer maths over exchanged, detached signals.

A method never sees an engine, a process group, Ray or MLflow (a test reads the imports). Per training step the
engine runs the method's :class:`Phase` list in order. For a phase with ``forward=True`` it

1. asks :meth:`Method.phase_inputs` for the input every peer sees (the batch, or generated images),
2. runs each local peer's network once (logits + the taps the method declared),
3. asks :meth:`Method.publish` what each peer ships, detaches it, and lets the exchange deliver to every peer the
   signals of its topology sources,
4. calls :meth:`Method.loss` per peer, sums ``weight * term`` over named terms and back-propagates,
5. steps the optimizer group the phase names; then, under ``torch.no_grad()`` (the engine's, not a decorator an
   override could drop), writes the rows the loss asked for into the peer's per-sample buffers
   (:meth:`PeerContext.write`) and calls :meth:`Method.after_phase` (EMA copies).

Because a peer's loss only involves its own graph and detached signals, the same code gives the same numbers with all
peers in one process and with one peer per Ray worker. A ``scope="shared"`` phase trains a module shared by the whole
population (a generator): each peer contributes the loss terms that involve its own outputs (others detached); the
gradients of the parts are summed (in one process: by autograd; across workers: by an all-reduce). For pairwise
terms that sum equals the gradient of the joint loss exactly.

What a method may declare besides its losses:

- per-peer private modules (:meth:`Method.build_peer_state`: discriminators, transfer layers, EMA copies as
  buffers) and extra optimizer groups (:meth:`Method.optimizer_groups`), each with its own schedule policy;
- per-sample buffers (:meth:`Method.buffers`): one row per training sample, held by the engine, read at the batch's
  indices, checkpointed with the peer;
- a shared module (:meth:`Method.build_shared_state`) and its optimizer;
- where its inputs come from (``data_source``): the training set, or a generator (no training set is built; an
  epoch is ``train.steps_per_epoch`` steps; validation still uses real data).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar, Literal

import torch
from torch import Tensor, nn

from kdray.config import AuxOptimizerConfig, ExperimentConfig, MethodConfig
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
    flops: int = 0  # forward FLOPs per sample: what a step of this peer costs, relatively


@dataclass(frozen=True)
class PopulationSpec:
    peers: tuple[PeerSpec, ...]
    num_classes: int
    input_shape: tuple[int, int, int]
    seed: int
    epochs: int
    steps_per_epoch: int
    train_len: int  # training samples (rows of a per-sample buffer); 0 when the inputs come from a generator
    batch_size: int  # the global batch (``data.batch_size``), whatever the number of workers of a peer
    # (m, M): this process is the m-th of each local peer's M data-parallel workers and trains on the m-th of M
    # equal, contiguous slices of every global batch (a method that makes its own inputs takes that slice)
    shard: tuple[int, int] = (0, 1)

    @property
    def num_peers(self) -> int:
        return len(self.peers)

    @property
    def trainable(self) -> list[int]:
        return [p.index for p in self.peers if not p.frozen]

    def shard_rows(self, x: Tensor) -> Tensor:
        """This process's slice of ``x``, rows of a whole global batch (:meth:`kdray.data.Batch.shard`'s slice)."""
        m, count = self.shard
        if count == 1:
            return x
        n = len(x) // count
        return x[m * n : (m + 1) * n]


@dataclass(frozen=True)
class BufferSpec:
    """A per-sample buffer of one peer: ``train_len`` rows of ``shape``, in ``dtype``, initialised to zeros or to
    the one-hot training labels (``shape`` must then be ``(num_classes,)``)."""

    shape: tuple[int, ...]
    dtype: torch.dtype = torch.float32
    init: Literal["zeros", "onehot"] = "zeros"


@dataclass(frozen=True)
class Phase:
    """One update inside a training step.

    ``optimizer``: the optimizer group stepped after this phase's backward ("net" = the peer's network with the
    experiment's optimizer and schedule; other names come from :meth:`Method.optimizer_groups`). None: an observing
    forward under ``no_grad`` (no loss, no update) whose outputs the next phase reads as ``ctx.previous`` (CS-KD's
    forward of the class-pair samples).
    ``scope``: "peer" trains each trainable peer's own parameters; "shared" trains the population's shared module,
    with every peer (frozen ones too) contributing its part of the loss. In a shared phase every peer's part
    returns the same term names (a peer with no share in a term returns 0 for it): each process reports its share
    of one report per term, and the shares add up to one only if every part reports every term.
    ``forward``: False reuses the previous phase's outputs and received signals, detached (e.g. a discriminator
    update on the features the generator step just produced).
    ``every`` / ``repeat``: run on steps where ``step % every == 0``, ``repeat`` times in a row.
    ``bn_stats``: "update" lets this phase's forward move the peers' BatchNorm running statistics (train mode does);
    "keep" restores them afterwards, so the eval-time statistics come from the peers' own training batches only
    (adversarial phases forward perturbed inputs or run a second time on the same batch).
    """

    name: str
    optimizer: str | None = "net"
    scope: Literal["peer", "shared"] = "peer"
    forward: bool = True
    every: int = 1
    repeat: int = 1
    bn_stats: Literal["update", "keep"] = "update"


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
    batch: Batch | None  # None when the inputs come from a generator
    inputs: Tensor  # what the networks saw in this phase
    state: nn.Module | None  # this peer's private modules and buffers
    shared: nn.Module | None  # the population's shared module (a generator), if any
    epoch: int
    step: int  # global step, counted from 0
    buffers: dict[str, Tensor] = field(default_factory=dict)  # this peer's per-sample buffers (whole tables)
    previous: Signals = field(default_factory=dict)  # this peer's outputs in the previous phase, detached
    metrics: dict[str, Tensor | float] = field(default_factory=dict)  # diagnostics the method wants logged
    writes: dict[str, Tensor] = field(default_factory=dict)  # buffer rows to write at the batch's indices

    def from_sources(self, key: str = "logits") -> list[Tensor]:
        return [signals[key] for _, signals in sorted(self.received.items())]

    def rows(self, name: str) -> Tensor:
        """This batch's rows of the per-sample buffer ``name`` (as stored: cast before doing maths in float32)."""
        return self.buffers[name][self.batch.index]

    def write(self, name: str, values: Tensor) -> None:
        """Overwrite this batch's rows of buffer ``name`` with ``values`` after the phase's optimizer step (the
        engine writes, detached and under ``no_grad``)."""
        if name not in self.buffers:
            raise KeyError(f"no per-sample buffer '{name}' (declared: {sorted(self.buffers)})")
        self.writes[name] = values


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
    # "dataset": batches of the training set; "generator": no training set, phase_inputs generates every input
    data_source: ClassVar[Literal["dataset", "generator"]] = "dataset"
    # "class_pairs": every batch also carries, for each sample, another sample of the same class (CS-KD)
    batch_pairs: ClassVar[Literal["none", "class_pairs"]] = "none"

    def __init__(self, cfg: MethodConfig, pop: PopulationSpec):
        self.cfg = cfg
        self.pop = pop
        self.topology = self.build_topology()

    # ------------------------------------------------------------------ config-time checks
    @classmethod
    def ignored_keys(cls, method: MethodConfig, num_peers: int) -> dict[str, str]:
        """Common keys this method (with these settings) does not use, and why: setting one is refused rather
        than silently ignored."""
        return {}

    @classmethod
    def check_data_parallel(cls, cfg: ExperimentConfig) -> None:
        """Refuse peers of several workers (``peers[i].workers > 1``) where the method needs what sharding does
        not support yet: class-pair batches (a pair must stay on the worker of its anchor)."""
        if cls.batch_pairs != "none":
            i = next(i for i, m in enumerate(cfg.peer_workers) if m > 1)
            key = f"peers.{i}.workers" if cfg.peers[i].workers else "engine.placement.workers_per_peer"
            raise ConfigError(
                key, cfg.peer_workers[i],
                f"1 for method '{cls.name}': peers of several workers do not support class-pair batches yet "
                "(supported: methods over a data set's batches or a generator's, with private per-peer state, "
                "per-sample buffers, a shared module such as ACN's or DFAD's generator, or frozen teachers: dml, "
                "afd, acn, kd, pskd, dfad, mad, ...)",
            )  # fmt: skip

    @classmethod
    def check_unequal_workers(cls, cfg: ExperimentConfig) -> None:
        """Refuse peers of unequal numbers of workers where the method trains a shared module (ACN's, DFAD's or
        MAD's generator) and the exchange is ``stale``: the stale exchange sums the shared gradient over the
        peers' first workers only (the other exchanges are regrouped: ``kdray/exchange/regroup.py``)."""
        if cls.build_shared_state is not Method.build_shared_state and cfg.engine.exchange.name == "stale":
            workers = cfg.peer_workers
            i = next(i for i, m in enumerate(workers) if m != workers[0])
            key = f"peers.{i}.workers" if cfg.peers[i].workers else "engine.placement.workers_per_peer"
            raise ConfigError(
                key, workers[i],
                f"{workers[0]}, as peer '{cfg.peers[0].name}' has (the population's workers per peer: {workers}): "
                f"method '{cls.name}' trains a module shared by the peers (a generator), and with "
                "engine.exchange: stale its peers need equal numbers of workers (or use engine.exchange: collective)",
            )  # fmt: skip

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
        for key, why in cls.ignored_keys(cfg.method, len(cfg.peers)).items():
            value = getattr(cfg.method, key)
            # a value other than the default would change nothing: say so (the default itself is what every
            # dumped config, a checkpoint's or a Ray worker's, carries)
            if value != type(cfg.method).model_fields[key].get_default(call_default_factory=True):
                raise ConfigError(f"method.{key}", value, why)
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
                f"method '{cls.name}' needs a teacher: a peer with frozen: true and checkpoint: (or from_stage:)",
            )
        for i in frozen:
            if not cfg.peers[i].checkpoint and not cfg.peers[i].from_stage:
                raise ConfigError(
                    f"peers.{i}.checkpoint",
                    None,
                    "a frozen peer needs weights: a kdray checkpoint, or from_stage: an earlier stage",
                )
        if len(frozen) == k:
            raise ConfigError("peers", "all frozen", "at least one peer must be trainable")
        if cls.data_source == "generator" and cfg.train.steps_per_epoch is None:
            raise ConfigError(
                "train.steps_per_epoch",
                None,
                f"method '{cls.name}' trains without training data (a generator makes every input), so an epoch "
                "has no natural length: set a number of steps",
            )

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

    def input_blocks(self, phase: Phase) -> int:
        """How many blocks of per-sample rows this phase's inputs stack (default 1): ACN's peer phase forwards
        ``[x, x~]``, MAD's student phase ``[G(z), G~(z')]``. A worker of a data-parallel peer stacks its shard of
        each block, so the rows of its signals are ``blocks x shard``; peers of unequal numbers of workers regroup
        them block by block (:mod:`kdray.exchange.regroup`)."""
        return 1

    def weight(self, term: str) -> float:
        return float(self.cfg.weights.get(term, 1.0))

    # ------------------------------------------------------------------ state
    def build_peer_state(self, k: int) -> nn.Module | None:
        """Private modules/buffers of peer k (discriminator, transfer layer, EMA copy). Saved in checkpoints."""
        return None

    def buffers(self, k: int) -> dict[str, BufferSpec]:
        """Per-sample buffers of peer k (name -> spec), e.g. PS-KD's memory of last epoch's predictions."""
        return {}

    def build_shared_state(self) -> nn.Module | None:
        """A module shared by the population (replicated per worker, gradients summed)."""
        return None

    def optimizer_groups(
        self, k: int, net: nn.Module, state: nn.Module | None
    ) -> dict[str, tuple[list[nn.Parameter], AuxOptimizerConfig]]:
        """Extra optimizer groups of peer k besides "net" (name -> params, optimizer settings). A group whose
        ``lr`` should be relative to the network's sets it before returning."""
        return {}

    def shared_optimizer(self, shared: nn.Module) -> AuxOptimizerConfig | None:
        return None

    # ------------------------------------------------------------------ per step
    def phase_inputs(
        self, phase: Phase, batch: Batch | None, shared: nn.Module | None, rng: torch.Generator
    ) -> Tensor:
        """The input all peers see in this phase. ``rng`` is seeded from (seed, step): identical on every worker."""
        return batch.x

    def publish(self, phase: Phase, k: int, out: Signals, state: nn.Module | None) -> Signals:
        """What peer k ships to the peers that learn from it (the engine detaches it). Default: logits only."""
        return {"logits": out["logits"]}

    def loss(self, phase: Phase, ctx: PeerContext) -> dict[str, Tensor]:
        """Named, unweighted loss terms of one peer in one phase."""
        raise NotImplementedError

    def after_phase(self, phase: Phase, ctx: PeerContext) -> None:
        """Called after the phase's optimizer step, under ``no_grad`` (EMA copies of private modules)."""

    def after_shared_step(self, phase: Phase, shared: nn.Module) -> None:
        """Called once per process after a shared phase's optimizer step, under ``no_grad`` (an EMA generator)."""

    def preview(self, shared: nn.Module | None, rng: torch.Generator) -> Tensor | None:
        """Images worth looking at after each epoch (a generator's samples, N x C x H x W in the network's input
        space), or None. The engine saves them as a grid in the run folder (``samples/``) and in MLflow."""
        return None
