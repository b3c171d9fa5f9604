"""Packet mode ingestion: AF_PACKET tap + BPF on the relay, raw-priority drop rule behind it."""

from __future__ import annotations

import json
import random
import select
import socket
import struct
import subprocess
import time
from collections import Counter

import pytest

from bench.netns import socket_in
from fastpath.kernel.taps import destroy_rules, drop_rules, open_packet_socket
from fastpath.packet import PacketIoError, parse_media
from fastpath.worker.packet_io import PacketReader
from fastpath.worker.raw_egress import IPPROTO_RAW, RawEgress, ipv4_udp_header, open_raw_sockets

pytestmark = pytest.mark.netns

TABLE = "lrkpkt"
LO, HI = 30000, 30099
A4, A6 = socket.AF_INET, socket.AF_INET6


def _nft(ns: str, text: str, *args: str) -> str:
    cmd = ["ip", "netns", "exec", ns, "nft", *args] + (["-f", "-"] if text else [])
    proc = subprocess.run(cmd, input=text, capture_output=True, text=True, timeout=20)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def _dropped(ns: str) -> int:
    out = json.loads(_nft(ns, "", "-j", "list", "counter", "inet", TABLE, "dropped"))
    return next(o["counter"]["packets"] for o in out["nftables"] if "counter" in o)


def _udp(ns: str, family: int, ip: str, port: int = 0) -> socket.socket:
    s = socket_in(ns, family)
    s.bind((ip, port))
    s.settimeout(2.0)
    return s


def _has_error(s: socket.socket) -> bool:
    """A socket error (e.g. an ICMP port-unreachable) is pending on `s`."""
    poller = select.poll()
    poller.register(s, select.POLLERR)
    return bool(poller.poll(0))


def _drain(s: socket.socket) -> list:
    """Everything queued on `s` right now (a pending ICMP error raises)."""
    out = []
    s.setblocking(False)
    for _ in range(1000):
        try:
            out.append(s.recv(4096))
        except BlockingIOError:
            break
    return out


