"""Benchmark of fastpath.worker.mmsg: plain vs mmsg, a burst of 256 RTP-sized
datagrams sent and received over loopback per iteration.

    python -m pytest bench/bench_mmsg.py --benchmark-columns=min,mean,ops
"""

from __future__ import annotations

import select
import socket

import pytest

from fastpath.worker.mmsg import make_batch_io, mmsg_available

BURST = 256
PAYLOAD = 172  # 12-byte RTP header + 160 bytes of G.711 (20 ms)
ITERATIONS = 20  # bursts per round

IMPLS = [
    "plain",
    pytest.param(
        "mmsg",
        marks=pytest.mark.skipif(not mmsg_available(), reason="recvmmsg/sendmmsg unavailable"),
    ),
]


def _sock():
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        s.setsockopt(socket.SOL_SOCKET, getattr(socket, "SO_RCVBUFFORCE", 33), 1 << 23)
    except OSError:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 23)
    s.bind(("127.0.0.1", 0))
    s.setblocking(False)
    return s


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
    io = make_batch_io(64, impl)
    burst = _burst_fn(io, *sockets)
    benchmark.group = "mmsg: 256-datagram loopback burst, send+recv"
    benchmark.extra_info["impl"] = io.name
    benchmark.extra_info["datagrams_per_iteration"] = BURST
    benchmark.pedantic(burst, rounds=5, iterations=ITERATIONS, warmup_rounds=1)
    assert io.send_errors == {} and io.truncated == 0
    stats = getattr(benchmark, "stats", None)
    if stats is not None:  # None under --benchmark-disable
        benchmark.extra_info["packets_per_s"] = round(BURST / stats.stats.mean)
