"""The whole population's state, saved atomically and loaded safely (``weights_only=True``: tensors and plain
containers only, never arbitrary pickled objects).

A checkpoint is a dict::

    {"format": "kdray-population", "version": 1,
     "config": <resolved config as plain data>, "epoch": <epochs completed>, "step": <global steps done>,
     "peers": {name: {"net": state_dict, "state": state_dict, "optimizers": {...}}},
     "shared": {...} | None, "rng": ByteTensor, "mlflow_run_id": str | None,
     "history": [per-epoch metric dicts], "best": {...}}
"""

from __future__ import annotations

import os
import pickle
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kdray.errors import CheckpointError

FORMAT = "kdray-population"
VERSION = 1


def save_checkpoint(path: str | Path, payload: dict[str, Any]) -> Path:
    """Write atomically (temp file + rename): a crash mid-write never leaves a truncated checkpoint behind."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"format": FORMAT, "version": VERSION, **payload}
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            torch.save(payload, fh)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


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
    file = resolve_checkpoint_path(path)
    try:
        payload = torch.load(file, map_location=map_location, weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, OSError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(
            f"checkpoint '{file}' cannot be read ({first}); it is corrupt, truncated, or not a kdray checkpoint"
        ) from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(
            f"checkpoint '{file}' is not a kdray population checkpoint (no 'format: {FORMAT}')"
        )
    if payload.get("version") != VERSION:
        raise CheckpointError(
            f"checkpoint '{file}' has format version {payload.get('version')}; this kdray reads {VERSION}"
        )
    return payload


def check_compatible(payload: dict[str, Any], config: dict[str, Any], source: str) -> None:
    """A resume must use the same population: same peer names and architectures, same method."""
    old_peers = [(p["name"], p["arch"]) for p in payload["config"]["peers"]]
    new_peers = [(p["name"], p["arch"]) for p in config["peers"]]
    if old_peers != new_peers:
        raise CheckpointError(
            f"checkpoint '{source}' holds peers {old_peers}, the config asks for {new_peers}"
        )
    old_m, new_m = payload["config"]["method"]["name"], config["method"]["name"]
    if old_m != new_m:
        raise CheckpointError(
            f"checkpoint '{source}' was trained with method '{old_m}', the config says '{new_m}'"
        )


def load_peer_weights(model: nn.Module, path: str, peer: str | int | None, key: str) -> None:
    """Load one peer's network weights from a kdray checkpoint (e.g. a KD teacher)."""
    payload = load_checkpoint(path)
    names = list(payload["peers"])
    if peer is None:
        trained = [p["name"] for p in payload["config"]["peers"] if not p.get("frozen")]
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
    except RuntimeError as exc:
        raise CheckpointError(
            f"{key}: peer '{name}' of '{path}' does not fit this architecture ({str(exc).splitlines()[0]})"
        ) from None
