"""Stages: one ``kdray train`` runs a teacher stage then a student stage; a stop inside stage 2 resumes in stage 2."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from mlflow.tracking import MlflowClient

import kdray
from kdray.checkpoint import load_checkpoint
from kdray.errors import ConfigError, KdrayError
from tests.helpers import train_until_stopped


def _staged(tiny_raw) -> dict:
    raw = copy.deepcopy(tiny_raw)
    small = {"arch": "resnet8", "arch_kwargs": {"width": 4}}
    raw.pop("peers")
    raw.pop("method")
    raw["train"].update(epochs=2, steps_per_epoch=3)
    raw["tracking"] = {"enabled": True}
    raw["stages"] = [
        {"name": "teacher", "method": {"name": "independent"}, "peers": [{"name": "net", **small}]},
        {
            "name": "student",
            "method": {"name": "kd", "temperature": 4.0},
            "train": {"checkpoint_every_steps": 1},
            "peers": [
                {"name": "teacher", "frozen": True, "from_stage": "teacher", **small},
                {"name": "student", **small},
            ],
        },
    ]
    return raw


def _parent_and_children(tmp_path, summary: dict):
    """The staged run's MLflow parent run and its nested runs."""
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    parent = client.get_run(summary["mlflow_run_id"])
    children = [
        r for r in client.search_runs([parent.info.experiment_id])
        if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id
    ]  # fmt: skip
    return parent, children


def test_two_stages_in_one_run_nested_in_mlflow(tiny_raw, tmp_path):
    result = kdray.train(_staged(tiny_raw), out=tmp_path / "run")
    out = tmp_path / "run"
    assert result.out_dir == out / "stages" / "student"
    teacher = load_checkpoint(out / "stages" / "teacher" / "checkpoints" / "last.pt")["peers"]["net"]["net"]
    frozen = load_checkpoint(out / "stages" / "student" / "checkpoints" / "last.pt")["peers"]["teacher"][
        "net"
    ]
    assert all(torch.equal(teacher[k], frozen[k]) for k in teacher)  # the teacher is stage 1's final weights
    summary = json.loads((out / "summary.json").read_text())
    assert [s["name"] for s in summary["stages"]] == ["teacher", "student"]
    _, children = _parent_and_children(tmp_path, summary)
    assert sorted(r.info.run_name for r in children) == ["tiny-student", "tiny-teacher"]


def test_a_stop_in_stage_two_resumes_there_without_retraining_stage_one(tiny_raw, tmp_path):
    raw = _staged(tiny_raw)
    train_until_stopped(raw, tmp_path / "run", steps_done=4, run="tiny-student")
    teacher_ckpt = tmp_path / "run" / "stages" / "teacher" / "checkpoints" / "last.pt"
    stamp = teacher_ckpt.stat().st_mtime_ns
    assert load_checkpoint(tmp_path / "run" / "stages" / "student")["progress"]["step_in_epoch"] == 1
    resumed = kdray.train(None, resume=tmp_path / "run")
    assert teacher_ckpt.stat().st_mtime_ns == stamp  # stage 1 was not trained again
    full = kdray.train(raw, out=tmp_path / "full")
    got = load_checkpoint(resumed.checkpoint)["peers"]["student"]["net"]
    want = load_checkpoint(full.checkpoint)["peers"]["student"]["net"]
    assert all(torch.equal(got[k], want[k]) for k in want)  # and stage 2 continued exactly


