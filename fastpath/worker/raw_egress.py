"""Batched raw-socket egress for the ``packet`` data-plane mode.

Packet mode reads media from AF_PACKET taps in batches across all sessions;
sending each session's packets from its own UDP socket would still cost about
one syscall per packet at 50 pkt/s per stream.  Here the IP and UDP headers
are built in userspace (source: the relay address/port of the egress leg,
destination: the peer) and the whole round goes out with one sendmmsg(2) per
address family on a header-including raw socket (``IPPROTO_RAW``).  The
packets still take the kernel's output path (routing, neighbour resolution,
OUTPUT/POSTROUTING hooks); the relay's UDP sockets stay bound and hold the ports.

Sans-IO parts are pure: :func:`udp_checksum`, :func:`ipv4_udp_header`,
:func:`ipv6_udp_header` (with RFC 1071 sums, odd lengths padded).  The socket
shell is :class:`RawEgress`: ``add`` writes header + payload into preallocated
send slots, ``flush`` sends them and reports the positions that did not leave,
which the caller sends through the session's UDP socket instead (the fallback).

Headers: IPv4 version 4, IHL 5, TOS 0, DF set, TTL 64 and an ID from a counter
per family -- what Linux puts on UDP sockets' packets (path-MTU discovery on,
so DF; the ID of such atomic datagrams is only required not to repeat quickly,
RFC 6864); the kernel rewrites total length and header checksum of a
header-including raw send anyway (and would put ID 0 on a DF packet with ID 0).
IPv6: traffic class and flow label 0, hop limit 64.  The UDP checksum is always
computed (mandatory for IPv6, RFC 8200; cheap enough for IPv4: about 0.1 us per
172-byte packet under PyPy).
"""

from __future__ import annotations

import errno
import os
import platform
import socket
import struct
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from fastpath.errors import LrkError
from fastpath.worker import mmsg

__all__ = [
    "HDR4",
    "HDR6",
    "RawEgress",
    "RawEgressError",
    "destination_of",
    "ipv4_header_base",
    "ipv4_udp_header",
    "ipv6_udp_header",
    "payload_sum",
    "source_of",
    "udp_checksum",
]

AF_INET = mmsg.AF_INET
AF_INET6 = mmsg.AF_INET6
IPPROTO_RAW = 255
IPPROTO_UDP = 17
MSG_DONTWAIT = mmsg.MSG_DONTWAIT
SO_SNDBUFFORCE = 32

#: header bytes in front of the payload: IPv4 (20) + UDP (8), IPv6 (40) + UDP (8)
HDR4 = 28
HDR6 = 48
#: bytes per send slot (header + payload); larger packets take the fallback
SLOT_SIZE = 2048
TTL = 64
_DF = 0x4000

_PYPY = platform.python_implementation() == "PyPy"
_V4 = struct.Struct("!BBHHHBBH4s4sHHHH")
_V6 = struct.Struct("!IHBB16s16sHHHH")
_W32 = struct.Struct("!I").unpack_from
# the socket buffer is full: the rest of the batch would fail the same way
_FULL = frozenset((errno.EAGAIN, errno.EWOULDBLOCK, errno.ENOBUFS))
_MAX_EINTR = 8


class RawEgressError(LrkError):
    """Raw egress could not be set up (not privileged, no raw sockets, no cffi)."""

    code = "raw_egress"


# --- sans-IO: checksums and headers ---------------------------------------------


def _sum_words(data: bytes) -> int:
    """Sum of `data` as big-endian 32-bit words, zero-padded; congruent (mod 0xFFFF) to
    the RFC 1071 sum of its 16-bit words, since 2**16 == 1 (mod 0xFFFF).  A loop is what
    PyPy's JIT turns into the fastest code (int.from_bytes makes a bigint there)."""
    n = len(data)
    end = n & ~3
    s = 0
    for i in range(0, end, 4):
        s += _W32(data, i)[0]
    shift = 24
    for i in range(end, n):
        s += data[i] << shift
        shift -= 8
    return s


def _sum_bigint(data: bytes) -> int:
    """Same sum via one bigint: C speed on CPython (int.from_bytes + one modulo)."""
    v = int.from_bytes(data, "big")
    return v << 8 if len(data) & 1 else v


_sum = _sum_words if _PYPY else _sum_bigint


def payload_sum(data: bytes) -> int:
    """The RFC 1071 sum of `data` reduced mod 0xFFFF (0 for all-zero or empty data)."""
    return _sum(data) % 0xFFFF


def _fold(s: int) -> int:
    """Checksum field for a nonzero sum `s` (not reduced): the complement of the
    end-around-carry sum, which is s mod 0xFFFF, or 0xFFFF when that is 0."""
    r = s % 0xFFFF
    return 0xFFFF - r if r else 0


