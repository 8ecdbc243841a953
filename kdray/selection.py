"""Which epoch a run reports, and the last epoch's test accuracy beside the selected one's.

``data.select_on`` chooses ``best.pt``, the checkpoint the test split is evaluated on at the end:

- ``val`` (default): the epoch of the best mean validation accuracy of the trainable peers;
- ``last``: no selection: ``best.pt`` is the last epoch (the validation split, if any, is still evaluated every epoch,
  for the curves);
- ``test``: the best epoch on the test split (only when said: the test numbers are then not an unbiased estimate).

Whatever selected ``best.pt``, the summary also reports the last epoch's test accuracy (:func:`test_last_epoch`), so
that a reader sees what selection changed. ``docs/compare.md`` says when each choice is right.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


def test_last_epoch(out_dir: Path, outcome: dict[str, Any], tracker: Any) -> dict[str, Any]:
    """The test split on the last epoch's population (``last.pt``), in the shape of the selected one's
    (``outcome["test"]``); the same numbers, not evaluated again, when the selected checkpoint is the last epoch.
    Logged to MLflow as ``<peer>/last_epoch_test_acc`` (and ``_ece``, and the ensemble's)."""
    from kdray.api import evaluate

    test = outcome["test"]
    history = outcome.get("history") or []
    last_epoch = history[-1]["epoch"] if history else test["epoch"]
    if test["checkpoint"] == "last.pt" or test["epoch"] == last_epoch:
        result = {k: test[k] for k in ("epoch", "peers", "ece", "ensemble_acc", "ensemble_ece")}
        result.update(checkpoint="last.pt", same_as_selected=True)
    else:
        report = evaluate(Path(out_dir) / "checkpoints" / "last.pt", split="test")
        result = {
            "checkpoint": "last.pt",
            "epoch": report["epoch"],
            "peers": {p["name"]: p["acc"] for p in report["peers"]},
            "ece": {p["name"]: p["ece"] for p in report["peers"]},
            "ensemble_acc": report["ensemble_acc"],
            "ensemble_ece": report["ensemble_ece"],
            "same_as_selected": False,
        }
    logged = {f"{name}/last_epoch_test_acc": acc for name, acc in result["peers"].items()}
    logged.update({f"{name}/last_epoch_test_ece": ece for name, ece in result["ece"].items()})
    if result["ensemble_acc"] is not None:
        logged.update({"ensemble/last_epoch_test_acc": result["ensemble_acc"],
                       "ensemble/last_epoch_test_ece": result["ensemble_ece"]})  # fmt: skip
    tracker.log_metrics(logged, step=result["epoch"])
    return result
