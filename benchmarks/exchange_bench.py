"""Exchange benchmark: what the RayEngine's exchanges cost against training the same population in one process.

For 2 and 3 peers (ResNet-8 width 16, batch 128, DML) on 32x32x3 and 28x28x1 inputs (synthetic data, 10 classes):

- LocalEngine: ms per step, the whole population in one process with every core (``train.threads`` = cores);
- RayEngine, one peer per worker, the same total cores (``cpus_per_peer`` = cores / peers, 1 thread each), through
  each exchange (``collective``, ``actor``, ``stale``): ms and bytes per step of the exchange, the step time, the
  exchange's share of the step, the step time relative to LocalEngine;
- the stale exchange's traffic against the collective one's, for DML (logits only) and for AFD's ring (feature maps);
- time to the first step: a fresh ``kdray train --set engine.name=ray`` process, launch to the end of step 1.

Per-step figures are those of the second epoch (the first carries one-off costs: layout agreement, warm-up). A
local Ray is started once for the in-process runs (its start-up is measured by the fresh-process run only).

    .venv/bin/python benchmarks/exchange_bench.py                 # full: ~20 min on 2 cores
    .venv/bin/python benchmarks/exchange_bench.py --quick         # 2 peers, 32x32, fewer steps
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
CORES = os.cpu_count() or 1


def base_config(peers: int, size: int, steps: int, method: str = "dml") -> dict:
    channels = 3 if size == 32 else 1
    batch = 128
    raw = {
        "name": f"bench-{method}-{peers}p-{size}",
        "seed": 0,
        "data": {
            "dataset": "synthetic",
            "batch_size": batch,
            "val_batch_size": 256,
            "synthetic": {
                "num_classes": 10,
                "channels": channels,
                "image_size": size,
                "train_len": batch * steps,
                "test_len": 256,
            },
        },  # fmt: skip
        "peers": [{"arch": "resnet8", "arch_kwargs": {"width": 16}} for _ in range(peers)],
        "method": {"name": method},
        "train": {
            "epochs": 2,
            "device": "cpu",
            "progress": False,
            "eval_every": 100,
            "optimizer": {"name": "sgd", "lr": 0.05},
        },  # fmt: skip
        "tracking": {"enabled": False},
    }
    return raw


def local_step_ms(raw: dict, steps: int, threads: int = CORES) -> float:
    """Steady-state ms per step of the whole population in one process (the loop LocalEngine runs)."""
    import torch

    from kdray.config import load_config
    from kdray.population import Population
    from kdray.step import StepRunner

    cfg = load_config({**raw, "train": {**raw["train"], "threads": threads}})
    pop = Population(cfg)
    runner = StepRunner(pop)
    torch.set_num_threads(threads)
    marks = []
    for i, batch in enumerate(pop.batches(0)):
        runner.step(batch, 0, i)
        marks.append(time.perf_counter())
    warm = min(3, len(marks) - 2)
    return (
        1000.0 * (marks[-1] - marks[warm]) / (len(marks) - 1 - warm)
        if len(marks) > warm + 1
        else float("nan")
    )


def ray_run(raw: dict, exchange: str, out: Path, **engine) -> dict:
    import kdray

    raw = copy.deepcopy(raw)
    peers = len(raw["peers"])
    raw["train"]["threads"] = max(1, CORES // peers)
    raw["engine"] = {
        "name": "ray",
        "exchange": {"name": exchange, **engine},
        "placement": {"cpus_per_peer": int(1000 * CORES / peers) / 1000},
    }
    result = kdray.train(raw, out=out)
    epoch2 = result.summary["history"][-1]
    row = {
        "step_ms": epoch2["train/step_ms"],
        "exchange_ms": epoch2["exchange/ms_per_step"],
        "bytes_per_step": epoch2["exchange/bytes_per_step"],
        "share": epoch2["exchange/ms_per_step"] / epoch2["train/step_ms"],
        "first_step_s_ray_up": result.summary["first_step_after_engine_start_s"],
    }
    if "exchange/wait_ms_per_step" in epoch2:  # split_wait: waiting for the slowest peer vs moving bytes
        row["wait_ms"] = epoch2["exchange/wait_ms_per_step"]
        row["transfer_share"] = (row["exchange_ms"] - row["wait_ms"]) / row["step_ms"]
    return row


def first_step_from_launch(raw: dict, out: Path) -> dict:
    """A fresh ``kdray train`` process (it starts its own local Ray): seconds from launch to the end of step 1."""
    out.mkdir(parents=True, exist_ok=True)
    config = out / "config.yaml"
    raw = copy.deepcopy(raw)
    raw["train"]["threads"] = 1
    raw["engine"] = {
        "name": "ray",
        "exchange": "collective",
        "placement": {"cpus_per_peer": int(1000 * CORES / len(raw["peers"])) / 1000},
    }
    config.write_text(yaml.safe_dump(raw))
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_TMPDIR", "RAY_ADDRESS")}
    launched = time.time()
    run = subprocess.run(
        [sys.executable, "-m", "kdray", "train", str(config), "--out", str(out / "run")],
        env=env, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    total = time.time() - launched
    if run.returncode != 0:
        raise RuntimeError(run.stderr[-2000:])
    info = json.loads((out / "run" / "ray_run.json").read_text())
    return {
        "first_step_s": info["first_step_at"] - launched,
        "total_s": total,
        "breakdown_s": info["startup_s"],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--steps", type=int, default=25, help="steps per epoch (two epochs; stale ships once each)"
    )
    parser.add_argument("--peers", type=int, nargs="+", default=[2, 3])
    parser.add_argument("--sizes", type=int, nargs="+", default=[32, 28])
    parser.add_argument(
        "--exchanges",
        nargs="+",
        default=["collective", "actor", "stale"],
        choices=["collective", "actor", "stale", "collective-split"],
        help="collective-split: the collective exchange with engine.exchange.split_wait (waiting vs moving bytes)",
    )
    parser.add_argument("--no-afd", action="store_true", help="skip the AFD ring-of-3 stale traffic runs")
    parser.add_argument("--quick", action="store_true", help="2 peers, 32x32, 12 steps")
    parser.add_argument("--no-first-step", action="store_true", help="skip the fresh-process start-up run")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "exchange.json"))
    args = parser.parse_args(argv)
    if args.quick:
        args.steps, args.peers, args.sizes = 12, [2], [32]

    from kdray.config import EngineConfig
    from kdray.engines.ray_runtime import ray_session

    rows, extra = [], {}
    work = Path(tempfile.mkdtemp(prefix="kdray-bench-"))
    # the fresh-process measurement first, while no other Ray of ours runs
    if not args.no_first_step:
        extra["first_step"] = first_step_from_launch(base_config(2, 32, args.steps), work / "fresh")
        print(f"time to first step from `kdray train` launch: {extra['first_step']['first_step_s']:.1f} s")
        print(
            "  "
            + ", ".join(
                f"{k} {v:.1f} s" for k, v in extra["first_step"]["breakdown_s"].items() if v is not None
            )
        )
    with ray_session(EngineConfig(name="ray", session={"object_store_mb": 300}), num_peers=max(args.peers)):
        for peers in args.peers:
            for size in args.sizes:
                raw = base_config(peers, size, args.steps)
                local_ms = local_step_ms(raw, args.steps)
                # one thread: a yardstick for shared machines, where a 2-thread process suffers most
                local_1t = local_step_ms(raw, args.steps, threads=1)
                for exchange in args.exchanges:
                    engine = {"every": args.steps} if exchange == "stale" else {}
                    if exchange == "collective-split":  # the collective exchange with a timed barrier first
                        engine = {"split_wait": True}
                    transport = exchange.removesuffix("-split")
                    r = ray_run(raw, transport, work / f"{peers}-{size}-{exchange}", **engine)
                    r.update({"peers": peers, "size": size, "exchange": exchange, "local_step_ms": local_ms})
                    r["local_1thread_step_ms"] = local_1t
                    r["relative_to_local"] = r["step_ms"] / local_ms
                    rows.append(r)
                    print(format_row(r), flush=True)
        if not args.no_afd:
            # stale traffic where the signals are feature maps: AFD's ring of three at 32x32
            afd = base_config(3, 32, args.steps, method="afd")
            collective = ray_run(afd, "collective", work / "afd-collective")
            stale = ray_run(afd, "stale", work / "afd-stale", every=args.steps)
            extra["afd_ring3_32"] = {"collective": collective, "stale": stale}
            extra["stale_reduction_afd_ring3_32"] = collective["bytes_per_step"] / max(
                stale["bytes_per_step"], 1
            )
    for peers in args.peers:
        for size in args.sizes:
            by = {r["exchange"]: r for r in rows if r["peers"] == peers and r["size"] == size}
            if "stale" in by and "collective" in by:
                extra.setdefault("stale_reduction_dml", {})[f"{peers}p-{size}"] = by["collective"][
                    "bytes_per_step"
                ] / max(by["stale"]["bytes_per_step"], 1)
    sys.path.insert(0, str(REPO))  # run as a script: the repository root is not on the path
    from benchmarks.step_timing import machine_name

    report = {
        "machine": {
            "name": machine_name(),
            "cores": CORES,
            "platform": platform.platform(),
            "python": platform.python_version(),
            "load_average_at_end": os.getloadavg(),  # other processes sharing the cores skew every figure
        },  # fmt: skip
        "settings": {
            "steps_per_epoch": args.steps,
            "batch": 128,
            "arch": "resnet8 width 16",
            "method": "dml",
        },
        "rows": rows,
        **extra,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    shutil.rmtree(
        work, ignore_errors=True
    )  # the runs' folders (checkpoints, Ray storage): the JSON is the result
    print()
    print(table(report))
    print(f"\nwritten: {args.out}")
    return 0


def format_row(r: dict) -> str:
    return (
        f"| {r['peers']} | {r['size']}x{r['size']} | {r['exchange']} | {r['local_step_ms']:.0f} "
        f"| {r.get('local_1thread_step_ms', float('nan')):.0f} | {r['step_ms']:.0f} "
        f"| {r['relative_to_local']:.2f}x | {r['exchange_ms']:.1f} | {100 * r['share']:.1f}%"
        + (f" (moving bytes {100 * r['transfer_share']:.1f}%) " if "transfer_share" in r else " ")
        + f"| {r['bytes_per_step'] / 1024:.1f} |"
    )


def table(report: dict) -> str:
    head = (
        "| peers | input | exchange | local ms/step | local, 1 thread | ray ms/step | ray / local | exchange ms/step "
        "| share of step | KiB/step (all peers) |\n|---|---|---|---|---|---|---|---|---|---|"
    )
    lines = [head] + [format_row(r) for r in report["rows"]]
    if "first_step" in report:
        fs = report["first_step"]["first_step_s"]
        lines.append(f"\ntime to first step from `kdray train` launch (fresh local Ray): {fs:.1f} s")
        parts = report["first_step"].get("breakdown_s") or {}
        lines.append("  " + ", ".join(f"{k} {v:.1f} s" for k, v in parts.items() if v is not None))
    for key, value in report.get("stale_reduction_dml", {}).items():
        lines.append(f"stale traffic reduction, DML {key}: {value:.2f}x")
    afd = report.get("afd_ring3_32")
    if afd is None:
        return "\n".join(lines)
    lines.append(
        f"AFD ring of 3, 32x32: collective {afd['collective']['bytes_per_step'] / 1024:.1f} KiB/step, stale "
        f"{afd['stale']['bytes_per_step'] / 1024:.1f} KiB/step ({report['stale_reduction_afd_ring3_32']:.1f}x less)"
    )
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
