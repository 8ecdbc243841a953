"""A population's parts: what each peer owns, how it is built and seeded, and the training step.

Both engines use this module unchanged. ``LocalEngine`` builds every peer in one process; ``RayEngine`` builds only
its own peer on each worker. Seeding is per peer (``seed_for(seed, "peer", k)``), so a peer's initial weights do not
depend on which process builds it or on how many other peers it builds first.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from kdray.checkpoint import load_peer_weights
from kdray.config import ExperimentConfig, OptimizerConfig, ScheduleConfig
from kdray.data import Batch, DataModule, DataSpec
from kdray.methods import Method, PeerContext, Phase, PopulationSpec, method_class
from kdray.methods.base import PeerSpec, Signals
from kdray.models import build_network, count_params, tap_shapes


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


def resolve_device(name: str) -> torch.device:
    if name == "cuda" or (name == "auto" and torch.cuda.is_available()):
        return torch.device("cuda")
    return torch.device("cpu")


# ------------------------------------------------------------------------------------------- optimizers, schedules
def make_optimizer(
    params: Iterable[nn.Parameter], ocfg: OptimizerConfig, lr: float | None = None
) -> torch.optim.Optimizer:
    params = [p for p in params if p.requires_grad]
    lr = ocfg.lr if lr is None else lr
    if ocfg.name == "sgd":
        return torch.optim.SGD(
            params, lr=lr, momentum=ocfg.momentum, nesterov=ocfg.nesterov and ocfg.momentum > 0,
            weight_decay=ocfg.weight_decay,
        )  # fmt: skip
    cls = torch.optim.Adam if ocfg.name == "adam" else torch.optim.AdamW
    return cls(params, lr=lr, betas=ocfg.betas, weight_decay=ocfg.weight_decay)


def lr_factor(schedule: ScheduleConfig, epoch: int, epochs: int) -> float:
    """Multiplier of the base learning rate during ``epoch`` (0-based), per epoch as in the CIFAR KD literature."""
    if epoch < schedule.warmup_epochs:
        return (epoch + 1) / (schedule.warmup_epochs + 1)
    if schedule.name == "constant":
        return 1.0
    if schedule.name == "multistep":
        return schedule.gamma ** sum(epoch >= m for m in schedule.milestones)
    span = max(1, epochs - schedule.warmup_epochs)
    return 0.5 * (1 + math.cos(math.pi * (epoch - schedule.warmup_epochs) / span))


# ------------------------------------------------------------------------------------------------------- peers
@dataclass
class PeerRuntime:
    """Everything one peer owns: its network, its private method state, its optimizers."""

    index: int
    name: str
    frozen: bool
    net: nn.Module  # a TappedNetwork: forward(x) -> {"logits": ..., <tap>: ...}
    state: nn.Module | None
    optimizers: dict[str, torch.optim.Optimizer] = field(default_factory=dict)
    base_lrs: dict[str, list[float]] = field(default_factory=dict)

    def modules(self) -> list[nn.Module]:
        return [m for m in (self.net, self.state) if m is not None]

    def train_mode(self) -> None:
        self.net.train(not self.frozen)
        if self.state is not None:
            self.state.train()

    def set_lr(self, factor: float) -> None:
        for group_name, opt in self.optimizers.items():
            for group, base in zip(opt.param_groups, self.base_lrs[group_name]):
                group["lr"] = base * factor

    def state_dict(self) -> dict[str, Any]:
        return {
            "net": self.net.model.state_dict(),
            "state": self.state.state_dict() if self.state is not None else {},
            "optimizers": {k: o.state_dict() for k, o in self.optimizers.items()},
        }

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        self.net.model.load_state_dict(sd["net"])
        if self.state is not None:
            self.state.load_state_dict(sd["state"])
        for k, o in self.optimizers.items():
            o.load_state_dict(sd["optimizers"][k])


def population_spec(cfg: ExperimentConfig, data: DataSpec, steps_per_epoch: int) -> PopulationSpec:
    """Shapes and sizes of every peer, measured by building each network once on the CPU."""
    taps = method_class(cfg.method.name).required_taps(cfg.method)
    input_shape = (data.in_channels, data.image_size, data.image_size)
    peers = []
    for k, p in enumerate(cfg.peers):
        with seeded(0):
            net = build_network(
                p.arch, data.num_classes, data.in_channels, taps=taps or None, **p.arch_kwargs
            )
        peers.append(
            PeerSpec(k, p.name, p.arch, p.frozen, count_params(net.model), tap_shapes(net, input_shape))
        )
    return PopulationSpec(
        tuple(peers), data.num_classes, input_shape, cfg.seed, cfg.train.epochs, steps_per_epoch
    )


def build_peer(cfg: ExperimentConfig, method: Method, k: int, device: torch.device) -> PeerRuntime:
    """Build peer k (network, private state, optimizers) exactly as every engine does."""
    pcfg = cfg.peers[k]
    pop = method.pop
    taps = method.required_taps(cfg.method)
    with seeded(seed_for(cfg.seed, "peer", k)):
        net = build_network(
            pcfg.arch, pop.num_classes, pop.input_shape[0], taps=taps or None, **pcfg.arch_kwargs
        )
    with seeded(seed_for(cfg.seed, "peer_state", k)):
        state = method.build_peer_state(k)
    if pcfg.checkpoint:
        load_peer_weights(net.model, pcfg.checkpoint, pcfg.checkpoint_peer, key=f"peers.{k}.checkpoint")
    net.to(device)
    if state is not None:
        state.to(device)
    peer = PeerRuntime(k, pcfg.name, pcfg.frozen, net, state)
    if pcfg.frozen:
        for p in net.parameters():
            p.requires_grad_(False)
        net.eval()
        return peer
    groups: dict[str, tuple[list[nn.Parameter], OptimizerConfig, float | None]] = {
        "net": (list(net.parameters()), cfg.train.optimizer, pcfg.lr)
    }
    for name, (params, ocfg) in method.optimizer_groups(k, net, state).items():
        groups[name] = (params, ocfg, None)
    for name, (params, ocfg, lr) in groups.items():
        opt = make_optimizer(params, ocfg, lr)
        peer.optimizers[name] = opt
        peer.base_lrs[name] = [g["lr"] for g in opt.param_groups]
    return peer


@dataclass
class SharedRuntime:
    """The population's shared module (a generator), one replica per process, and its optimizer."""

    module: nn.Module
    optimizer: torch.optim.Optimizer | None
    base_lrs: list[float]

    def set_lr(self, factor: float) -> None:
        if self.optimizer is not None:
            for group, base in zip(self.optimizer.param_groups, self.base_lrs):
                group["lr"] = base * factor

    def state_dict(self) -> dict[str, Any]:
        return {
            "module": self.module.state_dict(),
            "optimizer": self.optimizer.state_dict() if self.optimizer else {},
        }

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        self.module.load_state_dict(sd["module"])
        if self.optimizer is not None:
            self.optimizer.load_state_dict(sd["optimizer"])


