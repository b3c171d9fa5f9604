"""ctnetlink dump requests and replies, built by hand: the parser must find each flow's mark
and original source, follow multi-part dumps to NLMSG_DONE, and never crash on garbage."""

from __future__ import annotations

import ipaddress
import socket
import struct

import pytest

from fastpath.kernel.ctnetlink import (
    CTA_MARK,
    CTA_MARK_MASK,
    ConntrackError,
    ConntrackParseError,
    CtFlow,
    dump_request,
    mark_filters,
    parse_dump,
    udp_last_packet,
)
from fastpath.kernel.netlink import NLA_F_NESTED

NEW = (1 << 8) | 0  # CTNETLINK << 8 | IPCTNL_MSG_CT_NEW
MULTI = 0x2


def attr(kind: int, payload: bytes, nested: bool = False) -> bytes:
    data = struct.pack("=HH", 4 + len(payload), kind | (NLA_F_NESTED if nested else 0))
    data += payload
    return data + b"\0" * (-len(data) % 4)


def tup(src: str, sport: int, dst: str, dport: int, proto: int = 17) -> bytes:
    v6 = ":" in src
    ips = attr(3 if v6 else 1, ipaddress.ip_address(src).packed) + \
        attr(4 if v6 else 2, ipaddress.ip_address(dst).packed)
    ports = attr(1, bytes([proto])) + attr(2, struct.pack("!H", sport)) + \
        attr(3, struct.pack("!H", dport))
    return attr(1, ips, nested=True) + attr(2, ports, nested=True)


def msg(kind: int, body: bytes, seq: int = 7, flags: int = MULTI) -> bytes:
    return struct.pack("=IHHII", 16 + len(body), kind, flags, seq, 0) + body


def flow(src: str, sport: int, dst: str, dport: int, mark: int, family: int = 2,
         nested: bool = True, status: int = 0x8) -> bytes:
    body = struct.pack("!BBH", family, 0, 0)
    body += attr(1, tup(src, sport, dst, dport), nested)  # CTA_TUPLE_ORIG
    body += attr(2, tup(dst, dport, "198.51.100.99" if family == 2 else "2001:db8::99",
                        5000), nested)  # CTA_TUPLE_REPLY: must not be taken for the source
    body += attr(3, struct.pack("!I", status))  # CTA_STATUS
    body += attr(CTA_MARK, struct.pack("!I", mark))
    return msg(NEW, body)


DONE = msg(3, struct.pack("=i", 0))


def test_dump_request_layout():
    req = dump_request(5, mark=30000, mask=0xFFFFFF00)
    length, kind, flags, seq, _pid = struct.unpack_from("=IHHII", req)
    assert (length, kind, flags, seq) == (len(req), 0x101, 0x301, 5)
    assert req[16] == socket.AF_UNSPEC
    assert req[20:28] == attr(CTA_MARK, struct.pack("!I", 30000))
    assert req[28:36] == attr(CTA_MARK_MASK, struct.pack("!I", 0xFFFFFF00))
    assert len(dump_request(5)) == 20  # unfiltered: no attributes


def test_ipv4_flows_several_per_buffer():
    data = flow("198.51.100.10", 4444, "198.51.100.1", 30000, 30000) + \
        flow("198.51.100.10", 4445, "198.51.100.1", 30001, 30001, nested=False) + DONE
    part = parse_dump(data, seq=7)
    assert [f[:6] for f in part.flows] == [
        (30000, 17, "198.51.100.10", 4444, "198.51.100.1", 30000),
        (30001, 17, "198.51.100.10", 4445, "198.51.100.1", 30001)]
    assert part.done and part.skipped == 0
    assert part.flows[0][6:11] == (False, "198.51.100.1", 30000, "198.51.100.99", 5000)


def test_ipv6_flow():
    data = flow("2001:db8::10", 6000, "2001:db8::1", 30002, 30002, family=10)
    part = parse_dump(data)
    assert part.flows == [CtFlow(30002, 17, "2001:db8::10", 6000, "2001:db8::1", 30002,
                                 False, "2001:db8::1", 30002, "2001:db8::99", 5000,
                                 status=0x8)]
    assert not part.done


