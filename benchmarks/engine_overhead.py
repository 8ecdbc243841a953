"""LocalEngine overhead: kdray's DML training step vs a minimal hand-written PyTorch DML step.

Both train the same peers (same seeds, same initial weights) on the same pre-staged batches; data loading is left
out of both, so the difference is what kdray's step machinery costs (phases, publish/exchange, named weighted
terms, metrics kept as tensors, the per-step schedulers, the per-forward RNG reseeding). Steps are timed in interleaved blocks (A, B, A, B, ...) so machine noise hits both
alike; the table reports medians of per-step times and their ratio. Target: overhead <= 3%.

    python benchmarks/engine_overhead.py --steps 200 --device cpu --out benchmarks/results
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.reference_dml import build_reference_peers, dml_step  # noqa: E402
from benchmarks.step_timing import sync, write_rows  # noqa: E402
from kdray.config import load_config  # noqa: E402
from kdray.population import Population  # noqa: E402
from kdray.step import StepRunner


def config(args: argparse.Namespace, image: int, channels: int) -> dict:
    return {
        "name": "overhead",
        "seed": 0,
        "data": {
            "dataset": "synthetic",
            "batch_size": args.batch,
            "val_split": None,  # nothing is evaluated here
            "select_on": "test",
            "synthetic": {
                "num_classes": 10,
                "channels": channels,
                "image_size": image,
                "train_len": args.batch * 4,
            },
        },
        "peers": [{"arch": args.arch} for _ in range(args.peers)],
        "method": {"name": "dml"},
        "train": {
            "epochs": 1,
            "device": args.device,
            "progress": False,
            "optimizer": {"name": "sgd", "lr": 0.05},
        },
        "tracking": {"enabled": False},
    }


def measure(args: argparse.Namespace, image: int, channels: int) -> dict:
    cfg = load_config(config(args, image, channels))
    proc = Population(cfg)
    runner = StepRunner(proc)
    device = proc.device
    batches = [b.to(device) for b in proc.data.train_batches(0)]
    nets, opts = build_reference_peers(cfg, proc.data)
    nets = [n.to(device).train() for n in nets]
    for p in proc.peers:
        p.train_mode()

    def kdray_block(n: int, start: int) -> list[float]:
        times = []
        for i in range(n):
            b = batches[(start + i) % len(batches)]
            t = time.perf_counter()
            runner.step(b, 0, start + i)  # what the loop runs: phases, then every scheduler's step
            sync(device)
            times.append(time.perf_counter() - t)
        return times

    def manual_block(n: int, start: int) -> list[float]:
        times = []
        for i in range(n):
            b = batches[(start + i) % len(batches)]
            t = time.perf_counter()
            dml_step(nets, opts, b.x, b.y)
            sync(device)
            times.append(time.perf_counter() - t)
        return times

    kdray_block(args.warmup, 0)
    manual_block(args.warmup, 0)
    k_times, m_times = [], []
    block = args.block
    for r in range(max(1, args.steps // block)):
        k_times += kdray_block(block, r * block)
        m_times += manual_block(block, r * block)
    k, m = statistics.median(k_times), statistics.median(m_times)
    return {
        "input": f"{channels}x{image}x{image}",
        "peers": args.peers,
        "arch": args.arch,
        "batch": args.batch,
        "device": str(device),
        "steps": len(k_times),
        "kdray_ms": round(1000 * k, 3),
        "manual_ms": round(1000 * m, 3),
        "overhead_pct": round(100 * (k / m - 1), 2),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--block", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--peers", type=int, default=2)
    parser.add_argument("--arch", default="resnet8")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = [measure(args, 28, 1), measure(args, 32, 3)]
    print("| input | peers | device | kdray step (ms) | hand-written step (ms) | overhead | steps |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['input']} | {r['peers']} x {r['arch']} | {r['device']} | {r['kdray_ms']} | {r['manual_ms']} "
            f"| {r['overhead_pct']:+.2f}% | {r['steps']} |"
        )
    suffix = "" if args.peers == 2 else f"_{args.peers}peers"
    write_rows(args.out, f"engine_overhead_{rows[0]['device'].split(':')[0]}{suffix}.json", rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
