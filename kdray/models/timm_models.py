"""Any timm model as a peer: ``timm:<name>`` (``timm.list_models()``; ``kdray models --timm PATTERN``).

timm is optional (``pip install 'kdray[timm]'``) and imported only when a ``timm:`` arch is used. Models are built
with random weights (``pretrained=False``; nothing is ever downloaded) by ``timm.create_model(name,
num_classes=..., in_chans=...)``, so the stem takes the data's channels as built. The default feature tap is the
module timm's own feature API names for the deepest feature map (``model.feature_info[-1]["module"]``: ``layer4``
for resnets, ``blocks.N`` for efficientnets, ``final_conv`` for byobnets), tapped with torchvision's FX feature
extraction like every other arch. Convolutional timm models trace; models whose forward branches on tensor sizes
(ViTs' patch and position checks) do not, and are then peers only of methods that need no taps (``dml``, ``kd``,
...), where the network is called directly. Like torchvision's ImageNet designs, a small image passes only where the
model's strides and kernels allow it (``timm:resnet10t`` and ``timm:test_efficientnet`` take 12x12; ConvNeXt's 2x2
downsampling needs 32x32 or more).
"""

from __future__ import annotations

import difflib
import functools
from typing import Any

import torch
from torch import nn

from kdray.errors import ConfigError

PREFIX = "timm:"
INSTALL = "pip install 'kdray[timm]'"


def _timm(key: str, value: str):
    try:
        import timm
    except ImportError:
        raise ConfigError(key, value, f"timm models need timm, which is not installed: {INSTALL}") from None
    return timm


def timm_names(pattern: str = "") -> list[str]:
    """timm's model names matching ``pattern`` (fnmatch wildcards; empty: all)."""
    return list(_timm("--timm", pattern).list_models(pattern or ""))


def check_name(name: str) -> None:
    timm = _timm("arch", PREFIX + name)
    if timm.is_model(name):
        return
    close = difflib.get_close_matches(name, timm.list_models(), n=3)
    hint = f"did you mean {', '.join(PREFIX + c for c in close)}? " if close else ""
    raise ConfigError(
        "arch", PREFIX + name,
        f"not a timm model; {hint}accepted: timm:<name> for a name in timm.list_models() "
        "(kdray models --timm PATTERN lists them), e.g. timm:resnet10t, timm:mobilenetv3_small_050",
    )  # fmt: skip


def build_model(name: str, num_classes: int, in_channels: int = 3, **kwargs: Any) -> nn.Module:
    """``timm.create_model(name, pretrained=False, num_classes=..., in_chans=..., **kwargs)``; ``kwargs`` are the
    model's own options (e.g. ``drop_rate``)."""
    check_name(name)
    if kwargs.get("pretrained"):
        raise ConfigError(
            "arch_kwargs.pretrained", kwargs["pretrained"], "false: kdray never downloads weights"
        )
    for key in ("num_classes", "in_chans"):
        if key in kwargs:
            raise ConfigError(f"arch_kwargs.{key}", kwargs[key], "set by kdray from the data; remove it")
    kwargs = {**kwargs, "pretrained": False}
    try:
        return _timm("arch", PREFIX + name).create_model(
            name, num_classes=num_classes, in_chans=in_channels, **kwargs
        )
    except TypeError as err:
        raise ConfigError("arch_kwargs", kwargs, f"not accepted by timm's {name}: {err}") from err


@functools.cache
def default_tap(name: str) -> str:
    """The module of the deepest feature map in timm's ``feature_info`` (the last stage before global pooling)."""
    try:  # parameter-free, on the meta device; an initialiser that needs real data: built for real
        with torch.device("meta"):
            model = build_model(name, num_classes=10)
    except (NotImplementedError, RuntimeError):
        model = build_model(name, num_classes=10)
    info = getattr(model, "feature_info", None)
    if not info:
        raise ConfigError(
            "taps", "default", f"timm's {name} has no feature_info; name an FX node of it as the tap"
        )
    return info[-1]["module"]
