"""Each loss against a hand computation on tiny tensors (temperature, reduction, sign, detach)."""

import math

import pytest
import torch

from kdray import losses

LN3 = math.log(3.0)


def test_kl_hand_computed_t1():
    student = torch.tensor([[0.0, 0.0], [0.0, 0.0]])  # q = (0.5, 0.5)
    target = torch.tensor([[LN3, 0.0], [LN3, 0.0]])  # p = (0.75, 0.25)
    expected = 0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5)  # 0.130812
    assert losses.kl_divergence(student, target) == pytest.approx(expected, abs=1e-6)
    assert expected == pytest.approx(0.130812, abs=1e-6)


def test_kl_temperature_and_reductions():
    student = torch.tensor([[0.0, 0.0]])
    target = torch.tensor([[LN3, 0.0]])
    p1 = math.sqrt(3) / (math.sqrt(3) + 1)  # softmax([ln3/2, 0])
    expected = p1 * math.log(p1 / 0.5) + (1 - p1) * math.log((1 - p1) / 0.5)  # 0.036349
    assert losses.kl_divergence(student, target, temperature=2.0) == pytest.approx(expected, abs=1e-6)
    assert losses.kl_divergence(student, target, 2.0, "legacy_mean") == pytest.approx(expected / 2, abs=1e-6)
    per = losses.kl_divergence(torch.zeros(3, 2), target.repeat(3, 1), 2.0, "none")
    assert per.shape == (3,)
    assert torch.allclose(per, torch.full((3,), expected), atol=1e-6)


def test_kl_batchmean_is_not_class_mean():
    s = torch.randn(4, 10)
    t = torch.randn(4, 10)
    ref = torch.nn.functional.kl_div(s.log_softmax(1), t.softmax(1), reduction="batchmean")
    assert losses.kl_divergence(s, t) == pytest.approx(float(ref), rel=1e-5)
    legacy = torch.nn.functional.kl_div(s.log_softmax(1), t.softmax(1), reduction="mean")
    assert losses.kl_divergence(s, t, reduction="legacy_mean") == pytest.approx(float(legacy), rel=1e-5)


def test_kl_is_zero_for_identical_and_gradient_sign():
    z = torch.tensor([[1.0, -2.0, 0.5]], requires_grad=True)
    assert float(losses.kl_divergence(z, z.detach()).detach()) == pytest.approx(0.0, abs=1e-7)
    # Moving toward the target lowers KL: the gradient on the target's arg-max logit is negative.
    s = torch.zeros(1, 2, requires_grad=True)
    losses.kl_divergence(s, torch.tensor([[LN3, 0.0]])).backward()
    assert s.grad[0, 0] == pytest.approx(-(0.75 - 0.5), abs=1e-6)  # d/dz KL = q - p
    assert s.grad[0, 1] == pytest.approx(0.25, abs=1e-6)


def test_soft_cross_entropy_and_kl_to_probs():
    z = torch.tensor([[0.0, 0.0]])
    p = torch.tensor([[0.75, 0.25]])
    assert losses.soft_cross_entropy(z, p) == pytest.approx(math.log(2), abs=1e-6)
    onehot = torch.tensor([[1.0, 0.0]])
    assert losses.soft_cross_entropy(z, onehot) == pytest.approx(
        float(torch.nn.functional.cross_entropy(z, torch.tensor([0]))), abs=1e-7
    )
    assert losses.kl_to_probs(z, p) == pytest.approx(0.130812, abs=1e-6)
    assert losses.kl_to_probs(z, onehot) == pytest.approx(math.log(2), abs=1e-6)  # 0 log 0 = 0


def test_js_divergence_hand_computed():
    a = torch.tensor([[LN3, 0.0]])  # (0.75, 0.25)
    b = torch.tensor([[0.0, LN3]])  # (0.25, 0.75)
    # m = (0.5, 0.5); JS = KL(p||m) = 0.130812 for both halves
    assert losses.js_divergence(a, b) == pytest.approx(0.130812, abs=1e-6)
    assert losses.js_divergence(a, a) == pytest.approx(0.0, abs=1e-7)


def test_l1_discrepancy():
    s = torch.tensor([[1.0, 2.0], [0.0, -1.0]])
    t = torch.tensor([[0.0, 0.0], [0.0, 1.0]])
    assert losses.l1_discrepancy(s, t) == pytest.approx((1 + 2 + 0 + 2) / 4)


def test_gan_terms_hand_computed():
    d = torch.tensor([0.0, 0.5, 1.0])
    assert losses.lsgan_real(d) == pytest.approx((1 + 0.25 + 0) / 3)
    assert losses.lsgan_fake(d) == pytest.approx((0 + 0.25 + 1) / 3)
    logits = torch.tensor([0.0, LN3])  # sigmoid = 0.5, 0.75
    assert losses.bce_real(logits) == pytest.approx(-(math.log(0.5) + math.log(0.75)) / 2, abs=1e-6)
    assert losses.bce_fake(logits) == pytest.approx(-(math.log(0.5) + math.log(0.25)) / 2, abs=1e-6)
    assert losses.gan_real(d, "lsgan") == losses.lsgan_real(d)
    assert losses.gan_fake(logits, "bce") == losses.bce_fake(logits)


def test_soft_target_kl_is_t_squared_times_the_mean_kl_over_targets_by_hand():
    """Two targets at T = 2: T^2 * (KL(p1 || q) + KL(p2 || q)) / 2, each KL written out from the softmaxes."""
    import math

    from kdray.losses import soft_target_kl

    s = torch.tensor([[1.0, 0.0]], dtype=torch.float64)
    t1 = torch.tensor([[0.0, 2.0]], dtype=torch.float64)
    t2 = torch.tensor([[4.0, 0.0]], dtype=torch.float64)

    def softmax(z, t):
        e = [math.exp(v / t) for v in z]
        return [v / sum(e) for v in e]

    q = softmax([1.0, 0.0], 2.0)
    kls = [
        sum(p_c * math.log(p_c / q_c) for p_c, q_c in zip(softmax(z, 2.0), q))
        for z in ([0.0, 2.0], [4.0, 0.0])
    ]
    assert soft_target_kl(s, [t1, t2], 2.0).item() == pytest.approx(4.0 * sum(kls) / 2, rel=1e-12)
    # the student is the second argument of KL: swapping student and target changes the value
    assert soft_target_kl(t1, [s], 2.0).item() != pytest.approx(soft_target_kl(s, [t1], 2.0).item(), rel=1e-6)
