"""Packet mode over AF_XDP, sans kernel: the frames the egress writes (exact bytes, valid
checksums), what it gives back for the fallback and why, the reader's frame accounting,
and the next-hop codec and cache (rtnetlink replies built here)."""

from __future__ import annotations

import platform
import socket
import struct
from typing import Dict, List, Optional, Tuple

import pytest
from cffi import FFI

from fastpath.kernel import netlink as nl
from fastpath.worker import nexthop
from fastpath.worker.nexthop import Hop, NextHops
from fastpath.worker.raw_egress import udp_checksum
from fastpath.worker.xsk import TX_META_LEN, XDP_TX_METADATA, XDP_TXMD_FLAGS_CHECKSUM
from fastpath.worker.xsk_io import XskEgress, XskReader

MAC_A = bytes.fromhex("020000000001")
MAC_B = bytes.fromhex("020000000002")
RELAY = "198.51.100.1"
PEER = "198.51.100.70"


def _kernel_checksum(frame: bytearray, start: int, offset: int) -> None:
    """What the kernel does with a frame whose TX metadata asks for a checksum
    (skb_checksum_help): sum from `start` to the end, store the complement at
    `start + offset` (0 sent as 0xFFFF)."""
    data = bytes(frame[start:]) + (b"\0" if (len(frame) - start) & 1 else b"")
    s = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    struct.pack_into("!H", frame, start + offset, (0xFFFF - s) or 0xFFFF)


class FakeXsk:
    """What XskEgress and XskReader use of an XskSocket: a UMEM, free TX frames, a TX
    ring of `ring` slots, and descriptors to hand out as received. With `tx_meta` its
    frames carry TX metadata, whose checksum request its kick carries out as the kernel
    does."""

    def __init__(self, ifindex: int = 2, frames: int = 8, ring: int = 4,
                 frame_size: int = 2048, tx_meta: int = 0) -> None:
        self.ifindex = ifindex
        self.frame_size = frame_size
        self.tx_meta = tx_meta
        self.tx_options = XDP_TX_METADATA << 32 if tx_meta else 0
        self.meta_seen: List[bytes] = []
        #: what kernel_stats reports (struct xdp_statistics)
        self.stats = {"rx_dropped": 0, "rx_invalid_descs": 0, "tx_invalid_descs": 0,
                      "rx_ring_full": 0, "rx_fill_ring_empty_descs": 0,
                      "tx_ring_empty_descs": 0}
        self.umem = bytearray(frames * frame_size)
        self.free = [i * frame_size for i in range(frames)]
        self.ring = ring
        self.queued: List[Tuple[int, int]] = []
        self.sent: List[bytes] = []
        self.kicks = 0
        self.rx_descs: List[Tuple[int, int]] = []
        self.released: List[int] = []
        self.closed = False
        self.tx_errors: Dict[str, int] = {}
        self._ptr: Optional[object] = None

    def tx_outstanding(self) -> int:
        return 0  # kick sends everything

    def view(self) -> memoryview:
        return memoryview(self.umem)

    def pointer(self) -> object:
        """As XskSocket's: a cffi pointer on PyPy (its copy path), None on CPython."""
        if platform.python_implementation() != "PyPy":
            return None
        if self._ptr is None:
            self._ptr = FFI().from_buffer(self.umem)
        return self._ptr

    def free_frames(self) -> List[int]:
        return self.free

    def tx_room(self) -> int:
        return self.ring - len(self.queued)

    def tx_put_many(self, flat: List[int]) -> int:
        pairs = list(zip(flat[::2], flat[1::2]))
        take = pairs[:self.tx_room()]
        self.queued += take
        self.free += [off & ~(self.frame_size - 1) for off, _ in pairs[len(take):]]
        return len(take)

    def kick(self) -> int:
        self.kicks += 1
        n = len(self.queued)
        for off, word in self.queued:
            length, options = word & 0xFFFFFFFF, word >> 32
            frame = bytearray(self.umem[off:off + length])
            if options & XDP_TX_METADATA:
                meta = bytes(self.umem[off - self.tx_meta:off])
                self.meta_seen.append(meta)
                flags, start, offset = struct.unpack_from("<QHH", meta)
                if flags & XDP_TXMD_FLAGS_CHECKSUM:
                    _kernel_checksum(frame, start, offset)
            self.sent.append(bytes(frame))
            self.free.append(off & ~(self.frame_size - 1))
        self.queued = []
        return n

    def reclaim(self) -> int:
        return 0

    def rx(self, n: int) -> List[Tuple[int, int]]:
        out, self.rx_descs = self.rx_descs[:n], self.rx_descs[n:]
        return out

    def release(self, offsets: List[int]) -> None:
        self.released.extend(offsets)

    def wake_rx(self) -> None:
        pass

    def kernel_stats(self) -> Dict[str, int]:
        return dict(self.stats)

    def fileno(self) -> int:
        return 99

    def close(self) -> None:
        self.closed = True


