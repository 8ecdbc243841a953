"""Helpers shared by test modules (kept out of conftest.py so that they are imported explicitly)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

import kdray


def train_until_stopped(
    raw: dict[str, Any] | None, out: Path, steps_done: int, run: str | None = None
) -> None:
    """Train ``raw`` into ``out`` and ask it to stop, as SIGTERM would, once the run named ``run`` (any run when
    None; a stage's run is ``<name>-<stage>``) has done ``steps_done`` steps. The run must end with ``Stopped``
    at a safe point."""
    import kdray.engines.local_engine as local
    from kdray.loop import Stopped

    original = local.LocalSink.step_done

    def step_done(self, epoch, step_in_epoch, step, metrics):
        original(self, epoch, step_in_epoch, step, metrics)
        if (run is None or self.cfg.name == run) and step + 1 >= steps_done:
            self.engine.stop = lambda: True

    local.LocalSink.step_done = step_done
    try:
        with pytest.raises(Stopped, match="safe point"):
            kdray.train(raw, out=out)
    finally:
        local.LocalSink.step_done = original
