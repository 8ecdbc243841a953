"""AFD: which parameters each of the three updates may touch, the ring wiring, transfer layers, the signs and values
of its losses, a discriminator that sees what differs, and BatchNorm statistics left to the training batches."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kdray.config import load_config
from kdray.errors import ConfigError
from kdray.methods.base import PeerContext
from kdray.metrics import MetricSums
from kdray.models.discriminators import FeatureDiscriminator
from kdray.population import Population
from kdray.step import StepRunner

HETERO = [
    {"arch": "resnet8", "arch_kwargs": {"width": 4}},  # layer3: 16 channels
    {"arch": "resnet14", "arch_kwargs": {"width": 8}},  # layer3: 32 channels
]


def _proc(tiny_raw, peers=None, **method):
    tiny_raw["method"] = {"name": "afd", **method}
    if peers is not None:
        tiny_raw["peers"] = peers
    return Population(load_config(tiny_raw))


def _snapshot(proc):
    snap = {}
    for p in proc.peers:
        for n, t in p.net.model.named_parameters():
            snap[(p.index, "net", n)] = t.detach().clone()
        for n, t in p.state.named_parameters():
            snap[(p.index, n.split(".")[0], n)] = t.detach().clone()
    return snap


def _changed(a, b):
    return {k for k in a if not torch.equal(a[k], b[k])}


def test_each_update_touches_only_its_own_parameters(tiny_raw):
    proc = _proc(tiny_raw, HETERO)
    runner = StepRunner(proc)
    phases = {ph.name: ph for ph in proc.method.phases()}
    batch = next(iter(proc.data.train_batches(0)))
    rng = torch.Generator().manual_seed(0)
    for p in proc.peers:
        p.train_mode()

    s0 = _snapshot(proc)
    last = runner._run_phase(phases["logit"], (0, 0), batch, 0, 0, rng, None, MetricSums())
    s1 = _snapshot(proc)
    changed = _changed(s0, s1)
    assert changed and {k[1] for k in changed} == {"net"}
    assert any("fc" in k[2] for k in changed)  # the classifier learns from the logit loss

    last = runner._run_phase(phases["adv"], (1, 0), batch, 0, 0, rng, last, MetricSums())
    s2 = _snapshot(proc)
    changed = _changed(s1, s2)
    assert {k[1] for k in changed} == {"net", "transfer"}
    assert not any("fc" in k[2] for k in changed)  # past the tap: no adversarial gradient
    assert any(k[1] == "net" and "layer3" in k[2] for k in changed)
    transfer_peers = {k[0] for k in changed if k[1] == "transfer"}
    assert transfer_peers == {0}  # only resnet8 (16 -> 32 channels) needs a transfer layer

    runner._run_phase(phases["disc"], (2, 0), batch, 0, 0, rng, last, MetricSums())
    s3 = _snapshot(proc)
    changed = _changed(s2, s3)
    assert changed and {k[1] for k in changed} == {"disc"}
    assert {k[0] for k in changed} == {0, 1}


@pytest.mark.parametrize("disc_batch", ["separate", "joint"])
def test_ring_of_four_discriminator_k_sees_peer_k_minus_1(tiny_raw, monkeypatch, disc_batch):
    peers = [{"arch": "resnet8", "arch_kwargs": {"width": 4}} for _ in range(4)]
    proc = _proc(tiny_raw, peers, disc_batch=disc_batch)
    method = proc.method
    # Each peer publishes a feature map filled with its own index: what D_k receives proves who sent it.
    original = method.publish

    def tagged(phase, k, out, state):
        signals = original(phase, k, out, state)
        if "feat" in signals:
            signals["feat"] = signals["feat"] * 0 + float(k)
        return signals

    monkeypatch.setattr(method, "publish", tagged)
    seen: dict[int, list[tuple[float, ...]]] = {}
    for p in proc.peers:
        disc = p.state["disc"]
        fwd = disc.forward

        def spy(x, k=p.index, fwd=fwd):
            # one call per map when separate; real and fake concatenated along the batch when joint
            halves = x.detach().chunk(2) if disc_batch == "joint" else (x.detach(),)
            seen.setdefault(k, []).append(tuple(float(h.mean()) for h in halves))
            return fwd(x)

        monkeypatch.setattr(disc, "forward", spy)
    batch = next(iter(proc.data.train_batches(0)))
    StepRunner(proc).step(batch, 0, 0)
    for k in range(4):
        real, fake = float((k - 1) % 4), float(k)
        if disc_batch == "separate":
            # adversarial phase: own (fake) map; discriminator phase: the peer's (real) map, then own (fake) map
            assert seen[k] == [(fake,), (real,), (fake,)], (k, seen[k])
        else:
            # both phases score [real; fake] in one batch
            assert seen[k] == [(real, fake), (real, fake)], (k, seen[k])
    assert [proc.method.feature_ring.sources_of(k) for k in range(4)] == [(3,), (0,), (1,), (2,)]


def test_logit_topology_switch(tiny_raw):
    peers = [{"arch": "resnet8", "arch_kwargs": {"width": 4}} for _ in range(3)]
    ring = _proc(tiny_raw, peers).method
    a2a = _proc(tiny_raw, peers, logit_topology="all_to_all").method
    logit, adv = ring.phases()[0], ring.phases()[1]
    assert ring.phase_topology(logit).sources_of(0) == (2,)
    assert a2a.phase_topology(logit).sources_of(0) == (1, 2)
    assert a2a.phase_topology(adv).sources_of(0) == (2,)  # features always follow the ring


def test_transfer_layers_heterogeneous_pair_trains_and_off_is_refused(tiny_raw):
    proc = _proc(tiny_raw, HETERO)
    assert proc.method.common_shape == (32, 3, 3)
    batch = next(iter(proc.data.train_batches(0)))
    metrics = StepRunner(proc).step(batch, 0, 0).means()
    assert all(torch.isfinite(torch.tensor(v)) for v in metrics.values())
    out = proc.peers[0].state["transfer"](torch.randn(2, 16, 3, 3))
    assert out.shape == (2, 32, 3, 3)
    with pytest.raises(ConfigError, match=r"method\.transfer.*differ in shape"):
        _proc(tiny_raw, HETERO, transfer="off")
    same = _proc(tiny_raw, [HETERO[0], HETERO[0]], transfer="off")  # identical shapes: no transfer layer
    assert isinstance(same.peers[0].state["transfer"], torch.nn.Identity)


def test_bce_switch_changes_the_adversarial_loss(tiny_raw):
    lsgan = _proc(tiny_raw, None)
    bce = _proc(tiny_raw, None, gan="bce")
    batch = next(iter(lsgan.data.train_batches(0)))
    m1 = StepRunner(lsgan).step(batch, 0, 0).means()
    m2 = StepRunner(bce).step(batch, 0, 0).means()
    # Same initial weights; the discriminators differ only in the loss: BCE(0.5-ish logit) ~ log 2, LSGAN ~ (1-D)^2.
    assert m1["peer0/loss_adv"] != pytest.approx(m2["peer0/loss_adv"])
    assert m2["peer0/loss_disc"] == pytest.approx(2 * 0.693, abs=0.5)


def test_step_ratios_keep_the_discriminator_on_adversarial_steps(tiny_raw):
    proc = _proc(tiny_raw, None, adv_every=2, disc_every=3)
    adv, disc = proc.method.phases()[1:]
    assert (adv.every, disc.every) == (2, 6)
    batches = list(proc.data.train_batches(0, max_steps=3))
    for step, batch in enumerate(batches):  # steps 0, 1, 2: adversarial on 0 and 2, discriminator on 0
        metrics = StepRunner(proc).step(batch, 0, step).sums
        assert ("peer0/loss_adv" in metrics) == (step % 2 == 0)
        assert ("peer0/loss_disc" in metrics) == (step % 6 == 0)


# ---------------------------------------------------------------------------------------- values and signs
class MeanScore(nn.Module):
    """A 'discriminator' whose score is the map's mean: the losses below can be computed by hand."""

    def forward(self, x):
        return x.mean(dim=(1, 2, 3))


