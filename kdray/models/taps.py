"""Feature taps: a classification model that also returns named intermediate feature maps.

Taps are taken with torchvision's FX feature extraction (``create_feature_extractor``), never with forward hooks: the
model is traced once into a graph that returns the logits and the requested nodes. A tap names an FX node
(``get_graph_node_names``) or a module prefix such as ``layer3``, meaning that module's output.

The extractor is built from the model's own submodules, so it shares every parameter and buffer with ``model``: an update
through either is seen by both, and ``model.state_dict()`` is all there is to save. It is deliberately not a registered
submodule (the state dict and ``parameters()`` hold each tensor once); it is rebuilt after ``.to()`` / ``.half()`` and
after unpickling or deepcopy, so it always points at the live tensors.
"""

from __future__ import annotations

import re
from typing import Any

import torch
from torch import nn

from kdray.errors import ConfigError
from kdray.models.registry import create_model, default_tap

LOGITS = "logits"
DEFAULT = "default"


def _matches(query: str, node: str) -> bool:
    """torchvision's rule: a query selects a node named ``query`` or any node inside module ``query``."""
    return re.match(rf"^{re.escape(query)}(\.|$)", node) is not None


class TappedNetwork(nn.Module):
    """``forward(x) -> {"logits": (B, C), alias: feature map, ...}`` for a classification model.

    Args:
        model: returns one logits tensor. Kept as ``self.model`` (its ``state_dict`` is what checkpoints save).
        taps: alias -> FX node name, e.g. ``{"feat": "layer3"}``. None or empty: the model is called directly.
            Fixed at construction: to tap other nodes, wrap the model in a new ``TappedNetwork``.
    """

    def __init__(self, model: nn.Module, taps: dict[str, str] | None = None):
        super().__init__()
        self.model = model
        self.taps: dict[str, str] = dict(taps or {})
        if LOGITS in self.taps:
            raise ConfigError(
                f"taps.{LOGITS}", self.taps[LOGITS], f"'{LOGITS}' is reserved for the model's output"
            )
        if self.taps:
            self._find_nodes()
        self._set_extractor()

    def _find_nodes(self) -> None:
        """Check every tap names a node; resolve taps and logits to concrete nodes (once: the graph never changes)."""
        from torchvision.models.feature_extraction import get_graph_node_names  # only for tapped peers

        try:
            train_nodes, eval_nodes = get_graph_node_names(self.model, suppress_diff_warning=True)
        except Exception as err:  # any tracing failure: say which model and why
            raise ConfigError(
                "taps",
                self.taps,
                f"{type(self.model).__name__} cannot be traced by torch.fx ({err}); taps need FX",
            ) from err
        for alias, node in self.taps.items():
            if not all(any(_matches(node, n) for n in nodes) for nodes in (train_nodes, eval_nodes)):
                top = list(dict.fromkeys(n.split(".")[0] for n in eval_nodes[1:]))
                raise ConfigError(
                    f"taps.{alias}",
                    node,
                    f"not a node of {type(self.model).__name__}; top-level nodes: {', '.join(top)} "
                    "(all nodes: torchvision.models.feature_extraction.get_graph_node_names)",
                )
        # Resolve each tap to its concrete node (a module name means its last node), per mode: two taps of one node
        # then share one output. The last traced node (the one before the graph's output) gives the logits.
        resolved = {}
        for mode, nodes in ((True, train_nodes), (False, eval_nodes)):
            taps = {alias: [n for n in nodes if _matches(node, n)][-1] for alias, node in self.taps.items()}
            resolved[mode] = {LOGITS: nodes[-1], **taps}
        object.__setattr__(self, "_nodes", resolved)

    # The extractor lives outside nn.Module's registries on purpose (see the module docstring).
    def _set_extractor(self) -> None:
        extractor = None
        if self.taps:
            from torchvision.models.feature_extraction import create_feature_extractor

            train, eval_ = (set(self._nodes[mode].values()) for mode in (True, False))
            extractor = create_feature_extractor(
                self.model,
                train_return_nodes={n: n for n in train},
                eval_return_nodes={n: n for n in eval_},
                suppress_diff_warning=True,
            )
        object.__setattr__(self, "_extractor", extractor)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        extractor = self._extractor
        if extractor is None:
            return {LOGITS: self.model(x)}
        mode = self.model.training
        if extractor.training != mode:
            # Switch graphs without DualGraphModule.train()'s recursion, which would reset per-module modes
            # (e.g. BN layers a user froze) that the shared submodules carry.
            extractor.graph = extractor.train_graph if mode else extractor.eval_graph
            extractor.training = mode
        out = extractor(x)
        return {alias: out[node] for alias, node in self._nodes[mode].items()}

    def _apply(self, fn: Any, *args: Any, **kwargs: Any) -> TappedNetwork:
        super()._apply(fn, *args, **kwargs)
        self._set_extractor()
        return self

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state.pop("_extractor", None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self._set_extractor()

    def extra_repr(self) -> str:
        return f"taps={self.taps}"


def build_network(
    arch: str,
    num_classes: int,
    in_channels: int,
    taps: dict[str, str] | None = None,
    **arch_kwargs: Any,
) -> TappedNetwork:
    """``TappedNetwork(create_model(arch, ...), taps)``; a tap given as ``"default"`` becomes :func:`default_tap`."""
    model = create_model(arch, num_classes, in_channels, **arch_kwargs)
    resolved = dict(taps or {})
    if DEFAULT in resolved.values():
        node = default_tap(arch)
        resolved = {alias: node if value == DEFAULT else value for alias, value in resolved.items()}
    return TappedNetwork(model, resolved)


def tap_shapes(net: TappedNetwork, input_shape: tuple[int, int, int]) -> dict[str, tuple[int, ...]]:
    """Per-sample shape of every output (``logits`` included) for inputs of ``input_shape`` = (C, H, W), from one
    dry forward of a single zero image in eval mode under ``no_grad``; the training mode is restored afterwards."""
    param = next(iter(net.parameters()), None)
    x = torch.zeros(1, *input_shape, device=param.device if param is not None else None)
    if param is not None and param.is_floating_point():
        x = x.to(param.dtype)
    was_training = net.training
    net.eval()
    try:
        with torch.no_grad():
            out = net(x)
    finally:
        net.train(was_training)
    return {name: tuple(t.shape[1:]) for name, t in out.items()}


def count_flops(model: nn.Module, input_shape: tuple[int, int, int]) -> int:
    """Forward FLOPs of one sample of ``input_shape`` (torch's own counter: matmuls and convolutions), in eval mode
    under ``no_grad``; the training mode is restored afterwards. What a peer's step costs, relatively."""
    from torch.utils.flop_counter import FlopCounterMode

    param = next(iter(model.parameters()), None)
    x = torch.zeros(1, *input_shape, device=param.device if param is not None else None)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(x)
    finally:
        model.train(was_training)
    return int(counter.get_total_flops())


def count_params(model: nn.Module) -> int:
    """Number of parameters (each shared tensor counted once), trainable or not."""
    return sum(p.numel() for p in model.parameters())
