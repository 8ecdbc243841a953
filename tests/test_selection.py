"""``data.select_on: last`` (no selection), the last epoch's test accuracy beside the selected one's, and
``data.clean_val`` (the validation split's true labels under label noise)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import kdray
import kdray.loop
from kdray.config import load_config
from kdray.data import build_data


@pytest.fixture
def falling_score(monkeypatch):
    """A selection score that falls every epoch, so that ``val`` selects epoch 1 (the validation split is still
    evaluated: only the number 'best' refers to is replaced)."""
    original = kdray.loop.score
    monkeypatch.setattr(
        kdray.loop, "score", lambda cfg, metrics: original(cfg, metrics) * 0 - metrics["epoch"]
    )


def _train(tiny_raw, out: Path, select_on: str, val_split=32, epochs=3) -> dict:
    tiny_raw["train"]["epochs"] = epochs
    tiny_raw["data"].update(select_on=select_on, val_split=val_split)
    return kdray.train(tiny_raw, out=out).summary


def test_val_selects_the_best_epoch_and_the_last_epoch_is_tested_too(
    tiny_raw, tmp_path, falling_score
) -> None:
    s = _train(tiny_raw, tmp_path / "run", "val")
    assert s["best"]["epoch"] == 1 and s["test"]["checkpoint"] == "best.pt" and s["test"]["epoch"] == 1
    last = s["test"]["last"]
    assert last["epoch"] == 3 and last["checkpoint"] == "last.pt" and last["same_as_selected"] is False
    ckpts = tmp_path / "run" / "checkpoints"
    for name, reported in (("best.pt", s["test"]), ("last.pt", last)):
        again = kdray.evaluate(ckpts / name, split="test")
        assert reported["peers"] == {p["name"]: p["acc"] for p in again["peers"]}
        assert reported["ensemble_acc"] == again["ensemble_acc"]
    assert (
        s["peers"][0]["test_acc"] == s["test"]["peers"]["peer0"]
    )  # the peers' test_acc stays the selected one


def test_select_on_last_keeps_the_last_epoch_and_still_evaluates_validation(
    tiny_raw, tmp_path, falling_score
) -> None:
    s = _train(tiny_raw, tmp_path / "run", "last")
    assert s["best"]["epoch"] == 3 and s["test"]["epoch"] == 3 and s["selection"]["split"] == "last"
    assert s["test"]["last"]["same_as_selected"] is True and s["test"]["last"]["peers"] == s["test"]["peers"]
    assert all("peer0/val_acc" in h for h in s["history"])  # the curves are still there
    best = torch.load(tmp_path / "run" / "checkpoints" / "best.pt", weights_only=True)
    assert best["epoch"] == 3


def test_select_on_last_without_a_validation_split(tiny_raw, tmp_path) -> None:
    s = _train(tiny_raw, tmp_path / "run", "last", val_split=0, epochs=2)
    assert s["best"]["epoch"] == 2 and s["test"]["epoch"] == 2
    assert not any(k.endswith("/val_acc") for h in s["history"] for k in h)
    with pytest.raises(kdray.KdrayError, match="select_on"):  # 'val' still needs a split to select on
        load_config({**tiny_raw, "data": {**tiny_raw["data"], "val_split": 0, "select_on": "val"}})


@pytest.mark.parametrize("clean_val", [False, True])
def test_clean_val_keeps_the_validation_split_true_labels(tiny_raw, clean_val: bool) -> None:
    noisy = {**tiny_raw["data"], "label_noise": {"kind": "symmetric", "rate": 0.5}, "clean_val": clean_val}
    clean = {**tiny_raw["data"], "clean_val": clean_val}
    with_noise = build_data(load_config({**tiny_raw, "data": noisy}).data, seed=0)
    without = build_data(load_config({**tiny_raw, "data": clean}).data, seed=0)
    val_noisy, val_true = with_noise.splits["val"][1], without.splits["val"][1]
    changed = int((val_noisy != val_true).sum())
    assert changed == 0 if clean_val else changed > 5  # 32 validation labels, half of them corrupted
    # the training labels are the same noisy ones either way
    other = build_data(load_config({**tiny_raw, "data": {**noisy, "clean_val": not clean_val}}).data, seed=0)
    assert torch.equal(other.splits["train"][1], with_noise.splits["train"][1])
