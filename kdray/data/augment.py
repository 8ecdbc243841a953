"""Augmentation (random pad-crop and horizontal flip, vectorised over a batch) and normalisation."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

# Per-channel (mean, std) of the training split, for the usual normalisation; ImageFolder gets ImageNet's.
NORMALISATION: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "fashion_mnist": ((0.2860,), (0.3530,)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "imagefolder": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}
# Zero padding of the random crop: 4 px for 32x32 CIFAR and 2 px for 28x28 Fashion-MNIST (1/8 and 1/14 of the
# side); an ImageFolder pads image_size // 8.
CROP_PADDING = {"fashion_mnist": 2, "cifar10": 4, "cifar100": 4}


def pad_crop_flip(x: Tensor, pad: int, generator: torch.Generator) -> Tensor:
    """Random crop of a zero-padded image and random horizontal flip, vectorised over the batch ``x`` (NCHW).

    Pad-and-crop plus horizontal flip is the standard augmentation for CIFAR in the KD papers we follow (DML,
    AFD, PS-KD, CRD's benchmark); we apply the same to Fashion-MNIST, where flipping a garment keeps its class.
    Offsets and flips are drawn from ``generator`` only, in a fixed order (row offsets, column offsets, flips).
    """
    n, c, h, w = x.shape
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    flip = torch.rand(n, generator=generator) < 0.5
    padded = F.pad(x, (pad, pad, pad, pad))
    rows = dy[:, None] + torch.arange(h)
    cols = dx[:, None] + torch.arange(w)
    # Reading the crop's columns right to left is the flip: one gather does both.
    cols = torch.where(flip[:, None], cols.flip(1), cols)
    return padded[
        torch.arange(n)[:, None, None, None],
        torch.arange(c)[None, :, None, None],
        rows[:, None, :, None],
        cols[:, None, None, :],
    ]


def normalise(x: Tensor, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """uint8 NCHW pixels -> float32 ``(x / 255 - mean) / std`` per channel."""
    mean_t = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
    return (x.float().div_(255.0) - mean_t).div_(std_t)
