"""DFAD: Data-Free Adversarial Distillation (Fang, Song, Shen, Wang, Chen, Song; arXiv:1912.11006, 2019).

A frozen teacher T, one or more trainable students S_k and a generator G play a min-max game without any real
training data: G makes images from noise, the students learn to agree with the teacher on them, and G learns to
make images on which they disagree. Per training step, as in the authors' code (``DFAD_cifar.py``, METHODS.md
[code]): ``student_steps`` (5) student updates, each on fresh noise, then one generator update::

    z ~ N(0, I) of shape (batch_size, nz)   (nz = 256), drawn anew for every update
    student k:  L_k = D(S_k(x), T(x)),  x = G(z).detach()            D = L1: mean |s - t| over batch and classes
    generator:  L_G = -J,  J = 1/S sum_k D(S_k(G(z)), T(G(z)))       (one student: -L1(s, t), the authors' loss)

Student optimizer: the experiment's ``train.optimizer`` (the authors': SGD lr 0.1, momentum 0.9, weight decay
5e-4). Generator optimizer: ``gen_optimizer``, Adam lr 1e-3 (betas and weight decay torch's defaults, as in the
code), following the network's schedule (the README's CIFAR commands pass ``--scheduler``: MultiStepLR x0.1 at
epochs 100 and 200 for *both* optimizers, one "epoch" being 50 iterations). Generator: :class:`DFADGenerator`.

**The generator's gradient, split per peer.** On the Ray engine the teacher and every student may live on
different workers, and a worker can only back-propagate through its own network. Each term ``D(s_k, t)`` of J
depends on G through both of its arguments::

    dJ/dG = 1/S sum_k [ dD/ds_k (s_k, t) ds_k/dG  +  dD/dt (s_k, t) dt/dG ]

so the parts are

    student k:  P_k = 1/S D(s_k, sg(t))                  (sg: stop-gradient; the teacher's logits as received)
    teacher:    P_T = 1/S sum_k D(sg(s_k), t)

and ``sum_k dP_k/dG + dP_T/dG = dJ/dG`` exactly (every summand above appears once). Each worker back-propagates
``-P`` of its own peer; the all-reduce (or, in one process, autograd) adds the gradients. The *values* of the
parts add up to 2J, so each part logs a share: student k's part carries the value of its own term ``D(s_k, t)/S``,
the teacher's part the value 0, through ``share + (P - P.detach())``; the ``shared/loss_gen`` the loop logs is then
``-J`` itself. With ``discrepancy: kl`` (``D(s, t) = KL(p_t || p_s)``) the same split holds.

**Peers of several workers** (K x M, ``peers[i].workers``). Every worker of a peer draws the noise (and MAD's
labels) of the whole global batch from the step's generator, exactly as one worker does, and generates only its shard
of the rows (``PopulationSpec.shard``); the generator's BatchNorm layers sum their statistics over the peer's workers
(the engine syncs a shared module's BatchNorm), so the shard is the same rows one worker would generate, and every
later draw of the step (the next student update's noise, MAD's z' and y') is the same too. The generator's gradient
is summed over the peers of a shard and averaged over the shards, so every replica takes K x 1's step; MAD's EMA
copy then follows identically on every worker. Generating a shard from its own split of a fresh draw would cost
the same but change the noise with M; generating the whole batch on every worker and keeping a shard would be exact
too, at M times the generator's cost. The per-step diagnostics (``gen_diversity``, ``gen_top_share``, ...) are
computed on each worker's shard and averaged. ``tests/engines/test_data_parallel.py`` holds K x M == K x 1.

**Deviations and choices** (docs/methods.md, each a config key):

- ``gen_bn_stats: keep`` (default): the students' BatchNorm statistics are restored after the generator step, so
  they come from the student updates only. The authors' code leaves the student in train mode during the generator
  step, so its statistics also move there (``gen_bn_stats: update``).
- The generator runs in train mode throughout (as in the code: BatchNorm on the batch's own statistics). Sampling
  for the student updates does not move the generator's running statistics (the code's ``no_grad`` forward in
  train mode does, five times per iteration; nothing in training reads them).
- ``discrepancy: kl`` is not DFAD's; it is there for MAD, whose discrepancy was not retrieved.

Frozen peers run in eval mode (the engine's rule): the teacher's BatchNorm statistics never change.

Diagnostics, logged under the teacher's name once per step from the generator update's batch: ``gen_discrepancy``
(J), ``gen_diversity`` (mean pairwise L2 distance between the generated images, divided by sqrt(pixels): about 1.4
for independent standardised images, 0 when every image is the same), ``gen_entropy`` (the teacher's mean
prediction entropy, nats), ``gen_top_share`` (the share of the teacher's most frequent class) and ``collapse`` (1
when that share exceeds ``collapse_share``: the generator makes one class only; its epoch mean is the share of
collapsed steps). Per student, from the student updates: ``agree`` (top-1 agreement with the teacher).
"""

