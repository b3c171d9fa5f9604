"""The one IPv4/IPv6 UDP header parser, shared by the daemon and the worker.

Two views of the same parse:

* :func:`parse_udp` (nfqueue mode, daemon): addresses, ports and the offset of the UDP
  payload of a packet the kernel queued; the payload itself may be cut short
  (copy_range);
* :func:`parse_media` (packet mode, worker): the same plus the UDP payload, bounded by
  the IP and UDP length fields, never by the buffer: an AF_PACKET tap sees frames before
  ``ip_rcv`` trims link-layer padding. A packet shorter than its lengths claim (cut, or
  a first fragment) gives None.

Both accept bytes, bytearray or memoryview, give None for anything that is not a whole
IPv4/IPv6 UDP header (other protocols, non-first fragments, truncated headers, garbage)
and never raise. IPv4 options are skipped by IHL; IPv6 extension headers (hop-by-hop,
routing, destination options, a first fragment, AH) are walked, at most 8 of them.

Per packet under PyPy the parse costs tens of nanoseconds: address texts come from two
small bounded caches (IPv4 keyed by the address as an int, IPv6 by its 16 bytes), so
``inet_ntop`` (about 70 ns per call there) runs once per address, not per packet. The
UDP checksum is not checked.

:class:`PacketIoError` is the error of packet-socket I/O on both sides (taps the daemon
opens, readers the worker runs).
"""

from __future__ import annotations

import socket
import struct
from typing import Dict, Optional, Tuple

from fastpath.errors import LrkError

__all__ = ["AF_INET", "AF_INET6", "Media", "PacketIoError", "UdpInfo", "parse_media",
           "parse_udp", "udp_offset"]

# plain ints: the socket module's enum members are slow in comparisons on CPython
AF_INET = int(socket.AF_INET)
AF_INET6 = int(socket.AF_INET6)
IPPROTO_UDP = 17

#: (family, src_ip, src_port, dst_ip, dst_port, udp_payload_offset)
UdpInfo = Tuple[int, str, int, str, int, int]
#: (family, src_ip, src_port, dst_ip, dst_port, udp_payload)
Media = Tuple[int, str, int, str, int, bytes]

_V6_EXT = frozenset((0, 43, 60))  # hop-by-hop, routing, destination options
_V6_FRAGMENT = 44
_V6_AH = 51
_MAX_V6_EXT = 8
#: entries per address cache; a full cache is cleared (no LRU bookkeeping per packet)
ADDR_CACHE_MAX = 4096

_u32 = struct.Struct("!I").unpack_from
_ntop = socket.inet_ntop
_ip4_text: Dict[int, str] = {}
_ip6_text: Dict[bytes, str] = {}


class PacketIoError(LrkError):
    """A packet socket could not be set up or read, or rule/filter parameters are unusable."""

    code = "packet_io"


def _ip4(a: int) -> str:
    text = _ip4_text.get(a)
    if text is None:
        if len(_ip4_text) >= ADDR_CACHE_MAX:
            _ip4_text.clear()
        text = _ip4_text[a] = f"{a >> 24}.{(a >> 16) & 255}.{(a >> 8) & 255}.{a & 255}"
    return text


def _ip6(raw: bytes) -> str:
    text = _ip6_text.get(raw)
    if text is None:
        if len(_ip6_text) >= ADDR_CACHE_MAX:
            _ip6_text.clear()
        text = _ip6_text[raw] = _ntop(AF_INET6, raw)  # RFC 5952 text
    return text


def udp_offset(pkt, n: int) -> int:
    """Offset of the UDP header in the `n`-byte IPv4/IPv6 packet `pkt`, -1 if there is none
    (not UDP, a non-first fragment, too many extension headers, cut before the end of the
    UDP header). `n` must be at least 28; may raise IndexError/TypeError on garbage."""
    b0 = pkt[0]
    version = b0 >> 4
    if version == 4:
        ihl = (b0 & 0x0F) << 2
        if ihl < 20 or n < ihl + 8 or pkt[9] != IPPROTO_UDP:
            return -1
        if ((pkt[6] << 8) | pkt[7]) & 0x1FFF:  # fragment offset: no UDP header here
            return -1
        return ihl
    if version != 6 or n < 48:
        return -1
    nh = pkt[6]
    off = 40
    for _ in range(_MAX_V6_EXT):
        if nh == IPPROTO_UDP:
            break
        if off + 8 > n:
            return -1
        if nh in _V6_EXT:
            nh, off = pkt[off], off + ((pkt[off + 1] + 1) << 3)
        elif nh == _V6_FRAGMENT:
            if ((pkt[off + 2] << 8) | pkt[off + 3]) & 0xFFF8:
                return -1
            nh, off = pkt[off], off + 8
        elif nh == _V6_AH:
            nh, off = pkt[off], off + ((pkt[off + 1] + 2) << 2)
        else:
            return -1
    if nh != IPPROTO_UDP or off + 8 > n:
        return -1
    return off


def parse_udp(pkt) -> Optional[UdpInfo]:
    """Addresses and ports of an IPv4/IPv6 UDP packet and the offset of its UDP payload;
    None for anything else, never raises.

    Non-first fragments (no UDP header) and packets cut before the end of the UDP header
    give None; the UDP payload itself may be cut short.
    """
    try:
        n = len(pkt)
        if n < 28:
            return None
        off = udp_offset(pkt, n)
        if off < 0:
            return None
        sport = (pkt[off] << 8) | pkt[off + 1]
        dport = (pkt[off + 2] << 8) | pkt[off + 3]
        if pkt[0] >> 4 == 4:
            return (AF_INET, _ip4(_u32(pkt, 12)[0]), sport, _ip4(_u32(pkt, 16)[0]), dport,
                    off + 8)
        return (AF_INET6, _ip6(bytes(pkt[8:24])), sport, _ip6(bytes(pkt[24:40])), dport,
                off + 8)
    except (TypeError, ValueError, IndexError, struct.error, OSError):
        return None


def parse_media(pkt) -> Optional[Media]:
    """Addresses, ports and UDP payload of an IPv4/IPv6 UDP packet; None for anything else,
    never raises.

    The payload ends where the IP and UDP length fields say, never at the buffer's end
    (link-layer padding of short frames is not payload); a packet shorter than its
    lengths claim (cut, or a first fragment) is None.
    """
    info = parse_udp(pkt)
    if info is None:
        return None
    try:
        family, src, sport, dst, dport, off = info
        # end of the IP datagram: IPv4 total length, IPv6 40 + payload length
        end = ((pkt[2] << 8) | pkt[3]) if family == AF_INET else 40 + ((pkt[4] << 8) | pkt[5])
        uend = off - 8 + ((pkt[off - 4] << 8) | pkt[off - 3])
        if uend < off or uend > end or uend > len(pkt):
            return None
        return (family, src, sport, dst, dport, bytes(pkt[off:uend]))
    except (TypeError, ValueError, IndexError):
        return None
