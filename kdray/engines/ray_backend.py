"""Ray Train's torch process-group setup, with the rendezvous bound to the node's own address.

Ray's ``TorchConfig`` lets torch's ``env://`` rendezvous start the ``TCPStore`` on rank 0, and that store listens on
every interface (``*:PORT``), so even a run on a loopback-only local Ray opens a port to the network. Here rank 0
binds the store's socket itself, to its node's IP (127.0.0.1 for kdray's local Ray, 127.0.0.x for loopback
multi-node tests, the node's address on a real cluster), and hands the bound socket to ``TCPStore``
(``master_listen_fd``); gloo is pinned to the loopback interface when the node address is a loopback one.

The rest follows Ray's own torch backend (gloo on CPU, nccl on GPU, the torch environment variables, the CUDA
device of each worker, destroying the process group at the end), written without importing torch or
``ray.train.torch`` at module level: the Train V2 controller unpickles this config, and with Ray's ``TorchConfig``
that made the controller process import torch (1.3 s of a run's start on two cores, docs/benchmarks.md, for a
process that never computes). torch is imported in the workers only, inside the functions they run. Ray is pinned to 2.60; the tests
check that a run listens on loopback only.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import socket
from dataclasses import dataclass
from datetime import timedelta

from ray.train.backend import Backend, BackendConfig
from ray.train.v2._internal.execution.callback import ControllerCallback
from ray.train.v2._internal.execution.controller import TrainController
from ray.train.v2._internal.execution.scaling_policy import FixedScalingPolicy
from ray.train.v2._internal.util import TrainingFramework
from ray.train.v2.api.data_parallel_trainer import DataParallelTrainer

_LISTENER: socket.socket | None = None  # rank 0's rendezvous socket, kept open for the store's lifetime


def _bind_rendezvous() -> tuple[str, int]:
    """On rank 0: bind a listening socket to this node's IP; return (address, port)."""
    global _LISTENER
    import ray

    addr = ray.util.get_node_ip_address()
    family = socket.AF_INET6 if ":" in addr else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((addr, 0))
    sock.listen(512)
    _LISTENER = sock
    return addr, sock.getsockname()[1]


def _init_process_group(
    backend: str, world_rank: int, world_size: int, addr: str, port: int, timeout_s: int
) -> None:
    import torch.distributed as dist

    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = addr, str(port)
    if backend == "gloo" and ipaddress.ip_address(addr).is_loopback:
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    if backend == "nccl":
        os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")  # fail on timeouts, as Ray's setup does
    timeout = timedelta(seconds=timeout_s)
    fd = _LISTENER.fileno() if world_rank == 0 and _LISTENER is not None else None
    store = dist.TCPStore(addr, port, world_size, world_rank == 0, timeout, master_listen_fd=fd)
    dist.init_process_group(
        backend=backend, store=store, rank=world_rank, world_size=world_size, timeout=timeout
    )


def _set_distributed_env_vars() -> None:
    """The torchrun environment variables (``RANK``, ``LOCAL_RANK``, ...) from the Train context, as Ray sets them."""
    import ray.train
    from ray.train.torch import get_device

    context = ray.train.get_context()
    os.environ["LOCAL_RANK"] = str(context.get_local_rank())
    os.environ["LOCAL_WORLD_SIZE"] = str(context.get_local_world_size())
    os.environ["NODE_RANK"] = str(context.get_node_rank())
    os.environ["RANK"] = str(context.get_world_rank())
    os.environ["WORLD_SIZE"] = str(context.get_world_size())
    os.environ["ACCELERATE_TORCH_DEVICE"] = str(get_device())


def _shutdown_process_group(destroy: bool) -> None:
    import torch
    import torch.distributed as dist

    if destroy and dist.is_initialized():
        dist.destroy_process_group()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


class _CudaDevice:
    """Around the train function on each worker: make the worker's GPU (if any) torch's current device."""

    def __enter__(self) -> None:
        import torch

        if torch.cuda.is_available():
            from ray.train.torch import get_device

            device = get_device()
            if device.type == "cuda":
                torch.cuda.set_device(device)

    def __exit__(self, *exc) -> bool:
        return False


class _NodeBoundTorchBackend(Backend):
    share_cuda_visible_devices: bool = True

    def on_start(self, worker_group, backend_config: NodeBoundTorchConfig) -> None:
        import ray

        backend = backend_config.backend
        if backend is None:
            backend = "nccl" if worker_group.get_resources_per_worker().get("GPU", 0) > 0 else "gloo"
        addr, port = worker_group.execute_single(0, _bind_rendezvous)
        worker_group.execute(_set_distributed_env_vars)
        n = len(worker_group)
        ray.get(
            [
                worker_group.execute_single_async(
                    i,
                    _init_process_group,
                    backend=backend,
                    world_rank=i,
                    world_size=n,
                    addr=addr,
                    port=port,
                    timeout_s=backend_config.timeout_s,
                )  # fmt: skip
                for i in range(n)
            ]
        )

    def on_shutdown(self, worker_group, backend_config: NodeBoundTorchConfig) -> None:
        import ray
        from ray.exceptions import GetTimeoutError

        futures = worker_group.execute_async(_shutdown_process_group, destroy=len(worker_group) > 1)
        # the workers are stopped next either way
        with contextlib.suppress(GetTimeoutError):
            ray.get(futures, timeout=backend_config.shutdown_timeout_s)


@dataclass
class NodeBoundTorchConfig(BackendConfig):
    """Ray's ``TorchConfig`` with the rendezvous store listening on the node's address only (and no torch import)."""

    backend: str | None = None  # None: nccl with GPUs, gloo without
    timeout_s: int = 1800
    shutdown_timeout_s: float = 30.0

    @property
    def backend_cls(self):
        return _NodeBoundTorchBackend

    @property
    def train_func_context(self):
        return _CudaDevice

    @property
    def framework(self):
        return TrainingFramework.TORCH

    def to_dict(self) -> dict:
        return {"backend": self.backend, "init_method": "env", "timeout_s": self.timeout_s}


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
