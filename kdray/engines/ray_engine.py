"""RayEngine: every peer on its own Ray Train workers, one each or M each (data-parallel peers,
:mod:`kdray.engines.data_parallel`); Train V2's ``PopulationTrainer``, a ``DataParallelTrainer`` with kdray's
torch backend.

The workers (:mod:`kdray.engines.ray_worker`) run the same loop as the LocalEngine; signals move through
``engine.exchange`` (:mod:`kdray.exchange`). This module is the driver: it finds Ray (:mod:`ray_runtime`), checks
the placement, starts ``trainer.fit()`` in a thread and, meanwhile, drains the workers' progress board
(:mod:`ray_board`) a few times a second: a live progress bar, per-step and per-epoch MLflow metrics of the one
MLflow run (whatever the restarts), the epoch lines and the epoch callbacks (Tune reports).
"""

from __future__ import annotations

import json
import re
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from kdray.checkpoint import write_atomic
from kdray.config import ExperimentConfig
from kdray.engines.base import Engine
from kdray.engines.display import EpochBar, live_listeners, progress_text, report_epoch, write_step_row
from kdray.engines.ray_board import Ended, EpochDone, Finished, FirstStep, Live, StepRow, WorkersStarted
from kdray.engines.sysinfo import process_started_at, startup_breakdown
from kdray.errors import KdrayError
from kdray.registry import ENGINES

DRAIN_EVERY_S = 0.25


def make_trainer(
    loop_config: dict[str, Any], *, autoscaler_requests: bool, placement_group_cleaner: bool, **kwargs
):
    """The Train V2 trainer of a population's workers (``kwargs``: ``scaling_config``, ``run_config``). On a Ray
    release kdray's start-up shortcuts were tested on, :class:`~kdray.engines.ray_private.PopulationTrainer`; on
    any other (or with ``KDRAY_RAY_PUBLIC=1``), Ray's public ``TorchTrainer`` with kdray's torch backend config
    (public ``ray.train.backend`` classes): the same workers, the same maths, a slower start."""
    from ray.train.torch import TorchTrainer

    from kdray.engines import ray_private
    from kdray.engines.ray_backend import NodeBoundTorchConfig
    from kdray.engines.ray_worker import train_worker

    if ray_private.available():
        return ray_private.PopulationTrainer(
            train_worker, train_loop_config=loop_config, torch_config=NodeBoundTorchConfig(),
            autoscaler_requests=autoscaler_requests, placement_group_cleaner=placement_group_cleaner, **kwargs,
        )  # fmt: skip
    return TorchTrainer(
        train_worker, train_loop_config=loop_config, torch_config=NodeBoundTorchConfig(), **kwargs
    )


def train_logging(train_module, verbose: bool) -> dict[str, Any]:
    """``RunConfig``'s ``logging_config``: Ray Train's own progress lines (every report and checkpoint) only with
    ``train.verbose``. ``ray.train.LoggingConfig`` is public in Ray 2.60 and absent from 2.55, where Train logs at
    its default level (the workers then quiet the ``ray.train`` logger: ``ray_private.quiet_train_reports``)."""
    config = getattr(train_module, "LoggingConfig", None)
    return {"logging_config": config(log_level="INFO" if verbose else "WARNING")} if config else {}


