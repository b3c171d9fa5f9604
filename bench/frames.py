"""Exact test and benchmark frames: Ethernet + IPv4/IPv6 (no options) + UDP + RTP.

One builder for the generator (`bench.trafgen`) and the tests that craft packets, so a
checksum or a length is computed one way everywhere.
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass
from typing import Optional

#: RTP payload: 160 bytes of G.711 (20 ms): 12 + 160 = 172-byte UDP payload, as bench.loadgen
PAYLOAD_LEN = 160


@dataclass(frozen=True)
class Flow:
    """One stream as the generator sends it: source and destination address and port."""

    src: str
    sport: int
    dst: str
    dport: int
    ssrc: int = 0x1234


def mac(text: str) -> bytes:
    return bytes(int(x, 16) for x in text.split(":"))


def ones_sum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    s = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return s


def inet_checksum(data: bytes) -> int:
    return ~ones_sum(data) & 0xFFFF


def udp_checksum(src: str, dst: str, udp: bytes) -> int:
    s, d = ipaddress.ip_address(src), ipaddress.ip_address(dst)
    if s.version == 4:
        pseudo = s.packed + d.packed + struct.pack("!BBH", 0, 17, len(udp))
    else:
        pseudo = s.packed + d.packed + struct.pack("!IxxxB", len(udp), 17)
    c = inet_checksum(pseudo + udp)
    return c or 0xFFFF


def udp_frame(src_mac: str, dst_mac: str, src: str, dst: str, sport: int, dport: int,
          payload: bytes, ttl: int = 64, csum: Optional[int] = None, ident: int = 0x1234,
          frag: int = 0, pad: int = 0) -> bytes:
    """Ethernet + IPv4/IPv6 + UDP; `csum` overrides the UDP checksum (0: none)."""
    udp = struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload
    c = udp_checksum(src, dst, udp) if csum is None else csum
    udp = udp[:6] + struct.pack("!H", c) + udp[8:]
    if ":" in src:
        ip = struct.pack("!IHBB", 6 << 28, len(udp), 17, ttl)
        ip += ipaddress.ip_address(src).packed + ipaddress.ip_address(dst).packed
        eth_type = 0x86DD
    else:
        hdr = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), ident, frag, ttl, 17, 0,
                          ipaddress.ip_address(src).packed, ipaddress.ip_address(dst).packed)
        ip = hdr[:10] + struct.pack("!H", inet_checksum(hdr)) + hdr[12:]
        eth_type = 0x0800
    return mac(dst_mac) + mac(src_mac) + struct.pack("!H", eth_type) + ip + udp + bytes(pad)


def rtp(ssrc: int, seq: int = 1, payload_len: int = PAYLOAD_LEN) -> bytes:
    """A PCMU RTP packet (version 2, PT 0) with a payload of 0xd5 (G.711 silence)."""
    return struct.pack("!BBHII", 0x80, 0, seq & 0xFFFF, seq * 160 & 0xFFFFFFFF, ssrc) + (
        b"\xd5" * payload_len)


def frame(flow: Flow, src_mac: str, dst_mac: str, payload: Optional[bytes] = None,
          ttl: int = 64) -> bytes:
    """The exact Ethernet frame trafgen sends for `flow` (IPv4 or IPv6 by its addresses)."""
    if (":" in flow.src) != (":" in flow.dst):
        raise ValueError(f"flow mixes address families: {flow}")
    return udp_frame(src_mac, dst_mac, flow.src, flow.dst, flow.sport, flow.dport,
                     rtp(flow.ssrc) if payload is None else payload, ttl=ttl)