class FakeHops:
    def __init__(self, hops: Dict[bytes, Optional[Hop]]) -> None:
        self.hops = hops
        self.asked: List[bytes] = []
        self.sources: List[bytes] = []

    def get(self, dst: bytes, src: bytes = b"") -> Optional[Hop]:
        self.asked.append(dst)
        self.sources.append(src)
        return self.hops.get(dst)

    def close(self) -> None:
        pass


def _ip_sum(header: bytes) -> int:
    s = sum(struct.unpack("!10H", header))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return s


def _egress(hop: Optional[Hop], **kw) -> Tuple[XskEgress, FakeXsk]:
    xsk = FakeXsk(**kw)
    dst = socket.inet_aton(PEER)
    eg = XskEgress({xsk.ifindex: xsk}, FakeHops({dst: hop}))
    eg.bind(7, RELAY, 30000)
    return eg, xsk


@pytest.mark.parametrize("meta", [0, TX_META_LEN], ids=["worker_sums", "tx_metadata"])
def test_an_ipv4_frame_is_built_whole_with_valid_checksums(meta):
    """The UDP checksum summed by the worker, or left to the kernel through TX metadata:
    the same frame leaves either way."""
    eg, xsk = _egress(Hop(2, MAC_A, MAC_B), tx_meta=meta)
    payloads = [b"\x80" + bytes(range(171)), b"odd"]  # 172 bytes, and an odd length
    assert eg.add(7, [(p, (PEER, 5000)) for p in payloads]) == 0
    assert eg.flush() == []
    assert eg.packets == 2 and eg.calls == 1 and xsk.kicks == 1
    for frame, payload in zip(xsk.sent, payloads):
        assert frame[:14] == MAC_B + MAC_A + b"\x08\x00"
        ip = frame[14:34]
        ver_ihl, _tos, total, _ident, flags, ttl, proto = struct.unpack("!BBHHHBB", ip[:10])
        assert (ver_ihl, total, flags, ttl, proto) == (0x45, 28 + len(payload), 0x4000, 64, 17)
        assert ip[12:16] == socket.inet_aton(RELAY) and ip[16:20] == socket.inet_aton(PEER)
        assert _ip_sum(ip) == 0xFFFF  # a valid header checksum sums to all ones
        sport, dport, ulen, csum = struct.unpack("!HHHH", frame[34:42])
        assert (sport, dport, ulen) == (30000, 5000, 8 + len(payload))
        assert csum == udp_checksum(socket.inet_aton(RELAY), socket.inet_aton(PEER), 30000,
                                    5000, payload)
        assert frame[42:] == payload
    # consecutive IPv4 IDs, as a socket's would be
    ids = [struct.unpack("!H", f[18:20])[0] for f in xsk.sent]
    assert ids[1] == (ids[0] + 1) & 0xFFFF


@pytest.mark.parametrize("meta", [0, TX_META_LEN], ids=["worker_sums", "tx_metadata"])
def test_an_ipv6_frame(meta):
    xsk = FakeXsk(tx_meta=meta)
    src, dst = "2001:db8:2::1", "2001:db8:2::70"
    packed = socket.inet_pton(socket.AF_INET6, dst)
    eg = XskEgress({2: xsk}, FakeHops({packed: Hop(2, MAC_A, MAC_B)}))
    eg.bind(7, src, 30000)
    eg.add(7, [(b"v6 payload", (dst, 5000))])
    assert eg.flush() == []
    frame = xsk.sent[0]
    assert frame[12:14] == b"\x86\xdd" and len(frame) == 14 + 48 + 10
    assert frame[14 + 8:14 + 24] == socket.inet_pton(socket.AF_INET6, src)
    assert frame[14 + 24:14 + 40] == packed
    assert struct.unpack("!H", frame[14 + 4:14 + 6])[0] == 18  # payload length
    assert struct.unpack("!H", frame[14 + 46:14 + 48])[0] == udp_checksum(
        socket.inet_pton(socket.AF_INET6, src), packed, 30000, 5000, b"v6 payload")


