"""DML: Deep Mutual Learning (Zhang, Xiang, Hospedales, Lu; CVPR 2018).

    L_k = w_ce CE(y, p_k) + w_kl T^2 / (K - 1) sum_{l != k} KL(p_l^T || p_k^T)

with p_l detached (it arrived over an exchange). The paper uses T = 1 and no T^2 factor (T^2 = 1 then); T is a knob
here. The paper updates peers alternately within a step; kdray updates them simultaneously from the same batch's
outputs, the usual choice in distributed use (documented in docs/methods.md).
"""

from __future__ import annotations

import torch.nn.functional as F
from pydantic import Field
from torch import Tensor

from kdray.config import MethodConfig
from kdray.losses import soft_target_kl
from kdray.methods.base import Method, PeerContext, Phase
from kdray.methods.registry import register
from kdray.topology import Topology, all_to_all


class DMLConfig(MethodConfig):
    weights: dict[str, float] = Field(default_factory=lambda: {"ce": 1.0, "kl": 1.0})


@register
class DML(Method):
    name = "dml"
    Config = DMLConfig
    terms = ("ce", "kl")
    min_peers = 2

    def build_topology(self) -> Topology:
        return all_to_all(self.pop.num_peers)

    def loss(self, phase: Phase, ctx: PeerContext) -> dict[str, Tensor]:
        t = self.cfg.temperature
        logits = ctx.out["logits"]
        others = ctx.from_sources("logits")
        return {"ce": F.cross_entropy(logits, ctx.batch.y), "kl": soft_target_kl(logits, others, t)}
