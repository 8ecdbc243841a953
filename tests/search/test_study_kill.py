"""A study SIGKILLed at seeded random instants (the driver's whole process group, as ``kill -9 -PGID`` would) and
``--resume``d each time finishes with every trial accounted for once: in MLflow one parent run and one nested run
per trial, none left RUNNING, none duplicated; in ``study.json`` the same trials' values and objectives, in the same
order, as a study that was never interrupted (Optuna TPE with a seed, one trial at a time: the search is
deterministic). docs/faults.md has the figures.

The kill instants are drawn from a seeded RNG over the uninterrupted study's measured duration; each is counted from
the start of the process it kills (the first run or a resume), so the kills fall in start-up, inside trials, between
them and while the study writes its outputs.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

pytestmark = [pytest.mark.ray, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
KILLS = 3
SEED = 30


def _tune(args: list[str], address: str) -> subprocess.Popen:
    # RAY_AUTH_MODE as the session's Ray left it: Ray 2.60 turns token authentication on for a new local Ray (in
    # this process's environment too), 2.55 leaves it off
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    env.pop("PYTEST_CURRENT_TEST", None)
    return subprocess.Popen(
        [sys.executable, "-m", "kdray", "tune", *args, *(["--address", address] if "--resume" not in args else [])],
        cwd=REPO, env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


def _finish(proc: subprocess.Popen, timeout: float = 600) -> str:
    _, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, err[-3000:]
    return err


def _kill_after(proc: subprocess.Popen, seconds: float) -> bool:
    """SIGKILL the process group of ``proc`` (a driver this test started) ``seconds`` after it started; False if it
    had finished by then."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        time.sleep(0.05)
    if proc.poll() is not None:
        return False
    os.killpg(proc.pid, signal.SIGKILL)
    proc.communicate()
    return True


def _phase(out: Path) -> str:
    """Where the study stood when it was killed (for the failure messages): trials finished / running."""
    try:
        progress = json.loads((out / "progress.json").read_text())
    except (OSError, ValueError):
        return "start-up" if not (out / "study.json").exists() else "no trial yet"
    status = [v["status"] for v in progress.values()]
    return f"{status.count('finished')} finished, {status.count('running')} running"


def _trials(study_dir: Path) -> list[tuple]:
    study = json.loads((study_dir / "study.json").read_text())
    assert study["status"] == "finished"
    return [(t["status"], t["values"], t["objective"], t["epochs_trained"]) for t in study["trials"]]


def _study_inputs(tiny_raw: dict, tmp_path: Path, experiment: str) -> tuple[Path, Path]:
    """The tiny population's config (tracked in MLflow under ``experiment``) and a one-parameter search space."""
    tiny_raw["tracking"] = {"enabled": True, "experiment": experiment, "log_models": False}
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(yaml.safe_dump(tiny_raw))
    space = tmp_path / "space.yaml"
    space.write_text(
        yaml.safe_dump({"params": {"method.weights.kl": {"dist": "loguniform", "low": 0.1, "high": 10}}})
    )
    return cfg, space


def test_a_study_killed_at_random_instants_resumes_to_the_same_trials(ray_local, tiny_raw, tmp_path):
    tiny_raw["train"]["epochs"] = 2
    tiny_raw["data"]["synthetic"]["train_len"] = 256  # 14 steps an epoch
    cfg, space = _study_inputs(tiny_raw, tmp_path, "killed-study")
    common = [str(cfg), "--space", str(space), "--samples", "3", "--scheduler", "fifo", "--search", "tpe",
              "--seed", "3", "--max-concurrent", "1"]  # fmt: skip

    # the uninterrupted study: the reference, the duration the kill instants are drawn over, and its start-up (from
    # the process's start to its study.json: what a resumed driver spends again before it continues the study)
    reference = tmp_path / "reference" / "study"
    t0 = time.monotonic()
    proc = _tune([*common, "--out", str(reference)], ray_local)
    while not (reference / "study.json").exists() and proc.poll() is None:
        time.sleep(0.05)
    startup = time.monotonic() - t0
    _finish(proc)
    duration = time.monotonic() - t0

    # seeded instants of the study's own clock; the first kills the first driver at its instant, each later one
    # kills a resumed driver once it has spent the start-up again plus the time between the two instants
    out = tmp_path / "killed" / "study"
    rng = random.Random(SEED)
    instants = sorted(rng.uniform(0.05, 0.95) * duration for _ in range(KILLS))
    delays = [instants[0]] + [startup + b - a for a, b in zip(instants, instants[1:])]
    kills = []
    proc = _tune([*common, "--out", str(out)], ray_local)
    for at, delay in zip(instants, delays):
        if not _kill_after(proc, delay):
            break
        kills.append((round(at, 1), _phase(out)))
        # killed before the study wrote its study.json: nothing to resume yet, the same command starts it again
        again = ["--resume", str(out)] if (out / "study.json").exists() else [*common, "--out", str(out)]
        proc = _tune(again, ray_local)
    err = _finish(proc)
    assert kills, f"no kill landed (instants {instants}, the study took {duration:.1f} s)"
    assert "Traceback" not in err
    print(f"study of {duration:.1f} s (start-up {startup:.1f} s) killed at (s, state): {kills}")

    assert _trials(out) == _trials(reference), f"killed at {kills} s"
    study = json.loads((out / "study.json").read_text())
    for t in study["trials"]:
        epochs = [r["epoch"] for r in t["history"] if not r.get("superseded")]
        assert epochs == [1, 2], t["trial_id"]  # each epoch reported once, after the resumes too

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=study["mlflow"]["uri"])
    experiment = client.get_experiment_by_name("killed-study").experiment_id
    runs = client.search_runs([experiment], filter_string=f"tags.`kdray.out` LIKE '{out}%'")
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == study["mlflow"]["parent_run_id"]]
    assert len(children) == 3 and len(runs) == 3, [(r.info.run_name, r.info.status) for r in runs]
    assert sorted(r.data.tags["kdray.trial_id"] for r in children) == sorted(
        t["trial_id"] for t in study["trials"]
    )
    assert {r.info.status for r in children} == {"FINISHED"}
    parents = client.search_runs([experiment], filter_string="tags.`kdray.kind` = 'study'")
    mine = [r for r in parents if r.info.run_name == out.name]
    assert [r.info.run_id for r in mine] == [study["mlflow"]["parent_run_id"]]
    assert mine[0].info.status == "FINISHED"
    # nothing of this study left RUNNING anywhere in the experiment (a killed trial's run is reused or closed)
    running = client.search_runs([experiment], filter_string="attributes.status = 'RUNNING'")
    assert not running, [(r.info.run_name, r.data.tags.get("kdray.out")) for r in running]


