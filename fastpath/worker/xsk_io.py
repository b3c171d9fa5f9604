"""Packet mode over AF_XDP (worker side): the reader and the egress of ``packet_io =
"af_xdp"``, drop-in for the tap reader (:class:`fastpath.worker.packet_io.PacketReader`)
and the raw egress (:class:`fastpath.worker.raw_egress.RawEgress`).

Media to the relay's ports is steered by an XDP program into one AF_XDP socket per
interface (:mod:`fastpath.xdp.steer`, :mod:`fastpath.worker.xsk`): no skb is built
for it, no netfilter hook or socket lookup runs, and no drop rule is needed. The worker
relays what it reads and writes whole Ethernet frames into the TX ring of the socket
of the next hop's interface (route and neighbour from the kernel:
:mod:`fastpath.worker.nexthop`). A packet whose next hop the kernel has not resolved,
or that leaves by an interface without an AF_XDP socket, goes out through its
endpoint's UDP socket instead (the same fallback as raw egress, counted), and the
kernel resolves the neighbour meanwhile.

Frames read stay the reader's until :meth:`XskReader.done` (the worker calls it after
the round's sends): the payload slices handed out point into the UMEM.
"""

from __future__ import annotations

import socket
import struct
import time
from typing import Callable, Dict, List, Optional, Tuple, Union

from fastpath.worker.nexthop import NextHops
from fastpath.worker.raw_egress import (
    _DF,
    _V4,
    _V6,
    HDR4,
    HDR6,
    IPPROTO_UDP,
    TTL,
    _pseudo_base,
    _sum,
    destination_of,
    ipv4_header_base,
    source_of,
)
from fastpath.worker.xsk import (
    TX_META_LEN,
    XDP_TXMD_FLAGS_CHECKSUM,
    XskError,
    XskSocket,
    memmove,
)

__all__ = ["XskEgress", "XskReader"]

AF_INET = int(socket.AF_INET)
AF_INET6 = int(socket.AF_INET6)
ETH = 14
#: a frame's headers: Ethernet (destination, source, type: 14 bytes) + IPv4/IPv6 + UDP
_EV4 = struct.Struct("!14s" + _V4.format.lstrip("!"))
_EV6 = struct.Struct("!14s" + _V6.format.lstrip("!"))
#: the same after the frame's TX metadata (struct xsk_tx_metadata in host order, packed
#: here once per family, in one string with the Ethernet header): "compute the checksum
#: at csum_offset 6 from csum_start, the UDP header", whose checksum field holds the
#: pseudo-header's sum
_MEV4 = struct.Struct(f"!{TX_META_LEN + ETH}s" + _V4.format.lstrip("!"))
_MEV6 = struct.Struct(f"!{TX_META_LEN + ETH}s" + _V6.format.lstrip("!"))
_META4 = struct.pack("<QHH4xQ", XDP_TXMD_FLAGS_CHECKSUM, ETH + 20, 6, 0)
_META6 = struct.pack("<QHH4xQ", XDP_TXMD_FLAGS_CHECKSUM, ETH + 40, 6, 0)
_ETH_IP = b"\x08\x00"
_ETH_IP6 = b"\x86\xdd"

Addr = Tuple[str, int]


class XskReader:
    """Batched reads of L3 packets from one AF_XDP socket: ``[(packet, ifindex), ...]``
    as the tap reader returns them."""

    name = "af_xdp"

    def __init__(self, xsk: XskSocket, batch: int = 64) -> None:
        self.xsk = xsk
        self.batch = max(1, int(batch))
        self.ifindex = xsk.ifindex
        self.truncated = 0
        #: frames that were not IPv4 or IPv6 (the program steers only those: a bug)
        self.not_ip = 0
        self.overflowed = 0
        #: the kernel's drop counters of this socket, by name, as last read
        self.drops: Dict[str, int] = {}
        self._held: List[int] = []
        self._umem = xsk.view()
        self._seen_drops = 0

    def fileno(self) -> int:
        return self.xsk.fileno()

    def recv_batch(self, max_n: int = 0) -> List[Tuple[memoryview, int]]:
        n = self.batch if max_n <= 0 else min(max_n, self.batch)
        descs = self.xsk.rx(n)
        if not descs:
            return []
        umem = self._umem
        held = self._held
        out = []
        ifindex = self.ifindex
        for off, ln in descs:
            held.append(off)
            hi = umem[off + 12]
            lo = umem[off + 13]
            if (hi == 0x08 and lo == 0x00) or (hi == 0x86 and lo == 0xDD):
                out.append((umem[off + ETH:off + ln], ifindex))
            else:
                self.not_ip += 1
        return out

    def done(self) -> None:
        """The round is over: every frame read goes back to the kernel."""
        if self._held:
            self.xsk.release(self._held)
            self._held = []
            self.xsk.wake_rx()

    def count_overflows(self) -> int:
        """Frames the kernel could not hand to this socket (RX ring full, no free frame
        on the fill ring, other drops): the worker fell behind. By reason in `drops`."""
        try:
            st = self.xsk.kernel_stats()
        except (OSError, XskError):
            return self.overflowed
        # a frame the fill ring had no free frame for counts in rx_dropped too (as does
        # one too big for a frame): the reasons, without counting a drop twice
        empty = st["rx_fill_ring_empty_descs"]
        self.drops = {"rx_ring_full": st["rx_ring_full"], "fill_ring_empty": empty,
                      "other": max(0, st["rx_dropped"] - empty)}
        self.overflowed = sum(self.drops.values())
        return self.overflowed

    def close(self) -> None:
        self.xsk.close()


