"""AFD: Feature-map-level Online Adversarial Knowledge Distillation (Chung, Park, Kim, Kwak; ICML 2020).

Every network k owns a discriminator D_k on feature maps (the last conv stage by default). D_k calls k's own
(transferred) feature map *fake* and its teacher-peer's *real*; k's feature extractor learns to fool D_k, so it learns
the peer's feature-map *distribution* rather than aligning point-wise. With K > 2 networks the peers form a ring
1 -> 2 -> ... -> K -> 1 (the paper's cyclic learning scheme): D_k takes peer k-1 as real. Per mini-batch, as published:

1. logit update (network, main optimizer):   L_k = w_ce CE(y, p_k) + w_kl T^2 mean_{l in src(k)} KL(p_l^T || p_k^T)
2. adversarial feature update (feature extractor + transfer layer, own optimizer, smaller learning rate):
                                              L_G_k = w_adv (1 - D_k(T_k(f_k)))^2                      (LSGAN)
3. discriminator update (D_k, own optimizer): L_D_k = w_disc [(1 - D_k(T_{k-1}(f_{k-1})))^2 + D_k(T_k(f_k))^2]

What follows the paper: the roles of D_k (own = fake, peer = real), the three-step update order with separate
optimizers and a smaller adversarial learning rate, the ring for K > 2, the DML-with-temperature logit loss.
Reconstructed (the paper's details were out of reach; each is a config switch, see docs/methods.md):
the LSGAN form of the losses (``gan: bce`` is the alternative), the discriminator architecture (Conv-BN-LeakyReLU,
``disc_hidden``/``disc_layers``), the transfer layer (Conv-BN-ReLU to a common shape: the largest channel count and
the smallest spatial size of the population, ``transfer``/``transfer_channels``), whether the logit loss follows the
ring or is all-to-all (``logit_topology``, default ring), the default learning rates and step ratios.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from kdray.config import AuxOptimizerConfig, MethodConfig
from kdray.errors import ConfigError
from kdray.losses import gan_fake, gan_real, soft_target_kl
from kdray.methods.base import Method, PeerContext, Phase
from kdray.methods.registry import register
from kdray.topology import Topology, all_to_all, ring


class AFDConfig(MethodConfig):
    temperature: float = Field(3.0, gt=0)
    weights: dict[str, float] = Field(default_factory=lambda: {"ce": 1.0, "kl": 1.0, "adv": 1.0, "disc": 1.0})
    tap: str = Field("default", description="FX node of the feature map (default: the last conv stage)")
    gan: Literal["lsgan", "bce"] = "lsgan"
    logit_topology: Literal["ring", "all_to_all"] = "ring"
    transfer: Literal["auto", "always", "off"] = "auto"
    transfer_channels: int | None = Field(
        None, ge=1, description="channels of the common shape (default: the max)"
    )
    disc_hidden: int = Field(64, ge=1)
    disc_layers: int = Field(2, ge=1)
    disc_norm: Literal["none", "dcgan", "spectral", "batch"] = Field(
        "dcgan",
        description="discriminator normalisation (see FeatureDiscriminator); 'batch' is kdray 0.1's; the "
        "default (dcgan, joint) was chosen on validation accuracy, docs/results.md",
    )
    disc_batch: Literal["separate", "joint"] = Field(
        "joint",
        description="the discriminator scores real and fake maps in separate calls, or in one batch (its batch "
        "statistics then span both)",
    )
    adv_bn_stats: Literal["keep", "update"] = Field(
        "keep",
        description="whether the adversarial phase's second forward of the batch moves the peers' BatchNorm "
        "running statistics ('keep': only the logit phase's forward does)",
    )
    adv_optimizer: AuxOptimizerConfig = AuxOptimizerConfig(
        name="sgd", lr=0.01, momentum=0.9, weight_decay=0.0, schedule="follow"
    )
    disc_optimizer: AuxOptimizerConfig = AuxOptimizerConfig(
        name="adam", lr=2e-4, betas=(0.5, 0.999), weight_decay=0.0, schedule="constant"
    )
    adv_every: int = Field(1, ge=1, description="run the adversarial feature update every N steps")
    disc_every: int = Field(
        1, ge=1, description="discriminator update every N steps (only where the adv phase ran)"
    )


@register
class AFD(Method):
    name = "afd"
    Config = AFDConfig
    terms = ("ce", "kl", "adv", "disc")
    min_peers = 2

    def __init__(self, cfg: AFDConfig, pop):
        super().__init__(cfg, pop)
        self.feature_ring = ring(pop.num_peers)
        shapes = [p.tap_shapes["feat"] for p in pop.peers]
        channels = cfg.transfer_channels or max(s[0] for s in shapes)
        self.common_shape = (channels, min(s[1] for s in shapes), min(s[2] for s in shapes))
        if cfg.transfer == "off" and len(set(shapes)) > 1:
            listing = ", ".join(f"{p.name} ({p.arch}) {p.tap_shapes['feat']}" for p in pop.peers)
            raise ConfigError(
                "method.transfer", "off",
                f"the peers' feature maps differ in shape ({listing}); set method.transfer to 'auto' or 'always' "
                "so a transfer layer maps them to a common shape",
            )  # fmt: skip

    @classmethod
    def required_taps(cls, cfg: AFDConfig) -> dict[str, str]:
        return {"feat": cfg.tap}

    def build_topology(self) -> Topology:
        return (
            ring(self.pop.num_peers) if self.cfg.logit_topology == "ring" else all_to_all(self.pop.num_peers)
        )

    def phases(self) -> list[Phase]:
        return [
            Phase("logit", optimizer="net"),
            Phase("adv", optimizer="adv", every=self.cfg.adv_every, bn_stats=self.cfg.adv_bn_stats),
            # The discriminator reads the maps the adversarial phase just published, so it can only run on steps
            # where that phase ran: every lcm(adv_every, disc_every) steps.
            Phase(
                "disc",
                optimizer="disc",
                forward=False,
                every=math.lcm(self.cfg.adv_every, self.cfg.disc_every),
            ),
        ]

    def phase_topology(self, phase: Phase) -> Topology:
        return self.topology if phase.name == "logit" else self.feature_ring

    # ------------------------------------------------------------------ state and optimizers
    def build_peer_state(self, k: int) -> nn.Module:
        from kdray.models.discriminators import FeatureDiscriminator
        from kdray.models.transfer import make_transfer

        shape = self.pop.peers[k].tap_shapes["feat"]
        return nn.ModuleDict(
            {
                "transfer": make_transfer(shape, self.common_shape, self.cfg.transfer),
                "disc": FeatureDiscriminator(
                    self.common_shape[0], self.cfg.disc_hidden, self.cfg.disc_layers, self.cfg.disc_norm
                ),
            }
        )

    def optimizer_groups(self, k, net, state):
        # The adversarial loss depends only on the feature extractor and the transfer layer: parameters past the
        # tap (the classifier) get no gradient and are skipped by the optimizer.
        return {
            "adv": (list(net.parameters()) + list(state["transfer"].parameters()), self.cfg.adv_optimizer),
            "disc": (list(state["disc"].parameters()), self.cfg.disc_optimizer),
        }

    # ------------------------------------------------------------------ per step
    def publish(self, phase: Phase, k: int, out, state) -> dict[str, Tensor]:
        if phase.name == "logit":
            return {"logits": out["logits"]}
        return {"feat": state["transfer"](out["feat"])}

    def loss(self, phase: Phase, ctx: PeerContext) -> dict[str, Tensor]:
        cfg = self.cfg
        if phase.name == "logit":
            t = cfg.temperature
            logits = ctx.out["logits"]
            kl = soft_target_kl(logits, ctx.from_sources("logits"), t)
            return {"ce": F.cross_entropy(logits, ctx.batch.y), "kl": kl}
        disc = ctx.state["disc"]
        (real,) = ctx.from_sources("feat")  # peer k-1's transferred map, detached
        fake = ctx.published[
            "feat"
        ]  # own transferred map: with grad in the adversarial phase, detached after
        if phase.name == "adv":  # the network wants D to call its map real
            d_fake = self.score(disc, real, fake)[1] if cfg.disc_batch == "joint" else disc(fake)
            return {"adv": gan_real(d_fake, cfg.gan)}
        d_real, d_fake = self.score(disc, real, fake)
        threshold = 0.5 if cfg.gan == "lsgan" else 0.0
        ctx.metrics["disc_acc_real"] = (d_real.detach() > threshold).float().mean()
        ctx.metrics["disc_acc_fake"] = (d_fake.detach() <= threshold).float().mean()
        ctx.metrics["feat_l1"] = (fake - real).abs().mean()  # the point-wise distance AFD does not minimise
        return {"disc": gan_real(d_real, cfg.gan) + gan_fake(d_fake, cfg.gan)}

    def score(self, disc: nn.Module, real: Tensor, fake: Tensor) -> tuple[Tensor, Tensor]:
        """D's scores of the real and the fake maps: from one batch (``disc_batch: joint``, D's batch statistics
        then span both), or from separate calls."""
        if self.cfg.disc_batch == "joint":
            scores = disc(torch.cat([real, fake]))
            return scores[: len(real)], scores[len(real) :]
        return disc(real), disc(fake)
