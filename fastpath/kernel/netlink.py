"""Netlink framing shared by every kernel adapter: one codec (sans-IO) and one small socket.

The daemon talks to netfilter over ``NETLINK_NETFILTER`` in three protocols: conntrack
(:mod:`fastpath.kernel.ctnetlink`), nf_tables set dumps (:mod:`fastpath.kernel.nft_setelem`)
and NFQUEUE (:mod:`fastpath.kernel.nfqueue`). This module holds what they share, so each
of them keeps only its own protocol (message types, attribute numbers, meaning):

* encoding: :func:`attr` (one TLV, padded to 4 bytes), :func:`nested`, :func:`attr_be32`,
  :func:`attr_strz`, :func:`message` (nlmsghdr + payload) and :func:`nfmessage` (nlmsghdr
  + nfgenmsg + attributes);
* decoding: :func:`messages` (the netlink messages of a buffer), :func:`attrs` (the
  attributes of a byte range), :func:`attr_map`, :func:`parse_error` (an NLMSG_ERROR:
  errno, request type, extended-ack text) and :class:`Dump` (the replies of one dump
  request across buffers: sequence filter, NLMSG_DONE and NLM_F_DUMP_INTR, error replies,
  a bound on messages);
* :class:`NetlinkSocket`: send, receive with a deadline, a whole dump, and waiting for
  the acks of requests, on a non-blocking socket (every wait is a bounded poll).

Byte order: ``struct nlmsghdr`` and every attribute header are host-endian;
``nfgenmsg.res_id`` is big-endian; attribute payloads are whatever the protocol says
(nfnetlink protocols use big-endian integers: :func:`attr_be32`). Attribute types may
carry NLA_F_NESTED / NLA_F_NET_BYTEORDER, masked off when decoding.

Errors: a malformed buffer raises :class:`NetlinkDecodeError` (never IndexError or
struct.error), an error reply to a request :class:`NetlinkRequestError`, a dump beyond
its bound :class:`NetlinkLimitError`; every decoding loop advances by at least 4 bytes,
so no input makes one spin. The socket raises what its ``error`` factory makes of an
errno (a protocol passes its own typed error), :class:`NetlinkError` by default.
"""

from __future__ import annotations

import errno as _errno
import os
import select
import socket
import struct
import time
from typing import Callable, Dict, Iterable, Iterator, NamedTuple, Optional, Tuple, Union

from fastpath.errors import LrkError

__all__ = [
    "NETLINK_NETFILTER", "NLMSG_HDRLEN", "NFGEN_HDRLEN",
    "NLM_F_REQUEST", "NLM_F_MULTI", "NLM_F_ACK", "NLM_F_DUMP_INTR", "NLM_F_DUMP",
    "NLM_F_CAPPED", "NLM_F_ACK_TLVS", "NLM_F_CREATE", "NLM_F_APPEND",
    "NLMSG_NOOP", "NLMSG_ERROR", "NLMSG_DONE", "NLMSG_OVERRUN", "NLMSG_MIN_TYPE",
    "NLA_F_NESTED", "NLA_F_NET_BYTEORDER", "NLA_TYPE_MASK",
    "NetlinkError", "NetlinkDecodeError", "NetlinkRequestError", "NetlinkLimitError",
    "ErrorReply", "Dump", "NetlinkSocket",
    "align", "attr", "nested", "attr_be32", "attr_strz", "message", "nfmessage",
    "messages", "attr_at", "attrs", "attr_map", "parse_error",
]

NETLINK_NETFILTER = 12
SOL_NETLINK = 270
NETLINK_NO_ENOBUFS = 5
NETLINK_CAP_ACK = 10
NETLINK_EXT_ACK = 11

NLM_F_REQUEST = 0x1
NLM_F_MULTI = 0x2
NLM_F_ACK = 0x4
NLM_F_DUMP_INTR = 0x10
NLM_F_ROOT = 0x100
NLM_F_MATCH = 0x200
NLM_F_DUMP = NLM_F_ROOT | NLM_F_MATCH
NLM_F_CAPPED = 0x100  # on NLMSG_ERROR: the request copy is only its header
NLM_F_ACK_TLVS = 0x200  # on NLMSG_ERROR: extended-ack attributes follow
NLM_F_CREATE = 0x400
NLM_F_APPEND = 0x800