def build_shared(cfg: ExperimentConfig, method: Method, device: torch.device) -> SharedRuntime | None:
    with seeded(seed_for(cfg.seed, "shared")):
        module = method.build_shared_state()
    if module is None:
        return None
    module.to(device)
    ocfg = method.shared_optimizer(module)
    opt = make_optimizer(module.parameters(), ocfg) if ocfg is not None else None
    return SharedRuntime(module, opt, [g["lr"] for g in opt.param_groups] if opt else [])


# ---------------------------------------------------------------------------------------------------- the step
def weighted_sum(terms: dict[str, Tensor], weight: Callable[[str], float]) -> Tensor:
    """``sum_t w_t * term_t``, skipping the multiplications by 1."""
    total: Tensor | None = None
    for name, value in terms.items():
        w = weight(name)
        part = value if w == 1.0 else w * value
        total = part if total is None else total + part
    assert total is not None, "a method's loss returned no terms"
    return total


def _detach(signals: Signals) -> Signals:
    return {k: v.detach() for k, v in signals.items()}


class Exchange:
    """Moves published signals between peers. ``LocalExchange`` hands over references; Ray exchanges ship bytes
    (``kdray.exchange``)."""

    def attach(self, peers: list[PeerRuntime]) -> None:
        """Called once this process's peers are built (the stale exchange copies their architectures)."""

    def exchange(
        self, phase: Phase, step: int, published: dict[int, Signals], inputs: Tensor | None = None
    ) -> dict[int, dict[int, Signals]]:
        """``published``: local peer -> its signals. Returns local peer -> {source peer -> signals}, the sources
        being those of ``method.phase_topology(phase)``. ``inputs``: what the networks saw in this phase (the
        stale exchange runs its copies of the source peers on it)."""
        raise NotImplementedError

    def distilling(self, step: int) -> bool:
        """False during a burn-in (stale exchange): the peers then train on the method's task terms only
        (``Method.task_terms``, default ``("ce",)``); every other term is computed and logged with weight 0."""
        return True

    def reduce_shared_grads(self, module: nn.Module) -> None:
        """Sum the shared module's gradients over all processes (no-op when everything is local)."""

    def stats(self) -> dict[str, float]:
        return {}


