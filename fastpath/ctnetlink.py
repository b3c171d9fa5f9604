"""Conntrack over netlink: flush the flows of a session by their mark.

Kernel mode marks every admitted flow with the relay port it arrived on; when a
session ends, its flows must go too, or conntrack would keep NATing its media until
the flow times out. One netlink request per mark, no `conntrack` process spawned.
The message builder is pure; `ConntrackSocket` is the thin shell.
"""

from __future__ import annotations

import errno
import os
import socket
import struct
from typing import Iterable, List, Optional

from lrk.errors import LrkError

NETLINK_NETFILTER = 12
NFNL_SUBSYS_CTNETLINK = 1
IPCTNL_MSG_CT_DELETE = 2
NLM_F_REQUEST = 0x1
NLM_F_ACK = 0x4
NLMSG_ERROR = 2
CTA_MARK = 8
CTA_MARK_MASK = 21

_NLMSGHDR = struct.Struct("=IHHII")  # len, type, flags, seq, pid (host order)
_NFGENMSG = struct.Struct("!BBH")  # family, version, res_id (big-endian)
_NLATTR = struct.Struct("=HH")


class ConntrackError(LrkError):
    """The kernel refused a conntrack request."""


def _attr(kind: int, payload: bytes) -> bytes:
    data = _NLATTR.pack(4 + len(payload), kind) + payload
    return data + b"\0" * (-len(data) % 4)


def flush_by_mark(mark: int, seq: int, family: int = socket.AF_UNSPEC,
                  mask: int = 0xFFFFFFFF) -> bytes:
    """IPCTNL_MSG_CT_DELETE without a tuple: the kernel flushes every flow matching the mark."""
    body = _NFGENMSG.pack(family, 0, 0)
    body += _attr(CTA_MARK, struct.pack("!I", mark & 0xFFFFFFFF))
    body += _attr(CTA_MARK_MASK, struct.pack("!I", mask & 0xFFFFFFFF))
    kind = (NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_DELETE
    return _NLMSGHDR.pack(_NLMSGHDR.size + len(body), kind, NLM_F_REQUEST | NLM_F_ACK,
                          seq, 0) + body


def parse_acks(data: bytes) -> List[tuple]:
    """[(seq, errno)] from a buffer of netlink replies; errno 0 is success."""
    out = []
    off = 0
    while off + _NLMSGHDR.size <= len(data):
        length, kind, _flags, seq, _pid = _NLMSGHDR.unpack_from(data, off)
        if length < _NLMSGHDR.size or off + length > len(data):
            break
        if kind == NLMSG_ERROR and length >= _NLMSGHDR.size + 4:
            (code,) = struct.unpack_from("=i", data, off + _NLMSGHDR.size)
            out.append((seq, -code))
        off += (length + 3) & ~3
    return out


class ConntrackSocket:
    """A ctnetlink socket in the calling thread's network namespace."""

    def __init__(self, sock: Optional[socket.socket] = None) -> None:
        self.sock = sock or socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
        self.sock.bind((0, 0))
        self.sock.settimeout(2.0)
        self._seq = 0

    def flush_marks(self, marks: Iterable[int], window: int = 256) -> int:
        """Flush the flows of every mark; returns how many requests the kernel acknowledged.

        At most `window` requests are in flight, so the acks never overrun the socket."""
        marks = list(marks)
        done = 0
        for i in range(0, len(marks), window):
            done += self._flush_window(marks[i:i + window])
        return done

    def _flush_window(self, marks: List[int]) -> int:
        pending = {}
        for mark in marks:
            self._seq += 1
            pending[self._seq] = mark
            self.sock.send(flush_by_mark(mark, self._seq))
        found = 0
        while pending:
            try:
                data = self.sock.recv(65536)
            except socket.timeout:
                raise ConntrackError(f"no answer from conntrack for marks "
                                     f"{sorted(pending.values())[:10]}") from None
            for seq, code in parse_acks(data):
                if pending.pop(seq, None) is None:
                    continue
                if code == 0:
                    found += 1
                elif code != errno.ENOENT:
                    raise ConntrackError(f"conntrack flush failed: {os.strerror(code)}"
                                         + (" (needs CAP_NET_ADMIN)" if code == errno.EPERM
                                            else ""))
        return found

    def close(self) -> None:
        self.sock.close()
