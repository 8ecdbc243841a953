"""Ray Train's torch process-group setup, with the rendezvous bound to the node's own address.

Ray's ``TorchConfig`` lets torch's ``env://`` rendezvous start the ``TCPStore`` on rank 0, and that store listens on
every interface (``*:PORT``), so even a run on a loopback-only local Ray opens a port to the network. Here rank 0
binds the store's socket itself, to its node's IP (127.0.0.1 for kdray's local Ray, 127.0.0.x for loopback
multi-node tests, the node's address on a real cluster), and hands the bound socket to ``TCPStore``
(``master_listen_fd``); gloo is pinned to the loopback interface when the node address is a loopback one.

Everything else is Ray's: the backend (gloo on CPU, nccl on GPU), the torch environment variables, the shutdown.
It builds on Ray's private ``_TorchBackend`` (Ray is pinned to 2.60; the tests check that a run listens on loopback
only).
"""

from __future__ import annotations

import ipaddress
import os
import socket
from dataclasses import dataclass
from datetime import timedelta

from ray.train.torch import TorchConfig, TorchTrainer
from ray.train.torch.config import _set_torch_distributed_env_vars, _TorchBackend

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


class _NodeBoundTorchBackend(_TorchBackend):
    def on_start(self, worker_group, backend_config: TorchConfig) -> None:
        import ray

        backend = backend_config.backend
        if backend is None:
            backend = "nccl" if worker_group.get_resources_per_worker().get("GPU", 0) > 0 else "gloo"
        addr, port = worker_group.execute_single(0, _bind_rendezvous)
        worker_group.execute(_set_torch_distributed_env_vars)
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


@dataclass
class NodeBoundTorchConfig(TorchConfig):
    """``TorchConfig`` whose rendezvous store listens on the node's address only."""

    @property
    def backend_cls(self):
        return _NodeBoundTorchBackend


class PopulationTrainer(TorchTrainer):
    """``TorchTrainer`` without Ray Data's dataset callback when no Ray Dataset is given (kdray's workers build their
    own deterministic batches): Train V2 would otherwise start a ``DatasetManager`` actor per run, one more process
    competing for the cores while the workers start."""

    def _create_default_callbacks(self):
        from ray.train.v2._internal.callbacks.datasets import DatasetsCallback

        callbacks = super()._create_default_callbacks()
        if not self.datasets:
            callbacks = [c for c in callbacks if not isinstance(c, DatasetsCallback)]
        return callbacks
