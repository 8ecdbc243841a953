"""Fixtures of the fault battery: a real checkpoint to damage, tiny configs written as YAML, the CLI in-process and
as a real process (``python -m kdray``)."""

from __future__ import annotations

import copy
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from tests.conftest import (
    TINY,
)  # tests/conftest.py: the tiny synthetic population (by package: conftest names clash)

REPO = Path(__file__).resolve().parents[2]
HOOKS = Path(__file__).resolve().parent / "hooks"


# A line Ray's log monitor forwards to its driver, "(raylet) ..." or "(pid=N) ...", colour codes or not. A Ray
# cluster another test of this session started may still run, with this pytest process as its driver: its daemons'
# warnings (a nearly full disk, once, in CI) land on the stderr captured here, but they are not the CLI's output.
RAY_FORWARDED = re.compile(r"^(\x1b\[[0-9;]*m)*\((raylet|pid=\d+|\w+ pid=\d+)(, [^)]*)?\)")


def without_ray_forwarded(err: str) -> str:
    """``err`` less the lines Ray forwarded from a cluster's daemons (see ``RAY_FORWARDED``)."""
    return "".join(line for line in err.splitlines(keepends=True) if not RAY_FORWARDED.match(line))


def tiny(**train) -> dict:
    """The tiny population of tests/conftest.py, with ``train`` keys changed."""
    raw = copy.deepcopy(TINY)
    raw["train"].update(train)
    return raw


def write_yaml(path: Path, raw: dict) -> Path:
    path.write_text(yaml.safe_dump(raw))
    return path


def env(**extra: str) -> dict[str, str]:
    """A subprocess environment: one torch thread (the in-process tests run with one, and float32 results depend
    on the thread count), the fault hooks importable when ``KDRAY_FAULT`` is set."""
    out = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **extra}
    out.pop("PYTEST_CURRENT_TEST", None)  # MLflow checks its sessions' flags under pytest
    if "KDRAY_FAULT" in extra:
        out["PYTHONPATH"] = os.pathsep.join([str(HOOKS), out.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return out


def kdray_proc(*args, **popen) -> subprocess.Popen:
    """``python -m kdray ARGS`` started in the repository, stdout and stderr piped as text."""
    popen.setdefault("env", env())
    return subprocess.Popen(
        [sys.executable, "-m", "kdray", *map(str, args)], cwd=REPO, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True, **popen,
    )  # fmt: skip


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory) -> Path:
    """A finished 1-epoch run of the tiny population (2 steps): its checkpoints/last.pt is the fuzz's real file."""
    import kdray

    out = tmp_path_factory.mktemp("trained") / "run"
    kdray.train(tiny(steps_per_epoch=2), out=out)
    return out


@pytest.fixture(scope="session")
def tiny_config(tmp_path_factory) -> Path:
    """A valid config file (for ``kdray tune CONFIG --space FILE``: the space is what is read)."""
    return write_yaml(tmp_path_factory.mktemp("config") / "tiny.yaml", tiny())


RESUMABLE = {
    "epochs": 2,
    "checkpoint_every_steps": 2,
}  # 6 steps an epoch: checkpoints at steps 2, 4, 6 (end), 8...


@pytest.fixture(scope="session")
def resumable_config(tmp_path_factory) -> Path:
    """The tiny population over 2 epochs with a checkpoint every 2 steps, ``train.progress: false``."""
    return write_yaml(tmp_path_factory.mktemp("resumable") / "resumable.yaml", tiny(**RESUMABLE))


@pytest.fixture(scope="session")
def reference(tmp_path_factory, resumable_config) -> dict:
    """The uninterrupted run every interrupted one must equal, as a real process: its run folder, and each line it
    printed with whether the process was still running when the line was read (``train.progress: false``)."""
    out = tmp_path_factory.mktemp("reference") / "run"
    proc = kdray_proc("train", resumable_config, "--out", out)
    lines = []
    try:
        for line in proc.stdout:
            lines.append((line.rstrip("\n"), proc.poll() is None))
        err = proc.stderr.read()
        proc.wait(timeout=300)
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    return {"out": out, "lines": lines}


def assert_same_population(got: dict, want: dict) -> None:
    """Every tensor of every peer (network, method state, optimizers, per-sample buffers) equal bit for bit, and
    the per-epoch metrics (timings aside) equal."""

    def walk(a, b, where):
        if isinstance(a, dict):
            assert isinstance(b, dict) and a.keys() == b.keys(), where
            for k in a:
                walk(a[k], b[k], f"{where}.{k}")
        elif isinstance(a, (list, tuple)):
            assert isinstance(b, (list, tuple)) and len(a) == len(b), where
            for i, (x, y) in enumerate(zip(a, b)):
                walk(x, y, f"{where}[{i}]")
        elif isinstance(a, torch.Tensor):
            assert isinstance(b, torch.Tensor) and torch.equal(a, b), where
        else:
            assert a == b, where

    walk(got["peers"], want["peers"], "peers")
    assert (got["epoch"], got["step"]) == (want["epoch"], want["step"])

    def untimed(history):
        return [
            {k: v for k, v in h.items() if not (k.endswith("_ms") or "ms_per_step" in k)} for h in history
        ]

    assert untimed(got["history"]) == untimed(want["history"])


@pytest.fixture(scope="module", autouse=True)
def _faults_report(request):
    """After each module, one JSON row per category of its ``CATEGORIES`` (tried / survived / lost) appended to
    ``$KDRAY_FAULTS_REPORT`` when set, labelled with the module's ``REPORT_LABEL``."""
    yield
    target = os.environ.get("KDRAY_FAULTS_REPORT")
    categories = getattr(request.module, "CATEGORIES", None)
    if target and categories:
        with open(target, "a") as fh:
            for category, counts in sorted(categories.items()):
                row = {"file": request.module.REPORT_LABEL, "category": category, **counts}
                fh.write(json.dumps(row) + "\n")
