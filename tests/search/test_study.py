"""Studies on a private local Ray: ASHA + TPE end to end with MLflow, PBT exploits, diverging trials.

Tiny synthetic populations (2 x ResNet-8 width 4, 12x12 inputs), 1-4 epochs; most of each test's time is the trial
processes importing torch."""

from __future__ import annotations

import copy
import json
import math
import time

import pytest
import torch
import yaml

import kdray
from kdray.checkpoint import load_checkpoint
from kdray.search.space import parse_space
from kdray.search.study import StudySettings, run_study

pytestmark = [pytest.mark.ray, pytest.mark.slow]

ASHA_SPACE = {
    "params": {
        "method.weights.kl": {"dist": "loguniform", "low": 0.1, "high": 10.0},
        "method.temperature": {"dist": "uniform", "low": 1.0, "high": 4.0},
        "train.optimizer.name": {"dist": "choice", "values": ["sgd", "adam"]},
    }
}


def _history(trial_dir):
    return [json.loads(line) for line in (trial_dir / "history.jsonl").read_text().splitlines()]


def test_asha_study_end_to_end(ray_local, tiny_raw, tmp_path):
    """4 trials, TPE + ASHA: values in range, the config's own values first (kept to the end: --keep-baseline),
    study.json and MLflow agree, and best.yaml reproduces the best trial."""
    tiny_raw["train"]["epochs"] = 2
    tiny_raw["tracking"] = {"enabled": True}
    out = tmp_path / "runs" / "asha"
    result = run_study(
        tiny_raw,
        ASHA_SPACE,
        out=out,
        settings=StudySettings(samples=4, max_concurrent=2, seed=3, keep_baseline=True),
    )
    study = json.loads((out / "study.json").read_text())
    trials = study["trials"]
    assert study["status"] == "finished" and len(trials) == 4
    assert {t["status"] for t in trials} <= {"finished", "stopped"}
    space = parse_space(ASHA_SPACE)
    for t in trials:
        for key, value in t["values"].items():
            assert space.params[key].contains(value), (key, value)
        cfg = yaml.safe_load((out / "trials" / t["trial_id"] / "config.yaml").read_text())
        assert (
            cfg["method"]["weights"]["kl"] == t["values"]["method.weights.kl"]
        )  # the trial trained what it says
        assert cfg["train"]["optimizer"]["name"] == t["values"]["train.optimizer.name"]
    assert {"method.weights.kl": 1.0, "method.temperature": 1.0, "train.optimizer.name": "sgd"} in [
        t["values"] for t in trials
    ]  # points_to_evaluate: the config's own values
    own = {"method.weights.kl": 1.0, "method.temperature": 1.0, "train.optimizer.name": "sgd"}
    assert [t["values"] for t in trials if t["baseline"]] == [own]
    baseline = next(t for t in trials if t["baseline"])
    assert study["baseline"] == {
        k: baseline[k] for k in ("trial_id", "objective", "epoch", "status", "values")
    }
    assert baseline["status"] == "finished" and baseline["epochs_trained"] == 2  # never stopped at rung 1
    finished = [t for t in trials if t["status"] == "finished"]
    assert finished and all(t["epoch"] == 2 for t in finished)
    best = study["best"]
    assert best["objective"] == max(t["objective"] for t in finished)
    assert study["compute"]["epochs_trained"] == sum(t["epochs_trained"] for t in trials) <= 8
    assert result.best == best
    # the trials' live steps reached the driver (its per-trial bars): every trial posted its place
    live = json.loads((out / "progress.json").read_text())
    for t in trials:
        entry = live[t["trial_id"]]
        assert entry["live_updates"] >= 1, entry
        assert (
            1 <= entry["live"]["epoch"] <= 2
            and 0 <= entry["live"]["steps_done"] <= entry["live"]["steps"] == 6
        )

    # MLflow: a parent run with one nested run per trial; the best value agrees
    from mlflow.tracking import MlflowClient

    client = MlflowClient(study["mlflow"]["uri"])
    parent = client.get_run(study["mlflow"]["parent_run_id"])
    assert parent.info.status == "FINISHED"
    assert parent.data.metrics["best_objective"] == pytest.approx(best["objective"])
    assert parent.data.metrics["trials"] == 4
    children = client.search_runs(
        [parent.info.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'"
    )
    assert len(children) == 4 == study["mlflow"]["children"]
    by_trial = {r.data.tags["kdray.trial_id"]: r for r in children}
    assert set(by_trial) == {t["trial_id"] for t in trials}
    best_run = by_trial[best["trial_id"]]
    assert best_run.data.metrics["objective"] == pytest.approx(best["objective"])
    assert best_run.data.params["tune.method.weights.kl"] == str(best["values"]["method.weights.kl"])
    assert best_run.data.params["method.weights.kl"] == str(
        best["values"]["method.weights.kl"]
    )  # resolved config
    assert all(r.info.status == "FINISHED" for r in children)
    objective_steps = [m.step for m in client.get_metric_history(best_run.info.run_id, "objective")]
    assert objective_steps == [1, 2]  # per-epoch metrics
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"best.yaml", "trials.csv", "study.json", "checkpoints", "plots"} <= artifacts
    # the best trial's peers are MLflow models of the study's run; the trials log none
    assert not [k for r in children for k in r.data.tags if k.startswith("kdray.model.")]
    import mlflow.pytorch
    import torch

    from kdray.exporter import load_peer

    for peer in ("peer0", "peer1"):
        mlflow.set_tracking_uri(study["mlflow"]["uri"])
        try:
            model = mlflow.pytorch.load_model(parent.data.tags[f"kdray.model.{peer}"])
        finally:
            mlflow.set_tracking_uri(None)
        net = load_peer(out, peer)  # the study folder: its best.pt, the best trial's population
        with torch.no_grad():
            torch.testing.assert_close(model(net.sample), net.model(net.sample))
    assert (out / "plots" / "history.png").stat().st_size > 0
    assert len((out / "trials.csv").read_text().strip().splitlines()) == 5

    # best.yaml is ready to run and reproduces the best trial (same seed, same thread count, CPU)
    rerun = kdray.train(out / "best.yaml", overrides=["tracking.enabled=false"], out=tmp_path / "rerun")
    best_summary = json.loads((out / "trials" / best["trial_id"] / "summary.json").read_text())
    assert [p["val_acc"] for p in rerun.summary["peers"]] == [p["val_acc"] for p in best_summary["peers"]]
    assert load_checkpoint(out / "best.pt")["epoch"] == 2


