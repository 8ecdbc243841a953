"""``kdray tune --keep-baseline``: ASHA lets the config's own values train every epoch, and judges the other trials
exactly as plain ASHA does."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import yaml

from kdray.cli import main
from kdray.search.space import same_values
from kdray.search.study import StudyError, StudySettings, _asha_or_fifo, run_study

OWN = {"method.weights.kl": 1.0, "train.optimizer.name": "sgd"}


def _trial(trial_id: str, kl: float) -> SimpleNamespace:
    return SimpleNamespace(trial_id=trial_id, config={"method.weights.kl": kl, "train.optimizer.name": "sgd"})


def _replay(scheduler) -> list[str]:
    """Three trials on rungs at epochs 2 and 4 (max_t 8): A is good, the baseline B is worse than A at epoch 2, C
    is worse than both. Returns the scheduler's decisions in order."""
    from ray.tune.schedulers import TrialScheduler

    scheduler.set_search_properties("objective", "max", config={})
    a, b, c = _trial("a", 2.0), _trial("b", 1.0 + 2e-16), _trial("c", 3.0)
    for t in (a, b, c):
        scheduler.on_trial_add(None, t)
    steps = [(a, 2, 0.9), (b, 2, 0.5), (c, 2, 0.4), (b, 4, 0.6), (b, 8, 0.7)]
    actions = [scheduler.on_trial_result(None, t, {"epoch": e, "objective": o}) for t, e, o in steps]
    names = {TrialScheduler.CONTINUE: "continue", TrialScheduler.STOP: "stop"}
    return [names[x] for x in actions]


def test_the_baseline_trains_on_where_plain_asha_stops_it_and_the_others_meet_the_same_cutoffs():
    from ray.tune.schedulers import ASHAScheduler

    from kdray.search.schedulers import BaselineASHA

    kwargs = dict(time_attr="epoch", max_t=8, grace_period=2, reduction_factor=2)
    plain, keeping = ASHAScheduler(**kwargs), BaselineASHA(keep=[OWN], **kwargs)
    # plain ASHA stops the baseline at epoch 2 (0.5 < A's 0.9); C (0.4) is below the median of {0.9, 0.5}
    assert _replay(plain)[:3] == ["continue", "stop", "stop"]
    # kept: B continues at epochs 2 and 4 and ends at max_t; C is stopped as before (B's 0.5 entered the rung)
    assert _replay(keeping) == ["continue", "continue", "stop", "continue", "stop"]
    rungs = lambda s: [(m, dict(r)) for m, r in s._brackets[0]._rungs]  # noqa: E731
    assert rungs(keeping)[-1] == rungs(plain)[-1] == (2, {"a": 0.9, "b": 0.5, "c": 0.4})
    assert keeping._num_stopped == 2  # C, and B at its last epoch


def test_values_match_up_to_round_off_and_type():
    assert same_values({**OWN, "x": 3}, OWN)
    assert same_values({"method.weights.kl": 1.0 + 2e-16, "train.optimizer.name": "sgd"}, OWN)
    assert not same_values({"method.weights.kl": 1.01, "train.optimizer.name": "sgd"}, OWN)
    assert not same_values({"method.weights.kl": 1.0, "train.optimizer.name": "adam"}, OWN)
    assert not same_values({"train.optimizer.name": "sgd"}, OWN)
    assert not same_values({"flag": 1}, {"flag": True}) and not same_values({"n": "1"}, {"n": 1})


def test_the_scheduler_follows_the_settings():
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    from kdray.search.schedulers import BaselineASHA

    kept = _asha_or_fifo(StudySettings(keep_baseline=True, grace_period=3), 10, OWN)
    assert isinstance(kept, BaselineASHA) and kept.keep == [OWN] and kept._max_t == 10
    assert kept._brackets[0]._rungs[-1][0] == 3  # the grace period still sets the first rung
    assert type(_asha_or_fifo(StudySettings(), 10, OWN)) is ASHAScheduler
    assert type(_asha_or_fifo(StudySettings(scheduler="fifo"), 10, OWN)) is FIFOScheduler


