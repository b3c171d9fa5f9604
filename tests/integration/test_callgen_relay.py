"""The RTP call generator against a real relay on loopback, and on the wire by itself."""

from __future__ import annotations

import socket
import time
from typing import Callable, Iterator, List

import dpkt
import pytest

from bench.callgen import PACKET_BYTES, CallGen
from bench.loadgen import udp_socket
from lrk.client import LrkClient
from lrk.demo.relay_process import next_port_range

pytestmark = pytest.mark.integration

CALLS = 20
INTERVAL_MS = 20.0  # 50 packets/s per stream


@pytest.fixture
def sockets() -> Iterator[Callable[[], socket.socket]]:
    """Bound, tuned, non-blocking loopback UDP sockets, all closed at the end."""
    made: List[socket.socket] = []

    def make() -> socket.socket:
        s = udp_socket("127.0.0.1")
        made.append(s)
        return s

    yield make
    for s in made:
        s.close()


def setup_calls(client: LrkClient, sockets, n: int):
    """Offer/answer with the real socket addresses; returns (call ids, CallGen spec)."""
    ids, spec = [], []
    for i in range(n):
        a, b = sockets(), sockets()
        call_id = f"callgen-{i}"
        offer = client.offer(call_id, "tag-a", a.getsockname()[:2])
        answer = client.answer(call_id, "tag-a", "tag-b", b.getsockname()[:2])
        ids.append(call_id)
        spec.append((a.fileno(), b.fileno(), (answer["relay"]["ip"], answer["relay"]["port"]),
                     (offer["relay"]["ip"], offer["relay"]["port"])))
    return ids, spec


def test_calls_both_ways_through_the_relay(start_relay, sockets):
    # 4 relay ports per call (RTP + RTCP on both legs)
    relay = start_relay(ports=next_port_range(4 * CALLS + 48))
    with LrkClient([relay.node], timeout=1.0, retries=3) as client:
        ids, spec = setup_calls(client, sockets, CALLS)
        with CallGen(spec, seed=11) as gen:
            res = gen.run(1.0, pps_per_stream=50, grace=0.5, detail=True)
            again = gen.run(0.3, pps_per_stream=50, grace=0.5, detail=True)
        per = res["per_stream"]
        assert res["mode"] == "paced" and res["streams"] == 2 * CALLS == len(per)
        assert res["rate"] == pytest.approx(50 * 2 * CALLS)
        # every scheduled packet was sent or, after a stall of the shared machine, skipped
        assert res["sent"] + res["skipped"] + res["send_failed"] == int(res["rate"] * 1.0)
        assert res["send_failed"] == 0 and res["sent"] > 0
        # loopback at 2,000 pkt/s with 1 MiB relay and 8 MiB generator buffers: a drop
        # would need a stall of a second, so any loss is a bug, not noise
        assert res["lost"] == 0 and res["loss"] == 0.0 and res["gaps_lost"] == 0
        assert res["silent_streams"] == 0 and res["min_stream_received"] > 0
        for key in ("reordered", "duplicates", "damaged", "malformed", "misrouted",
                    "inconsistent", "negative_latency", "stale", "recv_errors"):
            assert res[key] == 0, (key, res[key])
        assert res["received_caller_to_callee"] > 0 and res["received_callee_to_caller"] > 0
        for st in per:
            assert st["received"] == st["sent"] == st["expected"] > 0, st
            assert st["markers"] == 1, st  # the first packet of the run only
            assert 0 < st["latency_max_ms"] < 1000.0, st  # sanity, not a speed claim
        lat = res["latency_ms"]
        assert lat["samples"] == res["received"]
        assert 0 < lat["min"] <= lat["p50"] <= lat["p90"] <= lat["p99"] <= lat["max"] < 1000
        # RFC 3550 interarrival jitter of an in-order, lossless loopback path: it includes the
        # generator's ~1 ms send tick, but its median stays (far) below one packet interval;
        # it would reach it only if arrivals were bunched or stalled by a whole interval for
        # most of the run (its maximum is left alone: one stall of the machine can make it)
        jit = res["jitter_ms"]
        assert 0 < jit["p50"] <= jit["max"] and jit["p50"] < INTERVAL_MS, jit
        # the same filter on the one-way latency: an average of latency steps, so never more
        # than the latency spread
        added = res["added_jitter_ms"]
        assert 0 < added["p50"] <= added["max"] <= lat["max"] - lat["min"] + 0.001, (added, lat)
        # a second run on the same calls: sequence numbers go on, nothing leaks across
        assert again["lost"] == 0 and again["stale"] == 0 and again["damaged"] == 0
        assert again["run_id"] == res["run_id"] + 1
        assert all(st["markers"] == 1 and st["received"] == st["sent"]
                   for st in again["per_stream"])

        # the relay counted what the generator saw, per leg (query flushes the workers)
        total_out = 0
        for i, call_id in enumerate(ids):
            legs = client.query(call_id)["session"]["legs"]
            fwd, back = per[2 * i], per[2 * i + 1]
            sent_fwd = fwd["sent"] + again["per_stream"][2 * i]["sent"]
            sent_back = back["sent"] + again["per_stream"][2 * i + 1]["sent"]
            assert legs["A"]["counters"]["in_packets"] == sent_fwd
            assert legs["B"]["counters"]["out_packets"] == sent_fwd
            assert legs["B"]["counters"]["in_packets"] == sent_back
            assert legs["A"]["counters"]["out_packets"] == sent_back
            total_out += sent_fwd + sent_back
        assert total_out == res["received"] + again["received"]
        assert client.stats()["counters"]["media.forwarded.packets"] == total_out