def test_tx_metadata_asks_for_the_udp_checksum_and_leaves_the_pseudo_header_sum():
    """struct xsk_tx_metadata before the frame: checksum flag, csum_start at the UDP
    header, csum_offset 6; the checksum field holds the pseudo-header's sum (addresses,
    protocol, UDP length) that the kernel's sum over header and payload completes."""
    eg, xsk = _egress(Hop(2, MAC_A, MAC_B), tx_meta=TX_META_LEN)
    off = xsk.free[-1]  # the frame the egress takes
    eg.add(7, [(b"payload", (PEER, 5000))])
    assert eg.flush() == []
    assert xsk.meta_seen == [struct.pack("<QHH4xQ", XDP_TXMD_FLAGS_CHECKSUM, 34, 6, 0)]
    written = bytes(xsk.umem[off + TX_META_LEN:off + TX_META_LEN + 42 + 7])
    field = struct.unpack_from("!H", written, 40)[0]
    pseudo = sum(struct.unpack("!4H", socket.inet_aton(RELAY) + socket.inet_aton(PEER)))
    assert field == (pseudo + 17 + 15) % 0xFFFF  # the pseudo-header only
    sent = xsk.sent[0]  # what the kernel sends: the same frame but the completed checksum
    assert sent[:40] == written[:40] and sent[42:] == written[42:] == b"payload"
    assert struct.unpack_from("!H", sent, 40)[0] == udp_checksum(
        socket.inet_aton(RELAY), socket.inet_aton(PEER), 30000, 5000, b"payload")


def test_an_unresolved_next_hop_goes_back_to_the_caller_counted():
    eg, xsk = _egress(None)
    eg.add(7, [(b"a", (PEER, 5000)), (b"b", (PEER, 5000))])
    assert eg.flush() == [0, 1]
    assert eg.errors == {"no_route": 2} and eg.rejected == 2 and xsk.sent == []


def test_positions_run_across_adds_and_only_failures_come_back():
    eg, xsk = _egress(Hop(2, MAC_A, MAC_B), frames=8, ring=3)
    eg.add(7, [(b"1", (PEER, 5000)), (b"2", (PEER, 5000))])
    eg.add(99, [(b"unbound", (PEER, 5000))])  # an endpoint never bound: position 2
    eg.add(7, [(b"3", (PEER, 5000)), (b"4", (PEER, 5000))])  # the ring takes only one more
    eg.add(7, [(b"x" * 2048, (PEER, 5000))])  # larger than a frame
    assert eg.flush() == [2, 4, 5]
    assert eg.errors == {"family": 1, "no_frame": 1, "too_big": 1}
    assert [f[42:] for f in xsk.sent] == [b"1", b"2", b"3"]
    assert len(xsk.free) == 8  # a refused frame went back to the free list


def test_a_destination_of_the_other_family_is_refused():
    eg, _ = _egress(Hop(2, MAC_A, MAC_B))
    eg.add(7, [(b"a", ("2001:db8::1", 5000))])
    eg.add(7, [(b"b", ("not an address", 5000))])
    assert eg.flush() == [0, 1] and eg.errors == {"family": 2}


def test_the_reader_hands_out_ip_packets_and_keeps_frames_until_done():
    xsk = FakeXsk()
    frames = {
        0: MAC_A + MAC_B + b"\x08\x00" + b"ipv4 packet",
        2048: MAC_A + MAC_B + b"\x86\xdd" + b"ipv6 packet",
        4096: MAC_A + MAC_B + b"\x08\x06" + b"arp",
    }
    for off, f in frames.items():
        xsk.umem[off:off + len(f)] = f
        xsk.rx_descs.append((off, len(f)))
    reader = XskReader(xsk, batch=2)  # type: ignore[arg-type]
    first = reader.recv_batch()
    assert [(bytes(p), i) for p, i in first] == [(b"ipv4 packet", 2), (b"ipv6 packet", 2)]
    assert xsk.released == []
    assert reader.recv_batch() == [] and reader.not_ip == 1
    reader.done()
    assert xsk.released == [0, 2048, 4096]
    reader.done()
    assert xsk.released == [0, 2048, 4096]


# -- next hops -------------------------------------------------------------------------


