"""Exact test and benchmark frames: Ethernet + IPv4/IPv6 (no options) + UDP + RTP.

One builder for the generator (`bench.trafgen`) and the tests that craft packets, so a
checksum or a length is computed one way everywhere.
"""

from __future__ import annotations

import socket
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


def inet_checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def rtp(ssrc: int, seq: int = 1, payload_len: int = PAYLOAD_LEN) -> bytes:
    """A PCMU RTP packet (version 2, PT 0) with a payload of 0xd5 (G.711 silence)."""
    return struct.pack("!BBHII", 0x80, 0, seq & 0xFFFF, seq * 160 & 0xFFFFFFFF, ssrc) + (
        b"\xd5" * payload_len)


def mac_bytes(mac: str) -> bytes:
    return bytes(int(part, 16) for part in mac.split(":"))


def frame(flow: Flow, src_mac: str, dst_mac: str, payload: Optional[bytes] = None,
          ttl: int = 64) -> bytes:
    """The exact Ethernet frame trafgen sends for `flow` (IPv4 or IPv6 by its addresses)."""
    body = rtp(flow.ssrc) if payload is None else payload
    udp_len = 8 + len(body)
    v6 = ":" in flow.src
    if v6 != (":" in flow.dst):
        raise ValueError(f"flow mixes address families: {flow}")
    fam = socket.AF_INET6 if v6 else socket.AF_INET
    src, dst = socket.inet_pton(fam, flow.src), socket.inet_pton(fam, flow.dst)
    if v6:
        pseudo = src + dst + struct.pack("!I3xB", udp_len, 17)
    else:
        pseudo = src + dst + struct.pack("!BBH", 0, 17, udp_len)
    udp = struct.pack("!HHHH", flow.sport, flow.dport, udp_len, 0) + body
    csum = inet_checksum(pseudo + udp) or 0xFFFF
    udp = udp[:6] + struct.pack("!H", csum) + udp[8:]
    if v6:
        ip = struct.pack("!IHBB", 0x60000000, udp_len, 17, ttl) + src + dst
        ethertype = 0x86DD
    else:
        hdr = struct.pack("!BBHHHBBH", 0x45, 0, 20 + udp_len, 0, 0x4000, ttl, 17, 0) + src + dst
        ip = hdr[:10] + struct.pack("!H", inet_checksum(hdr)) + hdr[12:]
        ethertype = 0x0800
    return mac_bytes(dst_mac) + mac_bytes(src_mac) + struct.pack("!H", ethertype) + ip + udp


