"""Where a RayEngine run finds its Ray, and whether the cluster can host the population.

Three cases, in this order:

- Ray is already initialised in this process (a Tune trial, a test fixture): use it, stop nothing.
- ``engine.session.address`` names a cluster (``HOST:PORT``, or ``auto``), or it is null and ``RAY_ADDRESS`` names one (as
  Ray sets it in every job submitted with ``ray job submit``): attach to it, and only disconnect at the end.
- otherwise start a private local Ray on loopback: node IP 127.0.0.1 (``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``),
  no dashboard unless ``engine.session.dashboard`` (then on 127.0.0.1), a small object store
  (``engine.session.object_store_mb``), its own temp dir (``/tmp/kdray-<uid>-<pid>``: short, since Ray's unix
  socket paths live under it). ``ray.shutdown()`` at the end stops exactly the processes it started; nothing is
  ever stopped by name.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import math
import os
import shutil
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from kdray.config import EngineConfig
from kdray.errors import KdrayError, PlacementError

STRATEGIES = {"pack": "PACK", "spread": "SPREAD", "strict_spread": "STRICT_SPREAD"}

# Ray Train V2 knobs (read by the driver and propagated to the controller); users can still set them.
TRAIN_ENV_DEFAULTS = {
    "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",  # no preemptible nodes here: one actor fewer to start
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5",  # notice finished or failed workers sooner (default 2 s)
}


class _TokenNoticeFilter(logging.Filter):
    """Drops Ray's notice that token authentication is on for a new local cluster. kdray keeps it on (Ray 2.60's
    default: the token is ~/.ray/auth_token); the notice only tells how to turn it off, which a user of kdray's
    private loopback Ray has no reason to do. Every other message of that logger passes (docs/architecture.md)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Token authentication is enabled for this Ray cluster")


TOKEN_NOTICE_LOGGER = "ray._private.authentication.authentication_token_setup"


def _free_loopback_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def local_temp_dir() -> Path:
    return Path("/tmp") / f"kdray-{os.getuid()}-{os.getpid()}"


@contextlib.contextmanager
def _environ(values: dict[str, str]) -> Iterator[None]:
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextlib.contextmanager
def _loopback_node_ip() -> Iterator[None]:
    """Make this process pick 127.0.0.1 as its node IP while it starts Ray.

    Ray reads ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER`` once, when it is first imported; if Ray was imported before (a
    Tune trial, a notebook), the environment variable alone comes too late and Ray would take the eth0 address.
    The child processes (GCS, raylet, workers) read the variable themselves, from the environment set above.
    """
    from ray._private import ray_constants

    old = ray_constants.ENABLE_RAY_CLUSTER
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = old


def cluster_address(engine: EngineConfig, environ: dict[str, str] | None = None) -> tuple[str | None, str]:
    """The Ray cluster a run attaches to, and where that came from: ``(address, "engine.session.address")``,
    ``(address, "RAY_ADDRESS")``, or ``(None, "local")`` for a private local Ray.

    ``RAY_ADDRESS`` counts only when it names a Ray cluster (``HOST:PORT``, ``ray://...``, ``auto``); an
    ``http(s)://`` value is the Jobs API's address (what ``ray job submit`` reads), not a cluster to join."""
    if engine.session.address:
        return engine.session.address, "engine.session.address"
    env = os.environ if environ is None else environ
    value = (env.get("RAY_ADDRESS") or "").strip()
    if value and not value.startswith(("http://", "https://")):
        return value, "RAY_ADDRESS"
    return None, "local"