def _reply(mtype: int, seq: int, body: bytes) -> bytes:
    return nl.message(mtype, 0, seq, body)


def _route_reply(seq: int, oif: int, gw: Optional[bytes] = None, rtype: int = 1) -> bytes:
    body = struct.pack("=BBBBBBBBI", socket.AF_INET, 32, 0, 0, 254, 0, 0, rtype, 0)
    body += nl.attr(nexthop.RTA_OIF, struct.pack("=I", oif))
    if gw:
        body += nl.attr(nexthop.RTA_GATEWAY, gw)
    return _reply(nexthop.RTM_NEWROUTE, seq, body)


def _neigh_reply(seq: int, state: int, mac: bytes = MAC_B) -> bytes:
    body = struct.pack("=BBHiHBB", socket.AF_INET, 0, 0, 3, state, 0, 1)
    body += nl.attr(nexthop.NDA_DST, socket.inet_aton(PEER)) + nl.attr(nexthop.NDA_LLADDR, mac)
    return _reply(nexthop.RTM_NEWNEIGH, seq, body)


def _error(seq: int, err: int) -> bytes:
    return _reply(nl.NLMSG_ERROR, seq, struct.pack("=i", -err) + bytes(16))


def test_the_readers_overflow_is_the_kernels_drops_by_reason():
    xsk = FakeXsk()
    reader = XskReader(xsk)  # type: ignore[arg-type]
    # the kernel counts a frame it had no free frame for in rx_dropped as well
    xsk.stats.update(rx_ring_full=5, rx_fill_ring_empty_descs=2, rx_dropped=3,
                     tx_invalid_descs=9)  # not a receive drop
    assert reader.count_overflows() == 8
    assert reader.drops == {"rx_ring_full": 5, "fill_ring_empty": 2, "other": 1}


def test_route_and_neighbour_replies_parse():
    assert nexthop.parse_route(_route_reply(1, 3)) == (3, None)
    gw = socket.inet_aton("198.51.100.65")
    assert nexthop.parse_route(_route_reply(1, 3, gw)) == (3, gw)
    assert nexthop.parse_route(_route_reply(1, 3, rtype=6)) is None  # unreachable
    assert nexthop.parse_route(_error(1, 101)) is None  # ENETUNREACH
    assert nexthop.parse_neigh(_neigh_reply(1, 0x02)) == MAC_B  # REACHABLE
    assert nexthop.parse_neigh(_neigh_reply(1, 0x04)) == MAC_B  # STALE: usable
    assert nexthop.parse_neigh(_neigh_reply(1, 0x01)) is None  # INCOMPLETE
    assert nexthop.parse_neigh(_neigh_reply(1, 0x20)) is None  # FAILED
    assert nexthop.parse_neigh(_error(1, 2)) is None  # ENOENT: no entry
    req = nexthop.route_request(5, socket.inet_aton(PEER))
    assert struct.unpack_from("=HHI", req, 4) == (nexthop.RTM_GETROUTE, nl.NLM_F_REQUEST, 5)


class FakeRtnl:
    """Answers route and neighbour requests from tables; counts them."""

    def __init__(self, routes: Dict[bytes, int], neighbours: Dict[bytes, int]) -> None:
        self.routes = routes
        self.neighbours = neighbours
        self.seq = 0
        self.sent: List[int] = []
        self.replies: List[bytes] = []
        self.stale: List[bytes] = []
        self.srcs: List[Optional[bytes]] = []

    def next_seq(self) -> int:
        self.seq += 1
        return self.seq

    def send(self, msg: bytes, op: str = "") -> None:
        mtype, seq = struct.unpack_from("=H", msg, 4)[0], struct.unpack_from("=I", msg, 8)[0]
        self.sent.append(mtype)
        attrs = nl.attr_map(msg, 16 + 12 if mtype == nexthop.RTM_GETROUTE else 16 + 12)
        addr = attrs[nexthop.RTA_DST if mtype == nexthop.RTM_GETROUTE else nexthop.NDA_DST]
        self.srcs.append(attrs.get(nexthop.RTA_SRC) if mtype == nexthop.RTM_GETROUTE
                         else None)
        if mtype == nexthop.RTM_GETROUTE:
            oif = self.routes.get(addr)
            reply = _route_reply(seq, oif) if oif else _error(seq, 101)
        else:
            state = self.neighbours.get(addr)
            reply = _neigh_reply(seq, state) if state else _error(seq, 2)
        self.replies = self.stale + [reply]
        self.stale = []

    def recv(self, deadline=None, idle=None, op="") -> bytes:
        return self.replies.pop(0)

    def close(self) -> None:
        pass


