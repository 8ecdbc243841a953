"""A population in one process: the peers that live here, the shared module, the data and the method.

Both engines build a :class:`Population`: ``LocalEngine`` with every peer, each Ray worker with its own peer only
(``local_ids=[rank]``). Seeding is per peer (``seed_for(seed, "peer", k)``), so a peer's initial weights do not
depend on which process builds it or on how many other peers it builds first. What a peer owns
(:class:`PeerRuntime`): its network, its private method state, its optimizers and their per-step schedulers, and
its per-sample buffers. The training step itself is :mod:`kdray.step`; the epoch loop is :mod:`kdray.loop`.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdray.checkpoint import check_state_shapes, load_checkpoint, load_peer_weights
from kdray.config import ExperimentConfig, OptimizerConfig, apply_overrides, validate
from kdray.data import Batch, DataModule, build_data
from kdray.errors import CheckpointError
from kdray.methods import BufferSpec, Method, PopulationSpec, method_class
from kdray.methods.base import PeerSpec
from kdray.models import build_network, count_flops, count_params, tap_shapes
from kdray.optim import make_optimizer
from kdray.schedules import build_scheduler, replay_schedule
from kdray.seeds import seed_for, seeded

DTYPES = {"float32": torch.float32, "float64": torch.float64}


def resolve_device(name: str) -> torch.device:
    if name == "cuda" or (name == "auto" and torch.cuda.is_available()):
        return torch.device("cuda")
    return torch.device("cpu")


# ------------------------------------------------------------------------------------------------------- peers
@dataclass
class PeerRuntime:
    """Everything one peer owns: its network, private method state, optimizers, schedulers, per-sample buffers."""

    index: int
    name: str
    frozen: bool
    net: nn.Module  # a TappedNetwork: forward(x) -> {"logits": ..., <tap>: ...}
    state: nn.Module | None
    optimizers: dict[str, torch.optim.Optimizer] = field(default_factory=dict)
    schedulers: dict[str, Any] = field(default_factory=dict)  # optimizer group -> its LRScheduler
    buffers: dict[str, Tensor] = field(default_factory=dict)
    schedule: Any = None  # (optimizer) -> a fresh LRScheduler for it, the population's plan

    def train_mode(self) -> None:
        self.net.train(not self.frozen)
        if self.state is not None:
            self.state.train()

    def state_dict(self) -> dict[str, Any]:
        return {
            "net": self.net.model.state_dict(),
            "state": self.state.state_dict() if self.state is not None else {},
            "optimizers": {k: o.state_dict() for k, o in self.optimizers.items()},
            "buffers": dict(self.buffers),
        }

    def load_state_dict(self, sd: dict[str, Any], step: int) -> None:
        """Restore the peer as it was after ``step`` global steps. The schedulers are not restored but replayed:
        rebuilt from this run's plan and stepped ``step`` times, so a resumed run follows the same per-step curve
        (the same float operations in the same order), and a run resumed with more epochs follows the longer
        plan from where it stands."""
        check_state_shapes(self.net.model, sd["net"], f"peer '{self.name}'")
        self.net.model.load_state_dict(sd["net"])
        if self.state is not None:
            check_state_shapes(self.state, sd["state"], f"peer '{self.name}' (its method's state)")
            self.state.load_state_dict(sd["state"])
        for k, o in self.optimizers.items():
            o.load_state_dict(sd["optimizers"][k])
        for k in self.schedulers:
            self.schedulers[k] = replay_schedule(self.optimizers[k], self.schedule, step)
        for k, buf in self.buffers.items():
            buf.copy_(sd["buffers"][k])


def population_spec(
    cfg: ExperimentConfig, data: DataModule, steps_per_epoch: int, shard: tuple[int, int] = (0, 1)
) -> PopulationSpec:
    """Shapes and sizes of every peer, measured by building each network once on the CPU; ``shard``: this
    process's slice of every global batch (a data-parallel peer's worker)."""
    taps = method_class(cfg.method.name).required_taps(cfg.method)
    spec = data.spec
    input_shape = (spec.in_channels, spec.image_size, spec.image_size)
    peers = []
    for k, p in enumerate(cfg.peers):
        with seeded(0):
            net = build_network(
                p.arch, spec.num_classes, spec.in_channels, taps=taps or None, **p.arch_kwargs
            )
        peers.append(
            PeerSpec(
                k, p.name, p.arch, p.frozen, count_params(net.model), tap_shapes(net, input_shape),
                count_flops(net.model, input_shape),
            )
        )  # fmt: skip
    return PopulationSpec(
        peers=tuple(peers),
        num_classes=spec.num_classes,
        input_shape=input_shape,
        seed=cfg.seed,
        epochs=cfg.train.epochs,
        steps_per_epoch=steps_per_epoch,
        train_len=spec.train_len,
        batch_size=cfg.data.batch_size,
        shard=shard,
    )


def _buffer(spec: BufferSpec, n: int, labels: Tensor | None, num_classes: int, device) -> Tensor:
    if spec.init == "onehot":
        if labels is None or spec.shape != (num_classes,):
            raise ValueError(
                f"a one-hot buffer needs training labels and shape ({num_classes},), got {spec.shape}"
            )
        return F.one_hot(labels, num_classes).to(device=device, dtype=spec.dtype)
    return torch.zeros((n, *spec.shape), dtype=spec.dtype, device=device)


def build_peer(
    cfg: ExperimentConfig,
    method: Method,
    k: int,
    device: torch.device,
    labels: Tensor | None = None,
    with_optimizers: bool = True,
) -> PeerRuntime:
    """Build peer k (network, private state, optimizers, schedulers, buffers) exactly as every engine does.
    ``labels``: the training labels, for buffers initialised to one-hot rows."""
    pcfg = cfg.peers[k]
    pop = method.pop
    dtype = DTYPES[cfg.train.dtype]
    taps = method.required_taps(cfg.method)
    init = ("peer", k) if pcfg.init_seed is None else ("peer", k, "init", pcfg.init_seed)
    with seeded(seed_for(cfg.seed, *init)):
        net = build_network(
            pcfg.arch, pop.num_classes, pop.input_shape[0], taps=taps or None, **pcfg.arch_kwargs
        )
    with seeded(seed_for(cfg.seed, "peer_state", k)):
        state = method.build_peer_state(k)
    if pcfg.checkpoint:
        load_peer_weights(net.model, pcfg.checkpoint, pcfg.checkpoint_peer, key=f"peers.{k}.checkpoint")
    net.to(device=device, dtype=dtype)
    if state is not None:
        state.to(device=device, dtype=dtype)
    peer = PeerRuntime(k, pcfg.name, pcfg.frozen, net, state)
    if pcfg.frozen:
        for p in net.parameters():
            p.requires_grad_(False)
        net.eval()
        return peer
    peer.buffers = {
        name: _buffer(spec, pop.train_len, labels, pop.num_classes, device)
        for name, spec in method.buffers(k).items()
    }
    if not with_optimizers:
        return peer
    net_lr = pcfg.lr or cfg.train.optimizer.lr
    groups: list[tuple[str, list[nn.Parameter], OptimizerConfig, float, bool]] = [
        ("net", list(net.parameters()), cfg.train.optimizer, net_lr, True)
    ]
    for name, (params, ocfg) in method.optimizer_groups(k, net, state).items():
        groups.append((name, params, ocfg, ocfg.lr, ocfg.schedule == "follow"))
    peer.schedule = functools.partial(
        build_scheduler,
        schedule=cfg.train.schedule,
        steps_per_epoch=pop.steps_per_epoch,
        epochs=cfg.train.epochs,
    )
    for name, params, ocfg, lr, follows in groups:
        opt = make_optimizer(params, ocfg, lr)
        peer.optimizers[name] = opt
        if follows:
            sched = peer.schedule(opt)
            if sched is not None:
                peer.schedulers[name] = sched
    return peer


@dataclass
class SharedRuntime:
    """The population's shared module (a generator), one replica per process, its optimizer and scheduler."""

    module: nn.Module
    optimizer: torch.optim.Optimizer | None
    scheduler: Any = None
    schedule: Any = None

    def state_dict(self) -> dict[str, Any]:
        return {
            "module": self.module.state_dict(),
            "optimizer": self.optimizer.state_dict() if self.optimizer else {},
        }

    def load_state_dict(self, sd: dict[str, Any], step: int) -> None:
        check_state_shapes(self.module, sd["module"], "the shared module (generator)")
        self.module.load_state_dict(sd["module"])
        if self.optimizer is not None:
            self.optimizer.load_state_dict(sd["optimizer"])
        if self.scheduler is not None:
            self.scheduler = replay_schedule(self.optimizer, self.schedule, step)


