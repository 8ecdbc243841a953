"""ACN: the restricted search holds after every generator step; per-peer generator parts sum to the joint gradient
and their logged values to the objective; hand-computed loss values; BatchNorm statistics left to training."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kdray.config import load_config
from kdray.methods.acn import perturbation_rms
from kdray.methods.base import PeerContext
from kdray.metrics import MetricSums
from kdray.population import Population
from kdray.step import StepRunner


def _proc(tiny_raw, k=2, **method):
    tiny_raw["method"] = {"name": "acn", **method}
    tiny_raw["peers"] = [{"arch": "resnet8", "arch_kwargs": {"width": 4}} for _ in range(k)]
    return Population(load_config(tiny_raw))


def test_perturbation_bound_holds_after_every_generator_step(tiny_raw):
    proc = _proc(tiny_raw, eps=0.5, radius=0.05)  # eps alone would allow RMS up to 0.5
    gen = proc.shared.module
    x = next(iter(proc.data.eval_batches("val"))).x
    for i, batch in enumerate(proc.data.train_batches(0, max_steps=5)):
        before = [t.clone() for t in gen.parameters()]
        StepRunner(proc).step(batch, 0, i)
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
    # each part's value is the peer's share of the objective: the shares add up to J itself
    assert float(sum(p.detach() for p in parts)) == pytest.approx(float(-joint.detach()), rel=1e-5)
    for a, b in zip(g_joint, g_split):
        assert torch.allclose(a, b, atol=1e-7, rtol=1e-5)
    assert any(float(a.abs().max()) > 0 for a in g_joint)


def test_generator_maximises_disagreement(tiny_raw):
    proc = _proc(tiny_raw, eps=0.5, radius=0.5, **{"weights": {"ce": 0.0, "kl": 0.0, "kl_div": 0.0}})
    batch = next(iter(proc.data.train_batches(0)))
    first = last = None
    for i in range(6):
        m = StepRunner(proc).step(batch, 0, i).means()
        value = m["peer0/div_gen"]
        first = value if first is None else first
        last = value
    assert last > first  # networks frozen in effect (zero weights); only the generator learns


def test_penalty_switch_adds_a_bound_term(tiny_raw):
    proc = _proc(tiny_raw, restrict="penalty", eps=1.0, radius=0.01)
    batch = next(iter(proc.data.train_batches(0)))
    m = StepRunner(proc).step(batch, 0, 0).means()
    assert m["shared/loss_bound"] > 0


def test_logged_generator_loss_is_the_objective(tiny_raw):
    """``shared/loss_gen`` is minus the mean pairwise divergence J over the K(K-1) ordered pairs, not twice it:
    it equals minus the ``div_gen`` diagnostic that each peer computes from all the outputs."""
    proc = _proc(tiny_raw, k=3)
    batch = next(iter(proc.data.train_batches(0)))
    m = StepRunner(proc).step(batch, 0, 0).means()
    assert m["shared/loss_gen"] == pytest.approx(-m["peer0/div_gen"], rel=1e-5)
    assert m["peer0/div_gen"] == pytest.approx(m["peer2/div_gen"], rel=1e-5)


def test_codistillation_losses_by_hand(tiny_raw):
    """CE on the real half; T^2 KL(p_l^T || p_k^T) on the real half and on the divergent half, each against the
    other peers' outputs: swapped KL arguments or a half mixed up fail."""
    proc = _proc(tiny_raw, temperature=2.0)
    method = proc.method
    phase = next(ph for ph in method.phases() if ph.name == "codistill")
    batch = next(iter(proc.data.train_batches(0)))
    g = torch.Generator().manual_seed(1)
    own, peer = torch.randn(32, 4, generator=g), torch.randn(32, 4, generator=g)
    ctx = PeerContext(
        0, "codistill", {"logits": own}, {1: {"logits": peer}}, {}, batch, batch.x, None, None, 0, 0
    )
    terms = method.loss(phase, ctx)

    def kl(target, student):  # KL(p_target^T || p_student^T), batch mean
        p, q = (target / 2).softmax(1), (student / 2).softmax(1)
        return float((p * (p.log() - q.log())).sum(1).mean())

    assert float(terms["ce"]) == pytest.approx(float(F.cross_entropy(own[:16], batch.y)), rel=1e-6)
    assert float(terms["kl"]) == pytest.approx(4 * kl(peer[:16], own[:16]), rel=1e-5)
    assert float(terms["kl_div"]) == pytest.approx(4 * kl(peer[16:], own[16:]), rel=1e-5)


def test_generator_part_by_hand(tiny_raw):
    """Peer k's generator term is minus its share of J, (1 / K(K-1)) sum_l KL(p_k || p_l), for K = 3."""
    proc = _proc(tiny_raw, k=3)
    g = torch.Generator().manual_seed(2)
    z = [torch.randn(8, 4, generator=g) for _ in range(3)]
    part = proc.method.generator_part(z[0], [z[1], z[2]])

    def kl(a, b):  # KL(p_a || p_b)
        p, q = a.softmax(1), b.softmax(1)
        return float((p * (p.log() - q.log())).sum(1).mean())

    assert float(part) == pytest.approx((kl(z[0], z[1]) + kl(z[0], z[2])) / 6, rel=1e-5)


@pytest.mark.parametrize("bn_stats", ["keep", "update"])
def test_generator_phase_leaves_batchnorm_statistics_alone(tiny_raw, bn_stats):
    proc = _proc(tiny_raw, gen_bn_stats=bn_stats)
    phase = next(ph for ph in proc.method.phases() if ph.name == "gen")
    for p in proc.peers:
        p.train_mode()
    before = [t.clone() for p in proc.peers for n, t in p.net.model.named_buffers() if "running_mean" in n]
    batch = next(iter(proc.data.train_batches(0)))
    StepRunner(proc)._run_phase(
        phase, (0, 0), batch, 0, 0, torch.Generator().manual_seed(0), None, MetricSums()
    )
    after = [t for p in proc.peers for n, t in p.net.model.named_buffers() if "running_mean" in n]
    assert all(torch.equal(a, b) for a, b in zip(before, after)) == (bn_stats == "keep")
