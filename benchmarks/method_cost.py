"""What a training step of each online method costs, relative to DML on the same population.

Plans compute for the accuracy studies (docs/results.md): an AFD step runs the peers forward and backward twice
(the logit phase, then the adversarial feature phase) and trains a discriminator per peer; an ACN step adds the
generator's divergent examples. Each method trains the populations of the study (a ResNet-8 pair, the unequal pair
ResNet-8 + WRN-16-2, the ring of three) on pre-staged Fashion-MNIST-shaped batches (1x28x28, batch 128; data
loading left out). Methods are timed in interleaved blocks (every method's block once per round), so machine noise
hits them alike; the table reports the median step per method and its ratio to DML's median in the same
population. On a shared machine quote the ratios, not the milliseconds.

    python benchmarks/method_cost.py --threads 1 --rounds 5 --block 4 --out benchmarks/results
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.accuracy_study import PAIR, RING3, UNEQUAL  # noqa: E402
from benchmarks.step_timing import sync, write_rows  # noqa: E402
from kdray.config import load_config  # noqa: E402
from kdray.population import Population  # noqa: E402
from kdray.step import StepRunner

POPULATIONS = {"pair": PAIR, "unequal": UNEQUAL, "ring3": RING3}
# the methods of the adversarial study, with the settings it runs them with; ACN's study is on pairs
METHODS = {
    "independent": {"name": "independent"},
    "dml": {"name": "dml"},
    "afd": {"name": "afd", "disc_norm": "dcgan", "disc_batch": "joint"},
    "acn": {"name": "acn"},
}


def config(peers: list[dict], method: dict, batch: int, device: str) -> dict:
    return {
        "name": "method-cost",
        "seed": 0,
        "peers": peers,
        "method": method,
        "data": {
            "dataset": "synthetic",
            "batch_size": batch,
            "val_split": None,  # nothing is evaluated here
            "select_on": "test",
            "synthetic": {"num_classes": 10, "channels": 1, "image_size": 28, "train_len": 8 * batch},
        },
        "train": {"device": device, "epochs": 1, "progress": False},
        "tracking": {"enabled": False},
    }


def measure(population: str, args: argparse.Namespace) -> list[dict]:
    methods = [m for m in args.methods if not (m == "acn" and population != "pair")]
    pops = {
        m: Population(load_config(config(POPULATIONS[population], METHODS[m], args.batch, args.device)))
        for m in methods
    }
    runners = {m: StepRunner(p) for m, p in pops.items()}
    batches = {m: [b.to(p.device) for b in p.data.train_batches(0)] for m, p in pops.items()}
    steps = dict.fromkeys(methods, 0)
    times: dict[str, list[float]] = {m: [] for m in methods}

    def block(m: str, n: int, keep: bool) -> None:
        pop = pops[m]
        for _ in range(n):
            b = batches[m][steps[m] % len(batches[m])]
            t = time.perf_counter()
            runners[m].step(b, 0, steps[m])
            sync(pop.device)
            if keep:
                times[m].append(time.perf_counter() - t)
            steps[m] += 1

    for m in methods:
        for p in pops[m].peers:
            p.train_mode()
        block(m, args.warmup, keep=False)
    for _ in range(args.rounds):
        for m in methods:
            block(m, args.block, keep=True)
    dml = statistics.median(times["dml"])
    return [
        {
            "population": population,
            "peers": " + ".join(
                p["arch"] + (f"(w{p['arch_kwargs']['width']})" if "arch_kwargs" in p else "")
                for p in POPULATIONS[population]
            ),
            "method": m,
            "device": str(pops[m].device),
            "steps": len(times[m]),
            "step_ms": round(1000 * statistics.median(times[m]), 1),
            "vs_dml": round(statistics.median(times[m]) / dml, 2),
        }
        for m in methods
    ]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--populations", nargs="+", default=list(POPULATIONS), choices=list(POPULATIONS))
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--block", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the studies train on 1)")
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()
    if "dml" not in args.methods:
        parser.error("--methods must include dml (the ratios are to DML's step)")
    torch.set_num_threads(args.threads)
    rows = [r for population in args.populations for r in measure(population, args)]
    print("| population | peers | method | step (ms, median) | vs DML | steps |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['population']} | {r['peers']} | {r['method']} | {r['step_ms']} | {r['vs_dml']:.2f}x "
            f"| {r['steps']} |"
        )
    path = write_rows(args.out, f"method_cost_{rows[0]['device'].split(':')[0]}.json", rows)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
