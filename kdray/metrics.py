"""Training metrics as sums and counts, so every number is the mean over the steps that actually reported it.

A loss term that a phase computes every N steps (AFD's adversarial update with ``adv_every: 2``), or several times a
step (DFAD's student updates), is averaged over its own reports, never over all the steps of the epoch. Values stay
tensors until the epoch ends (no device synchronisation in the hot step); processes add their sums and counts
before dividing.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from torch import Tensor


class MetricSums:
    """``key -> (sum, count)``."""

    def __init__(self, sums: dict[str, Any] | None = None, counts: dict[str, float] | None = None):
        self.sums: dict[str, Any] = dict(sums or {})
        self.counts: dict[str, float] = dict(counts or {})

    def add(self, key: str, value: Tensor | float, count: float = 1) -> None:
        """Record ``count`` reports whose values add up to ``value`` (a fractional count: one process's share of a
        report that several processes make together, e.g. the parts of a shared generator's objective)."""
        value = value.detach() if isinstance(value, Tensor) else value
        if key in self.sums:
            self.sums[key] = self.sums[key] + value
            self.counts[key] += count
        else:
            self.sums[key] = value
            self.counts[key] = count

    def merge(self, other: MetricSums) -> None:
        for key, value in other.sums.items():
            self.add(key, value, other.counts[key])

    def means(self) -> dict[str, float]:
        return {k: float(v) / self.counts[k] for k, v in self.sums.items()}

    def state(self) -> dict[str, Any]:
        """Plain floats and ints (for checkpoints and for gathering over processes)."""
        return {"sums": {k: float(v) for k, v in self.sums.items()}, "counts": dict(self.counts)}

    @classmethod
    def from_state(cls, state: dict[str, Any] | None) -> MetricSums:
        state = state or {}
        return cls(state.get("sums"), state.get("counts"))

    def __bool__(self) -> bool:
        return bool(self.sums)


def merge_states(states: list[dict[str, Any]]) -> dict[str, float]:
    """Means over the sums and counts several processes reported (their keys are disjoint or add up)."""
    total = MetricSums()
    for state in states:
        total.merge(MetricSums.from_state(state))
    return total.means()


def non_finite(metrics: dict[str, float]) -> list[str]:
    return sorted(k for k, v in metrics.items() if isinstance(v, float) and not math.isfinite(v))


STEPS_FILE = "steps.jsonl"  # the run folder's per-step rows (running means every train.log_every_steps)


def read_step_rows(out_dir: Path, upto: int | None = None) -> list[dict[str, Any]]:
    """The per-step rows, one per step (a row written again after a resume replaces the earlier one)."""
    rows: dict[int, dict[str, Any]] = {}
    path = Path(out_dir) / STEPS_FILE
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                row = json.loads(line)
            except ValueError:
                continue  # a line cut short by a kill
            if isinstance(row, dict) and isinstance(row.get("step"), int):
                rows.setdefault(row["step"], {}).update(row)
    return [rows[s] for s in sorted(rows) if upto is None or s <= upto]
