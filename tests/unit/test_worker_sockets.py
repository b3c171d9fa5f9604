"""The worker's media sockets: held as raw fds, closed without an EPOLL_CTL_DEL.

Closing the worker's (only) reference to a socket takes it out of the epoll set; these
tests hold the worker to that: a removed session's sockets are closed, their ports free,
and a new socket that gets the same fd number is polled as itself."""

from __future__ import annotations

import os
import socket
from typing import List, Tuple

from fastpath import channel
from fastpath.contract import LegSpec, StreamSpec, unit_id
from fastpath.worker.loop import SocketWorker

CALLER = ("127.0.0.1", 4000)
CALLEE = ("127.0.0.1", 5000)


def _bound(ports: List[int]) -> Tuple[List[int], Tuple[Tuple[str, int], ...]]:
    """Sockets bound as the daemon binds them; their fds detached, as SCM_RIGHTS gives."""
    fds = []
    for port in ports:
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM | socket.SOCK_NONBLOCK)
        s.bind(("127.0.0.1", port))
        fds.append(s.detach())
    return fds, tuple(("127.0.0.1", p) for p in ports)


def _install(worker: SocketWorker, uid: int, base: int) -> List[int]:
    ports = [base, base + 1, base + 2, base + 3]
    fds, addrs = _bound(ports)
    stream = StreamSpec(0, LegSpec("A", "127.0.0.1", base, CALLER),
                        LegSpec("B", "127.0.0.1", base + 2, CALLEE))
    worker._handle(channel.InstallSession(uid, stream, addrs), fds)
    return fds


def test_removed_sockets_are_closed_and_a_reused_fd_is_polled_as_the_new_socket():
    mine, theirs = channel.pair()
    worker = SocketWorker(mine)
    try:
        first = _install(worker, unit_id(1, 0), 31200)
        assert set(worker.addrs) == set(first)
        worker._handle(channel.RemoveSession(unit_id(1, 0)), [])
        assert worker.addrs == {}
        for fd in first:  # closed: the numbers are free and so are the ports
            try:
                os.fstat(fd)
            except OSError:
                continue
            raise AssertionError(f"fd {fd} of a removed session is still open")
        again = _install(worker, unit_id(2, 0), 31200)  # the same ports, likely the same fds
        assert set(worker.addrs) == set(again)
        probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            probe.sendto(b"x" * 12, ("127.0.0.1", 31200))
            events = worker.epoll.poll(1.0)
        finally:
            probe.close()
        assert [fd for fd, _ev in events] == [again[0]]  # once, as the new socket
        worker._handle(channel.RemoveSession(unit_id(2, 0)), [])
        assert worker.epoll.poll(0) == []
    finally:
        for fd in list(worker.addrs):
            os.close(fd)
        worker.epoll.close()
        mine.close()
        theirs.close()