from __future__ import annotations

import contextlib
import math
from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from kdray.config import AuxOptimizerConfig, ExperimentConfig, MethodConfig
from kdray.errors import ConfigError
from kdray.losses import kl_divergence, l1_discrepancy
from kdray.methods.base import Method, PeerContext, Phase
from kdray.methods.registry import register
from kdray.topology import Topology, teacher_student

# image sizes known from the dataset's name (the generator upsamples an (s/4)x(s/4) map twice)
_KNOWN_SIZES = {"fashion_mnist": 28, "cifar10": 32, "cifar100": 32}


class DFADConfig(MethodConfig):
    weights: dict[str, float] = Field(default_factory=lambda: {"student": 1.0, "gen": 1.0})
    nz: int = Field(256, ge=1, description="noise dimension")
    ngf: int = Field(64, ge=1, description="generator width (the authors' GeneratorA: 64)")
    student_steps: int = Field(
        5, ge=1, description="student updates per generator update, each on fresh noise"
    )
    discrepancy: Literal["l1", "kl"] = Field(
        "l1", description="D(s, t): l1 = mean |s - t| over batch and classes (DFAD); kl = KL(p_t^T || p_s^T)"
    )
    gen_optimizer: AuxOptimizerConfig = AuxOptimizerConfig(
        name="adam", lr=1e-3, betas=(0.9, 0.999), weight_decay=0.0, schedule="follow"
    )
    gen_bn_stats: Literal["keep", "update"] = Field(
        "keep",
        description="whether the generator update's forward moves the students' BatchNorm running statistics "
        "('update' is the authors' code; 'keep': only the student updates do)",
    )
    collapse_share: float = Field(
        0.9,
        gt=0,
        le=1,
        description="the 'collapse' metric is 1 when the teacher's top class exceeds this share",
    )


