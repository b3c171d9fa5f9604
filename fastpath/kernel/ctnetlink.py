"""Conntrack over netlink: flush the flows of a session by their mark, and list flows.

Kernel mode marks every admitted flow with the relay port it arrived on; when a
session ends, its flows must go too, or conntrack would keep NATing its media until
the flow times out. One netlink request per mark, no `conntrack` process spawned.
The same marks find a leg's flows in a dump: a flow's original source is the peer
address conntrack latched (a NATed caller's real port), which lrk reports like the
userspace modes do. With `nf_conntrack_acct` on, each flow also carries packet/byte
counters per direction and a CTA_ID (plus a start time with `nf_conntrack_timestamp`),
which kernel mode reads as its per-leg media counters (no per-packet counting rule).
Message builders and parsers are pure (sans-IO); `ConntrackSocket` is the thin shell.
"""

from __future__ import annotations

import errno
import os
import socket
import struct
import time
from typing import Iterable, List, NamedTuple, Optional, Tuple

from fastpath.errors import LrkError

NETLINK_NETFILTER = 12
NFNL_SUBSYS_CTNETLINK = 1
IPCTNL_MSG_CT_NEW = 0
IPCTNL_MSG_CT_GET = 1
IPCTNL_MSG_CT_DELETE = 2
NLM_F_REQUEST = 0x1
NLM_F_MULTI = 0x2
NLM_F_ACK = 0x4
NLM_F_DUMP = 0x300  # NLM_F_ROOT | NLM_F_MATCH
NLMSG_NOOP = 1
NLMSG_ERROR = 2
NLMSG_DONE = 3
NLA_F_NESTED = 0x8000
NLA_F_NET_BYTEORDER = 0x4000
NLA_TYPE_MASK = 0x3FFF
CTA_TUPLE_ORIG = 1
CTA_TUPLE_REPLY = 2
CTA_STATUS = 3
IPS_SEEN_REPLY = 0x2
CTA_MARK = 8
CTA_COUNTERS_ORIG = 9
CTA_COUNTERS_REPLY = 10
CTA_ID = 12
CTA_TIMESTAMP = 20
CTA_TIMESTAMP_START = 1  # be64 ns, with nf_conntrack_timestamp on at flow creation
CTA_COUNTERS_PACKETS = 1  # be64
CTA_COUNTERS_BYTES = 2  # be64
CTA_COUNTERS32_PACKETS = 3  # be32, kernels before 2.6.27
CTA_COUNTERS32_BYTES = 4
CTA_MARK_MASK = 21
CTA_TUPLE_IP = 1
CTA_TUPLE_PROTO = 2
CTA_IP_V4_SRC = 1
CTA_IP_V4_DST = 2
CTA_IP_V6_SRC = 3
CTA_IP_V6_DST = 4
CTA_PROTO_NUM = 1
CTA_PROTO_SRC_PORT = 2
CTA_PROTO_DST_PORT = 3

_NLMSGHDR = struct.Struct("=IHHII")  # len, type, flags, seq, pid (host order)
_NFGENMSG = struct.Struct("!BBH")  # family, version, res_id (big-endian)
_NLATTR = struct.Struct("=HH")


class ConntrackError(LrkError):
    """The kernel refused a conntrack request."""


class ConntrackParseError(ConntrackError):
    """A ctnetlink reply is truncated or garbled: the rest of that buffer cannot be trusted."""


class CtFlow(NamedTuple):
    """One conntrack entry as a dump shows it: its mark, original and reply tuples.

    The original source is whoever sent the flow's first packet: for a relay leg,
    the peer's real (post-NAT) address and port. Once `replied`, the reply source has
    sent too (from exactly that address: it matched the reply tuple). Counters are 0
    unless `nf_conntrack_acct` was on when the flow was created; `id` (CTA_ID) tells a
    flow from a later one, None if the kernel sent none; a flow re-created in the same
    slab object with the same tuples gets the same id, `start` (CTA_TIMESTAMP_START, ns,
    None without `nf_conntrack_timestamp`) tells those apart."""

    mark: int
    proto: int
    src: str
    sport: int
    dst: str
    dport: int
    replied: bool = False
    reply_src: Optional[str] = None
    reply_sport: int = 0
    reply_dst: Optional[str] = None
    reply_dport: int = 0
    orig_packets: int = 0
    orig_bytes: int = 0
    reply_packets: int = 0
    reply_bytes: int = 0
    id: Optional[int] = None
    start: Optional[int] = None


class DumpPart(NamedTuple):
    """What one buffer of dump replies held: flows, whether NLMSG_DONE came, skipped entries."""

    flows: List[CtFlow]
    done: bool
    skipped: int


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