NLMSG_NOOP = 1
NLMSG_ERROR = 2
NLMSG_DONE = 3
NLMSG_OVERRUN = 4
NLMSG_MIN_TYPE = 0x10  # below: control messages; protocols number theirs from here

NLA_F_NESTED = 0x8000
NLA_F_NET_BYTEORDER = 0x4000
NLA_TYPE_MASK = 0x3FFF
NLMSGERR_ATTR_MSG = 1

NFNETLINK_V0 = 0
NFNL_MSG_BATCH_BEGIN = NLMSG_MIN_TYPE
NFNL_MSG_BATCH_END = NLMSG_MIN_TYPE + 1

NLMSGHDR = struct.Struct("=IHHII")  # len, type, flags, seq, pid (host order)
NFGENMSG = struct.Struct("!BBH")  # family, version, res_id (big-endian)
NLATTR = struct.Struct("=HH")  # len, type (host order)
NLMSG_HDRLEN = NLMSGHDR.size  # 16
NFGEN_HDRLEN = NLMSG_HDRLEN + NFGENMSG.size  # 20
_I32 = struct.Struct("=i")  # nlmsgerr.error (host order)
_BE32 = struct.Struct("!I")
_U32 = 0xFFFFFFFF

Buffer = Union[bytes, bytearray, memoryview]

#: receive calls per acks() wait: bounds the loop even if the kernel keeps sending
MAX_ACK_RECVS = 100_000
#: default bound of one dump's data messages (every one is at least 16 bytes)
MAX_DUMP_MESSAGES = 1 << 22


# --- errors ---------------------------------------------------------------------------


class NetlinkError(LrkError):
    """A netlink operation failed; `errno` is the positive errno (0 if none), `op` the
    operation."""

    code = "netlink"

    def __init__(self, text: str, errno: int = 0, op: str = "") -> None:
        super().__init__(text)
        self.errno = errno
        self.op = op


class NetlinkDecodeError(NetlinkError):
    """A buffer is not well-formed netlink: truncated, misaligned or oversized lengths."""


class NetlinkRequestError(NetlinkError):
    """The kernel answered a request with an error; `message` is its extended-ack text."""

    def __init__(self, errno: int, message: str = "", op: str = "") -> None:
        text = f"{_errno.errorcode.get(errno, errno)}: {os.strerror(errno)}"
        super().__init__(text + (f" ({message})" if message else ""), errno, op)
        self.message = message


class NetlinkLimitError(NetlinkError):
    """A dump sent more messages than its bound."""


def _default_error(err: int, op: str, detail: str = "") -> Exception:
    text = f"netlink {op}: {detail or os.strerror(err)}"
    return NetlinkError(text, err, op)


# --- encoding -------------------------------------------------------------------------


def align(n: int) -> int:
    """`n` rounded up to the 4-byte netlink alignment."""
    return (n + 3) & ~3


def attr(kind: int, payload: bytes = b"") -> bytes:
    """One attribute: nlattr header (host order), `payload`, zero padding to 4 bytes."""
    n = 4 + len(payload)
    if n > 0xFFFF:
        raise NetlinkError(f"attribute {kind} of {len(payload)} bytes exceeds nla_len")
    return NLATTR.pack(n, kind) + payload + b"\0" * (-n & 3)


def nested(kind: int, *children: bytes) -> bytes:
    """An NLA_F_NESTED attribute holding the (already encoded) `children`."""
    return attr(kind | NLA_F_NESTED, b"".join(children))


def attr_be32(kind: int, value: int) -> bytes:
    """An attribute holding a big-endian u32."""
    return attr(kind, _BE32.pack(value & _U32))


def attr_strz(kind: int, text: str) -> bytes:
    """An attribute holding a NUL-terminated string."""
    return attr(kind, text.encode() + b"\0")


def message(mtype: int, flags: int, seq: int, payload: bytes = b"", pid: int = 0) -> bytes:
    """One netlink message: nlmsghdr (its length filled in) + `payload`."""
    return NLMSGHDR.pack(NLMSG_HDRLEN + len(payload), mtype, flags, seq & _U32, pid) + payload


def nfmessage(mtype: int, flags: int, seq: int, family: int = 0, res_id: int = 0,
              attributes: bytes = b"") -> bytes:
    """One nfnetlink message: nlmsghdr + nfgenmsg (version 0) + `attributes`."""
    return (NLMSGHDR.pack(NFGEN_HDRLEN + len(attributes), mtype, flags, seq & _U32, 0)
            + NFGENMSG.pack(family, NFNETLINK_V0, res_id) + attributes)


