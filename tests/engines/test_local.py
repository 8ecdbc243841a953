"""LocalEngine: agrees with a hand-written loop, is deterministic, resumes exactly, feeds every peer the same batch."""

from __future__ import annotations

import copy
import json
import sys

import pytest
import torch

import kdray
from kdray.checkpoint import load_checkpoint
from kdray.config import load_config
from kdray.methods import METHODS
from kdray.methods.dml import DML
from kdray.population import Population
from kdray.step import StepRunner
from tests.helpers import train_until_stopped

sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[2]))
from benchmarks.reference_dml import train_reference  # noqa: E402


def _params(payload_or_proc) -> dict[str, torch.Tensor]:
    if isinstance(payload_or_proc, Population):
        return {
            f"{p.name}.{n}": t.detach().clone()
            for p in payload_or_proc.peers
            for n, t in p.net.model.state_dict().items()
        }
    return {f"{name}.{n}": t for name, sd in payload_or_proc["peers"].items() for n, t in sd["net"].items()}


@pytest.mark.parametrize("k", [2, 3])
def test_dml_step_equals_hand_written_loop(tiny_raw, k):
    """K = 3 and T = 2: a 1/(K-1) slip, a missing T^2 or a KL with swapped arguments would fail (float64: the
    comparison holds to 1e-10 on any CPU)."""
    tiny_raw["peers"] = [{"arch": "resnet8", "arch_kwargs": {"width": 4}} for _ in range(k)]
    tiny_raw["train"].update(steps_per_epoch=4, dtype="float64")
    tiny_raw["method"]["temperature"] = 2.0
    cfg = load_config(tiny_raw)
    pop = Population(cfg)
    for i, batch in enumerate(pop.batches(0)):
        StepRunner(pop).step(batch, 0, i)
    nets = train_reference(cfg, pop.data, 4, dtype=torch.float64)
    for peer, net in zip(pop.peers, nets):
        ref = dict(net.named_parameters())
        for name, value in peer.net.model.named_parameters():
            assert torch.allclose(value, ref[name], atol=1e-10, rtol=0), name


def test_dml_gradients_reach_only_the_peer_itself(tiny_raw):
    cfg = load_config(tiny_raw)
    pop = Population(cfg)
    batch = next(iter(pop.data.train_batches(0)))
    outs = [p.net(batch.x) for p in pop.peers]
    method = pop.method
    from kdray.methods.base import PeerContext, Phase

    phase = Phase("main")
    ctx = PeerContext(
        0, "main", outs[0], {1: {"logits": outs[1]["logits"].detach()}}, {}, batch, batch.x, None, None, 0, 0
    )
    loss = sum(method.weight(t) * v for t, v in method.loss(phase, ctx).items())
    loss.backward()
    assert all(p.grad is not None for p in pop.peers[0].net.parameters())
    assert all(p.grad is None for p in pop.peers[1].net.parameters())


def test_same_seed_same_result_and_different_seed_differs(tiny_raw, tmp_path):
    a = kdray.train(tiny_raw, out=tmp_path / "a")
    b = kdray.train(tiny_raw, out=tmp_path / "b")
    c = kdray.train(tiny_raw, overrides=["seed=1"], out=tmp_path / "c")
    pa, pb, pc = (_params(load_checkpoint(r.checkpoint)) for r in (a, b, c))
    assert all(torch.equal(pa[k], pb[k]) for k in pa)
    assert any(not torch.equal(pa[k], pc[k]) for k in pa if pa[k].is_floating_point())
    assert a.summary["peers"][0]["val_acc"] == b.summary["peers"][0]["val_acc"]


