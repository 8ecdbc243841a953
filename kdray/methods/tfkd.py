"""TF-KD: Revisiting Knowledge Distillation via Label Smoothing Regularization (Yuan, Tay, Li, Wang, Feng; CVPR 2020).

Two teacher-free forms:

- ``mode: self`` (Tf-KD_self): a trained copy of the same network is the frozen teacher of standard KD. Stage 1
  trains the network; stage 2 distils from that stage's final weights (a peer with ``frozen: true`` and
  ``from_stage``, or a kdray ``checkpoint``)::

      L = w_ce CE(y, p_s) + w_kd * m * T^2 KL(p_t^T || p_s^T)

- ``mode: reg`` (Tf-KD_reg): a hand-made teacher puts ``reg_correct_prob`` (0.99) on the true class and spreads the
  rest evenly; as in the authors' code the teacher distribution is ``softmax(q / T)`` of those *probabilities* and
  the student's log-probabilities are taken at temperature 1, without a T^2 factor::

      L = w_ce CE(y, p_s) + w_reg * m * KL(softmax(q / T) || p_s)

``w_ce`` and ``w_kd`` / ``w_reg`` are the paper's (1 - a) and a. The multiplier m and ``reduction`` exist to
reproduce the published configs: the authors' code uses ``nn.KLDivLoss()``, whose default ``'mean'`` divides the KL
summed over the batch by batch x classes instead of the batch, so its KD term is C times smaller than the usual
batch mean, and their configs compensate by hand (x50 for ResNet-18 on CIFAR-100 with T = 6, x100 for the
regularisation). ``reduction: legacy_mean`` with their multiplier reproduces their loss exactly (tested against
``nn.KLDivLoss()``); kdray's default is ``batchmean`` with m = 1. What follows the code (METHODS.md [code]): both
losses, the 0.99 teacher of ``reg`` and its softmax over probabilities. Default a = 0.9 (weights 0.1/0.9) and T = 4
are kdray's; the CIFAR-100 configs in ``configs/`` carry the published values with their source.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor

from kdray.config import ExperimentConfig, MethodConfig
from kdray.errors import ConfigError
from kdray.losses import kl_divergence, kl_to_probs
from kdray.methods.base import Method, PeerContext, Phase
from kdray.methods.registry import register
from kdray.topology import Topology, no_exchange, teacher_student


class TFKDConfig(MethodConfig):
    mode: Literal["self", "reg"] = "self"
    temperature: float = Field(4.0, gt=0)
    weights: dict[str, float] = Field(default_factory=lambda: {"ce": 0.1, "kd": 0.9, "reg": 0.9})
    multiplier: float = Field(1.0, gt=0, description="m: the published configs' hand-made scale (x50, x100)")
    reduction: Literal["batchmean", "legacy_mean"] = Field(
        "batchmean", description="legacy_mean: nn.KLDivLoss()'s default, divided by batch x classes"
    )
    reg_correct_prob: float = Field(
        0.99, gt=0, lt=1, description="reg: the hand-made teacher's true-class mass"
    )


@register
class TFKD(Method):
    name = "tfkd"
    Config = TFKDConfig
    terms = ("ce", "kd", "reg")
    min_peers = 1

    @classmethod
    def check_population(cls, cfg: ExperimentConfig) -> None:
        super().check_population(cfg)
        frozen = [p for p in cfg.peers if p.frozen]
        if cfg.method.mode == "self" and len(frozen) != 1:
            raise ConfigError(
                "peers", f"{len(frozen)} frozen peer(s)",
                "tfkd mode 'self' needs exactly one frozen teacher: the trained copy (frozen: true, with from_stage: "
                "<stage> or checkpoint:); mode 'reg' needs none",
            )  # fmt: skip
        if cfg.method.mode == "reg" and frozen:
            raise ConfigError(
                "peers", f"{len(frozen)} frozen peer(s)", "tfkd mode 'reg' uses a hand-made teacher"
            )

    def build_topology(self) -> Topology:
        if self.cfg.mode == "reg":
            return no_exchange(self.pop.num_peers)
        return teacher_student(self.pop.num_peers, [p.index for p in self.pop.peers if p.frozen])

    def loss(self, phase: Phase, ctx: PeerContext) -> dict[str, Tensor]:
        cfg = self.cfg
        logits = ctx.out["logits"]
        terms = {"ce": F.cross_entropy(logits, ctx.batch.y)}
        if cfg.mode == "self":
            (teacher,) = ctx.from_sources("logits")
            t = cfg.temperature
            terms["kd"] = cfg.multiplier * t * t * kl_divergence(logits, teacher, t, cfg.reduction)
        else:
            terms["reg"] = cfg.multiplier * kl_to_probs(logits, self.regularising_teacher(ctx.batch.y, logits.shape[1]),
                                                        reduction=cfg.reduction)  # fmt: skip
        return terms

    def regularising_teacher(self, labels: Tensor, num_classes: int) -> Tensor:
        """``softmax(q / T)`` with q: ``reg_correct_prob`` on the true class, the rest spread evenly."""
        p = self.cfg.reg_correct_prob
        q = torch.full((len(labels), num_classes), (1 - p) / (num_classes - 1), device=labels.device)
        q[torch.arange(len(labels)), labels] = p
        return (q / self.cfg.temperature).softmax(1)
