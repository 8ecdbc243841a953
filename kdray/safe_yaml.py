"""Reading YAML that anyone may have written, at a bounded cost.

``yaml.safe_load`` runs no code, but a small document can still cost without bound: aliases of aliases ("billion
laughs") share one object in memory, so loading is cheap, yet everything that walks the result as a tree
(validation, ``yaml.safe_dump``, MLflow params) pays the expanded size. :func:`load_yaml` counts that size (in
time linear in the document) and refuses it past a bound. Merge keys (``<<: [*a, *a]``) cannot double a mapping at
each level: PyYAML 6 drops repeated keys while merging (``tests/test_safe_yaml.py`` holds it to that).
"""

from __future__ import annotations

from typing import Any

import yaml

MAX_YAML_VALUES = (
    100_000  # values of a YAML document once its aliases are expanded (a shipped config holds ~100)
)


class YamlTooLarge(ValueError):
    """A YAML document whose aliases expand past ``MAX_YAML_VALUES`` values, or refer to themselves."""


def _check_expanded_size(data: Any) -> None:
    """Refuse a document that, with every alias written out, holds more than ``MAX_YAML_VALUES`` values ("billion
    laughs": ten aliases of ten aliases ... of a list). PyYAML shares an alias's object, so loading is cheap, but
    whatever walks the result as a tree (validation, ``yaml.safe_dump``, MLflow params) pays the expanded size.
    Linear in the document: each mapping or list is sized once (iteratively: depth costs no recursion)."""
    sizes: dict[int, int] = {}
    open_ids: set[int] = set()  # containers whose children are being sized: meeting one again is a cycle
    stack: list[tuple[Any, bool]] = [(data, False)]
    while stack:
        node, children_done = stack.pop()
        if not isinstance(node, (dict, list)):
            continue
        children = list(node.values()) if isinstance(node, dict) else node
        key = id(node)
        if children_done:
            open_ids.discard(key)
            sizes[key] = 1 + sum(sizes.get(id(c), 1) for c in children)  # a scalar: 1
            if sizes[key] > MAX_YAML_VALUES:
                raise YamlTooLarge(
                    f"its aliases expand to more than {MAX_YAML_VALUES:,} values (a 'billion laughs' document?); "
                    f"write the values out, at most {MAX_YAML_VALUES:,}"
                )
        elif key in open_ids:
            raise YamlTooLarge("an alias refers to a mapping or list that contains it (a cycle)")
        elif key not in sizes:
            open_ids.add(key)
            stack.append((node, True))
            stack.extend((c, False) for c in children)


def load_yaml(text: str) -> Any:
    """``yaml.safe_load`` with a bounded cost: a document whose aliases expand past
    ``MAX_YAML_VALUES`` values or refers to itself raises :class:`YamlTooLarge` (a ``ValueError``: the readers of
    configs, search spaces and cluster files already turn it into their one-line error)."""
    data = yaml.safe_load(text)
    _check_expanded_size(data)
    return data
