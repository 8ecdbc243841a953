"""Every shipped config and search space, mutated value by value, through ``kdray train`` / ``kdray tune``'s own
validation: accepted, or refused with one ``kdray: error:`` line; never another exception, never unbounded time
or memory.

``test_fuzz_inputs.py`` damages bytes; this module keeps the YAML well formed and changes what it says: a value of
another type (``None``, a list, a mapping where a number goes), numbers out of range (0, -1, 2**63, 10**30, NaN,
inf), empty and huge strings, keys deleted or added, at any depth (``stages``, ``generations``, ``peers`` and the
method's own keys included), and ``--set KEY=VALUE`` overrides of any key with any YAML. The CLI runs in-process
(``kdray.cli.main``); a config it accepts stops where the run would begin (the run folder is about to be made:
``prepare_out_dir`` for ``train``, ``_study_dir`` for ``tune``), so nothing trains. Each case runs under an
address-space limit (``RLIMIT_AS``: what the process held before, plus 2 GiB) and must finish within
``CASE_SECONDS``: a count that would be expanded before it is checked (``generations: 2**63``) is a lost case, not
a killed battery. Seeded: every run tries the same cases. ``docs/faults.md`` has the figures.
"""

from __future__ import annotations

import copy
import math
import random
import resource
import subprocess
import time
import warnings
from collections import Counter
from pathlib import Path

import pytest
import yaml

from kdray.cli import main

from .conftest import REPO, kdray_proc, without_ray_forwarded, write_yaml

CATEGORIES: dict[str, Counter] = {}  # category -> tried / survived / lost (written to $KDRAY_FAULTS_REPORT)
REPORT_LABEL = "values"

CONFIGS = sorted((REPO / "configs").glob("*.yaml"))
SPACES = sorted((REPO / "tune_spaces").glob("*.yaml"))
CASE_SECONDS = 5.0  # the slowest accepted case takes ~50 ms (a space checked value by value)
HEADROOM = 2 << 30  # bytes of address space a case may add to what the process already holds
PROCESS_BYTES = 8 << 30  # address space of a real `python -m kdray` process (torch alone maps ~3 GiB)

NAN, INF = float("nan"), float("inf")
# values of every kind, each a plausible slip or a hostile choice
JUNK: list = [
    None, True, False, 0, -1, 1, 2, 7, 0.5, -0.5, 1e-300, 1e308, 2**31, 2**53 + 1, 2**63, 2**64, 10**30, -(2**63),
    NAN, INF, -INF, "", " ", "x", "é\u202e", "0", "1e3", "true", "null", "auto", "x" * 100_000, "a/b", "../up",
    [], [1, 2], [None], [[[]]], ["x"] * 1000, {}, {"a": 1}, {"name": "x"}, {"count": 2**63}, {"name": [1, 2]},
]  # fmt: skip
# --set KEY=VALUE texts: YAML of every kind, and text that is not YAML at all
TEXTS = [
    "[1,2]", "{a: 1}", "{name: [1, 2]}", ".nan", ".inf", "-.inf", "9223372036854775808", "1e999", "", "~", "[[[[",
    "&a [*a, *a]", "!!binary aGVsbG8=", "!!set {a, b}", "2024-01-01", "!!python/name:os.system", "0x10", "1_000",
    "- a", "'quoted'", "yes", "x" * 5000, "[" * 50 + "]" * 50,
]  # fmt: skip
BAD_KEYS = [
    "",
    ".",
    "a..b",
    "peers.99.arch",
    "peers.-1.arch",
    "method.name.x",
    "seed.x",
    "x" * 300,
    "stages.0",
]


class Accepted(BaseException):  # noqa: N818 - not an error: the signal that validation let the input through
    """Raised where the run would begin: validation accepted the input."""


@pytest.fixture(autouse=True)
def _stop_where_the_run_begins(monkeypatch):
    def accepted(*args, **kwargs):
        raise Accepted

    monkeypatch.setattr("kdray.run.prepare_out_dir", accepted)
    monkeypatch.setattr("kdray.search.study._study_dir", accepted)


def _vm_bytes() -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmSize in /proc/self/status")


