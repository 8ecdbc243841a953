"""What a comparison trains: rows (a label, a config, its overrides) x seeds, and the overrides every row shares.

From the command line, each config file is a row labelled by its file name::

    kdray compare configs/a.yaml configs/b.yaml --seeds 0 1 2 --set train.epochs=20

or from a study file (a YAML mapping with ``rows``; paths are relative to the file)::

    seeds: [0, 1, 2]               # optional (default [0, 1, 2]); --seeds replaces it
    baseline: independent          # optional (default: the first row); --baseline replaces it
    overrides:                     # optional, every row: a mapping of config keys, or a list of KEY=VALUE
      train.epochs: 40
      data.select_on: last
    rows:
      - label: independent         # unique; the table's row name
        config: ../configs/demo.yaml
        overrides: {method.name: independent}
      - label: dml
        config: ../configs/demo.yaml

The order of overrides: the shared ones, then the row's, then ``--set``; then the run's ``seed`` and ``name``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from kdray.config import apply_overrides, read_raw, set_key, validate
from kdray.errors import ConfigError

DEFAULT_SEEDS = (0, 1, 2)
STUDY_KEYS = ("rows", "seeds", "baseline", "overrides")
ROW_KEYS = ("label", "config", "overrides")


@dataclass
class Row:
    label: str
    config: Path
    overrides: list[tuple[str, Any]] = field(default_factory=list)

    @property
    def slug(self) -> str:
        """The label as a folder name."""
        return re.sub(r"[^A-Za-z0-9._-]+", "_", self.label).strip("_") or "row"


@dataclass
class Study:
    rows: list[Row]
    seeds: list[int]
    baseline: str
    overrides: list[tuple[str, Any]] = field(default_factory=list)  # shared by every row, before each row's

    def labels(self) -> list[str]:
        return [r.label for r in self.rows]

    def config(self, row: Row, seed: int, extra: list[str] | None = None) -> dict[str, Any]:
        """The raw config of ``row`` for ``seed``: its file, the shared overrides, the row's, ``extra`` (--set), then
        the seed and a run name; validated (a ConfigError names the row)."""
        raw = read_raw(row.config)
        try:
            for key, value in [*self.overrides, *row.overrides]:
                set_key(raw, key, value)
            raw = apply_overrides(raw, extra)
            raw["seed"] = seed
            raw["name"] = f"{row.slug}-s{seed}"
            from kdray.stages import is_staged, stage_configs

            stage_configs(raw) if is_staged(raw) else validate(raw)
        except ConfigError as exc:
            raise ConfigError(
                exc.key, exc.value, f"{exc.accepted} (row '{row.label}', seed {seed})"
            ) from None
        return raw


def _overrides(value: Any, where: str) -> list[tuple[str, Any]]:
    """A mapping ``{key: value}`` or a list of ``KEY=VALUE`` strings -> [(key, value)]."""
    if value is None:
        return []
    if isinstance(value, dict):
        return [(str(k), v) for k, v in value.items()]
    if isinstance(value, list) and all(isinstance(v, str) and "=" in v for v in value):
        out = []
        for item in value:
            key, _, text = item.partition("=")
            out.append((key.strip(), yaml.safe_load(text.strip()) if text.strip() else None))
        return out
    raise ConfigError(where, value, "a mapping of config keys to values, or a list of KEY=VALUE strings")


def _seeds(value: Any) -> list[int]:
    if (
        not isinstance(value, list)
        or not value
        or not all(isinstance(s, int) and not isinstance(s, bool) for s in value)
    ):
        raise ConfigError("seeds", value, "a non-empty list of integers, e.g. [0, 1, 2]")
    if len(set(value)) != len(value):
        raise ConfigError("seeds", value, "each seed once")
    return list(value)


def is_study_file(path: str | Path) -> bool:
    """A YAML mapping with a top-level ``rows`` key (an experiment config has none)."""
    try:
        raw = read_raw(path)
    except ConfigError:
        return False
    return "rows" in raw


def load_study(path: str | Path) -> Study:
    """Read and check a study file; the first problem is one ConfigError naming the key, the value and what is
    accepted."""
    path = Path(path)
    raw = read_raw(path)
    for key in raw:
        if key not in STUDY_KEYS:
            raise ConfigError(
                key, raw[key], f"unknown key of a study file; accepted: {', '.join(STUDY_KEYS)}"
            )
    rows_raw = raw.get("rows")
    if not isinstance(rows_raw, list) or not rows_raw:
        raise ConfigError("rows", rows_raw, "a non-empty list of rows, each {label, config, overrides}")
    rows = []
    for i, item in enumerate(rows_raw):
        if not isinstance(item, dict):
            raise ConfigError(f"rows.{i}", item, "a mapping with label, config and (optional) overrides")
        for key in item:
            if key not in ROW_KEYS:
                raise ConfigError(
                    f"rows.{i}.{key}", item[key], f"unknown key of a row; accepted: {', '.join(ROW_KEYS)}"
                )
        label = item.get("label")
        if not isinstance(label, str) or not label.strip():
            raise ConfigError(f"rows.{i}.label", label, "a non-empty name for the row")
        config = item.get("config")
        if not isinstance(config, str):
            raise ConfigError(
                f"rows.{i}.config", config, "the path of an experiment YAML (relative to the study file)"
            )
        config_path = (path.parent / config) if not Path(config).is_absolute() else Path(config)
        if not config_path.is_file():
            raise ConfigError(f"rows.{i}.config", config, f"no such file ({config_path})")
        rows.append(Row(label.strip(), config_path, _overrides(item.get("overrides"), f"rows.{i}.overrides")))
    seeds = _seeds(raw["seeds"]) if "seeds" in raw else list(DEFAULT_SEEDS)
    study = Study(rows, seeds, rows[0].label, _overrides(raw.get("overrides"), "overrides"))
    if "baseline" in raw:
        study.baseline = raw["baseline"]
    return check(study)


def select_rows(study: Study, labels: list[str]) -> list[Row]:
    """The study's rows named in ``labels`` (``--rows``), in the study's order; the baseline must be one of them,
    as the table's paired differences subtract it."""
    known = study.labels()
    unknown = [lab for lab in labels if lab not in known]
    if unknown:
        raise ConfigError("--rows", " ".join(unknown), f"row labels of the study: {', '.join(known)}")
    if study.baseline not in labels:
        raise ConfigError(
            "--rows", " ".join(labels), f"a selection that includes the baseline row '{study.baseline}' "
            "(the paired differences subtract it), or --baseline one of them",
        )  # fmt: skip
    return [r for r in study.rows if r.label in labels]


def from_configs(paths: list[str], seeds: list[int] | None) -> Study:
    """One row per config file, labelled by the file's name (without .yaml)."""
    rows = []
    for p in paths:
        path = Path(p)
        if not path.is_file():
            raise ConfigError("config", p, "no such file")
        rows.append(Row(path.stem, path))
    return check(Study(rows, list(seeds or DEFAULT_SEEDS), rows[0].label))


def check(study: Study) -> Study:
    labels = study.labels()
    dupes = sorted({lab for lab in labels if labels.count(lab) > 1})
    if dupes:
        raise ConfigError(
            "label",
            dupes[0],
            "row labels must be unique (two config files of the same name? use a study file with labels)",
        )
    study.seeds = _seeds(study.seeds)
    if study.baseline not in labels:
        raise ConfigError("baseline", study.baseline, f"one of the row labels: {', '.join(labels)}")
    slugs = [r.slug for r in study.rows]
    if len(set(slugs)) != len(slugs):
        raise ConfigError(
            "label", labels, "labels must stay distinct as folder names (letters, digits, . _ -)"
        )
    return study