@register
class DFAD(Method):
    name = "dfad"
    Config = DFADConfig
    terms: ClassVar[tuple[str, ...]] = ("student", "gen")

    @classmethod
    def ignored_keys(cls, method, num_peers):
        if method.discrepancy == "l1":
            return {"temperature": "the l1 discrepancy uses no temperature; it applies with discrepancy: kl"}
        return {}

    # No task loss without data: a stale exchange's burn-in (which trains the task terms only) trains nothing.
    task_terms = ()
    min_peers = 2
    needs_frozen_teacher = True
    data_source = "generator"

    def __init__(self, cfg: MethodConfig, pop):
        self.teacher = next(p.index for p in pop.peers if p.frozen)
        self.students = [p.index for p in pop.peers if not p.frozen]
        super().__init__(cfg, pop)
        sources = [() for _ in range(pop.num_peers)]
        sources[self.teacher] = tuple(self.students)
        for k in self.students:
            sources[k] = (self.teacher,)
        # the generator update: the teacher's part needs every student's logits, each student's the teacher's
        self._gen_topology = Topology("teacher_student_both_ways", tuple(sources))
        self._gen_labels: Tensor | None = None  # labels drawn for the generator update (conditional MAD)

    # ------------------------------------------------------------------ config-time checks
    @classmethod
    def check_population(cls, cfg: ExperimentConfig) -> None:
        super().check_population(cfg)
        frozen = [i for i, p in enumerate(cfg.peers) if p.frozen]
        if len(frozen) != 1:
            raise ConfigError(
                "peers",
                f"{len(frozen)} frozen peers",
                f"{cls.name} distils one frozen teacher into the others",
            )
        data = cfg.data
        size = data.synthetic.image_size if data.dataset == "synthetic" else _KNOWN_SIZES.get(data.dataset)
        if data.dataset == "imagefolder":
            size = data.image_size
        if size is not None and size % 4 != 0:
            raise ConfigError(
                "data", f"{size}x{size} images",
                f"{cls.name}'s generator upsamples an (s/4)x(s/4) map twice: the image size must be a multiple "
                "of 4 (28 and 32 work)",
            )  # fmt: skip

    # ------------------------------------------------------------------ structure
    def build_topology(self) -> Topology:
        return teacher_student(self.pop.num_peers, [self.teacher])

    def phase_topology(self, phase: Phase) -> Topology:
        return self._gen_topology if phase.name == "gen" else self.topology

    def phases(self) -> list[Phase]:
        return [
            Phase("student", optimizer="net", repeat=self.cfg.student_steps),
            Phase("gen", optimizer="shared", scope="shared", bn_stats=self.cfg.gen_bn_stats),
        ]

    def build_shared_state(self) -> nn.Module:
        return nn.ModuleDict({"gen": self.make_generator()})

    def make_generator(self) -> nn.Module:
        from kdray.models.generators import DFADGenerator

        channels, size, _ = self.pop.input_shape
        return DFADGenerator(self.cfg.nz, img_size=size, channels=channels, ngf=self.cfg.ngf)

    def shared_optimizer(self, shared: nn.Module) -> AuxOptimizerConfig:
        return self.cfg.gen_optimizer

    # ------------------------------------------------------------------ inputs
    def draw(
        self, rng: torch.Generator, shared: nn.Module, n: int | None = None, sharded: bool = True
    ) -> tuple[Tensor, Tensor | None]:
        """Noise z ~ N(0, I) of shape (n, nz) (n: the global batch size) from the step's generator, and, for a
        class-conditional generator (a shared ``embed``), uniform labels y drawn after it. A data-parallel
        peer's worker draws the whole global batch's noise (every worker consumes the stream as one worker
        does, so the next draw is the same too) and keeps its shard of the rows (unless ``sharded`` is False)."""
        n = self.pop.batch_size if n is None else n
        ref = next(shared.parameters())
        z = torch.randn(n, self.cfg.nz, generator=rng).to(ref)
        y = None
        if "embed" in shared:
            y = torch.randint(self.pop.num_classes, (n,), generator=rng).to(ref.device)
        if sharded:
            z, y = self.pop.shard_rows(z), (self.pop.shard_rows(y) if y is not None else None)
        return z, y

    def generate(self, shared: nn.Module, which: str, z: Tensor, y: Tensor | None) -> Tensor:
        """``shared[which](z [+ e_y])``."""
        if y is not None:
            z = z + shared["embed"](y)
        return shared[which](z)

    def sample(
        self, shared: nn.Module, which: str, rng: torch.Generator, n: int | None = None, sharded: bool = True
    ) -> Tensor:
        """Images for a student update: no gradient, and the generator's BatchNorm running statistics untouched
        (the forward still normalises with the batch's own statistics, as in train mode)."""
        z, y = self.draw(rng, shared, n, sharded)
        with torch.no_grad(), running_stats_untracked(shared[which]):
            return self.generate(shared, which, z, y)

    def student_inputs(self, shared: nn.Module, rng: torch.Generator) -> Tensor:
        return self.sample(shared, "gen", rng)

    def preview(self, shared: nn.Module | None, rng: torch.Generator) -> Tensor | None:
        return self.sample(shared, "gen", rng, 64, sharded=False)

    def phase_inputs(self, phase: Phase, batch, shared, rng) -> Tensor:
        if phase.name == "gen":
            z, y = self.draw(rng, shared)
            self._gen_labels = y
            return self.generate(shared, "gen", z, y)
        return self.student_inputs(shared, rng)

    # ------------------------------------------------------------------ losses
    def discrepancy(self, student: Tensor, teacher: Tensor) -> Tensor:
        """D(s, t): the mean absolute logit difference (DFAD), or KL(p_t^T || p_s^T) batch mean."""
        if self.cfg.discrepancy == "l1":
            return l1_discrepancy(student, teacher)
        return kl_divergence(student, teacher, self.cfg.temperature)

    def generator_part(self, k: int, own: Tensor, received: list[Tensor]) -> Tensor:
        """Peer k's part of J = 1/S sum_k D(s_k, t) for the gradient, the others' logits detached (module
        docstring). The value returned is k's share of J: ``D(s_k, t)/S`` for a student, 0 for the teacher."""
        s = len(self.students)
        if k == self.teacher:
            part = sum(self.discrepancy(z.detach(), own) for z in received) / s
            share = torch.zeros((), dtype=part.dtype, device=part.device)
        else:
            (t,) = received
            part = self.discrepancy(own, t.detach()) / s
            share = part.detach()
        return share + (part - part.detach())

    def loss(self, phase: Phase, ctx: PeerContext) -> dict[str, Tensor]:
        if phase.name == "gen":
            return self.generator_loss(ctx)
        return self.student_loss(ctx)

    def student_loss(self, ctx: PeerContext) -> dict[str, Tensor]:
        s, (t,) = ctx.out["logits"], ctx.from_sources("logits")
        ctx.metrics["agree"] = (s.detach().argmax(1) == t.argmax(1)).float().mean()
        return {"student": self.discrepancy(s, t)}

    def generator_loss(self, ctx: PeerContext) -> dict[str, Tensor]:
        own, received = ctx.out["logits"], ctx.from_sources("logits")
        terms = {"gen": -self.generator_part(ctx.k, own, received)}
        if ctx.k == self.teacher:
            with torch.no_grad():
                t = own.detach()
                ctx.metrics["gen_discrepancy"] = sum(self.discrepancy(z, t) for z in received) / len(received)
                ctx.metrics.update(sample_diagnostics(ctx.inputs.detach(), t, self.cfg.collapse_share))
        return terms


