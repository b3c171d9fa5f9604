"""Where a frame to an IP address goes: the kernel's route and neighbour, for senders
that write whole Ethernet frames (AF_XDP egress, worker side).

A sender past the kernel's output path has to do what that path does: pick the
interface and next hop (RTM_GETROUTE, the kernel's own lookup, policy routing
included) and the next hop's link-layer address (RTM_GETNEIGH). Nothing is resolved
here that the kernel has not: a next hop without a usable neighbour entry is "not
now" (None), the caller sends that packet through the kernel (a UDP socket), which
resolves it, and asks again later. Answers are cached: a found next hop for
`ttl` seconds, a missing one for `retry` seconds, so the hot path pays a dict lookup.

Sans-IO parts (:func:`route_request`, :func:`parse_route`, :func:`neigh_request`,
:func:`parse_neigh`) take and return bytes; :class:`NextHops` is the shell with one
NETLINK_ROUTE socket in the calling thread's namespace.
"""

from __future__ import annotations

import ctypes
import fcntl
import socket
import struct
import time
from typing import Callable, Dict, NamedTuple, Optional, Tuple

from fastpath.kernel import netlink as nl

__all__ = ["Hop", "NextHops", "link_mac", "neigh_request", "parse_neigh", "parse_route",
           "route_request", "rx_queues"]

NETLINK_ROUTE = 0
RTM_NEWROUTE = 24
RTM_GETROUTE = 26
RTM_NEWNEIGH = 28
RTM_GETNEIGH = 30
RTA_DST = 1
RTA_SRC = 2
RTA_OIF = 4
RTA_GATEWAY = 5
RTA_VIA = 18
NDA_DST = 1
NDA_LLADDR = 2
RTN_UNICAST = 1
#: neighbour states whose link-layer address may be used (NUD_REACHABLE, STALE, DELAY,
#: PROBE, PERMANENT, NOARP); INCOMPLETE and FAILED may not
NUD_USABLE = 0x02 | 0x04 | 0x08 | 0x10 | 0x80 | 0x40
SIOCGIFNAME = 0x8910
SIOCGIFHWADDR = 0x8927
SIOCETHTOOL = 0x8946
ETHTOOL_GCHANNELS = 0x3C
_CHANNELS = struct.Struct("=9I")  # struct ethtool_channels
_IFREQ_SIZE = 40

_RTMSG = struct.Struct("=BBBBBBBBI")
_NDMSG = struct.Struct("=BBHiHBB")
_U32 = struct.Struct("=I")


class Hop(NamedTuple):
    """Where frames to one address go: out of `ifindex`, from `src_mac` to `dst_mac`."""

    ifindex: int
    src_mac: bytes
    dst_mac: bytes


def route_request(seq: int, dst: bytes, src: bytes = b"") -> bytes:
    """RTM_GETROUTE for one destination (4 or 16 packed bytes) from source `src` (same
    family; empty: any), so that rules that route by source (`ip rule from ...`) apply."""
    fam = socket.AF_INET if len(dst) == 4 else socket.AF_INET6
    body = _RTMSG.pack(fam, len(dst) * 8, len(src) * 8, 0, 0, 0, 0, 0, 0)
    body += nl.attr(RTA_DST, dst) + (nl.attr(RTA_SRC, src) if src else b"")
    return nl.message(RTM_GETROUTE, nl.NLM_F_REQUEST, seq, body)


def parse_route(buf: bytes) -> Optional[Tuple[int, Optional[bytes]]]:
    """(output ifindex, gateway or None for on-link) from the reply to `route_request`;
    None when the route is not a unicast one (unreachable, blackhole, local)."""
    for mtype, _flags, _seq, body, end in nl.messages(buf):
        if mtype == nl.NLMSG_ERROR:
            if nl.parse_error(buf, body, end).error:
                return None
            continue
        if mtype != RTM_NEWROUTE or end - body < _RTMSG.size:
            continue
        rtype = buf[body + 7]
        if rtype != RTN_UNICAST:
            return None
        a = nl.attr_map(buf, body + _RTMSG.size, end)
        oif = a.get(RTA_OIF)
        if oif is None or len(oif) < 4:
            return None
        gw = a.get(RTA_GATEWAY)
        return _U32.unpack_from(oif)[0], gw
    return None


def neigh_request(seq: int, ifindex: int, addr: bytes) -> bytes:
    """RTM_GETNEIGH for one neighbour of one interface."""
    fam = socket.AF_INET if len(addr) == 4 else socket.AF_INET6
    body = _NDMSG.pack(fam, 0, 0, ifindex, 0, 0, 0) + nl.attr(NDA_DST, addr)
    return nl.message(RTM_GETNEIGH, nl.NLM_F_REQUEST, seq, body)


def parse_neigh(buf: bytes) -> Optional[bytes]:
    """The neighbour's link-layer address from the reply to `neigh_request`, or None
    (no entry, or not usable yet: incomplete, failed)."""
    for mtype, _flags, _seq, body, end in nl.messages(buf):
        if mtype == nl.NLMSG_ERROR:
            if nl.parse_error(buf, body, end).error:
                return None
            continue
        if mtype != RTM_NEWNEIGH or end - body < _NDMSG.size:
            continue
        state = _NDMSG.unpack_from(buf, body)[4]
        if not state & NUD_USABLE:
            return None
        mac = nl.attr_map(buf, body + _NDMSG.size, end).get(NDA_LLADDR)
        return mac if mac is not None and len(mac) == 6 else None
    return None


