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
from fastpath.kernel import netlink
from fastpath.kernel.netlink import (
    NFGENMSG,
    NLM_F_ACK,
    NLM_F_DUMP,
    NLM_F_REQUEST,
    NLMSG_ERROR,
    NetlinkDecodeError,
    NetlinkError,
    NetlinkRequestError,
    attr_be32,
    nfmessage,
)

__all__ = ["ConntrackError", "ConntrackParseError", "ConntrackSocket", "CtFlow", "DumpPart",
           "dump_request", "flush_by_mark", "mark_filters", "parse_acks", "parse_dump",
           "udp_last_packet"]

NFNL_SUBSYS_CTNETLINK = 1
IPCTNL_MSG_CT_NEW = 0
IPCTNL_MSG_CT_GET = 1
IPCTNL_MSG_CT_DELETE = 2
CT_NEW = (NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_NEW
CT_GET = (NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_GET
CT_DELETE = (NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_DELETE
CTA_TUPLE_ORIG = 1
CTA_TUPLE_REPLY = 2
CTA_STATUS = 3
IPS_SEEN_REPLY = 0x2
IPS_ASSURED = 0x4
CTA_TIMEOUT = 7  # be32, whole seconds left before the flow expires (rounded down)
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

_BE32 = struct.Struct("!I").unpack_from
_BE64 = struct.Struct("!Q").unpack_from
_attrs = netlink.attrs


class ConntrackError(LrkError):
    """The kernel refused a conntrack request."""


class ConntrackParseError(ConntrackError):
    """A ctnetlink reply is truncated or garbled: the rest of that buffer cannot be trusted."""


def _hint(err: int) -> str:
    return " (needs CAP_NET_ADMIN)" if err == errno.EPERM else ""


def _io_error(err: int, op: str, detail: str = "") -> ConntrackError:
    """What the netlink socket raises: a ConntrackError naming the operation."""
    return ConntrackError(f"conntrack {op}: {detail or os.strerror(err)}{_hint(err)}")


def _typed(exc: NetlinkError, op: str) -> ConntrackError:
    """The conntrack error for what the netlink codec raised during `op`."""
    if isinstance(exc, NetlinkRequestError):
        return ConntrackError(f"conntrack {op} failed: {os.strerror(exc.errno)}"
                              f"{_hint(exc.errno)}")
    if isinstance(exc, NetlinkDecodeError):
        return ConntrackParseError(f"conntrack {op}: {exc}")
    return ConntrackError(f"conntrack {op}: {exc}")


class CtFlow(NamedTuple):
    """One conntrack entry as a dump shows it: its mark, original and reply tuples.

    The original source is whoever sent the flow's first packet: for a relay leg,
    the peer's real (post-NAT) address and port. Once `replied`, the reply source has
    sent too (from exactly that address: it matched the reply tuple). Counters are 0
    unless `nf_conntrack_acct` was on when the flow was created; `id` (CTA_ID) tells a
    flow from a later one, None if the kernel sent none; a flow re-created in the same
    slab object with the same tuples gets the same id, `start` (CTA_TIMESTAMP_START, ns,
    None without `nf_conntrack_timestamp`) tells those apart. `status` is CTA_STATUS
    (IPS_* bits), `timeout` CTA_TIMEOUT: whole seconds left before the flow expires,
    which every packet resets (`udp_last_packet`); None if the kernel sent none."""

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
    status: int = 0
    timeout: Optional[int] = None


def udp_last_packet(flow: CtFlow, now: float, udp_timeout: int, stream_timeout: int,
                    wall_ns: Optional[int] = None) -> Optional[float]:
    """When a UDP `flow` last carried a packet (either direction), on the clock of `now`,
    read right after the dump that listed it; None without a CTA_TIMEOUT.

    Every packet resets a UDP flow's timeout (nf_conntrack_proto_udp.c): to
    `udp_timeout` (net.netfilter.nf_conntrack_udp_timeout) while it is not IPS_ASSURED,
    to `stream_timeout` (nf_conntrack_udp_timeout_stream) once it is (a reply seen and
    the flow over 2 s old). CTA_TIMEOUT is the time left, rounded down to whole seconds,
    so the last packet came in [now - (setting - left), that + 1 s): this returns the
    upper end (never earlier than the packet: silence expiry never ends a call early on
    it), at most `now`. Two kernel variants are handled: one that marked a flow ASSURED
    at its first reply while still refreshing it to `udp_timeout` for its first 2 s
    (with `wall_ns`, time.time_ns() after the dump, and the flow's start time: a last
    packet that could lie in those 2 s reads the later way); a flow left more than its
    setting (a NAT clash entry refreshed to the stream timeout without ASSURED) reads
    as `stream_timeout`, or as active now if even that is exceeded (a timeout lrk
    cannot explain)."""
    left = flow.timeout
    if left is None:
        return None
    setting = udp_timeout
    if flow.status & IPS_ASSURED:
        setting = stream_timeout
        # the packet, read with the short setting, within ~2 s of the flow's start?
        if left < udp_timeout and wall_ns is not None and flow.start is not None \
                and stream_timeout - udp_timeout > 5 \
                and (wall_ns - flow.start) / 1e9 - (udp_timeout - left) <= 3.0:
            setting = udp_timeout
    if left > setting:
        if left > stream_timeout:
            return now
        setting = stream_timeout
    return min(now, now - (setting - left) + 1.0)


class DumpPart(NamedTuple):
    """What one buffer of dump replies held: flows, whether NLMSG_DONE came, skipped entries."""

    flows: List[CtFlow]
    done: bool
    skipped: int


def flush_by_mark(mark: int, seq: int, family: int = socket.AF_UNSPEC,
                  mask: int = 0xFFFFFFFF) -> bytes:
    """IPCTNL_MSG_CT_DELETE without a tuple: the kernel flushes every flow matching the mark."""
    return nfmessage(CT_DELETE, NLM_F_REQUEST | NLM_F_ACK, seq, family, 0,
                     attr_be32(CTA_MARK, mark) + attr_be32(CTA_MARK_MASK, mask))


def dump_request(seq: int, family: int = socket.AF_UNSPEC, mark: Optional[int] = None,
                 mask: int = 0xFFFFFFFF) -> bytes:
    """IPCTNL_MSG_CT_GET with NLM_F_DUMP: every flow, or (with `mark`) those whose
    ct mark & mask == mark; the kernel filters, so only lrk's flows cross netlink."""
    attributes = b""
    if mark is not None:
        attributes = attr_be32(CTA_MARK, mark) + attr_be32(CTA_MARK_MASK, mask)
    return nfmessage(CT_GET, NLM_F_REQUEST | NLM_F_DUMP, seq, family, 0, attributes)


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


_NLA = netlink.NLATTR.unpack_from
_make_flow = CtFlow._make
_NO_REPLY = (None, 0, None, 0)
_NFGEN = NFGENMSG.size
_TUPLES = (CTA_TUPLE_ORIG, CTA_TUPLE_REPLY)
_COUNTERS = (CTA_COUNTERS_ORIG, CTA_COUNTERS_REPLY)
_WIDE = (CTA_COUNTERS_PACKETS, CTA_COUNTERS_BYTES)
_NARROW = (CTA_COUNTERS32_PACKETS, CTA_COUNTERS32_BYTES)
_PACKETS = (CTA_COUNTERS_PACKETS, CTA_COUNTERS32_PACKETS)
_MISSING = object()


def _garbled(alen: int, off: int, end: int) -> NetlinkDecodeError:
    return NetlinkDecodeError(f"attribute of length {alen} at offset {off} runs past its "
                              f"container (ends at {end})")


def _flow(data: bytes, body: int, end: int, tuples: Optional[dict] = None,
          seen: Optional[dict] = None) -> Optional[CtFlow]:
    """The flow of one IPCTNL_MSG_CT_NEW (nfgenmsg at `body`), None if it lacks a mark or a
    complete original tuple. Raises NetlinkDecodeError for garbled attributes.

    The poll's hot loop (every lrk flow, every poll): the top-level attributes are walked
    inline (no generator), and with `tuples` (raw CTA_TUPLE_* payload -> its decoded
    tuple, from earlier dumps) a flow's two tuples, which never change, are decoded once
    per flow rather than once per poll; `seen` collects this dump's entries (the next
    dump's `tuples`, so flows that vanished leave the cache). Same result either way."""
    mark = orig = reply = ct_id = start = timeout = None
    status = 0
    op = ob = rp = rb = 0
    off = body + _NFGEN
    while off + 4 <= end:
        alen, kind = _NLA(data, off)
        nxt = off + alen
        if alen < 4 or nxt > end:
            raise _garbled(alen, off, end)
        kind &= 0x3FFF
        a = off + 4
        size = alen - 4
        if kind in _TUPLES:
            if tuples is None:
                tup = _tuple(data, a, nxt)
            else:
                raw = data[a:nxt]
                tup = tuples.get(raw, _MISSING)
                if tup is _MISSING:
                    tup = _tuple(data, a, nxt)
                if seen is not None:
                    seen[raw] = tup
            if kind == CTA_TUPLE_ORIG:
                orig = tup
            else:
                reply = tup
        elif kind == CTA_MARK:
            if size == 4:
                mark = _BE32(data, a)[0]
        elif kind == CTA_STATUS:
            if size == 4:
                status = _BE32(data, a)[0]
        elif kind == CTA_TIMEOUT:
            if size == 4:
                timeout = _BE32(data, a)[0]
        elif kind in _COUNTERS:
            packets = nbytes = 0
            coff = a
            while coff + 4 <= nxt:
                clen, ckind = _NLA(data, coff)
                if clen < 4 or coff + clen > nxt:
                    raise _garbled(clen, coff, nxt)
                ckind &= 0x3FFF
                if clen == 12 and ckind in _WIDE:
                    value = _BE64(data, coff + 4)[0]
                elif clen == 8 and ckind in _NARROW:
                    value = _BE32(data, coff + 4)[0]
                else:
                    coff += (clen + 3) & ~3
                    continue
                if ckind in _PACKETS:
                    packets = value
                else:
                    nbytes = value
                coff += (clen + 3) & ~3
            if kind == CTA_COUNTERS_ORIG:
                op, ob = packets, nbytes
            else:
                rp, rb = packets, nbytes
        elif kind == CTA_ID:
            if size == 4:
                ct_id = _BE32(data, a)[0]
        elif kind == CTA_TIMESTAMP:
            toff = a
            while toff + 4 <= nxt:
                tlen, tkind = _NLA(data, toff)
                if tlen < 4 or toff + tlen > nxt:
                    raise _garbled(tlen, toff, nxt)
                if tkind & 0x3FFF == CTA_TIMESTAMP_START and tlen == 12:
                    start = _BE64(data, toff + 4)[0]
                toff += (tlen + 3) & ~3
        off += (alen + 3) & ~3
    if mark is None or orig is None:
        return None
    return _make_flow((mark,) + orig + (bool(status & IPS_SEEN_REPLY),)
                      + (reply[1:] if reply else _NO_REPLY)
                      + (op, ob, rp, rb, ct_id, start, status, timeout))


def _take(flows: List[CtFlow], data: bytes, mtype: int, body: int, end: int,
          tuples: Optional[dict] = None, seen: Optional[dict] = None) -> int:
    """Append the flow of one dump message to `flows`; 1 if it had to be skipped."""
    if mtype != CT_NEW:
        return 0
    try:
        flow = _flow(data, body, end, tuples, seen)
    except (NetlinkDecodeError, ValueError, OSError):
        flow = None  # this entry only: the message boundary is still sound
    if flow is None:
        return 1
    flows.append(flow)
    return 0


def parse_dump(data: bytes, seq: Optional[int] = None) -> DumpPart:
    """The flows in one buffer of IPCTNL_MSG_CT_NEW dump replies (a dump spans many).

    A flow without a mark or complete original tuple (ICMP has no ports) is skipped
    and counted; so is a message whose attributes are garbled. Replies to another
    `seq` are ignored. A message header that runs past the buffer, or an error
    reply, raises: the dump cannot be continued reliably after either."""
    flows: List[CtFlow] = []
    skipped = 0
    state = netlink.Dump(seq)
    try:
        for mtype, body, end in state.feed(data):
            skipped += _take(flows, data, mtype, body, end)
    except NetlinkError as exc:
        raise _typed(exc, "dump") from None
    return DumpPart(flows, state.done, skipped)


def parse_acks(data: bytes) -> List[tuple]:
    """[(seq, errno)] from a buffer of netlink replies; errno 0 is success. Lenient: what
    follows a garbled message is ignored."""
    out = []
    try:
        for mtype, flags, seq, body, end in netlink.messages(data):
            if mtype == NLMSG_ERROR and end - body >= 4:
                out.append((seq, netlink.parse_error(data, body, end, flags).error))
    except NetlinkDecodeError:
        pass
    return out


class ConntrackSocket:
    """A ctnetlink socket in the calling thread's network namespace (or `sock`, made
    elsewhere)."""

    def __init__(self, sock: Optional[socket.socket] = None, timeout: float = 2.0) -> None:
        self.nl = netlink.NetlinkSocket(sock, error=_io_error)
        self.sock = self.nl.sock
        self.timeout = timeout
        #: raw CTA_TUPLE_* payload -> its decoded tuple, for the flows the last dump held
        self._tuples: dict = {}

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
            seq = self.nl.next_seq()
            pending[seq] = mark
            self.nl.send(flush_by_mark(mark, seq), "flush")
        found = 0
        for reply in self.nl.acks(pending, self.timeout, f"flush of marks "
                                  f"{sorted(pending.values())[:10]}").values():
            if reply.error == 0:
                found += 1
            elif reply.error != errno.ENOENT:
                raise ConntrackError(f"conntrack flush failed: {os.strerror(reply.error)}"
                                     f"{_hint(reply.error)}")
        return found

    def flows(self, filters: Iterable[Tuple[int, int]] = (), family: int = socket.AF_UNSPEC,
              timeout: float = 2.0, max_flows: int = 1_000_000) -> List[CtFlow]:
        """Every flow matching one of the (mark, mask) `filters` (all flows if none).

        One kernel dump per filter; bounded by `timeout` (whole call) and `max_flows`.
        Raises ConntrackError on either bound or a kernel error; the socket is then
        mid-dump and must be closed (a dump cannot be abandoned halfway)."""
        deadline = time.monotonic() + timeout
        out: List[CtFlow] = []
        tuples = self._tuples
        seen: dict = {}
        for mark, mask in list(filters) or [(None, 0xFFFFFFFF)]:
            seq = self.nl.next_seq()
            state = netlink.Dump(seq)
            left = max(0.0, deadline - time.monotonic())
            try:
                for data, mtype, body, end in self.nl.dump(
                        dump_request(seq, family, mark, mask), state, timeout=left,
                        op=f"dump (timeout {timeout} s, {len(out)} flows so far)"):
                    _take(out, data, mtype, body, end, tuples, seen)
                    if len(out) > max_flows:
                        raise ConntrackError(f"conntrack dump holds more than {max_flows} "
                                             "lrk flows; raise max_flows")
            except NetlinkError as exc:
                raise _typed(exc, "dump") from None
        self._tuples = seen  # the tuples of the flows this dump held
        return out

    def close(self) -> None:
        self.nl.close()
