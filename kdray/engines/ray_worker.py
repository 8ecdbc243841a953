"""What every Ray Train worker runs (rank = peer index): build its own peer with :class:`~kdray.population.Population`
(``local_ids=[rank]``) and the exchange ``engine.exchange`` names, then the same loop as the LocalEngine
(:func:`kdray.loop.train_epochs`) with the process group as its collective and a :class:`WorkerSink`.

Every rank reports its own peer (and where the loop stands) to Ray Train at each checkpoint: after a worker failure
Train restarts the group (``engine.fault_tolerance.max_failures``) and each rank resumes from its own file, mid-epoch
included. The population's ``<out>/checkpoints/last.pt`` is the LocalEngine's format: where every worker sees the
run folder, each writes its own part next to it and rank 0 a manifest of the parts (:mod:`kdray.checkpoint`);
else rank 0 gathers the peers' states and writes one file (``engine.session.checkpoint_writes``).
"""

from __future__ import annotations

import os
import socket
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import torch

from kdray.checkpoint import load_checkpoint, save_checkpoint
from kdray.config import validate
from kdray.engines import ray_private
from kdray.engines.data_parallel import build_worker
from kdray.engines.display import StepWindow
from kdray.engines.placement import check_worker_nodes
from kdray.engines.ray_board import Ended, EpochDone, Finished, FirstStep, Live, StepRow, WorkersStarted
from kdray.engines.sysinfo import listening_addresses, process_started_at
from kdray.engines.threads import worker_threads
from kdray.errors import DivergedError, KdrayError
from kdray.exchange import DistributedExchange
from kdray.loop import Progress, Stopped, restore, train_epochs
from kdray.metrics import MetricSums
from kdray.population import Population
from kdray.step import StepRunner

LIVE_EVERY_S = 0.5  # a Live event per rank at most this often
STOP_CHECK_EVERY = 20  # steps between stop checks (each is a small collective)


class ProcessGroup:
    """The loop's collective on Ray workers: small Python objects over a gloo group."""

    check_every = STOP_CHECK_EVERY
    writes_parts = False  # set by shared_checkpoint_folder()

    def __init__(self, rank: int, world: int, group) -> None:
        self.rank, self.world, self.group = rank, world, group

    def all_gather(self, obj: Any) -> list[Any]:
        import torch.distributed as dist

        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, obj, group=self.group)
        return out

    def gather(self, obj: Any) -> list[Any] | None:
        import torch.distributed as dist

        out: list[Any] | None = [None] * self.world if self.rank == 0 else None
        dist.gather_object(obj, out, dst=0, group=self.group)
        return out


