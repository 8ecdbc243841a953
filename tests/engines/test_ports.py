"""PortPicker: the ports it hands out are distinct even when the kernel hands the same free port out twice."""

from __future__ import annotations

import socket

import pytest

from kdray.engines import ports as ports_mod
from kdray.engines.ports import PortPicker, ephemeral_range


class _RepeatingSocket:
    """A socket whose bind to port 0 yields 51499, 51499, 51499, then 51500: the kernel is free to do this once
    each probe socket is closed (a CI run drew one port for the GCS and the dashboard agent)."""

    draws = iter(())

    def __init__(self, *args) -> None:
        self.port = 0

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        return None

    def bind(self, address) -> None:
        self.port = next(self.draws) if address[1] == 0 else address[1]

    def getsockname(self):
        return ("127.0.0.1", self.port)


def test_a_port_the_kernel_repeats_is_not_handed_out_twice(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_RepeatingSocket, "draws", iter([51499, 51499, 51499, 51500]))
    monkeypatch.setattr(ports_mod.socket, "socket", _RepeatingSocket)
    picker = PortPicker()
    assert [picker.port(), picker.port()] == [51499, 51500]


def test_many_real_ports_are_distinct_and_free() -> None:
    picker = PortPicker()
    got = [picker.port("127.0.0.1") for _ in range(40)]
    assert len(set(got)) == 40
    with socket.socket() as s:  # handed out, not held: still bindable
        s.bind(("127.0.0.1", got[0]))


def test_worker_blocks_sit_below_the_ephemeral_range_and_apart() -> None:
    picker = PortPicker()
    singles = {picker.port() for _ in range(5)}
    blocks = [picker.block(30) for _ in range(3)]
    low = ephemeral_range().start
    for block in blocks:
        assert len(block) == 30 and block.stop <= low
        assert singles.isdisjoint(block)
    for a in range(3):
        for b in range(a + 1, 3):
            assert set(blocks[a]).isdisjoint(blocks[b])
