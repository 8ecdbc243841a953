"""The trials' live steps on the study driver: what a trial posts, and what the driver's bars and progress.json show.

No Ray here: the trial's board is a stand-in, the driver's events are fed by hand (the end-to-end path is in
test_study.py)."""

from __future__ import annotations

import json
import sys
from types import SimpleNamespace

import pytest

import kdray
from kdray.search.progress import StudyProgress
from kdray.search.trial import TrialLive, TrialPlan, TuneReporter


class LiveRecorder:
    """An epoch callback that also follows the bar, as a Tune trial's reporter does."""

    def __init__(self):
        self.calls = []

    def __call__(self, metrics, checkpoint):
        pass

    def live(self, epoch, steps_done, steps, postfix):
        self.calls.append((epoch, steps_done, steps, postfix))


def test_a_live_callback_follows_every_step_of_the_local_engine(tiny_raw, tmp_path):
    """Every step of every epoch reaches the callback in order; each epoch ends at steps == steps per epoch; the
    postfix is the bar's (each peer's running loss/accuracy), given every 10 steps (once per 6-step epoch)."""
    tiny_raw["train"]["epochs"] = 2
    recorder = LiveRecorder()
    result = kdray.train(tiny_raw, out=tmp_path / "run", callbacks=[recorder])
    steps = result.summary["steps_per_epoch"]
    for epoch in range(2):
        done = [d for e, d, s, _ in recorder.calls if e == epoch]
        assert {s for e, _, s, _ in recorder.calls if e == epoch} == {steps}
        assert done == [0, *range(1, steps + 1)]  # the start, then one call per step
    postfixes = [p for *_, p in recorder.calls if p is not None]
    assert len(postfixes) == 2 and all(p.startswith("peer0 ") and " peer1 " in p for p in postfixes)


class FakeBoard:
    def __init__(self):
        self.events = []
        self.post = SimpleNamespace(remote=self.events.append)


def test_a_trial_posts_at_most_every_half_second_and_at_each_epochs_end(tiny_raw, tmp_path, monkeypatch):
    import ray

    import kdray.search.trial as trial_mod
    from kdray.config import load_config

    board = FakeBoard()
    names = []
    monkeypatch.setattr(ray, "get_actor", lambda name: names.append(name) or board)
    clock = iter([0.0, 0.1, 0.2, 0.6, 0.7, 0.8])
    monkeypatch.setattr(trial_mod, "_clock", lambda: next(clock))
    plan = TrialPlan("study-x", str(tmp_path), tiny_raw, ("method.weights.kl",), "mean_peer")
    reporter = TuneReporter(plan, load_config(tiny_raw), "t1", {"method.weights.kl": 1.0})
    reporter.live(0, 0, 6, None)  # t=0.0: the start of an epoch is always posted
    reporter.live(0, 1, 6, "a 1.2/0.30 b 1.3/0.25")  # t=0.1: too soon
    reporter.live(0, 2, 6, None)  # t=0.2: too soon
    reporter.live(0, 3, 6, None)  # t=0.6: posted, with the last postfix seen
    reporter.live(0, 4, 6, None)  # t=0.7: too soon
    reporter.live(0, 6, 6, None)  # t=0.8: the end of the epoch is always posted
    assert names == ["kdray-study-board-study-x"]  # looked up once, by the study's name
    assert [(e.epoch, e.steps_done, e.steps, e.text) for e in board.events] == [
        (0, 0, 6, ""),
        (0, 3, 6, "a 1.2/0.30 b 1.3/0.25"),
        (0, 6, 6, "a 1.2/0.30 b 1.3/0.25"),
    ]
    assert all(e.trial_id == "t1" and e.epochs == tiny_raw["train"]["epochs"] for e in board.events)


def test_a_trial_without_a_study_board_trains_on_without_posting(tiny_raw, tmp_path, monkeypatch):
    import ray

    from kdray.config import load_config

    def missing(name):
        raise ValueError(f"Failed to look up actor with name '{name}'")

    monkeypatch.setattr(ray, "get_actor", missing)
    plan = TrialPlan("study-y", str(tmp_path), tiny_raw, ("method.weights.kl",), "mean_peer")
    reporter = TuneReporter(plan, load_config(tiny_raw), "t1", {"method.weights.kl": 1.0})
    reporter.live(0, 0, 6, None)
    reporter.live(0, 6, 6, None)
    assert reporter._board is False


