"""NFQUEUE reader: a thin socket shell around the :mod:`fastpath.kernel.nfqueue` codec.

One ``AF_NETLINK``/``NETLINK_NETFILTER`` socket per queue; pure Python, so it
runs on PyPy as well as CPython.  Needs CAP_NET_ADMIN in the network namespace
the socket is created in: a netlink socket serves the network namespace of
the thread that created it, for its whole life.  ``NfQueue(..., netns="x")``
(and :func:`call_in_netns`) therefore create the socket on a short-lived
thread that first joins the namespace with ``setns(fd, CLONE_NEWNET)``
(``os.setns`` on Python >= 3.12, else libc's setns through cffi in ABI mode,
so PyPy and CPython alike); the calling thread never changes namespace and
the object may then be used from any thread.  ``ip netns exec`` around the
whole process works too.

Error policy: config operations (bind, configure, unbind) and verdicts sent
with ``wait=True`` ask for an ack and raise :class:`NfQueueError` with the
errno name and a hint.  Plain verdicts are fire-and-forget: a kernel error
answer (e.g. ENOENT for an unknown id) arrives later in the receive stream
and is counted in ``verdict_errors`` (errno name -> count) and kept in
``last_error`` instead of interrupting packet reading.

Overload: the socket sets NETLINK_NO_ENOBUFS, so a full receive buffer makes
the kernel drop (or, with ``fail_open``, accept) the packets it cannot queue
instead of poisoning the socket with ENOBUFS; those drops show in
:meth:`NfQueue.kernel_stats` (``user_dropped``).  Should ENOBUFS still be
reported it is counted in ``enobufs`` and reading goes on.
"""

from __future__ import annotations

import collections
import errno
import os
import socket
import sys
import threading
from typing import Any, Callable, Deque, Dict, List, Optional, Sequence, Tuple, TypeVar

from fastpath.kernel.netlink import (
    NETLINK_CAP_ACK,
    NETLINK_EXT_ACK,
    NETLINK_NETFILTER,
    NETLINK_NO_ENOBUFS,
    NetlinkSocket,
)
from fastpath.kernel.nfqueue import (
    NFQA_CFG_F_CONNTRACK,
    NFQA_CFG_F_FAIL_OPEN,
    NFQA_CFG_F_GSO,
    NFQNL_COPY_PACKET,
    NFQNL_MAX_COPY_RANGE,
    NFT_RULE_HINTS,
    NetlinkAck,
    NfQueueArgumentError,
    NfQueueDecodeError,
    NfQueueError,
    QueuedPacket,
    build_bind,
    build_config,
    build_nft_queue_rule,
    build_unbind,
    build_verdict,
    build_verdict_batch,
    error_from_errno,
    parse_message,
    parse_messages,
)

__all__ = ["NfQueue", "NfQueueError", "add_queue_rule", "call_in_netns"]

T = TypeVar("T")

_SO_RCVBUFFORCE = int(getattr(socket, "SO_RCVBUFFORCE", 33))
_AF_NETLINK = int(getattr(socket, "AF_NETLINK", 16))
#: room for the netlink/nfqueue headers and metadata attributes around a payload
_HEADROOM = 4096
_PROC_STATS = "/proc/thread-self/net/netfilter/nfnetlink_queue"
CLONE_NEWNET = 0x40000000


