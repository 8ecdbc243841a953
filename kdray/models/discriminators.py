"""Discriminators of the adversarial methods. Both are **reconstructed** (METHODS.md): the papers give no architecture.

- :class:`FeatureDiscriminator` -- AFD (Chung et al., ICML 2020), one per peer, tells the peer's (transferred) feature map
  ("real") from its own network's ("fake"). Reconstructed as "a few Conv-BN-LeakyReLU layers then a pooled linear scalar";
  depth, width and BN are arguments so a user holding the paper can set them.
- :class:`ProbDiscriminator` -- AI-KD (Kim et al., KBS 2022), tells the pre-trained model's predictive distribution
  ("real") from the student's ("fake"). Reconstructed as an MLP on the C-dim probability vector.

Both return one raw score per sample, shape (B,): LSGAN or BCE-with-logits is the method's choice.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kdray.errors import ConfigError


class FeatureDiscriminator(nn.Module):
    """``n_layers`` x [Conv3x3(hidden) - BN - LeakyReLU(0.2)], global average pool, Linear(hidden, 1) -> (B,).

    Each conv has stride 2 while the map entering it is at least 4x4 and stride 1 below, so one discriminator serves
    any feature-map size (an 8x8 map is reduced 8 -> 4 -> 2; a 2x2 map keeps its size).
    """

    def __init__(self, in_channels: int, hidden: int = 64, n_layers: int = 2, batch_norm: bool = True):
        super().__init__()
        if n_layers < 1 or hidden < 1:
            raise ConfigError(
                "discriminator", {"hidden": hidden, "n_layers": n_layers}, "hidden >= 1 and n_layers >= 1"
            )
        self.convs = nn.ModuleList(
            nn.Conv2d(in_channels if i == 0 else hidden, hidden, 3, padding=1, bias=not batch_norm)
            for i in range(n_layers)
        )
        self.norms = nn.ModuleList(
            nn.BatchNorm2d(hidden) if batch_norm else nn.Identity() for _ in range(n_layers)
        )
        self.fc = nn.Linear(hidden, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for conv, norm in zip(self.convs, self.norms):
            stride = 2 if min(x.shape[-2:]) >= 4 else 1
            x = F.conv2d(x, conv.weight, conv.bias, stride=stride, padding=1)
            x = F.leaky_relu(norm(x), 0.2)
        return self.fc(x.mean(dim=(2, 3))).squeeze(1)


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