def dump_request(seq: int, family: int = socket.AF_UNSPEC, mark: Optional[int] = None,
                 mask: int = 0xFFFFFFFF) -> bytes:
    """IPCTNL_MSG_CT_GET with NLM_F_DUMP: every flow, or (with `mark`) those whose
    ct mark & mask == mark; the kernel filters, so only lrk's flows cross netlink."""
    body = _NFGENMSG.pack(family, 0, 0)
    if mark is not None:
        body += _attr(CTA_MARK, struct.pack("!I", mark & 0xFFFFFFFF))
        body += _attr(CTA_MARK_MASK, struct.pack("!I", mask & 0xFFFFFFFF))
    kind = (NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_GET
    return _NLMSGHDR.pack(_NLMSGHDR.size + len(body), kind, NLM_F_REQUEST | NLM_F_DUMP,
                          seq, 0) + body


def mark_filters(lo: int, hi: int, max_filters: int = 4) -> List[Tuple[int, int]]:
    """(mark, mask) pairs whose union covers marks lo..hi and never matches mark 0.

    Each pair is an aligned block (a common bit prefix), so it may cover a few marks
    beyond the range; callers still check every mark. A block that would contain 0
    (the mark of every flow lrk did not admit) is split at its highest differing bit.
    Returns [] when `max_filters` blocks cannot avoid 0: dump unfiltered then."""
    if not 1 <= lo <= hi <= 0xFFFFFFFF:
        raise ConntrackError(f"mark range {lo}-{hi} must be within 1..{0xFFFFFFFF}")
    todo = [(lo, hi)]
    out: List[Tuple[int, int]] = []
    while todo:
        a, b = todo.pop()
        mask = ~((1 << (a ^ b).bit_length()) - 1) & 0xFFFFFFFF
        if a & mask:
            out.append((a & mask, mask))
            continue
        top = 1 << ((a ^ b).bit_length() - 1)  # a < top <= b: split there
        todo += [(a, top - 1), (top, b)]
        if len(out) + len(todo) > max_filters:
            return []
    return sorted(out)


def _attrs(data: bytes, off: int, end: int):
    """(type without flags, payload start, payload end) of each attribute in data[off:end]."""
    while off + 4 <= end:
        length, kind = _NLATTR.unpack_from(data, off)
        if length < 4 or off + length > end:
            raise ConntrackParseError(f"attribute of length {length} at byte {off} runs past "
                                      f"its container (ends at {end})")
        yield kind & NLA_TYPE_MASK, off + 4, off + length
        off += (length + 3) & ~3


def _tuple(data: bytes, off: int, end: int) -> Optional[Tuple[int, str, int, str, int]]:
    """(proto, src, sport, dst, dport) of a CTA_TUPLE_* nest, None if a part is missing."""
    src = dst = None
    proto = sport = dport = None
    for kind, a, b in _attrs(data, off, end):
        if kind == CTA_TUPLE_IP:
            for ikind, ia, ib in _attrs(data, a, b):
                size = ib - ia
                if ikind in (CTA_IP_V4_SRC, CTA_IP_V4_DST) and size == 4 or \
                        ikind in (CTA_IP_V6_SRC, CTA_IP_V6_DST) and size == 16:
                    # inet_ntop: 10x faster than ipaddress, same RFC 5952 text for IPv6
                    text = socket.inet_ntop(socket.AF_INET if size == 4 else socket.AF_INET6,
                                            data[ia:ib])
                    if ikind in (CTA_IP_V4_SRC, CTA_IP_V6_SRC):
                        src = text
                    else:
                        dst = text
        elif kind == CTA_TUPLE_PROTO:
            for pkind, pa, pb in _attrs(data, a, b):
                if pkind == CTA_PROTO_NUM and pb - pa >= 1:
                    proto = data[pa]
                elif pkind == CTA_PROTO_SRC_PORT and pb - pa >= 2:
                    sport = (data[pa] << 8) | data[pa + 1]
                elif pkind == CTA_PROTO_DST_PORT and pb - pa >= 2:
                    dport = (data[pa] << 8) | data[pa + 1]
    if src is None or dst is None or proto is None or sport is None or dport is None:
        return None
    return proto, src, sport, dst, dport


def _counters(data: bytes, off: int, end: int) -> Tuple[int, int]:
    """(packets, bytes) of a CTA_COUNTERS_* nest (64-bit, or the old 32-bit attributes)."""
    packets = nbytes = 0
    for kind, a, b in _attrs(data, off, end):
        size = b - a
        if size == 8 and kind in (CTA_COUNTERS_PACKETS, CTA_COUNTERS_BYTES):
            value = struct.unpack_from("!Q", data, a)[0]
        elif size == 4 and kind in (CTA_COUNTERS32_PACKETS, CTA_COUNTERS32_BYTES):
            value = struct.unpack_from("!I", data, a)[0]
        else:
            continue
        if kind in (CTA_COUNTERS_PACKETS, CTA_COUNTERS32_PACKETS):
            packets = value
        else:
            nbytes = value
    return packets, nbytes


def parse_dump(data: bytes, seq: Optional[int] = None) -> DumpPart:
    """The flows in one buffer of IPCTNL_MSG_CT_NEW dump replies (a dump spans many).

    A flow without a mark or complete original tuple (ICMP has no ports) is skipped
    and counted; so is a message whose attributes are garbled. Replies to another
    `seq` are ignored. A message header that runs past the buffer, or an error
    reply, raises: the dump cannot be continued reliably after either."""
    flows: List[CtFlow] = []
    done = False
    skipped = 0
    off = 0
    size = len(data)
    while off < size:
        if off + _NLMSGHDR.size > size:
            raise ConntrackParseError(f"{size - off} stray bytes after the last netlink message")
        length, kind, _flags, mseq, _pid = _NLMSGHDR.unpack_from(data, off)
        if length < _NLMSGHDR.size or off + length > size:
            raise ConntrackParseError(f"netlink message of length {length} at byte {off} does "
                                      f"not fit the {size}-byte buffer (truncated read?)")
        end = off + length
        body = off + _NLMSGHDR.size
        if seq is not None and mseq != seq:
            pass
        elif kind == NLMSG_DONE:
            done = True
        elif kind == NLMSG_ERROR:
            code = struct.unpack_from("=i", data, body)[0] if end - body >= 4 else -errno.EIO
            if code:
                raise ConntrackError(f"conntrack dump failed: {os.strerror(-code)}"
                                     + (" (needs CAP_NET_ADMIN)" if -code == errno.EPERM
                                        else ""))
        elif kind == (NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_NEW:
            flow = None
            try:
                mark = orig = reply = ct_id = start = None
                status = 0
                counts_o = counts_r = (0, 0)
                for akind, a, b in _attrs(data, body + _NFGENMSG.size, end):
                    if akind == CTA_MARK and b - a == 4:
                        mark = struct.unpack_from("!I", data, a)[0]
                    elif akind == CTA_STATUS and b - a == 4:
                        status = struct.unpack_from("!I", data, a)[0]
                    elif akind == CTA_TUPLE_ORIG:
                        orig = _tuple(data, a, b)
                    elif akind == CTA_TUPLE_REPLY:
                        reply = _tuple(data, a, b)
                    elif akind == CTA_COUNTERS_ORIG:
                        counts_o = _counters(data, a, b)
                    elif akind == CTA_COUNTERS_REPLY:
                        counts_r = _counters(data, a, b)
                    elif akind == CTA_ID and b - a == 4:
                        ct_id = struct.unpack_from("!I", data, a)[0]
                    elif akind == CTA_TIMESTAMP:
                        for tkind, ta, tb in _attrs(data, a, b):
                            if tkind == CTA_TIMESTAMP_START and tb - ta == 8:
                                start = struct.unpack_from("!Q", data, ta)[0]
                if mark is not None and orig is not None:
                    flow = CtFlow(mark, *orig, bool(status & IPS_SEEN_REPLY),
                                  *(reply[1:] if reply else (None, 0, None, 0)),
                                  *counts_o, *counts_r, ct_id, start)
            except (ConntrackParseError, ValueError, OSError):
                flow = None  # this entry only: the message boundary is still sound
            if flow is None:
                skipped += 1
            else:
                flows.append(flow)
        off += (length + 3) & ~3
    return DumpPart(flows, done, skipped)


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

    def flows(self, filters: Iterable[Tuple[int, int]] = (), family: int = socket.AF_UNSPEC,
              timeout: float = 2.0, max_flows: int = 1_000_000) -> List[CtFlow]:
        """Every flow matching one of the (mark, mask) `filters` (all flows if none).

        One kernel dump per filter; bounded by `timeout` (whole call) and `max_flows`.
        Raises ConntrackError on either bound or a kernel error; the socket is then
        mid-dump and must be closed (a dump cannot be abandoned halfway)."""
        deadline = time.monotonic() + timeout
        out: List[CtFlow] = []
        for mark, mask in list(filters) or [(None, 0xFFFFFFFF)]:
            self._seq += 1
            seq = self._seq
            self.sock.send(dump_request(seq, family, mark, mask))
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise ConntrackError(f"conntrack dump took longer than {timeout}s "
                                         f"({len(out)} flows so far); raise the timeout")
                self.sock.settimeout(left)
                try:
                    data = self.sock.recv(65536)
                except socket.timeout:
                    raise ConntrackError(f"conntrack dump unanswered within {timeout}s") from None
                part = parse_dump(data, seq)
                out += part.flows
                if len(out) > max_flows:
                    raise ConntrackError(f"conntrack dump holds more than {max_flows} lrk "
                                         "flows; raise max_flows")
                if part.done:
                    break
        self.sock.settimeout(2.0)
        return out

    def close(self) -> None:
        self.sock.close()
