"""Self-distillation: PS-KD, CS-KD, TF-KD, AI-KD. Hand-computed targets and losses (a flipped sign or KL direction
fails), memories at the right rows, the legacy TF-KD multiplier, AI-KD's two updates, a staged AI-KD run."""

from __future__ import annotations

import copy
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

import kdray
from kdray.checkpoint import load_checkpoint
from kdray.config import load_config
from kdray.errors import ConfigError
from kdray.methods.base import PeerContext
from kdray.methods.pskd import progressive_alpha
from kdray.metrics import MetricSums
from kdray.population import Population
from kdray.step import StepRunner
from tests.helpers import train_until_stopped


def kl(p_logits, q_logits, t=1.0):
    """KL(softmax(p/t) || softmax(q/t)), batch mean, written out."""
    p, q = (p_logits / t).softmax(1), (q_logits / t).softmax(1)
    return float((p * (p.log() - q.log())).sum(1).mean())


def _pop(raw, method, peers=None):
    raw = copy.deepcopy(raw)
    raw["method"] = method
    if peers is not None:
        raw["peers"] = peers
    return Population(load_config(raw))


def _ctx(pop, k, out, batch, received=None, epoch=0, previous=None):
    peer = next(p for p in pop.peers if p.index == k)
    return PeerContext(
        k, "main", out, received or {}, {}, batch, batch.x if batch else None, peer.state, None, epoch, 0,
        buffers=peer.buffers, previous=previous or {},
    )  # fmt: skip


# -------------------------------------------------------------------------------------------------------- PS-KD
def test_pskd_alpha_grows_to_alpha_T_at_the_last_epoch():
    assert progressive_alpha(0.8, 0, 10) == pytest.approx(0.08)
    assert progressive_alpha(0.8, 9, 10) == pytest.approx(0.8)


def test_pskd_target_and_loss_by_hand(tiny_raw):
    tiny_raw["train"]["epochs"] = 4
    pop = _pop(tiny_raw, {"name": "pskd"}, tiny_raw["peers"][:1])
    phase = pop.method.phases()[0]
    batch = next(iter(pop.batches(0)))
    memory = pop.peers[0].buffers["memory"]
    g = torch.Generator().manual_seed(0)
    memory[batch.index] = torch.randn(16, 4, generator=g).softmax(1)  # last epoch's predictions
    logits = torch.randn(16, 4, generator=g)
    ctx = _ctx(pop, 0, {"logits": logits}, batch, epoch=2)
    terms = pop.method.loss(phase, ctx)
    a = 0.8 * 3 / 4
    target = (1 - a) * F.one_hot(batch.y, 4).float() + a * memory[batch.index]
    by_hand = -(target * logits.log_softmax(1)).sum(1).mean()
    assert float(terms["soft_ce"]) == pytest.approx(float(by_hand), rel=1e-6)
    assert torch.allclose(
        ctx.writes["memory"], logits.softmax(1)
    )  # this step's predictions, for the next epoch


def test_pskd_memory_is_written_at_the_batch_rows_after_the_step(tiny_raw):
    pop = _pop(tiny_raw, {"name": "pskd"}, tiny_raw["peers"][:1])
    memory = pop.peers[0].buffers["memory"]
    assert torch.equal(memory, F.one_hot(pop.data.train_labels(), 4).float())  # initialised to the labels
    batch = next(iter(pop.batches(0)))
    net = pop.peers[0].net
    net.train()
    with (
        torch.no_grad()
    ):  # what the step's forward will predict (same seed for the forward, BN in train mode)
        before = {k: v.clone() for k, v in net.model.state_dict().items()}
        expected = net(batch.x)["logits"].softmax(1)
        net.model.load_state_dict(before)
    StepRunner(pop).step(batch, 0, 0)
    assert torch.allclose(memory[batch.index], expected, atol=1e-6)
    others = torch.ones(len(memory), dtype=torch.bool)
    others[batch.index] = False
    assert torch.equal(memory[others], F.one_hot(pop.data.train_labels()[others], 4).float())


