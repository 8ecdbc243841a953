"""K peers x M workers against K x 1 at the same global batch: step time, the exchange's and the gradient
all-reduce's share of it, and the bytes each moves per step.

The workers are the RayEngine worker's wiring without Ray (gloo processes forked on this machine, each running the
population's StepRunner on its peer's shard, as ``tests/engines/test_data_parallel.py`` does), so Ray's start-up
does not enter the figures. On a 2-core machine, K x M processes share two cores: the step time of K x 2 is not a
speed-up figure here but the cost of the extra communication and of the oversubscribed cores; the byte counts are
what a cluster would move.

    python benchmarks/data_parallel.py --peers 2 --workers 1 2 --steps 30 --batch 64

A layout ``2+1`` gives the peers unequal numbers of workers (peer 0 two, peer 1 one): each exchange round is then
gathered to the peers' first workers and scattered back (``kdray/exchange/regroup.py``), and ``group KB`` is what that
moved within the peers (results in ``data_parallel_cpu_unequal.json``).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from step_timing import write_rows  # noqa: E402

from kdray.config import load_config  # noqa: E402


def layout(text: str, peers: int) -> list[int]:
    """``2`` -> every peer on 2 workers; ``2+1`` -> peer 0 on 2, peer 1 on 1."""
    counts = [int(m) for m in text.split("+")]
    if len(counts) == 1:
        return counts * peers
    if len(counts) != peers:
        raise SystemExit(f"--workers {text}: {len(counts)} numbers for {peers} peers")
    return counts


def config(peers: int, workers: list[int], batch: int, steps: int, width: int, sync_bn: bool) -> dict:
    return {
        "name": "dp-bench",
        "seed": 0,
        "data": {
            "dataset": "synthetic",
            "batch_size": batch,
            "val_split": 32,
            "synthetic": {
                "num_classes": 10,
                "channels": 3,
                "image_size": 32,
                "train_len": batch * (steps + 1),
            },
        },
        "peers": [{"arch": "resnet8", "arch_kwargs": {"width": width}, "workers": m} for m in workers],
        "method": {"name": "dml"},
        "train": {"epochs": 1, "threads": 1, "steps_per_epoch": steps},
        "engine": {"name": "ray", "placement": {"sync_bn": sync_bn}},
        "tracking": {"enabled": False},
    }


def worker(rank: int, world: int, init_file: str, raw: dict, warm: int, results) -> None:
    from kdray.engines.data_parallel import build_worker

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    built = build_worker(load_config(raw), rank, torch.device("cpu"))
    groups, pop, exchange, runner = built.groups, built.pop, built.exchange, built.runner
    times = []
    for step, batch in enumerate(pop.batches(0)):
        if step == warm:  # the layouts are agreed in the first step; count from here
            exchange.meter.reset()
            if hasattr(exchange, "group_bytes"):
                exchange.group_bytes = 0
            if groups.peer_group is not None:
                groups.peer_group.bytes, groups.peer_group.seconds = 0, 0.0
        dist.barrier()
        start = time.perf_counter()
        runner.step(batch, 0, step)
        times.append(time.perf_counter() - start)
    measured = len(times) - warm
    group = groups.peer_group
    results[rank] = {
        "step_ms": 1000 * statistics.median(times[warm:]),
        "exchange_ms": 1000 * exchange.meter.seconds / measured,
        "exchange_bytes": exchange.meter.bytes / measured,
        "allreduce_ms": 1000 * group.seconds / measured if group else 0.0,
        "allreduce_bytes": group.bytes / measured if group else 0,
        # unequal workers: the rows gathered to a peer's first worker and scattered back
        "group_bytes": getattr(exchange, "group_bytes", 0) / measured,
    }
    dist.destroy_process_group()


def measure(raw: dict, warm: int) -> dict:
    world = load_config(raw).num_workers
    with tempfile.TemporaryDirectory() as tmp:
        manager = mp.Manager()
        results = manager.dict()
        mp.start_processes(
            worker, args=(world, os.path.join(tmp, "pg"), raw, warm, results), nprocs=world, join=True,
            start_method="fork",
        )  # fmt: skip
        ranks = dict(results)
        manager.shutdown()
    step = statistics.median(r["step_ms"] for r in ranks.values())
    return {
        "workers_total": world,
        "step_ms": step,
        "exchange_ms": statistics.mean(r["exchange_ms"] for r in ranks.values()),
        "exchange_bytes_per_step": sum(r["exchange_bytes"] for r in ranks.values()),
        "allreduce_ms": statistics.mean(r["allreduce_ms"] for r in ranks.values()),
        "allreduce_bytes_per_step": sum(r["allreduce_bytes"] for r in ranks.values()),
        "group_bytes_per_step": sum(r["group_bytes"] for r in ranks.values()),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--peers", type=int, default=2)
    ap.add_argument("--workers", nargs="+", default=["1", "2"], help="M per peer, or per-peer counts: 2+1")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--width", type=int, default=16)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warm", type=int, default=5)
    ap.add_argument("--no-sync-bn", action="store_true")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = ap.parse_args()
    rows = []
    for text in args.workers:
        counts = layout(text, args.peers)
        raw = config(args.peers, counts, args.batch, args.steps, args.width, not args.no_sync_bn)
        row = {
            "peers": args.peers,
            "workers_per_peer": counts[0] if len(set(counts)) == 1 else "+".join(map(str, counts)),
            "global_batch": args.batch,
            **measure(raw, args.warm),
        }
        row["exchange_share"] = row["exchange_ms"] / row["step_ms"]
        row["allreduce_share"] = row["allreduce_ms"] / row["step_ms"]
        rows.append(row)
    base = rows[0]["step_ms"]
    print(f"{'K x M':>7} {'step ms':>8} {'vs K x 1':>8} {'exch ms':>8} {'exch %':>6} {'exch KB':>8} "
          f"{'allred ms':>9} {'allred %':>8} {'allred KB':>9} {'group KB':>8}")  # fmt: skip
    for r in rows:
        print(
            f"{r['peers']:>3} x {r['workers_per_peer']!s:<3} {r['step_ms']:7.1f} {r['step_ms'] / base:8.2f} "
            f"{r['exchange_ms']:8.2f} {100 * r['exchange_share']:6.1f} {r['exchange_bytes_per_step'] / 1e3:8.1f} "
            f"{r['allreduce_ms']:9.2f} {100 * r['allreduce_share']:8.1f} {r['allreduce_bytes_per_step'] / 1e3:9.1f} "
            f"{r['group_bytes_per_step'] / 1e3:8.1f}"
        )
    name = "data_parallel_cpu_no_sync_bn.json" if args.no_sync_bn else "data_parallel_cpu.json"
    if any("+" in text for text in args.workers):
        name = name.replace(".json", "_unequal.json")
    path = write_rows(args.out, name, rows)
    print(f"written: {path}")


if __name__ == "__main__":
    main()
