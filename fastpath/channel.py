"""The daemon <-> worker channel: typed messages, marshalled, over a SOCK_SEQPACKET pair.

Sockets travel with their install message as SCM_RIGHTS, so the daemon binds (and can
veto) every port while the worker owns the hot loop. Both ends are the same
interpreter (the worker is started with the daemon's own executable) and the pair is
private to them, so `marshal` fits: built into both interpreters, where msgpack runs
as pure Python under PyPy and was most of the control plane's cost there. Messages
are the immutable records below (and `fastpath.contract`'s specs and reports); on the
wire each is a tagged tuple, converted by `encode_message`/`decode_message` only.
"""

from __future__ import annotations

import array
import marshal
import os
import socket
import threading
from dataclasses import dataclass
from typing import Any, Dict, List, NamedTuple, Optional, Sequence, Tuple, Union

from fastpath.contract import Addr, LegReport, LegSpec, StreamSpec
from fastpath.errors import LrkError

MAX_MESSAGE = 256 * 1024
#: fds one message may carry: a batch of up to 16 installs (4 sockets each)
MAX_FDS = 64
#: messages the daemon packs into one "batch" message (one syscall, one worker wake-up)
MAX_BATCH = 64
#: sessions per report message, so one message stays well below the socket buffer
REPORT_CHUNK = 400


class FdsTruncated(LrkError):
    """The kernel passed fewer fds than a message carried: the receiver is out of them."""


def pair() -> Tuple[socket.socket, socket.socket]:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    for s in (a, b):
        s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 * MAX_MESSAGE)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 * MAX_MESSAGE)
    return a, b


# -- messages ---------------------------------------------------------------------------
class InstallSession(NamedTuple):
    """Daemon -> worker: serve one stream of a session (unit `uid`, see
    `fastpath.contract.unit_id`) on the four sockets that come with it (A-RTP, A-RTCP,
    B-RTP, B-RTCP), whose local addresses the daemon already knows (the worker needs no
    system call to learn them)."""

    uid: int
    stream: StreamSpec
    addrs: Tuple[Addr, ...]


class UpdateSession(NamedTuple):
    """Daemon -> worker: a unit's legs as they now are (a leg whose spec changed latches
    afresh; the other keeps its latch)."""

    uid: int
    stream: StreamSpec


class InstallFork(NamedTuple):
    """Daemon -> worker: another early dialog of unit `main_uid`'s stream (a forked
    INVITE). Two sockets come with it (A-RTP, A-RTCP); its B side shares the main unit's
    B sockets. `uid` is the daemon's id for it (negative: no clash with unit ids)."""

    uid: int
    main_uid: int
    stream: StreamSpec
    addrs: Tuple[Addr, ...]


class PromoteFork(NamedTuple):
    """Daemon -> worker: the fork's dialog won (its final answer): its A sockets replace
    the main unit's, which close; the fork unit is gone."""

    main_uid: int
    fork_uid: int


class RemoveSession(NamedTuple):
    """Daemon -> worker: stop serving a unit, close its sockets. No final report:
    the daemon forgot the unit when it sent this (it refreshes counters before a delete)."""

    uid: int


class UnitReport(NamedTuple):
    """Worker -> daemon: what one unit counted since its install."""

    uid: int
    last_rx: Optional[float]
    a: LegReport
    b: LegReport


@dataclass(frozen=True)
class Taps:
    """Daemon -> worker (packet mode): the AF_PACKET sockets that come with it."""


@dataclass(frozen=True)
class XskQueues:
    """Daemon -> worker (packet mode over AF_XDP): the interfaces to open AF_XDP sockets
    on, one fd each of the steering program's queue -> socket map (the worker registers
    its sockets there: a UMEM must live in the process that registers it)."""

    ifnames: Tuple[str, ...]


@dataclass(frozen=True)
class Flush:
    """Daemon -> worker: report every changed session now, then answer `Flushed(req)`."""

    req: int


@dataclass(frozen=True)
class Stop:
    """Daemon -> worker: report, close everything, exit."""


