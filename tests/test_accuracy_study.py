"""The accuracy study's runner copies a run only when it trained exactly the row's config: a tuned row whose winner
is its method's defaults takes the defaults row's records; any other winner is trained."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks import accuracy_study as study  # noqa: E402

ACN_DEFAULTS = {
    "method.weights.kl": 1.0,
    "method.weights.kl_div": 1.0,
    "method.weights.gen": 1.0,
    "method.temperature": 1.0,
    "method.eps": 0.1,
    "method.radius": 0.05,
    "method.gen_optimizer.lr": 0.001,
    "train.optimizer.lr": 0.1,
}


def _setup(tmp_path: Path) -> tuple[argparse.Namespace, Path, study.Row]:
    args = argparse.Namespace(
        out=str(tmp_path), data=str(tmp_path / "data"), epochs=None, device="cpu", threads=1
    )
    path = tmp_path / "adversarial.jsonl"
    rows = {r.key: r for r in study.ROWS if r.study == "adversarial"}
    defaults = rows["noise20/acn"]
    record = {"study": "adversarial", "regime": "noise20", "label": "acn", "seed": 0, "peers": {}}
    record["config"] = study.config(defaults, 0, args)
    path.write_text(json.dumps(record) + "\n")
    return args, path, rows["noise20/acn tuned"]


def test_a_tuned_row_whose_winner_is_the_defaults_reuses_the_defaults_runs(tmp_path: Path) -> None:
    args, path, tuned_row = _setup(tmp_path)
    tuned = {"values": dict(ACN_DEFAULTS), "trial_id": "t0", "objective": 0.689}

    assert study.reuse(tuned_row, 0, args, path, tuned)

    copied = json.loads(path.read_text().splitlines()[-1])
    assert (copied["label"], copied["reused_from"], copied["seed"]) == ("acn tuned", "adversarial/acn", 0)
    assert copied["tuned"]["values"] == ACN_DEFAULTS and copied["tuned"]["trial_id"] == "t0"
    assert copied["config"]["method"]["weights"]["kl_div"] == 1.0  # the tuned row's own config, written out


def test_a_tuned_row_with_another_winner_or_seed_is_trained(tmp_path: Path) -> None:
    args, path, tuned_row = _setup(tmp_path)
    before = path.read_text()

    other = {"values": {**ACN_DEFAULTS, "method.eps": 0.11}, "trial_id": "t1", "objective": 0.69}
    assert not study.reuse(tuned_row, 0, args, path, other)
    assert not study.reuse(tuned_row, 1, args, path, {"values": dict(ACN_DEFAULTS)})  # no run of seed 1
    assert not study.reuse(tuned_row, 0, args, path, None)  # untuned: nothing to compare
    assert path.read_text() == before


def test_the_committed_tuned_winners_are_read_back_without_tuning_again(tmp_path: Path, monkeypatch) -> None:
    """Every winner kept in benchmarks/results/studies/adversarial_tuned.json still matches its row's config and
    study settings (settings added to kdray tune since, at their defaults, included): a fresh clone trains the
    tuned seeds without running a study."""
    import shutil

    import kdray.search.study

    kept = Path(study.REPO) / "benchmarks" / "results" / "studies" / "adversarial_tuned.json"
    shutil.copy(kept, tmp_path / kept.name)
    args = argparse.Namespace(
        out=str(tmp_path), data=str(tmp_path / "data"), epochs=None, device="auto", threads=1, workers=2
    )

    def no_study(*a, **k):
        raise AssertionError("a study ran")

    monkeypatch.setattr(kdray.search.study, "run_study", no_study)
    winners = json.loads(kept.read_text())
    rows = {r.key: r for r in study.ROWS if r.study == "adversarial"}
    assert winners
    for key, entry in winners.items():
        assert study.tuned_values(rows[key], args) == entry["best"], key
    assert (tmp_path / kept.name).read_text() == kept.read_text()  # nothing rewritten


def test_the_selected_val_acc_is_the_selection_score_not_each_peers_best() -> None:
    """Two peers that peak at different epochs: the run selected epoch 2 (mean 0.75), not the 0.8 of averaging each
    peer's own best (0.9 at epoch 3 and 0.7 at epoch 2). A record that kept ``selection_score`` is read as is."""
    record = {
        "best_epoch": 2,
        "val_curve": {"a": [0.5, 0.8, 0.9], "b": [0.5, 0.7, 0.5]},
        "peers": {"a": {"best_val_acc": 0.9}, "b": {"best_val_acc": 0.7}},
    }
    from kdray.compare.table import selection_score

    assert selection_score(record) == pytest.approx(0.75)
    assert selection_score({**record, "selection_score": 0.6}) == 0.6
