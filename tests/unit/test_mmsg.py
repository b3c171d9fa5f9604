"""Tests of fastpath.worker.mmsg: batched UDP I/O over loopback, both implementations."""

from __future__ import annotations

import errno
import os
import select
import socket
import time

import pytest

from fastpath.worker import mmsg
from fastpath.worker.mmsg import SLOT_SIZE, make_batch_io, mmsg_available

# "mmsg-alt" is MmsgBatchIO with the other interpreter's tuning of the
# per-datagram loops, so both code paths run on every interpreter.  recvmmsg/sendmmsg
# (cffi, Linux) are there wherever the project runs: without them these tests fail
# (test_mmsg_is_available_here says why), they are never skipped.
IMPLS = ["plain", "mmsg", "mmsg-alt"]


def new_io(batch, impl):
    if impl == "mmsg-alt":
        io = mmsg.MmsgBatchIO(batch, vector_reads=mmsg._PYPY)
        assert io._vector_reads is mmsg._PYPY
        return io
    io = make_batch_io(batch, impl)
    assert io.name == impl
    return io


# IPv6 loopback (::1) exists wherever the project runs; without it the v6 cases fail
FAMILIES = [
    pytest.param((socket.AF_INET, "127.0.0.1"), id="v4"),
    pytest.param((socket.AF_INET6, "::1"), id="v6"),
]

WAIT = 2.0  # seconds to wait for loopback datagrams / ICMP errors


@pytest.fixture(params=IMPLS)
def impl(request):
    return request.param


@pytest.fixture(params=FAMILIES)
def fam(request):
    return request.param


@pytest.fixture
def udp():
    """Factory of bound, non-blocking loopback UDP sockets; all closed at teardown."""
    socks = []

    def make(family=socket.AF_INET, host="127.0.0.1", port=0, rcvbuf=1 << 22, v6only=None):
        s = socket.socket(family, socket.SOCK_DGRAM)
        socks.append(s)
        if v6only is not None:
            s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, int(v6only))
        try:
            s.setsockopt(socket.SOL_SOCKET, getattr(socket, "SO_RCVBUFFORCE", 33), rcvbuf)
        except OSError:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        s.bind((host, port))
        s.setblocking(False)
        return s

    yield make
    for s in socks:
        s.close()


@pytest.fixture
def pair(udp, fam):
    family, host = fam
    return udp(family, host), udp(family, host)


def addr_of(sock):
    return sock.getsockname()[:2]


def wait_for(sock, events=select.POLLIN, timeout=WAIT):
    p = select.poll()
    p.register(sock.fileno(), events)
    return p.poll(int(timeout * 1000))


def drain(io, sock, n, timeout=WAIT):
    """recv() until n datagrams arrived or nothing came for `timeout`."""
    got = []
    batches = []
    while len(got) < n:
        if not wait_for(sock, timeout=timeout):
            break
        chunk = io.recv(sock.fileno())
        assert len(chunk) <= io.batch
        if chunk:
            batches.append(len(chunk))
        got.extend(chunk)
    return got, batches


def assert_empty(io, sock):
    # nothing further is readable right now
    assert not wait_for(sock, timeout=0.05)
    assert io.recv(sock.fileno()) == []


# ---------------------------------------------------------------------------
# factory


def test_mmsg_is_available_here():
    ffi, lib = mmsg.load()
    assert ffi is not None and lib is not None, mmsg.unavailable_reason()
    assert mmsg_available(), mmsg.unavailable_reason()
    assert mmsg.unavailable_reason() is None


def test_make_batch_io_variants():
    plain = make_batch_io(16, "plain")
    assert plain.name == "plain" and plain.batch == 16
    auto = make_batch_io()
    assert auto.batch == 64
    assert auto.name == "mmsg"  # available here (test_mmsg_is_available_here)
    with pytest.raises(ValueError):
        make_batch_io(8, "bogus")
    with pytest.raises(ValueError):
        make_batch_io(0, "plain")
    assert make_batch_io(100000, "plain").batch == mmsg.MAX_BATCH


def test_make_batch_io_mmsg():
    io = make_batch_io(32, "mmsg")
    assert io.name == "mmsg" and io.batch == 32
    assert io.truncated == 0 and io.send_errors == {} and io.recv_errors == {}


def test_mmsg_strict_when_unavailable(monkeypatch):
    monkeypatch.setattr(mmsg, "_available", False)
    with pytest.raises(RuntimeError):
        make_batch_io(8, "mmsg")
    assert make_batch_io(8, "auto").name == "plain"


