"""Any torchvision classification model as a peer: ``tv:<name>`` (torchvision.models.list_models(module=torchvision.models)).

Models are built with random weights (``weights=None``; nothing is ever downloaded). They are the ImageNet designs: a
small image passes only where the model pools adaptively (resnets, mobilenets, efficientnets, ... handle 28x28 and
32x32; torchvision's VGG and AlexNet do not).
"""

from __future__ import annotations

import difflib
import functools

import torch
import torchvision
from torch import nn
from torchvision.models.feature_extraction import get_graph_node_names

from kdray.errors import ConfigError

PREFIX = "tv:"  # kdray.models.registry.BACKENDS maps it to this module; this module imports nothing of the registry

# Their forward returns a namedtuple with auxiliary logits in train mode; a peer's model must return one tensor.
_SINGLE_OUTPUT_DEFAULTS = {
    "googlenet": {"aux_logits": False, "init_weights": True},
    "inception_v3": {"aux_logits": False},
}

# Global pooling: a top-level (or head-level, e.g. ``classifier.0``) adaptive pool / flatten module, or a top-level call.
_POOL_MODULES = (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.Flatten)
_POOL_FUNCTIONS = {"adaptive_avg_pool2d", "adaptive_max_pool2d", "mean", "flatten"}


def torchvision_names() -> list[str]:
    return torchvision.models.list_models(module=torchvision.models)


def check_torchvision_name(name: str) -> None:
    names = torchvision_names()
    if name not in names:
        close = difflib.get_close_matches(name, names, n=3)
        hint = f"did you mean {', '.join(PREFIX + c for c in close)}? " if close else ""
        raise ConfigError(
            "arch",
            PREFIX + name,
            f"not a torchvision classification model; {hint}accepted: tv:<name> for a name in "
            f"torchvision.models.list_models(module=torchvision.models), e.g. tv:resnet18, tv:mobilenet_v3_small",
        )


def adapt_input_channels(model: nn.Module, in_channels: int) -> nn.Module:
    """Rebuild the first ``nn.Conv2d`` of ``model`` (in module order: the stem) to take ``in_channels`` channels.

    Each new input channel gets the old kernel summed over the old input channels, divided by ``in_channels``: an image
    whose channels are all equal then gives what the original model gives for that image copied onto its 3 channels
    (e.g. a grey image). Works in place; returns ``model``.
    """
    first = next(((n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d)), None)
    if first is None:
        raise ConfigError("in_channels", in_channels, f"{type(model).__name__} has no Conv2d stem to adapt")
    name, conv = first
    if conv.in_channels == in_channels:
        return model
    if conv.groups != 1:
        raise ConfigError(
            "in_channels", in_channels, f"the first conv '{name}' is grouped; only 3 input channels work"
        )
    new = nn.Conv2d(
        in_channels,
        conv.out_channels,
        conv.kernel_size,
        conv.stride,
        conv.padding,
        conv.dilation,
        bias=conv.bias is not None,
        padding_mode=conv.padding_mode,
        device=conv.weight.device,
        dtype=conv.weight.dtype,
    )
    with torch.no_grad():
        summed = conv.weight.sum(dim=1, keepdim=True)
        new.weight.copy_(summed.repeat(1, in_channels, 1, 1) / in_channels)
        if conv.bias is not None:
            new.bias.copy_(conv.bias)
    parent_name, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent_name), attr, new)
    return model


def build_torchvision_model(name: str, num_classes: int, in_channels: int = 3, **kwargs) -> nn.Module:
    """``torchvision.models.get_model(name, weights=None, num_classes=num_classes, **kwargs)``, stem adapted to
    ``in_channels``. ``kwargs`` are the torchvision builder's own (e.g. ``dropout`` for efficientnets)."""
    check_torchvision_name(name)
    if kwargs.get("weights") is not None:
        raise ConfigError("arch_kwargs.weights", kwargs["weights"], "null: kdray never downloads weights")
    kwargs = {**_SINGLE_OUTPUT_DEFAULTS.get(name, {}), **kwargs, "weights": None}
    try:
        model = torchvision.models.get_model(name, num_classes=num_classes, **kwargs)
    except TypeError as err:
        raise ConfigError("arch_kwargs", kwargs, f"not accepted by torchvision's {name}: {err}") from err
    return adapt_input_channels(model, in_channels)


def tap_before_pooling(model: nn.Module) -> str:
    """The FX node feeding the model's global pooling: the last feature map, e.g. ``layer4`` (resnets), ``features``
    (mobilenets, efficientnets, densenet's ``features`` -> ``relu``), ``trunk_output`` (regnets).

    Walks the traced node names in execution order to the first top-level adaptive pool, flatten or spatial mean (pools
    inside blocks, such as squeeze-excitation or inception branches, are deeper and are skipped) and returns the node
    before it, or before the head that the pool opens (squeezenet, maxvit), shortened to its top-level module when that
    module ends there.
    """
    _, nodes = get_graph_node_names(model)
    modules = dict(model.named_modules())
    for i, node in enumerate(nodes[1:], start=1):
        base = node.rstrip("0123456789").rstrip("_")
        global_module = node.count(".") <= 1 and isinstance(modules.get(node), _POOL_MODULES)
        if not (global_module or (node not in modules and "." not in node and base in _POOL_FUNCTIONS)):
            continue
        top = node.split(".")[0]
        if "." in node:  # the pool opens a head such as squeezenet's classifier: tap what enters the head
            i = next(j for j, n in enumerate(nodes) if n.split(".")[0] == top)
        before = nodes[i - 1]
        top = before.split(".")[0]
        if top in modules and before == [n for n in nodes if n.split(".")[0] == top][-1]:
            return top
        return before
    raise ConfigError(
        "taps",
        "default",
        f"no global pooling found in {type(model).__name__}; name a node explicitly (top-level nodes: "
        f"{', '.join(dict.fromkeys(n.split('.')[0] for n in nodes[1:]))})",
    )


@functools.cache
def torchvision_default_tap(name: str) -> str:
    """:func:`tap_before_pooling` of ``tv:<name>``, found on a parameter-free copy built on the meta device."""
    check_torchvision_name(name)
    kwargs = {"weights": None, **_SINGLE_OUTPUT_DEFAULTS.get(name, {})}
    try:
        with torch.device("meta"):
            model = torchvision.models.get_model(name, **kwargs)
    except (
        NotImplementedError,
        RuntimeError,
    ):  # an initialiser that needs real data (regnets): build for real
        model = torchvision.models.get_model(name, **kwargs)
    return tap_before_pooling(model)


# The backend interface kdray.models.registry calls (every backend module has these three).
check_name = check_torchvision_name
build_model = build_torchvision_model
default_tap = torchvision_default_tap
