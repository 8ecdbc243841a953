"""Learning-rate schedules, stepped once per training step, built from ``torch.optim.lr_scheduler``.

``train.schedule`` gives one schedule in epochs; it is turned into steps with the population's steps per epoch:

- a linear warm-up (``LinearLR``) from ``warmup_start_factor`` x lr to lr over ``warmup_epochs`` x steps per
  epoch + ``warmup_steps`` steps, then
- ``cosine``: ``CosineAnnealingLR`` over the remaining steps, down to ``min_lr_factor`` x lr;
  ``multistep``: ``MultiStepLR``, x ``gamma`` at each milestone epoch; ``constant``: no decay,

chained with ``SequentialLR``. The network's optimizer always follows it; an auxiliary optimizer (adversarial,
discriminator, generator) follows it when its config says ``schedule: follow`` and keeps its rate when it says
``constant``. A resumed run rebuilds its schedulers and replays them to the step it resumes at
(:func:`replay_schedule`): the same curve, exactly, or the longer plan of a run resumed with more
epochs, from where it stands.
"""

from __future__ import annotations

import warnings

import torch
from torch.optim.lr_scheduler import (
    ConstantLR,
    CosineAnnealingLR,
    LinearLR,
    LRScheduler,
    MultiStepLR,
    SequentialLR,
)

from kdray.config import ScheduleConfig


def warmup_steps(schedule: ScheduleConfig, steps_per_epoch: int) -> int:
    return round(schedule.warmup_epochs * steps_per_epoch) + schedule.warmup_steps


def build_scheduler(
    optimizer: torch.optim.Optimizer, *, schedule: ScheduleConfig, steps_per_epoch: int, epochs: int
) -> LRScheduler | None:
    """The per-step scheduler of ``optimizer`` (None: the rate never changes)."""
    total = steps_per_epoch * epochs
    warm = min(warmup_steps(schedule, steps_per_epoch), total)
    rest = total - warm
    if schedule.name == "cosine":
        base = optimizer.param_groups[0]["lr"]
        main: LRScheduler | None = CosineAnnealingLR(
            optimizer, T_max=max(rest, 1), eta_min=schedule.min_lr_factor * base
        )
    elif schedule.name == "multistep":
        # SequentialLR restarts the second scheduler's count at the end of the warm-up
        milestones = sorted({max(1, m * steps_per_epoch - warm) for m in schedule.milestones})
        main = MultiStepLR(optimizer, milestones=milestones, gamma=schedule.gamma)
    else:
        main = None
    if warm == 0:
        return main
    warmup = LinearLR(optimizer, start_factor=schedule.warmup_start_factor, end_factor=1.0, total_iters=warm)
    if main is None:
        main = ConstantLR(optimizer, factor=1.0, total_iters=0)
    return SequentialLR(optimizer, [warmup, main], milestones=[warm])


def replay_schedule(optimizer: torch.optim.Optimizer, schedule, step: int):
    """A fresh scheduler of ``optimizer`` from its base rates, stepped ``step`` times."""
    for group in optimizer.param_groups:
        group["lr"] = group["initial_lr"]
    scheduler = schedule(optimizer)
    # torch warns of a scheduler stepped before its optimizer: replaying, it is
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        for _ in range(step):
            scheduler.step()
    return scheduler
