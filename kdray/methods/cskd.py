"""CS-KD: Regularizing Class-wise Predictions via Self-knowledge Distillation (Yun, Park, Lee, Shin; CVPR 2020).

Each training sample x is paired with another sample x' of the same class (a class-pair batch: the data module
draws x' per sample, seeded by (seed, epoch, step)); the network's predictions on x are pulled towards its own
predictions on x', computed without gradient:

    L_k = w_ce CE(y, p_k(x)) + w_cls T^2 KL(p_k(x')^T || p_k(x)^T),       T = 4, w_cls = 1 (3 on fine-grained sets)

What follows the authors' code (alinlab/cs-kd, METHODS.md [code]): the class-wise pairing, CE on the first
half only, the pair's prediction under ``no_grad``, T = 4 and the T^2 factor, the KL summed over classes and
divided by the batch size. By default (``pair_forward: separate``) the pairs are forwarded as in that code, in
a second forward of their own under ``no_grad``, both forwards in train mode (both move the BatchNorm
statistics) -- but in the other order: kdray forwards the pairs x' first (an observing phase whose outputs the
loss phase reads), then the batch x with gradient; the authors' code forwards x, then x'. Train-mode BatchNorm
normalises each forward with its own batch's statistics, so the outputs, losses, gradients and weights are the
same in either order (tested against the authors' order by hand); only the order of the two running-statistics
updates per step differs, and with them the eval-time statistics, slightly: with BatchNorm momentum m, kdray's
running statistics after a step differ from the authors' by m^2 (s(x) - s(x')), s a batch's per-channel
statistic, a difference that then decays by (1 - m)^2 per step. Not a switch: forwarding x' after x would need
the loss phase to run before the pairs' forward.
``pair_forward: joint`` forwards [x, x'] as one batch of 2B instead (one BatchNorm batch) and detaches the second
half, a common reimplementation; it is not the authors' choice.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor

from kdray.config import MethodConfig
from kdray.losses import kl_divergence
from kdray.methods.base import Method, PeerContext, Phase
from kdray.methods.registry import register
from kdray.topology import Topology, no_exchange


class CSKDConfig(MethodConfig):
    temperature: float = Field(4.0, gt=0)
    weights: dict[str, float] = Field(default_factory=lambda: {"ce": 1.0, "cls": 1.0})
    pair_forward: Literal["separate", "joint"] = Field(
        "separate", description="separate: the authors' two forwards; joint: one forward of the 2B batch"
    )


@register
class CSKD(Method):
    name = "cskd"
    Config = CSKDConfig
    terms = ("ce", "cls")
    min_peers = 1
    batch_pairs = "class_pairs"

    def build_topology(self) -> Topology:
        return no_exchange(self.pop.num_peers)

    def phases(self) -> list[Phase]:
        if self.cfg.pair_forward == "joint":
            return [Phase("main")]
        return [Phase("pairs", optimizer=None), Phase("main")]

    def phase_inputs(self, phase, batch, shared, rng) -> Tensor:
        if phase.name == "pairs":
            return batch.pair.x
        if self.cfg.pair_forward == "joint":
            return torch.cat([batch.x, batch.pair.x])
        return batch.x

    def publish(self, phase, k, out, state):
        return {}

    def loss(self, phase: Phase, ctx: PeerContext) -> dict[str, Tensor]:
        t = self.cfg.temperature
        n = len(ctx.batch.y)
        logits = ctx.out["logits"]
        own = logits[:n]
        pair = logits[n:].detach() if self.cfg.pair_forward == "joint" else ctx.previous["logits"]
        return {"ce": F.cross_entropy(own, ctx.batch.y), "cls": (t * t) * kl_divergence(own, pair, t)}
