"""`kdray submit`: what it sends to the Jobs API, what it refuses before sending, and how it reports the job's end.

The real Jobs API is exercised end to end in test_e2e_cluster.py; here a fake client stands in for it.
"""

from __future__ import annotations

import os
import shlex
import zipfile
from pathlib import Path

import pytest
import yaml

from kdray.cli import main
from kdray.cluster import submit as submit_mod
from kdray.cluster.submit import WORKING_DIR_EXCLUDES, build_entrypoint, build_runtime_env, submit_job
from kdray.errors import ConfigError, KdrayError

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def workdir(tmp_path: Path, tiny_raw: dict) -> Path:
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "tiny.yaml").write_text(yaml.safe_dump(tiny_raw))
    return tmp_path


class FakeJobs:
    """The parts of ``JobSubmissionClient`` that ``submit_job`` uses."""

    def __init__(self, final: str = "SUCCEEDED", message: str = ""):
        self.final, self.message, self.submitted = final, message, []

    def submit_job(self, entrypoint, runtime_env, submission_id=None):
        self.submitted.append({"entrypoint": entrypoint, "runtime_env": runtime_env})
        return submission_id or "raysubmit_fake"

    async def tail_job_logs(self, job_id):
        for line in ("epoch 1/1\n", "done in 1.0 s\n"):
            yield line

    def get_job_status(self, job_id):
        return self.final

    def get_job_info(self, job_id):
        return type("Info", (), {"message": self.message})()


@pytest.fixture
def fake_jobs(monkeypatch) -> FakeJobs:
    fake = FakeJobs()
    monkeypatch.setattr(submit_mod, "_client", lambda address: fake)
    return fake


def test_entrypoint_round_trips_through_the_shell() -> None:
    entry = build_entrypoint(
        "configs/my run.yaml", ["method.name=dml", "peers.0.arch=resnet 8"], "/mnt/kdray/runs/a"
    )
    assert shlex.split(entry) == [
        "python", "-m", "kdray", "train", "configs/my run.yaml",
        "--set", "method.name=dml", "--set", "peers.0.arch=resnet 8", "--out", "/mnt/kdray/runs/a",
    ]  # fmt: skip


def test_runtime_env_ships_code_not_environments_or_outputs(tmp_path: Path) -> None:
    """Ray's own packaging, given our excludes, keeps the code and drops venvs, runs, data, checkpoints, caches."""
    from ray._private.runtime_env.packaging import create_package

    for rel in (
        "kdray/__init__.py", "kdray/data/loader.py", "configs/a.yaml", "pyproject.toml",
        ".venv/lib/torch.so", "runs/x/summary.json", "data/FashionMNIST/raw/t.gz", "mlartifacts/1/a.png",
        "kdray/__pycache__/x.pyc", "ckpt/best.pt", "mlflow.db", ".git/HEAD", ".gpudata/fmnist/t10k.gz",
    ):  # fmt: skip
        (tmp_path / "wd" / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "wd" / rel).write_text("x")
    env = build_runtime_env(tmp_path / "wd")
    assert env["excludes"] == WORKING_DIR_EXCLUDES and "pip" not in env
    assert env["env_vars"] == {"PYTHONUNBUFFERED": "1"}
    zip_path = tmp_path / "pkg.zip"
    create_package(str(tmp_path / "wd"), zip_path, include_gitignore=True, excludes=env["excludes"])
    shipped = {n for n in zipfile.ZipFile(zip_path).namelist() if not n.endswith("/")}
    assert shipped == {"kdray/__init__.py", "kdray/data/loader.py", "configs/a.yaml", "pyproject.toml"}


def test_with_deps_adds_the_pins_but_not_ray() -> None:
    """--with-deps pins each of kdray's requirements to the version installed here (pyproject declares ranges)."""
    from importlib.metadata import version

    pip = build_runtime_env(".", pip=["einops==0.8.0"], with_deps=True)["pip"]["packages"]
    for name in ("torch", "mlflow", "optuna"):
        assert f"{name}=={version(name)}" in pip
    assert not [p for p in pip if p.startswith("ray")]
    assert pip[-1] == "einops==0.8.0"


def test_submit_and_follow_until_success(workdir: Path, fake_jobs: FakeJobs, capsys) -> None:
    rc = submit_job(
        "127.0.0.1:8265", str(workdir / "configs" / "tiny.yaml"), ["train.epochs=2"], out="/mnt/kdray/runs/t",
        working_dir=workdir, env=["NCCL_DEBUG=INFO"], job_id="kd-1",
    )  # fmt: skip
    assert rc == 0
    (sent,) = fake_jobs.submitted
    assert sent["entrypoint"] == (
        "python -m kdray train configs/tiny.yaml --set train.epochs=2 --out /mnt/kdray/runs/t"
    )
    assert sent["runtime_env"]["working_dir"] == str(workdir)
    assert sent["runtime_env"]["env_vars"]["NCCL_DEBUG"] == "INFO"
    out = capsys.readouterr().out
    assert "submitted job kd-1 to http://127.0.0.1:8265" in out
    assert "done in 1.0 s" in out and out.rstrip().endswith("job kd-1 SUCCEEDED")