class NfQueue:
    """One bound nfnetlink queue: receive queued packets, send verdicts.

    Not thread-safe: one reader per instance.  ``fileno()`` suits an event
    loop or poll; :meth:`receive_batch` drains up to `max_n` packets per call.
    """

    def __init__(self, queue_num: int, copy_range: int = 256, maxlen: int = 4096,
                 fail_open: bool = False, *, gso: bool = True, conntrack: bool = False,
                 blocking: bool = False, rcvbuf: int = 8 << 20, timeout: float = 2.0,
                 netns: Optional[str] = None) -> None:
        if not isinstance(queue_num, int) or not 0 <= queue_num <= 0xFFFF:
            raise NfQueueArgumentError(f"nfqueue number must be 0..65535, got {queue_num!r}")
        if not isinstance(copy_range, int) or not 0 < copy_range <= NFQNL_MAX_COPY_RANGE:
            raise NfQueueArgumentError(
                f"nfqueue copy_range must be 1..{NFQNL_MAX_COPY_RANGE}, got {copy_range!r}")
        if not isinstance(maxlen, int) or not 0 < maxlen <= 0xFFFFFFFF:
            raise NfQueueArgumentError(f"nfqueue maxlen must be a positive u32, got {maxlen!r}")
        self.queue_num = queue_num
        self.copy_range = copy_range
        self.maxlen = maxlen
        self.flags = ((NFQA_CFG_F_FAIL_OPEN if fail_open else 0)
                      | (NFQA_CFG_F_GSO if gso else 0)
                      | (NFQA_CFG_F_CONNTRACK if conntrack else 0))
        self.timeout = timeout
        self.bound = False
        #: packets received (returned or pending)
        self.received = 0
        #: unreadable buffers skipped
        self.decode_errors = 0
        #: errno name -> count of kernel error answers to fire-and-forget verdicts
        self.verdict_errors: Dict[str, int] = {}
        self.last_error: Optional[NfQueueError] = None
        self._pending: Deque[QueuedPacket] = collections.deque()
        self.netns = netns
        self.nl = NetlinkSocket(_netlink_socket(netns), bufsize=copy_range + _HEADROOM,
                                error=error_from_errno)
        self.sock = sock = self.nl.sock
        self.portid: int = self.nl.portid
        try:
            sock.setsockopt(socket.SOL_SOCKET, _SO_RCVBUFFORCE, rcvbuf)
        except OSError:  # no CAP_NET_ADMIN: capped by net.core.rmem_max
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
            except OSError as exc:
                sock.close()
                raise error_from_errno(exc.errno or 0, "socket setup") from exc
        self.no_enobufs = self.nl.setopt(NETLINK_NO_ENOBUFS)
        self.nl.setopt(NETLINK_EXT_ACK)  # error answers carry a text
        self.nl.setopt(NETLINK_CAP_ACK)  # ...but not a copy of the request
        self.blocking = blocking

    @property
    def enobufs(self) -> int:
        """ENOBUFS reported by recv (only if NETLINK_NO_ENOBUFS could not be set)."""
        return self.nl.enobufs

    # --- config ---

    def fileno(self) -> int:
        return self.sock.fileno()

    def bind(self) -> None:
        """Own the queue and set copy mode/range, maxlen and flags (each acked)."""
        self.request(build_bind(self.queue_num, self._next_seq()), "bind")
        self.bound = True
        try:
            self.request(build_config(
                self.queue_num, copy_mode=NFQNL_COPY_PACKET, copy_range=self.copy_range,
                maxlen=self.maxlen, flags=self.flags,
                mask=NFQA_CFG_F_FAIL_OPEN | NFQA_CFG_F_GSO | NFQA_CFG_F_CONNTRACK,
                seq=self._next_seq()), "configure")
        except NfQueueError:
            try:
                self.unbind()
            except NfQueueError:
                pass  # the configure error is the one to report
            raise

    def unbind(self) -> None:
        """Give up the queue; packets still waiting in it are dropped by the kernel."""
        if not self.bound:
            return
        self.bound = False
        self.request(build_unbind(self.queue_num, self._next_seq()), "unbind")

    def close(self) -> None:
        """Unbind (best effort) and close the socket; the kernel also unbinds on close."""
        if self.sock.fileno() < 0:
            return
        try:
            self.unbind()
        except NfQueueError:
            pass
        finally:
            self.sock.close()

    def __enter__(self) -> NfQueue:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- packets ---

    def receive_batch(self, max_n: int = 64, timeout: Optional[float] = None) -> List[QueuedPacket]:
        """Up to `max_n` queued packets, oldest first.

        Waits up to `timeout` seconds for the first one (None: a blocking
        socket waits, a non-blocking one does not), then takes only what is
        already there.
        """
        out: List[QueuedPacket] = []
        pending = self._pending
        while pending and len(out) < max_n:
            out.append(pending.popleft())
        if len(out) >= max_n:
            return out
        if not out:
            if timeout is not None:
                if timeout > 0 and not self.nl.wait(timeout):
                    return out
            elif self.blocking:
                self.nl.wait(None)
        for _ in range(max_n + 64):  # + room for error answers mixed in
            n = self.nl.recv_into()
            if not n:
                break
            for item in self._parse(n):
                if item.__class__ is QueuedPacket:
                    if len(out) < max_n:
                        out.append(item)  # type: ignore[arg-type]
                    else:
                        pending.append(item)  # type: ignore[arg-type]
                else:
                    self._note_async(item)  # type: ignore[arg-type]
            if len(out) >= max_n:
                break
        return out

    def verdict(self, packet_id: int, verdict: int, mark: Optional[int] = None,
                payload: Optional[bytes] = None, *, wait: bool = False) -> None:
        """Verdict for one packet, optionally setting its mark or replacing the packet.

        With `wait` the kernel's answer is awaited and an error raised.
        """
        msg = build_verdict(self.queue_num, packet_id, verdict, mark=mark, payload=payload,
                            seq=self._next_seq(), ack=wait)
        if wait:
            self.request(msg, "verdict")
        else:
            self._send(msg, "verdict")

    def verdicts(self, decided: Sequence[Tuple[int, int]]) -> None:
        """(packet id, verdict) pairs as one datagram of verdict messages: the kernel
        applies them in order, in one system call (errors come back as for `verdict`)."""
        if decided:
            self._send(b"".join(build_verdict(self.queue_num, packet_id, verdict,
                                              seq=self._next_seq())
                                for packet_id, verdict in decided), "verdicts")

    def verdict_batch(self, last_id: int, verdict: int, mark: Optional[int] = None, *,
                      wait: bool = False) -> None:
        """The same verdict (and mark) for every waiting packet with id <= `last_id`."""
        msg = build_verdict_batch(self.queue_num, last_id, verdict, mark=mark,
                                  seq=self._next_seq(), ack=wait)
        if wait:
            self.request(msg, "batch verdict")
        else:
            self._send(msg, "batch verdict")

    def stats(self) -> Dict[str, object]:
        """Counters of this reader (see the module docstring)."""
        return {"received": self.received, "pending": len(self._pending),
                "enobufs": self.enobufs, "decode_errors": self.decode_errors,
                "verdict_errors": dict(self.verdict_errors)}

    def kernel_stats(self) -> Optional[Dict[str, int]]:
        """This queue's row of /proc/net/netfilter/nfnetlink_queue, or None if not found.

        /proc shows the calling thread's network namespace, so call it from a
        thread in the namespace the socket was created in.
        """
        try:
            with open(_PROC_STATS) as f:
                lines = f.read().splitlines()
        except OSError:
            return None
        for line in lines:
            cols = line.split()
            if len(cols) < 8 or not all(c.lstrip("-").isdigit() for c in cols[:8]):
                continue
            if int(cols[0]) == self.queue_num and int(cols[1]) == self.portid:
                return {"queue_total": int(cols[2]), "copy_mode": int(cols[3]),
                        "copy_range": int(cols[4]), "queue_dropped": int(cols[5]),
                        "user_dropped": int(cols[6]), "id_sequence": int(cols[7])}
        return None

    # --- internals ---

    def next_seq(self) -> int:
        """A fresh nlmsg_seq for a message built by the caller (see :meth:`request`)."""
        return self.nl.next_seq()

    _next_seq = next_seq

    def _send(self, msg: bytes, op: str) -> None:
        self.nl.send(msg, op)

    def _parse(self, n: int) -> list:
        try:
            items = parse_messages(self.nl.buf, n)
        except NfQueueDecodeError as exc:
            self.decode_errors += 1
            self.last_error = exc
            return []
        self.received += sum(1 for i in items if i.__class__ is QueuedPacket)
        return items

    def _note_async(self, ack: NetlinkAck) -> None:
        if ack.error:
            exc = ack.exception()
            self.verdict_errors[exc.errno_name] = self.verdict_errors.get(exc.errno_name, 0) + 1
            self.last_error = exc

    def _other(self, buf: Any, mtype: int, flags: int, seq: int, body: int, end: int) -> None:
        """A message that arrived while a request waited for its ack."""
        try:
            item = parse_message(buf, mtype, flags, seq, body, end)
        except NfQueueDecodeError as exc:
            self.decode_errors += 1
            self.last_error = exc
            return
        if item.__class__ is QueuedPacket:
            self.received += 1
            self._pending.append(item)  # type: ignore[arg-type]
        elif item is not None:
            self._note_async(item)  # type: ignore[arg-type]

    def request(self, msg: bytes, op: str) -> None:
        """Send a message built with NLM_F_ACK and wait for its answer; raise on error.

        Packets arriving meanwhile are kept for :meth:`receive_batch`; error
        answers to earlier fire-and-forget verdicts are counted.
        """
        _request(self.nl, msg, f"{op} of queue {self.queue_num}", self.timeout, self._other)