def test_pskd_inside_dml(tiny_raw):
    pop = _pop(tiny_raw, {"name": "pskd", "weights": {"kl": 1.0}})
    assert pop.method.topology.sources_of(0) == (1,)
    metrics = StepRunner(pop).step(next(iter(pop.batches(0))), 0, 0).means()
    assert metrics["peer0/loss_kl"] > 0 and "peer0/loss_soft_ce" in metrics


# -------------------------------------------------------------------------------------------------------- CS-KD
@pytest.mark.parametrize("pair_forward", ["separate", "joint"])
def test_cskd_loss_by_hand(tiny_raw, pair_forward):
    pop = _pop(tiny_raw, {"name": "cskd", "pair_forward": pair_forward}, tiny_raw["peers"][:1])
    phase = next(ph for ph in pop.method.phases() if ph.name == "main")
    batch = next(iter(pop.batches(0)))
    assert batch.pair is not None and torch.equal(batch.pair.y, batch.y)
    g = torch.Generator().manual_seed(1)
    own, pair = torch.randn(16, 4, generator=g), torch.randn(16, 4, generator=g)
    if pair_forward == "joint":
        ctx = _ctx(pop, 0, {"logits": torch.cat([own, pair])}, batch)
    else:
        ctx = _ctx(pop, 0, {"logits": own}, batch, previous={"logits": pair})
    terms = pop.method.loss(phase, ctx)
    assert float(terms["ce"]) == pytest.approx(float(F.cross_entropy(own, batch.y)), rel=1e-6)
    assert float(terms["cls"]) == pytest.approx(
        16 * kl(pair, own, 4.0), rel=1e-5
    )  # T^2 KL(p(x')^T || p(x)^T)


def test_cskd_joint_pair_half_carries_no_gradient_by_hand(tiny_raw):
    """``pair_forward: joint``: the 2B logits [own, pair] get the gradient of CE + T^2 KL(p(x')^T || p(x)^T) on their
    first half only, ``d cls / d own = T (p_own^T - p_pair^T) / B`` (and CE's ``(softmax(own) - onehot) / B``); the
    pair half is a target, exactly 0 gradient. B = 2, C = 3, T = 2, by hand."""
    pop = _pop(tiny_raw, {"name": "cskd", "pair_forward": "joint", "temperature": 2.0}, tiny_raw["peers"][:1])
    (phase,) = pop.method.phases()
    own = torch.tensor([[1.0, 0.0, -1.0], [0.5, 0.5, 0.0]])
    pair = torch.tensor([[0.0, 2.0, 0.0], [-1.0, 0.0, 1.0]])
    y = torch.tensor([0, 2])
    logits = torch.cat([own, pair]).requires_grad_(True)
    ctx = PeerContext(0, "main", {"logits": logits}, {}, {}, SimpleNamespace(y=y), None, None, None, 0, 0)
    terms = pop.method.loss(phase, ctx)
    (terms["ce"] + terms["cls"]).backward()
    p_own, p_pair = (own / 2).softmax(1), (pair / 2).softmax(1)
    expected_own = (own.softmax(1) - F.one_hot(y, 3).float()) / 2 + 2 * (p_own - p_pair) / 2
    assert torch.allclose(logits.grad[:2], expected_own, atol=1e-6)
    assert torch.equal(logits.grad[2:], torch.zeros(2, 3))  # the pair half: a target, no gradient
    assert float(terms["cls"].detach()) == pytest.approx(4 * kl(pair, own, 2.0), rel=1e-6)


