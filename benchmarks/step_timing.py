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
        "when": time.strftime("%Y-%m-%d %H:%M"),
    }
    path = out / name
    path.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    return path
