"""One training step: the method's phases, in order, for the peers that live in this process, then one step of
every scheduler.

Per phase with a forward (:class:`~kdray.methods.base.Phase`): inputs -> each local peer's network once -> publish,
detach, exchange -> each trainable peer's named loss terms -> weighted sum -> backward -> the phase's optimizer
group steps -> per-sample buffer writes and the method's after-phase hook, under ``no_grad``. The global RNG is
reseeded from (seed, step, phase, peer) before each peer's forward, so dropout draws the same masks whether the
peers share a process or not, and a resumed run draws what the uninterrupted one drew.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor, nn

from kdray.data import Batch
from kdray.exchange import Exchange, LocalExchange
from kdray.methods.base import PeerContext, Phase, Signals
from kdray.metrics import MetricSums
from kdray.population import PeerRuntime, Population
from kdray.seeds import seed_for


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


@contextlib.contextmanager
def running_stats_kept(modules: Iterable[nn.Module], keep: bool):
    """With ``keep``: the BatchNorm running statistics of ``modules`` are what they were before the block (the
    forward still normalises with the batch's own statistics, as train mode does)."""
    if not keep:
        yield
        return
    norms = [
        m for module in modules for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
    ]
    saved = [
        (m, m.running_mean.clone() if m.running_mean is not None else None,
         m.running_var.clone() if m.running_var is not None else None,
         m.num_batches_tracked.clone() if m.num_batches_tracked is not None else None)
        for m in norms
    ]  # fmt: skip
    try:
        yield
    finally:
        with torch.no_grad():
            for m, mean, var, count in saved:
                if mean is not None:
                    m.running_mean.copy_(mean)
                if var is not None:
                    m.running_var.copy_(var)
                if count is not None:
                    m.num_batches_tracked.copy_(count)


@dataclass
class PhaseRun:
    """What a phase leaves for the next one: the inputs its networks saw, their outputs, the signals received from
    other peers and the signals this process published (a phase without a forward reuses them)."""

    inputs: Tensor
    outputs: dict[int, Signals]
    received: dict[int, dict[int, Signals]]
    published: dict[int, Signals]


class PeerWorkers(Protocol):
    """The workers of a data-parallel peer: their gradients are averaged before every optimizer step, and the
    rows each writes into a per-sample buffer reach every worker (one table per peer, whatever the shuffling)."""

    def average(self, params: list[Tensor]) -> None: ...

    def gather_rows(self, index: Tensor, values: Tensor) -> tuple[Tensor, Tensor]: ...


class StepRunner:
    """Runs training steps of the method's phases for the peers of one :class:`Population`; signals to and from
    peers in other processes go through ``exchange`` (default: every peer is here, :class:`LocalExchange`).
    ``data_parallel``: this process is one of a peer's several workers (its gradients are averaged with theirs)."""

    def __init__(
        self, pop: Population, exchange: Exchange | None = None, data_parallel: PeerWorkers | None = None
    ):
        self.pop = pop
        self.exchange = exchange or LocalExchange()
        self.data_parallel = data_parallel
        self.cfg, self.method, self.peers, self.shared = pop.cfg, pop.method, pop.peers, pop.shared
        self.device = pop.device
        self.phases = self.method.phases()
        self.amp = self.cfg.train.amp and self.device.type == "cuda"
        # Training accuracy is read off the first phase that trains the networks on the batch.
        self._acc_phase = next((ph for ph in self.phases if ph.optimizer == "net"), self.phases[0])
        # Peers that must run a forward in peer-scope phases: trainable ones, and frozen ones others learn from.
        sources = {s for ph in self.phases for s, _ in self.method.phase_topology(ph).edges()}
        self._forward_peers = [p for p in self.peers if not p.frozen or p.index in sources]

    def _autocast(self):
        if self.amp:
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def step(self, batch: Batch | None, epoch: int, step: int) -> MetricSums:
        """One training step: the method's phases, then one step of every scheduler. Returns its metrics as sums
        and counts (tensors: the caller decides when to synchronise)."""
        rng = torch.Generator().manual_seed(seed_for(self.cfg.seed, "step", step))
        metrics = MetricSums()
        last: PhaseRun | None = None
        for i, phase in enumerate(self.phases):
            if step % phase.every:
                continue
            for r in range(phase.repeat):
                last = self._run_phase(phase, (i, r), batch, epoch, step, rng, last, metrics)
        for p in self.peers:
            for scheduler in p.schedulers.values():
                scheduler.step()
        if self.shared is not None and self.shared.scheduler is not None:
            self.shared.scheduler.step()
        return metrics

    def _forward(
        self, phase: Phase, phase_run: tuple[int, int], step: int, inputs: Tensor, peers: list[PeerRuntime]
    ):
        """Each peer's network on ``inputs``; ``phase_run``: (the phase's index, its repeat), which seeds the RNG."""
        shared_scope = phase.scope == "shared"
        outs: dict[int, Signals] = {}
        for p in peers:
            torch.manual_seed(seed_for(self.cfg.seed, "forward", step, *phase_run, p.index))
            with torch.set_grad_enabled(shared_scope or not p.frozen):
                outs[p.index] = p.net(inputs)
        return outs

    def _run_phase(
        self, phase: Phase, phase_run, batch, epoch: int, step: int, rng, last: PhaseRun | None, metrics
    ) -> PhaseRun:
        # Restored after the backward: autograd checks that BatchNorm's saved inputs are not modified before it.
        keep = phase.bn_stats == "keep" and (phase.forward or last is None)
        with running_stats_kept((p.net for p in self.peers), keep=keep):
            return self._phase(phase, phase_run, batch, epoch, step, rng, last, metrics)

    def _phase(
        self, phase: Phase, phase_run, batch, epoch: int, step: int, rng, last: PhaseRun | None, metrics
    ) -> PhaseRun:
        method, exchange = self.method, self.exchange
        shared_scope = phase.scope == "shared"
        forward_peers = self.peers if shared_scope else self._forward_peers
        shared_module = self.shared.module if self.shared else None
        previous = {k: _detach(v) for k, v in last.outputs.items()} if last is not None else {}
        if phase.optimizer is None:
            # an observing forward: no loss, no update; the next phase reads its outputs as ctx.previous
            with self._autocast(), torch.no_grad():
                inputs = method.phase_inputs(phase, batch, shared_module, rng)
                outs = self._forward(phase, phase_run, step, inputs, forward_peers)
            return PhaseRun(inputs, outs, {}, {})
        if phase.forward or last is None:
            with self._autocast():
                inputs = method.phase_inputs(phase, batch, shared_module, rng)
                outs = self._forward(phase, phase_run, step, inputs, forward_peers)
                live = {
                    p.index: method.publish(phase, p.index, outs[p.index], p.state) for p in forward_peers
                }
            published = {k: _detach(v) for k, v in live.items()}
            received = exchange.exchange(phase.name, method.phase_topology(phase), step, published, inputs)
        else:
            inputs, received, published = last.inputs.detach(), last.received, last.published
            outs = {k: _detach(v) for k, v in last.outputs.items()}
            live = published
        participants = self.peers if shared_scope else [p for p in self.peers if not p.frozen]
        weights = self._weights(step)
        total: Tensor | None = None
        contexts = []
        shared_terms: dict[str, Tensor] = {}
        with self._autocast():
            for p in participants:
                ctx = PeerContext(
                    p.index, phase.name, outs[p.index], received.get(p.index, {}), live.get(p.index, {}),
                    batch, inputs, p.state, shared_module, epoch, step, buffers=p.buffers,
                    previous=previous.get(p.index, {}),
                )  # fmt: skip
                terms = method.loss(phase, ctx)
                loss = weighted_sum(terms, weights)
                total = loss if total is None else total + loss
                for t, v in terms.items():
                    if (
                        shared_scope
                    ):  # the peers' parts add up to the shared objective: one report per phase run
                        shared_terms[t] = shared_terms[t] + v.detach() if t in shared_terms else v.detach()
                    else:
                        metrics.add(f"{p.name}/loss_{t}", v)
                for t, v in ctx.metrics.items():
                    metrics.add(f"{p.name}/{t}", v)
                if phase is self._acc_phase and batch is not None and "logits" in outs[p.index]:
                    pred = outs[p.index]["logits"][: len(batch.y)].detach().argmax(1)
                    metrics.add(f"{p.name}/train_acc", (pred == batch.y).float().mean())
                contexts.append(ctx)
        # a process holding some of the peers reports its share of one report: the shares add up to 1; a worker of a
        # peer on M workers holds 1/M of that peer (its part: the mean of the peer's workers' values)
        workers = self.data_parallel.size if self.data_parallel is not None else 1
        for t, v in shared_terms.items():
            share = len(participants) / (self.pop.spec.num_peers * workers)
            metrics.add(f"shared/loss_{t}", v / workers, count=share)
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
            params = list(self.shared.module.parameters())
            exchange.reduce_shared_grads(params)  # summed over the peers (of this shard)
            averaged = exchange.averages_shared_grads  # (unequal M: the regrouped exchange averaged them)
            if self.data_parallel is not None and not averaged:  # ... and averaged over the shards
                self.data_parallel.average(params)
            self._clip(params)
            self.shared.optimizer.step()
            with torch.no_grad():
                method.after_shared_step(phase, self.shared.module)
        else:
            for p in participants:
                opt = p.optimizers[phase.optimizer]
                params = [q for g in opt.param_groups for q in g["params"]]
                if self.data_parallel is not None:
                    self.data_parallel.average(params)
                self._clip(params)
                opt.step()
        with torch.no_grad():
            for p, ctx in zip(participants, contexts):
                for name, values in ctx.writes.items():
                    buf = p.buffers[name]
                    index, values = ctx.batch.index, values.detach().to(buf.dtype)
                    if self.data_parallel is not None:
                        index, values = self.data_parallel.gather_rows(index, values)
                    buf[index] = values
                method.after_phase(phase, ctx)
        return PhaseRun(inputs, outs, received, published)

    def _weights(self, step: int):
        if self.exchange.distilling(step):
            return self.method.weight
        task_terms = self.method.task_terms
        return lambda t: self.method.weight(t) if t in task_terms else 0.0

    def _clip(self, params: Iterable[Tensor]) -> None:
        if self.cfg.train.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(list(params), self.cfg.train.grad_clip)