# --- decoding -------------------------------------------------------------------------


def messages(buf: Buffer, length: Optional[int] = None
             ) -> Iterator[Tuple[int, int, int, int, int]]:
    """(type, flags, seq, body, end) of each message in the first `length` bytes of `buf`.

    `body` is the offset just after the 16-byte header, `end` the end of the message.
    Raises NetlinkDecodeError at the first header that is cut short or whose length is
    below 16 or runs past the buffer (what follows cannot be trusted).
    """
    size = len(buf) if length is None else min(length, len(buf))
    off = 0
    unpack = NLMSGHDR.unpack_from
    while off < size:
        if off + NLMSG_HDRLEN > size:
            raise NetlinkDecodeError(f"{size - off} stray bytes at offset {off} are not a "
                                     "netlink header")
        nlen, mtype, flags, seq, _pid = unpack(buf, off)
        if nlen < NLMSG_HDRLEN or off + nlen > size:
            raise NetlinkDecodeError(f"netlink message at offset {off} claims {nlen} bytes, "
                                     f"the buffer has {size - off} (truncated read?)")
        yield mtype, flags, seq, off + NLMSG_HDRLEN, off + nlen
        off += (nlen + 3) & ~3


def attr_at(buf: Buffer, off: int, end: int) -> Tuple[int, int, int]:
    """(type without flags, payload end, offset of the next attribute) of the attribute at
    `off` (its payload starts at off + 4), which must end by `end`: one step of
    :func:`attrs`, for a hot loop that walks attributes itself (a call the PyPy JIT
    inlines, where a generator costs twice as much).

    Raises NetlinkDecodeError for a header cut short or a length below 4 or past `end`.
    """
    if off + 4 > end:
        raise NetlinkDecodeError(f"attribute header at offset {off} runs past {end}")
    alen, kind = NLATTR.unpack_from(buf, off)
    if alen < 4 or off + alen > end:
        raise NetlinkDecodeError(f"attribute of length {alen} at offset {off} runs past "
                                 f"its container (ends at {end})")
    return kind & NLA_TYPE_MASK, off + alen, off + ((alen + 3) & ~3)


def attrs(buf: Buffer, start: int, end: int) -> Iterator[Tuple[int, int, int]]:
    """(type without flags, payload start, payload end) of each attribute in buf[start:end].

    Fewer than 4 bytes left at the end are padding. Raises NetlinkDecodeError for an
    attribute whose length is below 4 or runs past `end`. (The steps of
    :func:`attr_at`, inlined: a call per attribute costs CPython 20% of a conntrack dump.)
    """
    off = start
    unpack = NLATTR.unpack_from
    while off + 4 <= end:
        alen, kind = unpack(buf, off)
        if alen < 4 or off + alen > end:
            raise NetlinkDecodeError(f"attribute of length {alen} at offset {off} runs past "
                                     f"its container (ends at {end})")
        yield kind & NLA_TYPE_MASK, off + 4, off + alen
        off += (alen + 3) & ~3


def attr_map(buf: Buffer, start: int = 0, end: Optional[int] = None) -> Dict[int, bytes]:
    """{type: payload bytes} of the attributes in buf[start:end] (flags masked, last wins)."""
    if end is None:
        end = len(buf)
    return {kind: bytes(buf[a:b]) for kind, a, b in attrs(buf, start, end)}


class ErrorReply(NamedTuple):
    """An NLMSG_ERROR: `error` is 0 for an ack, else the positive errno; `request_type`
    the type of the request it answers (0 when not included); `message` the
    extended-ack text (NETLINK_EXT_ACK), if any."""

    error: int
    request_type: int = 0
    message: str = ""


def parse_error(buf: Buffer, body: int, end: int, flags: int = 0) -> ErrorReply:
    """The NLMSG_ERROR whose body is buf[body:end] (`flags` from its header)."""
    if end - body < 4:
        raise NetlinkDecodeError(f"NLMSG_ERROR of {end - body + NLMSG_HDRLEN} bytes has no "
                                 "error code")
    (err,) = _I32.unpack_from(buf, body)
    rtype = 0
    text = ""
    if end - body >= 4 + NLMSG_HDRLEN:  # a copy of the request's header follows
        olen, rtype = NLMSGHDR.unpack_from(buf, body + 4)[:2]
        if flags & NLM_F_ACK_TLVS:
            tlv = body + 4 + (NLMSG_HDRLEN if flags & NLM_F_CAPPED else align(olen))
            if tlv < end:
                try:
                    for kind, a, b in attrs(buf, tlv, end):
                        if kind == NLMSGERR_ATTR_MSG:
                            text = bytes(buf[a:b]).split(b"\0", 1)[0].decode("utf-8",
                                                                             "replace")
                except NetlinkDecodeError:
                    pass  # the errno stands; a garbled text is dropped
    return ErrorReply(-err if err < 0 else err, rtype, text)


