"""ResNets for 32x32 images: the CIFAR variant of He et al., "Deep Residual Learning for Image Recognition", CVPR 2016, §4.2.

A 3x3 stem, then three stages of ``n`` BasicBlocks at widths (w, 2w, 4w) and strides (1, 2, 2), global average pooling and
a linear classifier; depth = 6n + 2 (resnet8, 14, 20, 32, 44, 56, 110 use n = 1, 2, 3, 5, 7, 9, 18 and w = 16).

The "x4" models (resnet8x4, resnet32x4) are those of the CRD / RepDistiller benchmark family (Tian et al., "Contrastive
Representation Distillation", ICLR 2020): a 32-channel stem and stages four times wider (64, 128, 256).

Shortcuts: ``shortcut="conv"`` (default) projects with a 1x1 conv + BN wherever the shape changes, as RepDistiller does, so
the benchmark's parameter counts are reproduced (resnet8x4: 1.23M for 100 classes). ``shortcut="pad"`` is He et al.'s
option A for CIFAR (subsample and zero-pad channels, no parameters): resnet20 then has exactly the paper's 0.27M.

Every activation is its own, non-inplace module so that any FX node can be tapped without being overwritten later.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from kdray.errors import ConfigError
from kdray.models.init import init_weights

Shortcut = Literal["conv", "pad"]


class PadShortcut(nn.Module):
    """He et al.'s option A: take every ``stride``-th pixel and zero-pad the new channels (no parameters)."""

    def __init__(self, in_planes: int, planes: int, stride: int):
        super().__init__()
        self.stride = stride
        extra = planes - in_planes
        self.pad = (extra // 2, extra - extra // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x[:, :, :: self.stride, :: self.stride]
        return F.pad(x, (0, 0, 0, 0, self.pad[0], self.pad[1]))


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers and an identity (or projected) shortcut; ReLU after the sum (He et al. 2016, Fig. 2)."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1, shortcut: Shortcut = "conv"):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu2 = nn.ReLU()
        self.downsample: nn.Module = nn.Identity()
        if stride != 1 or in_planes != planes:
            if shortcut == "conv":
                self.downsample = nn.Sequential(
                    nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False), nn.BatchNorm2d(planes)
                )
            else:
                self.downsample = PadShortcut(in_planes, planes, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + self.downsample(x))


class CifarResNet(nn.Module):
    """CIFAR ResNet: ``conv1/bn1/relu`` stem, stages ``layer1..layer3``, ``avgpool``, ``fc``.

    Args:
        depth: 6n + 2.
        num_classes: size of the logits.
        in_channels: image channels.
        stem_width: channels of the stem.
        widths: channels of the three stages.
        shortcut: ``"conv"`` (1x1 projection, RepDistiller) or ``"pad"`` (He et al. option A).
    """

    def __init__(
        self,
        depth: int,
        num_classes: int,
        in_channels: int = 3,
        stem_width: int = 16,
        widths: tuple[int, int, int] = (16, 32, 64),
        shortcut: Shortcut = "conv",
    ):
        super().__init__()
        if depth < 8 or (depth - 2) % 6 != 0:
            raise ConfigError(
                "arch", f"resnet{depth}", "a CIFAR ResNet has depth 6n + 2 with n >= 1 (8, 14, 20, ...)"
            )
        if shortcut not in ("conv", "pad"):
            raise ConfigError(
                "arch_kwargs.shortcut", shortcut, "one of 'conv' (1x1 projection) or 'pad' (option A)"
            )
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(in_channels, stem_width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(stem_width)
        self.relu = nn.ReLU()
        stages, in_planes = [], stem_width
        for planes, stride in zip(widths, (1, 2, 2)):
            blocks = []
            for i in range(n):
                blocks.append(BasicBlock(in_planes, planes, stride if i == 0 else 1, shortcut))
                in_planes = planes
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(widths[-1], num_classes)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def cifar_resnet(
    depth: int,
    num_classes: int,
    in_channels: int = 3,
    width: int = 16,
    wide4: bool = False,
    shortcut: Shortcut = "conv",
) -> CifarResNet:
    """Build a CIFAR ResNet. ``width`` is the base width w: stem w and stages (w, 2w, 4w); with ``wide4`` (the "x4"
    models) stem 2w and stages (4w, 8w, 16w), i.e. 32 / 64, 128, 256 at the default w = 16."""
    if width < 1:
        raise ConfigError("arch_kwargs.width", width, "a positive integer (base width, default 16)")
    k = 4 if wide4 else 1
    stem = 2 * width if wide4 else width
    return CifarResNet(
        depth, num_classes, in_channels, stem, (k * width, 2 * k * width, 4 * k * width), shortcut
    )