class WorkerSink:
    """Live progress and per-step rows to the driver's board; Ray Train reports at every checkpoint."""

    def __init__(self, board, rank: int, peer: int, pop: Population, exchange: DistributedExchange):
        # the live view shows one bar per peer: a data-parallel peer's first worker speaks for it
        self.board, self.rank, self.peer, self.steps_per_epoch = board, rank, peer, pop.steps_per_epoch
        self.posts = pop.shard[0] == 0
        self.window = StepWindow(pop.cfg.train.log_every_steps)
        self.live = MetricSums()
        self.last_live = time.monotonic()
        self.window_steps = 0  # steps since the last Live event
        self.first_posted = False
        self.exchange_meter = exchange.meter
        self._live_exchange = (0.0, 0)  # (seconds, steps) of the exchange meter at the last Live event

    def epoch_started(self, epoch: int, start_step: int, steps: int) -> None:
        if self.posts:
            self.board.post.remote(Live(self.peer, epoch, start_step, steps, {}, None))
        self.last_live, self.window_steps = time.monotonic(), 0  # the evaluation is not a step

    def step_done(self, epoch: int, step_in_epoch: int, step: int, metrics: MetricSums) -> None:
        if not self.first_posted:
            self.first_posted = True
            if self.rank == 0:
                self.board.post.remote(FirstStep(time.time()))
        if not self.posts:
            return
        self.live.merge(metrics)
        self.window_steps += 1
        row = self.window.add(step, metrics)
        if row is not None:
            self.board.post.remote(StepRow(self.peer, step + 1, row))
        now = time.monotonic()
        if now - self.last_live >= LIVE_EVERY_S or step_in_epoch + 1 == self.steps_per_epoch:
            step_ms = 1000.0 * (now - self.last_live) / max(self.window_steps, 1)
            self.board.post.remote(
                Live(
                    self.peer,
                    epoch,
                    step_in_epoch + 1,
                    self.steps_per_epoch,
                    self.live.means(),
                    self._exchange_ms(),
                    step_ms,
                )
            )
            self.live, self.last_live, self.window_steps = MetricSums(), now, 0

    def _exchange_ms(self) -> float | None:
        meter = self.exchange_meter
        if meter is None:
            return None
        seconds, steps = self._live_exchange
        self._live_exchange = (meter.seconds, meter.steps)
        return (
            1000.0 * (meter.seconds - seconds) / max(meter.steps - steps, 1) if meter.steps >= steps else None
        )

    def checkpointed(self, own: dict[str, Any], progress: Progress, path: Path | None) -> None:
        """Every rank saves its own part (its peer, where the loop stands) and reports it to Ray Train."""
        import ray.train

        done = own["step"]
        metrics = {"epoch": progress.epoch, "step": done}
        if progress.step_in_epoch == 0 and progress.history:
            metrics = {**progress.history[-1], **metrics}
        with tempfile.TemporaryDirectory(prefix="kdray-ckpt-") as folder:
            save_checkpoint(Path(folder) / f"rank{self.rank}.pt", own)
            ray.train.report(
                metrics,
                checkpoint=ray.train.Checkpoint.from_directory(folder),
                checkpoint_dir_name=f"checkpoint-{done:08d}",
            )

    def epoch_done(self, metrics: dict[str, float], progress: Progress, path: Path | None) -> None:
        if self.rank == 0:
            self.board.post.remote(EpochDone(progress.epoch, metrics, str(path) if path else None))

    def stop_requested(self) -> bool:
        import ray

        return self.rank == 0 and bool(ray.get(self.board.stop_requested.remote()))


def shared_checkpoint_folder(
    mode: str, ckpt_dir: Path, collective: ProcessGroup, placement: list[dict[str, Any]], attempt: str
) -> bool:
    """Whether every worker writes its own part of the checkpoints (``engine.session.checkpoint_writes``): with
    ``auto`` or ``per_process``, rank 0 writes a probe file into the checkpoint folder and every rank looks for it,
    so a folder that only rank 0's node has (no shared file system) is found out before the first step."""
    if mode == "gather":
        return False
    probe = ckpt_dir / f".probe-{attempt}"
    wrote = True
    if collective.rank == 0:
        try:
            ckpt_dir.mkdir(parents=True, exist_ok=True)
            probe.write_text("kdray: is this folder shared by every worker?\n")
        except OSError:
            wrote = False  # every rank learns it below (no rank may leave a collective the others are in)
    if collective.all_gather(wrote)[0]:  # the probe exists before anyone looks
        seen = collective.all_gather(probe.is_file())
        collective.all_gather(None)  # everyone has looked before it goes
        if collective.rank == 0:
            probe.unlink(missing_ok=True)
    else:
        seen = [False] * collective.world
    if all(seen) or mode == "auto":
        return all(seen)
    blind = sorted(
        {f"{p['hostname']} ({p['node_ip']})" for p, s in zip(placement, seen, strict=True) if not s}
    )
    raise KdrayError(
        f"engine.session.checkpoint_writes: per_process needs the run folder {ckpt_dir.parent} on every node, and "
        f"the worker(s) on {', '.join(blind)} cannot see it (or rank 0 could not write there); put --out on a "
        "file system every node mounts, or set engine.session.checkpoint_writes: gather (or auto)"
    )


