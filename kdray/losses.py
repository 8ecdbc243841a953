"""Pure loss functions. No state, no config: tensors in, a scalar out.

Conventions (see shared/METHODS.md): ``KL(p || q) = sum p log(p / q)``; every divergence is averaged over the batch
(``batchmean``), never over batch x classes, unless ``reduction="legacy_mean"`` is asked for explicitly (only to
reproduce configs written against ``nn.KLDivLoss()``'s old default, e.g. TF-KD's x50/x100 multipliers).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

Reduction = Literal["batchmean", "legacy_mean", "none"]


def _reduce(per_sample: Tensor, reduction: Reduction, num_classes: int) -> Tensor:
    if reduction == "batchmean":
        return per_sample.mean()
    if reduction == "legacy_mean":
        return per_sample.mean() / num_classes
    if reduction == "none":
        return per_sample
    raise ValueError(f"reduction must be 'batchmean', 'legacy_mean' or 'none', got {reduction!r}")


def kl_divergence(
    student_logits: Tensor,
    target_logits: Tensor,
    temperature: float = 1.0,
    reduction: Reduction = "batchmean",
) -> Tensor:
    """``KL(softmax(t/T) || softmax(s/T))``: the target distribution first, as in Hinton KD and DML.

    No ``T^2`` factor here: the method multiplies by it where the paper does (it keeps gradient magnitudes
    comparable across temperatures).
    """
    log_p = F.log_softmax(target_logits / temperature, dim=1)
    return _kl(log_p.exp(), log_p, student_logits, temperature, reduction)


def _kl(p: Tensor, log_p: Tensor, student_logits: Tensor, temperature: float, reduction: Reduction) -> Tensor:
    """``sum_c p_c (log p_c - log softmax(s/T)_c)`` per sample, a class of probability 0 adding 0, then reduced."""
    log_q = F.log_softmax(student_logits / temperature, dim=1)
    per_sample = torch.where(p > 0, p * (log_p - log_q), torch.zeros_like(p)).sum(dim=1)
    return _reduce(per_sample, reduction, student_logits.shape[1])


def soft_target_kl(student_logits: Tensor, target_logits: list[Tensor], temperature: float = 1.0) -> Tensor:
    """Hinton's soft-target term over one or several targets (teachers, peers):
    ``T^2 * mean_j KL(softmax(z_j/T) || softmax(s/T))``. The ``T^2`` keeps the gradient's magnitude comparable
    across temperatures (Hinton et al. 2015, section 2)."""
    kl = sum(kl_divergence(student_logits, z, temperature) for z in target_logits) / len(target_logits)
    return (temperature * temperature) * kl


def kl_to_probs(
    student_logits: Tensor,
    target_probs: Tensor,
    temperature: float = 1.0,
    reduction: Reduction = "batchmean",
) -> Tensor:
    """``KL(p || softmax(s/T))`` for a target already given as probabilities (memories, hand-made teachers)."""
    p = target_probs.clamp_min(0)
    return _kl(p, p.clamp_min(1e-30).log(), student_logits, temperature, reduction)


def soft_cross_entropy(logits: Tensor, target_probs: Tensor) -> Tensor:
    """``-sum_c p_c log softmax(z)_c``, averaged over the batch (PS-KD's loss with soft targets)."""
    return -(target_probs * F.log_softmax(logits, dim=1)).sum(dim=1).mean()


def js_divergence(logits_a: Tensor, logits_b: Tensor, temperature: float = 1.0) -> Tensor:
    """Jensen-Shannon divergence ``(KL(p||m) + KL(q||m)) / 2`` with ``m = (p + q) / 2``, batch mean."""
    p = F.softmax(logits_a / temperature, dim=1)
    q = F.softmax(logits_b / temperature, dim=1)
    log_m = ((p + q) / 2).clamp_min(1e-30).log()
    kl_pm = (p * (p.clamp_min(1e-30).log() - log_m)).sum(1)
    kl_qm = (q * (q.clamp_min(1e-30).log() - log_m)).sum(1)
    return ((kl_pm + kl_qm) / 2).mean()


def l1_discrepancy(student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
    """Mean absolute difference of logits (DFAD's ``L1(s, t)``), averaged over batch and classes."""
    return (student_logits - teacher_logits).abs().mean()


# ---------------------------------------------------------------------------------------------- adversarial
def lsgan_real(scores: Tensor) -> Tensor:
    """Least-squares GAN term pushing scores to 1: ``mean (1 - D)^2``."""
    return (1 - scores).pow(2).mean()


def lsgan_fake(scores: Tensor) -> Tensor:
    """Least-squares GAN term pushing scores to 0: ``mean D^2``."""
    return scores.pow(2).mean()


def bce_real(scores: Tensor) -> Tensor:
    """``-mean log sigmoid(D)``: the non-saturating 'real' term on raw scores (logits)."""
    return F.binary_cross_entropy_with_logits(scores, torch.ones_like(scores))


def bce_fake(scores: Tensor) -> Tensor:
    """``-mean log(1 - sigmoid(D))`` on raw scores (logits)."""
    return F.binary_cross_entropy_with_logits(scores, torch.zeros_like(scores))


def gan_real(scores: Tensor, kind: Literal["lsgan", "bce"]) -> Tensor:
    return lsgan_real(scores) if kind == "lsgan" else bce_real(scores)


def gan_fake(scores: Tensor, kind: Literal["lsgan", "bce"]) -> Tensor:
    return lsgan_fake(scores) if kind == "lsgan" else bce_fake(scores)
