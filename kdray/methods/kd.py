"""Hinton KD: Distilling the Knowledge in a Neural Network (Hinton, Vinyals, Dean; 2015).

    L_s = w_ce CE(y, p_s) + w_kd T^2 KL(p_t^T || p_s^T)

The teacher is a frozen peer (``frozen: true``) loaded from a kdray checkpoint, run in eval mode. The classic
``(1 - a) CE + a T^2 KL`` is ``weights: {ce: 1 - a, kd: a}``.
"""

from __future__ import annotations

import torch.nn.functional as F
from pydantic import Field
from torch import Tensor

from kdray.config import MethodConfig
from kdray.losses import soft_target_kl
from kdray.methods.base import Method, PeerContext, Phase
from kdray.methods.registry import register
from kdray.topology import Topology, teacher_student


class KDConfig(MethodConfig):
    temperature: float = Field(4.0, gt=0)
    weights: dict[str, float] = Field(default_factory=lambda: {"ce": 0.1, "kd": 0.9})


@register
class HintonKD(Method):
    name = "kd"
    Config = KDConfig
    terms = ("ce", "kd")
    min_peers = 2
    needs_frozen_teacher = True

    def build_topology(self) -> Topology:
        teachers = [p.index for p in self.pop.peers if p.frozen]
        return teacher_student(self.pop.num_peers, teachers)

    def loss(self, phase: Phase, ctx: PeerContext) -> dict[str, Tensor]:
        t = self.cfg.temperature
        logits = ctx.out["logits"]
        teachers = ctx.from_sources("logits")
        return {"ce": F.cross_entropy(logits, ctx.batch.y), "kd": soft_target_kl(logits, teachers, t)}
