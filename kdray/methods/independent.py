"""Independent training: K peers, no exchange. The baseline every distillation method is measured against.

L_k = CE(y, softmax(z_k))
"""

from __future__ import annotations

import torch.nn.functional as F
from pydantic import Field
from torch import Tensor

from kdray.config import MethodConfig
from kdray.methods.base import Method, PeerContext, Phase
from kdray.methods.registry import register
from kdray.topology import Topology, no_exchange


class IndependentConfig(MethodConfig):
    weights: dict[str, float] = Field(default_factory=lambda: {"ce": 1.0})


@register
class Independent(Method):
    name = "independent"
    Config = IndependentConfig
    terms = ("ce",)
    min_peers = 1

    def build_topology(self) -> Topology:
        return no_exchange(self.pop.num_peers)

    def publish(self, phase: Phase, k, out, state):
        return {}

    def loss(self, phase: Phase, ctx: PeerContext) -> dict[str, Tensor]:
        return {"ce": F.cross_entropy(ctx.out["logits"], ctx.batch.y)}
