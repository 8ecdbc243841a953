"""What does searching the loss weights buy, at a fixed compute budget? (kdray tune, Fashion-MNIST subset)

For each method (DML, AFD), on the same Fashion-MNIST subset and the same epochs per trial:

- default: the config's own values, trained once with ``kdray.train``;
- TPE + ASHA: ``kdray tune`` with Optuna's TPE (first trial = the config's values) and ASHA, until the trials have
  trained ``--budget`` epochs in all;
- random + FIFO: random search, every trial trained to the end, ``--budget / --epochs`` trials (the same budget).

Reported: the best mean peer validation accuracy each found (finished trials only), trials started and finished,
epochs trained, the share of compute ASHA saved (1 - epochs trained / epochs its trials would have cost run to the
end), and the per-trial overhead: seconds from Tune starting a trial to its first training step, for trials in a
fresh actor (imports) and in a reused one. Prints a table and writes JSON.

    .venv/bin/python benchmarks/tune_bench.py                     # ~15 min on 2 idle CPU cores
    .venv/bin/python benchmarks/tune_bench.py --methods dml --budget 12 --epochs 2 --train-size 1024   # quick
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CONFIGS = {"dml": "configs/dml.yaml", "afd": "configs/afd_pair.yaml"}
TWO_PEERS = "peers=[{arch: resnet8}, {arch: resnet8}]"
SEARCH_KEYS = {"default config": "default", "TPE + ASHA": "tpe", "random + FIFO": "random"}


def overrides(args: argparse.Namespace) -> list[str]:
    return [
        TWO_PEERS,
        "data.root=data",
        f"data.train_size={args.train_size}",
        f"data.val_split={args.val_size}",
        f"train.epochs={args.epochs}",
        "train.progress=false",
        f"tracking.enabled={'true' if args.mlflow else 'false'}",
    ]


def overhead(study: dict) -> dict:
    """Start-to-first-step seconds of the finished trials: in a fresh trial process (the first trial an actor runs
    pays the imports) and in a reused one."""
    seen: set = set()
    cold, warm = [], []
    for t in sorted(study["trials"], key=lambda t: t["started"] or 0):
        fresh = t.get("pid") not in seen
        seen.add(t.get("pid"))
        if t.get("start_to_first_step_s") is not None:
            (cold if fresh else warm).append(t["start_to_first_step_s"])
    return {
        "cold_s": round(statistics.median(cold), 2) if cold else None,
        "warm_s": round(statistics.median(warm), 2) if warm else None,
        "cold_n": len(cold),
        "warm_n": len(warm),
    }


def study_row(name: str, study: dict, wall: float) -> dict:
    trials = study["trials"]
    return {
        "search": name,
        "best": study["best"]["objective"] if study["best"] else None,
        "best_values": study["best"]["values"] if study["best"] else None,
        "trials": len(trials),
        "finished": sum(t["status"] == "finished" for t in trials),
        "stopped": sum(t["status"] == "stopped" for t in trials),
        "diverged": sum(t["status"] in ("diverged", "failed") for t in trials),
        "epochs_trained": study["compute"]["epochs_trained"],
        "saved_share": study["compute"]["saved_share"],
        "overhead": overhead(study),
        "wall_s": round(wall, 1),
        "study_dir": study["trials"][0]["dir"].rsplit("/trials/", 1)[0] if trials else None,
    }


def run_method(method: str, args: argparse.Namespace, out: Path) -> list[dict]:
    import kdray
    from kdray.loop import score
    from kdray.search.study import StudySettings, run_study

    config = REPO / CONFIGS[method]
    space = REPO / "tune_spaces" / f"{method}.yaml"
    rows = []
    t = time.time()
    if "default" in args.searches:
        default = kdray.train(
            config, overrides=[*overrides(args), "train.threads=1"], out=out / f"{method}-default"
        )
        last = default.summary["history"][-1]
        rows.append({"search": "default config", "best": score(kdray.load_config(config, overrides(args)), last),
                     "trials": 1, "finished": 1, "epochs_trained": args.epochs, "wall_s": round(time.time() - t, 1)})  # fmt: skip
    runs = {
        "TPE + ASHA": StudySettings(
            samples=args.budget, scheduler="asha", search="tpe", max_concurrent=args.concurrent, seed=args.seed,
            epoch_budget=args.budget,
        ),
        "random + FIFO": StudySettings(
            samples=args.budget // args.epochs, scheduler="fifo", search="random", max_concurrent=args.concurrent,
            seed=args.seed, start_from_config=False,
        ),
    }  # fmt: skip
    for name, settings in runs.items():
        if SEARCH_KEYS[name] not in args.searches:
            continue
        t = time.time()
        slug = name.split()[0].lower()
        result = run_study(config, space, overrides=overrides(args), out=out / f"{method}-{slug}",
                           settings=settings, verbose=False)  # fmt: skip
        rows.append(study_row(name, result.study, time.time() - t))
    for r in rows:
        r["method"] = method
    return rows


def print_table(rows: list[dict]) -> None:
    head = (f"{'method':<6} {'search':<15} {'best acc':>8} {'trials':>6} {'done':>5} {'stopped':>7} "
            f"{'epochs':>6} {'saved':>6} {'cold s':>7} {'warm s':>7} {'wall s':>7}")  # fmt: skip
    print(head)
    print("-" * len(head))
    for r in rows:
        ov = r.get("overhead") or {}

        def f(v, fmt):
            return format(v, fmt) if v is not None else "-"

        print(
            f"{r['method']:<6} {r['search']:<15} {f(r['best'], '.4f'):>8} {r['trials']:>6} {r['finished']:>5} "
            f"{f(r.get('stopped'), 'd'):>7} {r['epochs_trained']:>6} {f(r.get('saved_share'), '.0%'):>6} "
            f"{f(ov.get('cold_s'), '.1f'):>7} {f(ov.get('warm_s'), '.1f'):>7} {r['wall_s']:>7.1f}"
        )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--methods", nargs="+", default=["dml", "afd"], choices=sorted(CONFIGS))
    p.add_argument("--train-size", type=int, default=2048)
    p.add_argument("--val-size", type=int, default=1000)
    p.add_argument("--epochs", type=int, default=3, help="epochs per trial (ASHA's max_t)")
    p.add_argument("--budget", type=int, default=18, help="epochs trained in all, per search")
    p.add_argument("--concurrent", type=int, default=2)
    p.add_argument("--searches", nargs="+", default=["default", "tpe", "random"], choices=["default", "tpe", "random"],
                   help="which rows to (re)compute; rows in --json for the others are kept")  # fmt: skip
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--mlflow", action="store_true", help="track the studies in MLflow (slower)")
    p.add_argument("--out", default="runs/tune_bench", help="study folders")
    p.add_argument("--json", default="benchmarks/results/tune_bench.json")
    args = p.parse_args(argv)
    out = Path(args.out).resolve()
    if out.exists():
        print(f"{out} exists; pass another --out", file=sys.stderr)
        return 2
    from kdray.config import load_config
    from kdray.search.study import study_ray

    rows: list[dict] = []
    t0 = time.time()
    load_before = os.getloadavg()
    path = Path(args.json)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Each method's rows replace that method's rows in the file (methods can be run one at a time).
    report = json.loads(path.read_text()) if path.exists() else {"runs": {}}
    command = "python benchmarks/tune_bench.py " + " ".join(argv if argv is not None else sys.argv[1:])
    with study_ray(load_config(REPO / CONFIGS[args.methods[0]], overrides(args))):
        for method in args.methods:
            t = time.time()
            method_rows = run_method(method, args, out)
            rows += method_rows
            print_table(rows)
            print(flush=True)
            run = {
                "command": command,
                "settings": vars(args),
                "wall_s": round(time.time() - t, 1),
                # Other work on the machine slows every trial alike, but inflates wall times and overheads.
                "load_average_before_after": [round(load_before[0], 2), round(os.getloadavg()[0], 2)],
                "cpus": os.cpu_count(),
            }
            for row in method_rows:
                row["run"] = run
            old_rows = report["runs"].get(method, [])
            if isinstance(old_rows, dict):  # the first layout: one run per method
                old_rows = [
                    {**r, "run": {k: v for k, v in old_rows.items() if k != "rows"}} for r in old_rows["rows"]
                ]
            kept = [r for r in old_rows if SEARCH_KEYS[r["search"]] not in args.searches]
            order = list(SEARCH_KEYS)
            report["runs"][method] = sorted(kept + method_rows, key=lambda r: order.index(r["search"]))
            path.write_text(json.dumps(report, indent=2))
    print(f"wrote {path} ({time.time() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
