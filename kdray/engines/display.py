"""What a user sees of a training run, the same for both engines: a progress bar per epoch, one line per epoch,
and per-step curves (MLflow metrics ``step/<key>`` at the global step, and ``<out>/steps.jsonl``).
"""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tqdm import tqdm

from kdray.config import ExperimentConfig
from kdray.metrics import STEPS_FILE, MetricSums
from kdray.tracking import Tracker

if TYPE_CHECKING:
    from kdray.engines.base import Engine

# Libraries whose INFO lines say nothing a user can act on (MLflow creating or migrating its tables, alembic).
CHATTY_LOGGERS = ("mlflow", "alembic")


def quiet_libraries(verbose: bool) -> None:
    """Keep the libraries' INFO chatter off the terminal unless ``train.verbose``; their warnings and errors stay.
    (MLflow sets its logger's level when it is imported, from ``MLFLOW_LOGGING_LEVEL``: both are set.)"""
    level = "INFO" if verbose else "WARNING"
    os.environ["MLFLOW_LOGGING_LEVEL"] = level
    for name in CHATTY_LOGGERS:
        logging.getLogger(name).setLevel(level)


def progress_text(cfg: ExperimentConfig, means: dict[str, float], extra: str = "") -> str:
    """``peer0 1.234/0.56 peer1 ...``: each trainable peer's summed running loss and training accuracy."""
    parts = []
    for p in cfg.peers:
        if p.frozen:
            continue
        terms = [v for k, v in means.items() if k.startswith(f"{p.name}/loss_")]
        if not terms:
            continue
        acc = means.get(f"{p.name}/train_acc")
        parts.append(f"{p.name} {sum(terms):.3f}" + (f"/{acc:.2f}" if acc is not None else ""))
    shared = [v for k, v in means.items() if k.startswith("shared/loss_")]
    if shared:
        parts.append(f"shared {sum(shared):.3f}")
    return " ".join(parts) + (f" {extra}" if extra else "")


def epoch_line(cfg: ExperimentConfig, metrics: dict[str, float]) -> str:
    accs = [
        f"{p.name} {metrics[f'{p.name}/val_acc']:.4f}" for p in cfg.peers if f"{p.name}/val_acc" in metrics
    ]
    ens = metrics.get("ensemble/val_acc")
    tail = f" | ensemble {ens:.4f}" if ens is not None else ""
    what = "test_acc (selecting on the test split)" if cfg.data.select_on == "test" else "val_acc"
    body = f"{what} " + ", ".join(accs) + tail if accs else "(not evaluated)"
    return f"epoch {metrics['epoch']}/{cfg.train.epochs}: {body}"


def epoch_warnings(metrics: dict[str, float]) -> list[str]:
    """What a user should know about this epoch besides the accuracies: a collapsing generator."""
    out = []
    for key, value in sorted(metrics.items()):
        if key.endswith("/collapse") and value > 0.5:
            who = key.rsplit("/", 1)[0]
            share = metrics.get(f"{who}/gen_top_share")
            out.append(
                f"warning: epoch {metrics['epoch']}: the generator collapsed on {100 * value:.0f}% of the steps (the "
                "teacher puts "
                + (f"{100 * share:.0f}% of its samples" if share is not None else "most samples")
                + " in one class); try a lower method.gen_optimizer.lr, more method.student_steps, or another seed"
            )
    return out


def report_epoch(
    engine: Engine, bar: EpochBar, epoch: int, metrics: dict[str, float], checkpoint: Path | None
) -> None:
    """Everything that follows an epoch, on the driver of either engine: its metrics in MLflow (at step
    ``epoch``), its line and warnings under the bar, the generator's latest samples as an artifact, and the
    epoch callbacks (Tune reports)."""
    engine.tracker.log_metrics({k: v for k, v in metrics.items() if k != "epoch"}, step=epoch)
    bar.line(epoch_line(engine.cfg, metrics))
    for warning in epoch_warnings(metrics):
        bar.line(warning)
    samples = engine.out_dir / "samples.png"
    if samples.is_file():
        engine.tracker.log_artifact(samples, "samples")
    for callback in engine.callbacks:
        callback(metrics, checkpoint)


def write_step_row(tracker: Tracker, out_dir: Path, step: int, row: dict[str, float]) -> None:
    """One per-step row: MLflow metrics ``step/<key>`` at ``step`` and a line of ``steps.jsonl``."""
    tracker.log_metrics({f"step/{k}": v for k, v in row.items()}, step=step)
    with (out_dir / STEPS_FILE).open("a") as fh:
        fh.write(json.dumps({"step": step, **row}) + "\n")


class StepWindow:
    """Running sums of the step metrics since the last flush; flushed every ``every`` steps."""

    def __init__(self, every: int):
        self.every = every
        self.window = MetricSums()

    def add(self, step: int, metrics: MetricSums) -> dict[str, float] | None:
        """Add step ``step``'s metrics; at a flush step, return the window's means and start a new window."""
        self.window.merge(metrics)
        if (step + 1) % self.every:
            return None
        row, self.window = self.window.means(), MetricSums()
        return row


# (epoch (0-based), steps done in it, steps per epoch, the bar's postfix or None when it did not change)
LiveListener = Callable[[int, int, int, str | None], None]


def live_listeners(callbacks: list[Any]) -> list[LiveListener]:
    """The epoch callbacks that also follow the bar (a callback with a ``live`` method: a Tune trial's reporter,
    which shows the trial's steps on the study driver's terminal)."""
    return [cb.live for cb in callbacks if callable(getattr(cb, "live", None))]


class EpochBar:
    """One tqdm bar per epoch (steps, throughput, a postfix), or one plain line per epoch without a terminal.
    ``listeners`` see every start and advance, whether the bar is shown or not."""

    def __init__(self, cfg: ExperimentConfig, listeners: list[LiveListener] | None = None):
        self.cfg = cfg
        self.bar: tqdm | None = None
        self.listeners = listeners or []
        self.epoch, self.steps = 0, 0

    def start(self, epoch: int, start_step: int, steps: int) -> None:
        self.close()
        self.epoch, self.steps = epoch, steps
        self.bar = tqdm(
            total=steps, initial=start_step, desc=f"epoch {epoch + 1}/{self.cfg.train.epochs}", leave=False,
            disable=not self.cfg.train.progress, dynamic_ncols=True, unit="step", file=sys.stderr,
        )  # fmt: skip
        for listener in self.listeners:
            listener(epoch, start_step, steps, None)

    def advance(self, steps_done: int, postfix: str | None = None) -> None:
        if self.bar is None:
            return
        if steps_done > self.bar.n:
            self.bar.update(steps_done - self.bar.n)
        if postfix is not None and not self.bar.disable:
            self.bar.set_postfix_str(postfix, refresh=False)
        for listener in self.listeners:
            listener(self.epoch, steps_done, self.steps, postfix)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def line(self, text: str) -> None:
        """An epoch line: printed whatever ``train.progress`` says (it only turns the bar off)."""
        if self.bar is not None and not self.bar.disable:
            tqdm.write(text, file=sys.stdout)
        else:
            print(text, flush=True)
