"""What kdray does beyond Ray Train's public API, for one tested Ray release, and nothing else.

Ray Train's public API (``DataParallelTrainer``, ``ScalingConfig``, ``RunConfig``, ``FailureConfig``,
``ray.train.get_context``, ``ray.train.backend``) trains a population exactly; these parts only make a run start
sooner and quieter on the release they were written against (docs/benchmarks.md measures each): no autoscaler
coordinator on a loopback cluster, no dataset manager or placement-group cleaner actor where none is needed,
workers started without a runtime environment, and Train's per-report log line silenced. They subclass or patch
Ray's internals, so they are used only when Ray's version is one they were tested on (:data:`TESTED`); on any other
release, or with ``KDRAY_RAY_PUBLIC=1``, the RayEngine builds a plain ``DataParallelTrainer``
(:func:`kdray.engines.ray_engine.make_trainer`), and a test runs that path too.
"""

from __future__ import annotations

import logging
import os

import ray
from ray.train.v2.api.data_parallel_trainer import DataParallelTrainer

from kdray.engines.ray_backend import NodeBoundTorchConfig

try:  # Ray's internals move between releases: on one where they are elsewhere, only the public path is used
    from ray.train.v2._internal.execution.callback import ControllerCallback
    from ray.train.v2._internal.execution.controller import TrainController
    from ray.train.v2._internal.execution.scaling_policy import FixedScalingPolicy

    INTERNALS_FOUND = True
except ImportError:  # pragma: no cover - depends on the installed Ray
    ControllerCallback = TrainController = FixedScalingPolicy = object
    INTERNALS_FOUND = False

TESTED = ("2.60.",)  # Ray releases (prefixes) these internals were written and tested against
PUBLIC_ONLY_ENV = "KDRAY_RAY_PUBLIC"


def tested_release() -> bool:
    """True when the installed Ray is one these internals were written and tested against."""
    return INTERNALS_FOUND and ray.__version__.startswith(TESTED)


def available() -> bool:
    """True on a tested Ray, unless ``KDRAY_RAY_PUBLIC=1`` asks for the public path alone."""
    return tested_release() and os.environ.get(PUBLIC_ONLY_ENV, "") != "1"


def free_resources_per_node() -> dict[str, dict[str, float]]:
    """Node id -> the resources free on it now (Ray's ``available_resources_per_node``, a developer API that the
    public ``ray.nodes()`` lacks: it gives each node's total only). Planning ``engine.placement.group_by``."""
    from ray._private.state import available_resources_per_node

    return available_resources_per_node()


def quiet_train_reports() -> None:
    """Ray Train logs one INFO line per report and per checkpoint from every worker. Its ``LoggingConfig`` level
    (set to WARNING by the driver where Ray has one: 2.60, not 2.55) filters the ``ray.train`` loggers; they are set
    to WARNING here too, for Ray releases without it. Ray's report line (2.55 and 2.60) comes from a logger named
    after its file (``logging.getLogger(__file__)`` in ``ray/train/v2/_internal/execution/context.py``), which no
    filter reaches: that logger is set to WARNING too, where it is found. Warnings and errors still pass."""
    # what LoggingConfig("WARNING") sets, where Ray has it
    logging.getLogger("ray.train").setLevel(logging.WARNING)
    try:
        from ray.train.v2._internal.execution import context
    except ImportError:  # pragma: no cover - depends on the installed Ray
        return
    logger = getattr(context, "logger", None)
    if isinstance(logger, logging.Logger):
        logger.setLevel(logging.WARNING)


class FixedScalingWithoutAutoscaler(FixedScalingPolicy):
    """Ray's fixed scaling policy, minus the resource requests to the cluster autoscaler.

    Train V2's policy registers the run's resources with Ray Data's ``AutoscalingCoordinator``: a detached actor
    (one more process, importing Ray Data) that the controller creates and then waits for, up to 5 s, before it
    starts the workers, and again every 20 s. On a cluster that cannot grow (every node on loopback) those
    requests reach no autoscaler; under load the wait times out and Ray prints a traceback on the user's terminal.
    """

    def after_controller_start(self, train_run_context) -> None:
        pass

    def _maybe_send_resource_request(self) -> None:
        pass

    def _send_resource_request(self) -> None:
        pass

    def _cancel_resource_request(self) -> None:
        pass


# Environment variables that Train V2 hands on from the driver to the controller and from the controller to every
# worker, although only the controller reads them (Train's health-check poll and preemption watcher, read once when
# the controller starts; the warning about blocking gets in async actors: the controller is the only async one).
CONTROLLER_ONLY_ENV = (
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S",
    "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER",
    "RAY_WARN_BLOCKING_GET_INSIDE_ASYNC",
)


def worker_env_vars(propagated: dict[str, str], custom: dict[str, str]) -> dict[str, str]:
    """The workers' environment variables: what Train propagates, minus the controller-only ones (unless the user's
    ``worker_runtime_env`` names them)."""
    return {k: v for k, v in propagated.items() if k not in CONTROLLER_ONLY_ENV or k in custom}


