"""Backbones, feature taps and the small auxiliary networks of adversarial methods (DESIGN.md: ``models``).

``create_model`` builds a registered architecture (``list_models``) or any torchvision classifier (``tv:<name>``);
``build_network`` wraps it in a :class:`TappedNetwork` that returns the logits and named feature maps.
"""

from kdray.models.registry import check_arch, create_model, default_tap, list_models
from kdray.models.taps import TappedNetwork, build_network, count_flops, count_params, tap_shapes

__all__ = [
    "TappedNetwork",
    "build_network",
    "check_arch",
    "count_flops",
    "count_params",
    "create_model",
    "default_tap",
    "list_models",
    "tap_shapes",
]