def _ctx(proc, phase, out, received, published, batch):
    return PeerContext(0, phase, out, received, published, batch, batch.x, proc.peers[0].state, None, 0, 0)


def test_afd_loss_values_by_hand(tiny_raw):
    """Logit loss CE + T^2 KL(p_peer^T || p_k^T); LSGAN adversarial (1 - D(fake))^2; discriminator
    (1 - D(real))^2 + D(fake)^2, with D(real) from peer k-1's map. A flipped target or swapped KL arguments fails."""
    proc = _proc(tiny_raw, None, temperature=2.0)
    method = proc.method
    proc.peers[0].state["disc"] = MeanScore()
    phases = {ph.name: ph for ph in method.phases()}
    batch = next(iter(proc.data.train_batches(0)))
    g = torch.Generator().manual_seed(0)
    z_own, z_peer = torch.randn(16, 4, generator=g), torch.randn(16, 4, generator=g)
    terms = method.loss(
        phases["logit"], _ctx(proc, "logit", {"logits": z_own}, {1: {"logits": z_peer}}, {}, batch)
    )
    p, q = (z_peer / 2).softmax(1), (z_own / 2).softmax(1)
    kl = (p * (p.log() - q.log())).sum(1).mean()
    assert float(terms["ce"]) == pytest.approx(float(F.cross_entropy(z_own, batch.y)), rel=1e-6)
    assert float(terms["kl"]) == pytest.approx(4 * float(kl), rel=1e-5)

    fake = torch.full((16, 16, 3, 3), 0.3)
    real = torch.full((16, 16, 3, 3), 0.9)
    received = {1: {"feat": real}}
    adv = method.loss(phases["adv"], _ctx(proc, "adv", {}, received, {"feat": fake}, batch))
    assert float(adv["adv"]) == pytest.approx((1 - 0.3) ** 2, rel=1e-6)
    disc = method.loss(phases["disc"], _ctx(proc, "disc", {}, received, {"feat": fake}, batch))
    assert float(disc["disc"]) == pytest.approx((1 - 0.9) ** 2 + 0.3**2, rel=1e-6)


