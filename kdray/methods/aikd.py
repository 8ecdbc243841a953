"""AI-KD: Adversarial learning and Implicit regularization for self-Knowledge Distillation (H. Kim, S. Suh, S. Baek,
D. Kim, D. Jeong, H. Cho, J. Kim; Knowledge-Based Systems 293, 111692, 2024; arXiv 2211.10938, 2022). No code was
published; this is the first open implementation. Only the abstract was read: the stored copies of the full text
(arXiv HTML, ar5iv) could be searched only as far as the introduction, so nothing below was checked against the
paper's method section.

From the abstract (METHODS.md [abstract]): one network learns from (a) a frozen *pre-trained* network of the same
architecture ("deterministic" knowledge), (b) its own predictions of the previous epoch ("progressive" knowledge,
as in PS-KD), and (c) a discriminator that tells the pre-trained model's predictive distributions (real) from the
student's (fake), which the student learns to fool, so that the two distributions align.

**Reconstructed** here (each choice a config key; docs/methods.md marks them):

    L_s = w_ce  SoftCE(y~_t, p_s)                     y~_t = (1 - a_t) onehot + a_t P_{t-1}(x)    (progressive)
              or CE(y, p_s)                                                                (progressive: false)
        + w_kd  T^2 KL(p_pre^T || p_s^T)                                                  (deterministic)
        + w_adv L_G(D(softmax(z_s / T_adv)))       L_G: LSGAN (1 - D)^2 or BCE            (adversarial)
    L_D = w_disc [L_real(D(softmax(z_pre / T_adv))) + L_fake(D(softmax(z_s / T_adv)))]

D is an MLP on C-dim probability vectors (``ProbDiscriminator``), with its own optimizer, learning rate, schedule
policy and step ratio (``disc_every``); it updates after the student, on the student's detached outputs of the same
step. a_t grows as in PS-KD (``alpha_T`` x (epoch + 1) / epochs). The pre-trained network is stage 1 of the same run
(``from_stage``) or a kdray checkpoint. The ablations are configs: ``progressive``, ``deterministic``,
``adversarial`` each on or off.
"""

from __future__ import annotations

from typing import Literal

import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from kdray.config import AuxOptimizerConfig, ExperimentConfig, MethodConfig
from kdray.errors import ConfigError
from kdray.losses import gan_fake, gan_real, kl_divergence, soft_cross_entropy
from kdray.methods.base import BufferSpec, Method, PeerContext, Phase
from kdray.methods.pskd import DTYPES, progressive_alpha, progressive_target
from kdray.methods.registry import register
from kdray.topology import Topology, teacher_student


class AIKDConfig(MethodConfig):
    temperature: float = Field(4.0, gt=0, description="T of the deterministic KD term")
    weights: dict[str, float] = Field(default_factory=lambda: {"ce": 1.0, "kd": 1.0, "adv": 0.1, "disc": 1.0})
    progressive: bool = True
    deterministic: bool = True
    adversarial: bool = True
    alpha_T: float = Field(0.8, ge=0, le=1, description="progressive targets: a_T as in PS-KD")
    memory_dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    adv_temperature: float = Field(
        1.0, gt=0, description="the discriminator sees softmax(z / adv_temperature)"
    )
    gan: Literal["lsgan", "bce"] = "lsgan"
    disc_hidden: int = Field(64, ge=1)
    disc_layers: int = Field(2, ge=1)
    disc_every: int = Field(1, ge=1, description="discriminator update every N steps")
    disc_optimizer: AuxOptimizerConfig = AuxOptimizerConfig(
        name="adam", lr=2e-4, betas=(0.5, 0.999), weight_decay=0.0, schedule="constant"
    )


@register
class AIKD(Method):
    name = "aikd"
    Config = AIKDConfig
    terms = ("ce", "kd", "adv", "disc")
    min_peers = 2
    needs_frozen_teacher = True

    @classmethod
    def check_population(cls, cfg: ExperimentConfig) -> None:
        super().check_population(cfg)
        frozen = [p for p in cfg.peers if p.frozen]
        if len(frozen) != 1:
            raise ConfigError(
                "peers", f"{len(frozen)} frozen peers", "aikd needs exactly one frozen, pre-trained network"
            )
        for i, p in enumerate(cfg.peers):
            if not p.frozen and p.arch != frozen[0].arch:
                raise ConfigError(
                    f"peers.{i}.arch", p.arch,
                    f"AI-KD distils from a pre-trained copy of the same architecture ({frozen[0].arch}); for another "
                    "teacher use method kd",
                )  # fmt: skip
        m = cfg.method
        if not (m.progressive or m.deterministic or m.adversarial):
            raise ConfigError("method", "progressive/deterministic/adversarial all false", "turn one on (or use "
                              "method independent)")  # fmt: skip

    def build_topology(self) -> Topology:
        return teacher_student(self.pop.num_peers, [p.index for p in self.pop.peers if p.frozen])

    def phases(self) -> list[Phase]:
        phases = [Phase("student")]
        if self.cfg.adversarial:
            phases.append(Phase("disc", optimizer="disc", forward=False, every=self.cfg.disc_every))
        return phases

    def build_peer_state(self, k: int) -> nn.Module | None:
        if not self.cfg.adversarial or self.pop.peers[k].frozen:
            return None
        from kdray.models.discriminators import ProbDiscriminator

        return nn.ModuleDict(
            {"disc": ProbDiscriminator(self.pop.num_classes, self.cfg.disc_hidden, self.cfg.disc_layers)}
        )

    def optimizer_groups(self, k, net, state):
        if state is None:
            return {}
        return {"disc": (list(state["disc"].parameters()), self.cfg.disc_optimizer)}

    def buffers(self, k: int) -> dict[str, BufferSpec]:
        if not self.cfg.progressive:
            return {}
        return {"memory": BufferSpec((self.pop.num_classes,), DTYPES[self.cfg.memory_dtype], "onehot")}

    def probs(self, logits: Tensor) -> Tensor:
        return (logits / self.cfg.adv_temperature).softmax(1)

    def loss(self, phase: Phase, ctx: PeerContext) -> dict[str, Tensor]:
        cfg = self.cfg
        logits = ctx.out["logits"]
        (pretrained,) = ctx.from_sources("logits")
        if (
            phase.name == "disc"
        ):  # real: the pre-trained network's distributions; fake: the student's (detached)
            d_real, d_fake = ctx.state["disc"](self.probs(pretrained)), ctx.state["disc"](self.probs(logits))
            threshold = 0.5 if cfg.gan == "lsgan" else 0.0
            ctx.metrics["disc_acc_real"] = (d_real.detach() > threshold).float().mean()
            ctx.metrics["disc_acc_fake"] = (d_fake.detach() <= threshold).float().mean()
            return {"disc": gan_real(d_real, cfg.gan) + gan_fake(d_fake, cfg.gan)}
        terms: dict[str, Tensor] = {}
        if cfg.progressive:
            alpha = progressive_alpha(cfg.alpha_T, ctx.epoch, self.pop.epochs)
            terms["ce"] = soft_cross_entropy(
                logits, progressive_target(ctx.batch.y, ctx.rows("memory"), alpha)
            )
            ctx.write("memory", logits.detach().softmax(1))
        else:
            terms["ce"] = F.cross_entropy(logits, ctx.batch.y)
        if cfg.deterministic:
            t = cfg.temperature
            terms["kd"] = (t * t) * kl_divergence(logits, pretrained, t)
        if cfg.adversarial:  # the student wants D to call its distribution real
            terms["adv"] = gan_real(ctx.state["disc"](self.probs(logits)), cfg.gan)
        return terms