@ENGINES.register
class RayEngine(Engine):
    name = "ray"
    sections = ("session", "placement", "exchange", "fault_tolerance")
    summary = "one peer per Ray Train worker"

    def run(self, resume: dict[str, Any] | None = None) -> dict[str, Any]:
        import ray
        import ray.train
        from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig

        from kdray.engines.placement import planned_placement, worker_resources
        from kdray.engines.ray_board import create_board
        from kdray.engines.ray_runtime import (
            LAST_LOCAL_START,
            STRATEGIES,
            loopback_cluster,
            ray_session,
            require_placement,
        )
        from kdray.methods import METHODS
        from kdray.registry import EXCHANGES

        cfg, eng = self.cfg, self.cfg.engine
        t0 = time.time()
        storage_path = eng.session.storage_path
        if storage_path and "://" in storage_path:  # a URI is shared storage for multi-node runs: as it is
            storage = storage_path.rstrip("/")
        else:
            storage = str(Path(storage_path or self.out_dir / "ray_storage").resolve())
        run_name = f"{cfg.name}-{uuid.uuid4().hex[:8]}"
        marks = {"process_start": process_started_at(), "engine_start": t0}
        with ray_session(eng, cfg.num_workers) as ray_found:
            marks["ray_ready"] = time.time()
            # engine.placement.group_by: the node of every worker, pinned by Ray's node-id label
            plan = planned_placement(cfg, can_grow=not loopback_cluster())
            require_placement(eng, cfg.num_workers, plan)
            marks["placement_ready"] = time.time()
            namespace = ray.get_runtime_context().namespace
            board = create_board(namespace)
            board_ip = ray.get(board.node_ip.remote())  # the head's, where Ray lets it (create_board)
            shared_actors = EXCHANGES.lookup(eng.exchange.name).prepare(run_name, namespace)
            loop_config = {
                "config": worker_config(cfg),
                "checkpoint_config": cfg.to_dict(),
                # by reference: Train V2's controller unpickles this dict, and the method classes import torch
                "methods": ray.put(dict(METHODS)),
                "out_dir": str(self.out_dir.resolve()),
                "run_id": self.tracker.run_id,
                "board": board,
                "run_name": run_name,
                "namespace": namespace,
                "resume": ray.put(resume) if resume is not None else None,
                "placement_plan": plan.record() if plan else None,  # every worker checks its node against it
                "checkpoint_writes": checkpoint_writes(eng.session.checkpoint_writes, self.callbacks),
            }
            trainer = make_trainer(
                loop_config,
                # no autoscaler can add machines to a loopback cluster: no coordinator actor, no waiting on it
                autoscaler_requests=not loopback_cluster(),
                # the job ends with this run where kdray started or attached to Ray: Ray then removes its placement
                # groups, and Train's cleaner actor would only add a process to the start
                placement_group_cleaner=ray_found == "existing",
                scaling_config=ScalingConfig(
                    num_workers=cfg.num_workers,
                    use_gpu=eng.placement.gpus_per_peer > 0,
                    resources_per_worker=worker_resources(eng),
                    placement_strategy=STRATEGIES[eng.placement.strategy],
                    label_selector=plan.label_selector() if plan else None,
                ),
                run_config=RunConfig(
                    name=run_name,
                    storage_path=storage,
                    failure_config=FailureConfig(max_failures=eng.fault_tolerance.max_failures),
                    checkpoint_config=CheckpointConfig(num_to_keep=2),
                    **train_logging(ray.train, cfg.train.verbose),
                ),
            )
            try:
                outcome = DriverView(self, t0, board_ip).follow(trainer, board)
            finally:
                for actor in (*shared_actors, board):
                    if actor is not None:
                        ray.kill(actor)
        outcome["wall_s"] = time.time() - t0
        outcome["ray"] = {
            "run_name": run_name,
            "trainer": type(
                trainer
            ).__name__,  # PopulationTrainer (a tested Ray) or TorchTrainer (the public API)
            "session": ray_found,  # how Ray was found: local (started here), attached, existing
            "storage_path": storage,
            # per_process: every worker wrote its own part of checkpoints/last.pt; gather: rank 0 wrote it all
            "checkpoint_writes": (outcome.get("placement") or [{}])[0].get("checkpoint_writes"),
            "attempts": outcome.pop("attempts"),
            "first_step_at": outcome.pop("first_step_at"),  # unix time: launch-to-first-step measurements
            "placement_plan": plan.record() if plan else None,  # engine.placement.group_by: each rank's node
            "board_node_ip": board_ip,  # the progress board's node: losing it ends the run (create_board)
        }
        outcome["ray"]["startup_s"] = startup_breakdown(
            marks, outcome.pop("first_placement"), outcome["ray"]["first_step_at"]
        )
        if ray_found == "local" and LAST_LOCAL_START.get("started_at") and marks["process_start"]:
            # the local Ray's start, in its own thread from this point of the launch (api.run_population)
            outcome["ray"]["local_ray_start"] = {
                "began_s": round(LAST_LOCAL_START["started_at"] - marks["process_start"], 3),
                "took_s": LAST_LOCAL_START["took_s"],
            }
        write_atomic(
            self.out_dir / "ray_run.json",
            json.dumps(
                {**outcome["ray"], "placement": outcome["placement"], "exchange": outcome["exchange"]},
                indent=2,
            ).encode(),
        )
        return outcome


