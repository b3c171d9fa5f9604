"""Header building and checksums of packet mode's raw egress (sans-IO), against an
independent RFC 1071 reference and the project's own packet parser."""

from __future__ import annotations

import random
import socket
import struct

import pytest

from fastpath.packet import parse_media
from fastpath.worker import raw_egress
from fastpath.worker.raw_egress import (
    HDR4,
    HDR6,
    RawEgress,
    RawEgressError,
    ipv4_udp_header,
    ipv6_udp_header,
    payload_sum,
    udp_checksum,
)

SRC4, DST4 = socket.inet_aton("198.51.100.1"), socket.inet_aton("198.51.100.10")
SRC6 = socket.inet_pton(socket.AF_INET6, "2001:db8:1::1")
DST6 = socket.inet_pton(socket.AF_INET6, "2001:db8:2::70")


def ones_sum(data: bytes) -> int:
    """RFC 1071 reference: 16-bit big-endian words, end-around carry after every add."""
    if len(data) % 2:
        data += b"\0"
    s = 0
    for (w,) in struct.iter_unpack("!H", data):
        s += w
        s = (s & 0xFFFF) + (s >> 16)
    return s


def ref_udp_checksum(src: bytes, dst: bytes, sport: int, dport: int, payload: bytes) -> int:
    ulen = 8 + len(payload)
    if len(src) == 4:
        pseudo = src + dst + struct.pack("!BBH", 0, 17, ulen)
    else:
        pseudo = src + dst + struct.pack("!IxxxB", ulen, 17)
    c = ~ones_sum(pseudo + struct.pack("!HHHH", sport, dport, ulen, 0) + payload) & 0xFFFF
    return c or 0xFFFF


def receiver_accepts(src: bytes, dst: bytes, segment: bytes) -> bool:
    """What a receiving stack checks: pseudo-header + segment sums to all ones."""
    if len(src) == 4:
        pseudo = src + dst + struct.pack("!BBH", 0, 17, len(segment))
    else:
        pseudo = src + dst + struct.pack("!IxxxB", len(segment), 17)
    return ones_sum(pseudo + segment) == 0xFFFF


@pytest.mark.parametrize("src,dst", [(SRC4, DST4), (SRC6, DST6)], ids=["ipv4", "ipv6"])
def test_udp_checksum_matches_reference_for_all_lengths(src, dst):
    rng = random.Random(5)
    for n in list(range(0, 70)) + [159, 160, 171, 172, 1199, 1472]:
        payload = bytes(rng.randrange(256) for _ in range(n))
        sport, dport = rng.randrange(65536), rng.randrange(65536)
        c = udp_checksum(src, dst, sport, dport, payload)
        assert c == ref_udp_checksum(src, dst, sport, dport, payload), n
        segment = struct.pack("!HHHH", sport, dport, 8 + n, c) + payload
        assert receiver_accepts(src, dst, segment)
        bad = struct.pack("!HHHH", sport, dport, 8 + n, c ^ 0x0100) + payload
        assert not receiver_accepts(src, dst, bad)


def test_both_sum_implementations_agree():
    """PyPy runs the word loop, CPython the bigint; test both on either interpreter."""
    rng = random.Random(11)
    for n in range(0, 300):
        data = bytes(rng.randrange(256) for _ in range(n))
        ref = ones_sum(data) % 0xFFFF
        assert raw_egress._sum_words(data) % 0xFFFF == ref
        assert raw_egress._sum_bigint(data) % 0xFFFF == ref
        assert payload_sum(data) == ref
    assert payload_sum(b"\xff\xff" * 40) == 0  # all ones sums to "negative zero"


def test_computed_zero_is_sent_as_all_ones():
    """RFC 768: a checksum that computes to 0 goes out as 0xFFFF (0 means "none")."""
    payload = b"rtp!" + b"\0\0"
    partial = ones_sum(
        SRC4 + DST4 + struct.pack("!BBHHHHH", 0, 17, 14, 1000, 2000, 14, 0) + payload)
    fix = (0xFFFF - partial) & 0xFFFF  # makes the folded sum 0xFFFF: checksum 0
    payload = b"rtp!" + struct.pack("!H", fix)
    assert ref_udp_checksum(SRC4, DST4, 1000, 2000, payload) == 0xFFFF
    assert udp_checksum(SRC4, DST4, 1000, 2000, payload) == 0xFFFF
    segment = struct.pack("!HHHH", 1000, 2000, 14, 0xFFFF) + payload
    assert receiver_accepts(SRC4, DST4, segment)


