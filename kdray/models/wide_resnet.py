"""Wide residual networks WRN-d-k: Zagoruyko & Komodakis, "Wide Residual Networks", BMVC 2016 (Table 1, CIFAR).

A 3x3 conv to 16 channels, three groups ``block1..block3`` of n = (d - 4) / 6 pre-activation blocks (BN-ReLU-conv3x3,
BN-ReLU-[dropout]-conv3x3) at widths 16k, 32k, 64k and strides 1, 2, 2, then BN-ReLU (modules ``bn`` and ``relu``),
global average pooling and a linear classifier. Where a block changes shape its shortcut is a 1x1 conv applied to the
block's pre-activated input, as in the authors' code. The default feature tap is the final activation, node ``relu``.
"""

from __future__ import annotations

import torch
from torch import nn

from kdray.errors import ConfigError
from kdray.models.init import init_weights


class WideBlock(nn.Module):
    """Pre-activation basic block of a WRN (He et al. 2016b ordering, dropout between the convs)."""

    def __init__(self, in_planes: int, planes: int, stride: int, dropout: float):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.relu1 = nn.ReLU()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu2 = nn.ReLU()
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.equal_in_out = in_planes == planes and stride == 1
        self.shortcut = (
            None if self.equal_in_out else nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre = self.relu1(self.bn1(x))
        out = self.conv1(pre)
        out = self.conv2(self.dropout(self.relu2(self.bn2(out))))
        return out + (x if self.shortcut is None else self.shortcut(pre))


class WideResNet(nn.Module):
    """WRN-depth-widen: ``conv1``, ``block1..block3``, ``bn``, ``relu``, ``avgpool``, ``fc``."""

    def __init__(self, depth: int, widen: int, num_classes: int, in_channels: int = 3, dropout: float = 0.0):
        super().__init__()
        if depth < 10 or (depth - 4) % 6 != 0 or widen < 1:
            raise ConfigError(
                "arch",
                f"wrn_{depth}_{widen}",
                "WRN depth must be 6n + 4 with n >= 1 (10, 16, 22, 28, 40, ...), width >= 1",
            )
        if not 0.0 <= dropout < 1.0:
            raise ConfigError("arch_kwargs.dropout", dropout, "a probability in [0, 1)")
        n = (depth - 4) // 6
        widths = (16 * widen, 32 * widen, 64 * widen)
        self.conv1 = nn.Conv2d(in_channels, 16, 3, padding=1, bias=False)
        groups, in_planes = [], 16
        for planes, stride in zip(widths, (1, 2, 2)):
            blocks = []
            for i in range(n):
                blocks.append(WideBlock(in_planes, planes, stride if i == 0 else 1, dropout))
                in_planes = planes
            groups.append(nn.Sequential(*blocks))
        self.block1, self.block2, self.block3 = groups
        self.bn = nn.BatchNorm2d(widths[-1])
        self.relu = nn.ReLU()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(widths[-1], num_classes)
        init_weights(self, linear="zero_bias")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block3(self.block2(self.block1(self.conv1(x))))
        x = self.relu(self.bn(x))
        return self.fc(torch.flatten(self.avgpool(x), 1))