class ValueBattery:
    """Runs CLI invocations in-process under a time and address-space bound, counts them per category."""

    def __init__(self, capsys, category: str):
        self.capsys, self.category = capsys, category
        self.failures: list[str] = []
        self.tally = CATEGORIES.setdefault(category, Counter())
        self.slowest = (0.0, "")

    def run(self, label: str, *argv) -> None:
        self.capsys.readouterr()
        code, raised, accepted = None, None, False
        soft, hard = resource.getrlimit(resource.RLIMIT_AS)
        start = time.perf_counter()
        with warnings.catch_warnings(record=True) as said:
            warnings.simplefilter("always")
            resource.setrlimit(resource.RLIMIT_AS, (_vm_bytes() + HEADROOM, hard))
            try:
                code = main([str(a) for a in argv])
            except Accepted:
                accepted = True
            except BaseException as exc:  # noqa: BLE001 - MemoryError, SystemExit, anything else: a lost case
                raised = exc
            finally:
                resource.setrlimit(resource.RLIMIT_AS, (soft, hard))
        took = time.perf_counter() - start
        self.slowest = max(self.slowest, (took, label))
        err = without_ray_forwarded(self.capsys.readouterr().err)
        hidden = (DeprecationWarning, PendingDeprecationWarning, ImportWarning, ResourceWarning)
        err += "".join(
            f"{w.category.__name__}: {w.message}\n" for w in said if not issubclass(w.category, hidden)
        )
        lines = err.strip().splitlines()
        if raised is not None:
            problem = f"raised {type(raised).__name__}: {str(raised)[:200]}"
        elif took > CASE_SECONDS:
            problem = f"took {took:.1f} s"
        elif accepted:
            problem = f"accepted, but printed {err[-300:]!r}" if lines else None
        elif code != 2 or len(lines) != 1 or not lines[0].startswith("kdray: error:"):
            problem = f"exit code {code}, stderr {err[-300:]!r}"
        elif len(lines[0]) > 2000:
            problem = f"a {len(lines[0])}-character error line"
        else:
            problem = None
        self.tally["tried"] += 1
        self.tally["lost" if problem else "survived"] += 1
        self.tally["accepted" if accepted else "refused"] += not problem
        if problem:
            self.failures.append(f"{label}: {problem}")

    def check(self) -> None:
        assert not self.failures, f"{len(self.failures)} case(s) lost:\n" + "\n".join(self.failures[:25])


# ------------------------------------------------------------------------------------------------------ mutations
def paths(node, prefix=()):
    """Every node's path (dict keys and list indices), the root's first."""
    yield prefix
    children = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for key, child in children:
        yield from paths(child, (*prefix, key))


def _parent(raw, where):
    node = raw
    for key in where[:-1]:
        node = node[key]
    return node


def _junk(rng: random.Random):
    return copy.deepcopy(rng.choice(JUNK))


def mutate(raw: dict, rng: random.Random) -> tuple[str, dict]:
    """One value-level mutation of ``raw`` (a copy) and its label."""
    raw = copy.deepcopy(raw)
    every = list(paths(raw))[1:]
    op = rng.choice(["replace", "replace", "replace", "number", "delete", "add", "swap", "grow", "top"])
    where = rng.choice(every)
    dotted = ".".join(map(str, where))
    parent = _parent(raw, where)
    value = parent[where[-1]]
    if op == "number":  # a number's neighbours and extremes (any other value: any junk)
        numbers = [v for v in JUNK if isinstance(v, (int, float)) and not isinstance(v, bool)]
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            numbers += [-value, value * 10**6, value + 0.5, math.nextafter(value, INF)]
        new = rng.choice(numbers)
        parent[where[-1]] = new
        return f"{dotted} = {new!r:.40}", raw
    if op == "delete":
        del parent[where[-1]]
        return f"{dotted} deleted", raw
    if op == "add":  # a key where there is a mapping: unknown, or a real key of another section
        at = rng.choice([(), *(p for p in every if isinstance(_parent(raw, p)[p[-1]], dict))])
        node = _parent(raw, at)[at[-1]] if at else raw
        names = [
            "x",
            "",
            "count",
            "name",
            "stages",
            "generations",
            "epochs",
            "peers",
            "arch",
            "lr",
            "1",
            "null",
        ]
        key = rng.choice(names + [str(p[-1]) for p in every if isinstance(p[-1], str)])
        other = rng.choice(every)  # or a copy of any part of the config
        node[key] = _junk(rng) if rng.random() < 0.7 else copy.deepcopy(_parent(raw, other)[other[-1]])
        return f"{'.'.join(map(str, at)) or '<top>'}.{key} added", raw
    if op == "swap":  # the same value as another type
        new = {str: lambda v: [v], bool: lambda v: str(v).lower(), int: str, float: str}.get(
            type(value), lambda v: [v]
        )(value)
        parent[where[-1]] = new
        return f"{dotted} = {new!r:.40} (retyped)", raw
    if op == "grow":  # a list's items repeated (peers, stages, milestones, ...)
        lists = [p for p in every if isinstance(_parent(raw, p)[p[-1]], list)]
        if lists:
            at = rng.choice(lists)
            items = _parent(raw, at)[at[-1]]
            items.extend(copy.deepcopy(items) * rng.choice([1, 3]))
            return f"{'.'.join(map(str, at))} repeated", raw
    if op == "top":  # the sections that expand into stages
        key = rng.choice(["generations", "stages", "generations", "peers", "method"])
        raw[key] = rng.choice([_junk(rng), {"count": _junk(rng)}, {"count": 2, "method": _junk(rng)},
                               [{"name": "s"}], [{"name": _junk(rng)}], [{"name": "a", "peers": _junk(rng)}]])  # fmt: skip
        return f"{key} = {raw[key]!r:.60}", raw
    new = _junk(rng)
    parent[where[-1]] = new
    return f"{dotted} = {new!r:.40}", raw