def _pseudo_base(src: bytes, dst: bytes, sport: int, dport: int) -> int:
    """Pseudo-header addresses + protocol + both ports: everything per (source,
    destination) pair that does not depend on the packet."""
    return _sum(src) + _sum(dst) + IPPROTO_UDP + sport + dport


def _check(src: bytes, dst: bytes, sport: int, dport: int) -> None:
    if len(src) != len(dst) or len(src) not in (4, 16):
        raise RawEgressError("addresses must be packed, both IPv4 (4 bytes) or both "
                             f"IPv6 (16 bytes), got {len(src)} and {len(dst)} bytes")
    for port in (sport, dport):
        if not (isinstance(port, int) and 0 <= port <= 65535):
            raise RawEgressError(f"bad UDP port {port!r}")


def udp_checksum(src: bytes, dst: bytes, sport: int, dport: int, payload: bytes) -> int:
    """UDP checksum over the pseudo-header (IPv4 or IPv6 by address length), the UDP
    header and `payload`; a computed 0 is sent as 0xFFFF (RFC 768, RFC 8200 8.1)."""
    _check(src, dst, sport, dport)
    ulen = 8 + len(payload)
    c = _fold(_pseudo_base(src, dst, sport, dport) + 2 * ulen + _sum(payload))
    return c or 0xFFFF


def ipv4_header_base(src: bytes, dst: bytes) -> int:
    """The IPv4 header checksum's sum over what a relayed packet's header keeps from one
    packet to the next (version, IHL, DF, TTL, protocol, both addresses); add the total
    length and the ID per packet."""
    return 0x4500 + _DF + (TTL << 8) + IPPROTO_UDP + _sum(src) + _sum(dst)


def source_of(ip: str, port: int) -> Tuple[int, bytes, int]:
    """(family, packed address, port) of the relay address an endpoint sends from."""
    ip = ip.split("%", 1)[0]
    fam = AF_INET6 if ":" in ip else AF_INET
    return fam, socket.inet_pton(fam, ip), int(port)


def destination_of(fam: int, dest: Tuple[str, int]) -> Optional[Tuple[bytes, int]]:
    """(packed address, port) of `dest` when it is an address of family `fam` with a
    port in 1-65535, else None (never raises)."""
    try:
        ip = dest[0]
        dport = int(dest[1])
        if (":" in ip) != (fam == AF_INET6) or not 0 < dport < 65536:
            return None
        return socket.inet_pton(fam, ip.split("%", 1)[0]), dport
    except (OSError, ValueError, TypeError, IndexError, OverflowError):
        return None


def ipv4_udp_header(src: bytes, dst: bytes, sport: int, dport: int, payload: bytes, *,
                    ttl: int = TTL, ident: int = 0, df: bool = True) -> bytes:
    """The 28 bytes (IPv4 + UDP header, both checksums set) in front of `payload`."""
    _check(src, dst, sport, dport)
    if len(src) != 4:
        raise RawEgressError("ipv4_udp_header needs 4-byte addresses")
    ulen = 8 + len(payload)
    if 20 + ulen > 0xFFFF:
        raise RawEgressError(f"payload of {len(payload)} bytes does not fit an IPv4 packet")
    flags = _DF if df else 0
    hsum = 0x4500 + 20 + ulen + ident + flags + (ttl << 8) + IPPROTO_UDP + _sum(src) + _sum(dst)
    return _V4.pack(0x45, 0, 20 + ulen, ident, flags, ttl, IPPROTO_UDP, _fold(hsum), src, dst,
                    sport, dport, ulen, udp_checksum(src, dst, sport, dport, payload))


def ipv6_udp_header(src: bytes, dst: bytes, sport: int, dport: int, payload: bytes, *,
                    hop_limit: int = TTL) -> bytes:
    """The 48 bytes (IPv6 + UDP header, UDP checksum set) in front of `payload`."""
    _check(src, dst, sport, dport)
    if len(src) != 16:
        raise RawEgressError("ipv6_udp_header needs 16-byte addresses")
    ulen = 8 + len(payload)
    if ulen > 0xFFFF:
        raise RawEgressError(f"payload of {len(payload)} bytes needs a jumbogram")
    return _V6.pack(0x60000000, ulen, IPPROTO_UDP, hop_limit, src, dst, sport, dport, ulen,
                    udp_checksum(src, dst, sport, dport, payload))


# --- socket shell -----------------------------------------------------------------

Addr = Tuple[str, int]
#: per destination of an endpoint: (lane, sockaddr entry, src, dst, sport, dport, base)
_Route = tuple


