"""RayEngine: one peer per Ray Train worker (``TorchTrainer``, Train V2), rank = peer index.

Each worker builds only its own peer (network, private state, optimizers; frozen teachers are peers too: they
forward and publish) with ``PopulationProcess(cfg, local_ids=[rank], exchange_factory=...)`` and runs the same
``EpochLoop`` as ``LocalEngine``; signals move through ``engine.exchange`` (:mod:`kdray.exchange`). A shared
module (a generator) is replicated on every worker and its gradients are summed over the workers.

Per epoch the workers all-gather their metric and evaluation sums, so every rank sees the population's numbers
(per peer, under the peer's name, and the ensemble) and takes the same decisions; rank 0 gathers every peer's state
and writes ``<out>/checkpoints/last.pt`` in LocalEngine's format (``kdray eval`` and ``--resume`` work on Ray runs).
Every rank also reports its own peer through ``ray.train.report`` (at epoch ends, and every
``engine.checkpoint_every_steps`` steps): after a worker failure Train restarts the group
(``FailureConfig(max_failures=engine.max_failures)``) and each rank resumes from its file, mid-epoch included.

The driver (this process) keeps the MLflow run: rank 0 posts each epoch's metrics to a queue; the driver logs them
to the run (one run, whatever the restarts), prints the epoch line and calls the epoch callbacks.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import torch

from kdray.checkpoint import load_checkpoint, save_checkpoint
from kdray.config import ExperimentConfig, validate
from kdray.engines.process import Engine, EpochLoop, LoopState, PopulationProcess, wallclock
from kdray.errors import KdrayError


class RayEngine(Engine):
    name = "ray"

    def run(self, resume: dict[str, Any] | None = None) -> dict[str, Any]:
        import ray
        from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
        from ray.util.queue import Queue

        from kdray.engines.ray_backend import NodeBoundTorchConfig, PopulationTrainer
        from kdray.engines.ray_runtime import STRATEGIES, ray_session, require_placement, worker_resources
        from kdray.exchange.actor import create_signal_store
        from kdray.methods import METHODS

        cfg, eng = self.cfg, self.cfg.engine
        t0 = time.time()
        # a URI (s3://, gs://, ...) is shared storage for multi-node runs: pass it on as it is
        if eng.storage_path and "://" in eng.storage_path:
            storage = eng.storage_path.rstrip("/")
        else:
            storage = str(Path(eng.storage_path or self.out_dir / "ray_storage").resolve())
        run_name = f"{cfg.name}-{uuid.uuid4().hex[:8]}"
        marks = {"process_start": process_started_at(), "engine_start": t0}
        with ray_session(eng, cfg.num_peers) as how:
            marks["ray_ready"] = time.time()
            require_placement(eng, cfg.num_peers)
            marks["placement_ready"] = time.time()
            mailbox = Queue(actor_options={"num_cpus": 0})
            store = None
            namespace = ray.get_runtime_context().namespace
            if eng.exchange == "actor":
                store = create_signal_store(f"kdray-signals-{run_name}", namespace)
            resume_ref = ray.put(resume) if resume is not None else None
            loop_config = {
                "config": worker_config(cfg),
                "checkpoint_config": cfg.to_dict(),
                "methods": dict(METHODS),
                "out_dir": str(self.out_dir.resolve()),
                "run_dir": f"{storage}/{run_name}",
                "run_id": self.tracker.run_id,
                "t0": t0,
                "mailbox": mailbox,
                "store_name": f"kdray-signals-{run_name}" if store is not None else None,
                "namespace": namespace,
                "resume": resume_ref,
            }
            trainer = PopulationTrainer(
                train_worker,
                train_loop_config=loop_config,
                torch_config=NodeBoundTorchConfig(),
                scaling_config=ScalingConfig(
                    num_workers=cfg.num_peers,
                    use_gpu=eng.gpus_per_peer > 0,
                    resources_per_worker=worker_resources(eng),
                    placement_strategy=STRATEGIES[eng.placement],
                ),
                run_config=RunConfig(
                    name=run_name,
                    storage_path=storage,
                    failure_config=FailureConfig(max_failures=eng.max_failures),
                    checkpoint_config=CheckpointConfig(num_to_keep=2),
                ),
            )
            try:
                outcome = self._drive(trainer, mailbox, t0)
            finally:
                for actor in (store, mailbox.actor):
                    if actor is not None:
                        ray.kill(actor)
        outcome["wall_s"] = time.time() - t0
        outcome["ray"] = {
            "run_name": run_name,
            "session": how,  # how Ray was found: local (started here), attached, existing
            "storage_path": storage,
            "attempts": outcome.pop("attempts"),
            "first_step_at": outcome.pop("first_step_at"),  # unix time: launch-to-first-step measurements
        }
        outcome["ray"]["startup_s"] = startup_breakdown(
            marks, outcome.pop("first_placement"), outcome["ray"]["first_step_at"]
        )
        (self.out_dir / "ray_run.json").write_text(
            json.dumps(
                {**outcome["ray"], "placement": outcome["placement"], "exchange": outcome["exchange"]},
                indent=2,
            )
        )
        return outcome

    # ------------------------------------------------------------------ the driver loop
    def _drive(self, trainer, mailbox, t0: float) -> dict[str, Any]:
        """Run ``trainer.fit()`` in a thread; meanwhile log rank 0's epochs and call the callbacks in this thread."""
        from ray.util.queue import Empty

        box: dict[str, Any] = {}

        def fit() -> None:
            try:
                box["result"] = trainer.fit()
            except BaseException as exc:  # noqa: BLE001 - re-raised in the calling thread below
                box["error"] = exc

        thread = threading.Thread(target=fit, name="kdray-ray-fit", daemon=True)
        thread.start()
        state: dict[str, Any] = {"attempts": 0, "logged_epoch": 0, "first_step_s": None, "placement": None}
        while True:
            try:
                message = mailbox.get(timeout=0.5)
            except Empty:
                if thread.is_alive():
                    continue
                if mailbox.empty():
                    break
                continue
            self._handle(message, state, t0)
        thread.join()
        if "error" in box:
            raise user_error(box["error"]) from None
        done = state.get("done")
        if done is None:
            raise KdrayError("the Ray workers finished without reporting a result; see the worker logs above")
        history = done["history"]
        exchange = {"name": self.cfg.engine.exchange}
        for key in ("bytes_per_step", "ms_per_step", "step_ms", "wait_ms_per_step"):
            values = [h[f"exchange/{key}"] for h in history if f"exchange/{key}" in h]
            exchange[key] = sum(values) / len(values) if values else None
        if exchange["ms_per_step"] is not None and exchange["step_ms"]:
            exchange["share_of_step"] = exchange["ms_per_step"] / exchange["step_ms"]
            if exchange["wait_ms_per_step"] is not None:  # split_wait: what moving the bytes alone costs
                moving = exchange["ms_per_step"] - exchange["wait_ms_per_step"]
                exchange["transfer_share_of_step"] = moving / exchange["step_ms"]
        if exchange["wait_ms_per_step"] is None:
            del exchange["wait_ms_per_step"]
        return {
            "history": history,
            "best": done["best"],
            "peer_params": done["peer_params"],
            "first_step_s": state["first_step_s"],
            "steps_per_epoch": done["steps_per_epoch"],
            "exchange": exchange,
            "placement": state["placement"],
            "attempts": state["attempts"],
            "first_step_at": state.get("first_step_at"),
            "first_placement": state.get("first_placement"),
        }

    def _handle(self, message: dict[str, Any], state: dict[str, Any], t0: float) -> None:
        from kdray.engines.local import epoch_line

        kind = message["kind"]
        if kind == "start":
            state["attempts"] += 1
            state["placement"] = message["placement"]
            state.setdefault("first_placement", message["placement"])  # start-up is the first attempt's
        elif kind == "first_step" and state["first_step_s"] is None:
            state["first_step_s"] = message["time"] - t0
            state["first_step_at"] = message["time"]
        elif kind == "epoch" and message["epoch"] > state["logged_epoch"]:
            # a group restarted after a failure repeats no epoch it reported (it resumes after it), but be safe
            state["logged_epoch"] = message["epoch"]
            metrics = message["metrics"]
            self.tracker.log_metrics(
                {k: v for k, v in metrics.items() if k != "epoch"}, step=message["epoch"]
            )
            if self.cfg.train.progress:
                print(epoch_line(self.cfg, metrics), flush=True)
            for callback in self.callbacks:
                callback(metrics, Path(message["checkpoint"]))
        elif kind == "done":
            state["done"] = message