def test_one_adversarial_step_makes_the_discriminator_call_the_map_more_real(tiny_raw):
    """After the adversarial update, D's score of the network's own (fake) map rises and the adversarial loss
    falls, on the same batch: the network cooperates with the peer's distribution, not with its discriminator."""
    proc = _proc(tiny_raw, None, adv_optimizer={"lr": 0.05})
    runner, method = StepRunner(proc), proc.method
    phases = {ph.name: ph for ph in method.phases()}
    batch = next(iter(proc.data.train_batches(0)))
    rng = torch.Generator().manual_seed(0)
    for p in proc.peers:
        p.train_mode()
    last = runner._run_phase(phases["logit"], (0, 0), batch, 0, 0, rng, None, MetricSums())

    def fake_score(k: int) -> float:
        peer = proc.peers[k]
        with torch.no_grad():
            feat = peer.state["transfer"](peer.net(batch.x)["feat"])
            return float(peer.state["disc"](feat).mean())

    before = [fake_score(k) for k in (0, 1)]
    metrics = MetricSums()
    runner._run_phase(phases["adv"], (1, 0), batch, 0, 0, rng, last, metrics)
    after = [fake_score(k) for k in (0, 1)]
    for k in (0, 1):
        assert after[k] > before[k] + 1e-4, (k, before, after)
        assert (1 - after[k]) ** 2 < (1 - before[k]) ** 2


@pytest.mark.parametrize(
    ("norm", "batch"),
    [("none", "separate"), ("spectral", "separate"), ("dcgan", "joint"), ("batch", "joint")],
)
@pytest.mark.parametrize("change", ["scale", "mean"])
def test_discriminator_separates_maps_that_differ_only_in_scale_or_mean(norm, batch, change):
    """D trained on real = x and fake = 3x (or x + a per-channel shift) learns to tell them apart, through the
    method's own scoring (``AFD.score``). BatchNorm anywhere in D needs real and fake in one batch: called
    separately, each call is normalised by its own statistics (measured: a 60-step gap of 0.00 for ``batch`` and
    0.38 for ``dcgan`` on the scale change, against 0.99 without BatchNorm)."""
    from kdray.methods.afd import AFD, AFDConfig

    torch.manual_seed(0)
    x = torch.randn(32, 8, 4, 4)
    fake = 3 * x if change == "scale" else x + torch.linspace(-1, 1, 8).view(1, 8, 1, 1)
    disc = FeatureDiscriminator(8, hidden=16, n_layers=2, norm=norm)
    score = AFD.score.__get__(type("M", (), {"cfg": AFDConfig(name="afd", disc_batch=batch)})())
    opt = torch.optim.Adam(disc.parameters(), lr=2e-3, betas=(0.5, 0.999))
    for _ in range(60):
        d_real, d_fake = score(disc, x, fake)
        loss = (1 - d_real).pow(2).mean() + d_fake.pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        d_real, d_fake = score(disc, x, fake)
    assert float(d_real.mean() - d_fake.mean()) > 0.5


def test_a_batchnorm_input_layer_cannot_see_a_change_of_scale():
    """Why ``disc_norm: batch`` (kdray 0.1's discriminator) is not the default: in train mode, D(3x) = D(x)."""
    torch.manual_seed(0)
    disc = FeatureDiscriminator(8, hidden=16, n_layers=2, norm="batch").train()
    x = torch.randn(32, 8, 4, 4)
    assert torch.allclose(disc(3 * x), disc(x), atol=1e-4)


@pytest.mark.parametrize("bn_stats", ["keep", "update"])
def test_adversarial_forward_leaves_batchnorm_statistics_to_the_training_batch(tiny_raw, bn_stats):
    """With ``adv_bn_stats: keep`` a whole step moves the peers' running statistics exactly as the logit phase's
    forward alone does; with ``update`` the adversarial phase's second forward moves them again."""
    full = _proc(tiny_raw, None, adv_bn_stats=bn_stats)
    logit_only = _proc(tiny_raw, None, adv_bn_stats=bn_stats)
    batch = next(iter(full.data.train_batches(0)))
    StepRunner(full).step(batch, 0, 0)
    phases = {ph.name: ph for ph in logit_only.method.phases()}
    for p in logit_only.peers:
        p.train_mode()
    rng = torch.Generator().manual_seed(0)
    StepRunner(logit_only)._run_phase(phases["logit"], (0, 0), batch, 0, 0, rng, None, MetricSums())

    def stats(proc):
        return {
            (p.index, n): t.clone()
            for p in proc.peers
            for n, t in p.net.model.named_buffers()
            if "running" in n or "num_batches" in n
        }

    a, b = stats(full), stats(logit_only)
    same = all(torch.equal(a[k], b[k]) for k in a)
    assert same == (bn_stats == "keep")