def _pbt_pair() -> tuple[dict, StudySettings]:
    """Two PBT trials, the second with a useless learning rate (1e-5): it is the one that exploits."""
    space = {
        "params": {
            "method.weights.kl": {"dist": "loguniform", "low": 0.1, "high": 10.0},
            "train.optimizer.lr": {"dist": "loguniform", "low": 1e-5, "high": 0.1},
        },
        "perturb": ["method.weights.kl"],
    }
    settings = StudySettings(
        samples=2, scheduler="pbt", max_concurrent=2, quantile_fraction=0.5, seed=1,
        extra_points=[{"method.weights.kl": 1.0, "train.optimizer.lr": 1e-5}],
    )  # fmt: skip
    return space, settings


def test_pbt_exploit_continues_from_the_donor_with_the_mutated_weight(ray_local, tiny_raw, tmp_path):
    """Two trials, one with a useless learning rate: it copies the better trial's checkpoint (weights, step, history)
    and continues with a perturbed KL weight, which is in effect from the next step."""
    tiny_raw["train"]["epochs"] = 4
    # 512 trained on: 32 steps per epoch, long enough for the two trials to overlap (PBT compares running trials)
    tiny_raw["data"]["synthetic"]["train_len"] = 544
    space, settings = _pbt_pair()
    out = tmp_path / "pbt"
    study = run_study(tiny_raw, space, out=out, settings=settings).study
    events = [(t, e) for t in study["trials"] for e in t["exploits"]]
    assert events, "no exploit happened"
    recipient, event = events[0]
    donor = event["donor"]
    assert donor != recipient["trial_id"]
    e = event["epoch"]

    # the copy is the donor's state at the exploit point: same step counter, same weights, its history
    donor_payload = load_checkpoint(event["donor_checkpoint"])
    copied = load_checkpoint(event["copied_to"])
    assert (
        copied["epoch"] == donor_payload["epoch"] == e and copied["step"] == donor_payload["step"] == e * 32
    )
    for peer, state in donor_payload["peers"].items():
        for name, tensor in state["net"].items():
            assert torch.equal(copied["peers"][peer]["net"][name], tensor), (peer, name)
    assert copied["history"] == donor_payload["history"]

    # the recipient went on from epoch e + 1 with the perturbed weight
    rows = _history(out / "trials" / recipient["trial_id"])
    after = [r for r in rows if r["time"] > event["time"] and not r["replay"]]
    assert after[0]["epoch"] == e + 1
    new_kl = event["values"]["method.weights.kl"]
    assert new_kl != event["donor_values"]["method.weights.kl"]
    assert after[0]["hp/method.weights.kl"] == new_kl
    assert event["values"]["train.optimizer.lr"] == event["donor_values"]["train.optimizer.lr"]  # cloned

    # re-running that epoch from the donor's checkpoint reproduces it with the new weight, not with the old one
    cfg = yaml.safe_load((out / "trials" / recipient["trial_id"] / "config.yaml").read_text())
    cfg["tracking"]["enabled"] = False
    cfg["train"]["optimizer"]["lr"] = event["values"]["train.optimizer.lr"]

    def continue_with(kl: float, name: str) -> dict:
        c = copy.deepcopy(cfg)
        c["method"]["weights"]["kl"] = kl
        seen = []

        def stop_after_one(metrics, _path):
            seen.append(metrics)
            raise StopIteration

        with pytest.raises(StopIteration):
            kdray.train(c, out=tmp_path / name, resume=event["donor_checkpoint"], callbacks=[stop_after_one])
        return seen[0]

    with_new = continue_with(new_kl, "new")
    with_old = continue_with(event["donor_values"]["method.weights.kl"], "old")
    for key, value in after[0]["metrics"].items():
        if key == "train/step_ms":  # a timing, not a result
            continue
        assert with_new[key] == pytest.approx(value, rel=1e-6, abs=1e-7), key
    assert with_old["peer0/loss_kl"] != pytest.approx(after[0]["metrics"]["peer0/loss_kl"], rel=1e-6)

    # the schedule is recorded and drawn
    assert (out / "plots" / "pbt_method.weights.kl.png").exists()
    assert all(t["status"] == "finished" for t in study["trials"])