@pytest.mark.parametrize("scheduler", ["fifo", "pbt"])
def test_keep_baseline_is_refused_without_asha(tmp_path, tiny_raw, capsys, scheduler):
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(yaml.safe_dump(tiny_raw))
    space = tmp_path / "s.yaml"
    space.write_text(yaml.safe_dump({"params": {"method.temperature": {"dist": "uniform", "low": 1, "high": 4}},
                                     "perturb": ["method.temperature"]}))  # fmt: skip
    out = tmp_path / "study"
    args = [
        "tune",
        str(cfg),
        "--space",
        str(space),
        "--keep-baseline",
        "--scheduler",
        scheduler,
        "--out",
        str(out),
    ]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "--keep-baseline" in err and "--scheduler asha" in err and repr(scheduler) in err, err
    assert not out.exists()


def test_keep_baseline_with_the_configs_values_outside_the_space_is_refused_before_ray(tiny_raw, tmp_path):
    space = {
        "params": {"method.temperature": {"dist": "uniform", "low": 2.0, "high": 4.0}}
    }  # the config has 1.0
    out = tmp_path / "study"
    with pytest.raises(StudyError, match="--keep-baseline: the config's own values .* lie outside the space"):
        run_study(tiny_raw, space, out=out, settings=StudySettings(keep_baseline=True))
    assert not out.exists()


def test_the_cli_says_how_the_configs_own_values_did(tmp_path, tiny_raw, capsys, monkeypatch):
    import kdray.search.study as study_module
    from kdray.search.study import StudyResult

    def fake(*a, settings, **k):
        best = {"trial_id": "t2", "objective": 0.75, "values": {"method.temperature": 2.5}}
        own = {"trial_id": "t1", "objective": 0.5, "epoch": 1, "status": "stopped", "values": {}}
        trials = [{"status": "finished"}, {"status": "stopped"}]
        study = {"name": "s", "trials": trials, "best": best, "baseline": own, "metric": "mean_peer",
                 "settings": {"keep_baseline": settings.keep_baseline},
                 "compute": {"epochs_trained": 3, "epochs_budget": 4}}  # fmt: skip
        return StudyResult(tmp_path, study)

    monkeypatch.setattr(study_module, "run_study", fake)
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(yaml.safe_dump(tiny_raw))
    assert main(["tune", str(cfg), "--space", str(cfg)]) == 0
    out = capsys.readouterr().out
    assert (
        "the config's own values: mean_peer 0.5000 (trial t1, stopped after epoch 1); --keep-baseline" in out
    )
    # with --keep-baseline given (its values stopped by an epoch budget, say), the flag is not suggested again
    assert main(["tune", str(cfg), "--space", str(cfg), "--keep-baseline"]) == 0
    out = capsys.readouterr().out
    assert "(trial t1, stopped after epoch 1)" in out and "--keep-baseline" not in out

    # only the config's own values finished: the best could be nothing else, and the CLI says so
    def only_own(*a, settings, **k):
        own = {"trial_id": "t1", "objective": 0.5, "epoch": 4, "status": "finished", "values": {}}
        trials = [{"status": "finished", "trial_id": "t1"}, {"status": "stopped", "trial_id": "t2"}]
        study = {"name": "s", "trials": trials, "best": {**own, "values": {"method.temperature": 1.0}},
                 "baseline": own, "metric": "mean_peer", "settings": {"keep_baseline": True},
                 "compute": {"epochs_trained": 5, "epochs_budget": 8}}  # fmt: skip
        return StudyResult(tmp_path, study)

    monkeypatch.setattr(study_module, "run_study", only_own)
    assert main(["tune", str(cfg), "--space", str(cfg), "--keep-baseline"]) == 0
    assert "note: only the config's own values trained to the end" in capsys.readouterr().out
    monkeypatch.setattr(study_module, "run_study", fake)  # two finished trials: no note
    assert main(["tune", str(cfg), "--space", str(cfg)]) == 0
    assert "note: only" not in capsys.readouterr().out
