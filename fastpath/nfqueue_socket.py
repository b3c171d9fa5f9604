"""NFQUEUE reader: a thin socket shell around the :mod:`fastpath.nfqueue` codec.

One ``AF_NETLINK``/``NETLINK_NETFILTER`` socket per queue; pure Python, so it
runs on PyPy as well as CPython.  Needs CAP_NET_ADMIN in the network namespace
the socket is created in: a netlink socket serves the namespace of the thread
that created it, for its whole life.  To serve another namespace, create the
:class:`NfQueue` on a thread that first called ``setns(fd, CLONE_NEWNET)``
(the tests do this with cffi; ``os.setns`` needs Python 3.12) or run the
process under ``ip netns exec``; the object may then be used from any thread.

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
import select
import socket
import sys
import time
from typing import Deque, Dict, List, Optional

from fastpath.nfqueue import (
    NETLINK_CAP_ACK,
    NETLINK_EXT_ACK,
    NETLINK_NETFILTER,
    NETLINK_NO_ENOBUFS,
    NFQA_CFG_F_CONNTRACK,
    NFQA_CFG_F_FAIL_OPEN,
    NFQA_CFG_F_GSO,
    NFQNL_COPY_PACKET,
    NFQNL_MAX_COPY_RANGE,
    SOL_NETLINK,
    NetlinkAck,
    NfQueueArgumentError,
    NfQueueDecodeError,
    NfQueueError,
    QueuedPacket,
    build_bind,
    build_config,
    build_unbind,
    build_verdict,
    build_verdict_batch,
    error_from_errno,
    parse_messages,
)

__all__ = ["NfQueue", "NfQueueError"]

_SO_RCVBUFFORCE = int(getattr(socket, "SO_RCVBUFFORCE", 33))
_MSG_DONTWAIT = int(getattr(socket, "MSG_DONTWAIT", 0x40))
_AF_NETLINK = int(getattr(socket, "AF_NETLINK", 16))
_EAGAIN = (errno.EAGAIN, errno.EWOULDBLOCK)
#: room for the netlink/nfqueue headers and metadata attributes around a payload
_HEADROOM = 4096
#: receive calls per ack wait; bounds the loop even if the kernel keeps sending packets
_MAX_ACK_RECVS = 100_000
_PROC_STATS = "/proc/thread-self/net/netfilter/nfnetlink_queue"


class NfQueue:
    """One bound nfnetlink queue: receive queued packets, send verdicts.

    Not thread-safe: one reader per instance.  ``fileno()`` suits an event
    loop or poll; :meth:`receive_batch` drains up to `max_n` packets per call.
    """

    def __init__(self, queue_num: int, copy_range: int = 256, maxlen: int = 4096,
                 fail_open: bool = False, *, gso: bool = True, conntrack: bool = False,
                 blocking: bool = False, rcvbuf: int = 8 << 20, timeout: float = 2.0) -> None:
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
        #: ENOBUFS reported by recv (only if NETLINK_NO_ENOBUFS could not be set)
        self.enobufs = 0
        #: unreadable buffers skipped
        self.decode_errors = 0
        #: errno name -> count of kernel error answers to fire-and-forget verdicts
        self.verdict_errors: Dict[str, int] = {}
        self.last_error: Optional[NfQueueError] = None
        self._seq = 0
        self._pending: Deque[QueuedPacket] = collections.deque()
        self._buf = bytearray(copy_range + _HEADROOM)
        try:
            sock = socket.socket(_AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
        except OSError as exc:
            raise error_from_errno(exc.errno or 0, "socket") from exc
        self.sock = sock
        try:
            try:
                sock.setsockopt(socket.SOL_SOCKET, _SO_RCVBUFFORCE, rcvbuf)
            except OSError:  # no CAP_NET_ADMIN: capped by net.core.rmem_max
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
            self.no_enobufs = _try_setsockopt(sock, NETLINK_NO_ENOBUFS)
            _try_setsockopt(sock, NETLINK_EXT_ACK)  # error answers carry a text
            _try_setsockopt(sock, NETLINK_CAP_ACK)  # ...but not a copy of the request
            sock.bind((0, 0))
            self.portid: int = sock.getsockname()[0]
            sock.setblocking(blocking)
        except OSError as exc:
            sock.close()
            raise error_from_errno(exc.errno or 0, "socket setup") from exc
        self.blocking = blocking

    # --- config ---

    def fileno(self) -> int:
        return self.sock.fileno()

    def bind(self) -> None:
        """Own the queue and set copy mode/range, maxlen and flags (each acked)."""
        self._request(build_bind(self.queue_num, self._next_seq()), "bind")
        self.bound = True
        try:
            self._request(build_config(
                self.queue_num, copy_mode=NFQNL_COPY_PACKET, copy_range=self.copy_range,
                maxlen=self.maxlen, flags=self.flags,
                mask=NFQA_CFG_F_FAIL_OPEN | NFQA_CFG_F_GSO | NFQA_CFG_F_CONNTRACK,
                seq=self._next_seq()), "configure")
        except NfQueueError:
            self.unbind()
            raise

    def unbind(self) -> None:
        """Give up the queue; packets still waiting in it are dropped by the kernel."""
        if not self.bound:
            return
        self.bound = False
        self._request(build_unbind(self.queue_num, self._next_seq()), "unbind")

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
        flags = _MSG_DONTWAIT
        if not out:
            if timeout is not None:
                if timeout > 0 and not _wait_readable(self.sock, timeout):
                    return out
            elif self.blocking:
                flags = 0
        for _ in range(max_n + 64):  # + room for error answers mixed in
            n = self._recv(flags)
            if n is None:
                break
            flags = _MSG_DONTWAIT
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
            self._request(msg, "verdict")
        else:
            self._send(msg, "verdict")

    def verdict_batch(self, last_id: int, verdict: int, mark: Optional[int] = None, *,
                      wait: bool = False) -> None:
        """The same verdict (and mark) for every waiting packet with id <= `last_id`."""
        msg = build_verdict_batch(self.queue_num, last_id, verdict, mark=mark,
                                  seq=self._next_seq(), ack=wait)
        if wait:
            self._request(msg, "batch verdict")
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

    def _next_seq(self) -> int:
        self._seq = (self._seq + 1) & 0xFFFFFFFF
        return self._seq

    def _send(self, msg: bytes, op: str) -> None:
        try:
            self.sock.sendto(msg, (0, 0))
        except OSError as exc:
            raise error_from_errno(exc.errno or 0, op) from exc

    def _recv(self, flags: int) -> Optional[int]:
        """Bytes of one datagram read into the buffer, None when there is none."""
        for _ in range(8):
            try:
                return self.sock.recv_into(self._buf, 0, flags)
            except OSError as exc:
                if exc.errno in _EAGAIN or isinstance(exc, socket.timeout):
                    return None
                if exc.errno == errno.ENOBUFS:  # packets were lost; the socket still works
                    self.enobufs += 1
                    continue
                raise error_from_errno(exc.errno or 0, "receive") from exc
        return None

    def _parse(self, n: int) -> list:
        try:
            items = parse_messages(self._buf, n)
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

    def _request(self, msg: bytes, op: str) -> None:
        """Send an acked message and wait for its answer; packets meanwhile are kept."""
        seq = _request_seq(msg)
        self._send(msg, op)
        deadline = time.monotonic() + self.timeout
        for _ in range(_MAX_ACK_RECVS):
            left = deadline - time.monotonic()
            if left <= 0 or not _wait_readable(self.sock, left):
                break
            n = self._recv(_MSG_DONTWAIT)
            if n is None:
                continue
            for item in self._parse(n):
                if item.__class__ is QueuedPacket:
                    self._pending.append(item)  # type: ignore[arg-type]
                elif item.seq == seq:  # type: ignore[union-attr]
                    if item.error:  # type: ignore[union-attr]
                        raise item.exception(f"{op} of queue {self.queue_num}")  # type: ignore
                    return
                else:
                    self._note_async(item)  # type: ignore[arg-type]
        raise error_from_errno(errno.ETIMEDOUT, f"{op} of queue {self.queue_num}",
                               f"no answer within {self.timeout} s")


def _request_seq(msg: bytes) -> int:
    """nlmsghdr.nlmsg_seq of a built message (host order)."""
    return int.from_bytes(msg[8:12], sys.byteorder)


def _try_setsockopt(sock: socket.socket, opt: int) -> bool:
    try:
        sock.setsockopt(SOL_NETLINK, opt, 1)
    except OSError:
        return False
    return True


def _wait_readable(sock: socket.socket, timeout: float) -> bool:
    poller = select.poll()
    poller.register(sock.fileno(), select.POLLIN)
    return bool(poller.poll(max(0, int(timeout * 1000 + 0.999))))
