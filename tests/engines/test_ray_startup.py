"""Ray start-up helpers that need no Ray: which cluster a run joins, and the start-up breakdown's arithmetic."""

from __future__ import annotations

import os
import time

import pytest

from kdray.config import EngineConfig
from kdray.engines.ray_engine import process_started_at, startup_breakdown
from kdray.engines.ray_private import tested_release
from kdray.engines.ray_runtime import cluster_address
from kdray.errors import KdrayError

# kdray's start-up shortcuts subclass Ray Train's internals and are used only on the Ray release they were tested
# on; on any other release in pyproject's range the RayEngine runs Ray's public trainer (tested everywhere).
internals = pytest.mark.skipif(
    not tested_release(), reason="Ray internals are used only on the tested Ray release"
)


@pytest.mark.parametrize(
    ("address", "environ", "want"),
    [
        (None, {}, (None, "local")),
        ("127.0.0.2:6379", {"RAY_ADDRESS": "10.0.0.1:6379"}, ("127.0.0.2:6379", "engine.session.address")),
        ("auto", {}, ("auto", "engine.session.address")),
        (None, {"RAY_ADDRESS": "10.0.0.1:6379"}, ("10.0.0.1:6379", "RAY_ADDRESS")),  # inside `ray job submit`
        (None, {"RAY_ADDRESS": "ray://head:10001"}, ("ray://head:10001", "RAY_ADDRESS")),
        (None, {"RAY_ADDRESS": "http://127.0.0.1:8265"}, (None, "local")),  # the Jobs API, not a cluster
        (None, {"RAY_ADDRESS": "  "}, (None, "local")),
    ],
)
def test_cluster_address_engine_then_ray_address_then_local(address, environ, want):
    assert cluster_address(EngineConfig(name="ray", session={"address": address}), environ) == want


def test_startup_breakdown_spans_add_up_to_the_total():
    driver = {"process_start": 100.0, "engine_start": 106.0, "ray_ready": 115.0, "placement_ready": 115.5}
    placement = [
        {"marks": {"process_start": 120.0, "entered": 130.0, "built": 131.0}},
        {
            "marks": {"process_start": 122.0, "entered": 133.0, "built": 133.5}
        },  # the last worker sets each point
    ]
    got = startup_breakdown(driver, placement, first_step_at=134.0)
    assert got == {
        "launch": 6.0,
        "ray_init": 9.0,
        "placement_check": 0.5,
        "fit_to_workers": 6.5,
        "worker_imports": 11.0,
        "worker_build": 0.5,
        "to_first_step": 0.5,
        "total": 34.0,
    }


def test_startup_breakdown_pooled_worker_and_missing_points():
    driver = {"process_start": 100.0, "engine_start": 101.0, "ray_ready": 102.0, "placement_ready": 103.0}
    # a worker process Ray started before the run (a pooled idle process): its span is 0, never negative
    pooled = [{"marks": {"process_start": 50.0, "entered": 104.0, "built": 105.0}}]
    got = startup_breakdown(driver, pooled, first_step_at=106.0)
    assert got["fit_to_workers"] == 0.0 and got["worker_imports"] == 1.0
    assert sum(v for k, v in got.items() if k != "total") == pytest.approx(got["total"])
    # no /proc: the process starts are unknown, the spans that need them are None
    unknown = [{"marks": {"process_start": None, "entered": 104.0, "built": 105.0}}]
    got = startup_breakdown({**driver, "process_start": None}, unknown, first_step_at=106.0)
    assert got["launch"] is None and got["total"] is None and got["fit_to_workers"] is None
    assert got["ray_init"] == 1.0 and got["to_first_step"] == 1.0


def test_process_started_at_is_this_process():
    started = process_started_at()
    assert started is not None and started <= time.time() and time.time() - started < 24 * 3600


