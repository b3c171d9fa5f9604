"""The control plane <-> worker channel: marshal messages over a SOCK_SEQPACKET pair.

Sockets travel with their install message as SCM_RIGHTS, so the control plane
binds (and can veto) every port while the worker owns the hot loop. Both ends are
the same interpreter (the worker is started with the daemon's own executable) and
the pair is private to them, so `marshal` fits: built into both interpreters, where
msgpack runs as pure Python under PyPy and was most of the control plane's cost there.
"""

from __future__ import annotations

import array
import marshal
import socket
from typing import Any, Dict, List, Optional, Sequence, Tuple

MAX_MESSAGE = 256 * 1024
#: fds one message may carry: a batch of up to 16 installs (4 sockets each)
MAX_FDS = 64
#: messages the daemon packs into one "batch" message (one syscall, one worker wake-up)
MAX_BATCH = 64
#: sessions per report message, so one message stays well below the socket buffer
REPORT_CHUNK = 400


def pair() -> Tuple[socket.socket, socket.socket]:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    for s in (a, b):
        s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 * MAX_MESSAGE)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 * MAX_MESSAGE)
    return a, b


def encode(message: Dict[str, Any]) -> bytes:
    return marshal.dumps(message)


def send(sock: socket.socket, message: Dict[str, Any], fds: Sequence[int] = ()) -> None:
    data = encode(message)
    if fds:
        anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())]
        sock.sendmsg([data], anc)
    else:
        sock.send(data)


def receive(sock: socket.socket, flags: int = 0) -> Optional[Tuple[Dict[str, Any], List[int]]]:
    """One message and its fds; None on EOF. Raises BlockingIOError when none is ready."""
    fd_size = socket.CMSG_SPACE(MAX_FDS * array.array("i").itemsize)
    data, anc, _flags, _addr = sock.recvmsg(MAX_MESSAGE, fd_size, flags)
    if not data and not anc:
        return None
    fds: List[int] = []
    for level, kind, payload in anc:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            arr = array.array("i")
            arr.frombytes(payload[: len(payload) - (len(payload) % arr.itemsize)])
            fds.extend(arr)
    return marshal.loads(data), fds