def worker_config(cfg: ExperimentConfig) -> dict[str, Any]:
    """The config the workers run: paths made absolute (Train runs workers in their own folders), no progress bar."""
    raw = cfg.to_dict()
    raw["data"]["root"] = str(Path(raw["data"]["root"]).resolve())
    for peer in raw["peers"]:
        if peer.get("checkpoint"):
            peer["checkpoint"] = str(Path(peer["checkpoint"]).resolve())
    raw["train"]["progress"] = False
    return raw


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


def listening_addresses() -> list[str]:
    """The ``address:port`` pairs this process listens on (Linux ``/proc``; empty elsewhere)."""
    try:
        inodes = set()
        for fd in Path("/proc/self/fd").iterdir():
            try:
                target = os.readlink(fd)
            except OSError:
                continue
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
        out = []
        for table in ("tcp", "tcp6"):
            for line in Path(f"/proc/net/{table}").read_text().splitlines()[1:]:
                fields = line.split()
                if fields[3] == "0A" and fields[9] in inodes:  # 0A: LISTEN
                    out.append(_decode_proc_address(fields[1]))
        return out
    except OSError:
        return []


def _decode_proc_address(text: str) -> str:
    import ipaddress

    hex_ip, hex_port = text.split(":")
    raw = bytes.fromhex(hex_ip)
    # /proc/net/tcp* prints the address as 32-bit words in host (little-endian) order
    raw = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
    ip = ipaddress.ip_address(raw)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped:
        ip = ip.ipv4_mapped
    return f"{ip}:{int(hex_port, 16)}"


