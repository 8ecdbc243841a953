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
or a full disk leaves the previous version intact. A temporary file left by a killed process is removed by the next
write of the same file on the same host.

A checkpoint is sealed: ``torch.save``'s zip archive carries, as its zip comment, the SHA-256 of every byte before
the digest (``kdray-sha256:<hex>``; any zip reader, ``torch.load`` included, still opens it). :func:`load_checkpoint`
checks the seal before it unpickles anything, so a truncated file, a flipped bit or a file kdray did not write is
refused with one line, never loaded as something else. Files written before the seal existed (a zip without a
comment) are still read, with the structural checks alone.

**Per-process parts** (the RayEngine when every worker sees the run folder, ``engine.session.checkpoint_writes``):
each process writes its own part, ``parts/step-<step>/rank<r>-<digest>.pt`` (its peers, its exchange state; rank
0's also the shared module), content-addressed by its seal's digest so no file is ever rewritten with other
bytes; then rank 0 writes ``last.pt`` as a *manifest*: everything above but ``"peers": {}``, and
``"parts": [{"file": <relative path>, "sha256": <digest>}, ...]``. :func:`load_checkpoint` assembles such a file
into the same dict as a gathered one (every part's seal and digest checked), so every reader (resume, eval,
export, the final test) reads both. Parts no manifest refers to any more are removed by :func:`prune_parts`.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import os
import shutil
import socket
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kdray.errors import CheckpointError, KdrayError

FORMAT = "kdray-population"
VERSION = 2


class WriteError(KdrayError):
    """A file could not be written (disk full, permissions); the previous version is intact."""


def _why(exc: OSError) -> str:
    return "the disk is full" if exc.errno in (errno.ENOSPC, errno.EDQUOT) else (exc.strerror or str(exc))


def _host() -> str:
    return socket.gethostname().replace(".", "_").replace(os.sep, "_") or "host"


def _temp_prefix(path: Path) -> str:
    """``.<name>.<host>-<pid>.``: whose temporary file it is, so a later write can tell a dead writer's leftover."""
    return f".{path.name}.{_host()}-{os.getpid()}."


def _remove_leftovers(path: Path) -> None:
    """Temporary files of ``path`` left by killed processes of this host (never a live writer's, nor another
    host's: a shared folder may have writers elsewhere)."""
    start = f".{path.name}.{_host()}-"
    try:
        names = [
            e.name for e in os.scandir(path.parent) if e.name.startswith(start) and e.name.endswith(".tmp")
        ]
    except OSError:
        return
    for name in names:
        pid = name.removeprefix(start).split(".", 1)[0]
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            os.kill(int(pid), 0)
            continue  # alive: not ours to remove
        except ProcessLookupError:
            pass  # dead: its temporary file is garbage
        except OSError:
            continue  # alive under another user, or unknown
        with contextlib.suppress(OSError):
            (path.parent / name).unlink()


def write_atomic(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically and durably (temp file, fsync, rename, fsync of the folder). Any failure
    (a full disk, permissions) is one :class:`WriteError` naming the file; the previous version stays intact."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=_temp_prefix(path), suffix=".tmp")
    except OSError as exc:
        raise WriteError(
            f"cannot write {path}: {_why(exc)}; the previous version of the file, if any, is intact"
        ) from None
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
            raise WriteError(
                f"cannot write {path}: {_why(exc)}; the previous version of the file, if any, is intact"
            ) from None
        raise
    _remove_leftovers(path)
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


SEAL = b"kdray-sha256:"
SEAL_LEN = len(SEAL) + 64
_EOCD = b"PK\x05\x06"  # a zip's end-of-central-directory record: 22 bytes, then the comment


def seal(archive: bytes) -> bytes:
    """``torch.save``'s zip archive with the SHA-256 of its bytes as its zip comment. An archive that already has a
    comment (a future torch) is returned as it is."""
    if len(archive) < 22 or archive[-22:-18] != _EOCD or archive[-2:] != b"\0\0":
        return archive
    head = archive[:-2] + SEAL_LEN.to_bytes(2, "little")
    return head + SEAL + hashlib.sha256(head).hexdigest().encode()


def _sealed(payload: dict[str, Any]) -> bytes:
    buf = io.BytesIO()
    torch.save({"format": FORMAT, "version": VERSION, **payload}, buf)
    return seal(buf.getvalue())


def save_checkpoint(path: str | Path, payload: dict[str, Any]) -> Path:
    """Serialise, seal and write atomically: a crash or a full disk never leaves a truncated checkpoint behind."""
    return write_atomic(path, _sealed(payload))


# ------------------------------------------------------------------------------------------ per-process parts
PARTS = "parts"
PART_FORMAT = "kdray-population-part"


def merge_parts(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """The parts of processes holding disjoint peers as one population's state (the shared module: rank 0's)."""
    return {
        "peers": {name: sd for part in parts for name, sd in part["peers"].items()},
        "shared": parts[0]["shared"],
        "exchange": {r: sd for part in parts for r, sd in part["exchange"].items()},
    }


def save_part(ckpt_dir: str | Path, step: int, rank: int, state: dict[str, Any]) -> dict[str, str]:
    """Write one process's part of the checkpoint at global step ``step`` (``state``: its ``peers``, ``shared``,
    ``exchange``); returns the manifest's entry for it (a path relative to ``ckpt_dir`` and the digest)."""
    data = _sealed({"format": PART_FORMAT, "rank": rank, "step": step, **state})
    digest = hashlib.sha256(data).hexdigest()  # of the whole file, seal included
    rel = f"{PARTS}/step-{step:010d}/rank{rank}-{digest[:16]}.pt"
    write_atomic(Path(ckpt_dir) / rel, data)
    return {"file": rel, "sha256": digest}


def manifest_files(path: str | Path) -> set[str] | None:
    """The part files (relative paths) that the manifest at ``path`` refers to: none if there is no such file or
    it is no manifest; None if it exists but cannot be read now (then nothing may be pruned)."""
    path = Path(path)
    if not path.exists():
        return set()
    try:
        payload = _read(path)
    except (CheckpointError, OSError):
        return None
    return {entry["file"] for entry in payload.get("parts") or []}


def is_manifest(path: str | Path) -> bool:
    """Whether ``path`` is a manifest of per-process parts, read cheaply (the pickle only: tensors are mapped, not
    read; ``weights_only``)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            head = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # noqa: BLE001 - not a readable checkpoint: not a manifest either
        return False
    return isinstance(head, dict) and head.get("parts") is not None


def copy_checkpoint(src: str | Path, dst: str | Path) -> Path:
    """A self-contained copy of the checkpoint ``src`` at ``dst`` (a study's best.pt, a Tune checkpoint, an MLflow
    artifact): a manifest is assembled into one file (its parts stay in the run folder, where later checkpoints
    prune them); any other checkpoint is hard-linked where it can be, else copied byte for byte."""
    src, dst = Path(src), Path(dst)
    if is_manifest(src):
        payload = load_checkpoint(src)
        return save_checkpoint(dst, {k: v for k, v in payload.items() if k not in ("format", "version")})
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.unlink(missing_ok=True)
    try:
        dst.hardlink_to(src)
    except OSError:
        shutil.copy2(src, dst)
    return dst


def prune_parts(ckpt_dir: str | Path, before_step: int, keep: set[str]) -> int:
    """Remove part files of steps before ``before_step`` that are not in ``keep`` (what ``last.pt`` and ``best.pt``
    refer to), and their emptied folders. A later step's parts are never touched: another process may be writing
    them. Returns how many files went."""
    root, removed = Path(ckpt_dir) / PARTS, 0
    try:
        folders = [e for e in os.scandir(root) if e.is_dir() and e.name.startswith("step-")]
    except OSError:
        return 0
    for folder in folders:
        step = folder.name.removeprefix("step-")
        if not step.isdigit() or int(step) >= before_step:
            continue
        for entry in os.scandir(folder.path):
            if f"{PARTS}/{folder.name}/{entry.name}" not in keep and entry.name.endswith(".pt"):
                with contextlib.suppress(OSError):
                    os.unlink(entry.path)
                    removed += 1
        with contextlib.suppress(OSError):
            os.rmdir(folder.path)  # only if empty
    return removed


def _assemble(payload: dict[str, Any], file: Path, map_location) -> dict[str, Any]:
    """A manifest's parts read (each one's seal and digest checked) and merged into the population's state."""
    entries = payload.get("parts")
    if (
        not isinstance(entries, list)
        or not entries
        or not all(
            isinstance(e, dict) and isinstance(e.get("file"), str) and isinstance(e.get("sha256"), str)
            for e in entries
        )
    ):
        raise CheckpointError(f"checkpoint '{file}' is malformed (its parts list is not a list of files)")
    parts = []
    for entry in entries:
        rel = Path(entry["file"])
        if rel.is_absolute() or ".." in rel.parts or rel.parts[:1] != (PARTS,):
            raise CheckpointError(
                f"checkpoint '{file}' names a part outside its folder: {_short(entry['file'])}"
            )
        part_file = file.parent / rel
        if not part_file.is_file():
            raise CheckpointError(
                f"checkpoint '{file}' needs its part {rel}, which is missing (a run folder copied without its "
                f"{PARTS}/ folder, or a folder not shared by every node)"
            )
        part = _read(part_file, map_location)
        with open(part_file, "rb") as fh:
            digest = hashlib.file_digest(fh, "sha256").hexdigest()
        if part.get("format") != PART_FORMAT or digest != entry["sha256"]:
            raise CheckpointError(f"checkpoint '{file}': its part {rel} is not the one it was written with")
        for key in ("peers", "exchange"):
            if not isinstance(part.get(key), dict):
                raise CheckpointError(f"checkpoint '{file}': its part {rel} is malformed ({key})")
        parts.append(part)
    return {**{k: v for k, v in payload.items() if k != "parts"}, **merge_parts(parts)}


def resolve_checkpoint_path(path: str | Path) -> Path:
    """Accept a checkpoint file, a run folder (-> checkpoints/last.pt) or its checkpoints/ folder."""
    p = Path(path)
    for candidate in (p, p / "last.pt", p / "checkpoints" / "last.pt"):
        try:
            if candidate.is_file():
                return candidate
        except (OSError, ValueError):  # a name too long, a folder we may not enter
            continue
    raise CheckpointError(
        f"checkpoint '{path}': no such file (looked for it, {p}/last.pt and {p}/checkpoints/last.pt)"
    )


def _check_seal(fh, file: Path) -> None:
    """Refuse, before anything is unpickled, a file whose seal does not match its bytes (truncated, bit-flipped,
    not written by kdray). An unsealed zip archive (kdray before the seal) passes to the structural checks."""
    size = os.fstat(fh.fileno()).st_size
    if size < 22:
        raise CheckpointError(
            f"checkpoint '{file}' cannot be read ({size} bytes: empty or truncated); it is not a kdray checkpoint"
        )
    fh.seek(max(size - SEAL_LEN - 22, 0))
    tail = fh.read()
    if tail[-22:-18] == _EOCD and tail[-2:] == b"\0\0":
        return  # an unsealed archive: written before the seal existed
    if not (len(tail) == SEAL_LEN + 22 and tail[-SEAL_LEN - 22 : -SEAL_LEN - 18] == _EOCD
            and tail[-SEAL_LEN - 2 : -SEAL_LEN] == SEAL_LEN.to_bytes(2, "little")
            and tail[-SEAL_LEN:].startswith(SEAL)):  # fmt: skip
        raise CheckpointError(
            f"checkpoint '{file}' cannot be read (no kdray seal at its end); it is corrupt, truncated, or not a "
            "kdray checkpoint"
        )
    digest = hashlib.sha256()
    fh.seek(0)
    left = size - len(SEAL) - 64
    while left > 0:
        chunk = fh.read(min(left, 1 << 22))
        if not chunk:
            break
        digest.update(chunk)
        left -= len(chunk)
    if left != 0 or digest.hexdigest().encode() != tail[-64:]:
        raise CheckpointError(
            f"checkpoint '{file}' cannot be read (its bytes do not match its SHA-256 seal); it is corrupt or "
            "was changed after kdray wrote it"
        )


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a kdray checkpoint. Whatever the file holds, anything that is not a readable kdray checkpoint is one
    :class:`CheckpointError` (never a traceback, never advice to load it unsafely): the seal is checked first, then
    the archive is read with ``weights_only=True`` (tensors and plain containers, never arbitrary objects), then
    its structure."""
    file = resolve_checkpoint_path(path)
    payload = _read(file, map_location)
    if payload.get("parts") is not None:
        payload = _assemble(payload, file, map_location)
    missing = [k for k in ("config", "epoch", "peers", "rng") if k not in payload]
    if missing or not isinstance(payload.get("config"), dict) or not isinstance(payload.get("peers"), dict):
        raise CheckpointError(
            f"checkpoint '{file}' is incomplete (missing or malformed: {missing or 'config/peers'})"
        )
    problem = _structure_problem(payload)
    if problem:
        raise CheckpointError(f"checkpoint '{file}' is malformed ({problem}); it is not a kdray checkpoint")
    return payload


def _read(file: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """One sealed file, loaded safely, of this format and version (a checkpoint, a manifest or a part)."""
    try:
        with open(file, "rb") as fh:
            _check_seal(fh, file)
            fh.seek(0)
            with warnings.catch_warnings():  # torch's notes on odd pickles would print more lines
                warnings.simplefilter("ignore")
                payload = torch.load(fh, map_location=map_location, weights_only=True)
    except CheckpointError:
        raise
    except Exception as exc:  # noqa: BLE001 - any failure to read means: not a readable checkpoint
        raise CheckpointError(
            f"checkpoint '{file}' cannot be read ({_reason(exc)}); it is corrupt, truncated, or not a kdray "
            "checkpoint"
        ) from None
    if not isinstance(payload, dict) or payload.get("format") not in (FORMAT, PART_FORMAT):
        raise CheckpointError(
            f"checkpoint '{file}' is not a kdray population checkpoint (no 'format: {FORMAT}')"
        )
    if payload.get("version") != VERSION:
        raise CheckpointError(
            f"checkpoint '{file}' has format version {_short(payload.get('version'))}; this kdray reads {VERSION}"
        )
    return payload


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _structure_problem(payload: dict[str, Any]) -> str | None:
    """What a kdray checkpoint must look like for the engines to restore it (an unsealed file is checked here)."""
    epoch, step = payload.get("epoch"), payload.get("step", 0)
    if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
        return f"epoch {_short(epoch)}"
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        return f"step {_short(step)}"
    rng = payload["rng"]
    if not isinstance(rng, torch.Tensor) or rng.dtype != torch.uint8 or rng.dim() != 1:
        return "rng is not a byte tensor"
    for key, kind in (("progress", dict), ("history", list), ("best", dict)):
        if payload.get(key) is not None and not isinstance(payload[key], kind):
            return f"{key} is not a {kind.__name__}"
    peers_cfg = payload["config"].get("peers")
    if not isinstance(peers_cfg, list) or not all(isinstance(p, dict) for p in peers_cfg):
        return "config.peers is not a list of peers"
    method = payload["config"].get("method")
    if not isinstance(method, dict) or not isinstance(method.get("name"), str):
        return "config.method.name missing"
    names = [p.get("name") for p in peers_cfg]
    if not payload["peers"] or not set(map(str, payload["peers"])) <= set(map(str, names)):
        # a Ray rank's file holds its own peers only: a subset
        return f"peers {_short(list(payload['peers']))} do not match the config's {_short(names)}"
    for name, sd in payload["peers"].items():
        if not isinstance(sd, dict) or not isinstance(sd.get("net"), dict):
            return f"peer {_short(name)} holds no network"
        if not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in sd["net"].items()):
            return f"peer {_short(name)}: its network is not a mapping of names to tensors"
    return None


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


def _shape(t: Any) -> str:
    return f"[{', '.join(map(str, t.shape))}]" if isinstance(t, torch.Tensor) else type(t).__name__


def check_state_shapes(module: nn.Module, state: Any, what: str) -> None:
    """Refuse, before ``module.load_state_dict(state)``, a state whose tensors are not the module's: the first
    tensor of another shape (``what``, its name, both shapes), or the first missing or unexpected one. torch's own
    error names the class only ("Error(s) in loading state_dict for CifarResNet:")."""
    if not isinstance(state, dict):
        raise CheckpointError(
            f"{what}: the checkpoint holds a {type(state).__name__}, not a network's tensors"
        )
    own = module.state_dict()
    for name, tensor in own.items():
        if name in state and (not isinstance(state[name], torch.Tensor) or state[name].shape != tensor.shape):
            raise CheckpointError(
                f"{what}: tensor '{name}' is {_shape(state[name])} in the checkpoint, {_shape(tensor)} here "
                "(the checkpoint was trained with another architecture, width or number of classes)"
            )
    missing = [n for n in own if n not in state]
    unexpected = [n for n in state if n not in own]
    if missing or unexpected:
        first = (
            f"has no tensor '{missing[0]}'"
            + (f" (and {len(missing) - 1} more missing)" if len(missing) > 1 else "")
            if missing
            else f"holds a tensor '{str(unexpected[0])[:100]}' this network has not"
            + (f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else "")
        )
        raise CheckpointError(
            f"{what}: the checkpoint {first}; it was trained with another architecture ({len(state)} tensors "
            f"there, {len(own)} here)"
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
    check_state_shapes(model, payload["peers"][name]["net"], f"{key}: peer '{name}' of '{path}'")
    try:
        model.load_state_dict(payload["peers"][name]["net"])
    except (RuntimeError, KeyError, TypeError) as exc:
        raise CheckpointError(
            f"{key}: peer '{name}' of '{path}' does not fit this architecture ({str(exc).splitlines()[0]})"
        ) from None