class DriverView:
    """The driver's side of a Ray run: the events of the workers, turned into what the user sees and keeps."""

    def __init__(self, engine: RayEngine, t0: float, board_ip: str | None = None):
        self.engine, self.cfg, self.t0, self.board_ip = engine, engine.cfg, t0, board_ip
        self.bar = EpochBar(self.cfg, live_listeners(engine.callbacks))
        self.live: dict[int, Live] = {}  # each rank's latest
        self.bar_epoch = -1
        self.attempts = 0
        self.placement: list[dict[str, Any]] | None = None
        self.first_placement: list[dict[str, Any]] | None = None
        self.first_step_at: float | None = None
        self.logged_epoch = 0
        self.finished: Finished | None = None
        self.ended: Exception | None = None  # a stop or divergence every worker reached (Ended)
        self.stop_sent = False

    def follow(self, trainer, board) -> dict[str, Any]:
        """Run ``trainer.fit()`` in a thread; meanwhile handle the workers' events in this thread."""

        fit_outcome: dict[str, Any] = {}  # "result" or "error", set by the fit thread

        def fit() -> None:
            try:
                fit_outcome["result"] = trainer.fit()
            except BaseException as exc:  # noqa: BLE001 - re-raised in the calling thread below
                fit_outcome["error"] = exc

        thread = threading.Thread(target=fit, name="kdray-ray-fit", daemon=True)
        thread.start()
        try:
            while thread.is_alive():
                thread.join(DRAIN_EVERY_S)
                for event in drain(board, out_dir=self.engine.out_dir, node_ip=self.board_ip):
                    self.handle(event)
                if not self.stop_sent and self.engine.stop():
                    board.request_stop.remote()
                    self.stop_sent = True
            for event in drain(board, out_dir=self.engine.out_dir, node_ip=self.board_ip):
                self.handle(event)
        finally:
            self.bar.close()
        if "error" in fit_outcome:
            error = user_error(fit_outcome["error"])
            if isinstance(error, KdrayError):
                raise error from None
            raise node_lost(error, self.cfg, self.engine.out_dir, self.placement) or WorkerFailed(
                describe_failure(error, self.cfg)
            ) from None
        if self.ended is not None:
            raise self.ended from None
        if self.finished is None:
            raise KdrayError("the Ray workers finished without reporting a result; see the worker logs above")
        return self.outcome()

    def handle(self, event: Any) -> None:
        match event:
            case WorkersStarted(placement=placement):
                self.attempts += 1
                self.placement = placement
                self.first_placement = self.first_placement or placement  # start-up is the first attempt's
                # where every peer runs, as soon as it is known (process ids included: a user can watch them)
                write_atomic(
                    self.engine.out_dir / "ray_run.json",
                    json.dumps(
                        {"attempts": self.attempts, "placement": placement, "board_node_ip": self.board_ip},
                        indent=2,
                    ).encode(),
                )
            case FirstStep(time=at) if self.first_step_at is None:
                self.first_step_at = at
            case Live():
                self.on_live(event)
            case StepRow(step=step, row=row):
                write_step_row(self.engine.tracker, self.engine.out_dir, step, row)
            case EpochDone(epoch=epoch, metrics=metrics, checkpoint=checkpoint) if epoch > self.logged_epoch:
                # a group restarted after a failure repeats no epoch it reported (it resumes after it), but be safe
                self.logged_epoch = epoch
                if self.bar_epoch < epoch:  # not when a rank's Live of the next epoch (0-based) came first
                    self.bar.close()
                report_epoch(self.engine, self.bar, epoch, metrics, Path(checkpoint) if checkpoint else None)
            case Ended(error=error):
                self.ended = error
            case Finished():
                self.finished = event

    def on_live(self, event: Live) -> None:
        if event.epoch < self.logged_epoch:  # a late event of an epoch already done
            return
        self.live[event.rank] = event
        if self.bar.bar is None or event.epoch > self.bar_epoch:
            self.bar.start(event.epoch, event.steps_done, event.steps)
            self.bar_epoch = event.epoch
        current = [e for e in self.live.values() if e.epoch == self.bar_epoch]
        means = {k: v for e in current for k, v in e.means.items()}
        extra = exchange_text(current)
        self.bar.advance(min(e.steps_done for e in current), progress_text(self.cfg, means, extra))

    def outcome(self) -> dict[str, Any]:
        done = self.finished
        history = done.history
        exchange: dict[str, Any] = {"name": self.cfg.engine.exchange.name}
        for key in ("bytes_per_step", "group_bytes_per_step", "ms_per_step", "wait_ms_per_step"):
            values = [h[f"exchange/{key}"] for h in history if f"exchange/{key}" in h]
            exchange[key] = sum(values) / len(values) if values else None
        # epochs this engine trained (a run resumed from a LocalEngine checkpoint has earlier ones without exchange)
        steps = [h["train/step_ms"] for h in history if "train/step_ms" in h and "exchange/ms_per_step" in h]
        exchange["step_ms"] = sum(steps) / len(steps) if steps else None
        if exchange["ms_per_step"] is not None and exchange["step_ms"]:
            exchange["share_of_step"] = exchange["ms_per_step"] / exchange["step_ms"]
            if exchange["wait_ms_per_step"] is not None:  # split_wait: what moving the bytes alone costs
                moving = exchange["ms_per_step"] - exchange["wait_ms_per_step"]
                exchange["transfer_share_of_step"] = moving / exchange["step_ms"]
        for key in ("wait_ms_per_step", "group_bytes_per_step"):  # only where measured
            if exchange[key] is None:
                del exchange[key]
        return {
            "history": history,
            "best": done.best,
            "peer_params": done.peer_params,
            "first_step_after_engine_start_s": self.first_step_at - self.t0 if self.first_step_at else None,
            "steps_per_epoch": done.steps_per_epoch,
            "exchange": exchange,
            "placement": self.placement,
            "attempts": self.attempts,
            "first_step_at": self.first_step_at,
            "first_placement": self.first_placement,
        }