class Dump:
    """The replies of one dump request, fed buffer by buffer (sans-IO).

    :meth:`feed` yields the data messages answering `seq` (every one when `seq` is None)
    and skips replies to other requests; NLMSG_DONE sets `done` (and `interrupted` when
    the kernel flagged NLM_F_DUMP_INTR: the data changed during the dump); an error reply
    raises NetlinkRequestError; more than `max_messages` data messages raise
    NetlinkLimitError.
    """

    __slots__ = ("seq", "max_messages", "count", "done", "interrupted")

    def __init__(self, seq: Optional[int], max_messages: int = MAX_DUMP_MESSAGES) -> None:
        self.seq = seq
        self.max_messages = max_messages
        self.count = 0
        self.done = False
        self.interrupted = False

    def feed(self, buf: Buffer, length: Optional[int] = None
             ) -> Iterator[Tuple[int, int, int]]:
        """(type, body, end) of each data message of this dump in `buf`."""
        seq = self.seq
        for mtype, flags, mseq, body, end in messages(buf, length):
            if seq is not None and mseq != seq:
                continue
            if mtype >= NLMSG_MIN_TYPE:
                self.count += 1
                if self.count > self.max_messages:
                    raise NetlinkLimitError(f"dump sent more than {self.max_messages} "
                                            "messages")
                yield mtype, body, end
            elif mtype == NLMSG_DONE:
                self.done = True
                if flags & NLM_F_DUMP_INTR:
                    self.interrupted = True
            elif mtype == NLMSG_ERROR:
                reply = parse_error(buf, body, end, flags)
                if reply.error:
                    raise NetlinkRequestError(reply.error, reply.message)


# --- the socket -----------------------------------------------------------------------

ErrorFactory = Callable[[int, str, str], Exception]
#: other(buf, type, flags, seq, body, end): a message that acks() was not waiting for
OtherHandler = Callable[[Buffer, int, int, int, int, int], None]

_AF_NETLINK = int(getattr(socket, "AF_NETLINK", 16))
_MSG_DONTWAIT = int(getattr(socket, "MSG_DONTWAIT", 0x40))
_EAGAIN = (_errno.EAGAIN, _errno.EWOULDBLOCK)
_MAX_ENOBUFS = 8