# ---------------------------------------------------------------------------------------------------- helpers
@contextlib.contextmanager
def running_stats_untracked(module: nn.Module):
    """Inside the block, ``module``'s BatchNorm layers normalise with the batch's statistics and leave their running
    statistics (and ``num_batches_tracked``) as they are."""
    norms = [
        m
        for m in module.modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats
    ]
    for m in norms:
        m.track_running_stats = False
    try:
        yield
    finally:
        for m in norms:
            m.track_running_stats = True


def sample_diagnostics(images: Tensor, teacher_logits: Tensor, collapse_share: float) -> dict[str, Tensor]:
    """What a user watches on a generator: ``gen_diversity`` (mean pairwise L2 distance of the images / sqrt(d)),
    ``gen_entropy`` (the teacher's mean prediction entropy, nats), ``gen_top_share`` (the share of the teacher's
    most frequent class), ``collapse`` (1.0 when that share exceeds ``collapse_share``, else 0.0) and the teacher's
    class histogram on the samples, ``gen_class<c>`` (the share of the batch it puts in class c; epoch means)."""
    flat = images.flatten(1).float()  # diagnostics in float32 (bfloat16 under autocast is too coarse)
    diversity = torch.pdist(flat).mean() / math.sqrt(flat.shape[1]) if len(flat) > 1 else flat.new_zeros(())
    logp = F.log_softmax(teacher_logits.float(), dim=1)
    entropy = -(logp.exp() * logp).sum(1).mean()
    counts = torch.bincount(teacher_logits.argmax(1), minlength=teacher_logits.shape[1])
    top = counts.max().float() / len(teacher_logits)
    return {
        "gen_diversity": diversity,
        "gen_entropy": entropy,
        "gen_top_share": top,
        "collapse": (top > collapse_share).float(),
        **{f"gen_class{c}": share for c, share in enumerate(counts.float() / len(teacher_logits))},
    }