class XskEgress:
    """Queue forwarded packets as Ethernet frames on the AF_XDP sockets' TX rings, send
    each socket's with one kick per flush. The interface of RawEgress: ``bind``,
    ``forget``, ``add`` (returns the first position), ``flush`` (the positions that did
    not leave, for the caller's fallback), ``pending``, ``capacity``.

    At 50 packets a second per stream a poll round holds one packet of each of many
    streams, so what a run costs apart from its packets matters: each endpoint keeps its
    last destination's route (socket, frame header parts, checksum bases), valid for
    `route_ttl` seconds of the clock read once per flush, then asked of `hops` again."""

    #: which egress this is (the worker names its counters after it)
    kind = "xsk"

    def __init__(self, xsks: Dict[int, XskSocket], hops: Optional[NextHops] = None,
                 capacity: int = 256, route_ttl: float = 1.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.xsks = dict(xsks)
        self.hops = hops if hops is not None else NextHops(self.xsks.__contains__)
        self.capacity = max(1, int(capacity))
        self.route_ttl = route_ttl
        self.clock = clock
        self.now = clock()
        #: fd -> [(family, packed ip, port), last destination, its route or None]
        self._eps: Dict[int, list] = {}
        self._pend: Dict[int, List[int]] = {i: [] for i in self.xsks}  # flat offset, length
        self._dirty: List[XskSocket] = []
        self._ident = 0
        self.pending = 0
        self._rejected: List[int] = []
        self.packets = 0
        self.calls = 0
        self.rejected = 0
        #: not sent this way, by reason: no_route (no usable next hop yet), no_frame
        #: (TX ring or frames exhausted), too_big, family (address family mismatch)
        self.errors: Dict[str, int] = {}

    def close(self) -> None:
        self.hops.close()
        for x in self.xsks.values():
            x.close()

    def kick_errors(self) -> Dict[str, int]:
        """Kicks the kernel refused, by errno name, over the sending sockets."""
        out: Dict[str, int] = {}
        for x in self.xsks.values():
            for name, n in x.tx_errors.items():
                out[name] = out.get(name, 0) + n
        return out

    def bind(self, fd: int, ip: str, port: int) -> None:
        """Endpoint `fd` sends from relay address (`ip`, `port`)."""
        self._eps[fd] = [source_of(ip, port), None, None]

    def forget(self, fd: int) -> None:
        self._eps.pop(fd, None)

    def _route(self, state: list, dest: Addr) -> Union[tuple, str]:
        """The route of `state`'s endpoint to `dest` (cached in `state`), or why none."""
        state[1] = dest
        state[2] = None
        fam, src, sport = state[0]
        packed = destination_of(fam, dest)
        if packed is None:
            return "family"
        dst, dport = packed
        hop = self.hops.get(dst, src)
        if hop is None:
            return "no_route"
        xsk = self.xsks[hop.ifindex]
        v4 = fam == AF_INET
        eth = hop.dst_mac + hop.src_mac + (_ETH_IP if v4 else _ETH_IP6)
        ibase = ipv4_header_base(src, dst) if v4 else 0
        hdr = ETH + (HDR4 if v4 else HDR6)
        meta = xsk.tx_meta
        # the checksum's base: with TX metadata the pseudo-header alone (the kernel or
        # device sums the UDP header and payload), else pseudo-header and ports
        cbase = _pseudo_base(src, dst, 0, 0) if meta else _pseudo_base(src, dst, sport, dport)
        if meta:
            head, fmt = (_META4 + eth, _MEV4) if v4 else (_META6 + eth, _MEV6)
        else:
            head, fmt = eth, (_EV4 if v4 else _EV6)
        route = (self.now + self.route_ttl, xsk, xsk.view(), xsk.pointer(), xsk.free_frames(),
                 self._pend[hop.ifindex], head, fmt, src, dst, sport, dport, cbase, ibase,
                 hdr, xsk.frame_size - meta - hdr, meta, xsk.tx_options)
        state[2] = route
        return route

    def _reject(self, pos: int, n: int, why: str) -> None:
        self.rejected += n
        self.errors[why] = self.errors.get(why, 0) + n
        self._rejected.extend(range(pos, pos + n))

    def add(self, fd: int, packets: List[Tuple[bytes, Addr]]) -> int:
        """Queue `packets` sent from endpoint `fd`; returns the position of the first."""
        first = self.pending
        add_one = self.add_one
        for data, dest in packets:
            add_one(fd, data, dest)
        return first

    def add_one(self, fd: int, data: bytes, dest: Addr) -> None:
        """Queue one packet to `dest` sent from endpoint `fd`, at position ``pending``
        (a rejected one is given back by :meth:`flush`). Loop-free, so that PyPy's JIT
        inlines it into the reader's loop."""
        pos = self.pending
        self.pending = pos + 1
        state = self._eps.get(fd)
        if state is None:
            self._reject(pos, 1, "family")
            return
        route = state[2]
        if route is None or state[1] != dest or route[0] < self.now:
            route = self._route(state, dest)
            if route.__class__ is str:
                self._reject(pos, 1, route)  # type: ignore[arg-type]
                return
        (_exp, xsk, umem, uptr, free, pend, head, fmt, src, dst, sport, dport, cbase, ibase,
         hdr, room, meta, opts) = route  # type: ignore[misc]
        ln = len(data)
        if ln > room:
            self._reject(pos, 1, "too_big")
            return
        if xsk.tx_room() <= (len(pend) >> 1):
            self._reject(pos, 1, "no_frame")
            return
        if not free:
            xsk.reclaim()
            if not free:
                self._reject(pos, 1, "no_frame")
                return
        off = free.pop()
        ulen = 8 + ln
        if meta:  # the pseudo-header's sum, not inverted: the rest is summed after us
            ck = (cbase + ulen) % 0xFFFF
        else:
            c = (cbase + ulen + ulen + _sum(data)) % 0xFFFF
            ck = 0xFFFF - c if c else 0xFFFF
        # TX metadata (if any), Ethernet, IP and UDP headers in one pack
        if ibase:
            ident = self._ident = (self._ident + 1) & 0xFFFF
            h = (ibase + 20 + ulen + ident) % 0xFFFF
            fmt.pack_into(umem, off, head, 0x45, 0, 20 + ulen, ident, _DF, TTL, IPPROTO_UDP,
                          0xFFFF - h if h else 0, src, dst, sport, dport, ulen, ck)
        else:
            fmt.pack_into(umem, off, head, 0x60000000, ulen, IPPROTO_UDP, TTL, src, dst,
                          sport, dport, ulen, ck)
        off += meta
        if uptr is None:
            umem[off + hdr:off + hdr + ln] = data
        else:
            memmove(uptr + (off + hdr), data, ln)  # type: ignore[operator]
        if not pend:
            self._dirty.append(xsk)
        pend.append(off)
        pend.append((hdr + ln) | opts)

    def flush(self) -> List[int]:
        """Send what is queued; returns the positions that did not leave, ascending."""
        dirty = self._dirty
        if dirty:
            pends = self._pend
            for xsk in dirty:
                pend = pends[xsk.ifindex]
                if pend:
                    xsk.tx_put_many(pend)
                    del pend[:]  # the same list: routes hold it
                self.packets += xsk.kick()
                self.calls += 1
                xsk.reclaim()
            self._dirty = []
        for xsk in self.xsks.values():  # frames an earlier kick left in a ring
            if xsk not in dirty and xsk.tx_outstanding():
                xsk.kick()
                self.calls += 1
                xsk.reclaim()
        self.now = self.clock()
        failed = self._rejected
        self._rejected = []
        self.pending = 0
        if len(failed) > 1:
            failed.sort()
        return failed