def test_two_studies_at_once_on_one_store_both_keep_their_trials(ray_local, tiny_raw, tmp_path):
    """Two ``kdray tune`` drivers started together, their folders under one parent (one new ``mlflow.db``, one
    experiment): both finish, each with its own parent run and one FINISHED nested run per trial."""
    cfg, space = _study_inputs(tiny_raw, tmp_path, "two-studies")
    outs = [tmp_path / "runs" / f"study{i}" for i in range(2)]
    procs = [
        _tune([str(cfg), "--space", str(space), "--samples", "2", "--scheduler", "fifo", "--seed", str(i),
               "--max-concurrent", "1", "--cpus-per-trial", "1", "--out", str(out)], ray_local)
        for i, out in enumerate(outs)
    ]  # fmt: skip
    errors = []
    for p in procs:
        _, err = p.communicate(timeout=600)
        errors.append((p.returncode, err[-2000:]))
    assert [rc for rc, _ in errors] == [0, 0], errors

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("two-studies").experiment_id
    parents = set()
    for out in outs:
        study = json.loads((out / "study.json").read_text())
        assert study["status"] == "finished" and [t["status"] for t in study["trials"]] == ["finished"] * 2
        parent = study["mlflow"]["parent_run_id"]
        parents.add(parent)
        children = client.search_runs([experiment], filter_string=f"tags.`mlflow.parentRunId` = '{parent}'")
        assert sorted(r.data.tags["kdray.trial_id"] for r in children) == sorted(
            t["trial_id"] for t in study["trials"]
        )
        assert {r.info.status for r in children} == {"FINISHED"}
        assert {r.data.tags["kdray.out"] for r in children} == {t["dir"] for t in study["trials"]}
    runs = client.search_runs([experiment])
    assert len(parents) == 2 and len(runs) == 2 + 4
    assert {r.info.status for r in runs} == {"FINISHED"}


def test_ctrl_c_leaves_a_study_interrupted_and_resumable_not_finished(ray_local, tiny_raw, tmp_path):
    """Ctrl-C (SIGINT to the driver's process group) mid-trial: Tune saves its state and returns early; kdray tune
    says how to continue and exits 130, study.json says interrupted (no best trial is named, no best.yaml written)
    and the MLflow parent run is KILLED; --resume then finishes every trial, each epoch reported once."""
    tiny_raw["train"]["epochs"] = 30
    tiny_raw["data"]["synthetic"]["train_len"] = 64
    cfg, space = _study_inputs(tiny_raw, tmp_path, "interrupted-study")
    out = tmp_path / "study"
    proc = _tune([str(cfg), "--space", str(space), "--samples", "2", "--scheduler", "fifo", "--seed", "3",
                  "--max-concurrent", "1", "--out", str(out)], ray_local)  # fmt: skip
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            progress = json.loads((out / "progress.json").read_text())
        except (OSError, ValueError):
            progress = {}
        if any(v.get("status") == "running" and (v.get("epoch") or 0) >= 2 for v in progress.values()):
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the study ended before it could be interrupted"
    os.killpg(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, err[-3000:]
    assert f"kdray tune --resume {out}" in err and "Traceback" not in err
    study = json.loads((out / "study.json").read_text())
    assert study["status"] == "interrupted" and study["unfinished_trials"] >= 1 and study["best"] is None
    assert not (out / "best.yaml").exists()

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=study["mlflow"]["uri"])
    assert client.get_run(study["mlflow"]["parent_run_id"]).info.status == "KILLED"

    _finish(_tune(["--resume", str(out)], ray_local))
    study = json.loads((out / "study.json").read_text())
    assert study["status"] == "finished" and study["best"] is not None and (out / "best.yaml").is_file()
    assert [t["status"] for t in study["trials"]] == ["finished", "finished"]
    for t in study["trials"]:
        assert [r["epoch"] for r in t["history"] if not r.get("superseded")] == list(range(1, 31)), t[
            "trial_id"
        ]
    assert client.get_run(study["mlflow"]["parent_run_id"]).info.status == "FINISHED"
