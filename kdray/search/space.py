"""Search spaces as data: ``tune_spaces/<method>.yaml`` names config keys and their distributions.

A space file::

    method: dml                      # optional: the method the space is written for (checked against the config)
    params:
      method.weights.kl:             # any key of the experiment config, dotted as for --set
        dist: loguniform             # uniform | loguniform | int | choice
        low: 0.1
        high: 10.0
        source: "DML uses 1.0; a decade either side"   # where the range comes from (paper, reasoning)
      train.optimizer.name: {dist: choice, values: [sgd, adam]}
    perturb: [method.weights.kl]     # what PBT may change during training (default: weights and temperature)

A space is checked before any trial starts (:meth:`SearchSpace.check_against`): the ranges must be well formed and
every value a trial could receive (both ends of a range, each choice) must give a valid config. A key the config does
not have is refused by the config itself (unknown keys are errors), so nothing here lists the accepted keys.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from kdray.config import ExperimentConfig, load_config, set_key
from kdray.errors import ConfigError, KdrayError
from kdray.safe_yaml import load_yaml

DISTRIBUTIONS = ("uniform", "loguniform", "int", "choice")
PARAM_FIELDS = {"dist", "low", "high", "values", "log", "source"}


class SpaceError(KdrayError):
    """A search space is malformed or names values the config cannot take."""

    def __init__(self, source: str, key: str, problem: str):
        self.source, self.key = source, key
        super().__init__(f"search space '{source}': '{key}': {problem}")


@dataclass(frozen=True)
class Param:
    """One searched config key and its distribution."""

    key: str
    dist: str
    low: float | None = None
    high: float | None = None
    values: tuple[Any, ...] = ()
    log: bool = False
    source: str = ""

    def contains(self, value: Any) -> bool:
        if self.dist == "choice":
            return value in self.values
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False
        if self.dist == "int" and int(value) != value:
            return False
        return self.low <= value <= self.high

    def extremes(self) -> list[Any]:
        """The values that bound what a trial can receive: both ends of a range, every choice."""
        if self.dist == "choice":
            return list(self.values)
        return [self.low, self.high]

    def clip(self, value: Any) -> Any:
        """Bring a perturbed value back into the declared range (PBT multiplies values by 0.8 / 1.2)."""
        if self.dist == "choice":
            return value
        value = min(max(value, self.low), self.high)
        return int(round(value)) if self.dist == "int" else float(value)

    def describe(self) -> str:
        if self.dist == "choice":
            return f"choice {list(self.values)}"
        return f"{self.dist}[{self.low}, {self.high}]" + (" log" if self.log and self.dist == "int" else "")

    # -------------------------------------------------------------------------- translations
    def to_optuna(self):
        from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

        if self.dist == "choice":
            return CategoricalDistribution(list(self.values))
        if self.dist == "int":
            return IntDistribution(int(self.low), int(self.high), log=self.log)
        return FloatDistribution(self.low, self.high, log=self.dist == "loguniform")

    def to_tune(self):
        from ray import tune

        if self.dist == "choice":
            return tune.choice(list(self.values))
        if self.dist == "int":  # tune's randint excludes the upper bound
            fn = tune.lograndint if self.log else tune.randint
            return fn(int(self.low), int(self.high) + 1)
        return (tune.loguniform if self.dist == "loguniform" else tune.uniform)(self.low, self.high)


@dataclass
class SearchSpace:
    params: dict[str, Param]
    perturb: list[str] = field(default_factory=list)
    method: str | None = None
    source: str = "<space>"

    @property
    def keys(self) -> list[str]:
        return list(self.params)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, p in self.params.items():
            entry: dict[str, Any] = {"dist": p.dist}
            if p.dist == "choice":
                entry["values"] = list(p.values)
            else:
                entry.update(low=p.low, high=p.high)
            if p.log and p.dist == "int":
                entry["log"] = True
            if p.source:
                entry["source"] = p.source
            out[key] = entry
        return {"method": self.method, "params": out, "perturb": list(self.perturb)}

    def check_against(self, raw_config: dict[str, Any]) -> ExperimentConfig:
        """Refuse the space unless every value it can hand a trial gives a valid config; returns the base config.

        Each extreme value is applied alone (the others keep the config's own values), so the error names the one
        key at fault; the config rejects keys it does not have.
        """
        base = load_config(raw_config)
        if self.method is not None and self.method != base.method.name:
            raise SpaceError(
                self.source, "method", f"the space is written for method '{self.method}', the config trains "
                f"'{base.method.name}'; use tune_spaces/{base.method.name}.yaml or fix 'method:' in the space",
            )  # fmt: skip
        for key, param in self.params.items():
            for value in param.extremes():
                try:
                    apply_values(raw_config, {key: value})
                except ConfigError as exc:
                    raise SpaceError(self.source, key, f"the config refuses {_short(value)}: {exc}") from None
        return base

    def config_values(self, cfg: ExperimentConfig) -> dict[str, Any] | None:
        """The config's own value of every key (Optuna's first point), or None if one lies outside its range."""
        flat = cfg.flat()
        point = {k: flat.get(k) for k in self.params}
        if all(self.params[k].contains(v) for k, v in point.items()):
            return point
        return None


def same_values(config: dict[str, Any], point: dict[str, Any]) -> bool:
    """Whether a trial's config holds every value of ``point`` (numbers equal up to float round-off)."""
    for key, want in point.items():
        got = config.get(key)
        if isinstance(want, bool) or isinstance(got, bool) or not isinstance(want, int | float):
            if type(got) is not type(want) or got != want:  # True is not 1
                return False
        elif not isinstance(got, int | float) or not math.isclose(got, want, rel_tol=1e-12, abs_tol=0.0):
            return False
    return True