def test_cskd_pairs_forwarded_first_change_only_the_running_statistics(tiny_raw):
    """kdray forwards the pairs x' before the batch x; the authors' code forwards x (with gradient), then x' (no_grad).
    In train mode BatchNorm normalises each forward with its own batch's statistics, so the step's weights equal the
    authors' order (by hand, plain SGD); only the order of the two running-statistics updates differs: kdray's
    running means are those of x' then x, not x then x'."""
    tiny_raw["train"]["optimizer"] = {"name": "sgd", "lr": 0.5, "momentum": 0.0, "weight_decay": 0.0}
    pop = _pop(tiny_raw, {"name": "cskd"}, tiny_raw["peers"][:1])
    peer = pop.peers[0]
    peer.train_mode()
    batch = next(iter(pop.batches(0)))

    def by_hand(order):
        model = copy.deepcopy(peer.net.model).train()
        outs = {}
        for part in order:
            with torch.set_grad_enabled(part == "x"):
                outs[part] = model(batch.x if part == "x" else batch.pair.x)
        loss = F.cross_entropy(outs["x"], batch.y) + 16 * F.kl_div(
            F.log_softmax(outs["x"] / 4, 1), F.softmax(outs["pair"] / 4, 1), reduction="batchmean"
        )
        loss.backward()
        with torch.no_grad():
            for q in model.parameters():
                q -= 0.5 * q.grad
        return model.state_dict()

    authors, pairs_first = by_hand(["x", "pair"]), by_hand(["pair", "x"])
    StepRunner(pop).step(batch, 0, 0)
    kdray = peer.net.model.state_dict()
    for key, value in kdray.items():
        if "running" in key:
            assert torch.allclose(value, pairs_first[key], atol=1e-6), key
        elif value.is_floating_point():
            assert torch.allclose(value, authors[key], atol=1e-5), key
    moved = [k for k in kdray if "running_mean" in k and not torch.allclose(kdray[k], authors[k], atol=1e-6)]
    assert moved  # the order is visible in the running statistics, and only there


def test_cskd_pair_forward_carries_no_gradient(tiny_raw):
    pop = _pop(tiny_raw, {"name": "cskd"}, tiny_raw["peers"][:1])
    assert [ph.optimizer for ph in pop.method.phases()] == [None, "net"]
    metrics = StepRunner(pop).step(next(iter(pop.batches(0))), 0, 0).means()
    assert metrics["peer0/loss_cls"] >= 0 and "peer0/train_acc" in metrics


# -------------------------------------------------------------------------------------------------------- TF-KD
def test_tfkd_legacy_reduction_equals_kldivloss_mean_times_the_multiplier(tiny_raw, tmp_path):
    teacher = _teacher(tiny_raw, tmp_path)
    peers = [{"name": "t", **teacher}, {"name": "s", "arch": "resnet8", "arch_kwargs": {"width": 4}}]
    method = {"name": "tfkd", "mode": "self", "reduction": "legacy_mean", "multiplier": 50, "temperature": 6}
    pop = _pop(tiny_raw, method, peers)
    batch = next(iter(pop.batches(0)))
    g = torch.Generator().manual_seed(2)
    student, t_logits = torch.randn(16, 4, generator=g), torch.randn(16, 4, generator=g)
    terms = pop.method.loss(
        pop.method.phases()[0], _ctx(pop, 1, {"logits": student}, batch, {0: {"logits": t_logits}})
    )
    published = torch.nn.KLDivLoss()(F.log_softmax(student / 6, 1), F.softmax(t_logits / 6, 1)) * 36 * 50
    assert float(terms["kd"]) == pytest.approx(float(published), rel=1e-6)
    assert float(terms["kd"]) == pytest.approx(36 * 50 * kl(t_logits, student, 6) / 4, rel=1e-5)


def test_tfkd_reg_teacher_and_loss_by_hand(tiny_raw):
    method = {"name": "tfkd", "mode": "reg", "temperature": 20, "multiplier": 100, "reduction": "legacy_mean"}
    pop = _pop(tiny_raw, method, tiny_raw["peers"][:1])
    batch = next(iter(pop.batches(0)))
    student = torch.randn(16, 4, generator=torch.Generator().manual_seed(3))
    terms = pop.method.loss(pop.method.phases()[0], _ctx(pop, 0, {"logits": student}, batch))
    q = torch.full((16, 4), 0.01 / 3)
    q[torch.arange(16), batch.y] = 0.99
    teacher = F.softmax(q / 20, 1)  # the authors' code: a softmax over probabilities / T
    published = torch.nn.KLDivLoss()(F.log_softmax(student, 1), teacher) * 100
    assert float(terms["reg"]) == pytest.approx(float(published), rel=1e-6)