def _request(nl: NetlinkSocket, msg: bytes, op: str, timeout: float,
             other: Optional[Callable[..., None]] = None, seq: Optional[int] = None,
             hints: Optional[Dict[str, str]] = None) -> None:
    """Send `msg`, then read until the answer to `seq` (default: msg's own seq) arrives."""
    if seq is None:
        seq = int.from_bytes(msg[8:12], sys.byteorder)  # nlmsghdr.nlmsg_seq, host order
    nl.send(msg, op)
    reply = nl.acks((seq,), timeout, op, other)[seq]
    if reply.error:
        raise NetlinkAck(seq, reply.error, reply.request_type, reply.message).exception(
            op, hints)


def _netlink_socket(netns: Optional[str]) -> socket.socket:
    def create() -> socket.socket:
        return socket.socket(_AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)

    try:
        return create() if netns is None else call_in_netns(netns, create)
    except OSError as exc:
        raise error_from_errno(exc.errno or 0, "socket") from exc


def add_queue_rule(family: int, table: str, chain: str, queue_num: int, *,
                   bypass: bool = False, queues_total: int = 1, cpu_fanout: bool = False,
                   netns: Optional[str] = None, timeout: float = 2.0) -> None:
    """Append an ``xt NFQUEUE`` rule to an existing nftables chain (see build_nft_queue_rule).

    `family` is an NFPROTO_* value (inet, ip, ip6) matching the table's.
    """
    msg = build_nft_queue_rule(family, table, chain, queue_num, queues_total=queues_total,
                               bypass=bypass, cpu_fanout=cpu_fanout, seq=1)

    def error(err: int, op: str, detail: str = "") -> NfQueueError:
        return error_from_errno(err, op, detail, NFT_RULE_HINTS)

    nl = NetlinkSocket(_netlink_socket(netns), error=error)
    try:
        _request(nl, msg, f"add NFQUEUE rule to {table}/{chain}", timeout, seq=2,
                 hints=NFT_RULE_HINTS)
    finally:
        nl.close()


