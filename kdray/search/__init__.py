"""Searching loss weights, temperatures and learning rates: ``kdray tune`` (Ray Tune + Optuna, ASHA, PBT).

Importing this package does not import Ray (the loopback switch must be set before Ray is first imported)."""

from kdray.search.space import Param, SearchSpace, SpaceError, load_space
from kdray.search.study import StudyError, StudyResult, StudySettings, run_study

__all__ = [
    "Param",
    "SearchSpace",
    "SpaceError",
    "StudyError",
    "StudyResult",
    "StudySettings",
    "load_space",
    "run_study",
]