def open_raw_sockets(families: Sequence[int] = (AF_INET, AF_INET6), sndbuf: int = 4 << 20,
                     make: Optional[Callable[[int], socket.socket]] = None,
                     ) -> Dict[int, socket.socket]:
    """Header-including raw sockets (``IPPROTO_RAW`` implies IP_HDRINCL on Linux, for
    IPv6 too), one per family; RawEgressError (nothing left open) when one fails.
    `make(family)` may create them elsewhere (e.g. in another network namespace)."""
    socks: Dict[int, socket.socket] = {}
    try:
        for fam in families:
            s = socket.socket(fam, socket.SOCK_RAW, IPPROTO_RAW) if make is None else make(fam)
            socks[fam] = s
            s.setblocking(False)
            try:
                s.setsockopt(socket.SOL_SOCKET, SO_SNDBUFFORCE, sndbuf)
            except OSError:  # not CAP_NET_ADMIN: capped by net.core.wmem_max
                s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, sndbuf)
    except OSError as exc:
        for s in socks.values():
            s.close()
        raise RawEgressError(f"raw socket: {exc} (packet mode's raw egress needs "
                             "CAP_NET_RAW; packets fall back to the UDP sockets)") from exc
    return socks


class _Lane(mmsg.MsgVec):
    """Send slots of one family (mmsghdr[i] -> iov[i] -> buf[i * SLOT_SIZE:]) and its socket."""

    def __init__(self, ffi, sock: socket.socket, capacity: int) -> None:
        super().__init__(ffi, capacity, SLOT_SIZE, recv=False)
        self.sock = sock
        self.fd = sock.fileno()
        self.n = 0  # slots queued
        self.ident = int.from_bytes(os.urandom(2), "big")  # IPv4 ID, per packet
        self.pos: List[int] = []  # the caller's position of each slot's packet
        self.slot_ent: List[Optional[tuple]] = [None] * capacity  # keeps sockaddrs alive
        self.slot_len = [-1] * capacity


