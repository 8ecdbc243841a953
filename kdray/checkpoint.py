"""The whole population's state, saved atomically and loaded safely (``weights_only=True``: tensors and plain
containers only, never arbitrary pickled objects).

A checkpoint is a dict::

    {"format": "kdray-population", "version": 2,
     "config": <resolved config as plain data>, "epoch": <epochs completed>, "step": <global steps done>,
     "progress": {"epoch", "step_in_epoch", "partial": <metric sums of the epoch so far>, "history", "best"},
     "peers": {name: {"net", "state", "optimizers", "schedulers", "buffers"}},
     "shared": {...} | None, "exchange": {rank: {...}}, "rng": ByteTensor, "mlflow_run_id": str | None,
     "history": [per-epoch metric dicts], "best": {...}}

Every file a resume depends on is written by :func:`write_atomic`: to a temporary file in the same folder,
flushed and fsync'ed, then renamed over the old one (and the folder fsync'ed), so a process killed at any instant
or a full disk leaves the previous version intact.
"""

from __future__ import annotations

import errno
import io
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kdray.errors import CheckpointError, KdrayError

FORMAT = "kdray-population"
VERSION = 2


class WriteError(KdrayError):
    """A file could not be written (disk full, permissions); the previous version is intact."""


def write_atomic(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically and durably (temp file, fsync, rename, fsync of the folder)."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as exc:
        raise WriteError(f"cannot write {path}: {exc.strerror or exc}") from None
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException as exc:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(exc, OSError):
            why = "the disk is full" if exc.errno == errno.ENOSPC else (exc.strerror or str(exc))
            raise WriteError(
                f"cannot write {path}: {why}; the previous version of the file is intact"
            ) from None
        raise
    return path


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems cannot sync a directory; the rename is still atomic
    finally:
        os.close(fd)


def save_checkpoint(path: str | Path, payload: dict[str, Any]) -> Path:
    """Serialise and write atomically: a crash or a full disk never leaves a truncated checkpoint behind."""
    buf = io.BytesIO()
    torch.save({"format": FORMAT, "version": VERSION, **payload}, buf)
    return write_atomic(path, buf.getvalue())


def resolve_checkpoint_path(path: str | Path) -> Path:
    """Accept a checkpoint file, a run folder (-> checkpoints/last.pt) or its checkpoints/ folder."""
    p = Path(path)
    for candidate in (p, p / "last.pt", p / "checkpoints" / "last.pt"):
        if candidate.is_file():
            return candidate
    raise CheckpointError(
        f"checkpoint '{path}': no such file (looked for it, {p}/last.pt and {p}/checkpoints/last.pt)"
    )


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a kdray checkpoint. Whatever the file holds, anything that is not a readable kdray checkpoint is one
    :class:`CheckpointError` (never a traceback, never advice to load it unsafely)."""
    file = resolve_checkpoint_path(path)
    try:
        payload = torch.load(file, map_location=map_location, weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any failure to read means: not a readable checkpoint
        raise CheckpointError(
            f"checkpoint '{file}' cannot be read ({_reason(exc)}); it is corrupt, truncated, or not a kdray "
            "checkpoint"
        ) from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(
            f"checkpoint '{file}' is not a kdray population checkpoint (no 'format: {FORMAT}')"
        )
    if payload.get("version") != VERSION:
        raise CheckpointError(
            f"checkpoint '{file}' has format version {payload.get('version')!r}; this kdray reads {VERSION}"
        )
    missing = [k for k in ("config", "epoch", "peers", "rng") if k not in payload]
    if missing or not isinstance(payload.get("config"), dict) or not isinstance(payload.get("peers"), dict):
        raise CheckpointError(
            f"checkpoint '{file}' is incomplete (missing or malformed: {missing or 'config/peers'})"
        )
    return payload


def _reason(exc: BaseException) -> str:
    """A short reason for a failed load, without torch's advice to retry with ``weights_only=False`` (unsafe for
    a file of unknown origin: unpickling it may run arbitrary code)."""
    text = str(exc).strip()
    if "weights_only" in text or "Weights only load failed" in text:
        return "it holds Python objects that a safe load refuses to rebuild"
    first = text.splitlines()[0][:200] if text else ""
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__


def check_compatible(payload: dict[str, Any], config: dict[str, Any], source: str) -> None:
    """A resume must use the same population: same peer names and architectures, same method."""
    try:
        old_peers = [(p["name"], p["arch"]) for p in payload["config"]["peers"]]
        old_m = payload["config"]["method"]["name"]
    except (KeyError, TypeError):
        raise CheckpointError(f"checkpoint '{source}' holds no readable config") from None
    new_peers = [(p["name"], p["arch"]) for p in config["peers"]]
    if old_peers != new_peers:
        raise CheckpointError(
            f"checkpoint '{source}' holds peers {old_peers}, the config asks for {new_peers}"
        )
    new_m = config["method"]["name"]
    if old_m != new_m:
        raise CheckpointError(
            f"checkpoint '{source}' was trained with method '{old_m}', the config says '{new_m}'"
        )


def load_peer_weights(model: nn.Module, path: str, peer: str | int | None, key: str) -> None:
    """Load one peer's network weights from a kdray checkpoint (e.g. a KD teacher)."""
    payload = load_checkpoint(path)
    names = list(payload["peers"])
    if peer is None:
        trained = [p.get("name") for p in payload["config"].get("peers", []) if not p.get("frozen")]
        if len(trained) != 1:
            raise CheckpointError(
                f"{key}: '{path}' holds peers {names}; say which one with '{key.rsplit('.', 1)[0]}.checkpoint_peer'"
            )
        peer = trained[0]
    name = names[peer] if isinstance(peer, int) and peer < len(names) else peer
    if name not in payload["peers"]:
        raise CheckpointError(f"{key}: '{path}' has no peer {peer!r}; it holds {names}")
    try:
        model.load_state_dict(payload["peers"][name]["net"])
    except (RuntimeError, KeyError, TypeError) as exc:
        raise CheckpointError(
            f"{key}: peer '{name}' of '{path}' does not fit this architecture ({str(exc).splitlines()[0]})"
        ) from None
