"""The MLflow tracker: a resumed run continues its own MLflow run, or says which one it could not reopen."""

from __future__ import annotations

from kdray.config import TrackingConfig
from kdray.tracking import Tracker


def test_a_run_that_cannot_be_reopened_starts_anew_and_names_the_old_one(tmp_path):
    tracker = Tracker(TrackingConfig(), tmp_path / "run")
    tracker.check()
    first = tracker.start("first")
    tracker.end("FINISHED")

    again = Tracker(TrackingConfig(), tmp_path / "run")
    again.check()
    assert again.start("first", resume_run_id=first) == first  # the same run, reopened
    again.end("FINISHED")

    lost = Tracker(TrackingConfig(), tmp_path / "run")
    lost.check()
    fresh = lost.start("second", resume_run_id="0" * 32)  # a run id this store never had
    lost.end("FINISHED")
    assert fresh != first
    tags = lost.client.get_run(fresh).data.tags
    assert tags["kdray.continues_run"] == "0" * 32 and tags["mlflow.runName"] == "second"
