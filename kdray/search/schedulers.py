"""Tune schedulers of ``kdray tune`` beyond Ray's own. Imported only where a study is built (it imports Ray).

``BaselineASHA`` is ASHA that lets the config's own values (the study's first trial) train every epoch. Plain ASHA
judges each trial at its rungs only: with a warm-up and a decaying learning rate, the ranking after a quarter of the
schedule can be the reverse of the final one, so a study could stop the user's own config early and hand back a
winner that is worse than it at the end. Kept trials still enter every rung's record, so the cut-offs the other
trials meet are the ones plain ASHA would set.
"""

from __future__ import annotations

from typing import Any

from ray.tune.schedulers import ASHAScheduler, TrialScheduler

from kdray.search.space import same_values


class BaselineASHA(ASHAScheduler):
    """ASHA that never stops a trial whose values are one of ``keep`` before ``max_t``."""

    def __init__(self, keep: list[dict[str, Any]], **kwargs: Any):
        super().__init__(**kwargs)
        self.keep = [dict(point) for point in keep]

    def is_kept(self, trial) -> bool:
        return any(same_values(trial.config or {}, point) for point in self.keep)

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        action = super().on_trial_result(tune_controller, trial, result)
        if (
            action == TrialScheduler.STOP
            and result.get(self._time_attr, 0) < self._max_t
            and self.is_kept(trial)
        ):
            self._num_stopped -= 1
            return TrialScheduler.CONTINUE
        return action
