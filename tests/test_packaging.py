"""kdray as a user installs it: ``python -m build`` makes a wheel and an sdist, and the wheel installed into a fresh
venv gives a working ``kdray`` that reads nothing from this repository (run from an empty folder, on a config written
there). The fresh venv borrows this environment's installed packages through a ``.pth`` file (so torch is not
downloaded again) and gets kdray itself only from the wheel (``pip install --no-deps --no-index``)."""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
import venv
import zipfile
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO, TINY

pytestmark = pytest.mark.slow


def _run(*cmd: str, cwd: Path, env: dict | None = None) -> str:
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"{' '.join(cmd)}\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}"
    return done.stdout


def test_the_wheel_installs_into_a_fresh_venv_and_runs_outside_the_repo(tmp_path):
    dist = tmp_path / "dist"
    # --no-isolation: this environment's setuptools and build, nothing fetched
    _run(sys.executable, "-m", "build", "--no-isolation", "--outdir", str(dist), str(REPO), cwd=tmp_path)
    (wheel,) = dist.glob("kdray-*.whl")
    assert len(list(dist.glob("kdray-*.tar.gz"))) == 1
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        meta = zf.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    assert "kdray/exporter.py" in names and "kdray/models/timm_models.py" in names
    assert not [n for n in names if n.startswith(("tests/", "configs/"))]
    assert "License-Expression: Apache-2.0" in meta
    assert "Requires-Dist: torch<=2.14.1,>=2.6" in meta and "Provides-Extra: onnx" in meta

    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)
    py = env_dir / "bin" / "python"
    purelib = Path(
        _run(str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])", cwd=tmp_path).strip()
    )
    # this environment's packages (torch, ray, mlflow, ...) after the venv's own; its .pth files are not processed,
    # so an editable kdray of this repository is not importable; its metadata is visible, hence --ignore-installed
    # (which installs beside it and never touches this environment)
    (purelib / "borrowed.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    _run(
        str(py),
        "-m",
        "pip",
        "install",
        "--quiet",
        "--no-deps",
        "--no-index",
        "--ignore-installed",
        str(wheel),
        cwd=tmp_path,
    )

    work = tmp_path / "work"  # no configs/, no tune_spaces/, no data/ here
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["PATH"] = f"{env_dir / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    kdray = str(env_dir / "bin" / "kdray")
    where = _run(str(py), "-c", "import kdray; print(kdray.__file__)", cwd=work, env=env)
    assert where.startswith(str(purelib)), where  # the wheel's kdray, not this repository's
    assert "export" in _run(kdray, "--help", cwd=work, env=env)
    assert "dml" in _run(kdray, "methods", cwd=work, env=env)
    assert "resnet8" in _run(kdray, "models", cwd=work, env=env)
    (work / "tiny.yaml").write_text(yaml.safe_dump(TINY))
    _run(kdray, "train", "tiny.yaml", "--out", "runs/tiny", cwd=work, env=env)
    out = _run(
        kdray,
        "export",
        "runs/tiny",
        "--peer",
        "peer0",
        "--format",
        "onnx",
        "--out",
        "peer0.onnx",
        cwd=work,
        env=env,
    )
    assert "checked on 64 test inputs" in out and (work / "peer0.onnx").stat().st_size > 0
