"""The one loop: honest epoch means, per-sample buffers, populations fed by a generator, stops at a safe point."""

from __future__ import annotations

import copy

import pytest
import torch

import kdray
from kdray.checkpoint import load_checkpoint
from kdray.config import load_config
from kdray.loop import InProcess, Progress, train_epochs
from kdray.methods import METHODS
from kdray.metrics import MetricSums
from kdray.population import Population
from kdray.step import StepRunner
from tests.toy_methods import TOY_METHODS, ToyMemory


@pytest.fixture
def toys(monkeypatch):
    for name, cls in TOY_METHODS.items():
        monkeypatch.setitem(METHODS, name, cls)


class RecordingSink:
    """A sink that keeps every step's metrics."""

    def __init__(self):
        self.steps: list[dict[str, float]] = []
        self.epochs: list[dict[str, float]] = []

    def epoch_started(self, epoch, start_step, steps):
        pass

    def step_done(self, epoch, step_in_epoch, step, metrics: MetricSums):
        self.steps.append(metrics.means())

    def checkpointed(self, own, progress, path):
        pass

    def epoch_done(self, metrics, progress, path):
        self.epochs.append(metrics)

    def stop_requested(self):
        return False


def test_a_term_reported_every_third_step_is_logged_at_its_true_mean(tiny_raw, tmp_path):
    """AFD's adversarial term with ``adv_every: 3`` is computed at steps 0 and 3 of 6: its epoch value is the mean
    of those two, not their sum over 6 (the discriminator's, every lcm(3, 2) = 6 steps, is its one value)."""
    tiny_raw["method"] = {"name": "afd", "adv_every": 3, "disc_every": 2}
    pop = Population(load_config(tiny_raw))
    sink = RecordingSink()
    train_epochs(pop, StepRunner(pop), Progress(), InProcess(), sink, tmp_path, {"config": {}})
    adv = [s["peer0/loss_adv"] for s in sink.steps if "peer0/loss_adv" in s]
    disc = [s["peer0/loss_disc"] for s in sink.steps if "peer0/loss_disc" in s]
    assert len(sink.steps) == 6 and len(adv) == 2 and len(disc) == 1
    epoch = sink.epochs[0]
    assert epoch["peer0/loss_adv"] == pytest.approx(sum(adv) / 2, rel=1e-6)
    assert epoch["peer0/loss_disc"] == pytest.approx(disc[0], rel=1e-6)
    ce = [s["peer0/loss_ce"] for s in sink.steps]
    assert epoch["peer0/loss_ce"] == pytest.approx(sum(ce) / 6, rel=1e-6)


# ------------------------------------------------------------------------------------------ per-sample buffers
def test_buffer_rows_are_written_at_the_batch_indices_and_restored_exactly(tiny_raw, tmp_path, toys):
    tiny_raw["method"] = {"name": "toy_memory"}
    tiny_raw["train"].update(epochs=2, steps_per_epoch=4, checkpoint_every_steps=2)
    ToyMemory.written = []
    full = kdray.train(tiny_raw, out=tmp_path / "full")
    memory = load_checkpoint(full.checkpoint)["peers"]["peer1"]["buffers"]["memory"]
    pop = Population(load_config(tiny_raw))
    expected = torch.nn.functional.one_hot(pop.data.train_labels(), 4).float()  # initialised to the labels
    for k, index, rows in ToyMemory.written:
        if k == 1:
            expected[index] = rows  # batches are shuffled: rows land where the batch's samples are
    assert torch.equal(memory, expected)
    written = torch.cat([i for k, i, _ in ToyMemory.written if k == 1]).unique()
    untouched = torch.ones(len(expected), dtype=torch.bool)
    untouched[written] = False
    assert untouched.any() and torch.equal(memory[untouched].argmax(1), pop.data.train_labels()[untouched])

    # stop in epoch 2 after a mid-epoch checkpoint, resume: the memory and everything else as uninterrupted
    from tests.helpers import train_until_stopped

    train_until_stopped(copy.deepcopy(tiny_raw), tmp_path / "part", steps_done=6)
    resumed = load_checkpoint(kdray.train(tiny_raw, resume=tmp_path / "part").checkpoint)
    reference = load_checkpoint(full.checkpoint)
    for name in ("peer0", "peer1"):
        assert torch.equal(
            resumed["peers"][name]["buffers"]["memory"], reference["peers"][name]["buffers"]["memory"]
        )
        for key, value in reference["peers"][name]["net"].items():
            assert torch.equal(resumed["peers"][name]["net"][key], value), key