def test_ray_engine_attaches_to_the_jobs_cluster(workdir: Path, fake_jobs: FakeJobs) -> None:
    cfg = str(workdir / "configs/tiny.yaml")
    assert submit_job("h:8265", cfg, ["engine.name=ray"], working_dir=workdir, wait=False) == 0
    assert fake_jobs.submitted[-1]["entrypoint"].endswith(
        "--set engine.name=ray --set engine.session.address=auto"
    )
    submit_job(
        "h:8265",
        cfg,
        ["engine.name=ray", "engine.session.address=10.0.0.1:6379"],
        working_dir=workdir,
        wait=False,
    )
    assert "auto" not in fake_jobs.submitted[-1]["entrypoint"]
    submit_job("h:8265", cfg, working_dir=workdir, wait=False)  # engine.name=local: nothing to attach
    assert "engine.session.address" not in fake_jobs.submitted[-1]["entrypoint"]


def test_failed_job_exits_1_with_ray_message(workdir: Path, fake_jobs: FakeJobs, capsys) -> None:
    fake_jobs.final, fake_jobs.message = "FAILED", "Job entrypoint command failed with exit code 2"
    assert submit_job("http://h:8265", str(workdir / "configs/tiny.yaml"), working_dir=workdir) == 1
    assert "FAILED: Job entrypoint command failed with exit code 2" in capsys.readouterr().err


def test_no_wait_returns_after_submitting(workdir: Path, fake_jobs: FakeJobs, monkeypatch, capsys) -> None:
    monkeypatch.chdir(workdir)
    assert main(["submit", "--address", "http://h:8265", "configs/tiny.yaml", "--no-wait"]) == 0
    out = capsys.readouterr().out
    assert "submitted job raysubmit_fake" in out and "epoch" not in out


def test_bad_config_is_refused_before_any_connection(workdir: Path, monkeypatch) -> None:
    monkeypatch.setattr(submit_mod, "_client", lambda address: pytest.fail("must not connect"))
    with pytest.raises(ConfigError, match="train.epoch"):
        submit_job(
            "http://h:8265", str(workdir / "configs/tiny.yaml"), ["train.epoch=2"], working_dir=workdir
        )


def test_config_must_travel_with_the_job(workdir: Path, tmp_path_factory, fake_jobs) -> None:
    outside = tmp_path_factory.mktemp("elsewhere") / "x.yaml"
    outside.write_text((workdir / "configs/tiny.yaml").read_text())
    with pytest.raises(KdrayError, match="outside --working-dir"):
        submit_job("http://h:8265", str(outside), working_dir=workdir)
    with pytest.raises(KdrayError, match="no such file"):
        submit_job("http://h:8265", str(workdir / "nope.yaml"), working_dir=workdir)


def test_address_is_required(workdir: Path, monkeypatch, capsys) -> None:
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.delenv("RAY_API_SERVER_ADDRESS", raising=False)
    monkeypatch.chdir(workdir)
    assert main(["submit", "configs/tiny.yaml"]) == 2
    assert "give --address http://HEAD:8265" in capsys.readouterr().err


def test_unreachable_cluster_is_named(workdir: Path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(workdir)
    assert main(["submit", "--address", "http://127.0.0.1:9", "configs/tiny.yaml"]) == 2
    err = capsys.readouterr().err
    assert (
        "cannot reach the Ray Jobs API at http://127.0.0.1:9" in err and "ray dashboard cluster.yaml" in err
    )


def test_timeout_stops_following_not_the_job(workdir: Path, fake_jobs: FakeJobs, monkeypatch, capsys) -> None:
    import asyncio

    async def silent(job_id):
        await asyncio.sleep(3600)
        yield ""

    monkeypatch.setattr(fake_jobs, "tail_job_logs", silent)
    fake_jobs.final = "RUNNING"
    assert submit_job("h:8265", str(workdir / "configs/tiny.yaml"), working_dir=workdir, timeout_s=0.5) == 1
    assert "still RUNNING after 0.5 s; it goes on" in capsys.readouterr().out


def test_a_kept_local_ray_is_not_taken_for_the_jobs_api(workdir: Path, monkeypatch, capsys) -> None:
    """With `kdray ray start` running, `kdray submit` without --address must still ask for the Jobs API's address:
    the kept Ray's RAY_ADDRESS is its GCS (host:port), which the Jobs client cannot use."""
    import kdray.engines.ray_service as service

    monkeypatch.setattr(service, "running", lambda: {"address": "127.0.0.1:6399", "token": "t", "pid": 1})
    for key in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setattr(submit_mod, "_client", lambda address: pytest.fail(f"must not connect to {address}"))
    monkeypatch.chdir(workdir)
    assert main(["submit", "configs/tiny.yaml"]) == 2
    assert "give --address" in capsys.readouterr().err
    assert "RAY_ADDRESS" not in os.environ
