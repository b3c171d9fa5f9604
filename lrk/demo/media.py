"""Simulated media endpoints: real RTP (G.711, 20 ms) and RTCP packets, and their checks.

Used by `lrkproxy demo`, the integration tests and the benchmark load tools.
"""

from __future__ import annotations

import select
import socket
import struct
import time
from typing import Dict, List, Optional, Tuple

import dpkt

Addr = Tuple[str, int]

PT_PCMU = 0
SAMPLES_PER_PACKET = 160  # 20 ms of G.711
PAYLOAD_BYTES = 160  # + 12-byte header = 172-byte packets
_HEADER = struct.Struct("!BBHII")


def rtp_packet(seq: int, ssrc: int, payload: Optional[bytes] = None, pt: int = PT_PCMU) -> bytes:
    """An RTP v2 packet; the default payload encodes ssrc and seq so damage is detectable."""
    if payload is None:
        payload = struct.pack("!IH", ssrc, seq & 0xFFFF) * (PAYLOAD_BYTES // 6) + b"\xd5" * (
            PAYLOAD_BYTES % 6)
    ts = (seq * SAMPLES_PER_PACKET) & 0xFFFFFFFF
    return _HEADER.pack(0x80, pt & 0x7F, seq & 0xFFFF, ts, ssrc) + payload


def rtcp_sender_report(ssrc: int, packets: int, octets: int) -> bytes:
    """A minimal RTCP SR (no report blocks)."""
    return struct.pack("!BBHIIIIII", 0x80, 200, 6, ssrc, 0, 0, 0, packets, octets)


def parse_rtp(data: bytes) -> dpkt.rtp.RTP:
    """Decode with dpkt (an independent parser): raises dpkt.UnpackError on damage."""
    return dpkt.rtp.RTP(data)


def check_rtp(data: bytes, ssrc: int) -> int:
    """The sequence number of an intact default-payload packet from `ssrc`; ValueError if not."""
    pkt = parse_rtp(data)
    if pkt.version != 2 or pkt.ssrc != ssrc:
        raise ValueError(f"unexpected RTP header: version {pkt.version}, ssrc {pkt.ssrc:#x}")
    if bytes(pkt.data) != bytes(rtp_packet(pkt.seq, ssrc)[12:]):
        raise ValueError(f"payload of packet {pkt.seq} is damaged")
    return pkt.seq


class MediaEndpoint:
    """A UDP socket standing in for a phone's RTP (port) and RTCP (port + 1) sockets."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.rtp = socket.socket(family, socket.SOCK_DGRAM)
        self.rtcp = socket.socket(family, socket.SOCK_DGRAM)
        if port:
            self.rtp.bind((host, port))
            self.rtcp.bind((host, port + 1))
        else:
            self._bind_pair(host)
        self.host = host
        self.port = self.rtp.getsockname()[1]

    def _bind_pair(self, host: str) -> None:
        for _ in range(200):
            self.rtp.bind((host, 0))
            port = self.rtp.getsockname()[1]
            if port % 2 == 0 and port < 65535:
                try:
                    self.rtcp.bind((host, port + 1))
                    return
                except OSError:
                    pass
            family = self.rtp.family
            self.rtp.close()
            self.rtp = socket.socket(family, socket.SOCK_DGRAM)
        raise OSError("could not find a free even/odd port pair for a media endpoint")

    @property
    def address(self) -> Addr:
        return (self.host, self.port)

    def send_rtp(self, dest: Addr, count: int, ssrc: int, first_seq: int = 0) -> None:
        for i in range(count):
            self.rtp.sendto(rtp_packet(first_seq + i, ssrc), dest)

    def receive(self, sock: socket.socket, count: int, timeout: float) -> List[Tuple[bytes, Addr]]:
        """Up to `count` datagrams, waiting at most `timeout` seconds in all."""
        got: List[Tuple[bytes, Addr]] = []
        deadline = time.monotonic() + timeout
        while len(got) < count:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            ready, _, _ = select.select([sock], [], [], left)
            if not ready:
                break
            data, addr = sock.recvfrom(4096)
            got.append((data, addr[:2]))
        return got

    def close(self) -> None:
        self.rtp.close()
        self.rtcp.close()


def summarize(received: List[Tuple[bytes, Addr]], ssrc: int) -> Dict[str, object]:
    """Count intact packets, damaged ones and the sources they came from."""
    seqs = []
    damaged = 0
    sources = set()
    for data, src in received:
        sources.add(src)
        try:
            seqs.append(check_rtp(data, ssrc))
        except (ValueError, dpkt.UnpackError):
            damaged += 1
    return {"intact": len(seqs), "damaged": damaged, "sources": sorted(sources),
            "in_order": seqs == sorted(seqs)}