@pytest.mark.parametrize("n", [0, 1, 159, 160, 171])
def test_ipv4_header_fields_and_checksums(n):
    payload = bytes(range(n % 256))[:n] + bytes(max(0, n - 256))
    hdr = ipv4_udp_header(SRC4, DST4, 30002, 4444, payload)
    assert len(hdr) == HDR4
    (vihl, tos, tot, ident, frag, ttl, proto, _csum, src, dst, sport, dport, ulen,
     ucsum) = struct.unpack("!BBHHHBBH4s4sHHHH", hdr)
    assert (vihl, tos, tot, ident, frag, ttl, proto) == (0x45, 0, 28 + n, 0, 0x4000, 64, 17)
    assert (src, dst, sport, dport, ulen) == (SRC4, DST4, 30002, 4444, 8 + n)
    assert ones_sum(hdr[:20]) == 0xFFFF  # header checksum verifies
    assert receiver_accepts(SRC4, DST4, hdr[20:] + payload)
    assert ucsum == ref_udp_checksum(SRC4, DST4, 30002, 4444, payload)
    got = parse_media(hdr + payload)
    assert got == (socket.AF_INET, "198.51.100.1", 30002, "198.51.100.10", 4444, payload)


@pytest.mark.parametrize("n", [0, 1, 160, 171])
def test_ipv6_header_fields_and_checksum(n):
    payload = bytes((i * 7) & 0xFF for i in range(n))
    hdr = ipv6_udp_header(SRC6, DST6, 30002, 5000, payload)
    assert len(hdr) == HDR6
    vtf, plen, nh, hops = struct.unpack_from("!IHBB", hdr)
    assert (vtf, plen, nh, hops) == (0x60000000, 8 + n, 17, 64)
    assert hdr[8:24] == SRC6 and hdr[24:40] == DST6
    assert receiver_accepts(SRC6, DST6, hdr[40:] + payload)
    got = parse_media(hdr + payload)
    assert got == (socket.AF_INET6, "2001:db8:1::1", 30002, "2001:db8:2::70", 5000, payload)


def test_bad_arguments_raise_typed_errors():
    with pytest.raises(RawEgressError):
        udp_checksum(SRC4, DST6, 1, 2, b"")  # mixed families
    with pytest.raises(RawEgressError):
        ipv4_udp_header(SRC6, DST6, 1, 2, b"")
    with pytest.raises(RawEgressError):
        ipv6_udp_header(SRC4, DST4, 1, 2, b"")
    with pytest.raises(RawEgressError):
        udp_checksum(SRC4, DST4, 70000, 2, b"")
    with pytest.raises(RawEgressError):
        ipv6_udp_header(SRC6, DST6, 1, 2, bytes(70000))


def test_unsendable_packets_are_handed_back_in_order():
    """Without a socket of the family (or for an unknown endpoint, a mismatched or bad
    destination) packets are not queued: flush returns their positions for the fallback."""
    eg = RawEgress({})
    eg.bind(7, "198.51.100.1", 30000)
    assert eg.add(7, [(b"a", ("198.51.100.10", 4000)), (b"b", ("198.51.100.10", 4000))]) == 0
    assert eg.add(8, [(b"c", ("198.51.100.10", 4000))]) == 2  # never bound
    eg.bind(9, "198.51.100.1", 30002)
    assert eg.add(9, [(b"d", ("2001:db8::1", 4000))]) == 3  # family mismatch
    assert eg.add(9, [(b"e", ("not an ip", 4000))]) == 4
    eg.forget(7)
    assert eg.add(7, [(b"f", ("198.51.100.10", 4000))]) == 5
    assert eg.pending == 6
    assert eg.flush() == [0, 1, 2, 3, 4, 5]
    assert (eg.pending, eg.rejected, eg.packets, eg.calls) == (0, 6, 0, 0)
    assert eg.flush() == []
