"""The method registry (:data:`kdray.registry.METHODS`): ``method.name`` in a config -> the class. A method
registers itself where it is defined::

    @register
    class DML(Method):
        name = "dml"

Plug-ins outside kdray use the same decorator (their module must be imported before the config is loaded).
"""

from __future__ import annotations

from kdray.registry import METHODS

register = METHODS.register
method_class = METHODS.lookup

__all__ = ["METHODS", "method_class", "register"]