@contextlib.contextmanager
def ray_session(engine: EngineConfig, num_peers: int) -> Iterator[str]:
    """Make Ray available for one run; yields how ("existing", "attached", "local")."""
    if "ray" not in sys.modules and not engine.session.address:
        from kdray.engines.ray_service import attach_environment

        os.environ.update(attach_environment())  # `kdray ray start` is running: attach to it
    import ray

    for key, value in TRAIN_ENV_DEFAULTS.items():
        os.environ.setdefault(key, value)
    if ray.is_initialized():
        yield "existing"
        return
    address, source = cluster_address(engine)
    if address:
        kwargs = {}
        host = address.rsplit(":", 1)[0].strip("[]")
        with contextlib.suppress(ValueError):
            if ipaddress.ip_address(host).is_loopback:
                # several loopback nodes on one machine (127.0.0.2, .3, ...): join as the head's address, not
                # the machine's, or Ray finds no raylet of this node
                kwargs["_node_ip_address"] = host
        # 127.0.0.1 (a `kdray ray start`): Ray would rewrite it to the machine's address, as for a local start
        loopback = host == "127.0.0.1"
        try:
            with (
                _environ({"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"})
                if loopback
                else contextlib.nullcontext(),
                _loopback_node_ip() if loopback else contextlib.nullcontext(),
            ):
                ray.init(address=address, logging_level="warning", **kwargs)
        except Exception as exc:  # noqa: BLE001 - any failure to connect is the same problem for the user
            first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
            fix = (
                "fix the address, or set engine.session.address: null for a local Ray"
                if source == "engine.session.address"
                else "fix it, or unset RAY_ADDRESS for a local Ray"
            )
            raise KdrayError(
                f"{source} '{address}': cannot connect to Ray ({first}); start the cluster "
                f"(ray start --head), {fix}"
            ) from None
        try:
            yield "attached"
        finally:
            ray.shutdown()
        return
    notice = logging.getLogger(TOKEN_NOTICE_LOGGER)
    if not any(isinstance(f, _TokenNoticeFilter) for f in notice.filters):
        notice.addFilter(_TokenNoticeFilter())
    temp_dir = Path(os.environ.get("RAY_TMPDIR") or local_temp_dir())
    temp_dir.mkdir(parents=True, exist_ok=True)
    cpus = max(os.cpu_count() or 1, math.ceil(num_peers * engine.placement.cpus_per_peer))
    with (
        _environ({"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_TMPDIR": str(temp_dir)}),
        _loopback_node_ip(),
    ):
        dashboard = {"dashboard_host": "127.0.0.1", "dashboard_port": _free_loopback_port()}
        context = ray.init(
            address="local",
            num_cpus=cpus,
            object_store_memory=engine.session.object_store_mb * 2**20,
            # only Train's PlacementGroupCleaner reads the dashboard's state API, and the RayEngine does without
            # it on a Ray it started (ray_backend.PopulationTrainer)
            include_dashboard=engine.session.dashboard,
            **(dashboard if engine.session.dashboard else {}),
            _temp_dir=str(temp_dir),
            logging_level="warning",
        )
    if engine.session.dashboard and context.dashboard_url:
        print(f"kdray: Ray dashboard at http://{context.dashboard_url}", flush=True)
    try:
        yield "local"
    finally:
        ray.shutdown()
        if temp_dir == local_temp_dir():
            shutil.rmtree(temp_dir, ignore_errors=True)
            if temp_dir.exists():  # a Ray process still exiting wrote a last file: once more, a moment later
                time.sleep(1.0)
                shutil.rmtree(temp_dir, ignore_errors=True)


def _describe_nodes() -> str:
    import ray

    nodes = [n for n in ray.nodes() if n.get("Alive")]
    parts = []
    for n in nodes:
        res = n.get("Resources", {})
        have = ", ".join(f"{k} {res[k]:g}" for k in ("CPU", "GPU") if res.get(k))
        parts.append(f"{n.get('NodeManagerAddress')} ({have or 'no CPU'})")
    return f"{len(nodes)} node(s): " + "; ".join(parts)


def loopback_cluster() -> bool:
    """Whether every live node of the connected Ray is on a loopback address: kdray's local Ray, ``kdray ray start``,
    the loopback multi-node tests. Such a cluster has no autoscaler that could add machines."""
    import ray

    nodes = [n for n in ray.nodes() if n.get("Alive")]
    try:
        return bool(nodes) and all(ipaddress.ip_address(n["NodeManagerAddress"]).is_loopback for n in nodes)
    except (KeyError, ValueError):
        return False


def worker_resources(engine: EngineConfig) -> dict[str, float]:
    res = {"CPU": engine.placement.cpus_per_peer}
    if engine.placement.gpus_per_peer:
        res["GPU"] = engine.placement.gpus_per_peer
    return res


def require_placement(engine: EngineConfig, num_peers: int) -> None:
    """Reserve the workers' bundles once, with a timeout: an infeasible placement (STRICT_SPREAD over too few
    nodes, more GPUs than there are) raises PlacementError instead of waiting forever."""
    from ray.util.placement_group import placement_group, remove_placement_group

    bundle = worker_resources(engine)
    pg = placement_group(
        [dict(bundle) for _ in range(num_peers)], strategy=STRATEGIES[engine.placement.strategy]
    )
    try:
        ready = pg.wait(timeout_seconds=engine.placement.timeout_s)
    finally:
        remove_placement_group(pg)
    if not ready:
        placement = engine.placement
        where = f" on {num_peers} different nodes" if placement.strategy == "strict_spread" else ""
        asked = ", ".join(f"{k} {v:g}" for k, v in bundle.items())
        raise PlacementError(
            f"engine.placement.strategy={placement.strategy}: {num_peers} workers with {{{asked}}} each{where} "
            f"could not be placed within {placement.timeout_s:g} s; the cluster has {_describe_nodes()}. Add nodes, "
            "lower engine.placement.cpus_per_peer / gpus_per_peer, or use engine.placement.strategy=pack"
        )