def test_bad_stage_references_are_refused_before_anything_is_written(tiny_raw, tmp_path):
    raw = _staged(tiny_raw)
    raw["stages"][1]["peers"][0]["from_stage"] = "professor"
    with pytest.raises(ConfigError, match=r"stages\.1 \(student\).*from_stage.*\['teacher'\]"):
        kdray.train(raw, out=tmp_path / "run")
    raw["stages"][1]["peers"][0]["from_stage"] = "student"  # itself: not an earlier stage
    with pytest.raises(ConfigError, match="earlier stage"):
        kdray.train(raw, out=tmp_path / "run")
    assert not (tmp_path / "run").exists()
    plain = copy.deepcopy(tiny_raw)
    plain["peers"][0]["from_stage"] = "teacher"
    with pytest.raises(ConfigError, match="a plain config has none"):
        kdray.train(plain, out=tmp_path / "plain")
    # a staged file with --resume: the folder's own stages.yaml is what continues, so the pair is refused
    with pytest.raises(KdrayError, match="continues from its own stages.yaml"):
        kdray.train(_staged(tiny_raw), overrides=["train.epochs=3"], resume=tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_a_stage_killed_before_its_first_checkpoint_leaves_no_run_running(tiny_raw, tmp_path, monkeypatch):
    from kdray.engines.local_engine import LocalEngine
    from kdray.tracking import Tracker

    raw = _staged(tiny_raw)
    real_run = LocalEngine.run

    def killed_in_stage_two(self, resume=None):
        if self.cfg.name.endswith("student"):
            raise RuntimeError("SIGKILL stand-in")
        return real_run(self, resume)

    # a kill: the student stage dies at its start and nothing closes its MLflow run (nor the parent's)
    real_end = Tracker.end
    monkeypatch.setattr(LocalEngine, "run", killed_in_stage_two)
    monkeypatch.setattr(
        Tracker, "end", lambda self, status="FINISHED": status == "FINISHED" and real_end(self)
    )
    with pytest.raises(RuntimeError, match="SIGKILL stand-in"):
        kdray.train(raw, out=tmp_path / "run")
    assert not (tmp_path / "run" / "stages" / "student" / "checkpoints" / "last.pt").exists()
    monkeypatch.undo()

    kdray.train(None, resume=tmp_path / "run")
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    parent, children = _parent_and_children(tmp_path, summary)
    by_status = sorted(
        (r.info.run_name, r.info.status, r.data.tags.get("kdray.superseded")) for r in children
    )
    assert by_status == [
        ("tiny-student", "FINISHED", None),
        ("tiny-student", "KILLED", "1"),
        ("tiny-teacher", "FINISHED", None),
    ]
    assert parent.info.status == "FINISHED"


def test_from_stage_checkpoint_best_loads_the_stages_selected_epoch(tiny_raw, tmp_path):
    """``from_stage_checkpoint: best`` resolves to the earlier stage's ``best.pt`` (``last``, the default, to
    ``last.pt``), and the frozen teacher of stage 2 holds exactly those weights; a missing best.pt is refused with
    the key; the key means nothing without from_stage and is refused there."""
    from kdray.config import validate
    from kdray.stages import _resolved, stage_configs

    raw = _staged(tiny_raw)
    raw["tracking"] = {"enabled": False}
    raw["stages"][1]["peers"][0]["from_stage_checkpoint"] = "best"
    (_, _), (_, student) = stage_configs(raw)
    folder = tmp_path / "fake" / "stages" / "teacher" / "checkpoints"
    with pytest.raises(ConfigError, match=r"peers\.0\.from_stage_checkpoint.*best.*'last'"):
        _resolved(student, tmp_path / "fake", "file:/unused")
    folder.mkdir(parents=True)
    (folder / "best.pt").write_bytes(b"")
    assert _resolved(student, tmp_path / "fake", "file:/unused").peers[0].checkpoint == str(
        folder / "best.pt"
    )
    raw_last = copy.deepcopy(raw)
    del raw_last["stages"][1]["peers"][0]["from_stage_checkpoint"]
    (_, _), (_, student_last) = stage_configs(raw_last)
    assert _resolved(student_last, tmp_path / "fake", "file:/u").peers[0].checkpoint == str(
        folder / "last.pt"
    )

    kdray.train(raw, out=tmp_path / "run")
    stage1 = tmp_path / "run" / "stages" / "teacher" / "checkpoints"
    best = load_checkpoint(stage1 / "best.pt")["peers"]["net"]["net"]
    frozen = load_checkpoint(tmp_path / "run" / "stages" / "student" / "checkpoints" / "last.pt")["peers"][
        "teacher"
    ]["net"]
    assert all(torch.equal(best[k], frozen[k]) for k in best)

    plain = copy.deepcopy(tiny_raw)
    plain["peers"][0]["from_stage_checkpoint"] = "best"
    with pytest.raises(ConfigError, match="from_stage_checkpoint: best applies with from_stage only"):
        validate(plain)