@dataclass(frozen=True)
class Batch:
    """Several daemon -> worker messages in one datagram; `nfds[i]` fds belong to the i-th."""

    messages: Tuple[Any, ...]
    nfds: Tuple[int, ...]


class Reports(NamedTuple):
    """Worker -> daemon: session reports, and the worker's totals (last chunk only)."""

    reports: Tuple[UnitReport, ...]
    totals: Optional[Dict[str, int]] = None


@dataclass(frozen=True)
class Flushed:
    """Worker -> daemon: every report asked for by `Flush(req)` has been sent."""

    req: int


Message = Union[InstallSession, InstallFork, PromoteFork, UpdateSession, RemoveSession, Taps,
                XskQueues, Flush, Stop, Batch, Reports, Flushed, UnitReport]


def _leg_out(leg: LegSpec) -> tuple:
    return tuple(leg)  # marshal takes plain tuples only


def _leg_in(t: tuple) -> LegSpec:
    return LegSpec(t[0], t[1], t[2], _addr(t[3]), _addr(t[4]), t[5], t[6], t[7])


def _addr(a: Any) -> Optional[Addr]:
    return None if a is None else (a[0], a[1])


def _spec_out(spec: StreamSpec) -> tuple:
    return (spec[0], tuple(spec[1]), tuple(spec[2]))  # index, leg A, leg B


def _spec_in(t: tuple) -> StreamSpec:
    return StreamSpec(t[0], _leg_in(t[1]), _leg_in(t[2]))


def _report_leg_out(r: LegReport) -> tuple:
    return tuple(r)


def _report_leg_in(t: tuple) -> LegReport:
    # marshal keeps tuples: drops come back as ((reason, n), ...), peers as (ip, port)
    return LegReport._make(t)


def _to_wire(m: Any) -> tuple:
    encode = _ENCODERS.get(type(m))
    if encode is not None:  # one dict lookup instead of a ladder of isinstance checks
        return encode(m)
    return _to_wire_slow(m)


def _install_out(m: InstallSession) -> tuple:
    s = m[1]  # by index, _spec_out() inline: every offer sends one (fields in C, no getattr)
    return ("I", m[0], (s[0], tuple(s[1]), tuple(s[2])), m[2])


def _update_out(m: UpdateSession) -> tuple:
    s = m[1]  # as _install_out: every answer sends one
    return ("U", m[0], (s[0], tuple(s[1]), tuple(s[2])))


_ENCODERS = {
    InstallSession: _install_out,
    UpdateSession: _update_out,
    RemoveSession: lambda m: ("X", m[0]),  # .uid
    Batch: lambda m: ("B", tuple([_to_wire(x) for x in m.messages]), m.nfds),
    Flush: lambda m: ("F", m.req),
}


def _to_wire_slow(m: Any) -> tuple:
    if isinstance(m, Reports):
        return ("R", tuple((r.uid, r.last_rx, _report_leg_out(r.a), _report_leg_out(r.b))
                           for r in m.reports), m.totals)
    if isinstance(m, InstallSession):
        return ("I", m.uid, _spec_out(m.stream), m.addrs)
    if isinstance(m, UpdateSession):
        return ("U", m.uid, _spec_out(m.stream))
    if isinstance(m, InstallFork):
        return ("K", m.uid, m.main_uid, _spec_out(m.stream), m.addrs)
    if isinstance(m, PromoteFork):
        return ("P", m.main_uid, m.fork_uid)
    if isinstance(m, RemoveSession):
        return ("X", m.uid)
    if isinstance(m, Flush):
        return ("F", m.req)
    if isinstance(m, Flushed):
        return ("f", m.req)
    if isinstance(m, Batch):
        return ("B", tuple(_to_wire(x) for x in m.messages), m.nfds)
    if isinstance(m, Taps):
        return ("T",)
    if isinstance(m, XskQueues):
        return ("Q", tuple(m.ifnames))
    if isinstance(m, Stop):
        return ("S",)
    raise TypeError(f"not a channel message: {m!r}")


