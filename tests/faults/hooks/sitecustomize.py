"""Test-only faults for ``python -m kdray`` processes started by tests/faults (never part of kdray: the tests put
this folder on PYTHONPATH, and nothing happens unless ``KDRAY_FAULT`` is set).

``KDRAY_FAULT``:

- ``pause-write:N``: the N-th write of a ``last.pt`` writes half its bytes to its temporary file, then touches
  ``KDRAY_FAULT_MARKER`` and sleeps (the test kills the process there: killed while writing a checkpoint);
- ``pause-replace:N``: the N-th write of a ``last.pt`` is written and fsync'ed to its temporary file, then the
  process touches the marker and sleeps before the rename;
- ``barrier:N``: every process waits, just before it opens the tracking store, until N processes have reached that
  point (files in ``KDRAY_FAULT_DIR``): runs started at once meet the new store at the same instant;
- ``hold-epochs:E1,E2,...``: once the metrics of epoch E have been handed to the tracker, the process touches
  ``KDRAY_FAULT_DIR/held-E`` and waits for ``KDRAY_FAULT_DIR/go-E`` (the test stops or starts a tracking server
  meanwhile).
"""

from __future__ import annotations

import os
import time
from pathlib import Path


def _touch_marker() -> None:
    Path(os.environ["KDRAY_FAULT_MARKER"]).write_text(str(os.getpid()))


def _install_pause(kind: str, nth: int) -> None:
    import kdray.checkpoint as ck

    state = {"count": 0, "armed": False}
    real_write_atomic = ck.write_atomic

    def write_atomic(path, data):
        if Path(path).name == "last.pt":
            state["count"] += 1
            state["armed"] = state["count"] == nth
        try:
            return real_write_atomic(path, data)
        finally:
            state["armed"] = False

    class HalfWritten:
        def __init__(self, fh):
            self.fh = fh

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return self.fh.__exit__(*exc)

        def write(self, data):
            self.fh.write(data[: len(data) // 2])
            self.fh.flush()
            os.fsync(self.fh.fileno())
            _touch_marker()
            time.sleep(600)

        def __getattr__(self, name):
            return getattr(self.fh, name)

    class Os:
        """``os`` as kdray.checkpoint sees it, with the pause at the asked point."""

        def __getattr__(self, name):
            return getattr(os, name)

        def fdopen(self, *args, **kwargs):
            fh = os.fdopen(*args, **kwargs)
            return HalfWritten(fh) if state["armed"] and kind == "pause-write" else fh

        def replace(self, src, dst):
            if state["armed"] and kind == "pause-replace":
                _touch_marker()
                time.sleep(600)
            return os.replace(src, dst)

    ck.write_atomic = write_atomic
    ck.os = Os()


def _install_barrier(n: int) -> None:
    import kdray.tracking as tr

    folder = Path(os.environ["KDRAY_FAULT_DIR"])
    real_check = tr.Tracker.check

    def check(self):
        folder.mkdir(parents=True, exist_ok=True)
        (folder / str(os.getpid())).touch()
        deadline = time.monotonic() + 120
        while len(list(folder.iterdir())) < n and time.monotonic() < deadline:
            time.sleep(0.01)
        return real_check(self)

    tr.Tracker.check = check


def _install_hold(epochs: set[int]) -> None:
    import kdray.tracking as tr

    folder = Path(os.environ["KDRAY_FAULT_DIR"])
    real_log_metrics = tr.Tracker.log_metrics

    def log_metrics(self, metrics, step):
        real_log_metrics(self, metrics, step)
        if step in epochs and any(
            k.endswith("/val_acc") for k in metrics
        ):  # an epoch's metrics, not a step's
            epochs.discard(step)
            folder.mkdir(parents=True, exist_ok=True)
            (folder / f"held-{step}").touch()
            deadline = time.monotonic() + 300
            while not (folder / f"go-{step}").exists() and time.monotonic() < deadline:
                time.sleep(0.01)

    tr.Tracker.log_metrics = log_metrics


def _install() -> None:
    kind, _, arg = os.environ["KDRAY_FAULT"].partition(":")
    if kind in ("pause-write", "pause-replace"):
        _install_pause(kind, int(arg))
    elif kind == "barrier":
        _install_barrier(int(arg))
    elif kind == "hold-epochs":
        _install_hold({int(e) for e in arg.split(",")})
    else:
        raise SystemExit(f"tests/faults/hooks: unknown KDRAY_FAULT {kind!r}")


if os.environ.get("KDRAY_FAULT"):
    _install()