def test_next_hops_are_cached_and_a_missing_one_is_asked_again_after_retry():
    peer = socket.inet_aton(PEER)
    rtnl = FakeRtnl({peer: 3}, {})
    now = [100.0]
    hops = NextHops(lambda i: i in (2, 3), ttl=5.0, retry=0.2, clock=lambda: now[0],
                    sock=rtnl, macs={3: MAC_A})  # type: ignore[arg-type]
    assert hops.get(peer) is None and hops.misses == 1  # no neighbour entry yet
    assert hops.get(peer) is None and hops.lookups == 2  # cached: no new request
    rtnl.neighbours[peer] = 0x02
    now[0] += 0.3
    assert hops.get(peer) == Hop(3, MAC_A, MAC_B) and hops.lookups == 4
    now[0] += 4.0
    assert hops.get(peer) == Hop(3, MAC_A, MAC_B) and hops.lookups == 4  # within ttl
    now[0] += 2.0
    hops.get(peer)
    assert hops.lookups == 6  # expired: asked again


def test_a_route_out_of_an_interface_without_a_socket_is_not_now():
    peer = socket.inet_aton(PEER)
    rtnl = FakeRtnl({peer: 9}, {peer: 0x02})
    hops = NextHops(lambda i: i == 3, sock=rtnl)  # type: ignore[arg-type]
    assert hops.get(peer) is None
    assert rtnl.sent == [nexthop.RTM_GETROUTE]  # no neighbour asked for


def test_a_late_reply_to_an_earlier_request_is_skipped():
    peer = socket.inet_aton(PEER)
    rtnl = FakeRtnl({peer: 3}, {peer: 0x02})
    hops = NextHops(lambda i: True, sock=rtnl, macs={3: MAC_A})  # type: ignore[arg-type]
    rtnl.seq = 10
    rtnl.stale = [_route_reply(3, 7)]  # seq 3: an answer nobody waits for now
    assert hops.get(peer) == Hop(3, MAC_A, MAC_B)


@pytest.mark.parametrize("bad,errors", [(b"", 0), (b"\x00" * 7, 0), (b"\xff" * 40, 0),
                                        (None, 1)])
def test_garbage_replies_are_no_route_not_a_crash(bad, errors):
    """A reply the codec cannot use is a miss (cached for `retry`); one it cannot even
    decode (a length past the buffer) is also counted as an error."""
    peer = socket.inet_aton(PEER)

    class Junk(FakeRtnl):
        def recv(self, deadline=None, idle=None, op=""):
            if bad is None:  # claims 64 bytes, has 20
                return struct.pack("=IHHII", 64, 24, 0, self.seq, 0) + bytes(4)
            return struct.pack("=IHHII", 16 + len(bad), 24, 0, self.seq, 0) + bad

    rtnl = Junk({}, {})
    hops = NextHops(lambda i: True, sock=rtnl)  # type: ignore[arg-type]
    assert hops.get(peer) is None
    assert (hops.misses, hops.errors) == (1, errors)


def test_the_route_is_asked_for_from_the_relay_address():
    """Rules that route by source (`ip rule from <relay address>`) apply: the egress
    names the endpoint's relay address, the request carries it, the cache keys on it."""
    peer = socket.inet_aton(PEER)
    rtnl = FakeRtnl({peer: 3}, {peer: 0x02})
    hops = NextHops(lambda i: True, sock=rtnl, macs={3: MAC_A})  # type: ignore[arg-type]
    a, b = socket.inet_aton("198.51.100.1"), socket.inet_aton("198.51.100.65")
    assert hops.get(peer, a) == Hop(3, MAC_A, MAC_B)
    assert hops.get(peer, b) == Hop(3, MAC_A, MAC_B)
    assert hops.get(peer, a) is not None
    assert rtnl.srcs == [a, None, b, None]  # two sources: two routes asked for, then cached
    eg, _ = _egress(Hop(2, MAC_A, MAC_B))
    eg.add(7, [(b"x", (PEER, 5000))])
    eg.flush()
    assert eg.hops.sources == [socket.inet_aton(RELAY)]  # type: ignore[attr-defined]
