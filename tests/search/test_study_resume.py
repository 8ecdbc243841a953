"""A study whose driver is killed (SIGKILL, no chance to clean up) continues with ``--resume``: finished trials are
kept as they were, the interrupted one continues from its own checkpoint, the MLflow parent run is reused."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from kdray.cli import main

pytestmark = [pytest.mark.ray, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]


def _progress(out: Path) -> dict:
    try:
        return json.loads((out / "progress.json").read_text())
    except (OSError, ValueError):
        return {}


def test_killed_study_resumes_without_rerunning_finished_trials(ray_local, tiny_raw, tmp_path):
    tiny_raw["train"]["epochs"] = 3
    # epochs of ~3 s (64 steps): the trial seen running at epoch 1 is still running when the driver is killed
    tiny_raw["data"]["synthetic"]["train_len"] = 1024
    tiny_raw["tracking"] = {"enabled": True}
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(yaml.safe_dump(tiny_raw))
    space = tmp_path / "space.yaml"
    space.write_text(
        yaml.safe_dump({"params": {"method.weights.kl": {"dist": "loguniform", "low": 0.1, "high": 10}}})
    )
    out = tmp_path / "runs" / "study"
    # The driver attaches to this session's Ray (saves starting one); killing it ends its job and the job's actors.
    # RAY_AUTH_MODE as the session's Ray left it (on with Ray 2.60, off with 2.55)
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    driver = subprocess.Popen(
        [sys.executable, "-m", "kdray", "tune", str(cfg), "--space", str(space), "--samples", "3",
         "--scheduler", "fifo", "--max-concurrent", "1", "--out", str(out), "--address", str(ray_local)],
        cwd=REPO, env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        # generous: on two loaded cores the driver's first trial has taken minutes to start, and a CI run that shared
        # the cores with two training processes saw no trial start within 600 s (the loop ends early)
        deadline = time.time() + 1200
        while time.time() < deadline:
            prog = _progress(out)
            done = [k for k, v in prog.items() if v["status"] == "finished"]
            running = [k for k, v in prog.items() if v["status"] == "running" and (v.get("epoch") or 0) >= 1]
            if done and running:
                break
            assert driver.poll() is None, "the driver ended before it could be killed"
            time.sleep(0.2)
        else:
            pytest.fail(f"no finished + running trial within 1200 s: {prog}")
        time.sleep(1.5)  # Tune keeps its resumable state at most 1 s old
    finally:
        os.killpg(driver.pid, signal.SIGKILL)  # the driver we started, nothing else
        driver.wait()
    before = json.loads((out / "study.json").read_text())
    assert before["status"] == "running"
    finished_before = {
        k: (out / "trials" / k / "history.jsonl").read_text()
        for k, v in _progress(out).items()
        if v["status"] == "finished"
    }
    interrupted = running[0]

    assert main(["tune", "--resume", str(out)]) == 0
    after = json.loads((out / "study.json").read_text())
    trials = {t["trial_id"]: t for t in after["trials"]}
    assert after["status"] == "finished" and len(trials) == 3
    assert all(t["status"] == "finished" for t in trials.values())
    for trial_id, history in finished_before.items():
        assert trials[trial_id]["incarnations"] == 1  # not run again
        assert (out / "trials" / trial_id / "history.jsonl").read_text() == history
    resumed = json.loads((out / "trials" / interrupted / "status.json").read_text())["incarnations"]
    assert len(resumed) == 2 and resumed[1]["resumed"]["kind"] == "own"
    epochs = [r["epoch"] for r in trials[interrupted]["history"] if not r.get("superseded")]
    assert epochs == [1, 2, 3]  # continued from its checkpoint: each epoch once

    assert after["mlflow"]["parent_run_id"] == before["mlflow"]["parent_run_id"]
    assert after["mlflow"]["children"] == 3  # one nested run per trial, none duplicated by the restart


def test_a_trial_of_data_parallel_peers_resumes_from_its_own_checkpoint(ray_local, tiny_raw, tmp_path):
    """A trial of a K x M population (2 peers x 2 workers; the trial is the Ray Train driver) resumes from its own
    Tune checkpoint like any trial. The trial trains its 2 epochs, keeping the checkpoint it reported after epoch 1
    (what Tune hands back when the study driver died there); the next incarnation resumes from it ('own'), trains
    epoch 2 only, and ends where the uninterrupted trial ended (float64)."""
    import torch
    from ray.tune import Checkpoint

    from kdray.checkpoint import copy_checkpoint, is_manifest, load_checkpoint
    from kdray.config import load_config
    from kdray.search.trial import CHECKPOINT_FILE, TRIAL_META, TrialPlan, _train_trial

    raw = tiny_raw
    raw["peers"] = [
        {"name": f"p{k}", "arch": "resnet8", "arch_kwargs": {"width": 4}, "workers": 2} for k in (0, 1)
    ]
    raw["train"].update(epochs=2, steps_per_epoch=3, threads=1, dtype="float64")
    raw["engine"] = {"name": "ray", "placement": {"cpus_per_peer": 0.5}}
    cfg = load_config(raw)
    out, tune_checkpoint = tmp_path / "study" / "trials" / "t1", tmp_path / "tune_checkpoint"
    plan = TrialPlan("study", str(tmp_path / "study"), raw, (), "objective")

    class Reporter:  # the trial's epoch callback, without Tune: keeps epoch 1's checkpoint as Tune would
        def __init__(self):
            self.final, self.epochs = None, []

        def __call__(self, metrics, checkpoint_path):
            self.epochs.append(int(metrics["epoch"]))
            if self.epochs[-1] == 1:
                tune_checkpoint.mkdir()
                # as the trial's reporter does: one file, even from the workers' per-process parts
                copy_checkpoint(checkpoint_path, tune_checkpoint / CHECKPOINT_FILE)
                (tune_checkpoint / TRIAL_META).write_text(json.dumps({"trial_id": "t1", "epoch": 1}))

    first = Reporter()
    uninterrupted = _train_trial(None, cfg, out, first, plan, "t1", {}, [{}])
    assert first.epochs == [1, 2]
    # the trial's reporter reads last.pt in the driver while the workers go on: auto gathers one file per checkpoint
    assert uninterrupted.summary["ray"]["checkpoint_writes"] == "gather"
    assert not is_manifest(uninterrupted.checkpoint) and not is_manifest(tune_checkpoint / CHECKPOINT_FILE)
    ended = load_checkpoint(uninterrupted.checkpoint)
    second, incarnations = Reporter(), [{}]
    resumed = _train_trial(Checkpoint.from_directory(str(tune_checkpoint)), cfg, out, second, plan, "t1", {},
                           incarnations)  # fmt: skip
    assert incarnations[-1]["resumed"]["kind"] == "own" and second.epochs == [2]
    again = load_checkpoint(resumed.checkpoint)
    assert again["epoch"] == 2 and again["mlflow_run_id"] == ended["mlflow_run_id"]
    placement = json.loads((out / "ray_run.json").read_text())["placement"]
    assert [w["shard"] for w in placement] == ["1/2", "2/2", "1/2", "2/2"]
    for name, peer in ended["peers"].items():
        for k, v in peer["net"].items():
            assert torch.allclose(again["peers"][name]["net"][k], v, rtol=0, atol=1e-12), (name, k)
