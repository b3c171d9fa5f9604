"""The test harness's port picks: a relay's listener never lands in a media port range
(test_fuzz_daemon once took its own legacy/control listener, port 55684, for a leaked
media socket: the kernel's ephemeral range overlapped next_port_range's), and the media
ranges lie below the kernel's ephemeral ports (a port a relay freed is not handed to
another test's socket bound to port 0 while a test waits to see it free)."""

from __future__ import annotations

import errno
import socket
import types
from typing import List, Optional, Tuple

import pytest

from lrk.demo import relay_process
from lrk.demo.relay_process import MEDIA_PORTS_FROM, MEDIA_PORTS_TO, free_udp_port, next_port_range


class FakeKernel:
    """Sockets whose port-0 binds get the scripted ports; explicit binds fail `refuse`
    times first. Records what is open at each bind."""

    def __init__(self, offers: List[int], refuse: int = 0) -> None:
        self.offers = list(offers)
        self.refuse = refuse
        self.sockets: List[FakeSocket] = []
        self.open_at_bind: List[int] = []

    def module(self) -> types.SimpleNamespace:
        return types.SimpleNamespace(AF_INET=socket.AF_INET, AF_INET6=socket.AF_INET6,
                                     SOCK_DGRAM=socket.SOCK_DGRAM, socket=self.socket)

    def socket(self, family: int, kind: int) -> FakeSocket:
        s = FakeSocket(self)
        self.sockets.append(s)
        return s

    def open(self) -> int:
        return sum(not s.closed for s in self.sockets)


class FakeSocket:
    def __init__(self, kernel: FakeKernel) -> None:
        self.kernel = kernel
        self.port: Optional[int] = None
        self.closed = False

    def bind(self, addr: Tuple[str, int]) -> None:
        kernel = self.kernel
        kernel.open_at_bind.append(kernel.open())
        if addr[1] == 0:
            self.port = kernel.offers.pop(0)
            return
        if kernel.refuse > 0:
            kernel.refuse -= 1
            raise OSError(errno.EADDRINUSE, "Address already in use")
        self.port = addr[1]

    def getsockname(self) -> Tuple[str, int]:
        assert self.port is not None
        return "127.0.0.1", self.port

    def close(self) -> None:
        self.closed = True


def test_a_port_the_kernel_offers_in_the_media_ranges_is_passed_over(monkeypatch):
    kernel = FakeKernel([MEDIA_PORTS_FROM, 20000, MEDIA_PORTS_TO - 1, 40100])
    monkeypatch.setattr(relay_process, "socket", kernel.module())
    assert free_udp_port() == 40100
    # the refused offers stayed bound (the kernel offers another port each time), then
    # every socket was closed
    assert kernel.open_at_bind == [1, 2, 3, 4]
    assert all(s.closed for s in kernel.sockets)


def test_without_an_ephemeral_port_outside_the_media_ranges_it_picks_one_itself(monkeypatch):
    kernel = FakeKernel([10000 + i for i in range(4)], refuse=2)
    monkeypatch.setattr(relay_process, "socket", kernel.module())
    port = free_udp_port(tries=4)
    assert port in relay_process._FALLBACK_PORTS and port >= MEDIA_PORTS_TO
    assert len(kernel.sockets) == 4 + 3 and all(s.closed for s in kernel.sockets)


def test_no_port_at_all_is_an_error_and_leaves_nothing_open(monkeypatch):
    kernel = FakeKernel([20000, 20002], refuse=2)
    monkeypatch.setattr(relay_process, "socket", kernel.module())
    with pytest.raises(OSError, match="no free UDP port"):
        free_udp_port(tries=2)
    assert all(s.closed for s in kernel.sockets)


def test_real_picks_and_media_ranges_do_not_meet():
    for _ in range(20):
        assert not MEDIA_PORTS_FROM <= free_udp_port() < MEDIA_PORTS_TO
    for _ in range(200):
        first, last = (int(p) for p in next_port_range(128).split("-"))
        assert MEDIA_PORTS_FROM <= first <= last < MEDIA_PORTS_TO
