"""Optimizers from their config sections (``train.optimizer`` and every auxiliary optimizer a method declares)."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from kdray.config import OptimizerConfig


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
