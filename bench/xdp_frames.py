"""Frames for the XDP program's tests, built from scratch with full checksums (an
independent reference: the program updates checksums incrementally)."""

from __future__ import annotations

import ctypes
import ipaddress
import os
import struct
import threading
from typing import Callable, List, Optional, TypeVar

from bench.netns import NETNS_DIR

T = TypeVar("T")
_libc = ctypes.CDLL(None, use_errno=True)
CLONE_NEWNET = 0x40000000


def mac(text: str) -> bytes:
    return bytes(int(x, 16) for x in text.split(":"))


def ones_sum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    s = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return s


def checksum(data: bytes) -> int:
    return ~ones_sum(data) & 0xFFFF


def udp_checksum(src: str, dst: str, udp: bytes) -> int:
    s, d = ipaddress.ip_address(src), ipaddress.ip_address(dst)
    if s.version == 4:
        pseudo = s.packed + d.packed + struct.pack("!BBH", 0, 17, len(udp))
    else:
        pseudo = s.packed + d.packed + struct.pack("!IxxxB", len(udp), 17)
    c = checksum(pseudo + udp)
    return c or 0xFFFF


def frame(src_mac: str, dst_mac: str, src: str, dst: str, sport: int, dport: int,
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
        ip = hdr[:10] + struct.pack("!H", checksum(hdr)) + hdr[12:]
        eth_type = 0x0800
    return mac(dst_mac) + mac(src_mac) + struct.pack("!H", eth_type) + ip + udp + bytes(pad)


def in_netns(ns: str, fn: Callable[[], T]) -> T:
    """Run `fn` on a throwaway thread inside namespace `ns` (BPF_PROG_TEST_RUN resolves
    ingress_ifindex and bpf_fib_lookup in the caller's namespace)."""
    result: List[object] = []

    def run() -> None:
        try:
            fd = os.open(os.path.join(NETNS_DIR, ns), os.O_RDONLY)
            try:
                if _libc.setns(fd, CLONE_NEWNET) != 0:
                    raise OSError(ctypes.get_errno(), f"setns({ns})")
            finally:
                os.close(fd)
            result.append(fn())
        except BaseException as exc:
            result.append(exc)

    t = threading.Thread(target=run, name=f"in-{ns}")
    t.start()
    t.join(30)
    if not result:
        raise AssertionError(f"no result from a thread in {ns}")
    if isinstance(result[0], BaseException):
        raise result[0]
    return result[0]  # type: ignore[return-value]