class WorkersWithoutControllerEnv(ControllerCallback):
    """Start the workers without the controller's environment variables, in the controller's process.

    A worker whose runtime environment is not empty cannot be one of the Python processes the raylet keeps
    started for the job: Ray asks its runtime-env agent for the environment, then starts a fresh process.
    Train gives every worker ``{"env_vars": ...}`` with whatever the controller was started with, so the
    RayEngine's own settings for the controller (``TRAIN_ENV_DEFAULTS``) would cost every worker that path.
    With nothing left the environment is empty (``{"env_vars": {}}`` serialises as ``{}``) and the workers
    start as plain actors. Variables the user puts in ``RunConfig.worker_runtime_env`` are kept.
    """

    def after_controller_start(self, train_run_context) -> None:
        from ray.train.v2._internal.execution.worker_group.worker_group import WorkerGroup

        compute = WorkerGroup._get_worker_runtime_env
        if getattr(compute, "kdray_without_controller_env", False):
            return

        def runtime_env(custom_runtime_env):
            env = compute(custom_runtime_env)
            env["env_vars"] = worker_env_vars(env["env_vars"], dict(custom_runtime_env).get("env_vars") or {})
            return env

        runtime_env.kdray_without_controller_env = True
        WorkerGroup._get_worker_runtime_env = staticmethod(runtime_env)


class ControllerWithSettings(TrainController):
    """Train's controller, handed the environment variables it reads (the driver's Train settings) as an argument.

    Train starts its controller with them as ``runtime_env.env_vars``; a runtime environment is inherited by
    every actor the controller creates, so every worker would then be a fresh process started through Ray's
    runtime-env agent rather than one the raylet keeps ready. Set in this process before Train's own ``__init__``
    reads them, they act the same; ``WorkersWithoutControllerEnv`` keeps the controller-only ones from the
    workers.
    """

    def __init__(self, *, kdray_settings: dict[str, str], **kwargs):
        os.environ.update(kdray_settings)
        super().__init__(**kwargs)


class PopulationTrainer(DataParallelTrainer):
    """Train V2's data-parallel trainer with kdray's torch backend, and:

    - without Ray Data's dataset callback when no Ray Dataset is given (kdray's workers build their own
      deterministic batches): Train V2 would otherwise start a ``DatasetManager`` actor per run, one more process
      competing for the cores while the workers start;
    - with ``autoscaler_requests=False``, without the autoscaler's coordinator (``FixedScalingWithoutAutoscaler``):
      the RayEngine asks for that on clusters whose nodes are all on loopback;
    - with ``placement_group_cleaner=False``, without Train's ``PlacementGroupCleaner``: a detached actor (one
      more process, importing Ray Train) that removes the workers' placement group should the controller die while
      the driver lives on. The controller waits for it to start before the training function begins, and it asks
      the dashboard's state API whether the controller is alive (warnings on every poll without a dashboard). The
      RayEngine drops it when its driver's job ends with the run (a local Ray it started, or a cluster it attached
      to): Ray removes a job's placement groups when the job ends;
    - with its controller and workers started without a runtime environment (``ControllerWithSettings``,
      ``WorkersWithoutControllerEnv``): Train gives the controller its settings as ``runtime_env.env_vars``, and
      every worker inherited them, which made each worker a fresh process started through Ray's runtime-env agent.
    """

    def __init__(
        self,
        train_loop_per_worker,
        *,
        torch_config: NodeBoundTorchConfig | None = None,
        autoscaler_requests: bool = True,
        placement_group_cleaner: bool = True,
        **kwargs,
    ):
        super().__init__(
            train_loop_per_worker, backend_config=torch_config or NodeBoundTorchConfig(), **kwargs
        )
        self.autoscaler_requests = autoscaler_requests
        self.placement_group_cleaner = placement_group_cleaner

    def _initialize_and_run_controller(self, **controller_init_kwargs):
        policy = controller_init_kwargs.get("scaling_policy")
        if not self.autoscaler_requests and type(policy) is FixedScalingPolicy:
            controller_init_kwargs["scaling_policy"] = FixedScalingWithoutAutoscaler(self.scaling_config)
        return self._run_controller(**controller_init_kwargs)

    def _run_controller(self, **controller_init_kwargs):
        """Train's own controller start, but with its settings as an argument (``ControllerWithSettings``)
        instead of a runtime environment, which every worker it creates would inherit."""
        import ray
        from ray.train.v2._internal.constants import get_env_vars_to_propagate

        settings = get_env_vars_to_propagate()
        # as Train does: the controller's gets block on purpose, and Ray would warn of each
        settings.setdefault("RAY_WARN_BLOCKING_GET_INSIDE_ASYNC", "0")
        controller_cls = ray.remote(
            num_cpus=0,  # on the driver's node, as Train places it
            label_selector={ray._raylet.RAY_NODE_ID_KEY: ray.get_runtime_context().get_node_id()},
        )(ControllerWithSettings)
        controller = controller_cls.remote(kdray_settings=settings, **controller_init_kwargs)
        # no SIGINT handler of Train's: the RayEngine calls fit() from a thread, and handles Ctrl-C itself
        ray.get(controller.run.remote())
        return ray.get(controller.get_result.remote())

    def _create_default_callbacks(self):
        from ray.train.v2._internal.callbacks.datasets import DatasetsCallback
        from ray.train.v2._internal.callbacks.placement_group_callback import PlacementGroupCleanerCallback

        callbacks = super()._create_default_callbacks()
        if not self.datasets:
            callbacks = [c for c in callbacks if not isinstance(c, DatasetsCallback)]
        if not self.placement_group_cleaner:
            callbacks = [c for c in callbacks if not isinstance(c, PlacementGroupCleanerCallback)]
        return [*callbacks, WorkersWithoutControllerEnv()]
