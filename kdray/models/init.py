"""The weight initialisation every backbone of kdray shares (He et al. 2015 for convolutions, as torchvision's
ResNets): kaiming-normal convolutions (fan-out, ReLU gain), zero convolution biases, BatchNorm at identity. Linear
layers differ between the papers' networks, so the caller names its choice."""

from __future__ import annotations

from typing import Literal

from torch import nn

LinearInit = Literal["torch", "zero_bias", "normal"]


def init_weights(model: nn.Module, linear: LinearInit = "torch") -> None:
    """``linear``: ``torch`` keeps torch's default; ``zero_bias`` zeroes the bias (WRN); ``normal``: weights
    N(0, 0.01), bias 0 (VGG, MobileNetV2)."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear) and linear != "torch":
            if linear == "normal":
                nn.init.normal_(m.weight, 0, 0.01)
            nn.init.zeros_(m.bias)
