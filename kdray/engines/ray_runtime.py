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
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from kdray.config import EngineConfig
from kdray.engines.placement import Plan, worker_resources
from kdray.engines.ports import PortPicker
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
    private loopback Ray has no reason to do. Every other message of that logger passes (README: Ray runs are quiet)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Token authentication is enabled for this Ray cluster")


TOKEN_NOTICE_LOGGER = "ray._private.authentication.authentication_token_setup"


class _ThreadNoticeFilter(logging.Filter):
    """Drops Ray's notice that ``ray.init`` outside the main thread sets no SIGTERM handler: kdray starts its local
    Ray in a thread on purpose (:class:`LocalRayStart`), and its own handler (``api.StopSignals``) takes SIGTERM."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("SIGTERM handler is not set because current thread")


def _quiet_start_notices() -> None:
    for name, kind in (
        (TOKEN_NOTICE_LOGGER, _TokenNoticeFilter),
        ("ray._private.worker", _ThreadNoticeFilter),
    ):
        notice = logging.getLogger(name)
        if not any(isinstance(f, kind) for f in notice.filters):
            notice.addFilter(kind())


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


_PENDING: list[LocalRayStart] = []  # a local Ray started early for the next ray_session (at most one)
LAST_LOCAL_START: dict[str, float | None] = {}  # the latest local start's timing (ray_run.json)


def starts_local_ray(engine: EngineConfig) -> bool:
    """Whether :func:`ray_session` would start a private local Ray for this engine config (decided as it does)."""
    if "ray" in sys.modules:
        if sys.modules["ray"].is_initialized():
            return False
    elif not engine.session.address:
        from kdray.engines.ray_service import attach_environment

        if attach_environment():
            return False
    return cluster_address(engine)[0] is None


@contextlib.contextmanager
def early_local_ray(engine: EngineConfig, num_peers: int) -> Iterator[None]:
    """Start the RayEngine's private local Ray now, in a thread, for the ``ray_session`` that comes later in this
    block to take over: Ray's start (~3-5 s on two cores) overlaps the driver's own work in between (MLflow, the
    engine's imports). Nothing happens unless the run would start a local Ray. A start nobody took over is shut
    down at the end of the block (an error before the engine ran)."""
    starter = None
    if engine.name == "ray" and not _PENDING and starts_local_ray(engine):
        starter = LocalRayStart(engine, num_peers)
        _PENDING.append(starter)
    try:
        yield
    finally:
        if starter is not None:
            if starter in _PENDING:
                _PENDING.remove(starter)
            starter.stop()


@contextlib.contextmanager
def ray_session(engine: EngineConfig, num_peers: int) -> Iterator[str]:
    """Make Ray available for one run; yields how ("existing", "attached", "local")."""
    for key, value in TRAIN_ENV_DEFAULTS.items():
        os.environ.setdefault(key, value)
    early = [s for s in _PENDING if s.engine is engine]
    if early:  # started by early_local_ray for this run: take it over
        _PENDING.remove(early[0])
        yield from _local(early[0])
        return
    if "ray" not in sys.modules and not engine.session.address:
        from kdray.engines.ray_service import attach_environment

        os.environ.update(attach_environment())  # `kdray ray start` is running: attach to it
    import ray

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
            first = _first_line(exc) or type(exc).__name__
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
    yield from _local(LocalRayStart(engine, num_peers))


def _local(starter: LocalRayStart) -> Iterator[str]:
    try:
        starter.wait()
        LAST_LOCAL_START.clear()
        LAST_LOCAL_START.update(starter.timing())
        yield "local"
    finally:
        starter.stop()


DASHBOARD_PORT_RETRIES = 3


def _port_taken(exc: BaseException, port: int | None) -> bool:
    """Whether ``ray.init`` failed because ``port`` was occupied when Ray came to bind it."""
    return (
        port is not None
        and isinstance(exc, ValueError)
        and f":{port} because it's already occupied" in str(exc)
    )


def _first_line(exc: BaseException) -> str:
    """The first line of what an exception says (at most 300 characters), or ""."""
    text = str(exc).strip()
    return text.splitlines()[0][:300].strip() if text else ""


def start_failed(error: BaseException, temp_dir: Path, dashboard: bool) -> KdrayError:
    """What ``ray.init`` raised, as one line saying where Ray's logs are and what to try (seen: under load, a
    local Ray's dashboard missed its start-up deadline and ``kdray tune --resume`` ended in Ray's traceback)."""
    first = _first_line(error)
    what = f"{type(error).__name__}: {first}" if first else type(error).__name__
    tries = "try again when it is quieter" + (
        ", or without the dashboard (engine.session.dashboard: false)" if dashboard else ""
    )
    return KdrayError(
        f"a local Ray could not start ({what}); Ray's logs: {temp_dir}/session_latest/logs. On a loaded machine "
        f"Ray's processes can miss their start-up deadlines: {tries}; or attach to a running Ray (RAY_ADDRESS)"
    )


class LocalRayStart:
    """kdray's private local Ray, started in a thread so that the driver can go on meanwhile (MLflow, imports:
    ``api.run_population`` starts it early with :func:`early_local_ray`; ``ray_session`` takes it over).

    The thread lives until Ray is shut down: Ray gives the processes it starts a parent-death signal, which Linux
    sends when the *thread* that started them ends, not the process (measured: a Ray started in a thread that
    returned lost its GCS within seconds)."""

    def __init__(self, engine: EngineConfig, num_peers: int):
        _quiet_start_notices()
        self.engine = engine
        self.temp_dir = Path(os.environ.get("RAY_TMPDIR") or local_temp_dir())
        self.temp_dir.mkdir(parents=True, exist_ok=True)
        cpus = max(os.cpu_count() or 1, math.ceil(num_peers * engine.placement.cpus_per_peer))
        dashboard = engine.session.dashboard
        self.kwargs: dict[str, Any] = dict(
            address="local",
            num_cpus=cpus,
            object_store_memory=engine.session.object_store_mb * 2**20,
            # only Train's PlacementGroupCleaner reads the dashboard's state API, and the RayEngine does without
            # it on a Ray it started (ray_private.PopulationTrainer)
            include_dashboard=dashboard,
            **({"dashboard_host": "127.0.0.1", "dashboard_port": PortPicker().port()} if dashboard else {}),
            _temp_dir=str(self.temp_dir),
            logging_level="warning",
        )
        self.started_at = time.time()
        self.ready_at: float | None = None
        self._stopped = False
        self.port_retries = 0  # starts again because another process took the dashboard port first
        self._launch()

    def _launch(self) -> None:
        self.error: BaseException | None = None
        self._context: Any = None
        self._ready, self._release = threading.Event(), threading.Event()
        self._thread = threading.Thread(target=self._start, name="kdray-ray-start", daemon=True)
        self._thread.start()

    def _start(self) -> None:
        try:
            import ray

            env = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_TMPDIR": str(self.temp_dir)}
            if self.kwargs.get("dashboard_port"):
                # Ray's processes inherit this: Train's placement-group cleaner asks the state API whether a run's
                # controller lives, and without an address that API looks for Ray on the machine and fails when
                # it finds two (another user's, a test's); the cleaner then dies and the run's placement group
                # is never removed (seen: a later study waited forever for the CPUs it held)
                env["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{self.kwargs['dashboard_port']}"
            with _environ(env), _loopback_node_ip():
                self._context = ray.init(**self.kwargs)
        except BaseException as exc:  # noqa: BLE001 - raised in the driver's thread by wait()
            self.error = exc
        finally:
            self.ready_at = time.time()
            self._ready.set()
        self._release.wait()  # Ray's processes die with this thread: it ends after ray.shutdown()

    def wait(self) -> None:
        """Until Ray is up; raises what ``ray.init`` raised.

        The dashboard's port is picked free before Ray binds it; another process (or one of Ray's own, which pick
        their ports at random) can take it in between, and ``ray.init`` then fails. The start is made again on a
        new port, from a new thread: the processes the failed start left die with the thread that started them."""
        self._ready.wait()
        while (
            self.error is not None
            and self.engine.session.dashboard
            and _port_taken(self.error, self.kwargs.get("dashboard_port"))
            and self.port_retries < DASHBOARD_PORT_RETRIES
        ):
            self.port_retries += 1
            self._release.set()
            self._thread.join(timeout=30)
            self.kwargs["dashboard_port"] = PortPicker().port()
            self._launch()
            self._ready.wait()
        if self.error is not None:
            raise start_failed(self.error, self.temp_dir, bool(self.engine.session.dashboard)) from self.error
        if self.engine.session.dashboard and getattr(self._context, "dashboard_url", None):
            print(f"kdray: Ray dashboard at http://{self._context.dashboard_url}", flush=True)

    def timing(self) -> dict[str, float | None]:
        """When the start began and how long it took (unix time, seconds)."""
        took = None if self.ready_at is None else round(self.ready_at - self.started_at, 3)
        return {"started_at": self.started_at, "took_s": took}

    def stop(self) -> None:
        """Shut the Ray down (waiting for its start to finish first) and remove its temp dir; idempotent."""
        if self._stopped:
            return
        self._stopped = True
        self._ready.wait()
        try:
            if self.error is None:
                import ray

                ray.shutdown()
        finally:
            self._release.set()
            self._thread.join(timeout=30)
            if self.temp_dir == local_temp_dir():
                shutil.rmtree(self.temp_dir, ignore_errors=True)
                if self.temp_dir.exists():  # a Ray process still exiting wrote a last file: once more, later
                    time.sleep(1.0)
                    shutil.rmtree(self.temp_dir, ignore_errors=True)


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


def require_placement(engine: EngineConfig, num_peers: int, plan: Plan | None = None) -> None:
    """Reserve the workers' bundles once, with a timeout: an infeasible placement (STRICT_SPREAD over too few
    nodes, more GPUs than there are) raises PlacementError instead of waiting forever. With a ``plan``
    (``engine.placement.group_by``), each bundle on its planned node."""
    from ray.util.placement_group import placement_group, remove_placement_group

    bundle = worker_resources(engine)
    pg = placement_group(
        [dict(bundle) for _ in range(num_peers)], strategy=STRATEGIES[engine.placement.strategy],
        bundle_label_selector=plan.label_selector() if plan else None,
    )  # fmt: skip
    try:
        ready = pg.wait(timeout_seconds=engine.placement.timeout_s)
    finally:
        remove_placement_group(pg)
    if not ready and plan is not None:
        asked = ", ".join(f"{k} {v:g}" for k, v in bundle.items())
        where = ", ".join(f"{ip} x{plan.node_ips.count(ip)}" for ip in dict.fromkeys(plan.node_ips))
        raise PlacementError(
            f"engine.placement.group_by={plan.group_by}: {num_peers} workers with {{{asked}}} each, planned as "
            f"{where}, could not be reserved within {engine.placement.timeout_s:g} s (taken since the plan was "
            f"made); the cluster has {_describe_nodes()}. Retry, add nodes, or set engine.placement.group_by: none"
        )
    if not ready:
        placement = engine.placement
        where = f" on {num_peers} different nodes" if placement.strategy == "strict_spread" else ""
        asked = ", ".join(f"{k} {v:g}" for k, v in bundle.items())
        raise PlacementError(
            f"engine.placement.strategy={placement.strategy}: {num_peers} workers with {{{asked}}} each{where} "
            f"could not be placed within {placement.timeout_s:g} s; the cluster has {_describe_nodes()}. Add nodes, "
            "lower engine.placement.cpus_per_peer / gpus_per_peer, or use engine.placement.strategy=pack"
        )
