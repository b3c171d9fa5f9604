"""Socket helpers shared by the integration, netns and security tests."""

from __future__ import annotations

import socket
from typing import List


def pending(sock: socket.socket) -> List[bytes]:
    """The datagrams queued on `sock` right now, without waiting (its timeout is kept).
    For "nothing arrived" checks: first wait until the relay counted the packet as
    handled (a drop counter moved), then look here, instead of waiting out a timeout.
    Loopback and veth delivery queue a datagram before sendto returns."""
    got = []
    timeout = sock.gettimeout()
    sock.setblocking(False)
    try:
        while True:
            try:
                got.append(sock.recv(65535))
            except BlockingIOError:
                return got
    finally:
        sock.settimeout(timeout)