def _load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


_Dumper = getattr(yaml, "CSafeDumper", yaml.SafeDumper)  # libyaml's writer where installed: 10x faster


def _write(path: Path, raw) -> Path:
    path.write_text(yaml.dump(raw, Dumper=_Dumper))
    return path


# ---------------------------------------------------------------------------------------------------------- train
CASES_PER_CONFIG = 32
OVERRIDES_PER_CONFIG = 10


def test_shipped_configs_are_accepted(capsys, tmp_path):
    """The control: every shipped config, unchanged, reaches the start of its run (and a case that raised, hung or
    printed anything would be lost)."""
    b = ValueBattery(capsys, "shipped config, unchanged (control)")
    for path in CONFIGS:
        b.run(path.name, "train", path, "--out", tmp_path / "never")
    b.check()
    assert b.tally["accepted"] == len(CONFIGS) >= 29


def test_mutated_configs(capsys, tmp_path):
    """``CASES_PER_CONFIG`` mutations of every shipped config, through ``kdray train CONFIG``. Both outcomes occur:
    a battery that refused everything (or accepted everything) would test nothing."""
    b = ValueBattery(capsys, "config with one value mutated (any key, any depth, stages and generations too)")
    rng = random.Random(3030)
    for path in CONFIGS:
        base = _load(path)
        for i in range(CASES_PER_CONFIG):
            label, raw = mutate(base, rng)
            file = _write(tmp_path / f"{path.stem}-{i}.yaml", raw)
            b.run(f"{path.name}: {label}", "train", file, "--out", tmp_path / "never")
    b.check()
    assert b.tally["accepted"] > 50 and b.tally["refused"] > 400, b.tally


def test_overrides(capsys, tmp_path):
    """``kdray train CONFIG --set KEY=TEXT``: any key of the config (or a malformed one), any YAML text."""
    b = ValueBattery(capsys, "--set KEY=VALUE of any key with any YAML (or none)")
    rng = random.Random(3031)
    for path in CONFIGS:
        keys = [".".join(map(str, p)) for p in list(paths(_load(path)))[1:]]
        for _ in range(OVERRIDES_PER_CONFIG):
            key = rng.choice(keys + BAD_KEYS) if rng.random() < 0.9 else rng.choice(BAD_KEYS)
            text = rng.choice(TEXTS)
            b.run(f"{path.name} --set {key}={text:.40}", "train", path, "--set", f"{key}={text}",
                  "--out", tmp_path / "never")  # fmt: skip
    # the known ones: an unhashable method name, a generation count no machine could honour
    for path, key, text in [
        ("dml.yaml", "method.name", "[1,2]"),
        ("dml.yaml", "method.name", "{a: 1}"),
        ("ban_fmnist.yaml", "generations", "9223372036854775808"),
        ("ban_fmnist.yaml", "generations.count", "9223372036854775808"),
        ("dml.yaml", "generations", "9223372036854775808"),
        ("tfkd_self_fmnist.yaml", "stages.1.method.name", "[x]"),
    ]:
        b.run(f"{path} --set {key}={text}", "train", REPO / "configs" / path, "--set", f"{key}={text}",
              "--out", tmp_path / "never")  # fmt: skip
    b.check()


