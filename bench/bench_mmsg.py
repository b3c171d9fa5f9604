"""Benchmarks of the worker's batched I/O, which share one mmsghdr setup
(fastpath.worker.mmsg.MsgVec), a burst of 256 RTP-sized datagrams per iteration:

* BatchIO, plain vs mmsg: sent and received over loopback;
* PacketReader (packet mode's tap): sent with BatchIO, read from an AF_PACKET tap on the
  loopback of a network namespace of its own (root only);
* RawEgress (packet mode's egress): headers built and sent with one sendmmsg, received
  with BatchIO, in that namespace (root only).

Nothing here is skipped: without recvmmsg/sendmmsg (cffi) or, for the namespace
benchmarks, without root (CI runs as root) they fail, saying why.

    python -m pytest bench/bench_mmsg.py --benchmark-columns=min,mean,ops
"""

from __future__ import annotations

import os
import select
import socket

import pytest

from bench.netns import PREFIX, list_namespaces, run, socket_in
from fastpath.kernel.taps import open_packet_socket
from fastpath.worker import mmsg
from fastpath.worker.mmsg import make_batch_io
from fastpath.worker.packet_io import PacketReader
from fastpath.worker.raw_egress import IPPROTO_RAW, RawEgress, open_raw_sockets

BURST = 256
PAYLOAD = 172  # 12-byte RTP header + 160 bytes of G.711 (20 ms)
ITERATIONS = 20  # bursts per round
ROUNDS = 15  # rounds, after 3 of warm-up (PyPy's JIT)

IMPLS = ["plain", "mmsg"]
SINK_PORT = 30000


def _sock():
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        s.setsockopt(socket.SOL_SOCKET, getattr(socket, "SO_RCVBUFFORCE", 33), 1 << 23)
    except OSError:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 23)
    s.bind(("127.0.0.1", 0))
    s.setblocking(False)
    return s


def require_mmsg() -> None:
    """recvmmsg/sendmmsg through cffi are there wherever the project runs: a failure, not a
    skip, when they are not (with the reason)."""
    ffi, _lib = mmsg.load()
    if ffi is None or not mmsg.mmsg_available():
        pytest.fail(f"recvmmsg/sendmmsg unavailable: {mmsg.unavailable_reason()}")


@pytest.fixture
def sockets():
    tx, rx = _sock(), _sock()
    yield tx, rx
    tx.close()
    rx.close()


def _burst_fn(io, tx, rx):
    txfd, rxfd = tx.fileno(), rx.fileno()
    dst = rx.getsockname()
    packets = [(bytes([i]) * PAYLOAD, dst) for i in range(BURST)]
    poller = select.poll()
    poller.register(rxfd, select.POLLIN)

    def burst():
        sent = io.send(txfd, packets)
        got = 0
        while got < sent:
            batch = io.recv(rxfd)
            if not batch:
                if not poller.poll(2000):
                    raise AssertionError(f"lost datagrams: {got}/{sent}")
                continue
            got += len(batch)
        assert sent == BURST and got == BURST
        return got

    return burst


@pytest.mark.parametrize("impl", IMPLS)
def test_bench_loopback_burst_256(benchmark, sockets, impl):
    if impl == "mmsg":
        require_mmsg()
    io = make_batch_io(64, impl)
    burst = _burst_fn(io, *sockets)
    benchmark.group = "mmsg: 256-datagram loopback burst, send+recv"
    benchmark.extra_info["impl"] = io.name
    benchmark.extra_info["datagrams_per_iteration"] = BURST
    benchmark.pedantic(burst, rounds=ROUNDS, iterations=ITERATIONS, warmup_rounds=3)
    assert io.send_errors == {} and io.truncated == 0
    stats = getattr(benchmark, "stats", None)
    if stats is not None:  # None under --benchmark-disable
        benchmark.extra_info["packets_per_s"] = round(BURST / stats.stats.mean)


# --- packet mode: tap reads and raw egress, in a namespace of their own -----------------


