"""Free TCP ports for the Ray processes kdray starts itself, each one different from every other it hands out.

Asking the kernel for a free port (bind to port 0, read it, close) twice in a row can return the same port twice:
once the first socket is closed, the port is free again. Ray then refuses to start ("port number N that is used by
other components"), which a CI run met when the GCS and the dashboard agent of one loopback node drew the same port.
A ``PortPicker`` remembers what it handed out and asks again on a repeat.
"""

from __future__ import annotations

import secrets
import socket
from pathlib import Path

_EPHEMERAL = Path("/proc/sys/net/ipv4/ip_local_port_range")


def _bindable(ip: str, port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind((ip, port))
        except OSError:
            return False
    return True


def ephemeral_range() -> range:
    """The ports the kernel hands out for port 0 (Linux's default when it cannot be read)."""
    try:
        low, high = (int(v) for v in _EPHEMERAL.read_text().split())
    except (OSError, ValueError):
        low, high = 32768, 60999
    return range(low, high + 1)


class PortPicker:
    def __init__(self) -> None:
        self.taken: set[int] = set()

    def port(self, ip: str = "127.0.0.1") -> int:
        """A free port on ``ip`` that this picker has not handed out before."""
        for _ in range(1000):
            with socket.socket() as s:
                s.bind((ip, 0))
                port = s.getsockname()[1]
            if port not in self.taken:
                self.taken.add(port)
                return port
        raise RuntimeError(f"no free port on {ip} after 1000 tries")

    def block(self, size: int, ip: str = "127.0.0.1") -> range:
        """``size`` consecutive free ports below the kernel's ephemeral range (so no later ``port()`` call, by
        this picker or anyone else, can land inside it), none handed out before: for Ray's worker ports."""
        top = ephemeral_range().start
        for _ in range(1000):
            low = 10000 + secrets.randbelow(max(1, top - 10000 - size))
            block = range(low, low + size)
            if self.taken.isdisjoint(block) and all(_bindable(ip, p) for p in block):
                self.taken.update(block)
                return block
        raise RuntimeError(f"no {size} consecutive free ports on {ip} below {top}")
