"""``kdray submit --address http://HEAD:8265 CONFIG``: a training run as a Ray job.

The job's entrypoint is ``python -m kdray train CONFIG --set ...``; it runs on the cluster in a copy of the working
directory (Ray's ``runtime_env.working_dir``, uploaded without virtualenvs, run folders, data and VCS metadata), so the
code that runs is the code you submit. The nodes bring the dependencies (``cluster.yaml``'s setup commands install
kdray's pins); ``--with-deps`` adds the pins to the job's ``runtime_env.pip`` for clusters whose image lacks them.
The config is validated here first: a typo fails in a second, not after the upload. With ``engine.name: ray`` and
no ``engine.session.address``, the job gets ``--set engine.session.address=auto``: the RayEngine attaches to the cluster the job runs
on (Ray sets ``RAY_ADDRESS`` in every job) rather than starting a Ray of its own inside the job.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Any

from kdray.errors import KdrayError

# Never shipped with a job: environments, outputs, data, caches, VCS metadata (Ray's upload limit is ~500 MiB, and
# none of these is code). Patterns are gitignore-style, relative to the working directory.
WORKING_DIR_EXCLUDES = [
    ".venv/",
    "venv/",
    ".git/",
    "__pycache__/",
    "*.egg-info/",
    ".pytest_cache/",
    ".ruff_cache/",
    "*.db",
    "*.pt",
    "*.ckpt",
    # Data archives and arrays: on a cluster, data lives on shared storage (data.root), not in the job's upload.
    "*.gz",
    "*.tgz",
    "*.tar",
    "*.zip",
    "*.npy",
    "*.npz",
    # Top-level folders only (a leading slash anchors the pattern): a package may well have a data/ module folder.
    "/runs/",
    "/data/",
    "/mlruns/",
    "/mlartifacts/",
    "/ray_storage/",
    "/seeds/",
]
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")


def pinned_dependencies() -> list[str]:
    """kdray's requirements (pyproject.toml), minus Ray itself (the cluster already runs it), each pinned to the
    version installed here: the job then runs on what this driver runs (pyproject declares ranges; a job wants
    the exact versions its submitter tested). A requirement not installed here keeps its declared range."""
    from importlib.metadata import PackageNotFoundError, requires, version

    from packaging.requirements import Requirement

    try:
        reqs = requires("kdray") or []
    except PackageNotFoundError:
        raise KdrayError("--with-deps: kdray is not installed here (pip install -e .)") from None
    out = []
    for text in reqs:
        req = Requirement(text)
        if req.marker is not None and "extra" in str(req.marker):
            continue
        if req.name.lower().startswith("ray"):
            continue
        try:
            out.append(f"{req.name}=={version(req.name)}")
        except PackageNotFoundError:
            out.append(str(req))
    return out


def build_entrypoint(config: str, overrides: list[str], out: str | None) -> str:
    args = ["python", "-m", "kdray", "train", config]
    for item in overrides:
        args += ["--set", item]
    if out:
        args += ["--out", out]
    return shlex.join(args)


def build_runtime_env(
    working_dir: str | Path,
    pip: list[str] | None = None,
    with_deps: bool = False,
    env: dict[str, str] | None = None,
) -> dict[str, Any]:
    runtime_env: dict[str, Any] = {
        "working_dir": str(working_dir),
        "excludes": list(WORKING_DIR_EXCLUDES),
        # Logs reach `kdray submit` line by line, not in 4 KiB chunks.
        "env_vars": {"PYTHONUNBUFFERED": "1", **(env or {})},
    }
    packages = (pinned_dependencies() if with_deps else []) + list(pip or [])
    if packages:
        runtime_env["pip"] = {"packages": packages, "pip_check": False}
    return runtime_env


def _address(address: str | None) -> str:
    address = address or os.environ.get("RAY_API_SERVER_ADDRESS") or os.environ.get("RAY_ADDRESS")
    if not address:
        raise KdrayError(
            "kdray submit: give --address http://HEAD:8265 (e.g. http://127.0.0.1:8265 with `ray dashboard "
            "cluster.yaml` running), or set RAY_API_SERVER_ADDRESS"
        )
    if "://" not in address:
        address = f"http://{address}"
    return address


def _relative_config(config: str, working_dir: Path) -> str:
    path = Path(config)
    if not path.is_file():
        raise KdrayError(f"kdray submit: config '{config}': no such file")
    try:
        return path.resolve().relative_to(working_dir.resolve()).as_posix()
    except ValueError:
        raise KdrayError(
            f"kdray submit: config '{config}' is outside --working-dir '{working_dir}', so it would not travel with "
            "the job: copy it into the working directory (e.g. configs/)"
        ) from None


def _env_pairs(items: list[str]) -> dict[str, str]:
    env = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise KdrayError(f"kdray submit: --env {item!r}: expected NAME=VALUE")
        env[name] = value
    return env


def _client(address: str):
    from ray.job_submission import JobSubmissionClient

    try:
        return JobSubmissionClient(address)
    except Exception as exc:  # noqa: BLE001 - connection refused, auth, version: all mean "cannot submit"
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
        hint = (
            "export RAY_AUTH_MODE=token and the cluster's token (~/.ray/auth_token or RAY_AUTH_TOKEN)"
            if "auth" in first.lower() or "401" in first or "403" in first
            else "is the cluster up, and the tunnel open (`ray dashboard cluster.yaml`)?"
        )
        raise KdrayError(
            f"kdray submit: cannot reach the Ray Jobs API at {address} ({first}); {hint}"
        ) from None


async def _follow(client, job_id: str) -> None:
    async for lines in client.tail_job_logs(job_id):
        sys.stdout.write(lines)
        sys.stdout.flush()


def submit_job(
    address: str | None,
    config: str,
    overrides: list[str] | None = None,
    out: str | None = None,
    working_dir: str | Path = ".",
    pip: list[str] | None = None,
    with_deps: bool = False,
    env: list[str] | None = None,
    job_id: str | None = None,
    wait: bool = True,
    timeout_s: float | None = None,
) -> int:
    """Submit ``kdray train CONFIG`` as a Ray job; 0 when it succeeds (or is submitted, without ``wait``), else 1."""
    from kdray.config import load_config

    working_dir = Path(working_dir)
    if not working_dir.is_dir():
        raise KdrayError(f"kdray submit: --working-dir '{working_dir}': no such folder")
    rel_config = _relative_config(config, working_dir)
    cfg = load_config(config, overrides)  # a bad key fails here, with the key named, before any upload
    overrides = list(overrides or [])
    if cfg.engine.name == "ray" and cfg.engine.session.address is None:
        # In a job, RAY_ADDRESS names the cluster; "auto" makes the RayEngine attach to it instead of starting a
        # private Ray inside the job.
        overrides.append("engine.session.address=auto")
    address = _address(address)
    client = _client(address)
    entrypoint = build_entrypoint(rel_config, overrides, out)
    runtime_env = build_runtime_env(working_dir, pip, with_deps, _env_pairs(env or []))
    try:
        job_id = client.submit_job(entrypoint=entrypoint, runtime_env=runtime_env, submission_id=job_id)
    except Exception as exc:  # noqa: BLE001 - e.g. a duplicate submission id, an upload over Ray's size limit
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:400]
        raise KdrayError(f"kdray submit: the cluster at {address} refused the job ({first})") from None
    print(f"submitted job {job_id} to {address}: {entrypoint}", flush=True)
    print(f"  logs:   ray job logs --address {address} --follow {job_id}", flush=True)
    print(f"  status: ray job status --address {address} {job_id}", flush=True)
    if not wait:
        return 0
    deadline = time.monotonic() + timeout_s if timeout_s else None
    try:
        with contextlib.suppress(asyncio.TimeoutError):
            asyncio.run(asyncio.wait_for(_follow(client, job_id), timeout_s))
        status = str(client.get_job_status(job_id))
        while status.split(".")[-1] not in TERMINAL and (deadline is None or time.monotonic() < deadline):
            time.sleep(1.0)  # the log stream can close a moment before the status turns terminal
            status = str(client.get_job_status(job_id))
    except KeyboardInterrupt:
        print(
            f"\nstopped following; the job goes on. Stop it with: ray job stop --address {address} {job_id}"
        )
        return 130
    status = status.split(".")[-1]
    info = client.get_job_info(job_id)
    if status == "SUCCEEDED":
        print(f"job {job_id} SUCCEEDED")
        return 0
    if status not in TERMINAL:
        print(f"job {job_id} still {status} after {timeout_s:g} s; it goes on")
        return 1
    print(f"job {job_id} {status}: {info.message or ''}".rstrip(": "), file=sys.stderr)
    return 1
