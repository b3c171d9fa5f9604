"""The one IPv4/IPv6 UDP header parser (fastpath.packet), on packets laid out by hand:
parse_udp (nfqueue mode) and parse_media (packet mode) are two views of the same parse."""

from __future__ import annotations

import random
import socket
import struct
from typing import Tuple

import pytest

from bench.frames import inet_checksum
from fastpath import packet
from fastpath.packet import parse_media, parse_udp

A4, A6 = socket.AF_INET, socket.AF_INET6
UDP, TCP, ICMP = 17, 6, 1


def v4(src: str, sport: int, dst: str, dport: int, data: bytes, *, options: bytes = b"",
       frag: int = 0, proto: int = UDP, ulen: int = -1, total: int = -1) -> bytes:
    """IPv4 (+ options) + UDP; `ulen`/`total` override the length fields."""
    ihl = (20 + len(options)) // 4
    if total < 0:
        total = ihl * 4 + 8 + len(data)
    hdr = struct.pack("!BBHHHBBH4s4s", 0x40 | ihl, 0, total, 0x1234, frag, 64, proto, 0,
                      socket.inet_aton(src), socket.inet_aton(dst)) + options
    hdr = hdr[:10] + struct.pack("!H", inet_checksum(hdr)) + hdr[12:]
    return hdr + struct.pack("!HHHH", sport, dport, 8 + len(data) if ulen < 0 else ulen,
                             0) + data


