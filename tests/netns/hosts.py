"""Helpers for namespace tests: endpoints on the test hosts, bounded receives, relay state."""

from __future__ import annotations

import socket
import time

from bench.netns import run, socket_in
from tests.sockets import pending  # noqa: F401 - netns tests import it from here


def endpoint(ns: str, ip: str, port: int, timeout: float = 3.0) -> socket.socket:
    """A UDP socket bound in namespace `ns`."""
    s = socket_in(ns, socket.AF_INET6 if ":" in ip else socket.AF_INET)
    s.bind((ip, port))
    s.settimeout(timeout)
    return s


def receive(sock: socket.socket, n: int):
    """Up to `n` datagrams, each waited for at most the socket's timeout."""
    got = []
    for _ in range(n):
        try:
            data, addr = sock.recvfrom(4096)
        except socket.timeout:
            break
        got.append((data, addr[:2]))
    return got


def relay_flow(src: socket.socket, dst: socket.socket, packets: list, to) -> list:
    """`packets` sent from `src` to the relay address `to`, and what `dst` got (as
    `receive`). The first goes alone: in nfqueue mode userspace decides a flow's first
    packet, and packets sent while it does may overtake it (docs/fastpath.md); from then
    on the relay keeps the order, which the caller can assert."""
    src.sendto(packets[0], to)
    got = receive(dst, 1)
    for pkt in packets[1:]:
        src.sendto(pkt, to)
    return got + receive(dst, len(packets) - 1)


def wait(predicate, timeout: float = 10.0) -> None:
    """Poll an observable until `predicate()` holds; fail at the deadline."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"condition not met within {timeout}s")


def flows(ns: str) -> list:
    """Conntrack flows of a namespace."""
    return [line for line in run("conntrack", "-L", ns=ns, check=False).stdout.splitlines()
            if line.startswith(("udp", "ipv4", "ipv6"))]


def tables(ns: str) -> str:
    return run("nft", "list", "tables", ns=ns).stdout
