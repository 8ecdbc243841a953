"""Helpers the step-timing benchmarks share: a device sync before reading the clock, and the JSON they write."""

from __future__ import annotations

import json
import platform
import sys
import time
from pathlib import Path

import torch


def sync(device: torch.device) -> None:
    """Wait for queued GPU work, so a timer read after it measures the step and not its launch."""
    if device.type == "cuda":
        torch.cuda.synchronize()


def machine_name() -> str:
    """The machine a record was measured on, in words: the CPU model and its cores, and the GPU when CUDA sees one
    (e.g. "2 x AMD EPYC 7B13 (x86_64)", "16 x Intel Xeon ..., 1 x NVIDIA H100 80GB HBM3")."""
    import os

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    name = f"{len(os.sched_getaffinity(0))} x {cpu}"
    if torch.cuda.is_available():
        gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        name += ", " + ", ".join(f"{gpus.count(g)} x {g}" for g in dict.fromkeys(gpus))
    return name


def write_rows(out: str | Path, name: str, rows: list[dict]) -> Path:
    """Write ``rows`` under ``out/name`` with what produced them: the command, torch, its threads, the machine."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    meta = {
        "command": " ".join(["python", *sys.argv]),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "machine": platform.machine(),
        "processor": platform.processor() or None,
        "machine_name": machine_name(),
        "when": time.strftime("%Y-%m-%d %H:%M"),
    }
    path = out / name
    path.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    return path
