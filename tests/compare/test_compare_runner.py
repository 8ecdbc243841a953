"""``kdray compare`` end to end on tiny synthetic populations: every row x seed trained in its own process, the
records, tables and MLflow nesting; a second invocation trains nothing; an interrupted run is resumed; bad input is
one line and exit 2."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import yaml
from helpers import train_until_stopped

from kdray.cli import main
from kdray.compare import runner
from kdray.compare.study import from_configs, load_study, select_rows
from kdray.compare.table import peer_mean
from kdray.errors import ConfigError
from tests.conftest import TINY


def _configs(tmp_path: Path, epochs: int = 1, tracking: bool = False) -> list[str]:
    paths = []
    for method in ("independent", "dml"):
        raw = copy.deepcopy(TINY)
        raw["method"] = {"name": method}
        raw["train"]["epochs"] = epochs
        raw["tracking"] = {"enabled": tracking}
        path = tmp_path / f"{method}.yaml"
        path.write_text(yaml.safe_dump(raw))
        paths.append(str(path))
    return paths


def _no_training(*args, **kwargs):
    raise AssertionError("a run was started although every run had finished")


def test_two_rows_two_seeds_end_to_end_then_nothing_trained_again(tmp_path, monkeypatch, capsys) -> None:
    out = tmp_path / "out"
    files = _configs(tmp_path)
    assert (
        main(["compare", *files, "--seeds", "0", "1", "--jobs", "2", "--out", str(out), "--no-progress"]) == 0
    )

    records = [json.loads(line) for line in (out / "records.jsonl").read_text().splitlines()]
    assert sorted((r["label"], r["seed"], r["status"]) for r in records) == [
        ("dml", 0, "trained"), ("dml", 1, "trained"),
        ("independent", 0, "trained"), ("independent", 1, "trained"),
    ]  # fmt: skip
    for r in records:  # each record's numbers are its run's summary's
        summary = json.loads((Path(r["run_folder"]) / "summary.json").read_text())
        assert r["peers"]["peer0"]["test_acc"] == summary["peers"][0]["test_acc"]
        assert r["peers"]["peer1"]["last_test_acc"] == summary["test"]["last"]["peers"]["peer1"]
        assert r["config"]["seed"] == r["seed"]
        assert r["machine"]["cores"] >= 1 and r["machine"]["cpu"] and r["kdray_version"] and r["time"]
        assert r["command"].startswith("kdray compare")
    table = json.loads((out / "table.json").read_text())
    dml = next(row for row in table["rows"] if row["label"] == "dml")
    by = {(r["label"], r["seed"]): peer_mean(r) for r in records}
    diffs = [by[("dml", s)] - by[("independent", s)] for s in (0, 1)]
    assert dml["diff"]["peer_mean"]["mean"] == pytest.approx(sum(diffs) / 2)
    assert dml["diff"]["peer_mean"]["se"] == pytest.approx(
        abs(diffs[0] - diffs[1]) / 2
    )  # n = 2: |d1 - d2| / 2
    assert "| dml |" in (out / "table.md").read_text() and (out / "compare.png").stat().st_size > 1000
    assert (out / "curves.png").stat().st_size > 1000 and "| independent | " in (out / "table.md").read_text()
    assert "| row - independent |" in capsys.readouterr().out

    # the same command again: every run reused, none started, the same table
    before = (out / "table.md").read_text()
    monkeypatch.setattr(runner, "_start", _no_training)
    result = runner.run_compare(from_configs(files, [0, 1]), out, show_progress=False)
    assert result["trained"] == [] and result["reused"] == 4 and result["failures"] == []
    assert (out / "table.md").read_text() == before
    assert len((out / "records.jsonl").read_text().splitlines()) == 4


def test_the_runs_nest_under_one_mlflow_parent_run_across_invocations(tmp_path) -> None:
    from mlflow.tracking import MlflowClient

    files = _configs(tmp_path, tracking=True)
    out = tmp_path / "out"
    runner.run_compare(from_configs(files[:1], [0]), out, show_progress=False)
    parent = json.loads((out / "compare.json").read_text())["mlflow_run_id"]
    result = runner.run_compare(from_configs(files[:1], [0, 1]), out, show_progress=False)  # one seed more
    assert json.loads((out / "compare.json").read_text())["mlflow_run_id"] == parent  # reopened, not a second
    client = MlflowClient(tracking_uri=f"sqlite:///{out / 'runs' / 'mlflow.db'}")
    assert [r["seed"] for r in result["records"]] == [0, 1]
    for r in result["records"]:
        assert client.get_run(r["mlflow_run_id"]).data.tags["mlflow.parentRunId"] == parent
    run = client.get_run(parent)
    assert run.info.status == "FINISHED" and run.data.params["rows"] == "independent"
    assert run.data.metrics["independent/peer_mean_test_acc"] == pytest.approx(
        sum(peer_mean(r) for r in result["records"]) / 2
    )


def test_an_interrupted_run_is_resumed_and_a_finished_folder_without_record_reused(
    tmp_path, monkeypatch
) -> None:
    files = _configs(tmp_path, epochs=2)
    study = from_configs(files[:1], [0])
    out = tmp_path / "out"
    folder = out / "runs" / "independent-s0"
    raw = study.config(study.rows[0], 0)
    train_until_stopped(raw, folder, steps_done=8)  # epoch 2 of 2, step 2 of 6: last.pt mid-run
    assert (folder / "checkpoints" / "last.pt").is_file() and not (folder / "summary.json").exists()
    result = runner.run_compare(study, out, jobs=1, show_progress=False)
    (record,) = result["records"]
    assert record["status"] == "resumed" and record["last_epoch"] == 2
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["epochs"] == 2 and record["peers"]["peer0"]["test_acc"] == summary["peers"][0]["test_acc"]

    # the record lost (a kill between the run's end and its line): the folder's summary is reused, nothing trained
    (out / "records.jsonl").unlink()
    monkeypatch.setattr(runner, "_start", _no_training)
    result = runner.run_compare(study, out, show_progress=False)
    assert [r["status"] for r in result["records"]] == ["reused"] and result["trained"] == []


def test_a_run_of_another_config_is_refused_not_overwritten(tmp_path, capsys) -> None:
    files = _configs(tmp_path)
    out = tmp_path / "out"
    study = from_configs(files, [0])
    raw = study.config(study.rows[0], 0)
    old = {"label": "independent", "seed": 0, "config": {**raw, "train": {**raw["train"], "epochs": 3}}}
    out.mkdir()
    (out / "records.jsonl").write_text(json.dumps(old) + "\n")
    assert main(["compare", *files, "--seeds", "0", "--out", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "train.epochs: 3 there, 1 now" in err[0]
    assert (out / "records.jsonl").read_text() == json.dumps(old) + "\n"


def _study(tmp_path: Path, body: dict) -> str:
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(body))
    return str(path)


@pytest.mark.parametrize(
    "make, expected",
    [
        (lambda t, f: [f[0], str(t / "missing.yaml")], "'config' = '"),
        (
            lambda t, f: [f[0], f[1], "--baseline", "nope"],
            "config key 'baseline' = 'nope': one of the row labels",
        ),
        (lambda t, f: [f[0], f[1], "--set", "train.epochz=2"], "'train.epochz'"),
        (lambda t, f: [f[0], "--jobs", "0"], "config key '--jobs' = 0"),
        (lambda t, f: [f[0], f[0]], "row labels must be unique"),
        (lambda t, f: [_study(t, {"rows": [{"label": "a", "config": f[0]}], "sedes": [0]})], "'sedes'"),
        (
            lambda t, f: [_study(t, {"rows": [{"label": "a", "config": f[0], "overrides": 3}]})],
            "'rows.0.overrides'",
        ),
        (
            lambda t, f: [_study(t, {"rows": [{"label": "a", "config": f[0]}], "seeds": [0, 0]})],
            "each seed once",
        ),
        (lambda t, f: [_study(t, {"rows": []})], "'rows' = []"),
        (
            lambda t, f: [
                _study(t, {"rows": [{"label": "a", "config": f[0], "overrides": {"method.name": "dmx"}}]})
            ],
            "(row 'a', seed 0)",
        ),
    ],
)
def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys, make, expected) -> None:
    files = _configs(tmp_path)
    out = tmp_path / "out"
    assert main(["compare", *make(tmp_path, files), "--out", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("kdray: error:") and expected in err[0], err
    assert not (out / "records.jsonl").exists() and not (out / "runs").exists()


def test_a_study_file_rows_overrides_and_order(tmp_path) -> None:
    files = _configs(tmp_path)
    path = _study(tmp_path, {
        "seeds": [3, 4], "baseline": "b",
        "overrides": {"train.epochs": 5, "method.name": "dml"},
        "rows": [{"label": "a", "config": Path(files[0]).name},
                 {"label": "b", "config": files[0], "overrides": ["method.name=independent", "train.epochs=7"]}],
    })  # fmt: skip
    study = load_study(path)
    assert study.seeds == [3, 4] and study.baseline == "b" and study.labels() == ["a", "b"]
    a = study.config(study.rows[0], 3)
    b = study.config(study.rows[1], 4, ["train.epochs=9"])
    assert (a["method"]["name"], a["train"]["epochs"], a["seed"], a["name"]) == ("dml", 5, 3, "a-s3")
    assert (b["method"]["name"], b["train"]["epochs"], b["seed"]) == ("independent", 9, 4)  # --set comes last
    # --rows: a subset, in the study's order, the baseline among it
    assert [r.label for r in select_rows(study, ["b"])] == ["b"]
    assert [r.label for r in select_rows(study, ["b", "a"])] == ["a", "b"]
    with pytest.raises(
        ConfigError, match=r"^config key '--rows' = 'a': a selection that includes the baseline"
    ):
        select_rows(study, ["a"])
    with pytest.raises(ConfigError, match=r"^config key '--rows' = 'c': row labels of the study: a, b"):
        select_rows(study, ["a", "c"])


def test_jobs_and_threads_share_the_cores() -> None:
    assert runner.default_jobs(runs=4, cores=2) == 1 and runner.threads_per_job(1, cores=2) == 2
    assert runner.default_jobs(runs=4, cores=16) == 4 and runner.threads_per_job(4, cores=16) == 4
    assert runner.default_jobs(runs=100, cores=16) == 8 and runner.threads_per_job(3, cores=16) == 5
    for jobs in range(1, 20):
        assert (
            jobs * runner.threads_per_job(jobs, cores=16) <= 16 or runner.threads_per_job(jobs, cores=16) == 1
        )


def test_the_shipped_study_file_loads_and_every_row_validates() -> None:
    study = load_study(Path(__file__).resolve().parents[2] / "configs" / "studies" / "online_noisy.yaml")
    assert study.labels() == ["independent", "dml"] and study.baseline == "independent"
    for row in study.rows:
        raw = study.config(row, 0)
        assert raw["data"]["select_on"] == "last" and raw["data"]["label_noise"]["rate"] == 0.4


@pytest.mark.parametrize(
    "name, methods",
    [
        ("online_memorising", [["independent"], ["dml"], ["afd"], ["acn"], ["afd"], ["dml"], ["afd"]]),
        (
            "selfkd_memorising",
            [
                ["independent"],
                ["independent"],
                ["pskd"],
                ["cskd"],
                ["tfkd"],
                ["independent", "aikd"],
                ["independent", "tfkd"],
                ["pskd"],
                ["independent"],
                ["cskd"],
                ["independent", "aikd"],
                ["independent"],
                ["independent", "aikd"],
                ["tfkd"],
                ["independent", "tfkd"],
                ["independent", "aikd"],
            ],
        ),
        ("ban_memorising", [["independent", "kd", "kd"], ["independent", "kd", "kd"]]),
        ("online_memorising_unequal", [["independent"], ["dml"]]),
    ],
)
def test_the_memorising_study_files_share_one_regime_and_every_row_validates(name, methods) -> None:
    """Every row, and every stage of a staged row (AI-KD's pre-training, born-again generations), trains in the one
    regime: 1,000 noisy training images, a clean 300-image validation split, 80 epochs, weight decay 5e-5."""
    from kdray.config import validate
    from kdray.stages import is_staged, stage_configs

    study = load_study(Path(__file__).resolve().parents[2] / "configs" / "studies" / f"{name}.yaml")
    for row, stage_methods in zip(study.rows, methods, strict=True):
        raw = study.config(row, 1)
        stages = [cfg for _, cfg in stage_configs(raw)] if is_staged(raw) else [validate(raw)]
        assert [c.method.name for c in stages] == stage_methods, row.label
        for cfg in stages:
            assert cfg.seed == 1
            assert (cfg.data.train_size, cfg.data.val_split, cfg.data.clean_val, cfg.train.epochs) == (
                1300,
                300,
                True,
                80,
            )
            # weight decay searched on seed 100 (the tuned rows and their control; AI-KD's second stage only)
            tuned = ("_tuned" in row.label or row.label == "baseline_pskd_optim") and cfg is stages[-1]
            assert cfg.data.label_noise.rate == 0.4 and (tuned or cfg.train.optimizer.weight_decay == 5.0e-5)
        if row.label == "afd_noadv":  # the control: AFD's adversary off, everything else AFD's
            assert stages[0].method.weights == {"ce": 1.0, "kl": 1.0, "adv": 0.0, "disc": 0.0}
        if row.label == "afd_tuned":  # the searched values (seed 100); the discriminator's weight stays AFD's
            m = stages[0].method
            got = (m.weights["kl"], m.weights["adv"], m.weights["disc"], m.temperature)
            assert [round(v, 4) for v in got] == [1.2213, 0.0684, 1.0, 3.1226], got
        # teachers handed on at their selected epoch: TF-KD's self-teacher, born-again's best-epoch row
        handed = [p.from_stage_checkpoint for cfg in stages for p in cfg.peers if p.from_stage]
        assert handed == {
            "tfkd_self": ["best"],
            "tfkd_self_tuned": ["best"],
            "aikd_tuned_best": ["best"],
            "aikd_best": ["best"],
            "born_again_best": ["best", "best"],
            "born_again": ["last", "last"],
        }.get(row.label, handed), row.label


@pytest.mark.parametrize("how", ["ctrl-c", "ctrl-c, SIGINT ignored at start", "SIGTERM to the command alone"])
def test_ctrl_c_stops_the_runs_at_a_safe_point_and_exits_130(tmp_path, how) -> None:
    """SIGINT to the process group, as a terminal's Ctrl-C: the running run checkpoints and stops, nothing is
    recorded as finished, and the command says how to continue. The same when the command starts with SIGINT
    ignored (a shell's background job: CI once ran the suite so, and the command counted its stopped run as failed,
    exit 2), and when a scheduler sends SIGTERM to the command alone (it must not leave its runs going)."""
    import contextlib
    import os
    import signal
    import subprocess
    import sys
    import time

    inherited = signal.SIG_IGN if "ignored" in how else signal.SIG_DFL

    files = _configs(tmp_path, epochs=500)
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    cmd = [
        sys.executable,
        "-m",
        "kdray",
        "compare",
        files[0],
        "--seeds",
        "0",
        "--out",
        str(out),
        "--no-progress",
    ]
    proc = subprocess.Popen(
        cmd,
        env=env,
        start_new_session=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        # the disposition a shell hands on, whatever pytest's own is
        preexec_fn=lambda: signal.signal(signal.SIGINT, inherited),
    )
    last = out / "runs" / "independent-s0" / "checkpoints" / "last.pt"
    # generous limits: a loaded 2-core machine (the suite beside study runs) has taken minutes to start a run
    deadline = time.monotonic() + 600
    while not last.is_file() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.2)
    if not last.is_file():
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # the command and its run: this test's own process group
        _, err = proc.communicate()
        raise AssertionError(f"no checkpoint within 600 s (exit {proc.returncode}): {err.decode()[-2000:]}")
    if how.startswith("SIGTERM"):
        os.kill(proc.pid, signal.SIGTERM)
    else:
        os.killpg(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=600)
    log = out / "logs" / "independent-s0.log"
    assert proc.returncode == 130, (err.decode()[-2000:], log.read_text()[-2000:] if log.is_file() else "")
    assert "run the same command again to continue" in err.decode()
    assert "stopped at a safe point" in log.read_text()
    assert last.is_file() and not (out / "records.jsonl").exists()
