"""Errors meant for users: each names what was wrong, the value given and what would be accepted."""

from __future__ import annotations


class KdrayError(Exception):
    """Base class of every error kdray raises on purpose. The CLI prints it on one line and exits 2."""

    exit_code = 2


class ConfigError(KdrayError):
    """A config key has a value kdray cannot honour."""

    def __init__(self, key: str, value: object, accepted: str):
        self.key, self.value, self.accepted = key, value, accepted
        name = key if len(key) <= 120 else f"{key[:100]}... ({len(key)} characters)"
        super().__init__(f"config key '{name}' = {short(value)}: {accepted}")


def short(value: object, limit: int = 200) -> str:
    """``repr(value)`` cut to ``limit`` characters: a config may hold a 100 000-character string or a list of
    thousands of items, and an error stays one readable line."""
    try:
        text = repr(value)
    except RecursionError:
        text = f"<a {type(value).__name__} nested too deeply>"
    return text if len(text) <= limit else f"{text[: limit - 20]}... ({len(text)} characters)"


class DataError(KdrayError):
    """A dataset cannot be found or read."""


class CheckpointError(KdrayError):
    """A checkpoint is missing, corrupt, or does not match the config."""


class TrackingError(KdrayError):
    """The MLflow tracking store cannot be reached or written."""


class PlacementError(KdrayError):
    """The cluster cannot host the population as asked."""


class DivergedError(KdrayError):
    """A loss became NaN or infinite (adversarial training can); the run stops instead of training on garbage."""