def restore_worker(pop: Population, runner: StepRunner, rank: int, train_checkpoint, resume_ref) -> Progress:
    """From this rank's file in Train's latest checkpoint (a restart), else from ``--resume``'s last.pt."""
    import ray

    if train_checkpoint is not None:
        with train_checkpoint.as_directory() as folder:
            payload = load_checkpoint(Path(folder) / f"rank{rank}.pt")
    elif resume_ref is not None:
        payload = ray.get(resume_ref)
    else:
        return Progress()
    return restore(pop, runner, payload, rank)


def train_worker(config: dict[str, Any]) -> None:
    """The function every Ray Train worker runs: rank -> (peer, shard) by ``cfg.worker_layout()``; with one
    worker per peer, rank = peer index."""
    entered = time.time()
    import ray
    import ray.train
    import torch.distributed as dist

    from kdray.methods import METHODS

    for name, cls in ray.get(config["methods"]).items():
        METHODS.setdefault(name, cls)  # plug-in methods registered in the driver
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    cfg = validate(config["config"])
    if not cfg.train.verbose:
        ray_private.quiet_train_reports()
    if cfg.engine.placement.gpus_per_peer > 0:
        import ray.train.torch

        device = ray.train.torch.get_device()
    else:
        device = torch.device("cpu")
    object_group = dist.new_group(backend="gloo") if dist.get_backend() != "gloo" else None
    attempt = [uuid.uuid4().hex if rank == 0 else None]
    dist.broadcast_object_list(attempt, src=0, group=object_group)
    worker = build_worker(
        cfg, rank, device, object_group, run_name=config["run_name"], namespace=config["namespace"],
        attempt=attempt[0],
    )  # fmt: skip
    groups, pop, exchange, runner = worker.groups, worker.pop, worker.exchange, worker.runner
    peer, workers = groups.peer, cfg.peer_workers[groups.peer]
    threads = worker_threads(cfg, pop.spec, peer)
    if threads:
        torch.set_num_threads(threads)
    built = time.time()
    collective = ProcessGroup(rank, world, object_group)
    board = config["board"]
    meta = {"config": config["checkpoint_config"], "mlflow_run_id": config["run_id"]}
    sink = WorkerSink(board, rank, peer, pop, exchange)
    progress = restore_worker(pop, runner, rank, ray.train.get_checkpoint(), config["resume"])
    started = {
        "marks": {"process_start": process_started_at(), "entered": entered, "built": built},
        "rank": rank,
        "peer": cfg.peers[peer].name,
        "shard": f"{groups.shard + 1}/{workers}",
        "node_id": ray.get_runtime_context().get_node_id(),
        "node_ip": ray.util.get_node_ip_address(),
        "hostname": socket.gethostname(),
        "pid": os.getpid(),
        # "{}" unless the user asked for one: Train's controller-only variables stay out (WorkersWithoutControllerEnv)
        "runtime_env": ray.get_runtime_context().get_runtime_env_string(),
        "device": str(device),
        "threads": torch.get_num_threads(),  # train.threads, or this peer's share (engine.placement.balance)
        "listening": listening_addresses(),
    }
    placement = collective.all_gather(started)
    check_worker_nodes(config.get("placement_plan"), placement)  # engine.placement.group_by, as planned
    ckpt_dir = Path(config["out_dir"]) / "checkpoints"
    collective.writes_parts = shared_checkpoint_folder(
        config["checkpoint_writes"],  # the driver's choice (ray_engine.checkpoint_writes)
        ckpt_dir,
        collective,
        placement,
        attempt[0],
    )
    if rank == 0:
        for where in placement:
            where["checkpoint_writes"] = "per_process" if collective.writes_parts else "gather"
        board.post.remote(WorkersStarted(placement))
    try:
        train_epochs(pop, runner, progress, collective, sink, ckpt_dir, meta)
    except (Stopped, DivergedError) as exc:  # every rank raises it at the same step: end, do not be retried
        if rank == 0:
            ray.get(board.post.remote(Ended(exc)))
        return
    if rank == 0:
        board.post.remote(
            Finished(
                history=progress.history,
                best=progress.best,
                peer_params={p.name: p.num_params for p in pop.spec.peers},
                steps_per_epoch=pop.steps_per_epoch,
            )
        )
