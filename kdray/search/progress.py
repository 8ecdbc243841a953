"""Driver-side progress of a study: a live bar of the epochs trained by all trials (with the best objective so
far and the trials running), one line per finished trial, and ``progress.json`` kept current, so a killed driver
leaves an up-to-date record of what had finished."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

from ray.tune import Callback
from ray.tune.stopper import Stopper
from tqdm import tqdm

from kdray.search.trial import PROGRESS_FILE, _read_json, _write_json


class StudyProgress(Callback):
    def __init__(self, study_dir: str, epochs: int, verbose: bool = True, total_epochs: int | None = None):
        self.path = Path(study_dir) / PROGRESS_FILE
        self.epochs, self.verbose = epochs, verbose
        self.trials: dict[str, dict[str, Any]] = _read_json(self.path, {})
        self.started: dict[str, float] = {}
        self.total_epochs = total_epochs
        self._bar: tqdm | None = None

    def __getstate__(self) -> dict[str, Any]:
        # Tune pickles its callbacks with the experiment's state: the bar (it holds the terminal) stays here
        return {k: v for k, v in self.__dict__.items() if k != "_bar"} | {"_bar": None}

    @property
    def bar(self) -> tqdm:
        if self._bar is None:
            done = sum(int(t.get("epoch") or 0) for t in self.trials.values())
            self._bar = tqdm(
                total=self.total_epochs, initial=done, desc="study", unit="epoch", disable=not self.verbose,
                dynamic_ncols=True, file=sys.stderr,
            )  # fmt: skip
        return self._bar

    def _save(self) -> None:
        _write_json(self.path, self.trials)

    def _entry(self, trial) -> dict[str, Any]:
        return self.trials.setdefault(trial.trial_id, {"status": "pending", "epoch": 0, "objective": None})

    def _refresh(self) -> None:
        objectives = [t["objective"] for t in self.trials.values() if isinstance(t.get("objective"), float)]
        running = sum(1 for t in self.trials.values() if t["status"] == "running")
        best = f"best {max(objectives):.4f}" if objectives else "best -"
        self.bar.set_postfix_str(f"{best}, {running} running, {len(self.trials)} started")

    def _line(self, text: str) -> None:
        if self.verbose:
            tqdm.write(text, file=sys.stdout)

    def on_trial_start(self, iteration, trials, trial, **info):
        entry = self._entry(trial)
        entry["status"] = "running"
        entry.setdefault("started", time.time())
        self._save()
        self._refresh()

    def on_trial_result(self, iteration, trials, trial, result, **info):
        entry = self._entry(trial)
        if not result.get("replay") and (result.get("epoch") or 0) > (entry.get("epoch") or 0):
            self.bar.update(1)
        entry.update(status="running", epoch=result.get("epoch"), objective=result.get("objective"))
        self._save()
        self._refresh()

    def on_trial_complete(self, iteration, trials, trial, **info):
        entry = self._entry(trial)
        entry["status"] = "finished" if (entry.get("epoch") or 0) >= self.epochs else "stopped"
        self._save()
        self._refresh()
        obj = entry.get("objective")
        self._line(
            f"trial {trial.trial_id} {entry['status']} at epoch {entry.get('epoch')}: objective "
            + (f"{obj:.4f}" if isinstance(obj, float) else "-")
        )

    def on_trial_error(self, iteration, trials, trial, **info):
        entry = self._entry(trial)
        entry["status"] = "error"
        self._save()
        self._refresh()
        self._line(f"trial {trial.trial_id} failed at epoch {entry.get('epoch')}")

    def on_experiment_end(self, trials, **info):
        if self._bar is not None:
            self._bar.close()


class EpochBudget(Stopper):
    """Ends the study once its trials have trained ``epochs`` epochs in all (a fixed compute budget; trials still
    running are stopped). Replayed reports (a finished trial re-reporting after a pause) cost nothing."""

    def __init__(self, epochs: int):
        self.epochs, self.used = epochs, 0

    def __call__(self, trial_id: str, result: dict[str, Any]) -> bool:
        if not result.get("replay"):
            self.used += 1
        return False

    def stop_all(self) -> bool:
        return self.used >= self.epochs