# ---------------------------------------------------------------------------------------------------------- tune
CASES_PER_SPACE = 25


def _config_for(space: Path, tmp: Path) -> Path:
    """A config that trains the space's method: a shipped plain one, else a staged one's last stage as a plain
    config (its teacher's ``from_stage`` a checkpoint path: the weights are not read before the run)."""
    from kdray.stages import deep_merge

    method = _load(space).get("method")
    staged = []
    for path in CONFIGS:
        raw = _load(path)
        if "stages" in raw:
            staged.append(raw)
        elif "generations" in raw:
            continue
        elif isinstance(raw.get("method"), dict) and raw["method"].get("name") == method:
            return path
    for raw in staged:
        last = raw["stages"][-1]
        if last["method"]["name"] == method:
            plain = deep_merge({k: v for k, v in raw.items() if k != "stages"}, last)
            plain.pop("from_stage", None)
            plain["name"] = f"{raw['name']}-{last['name']}"
            for peer in plain["peers"]:
                if peer.pop("from_stage", None):
                    peer["checkpoint"] = str(tmp / "teacher.pt")
            return _write(tmp / f"{method}-plain.yaml", plain)
    raise AssertionError(f"no shipped config trains {method}")


def test_shipped_spaces_are_accepted(capsys, tmp_path):
    b = ValueBattery(capsys, "shipped search space, unchanged (control)")
    for space in SPACES:
        b.run(space.name, "tune", _config_for(space, tmp_path), "--space", space, "--out", tmp_path / "never")
    b.check()
    assert b.tally["accepted"] == len(SPACES) >= 12


def test_mutated_spaces(capsys, tmp_path):
    """``CASES_PER_SPACE`` mutations of every shipped search space, through ``kdray tune CONFIG --space FILE``
    (the space's ranges, and every value they can hand a trial, checked against the config)."""
    b = ValueBattery(capsys, "search space with one value mutated (any field, any depth)")
    rng = random.Random(3032)
    for space in SPACES:
        config, base = _config_for(space, tmp_path), _load(space)
        for i in range(CASES_PER_SPACE):
            label, raw = mutate(base, rng)
            file = _write(tmp_path / f"{space.stem}-{i}.yaml", raw)
            b.run(f"{space.name}: {label}", "tune", config, "--space", file, "--out", tmp_path / "never")
    b.check()
    assert b.tally["accepted"] > 20 and b.tally["refused"] > 120, b.tally


