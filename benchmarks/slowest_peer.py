"""A step at the speed of the slowest peer: the RayEngine's step time against the slowest peer's step time alone.

Synchronous co-distillation cannot step faster than its slowest peer trained alone on the same resources; this
measures how close it gets. For each population:

- **alone**: every peer trained alone (method ``independent``), each in its own process on the CPUs its Ray worker
  gets (``train.threads`` = CPUs per peer), all at the same time (so they share the machine as the workers do), on
  the same synthetic 28x28 batches; the median ms per step after warm-up;
- **ray**: the population on the RayEngine (collective exchange, one peer per worker, the same threads per peer),
  ``train/step_ms`` of its second epoch, with ``engine.exchange.split_wait`` so the exchange time splits into
  waiting for the slowest peer and moving bytes;
- **ratio** = ray / slowest alone (target <= 1.05);
- for unequal peers, the same again with ``engine.placement.balance: threads``: each worker gets torch threads in
  proportion to its peer's cost (``threads`` in each row: what every worker ran with), so the large peer gets more
  and the small one waits less; its ratio is against the same "alone" yardstick (one share of the CPUs each).

    python benchmarks/slowest_peer.py --steps 40 --out benchmarks/results/slowest_peer.json

On a machine with fewer cores than peers x threads the workers share cores and the ratio says more about the
machine than about kdray: the table records the core count.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CORES = os.cpu_count() or 1

POPULATIONS = {
    "equal pair": ("dml", [{"name": "a", "arch": "resnet8"}, {"name": "b", "arch": "resnet8"}]),
    "unequal pair (the main job)": ("dml", [{"name": "resnet8", "arch": "resnet8"}, {"name": "resnet14", "arch": "resnet14"}]),
    # three peers exchanging every step (DML: each peer's step is an independent step plus a KL; AFD's ring does
    # three updates per step, which no peer alone does, so it has no fair "alone" yardstick)
    # a small peer next to one eight times its cost: the small one waits most of each step
    "small + large": ("dml", [{"name": "resnet8", "arch": "resnet8"}, {"name": "wrn_16_2", "arch": "wrn_16_2"}]),
    "three peers": ("dml", [{"name": f"p{i}", "arch": "resnet8"} for i in range(3)]),
}  # fmt: skip


def base(method: str, peers: list, steps: int, threads: int) -> dict:
    return {
        "name": "slowest-peer",
        "seed": 0,
        "data": {
            "dataset": "synthetic",
            "batch_size": 128,
            "val_split": None,
            "select_on": "test",
            "synthetic": {
                "num_classes": 10,
                "channels": 1,
                "image_size": 28,
                "train_len": 128 * steps,
                "test_len": 128,
            },
        },  # fmt: skip
        "peers": copy.deepcopy(peers),
        "method": {"name": method},
        "train": {
            "epochs": 2,
            "device": "cpu",
            "progress": False,
            "threads": threads,
            "eval_every": 100,
            "optimizer": {"name": "sgd", "lr": 0.05},
        },  # fmt: skip
        "tracking": {"enabled": False},
    }


ALONE = """
import json, statistics, sys, time, torch
from kdray.config import load_config
from kdray.population import Population
from kdray.step import StepRunner
raw = json.loads(sys.argv[1]); warm = int(sys.argv[2])
pop = Population(load_config(raw)); torch.set_num_threads(raw["train"]["threads"]); runner = StepRunner(pop)
marks = []
for i, batch in enumerate(pop.batches(0)):
    runner.step(batch, 0, i); marks.append(time.perf_counter())
