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
process that never computes). torch is imported in the workers only, inside the functions they run. The tests
check that a run listens on loopback only.

Only Ray's public API is used here (``ray.train.backend``); what kdray does beyond it to start a run sooner lives in
:mod:`kdray.engines.ray_private`, behind a check of Ray's version.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import socket
from dataclasses import dataclass
from datetime import timedelta

from ray.train.backend import Backend, BackendConfig

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
        from ray.exceptions import GetTimeoutError, RayActorError

        futures = worker_group.execute_async(_shutdown_process_group, destroy=len(worker_group) > 1)
        # the workers are stopped next either way; a worker lost with its node cannot be asked (Ray's
        # ActorUnavailableError / ActorDiedError): its traceback would only bury the run's own error line
        with contextlib.suppress(GetTimeoutError, RayActorError):
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
        """Train V2 labels a run's framework (its usage statistics); the label's enum is internal to Ray, so it is
        read where it exists and left out elsewhere."""
        try:
            from ray.train.v2._internal.util import TrainingFramework
        except ImportError:  # another Ray: no label
            return None
        return TrainingFramework.TORCH

    def to_dict(self) -> dict:
        return {"backend": self.backend, "init_method": "env", "timeout_s": self.timeout_s}
