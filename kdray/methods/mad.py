"""MAD: Momentum Adversarial Distillation (Do, Le, Nguyen, Nguyen, Harikumar, Tran, Rana, Venkatesh; NeurIPS 2022).

DFAD (:mod:`kdray.methods.dfad`) plus an exponential moving average G~ of the generator, so that the student keeps
seeing what the generator made in the recent past and does not forget it when the generator moves. No code was
released; what is known (METHODS.md) and what kdray reconstructs:

From the abstract [paper]: a data-free adversarial teacher-student-generator game; an EMA copy G~ of the generator;
the student trains on synthetic samples of both G and G~.

From secondary sources [secondary]: the EMA update ``theta_G~ <- m theta_G~ + (1 - m) theta_G`` after each
generator step, m ~ 0.95 reported best (``momentum``); the student loss
``l0 D(T, S on G(z)) + l1 D(T, S on G~(z'))`` with z and z' two independent draws of N(0, I) (weights ``student``
and ``student_ema``); for large label sets a class-conditional generator ``G(z + e_y)`` whose class embeddings E
are learned, gathered for G at y and for G~ at y' (``conditional``, off by default); T and G~ are not optimised.

**Reconstructed** (each a config key, docs/methods.md):

- the discrepancy D and the generator's loss: DFAD's, ``D = L1`` on logits and ``L_G = -J`` (``discrepancy``);
  the paper builds on ABM (Micaelli & Storkey 2019), which uses KL: ``discrepancy: kl``. A secondary source says the
  paper optimises bounded versions of its plain losses in practice; that bound was not retrieved and is not applied;
- the schedule of DFAD: ``student_steps`` (5) student updates per generator update, the EMA refreshed after every
  generator update; generator DFAD's ``GeneratorA``, Adam 1e-3;
- the student's batch: ``ema_batch: full`` gives ``batch_size`` samples of each generator, forwarded together
  (2 x batch_size, one BatchNorm batch); ``half`` gives batch_size / 2 of each (DFAD's cost per update);
- the EMA copy covers the generator's parameters and its BatchNorm running statistics (same momentum;
  ``num_batches_tracked`` copied); G~ runs in train mode like G (its batch's own statistics), so the statistics
  only matter to someone sampling G~ in eval mode. The embeddings E are shared by G and G~, not averaged;
- with ``conditional: true``, the labels y, y' are uniform, and the generator also minimises the teacher's
  cross-entropy ``CE(T(G(z + e_y)), y)`` (weight ``gen_label``), so that e_y means class y.

**Not implemented**: the generator pre-training of the paper's appendix. Its table of hyper-parameters names a
"number of steps for pretraining G" (seen only in a search snippet of the supplementary material), but what G is
pre-trained to do and for how many steps were not retrieved: a switch would have to guess its objective. G and the
students start the game together, as in DFAD. (A pre-training phase would also need the step runner to run a phase
only before a given step, which it cannot today.)

The generator's gradient is split per peer exactly as DFAD's (see there): the label term involves the teacher
only, so it is the teacher's part alone (the students' parts report 0 for it, so the logged value is the term).
"""

from __future__ import annotations

import copy
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from kdray.errors import ConfigError
from kdray.methods.base import PeerContext, Phase
from kdray.methods.dfad import DFAD, DFADConfig
from kdray.methods.registry import register


class MADConfig(DFADConfig):
    weights: dict[str, float] = Field(
        default_factory=lambda: {"student": 1.0, "student_ema": 1.0, "gen": 1.0, "gen_label": 1.0}
    )
    momentum: float = Field(
        0.95, ge=0, lt=1, description="EMA generator: theta~ <- m theta~ + (1 - m) theta after every G step"
    )
    ema_batch: Literal["full", "half"] = Field(
        "full",
        description="samples per student update: batch_size from G and batch_size from G~ (full), or half of "
        "batch_size from each (half: DFAD's cost)",
    )
    conditional: bool = Field(
        False, description="class-conditional generator G(z + e_y) with learned class embeddings"
    )


@register
class MAD(DFAD):
    name = "mad"
    Config = MADConfig
    terms = ("student", "student_ema", "gen", "gen_label")

    def build_shared_state(self) -> nn.Module:
        gen = self.make_generator()
        ema = copy.deepcopy(gen)
        for p in ema.parameters():
            p.requires_grad_(False)  # in no optimizer: only after_shared_step moves it
        modules = {"gen": gen, "ema": ema}
        if self.cfg.conditional:
            modules["embed"] = nn.Embedding(self.pop.num_classes, self.cfg.nz)
        return nn.ModuleDict(modules)

    @classmethod
    def check_data_parallel(cls, cfg) -> None:
        """``ema_batch: half`` draws batch_size / 2 samples of each generator: a data-parallel peer's workers
        split each half into equal shards."""
        super().check_data_parallel(cfg)
        half = max(cfg.data.batch_size // 2, 1)
        uneven = [m for m in cfg.peer_workers if half % m]
        workers = max(uneven, default=1)
        if cfg.method.ema_batch == "half" and uneven:
            raise ConfigError(
                "data.batch_size", cfg.data.batch_size,
                f"with method.ema_batch: half and {workers} workers per peer, a batch size whose half is a multiple "
                f"of {workers} (each worker takes an equal shard of each generator's {half} samples), or "
                "method.ema_batch: full",
            )  # fmt: skip

    def per_generator(self) -> int:
        return self.pop.batch_size if self.cfg.ema_batch == "full" else max(self.pop.batch_size // 2, 1)

    def input_blocks(self, phase: Phase) -> int:
        return 2 if phase.name == "student" else 1  # [G(z), G~(z')]

    def student_inputs(self, shared: nn.Module, rng: torch.Generator) -> Tensor:
        """``[G(z [+ e_y]), G~(z' [+ e_y'])]``: z, y drawn first, then z', y'."""
        n = self.per_generator()
        return torch.cat([self.sample(shared, "gen", rng, n), self.sample(shared, "ema", rng, n)])

    def student_loss(self, ctx: PeerContext) -> dict[str, Tensor]:
        s, (t,) = ctx.out["logits"], ctx.from_sources("logits")
        n = len(s) // 2
        ctx.metrics["agree"] = (s.detach().argmax(1) == t.argmax(1)).float().mean()
        return {"student": self.discrepancy(s[:n], t[:n]), "student_ema": self.discrepancy(s[n:], t[n:])}

    def generator_loss(self, ctx: PeerContext) -> dict[str, Tensor]:
        terms = super().generator_loss(ctx)
        if self.cfg.conditional:
            own = ctx.out["logits"]
            if ctx.k == self.teacher:
                terms["gen_label"] = F.cross_entropy(own, self._gen_labels)
            else:  # no part of this term: report 0 so that the logged value is the teacher's term
                terms["gen_label"] = own.new_zeros(())
        return terms

    def after_shared_step(self, phase: Phase, shared: nn.Module) -> None:
        """``theta~ <- m theta~ + (1 - m) theta`` for every parameter and floating buffer of the generator (under
        the engine's ``no_grad``)."""
        m = self.cfg.momentum
        for e, g in zip(shared["ema"].parameters(), shared["gen"].parameters()):
            e.mul_(m).add_(g, alpha=1 - m)
        for e, g in zip(shared["ema"].buffers(), shared["gen"].buffers()):
            if e.is_floating_point():
                e.mul_(m).add_(g, alpha=1 - m)
            else:
                e.copy_(g)
