"""Discriminators of the adversarial methods. Both are **reconstructed** (METHODS.md): the papers give no architecture.

- :class:`FeatureDiscriminator` -- AFD (Chung et al., ICML 2020), one per peer, tells the peer's (transferred) feature map
  ("real") from its own network's ("fake"). Reconstructed as "a few conv-LeakyReLU layers then a pooled linear scalar";
  depth, width and normalisation are arguments so a user holding the paper can set them.
- :class:`ProbDiscriminator` -- AI-KD (H. Kim et al., KBS 293, 2024), tells the pre-trained model's predictive
  distribution ("real") from the student's ("fake"). Reconstructed as an MLP on the C-dim probability vector.

Both return one raw score per sample, shape (B,): LSGAN or BCE-with-logits is the method's choice.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kdray.errors import ConfigError

DISC_NORMS = ("none", "dcgan", "spectral", "batch")


class FeatureDiscriminator(nn.Module):
    """``n_layers`` x [Conv3x3(hidden) - norm - LeakyReLU(0.2)], global average pool, Linear(hidden, 1) -> (B,).

    ``norm``: ``none``; ``dcgan``: BatchNorm on every conv but the first (the DCGAN rule: a BatchNorm on the input
    layer, called on the real and the fake maps separately, normalises away every difference of per-channel scale
    and mean between them); ``spectral``: spectral normalisation of every conv and the linear layer (Miyato et al.
    2018), no BatchNorm; ``batch``: BatchNorm on every conv, the input layer included (kdray <= 0.1: it cannot see a
    change of scale or mean of the maps; kept to reproduce old runs).

    Each conv has stride 2 while the map entering it is at least 4x4 and stride 1 below, so one discriminator serves
    any feature-map size (an 8x8 map is reduced 8 -> 4 -> 2; a 2x2 map keeps its size).
    """

    def __init__(self, in_channels: int, hidden: int = 64, n_layers: int = 2, norm: str = "none"):
        super().__init__()
        if n_layers < 1 or hidden < 1:
            raise ConfigError(
                "discriminator", {"hidden": hidden, "n_layers": n_layers}, "hidden >= 1 and n_layers >= 1"
            )
        if norm not in DISC_NORMS:
            raise ConfigError("method.disc_norm", norm, f"one of {list(DISC_NORMS)}")
        batch = [norm == "batch" or (norm == "dcgan" and i > 0) for i in range(n_layers)]
        self.convs = nn.ModuleList(
            nn.Conv2d(in_channels if i == 0 else hidden, hidden, 3, padding=1, bias=not batch[i])
            for i in range(n_layers)
        )
        self.norms = nn.ModuleList(
            nn.BatchNorm2d(hidden) if batch[i] else nn.Identity() for i in range(n_layers)
        )
        self.fc = nn.Linear(hidden, 1)
        if norm == "spectral":
            for i, conv in enumerate(self.convs):
                self.convs[i] = nn.utils.parametrizations.spectral_norm(conv)
            self.fc = nn.utils.parametrizations.spectral_norm(self.fc)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for conv, norm in zip(self.convs, self.norms):
            stride = 2 if min(x.shape[-2:]) >= 4 else 1
            x = F.leaky_relu(norm(conv_with_stride(conv, x, stride)), 0.2)
        return self.fc(x.mean(dim=(2, 3))).squeeze(1)


def conv_with_stride(conv: nn.Conv2d, x: torch.Tensor, stride: int) -> torch.Tensor:
    """``conv`` applied with ``stride`` (its weight read through any parametrization, e.g. spectral norm)."""
    return F.conv2d(x, conv.weight, conv.bias, stride=stride, padding=1)


class ProbDiscriminator(nn.Module):
    """MLP on probability vectors: ``n_layers`` x [Linear(hidden) - LeakyReLU(0.2)], Linear(hidden, 1) -> (B,)."""

    def __init__(self, num_classes: int, hidden: int = 64, n_layers: int = 2):
        super().__init__()
        if n_layers < 1 or hidden < 1:
            raise ConfigError(
                "discriminator", {"hidden": hidden, "n_layers": n_layers}, "hidden >= 1 and n_layers >= 1"
            )
        layers: list[nn.Module] = []
        for i in range(n_layers):
            layers += [nn.Linear(num_classes if i == 0 else hidden, hidden), nn.LeakyReLU(0.2)]
        layers.append(nn.Linear(hidden, 1))
        self.net = nn.Sequential(*layers)

    def forward(self, probs: torch.Tensor) -> torch.Tensor:
        return self.net(probs).squeeze(1)