def exchange_text(current: list[Live]) -> str:
    """The bar's exchange figure: the ranks' mean exchange time per step, and its share of their mean step."""
    exchange = [e.exchange_ms for e in current if e.exchange_ms is not None]
    if not exchange:
        return ""
    ms = sum(exchange) / len(exchange)
    steps = [e.step_ms for e in current if e.step_ms]
    share = f" ({100 * ms / (sum(steps) / len(steps)):.0f}% of the step)" if steps else ""
    return f"exchange {ms:.1f} ms/step{share}"


def worker_config(cfg: ExperimentConfig) -> dict[str, Any]:
    """The config the workers run: paths made absolute (Train runs workers in their own folders), no progress bar."""
    raw = cfg.to_dict()
    raw["data"]["root"] = str(Path(raw["data"]["root"]).resolve())
    for peer in raw["peers"]:
        if peer.get("checkpoint"):
            peer["checkpoint"] = str(Path(peer["checkpoint"]).resolve())
    raw["train"]["progress"] = False
    return raw


def checkpoint_writes(asked: str, callbacks: list) -> str:
    """How the workers write the population's checkpoint. ``auto`` with epoch callbacks (a ``kdray tune`` trial's
    reporter copies ``last.pt`` in the driver while the workers go on): ``gather``, one self-contained file per
    checkpoint, because the per-process parts that the callback's manifest names may already be pruned by a newer
    checkpoint when the driver reads them."""
    return "gather" if asked == "auto" and callbacks else asked


class WorkerFailed(KdrayError):
    """A worker raised an unexpected error (a bug, not bad input): its traceback, rank and peer, in full."""

    exit_code = 1


def describe_failure(error: BaseException, cfg: ExperimentConfig) -> str:
    """Every failed worker's error with its rank and peer name (Ray's own text holds the worker's traceback)."""
    failures = getattr(error, "worker_failures", None) or {}
    if not failures:
        return f"the Ray run failed: {type(error).__name__}: {error}"
    parts = []
    layout = cfg.worker_layout()
    for rank, exc in sorted(failures.items()):
        peer = cfg.peers[layout[rank][0]].name if 0 <= rank < len(layout) else "?"
        parts.append(f"worker rank {rank} (peer {peer}) failed: {type(exc).__name__}: {exc}")
    return "\n".join(parts)


def drain(board, wait_s: float = 30.0, out_dir: Path | None = None, node_ip: str | None = None) -> list[Any]:
    """The board's events. A board Ray calls "temporarily unavailable" (``ActorUnavailableError``: seen on the driver
    while another node of the cluster went away) is asked again for up to ``wait_s`` seconds; a dead one (its node
    lost: with the board on the head, the cluster itself) is one ``KdrayError`` line naming its node and the resume
    command."""
    import ray
    from ray.exceptions import ActorDiedError, ActorUnavailableError

    deadline = time.monotonic() + wait_s
    while True:
        try:
            return ray.get(board.drain.remote())
        except ActorUnavailableError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)
        except ActorDiedError as exc:
            where = f" on Ray node {node_ip}" if node_ip else ""
            resume = (
                f"`kdray train --resume {out_dir}` continues from it" if out_dir else "a resume continues"
            )
            reason = str(exc).strip().splitlines()[-1].strip()
            raise KdrayError(
                f"the run's progress board{where} died mid-run ({reason}), so its driver cannot follow the workers; "
                f"the last checkpoint is intact: {resume} once the cluster is whole"
            ) from None


