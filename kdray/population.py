"""A population in one process: the peers that live here, the shared module, the data, the method and the step.

Both engines build a :class:`Population`: ``LocalEngine`` with every peer, each Ray worker with its own peer only
(``local_ids=[rank]``). Seeding is per peer (``seed_for(seed, "peer", k)``), so a peer's initial weights do not
depend on which process builds it or on how many other peers it builds first. What a peer owns
(:class:`PeerRuntime`): its network, its private method state, its optimizers and their per-step schedulers, and
its per-sample buffers. The training step itself is :mod:`kdray.step`; the epoch loop is :mod:`kdray.loop`.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdray.checkpoint import check_state_shapes, load_peer_weights
from kdray.config import ExperimentConfig, OptimizerConfig
from kdray.data import Batch, DataModule, build_data
from kdray.data.augment import NORMALISATION
from kdray.errors import CheckpointError
from kdray.exchange import Exchange, ExchangePlan, LocalExchange
from kdray.exchange.base import weights_of
from kdray.methods import BufferSpec, Method, PopulationSpec, method_class
from kdray.methods.base import PeerSpec, Signals
from kdray.models import build_network, count_flops, count_params, tap_shapes
from kdray.schedules import build_scheduler
from kdray.seeds import seed_for, seeded

DTYPES = {"float32": torch.float32, "float64": torch.float64}


def resolve_device(name: str) -> torch.device:
    if name == "cuda" or (name == "auto" and torch.cuda.is_available()):
        return torch.device("cuda")
    return torch.device("cpu")


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


def replay_schedule(optimizer: torch.optim.Optimizer, schedule, step: int):
    """A fresh scheduler of ``optimizer`` from its base rates, stepped ``step`` times."""
    for group in optimizer.param_groups:
        group["lr"] = group["initial_lr"]
    scheduler = schedule(optimizer)
    with (
        warnings.catch_warnings()
    ):  # torch warns of a scheduler stepped before its optimizer: replaying, it is
        warnings.simplefilter("ignore", UserWarning)
        for _ in range(step):
            scheduler.step()
    return scheduler


def population_spec(cfg: ExperimentConfig, data: DataModule, steps_per_epoch: int) -> PopulationSpec:
    """Shapes and sizes of every peer, measured by building each network once on the CPU."""
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
    )


def balanced_threads(cfg: ExperimentConfig, spec: PopulationSpec) -> list[int]:
    """``engine.placement.balance: threads``: the CPUs of all workers (peers x ``cpus_per_peer``) shared out as torch
    threads in proportion to each peer's forward FLOPs (a frozen teacher only forwards: a third of a training
    step's cost), each share rounded to the nearest whole thread, at least one each. Ray Train reserves the same
    bundle for every worker; only the threads differ.

    The minimum of one can take the sum past the CPUs (ResNet-8 next to WRN-16-2 on two CPUs: shares 0.22 and 1.78,
    threads 1 and 2). That is deliberate: a peer whose share is under half a CPU waits at the exchange for most of
    every step, asleep, and its core then serves the large peer (on two cores this took that pair's step from 757
    to 612 ms; ``docs/benchmarks.md``). Rounding down instead would give the large peer one thread, as without
    balancing."""
    total = max(len(spec.peers), round(len(spec.peers) * cfg.engine.placement.cpus_per_peer))
    costs = [max(p.flops, 1) / (3 if p.frozen else 1) for p in spec.peers]
    shares = [total * c / sum(costs) for c in costs]
    threads = [max(1, round(s)) for s in shares]
    while sum(threads) < total:  # hand out what rounding left, to the largest remainders
        k = max(range(len(shares)), key=lambda i: shares[i] - threads[i])
        threads[k] += 1
    return threads


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


ECE_BINS = 15  # as the calibration literature (Guo et al. 2017) and the PS-KD paper report it


def calibration_sums(probs: Tensor, labels: Tensor) -> Tensor:
    """Per confidence bin (15 equal-width bins of max-probability): the sample count, the summed confidence and
    the number correct, as a (3, 15) float64 tensor; sums, so that batches and processes add up."""
    conf, pred = probs.max(1)
    bins = (conf * ECE_BINS).long().clamp_(max=ECE_BINS - 1)
    out = torch.zeros(3, ECE_BINS, dtype=torch.float64, device=probs.device)
    out[0].index_add_(0, bins, torch.ones_like(conf, dtype=torch.float64))
    out[1].index_add_(0, bins, conf.double())
    out[2].index_add_(0, bins, (pred == labels).double())
    return out.cpu()


def expected_calibration_error(sums: Tensor) -> float:
    """ECE = sum_b (n_b / N) |acc_b - conf_b| from :func:`calibration_sums`."""
    count, conf, correct = sums
    total = float(count.sum())
    return float((conf - correct).abs().sum()) / total if total else float("nan")


# ------------------------------------------------------------------------------------------------ the population
class _StaleCopy:
    """A frozen copy of a source peer for the stale exchange (:class:`kdray.exchange.Replica`)."""

    def __init__(self, peer: PeerRuntime, method: Method, phases: dict[str, Any]):
        self.peer, self.method, self.phases = peer, method, phases
        for p in (q for m in (peer.net, peer.state) if m is not None for q in m.parameters()):
            p.requires_grad_(False)
        peer.train_mode()

    def weights(self) -> dict[str, Tensor]:
        return weights_of({"net": self.peer.net.model, "state": self.peer.state})

    @torch.no_grad()
    def signals(self, phase: str, inputs: Tensor) -> Signals:
        published = self.method.publish(
            self.phases[phase], self.peer.index, self.peer.net(inputs), self.peer.state
        )
        return {k: v.detach() for k, v in published.items()}


class Population:
    """The peers of a population that live in this process, and everything they train with.

    ``local_ids``: which peers (all of them by default); ``exchange``: how signals reach peers in other processes
    (default: every peer here, :class:`LocalExchange`)."""

    def __init__(
        self,
        cfg: ExperimentConfig,
        local_ids: list[int] | None = None,
        device: torch.device | None = None,
        exchange: Exchange | None = None,
    ):
        from kdray.step import StepRunner

        self.cfg = cfg
        self.device = device or resolve_device(cfg.train.device)
        self.dtype = DTYPES[cfg.train.dtype]
        if cfg.train.threads:
            torch.set_num_threads(cfg.train.threads)
        method_cls = method_class(cfg.method.name)
        self.with_train_data = method_cls.data_source == "dataset"
        self.data = build_data(cfg.data, cfg.seed, with_train=self.with_train_data)
        steps = cfg.train.steps_per_epoch
        if self.with_train_data:
            steps = min(self.data.steps_per_epoch(), steps or self.data.steps_per_epoch())
        self.steps_per_epoch = steps
        self.spec = population_spec(cfg, self.data, steps)
        if cfg.engine.name == "ray" and cfg.engine.placement.balance == "threads" and local_ids is not None:
            torch.set_num_threads(balanced_threads(cfg, self.spec)[local_ids[0]])
        self.method = method_cls(cfg.method, self.spec)
        self.pairs = method_cls.batch_pairs == "class_pairs"
        ids = list(range(cfg.num_peers)) if local_ids is None else list(local_ids)
        labels = self.data.train_labels().to(self.device) if self.with_train_data else None
        self.peers = [build_peer(cfg, self.method, k, self.device, labels) for k in ids]
        self.shared = build_shared(cfg, self.method, self.device)
        self.exchange = exchange or LocalExchange()
        phases = {ph.name: ph for ph in self.method.phases()}
        self.exchange.attach(
            ExchangePlan(
                local=ids,
                edges={e for ph in phases.values() for e in self.method.phase_topology(ph).edges()},
                frozen={p.index for p in self.spec.peers if p.frozen},
                replica=lambda s: _StaleCopy(
                    build_peer(cfg, self.method, s, self.device, with_optimizers=False), self.method, phases
                ),
                live_weights=lambda k: weights_of(
                    {"net": self._peer(k).net.model, "state": self._peer(k).state}
                ),
            )
        )
        self.runner = StepRunner(self)

    def _peer(self, k: int) -> PeerRuntime:
        return next(p for p in self.peers if p.index == k)

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
            yield batch.to(self.device, self.dtype)

    def train_step(self, batch: Batch | None, epoch: int, step: int):
        """One training step of the method's phases, then one step of every scheduler; returns the step's
        :class:`~kdray.loop.MetricSums`."""
        metrics = self.runner.step(batch, epoch, step)
        for p in self.peers:
            for sched in p.schedulers.values():
                sched.step()
        if self.shared is not None and self.shared.scheduler is not None:
            self.shared.scheduler.step()
        return metrics

    def preview(self, epoch: int) -> Tensor | None:
        """The method's images of this epoch (:meth:`Method.preview`) as displayable pixels in [0, 1], or None."""
        rng = torch.Generator().manual_seed(seed_for(self.cfg.seed, "preview", epoch))
        images = self.method.preview(self.shared.module if self.shared else None, rng)
        if images is None:
            return None
        images = images.detach().float().cpu()
        stats = NORMALISATION.get(self.data.spec.name)
        if stats is not None:  # undo the dataset's normalisation
            mean = torch.tensor(stats[0]).view(1, -1, 1, 1)
            std = torch.tensor(stats[1]).view(1, -1, 1, 1)
            return (images * std + mean).clamp(0, 1)
        lo, hi = images.amin(), images.amax()
        return (images - lo) / (hi - lo).clamp_min(1e-8)

    def learning_rates(self) -> dict[str, float]:
        """Each local trainable peer's current network learning rate."""
        return {
            f"{p.name}/lr": p.optimizers["net"].param_groups[0]["lr"]
            for p in self.peers
            if "net" in p.optimizers
        }

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def evaluate(self, split: str) -> dict[str, Any]:
        """Each local peer's summed correct count and CE over ``split`` ("val" or "test"), plus the sum of the
        trainable peers' softmax outputs (for the ensemble). Sums, so that processes can add them up."""
        modes = [p.net.training for p in self.peers]
        for p in self.peers:
            p.net.eval()
        correct = {p.index: torch.zeros((), dtype=torch.float64) for p in self.peers}
        loss = {p.index: torch.zeros((), dtype=torch.float64) for p in self.peers}
        calibration = {p.index: torch.zeros(3, ECE_BINS, dtype=torch.float64) for p in self.peers}
        prob_chunks: list[Tensor] = []
        labels: list[Tensor] = []
        n = 0
        for batch in self.data.eval_batches(split):
            batch = batch.to(self.device, self.dtype)
            probs_sum = None
            for p in self.peers:
                logits = p.net(batch.x)["logits"].float()
                correct[p.index] += (logits.argmax(1) == batch.y).sum().double().cpu()
                loss[p.index] += F.cross_entropy(logits, batch.y, reduction="sum").double().cpu()
                calibration[p.index] += calibration_sums(logits.softmax(1), batch.y)
                if not p.frozen:
                    pr = logits.softmax(1)
                    probs_sum = pr if probs_sum is None else probs_sum + pr
            if probs_sum is not None:
                prob_chunks.append(probs_sum.cpu())
            labels.append(batch.y.cpu())
            n += len(batch.y)
        for p, mode in zip(self.peers, modes):
            p.net.train(mode)
        return {
            "n": n,
            "correct": correct,
            "loss": loss,
            "calibration": calibration,
            "probs_sum": torch.cat(prob_chunks) if prob_chunks else None,
            "labels": torch.cat(labels) if labels else torch.zeros(0, dtype=torch.int64),
        }

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self, rank: int = 0) -> dict[str, Any]:
        """This process's part of a population checkpoint (``exchange`` keyed by ``rank``)."""
        return {
            "peers": {p.name: p.state_dict() for p in self.peers},
            "shared": self.shared.state_dict() if self.shared is not None else None,
            "exchange": {rank: self.exchange.state_dict()},
        }

    def load_state_dict(self, sd: dict[str, Any], rank: int = 0) -> None:
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
        self.exchange.load_state_dict((sd.get("exchange") or {}).get(rank, {}))
