"""Accuracy study on Fashion-MNIST: independent vs DML vs AFD (pair, small+large, ring of 3) vs ACN.

Each (setting, method, seed) is one `kdray.train` run with tracking off; runs go to a process pool (several
populations share one GPU well, since these networks are small). Reported: the *final-epoch* test accuracy of each
peer (no early stopping, no selection on the test split), mean +- std over seeds. Prints a markdown table and writes
JSON with every run's numbers.

    python benchmarks/accuracy_study.py --epochs 8 --seeds 0 1 2 --workers 10 --device cuda --out benchmarks/results
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

PAIR = [{"name": "a", "arch": "resnet8"}, {"name": "b", "arch": "resnet8"}]
SMALL_LARGE = [{"name": "small", "arch": "resnet8"}, {"name": "large", "arch": "wrn_16_2"}]
RING3 = [
    {"name": "p1", "arch": "resnet8"},
    {"name": "p2", "arch": "resnet14"},
    {"name": "p3", "arch": "resnet8", "arch_kwargs": {"width": 8}},
]

# (setting, method config, peers). Methods take their default weights and temperatures (see docs/methods.md);
# nothing here was tuned on the test split.
STUDY = [
    ("pair", {"name": "independent"}, PAIR),
    ("pair", {"name": "dml"}, PAIR),
    ("pair", {"name": "afd"}, PAIR),
    ("pair", {"name": "acn"}, PAIR),
    ("small+large", {"name": "independent"}, SMALL_LARGE),
    ("small+large", {"name": "dml"}, SMALL_LARGE),
    ("small+large", {"name": "afd"}, SMALL_LARGE),
    ("ring3", {"name": "independent"}, RING3),
    ("ring3", {"name": "dml"}, RING3),
    ("ring3", {"name": "afd"}, RING3),
]


def make_config(method: dict, peers: list, seed: int, args: argparse.Namespace) -> dict:
    return {
        "name": f"study-{method['name']}",
        "seed": seed,
        "data": {
            "dataset": "fashion_mnist",
            "root": args.data,
            "batch_size": 128,
            "train_size": args.train_size,
        },
        "peers": peers,
        "method": method,
        "train": {
            "epochs": args.epochs,
            "optimizer": {"name": "sgd", "lr": 0.1, "momentum": 0.9, "nesterov": True, "weight_decay": 5e-4},
            "schedule": {"name": "cosine"},
            "device": args.device,
            "progress": False,
            "threads": 1,
        },
        "tracking": {"enabled": False},
    }


def run_one(setting: str, method: dict, peers: list, seed: int, args: argparse.Namespace) -> dict:
    import kdray

    cfg = make_config(method, peers, seed, args)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out = Path(args.out) / "runs" / f"{setting}-{method['name']}-s{seed}-{stamp}".replace("+", "_")
    t0 = time.time()
    result = kdray.train(cfg, out=out)
    s = result.summary
    return {
        "setting": setting,
        "method": method["name"],
        "seed": seed,
        "peers": {p["name"]: p["val_acc"] for p in s["peers"]},
        "archs": {p["name"]: p["arch"] for p in s["peers"]},
        "ensemble": s["ensemble_acc"],
        "wall_s": round(time.time() - t0, 1),
    }


def fmt(values: list[float]) -> str:
    mean = statistics.mean(values)
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{100 * mean:.2f} ± {100 * std:.2f}"


def table(rows: list[dict]) -> str:
    lines = []
    for setting in dict.fromkeys(r["setting"] for r in rows):
        group = [r for r in rows if r["setting"] == setting]
        names = list(group[0]["peers"])
        archs = group[0]["archs"]
        head = " | ".join(f"{n} ({archs[n]})" for n in names)
        lines += [
            f"\n**{setting}**\n",
            f"| method | {head} | peer mean | ensemble | seeds |",
            "|---" * (len(names) + 4) + "|",
        ]
        for method in dict.fromkeys(r["method"] for r in group):
            runs = [r for r in group if r["method"] == method]
            cells = [fmt([r["peers"][n] for r in runs]) for n in names]
            mean_peer = fmt([statistics.mean(r["peers"].values()) for r in runs])
            ens = fmt([r["ensemble"] for r in runs])
            lines.append(f"| {method} | {' | '.join(cells)} | {mean_peer} | {ens} | {len(runs)} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--train-size", type=int, default=None)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--data", default="data")
    parser.add_argument("--only", nargs="*", help="settings to run (pair, small+large, ring3)")
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()
    jobs = [(s, m, p, seed) for s, m, p in STUDY if not args.only or s in args.only for seed in args.seeds]
    rows: list[dict] = []
    t0 = time.time()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = {
        "epochs": args.epochs,
        "seeds": args.seeds,
        "train_size": args.train_size,
        "device": args.device,
        "command": " ".join(["python", *sys.argv]),
    }
    with ProcessPoolExecutor(args.workers) as pool:
        futures = {pool.submit(run_one, s, m, p, seed, args): (s, m["name"], seed) for s, m, p, seed in jobs}
        for fut in as_completed(futures):
            try:
                row = fut.result()
            except Exception as exc:  # noqa: BLE001 - one failed run must not lose the others
                print(f"FAILED {futures[fut]}: {exc}", flush=True)
                continue
            rows.append(row)
            print(
                f"[{time.time() - t0:6.0f}s] {row['setting']:<12} {row['method']:<12} seed {row['seed']}: "
                + ", ".join(f"{k} {v:.4f}" for k, v in row["peers"].items())
                + f" ({row['wall_s']} s)",
                flush=True,
            )
            (out / "accuracy_study.json").write_text(json.dumps({"meta": meta, "runs": rows}, indent=2))
    order = {(s, m["name"]): i for i, (s, m, _) in enumerate(STUDY)}
    rows.sort(key=lambda r: (order[(r["setting"], r["method"])], r["seed"]))
    meta["wall_s"] = round(time.time() - t0, 1)
    (out / "accuracy_study.json").write_text(json.dumps({"meta": meta, "runs": rows}, indent=2))
    print(table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
