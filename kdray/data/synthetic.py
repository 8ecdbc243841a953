"""A synthetic dataset: class-conditional Gaussians around fixed smooth templates, learnable by construction."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from kdray.config import SyntheticConfig
from kdray.data.batches import seeded_generator

# The synthetic set is drawn from this fixed seed, not the run seed, so runs with different seeds see the same data.
SYNTHETIC_DATA_SEED = 20_240_601
SYNTHETIC_SIGNAL, SYNTHETIC_NOISE = 0.6, 0.8  # 0.6^2 + 0.8^2 = 1: inputs have roughly unit variance


def synthetic_templates(cfg: SyntheticConfig) -> Tensor:
    """One fixed, smooth, unit-variance image per class (K, C, S, S), from the fixed data seed."""
    k, c, s = cfg.num_classes, cfg.channels, cfg.image_size
    coarse = torch.randn(
        k, c, max(2, s // 4), max(2, s // 4), generator=seeded_generator("synthetic", SYNTHETIC_DATA_SEED)
    )
    # Smooth, image-like templates (coarse noise upsampled) so a convolutional network can pick them up.
    templates = F.interpolate(coarse, size=(s, s), mode="bilinear", align_corners=False)
    flat = templates.flatten(1)
    return ((flat - flat.mean(1, keepdim=True)) / flat.std(1, keepdim=True)).view(k, c, s, s)


def synthetic_split(cfg: SyntheticConfig, split: str, length: int) -> tuple[Tensor, Tensor]:
    """``x = 0.6 * template[y] + 0.8 * noise``: class-conditional Gaussians, learnable by construction."""
    templates = synthetic_templates(cfg)
    generator = seeded_generator("synthetic", SYNTHETIC_DATA_SEED, split)
    y = torch.randint(cfg.num_classes, (length,), generator=generator)
    noise = torch.randn(length, *templates.shape[1:], generator=generator)
    return SYNTHETIC_SIGNAL * templates[y] + SYNTHETIC_NOISE * noise, y
