"""A full disk while a checkpoint is written: the previous checkpoint stays intact and loadable, the error is one
line naming the file and saying the disk is full (exit code 2, no traceback), and the run resumes exactly.

The disk fills (ENOSPC) inside :func:`kdray.checkpoint.write_atomic`, at each of the points a real file system can
report it: creating the temporary file, writing it (half of it on disk), and at the fsync (delayed allocation).
"""

from __future__ import annotations

import errno
import os
from collections import Counter

import pytest

import kdray.checkpoint as ck
from kdray.checkpoint import load_checkpoint
from kdray.cli import main

from .conftest import assert_same_population

CATEGORIES: dict[str, Counter] = {}
REPORT_LABEL = "disk"  # the "file" of this module's rows in $KDRAY_FAULTS_REPORT


def full_disk_at(point: str, nth: int):
    """An ``os`` for kdray.checkpoint whose ``nth`` write of a last.pt fails with ENOSPC at ``point``."""
    state = {"count": 0}
    real_mkstemp = ck.tempfile.mkstemp

    def enospc():
        return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    class HalfFull:
        def __init__(self, fh):
            self.fh = fh

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return self.fh.__exit__(*exc)

        def write(self, data):
            self.fh.write(data[: len(data) // 2])
            raise enospc()

        def __getattr__(self, name):
            return getattr(self.fh, name)

    class Os:
        def __getattr__(self, name):
            return getattr(os, name)

        def fdopen(self, *args, **kwargs):
            fh = os.fdopen(*args, **kwargs)
            return HalfFull(fh) if point == "write" and state["count"] == nth else fh

        def fsync(self, fd):
            if point == "fsync" and state["count"] == nth and not os.path.isdir(f"/proc/self/fd/{fd}"):
                raise enospc()
            return os.fsync(fd)

    def mkstemp(*args, prefix="", **kwargs):
        if prefix.startswith(".last.pt."):
            state["count"] += 1
            if point == "mkstemp" and state["count"] == nth:
                raise enospc()
        return real_mkstemp(*args, prefix=prefix, **kwargs)

    return Os(), mkstemp


@pytest.mark.parametrize("point", ["mkstemp", "write", "fsync"])
def test_disk_full_keeps_the_previous_checkpoint_and_resumes(
    tmp_path, capsys, monkeypatch, resumable_config, reference, point
):
    out = tmp_path / "run"
    fake_os, mkstemp = full_disk_at(point, nth=4)  # the 4th last.pt: the mid-epoch checkpoint at step 8
    monkeypatch.setattr(ck, "os", fake_os)
    monkeypatch.setattr(ck.tempfile, "mkstemp", mkstemp)
    ok = False
    try:
        capsys.readouterr()
        code = main(["train", str(resumable_config), "--out", str(out)])
        err = capsys.readouterr().err
        monkeypatch.undo()  # the disk has room again
        assert code == 2, err
        lines = err.strip().splitlines()
        assert len(lines) == 1 and "Traceback" not in err, err
        last = out / "checkpoints" / "last.pt"
        assert lines[0].startswith(f"kdray: error: cannot write {last}: the disk is full"), lines[0]
        assert load_checkpoint(last)["step"] == 6  # the previous checkpoint (end of epoch 1), intact
        assert not [p.name for p in last.parent.iterdir() if p.name.endswith(".tmp")]
        capsys.readouterr()
        assert main(["train", "--resume", str(out)]) == 0, capsys.readouterr().err
        assert_same_population(
            load_checkpoint(last), load_checkpoint(reference["out"] / "checkpoints" / "last.pt")
        )
        ok = True
    finally:
        c = CATEGORIES.setdefault(f"disk full at {point} of a checkpoint", Counter())
        c["tried"] += 1
        c["survived" if ok else "lost"] += 1