def v6(src: str, sport: int, dst: str, dport: int, data: bytes, *,
       ext: Tuple[Tuple[int, bytes], ...] = (), last: int = UDP) -> bytes:
    """IPv6 + extension headers ((type, body after its first 2 bytes), ...) + UDP."""
    udp = struct.pack("!HHHH", sport, dport, 8 + len(data), 0) + data
    chain = b""
    types = [t for t, _ in ext] + [last]
    for i, (kind, body) in enumerate(ext):
        nxt = types[i + 1]
        if kind == 44:  # fragment header: fixed 8 bytes, second byte reserved
            chain += bytes([nxt, 0]) + body
        elif kind == 51:  # AH: length in 4-byte units minus 2
            chain += bytes([nxt, (2 + len(body)) // 4 - 2]) + body
        else:  # 8-byte units minus 1
            chain += bytes([nxt, (2 + len(body)) // 8 - 1]) + body
    return (struct.pack("!IHBB", 0x60000000, len(chain) + len(udp), types[0], 64)
            + socket.inet_pton(A6, src) + socket.inet_pton(A6, dst) + chain + udp)


HOP = (0, b"\x01\x04\0\0\0\0")  # hop-by-hop with a PadN option: 8 bytes
DST_OPTS = (60, b"\x01\x04\0\0\0\0")
FRAG0 = (44, b"\0\0\0\0\0\x01")  # fragment header, offset 0 (M clear)
AH = (51, b"\0\0" + b"\0" * 4 + b"\0" * 4 + b"\0" * 12)  # 24 bytes: SPI, seq, 12-byte ICV

RTP = b"\x80\x00\x00\x01rtp-data"
P4 = v4("198.51.100.1", 5004, "198.51.100.2", 40000, RTP)
P6 = v6("2001:db8::1", 5004, "2001:db8::2", 40000, RTP)


def test_ipv4():
    info = parse_udp(P4)
    assert info == (A4, "198.51.100.1", 5004, "198.51.100.2", 40000, 28)
    assert P4[info[5]:] == RTP
    assert parse_media(P4) == (A4, "198.51.100.1", 5004, "198.51.100.2", 40000, RTP)
    assert all(type(x) is int for x in (info[0], info[2], info[4], info[5]))
    empty = v4("198.51.100.1", 1, "198.51.100.2", 2, b"")
    assert parse_media(empty) == (A4, "198.51.100.1", 1, "198.51.100.2", 2, b"")


def test_ipv4_options_are_skipped_by_ihl():
    opts = v4("198.51.100.3", 1, "198.51.100.4", 2, b"x", options=b"\x01" * 8)
    assert parse_udp(opts) == (A4, "198.51.100.3", 1, "198.51.100.4", 2, 36)
    assert parse_media(opts) == (A4, "198.51.100.3", 1, "198.51.100.4", 2, b"x")
    longest = v4("198.51.100.3", 1, "198.51.100.4", 2, b"y", options=b"\x01" * 40)  # IHL 15
    assert parse_media(longest) == (A4, "198.51.100.3", 1, "198.51.100.4", 2, b"y")
    assert parse_udp(b"\x44" + P4[1:]) is None  # IHL 4 < 5
    assert parse_udp(opts[:35]) is None  # options push the UDP header past the end


def test_ipv6():
    assert parse_udp(P6) == (A6, "2001:db8::1", 5004, "2001:db8::2", 40000, 48)
    assert parse_media(P6) == (A6, "2001:db8::1", 5004, "2001:db8::2", 40000, RTP)
    mapped = v6("::ffff:198.51.100.1", 1, "2001:db8:0:0:0:0:0:2", 2, b"")
    assert parse_media(mapped) == (A6, "::ffff:198.51.100.1", 1, "2001:db8::2", 2, b"")


def test_ipv6_extension_headers():
    chained = v6("2001:db8::a", 1, "2001:db8::b", 2, b"z", ext=(HOP, DST_OPTS, FRAG0))
    assert parse_udp(chained) == (A6, "2001:db8::a", 1, "2001:db8::b", 2, 40 + 24 + 8)
    assert parse_media(chained) == (A6, "2001:db8::a", 1, "2001:db8::b", 2, b"z")
    with_ah = v6("2001:db8::a", 1, "2001:db8::b", 2, b"ah", ext=(AH,))
    assert parse_udp(with_ah) == (A6, "2001:db8::a", 1, "2001:db8::b", 2, 40 + 24 + 8)
    deep = v6("2001:db8::a", 1, "2001:db8::b", 2, b"z", ext=(HOP,) * 8)
    assert parse_udp(deep) is not None  # eight are walked ...
    assert parse_udp(v6("2001:db8::a", 1, "2001:db8::b", 2, b"z", ext=(HOP,) * 9)) is None


def test_fragments():
    first4 = v4("198.51.100.1", 1, "198.51.100.2", 2, b"x", frag=0x2000)  # MF, offset 0
    assert parse_udp(first4) == (A4, "198.51.100.1", 1, "198.51.100.2", 2, 28)
    # a first fragment whose UDP length claims the whole datagram: not a whole payload
    assert parse_media(v4("198.51.100.1", 1, "198.51.100.2", 2, b"x", frag=0x2000,
                          ulen=1000)) is None
    assert parse_udp(v4("198.51.100.1", 1, "198.51.100.2", 2, b"x", frag=0x0010)) is None
    assert parse_media(v4("198.51.100.1", 1, "198.51.100.2", 2, b"x", frag=0x0001)) is None
    later6 = v6("2001:db8::a", 1, "2001:db8::b", 2, b"z", ext=((44, b"\0\x08\0\0\0\x01"),))
    assert parse_udp(later6) is None and parse_media(later6) is None


def test_not_udp():
    assert parse_udp(v4("198.51.100.1", 1, "198.51.100.2", 2, b"x" * 12, proto=TCP)) is None
    assert parse_udp(v4("198.51.100.1", 1, "198.51.100.2", 2, b"x", proto=ICMP)) is None
    assert parse_udp(v6("2001:db8::a", 1, "2001:db8::b", 2, b"z" * 12, last=TCP)) is None
    assert parse_udp(v6("2001:db8::a", 1, "2001:db8::b", 2, b"z", ext=(HOP,), last=58)) is None
    for version in (0, 5, 7, 15):  # neither IPv4 nor IPv6
        assert parse_udp(bytes([version << 4 | 5]) + P4[1:]) is None


def test_truncated_headers_give_none():
    for pkt in (P4, P6, v6("2001:db8::1", 1, "2001:db8::2", 2, b"abc", ext=(HOP,))):
        full = parse_udp(pkt)
        assert full is not None
        for cut in range(len(pkt)):
            got = parse_udp(pkt[:cut])
            # the header view needs the UDP header, not the payload
            assert got == (full if cut >= full[5] else None)
            assert parse_media(pkt[:cut]) is None  # the payload view needs all of it


def test_payload_ends_where_the_length_fields_say():
    want = (A4, "198.51.100.10", 4000, "198.51.100.1", 30000, b"rtp!")
    p4 = v4("198.51.100.10", 4000, "198.51.100.1", 30000, b"rtp!")
    assert parse_media(p4 + bytes(14)) == want  # Ethernet padding of a short frame
    assert parse_media(P6 + b"junk")[5] == RTP
    assert parse_media(v4("198.51.100.10", 4000, "198.51.100.1", 30000, b"rtp!",
                          ulen=10)) == want[:5] + (b"rt",)  # UDP length shorter: trimmed
    assert parse_media(v4("198.51.100.10", 1, "198.51.100.1", 2, b"rtp!", ulen=4)) is None
    assert parse_media(v4("198.51.100.10", 1, "198.51.100.1", 2, b"rtp!", total=30)) is None
    assert parse_media(v4("198.51.100.10", 1, "198.51.100.1", 2, b"rtp!", ulen=13)) is None


def test_buffer_types_and_junk_never_raise():
    for kind in (bytearray, memoryview):
        assert parse_udp(kind(P4)) == parse_udp(P4)
        assert parse_media(kind(P6)) == parse_media(P6)
        assert type(parse_media(kind(P4))[5]) is bytes
    for junk in (b"", None, "str", 42, 4.2, [0x45] * 40, b"\x45" * 27):
        assert parse_udp(junk) is None  # type: ignore[arg-type]
        assert parse_media(junk) is None  # type: ignore[arg-type]


def test_random_garbage_and_mutations():
    rng = random.Random(99)
    for _ in range(3000):
        blob = bytes(rng.getrandbits(8) for _ in range(rng.randrange(0, 90)))
        if blob and rng.random() < 0.5:
            blob = bytes([rng.choice((0x45, 0x46, 0x60))]) + blob[1:]
        info = parse_udp(blob)
        assert info is None or (len(info) == 6 and info[5] <= len(blob))
        media = parse_media(blob)
        assert media is None or (info is not None and media[:5] == info[:5]
                                 and blob[info[5]:info[5] + len(media[5])] == media[5])
        mutated = bytearray(rng.choice((P4, P6)))
        for _ in range(rng.randrange(1, 4)):
            mutated[rng.randrange(len(mutated))] = rng.getrandbits(8)
        media = parse_media(bytes(mutated))
        assert media is None or len(media[5]) <= len(RTP)


def test_address_caches_stay_bounded_and_right(monkeypatch):
    monkeypatch.setattr(packet, "ADDR_CACHE_MAX", 8)
    for i in range(50):
        src = f"198.51.100.{i}"
        src6 = f"2001:db8::{i + 1:x}"
        assert parse_udp(v4(src, 1, "198.51.100.250", 2, b""))[1] == src
        assert parse_udp(v6(src6, 1, "2001:db8::fe", 2, b""))[1] == src6
        assert len(packet._ip4_text) <= 8 and len(packet._ip6_text) <= 8


@pytest.mark.parametrize("pkt", [P4, P6])
def test_views_agree(pkt):
    info, media = parse_udp(pkt), parse_media(pkt)
    assert media[:5] == info[:5] and media[5] == pkt[info[5]:]