@pytest.mark.parametrize("method", ["dml", "afd", "acn"])
@pytest.mark.parametrize("cut", ["epoch", "mid-epoch"])
def test_resume_equals_uninterrupted(tiny_raw, tmp_path, method, cut):
    """Stop after epoch 1, or inside epoch 2 (a mid-epoch checkpoint), resume: the same parameters, method state,
    shared generator, schedulers and per-epoch metrics as one uninterrupted run."""
    tiny_raw["method"] = {"name": method}
    tiny_raw["train"]["epochs"] = 2
    tiny_raw["train"]["steps_per_epoch"] = 4
    part = copy.deepcopy(tiny_raw)
    if cut == "epoch":
        # a 1-epoch run resumed with epochs=2 follows the 2-epoch plan from where it stands: with a constant rate
        # that is the uninterrupted run exactly (a cosine would jump at the resume point)
        tiny_raw["train"]["schedule"] = part["train"]["schedule"] = {"name": "constant"}
        part["train"]["epochs"] = 1
        kdray.train(part, out=tmp_path / "part")
    else:
        # stop inside epoch 2, after its 2nd step (the checkpoint written every 2 steps is the last one)
        part["train"]["checkpoint_every_steps"] = 2
        train_until_stopped(part, tmp_path / "part", steps_done=6)
        assert load_checkpoint(tmp_path / "part")["progress"]["step_in_epoch"] == 2
    full = kdray.train(tiny_raw, out=tmp_path / "full")
    resumed = kdray.train(tiny_raw, resume=tmp_path / "part")
    assert resumed.out_dir == tmp_path / "part"
    full_ck, res_ck = load_checkpoint(full.checkpoint), load_checkpoint(resumed.checkpoint)
    assert res_ck["epoch"] == 2 and res_ck["step"] == full_ck["step"] == 8
    pf, pr = _params(full_ck), _params(res_ck)
    assert pf.keys() == pr.keys()
    for k in pf:
        assert torch.equal(pf[k], pr[k]), k
    for name in full_ck["peers"]:  # method state, optimizers' moments and schedulers too
        for key, value in full_ck["peers"][name]["state"].items():
            assert torch.equal(value, res_ck["peers"][name]["state"][key]), key
        for group, opt in full_ck["peers"][name]["optimizers"].items():  # the replayed schedules: same rates
            assert opt["param_groups"] == res_ck["peers"][name]["optimizers"][group]["param_groups"], group
    if full_ck["shared"] is not None:
        for key, value in full_ck["shared"]["module"].items():
            assert torch.equal(value, res_ck["shared"]["module"][key]), key
    assert [h["epoch"] for h in res_ck["history"]] == [1, 2]
    for got, want in zip(res_ck["history"], full_ck["history"]):
        assert {k: v for k, v in got.items() if k != "train/step_ms"} == {
            k: v for k, v in want.items() if k != "train/step_ms"
        }


class RecordingDML(DML):
    """DML that records, per peer, the sample indices its loss saw."""

    name = "recording_dml"
    seen: dict[int, list[torch.Tensor]] = {}

    def loss(self, phase, ctx):
        RecordingDML.seen.setdefault(ctx.k, []).append(ctx.batch.index.clone())
        return super().loss(phase, ctx)


def test_all_peers_receive_identical_batches(tiny_raw, tmp_path, monkeypatch):
    monkeypatch.setitem(METHODS, "recording_dml", RecordingDML)
    RecordingDML.seen = {}
    tiny_raw["method"] = {"name": "recording_dml"}
    tiny_raw["peers"].append(copy.deepcopy(tiny_raw["peers"][0]))
    kdray.train(tiny_raw, out=tmp_path / "r")
    seen = RecordingDML.seen
    assert sorted(seen) == [0, 1, 2]
    assert len(seen[0]) == 96 // 16
    for k in (1, 2):
        assert all(torch.equal(a, b) for a, b in zip(seen[0], seen[k]))
    assert len(torch.cat(seen[0]).unique()) == 96  # a permutation: every training sample once per epoch


def test_kd_leaves_the_teacher_unchanged(tiny_raw, tmp_path):
    teacher_raw = copy.deepcopy(tiny_raw)
    teacher_raw["peers"] = [{"name": "t", "arch": "resnet14", "arch_kwargs": {"width": 4}}]
    teacher_raw["method"] = {"name": "independent"}
    teacher = kdray.train(teacher_raw, out=tmp_path / "teacher")
    tiny_raw["method"] = {"name": "kd", "temperature": 4.0}
    tiny_raw["peers"] = [
        {
            "name": "teacher",
            "arch": "resnet14",
            "arch_kwargs": {"width": 4},
            "frozen": True,
            "checkpoint": str(teacher.out_dir),
        },
        {"name": "student", "arch": "resnet8", "arch_kwargs": {"width": 4}},
    ]
    student = kdray.train(tiny_raw, out=tmp_path / "kd")
    before = load_checkpoint(teacher.checkpoint)["peers"]["t"]["net"]
    after = load_checkpoint(student.checkpoint)["peers"]["teacher"]["net"]
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)  # BN running stats included: eval mode
    summary = json.loads((student.out_dir / "summary.json").read_text())
    assert summary["peers"][0]["val_acc"] == pytest.approx(teacher.summary["peers"][0]["val_acc"])
    assert summary["peers"][0]["test_acc"] == pytest.approx(teacher.summary["peers"][0]["test_acc"])
    assert "student/loss_kd" in summary["history"][-1]
