"""ACN: the restricted search holds after every generator step; per-peer generator parts sum to the joint gradient."""

from __future__ import annotations

import pytest
import torch

from kdray.config import load_config
from kdray.engines.process import PopulationProcess
from kdray.methods.acn import perturbation_rms


def _proc(tiny_raw, k=2, **method):
    tiny_raw["method"] = {"name": "acn", **method}
    tiny_raw["peers"] = [{"arch": "resnet8", "arch_kwargs": {"width": 4}} for _ in range(k)]
    return PopulationProcess(load_config(tiny_raw))


def test_perturbation_bound_holds_after_every_generator_step(tiny_raw):
    proc = _proc(tiny_raw, eps=0.5, radius=0.05)  # eps alone would allow RMS up to 0.5
    gen = proc.shared.module
    x = next(iter(proc.data.val_batches())).x
    for i, batch in enumerate(proc.data.train_batches(0, max_steps=5)):
        before = [t.clone() for t in gen.parameters()]
        proc.runner.step(batch, 0, i)
        assert any(not torch.equal(a, b) for a, b in zip(before, gen.parameters()))  # the generator moved
        with torch.no_grad():
            rms = perturbation_rms(proc.method.perturb(x, gen) - x)
        assert float(rms.max()) <= 0.05 + 1e-6


@pytest.mark.parametrize("divergence", ["kl", "js"])
def test_per_peer_parts_sum_to_the_joint_gradient(tiny_raw, divergence):
    proc = _proc(tiny_raw, k=3, divergence=divergence)
    method, gen = proc.method, proc.shared.module
    nets = [p.net for p in proc.peers]
    for n in nets:
        n.eval()  # BN in eval: the two forwards below see identical networks
    gen.eval()
    x = next(iter(proc.data.train_batches(0))).x

    def grads():
        out = [p.grad.clone() for p in gen.parameters()]
        gen.zero_grad(set_to_none=True)
        return out

    # Joint: every peer's output live, the divergence averaged over ordered pairs.
    z = [n(method.perturb(x, gen))["logits"] for n in nets]
    joint = sum(method._divergence(z[a], z[b]) for a in range(3) for b in range(3) if a != b) / 6
    (-joint).backward()
    g_joint = grads()
    # Split: each peer's part with the others detached, as each Ray worker computes it.
    z = [n(method.perturb(x, gen))["logits"] for n in nets]
    parts = [-method.generator_part(z[k], [z[j] for j in range(3) if j != k]) for k in range(3)]
    for part in parts:
        part.backward(retain_graph=True)
    g_split = grads()
    assert float(sum(p.detach() for p in parts)) == pytest.approx(float(-joint.detach()) * 2, rel=1e-5)
    for a, b in zip(g_joint, g_split):
        assert torch.allclose(a, b, atol=1e-7, rtol=1e-5)
    assert any(float(a.abs().max()) > 0 for a in g_joint)


def test_generator_maximises_disagreement(tiny_raw):
    proc = _proc(tiny_raw, eps=0.5, radius=0.5, **{"weights": {"ce": 0.0, "kl": 0.0, "kl_div": 0.0}})
    proc.set_epoch_lr(0)
    batch = next(iter(proc.data.train_batches(0)))
    first = last = None
    for i in range(6):
        m = proc.runner.step(batch, 0, i)
        value = float(m["peer0/div_gen"])
        first = value if first is None else first
        last = value
    assert last > first  # networks frozen in effect (zero weights); only the generator learns


def test_penalty_switch_adds_a_bound_term(tiny_raw):
    proc = _proc(tiny_raw, restrict="penalty", eps=1.0, radius=0.01)
    batch = next(iter(proc.data.train_batches(0)))
    m = proc.runner.step(batch, 0, 0)
    assert float(m["shared/loss_bound"]) > 0