def _ifreq(name: bytes, data: bytes = b"") -> bytes:
    """A whole struct ifreq (40 bytes: the kernel copies that much in and back out)."""
    return (name[:16].ljust(16, b"\0") + data).ljust(_IFREQ_SIZE, b"\0")


def _ifname(s: socket.socket, ifindex: int) -> bytes:
    """The interface's name (16 bytes, NUL-padded) by index, in `s`'s namespace."""
    req = _ifreq(b"", struct.pack("i", ifindex))
    return fcntl.ioctl(s.fileno(), SIOCGIFNAME, req)[:16]


def rx_queues(ifindex: int) -> int:
    """How many receive queues the interface uses now (at least 1): an AF_XDP socket
    serves one. ETHTOOL_GCHANNELS in the calling thread's namespace: RX-only plus combined
    channels (rtnetlink's IFLA_NUM_RX_QUEUES counts the queues allocated, e.g. a veth's
    one per CPU, not those in use). A driver without channel support has one queue."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        name = _ifname(s, ifindex)
        buf = bytearray(_CHANNELS.pack(ETHTOOL_GCHANNELS, 0, 0, 0, 0, 0, 0, 0, 0))
        ptr = ctypes.addressof(ctypes.c_char.from_buffer(buf))
        try:
            fcntl.ioctl(s.fileno(), SIOCETHTOOL, _ifreq(name, struct.pack("P", ptr)))
        except OSError:
            return 1
    _cmd, _mrx, _mtx, _mo, _mc, rx, _tx, _other, combined = _CHANNELS.unpack(buf)
    return max(1, rx + combined)


def link_mac(ifindex: int) -> bytes:
    """The interface's own MAC address (in the calling thread's namespace)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        hw = fcntl.ioctl(s.fileno(), SIOCGIFHWADDR, _ifreq(_ifname(s, ifindex)))
    return hw[18:24]


class NextHops:
    """Resolve and cache next hops through one NETLINK_ROUTE socket.

    `usable(ifindex)` says which output interfaces the caller can send out of (the ones
    it has a socket on); a route out of another interface is "not now" too. Counters:
    ``lookups`` (netlink round trips), ``misses`` (answers that were None).
    """

    def __init__(self, usable: Callable[[int], bool], ttl: float = 5.0, retry: float = 0.2,
                 timeout: float = 0.5, clock: Callable[[], float] = time.monotonic,
                 max_entries: int = 65536, sock: Optional[nl.NetlinkSocket] = None,
                 macs: Optional[Dict[int, bytes]] = None) -> None:
        self.usable = usable
        self.ttl = ttl
        self.retry = retry
        self.timeout = timeout
        self.clock = clock
        self.max_entries = max_entries
        self.sock = sock if sock is not None else nl.NetlinkSocket(protocol=NETLINK_ROUTE)
        self._cache: Dict[bytes, Tuple[float, Optional[Hop]]] = {}
        self._macs: Dict[int, bytes] = dict(macs or {})  # ifindex -> its own MAC
        self.lookups = 0
        self.misses = 0
        self.errors = 0

    def close(self) -> None:
        self.sock.close()

    def get(self, dst: bytes, src: bytes = b"") -> Optional[Hop]:
        """The next hop for packed address `dst` from source `src` (the relay address
        the packet leaves from), or None (send through the kernel)."""
        key = src + dst
        ent = self._cache.get(key)
        now = self.clock()
        if ent is not None and ent[0] > now:
            return ent[1]
        hop = self._resolve(dst, src)
        if len(self._cache) >= self.max_entries:
            self._cache.clear()
        self._cache[key] = (now + (self.ttl if hop is not None else self.retry), hop)
        if hop is None:
            self.misses += 1
        return hop

    def _ask(self, msg: bytes) -> bytes:
        """The reply to `msg` (its sequence number): a late reply to an earlier request
        that timed out is skipped."""
        self.lookups += 1
        seq = _U32.unpack_from(msg, 8)[0]
        self.sock.send(msg, "route lookup")
        deadline = time.monotonic() + self.timeout
        for _ in range(8):
            buf = self.sock.recv(deadline=deadline, op="route lookup")
            if len(buf) >= 16 and _U32.unpack_from(buf, 8)[0] == seq:
                return buf
        raise nl.NetlinkError("route lookup: no reply with our sequence number")

    def _resolve(self, dst: bytes, src: bytes) -> Optional[Hop]:
        try:
            route = parse_route(self._ask(route_request(self.sock.next_seq(), dst, src)))
            if route is None:
                return None
            ifindex, gw = route
            if not self.usable(ifindex):
                return None
            mac = parse_neigh(self._ask(neigh_request(self.sock.next_seq(), ifindex,
                                                      gw if gw else dst)))
            if mac is None:
                return None
            src = self._macs.get(ifindex)
            if src is None:
                src = self._macs[ifindex] = link_mac(ifindex)
            return Hop(ifindex, src, mac)
        except (nl.NetlinkError, OSError):
            self.errors += 1
            return None