# ------------------------------------------------------------------------------------------------ billion laughs
def laughs(levels: int, width: int = 9) -> str:
    """Aliases of aliases: level k holds ``width`` aliases of level k - 1, ``width ** levels`` values written out."""
    lines = ["l0: &l0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    for k in range(1, levels + 1):
        lines.append(f"l{k}: &l{k} [{', '.join([f'*l{k - 1}'] * width)}]")
    return "\n".join(lines) + "\n"


def inline_laughs(levels: int = 9) -> str:
    """The same as a flow mapping, to hide inside a key that takes any mapping (a peer's ``arch_kwargs``)."""
    return "{" + ", ".join(laughs(levels).splitlines()) + "}"


# a space whose choice values are the 10 levels (the space's reader compares them: before, it printed each)
LAUGHING_SPACE = "params:\n  method.weights.kl: {dist: choice, values: [" + ", ".join(
    ["&l0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]"] + [f"&l{k} [{', '.join([f'*l{k - 1}'] * 9)}]" for k in range(1, 10)]
) + "]}\n"  # fmt: skip


def merges(levels: int) -> str:
    """Merge keys that would double a mapping's entries at each level (``<<: [*m, *m]``)."""
    lines = ["m0: &m0 {a: 1, b: 2, c: 3, d: 4}"]
    for k in range(1, levels + 1):
        lines.append(f"m{k}: &m{k} {{<<: [*m{k - 1}, *m{k - 1}]}}")
    return "\n".join(lines) + "\n"


def test_billion_laughs(capsys, tmp_path):
    """Exponential aliases, as a config, a space and a cluster file: at the top of the file; hidden in a key that
    takes any mapping (a peer's ``arch_kwargs``), where validation accepted them before and every later walk
    (``config.yaml``, MLflow params) would pay 9**9; used as a value that the error message then printed
    (``seed: *l9``), or that a space compares (choice values); merge keys that would double; a list and a mapping
    that contain themselves. Refused with one line, each within the case's time and memory bound."""
    b = ValueBattery(capsys, "YAML whose aliases expand exponentially (billion laughs, merge keys, a cycle)")
    config = REPO / "configs" / "dml.yaml"
    base = config.read_text()
    hidden = base.replace("  - {arch: resnet8}", f"  - {{arch: resnet8, arch_kwargs: {inline_laughs()}}}", 1)
    anywhere = {
        "9 levels of 9 aliases": laughs(9),
        "30 levels of 2 aliases": laughs(30, width=2),
        "merge keys that would double 40 times": merges(40),
        "a list that contains itself": "a: &a [1, *a]\n",
        "a mapping that contains itself": "a: &a {b: *a}\n",
    }
    configs = {
        **anywhere,
        "laughs inside arch_kwargs": hidden,
        "laughs inside arch_kwargs, used as the seed": hidden.replace("seed: 0\n", "") + "seed: *l9\n",
        "merge keys inside method": base.replace("method: {", "method: {<<: *m40, ", 1).replace(
            "name: dml-fmnist", merges(40) + "name: dml-fmnist", 1),
    }  # fmt: skip
    spaces = {**anywhere, "laughs as choice values": LAUGHING_SPACE}
    assert "arch_kwargs: {l0: &l0" in hidden and configs["laughs inside arch_kwargs, used as the seed"].endswith(
        "seed: *l9\n")  # fmt: skip
    for i, (label, text) in enumerate(configs.items()):
        file = tmp_path / f"config{i}.yaml"
        file.write_text(text)
        b.run(f"config: {label}", "train", file, "--out", tmp_path / "never")
    for i, (label, text) in enumerate(spaces.items()):
        file = tmp_path / f"space{i}.yaml"
        file.write_text(text)
        b.run(f"space: {label}", "tune", config, "--space", file, "--out", tmp_path / "never")
    for i, (label, text) in enumerate(anywhere.items()):
        file = tmp_path / f"cluster{i}.yaml"
        file.write_text(text)
        b.run(f"cluster: {label}", "cluster", "check", file)
    b.check()
    assert b.tally["refused"] == b.tally["tried"], b.tally


# ------------------------------------------------------------------------------------------------ real processes
def test_real_processes_refuse_the_same(tmp_path):
    """The known failures and a billion laughs through ``python -m kdray`` (started together: nothing trains,
    each is refused), each process under an address-space limit and killed after 120 s: exit code 2, one
    ``kdray: error:`` line naming the key."""
    dml, ban = REPO / "configs" / "dml.yaml", REPO / "configs" / "ban_fmnist.yaml"
    laughing = tmp_path / "laughs.yaml"
    laughing.write_text(LAUGHING_SPACE)
    huge = write_yaml(tmp_path / "huge.yaml", {**_load(ban), "generations": 2**63})
    runs = {
        "--set method.name=[1,2]": (["train", dml, "--set", "method.name=[1,2]"], "'method.name'"),
        "generations: 2**63": (["train", huge], "'generations.count'"),
        "billion laughs as choice values": (["tune", dml, "--space", laughing], "aliases expand"),
    }

    def bounded() -> None:  # in the child: a process that would allocate without bound fails, not the machine
        resource.setrlimit(resource.RLIMIT_AS, (PROCESS_BYTES, resource.getrlimit(resource.RLIMIT_AS)[1]))

    procs = {
        label: kdray_proc(*argv, "--out", tmp_path / "never", preexec_fn=bounded)
        for label, (argv, _) in runs.items()
    }
    lost = []
    try:
        for label, proc in procs.items():
            try:
                _, err = proc.communicate(timeout=120)
            except subprocess.TimeoutExpired:
                proc.kill()
                err = proc.communicate()[1] + "\n(killed after 120 s)"
            lines = err.strip().splitlines()
            one_line = len(lines) == 1 and lines[0].startswith("kdray: error:")
            if proc.returncode != 2 or not one_line or runs[label][1] not in err:
                lost.append(f"{label}: exit code {proc.returncode}, stderr {err[-400:]!r}")
    finally:
        for proc in procs.values():
            proc.kill()  # nothing for a finished process; never an orphan that allocates on
    CATEGORIES.setdefault("real processes (python -m kdray)", Counter()).update(
        {"tried": len(runs), "survived": len(runs) - len(lost), "lost": len(lost)}
    )
    assert not lost, "\n".join(lost)
    assert not (tmp_path / "never").exists()