@pytest.mark.parametrize(
    "addr",
    [
        ("127.0.0.1", 5060),
        ("10.1.2.3", 0),
        ("255.255.255.255", 65535),
        ("::1", 30000),
        ("2001:db8::1", 1),
        ("::ffff:192.0.2.1", 4000),
    ],
)
def test_sockaddr_roundtrip(addr):
    raw = mmsg.encode_sockaddr(addr)
    assert len(raw) == (28 if ":" in addr[0] else 16)
    assert mmsg.decode_sockaddr(raw) == addr


def test_encode_sockaddr_rejects_garbage():
    for bad in [("not-an-ip", 1), ("127.0.0.1", 70000), ("127.0.0.1", -1), ("1.2.3", 5)]:
        with pytest.raises((OSError, ValueError, OverflowError)):
            mmsg.encode_sockaddr(bad)


# ---------------------------------------------------------------------------
# data path


def test_recv_empty(impl, pair):
    io = new_io(8, impl)
    _, rx = pair
    assert io.recv(rx.fileno()) == []


def test_roundtrip_in_batches(impl, pair):
    tx, rx = pair
    io = new_io(32, impl)
    n = 100
    pkts = [(b"pkt-%05d-" % i + bytes([i % 256]) * (i % 50), addr_of(rx)) for i in range(n)]
    assert io.send(tx.fileno(), pkts) == n
    assert io.send_errors == {}
    got, batches = drain(io, rx, n)
    assert [d for d, _ in got] == [d for d, _ in pkts]
    assert {a for _, a in got} == {addr_of(tx)}
    assert all(isinstance(a[0], str) and isinstance(a[1], int) for _, a in got)
    assert max(batches) > 1  # datagrams really came in batches
    assert io.truncated == 0
    assert_empty(io, rx)


def test_batch_larger_than_available(impl, pair):
    tx, rx = pair
    io = new_io(64, impl)
    pkts = [(b"only-%d" % i, addr_of(rx)) for i in range(5)]
    assert io.send(tx.fileno(), pkts) == 5
    got, _ = drain(io, rx, 5)
    assert got == [(d, addr_of(tx)) for d, _ in pkts]
    assert_empty(io, rx)


def test_send_chunks_larger_than_batch(impl, pair):
    tx, rx = pair
    io = new_io(4, impl)
    pkts = [(b"c%d" % i, addr_of(rx)) for i in range(23)]
    assert io.send(tx.fileno(), pkts) == 23
    got, batches = drain(io, rx, 23)
    assert [d for d, _ in got] == [d for d, _ in pkts]
    assert max(batches) <= 4


def test_many_sources(impl, udp, fam):
    family, host = fam
    rx = udp(family, host)
    txs = [udp(family, host) for _ in range(5)]
    io = new_io(16, impl)
    expect = []
    for rnd in range(3):
        for j, tx in enumerate(txs):
            data = b"r%d-s%d" % (rnd, j)
            assert io.send(tx.fileno(), [(data, addr_of(rx))]) == 1
            expect.append((data, addr_of(tx)))
    got, _ = drain(io, rx, len(expect))
    assert got == expect


def test_address_cache_is_bounded(impl, udp, monkeypatch):
    monkeypatch.setattr(mmsg, "ADDR_CACHE_MAX", 2)
    rx = udp()
    txs = [udp() for _ in range(6)]
    io = new_io(8, impl)
    for rnd in range(2):
        for tx in txs:
            pkts = [(b"x", addr_of(rx)), (b"y", addr_of(txs[0]))]
            assert io.send(tx.fileno(), pkts) == 2
        got, _ = drain(io, rx, len(txs))
        assert [a for _, a in got] == [addr_of(tx) for tx in txs], rnd
    for cache in ("_from_cache", "_to_cache"):
        if hasattr(io, cache):
            assert len(getattr(io, cache)) <= 2 + 1


@pytest.mark.parametrize("size", [1, 172, 1500, SLOT_SIZE])
def test_sizes(impl, pair, size):
    tx, rx = pair
    io = new_io(8, impl)
    pkts = [(bytes([(i + k) % 256 for k in range(size)]), addr_of(rx)) for i in range(10)]
    assert io.send(tx.fileno(), pkts) == 10
    got, _ = drain(io, rx, 10)
    assert [d for d, _ in got] == [d for d, _ in pkts]
    assert io.truncated == 0


def test_zero_length_datagram(impl, pair):
    tx, rx = pair
    io = new_io(8, impl)
    assert io.send(tx.fileno(), [(b"", addr_of(rx)), (b"z", addr_of(rx))]) == 2
    got, _ = drain(io, rx, 2)
    assert [d for d, _ in got] == [b"", b"z"]


