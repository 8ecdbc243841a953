"""Driver-side progress of a study: a live bar of the epochs trained by all trials (with the best objective so
far and the trials running), a bar per running trial for the epoch it is in (steps, steps/s, each peer's running
loss and accuracy, as ``kdray train`` shows one run), one line per finished trial, and ``progress.json`` kept
current, so a killed driver leaves an up-to-date record of what had finished."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

from ray.tune import Callback
from ray.tune.stopper import Stopper
from tqdm import tqdm

from kdray.search.trial import PROGRESS_FILE, TrialLive, _read_json, _write_json, board_name

DRAIN_EVERY_S = 0.5  # how often the driver reads the trials' live steps
DRAIN_TIMEOUT_S = 10.0  # a board that does not answer in this long is given up


class StudyProgress(Callback):
    def __init__(
        self,
        study_dir: str,
        epochs: int,
        verbose: bool = True,
        total_epochs: int | None = None,
        board: str | None = None,
    ):
        self.path = Path(study_dir) / PROGRESS_FILE
        self.epochs, self.verbose = epochs, verbose
        self.trials: dict[str, dict[str, Any]] = _read_json(self.path, {})
        self.started: dict[str, float] = {}
        self.total_epochs = total_epochs
        self.board = board  # the name of the board actor the trials post their live steps to
        self._bar: tqdm | None = None
        self._trial_bars: dict[str, tqdm] = {}
        self._board_handle: Any = None
        self._board_failed = False  # the board could not be read: the study goes on without the trials' bars
        self._drained_at = 0.0

    # Tune pickles its callbacks with the experiment's state: the bars (they hold the terminal) and the board's
    # handle (a restored study makes a new board of the same name) stay here
    _UNPICKLED = ("_bar", "_trial_bars", "_board_handle")

    def __getstate__(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k not in self._UNPICKLED}

    def __setstate__(self, state: dict[str, Any]) -> None:
        # A restored study unpickles the callback as it was when the Tuner was built: the trials that finished
        # since are in progress.json, which the bars and the file must start from.
        self.__dict__.update(state)
        self._bar, self._trial_bars, self._board_handle = None, {}, None
        self.trials = _read_json(self.path, self.trials)
        # a study from before the live bars: its board is named after its folder
        self.__dict__.setdefault("board", board_name(self.path.parent.name))
        self.__dict__.setdefault("_drained_at", 0.0)
        self.__dict__.setdefault("_board_failed", False)

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

    # ------------------------------------------------------------------------------------ the trials' live steps
    def on_step_end(self, iteration, trials, **info):
        if time.monotonic() - self._drained_at >= DRAIN_EVERY_S:
            self._drain()

    def _drain(self) -> None:
        """Read the trials' live steps from the board. Never fatal: the bars are a view, the study goes on."""
        import ray

        if self.board is None or self._board_failed or not ray.is_initialized():
            return  # (ray.get_actor would start a Ray of its own)
        self._drained_at = time.monotonic()
        try:
            if self._board_handle is None:
                try:
                    self._board_handle = ray.get_actor(self.board)
                except ValueError:  # not created (yet): try again at the next drain
                    return
            events = ray.get(self._board_handle.drain.remote(), timeout=DRAIN_TIMEOUT_S)
        except Exception as exc:  # noqa: BLE001 - a lost or stuck board (its node left, an OOM kill)
            self._board_failed = True
            self._line(f"warning: the trials' live steps are no longer shown ({type(exc).__name__}: {exc})")
            return
        self.on_live([e for e in events if isinstance(e, TrialLive)])

    def on_live(self, events: list[TrialLive]) -> None:
        """Move each running trial's bar to its latest place; record it in ``progress.json``."""
        latest: dict[str, TrialLive] = {}
        for event in events:
            latest[event.trial_id] = event
        for trial_id, event in latest.items():
            entry = self.trials.get(trial_id)
            if entry is None or entry.get("status") != "running":
                continue  # a late event of a trial that ended
            # the latest place (kept after the trial ends) and how many updates the driver received
            entry["live"] = {
                "epoch": event.epoch + 1, "steps_done": event.steps_done, "steps": event.steps, "text": event.text,
            }  # fmt: skip
            entry["live_updates"] = entry.get("live_updates", 0) + 1
            self._trial_bar(event)
        if latest:
            self._save()

    def _trial_bar(self, event: TrialLive) -> None:
        if not self.verbose or not sys.stderr.isatty():  # bars redrawn twice a second would flood a log file
            return
        desc = f"trial {event.trial_id} epoch {event.epoch + 1}/{event.epochs}"
        bar = self._trial_bars.get(event.trial_id)
        if bar is not None and (bar.desc != desc or event.steps_done < bar.n):
            bar.close()  # a new epoch (or a restarted one): a fresh bar, so its step rate is this epoch's
            bar = None
        if bar is None:
            bar = tqdm(
                total=event.steps, initial=event.steps_done, desc=desc, unit="step", leave=False,
                dynamic_ncols=True, file=sys.stderr,
            )  # fmt: skip
            self._trial_bars[event.trial_id] = bar
        if event.steps_done > bar.n:
            bar.update(event.steps_done - bar.n)
        if event.text:
            bar.set_postfix_str(event.text, refresh=False)
            bar.refresh()

    def _close_trial_bar(self, trial_id: str) -> None:
        bar = self._trial_bars.pop(trial_id, None)
        if bar is not None:
            bar.close()

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._drain()  # its last steps first
        self._close_trial_bar(trial.trial_id)
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
        self._close_trial_bar(trial.trial_id)
        entry = self._entry(trial)
        entry["status"] = "error"
        self._save()
        self._refresh()
        self._line(f"trial {trial.trial_id} failed at epoch {entry.get('epoch')}")

    def on_experiment_end(self, trials, **info):
        for trial_id in list(self._trial_bars):
            self._close_trial_bar(trial_id)
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