def test_buffer_dtype_is_a_choice(tiny_raw, toys):
    tiny_raw["method"] = {"name": "toy_memory", "memory_dtype": "float16"}
    pop = Population(load_config(tiny_raw))
    assert pop.peers[0].buffers["memory"].dtype == torch.float16
    assert pop.peers[0].buffers["memory"].shape == (96, 4)
    batch = next(iter(pop.batches(0)))
    StepRunner(pop).step(batch, 0, 0)
    rows = pop.peers[0].buffers["memory"][batch.index]
    assert torch.allclose(rows.float().sum(1), torch.ones(16), atol=2e-3)  # softmax rows, stored in half


# ------------------------------------------------------------------------------- populations without data
def _generated(tiny_raw) -> dict:
    raw = copy.deepcopy(tiny_raw)
    raw["method"] = {"name": "toy_generated"}
    raw["train"].update(epochs=2, steps_per_epoch=3)
    return raw


def test_a_generator_fed_population_trains_without_a_training_set(tiny_raw, tmp_path, toys):
    raw = _generated(tiny_raw)
    pop = Population(load_config(raw))
    assert pop.data.spec.train_len == 0 and pop.steps_per_epoch == 3 and pop.data.spec.val_len == 32
    shared = pop.shared
    optimised = {id(p) for g in shared.optimizer.param_groups for p in g["params"]}
    assert optimised == {id(p) for p in shared.module["gen"].parameters()}  # the EMA copy is in no optimizer
    ema = [t.clone() for t in shared.module["ema"].parameters()]
    StepRunner(pop).step(None, 0, 0)
    gen = list(shared.module["gen"].parameters())
    for before, after, g in zip(ema, shared.module["ema"].parameters(), gen):
        assert torch.allclose(after, 0.9 * before + 0.1 * g, rtol=1e-6, atol=1e-7)  # the EMA update
    result = kdray.train(raw, out=tmp_path / "run")
    # the generator's samples after every epoch, as a grid: samples/epoch<k>.png and samples.png (the latest)
    assert sorted(p.name for p in (tmp_path / "run" / "samples").iterdir()) == [
        "epoch001.png",
        "epoch002.png",
    ]
    assert (tmp_path / "run" / "samples.png").read_bytes() == (
        tmp_path / "run" / "samples" / "epoch002.png"
    ).read_bytes()
    last = result.summary["history"][-1]
    assert "peer0/train_acc" not in last and "shared/loss_gen" in last and "peer0/loss_agree" in last
    assert result.summary["peers"][0]["test_acc"] is not None  # evaluated on real data


def test_a_generator_fed_population_resumes_exactly(tiny_raw, tmp_path, toys):
    from tests.helpers import train_until_stopped

    raw = _generated(tiny_raw)
    full = load_checkpoint(kdray.train(raw, out=tmp_path / "full").checkpoint)
    part = copy.deepcopy(raw)
    part["train"]["checkpoint_every_steps"] = 1
    train_until_stopped(part, tmp_path / "part", steps_done=4)
    resumed = load_checkpoint(kdray.train(raw, resume=tmp_path / "part").checkpoint)
    for key, value in full["shared"]["module"].items():
        assert torch.equal(resumed["shared"]["module"][key], value), key
    for name in full["peers"]:
        for key, value in full["peers"][name]["net"].items():
            assert torch.equal(resumed["peers"][name]["net"][key], value), key


def test_expected_calibration_error_by_hand():
    """Two bins used: confidences 0.95 (correct) and 0.95 (wrong) in bin 14, 0.55 (correct) in bin 8:
    ECE = 2/3 |0.5 - 0.95| + 1/3 |1 - 0.55| = 0.45."""
    from kdray.evaluation import calibration_sums, expected_calibration_error

    probs = torch.tensor([[0.95, 0.05], [0.05, 0.95], [0.55, 0.45]])
    labels = torch.tensor([0, 0, 0])
    sums = calibration_sums(probs, labels)
    assert sums[0, 14] == 2 and sums[0, 8] == 1
    assert expected_calibration_error(sums) == pytest.approx(2 / 3 * 0.45 + 1 / 3 * 0.45)
    # sums add up over batches: the ECE of two halves' sums is that of the whole
    halves = calibration_sums(probs[:2], labels[:2]) + calibration_sums(probs[2:], labels[2:])
    assert expected_calibration_error(halves) == pytest.approx(expected_calibration_error(sums))


def test_a_collapsing_generator_is_named_in_a_warning():
    from kdray.engines.display import epoch_warnings

    healthy = {"epoch": 3, "teacher/collapse": 0.1, "teacher/gen_top_share": 0.4}
    assert epoch_warnings(healthy) == []
    (line,) = epoch_warnings({"epoch": 3, "teacher/collapse": 0.8, "teacher/gen_top_share": 0.97})
    assert "epoch 3" in line and "80% of the steps" in line and "97%" in line and "gen_optimizer.lr" in line