def test_the_driver_shows_a_bar_per_running_trial_and_records_its_place(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)  # the trial bars are drawn on a terminal only
    progress = StudyProgress(str(tmp_path), epochs=3, verbose=True, total_epochs=6, board="b")
    t1, t2 = SimpleNamespace(trial_id="t1"), SimpleNamespace(trial_id="t2")
    progress.on_trial_start(0, [], t1)
    progress.on_trial_start(0, [], t2)
    progress.on_live([
        TrialLive("t1", 0, 3, 2, 10, "a 1.100/0.40 b 1.200/0.35"),
        TrialLive("t1", 0, 3, 5, 10, "a 0.900/0.55 b 1.000/0.50"),  # the latest of a drain wins
        TrialLive("t2", 1, 3, 7, 10, "a 0.700/0.70 b 0.800/0.66"),
    ])  # fmt: skip
    err = capsys.readouterr().err
    assert "trial t1 epoch 1/3" in err and "a 0.900/0.55 b 1.000/0.50" in err
    assert "trial t2 epoch 2/3" in err and "7/10" in err
    assert progress._trial_bars["t1"].n == 5 and progress._trial_bars["t2"].n == 7
    saved = json.loads((tmp_path / "progress.json").read_text())
    assert saved["t1"]["live"] == {
        "epoch": 1,
        "steps_done": 5,
        "steps": 10,
        "text": "a 0.900/0.55 b 1.000/0.50",
    }
    assert saved["t1"]["live_updates"] == 1 and saved["t2"]["live_updates"] == 1

    progress.on_live([TrialLive("t1", 1, 3, 1, 10, "a 0.8/0.6 b 0.9/0.6")])  # t1 moved on to epoch 2
    assert progress._trial_bars["t1"].n == 1 and "epoch 2/3" in progress._trial_bars["t1"].desc

    progress.on_trial_complete(0, [], t1)
    assert "t1" not in progress._trial_bars and "t2" in progress._trial_bars
    progress.on_live([TrialLive("t1", 2, 3, 4, 10, "late")])  # a late event of an ended trial: ignored
    assert "t1" not in progress._trial_bars
    assert json.loads((tmp_path / "progress.json").read_text())["t1"]["live"]["epoch"] == 2
    progress.on_experiment_end([])
    assert progress._trial_bars == {}


def test_the_driver_state_pickles_without_its_bars_or_board_handle(tmp_path):
    """Tune pickles its callbacks with the experiment: the terminal's bars and the board's handle stay behind, the
    board's name travels (a restored study finds its new board by name)."""
    import pickle

    progress = StudyProgress(str(tmp_path), epochs=2, verbose=True, board="kdray-study-board-s")
    progress.on_trial_start(0, [], SimpleNamespace(trial_id="t1"))
    progress.on_live([TrialLive("t1", 0, 2, 3, 10, "a 1.0/0.5")])
    progress._board_handle = object()
    copy = pickle.loads(pickle.dumps(progress))
    assert copy.board == "kdray-study-board-s" and copy._trial_bars == {} and copy._board_handle is None
    assert copy.trials["t1"]["live"]["steps_done"] == 3
    progress.on_experiment_end([])


@pytest.mark.parametrize("verbose, terminal", [(False, True), (True, False)])
def test_no_trial_bars_when_quiet_or_without_a_terminal(tmp_path, capsys, monkeypatch, verbose, terminal):
    monkeypatch.setattr(sys.stderr, "isatty", lambda: terminal)
    progress = StudyProgress(str(tmp_path), epochs=2, verbose=verbose, board="b")
    progress.on_trial_start(0, [], SimpleNamespace(trial_id="t1"))
    capsys.readouterr()
    progress.on_live([TrialLive("t1", 0, 2, 3, 10, "a 1.0/0.5")])
    assert progress._trial_bars == {} and "trial t1" not in capsys.readouterr().err
    assert json.loads((tmp_path / "progress.json").read_text())["t1"]["live_updates"] == 1


def test_draining_never_starts_ray_and_a_lost_board_ends_the_bars_not_the_study(
    tmp_path, capsys, monkeypatch
):
    import ray

    def no_lookup(name):
        raise AssertionError("ray.get_actor would start a Ray of its own")

    progress = StudyProgress(str(tmp_path), epochs=2, verbose=True, board="b")
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "get_actor", no_lookup)
    progress._drain()  # no Ray: nothing to read, nothing started
    progress.on_trial_complete(0, [], SimpleNamespace(trial_id="t1"))

    def lost(*args, **kwargs):
        raise RuntimeError("The actor died unexpectedly before finishing this task")

    monkeypatch.setattr(ray, "is_initialized", lambda: True)
    progress._board_handle = SimpleNamespace(drain=SimpleNamespace(remote=lambda: "ref"))
    monkeypatch.setattr(ray, "get", lost)
    progress._drain()
    assert progress._board_failed
    assert "live steps are no longer shown (RuntimeError: The actor died" in capsys.readouterr().out
    monkeypatch.setattr(ray, "get", no_lookup)
    progress._drain()  # given up: not asked again


def test_a_restored_driver_starts_from_progress_json(tmp_path):
    """Tune unpickles the callback as it was when the study began; the trials that finished since are in the
    file, and a study from before the live bars gets its board's name from its folder."""
    import pickle

    progress = StudyProgress(str(tmp_path / "s1"), epochs=2, verbose=False, board="kdray-study-board-s1")
    (tmp_path / "s1").mkdir()
    blob = pickle.dumps(progress)  # when the Tuner was built: no trials yet
    progress.on_trial_start(0, [], SimpleNamespace(trial_id="t1"))
    progress.on_trial_complete(0, [], SimpleNamespace(trial_id="t1"))
    restored = pickle.loads(blob)
    assert restored.trials["t1"]["status"] == "stopped"
    old = pickle.loads(blob)
    del old.__dict__["board"]
    assert pickle.loads(pickle.dumps(old)).board == "kdray-study-board-s1"
