"""Per-step learning-rate schedules: torch's own schedulers, stepped every step; auxiliary optimizers follow the
network's schedule or keep their rate, as their config says."""

from __future__ import annotations

import math

import pytest
import torch
from torch.optim.lr_scheduler import CosineAnnealingLR, LinearLR, MultiStepLR, SequentialLR

from kdray.config import load_config
from kdray.population import Population
from kdray.step import StepRunner


def _lrs(pop: Population, group: str = "net") -> list[float]:
    """The learning rate each step of the run trains with (read before the step)."""
    out = []
    for epoch in range(pop.cfg.train.epochs):
        for i, batch in enumerate(pop.batches(epoch)):
            out.append(pop.peers[0].optimizers[group].param_groups[0]["lr"])
            StepRunner(pop).step(batch, epoch, epoch * pop.steps_per_epoch + i)
    return out


def _reference(schedule, total: int, steps_per_epoch: int, lr: float = 0.05) -> list[float]:
    """The same schedule written directly against torch (one optimizer, one parameter)."""
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    warm = round(schedule.get("warmup_epochs", 0) * steps_per_epoch) + schedule.get("warmup_steps", 0)
    if schedule["name"] == "cosine":
        main = CosineAnnealingLR(opt, T_max=total - warm)
    else:
        main = MultiStepLR(opt, [m * steps_per_epoch - warm for m in schedule["milestones"]], gamma=0.1)
    sched = SequentialLR(opt, [LinearLR(opt, 0.1, 1.0, total_iters=warm), main], [warm]) if warm else main
    out = []
    for _ in range(total):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


@pytest.mark.parametrize(
    "schedule",
    [
        {"name": "cosine"},
        {"name": "cosine", "warmup_epochs": 0.5},
        {"name": "multistep", "milestones": [1, 2], "warmup_steps": 1},
    ],
)
def test_per_step_schedule_equals_torch_reference(tiny_raw, schedule):
    tiny_raw["train"].update(epochs=3, steps_per_epoch=4, schedule=schedule)
    pop = Population(load_config(tiny_raw))
    got = _lrs(pop)
    want = _reference(schedule, 12, 4)
    assert got == pytest.approx(want, rel=1e-12, abs=1e-15)
    if schedule == {"name": "cosine"}:  # and the closed form: it anneals inside a 3-epoch run, step by step
        assert got == pytest.approx([0.05 * 0.5 * (1 + math.cos(math.pi * t / 12)) for t in range(12)])
    if schedule.get("warmup_epochs"):
        assert got[0] == pytest.approx(0.005) and got[2] == pytest.approx(0.05)  # 10% -> 100% over 2 steps


def test_auxiliary_optimizers_follow_or_keep_their_rate(tiny_raw):
    """AFD's adversarial optimizer follows the network's schedule (``schedule: follow``); its discriminator's
    keeps its rate (``constant``): after a cosine run to 0 the one is near 0, the other untouched."""
    tiny_raw["method"] = {"name": "afd", "disc_optimizer": {"lr": 3e-4}}
    tiny_raw["train"].update(epochs=2, steps_per_epoch=3)
    pop = Population(load_config(tiny_raw))
    adv = _lrs(Population(load_config(tiny_raw)), "adv")
    disc = _lrs(pop, "disc")
    assert disc == [3e-4] * 6
    assert adv == pytest.approx([0.01 * 0.5 * (1 + math.cos(math.pi * t / 6)) for t in range(6)])
    # a partial optimizer section changes only what it names: the rest are the method's defaults
    assert pop.cfg.method.disc_optimizer.name == "adam" and pop.cfg.method.disc_optimizer.betas == (
        0.5,
        0.999,
    )


def test_a_run_resumed_with_more_epochs_follows_the_longer_plan(tiny_raw, tmp_path):
    """Schedulers are replayed, not restored: resumed with epochs 1 -> 3, a cosine run continues from step 4 of
    the 3-epoch plan (the rate jumps up to it), and ends at ~0 at step 12, not climbing back up a 1-epoch cosine."""
    import kdray
    from kdray.checkpoint import load_checkpoint

    tiny_raw["train"].update(epochs=1, steps_per_epoch=4)
    kdray.train(tiny_raw, out=tmp_path / "run")
    rates = []
    kdray.train(
        None,
        overrides=["train.epochs=3"],
        resume=tmp_path / "run",
        callbacks=[lambda metrics, _: rates.append(metrics["peer0/lr"])],
    )
    plan = [0.05 * 0.5 * (1 + math.cos(math.pi * t / 12)) for t in range(13)]
    assert rates == pytest.approx([plan[8], plan[12]], abs=1e-12)  # the rate after each epoch's last step
    assert load_checkpoint(tmp_path / "run")["step"] == 12