class NetlinkSocket:
    """A bound, non-blocking AF_NETLINK socket and its receive buffer.

    Serves the network namespace of the thread that created the socket (pass `sock`
    made elsewhere, e.g. in another namespace). Every wait is a poll bounded by a
    deadline or an idle timeout; failures raise ``error(errno, op, detail)``.
    Not thread-safe.
    """

    def __init__(self, sock: Optional[socket.socket] = None, *,
                 protocol: int = NETLINK_NETFILTER, bufsize: int = 1 << 16,
                 error: Optional[ErrorFactory] = None) -> None:
        self._error: ErrorFactory = error or _default_error
        if sock is None:
            try:
                sock = socket.socket(_AF_NETLINK, socket.SOCK_RAW, protocol)
            except OSError as exc:
                raise self._error(exc.errno or 0, "socket", "") from exc
        self.sock = sock
        try:
            sock.bind((0, 0))
            sock.setblocking(False)
            self.portid: int = sock.getsockname()[0]
        except OSError as exc:
            sock.close()
            raise self._error(exc.errno or 0, "socket setup", "") from exc
        self.buf = bytearray(bufsize)
        self.seq = 0
        #: ENOBUFS reported by receives (messages were lost; the socket still works)
        self.enobufs = 0
        #: buffers acks() could not decode and skipped
        self.decode_errors = 0
        self._poll = select.poll()
        self._poll.register(sock.fileno(), select.POLLIN)

    def fileno(self) -> int:
        return self.sock.fileno()

    def close(self) -> None:
        self.sock.close()

    def next_seq(self) -> int:
        """A fresh nlmsg_seq: 1..2**32-1, then round again."""
        self.seq = self.seq + 1 if self.seq < _U32 else 1
        return self.seq

    def setopt(self, option: int, value: int = 1) -> bool:
        """Set a SOL_NETLINK option; False when this kernel refuses it."""
        try:
            self.sock.setsockopt(SOL_NETLINK, option, value)
        except OSError:
            return False
        return True

    def send(self, msg: bytes, op: str = "send") -> None:
        try:
            self.sock.sendto(msg, (0, 0))
        except OSError as exc:
            raise self._error(exc.errno or 0, op, "") from exc

    def wait(self, timeout: Optional[float]) -> bool:
        """True once a datagram is readable, False after `timeout` s (None: no limit)."""
        ms = -1 if timeout is None else max(0, int(timeout * 1000 + 0.999))
        return bool(self._poll.poll(ms))

    def recv_into(self, flags: int = _MSG_DONTWAIT, op: str = "receive") -> int:
        """Bytes of one datagram read into `buf`; 0 when none is waiting."""
        for _ in range(_MAX_ENOBUFS):
            try:
                return self.sock.recv_into(self.buf, 0, flags)
            except OSError as exc:
                if exc.errno in _EAGAIN or isinstance(exc, socket.timeout):
                    return 0
                if exc.errno == _errno.ENOBUFS:
                    self.enobufs += 1
                    continue
                raise self._error(exc.errno or 0, op, "") from exc
        return 0

    def recv(self, deadline: Optional[float] = None, idle: Optional[float] = None,
             op: str = "receive") -> bytes:
        """A copy of the next datagram; waits until `deadline` (time.monotonic()) and at
        most `idle` s, then raises error(ETIMEDOUT)."""
        if deadline is None and idle is None:
            raise NetlinkError("recv needs a deadline or an idle timeout")
        limit = float("inf") if idle is None else time.monotonic() + idle
        if deadline is not None and deadline < limit:
            limit = deadline
            why = "its deadline passed"
        else:
            why = f"nothing came for {idle} s"
        while True:
            left = limit - time.monotonic()
            if left <= 0 or not self.wait(left):
                raise self._error(_errno.ETIMEDOUT, op, why)
            n = self.recv_into(_MSG_DONTWAIT, op)
            if n:
                return bytes(self.buf[:n])

    def dump(self, request: bytes, state: Dump, *, timeout: Optional[float] = None,
             idle: Optional[float] = None, op: str = "dump"
             ) -> Iterator[Tuple[bytes, int, int, int]]:
        """Send a dump request and yield (buffer, type, body, end) of each data message of
        `state` until NLMSG_DONE. `timeout` bounds the whole dump, `idle` each wait;
        `state` bounds the messages and tells afterwards whether it was interrupted.
        Stopping early leaves the dump running in the kernel: close the socket then."""
        self.send(request, op)
        deadline = None if timeout is None else time.monotonic() + timeout
        while not state.done:
            data = self.recv(deadline, idle, op)
            for mtype, body, end in state.feed(data):
                yield data, mtype, body, end

    def acks(self, seqs: Iterable[int], timeout: float, op: str = "request",
             other: Optional[OtherHandler] = None) -> Dict[int, ErrorReply]:
        """Read until every request in `seqs` is answered; {seq: ErrorReply}.

        Messages that answer none of them go to `other` (or are dropped); a buffer that
        cannot be decoded is counted in `decode_errors` and skipped from where it breaks.
        Raises error(ETIMEDOUT) when `timeout` s pass first."""
        pending = set(seqs)
        out: Dict[int, ErrorReply] = {}
        deadline = time.monotonic() + timeout
        for _ in range(MAX_ACK_RECVS):
            if not pending:
                return out
            left = deadline - time.monotonic()
            if left <= 0 or not self.wait(left):
                break
            n = self.recv_into(_MSG_DONTWAIT, op)
            if not n:
                continue
            buf = self.buf
            try:
                for mtype, flags, seq, body, end in messages(buf, n):
                    if mtype == NLMSG_ERROR and seq in pending:
                        pending.discard(seq)
                        out[seq] = parse_error(buf, body, end, flags)
                    elif other is not None:
                        other(buf, mtype, flags, seq, body, end)
            except NetlinkDecodeError:
                self.decode_errors += 1
        if not pending:
            return out
        raise self._error(_errno.ETIMEDOUT, op, f"no answer within {timeout} s")