# Ray's errors for a worker whose process or node went away (not an error the worker's code raised), and what a
# surviving worker's collective says when its peer's process vanished
LOST = (
    "WorkerHealthCheckFailedError",
    "ActorDiedError",
    "ActorUnavailableError",
    "NodeDiedError",
    "OwnerDiedError",
)
PEER_GONE = ("Connection closed by peer", "Connection reset by peer", "remote worker crashing")
NODE_DEATH_WAIT_S = (
    30.0  # how long a failed run waits for Ray to declare a silent node dead (its health checks)
)


def _dead_nodes(placement: list[dict[str, Any]], wait_s: float) -> set[str]:
    """The node ids of ``placement`` that Ray's GCS reports dead, polled for up to ``wait_s`` seconds."""
    import ray

    ours = {p.get("node_id") for p in placement} - {None}
    deadline = time.monotonic() + wait_s
    while True:
        try:
            dead = {n["NodeID"] for n in ray.nodes() if not n.get("Alive", True)} & ours
        except Exception:  # noqa: BLE001 - no GCS to ask: nothing to name
            return set()
        if dead or time.monotonic() >= deadline:
            return dead
        time.sleep(0.5)


def node_lost(
    error: BaseException, cfg: ExperimentConfig, out_dir: Path, placement: list[dict[str, Any]] | None = None,
    wait_s: float = NODE_DEATH_WAIT_S,
) -> KdrayError | None:  # fmt: skip
    """One line for workers lost with their node (a raylet killed, a machine gone): the node's address and id, the
    ranks and peers it held, and how to continue; None for any other failure. The node is the one of the run's
    placement that Ray reports dead, else the one Ray's error names."""
    failures = getattr(error, "worker_failures", None) or {}
    lost = {r: e for r, e in failures.items() if type(e).__name__ in LOST}
    gone = {r: e for r, e in failures.items() if any(s in str(e) for s in PEER_GONE)}
    if not lost and not gone:
        return None
    layout = cfg.worker_layout()

    def peer(rank: int) -> str:
        return cfg.peers[layout[rank][0]].name if 0 <= rank < len(layout) else "?"

    dead = _dead_nodes(placement or [], wait_s) if placement else set()
    if dead:
        on = [p for p in placement if p.get("node_id") in dead]
        node = ", ".join(sorted({f"{p['node_ip']} (node id {p['node_id'][:12]})" for p in on}))
        ranks = sorted(p["rank"] for p in on)
    elif lost:
        rank, exc = min(lost.items())
        text = str(exc)
        ip = re.search(r"node_ip='([^']+)'", text) or re.search(r"ipv4:([0-9.]+):\d+", text)
        node_id = re.search(r"node_id='([0-9a-f]+)'", text)
        node = (ip.group(1) if ip else "?") + (f" (node id {node_id.group(1)[:12]})" if node_id else "")
        ranks = sorted(lost)
    else:
        return None  # a peer's connection closed, no node is dead: the workers' own errors say more
    workers = ", ".join(f"rank {r} (peer {peer(r)})" for r in ranks)
    return KdrayError(
        f"Ray node {node} was lost mid-run with worker {workers}; the last checkpoint is intact: "
        f"`kdray train --resume {out_dir}` continues from it (with engine.fault_tolerance.max_failures >= 1 the "
        "run restarts its workers on the nodes left instead, where they fit)"
    )


def user_error(exc: BaseException) -> BaseException:
    """The KdrayError a worker raised (so the user sees its one line), else the Ray error as it came."""
    stack, seen = [exc], set()
    while stack:
        e = stack.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, KdrayError):
            return e
        stack += [
            e.__cause__,
            e.__context__,
            getattr(e, "controller_failure", None),
            getattr(e, "cause", None),
        ]
        stack += list(getattr(e, "worker_failures", {}).values())
    return exc