def build_shared(cfg: ExperimentConfig, method: Method, device: torch.device) -> SharedRuntime | None:
    with seeded(seed_for(cfg.seed, "shared")):
        module = method.build_shared_state()
    if module is None:
        return None
    module.to(device=device, dtype=DTYPES[cfg.train.dtype])
    ocfg = method.shared_optimizer(module)
    if ocfg is None:
        return SharedRuntime(module, None)
    opt = make_optimizer(module.parameters(), ocfg)
    schedule = functools.partial(
        build_scheduler,
        schedule=cfg.train.schedule,
        steps_per_epoch=method.pop.steps_per_epoch,
        epochs=cfg.train.epochs,
    )
    return SharedRuntime(module, opt, schedule(opt) if ocfg.schedule == "follow" else None, schedule)


# ------------------------------------------------------------------------------------------------ the population
class Population:
    """The peers of a population that live in this process, and what they train with: the method, the shared
    module, the data. A container: the step (:mod:`kdray.step`) and the loop (:mod:`kdray.loop`) act on it, the
    exchange is theirs, and it holds no reference back to either.

    ``local_ids``: which peers (all of them by default); ``data``: the dataset's splits (built from ``cfg.data``
    when not given: an engine passes the one it loaded); ``shard``: (m, M) for the m-th of a data-parallel
    peer's M workers, which trains on the m-th slice of every global batch."""

    def __init__(
        self,
        cfg: ExperimentConfig,
        local_ids: list[int] | None = None,
        device: torch.device | None = None,
        data: DataModule | None = None,
        shard: tuple[int, int] = (0, 1),
    ):
        self.cfg = cfg
        self.shard = shard
        self.device = device or resolve_device(cfg.train.device)
        self.dtype = DTYPES[cfg.train.dtype]
        method_cls = method_class(cfg.method.name)
        self.with_train_data = method_cls.data_source == "dataset"
        self.data = (
            data if data is not None else build_data(cfg.data, cfg.seed, with_train=self.with_train_data)
        )
        steps = cfg.train.steps_per_epoch
        if self.with_train_data:
            steps = min(self.data.steps_per_epoch(), steps or self.data.steps_per_epoch())
        self.steps_per_epoch = steps
        self.spec = population_spec(cfg, self.data, steps, shard)
        self.method = method_cls(cfg.method, self.spec)
        self.pairs = method_cls.batch_pairs == "class_pairs"
        ids = list(range(cfg.num_peers)) if local_ids is None else list(local_ids)
        labels = self.data.train_labels().to(self.device) if self.with_train_data else None
        self.peers = [build_peer(cfg, self.method, k, self.device, labels) for k in ids]
        self.shared = build_shared(cfg, self.method, self.device)

    # ------------------------------------------------------------------ training
    def batches(self, epoch: int, start_step: int = 0) -> Iterator[Batch | None]:
        """The batches of ``epoch`` from ``start_step`` on, on this process's device and dtype; None for every step
        of a population without training data (its method generates the inputs)."""
        for p in self.peers:
            p.train_mode()
        if not self.with_train_data:
            for _ in range(start_step, self.steps_per_epoch):
                yield None
            return
        for batch in self.data.train_batches(
            epoch, start_step=start_step, max_steps=self.steps_per_epoch - start_step, pairs=self.pairs
        ):
            yield batch.shard(*self.shard).to(self.device, self.dtype)

    def learning_rates(self) -> dict[str, float]:
        """Each local trainable peer's current network learning rate."""
        return {
            f"{p.name}/lr": p.optimizers["net"].param_groups[0]["lr"]
            for p in self.peers
            if "net" in p.optimizers
        }

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        """This process's part of a population checkpoint: its peers and the shared module."""
        return {
            "peers": {p.name: p.state_dict() for p in self.peers},
            "shared": self.shared.state_dict() if self.shared is not None else None,
        }

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        """Restore this process's part of a population checkpoint (taken after ``sd["step"]`` global steps). A
        checkpoint of another population (other shapes, missing parts) is one :class:`CheckpointError`."""
        try:
            step = int(sd.get("step", 0))
            for p in self.peers:
                p.load_state_dict(sd["peers"][p.name], step)
            if self.shared is not None and sd.get("shared") is not None:
                self.shared.load_state_dict(sd["shared"], step)
        except (RuntimeError, KeyError, TypeError, ValueError, IndexError) as exc:
            first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
            raise CheckpointError(f"the checkpoint does not fit this population ({first})") from None


def population_from_checkpoint(checkpoint: str | Path, overrides: list[str] | None = None, data: Any = None):
    """The population a checkpoint holds, rebuilt in this process with its weights (config, population, payload).
    ``data``: the dataset's splits when the caller holds them already (the run that wrote the checkpoint)."""
    payload = load_checkpoint(checkpoint)
    raw = apply_overrides(
        payload["config"], ["tracking.enabled=false", "train.progress=false", *(overrides or [])]
    )
    raw["engine"] = {"name": "local"}  # evaluation runs here, whatever engine trained it
    for peer in raw.get("peers") or []:  # ... and in one process, however many workers a peer trained on
        if isinstance(peer, dict):
            peer.pop("workers", None)
            peer.pop("sync_bn", None)
    cfg = validate(raw)
    for peer in cfg.peers:  # the weights come from this checkpoint, not from the files the run started from
        peer.checkpoint = None
    pop = Population(cfg, data=data)
    pop.load_state_dict(payload)
    return cfg, pop, payload