def test_seen_reply_status_marks_the_flow_answered():
    data = flow("198.51.100.10", 4444, "198.51.100.1", 30000, 30000, status=0xA)
    assert parse_dump(data).flows[0].replied


def test_multipart_dump_until_done_and_other_seq_ignored():
    first = parse_dump(flow("198.51.100.10", 1, "198.51.100.1", 30000, 30000), seq=7)
    other = parse_dump(msg(3, b"\0" * 4, seq=99), seq=7)  # another request's DONE
    last = parse_dump(flow("198.51.100.11", 2, "198.51.100.1", 30000, 30000) + DONE, seq=7)
    assert (len(first.flows), first.done) == (1, False)
    assert (other.flows, other.done) == ([], False)
    assert (last.flows[0].src, last.done) == ("198.51.100.11", True)


def test_flow_without_mark_or_ports_is_skipped():
    no_mark = msg(NEW, struct.pack("!BBH", 2, 0, 0) +
                  attr(1, tup("198.51.100.10", 1, "198.51.100.1", 2), True))
    no_ports = msg(NEW, struct.pack("!BBH", 2, 0, 0) + attr(
        1, attr(1, attr(1, bytes(4)) + attr(2, bytes(4)), True), True) +
        attr(CTA_MARK, struct.pack("!I", 30000)))
    part = parse_dump(no_mark + no_ports + DONE)
    assert (part.flows, part.done, part.skipped) == ([], True, 2)


def test_garbled_attributes_skip_that_flow_only():
    good = flow("198.51.100.10", 4444, "198.51.100.1", 30000, 30000)
    bad = bytearray(flow("198.51.100.12", 1, "198.51.100.1", 30000, 30000))
    bad[20:22] = struct.pack("=H", 0xFFF0)  # first attribute claims more than its message
    part = parse_dump(bytes(bad) + good + DONE)
    assert [f.sport for f in part.flows] == [4444]
    assert part.skipped == 1 and part.done


@pytest.mark.parametrize("cut", [1, 10, 17, 40, -3])
def test_truncated_buffer_raises_typed_error(cut):
    data = flow("198.51.100.10", 4444, "198.51.100.1", 30000, 30000)
    with pytest.raises(ConntrackParseError):
        parse_dump(data[:cut])


def test_random_garbage_never_crashes():
    import random

    rng = random.Random(1)
    base = flow("2001:db8::10", 6000, "2001:db8::1", 30002, 30002, family=10) + DONE
    for _ in range(2000):
        data = bytearray(base)
        for _ in range(rng.randint(1, 6)):
            data[rng.randrange(len(data))] = rng.randrange(256)
        try:
            part = parse_dump(bytes(data[:rng.randint(0, len(data))]))
        except ConntrackError:
            continue
        assert all(isinstance(f, CtFlow) for f in part.flows)


def test_error_reply_raises():
    with pytest.raises(ConntrackError, match="not permitted|CAP_NET_ADMIN"):
        parse_dump(msg(2, struct.pack("=i", -1) + b"\0" * 16))


@pytest.mark.parametrize("lo,hi", [(30000, 30099), (30000, 40000), (1024, 65535), (5, 5),
                                   (1, 0xFFFFFFFE)])
