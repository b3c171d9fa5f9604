"""Benchmark of fastpath.kernel.nfqueue: 1,000 queued UDP datagrams read and released.

Root only.  A throwaway network namespace (lrk-q<pid>-bench) with loopback up
and ``udp dport 40000`` sent to queue 7 (xt NFQUEUE through nft_compat, as
this kernel has no nft queue expression).  Each round's setup queues 1,000
RTP-sized datagrams (untimed); the timed part reads them all with
``receive_batch(256)`` and gives verdicts: one NFQNL_MSG_VERDICT_BATCH per batch read
("batch"), one NFQNL_MSG_VERDICT per packet ("single"), or one NFQNL_MSG_VERDICT per
packet with a batch's messages in one datagram (``NfQueue.verdicts``, "datagram": what
the nfqueue plane sends, since its packets get different verdicts).  Accepted datagrams are
delivered to a UDP socket inside the verdict call, so that cost is included.

    python -m pytest bench/bench_nfqueue.py --benchmark-columns=min,mean,ops

``extra_info["packets_per_s"]`` is 1,000 / mean round time (``_best``: / fastest round).
"""

from __future__ import annotations

import os
import socket
import subprocess
import time

import pytest

from fastpath.kernel.nfqueue import NF_ACCEPT, NFPROTO_INET
from fastpath.kernel.nfqueue_socket import NfQueue, add_queue_rule, call_in_netns

N = 1000
BATCH = 256
PAYLOAD = 172  # 12-byte RTP header + 160 bytes of G.711 (20 ms)
PORT = 40000
RULES = f"""
table inet lrkqbench {{
  chain pre {{
    type filter hook prerouting priority -150; policy accept;
    udp dport {PORT} jump q
  }}
  chain q {{
  }}
}}
"""


def _sh(*argv: str, stdin: str = "") -> str:
    proc = subprocess.run(argv, input=stdin, capture_output=True, text=True, timeout=20,
                          check=False)
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(argv)} failed: {proc.stderr}")
    return proc.stdout


@pytest.fixture(scope="module")
def netns():
    if os.geteuid() != 0:
        pytest.fail("the NFQUEUE benchmark needs root (it works in a throwaway namespace)")
    root_rules = _sh("nft", "list", "ruleset")
    name = f"lrk-q{os.getpid()}-bench"
    _sh("ip", "netns", "add", name)
    try:
        _sh("ip", "-n", name, "link", "set", "lo", "up")
        _sh("ip", "netns", "exec", name, "nft", "-f", "-", stdin=RULES)
        add_queue_rule(NFPROTO_INET, "lrkqbench", "q", 7, netns=name)
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=20,
                       check=False)
    assert _sh("nft", "list", "ruleset") == root_rules


@pytest.fixture
def rig(netns):
    q = NfQueue(7, copy_range=256, maxlen=4 * N, netns=netns)

    def sockets():
        tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        rx.setsockopt(socket.SOL_SOCKET, getattr(socket, "SO_RCVBUFFORCE", 33), 16 << 20)
        rx.bind(("127.0.0.1", PORT))
        rx.setblocking(False)
        return tx, rx

    tx, rx = call_in_netns(netns, sockets)
    try:
        q.bind()
        yield netns, q, tx, rx
    finally:
        q.close()
        tx.close()
        rx.close()


def _drain(rx: socket.socket) -> int:
    n = 0
    for _ in range(4 * N):
        try:
            rx.recv(2048)
        except BlockingIOError:
            break
        n += 1
    return n


@pytest.mark.parametrize("mode", ["batch", "single", "datagram"])
def test_queue_verdict_throughput(benchmark, rig, mode):
    netns, q, tx, rx = rig
    data = b"\x80" + b"\0" * (PAYLOAD - 1)
    state = {"delivered": 0, "rounds": 0}

    def setup():
        state["delivered"] += _drain(rx)
        for _ in range(N):
            tx.sendto(data, ("127.0.0.1", PORT))
        deadline = time.monotonic() + 5
        for _ in range(500):  # wait until the kernel holds all N
            stats = call_in_netns(netns, q.kernel_stats)
            if (stats and stats["queue_total"] >= N) or time.monotonic() > deadline:
                break
            time.sleep(0.01)

    def run():
        got = 0
        for _ in range(4 * N // BATCH + 50):
            batch = q.receive_batch(BATCH, timeout=1.0)
            if not batch:
                break
            if mode == "batch":
                q.verdict_batch(batch[-1].packet_id, NF_ACCEPT)
            elif mode == "datagram":
                q.verdicts([(p.packet_id, NF_ACCEPT) for p in batch])
            else:
                for p in batch:
                    q.verdict(p.packet_id, NF_ACCEPT)
            got += len(batch)
            if got >= N:
                break
        assert got == N
        state["rounds"] += 1

    benchmark.pedantic(run, setup=setup, rounds=20, iterations=1, warmup_rounds=3)
    state["delivered"] += _drain(rx)
    assert state["delivered"] == N * state["rounds"]
    assert q.stats()["verdict_errors"] == {} and q.stats()["decode_errors"] == 0
    if benchmark.stats is None:  # --benchmark-disable
        return
    stats = benchmark.stats.stats
    benchmark.extra_info["packets_per_s"] = round(N / stats.mean)
    benchmark.extra_info["packets_per_s_best"] = round(N / stats.min)
    print(f"\n{mode}: {N / stats.mean:.0f} packets/s through queue+verdict (mean round), "
          f"{N / stats.min:.0f} (best round)")