def test_diverging_trial_is_marked_and_the_study_finishes(ray_local, tiny_raw, tmp_path):
    space = {"params": {"train.optimizer.lr": {"dist": "loguniform", "low": 0.01, "high": 1e6}}}
    settings = StudySettings(
        samples=2, scheduler="fifo", max_concurrent=1, extra_points=[{"train.optimizer.lr": 1e6}]
    )
    out = tmp_path / "nan"
    study = run_study(tiny_raw, space, out=out, settings=settings).study
    by_lr = {t["values"]["train.optimizer.lr"]: t for t in study["trials"]}
    assert set(by_lr) == {0.05, 1e6}
    bad, good = by_lr[1e6], by_lr[0.05]
    assert bad["status"] == "diverged" and "diverged" in bad["error"] and bad["objective"] is None
    assert good["status"] == "finished" and math.isfinite(good["objective"])
    assert study["status"] == "finished" and study["best"]["trial_id"] == good["trial_id"]
    assert json.loads((out / "trials" / bad["trial_id"] / "status.json").read_text())["status"] == "diverged"


def test_ray_engine_trial_is_the_train_driver(ray_local, tiny_raw, tmp_path):
    """engine.name=ray: the trial drives a Ray Train trainer (Train V2 inside Tune), reports through the same epoch
    callbacks, and lands where the in-process engine does."""
    tiny_raw["engine"] = {"name": "ray"}
    space = {"params": {"method.weights.kl": {"dist": "loguniform", "low": 0.1, "high": 10.0}}}
    out = tmp_path / "ray"
    study = run_study(tiny_raw, space, out=out, settings=StudySettings(samples=1)).study
    assert study["resources"]["resources"] == {"cpu": 0.01} and study["resources"]["worker_cpus"] == 0.99
    (trial,) = study["trials"]
    assert trial["status"] == "finished" and trial["epoch"] == 1
    trial_dir = out / "trials" / trial["trial_id"]
    assert json.loads((trial_dir / "ray_run.json").read_text())["attempts"] == 1  # the RayEngine ran it
    # the RayEngine's driver view (in the trial) passes the workers' steps on to the study's per-trial bar
    assert json.loads((out / "progress.json").read_text())[trial["trial_id"]]["live_updates"] >= 1
    local = kdray.train(tiny_raw, overrides=["engine.name=local", "train.threads=1"], out=tmp_path / "local")
    assert trial["objective"] == pytest.approx(local.summary["best"]["metric"], abs=2 / 64)
    best = yaml.safe_load((out / "best.yaml").read_text())
    assert (
        best["engine"]["name"] == "ray" and best["engine"]["placement"]["cpus_per_peer"] == 1.0
    )  # the user's, not 0.99