def test_mark_filters_cover_the_range_and_never_mark_zero(lo, hi):
    filters = mark_filters(lo, hi)
    if not filters:
        assert lo < 4096  # only ranges reaching down near 0 fall back to an unfiltered dump
        return
    assert len(filters) <= 4
    assert not any((0 & mask) == mark for mark, mask in filters)
    for m in (lo, hi, (lo + hi) // 2):
        assert any((m & mask) == mark for mark, mask in filters)
    if (lo, hi) == (30000, 30099):
        assert filters == [(29952, 0xFFFFFF00)]


def counted(data: bytes, extra: bytes) -> bytes:
    """A flow message with `extra` attributes appended (its length fixed up)."""
    body = data[16:] + extra
    return msg(NEW, body)


def counters_nest(packets: int, nbytes: int, wide: bool = True) -> bytes:
    if wide:  # CTA_COUNTERS_PACKETS / _BYTES, be64
        return attr(1, struct.pack("!Q", packets)) + attr(2, struct.pack("!Q", nbytes))
    return attr(3, struct.pack("!I", packets)) + attr(4, struct.pack("!I", nbytes))


def test_accounting_counters_and_id_are_read_per_direction():
    big = (1 << 40) + 3  # needs all 64 bits: a 32-bit read would give 3
    extra = attr(9, counters_nest(21, 3612), nested=True)  # CTA_COUNTERS_ORIG
    extra += attr(10, counters_nest(big, 2 * big), nested=True)  # CTA_COUNTERS_REPLY
    extra += attr(12, struct.pack("!I", 0xDEADBEEF))  # CTA_ID
    extra += attr(20, attr(1, struct.pack("!Q", big)), nested=True)  # CTA_TIMESTAMP_START
    data = counted(flow("198.51.100.10", 4444, "198.51.100.1", 30000, 30000), extra) + DONE
    (got,) = parse_dump(data).flows
    assert (got.orig_packets, got.orig_bytes) == (21, 3612)
    assert (got.reply_packets, got.reply_bytes) == (big, 2 * big)
    assert got.id == 0xDEADBEEF and got.start == big
    assert got[:6] == (30000, 17, "198.51.100.10", 4444, "198.51.100.1", 30000)


def test_old_32_bit_counters_and_missing_accounting():
    extra = attr(10, counters_nest(7, 700, wide=False), nested=True)
    (got,) = parse_dump(counted(flow("2001:db8::10", 6000, "2001:db8::1", 30002, 30002,
                                     family=10), extra)).flows
    assert (got.orig_packets, got.orig_bytes, got.reply_packets, got.reply_bytes) == \
        (0, 0, 7, 700)
    assert got.id is None and got.start is None
    (plain,) = parse_dump(flow("198.51.100.10", 1, "198.51.100.1", 30000, 30000)).flows
    assert plain[11:] == (0, 0, 0, 0, None, None, 0x8, None)  # acct off: zeros, not garbage


def test_garbled_counters_skip_that_flow_only():
    bad_nest = attr(9, struct.pack("=HH", 0x40, 1) + bytes(8), nested=True)  # runs past
    bad = counted(flow("198.51.100.10", 1, "198.51.100.1", 30000, 30000), bad_nest)
    good = counted(flow("198.51.100.11", 2, "198.51.100.1", 30000, 30000),
                   attr(9, counters_nest(5, 50), nested=True))
    part = parse_dump(bad + good + DONE)
    assert [(f.sport, f.orig_packets) for f in part.flows] == [(2, 5)]
    assert part.skipped == 1


# -- CTA_TIMEOUT and CTA_STATUS: when a flow last carried a packet -------------------------
IPS_SEEN_REPLY, IPS_ASSURED, IPS_CONFIRMED = 0x2, 0x4, 0x8
UDP, STREAM = 30, 120  # nf_conntrack_udp_timeout, nf_conntrack_udp_timeout_stream


def timed(left: int, status: int, start_ns: int = 0) -> bytes:
    """A flow message as the kernel sends it: CTA_STATUS, CTA_TIMEOUT, a start time."""
    extra = attr(7, struct.pack("!I", left))  # CTA_TIMEOUT
    extra += attr(20, attr(1, struct.pack("!Q", start_ns)), nested=True)
    return counted(flow("198.51.100.10", 4444, "198.51.100.1", 30000, 30000, status=status),
                   extra)


def test_timeout_and_status_are_parsed():
    (got,) = parse_dump(timed(117, IPS_CONFIRMED | IPS_SEEN_REPLY | IPS_ASSURED)).flows
    assert got.timeout == 117 and got.status == 0xE and got.replied
    (untimed,) = parse_dump(flow("198.51.100.10", 1, "198.51.100.1", 30000, 30000)).flows
    assert untimed.timeout is None
    short = counted(flow("198.51.100.10", 1, "198.51.100.1", 30000, 30000),
                    attr(7, b"\0\0\1"))  # a 3-byte CTA_TIMEOUT: ignored, not misread
    assert parse_dump(short).flows[0].timeout is None


NOW = 5000.0  # monotonic clock right after the dump
WALL = 1_800_000_000 * 10**9  # time.time_ns() right after the dump


def last(left: int, status: int, age_s: float = 1000.0) -> object:
    (got,) = parse_dump(timed(left, status, start_ns=WALL - int(age_s * 1e9))).flows
    return udp_last_packet(got, NOW, UDP, STREAM, WALL)


@pytest.mark.parametrize("left,status,want", [
    # not replied: every packet resets it to udp_timeout; "29" = 29.x s left
    (29, IPS_CONFIRMED, NOW),  # just now (the upper end: at most NOW)
    (20, IPS_CONFIRMED, NOW - 10 + 1),
    (0, IPS_CONFIRMED, NOW - 30 + 1),
    # replied but not assured (its first 2 s, or a NAT clash entry): udp_timeout too
    (25, IPS_CONFIRMED | IPS_SEEN_REPLY, NOW - 5 + 1),
    # assured: the stream timeout
    (119, IPS_CONFIRMED | IPS_SEEN_REPLY | IPS_ASSURED, NOW),
    (100, IPS_CONFIRMED | IPS_SEEN_REPLY | IPS_ASSURED, NOW - 20 + 1),
    (29, IPS_CONFIRMED | IPS_SEEN_REPLY | IPS_ASSURED, NOW - 91 + 1),  # 91 s silent
    # more left than its status explains: refreshed to the stream timeout (NAT clash
    # entries are never assured), or a timeout lrk cannot explain: active now
    (100, IPS_CONFIRMED | IPS_SEEN_REPLY, NOW - 20 + 1),
    (5000, IPS_CONFIRMED | IPS_SEEN_REPLY | IPS_ASSURED, NOW),
])
def test_last_packet_from_remaining_timeout(left, status, want):
    assert last(left, status) == want


def test_last_packet_is_never_before_the_packet():
    """CTA_TIMEOUT is rounded down: for any real age of the last packet (in 0.1 s steps)
    the estimate lies in [packet, packet + 1 s]."""
    for setting, status in ((UDP, IPS_CONFIRMED), (STREAM, 0xE)):
        for tenths in range(0, setting * 10):
            age = tenths / 10
            left = int(setting - age)  # what the kernel reports
            got = last(left, status)
            assert NOW - age <= got <= NOW - age + 1.0, (setting, age, got)


def test_assured_in_its_first_two_seconds_on_older_kernels():
    """Kernels that set ASSURED at the first reply but refresh to udp_timeout for a flow's
    first 2 s: an assured flow whose last packet could lie in those 2 s is read with
    udp_timeout (the later time); on current kernels that reading cannot arise (an
    assured flow with under udp_timeout left went silent over 90 s ago, long after its
    first 2 s)."""
    assured = IPS_CONFIRMED | IPS_SEEN_REPLY | IPS_ASSURED
    # flow started 11.5 s ago, 19 s left: with udp_timeout its last packet came ~1.5 s in
    assert last(19, assured, age_s=11.5) == NOW - 11 + 1
    # started 200 s ago: only the stream reading fits (silent for 101 s)
    assert last(19, assured, age_s=200.0) == NOW - 101 + 1
    (got,) = parse_dump(timed(19, assured)).flows
    assert udp_last_packet(got, NOW, UDP, STREAM) == NOW - 101 + 1  # no wall clock given
    assert udp_last_packet(got._replace(timeout=None), NOW, UDP, STREAM, WALL) is None
