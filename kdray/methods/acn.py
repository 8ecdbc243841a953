"""ACN: Adversarial Co-distillation Networks (Zhang, Hu, Qin, Xu, Wang; Pattern Recognition 111, 2021).

n classifiers co-distil on real images and on *divergent examples*: inputs, generated from the training images
themselves, on which the classifiers disagree. A generator and the peers play an adversarial game in alternating
phases. No extra data.

From the paper (abstract): the two alternating phases (a GAN-style phase that generates divergent examples and a
co-distillation phase), that only the standard training set is used, and the names of the two stabilisers,
*Weakly Residual Connection* and *Restricted Adversarial Search*.

Reconstructed here (the paper's equations were out of reach; every choice below is a config key, see
docs/methods.md). Weakly residual generator ``x~ = x + eps * g(x)`` with ``g`` in [-1, 1], so x~ stays near x and
keeps its label. The generator *maximises* the peers' mean pairwise divergence on x~ (``divergence``: kl or js)::

    L_gen = -w_gen * 1/(K(K-1)) sum_{a != b} D(p_a(x~), p_b(x~))  [+ w_gen_label * mean_k CE(z_k(x~), y)]

The search is restricted by bounding the per-pixel RMS of the perturbation, ``||x~ - x||_2 / sqrt(d) <= radius``,
by projection (rescaling) or by a penalty ``w_bound * relu(rms - radius)^2`` (``restrict``). The peers minimise::

    L_k = w_ce CE(y, p_k(x)) + w_kl T^2 mean_l KL(p_l(x)^T || p_k(x)^T) + w_kl_div T^2 mean_l KL(p_l(x~)^T || p_k(x~)^T)

The generator phase is split per peer for the distributed engine: peer k's part holds the terms in which its own
output appears, every other peer's output detached. Each term D(p_a, p_b) then reaches the generator once through
a's part and once through b's, so the parts' gradients add up to the joint gradient exactly (tests prove it).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from kdray.config import AuxOptimizerConfig, MethodConfig
from kdray.losses import js_divergence, kl_divergence
from kdray.methods.base import Method, PeerContext, Phase
from kdray.methods.registry import register
from kdray.topology import Topology, all_to_all


class ACNConfig(MethodConfig):
    temperature: float = Field(1.0, gt=0)
    weights: dict[str, float] = Field(
        default_factory=lambda: {
            "ce": 1.0,
            "kl": 1.0,
            "kl_div": 1.0,
            "gen": 1.0,
            "gen_label": 0.0,
            "bound": 10.0,
        }
    )
    eps: float = Field(0.1, gt=0, description="weak residual scale: x~ = x + eps * g(x)")
    radius: float = Field(0.05, gt=0, description="restricted search: bound on the per-pixel RMS of x~ - x")
    restrict: Literal["projection", "penalty", "none"] = "projection"
    divergence: Literal["kl", "js"] = "kl"
    gen_hidden: int = Field(32, ge=1)
    gen_layers: int = Field(2, ge=1)
    gen_optimizer: AuxOptimizerConfig = AuxOptimizerConfig(
        name="adam", lr=1e-3, betas=(0.5, 0.999), weight_decay=0.0, schedule="constant"
    )
    gen_every: int = Field(1, ge=1, description="run the generator phase every N steps")
    gen_bn_stats: Literal["keep", "update"] = Field(
        "keep",
        description="whether the generator phase's forward of the divergent examples moves the peers' BatchNorm "
        "running statistics ('keep': only the co-distillation forward does)",
    )


@register
class ACN(Method):
    name = "acn"
    Config = ACNConfig
    terms = ("ce", "kl", "kl_div", "gen", "gen_label", "bound")
    min_peers = 2

    def build_topology(self) -> Topology:
        return all_to_all(self.pop.num_peers)

    def phases(self) -> list[Phase]:
        return [
            Phase(
                "gen",
                optimizer="shared",
                scope="shared",
                every=self.cfg.gen_every,
                bn_stats=self.cfg.gen_bn_stats,
            ),
            Phase("codistill", optimizer="net"),
        ]

    def build_shared_state(self) -> nn.Module:
        from kdray.models.generators import ResidualImageGenerator

        return ResidualImageGenerator(self.pop.input_shape[0], self.cfg.gen_hidden, self.cfg.gen_layers)

    def shared_optimizer(self, shared: nn.Module) -> AuxOptimizerConfig:
        return self.cfg.gen_optimizer

    # ------------------------------------------------------------------ divergent examples
    def perturb(self, x: Tensor, generator: nn.Module) -> Tensor:
        """``x~ = x + eps * g(x)``, projected onto the RMS ball of ``radius`` when ``restrict: projection``."""
        delta = self.cfg.eps * generator(x)
        if self.cfg.restrict == "projection":
            rms = perturbation_rms(delta)
            scale = torch.clamp(self.cfg.radius / rms.clamp_min(1e-12), max=1.0)
            delta = delta * scale.view(-1, *([1] * (delta.dim() - 1)))
        return x + delta

    def input_blocks(self, phase: Phase) -> int:
        return 1 if phase.name == "gen" else 2  # [x, x~]

    def phase_inputs(self, phase: Phase, batch, shared, rng) -> Tensor:
        if phase.name == "gen":
            return self.perturb(batch.x, shared)
        with torch.no_grad():
            x_div = self.perturb(batch.x, shared)
        return torch.cat([batch.x, x_div])

    # ------------------------------------------------------------------ losses
    def _divergence(self, a: Tensor, b: Tensor) -> Tensor:
        t = self.cfg.temperature
        return kl_divergence(b, a, t) if self.cfg.divergence == "kl" else js_divergence(a, b, t)

    def generator_part(self, own: Tensor, others: list[Tensor]) -> Tensor:
        """Peer k's part of the mean pairwise divergence J = 1/(K(K-1)) sum_{a != b} D(p_a, p_b), for the gradient:
        every ordered pair with k in it, (k, l) and (l, k), the others detached. Summed over the peers, the parts'
        gradients are J's gradient exactly; their *values* add up to 2J (each pair is in two parts), so the value
        this returns is k's share of J alone, the pairs (k, l): ``share + (part - part.detach())``."""
        k_total = len(others) + 1
        scale = 1.0 / (k_total * (k_total - 1))
        first = sum(self._divergence(own, z.detach()) for z in others)  # (k, l): own output first
        second = sum(self._divergence(z.detach(), own) for z in others)  # (l, k)
        part = scale * (first + second)
        return scale * first.detach() + (part - part.detach())

    def pairwise_mean(self, logits: list[Tensor]) -> Tensor:
        """J itself, from every peer's outputs (diagnostic)."""
        k_total = len(logits)
        total = sum(
            self._divergence(a, b) for i, a in enumerate(logits) for j, b in enumerate(logits) if i != j
        )
        return total / (k_total * (k_total - 1))

    def loss(self, phase: Phase, ctx: PeerContext) -> dict[str, Tensor]:
        t = self.cfg.temperature
        logits = ctx.out["logits"]
        others = ctx.from_sources("logits")
        if phase.name == "gen":
            k_total = len(others) + 1
            terms = {"gen": -self.generator_part(logits, others)}
            if self.cfg.weights.get("gen_label", 0) > 0:
                terms["gen_label"] = F.cross_entropy(logits, ctx.batch.y) / k_total
            rms = perturbation_rms(ctx.inputs - ctx.batch.x)
            if self.cfg.restrict == "penalty":
                # The penalty involves the generator only: each of the K parts carries 1/K of it.
                terms["bound"] = F.relu(rms - self.cfg.radius).pow(2).mean() / k_total
            ctx.metrics["pert_rms"] = rms.detach().mean()
            with torch.no_grad():
                ctx.metrics["div_gen"] = self.pairwise_mean([logits.detach(), *others])
            return terms
        n = ctx.batch.x.shape[0]
        own_x, own_div = logits[:n], logits[n:]
        kl = sum(kl_divergence(own_x, z[:n], t) for z in others) / len(others)
        kl_div = sum(kl_divergence(own_div, z[n:], t) for z in others) / len(others)
        ctx.metrics["disagree_x"] = kl.detach()
        ctx.metrics["disagree_xdiv"] = kl_div.detach()
        return {"ce": F.cross_entropy(own_x, ctx.batch.y), "kl": (t * t) * kl, "kl_div": (t * t) * kl_div}


def perturbation_rms(delta: Tensor) -> Tensor:
    """Per-sample ``||delta||_2 / sqrt(d)``."""
    flat = delta.flatten(1)
    return flat.norm(dim=1) / math.sqrt(flat.shape[1])