def test_tfkd_reg_defaults_are_the_authors_resnet18_values(tiny_raw):
    """Mode reg, nothing else given: a = 0.1 (ce 0.9, reg 0.1), T = 20, and a reg term equal to the authors'
    ``nn.KLDivLoss()`` x100 as it is on 100 classes, i.e. the legacy mean x C (here C = 4); mode self keeps kdray's
    a = 0.9, T = 4. A partial weights mapping keeps the mode's other defaults."""
    pop = _pop(tiny_raw, {"name": "tfkd", "mode": "reg"}, tiny_raw["peers"][:1])
    cfg = pop.method.cfg
    assert (cfg.temperature, cfg.weights, cfg.multiplier) == (20.0, {"ce": 0.9, "reg": 0.1}, 1.0)
    batch = next(iter(pop.batches(0)))
    student = torch.randn(16, 4, generator=torch.Generator().manual_seed(5))
    terms = pop.method.loss(pop.method.phases()[0], _ctx(pop, 0, {"logits": student}, batch))
    q = torch.full((16, 4), 0.01 / 3)
    q[torch.arange(16), batch.y] = 0.99
    legacy = torch.nn.KLDivLoss()(F.log_softmax(student, 1), F.softmax(q / 20, 1))
    assert float(terms["reg"]) == pytest.approx(float(legacy) * 100 * 4 / 100, rel=1e-6)
    partial = _pop(tiny_raw, {"name": "tfkd", "mode": "reg", "weights": {"reg": 0.3}}, tiny_raw["peers"][:1])
    assert partial.method.cfg.weights == {"ce": 0.9, "reg": 0.3}
    teacher = [
        {"name": "t", "arch": "resnet8", "arch_kwargs": {"width": 4}, "frozen": True, "checkpoint": "x.pt"}
    ]
    self_cfg = load_config(
        {**tiny_raw, "peers": teacher + tiny_raw["peers"][:1], "method": {"name": "tfkd"}}
    ).method
    assert (self_cfg.temperature, self_cfg.weights) == (4.0, {"ce": 0.1, "kd": 0.9})


def test_tfkd_self_needs_one_frozen_teacher(tiny_raw):
    with pytest.raises(ConfigError, match="exactly one frozen teacher"):
        _pop(tiny_raw, {"name": "tfkd", "mode": "self"}, tiny_raw["peers"][:1])


# -------------------------------------------------------------------------------------------------------- AI-KD
def _teacher(tiny_raw, tmp_path) -> dict:
    raw = copy.deepcopy(tiny_raw)
    raw["peers"] = [{"name": "net", "arch": "resnet8", "arch_kwargs": {"width": 4}}]
    raw["method"] = {"name": "independent"}
    out = tmp_path / "pretrained"
    if not (out / "checkpoints" / "last.pt").exists():
        kdray.train(raw, out=out)
    return {"arch": "resnet8", "arch_kwargs": {"width": 4}, "frozen": True, "checkpoint": str(out)}


def _aikd(tiny_raw, tmp_path, **method):
    peers = [
        {"name": "pre", **_teacher(tiny_raw, tmp_path)},
        {"name": "s", "arch": "resnet8", "arch_kwargs": {"width": 4}},
    ]
    return _pop(tiny_raw, {"name": "aikd", **method}, peers)


def _params(module):
    return {n: t.detach().clone() for n, t in module.named_parameters()}