class RawEgress:
    """Queue forwarded packets of many endpoints, send them with one sendmmsg per family.

    ``bind(fd, ip, port)`` registers an endpoint's relay address (the source of what it
    sends), ``add(fd, packets)`` queues packets and ``flush()`` sends everything queued
    and returns the positions (0-based, in ``add`` order) that did not leave, so the
    caller can send those through the endpoint's own UDP socket.  Not thread-safe.
    """

    #: which egress this is (the worker names its counters after it)
    kind = "raw"

    def __init__(self, socks: Dict[int, socket.socket], capacity: int = 256) -> None:
        ffi, lib = mmsg.load()
        if ffi is None:
            raise RawEgressError("sendmmsg through cffi is unavailable: "
                                 f"{mmsg.unavailable_reason()}")
        self.capacity = max(1, min(int(capacity), mmsg.MAX_BATCH))
        self._ffi = ffi
        self._sendmmsg = lib.sendmmsg
        self.socks = dict(socks)
        self._lanes = {fam: _Lane(ffi, s, self.capacity) for fam, s in socks.items()}
        self._eps: Dict[int, list] = {}  # fd -> [(family, packed ip, port), last dest, route]
        self._names: Dict[Addr, tuple] = {}  # destination -> (sockaddr cdata, length)
        self.pending = 0  # positions handed out since the last flush
        self._rejected: List[int] = []  # positions that never got a slot
        self.packets = 0  # sent through the raw sockets
        self.calls = 0  # sendmmsg calls made
        self.rejected = 0  # not sendable raw (family, size, address), given back to caller
        self.errors: Dict[str, int] = {}

    @classmethod
    def open(cls, capacity: int = 256) -> RawEgress:
        """Raw sockets for both families; RawEgressError when that is not possible."""
        return cls(open_raw_sockets(), capacity)

    def close(self) -> None:
        for s in self.socks.values():
            s.close()
        self._lanes.clear()

    # -- endpoints -------------------------------------------------------------------
    def bind(self, fd: int, ip: str, port: int) -> None:
        """Endpoint `fd` sends from relay address (`ip`, `port`)."""
        self._eps[fd] = [source_of(ip, port), None, None]

    def forget(self, fd: int) -> None:
        self._eps.pop(fd, None)

    def _route(self, state: list, dest: Addr) -> Optional[_Route]:
        fam, src, sport = state[0]
        route = None
        packed = destination_of(fam, dest)
        if packed is not None and fam in self._lanes:
            dst, dport = packed
            try:
                ent = self._names.get(dest)
                if ent is None:
                    if len(self._names) >= mmsg.ADDR_CACHE_MAX:
                        self._names.clear()  # slot_ent keeps those in use alive
                    raw = mmsg.encode_sockaddr((dest[0], 0))  # raw sockets have no port
                    ent = self._names[dest] = (self._ffi.new("char[]", raw), len(raw))
                route = (self._lanes[fam], ent, src, dst, sport, dport,
                         _pseudo_base(src, dst, sport, dport),
                         ipv4_header_base(src, dst) if fam == AF_INET else 0)
            except (OSError, ValueError, TypeError, IndexError, OverflowError):
                route = None
        state[1] = dest
        state[2] = route
        return route

    # -- queue and send --------------------------------------------------------------
    def add(self, fd: int, packets: List[Tuple[bytes, Addr]]) -> int:
        """Queue `packets` sent from endpoint `fd`; returns the position of the first.
        The caller keeps ``pending + len(packets) <= capacity`` by flushing first."""
        first = self.pending
        add_one = self.add_one
        for data, dest in packets:
            add_one(fd, data, dest)
        return first

    def add_one(self, fd: int, data: bytes, dest: Addr) -> None:
        """Queue one packet to `dest` sent from endpoint `fd`, at position ``pending``
        (a rejected one is given back by :meth:`flush`); the caller keeps ``pending <
        capacity`` by flushing first. Loop-free, so that PyPy's JIT inlines it into the
        reader's loop."""
        pos = self.pending
        self.pending = pos + 1
        state = self._eps.get(fd)
        if state is None:
            self._reject(pos, 1)
            return
        route = state[2] if state[1] == dest else self._route(state, dest)
        if route is None:
            self._reject(pos, 1)
            return
        lane, ent, src, dst, sport, dport, pbase, ibase = route
        ln = len(data)
        v4 = ibase != 0
        hdr = HDR4 if v4 else HDR6
        if ln > SLOT_SIZE - hdr:
            self._reject(pos, 1)
            return
        k = lane.n
        view = lane.view
        ulen = 8 + ln
        c = (pbase + ulen + ulen + _sum(data)) % 0xFFFF
        ucs = 0xFFFF - c if c else 0xFFFF
        off = k * SLOT_SIZE
        if v4:
            ident = lane.ident = (lane.ident + 1) & 0xFFFF
            h = (ibase + 20 + ulen + ident) % 0xFFFF
            _V4.pack_into(view, off, 0x45, 0, 20 + ulen, ident, _DF, TTL, IPPROTO_UDP,
                          0xFFFF - h if h else 0, src, dst, sport, dport, ulen, ucs)
        else:
            _V6.pack_into(view, off, 0x60000000, ulen, IPPROTO_UDP, TTL, src, dst,
                          sport, dport, ulen, ucs)
        view[off + hdr:off + hdr + ln] = data
        if lane.slot_ent[k] is not ent:
            lane.slot_ent[k] = ent
            m = lane.msgs[k]
            m.msg_name = ent[0]
            m.msg_namelen = ent[1]
        if lane.slot_len[k] != ln + hdr:
            lane.slot_len[k] = ln + hdr
            lane.iovs[k].iov_len = ln + hdr
        lane.pos.append(pos)
        lane.n = k + 1

    def _reject(self, pos: int, n: int) -> None:
        self.rejected += n
        self._rejected.extend(range(pos, pos + n))

    def flush(self) -> List[int]:
        """Send every queued packet; returns the positions that did not leave, ascending."""
        failed = self._rejected
        self._rejected = []
        for lane in self._lanes.values():
            if lane.n:
                self._send_lane(lane, failed)
        self.pending = 0
        if len(failed) > 1:
            failed.sort()
        return failed

    def _send_lane(self, lane: _Lane, failed: List[int]) -> None:
        sendmmsg = self._sendmmsg
        ptrs = lane.ptrs
        fd = lane.fd
        n = lane.n
        off = 0
        eintr = 0
        while off < n:
            r = sendmmsg(fd, ptrs[off], n - off, MSG_DONTWAIT)
            self.calls += 1
            if r > 0:
                self.packets += r
                off += r
                continue
            e = self._ffi.errno if r < 0 else errno.EIO
            if e == errno.EINTR and eintr < _MAX_EINTR:
                eintr += 1
                continue
            name = errno.errorcode.get(e, str(e))
            if e in _FULL:
                self.errors[name] = self.errors.get(name, 0) + (n - off)
                failed.extend(lane.pos[off:n])
                break
            self.errors[name] = self.errors.get(name, 0) + 1
            failed.append(lane.pos[off])  # this one fails (EMSGSIZE, EPERM, ...): skip it
            off += 1
        lane.n = 0
        lane.pos = []