class LocalExchange(Exchange):
    def __init__(self, method: Method):
        self.method = method

    def exchange(self, phase, step, published, inputs=None):
        topology = self.method.phase_topology(phase)
        return {k: {s: published[s] for s in topology.sources_of(k) if s in published} for k in published}


class StepRunner:
    """Runs one training step of the method's phases for the peers that live in this process."""

    def __init__(
        self,
        cfg: ExperimentConfig,
        method: Method,
        peers: list[PeerRuntime],
        shared: SharedRuntime | None,
        exchange: Exchange,
        device: torch.device,
    ):
        self.cfg, self.method, self.peers, self.shared, self.exchange = cfg, method, peers, shared, exchange
        self.device = device
        self.phases = method.phases()
        self.amp = cfg.train.amp and device.type == "cuda"
        # Training accuracy is read off the first phase that trains the networks on the batch.
        self._acc_phase = next((ph for ph in self.phases if ph.optimizer == "net"), self.phases[0])
        # Peers that must run a forward in peer-scope phases: trainable ones, and frozen ones others learn from.
        sources = {s for ph in self.phases for s, _ in method.phase_topology(ph).edges()}
        self._forward_peers = [p for p in peers if not p.frozen or p.index in sources]

    def _autocast(self):
        if self.amp:
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def step(self, batch: Batch, epoch: int, step: int) -> dict[str, Tensor]:
        """One step; returns detached per-peer metrics (tensors, so the caller decides when to synchronise)."""
        rng = torch.Generator().manual_seed(seed_for(self.cfg.seed, "step", step))
        metrics: dict[str, Tensor] = {}
        last = None  # (inputs, outputs, received, published) of the previous phase
        for phase in self.phases:
            if step % phase.every:
                continue
            for _ in range(phase.repeat):
                last = self._run_phase(phase, batch, epoch, step, rng, last, metrics)
        return metrics

    def _run_phase(self, phase: Phase, batch: Batch, epoch: int, step: int, rng, last, metrics):
        method = self.method
        shared_scope = phase.scope == "shared"
        forward_peers = self.peers if shared_scope else self._forward_peers
        if phase.forward or last is None:
            with self._autocast():
                inputs = method.phase_inputs(phase, batch, self.shared.module if self.shared else None, rng)
                outs: dict[int, Signals] = {}
                for p in forward_peers:
                    grad = shared_scope or not p.frozen
                    with torch.set_grad_enabled(grad):
                        outs[p.index] = p.net(inputs)
                live = {
                    p.index: method.publish(phase, p.index, outs[p.index], p.state) for p in forward_peers
                }
            published = {k: _detach(v) for k, v in live.items()}
            received = self.exchange.exchange(phase, step, published, inputs)
        else:
            inputs, prev_outs, received, published = last
            inputs = inputs.detach()
            outs = {k: _detach(v) for k, v in prev_outs.items()}
            live = published
        participants = self.peers if shared_scope else [p for p in self.peers if not p.frozen]
        weights = self._weights(step)
        total: Tensor | None = None
        contexts = []
        with self._autocast():
            for p in participants:
                ctx = PeerContext(
                    p.index, phase.name, outs[p.index], received.get(p.index, {}), live.get(p.index, {}),
                    batch, inputs, p.state,
                    self.shared.module if self.shared else None, epoch, step,
                )  # fmt: skip
                terms = method.loss(phase, ctx)
                loss = weighted_sum(terms, weights)
                total = loss if total is None else total + loss
                prefix = "shared" if shared_scope else p.name
                for t, v in terms.items():
                    key = f"{prefix}/loss_{t}"
                    # No "0 + v": on a GPU every avoidable small op is a kernel launch in the hot step.
                    metrics[key] = metrics[key] + v.detach() if key in metrics else v.detach()
                for t, v in ctx.metrics.items():
                    metrics[f"{p.name}/{t}"] = torch.as_tensor(v, dtype=torch.float32)
                if phase is self._acc_phase and "logits" in outs[p.index]:
                    pred = outs[p.index]["logits"][: len(batch.y)].detach().argmax(1)
                    metrics[f"{p.name}/train_acc"] = (pred == batch.y).float().mean()
                contexts.append(ctx)
        # Zero only the groups this phase steps; each group zeroes before its own backward, so grads that
        # another phase's loss left on these parameters never leak into this update.
        if shared_scope:
            assert self.shared is not None and self.shared.optimizer is not None, (
                "shared phase without a shared optimizer"
            )
            self.shared.optimizer.zero_grad(set_to_none=True)
        else:
            for p in participants:
                p.optimizers[phase.optimizer].zero_grad(set_to_none=True)
        if total is not None and total.requires_grad:
            total.backward()
        if shared_scope:
            self.exchange.reduce_shared_grads(self.shared.module)
            self._clip(self.shared.module.parameters())
            self.shared.optimizer.step()
            method.after_shared_step(phase, self.shared.module)
        else:
            for p in participants:
                opt = p.optimizers[phase.optimizer]
                self._clip(q for g in opt.param_groups for q in g["params"])
                opt.step()
        for ctx in contexts:
            method.after_phase(phase, ctx)
        return inputs, outs, received, published

    def _weights(self, step: int):
        if self.exchange.distilling(step):
            return self.method.weight
        task_terms = self.method.task_terms
        return lambda t: self.method.weight(t) if t in task_terms else 0.0

    def _clip(self, params: Iterable[Tensor]) -> None:
        if self.cfg.train.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(list(params), self.cfg.train.grad_clip)