def test_aikd_updates_touch_only_their_own_parameters_and_the_student_fools_the_discriminator(
    tiny_raw, tmp_path
):
    """The student step lowers the adversarial loss on a fixed batch and raises D's "real" score of the student's
    distribution; the discriminator step changes the discriminator only."""
    pop = _aikd(tiny_raw, tmp_path, weights={"ce": 0.0, "kd": 0.0, "adv": 1.0}, progressive=False)
    runner = StepRunner(pop)
    student, pre = pop.peers[1], pop.peers[0]
    disc = student.state["disc"]
    phases = {ph.name: ph for ph in pop.method.phases()}
    batch = next(iter(pop.batches(0)))
    for p in pop.peers:
        p.train_mode()

    def real_score() -> float:  # D's score of the student's distribution (high: "looks pre-trained")
        with torch.no_grad():
            return float(disc(pop.method.probs(student.net(batch.x)["logits"])).mean())

    before_d, before_net, before_pre = _params(disc), _params(student.net), _params(pre.net)
    s0 = real_score()
    rng = torch.Generator().manual_seed(0)
    metrics = MetricSums()
    last = runner._run_phase(phases["student"], (0, 0), batch, 0, 0, rng, None, metrics)
    s1 = real_score()
    assert s1 > s0  # the student moved towards what D calls real
    assert all(
        torch.equal(before_d[k], v) for k, v in _params(disc).items()
    )  # D untouched by the student step
    assert any(not torch.equal(before_net[k], v) for k, v in _params(student.net).items())
    adv0 = metrics.means()["s/loss_adv"]
    assert (1 - s1) ** 2 < adv0 + 1e-6  # LSGAN (1 - D)^2 fell on the same batch

    net_after = _params(student.net)
    runner._run_phase(phases["disc"], (1, 0), batch, 0, 0, rng, last, MetricSums())
    assert any(not torch.equal(before_d[k], v) for k, v in _params(disc).items())
    assert all(torch.equal(net_after[k], v) for k, v in _params(student.net).items())  # the student untouched
    assert all(torch.equal(before_pre[k], v) for k, v in _params(pre.net).items())  # pre-trained: frozen


def test_aikd_loss_by_hand(tiny_raw, tmp_path):
    pop = _aikd(tiny_raw, tmp_path, temperature=2.0)
    batch = next(iter(pop.batches(0)))
    g = torch.Generator().manual_seed(4)
    z, zp = torch.randn(16, 4, generator=g), torch.randn(16, 4, generator=g)
    terms = pop.method.loss(pop.method.phases()[0], _ctx(pop, 1, {"logits": z}, batch, {0: {"logits": zp}}))
    a = progressive_alpha(0.8, 0, 1)
    target = (1 - a) * F.one_hot(batch.y, 4).float() + a * F.one_hot(batch.y, 4).float()  # memory: one-hot
    assert float(terms["ce"]) == pytest.approx(float(-(target * z.log_softmax(1)).sum(1).mean()), rel=1e-6)
    assert float(terms["kd"]) == pytest.approx(4 * kl(zp, z, 2.0), rel=1e-5)
    d = pop.peers[1].state["disc"](z.softmax(1))
    assert float(terms["adv"]) == pytest.approx(float((1 - d.detach()).pow(2).mean()), rel=1e-6)


class _FirstProb(torch.nn.Module):
    """A discriminator computable by hand: D(p) = p_0."""

    def forward(self, p):
        return p[:, 0]


@pytest.mark.parametrize("gan", ["lsgan", "bce"])
def test_aikd_discriminator_calls_the_pretrained_distribution_real_by_hand(tiny_raw, tmp_path, gan):
    """L_D = L_real(D(p_pre)) + L_fake(D(p_s)) with D(p) = p_0: the pre-trained network's distribution (0.25 on
    class 0) is real, the student's (0.7) fake. LSGAN: (1 - 0.25)^2 + 0.7^2 = 1.0525 (swapped: 0.1525); BCE on raw
    scores: -log sigmoid(0.25) - log(1 - sigmoid(0.7))."""
    pop = _aikd(tiny_raw, tmp_path, gan=gan)
    disc_phase = next(ph for ph in pop.method.phases() if ph.name == "disc")
    pre = torch.zeros(1, 4)  # uniform: p_0 = 0.25
    student = torch.tensor([[0.7, 0.1, 0.1, 0.1]]).log()  # p_0 = 0.7
    state = torch.nn.ModuleDict({"disc": _FirstProb()})
    ctx = PeerContext(1, "disc", {"logits": student}, {0: {"logits": pre}}, {}, None, None, state, None, 0, 0)
    loss = float(pop.method.loss(disc_phase, ctx)["disc"])
    sig = lambda v: 1 / (1 + math.exp(-v))  # noqa: E731
    expected = 0.75**2 + 0.7**2 if gan == "lsgan" else -math.log(sig(0.25)) - math.log(1 - sig(0.7))
    assert loss == pytest.approx(expected, rel=1e-6)
    if gan == "lsgan":
        assert float(ctx.metrics["disc_acc_real"]) == 0.0 and float(ctx.metrics["disc_acc_fake"]) == 0.0


