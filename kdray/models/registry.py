"""A registry of backbones and one factory: ``create_model("resnet32", num_classes=100)`` (the timm pattern).

Registered: CIFAR ResNets (resnet8 ... resnet110, resnet8x4, resnet32x4), four-stage ResNets for 32x32 inputs
(resnet18, resnet34, preact_resnet18: the data-free and self-distillation papers' networks), wide ResNets ``wrn_{depth}_{width}`` (any
depth 6n + 4; the common ones are listed), ``mobilenetv2`` and ``vgg8/11/13/16/19`` for 32x32 images; any torchvision
classification model as ``tv:<name>`` and any timm model as ``timm:<name>`` (timm optional). Each registered name knows
its default feature tap: the FX node of the last conv stage before global pooling.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import re
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType

import torch
from torch import nn

from kdray.errors import ConfigError
from kdray.models.cifar_resnet import cifar_resnet
from kdray.models.mobilenetv2 import MobileNetV2
from kdray.models.resnet4stage import preact_resnet18, resnet18, resnet34
from kdray.models.vgg import VGG_CONFIGS, vgg
from kdray.models.wide_resnet import WideResNet

# Archs of other libraries, by prefix: ``tv:<name>`` (torchvision), ``timm:<name>`` (timm, optional). Each backend
# module has ``PREFIX``, ``check_name(name)``, ``build_model(name, num_classes, in_channels, **kwargs)`` and
# ``default_tap(name)``, imports nothing of this registry, and is imported only when one of its archs is used
# (torchvision costs seconds of start-up in every Ray worker; timm may not be installed).
BACKENDS = {"tv:": "kdray.models.torchvision_models", "timm:": "kdray.models.timm_models"}


def _backend(arch: str) -> tuple[str, ModuleType] | None:
    """(the name after the prefix, the backend module) of a prefixed arch; None for a registered arch."""
    for prefix, module in BACKENDS.items():
        if arch.startswith(prefix):
            return arch[len(prefix) :], importlib.import_module(module)
    return None


@dataclass(frozen=True)
class ArchSpec:
    """How to build one architecture: ``build(num_classes=..., in_channels=..., **arch_kwargs)`` and its default tap."""

    build: Callable[..., nn.Module]
    default_tap: str


_REGISTRY: dict[str, ArchSpec] = {}
_WRN = re.compile(r"wrn_(\d+)_(\d+)")
_WRN_LISTED = ("wrn_16_1", "wrn_16_2", "wrn_40_1", "wrn_40_2", "wrn_28_10")

for _depth in (8, 14, 20, 32, 44, 56, 110):
    _REGISTRY[f"resnet{_depth}"] = ArchSpec(functools.partial(cifar_resnet, _depth), "layer3")
for _depth in (8, 32):
    _REGISTRY[f"resnet{_depth}x4"] = ArchSpec(functools.partial(cifar_resnet, _depth, wide4=True), "layer3")
for _name, _build in (("resnet18", resnet18), ("resnet34", resnet34), ("preact_resnet18", preact_resnet18)):
    _REGISTRY[_name] = ArchSpec(_build, "layer4")
_REGISTRY["mobilenetv2"] = ArchSpec(MobileNetV2, "features")
for _name in VGG_CONFIGS:
    _REGISTRY[_name] = ArchSpec(functools.partial(vgg, _name), "block4")


def _wrn_spec(arch: str) -> ArchSpec | None:
    match = _WRN.fullmatch(arch)
    if match is None:
        return None
    depth, widen = int(match[1]), int(match[2])
    if depth < 10 or (depth - 4) % 6 != 0 or widen < 1:
        return None
    return ArchSpec(functools.partial(WideResNet, depth, widen), "relu")


def _accepted() -> str:
    return (
        f"accepted: {', '.join(list_models())}; any wrn_{{depth}}_{{width}} with (depth - 4) % 6 == 0; "
        f"tv:<name> for a torchvision classification model (e.g. tv:resnet18); or timm:<name> for a timm model "
        f"(e.g. timm:resnet10t; kdray models --timm PATTERN)"
    )


def _spec(arch: str) -> ArchSpec:
    spec = _REGISTRY.get(arch) or _wrn_spec(arch)
    if spec is None:
        raise ConfigError("arch", arch, _accepted())
    return spec


def list_models() -> list[str]:
    """The registered architecture names, in families. Not listed but accepted: any ``wrn_{depth}_{width}`` with
    (depth - 4) % 6 == 0, any torchvision classification model as ``tv:<name>`` and any timm model as
    ``timm:<name>``."""
    return [*_REGISTRY, *_WRN_LISTED]


def check_arch(arch: str) -> None:
    """Raise :class:`~kdray.errors.ConfigError` (key ``arch``) unless ``arch`` names a buildable model. Builds nothing."""
    if not isinstance(arch, str):
        raise ConfigError("arch", arch, _accepted())
    backend = _backend(arch)
    if backend is not None:
        name, module = backend
        module.check_name(name)
    else:
        _spec(arch)


def default_tap(arch: str) -> str:
    """FX node name of the last conv stage before global pooling: ``layer3`` (CIFAR ResNets), ``relu`` (WRN, after the
    final BN-ReLU), ``features`` (mobilenetv2), ``block4`` (VGG); for ``tv:`` models found by
    :func:`~kdray.models.torchvision_models.tap_before_pooling` (``layer4`` for resnets, ``features`` for mobilenets); for ``timm:`` models the last entry of timm's
    ``feature_info``."""
    check_arch(arch)
    backend = _backend(arch)
    if backend is not None:
        name, module = backend
        return module.default_tap(name)
    return _spec(arch).default_tap


# More parameters than any single device holds (400 GB of float32 weights, before gradients and optimizer state):
# ``arch_kwargs: {width: 10000000}`` is a slip, refused before a byte is allocated.
MAX_PARAMETERS = 10**11


def create_model(arch: str, num_classes: int, in_channels: int = 3, **kwargs) -> nn.Module:
    """Build ``arch`` with random weights. ``kwargs`` are the architecture's own options: ``width`` and ``shortcut``
    (CIFAR ResNets), ``dropout`` (WRN), ``width_mult`` (mobilenetv2), the torchvision builder's options (``tv:``),
    ``timm.create_model``'s (``timm:``). The network is first built on torch's ``meta`` device (shapes only, no
    memory) and refused if it holds more than :data:`MAX_PARAMETERS` parameters."""
    check_arch(arch)
    if (
        "weights" not in kwargs and "pretrained" not in kwargs
    ):  # pretrained weights would be fetched for shapes
        try:
            with torch.device("meta"):
                size = sum(p.numel() for p in _build(arch, num_classes, in_channels, **kwargs).parameters())
        except ConfigError:
            raise
        except Exception:  # noqa: BLE001 - an op without a meta kernel: the real build below says what it says
            size = 0
        if size > MAX_PARAMETERS:
            raise ConfigError(
                "arch_kwargs", kwargs,
                f"{arch} with these options and {num_classes} classes has {size:.3g} parameters, more than "
                f"{MAX_PARAMETERS:.0e} (400 GB of float32 weights: no single device holds it)",
            )  # fmt: skip
    return _build(arch, num_classes, in_channels, **kwargs)


def _build(arch: str, num_classes: int, in_channels: int, **kwargs) -> nn.Module:
    backend = _backend(arch)
    if backend is not None:
        name, module = backend
        return module.build_model(name, num_classes, in_channels, **kwargs)
    build = _spec(arch).build
    params = inspect.signature(build).parameters
    fixed = {
        "num_classes",
        "in_channels",
        *getattr(build, "keywords", {}),
    }  # partial's keywords define the arch
    options = [p for p in params if p not in fixed]
    unknown = sorted(set(kwargs) - set(options))
    if unknown:
        raise ConfigError(
            "arch_kwargs", kwargs, f"{arch} accepts {', '.join(options) or 'no options'}; not {unknown}"
        )
    return build(num_classes=num_classes, in_channels=in_channels, **kwargs)