def test_the_backend_config_unpickles_without_torch():
    """Train V2's controller unpickles the backend config; with it, that process must not import torch (or kdray's
    torch-importing modules): ~2 s of every Ray run's start on two cores, for a process that never computes."""
    import os
    import pickle
    import subprocess
    import sys

    from kdray.engines.ray_backend import NodeBoundTorchConfig
    from kdray.engines.ray_private import PopulationTrainer

    blob = pickle.dumps(NodeBoundTorchConfig(timeout_s=60))
    code = (
        "import pickle, sys\n"
        f"cfg = pickle.loads({blob!r})\n"
        "assert cfg.timeout_s == 60 and cfg.framework.name == 'TORCH', cfg\n"
        "assert cfg.backend_cls.__name__ == '_NodeBoundTorchBackend'\n"
        "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith(('torch.', 'kdray.'))))\n"
    )
    env = {**os.environ, "RAY_TRAIN_V2_ENABLED": "1"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.strip() == "['kdray.engines', 'kdray.engines.ray_backend', 'kdray.version']", (
        out.stdout + out.stderr
    )
    # and the trainer still hands Train V2 that config (the torch process group is set up by it)
    if not tested_release():
        return
    trainer = PopulationTrainer(lambda: None, torch_config=NodeBoundTorchConfig(backend="gloo"))
    assert isinstance(trainer.backend_config, NodeBoundTorchConfig)
    assert trainer.backend_config.backend == "gloo"


@internals
def test_a_loopback_cluster_gets_no_autoscaler_coordinator(monkeypatch):
    """Train V2's fixed policy creates Ray Data's AutoscalingCoordinator actor and waits for it before starting the
    workers; on a cluster that cannot grow (every node on loopback) kdray's trainer swaps in a policy without it."""
    import ray
    from ray.train import ScalingConfig
    from ray.train.v2._internal.execution.scaling_policy import FixedScalingPolicy, ResizeDecision

    from kdray.engines.ray_private import FixedScalingWithoutAutoscaler, PopulationTrainer
    from kdray.engines.ray_runtime import loopback_cluster

    def nodes(*ips):
        return lambda: (
            [{"Alive": True, "NodeManagerAddress": ip} for ip in ips]
            + [
                {"Alive": False, "NodeManagerAddress": "10.0.0.9"}  # a dead node does not count
            ]
        )

    monkeypatch.setattr(ray, "nodes", nodes("127.0.0.2", "127.0.0.3"))
    assert loopback_cluster()
    monkeypatch.setattr(ray, "nodes", nodes("127.0.0.1", "10.0.0.5"))
    assert not loopback_cluster()
    monkeypatch.setattr(ray, "nodes", nodes())
    assert not loopback_cluster()

    seen = {}
    monkeypatch.setattr(PopulationTrainer, "_run_controller", lambda self, **kw: seen.update(kw))
    scaling = ScalingConfig(num_workers=2)
    for requests, want in ((False, FixedScalingWithoutAutoscaler), (True, FixedScalingPolicy)):
        trainer = PopulationTrainer(lambda: None, scaling_config=scaling, autoscaler_requests=requests)
        trainer._initialize_and_run_controller(scaling_policy=FixedScalingPolicy(scaling))
        assert type(seen["scaling_policy"]) is want
    policy = FixedScalingWithoutAutoscaler(scaling)
    policy.after_controller_start(None)  # Ray's would create the coordinator actor here (no Ray is running)
    decision = policy.make_decision_for_non_running_worker_group()
    assert isinstance(decision, ResizeDecision) and decision.num_workers == 2
    assert policy._coordinator_client is None


@internals
def test_train_placement_group_cleaner_only_where_the_job_outlives_the_run():
    """Train V2's PlacementGroupCleaner is one more process that the controller waits for before the training
    function starts; kdray's trainer leaves it out when asked (a run whose job ends with it)."""
    from ray.train import ScalingConfig
    from ray.train.v2._internal.callbacks.placement_group_callback import PlacementGroupCleanerCallback

    from kdray.engines.ray_private import PopulationTrainer

    for cleaner in (True, False):
        trainer = PopulationTrainer(
            lambda: None, scaling_config=ScalingConfig(num_workers=2), placement_group_cleaner=cleaner
        )
        callbacks = trainer._create_default_callbacks()
        names = [type(c).__name__ for c in callbacks]
        assert any(isinstance(c, PlacementGroupCleanerCallback) for c in callbacks) is cleaner, names
        assert "BackendSetupCallback" in names  # the rest is Train's own list
        assert "DatasetsCallback" not in names  # no Ray Dataset given


def _no_train_settings(monkeypatch):
    """Clear every variable Train propagates: earlier tests in the session (a RayEngine run sets Train's
    defaults in os.environ) or the user's shell may have set some."""
    from ray.train.v2._internal.constants import ENV_VARS_TO_PROPAGATE

    for key in ENV_VARS_TO_PROPAGATE:
        monkeypatch.delenv(key, raising=False)


@internals
def test_workers_start_without_the_controllers_environment(monkeypatch):
    """Train V2 hands its controller's settings (health-check poll, preemption watcher, the async-get warning) on
    to every worker as ``runtime_env.env_vars``; a worker with a runtime environment cannot be a process the
    raylet already started. In the controller, kdray's callback leaves them out: what remains serialises as an
    empty environment. The user's own worker variables, and every other propagated one, stay."""
    from ray.runtime_env import RuntimeEnv
    from ray.train import ScalingConfig
    from ray.train.v2._internal.execution.worker_group.worker_group import WorkerGroup

    from kdray.engines.ray_private import PopulationTrainer, WorkersWithoutControllerEnv

    trainer = PopulationTrainer(lambda: None, scaling_config=ScalingConfig(num_workers=2))
    assert any(isinstance(c, WorkersWithoutControllerEnv) for c in trainer._create_default_callbacks())

    _no_train_settings(monkeypatch)
    for key in ("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"):
        monkeypatch.setenv(key, "0.5" if "INTERVAL" in key else "0")
    monkeypatch.setenv("RAY_WARN_BLOCKING_GET_INSIDE_ASYNC", "0")
    monkeypatch.setenv("RAY_TRAIN_COLLECTIVE_TIMEOUT_S", "77")  # a worker-side setting: it must still travel
    monkeypatch.setattr(
        WorkerGroup, "_get_worker_runtime_env", WorkerGroup.__dict__["_get_worker_runtime_env"]
    )
    before = WorkerGroup._get_worker_runtime_env({})["env_vars"]
    assert "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S" in before  # what Train alone would give the workers

    WorkersWithoutControllerEnv().after_controller_start(None)
    WorkersWithoutControllerEnv().after_controller_start(None)  # a restarted controller: wrapped once
    assert WorkerGroup._get_worker_runtime_env({})["env_vars"] == {"RAY_TRAIN_COLLECTIVE_TIMEOUT_S": "77"}
    custom = {"env_vars": {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "3", "MINE": "1"}}
    assert WorkerGroup._get_worker_runtime_env(custom)["env_vars"] == {
        "RAY_TRAIN_COLLECTIVE_TIMEOUT_S": "77",
        "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "3",
        "MINE": "1",
    }
    monkeypatch.delenv("RAY_TRAIN_COLLECTIVE_TIMEOUT_S")
    assert RuntimeEnv(**WorkerGroup._get_worker_runtime_env({})).serialize() == "{}"  # the raylet's fast path


@internals
def test_the_controller_gets_its_settings_as_an_argument_not_a_runtime_env(monkeypatch):
    """Train's own controller start gives it ``runtime_env.env_vars``, which every worker would inherit. kdray's
    starts it without a runtime environment and hands it the same variables, set before Train's ``__init__``
    reads them."""
    import ray
    from ray.train import ScalingConfig
    from ray.train.v2._internal.execution.controller import TrainController

    from kdray.engines import ray_private

    seen = {}

    def init(self, **kwargs):  # Train's __init__ reads its settings from os.environ
        seen["env"] = {
            k: os.environ.get(k)
            for k in ("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "RAY_WARN_BLOCKING_GET_INSIDE_ASYNC")
        }
        seen["kwargs"] = kwargs

    monkeypatch.setattr(TrainController, "__init__", init)
    _no_train_settings(monkeypatch)
    settings = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5", "RAY_WARN_BLOCKING_GET_INSIDE_ASYNC": "0"}
    ray_private.ControllerWithSettings(kdray_settings=settings, callbacks=[])
    assert seen == {"env": settings, "kwargs": {"callbacks": []}}

    options, created = {}, {}

    class Handle:
        def __init__(self, **kwargs):
            created.update(kwargs)
            self.run = self.get_result = type("M", (), {"remote": staticmethod(lambda: "ref")})

    def remote(**kwargs):
        options.update(kwargs)
        return lambda cls: type("Actor", (), {"remote": staticmethod(lambda **kw: Handle(**kw))})

    monkeypatch.setattr(ray, "remote", remote)
    monkeypatch.setattr(ray, "get", lambda ref: "result")
    monkeypatch.setattr(
        ray, "get_runtime_context", lambda: type("C", (), {"get_node_id": lambda self: "n1"})()
    )
    monkeypatch.setenv("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")  # as the RayEngine sets it in the driver
    trainer = ray_private.PopulationTrainer(lambda: None, scaling_config=ScalingConfig(num_workers=2))
    assert trainer._initialize_and_run_controller(callbacks=[]) == "result"
    assert "runtime_env" not in options and options["num_cpus"] == 0
    assert list(options["label_selector"].values()) == ["n1"]  # on the driver's node, as Train places it
    assert created["kdray_settings"] == settings and created["callbacks"] == []


@pytest.mark.parametrize("dashboard", [False, True])
def test_a_local_ray_has_a_dashboard_only_when_asked(monkeypatch, tmp_path, dashboard):
    import ray

    from kdray.config import EngineConfig
    from kdray.engines.ray_runtime import ray_session

    seen = {}

    class Context:
        dashboard_url = "127.0.0.1:1234" if dashboard else ""

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kw: seen.update(kw) or Context())
    monkeypatch.setattr(ray, "shutdown", lambda: None)
    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr("kdray.engines.ray_service.attach_environment", lambda: {})
    engine = EngineConfig(name="ray", session={"dashboard": dashboard})
    with ray_session(engine, num_peers=2) as how:
        assert how == "local"
    assert seen["address"] == "local" and seen["include_dashboard"] is dashboard
    if dashboard:
        assert seen["dashboard_host"] == "127.0.0.1" and seen["dashboard_port"] > 0
    else:
        assert "dashboard_host" not in seen and "dashboard_port" not in seen


@pytest.fixture
def fake_ray_init(monkeypatch, tmp_path):
    """``ray.init`` recorded instead of run (which thread called it, with what), ``ray.shutdown`` counted."""
    import threading

    import ray

    calls = {"init": [], "shutdown": 0}

    def init(**kw):
        time.sleep(0.2)  # a start takes a while: the driver goes on meanwhile
        calls["init"].append((threading.current_thread().name, kw))

    def shutdown():
        calls["shutdown"] += 1

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", init)
    monkeypatch.setattr(ray, "shutdown", shutdown)
    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr("kdray.engines.ray_service.attach_environment", lambda: {})
    return calls


def test_an_early_local_ray_is_taken_over_by_the_run_and_stopped_once(fake_ray_init):
    import threading

    from kdray.engines import ray_runtime

    engine = EngineConfig(name="ray")
    with ray_runtime.early_local_ray(engine, num_peers=2):
        (starter,) = ray_runtime._PENDING  # started, not yet waited for
        with ray_runtime.ray_session(engine, num_peers=2) as how:
            assert how == "local" and not ray_runtime._PENDING
            (thread, kw), = fake_ray_init["init"]  # fmt: skip
            assert thread == "kdray-ray-start" and thread != threading.main_thread().name
            assert kw["address"] == "local"
            # the thread that started Ray lives as long as Ray does (parent-death signals are per thread)
            assert starter._thread.is_alive()
        assert fake_ray_init["shutdown"] == 1
        assert not starter._thread.is_alive()
    assert fake_ray_init["shutdown"] == 1 and len(fake_ray_init["init"]) == 1
    assert ray_runtime.LAST_LOCAL_START["took_s"] >= 0.2


def test_an_early_local_ray_nobody_took_over_is_shut_down(fake_ray_init):
    """An error between the early start and the engine (an MLflow store that cannot be opened, say)."""
    from kdray.engines import ray_runtime

    engine = EngineConfig(name="ray")
    with (
        pytest.raises(RuntimeError, match="before the engine"),
        ray_runtime.early_local_ray(engine, num_peers=2),
    ):
        (starter,) = ray_runtime._PENDING
        raise RuntimeError("before the engine")
    assert len(fake_ray_init["init"]) == 1 and fake_ray_init["shutdown"] == 1
    assert not ray_runtime._PENDING and not starter._thread.is_alive()


@pytest.mark.parametrize(
    "engine", [EngineConfig(name="ray", session={"address": "127.0.0.1:6379"}), EngineConfig(name="local")]
)
def test_no_early_start_unless_the_run_starts_a_local_ray(fake_ray_init, engine):
    from kdray.engines import ray_runtime

    with ray_runtime.early_local_ray(engine, num_peers=2):
        assert not ray_runtime._PENDING
    assert fake_ray_init["init"] == [] and fake_ray_init["shutdown"] == 0


def test_an_early_start_that_failed_raises_in_the_run(fake_ray_init, monkeypatch):
    import ray

    from kdray.engines import ray_runtime

    def init(**kw):
        raise RuntimeError("no room for the object store")

    monkeypatch.setattr(ray, "init", init)
    engine = EngineConfig(name="ray")
    with (
        ray_runtime.early_local_ray(engine, num_peers=2),
        pytest.raises(KdrayError, match="a local Ray could not start \\(RuntimeError: no room") as info,
        ray_runtime.ray_session(engine, num_peers=2),
    ):
        pass
    # one line: where Ray's logs are, what to try; Ray's own error kept as the cause
    message = str(info.value)
    assert "\n" not in message and "session_latest/logs" in message and "RAY_ADDRESS" in message, message
    assert isinstance(info.value.__cause__, RuntimeError)
    assert fake_ray_init["shutdown"] == 0  # nothing was up


def test_a_dashboard_port_taken_before_ray_binds_it_is_picked_again(fake_ray_init, monkeypatch):
    """Between kdray picking the dashboard's port and Ray binding it, another process took it: the start is made
    again on a new port, from a new thread (the failed start's processes die with its thread); other errors, and
    a port that stays taken, are raised."""
    import threading

    import ray

    from kdray.engines import ray_runtime

    taken: list[int] = []
    threads: list[threading.Thread] = []

    def init(**kw):
        threads.append(threading.current_thread())
        fake_ray_init["init"].append((threading.current_thread().name, kw))
        port = kw["dashboard_port"]
        if len(fake_ray_init["init"]) <= fails:
            taken.append(port)
            raise ValueError(
                f"Failed to bind to 127.0.0.1:{port} because it's already occupied. You can use ..."
            )

    monkeypatch.setattr(ray, "init", init)
    engine = EngineConfig(name="ray", session={"dashboard": True})
    fails = 2
    with ray_runtime.ray_session(engine, num_peers=2) as how:
        assert how == "local"
        ports = [kw["dashboard_port"] for _, kw in fake_ray_init["init"]]
        assert len(ports) == 3 and len(set(ports)) == 3 and ports[:2] == taken
        assert not threads[0].is_alive() and not threads[1].is_alive() and threads[2].is_alive()
    assert fake_ray_init["shutdown"] == 1  # the Ray that came up, once

    fake_ray_init["init"].clear()
    fails = ray_runtime.DASHBOARD_PORT_RETRIES + 1  # taken every time: the last error is the user's
    with (
        pytest.raises(KdrayError, match="ValueError: Failed to bind.*already occupied"),
        ray_runtime.ray_session(engine, num_peers=2),
    ):
        pass
    assert len(fake_ray_init["init"]) == ray_runtime.DASHBOARD_PORT_RETRIES + 1

    def other(**kw):
        fake_ray_init["init"].append(("", kw))
        raise ValueError("Failed to bind to 127.0.0.1:6379 because it's already occupied.")  # not our port

    monkeypatch.setattr(ray, "init", other)
    fake_ray_init["init"].clear()
    with pytest.raises(KdrayError, match="6379"), ray_runtime.ray_session(engine, num_peers=2):
        pass
    assert len(fake_ray_init["init"]) == 1


def test_rays_processes_are_told_the_state_apis_address(fake_ray_init, monkeypatch):
    """Train's placement-group cleaner calls the state API without an address; with two Rays on the machine that
    fails, the cleaner dies and the run's placement group stays. A local Ray with a dashboard starts with
    RAY_API_SERVER_ADDRESS set to its dashboard (the processes it starts inherit it); the driver's own environment
    is left as it was."""
    import ray

    from kdray.engines import ray_runtime

    seen = []
    monkeypatch.setattr(ray, "init", lambda **kw: seen.append((kw, os.environ.get("RAY_API_SERVER_ADDRESS"))))
    monkeypatch.delenv("RAY_API_SERVER_ADDRESS", raising=False)
    with ray_runtime.ray_session(EngineConfig(name="ray", session={"dashboard": True}), num_peers=2):
        (kw, address), = seen  # fmt: skip
        assert address == f"http://127.0.0.1:{kw['dashboard_port']}"
    assert "RAY_API_SERVER_ADDRESS" not in os.environ


def test_ray_internals_are_used_only_on_a_tested_release(monkeypatch):
    """kdray's start-up shortcuts (kdray/engines/ray_private.py) subclass Ray Train's internals: on a Ray release
    they were not tested on, or with KDRAY_RAY_PUBLIC=1, the RayEngine builds Ray's public TorchTrainer instead."""
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from kdray.engines import ray_private
    from kdray.engines.ray_backend import NodeBoundTorchConfig
    from kdray.engines.ray_engine import make_trainer

    def trainer():
        return make_trainer(
            {}, autoscaler_requests=False, placement_group_cleaner=False,
            scaling_config=ScalingConfig(num_workers=2), run_config=RunConfig(name="x"),
        )  # fmt: skip

    monkeypatch.delenv(ray_private.PUBLIC_ONLY_ENV, raising=False)
    on_tested = ray.__version__.startswith(ray_private.TESTED)
    assert type(trainer()) is (ray_private.PopulationTrainer if on_tested else TorchTrainer)
    monkeypatch.setattr(ray, "__version__", "2.99.0")
    public = trainer()
    assert type(public) is TorchTrainer and isinstance(public.backend_config, NodeBoundTorchConfig)
    monkeypatch.undo()
    monkeypatch.setenv(ray_private.PUBLIC_ONLY_ENV, "1")
    assert type(trainer()) is TorchTrainer


def test_train_logging_is_set_only_where_ray_has_it():
    """Ray 2.60's public ``ray.train.LoggingConfig`` quiets Train's per-report lines unless train.verbose; Ray 2.55
    has none, and the RunConfig is built without it."""
    import types

    from kdray.engines.ray_engine import train_logging

    class LoggingConfig:
        def __init__(self, log_level):
            self.log_level = log_level

    with_it = types.SimpleNamespace(LoggingConfig=LoggingConfig)
    assert train_logging(with_it, verbose=False)["logging_config"].log_level == "WARNING"
    assert train_logging(with_it, verbose=True)["logging_config"].log_level == "INFO"
    assert train_logging(types.SimpleNamespace(), verbose=False) == {}
