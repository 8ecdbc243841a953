"""A local run killed from outside (SIGKILL) at any point, or stopped (SIGTERM), resumes to exactly the parameters
of a run that was never interrupted; ``train.progress: false`` still prints each epoch's line as it ends.

The kills come from outside, as ``kill -9`` would: inside a step (after the epoch-1 line, or at a random instant
after the first checkpoint), and while a checkpoint is being written (half of it in its temporary file, or all of
it before the rename), the last two through the test-only hooks of ``tests/faults/hooks`` (``KDRAY_FAULT``).
"""

from __future__ import annotations

import os
import random
import signal
import time
from collections import Counter
from pathlib import Path

import pytest

from kdray.checkpoint import load_checkpoint
from kdray.cli import main

from .conftest import RESUMABLE, assert_same_population, env, kdray_proc, tiny, write_yaml

CATEGORIES: dict[str, Counter] = {}
REPORT_LABEL = "kill"  # the "file" of this module's rows in $KDRAY_FAULTS_REPORT


def _count(category: str, survived: bool) -> None:
    c = CATEGORIES.setdefault(category, Counter())
    c["tried"] += 1
    c["survived" if survived else "lost"] += 1


def _wait_for_line(proc, prefix: str, timeout: float = 300) -> list[str]:
    """Lines of stdout up to the first that starts with ``prefix`` (read as they come)."""
    seen, deadline = [], time.monotonic() + timeout
    for line in proc.stdout:
        seen.append(line.rstrip("\n"))
        if line.startswith(prefix):
            return seen
        assert time.monotonic() < deadline, f"no line {prefix!r} in time: {seen}"
    raise AssertionError(f"the process ended before printing {prefix!r}: {seen} {proc.stderr.read()[-2000:]}")


def _wait_for(path: Path, proc, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, f"the process ended first: {proc.stderr.read()[-2000:]}"
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.005)


def _kill_at(proc, moment) -> None:
    """Wait for ``moment()`` to return, then SIGKILL ``proc`` from outside, as ``kill -9`` would, and reap it."""
    try:
        moment()
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        proc.kill()
        proc.communicate()


def _resume_and_compare(capsys, out: Path, reference: dict) -> None:
    """``kdray train --resume OUT`` (in-process: the same code as the CLI, without a second start-up) and the
    result equals the uninterrupted run."""
    capsys.readouterr()
    code = main(["train", "--resume", str(out)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert_same_population(
        load_checkpoint(out / "checkpoints" / "last.pt"),
        load_checkpoint(reference["out"] / "checkpoints" / "last.pt"),
    )
    leftovers = [p.name for p in (out / "checkpoints").iterdir() if p.name.endswith(".tmp")]
    assert not leftovers, f"temporary files of the killed process were left: {leftovers}"


def test_progress_false_prints_each_epoch_line_as_it_ends(reference):
    """The reference run (a real process, ``train.progress: false``): both epoch lines on stdout, the first read
    while epoch 2 was still training."""
    lines = reference["lines"]
    epochs = [(text, alive) for text, alive in lines if text.startswith("epoch ")]
    assert [t.split(":")[0] for t, _ in epochs] == ["epoch 1/2", "epoch 2/2"], lines
    assert epochs[0][1], "the epoch-1 line came only once the process had ended"
    assert "val_acc" in epochs[0][0]


KILLS = {
    "inside a step, after the epoch-1 line": {},
    "at a random instant after the first checkpoint": {},
    "while writing a mid-epoch checkpoint (half of it written)": {"KDRAY_FAULT": "pause-write:4"},
    "after writing the epoch-1 checkpoint, before its rename": {"KDRAY_FAULT": "pause-replace:3"},
}


@pytest.mark.parametrize("when", list(KILLS))
def test_sigkill_then_resume_is_exact(tmp_path, capsys, resumable_config, reference, when):
    out = tmp_path / "run"
    marker = tmp_path / "paused"
    extra = KILLS[when]
    if extra:
        extra = {**extra, "KDRAY_FAULT_MARKER": str(marker)}
    proc = kdray_proc("train", resumable_config, "--out", out, env=env(**extra))

    def moment() -> None:
        if "KDRAY_FAULT" in extra:
            _wait_for(marker, proc)
        elif "random" in when:
            _wait_for(out / "checkpoints" / "last.pt", proc)
            time.sleep(random.Random(os.getpid()).uniform(0.0, 1.5))
        else:
            _wait_for_line(proc, "epoch 1/2")

    _kill_at(proc, moment)
    ok = False
    try:
        last = load_checkpoint(out / "checkpoints" / "last.pt")  # the previous checkpoint, intact
        if "KDRAY_FAULT" in extra:
            assert proc.returncode == -signal.SIGKILL
            want = {"pause-write:4": 6, "pause-replace:3": 4}[extra["KDRAY_FAULT"]]
            assert last["step"] == want, "the checkpoint before the interrupted one"
            assert any(p.name.endswith(".tmp") for p in (out / "checkpoints").iterdir())
        _resume_and_compare(capsys, out, reference)
        ok = True
    finally:
        _count(f"SIGKILL {when}", ok)


def test_sigterm_stops_at_a_safe_point_then_resumes_exactly(tmp_path, capsys, resumable_config, reference):
    out = tmp_path / "run"
    proc = kdray_proc("train", resumable_config, "--out", out)
    ok = False
    try:
        _wait_for_line(proc, "epoch 1/2")
        proc.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=300)
        assert proc.returncode == 130, stderr
        assert "SIGTERM received: stopping at the next safe point" in stdout
        lines = stderr.strip().splitlines()
        assert len(lines) == 1 and "stopped at a safe point" in lines[0], stderr
        assert "Traceback" not in stderr
        assert f"--resume {out}" in lines[0]
        _resume_and_compare(capsys, out, reference)
        ok = True
    finally:
        proc.kill()
        _count("SIGTERM, then --resume", ok)


def test_sigkill_inside_generation_three_resumes_there_exactly(tmp_path, capsys):
    """Born-again generations (stages): a kill inside generation 3 resumes there, without training generations 1
    and 2 again, and ends where an uninterrupted run ends."""
    import kdray

    raw = tiny(**RESUMABLE)
    raw["peers"] = [{"name": "net", "arch": "resnet8", "arch_kwargs": {"width": 4}}]
    raw["method"] = {"name": "independent"}
    raw["generations"] = 3
    raw["tracking"] = {"enabled": False}
    kdray.train(raw, out=tmp_path / "reference")
    out = tmp_path / "run"
    proc = kdray_proc("train", write_yaml(tmp_path / "ban.yaml", raw), "--out", out)
    gen3 = out / "stages" / "gen3" / "checkpoints" / "last.pt"
    _kill_at(proc, lambda: _wait_for(gen3, proc))  # generation 3's first checkpoint (step 2 of 12)
    ok = False
    try:
        assert proc.returncode == -signal.SIGKILL
        done = {
            g: (out / "stages" / g / "checkpoints" / "last.pt").stat().st_mtime_ns for g in ("gen1", "gen2")
        }
        assert load_checkpoint(gen3)["step"] < 12  # killed inside generation 3
        capsys.readouterr()
        assert main(["train", "--resume", str(out)]) == 0, capsys.readouterr().err
        assert {g: (out / "stages" / g / "checkpoints" / "last.pt").stat().st_mtime_ns for g in done} == done
        assert_same_population(
            load_checkpoint(gen3),
            load_checkpoint(tmp_path / "reference" / "stages" / "gen3" / "checkpoints" / "last.pt"),
        )
        ok = True
    finally:
        _count("SIGKILL inside generation 3 of a born-again run", ok)
