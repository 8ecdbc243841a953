"""Four-stage ResNets for 32x32 images, as the self-distillation and data-free papers train them:

- ``resnet18``, ``resnet34``: He et al. (CVPR 2016) BasicBlocks in four stages of widths (64, 128, 256, 512) and
  strides (1, 2, 2, 2) after a 3x3 stem without max-pooling: the CIFAR adaptation used by DFAD / CMI / Fast-Datafree
  (their ResNet-34 teacher -> ResNet-18 student, METHODS.md) and by CS-KD's and PS-KD's "ResNet-18" rows.
- ``preact_resnet18``: pre-activation blocks (He et al., "Identity Mappings in Deep Residual Networks", ECCV 2016:
  BN-ReLU before each conv, the shortcut taken after the first BN-ReLU when it projects), the network PS-KD and CS-KD
  report as "PreAct ResNet-18" on CIFAR-100; a final BN-ReLU before pooling.

Every activation is its own module (any FX node can be tapped; the default tap is the last stage, ``layer4``).
``width`` scales the stage widths (64 by default), so tests and CPU-sized runs can use small versions.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kdray.models.init import init_weights


class Block(nn.Module):
    """BasicBlock: conv-BN-ReLU-conv-BN plus the (projected) shortcut, ReLU after the sum."""

    def __init__(self, in_planes: int, planes: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes)
            )
        self.relu2 = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + self.shortcut(x))


class PreActBlock(nn.Module):
    """BN-ReLU-conv-BN-ReLU-conv plus the shortcut (projected from the first BN-ReLU's output when shapes change)."""

    def __init__(self, in_planes: int, planes: int, stride: int):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.relu1 = nn.ReLU()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu2 = nn.ReLU()
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.shortcut = None
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Conv2d(in_planes, planes, 1, stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(x))
        shortcut = self.shortcut(out) if self.shortcut is not None else x
        out = self.conv1(out)
        out = self.conv2(self.relu2(self.bn2(out)))
        return out + shortcut


class ResNet4(nn.Module):
    def __init__(self, blocks: tuple[int, ...], num_classes: int, in_channels: int, width: int, preact: bool):
        super().__init__()
        block = PreActBlock if preact else Block
        widths = [width, 2 * width, 4 * width, 8 * width]
        self.conv1 = nn.Conv2d(in_channels, width, 3, 1, 1, bias=False)
        self.bn1 = nn.Identity() if preact else nn.BatchNorm2d(width)
        self.relu = nn.Identity() if preact else nn.ReLU()
        in_planes = width
        for i, (n, planes) in enumerate(zip(blocks, widths), start=1):
            layers = []
            for j in range(n):
                layers.append(block(in_planes, planes, stride=1 if (i == 1 or j > 0) else 2))
                in_planes = planes
            setattr(self, f"layer{i}", nn.Sequential(*layers))
        self.bn_final = nn.BatchNorm2d(in_planes) if preact else nn.Identity()
        self.relu_final = nn.ReLU() if preact else nn.Identity()
        self.fc = nn.Linear(in_planes, num_classes)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        out = self.relu_final(self.bn_final(out))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(out, 1), 1))


def resnet18(num_classes: int, in_channels: int = 3, width: int = 64) -> ResNet4:
    return ResNet4((2, 2, 2, 2), num_classes, in_channels, width, preact=False)


def resnet34(num_classes: int, in_channels: int = 3, width: int = 64) -> ResNet4:
    return ResNet4((3, 4, 6, 3), num_classes, in_channels, width, preact=False)


def preact_resnet18(num_classes: int, in_channels: int = 3, width: int = 64) -> ResNet4:
    return ResNet4((2, 2, 2, 2), num_classes, in_channels, width, preact=True)
