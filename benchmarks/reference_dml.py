"""A minimal hand-written PyTorch DML loop: the yardstick for the LocalEngine's overhead and correctness.

It builds the same peers with the same seeds as kdray (so both start from identical weights) and trains them on
the same batches, but with nothing of kdray's machinery: forward, KL to the detached other peers, backward, step,
and a cosine learning rate stepped every step (what kdray's default schedule is, written here by hand).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from kdray.config import ExperimentConfig
from kdray.data import DataModule
from kdray.models import build_network
from kdray.seeds import seed_for, seeded


def build_reference_peers(cfg: ExperimentConfig, data: DataModule, dtype: torch.dtype = torch.float32):
    nets, opts = [], []
    for k, p in enumerate(cfg.peers):
        with seeded(seed_for(cfg.seed, "peer", k)):
            net = build_network(p.arch, data.spec.num_classes, data.spec.in_channels, **p.arch_kwargs).model
        net.to(dtype)
        o = cfg.train.optimizer
        opt = torch.optim.SGD(
            net.parameters(), lr=o.lr, momentum=o.momentum, nesterov=o.nesterov, weight_decay=o.weight_decay
        )
        nets.append(net)
        opts.append(opt)
    return nets, opts


def dml_step(nets, opts, x, y, temperature: float = 1.0) -> list[float]:
    logits = [net(x) for net in nets]
    losses = []
    for k, z in enumerate(logits):
        others = [o.detach() for j, o in enumerate(logits) if j != k]
        t = temperature
        kl = sum(
            F.kl_div(F.log_softmax(z / t, 1), F.softmax(o / t, 1), reduction="batchmean") for o in others
        ) / len(others)
        losses.append(F.cross_entropy(z, y) + t * t * kl)
    for opt in opts:
        opt.zero_grad(set_to_none=True)
    sum(losses).backward()
    for opt in opts:
        opt.step()
    return [float(v.detach()) for v in losses]


def train_reference(
    cfg: ExperimentConfig,
    data: DataModule,
    steps: int,
    total_steps: int | None = None,
    dtype: torch.dtype = torch.float32,
):
    """``steps`` steps of epoch 0; the cosine schedule spans ``total_steps`` (default: ``steps``)."""
    nets, opts = build_reference_peers(cfg, data, dtype)
    for net in nets:
        net.train()
    base = [opt.param_groups[0]["lr"] for opt in opts]
    total = total_steps or steps
    for i, batch in enumerate(data.train_batches(0, max_steps=steps)):
        for opt, lr in zip(opts, base):  # cosine annealing to 0 over the run, one value per step
            opt.param_groups[0]["lr"] = lr * 0.5 * (1 + math.cos(math.pi * i / total))
        dml_step(nets, opts, batch.x.to(dtype), batch.y, cfg.method.temperature)
        if i + 1 >= steps:
            break
    return nets