def process_started_at() -> float | None:
    """This process's start as a unix time (Linux ``/proc``; None elsewhere)."""
    try:
        ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        boot = next(
            float(line.split()[1])
            for line in Path("/proc/stat").read_text().splitlines()
            if line.startswith("btime ")
        )
        return boot + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return None


def startup_breakdown(
    driver: dict[str, float | None], placement: list[dict] | None, first_step_at: float | None
) -> dict[str, float | None]:
    """Where the time to the first step went, in seconds, each span ending where the next starts.

    Driver: ``launch`` (process start to the engine: Python, imports, config, MLflow), ``ray_init`` (start or
    attach to Ray), ``placement_check``, ``fit_to_workers`` (Train's controller, placement group and worker
    processes, up to the last worker process started), ``worker_imports`` (up to the last worker entering the
    training function: torch, Ray Train and kdray imports in the workers, the process group), ``worker_build``
    (up to the last worker's peer built: model, data, optimizers, exchange) and ``to_first_step`` (restore,
    layout agreement, the first step). ``total``: process start to the end of the first step. A span whose
    points are unknown (no ``/proc``) is None."""
    workers = [w.get("marks") or {} for w in placement or []]

    def last(key: str) -> float | None:
        values = [w.get(key) for w in workers]
        return max(values) if values and None not in values else None

    points = [
        ("launch", driver.get("process_start")),
        ("ray_init", driver.get("engine_start")),
        ("placement_check", driver.get("ray_ready")),
        ("fit_to_workers", driver.get("placement_ready")),
        ("worker_imports", last("process_start")),
        ("worker_build", last("entered")),
        ("to_first_step", last("built")),
        (None, first_step_at),
    ]
    # a worker process Ray had started before (an idle pooled process) counts from the previous point: spans >= 0
    previous = None
    for i, (name, at) in enumerate(points):
        if at is not None and previous is not None and at < previous:
            points[i] = (name, previous)
        previous = points[i][1] if points[i][1] is not None else previous
    out: dict[str, float | None] = {}
    for (name, start), (_, end) in zip(points, points[1:], strict=False):
        out[name] = round(end - start, 3) if start is not None and end is not None else None
    start, end = driver.get("process_start"), first_step_at
    out["total"] = round(end - start, 3) if start is not None and end is not None else None
    return out


# ---------------------------------------------------------------------------------------------- the workers
def train_worker(config: dict[str, Any]) -> None:
    """The function every Ray Train worker runs (rank = peer index)."""
    entered = time.time()
    import ray
    import ray.train
    import torch.distributed as dist

    from kdray.exchange import exchange_factory
    from kdray.methods import METHODS

    for name, cls in config["methods"].items():
        METHODS.setdefault(name, cls)  # plug-in methods registered in the driver
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    cfg = validate(config["config"])
    if cfg.engine.gpus_per_peer > 0:
        import ray.train.torch

        device = ray.train.torch.get_device()
    else:
        device = torch.device("cpu")
    object_group = dist.new_group(backend="gloo") if dist.get_backend() != "gloo" else None
    attempt = [uuid.uuid4().hex if rank == 0 else None]
    dist.broadcast_object_list(attempt, src=0, group=object_group)
    factory = exchange_factory(
        cfg, rank, world, device, object_group=object_group, store_name=config["store_name"],
        attempt=attempt[0], namespace=config["namespace"],
    )  # fmt: skip
    proc = PopulationProcess(cfg, local_ids=[rank], exchange_factory=factory, device=device)
    built = time.time()
    loop = RayWorkerLoop(cfg, proc, config, rank, world, object_group)
    state, start_step, sums, n = loop.restore(ray.train.get_checkpoint(), config["resume"])
    loop.announce({"process_start": process_started_at(), "entered": entered, "built": built})
    loop.run(state, start_step, sums, n)
    loop.finish(state)


