"""Born-again generations: each generation's teacher is the previous one's final weights, frozen; a stop inside
generation 3 resumes there; the ensemble of generations is the mean of their stored softmaxes."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

import kdray
from kdray.checkpoint import load_checkpoint
from kdray.errors import ConfigError
from kdray.generations import ensemble_accuracies, expand_generations
from tests.helpers import train_until_stopped


def _born_again(tiny_raw, count: int = 3, **gens) -> dict:
    raw = copy.deepcopy(tiny_raw)
    raw["peers"] = [{"name": "net", "arch": "resnet8", "arch_kwargs": {"width": 4}}]
    raw["method"] = {"name": "independent"}
    raw["train"].update(epochs=2, steps_per_epoch=3, checkpoint_every_steps=1)
    raw["generations"] = {"count": count, **gens}
    return raw


def test_ensemble_of_generations_by_hand():
    labels = torch.tensor([0, 1, 1])
    g1 = torch.tensor([[0.9, 0.1], [0.6, 0.4], [0.2, 0.8]])  # right, wrong, right: 2/3
    g2 = torch.tensor([[0.3, 0.7], [0.1, 0.9], [0.45, 0.55]])  # wrong, right, right: 2/3
    alone, ensemble = ensemble_accuracies([g1, g2], labels)
    assert alone == pytest.approx([2 / 3, 2 / 3])
    # mean: [0.6, 0.4] right, [0.35, 0.65] right, [0.325, 0.675] right
    assert ensemble == pytest.approx([2 / 3, 1.0])


def test_each_generation_learns_from_the_previous_ones_final_weights(tiny_raw, tmp_path):
    result = kdray.train(_born_again(tiny_raw), out=tmp_path / "ban")
    stages = tmp_path / "ban" / "stages"
    for k in (2, 3):
        before = load_checkpoint(stages / f"gen{k - 1}" / "checkpoints" / "last.pt")["peers"]["net"]["net"]
        after = load_checkpoint(stages / f"gen{k}" / "checkpoints" / "last.pt")["peers"][f"gen{k - 1}_net"][
            "net"
        ]
        assert before.keys() == after.keys()
        # the previous generation's final weights, untouched by training generation k (BN statistics included)
        assert all(torch.equal(before[name], after[name]) for name in before)
    summary = json.loads((tmp_path / "ban" / "summary.json").read_text())
    report = summary["generations"]
    assert report["generations"] == ["gen1", "gen2", "gen3"] and len(report["ensemble_test_acc"]) == 3
    assert (tmp_path / "ban" / "generations.png").is_file()
    # the stored predictions reproduce each generation's test accuracy (evaluated once from best.pt)
    for k in (1, 2, 3):
        run = json.loads((stages / f"gen{k}" / "summary.json").read_text())
        assert report["test_acc"][k - 1] == pytest.approx(run["ensemble_test_acc"])
    # and the born-again ensemble is the mean of the stored softmaxes, recomputed here by hand
    stored = [torch.load(stages / f"gen{k}" / "predictions.pt", weights_only=True) for k in (1, 2, 3)]
    for split in ("val", "test"):
        labels = stored[0][f"{split}_labels"]
        for k in (1, 2, 3):
            mean = sum(s[f"{split}_probs"] for s in stored[:k]) / k
            want = (mean.argmax(1) == labels).double().mean().item()
            assert report[f"ensemble_{split}_acc"][k - 1] == pytest.approx(want, abs=1e-12)
    assert result.summary["method"] == "kd"


def test_soft_targets_only_is_a_switch(tiny_raw):
    staged = expand_generations(_born_again(tiny_raw, labels=False))
    assert staged["stages"][1]["method"]["weights"]["ce"] == 0.0
    assert [p["name"] for p in staged["stages"][2]["peers"]] == ["gen2_net", "net"]
    with pytest.raises(ConfigError, match="generations.count"):
        expand_generations(_born_again(tiny_raw, count=1))
    short = {**_born_again(tiny_raw), "generations": 3}  # a bare count stands for {count: 3}
    assert expand_generations(short) == expand_generations({**short, "generations": {"count": 3}})
    with pytest.raises(ConfigError, match="a count such as 4"):
        expand_generations({**short, "generations": "three"})


def test_a_generation_can_teach_from_its_selected_epoch(tiny_raw):
    """``teacher_checkpoint: best`` hands every generation's teachers the previous generation's ``best.pt``
    (``last``, the default, its ``last.pt``, as the paper's schedule does); anything else is refused with the key."""
    from kdray.stages import _resolved, stage_configs

    def teacher_files(staged_raw) -> list[str]:
        return [
            Path(_resolved(cfg, Path("/r"), "file:/u").peers[0].checkpoint).relative_to("/r").as_posix()
            for _, cfg in stage_configs(staged_raw)[1:]
        ]

    default = expand_generations(_born_again(tiny_raw))
    assert teacher_files(default) == ["stages/gen1/checkpoints/last.pt", "stages/gen2/checkpoints/last.pt"]
    best = expand_generations(_born_again(tiny_raw, teacher_checkpoint="best"))
    assert [
        p["from_stage_checkpoint"] for s in best["stages"][1:] for p in s["peers"] if p.get("frozen")
    ] == [
        "best",
        "best",
    ]
    with pytest.raises(
        ConfigError, match=r"peers\.0\.from_stage_checkpoint.*best"
    ):  # best.pt not written yet
        teacher_files(best)
    with pytest.raises(ConfigError, match=r"generations\.teacher_checkpoint.*last \(each generation"):
        expand_generations(_born_again(tiny_raw, teacher_checkpoint="final"))


def test_teacher_checkpoint_best_trains_each_generation_from_the_previous_ones_selected_weights(
    tiny_raw, tmp_path
):
    kdray.train(_born_again(tiny_raw, count=2, teacher_checkpoint="best"), out=tmp_path / "ban")
    stages = tmp_path / "ban" / "stages"
    best = load_checkpoint(stages / "gen1" / "checkpoints" / "best.pt")["peers"]["net"]["net"]
    frozen = load_checkpoint(stages / "gen2" / "checkpoints" / "last.pt")["peers"]["gen1_net"]["net"]
    assert all(torch.equal(best[name], frozen[name]) for name in best)


def test_a_stop_in_generation_three_resumes_there(tiny_raw, tmp_path):
    raw = _born_again(tiny_raw)
    train_until_stopped(raw, tmp_path / "ban", steps_done=5, run="tiny-gen3")
    stages = tmp_path / "ban" / "stages"
    stamps = {k: (stages / f"gen{k}" / "checkpoints" / "last.pt").stat().st_mtime_ns for k in (1, 2)}
    resumed = kdray.train(None, resume=tmp_path / "ban")
    assert {k: (stages / f"gen{k}" / "checkpoints" / "last.pt").stat().st_mtime_ns for k in (1, 2)} == stamps
    full = kdray.train(raw, out=tmp_path / "full")
    got = load_checkpoint(resumed.checkpoint)["peers"]["net"]["net"]
    want = load_checkpoint(full.checkpoint)["peers"]["net"]["net"]
    assert all(torch.equal(got[k], want[k]) for k in want)


def test_every_generation_starts_from_weights_of_its_own(tiny_raw, tmp_path):
    """Generation k's students are seeded apart (init_seed k), so no two generations start from the same weights;
    the run seed (validation split, batch order) is shared. Generation 1 keeps the plain config's initialisation."""
    from kdray.config import validate
    from kdray.population import Population

    staged = expand_generations(_born_again(tiny_raw, count=4))
    assert [p.get("init_seed") for p in staged["stages"][1]["peers"]] == [None, 2]
    assert {s["seed"] if "seed" in s else staged["seed"] for s in staged["stages"]} == {tiny_raw["seed"]}

    def initial(stage):
        raw = {k: v for k, v in staged.items() if k != "stages"}
        raw.update(method={"name": "independent"}, peers=[p for p in stage["peers"] if not p.get("frozen")])
        cfg = validate(raw)
        pop = Population(cfg, device=torch.device("cpu"))
        return {k: v.clone() for k, v in pop.peers[0].net.model.state_dict().items()}

    starts = [initial(s) for s in staged["stages"]]
    plain = copy.deepcopy(tiny_raw)
    plain["peers"] = [{"name": "net", "arch": "resnet8", "arch_kwargs": {"width": 4}}]
    assert all(torch.equal(starts[0][k], v) for k, v in initial({"peers": plain["peers"]}).items())
    convs = [k for k in starts[0] if k.endswith("weight") and starts[0][k].dim() == 4]
    for a in range(4):
        for b in range(a + 1, 4):
            assert not torch.equal(starts[a][convs[0]], starts[b][convs[0]]), (a + 1, b + 1)
    with pytest.raises(ConfigError, match="generations.labels"):
        expand_generations(_born_again(tiny_raw, labels=0))


def test_a_kd_method_for_the_generations_keeps_the_born_again_defaults(tiny_raw):
    staged = expand_generations(_born_again(tiny_raw, method={"name": "kd", "temperature": 2.0}))
    assert staged["stages"][1]["method"] == {
        "name": "kd",
        "temperature": 2.0,
        "weights": {"ce": 1.0, "kd": 1.0},
    }
    soft = expand_generations(_born_again(tiny_raw, labels=False, method={"weights": {"kd": 0.5}}))
    assert soft["stages"][2]["method"] == {
        "name": "kd",
        "temperature": 1.0,
        "weights": {"ce": 0.0, "kd": 0.5},
    }


def test_a_staged_resume_refuses_to_change_seed_data_or_epochs(tiny_raw, tmp_path):
    raw = _born_again(tiny_raw, count=2)
    train_until_stopped(raw, tmp_path / "ban", steps_done=4, run="tiny-gen2")
    for item in ("seed=1", "data.val_split=16", "train.epochs=5", "peers.0.arch=resnet14"):
        with pytest.raises(ConfigError, match="continues with the seed, data, epochs"):
            kdray.train(None, overrides=[item], resume=tmp_path / "ban")
    kdray.train(None, overrides=["train.progress=false"], resume=tmp_path / "ban")  # other keys may change
    summary = json.loads((tmp_path / "ban" / "summary.json").read_text())
    assert summary["generations"]["generations"] == ["gen1", "gen2"]
