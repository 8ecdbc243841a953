"""MobileNetV2 for 32x32 images: Sandler et al., "MobileNetV2: Inverted Residuals and Linear Bottlenecks", CVPR 2018.

The layers of the paper's Table 2 (stem conv 32, bottlenecks (t, c, n, s), a 1x1 conv to 1280, global average pooling,
linear classifier) with the usual CIFAR change: the stem and the second bottleneck group use stride 1 instead of 2, so a
32x32 image leaves the network as a 4x4 map (28x28 -> 4x4 too) instead of 1x1. Channel counts follow torchvision's
rounding for ``width_mult`` (multiples of 8; the last conv never narrower than 1280), so the parameter count equals
torchvision's ``mobilenet_v2`` at the same width and number of classes.

Layout: ``features`` (stem, bottlenecks, final 1x1 conv-BN-ReLU6; default tap), ``avgpool``, ``classifier``.
"""

from __future__ import annotations

import torch
from torch import nn

from kdray.errors import ConfigError
from kdray.models.init import init_weights

# (expansion t, output channels c, repeats n, first stride s); the paper's second row has s = 2.
CIFAR_SETTINGS = (
    (1, 16, 1, 1),
    (6, 24, 2, 1),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)


def make_divisible(value: float, divisor: int = 8) -> int:
    """Round to the nearest multiple of ``divisor``, never below 90% of ``value`` (the reference implementation's rule)."""
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * value else rounded


def conv_bn_relu6(
    in_ch: int, out_ch: int, kernel: int = 3, stride: int = 1, groups: int = 1
) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_ch, out_ch, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False),
        nn.BatchNorm2d(out_ch),
        nn.ReLU6(),
    )


class InvertedResidual(nn.Module):
    """1x1 expansion (skipped when t = 1), 3x3 depthwise, linear 1x1 projection; identity shortcut when shapes match."""

    def __init__(self, in_ch: int, out_ch: int, stride: int, expand: int):
        super().__init__()
        hidden = in_ch * expand
        layers = [] if expand == 1 else [conv_bn_relu6(in_ch, hidden, kernel=1)]
        layers += [
            conv_bn_relu6(hidden, hidden, stride=stride, groups=hidden),
            nn.Conv2d(hidden, out_ch, 1, bias=False),
            nn.BatchNorm2d(out_ch),
        ]
        self.block = nn.Sequential(*layers)
        self.use_residual = stride == 1 and in_ch == out_ch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.block(x)
        return x + out if self.use_residual else out


class MobileNetV2(nn.Module):
    """MobileNetV2, CIFAR variant (stride-1 stem). ``width_mult`` scales every layer but the last conv's minimum 1280."""

    def __init__(self, num_classes: int, in_channels: int = 3, width_mult: float = 1.0):
        super().__init__()
        if width_mult <= 0:
            raise ConfigError(
                "arch_kwargs.width_mult", width_mult, "a positive number (1.0 is the paper's network)"
            )
        ch = make_divisible(32 * width_mult)
        last = make_divisible(1280 * max(1.0, width_mult))
        layers: list[nn.Module] = [conv_bn_relu6(in_channels, ch, stride=1)]
        for t, c, n, s in CIFAR_SETTINGS:
            out = make_divisible(c * width_mult)
            for i in range(n):
                layers.append(InvertedResidual(ch, out, s if i == 0 else 1, t))
                ch = out
        layers.append(conv_bn_relu6(ch, last, kernel=1))
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(last, num_classes)
        init_weights(self, linear="normal")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))