def test_truncated_datagrams_are_counted_and_dropped(impl, pair):
    tx, rx = pair
    io = new_io(8, impl)
    dst = addr_of(rx)
    for data in (b"a", b"B" * (SLOT_SIZE + 1), b"b", b"C" * 9000, b"c"):
        tx.sendto(data, dst)
    got, _ = drain(io, rx, 3)
    assert got == [(b"a", addr_of(tx)), (b"b", addr_of(tx)), (b"c", addr_of(tx))]
    assert io.truncated == 2
    assert_empty(io, rx)


def test_send_oversized_datagram(impl, pair):
    """Payloads larger than a slot are still sent whole, and the slot is
    usable for normal payloads afterwards."""
    tx, rx = pair
    io = new_io(4, impl)
    dst = addr_of(rx)
    big = bytes(range(256)) * 20  # 5120 bytes
    assert io.send(tx.fileno(), [(b"s0", dst), (big, dst), (b"s1", dst)]) == 3
    assert io.send(tx.fileno(), [(b"s2", dst), (b"s3", dst), (b"s4", dst)]) == 3
    got = []
    while len(got) < 6 and wait_for(rx):
        got.append(rx.recvfrom(65536)[0])
    assert got == [b"s0", big, b"s1", b"s2", b"s3", b"s4"]


def test_send_slot_reuse_mixed_sizes_and_destinations(impl, udp):
    """Send slots are reused across chunks and calls with changing payload
    sizes (some over a slot) and destinations; every datagram stays intact."""
    rxs = [udp(), udp(), udp()]
    tx = udp()
    io = new_io(3, impl)
    sizes = [10, 10, 3000, 1, 10, 2048, 9000, 5, 5, 700, 0, 2049]
    expect = {i: [] for i in range(len(rxs))}
    for rnd in range(3):
        pkts = []
        for j, size in enumerate(sizes):
            r = (j * 7 + rnd) % len(rxs)
            data = bytes([(rnd * 31 + j + k) % 256 for k in range(size)])
            pkts.append((data, addr_of(rxs[r])))
            expect[r].append(data)
        assert io.send(tx.fileno(), pkts) == len(pkts)
    assert io.send_errors == {}
    for r, rx in enumerate(rxs):
        got = []
        while len(got) < len(expect[r]) and wait_for(rx):
            got.append(rx.recvfrom(65536)[0])
        assert got == expect[r], r


def test_accepts_bytearray_and_memoryview(impl, pair):
    tx, rx = pair
    io = new_io(4, impl)
    dst = addr_of(rx)
    assert io.send(tx.fileno(), [(bytearray(b"ba"), dst), (memoryview(b"xmvx")[1:3], dst)]) == 2
    got, _ = drain(io, rx, 2)
    assert [d for d, _ in got] == [b"ba", b"mv"]


def test_bad_address_does_not_stop_batch(impl, pair, fam):
    tx, rx = pair
    io = new_io(8, impl)
    dst = addr_of(rx)
    wrong_family = ("::1", 9) if fam[0] == socket.AF_INET else ("not-an-ip", 9)
    pkts = [(b"0", dst), (b"1", dst), (b"bad", wrong_family), (b"2", dst), (b"3", dst)]
    assert io.send(tx.fileno(), pkts) == 4
    assert io.send_errors == {"EAFNOSUPPORT" if fam[0] == socket.AF_INET else "EINVAL": 1}
    got, _ = drain(io, rx, 4)
    assert [d for d, _ in got] == [b"0", b"1", b"2", b"3"]


def test_ipv4_destination_from_dual_stack_socket(impl, udp):
    tx = udp(socket.AF_INET6, "::", v6only=False)
    rx = udp()
    io = new_io(4, impl)
    assert io.send(tx.fileno(), [(b"v4", addr_of(rx))]) == 1
    got, _ = drain(io, rx, 1)
    assert got == [(b"v4", ("127.0.0.1", tx.getsockname()[1]))]
    # and the reply arrives v4-mapped on the dual-stack socket
    assert io.send(rx.fileno(), [(b"back", ("127.0.0.1", tx.getsockname()[1]))]) == 1
    got, _ = drain(io, tx, 1)
    assert got == [(b"back", ("::ffff:127.0.0.1", addr_of(rx)[1]))]


# ---------------------------------------------------------------------------
# ICMP errors