@pytest.mark.parametrize("prefer", ["mmsg", "plain"])
def test_tap_reads_in_range_media_and_kernel_never_sees_it(topo, prefer):
    r, c = topo.relay, topo.caller
    socks: list = []
    _nft(r.ns, drop_rules(TABLE, LO, HI, [r.ip4, r.ip6], ifnames=["vc1"]))
    try:
        # relay-side sockets: an in-range one must stay empty, the rest see kernel delivery
        in4, in6 = _udp(r.ns, A4, r.ip4, 30000), _udp(r.ns, A6, r.ip6, 30000)
        out4, out6 = _udp(r.ns, A4, r.ip4, 31000), _udp(r.ns, A6, r.ip6, 31000)
        ext4 = _udp(r.ns, A4, topo.relay_ext.ip4, 30000)  # in range, not a filtered address
        socks += [in4, in6, out4, out6, ext4]
        raw = socket_in(r.ns, socket.AF_PACKET, socket.SOCK_DGRAM, 0)
        reader = PacketReader(open_packet_socket("vc1", LO, HI, dst_ips=[r.ip4, r.ip6],
                                                 sock=raw), batch=64, prefer=prefer)
        socks.append(reader)
        assert reader.name == prefer and reader.ifindex > 0

        c4, c6 = _udp(c.ns, A4, c.ip4, 4000), _udp(c.ns, A6, c.ip6, 4000)
        socks += [c4, c6]
        # neighbour resolution first, with out-of-range traffic the kernel delivers
        c4.sendto(b"warm", (r.ip4, 31000))
        c6.sendto(b"warm", (r.ip6, 31000))
        assert out4.recv(100) == b"warm" and out6.recv(100) == b"warm"

        # connected senders to unbound ports: an ICMP port-unreachable would show up
        u4, u6 = _udp(c.ns, A4, c.ip4), _udp(c.ns, A6, c.ip6)
        u4o, u6o = _udp(c.ns, A4, c.ip4), _udp(c.ns, A6, c.ip6)
        socks += [u4, u6, u4o, u6o]
        u4.connect((r.ip4, 30001))
        u6.connect((r.ip6, 30001))
        u4o.connect((r.ip4, 31001))  # control: out of range, so the kernel answers
        u6o.connect((r.ip6, 31001))

        expected = []  # (family, src, sport, dst, dport, payload) the tap must read
        plan = [(c4, A4, r.ip4, 30000, 20), (c4, A4, r.ip4, HI, 5),
                (c6, A6, r.ip6, 30000, 10), (c6, A6, r.ip6, 30050, 5)]
        for s, fam, dst, port, count in plan:
            sport = s.getsockname()[1]
            for i in range(count):
                payload = f"media {fam} {port} {i}".encode() * (1 + i % 3)
                s.sendto(payload, (dst, port))
                expected.append((fam, s.getsockname()[0], sport, dst, port, payload))
        for s, fam, dst in ((u4, A4, r.ip4), (u6, A6, r.ip6)):
            for i in range(3):
                s.send(b"unbound %d" % i)
                expected.append((fam, s.getsockname()[0], s.getsockname()[1], dst, 30001,
                                 b"unbound %d" % i))
        for i in range(10):  # out of range: kernel delivers, tap must not see
            c4.sendto(b"out %d" % i, (r.ip4, 31000))
            c6.sendto(b"out %d" % i, (r.ip6, 31000))
        for port in (LO - 1, HI + 1):  # range edges
            c4.sendto(b"edge", (r.ip4, port))
            c6.sendto(b"edge", (r.ip6, port))
        for i in range(3):  # relay port, but an address the filter and the rule exclude
            c4.sendto(b"ext %d" % i, (topo.relay_ext.ip4, 30000))
        u4o.send(b"x")
        u6o.send(b"x")

        got, sizes = [], []
        first = True
        deadline = time.monotonic() + 5.0
        while time.monotonic() < deadline and len(got) < len(expected):
            select.select([reader], [], [], 0.2)
            batch = reader.recv_batch(3 if first else 64)
            first = False
            if batch:
                sizes.append(len(batch))
                got += batch
        # settled: every tapped packet met the drop rule and the controls' port-unreachables
        # (sent last) are back; the tap holds all it will ever get, stragglers included
        deadline = time.monotonic() + 5.0
        while not (_dropped(r.ns) == len(expected) and _has_error(u4o) and _has_error(u6o)):
            assert time.monotonic() < deadline, "tapped packets or ICMP errors missing"
            time.sleep(0.05)
        got += reader.recv_batch()
        assert sizes[0] == 3 and max(sizes) > 3, sizes  # several packets per call
        assert len(got) == len(expected)
        assert {idx for _, idx in got} == {reader.ifindex}
        parsed = [parse_media(p) for p, _ in got]
        assert Counter(parsed) == Counter(expected)
        assert reader.truncated == 0 and reader.recv_errors == {}

        # the kernel did not deliver the tapped packets, nor answer them with ICMP
        assert _drain(in4) == [] and _drain(in6) == []
        assert _drain(u4) == [] and _drain(u6) == []
        for s in (u4o, u6o):  # the control did get a port-unreachable
            with pytest.raises(ConnectionRefusedError):
                _drain(s)
        assert _drain(out4) == [b"out %d" % i for i in range(10)]
        assert _drain(out6) == [b"out %d" % i for i in range(10)]
        assert _drain(ext4) == [b"ext %d" % i for i in range(3)]
        assert _dropped(r.ns) == len(expected)
    finally:
        for s in socks:
            s.close()
        _nft(r.ns, destroy_rules(TABLE))
    assert TABLE not in _nft(r.ns, "", "list", "tables")
    _nft(r.ns, destroy_rules(TABLE))  # idempotent


def test_a_tap_that_falls_behind_counts_what_the_kernel_dropped(topo):
    """A worker that does not read in time: the kernel drops at the tap's full buffer,
    and count_overflows() says how many (read + dropped == sent, nothing unaccounted)."""
    r, c = topo.relay, topo.caller
    raw = socket_in(r.ns, socket.AF_PACKET, socket.SOCK_DGRAM, 0)
    # the smallest buffer the kernel allows (it doubles and floors the value): a few frames
    reader = PacketReader(open_packet_socket("vc1", LO, HI, dst_ips=[r.ip4], sock=raw,
                                             rcvbuf=1), batch=64)
    sender = _udp(c.ns, A4, c.ip4, 4000)
    warm = _udp(r.ns, A4, r.ip4, 31000)
    try:
        # neighbour resolution first (out of range: the kernel delivers it), so no
        # packet below waits in, or is dropped from, the unresolved-neighbour queue
        sender.sendto(b"warm", (r.ip4, 31000))
        assert warm.recv(100) == b"warm"
        assert reader.count_overflows() == 0
        sent = 300
        for i in range(sent):
            sender.sendto(b"media %d" % i, (r.ip4, LO))
        read = dropped = 0
        deadline = time.monotonic() + 5.0
        while read + dropped < sent and time.monotonic() < deadline:
            got = reader.recv_batch()
            read += len(got)
            dropped = reader.count_overflows()
            if not got:
                time.sleep(0.01)  # softirq work deferred to ksoftirqd on a loaded machine
        assert 0 < read < sent and dropped > 0
        assert read + dropped == sent
        assert reader.count_overflows() == dropped  # the kernel reset its count; ours adds
    finally:
        sender.close()
        warm.close()
        reader.close()