@pytest.fixture(scope="module")
def netns():
    """A network namespace with only its loopback up (nothing of the root namespace is
    touched); deleted afterwards."""
    if os.geteuid() != 0:
        pytest.fail("AF_PACKET taps and raw sockets need root (CI runs as root): this "
                    "benchmark fails, it is never skipped")
    name = f"{PREFIX}{os.getpid()}-bench-mmsg"
    run("ip", "netns", "add", name)
    try:
        run("ip", "link", "set", "lo", "up", ns=name)
        yield name
    finally:
        run("ip", "netns", "del", name, check=False)
        assert name not in list_namespaces(), f"namespace {name} left behind"


def _sock_in(ns, port=0):
    s = socket_in(ns, socket.AF_INET)
    try:
        s.setsockopt(socket.SOL_SOCKET, getattr(socket, "SO_RCVBUFFORCE", 33), 1 << 23)
    except OSError:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 23)
    s.bind(("127.0.0.1", port))
    s.setblocking(False)
    return s


def test_bench_packet_tap_burst_256(benchmark, netns):
    """256 datagrams to a bound port, read back from an AF_PACKET tap with recvmmsg."""
    require_mmsg()
    tx, sink = _sock_in(netns), _sock_in(netns, SINK_PORT)
    raw = socket_in(netns, socket.AF_PACKET, socket.SOCK_DGRAM, 0)
    reader = PacketReader(open_packet_socket("lo", SINK_PORT, SINK_PORT, sock=raw), 64, "mmsg")
    io = make_batch_io(64, "mmsg")
    packets = [(bytes([i]) * PAYLOAD, ("127.0.0.1", SINK_PORT)) for i in range(BURST)]
    poller = select.poll()
    poller.register(reader.fileno(), select.POLLIN)

    def burst():
        sent = io.send(tx.fileno(), packets)
        got = 0
        while got < sent:
            batch = reader.recv_batch()
            if not batch:
                if not poller.poll(2000):
                    raise AssertionError(f"lost packets: {got}/{sent}")
                continue
            got += len(batch)
        io.recv(sink.fileno())  # the sink's queue fills; what it drops the tap had seen
        assert sent == BURST and got == BURST
        return got

    try:
        benchmark.group = "packet mode: 256-datagram burst"
        benchmark.extra_info["datagrams_per_iteration"] = BURST
        benchmark.pedantic(burst, rounds=ROUNDS, iterations=ITERATIONS, warmup_rounds=3)
        assert reader.truncated == 0 and reader.recv_errors == {}
    finally:
        for s in (reader, tx, sink):
            s.close()


def test_bench_raw_egress_burst_256(benchmark, netns):
    """256 datagrams of 8 endpoints, headers built and sent with one sendmmsg, received."""
    require_mmsg()
    sink = _sock_in(netns, SINK_PORT)
    relay = [_sock_in(netns) for _ in range(8)]
    egress = RawEgress(open_raw_sockets(
        families=(socket.AF_INET,),
        make=lambda fam: socket_in(netns, fam, socket.SOCK_RAW, IPPROTO_RAW)), BURST)
    for s in relay:
        egress.bind(s.fileno(), "127.0.0.1", s.getsockname()[1])
    dest = ("127.0.0.1", SINK_PORT)
    runs = [(s.fileno(), [(bytes([i]) * PAYLOAD, dest) for i in range(BURST // len(relay))])
            for s in relay]
    io = make_batch_io(64, "mmsg")
    poller = select.poll()
    poller.register(sink.fileno(), select.POLLIN)

    def burst():
        for fd, packets in runs:
            egress.add(fd, packets)
        assert egress.flush() == []
        got = 0
        while got < BURST:
            batch = io.recv(sink.fileno())
            if not batch:
                if not poller.poll(2000):
                    raise AssertionError(f"lost datagrams: {got}/{BURST}")
                continue
            got += len(batch)
        return got

    try:
        benchmark.group = "packet mode: 256-datagram burst"
        benchmark.extra_info["datagrams_per_iteration"] = BURST
        benchmark.pedantic(burst, rounds=ROUNDS, iterations=ITERATIONS, warmup_rounds=3)
        assert egress.errors == {} and egress.rejected == 0
    finally:
        egress.close()
        for s in (sink, *relay):
            s.close()