# ---------------------------------------------------------------------------------------------------- evaluation
@torch.no_grad()
def evaluate_peers(peers: list[PeerRuntime], data: DataModule, device: torch.device) -> dict[str, Any]:
    """Each local peer's summed correct count and CE over the validation set, plus the sum of the trainable peers'
    softmax outputs (for the ensemble). Sums, so that processes can add them up before dividing."""
    import torch.nn.functional as F

    modes = [p.net.training for p in peers]
    for p in peers:
        p.net.eval()
    correct = {p.index: torch.zeros((), dtype=torch.float64) for p in peers}
    loss = {p.index: torch.zeros((), dtype=torch.float64) for p in peers}
    ens_correct = torch.zeros((), dtype=torch.float64)
    prob_chunks: list[Tensor] = []
    labels: list[Tensor] = []
    n = 0
    for batch in data.val_batches():
        batch = batch.to(device)
        probs_sum = None
        for p in peers:
            logits = p.net(batch.x)["logits"].float()
            correct[p.index] += (logits.argmax(1) == batch.y).sum().double().cpu()
            loss[p.index] += F.cross_entropy(logits, batch.y, reduction="sum").double().cpu()
            if not p.frozen:
                pr = logits.softmax(1)
                probs_sum = pr if probs_sum is None else probs_sum + pr
        if probs_sum is not None:
            prob_chunks.append(probs_sum.cpu())
            ens_correct += (probs_sum.argmax(1) == batch.y).sum().double().cpu()
        labels.append(batch.y.cpu())
        n += len(batch.y)
    for p, mode in zip(peers, modes):
        p.net.train(mode)
    return {
        "n": n,
        "correct": correct,
        "loss": loss,
        "probs_sum": torch.cat(prob_chunks) if prob_chunks else None,
        "labels": torch.cat(labels),
    }
