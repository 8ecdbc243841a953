"""PS-KD: Self-Knowledge Distillation with Progressive Refinement of Targets (Kim, Ji, Yoon, Hwang; ICCV 2021).

Each network learns from its own predictions of the previous epoch. Per sample x (by its dataset index):

    y~_t(x) = (1 - a_t) onehot(y) + a_t P_{t-1}(x),      a_t = a_T (epoch + 1) / epochs,   a_T = 0.8
    L_k     = w_soft_ce * SoftCE(y~_t(x), p_k(x))        (no temperature)
            [+ w_kl / (K - 1) sum_{l != k} KL(p_l || p_k)     (optional: PS-KD inside DML, weight 0 by default)]

P is a per-sample memory (N x C, a buffer the engine holds, dtype ``memory_dtype``) initialised to the one-hot labels
and overwritten after each optimizer step with that step's softmax predictions (detached); at epoch t the rows read
are those written in epoch t - 1 (older for the samples an epoch leaves out: the loader drops the last partial batch;
the authors' keeps it). What follows the authors' code (lgcnsai/PS-KD-Pytorch, METHODS.md [code]): the
target, the linear growth of a_t to a_T = 0.8 at the last epoch, the one-hot initialisation, the soft cross-entropy
without temperature, the memory written after the step with the (augmented-view) predictions. The optional mutual
term is kdray's composition with DML (a population of K PS-KD peers), not the paper's.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor

from kdray.config import MethodConfig
from kdray.errors import ConfigError
from kdray.losses import kl_divergence, soft_cross_entropy
from kdray.methods.base import BufferSpec, Method, PeerContext, Phase
from kdray.methods.registry import register
from kdray.topology import Topology, all_to_all, no_exchange

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def progressive_alpha(alpha_T: float, epoch: int, epochs: int) -> float:
    """``a_t = a_T (epoch + 1) / epochs`` (epoch counted from 0): a_T / epochs in the first epoch, a_T in the last."""
    return alpha_T * (epoch + 1) / epochs


def progressive_target(labels: Tensor, memory_rows: Tensor, alpha: float) -> Tensor:
    """``(1 - a) onehot(y) + a P_{t-1}(x)`` in float32."""
    onehot = F.one_hot(labels, memory_rows.shape[1]).float()
    return (1 - alpha) * onehot + alpha * memory_rows.float()


class PSKDConfig(MethodConfig):
    weights: dict[str, float] = Field(default_factory=lambda: {"soft_ce": 1.0, "kl": 0.0})
    alpha_T: float = Field(
        0.8, ge=0, le=1, description="a_T: the weight of the past predictions at the last epoch"
    )
    memory_dtype: Literal["float32", "float16", "bfloat16"] = Field(
        "float32", description="dtype of the N x C memory (float16 halves it; ImageNet-sized sets)"
    )


@register
class PSKD(Method):
    name = "pskd"
    Config = PSKDConfig
    terms = ("soft_ce", "kl")
    task_terms = ("soft_ce",)
    min_peers = 1

    @classmethod
    def ignored_keys(cls, method, num_peers):
        return {
            "temperature": "PS-KD's targets and its optional mutual term use no temperature (the authors')"
        }

    @classmethod
    def check_population(cls, cfg) -> None:
        super().check_population(cfg)
        if cfg.method.weights.get("kl", 0) > 0 and len(cfg.peers) < 2:
            raise ConfigError(
                "method.weights.kl", cfg.method.weights["kl"],
                "the mutual term (PS-KD inside DML) needs at least 2 peers; set it to 0 for one network",
            )  # fmt: skip

    def build_topology(self) -> Topology:
        mutual = self.cfg.weights.get("kl", 0) > 0 and self.pop.num_peers > 1
        return all_to_all(self.pop.num_peers) if mutual else no_exchange(self.pop.num_peers)

    def buffers(self, k: int) -> dict[str, BufferSpec]:
        return {"memory": BufferSpec((self.pop.num_classes,), DTYPES[self.cfg.memory_dtype], "onehot")}

    def publish(self, phase: Phase, k, out, state):
        return {"logits": out["logits"]} if self.topology.sinks_of(k) else {}

    def loss(self, phase: Phase, ctx: PeerContext) -> dict[str, Tensor]:
        logits = ctx.out["logits"]
        alpha = progressive_alpha(self.cfg.alpha_T, ctx.epoch, self.pop.epochs)
        target = progressive_target(ctx.batch.y, ctx.rows("memory"), alpha)
        ctx.write("memory", logits.detach().softmax(1))
        ctx.metrics["alpha_t"] = alpha
        terms = {"soft_ce": soft_cross_entropy(logits, target)}
        others = ctx.from_sources("logits")
        if others:
            terms["kl"] = sum(kl_divergence(logits, z) for z in others) / len(others)
        return terms