class RayWorkerLoop(EpochLoop):
    """The epoch loop of one Ray worker: sums merged over the workers, rank 0 writes, every rank reports."""

    def __init__(
        self, cfg, proc: PopulationProcess, config: dict[str, Any], rank: int, world: int, object_group
    ):
        # EpochLoop times from a perf_counter origin: place it at the driver's start (same clock on one machine).
        t0 = wallclock() - (time.time() - config["t0"])
        super().__init__(
            cfg,
            proc,
            Path(config["out_dir"]) / "checkpoints",
            config["checkpoint_config"],
            config["run_id"],
            t0,
        )
        self.loop_config, self.rank, self.world, self.object_group = config, rank, world, object_group
        self.mailbox = config["mailbox"]
        self.state = LoopState()
        self.epoch_start = wallclock()
        self.epoch_steps = 0
        self.posted_first_step = False

    # ------------------------------------------------------------------ collectives on small objects
    def _all_gather(self, obj: Any) -> list[Any]:
        import torch.distributed as dist

        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, obj, group=self.object_group)
        return out

    def _post(self, message: dict[str, Any]) -> None:
        if self.rank == 0:
            self.mailbox.put(message)

    # ------------------------------------------------------------------ start, restore, finish
    def restore(self, checkpoint, resume_ref) -> tuple[LoopState, int, dict | None, int]:
        """From this rank's file in Train's latest checkpoint (a restart), else from ``--resume``'s last.pt."""
        import ray

        proc = self.proc
        if checkpoint is not None:
            with checkpoint.as_directory() as folder:
                payload = load_checkpoint(Path(folder) / f"rank{self.rank}.pt")
            exchange_state = payload.get("exchange") or {}
            start_step, sums, n = payload["step_in_epoch"], payload["sums"], payload["n"]
        elif resume_ref is not None:
            payload = ray.get(resume_ref)
            exchange_state = (payload.get("exchange") or {}).get(self.rank, {})
            start_step, sums, n = 0, None, 0
        else:
            return self.state, 0, None, 0
        proc.load_state_dict(payload)
        proc.exchange.load_state_dict(exchange_state)
        torch.set_rng_state(payload["rng"])
        self.state = LoopState(payload["epoch"], list(payload.get("history", [])), dict(payload["best"]))
        return self.state, start_step, sums, n

    def announce(self, marks: dict[str, float | None]) -> None:
        import ray

        me = {
            "marks": marks,
            "rank": self.rank,
            "peer": self.cfg.peers[self.rank].name,
            "node_id": ray.get_runtime_context().get_node_id(),
            "node_ip": ray.util.get_node_ip_address(),
            "hostname": socket.gethostname(),
            "pid": os.getpid(),
            "device": str(self.proc.device),
            "listening": listening_addresses(),
        }
        self._post({"kind": "start", "placement": self._all_gather(me)})

    def finish(self, state: LoopState) -> None:
        self._post(
            {
                "kind": "done",
                "history": state.history,
                "best": state.best,
                "peer_params": {p.name: p.num_params for p in self.proc.pop.peers},
                "steps_per_epoch": self.proc.steps_per_epoch,
            }
        )

    # ------------------------------------------------------------------ EpochLoop hooks
    def run(self, state, start_step=0, sums=None, n=0):
        self.state = state
        return super().run(state, start_step, sums, n)

    def before_epoch(self, epoch: int) -> None:
        self.epoch_start = wallclock()
        self.epoch_steps = 0

    def after_step(self, epoch: int, local_step: int, metrics: dict) -> None:
        eng = self.cfg.engine
        self.epoch_steps += 1
        if not self.posted_first_step:  # the driver keeps the first attempt's
            self.posted_first_step = True
            self._post({"kind": "first_step", "time": time.time()})
        done = epoch * self.proc.steps_per_epoch + local_step + 1
        every = eng.checkpoint_every_steps
        # (the epoch end checkpoints anyway)
        if every and done % every == 0 and local_step + 1 < self.proc.steps_per_epoch:
            self.report({"epoch": epoch, "step": done}, epoch, local_step + 1)
        if eng.inject_failure_at_step == done and self.rank == min(1, self.world - 1):
            run_dir = self.loop_config["run_dir"]
            folder = (
                Path(run_dir) if "://" not in run_dir else Path(tempfile.gettempdir()) / Path(run_dir).name
            )
            marker = folder / f"kdray-failure-injected-at-{done}"
            if not marker.exists():  # once per run: the restarted group passes this step normally
                marker.parent.mkdir(parents=True, exist_ok=True)
                marker.write_text(f"rank {self.rank} killed itself after step {done}\n")
                os.kill(os.getpid(), signal.SIGKILL)

    def merge_metrics(self, sums, n):
        parts = self._all_gather({k: float(v) for k, v in sums.items()})
        total: dict[str, float] = {}
        for part in parts:
            for k, v in part.items():
                total[k] = total.get(k, 0.0) + v
        return {k: v / max(n, 1) for k, v in total.items()}

    def merge_eval(self, ev):
        parts = self._all_gather(ev)
        probs = [p["probs_sum"] for p in parts if p["probs_sum"] is not None]
        probs_sum = None
        for p in probs:  # rank order = peer order: the same float sums as in one process
            probs_sum = p if probs_sum is None else probs_sum + p
        return {
            "n": parts[0]["n"],
            "correct": {k: v for p in parts for k, v in p["correct"].items()},
            "loss": {k: v for p in parts for k, v in p["loss"].items()},
            "probs_sum": probs_sum,
            "labels": parts[0]["labels"],
        }

    def extra_metrics(self) -> dict[str, float]:
        mine = self.proc.exchange.stats()
        mine["step_ms"] = 1000.0 * (wallclock() - self.epoch_start) / max(self.epoch_steps, 1)
        parts = self._all_gather(mine)
        out = {
            "exchange/bytes_per_step": sum(p["bytes_per_step"] for p in parts),
            "exchange/ms_per_step": sum(p["ms_per_step"] for p in parts) / len(parts),
            "exchange/step_ms": sum(p["step_ms"] for p in parts) / len(parts),
        }
        if all("wait_ms_per_step" in p for p in parts):  # engine.split_wait
            out["exchange/wait_ms_per_step"] = sum(p["wait_ms_per_step"] for p in parts) / len(parts)
        return out

    def population_state(self) -> dict[str, Any] | None:
        import torch.distributed as dist

        mine = {**self.proc.state_dict(), "exchange": self.proc.exchange.state_dict()}
        parts: list[Any] | None = [None] * self.world if self.rank == 0 else None
        dist.gather_object(mine, parts, dst=0, group=self.object_group)
        if self.rank != 0:
            return None
        return {
            "peers": {name: sd for part in parts for name, sd in part["peers"].items()},
            "shared": parts[0]["shared"],
            "exchange": {r: part["exchange"] for r, part in enumerate(parts)},
        }

    def after_epoch(self, metrics, state, checkpoint) -> None:
        self.report(metrics, state.epoch, 0)
        self._post({"kind": "epoch", "epoch": state.epoch, "metrics": metrics, "checkpoint": str(checkpoint)})

    # ------------------------------------------------------------------ Train checkpoints
    def report(self, metrics: dict[str, float], epoch: int, step_in_epoch: int) -> None:
        """Every rank saves its own peer (and where it stands in the epoch) and reports it to Ray Train."""
        import ray.train

        payload = {
            "epoch": epoch, "step_in_epoch": step_in_epoch,
            "sums": {k: torch.as_tensor(v).detach().clone() for k, v in self.sums.items()} if step_in_epoch else {},
            "n": self.n if step_in_epoch else 0,
            "history": self.state.history, "best": self.state.best, "rng": torch.get_rng_state(),
            **self.proc.state_dict(), "exchange": self.proc.exchange.state_dict(),
        }  # fmt: skip
        done = epoch * self.proc.steps_per_epoch + step_in_epoch
        with tempfile.TemporaryDirectory(prefix="kdray-ckpt-") as folder:
            save_checkpoint(Path(folder) / f"rank{self.rank}.pt", payload)
            ray.train.report(
                dict(metrics),
                checkpoint=ray.train.Checkpoint.from_directory(folder),
                checkpoint_dir_name=f"checkpoint-{done:08d}",
            )
