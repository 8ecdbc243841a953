"""``engine.placement.balance: threads``: the torch threads of each Ray worker, from its peer's cost."""

from __future__ import annotations

from kdray.config import ExperimentConfig
from kdray.methods import PopulationSpec


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


def worker_threads(cfg: ExperimentConfig, spec: PopulationSpec, rank: int) -> int | None:
    """The torch threads of the Ray worker of peer ``rank``: its balanced share (``balance: threads``), else
    ``train.threads``; None leaves torch's default."""
    if cfg.engine.placement.balance == "threads":
        return balanced_threads(cfg, spec)[rank]
    return cfg.train.threads