def test_open_packet_socket_errors(topo):
    raw = socket_in(topo.relay.ns, socket.AF_PACKET, socket.SOCK_DGRAM, 0)
    with pytest.raises(PacketIoError):
        open_packet_socket("nosuchdev0", LO, HI, sock=raw)
    assert raw.fileno() == -1  # closed on failure
    with pytest.raises(PacketIoError):
        open_packet_socket("vc1", HI, LO)
    with pytest.raises(PacketIoError):
        open_packet_socket("bad name", LO, HI)


# --- raw egress (packet mode's batched send) ---


def _snmp_udp(ns: str, key: str = "Udp:") -> dict:
    """UDP counters of a namespace (/proc/net/snmp or snmp6 as the kernel keeps them)."""
    if key == "Udp:":
        out = subprocess.run(["ip", "netns", "exec", ns, "cat", "/proc/net/snmp"],
                             capture_output=True, text=True, timeout=20).stdout
        rows = [line.split()[1:] for line in out.splitlines() if line.startswith(key)]
        return dict(zip(rows[0], map(int, rows[1])))
    out = subprocess.run(["ip", "netns", "exec", ns, "cat", "/proc/net/snmp6"],
                         capture_output=True, text=True, timeout=20).stdout
    return {k: int(v) for k, v in (line.split() for line in out.splitlines() if line)}


def _ipv6_ready(topo) -> None:
    """Wait (bounded) until no address is tentative: before duplicate address detection
    of the link-local addresses ends, neighbour discovery cannot resolve anybody and
    IPv6 packets (from any socket) wait in the neighbour queue or are lost."""
    deadline = time.monotonic() + 10.0
    while time.monotonic() < deadline:
        if not any(subprocess.run(["ip", "netns", "exec", ns, "ip", "-6", "addr", "show",
                                   "tentative"], capture_output=True, text=True,
                                  timeout=20).stdout.strip() for ns in topo.namespaces):
            return
        time.sleep(0.1)
    raise AssertionError("IPv6 addresses still tentative after 10 s")


def _raw_egress(ns: str, capacity: int = 256) -> RawEgress:
    return RawEgress(open_raw_sockets(make=lambda fam: socket_in(ns, fam, socket.SOCK_RAW,
                                                                 IPPROTO_RAW)), capacity)


def test_raw_egress_batches_across_endpoints_with_valid_checksums(topo):
    """One flush sends packets of 50 endpoints with one sendmmsg per family; each arrives
    on a plain UDP socket with the relay's address and port as source.  The receiving
    kernel verifies the UDP checksum (shown below: a wrong one is dropped and counted in
    InCsumErrors), so delivery through a UDP socket proves every checksum valid."""
    r, c, e = topo.relay, topo.caller, topo.callee
    _ipv6_ready(topo)
    socks: list = []
    egress = _raw_egress(r.ns)
    try:
        rx = {A4: _udp(c.ns, A4, c.ip4, 4000), A6: _udp(e.ns, A6, e.ip6, 5000)}
        socks += list(rx.values())
        # relay-side UDP sockets hold the ports, as in packet mode
        relay_socks = {}
        for i in range(50):
            fam = A4 if i % 2 == 0 else A6
            ip = r.ip4 if fam == A4 else r.ip6
            s = _udp(r.ns, fam, ip, LO + i)
            socks.append(s)
            relay_socks[s.fileno()] = (fam, ip, LO + i)
            egress.bind(s.fileno(), ip, LO + i)
        expected = Counter()
        rng = random.Random(3)
        for fd, (fam, ip, port) in relay_socks.items():
            dest = (c.ip4, 4000) if fam == A4 else (e.ip6, 5000)
            out = []
            for k in range(4):
                payload = bytes(rng.randrange(256) for _ in range(rng.choice((0, 1, 171, 172))))
                payload += b"#%d" % k
                out.append((payload, dest))
                expected[(fam, payload, (ip, port))] += 1
            egress.add(fd, out)
        assert egress.pending == 200
        assert egress.flush() == []
        assert egress.packets == 200 and egress.calls == 2, (egress.calls, egress.errors)
        got = Counter()
        for fam, s in rx.items():
            for data, addr in _drain_wait(s, 100):
                got[(fam, data, addr[:2])] += 1
        assert got == expected

        # control: a corrupted UDP checksum is dropped by the receiver and counted
        before = _snmp_udp(c.ns)["InCsumErrors"]
        rs = socket_in(r.ns, A4, socket.SOCK_RAW, IPPROTO_RAW)
        socks.append(rs)
        hdr = bytearray(ipv4_udp_header(socket.inet_aton(r.ip4), socket.inet_aton(c.ip4),
                                        LO, 4000, b"bad sum"))
        hdr[27] ^= 0x01
        rs.sendto(bytes(hdr) + b"bad sum", (c.ip4, 0))
        good = ipv4_udp_header(socket.inet_aton(r.ip4), socket.inet_aton(c.ip4), LO, 4000,
                               b"good sum")
        rs.sendto(good + b"good sum", (c.ip4, 0))
        assert rx[A4].recv(100) == b"good sum"  # the bad one, sent first, never arrived
        assert _snmp_udp(c.ns)["InCsumErrors"] == before + 1
    finally:
        egress.close()
        for s in socks:
            s.close()