def apply_values(raw_config: dict[str, Any], values: dict[str, Any]) -> ExperimentConfig:
    """The config with ``values`` (dotted key -> value) set and validated; values keep their types (no YAML parsing)."""
    raw = copy.deepcopy(raw_config)
    for key, value in values.items():
        set_key(raw, key, value)
    return load_config(raw)


def _short(value: Any) -> str:
    """``repr(value)``, cut to a readable length (a space file may hold anything)."""
    try:
        text = repr(value)
    except RecursionError:
        text = f"<a {type(value).__name__} nested too deeply>"
    return text if len(text) <= 80 else text[:77] + "..."


def _number(source: str, key: str, entry: dict[str, Any], name: str) -> float:
    value = entry.get(name)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise SpaceError(source, key, f"'{name}' must be a finite number, got {_short(value)}")
    return value


def parse_param(source: str, key: str, entry: Any) -> Param:
    if not isinstance(entry, dict):
        raise SpaceError(
            source, key, f"expected a mapping like {{dist: uniform, low: 0, high: 1}}, got {_short(entry)}"
        )
    unknown = sorted((k for k in entry if k not in PARAM_FIELDS), key=str)
    if unknown:
        raise SpaceError(source, key, f"unknown field '{unknown[0]}'; accepted: {sorted(PARAM_FIELDS)}")
    dist = entry.get("dist")
    if dist not in DISTRIBUTIONS:
        raise SpaceError(source, key, f"dist {_short(dist)} is not one of {list(DISTRIBUTIONS)}")
    text = str(entry.get("source", ""))
    if dist == "choice":
        values = entry.get("values")
        if not isinstance(values, list) or not values:
            raise SpaceError(source, key, f"choice needs a non-empty list 'values', got {_short(values)}")
        if len({_short(v) for v in values}) != len(values):
            raise SpaceError(source, key, f"choice values repeat: {_short(values)}")
        return Param(key, dist, values=tuple(values), source=text)
    if "values" in entry:
        raise SpaceError(source, key, f"'values' belongs to dist: choice, not {dist}")
    low, high = _number(source, key, entry, "low"), _number(source, key, entry, "high")
    if low >= high:
        raise SpaceError(source, key, f"low ({low}) must be smaller than high ({high})")
    log = bool(entry.get("log", False))
    if dist == "loguniform" and low <= 0:
        raise SpaceError(source, key, f"loguniform needs low > 0, got low = {low}")
    if dist == "int":
        if int(low) != low or int(high) != high:
            raise SpaceError(source, key, f"int needs whole-number bounds, got [{low}, {high}]")
        if log and low <= 0:
            raise SpaceError(source, key, f"int with log: true needs low > 0, got low = {low}")
        low, high = int(low), int(high)
    elif "log" in entry:
        raise SpaceError(source, key, f"'log' belongs to dist: int (use dist: loguniform), not {dist}")
    return Param(key, dist, float(low) if dist != "int" else low, float(high) if dist != "int" else high,
                 log=log, source=text)  # fmt: skip


def default_perturb(params: dict[str, Param]) -> list[str]:
    """PBT's default: the loss weights and the temperature, the values that can change mid-training."""
    return [k for k in params if k.startswith("method.weights.") or k == "method.temperature"]


def parse_space(raw: Any, source: str = "<space>") -> SearchSpace:
    if not isinstance(raw, dict):
        raise SpaceError(source, "<file>", "expected a YAML mapping with a 'params' section")
    unknown = sorted((k for k in raw if k not in ("method", "params", "perturb")), key=str)
    if unknown:
        raise SpaceError(source, str(unknown[0]), "unknown section; accepted: method, params, perturb")
    entries = raw.get("params")
    if not isinstance(entries, dict) or not entries:
        raise SpaceError(source, "params", "needs at least one key, e.g. method.weights.kl: {dist: ...}")
    params = {str(k): parse_param(source, str(k), v) for k, v in entries.items()}
    perturb = raw.get("perturb")
    if perturb is None:
        perturb = default_perturb(params)
    if not isinstance(perturb, list):
        raise SpaceError(source, "perturb", f"expected a list of keys from 'params', got {_short(perturb)}")
    for key in perturb:
        if not isinstance(key, str) or key not in params:
            raise SpaceError(
                source,
                key if isinstance(key, str) else _short(key),
                f"'perturb' names a key that is not in 'params' ({list(params)})",
            )
    method = raw.get("method")
    if method is not None and not isinstance(method, str):
        raise SpaceError(source, "method", f"a method name, e.g. method: dml; got {_short(method)}")
    return SearchSpace(params, [str(k) for k in perturb], method or None, source)


def load_space(path: str | Path | dict[str, Any]) -> SearchSpace:
    """Read and check the form of a space file (ranges, distributions); :meth:`SearchSpace.check_against` checks
    the keys against a config. Any file that is not a well-formed space, whatever its bytes, is one
    :class:`SpaceError`."""
    if isinstance(path, dict):
        return parse_space(path)
    p = Path(path)
    try:
        is_file = p.is_file()
    except (OSError, ValueError):
        is_file = False
    if not is_file:
        raise SpaceError(str(p), "<file>", "no such file (the spaces shipped with kdray are in tune_spaces/)")
    try:
        raw = load_yaml(p.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise SpaceError(str(p), "<file>", "not a text file (not UTF-8)") from None
    except (yaml.YAMLError, ValueError, RecursionError) as exc:
        raise SpaceError(str(p), "<file>", f"not valid YAML: {_first_line(exc)}") from None
    except OSError as exc:
        raise SpaceError(str(p), "<file>", f"cannot be read ({exc.strerror or exc})") from None
    return parse_space(raw, str(p))


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:200] if text else type(exc).__name__
