"""kdray/safe_yaml.py: aliases are read as written out, up to a bound on the expanded size; past it, or in a cycle,
the document is refused before anything walks it."""

from __future__ import annotations

import pytest
import yaml

from kdray.safe_yaml import MAX_YAML_VALUES, YamlTooLarge, load_yaml


def _laughs(levels: int, width: int) -> str:
    lines = ["l0: &l0 [" + ", ".join(["lol"] * width) + "]"]
    lines += [f"l{k}: &l{k} [{', '.join([f'*l{k - 1}'] * width)}]" for k in range(1, levels + 1)]
    return "\n".join(lines) + "\n"


def _expanded(levels: int, width: int) -> int:
    """Values of ``_laughs`` written out (a list or mapping counts 1, plus its values)."""
    sizes = [1 + width]  # l0: the list and its items
    for _ in range(levels):
        sizes.append(1 + width * sizes[-1])
    return 1 + sum(sizes)  # the top mapping holds every level


def test_aliases_below_the_bound_read_as_plain_yaml():
    text = _laughs(4, 9)  # 9**5 = 59 049 'lol' at the deepest level: inside the bound
    assert _expanded(4, 9) < MAX_YAML_VALUES
    assert load_yaml(text) == yaml.safe_load(text)
    assert load_yaml("a: &a {x: 1}\nb: {<<: *a, y: 2}\n") == {"a": {"x": 1}, "b": {"x": 1, "y": 2}}


@pytest.mark.parametrize(("levels", "width"), [(5, 9), (17, 2), (30, 2)])
def test_aliases_past_the_bound_are_refused(levels, width):
    assert _expanded(levels, width) > MAX_YAML_VALUES
    with pytest.raises(YamlTooLarge, match="aliases expand to more than 100,000 values"):
        load_yaml(_laughs(levels, width))


def test_the_bound_is_the_expanded_count():
    """The count written out decides, to the value: a mapping of 1 + 1 000 values, 98 aliases of it in a list, and
    a list of k scalars hold 1 + 1 000 + (1 + 98 * 1 000) + (1 + k) = 99 003 + k values."""

    def doc(k: int) -> str:
        return (
            f"a: &a [{', '.join(['1'] * 999)}]\n"  # 1 + 999
            f"b: [{', '.join(['*a'] * 98)}]\n"
            f"c: [{', '.join(['0'] * k)}]\n"
        )

    assert load_yaml(doc(MAX_YAML_VALUES - 99_003))["b"][97] == [1] * 999  # exactly the bound
    with pytest.raises(YamlTooLarge):
        load_yaml(doc(MAX_YAML_VALUES - 99_003 + 1))


def test_merge_keys_do_not_double():
    """``<<: [*m, *m]`` 60 levels deep: PyYAML drops the repeated keys while merging, so the mapping stays 4 keys
    (a PyYAML that doubled them would spend 2**60 here, before any check of ours could run)."""
    lines = ["m0: &m0 {a: 1, b: 2, c: 3, d: 4}"]
    lines += [f"m{k}: &m{k} {{<<: [*m{k - 1}, *m{k - 1}]}}" for k in range(1, 60)]
    assert load_yaml("\n".join(lines))["m59"] == {"a": 1, "b": 2, "c": 3, "d": 4}


@pytest.mark.parametrize("text", ["a: &a [1, *a]", "a: &a {b: *a}", "- &a [[[*a]]]"])
def test_cycles_are_refused(text):
    with pytest.raises(YamlTooLarge, match="cycle"):
        load_yaml(text)


def test_deep_nesting_is_not_a_cycle():
    """Sizing is iterative: a document nested 200 deep (within PyYAML's own recursion) is read, not refused."""
    text = "[" * 200 + "1" + "]" * 200
    assert load_yaml(text) == yaml.safe_load(text)
