"""Transfer layers: map a feature map to another shape so two peers' maps can meet one discriminator (AFD, Chung et al.,
ICML 2020). **Reconstructed** (METHODS.md): the paper says transfer layers exist, not what they are; here a conv + BN + ReLU
that sets the channels, with a stride or an adaptive average pool that sets the spatial size. ``method.transfer`` picks
when one is used (:func:`make_transfer`).
"""

from __future__ import annotations

import torch
from torch import nn

from kdray.errors import ConfigError

Shape = tuple[int, int, int]
TRANSFER_MODES = ("auto", "always", "off")


class TransferLayer(nn.Module):
    """(C_in, H, W) -> (C_out, h, w) with h <= H, w <= W.

    Same size: Conv1x1-BN-ReLU. Size divided by an integer s on both sides: Conv3x3(stride s)-BN-ReLU. Otherwise
    Conv3x3-BN-ReLU then adaptive average pooling to (h, w).
    """

    def __init__(self, in_shape: Shape, out_shape: Shape):
        super().__init__()
        (c_in, h_in, w_in), (c_out, h_out, w_out) = in_shape, out_shape
        if h_out > h_in or w_out > w_in:
            raise ConfigError(
                "method.transfer",
                f"{tuple(in_shape)} -> {tuple(out_shape)}",
                "a transfer layer keeps or shrinks the spatial size (out h, w <= in h, w): map both peers' features to "
                "the smaller of the two sizes",
            )
        self.in_shape, self.out_shape = tuple(in_shape), tuple(out_shape)
        pool: nn.Module = nn.Identity()
        if (h_in, w_in) == (h_out, w_out):
            conv = nn.Conv2d(c_in, c_out, 1, bias=False)
        elif h_in % h_out == 0 and w_in % w_out == 0 and h_in // h_out == w_in // w_out:
            conv = nn.Conv2d(c_in, c_out, 3, stride=h_in // h_out, padding=1, bias=False)
        else:
            conv = nn.Conv2d(c_in, c_out, 3, padding=1, bias=False)
            pool = nn.AdaptiveAvgPool2d((h_out, w_out))
        self.conv, self.bn, self.relu, self.pool = conv, nn.BatchNorm2d(c_out), nn.ReLU(), pool

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.relu(self.bn(self.conv(x))))


def make_transfer(in_shape: Shape, out_shape: Shape, mode: str = "auto") -> nn.Module:
    """The transfer module for ``method.transfer`` = ``mode``.

    - ``auto``: ``nn.Identity`` when the shapes are equal, else a :class:`TransferLayer`;
    - ``always``: a :class:`TransferLayer` even for equal shapes (a trainable adapter in every peer);
    - ``off``: ``nn.Identity``; shapes that differ are an error.
    """
    if mode not in TRANSFER_MODES:
        raise ConfigError("method.transfer", mode, f"one of {', '.join(TRANSFER_MODES)}")
    same = tuple(in_shape) == tuple(out_shape)
    if mode == "always" or (mode == "auto" and not same):
        return TransferLayer(in_shape, out_shape)
    if not same:
        raise ConfigError(
            "method.transfer",
            mode,
            f"the feature shapes differ ({tuple(in_shape)} vs {tuple(out_shape)}): set method.transfer to 'auto' or "
            f"'always' to map them with a transfer layer",
        )
    return nn.Identity()