def test_aikd_memory_rows_are_the_students_predictions_after_the_step(tiny_raw, tmp_path):
    """Progressive knowledge: after a step, the student's memory at the batch's rows holds that step's softmax (the
    forward's, before the update), every other row its one-hot initialisation; the loss asked for exactly that."""
    pop = _aikd(tiny_raw, tmp_path)
    student = pop.peers[1]
    memory = student.buffers["memory"]
    labels = F.one_hot(pop.data.train_labels(), 4).float()
    assert torch.equal(memory, labels)
    batch = next(iter(pop.batches(0)))
    for p in pop.peers:
        p.train_mode()
    with torch.no_grad():
        before = {k: v.clone() for k, v in student.net.model.state_dict().items()}
        expected = student.net(batch.x)["logits"].softmax(1)
        student.net.model.load_state_dict(before)
    StepRunner(pop).step(batch, 0, 0)
    assert torch.allclose(memory[batch.index], expected, atol=1e-6)
    assert not torch.allclose(memory[batch.index], labels[batch.index], atol=1e-3)
    others = torch.ones(len(memory), dtype=torch.bool)
    others[batch.index] = False
    assert torch.equal(memory[others], labels[others])


@pytest.mark.parametrize(
    ("switches", "terms"),
    [
        ({"progressive": False}, {"ce", "kd", "adv"}),
        ({"deterministic": False}, {"ce", "adv"}),
        ({"adversarial": False}, {"ce", "kd"}),
    ],
)
def test_aikd_ablations_are_configs(tiny_raw, tmp_path, switches, terms):
    pop = _aikd(tiny_raw, tmp_path, **switches)
    metrics = StepRunner(pop).step(next(iter(pop.batches(0))), 0, 0).means()
    assert {k.split("loss_")[1] for k in metrics if k.startswith("s/loss_") and k != "s/loss_disc"} == terms
    assert ("memory" in pop.peers[1].buffers) == switches.get("progressive", True)
    assert (pop.peers[1].state is not None) == switches.get("adversarial", True)


def test_aikd_refuses_another_architecture(tiny_raw, tmp_path):
    peers = [
        {"name": "pre", **_teacher(tiny_raw, tmp_path)},
        {"name": "s", "arch": "resnet14", "arch_kwargs": {"width": 4}},
    ]
    with pytest.raises(ConfigError, match="same architecture"):
        _pop(tiny_raw, {"name": "aikd"}, peers)


def test_aikd_two_stages_resume_inside_stage_two(tiny_raw, tmp_path):
    """Stage 1 pre-trains the network; stage 2 (AI-KD) stops mid-epoch and resumes there: the memory, the
    discriminator and the student continue exactly as in an uninterrupted run."""
    small = {"arch": "resnet8", "arch_kwargs": {"width": 4}}
    raw = copy.deepcopy(tiny_raw)
    raw.pop("peers")
    raw.pop("method")
    raw["train"].update(epochs=2, steps_per_epoch=3, checkpoint_every_steps=1)
    raw["stages"] = [
        {"name": "pretrain", "method": {"name": "independent"}, "peers": [{"name": "net", **small}]},
        {"name": "aikd", "method": {"name": "aikd"},
         "peers": [{"name": "pre", "frozen": True, "from_stage": "pretrain", **small}, {"name": "s", **small}]},
    ]  # fmt: skip
    train_until_stopped(raw, tmp_path / "run", steps_done=4, run="tiny-aikd")
    resumed = load_checkpoint(kdray.train(None, resume=tmp_path / "run").checkpoint)
    full = load_checkpoint(kdray.train(raw, out=tmp_path / "full").checkpoint)
    for part in ("net", "state", "buffers"):
        for key, value in full["peers"]["s"][part].items():
            assert torch.equal(resumed["peers"]["s"][part][key], value), (part, key)