def _closed_port(family, host):
    with socket.socket(family, socket.SOCK_DGRAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def test_send_to_closed_port_unconnected(impl, pair, fam):
    """An unconnected socket gets no error reports; nothing raises and the
    socket keeps working."""
    family, host = fam
    tx, rx = pair
    io = new_io(8, impl)
    dead = (host, _closed_port(family, host))
    for _ in range(3):
        assert io.send(rx.fileno(), [(b"x", dead)] * 5) == 5
    assert io.recv(rx.fileno()) == []
    assert io.send(tx.fileno(), [(b"alive", addr_of(rx))]) == 1
    got, _ = drain(io, rx, 1)
    assert got == [(b"alive", addr_of(tx))]


ICMP_TRIES = 20  # pings, 0.1 s apart, until an ICMP error is pending (see below)


def _ping_until_refused(s):
    """Send on connected `s` until an ECONNREFUSED (ICMP port-unreachable) is pending.
    Loopback is exempt from the per-host ICMP rate limit, not from the kernel's global one
    (net.ipv4.icmp_msgs_per_sec, a token bucket shared by every test run on the host): a
    withheld error is retried, a bounded number of times, then the test fails."""
    for _ in range(ICMP_TRIES):
        try:
            s.send(b"ping")
        except ConnectionRefusedError:
            continue  # the previous ping's error, come late (the send consumed it): again
        if wait_for(s, select.POLLERR, timeout=0.1):
            return
    pytest.fail(f"no ICMP port-unreachable on loopback after {ICMP_TRIES} pings")


def _refused_socket(udp, family, host):
    """A socket connected to a closed port, with an ECONNREFUSED pending."""
    port = _closed_port(family, host)
    s = udp(family, host)
    s.connect((host, port))
    _ping_until_refused(s)
    return s, (host, port)


def test_send_with_pending_icmp_error(impl, udp, fam):
    family, host = fam
    s, dead = _refused_socket(udp, family, host)
    rx = udp(family, host)
    io = new_io(4, impl)
    # the pending error fails the first datagram once: it is counted, that datagram is
    # retried and the whole batch leaves (to a live port: no new error comes back)
    batch = [(b"x%d" % i, addr_of(rx)) for i in range(10)]
    assert io.send(s.fileno(), batch) == 10
    assert io.send_errors == {"ECONNREFUSED": 1}
    got, _ = drain(io, rx, 10)
    assert sorted(got) == sorted((data, addr_of(s)) for data, _ in batch)
    # to the closed port: each error the kernel reports (an ICMP port-unreachable, sent
    # while the sender is still in the send call on loopback, unless the kernel's global
    # ICMP rate limit withholds it) costs exactly one count, and the datagram still leaves
    consumed = 0
    pending = False
    for _ in range(5):
        assert io.send(s.fileno(), [(b"again", dead)]) == 1
        consumed += pending  # the error reported after the previous send was counted here
        # (loopback reports it within the send unless softirq work is deferred: a
        # generous wait, so that a late error is not taken for one withheld)
        pending = bool(wait_for(s, select.POLLERR, timeout=1.0))
    assert io.send_errors == {"ECONNREFUSED": 1 + consumed}


PORT_TRIES = 5  # fresh closed ports to try when another process took one meanwhile


def test_recv_with_pending_icmp_error(impl, udp, fam):
    family, host = fam
    for _ in range(PORT_TRIES):
        s, dead = _refused_socket(udp, family, host)
        io = new_io(4, impl)
        # nothing but the error queued: recv consumes it and reports "nothing"
        assert io.recv(s.fileno()) == []
        assert io.recv_errors.get("ECONNREFUSED") == 1
        # error pending again, and now a datagram from the peer as well
        _ping_until_refused(s)
        try:
            peer = udp(family, host, port=dead[1])
            break
        except OSError as exc:  # the closed port got reused meanwhile: another one
            if exc.errno != errno.EADDRINUSE:
                raise
    else:
        pytest.fail(f"{PORT_TRIES} closed ports were all taken before the test could bind")
    peer.sendto(b"hello", addr_of(s))
    deadline = time.monotonic() + WAIT
    got = []
    while not got and time.monotonic() < deadline:
        wait_for(s, timeout=0.2)
        got = io.recv(s.fileno())
    assert got == [(b"hello", dead)]
    assert io.recv_errors.get("ECONNREFUSED") == 2
    # and the socket keeps working normally
    peer.sendto(b"again", addr_of(s))
    got, _ = drain(io, s, 1)
    assert got == [(b"again", dead)]


def test_recv_bad_fd_raises(impl):
    io = new_io(4, impl)
    r, w = os.pipe()
    try:
        with pytest.raises(OSError) as ei:
            io.recv(r)
        assert ei.value.errno in (errno.ENOTSOCK, errno.EBADF, errno.EINVAL)
    finally:
        os.close(r)
        os.close(w)
