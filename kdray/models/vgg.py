"""VGG with batch normalisation for 32x32 images: Simonyan & Zisserman, "Very Deep Convolutional Networks for Large-Scale
Image Recognition", ICLR 2015 (configurations A, B, D, E = vgg11, 13, 16, 19), BN after every conv (Ioffe & Szegedy 2015).

As in the CRD / RepDistiller benchmark (Tian et al., ICLR 2020), the 32x32 version has five conv blocks ``block0..block4``
separated by 2x2 max pools ``pool0..pool3``, global average pooling ``avgpool`` and a single linear ``classifier`` on the
512-d vector (no 4096-wide FC layers); vgg8 has one conv per block (64, 128, 256, 512, 512). Convs keep their bias, as in
that benchmark, so its parameter counts are reproduced. The default tap is ``block4``, the last conv block.
"""

from __future__ import annotations

import torch
from torch import nn

from kdray.models.init import init_weights

VGG_CONFIGS: dict[str, tuple[tuple[int, ...], ...]] = {
    "vgg8": ((64,), (128,), (256,), (512,), (512,)),
    "vgg11": ((64,), (128,), (256, 256), (512, 512), (512, 512)),
    "vgg13": ((64, 64), (128, 128), (256, 256), (512, 512), (512, 512)),
    "vgg16": ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512)),
    "vgg19": ((64, 64), (128, 128), (256,) * 4, (512,) * 4, (512,) * 4),
}


def conv_block(in_ch: int, widths: tuple[int, ...]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for w in widths:
        layers += [nn.Conv2d(in_ch, w, 3, padding=1), nn.BatchNorm2d(w), nn.ReLU()]
        in_ch = w
    return nn.Sequential(*layers)


class VGG(nn.Module):
    """VGG-BN for small images: ``block0``, ``pool0``, ..., ``pool3``, ``block4``, ``avgpool``, ``classifier``."""

    def __init__(self, blocks: tuple[tuple[int, ...], ...], num_classes: int, in_channels: int = 3):
        super().__init__()
        in_ch = in_channels
        for i, widths in enumerate(blocks):
            self.add_module(f"block{i}", conv_block(in_ch, widths))
            if i < len(blocks) - 1:
                self.add_module(f"pool{i}", nn.MaxPool2d(2))
            in_ch = widths[-1]
        self.num_blocks = len(blocks)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(in_ch, num_classes)
        init_weights(self, linear="normal")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i in range(self.num_blocks):
            x = getattr(self, f"block{i}")(x)
            if i < self.num_blocks - 1:
                x = getattr(self, f"pool{i}")(x)
        return self.classifier(torch.flatten(self.avgpool(x), 1))


def vgg(name: str, num_classes: int, in_channels: int = 3) -> VGG:
    return VGG(VGG_CONFIGS[name], num_classes, in_channels)
