"""Facts about this process and machine that the RayEngine records: listening sockets, process start times, and
where the time to the first step went (Linux ``/proc``; None elsewhere)."""

from __future__ import annotations

import os
from pathlib import Path


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
