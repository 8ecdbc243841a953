"""AFD: which parameters each of the three updates may touch, the ring wiring, transfer layers."""

from __future__ import annotations

import pytest
import torch

from kdray.config import load_config
from kdray.engines.process import PopulationProcess
from kdray.errors import ConfigError

HETERO = [
    {"arch": "resnet8", "arch_kwargs": {"width": 4}},  # layer3: 16 channels
    {"arch": "resnet14", "arch_kwargs": {"width": 8}},  # layer3: 32 channels
]


def _proc(tiny_raw, peers=None, **method):
    tiny_raw["method"] = {"name": "afd", **method}
    if peers is not None:
        tiny_raw["peers"] = peers
    return PopulationProcess(load_config(tiny_raw))


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
    runner = proc.runner
    phases = {ph.name: ph for ph in proc.method.phases()}
    batch = next(iter(proc.data.train_batches(0)))
    rng = torch.Generator().manual_seed(0)
    for p in proc.peers:
        p.train_mode()

    s0 = _snapshot(proc)
    last = runner._run_phase(phases["logit"], batch, 0, 0, rng, None, {})
    s1 = _snapshot(proc)
    changed = _changed(s0, s1)
    assert changed and {k[1] for k in changed} == {"net"}
    assert any("fc" in k[2] for k in changed)  # the classifier learns from the logit loss

    last = runner._run_phase(phases["adv"], batch, 0, 0, rng, last, {})
    s2 = _snapshot(proc)
    changed = _changed(s1, s2)
    assert {k[1] for k in changed} == {"net", "transfer"}
    assert not any("fc" in k[2] for k in changed)  # past the tap: no adversarial gradient
    assert any(k[1] == "net" and "layer3" in k[2] for k in changed)
    transfer_peers = {k[0] for k in changed if k[1] == "transfer"}
    assert transfer_peers == {0}  # only resnet8 (16 -> 32 channels) needs a transfer layer

    runner._run_phase(phases["disc"], batch, 0, 0, rng, last, {})
    s3 = _snapshot(proc)
    changed = _changed(s2, s3)
    assert changed and {k[1] for k in changed} == {"disc"}
    assert {k[0] for k in changed} == {0, 1}


def test_ring_of_four_discriminator_k_sees_peer_k_minus_1(tiny_raw, monkeypatch):
    peers = [{"arch": "resnet8", "arch_kwargs": {"width": 4}} for _ in range(4)]
    proc = _proc(tiny_raw, peers)
    method = proc.method
    # Each peer publishes a feature map filled with its own index: what D_k receives proves who sent it.
    original = method.publish

    def tagged(phase, k, out, state):
        signals = original(phase, k, out, state)
        if "feat" in signals:
            signals["feat"] = signals["feat"] * 0 + float(k)
        return signals

    monkeypatch.setattr(method, "publish", tagged)
    seen: dict[int, list[float]] = {}
    for p in proc.peers:
        disc = p.state["disc"]
        fwd = disc.forward

        def spy(x, k=p.index, fwd=fwd):
            seen.setdefault(k, []).append(float(x.mean()))
            return fwd(x)

        monkeypatch.setattr(disc, "forward", spy)
    batch = next(iter(proc.data.train_batches(0)))
    proc.runner.step(batch, 0, 0)
    for k in range(4):
        # adversarial phase: own (fake) map; discriminator phase: the peer's (real) map, then own (fake) map
        assert seen[k] == [float(k), float((k - 1) % 4), float(k)], (k, seen[k])
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
    metrics = proc.runner.step(batch, 0, 0)
    assert all(torch.isfinite(v) for v in metrics.values())
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
    m1 = lsgan.runner.step(batch, 0, 0)
    m2 = bce.runner.step(batch, 0, 0)
    # Same initial weights; the discriminators differ only in the loss: BCE(0.5-ish logit) ~ log 2, LSGAN ~ (1-D)^2.
    assert not torch.isclose(m1["peer0/loss_adv"], m2["peer0/loss_adv"])
    assert float(m2["peer0/loss_disc"]) == pytest.approx(2 * 0.693, abs=0.5)


def test_step_ratios_keep_the_discriminator_on_adversarial_steps(tiny_raw):
    proc = _proc(tiny_raw, None, adv_every=2, disc_every=3)
    adv, disc = proc.method.phases()[1:]
    assert (adv.every, disc.every) == (2, 6)
    batches = list(proc.data.train_batches(0, max_steps=3))
    for step, batch in enumerate(batches):  # steps 0, 1, 2: adversarial on 0 and 2, discriminator on 0
        metrics = proc.runner.step(batch, 0, step)
        assert ("peer0/loss_adv" in metrics) == (step % 2 == 0)
        assert ("peer0/loss_disc" in metrics) == (step % 6 == 0)