@pytest.mark.parametrize("io", ["mmsg", "plain"])
def test_packets_on_the_wire_are_consistent_rtp(sockets, io):
    """The caller's stream goes to a socket of ours, read and parsed with dpkt."""
    a, b, sniff = sockets(), sockets(), sockets()
    before = time.monotonic_ns()
    with CallGen([(a.fileno(), b.fileno(), sniff.getsockname()[:2], a.getsockname()[:2])],
                 io=io, seed=5, first_seq=65530) as gen:
        assert gen.io == io
        res = gen.run(0.3, pps_per_stream=100, grace=0.05, detail=True)
    after = time.monotonic_ns()
    packets = []
    while True:
        try:
            packets.append(sniff.recv(4096))
        except BlockingIOError:
            break
    sent = res["per_stream"][0]["sent"]
    assert sent >= 20 and len(packets) == sent
    parsed = [dpkt.rtp.RTP(p) for p in packets]
    assert all(len(p) == PACKET_BYTES for p in packets)
    assert [p.seq for p in parsed] == [(65530 + i) & 0xFFFF for i in range(sent)]  # wraps
    assert [(p.ts - parsed[0].ts) & 0xFFFFFFFF for p in parsed] == [160 * i for i in range(sent)]
    assert [p.m for p in parsed] == [1] + [0] * (sent - 1)
    assert {p.ssrc for p in parsed} == {gen.ssrcs[0]} and {p.pt for p in parsed} == {0}
    send_ns = [int.from_bytes(p[12:20], "big") for p in packets]
    assert before <= send_ns[0] and send_ns == sorted(send_ns) and send_ns[-1] <= after
    # paced at 100 pkt/s: the sends span the run, not one burst (which would take < 1 ms)
    assert (send_ns[-1] - send_ns[0]) / 1e9 > 0.1
    # stream 1 (callee -> caller) went straight to the caller: measured and intact
    back = res["per_stream"][1]
    assert back["received"] == back["sent"] > 0 and back["damaged"] == 0


@pytest.mark.parametrize("io", ["mmsg", "plain"])
def test_flat_out_without_relay(sockets, io):
    """Callers and callees send straight to each other: a lossless null relay."""
    spec = []
    for _ in range(2):
        a, b = sockets(), sockets()
        spec.append((a.fileno(), b.fileno(), b.getsockname()[:2], a.getsockname()[:2]))
    with CallGen(spec, io=io, seed=7) as gen:
        res = gen.run(0.3, rate=20000, grace=0.3)
    assert res["mode"] == "flat" and res["streams"] == 4
    assert res["sent"] > 0 and res["received"] == res["sent"] and res["lost"] == 0
    assert res["reordered"] == res["duplicates"] == res["damaged"] == 0
    assert res["inconsistent"] == 0 and res["silent_streams"] == 0
    assert res["latency_ms"]["min"] > 0 and res["latency_ms"]["max"] < 1000
    assert isinstance(res["generator_limited"], bool) and res["achieved_rate"] > 0
