"""Packet mode's worker path, sans kernel: frames read from an AF_XDP socket (faked) are
decided one packet at a time, queued on the egress, sent in one flush per round, and
what the egress gives back goes out of the endpoint's UDP socket, all of it counted as
socket mode counts it."""

from __future__ import annotations

import socket
import struct
from typing import List, Tuple

from fastpath import channel
from fastpath.contract import LegSpec, StreamSpec, unit_id
from fastpath.worker.loop import SocketWorker
from fastpath.worker.nexthop import Hop
from fastpath.worker.raw_egress import udp_checksum
from fastpath.worker.xsk_io import XskEgress, XskReader
from tests.unit.test_xsk_io import FakeHops, FakeXsk

RELAY = "127.0.0.1"
CALLER = "198.51.100.10"
CALLEE = "198.51.100.70"  # reached through the AF_XDP socket (a next hop is known)
MAC_A = bytes.fromhex("020000000001")
MAC_B = bytes.fromhex("020000000002")


def _frame(src: str, sport: int, dst: str, dport: int, payload: bytes) -> bytes:
    s, d = socket.inet_aton(src), socket.inet_aton(dst)
    ulen = 8 + len(payload)
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + ulen, 0, 0x4000, 64, 17, 0, s, d)
    udp = struct.pack("!HHHH", sport, dport, ulen, udp_checksum(s, d, sport, dport, payload))
    return MAC_A + MAC_B + b"\x08\x00" + ip + udp + payload


def _bound(n: int) -> Tuple[List[int], List[int]]:
    fds, ports = [], []
    for _ in range(n):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM | socket.SOCK_NONBLOCK)
        s.bind((RELAY, 0))
        ports.append(s.getsockname()[1])
        fds.append(s.detach())
    return fds, ports


def test_a_round_of_single_packets_is_sent_in_one_kick_and_what_has_no_route_falls_back():
    mine, theirs = channel.pair()
    callee2 = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)  # reached by the fallback
    callee2.bind((RELAY, 0))
    callee2.settimeout(2.0)
    worker = SocketWorker(mine, batch=64)
    xsk = FakeXsk(frames=64, ring=32)
    reader = XskReader(xsk, 64)  # type: ignore[arg-type]
    worker.readers[xsk.fileno()] = reader  # type: ignore[assignment]
    worker.xsk_readers.append(reader)
    worker.egress = XskEgress({xsk.ifindex: xsk},  # type: ignore[dict-item]
                              FakeHops({socket.inet_aton(CALLEE): Hop(2, MAC_B, MAC_A)}))
    try:
        relay_ports = []
        for i, callee in enumerate(((CALLEE, 5000), callee2.getsockname())):
            fds, ports = _bound(4)
            stream = StreamSpec(0, LegSpec("A", RELAY, ports[0], (CALLER, 4000 + i)),
                                LegSpec("B", RELAY, ports[2], callee))
            worker._handle(channel.InstallSession(unit_id(i + 1, 0), stream,
                                                  tuple((RELAY, p) for p in ports)), fds)
            relay_ports.append(ports)
        # one round: call 1, call 2 (no next hop to 127.0.0.1), a stranger, call 1 again
        sent = [(CALLER, 4000, relay_ports[0][0], b"one" * 20),
                (CALLER, 4001, relay_ports[1][0], b"two" * 30),
                ("198.51.100.99", 9, relay_ports[0][2], b"evil"),
                (CALLER, 4000, relay_ports[0][0], b"three" * 9)]
        for k, (src, sport, dport, payload) in enumerate(sent):
            off = (32 + k) * xsk.frame_size  # the upper half receives
            frame = _frame(src, sport, RELAY, dport, payload)
            xsk.umem[off:off + len(frame)] = frame
            xsk.rx_descs.append((off, len(frame)))
        xsk.free = [i * xsk.frame_size for i in range(32)]
        worker._ingest(reader, 1.0)
        worker._flush_egress()
        reader.done()

        assert xsk.kicks == 1 and [f[42:] for f in xsk.sent] == [b"one" * 20, b"three" * 9]
        assert all(f[:14] == MAC_A + MAC_B + b"\x08\x00" for f in xsk.sent)
        assert callee2.recvfrom(2048) == (b"two" * 30, ("127.0.0.1", relay_ports[1][2]))
        assert worker.egress.errors == {"no_route": 1}
        assert worker.egress_fallback == 1 and worker.unknown_flow == 0
        assert sorted(xsk.released) == [(32 + k) * xsk.frame_size for k in range(4)]
        t = worker.table
        assert (t.forwarded_packets, t.forwarded_bytes) == (3, 60 + 90 + 45)
        a1, _, b1, _ = t.sessions[unit_id(1, 0)].endpoints
        a2, _, b2, _ = t.sessions[unit_id(2, 0)].endpoints
        assert (a1.in_packets, b1.out_packets, b1.out_bytes) == (2, 2, 105)
        assert (a2.in_packets, b2.out_packets, b2.out_bytes) == (1, 1, 90)
        assert b1.drops[0] == 1 and b1.peer is None  # the stranger, sent to B's port
        assert worker.egress_runs == [] and worker.egress.pending == 0
    finally:
        for fd in list(worker.addrs):
            worker._close(fd)
        worker.epoll.close()
        callee2.close()
        mine.close()
        theirs.close()