def _from_wire(t: tuple) -> Any:
    tag = t[0]
    if tag == "R":
        return Reports(tuple(UnitReport(r[0], r[1], _report_leg_in(r[2]),
                                        _report_leg_in(r[3])) for r in t[1]), t[2])
    if tag == "I":
        return InstallSession(t[1], _spec_in(t[2]), tuple((a[0], a[1]) for a in t[3]))
    if tag == "U":
        return UpdateSession(t[1], _spec_in(t[2]))
    if tag == "K":
        return InstallFork(t[1], t[2], _spec_in(t[3]), tuple((a[0], a[1]) for a in t[4]))
    if tag == "P":
        return PromoteFork(t[1], t[2])
    if tag == "X":
        return RemoveSession(t[1])
    if tag == "F":
        return Flush(t[1])
    if tag == "f":
        return Flushed(t[1])
    if tag == "B":
        return Batch(tuple(_from_wire(x) for x in t[1]), tuple(t[2]))
    if tag == "T":
        return Taps()
    if tag == "Q":
        return XskQueues(tuple(t[1]))
    if tag == "S":
        return Stop()
    raise ValueError(f"unknown channel message tag {tag!r}")


def encode_message(message: Any) -> bytes:
    return marshal.dumps(_to_wire(message))


def encode_reports(reports: Sequence[tuple], totals: Optional[Dict[str, int]] = None
                   ) -> bytes:
    """A `Reports` message from reports already in wire form, each
    (uid, last_rx, leg A tuple, leg B tuple) with LegReport's fields in order: the
    worker builds those directly (one report per changed unit every half second)."""
    return marshal.dumps(("R", tuple(reports), totals))


def send_bytes(sock: socket.socket, data: bytes) -> None:
    sock.send(data)


def decode_message(data: Union[bytes, memoryview]) -> Any:
    """A message from its bytes (marshal copies what it reads: nothing refers to `data`
    afterwards); ValueError (or TypeError/EOFError from marshal) when the
    bytes are not one: the channel is private, so that is a bug, reported by the caller."""
    wire = marshal.loads(data)
    if not isinstance(wire, tuple) or not wire:
        raise ValueError("channel message is not a tagged tuple")
    return _from_wire(wire)


def send(sock: socket.socket, message: Any, fds: Sequence[int] = ()) -> None:
    data = encode_message(message)
    if fds:
        anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())]
        sock.sendmsg([data], anc)
    else:
        sock.send(data)


#: ancillary space for the most fds one message carries
_FD_SPACE = socket.CMSG_SPACE(MAX_FDS * array.array("i").itemsize)
_inbox = threading.local()


def _buffer() -> memoryview:
    """This thread's receive buffer, MAX_MESSAGE bytes, made once. `recvmsg(MAX_MESSAGE)`
    allocated (and freed) a buffer that size per call, including the calls that find
    nothing: about 8-12 µs a call against 2 µs with a buffer kept (the allocator returns
    so large a block to the kernel and faults it back in)."""
    buf = getattr(_inbox, "buf", None)
    if buf is None:
        buf = _inbox.buf = memoryview(bytearray(MAX_MESSAGE))
    return buf


def receive(sock: socket.socket, flags: int = 0) -> Optional[Tuple[Any, List[int]]]:
    """One message and its fds; None on EOF. Raises BlockingIOError when none is ready,
    FdsTruncated when the kernel could not pass every fd (the receiver is out of them)."""
    buf = _buffer()
    n, anc, mflags, _addr = sock.recvmsg_into([buf], _FD_SPACE, flags)
    if not n and not anc:
        return None
    data = buf[:n]  # decoded before the next receive reuses the buffer
    fds: List[int] = []
    for level, kind, payload in anc:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            arr = array.array("i")
            arr.frombytes(payload[: len(payload) - (len(payload) % arr.itemsize)])
            fds.extend(arr)
    if mflags & socket.MSG_CTRUNC:
        for fd in fds:  # which message each belonged to is lost: none can be used
            os.close(fd)
        raise FdsTruncated(f"a channel message lost file descriptors in transit ({len(fds)} "
                           "arrived): this process has reached its RLIMIT_NOFILE")
    return decode_message(data), fds