_setns_lib: Any = None


def _setns(fd: int, nstype: int) -> None:
    global _setns_lib
    if hasattr(os, "setns"):
        os.setns(fd, nstype)
        return
    if _setns_lib is None:
        import cffi  # PyPy ships it; a dependency of lrk on CPython

        ffi = cffi.FFI()
        ffi.cdef("int setns(int fd, int nstype);")
        _setns_lib = (ffi, ffi.dlopen(None))
    ffi, lib = _setns_lib
    if lib.setns(fd, nstype) != 0:
        err = ffi.errno
        raise OSError(err, f"setns: {os.strerror(err)}")


def call_in_netns(netns: str, fn: Callable[[], T], timeout: float = 10.0) -> T:
    """fn() on a new thread inside network namespace `netns` (a name under /run/netns or a path).

    Sockets fn creates stay in that namespace; the calling thread's is untouched.
    """
    path = netns if "/" in netns else f"/run/netns/{netns}"
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    except OSError as exc:
        raise NfQueueError(f"network namespace {netns!r}: {exc.strerror} ({path}); create it "
                           "with `ip netns add`", exc.errno or 0, "setns") from exc
    box: Dict[str, Any] = {}

    def run() -> None:
        try:
            _setns(fd, CLONE_NEWNET)
            box["value"] = fn()
        except BaseException as exc:  # handed to the caller
            box["error"] = exc

    try:
        thread = threading.Thread(target=run, name=f"netns-{netns}", daemon=True)
        thread.start()
        thread.join(timeout)
    finally:
        os.close(fd)
    if thread.is_alive():
        raise error_from_errno(errno.ETIMEDOUT, f"call in netns {netns}",
                               f"still running after {timeout} s")
    if "error" in box:
        exc = box["error"]
        if isinstance(exc, OSError) and not isinstance(exc, NfQueueError):
            raise error_from_errno(exc.errno or 0, f"call in netns {netns}", str(exc)) from exc
        raise exc
    return box["value"]