def _drain_wait(s: socket.socket, n: int) -> list:
    out = []
    s.settimeout(2.0)
    for _ in range(n):
        try:
            out.append(s.recvfrom(4096))
        except socket.timeout:
            break
    return out


def test_raw_egress_headers_match_the_kernels_udp_packets(topo):
    """TTL, DF, ID and traffic class as the kernel's own UDP socket sends them, seen by
    a raw IPPROTO_UDP socket on the receiver (it gets the whole IP datagram)."""
    r, c = topo.relay, topo.caller
    socks: list = []
    egress = _raw_egress(r.ns)
    try:
        sniff = socket_in(c.ns, A4, socket.SOCK_RAW, socket.IPPROTO_UDP)
        sniff.settimeout(2.0)
        sink = _udp(c.ns, A4, c.ip4, 4000)
        kernel = _udp(r.ns, A4, r.ip4, LO)
        socks += [sniff, sink, kernel]
        kernel.sendto(b"kernel", (c.ip4, 4000))
        egress.bind(kernel.fileno(), r.ip4, LO)
        egress.add(kernel.fileno(), [(b"raw", (c.ip4, 4000)), (b"raw2", (c.ip4, 4000))])
        assert egress.flush() == []
        pkts = {}
        for _ in range(20):
            p = sniff.recv(4096)
            if p[20:22] == struct.pack("!H", LO):
                pkts[p[28:]] = p
            if len(pkts) == 3:
                break
        k, w, w2 = pkts[b"kernel"], pkts[b"raw"], pkts[b"raw2"]
        # version/IHL, TOS, flags/fragment offset, TTL, protocol, addresses
        fields = lambda p: (p[0], p[1], p[6:8], p[8], p[9], p[12:20])  # noqa: E731
        assert fields(w) == fields(k) == fields(w2)
        assert w[6] & 0x40  # DF
        assert w[4:6] != w2[4:6]  # IDs advance, as the kernel's do
        assert [sink.recv(100) for _ in range(3)] == [b"kernel", b"raw", b"raw2"]
    finally:
        egress.close()
        for s in socks:
            s.close()


@pytest.mark.parametrize("family", ["ipv4", "ipv6"])
def test_raw_egress_send_failure_is_handed_back(topo, family):
    """A packet larger than the egress link's MTU fails on the raw socket (EMSGSIZE: a
    header-including send is never fragmented); flush returns its position, the others
    of the batch still leave."""
    r, c = topo.relay, topo.caller
    fam = A4 if family == "ipv4" else A6
    rip, cip = (r.ip4, c.ip4) if fam == A4 else (r.ip6, c.ip6)
    subprocess.run(["ip", "netns", "exec", r.ns, "ip", "link", "set", "vc1", "mtu", "1280"],
                   check=True, timeout=20)
    _ipv6_ready(topo)
    socks: list = []
    egress = _raw_egress(r.ns)
    try:
        sink = _udp(c.ns, fam, cip, 4000)
        relay = _udp(r.ns, fam, rip, LO)
        socks += [sink, relay]
        egress.bind(relay.fileno(), rip, LO)
        dest = (cip, 4000)
        egress.add(relay.fileno(), [(b"small 0", dest), (b"x" * 1400, dest), (b"small 2", dest)])
        assert egress.flush() == [1]
        assert egress.errors == {"EMSGSIZE": 1} and egress.packets == 2
        assert [d for d, _ in _drain_wait(sink, 3)] == [b"small 0", b"small 2"]
    finally:
        egress.close()
        for s in socks:
            s.close()