def test_multi_objective_study_finds_the_accuracy_size_front(ray_local, tiny_raw, tmp_path):
    """--multi-objective: Optuna gets (objective max, trained parameters min); every trial reports its true size,
    study.json's Pareto front is exactly the undominated finished trials, and the pareto plot is written."""
    from kdray.models import count_params, create_model

    tiny_raw["tracking"] = {"enabled": True}
    space = {
        "params": {
            "peers.0.arch_kwargs.width": {"dist": "choice", "values": [2, 4, 8]},
            "method.weights.kl": {"dist": "loguniform", "low": 0.1, "high": 10.0},
        }
    }
    out = tmp_path / "mo"
    settings = StudySettings(samples=4, scheduler="fifo", max_concurrent=2, seed=1, multi_objective=True)
    study = run_study(tiny_raw, space, out=out, settings=settings).study
    trials = study["trials"]
    assert len(trials) == 4 and all(t["status"] == "finished" for t in trials)
    syn = tiny_raw["data"]["synthetic"]
    other = count_params(create_model(tiny_raw["peers"][1]["arch"], syn["num_classes"], syn["channels"],
                                      **tiny_raw["peers"][1].get("arch_kwargs", {})))  # fmt: skip
    for t in trials:  # the size each trial reports is the size of what it trained
        width = t["values"]["peers.0.arch_kwargs.width"]
        mine = count_params(create_model(tiny_raw["peers"][0]["arch"], syn["num_classes"], syn["channels"],
                                         width=width))  # fmt: skip
        assert t["params"] == mine + other

    # the front by brute force: undominated on (objective up, params down); objectives within 1e-9 are equal
    def dominated(t):
        return any(
            o["objective"] >= t["objective"] - 1e-9 and o["params"] <= t["params"]
            and (o["objective"] > t["objective"] + 1e-9 or o["params"] < t["params"])
            for o in trials
        )  # fmt: skip

    want = {t["trial_id"] for t in trials if not dominated(t)}
    assert {t["trial_id"] for t in study["pareto"]} == want == {t["trial_id"] for t in trials if t["pareto"]}
    assert [t["params"] for t in study["pareto"]] == sorted(t["params"] for t in study["pareto"])
    assert study["best"]["objective"] == max(t["objective"] for t in trials)  # best: the most accurate
    assert (out / "plots" / "pareto.png").stat().st_size > 0
    rows = (out / "trials.csv").read_text().splitlines()
    assert rows[0].split(",")[6:8] == ["params", "pareto"] and len(rows) == 5

    from mlflow.tracking import MlflowClient

    client = MlflowClient(study["mlflow"]["uri"])
    parent = client.get_run(study["mlflow"]["parent_run_id"])
    children = client.search_runs(
        [parent.info.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'"
    )
    sizes = {r.data.tags["kdray.trial_id"]: r.data.metrics["params"] for r in children}
    assert sizes == {t["trial_id"]: t["params"] for t in trials}


def test_pbt_on_the_ray_engine_exploits_across_train_runs(ray_local, tiny_raw, tmp_path):
    """`kdray tune ... --scheduler pbt --set engine.name=ray`: each trial drives its own Ray Train trainer; a trial that
    exploits another continues, on the RayEngine, from the donor's population checkpoint (written by the donor's
    rank 0), and its next epoch is what the LocalEngine computes from that checkpoint with the mutated weight."""
    # PBT exploits only between trials running at the same time, and each Ray-engine trial first spends ~30 s
    # starting its Train run: epochs of a few seconds make the two trials overlap whatever their start-up skew.
    tiny_raw["train"]["epochs"] = 4
    tiny_raw["data"]["synthetic"]["train_len"] = 2080  # 2048 trained on (32 carved for validation): 128 steps
    tiny_raw["engine"] = {
        "name": "ray",
        "placement": {"cpus_per_peer": 0.5},
    }  # two trials x two workers on two cores
    space, settings = _pbt_pair()
    out = tmp_path / "pbt-ray"
    study = run_study(tiny_raw, space, out=out, settings=settings).study
    assert all(t["status"] == "finished" for t in study["trials"])
    # no Train placement group outlives its trial: Train's cleaner removes them, through the state API, which
    # must be told its address (two Rays on one machine made it fail and leave the groups: RAY_API_SERVER_ADDRESS)
    from ray.util.placement_group import placement_group_table

    deadline = time.time() + 60
    while (
        left := [g for g, i in placement_group_table().items() if i["state"] in ("CREATED", "PENDING")]
    ) and (time.time() < deadline):
        time.sleep(1.0)
    assert not left, left
    events = [(t, e) for t in study["trials"] for e in t["exploits"]]
    assert events, "no exploit happened"
    recipient, event = events[0]
    trial_dir = out / "trials" / recipient["trial_id"]
    assert json.loads((trial_dir / "ray_run.json").read_text())["placement"]  # the RayEngine trained it

    donor_payload = load_checkpoint(event["donor_checkpoint"])
    copied = load_checkpoint(event["copied_to"])
    assert copied["step"] == donor_payload["step"] == event["epoch"] * 128
    for peer, state in donor_payload["peers"].items():
        for name, tensor in state["net"].items():
            assert torch.equal(copied["peers"][peer]["net"][name], tensor), (peer, name)

    rows = _history(trial_dir)
    after = [r for r in rows if r["time"] > event["time"] and not r["replay"]]
    assert after[0]["epoch"] == event["epoch"] + 1
    new_kl = event["values"]["method.weights.kl"]
    assert after[0]["hp/method.weights.kl"] == new_kl != event["donor_values"]["method.weights.kl"]

    # the same epoch on the LocalEngine from the donor's checkpoint with the mutated weight: the engines agree
    cfg = yaml.safe_load((trial_dir / "config.yaml").read_text())
    cfg["tracking"]["enabled"] = False
    cfg["engine"] = {"name": "local"}
    cfg["train"]["threads"] = 1
    cfg["method"]["weights"]["kl"] = new_kl
    cfg["train"]["optimizer"]["lr"] = event["values"]["train.optimizer.lr"]
    seen = []

    def stop_after_one(metrics, _path):
        seen.append(metrics)
        raise StopIteration

    with pytest.raises(StopIteration):
        kdray.train(cfg, out=tmp_path / "local", resume=event["donor_checkpoint"], callbacks=[stop_after_one])
    for key in ("peer0/loss_kl", "peer1/loss_kl", "peer0/val_acc", "peer1/val_acc"):
        assert seen[0][key] == pytest.approx(after[0]["metrics"][key], rel=1e-4, abs=1e-5), key


def test_tune_and_optuna_stay_quiet_unless_verbose(ray_local, tiny_raw, tmp_path, capfd):
    """Tune's configuration box, experiment path and TensorBoard line, and Optuna's study log, only with
    train.verbose (``kdray tune --verbose``); the switches are put back afterwards."""
    import os

    import optuna

    level = optuna.logging.get_verbosity()

    space = {"params": {"method.weights.kl": {"dist": "loguniform", "low": 0.1, "high": 10.0}}}
    noise = (
        "Configuration for experiment",
        "View detailed results here",
        "tensorboard",
        "A new study created",
    )
    before = os.environ.get("RAY_AIR_NEW_OUTPUT")
    run_study(tiny_raw, space, out=tmp_path / "quiet", settings=StudySettings(samples=1, scheduler="fifo"))
    out = "".join(capfd.readouterr())
    assert not [n for n in noise if n in out] and "trial " in out
    assert os.environ.get("RAY_AIR_NEW_OUTPUT") == before and optuna.logging.get_verbosity() == level


def test_an_epoch_budget_ends_the_study_finished_not_interrupted(ray_local, tiny_raw, tmp_path):
    """--epoch-budget 4 with 4 trials of 3 epochs, one at a time: the study stops early (fewer than the 12 epochs of
    4 whole trials), and says finished, not interrupted (a budget is not a Ctrl-C), with a best trial."""
    tiny_raw["train"]["epochs"] = 3
    out = tmp_path / "budget"
    result = run_study(
        tiny_raw,
        ASHA_SPACE,
        out=out,
        settings=StudySettings(samples=4, max_concurrent=1, seed=3, scheduler="fifo", epoch_budget=4),
    )
    study = json.loads((out / "study.json").read_text())
    assert study["status"] == "finished" and result.best is not None and (out / "best.yaml").is_file()
    assert study["compute"]["epochs_trained"] < 12
