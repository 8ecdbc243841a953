"""Two small methods that exercise the loop's general mechanisms without any paper's details:

- ``toy_memory``: DML plus a per-sample memory of each peer's last softmax (a PS-KD-like buffer), initialised to the
  one-hot labels and pulled towards by a KL term;
- ``toy_generated``: a population fed by a generator (no training set): the peers learn to agree on generated
  inputs, the shared generator learns to make them disagree, and an EMA copy of the generator (buffers only, in
  no optimizer) is refreshed after every generator step.

Registered by the tests that use them (``monkeypatch.setitem(METHODS, ...)``); Ray workers get the classes by value
(:func:`register_for_ray`).
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from kdray.config import AuxOptimizerConfig, MethodConfig
from kdray.losses import kl_divergence, kl_to_probs
from kdray.methods.base import BufferSpec, Method, PeerContext, Phase
from kdray.topology import all_to_all


class ToyMemoryConfig(MethodConfig):
    weights: dict[str, float] = Field(default_factory=lambda: {"ce": 1.0, "kl": 1.0, "memory": 0.5})
    memory_dtype: str = "float32"


class ToyMemory(Method):
    name = "toy_memory"
    Config = ToyMemoryConfig
    terms = ("ce", "kl", "memory")
    min_peers = 2
    written: list[tuple[int, Tensor, Tensor]] = []  # (peer, indices, rows) of every write, in order

    def build_topology(self):
        return all_to_all(self.pop.num_peers)

    def buffers(self, k):
        return {
            "memory": BufferSpec((self.pop.num_classes,), getattr(torch, self.cfg.memory_dtype), "onehot")
        }

    def loss(self, phase: Phase, ctx: PeerContext) -> dict[str, Tensor]:
        logits = ctx.out["logits"]
        others = ctx.from_sources("logits")
        memory = ctx.rows("memory").float()
        probs = logits.detach().softmax(1)
        ctx.write("memory", probs)
        ToyMemory.written.append((ctx.k, ctx.batch.index.clone(), probs.clone()))
        return {
            "ce": F.cross_entropy(logits, ctx.batch.y),
            "kl": sum(kl_divergence(logits, z) for z in others) / len(others),
            "memory": kl_to_probs(logits, memory),
        }


class ToyGeneratedConfig(MethodConfig):
    weights: dict[str, float] = Field(default_factory=lambda: {"agree": 1.0, "gen": 1.0})
    nz: int = 8
    ema: float = 0.9
    gen_optimizer: AuxOptimizerConfig = AuxOptimizerConfig(name="adam", lr=1e-3, weight_decay=0.0)


class ToyGenerator(nn.Module):
    def __init__(self, nz: int, shape: tuple[int, int, int]):
        super().__init__()
        self.shape = shape
        self.fc = nn.Linear(nz, shape[0] * shape[1] * shape[2])

    def forward(self, z: Tensor) -> Tensor:
        return torch.tanh(self.fc(z)).view(len(z), *self.shape)


class ToyGenerated(Method):
    name = "toy_generated"
    Config = ToyGeneratedConfig
    terms = ("agree", "gen")
    task_terms = ("agree",)
    min_peers = 2
    data_source = "generator"

    def build_topology(self):
        return all_to_all(self.pop.num_peers)

    def phases(self):
        return [Phase("gen", optimizer="shared", scope="shared"), Phase("peers", optimizer="net")]

    def build_shared_state(self):
        gen = ToyGenerator(self.cfg.nz, self.pop.input_shape)
        ema = copy.deepcopy(gen)
        for p in ema.parameters():
            p.requires_grad_(False)
        return nn.ModuleDict({"gen": gen, "ema": ema})

    def shared_optimizer(self, shared):
        return self.cfg.gen_optimizer

    def phase_inputs(self, phase, batch, shared, rng):
        z = torch.randn(self.pop.batch_size, self.cfg.nz, generator=rng).to(next(shared.parameters()))
        if phase.name == "gen":
            return shared["gen"](z)
        with torch.no_grad():
            return torch.cat([shared["gen"](z), shared["ema"](z)])

    def loss(self, phase, ctx):
        logits = ctx.out["logits"]
        others = ctx.from_sources("logits")
        if phase.name == "gen":  # each part: the pairs with k in it, others detached
            part = sum((logits - z.detach()).abs().mean() for z in others) / (len(others) + 1)
            return {"gen": -part}
        return {"agree": sum((logits - z).abs().mean() for z in others) / len(others)}

    def preview(self, shared, rng):
        return shared["gen"](torch.randn(10, self.cfg.nz, generator=rng).to(next(shared.parameters())))

    def after_shared_step(self, phase, shared):
        m = self.cfg.ema
        for e, g in zip(shared["ema"].parameters(), shared["gen"].parameters()):
            e.mul_(m).add_(g, alpha=1 - m)


TOY_METHODS = {ToyMemory.name: ToyMemory, ToyGenerated.name: ToyGenerated}


def register_for_ray() -> None:
    """Ship this module's classes to Ray workers by value (they cannot import the tests package)."""
    import sys

    from ray import cloudpickle

    cloudpickle.register_pickle_by_value(sys.modules[__name__])