steps = [1000 * (b - a) for a, b in zip(marks[warm:], marks[warm + 1:])]
print(json.dumps({"median_ms": statistics.median(steps)}))
"""


def alone_ms(peers: list[dict], steps: int, threads: int) -> dict[str, float]:
    """Each peer trained alone in its own process, all of them at the same time (as the workers share the
    machine), median ms per step."""
    procs = {
        p["name"]: subprocess.Popen(
            [sys.executable, "-c", ALONE, json.dumps(base("independent", [p], steps, threads)), "5"],
            stdout=subprocess.PIPE,
            text=True,
            cwd=REPO,
        )  # fmt: skip
        for p in peers
    }
    return {
        name: json.loads(proc.communicate()[0].strip().splitlines()[-1])["median_ms"]
        for name, proc in procs.items()
    }


def ray_row(
    method: str, peers: list, steps: int, threads: int, cpus_per_peer: float, balance: bool = False
) -> dict:
    import kdray

    raw = base(method, peers, steps, threads)
    raw["engine"] = {
        "name": "ray",
        "placement": {"cpus_per_peer": cpus_per_peer, "balance": "threads" if balance else "none"},
        "exchange": {"name": "collective", "split_wait": True},
    }
    if balance:
        raw["train"]["threads"] = None
    with tempfile.TemporaryDirectory() as tmp:
        result = kdray.train(raw, out=Path(tmp) / "run")
        placement = json.loads((result.out_dir / "ray_run.json").read_text())["placement"]
    epoch2 = result.summary["history"][-1]
    return {
        "threads": {w["peer"]: w.get("threads") for w in placement},
        "ray_ms": epoch2["train/step_ms"],
        "exchange_ms": epoch2["exchange/ms_per_step"],
        "wait_ms": epoch2.get("exchange/wait_ms_per_step"),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--steps", type=int, default=40, help="steps per epoch (2 epochs; epoch 2 is measured)"
    )
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "slowest_peer.json"))
    parser.add_argument("--only", nargs="*", help="population names to run")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads per peer (default: the cores / the peers, at least 1); more than that lets a worker "
        "use the cores of the peers waiting at the exchange (and the 'alone' yardstick gets the same threads)",
    )
    args = parser.parse_args()
    rows = []
    for name, (method, peers) in POPULATIONS.items():
        if args.only and name not in args.only:
            continue
        threads = args.threads or max(1, CORES // len(peers))
        cpus = round(CORES / len(peers), 3)
        alone = alone_ms(peers, args.steps, threads)
        ray = ray_row(method, peers, args.steps, threads, cpus)
        slowest = max(alone.values())
        row = {"population": name, "threads_per_peer": threads, "alone_ms": alone, **ray,
               "ratio": ray["ray_ms"] / slowest,
               "wait_share": (ray["wait_ms"] or 0) / ray["ray_ms"]}  # fmt: skip
        rows.append(row)
        if len({p["arch"] for p in peers}) > 1:  # unequal peers: the same with threads in proportion to cost
            bal = ray_row(method, peers, args.steps, threads, cpus, balance=True)
            rows.append({**row, "population": f"{name}, balanced threads", **bal,
                         "ratio": bal["ray_ms"] / slowest, "wait_share": (bal["wait_ms"] or 0) / bal["ray_ms"]})  # fmt: skip
        print(
            f"{name:<28} threads {ray['threads']} alone {', '.join(f'{k} {v:.0f}' for k, v in alone.items())} ms | ray {ray['ray_ms']:.0f} ms "
            f"(exchange {ray['exchange_ms']:.0f}, waiting {ray['wait_ms'] or 0:.0f}) | ratio {row['ratio']:.3f}",
            flush=True,
        )
    sys.path.insert(0, str(REPO))  # run as a script: the repository root is not on the path
    from benchmarks.step_timing import machine_name

    meta = {"cores": CORES, "machine": platform.processor() or platform.machine(), "machine_name": machine_name(),
            "steps": args.steps,
            "load_avg": os.getloadavg(), "time": time.strftime("%Y-%m-%d %H:%M"), "command": " ".join(sys.argv)}  # fmt: skip
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    print(
        "\n| population | threads (workers) | slowest alone (ms) | RayEngine step (ms) | ratio | waiting share |"
    )
    print("|---|---|---|---|---|---|")
    for r in rows:
        workers = " + ".join(str(t) for t in r["threads"].values())
        print(f"| {r['population']} | {workers} | {max(r['alone_ms'].values()):.0f} | {r['ray_ms']:.0f} | "
              f"{r['ratio']:.3f} | {100 * r['wait_share']:.0f}% |")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
