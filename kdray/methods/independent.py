"""Independent training: K peers, no exchange. The baseline every distillation method is measured against.

L_k = CE(y_ls, softmax(z_k)),   y_ls = (1 - e) onehot(y) + e / C     (label smoothing, Szegedy et al. 2016; e = 0: plain CE)

Label smoothing is the baseline that the self-distillation papers (TF-KD in particular) compare against.
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
    label_smoothing: float = Field(
        0.0, ge=0, lt=1, description="e: the share of the target spread over all classes"
    )


@register
class Independent(Method):
    name = "independent"
    Config = IndependentConfig
    terms = ("ce",)

    @classmethod
    def ignored_keys(cls, method, num_peers):
        return {"temperature": "method 'independent' trains on the labels alone and has no temperature"}

    min_peers = 1

    def build_topology(self) -> Topology:
        return no_exchange(self.pop.num_peers)

    def publish(self, phase: Phase, k, out, state):
        return {}

    def loss(self, phase: Phase, ctx: PeerContext) -> dict[str, Tensor]:
        return {
            "ce": F.cross_entropy(ctx.out["logits"], ctx.batch.y, label_smoothing=self.cfg.label_smoothing)
        }
