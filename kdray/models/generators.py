"""Generators of the adversarial methods.

- :class:`DFADGenerator` -- the generator of DFAD (Fang et al., "Data-Free Adversarial Distillation", 2019), layer for layer
  as in the authors' code (METHODS.md [code]); MAD (Do et al., NeurIPS 2022) reuses it with an EMA copy.
- :class:`ResidualImageGenerator` -- ACN's divergent-example generator (Zhang et al., Pattern Recognition 2021).
  **Reconstructed** (METHODS.md): the paper names a "weakly residual connection"; this is an image-to-image conv net g
  with a Tanh output, and the method forms x~ = x + eps * g(x). Width and depth are arguments.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kdray.errors import ConfigError


class ResidualImageGenerator(nn.Module):
    """g(x): ``n_layers`` x [Conv3x3(hidden)-BN-ReLU], Conv3x3(channels), Tanh. Output in [-1, 1], same shape as x."""

    def __init__(self, channels: int, hidden: int = 32, n_layers: int = 2):
        super().__init__()
        if n_layers < 1 or hidden < 1:
            raise ConfigError(
                "generator", {"hidden": hidden, "n_layers": n_layers}, "hidden >= 1 and n_layers >= 1"
            )
        layers: list[nn.Module] = []
        for i in range(n_layers):
            layers += [
                nn.Conv2d(channels if i == 0 else hidden, hidden, 3, padding=1, bias=False),
                nn.BatchNorm2d(hidden),
                nn.ReLU(),
            ]
        layers += [nn.Conv2d(hidden, channels, 3, padding=1), nn.Tanh()]
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class DFADGenerator(nn.Module):
    """z (B, nz) -> image (B, channels, img_size, img_size), as DFAD's ``GeneratorA``:

    Linear(nz, 2ngf (s/4)^2), BN; up x2, Conv3x3 2ngf->2ngf, BN, LeakyReLU(0.2); up x2, Conv3x3 2ngf->ngf, BN,
    LeakyReLU(0.2), Conv3x3 ngf->channels, Tanh, BN(channels, affine=False). ngf = 64; upsampling is nearest-neighbour.
    The final BN means outputs are standardised images, not bounded by the Tanh.
    """

    def __init__(self, nz: int = 256, img_size: int = 32, channels: int = 3, ngf: int = 64):
        super().__init__()
        if img_size % 4 != 0 or img_size < 4:
            raise ConfigError(
                "img_size",
                img_size,
                "a multiple of 4: the generator upsamples a (s/4)x(s/4) map twice (28 and 32 work)",
            )
        self.nz, self.init_size = nz, img_size // 4
        self.l1 = nn.Linear(nz, 2 * ngf * self.init_size**2)
        self.conv_blocks0 = nn.Sequential(nn.BatchNorm2d(2 * ngf))
        self.conv_blocks1 = nn.Sequential(
            nn.Conv2d(2 * ngf, 2 * ngf, 3, padding=1), nn.BatchNorm2d(2 * ngf), nn.LeakyReLU(0.2)
        )
        self.conv_blocks2 = nn.Sequential(
            nn.Conv2d(2 * ngf, ngf, 3, padding=1),
            nn.BatchNorm2d(ngf),
            nn.LeakyReLU(0.2),
            nn.Conv2d(ngf, channels, 3, padding=1),
            nn.Tanh(),
            nn.BatchNorm2d(channels, affine=False),
        )

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.l1(z.flatten(1)).view(z.shape[0], -1, self.init_size, self.init_size)
        x = F.interpolate(self.conv_blocks0(x), scale_factor=2)
        x = F.interpolate(self.conv_blocks1(x), scale_factor=2)
        return self.conv_blocks2(x)
