"""The call generator's sans-IO receiver: synthetic packet sequences, injected arrival times."""

from __future__ import annotations

import random

import dpkt
import pytest

from bench.callgen import (
    PACKET_BYTES,
    CallGen,
    CallGenError,
    LatencyHistogram,
    ReceiverStats,
    StreamStats,
    build_packet,
)

SSRC = 0x1234ABCD
MS = 1_000_000  # ns
T0 = 10_000 * MS  # an arbitrary monotonic-clock origin


def stream(n: int, first_seq: int = 1000, first_ts: int = 5000, sid: int = 0, run: int = 7,
           ssrc: int = SSRC):
    """n packets of one stream, sent every 20 ms: [(seq_index, packet, send_ns)]."""
    out = []
    for i in range(n):
        send = T0 + i * 20 * MS
        out.append((i, build_packet(sid, ssrc, first_seq + i, first_ts + 160 * i, send, run,
                                    marker=(i == 0)), send))
    return out


def feed_all(rx: ReceiverStats, packets, delay_ns=lambda i: 50_000, order=None) -> None:
    order = order if order is not None else range(len(packets))
    for i in order:
        idx, pkt, send = packets[i]
        rx.feed(pkt, send + delay_ns(idx))


def test_packets_are_real_172_byte_pcmu_rtp():
    pkt = build_packet(3, SSRC, 65535, 0xFFFFFFFF, T0, 9, marker=True)
    assert len(pkt) == PACKET_BYTES == 172
    rtp = dpkt.rtp.RTP(pkt)  # an independent parser
    assert (rtp.version, rtp.pt, rtp.m, rtp.seq, rtp.ts, rtp.ssrc) == (
        2, 0, 1, 65535, 0xFFFFFFFF, SSRC)
    assert len(rtp.data) == 160
    assert dpkt.rtp.RTP(build_packet(3, SSRC, 1, 160, T0)).m == 0


def test_in_order_stream_constant_delay():
    rx = ReceiverStats(run_id=7)
    feed_all(rx, stream(100))
    st = rx.streams[0]
    assert (st.received, st.expected, st.lost, st.reordered, st.duplicates, st.damaged) == (
        100, 100, 0, 0, 0, 0)
    assert st.markers == 1 and st.inconsistent == 0 and st.ssrc == SSRC
    assert st.jitter_ms == pytest.approx(0.0, abs=1e-9)
    assert st.added_jitter_ms == pytest.approx(0.0, abs=1e-9)
    s = rx.summary()
    assert s["latency_ms"]["samples"] == 100
    assert s["latency_ms"]["p50"] == pytest.approx(0.05, abs=0.001)
    assert s["latency_ms"]["max"] == pytest.approx(0.05)
    assert s["received"] == 100 and s["gaps_lost"] == 0 and s["streams_heard"] == 1


def test_loss_counts_gaps_below_the_highest_sequence():
    pkts = stream(100)
    rx = ReceiverStats(run_id=7)
    feed_all(rx, pkts, order=[i for i in range(100) if i not in (10, 11, 50)])
    st = rx.streams[0]
    assert (st.received, st.expected, st.lost, st.reordered) == (97, 100, 3, 0)
    assert rx.summary()["gap_loss"] == pytest.approx(0.03)


def test_reordered_packets_are_counted_and_not_lost():
    order = list(range(20))
    order[5], order[6] = order[6], order[5]
    order.remove(15)
    order.append(15)  # 15 arrives last, after 19
    rx = ReceiverStats(run_id=7)
    feed_all(rx, stream(20), order=order)
    st = rx.streams[0]
    assert (st.received, st.lost, st.reordered, st.duplicates) == (20, 0, 2, 0)
    assert st.inconsistent == 0


def test_reordered_first_packet_lowers_the_base():
    rx = ReceiverStats(run_id=7)
    feed_all(rx, stream(5), order=[1, 0, 2, 3, 4])
    st = rx.streams[0]
    assert (st.received, st.expected, st.lost, st.reordered) == (5, 5, 0, 1)


def test_duplicates_of_the_newest_and_of_an_older_packet():
    pkts = stream(10)
    rx = ReceiverStats(run_id=7)
    feed_all(rx, pkts, order=[0, 1, 2, 2, 3, 4, 1, 5, 6, 7, 8, 9, 9])
    st = rx.streams[0]
    assert (st.received, st.duplicates, st.reordered, st.lost) == (10, 3, 0, 0)
    assert rx.summary()["latency_ms"]["samples"] == 10  # duplicates add no samples


def test_sequence_and_timestamp_wrap():
    pkts = stream(40, first_seq=65520, first_ts=0xFFFFFFFF - 800)
    rx = ReceiverStats(run_id=7)
    order = list(range(40))
    order[15], order[16] = order[16], order[15]  # 65535 arrives after 0
    feed_all(rx, pkts, order=order)
    st = rx.streams[0]
    assert (st.received, st.expected, st.lost, st.reordered, st.inconsistent) == (
        40, 40, 0, 1, 0)
    assert st.max_ext == 65520 + 39  # extended past 16 bits


def test_loss_across_the_wrap():
    rx = ReceiverStats(run_id=7)
    feed_all(rx, stream(30, first_seq=65530), order=[i for i in range(30) if i not in (5, 6)])
    st = rx.streams[0]
    assert (st.received, st.expected, st.lost) == (28, 30, 2)


def test_inconsistent_timestamp_is_flagged():
    pkts = stream(5)
    bad = build_packet(0, SSRC, 1003, 5000 + 160 * 3 + 7, pkts[3][2], 7)
    rx = ReceiverStats(run_id=7)
    for i, pkt, send in pkts:
        rx.feed(bad if i == 3 else pkt, send + 50_000)
    assert rx.streams[0].inconsistent == 1


def test_alternating_delay_gives_the_rfc3550_jitter():
    """Delays alternate 0 / 1 ms: every transit difference |D| is 1 ms = 8 timestamp
    units, so after n packets J = 8 * (1 - (15/16)^(n-1)) units (RFC 3550 6.4.1)."""
    n = 60
    rx = ReceiverStats(run_id=7)
    feed_all(rx, stream(n), delay_ns=lambda i: (i % 2) * MS)
    st = rx.streams[0]
    expected_units = 8.0 * (1 - (15 / 16) ** (n - 1))
    assert st.jitter_ms == pytest.approx(expected_units / 8.0, rel=1e-9)
    assert st.added_jitter_ms == pytest.approx(1.0 * (1 - (15 / 16) ** (n - 1)), rel=1e-9)
    assert rx.summary()["jitter_ms"]["max"] == pytest.approx(st.jitter_ms, abs=1e-4)


def test_rfc_jitter_sees_send_irregularity_added_jitter_does_not():
    """Packets sent 0 / 1 ms off their 20 ms grid, constant path delay: the RTP-timestamp
    jitter shows the sender's irregularity, the latency-based one is zero."""
    rx = ReceiverStats(run_id=7)
    for i in range(50):
        send = T0 + i * 20 * MS + (i % 2) * MS
        rx.feed(build_packet(0, SSRC, i, 160 * i, send, 7), send + 200_000)
    st = rx.streams[0]
    assert st.jitter_ms > 0.9
    assert st.added_jitter_ms == pytest.approx(0.0, abs=1e-9)


def test_latency_percentiles():
    rx = ReceiverStats(run_id=7)
    lat = list(range(1, 1001))  # µs
    random.Random(1).shuffle(lat)
    for i, us in enumerate(lat):
        send = T0 + i * 20 * MS
        rx.feed(build_packet(0, SSRC, i, 160 * i, send, 7), send + us * 1000)
    s = rx.summary()["latency_ms"]
    assert s["samples"] == 1000
    assert s["p50"] == pytest.approx(0.500, abs=0.0011)
    assert s["p90"] == pytest.approx(0.900, abs=0.0011)
    assert s["p99"] == pytest.approx(0.990, abs=0.0011)
    assert s["max"] == pytest.approx(1.0) and s["min"] == pytest.approx(0.001)
    assert s["mean"] == pytest.approx(0.5005)


def test_histogram_is_bounded_and_accurate_for_large_values():
    h = LatencyHistogram()
    values_ms = [2.5, 17.0, 333.3, 4000.0, 29_000.0]
    for v in values_ms:
        for _ in range(10):
            h.add(int(v * 1e6))
    h.add(10**12)  # 1000 s: clamped into the last bucket, max stays exact
    assert len(h.counts) == LatencyHistogram.SIZE
    for q, v in zip((0.1, 0.3, 0.5, 0.7, 0.9), values_ms):
        assert h.percentile_ms(q) == pytest.approx(v, rel=0.002)
    assert h.percentile_ms(1.0) == pytest.approx(1e6)
    assert h.summary()["max"] == pytest.approx(1e6)
    assert LatencyHistogram().summary()["p50"] is None


def test_damaged_packets_are_counted_not_received():
    good = build_packet(0, SSRC, 1, 160, T0, 7)
    flipped = bytearray(good)
    flipped[100] ^= 0xFF
    wrong_ssrc = build_packet(0, SSRC + 1, 2, 320, T0, 7)
    wrong_pt = build_packet(0, SSRC, 3, 480, T0, 7, pt=8)
    rx = ReceiverStats(run_id=7, ssrcs={0: SSRC})
    for pkt in (good, bytes(flipped), wrong_ssrc, wrong_pt, good[:100], good + b"x"):
        rx.feed(pkt, T0 + 1000)
    st = rx.streams[0]
    assert (st.received, st.damaged) == (1, 5)
    assert rx.summary()["damaged"] == 5


def test_malformed_and_foreign_packets_do_not_crash():
    rx = ReceiverStats(run_id=7, ssrcs={0: SSRC})
    rng = random.Random(5)
    junk = [b"", b"\x80", bytes(27), b"\x40" + bytes(171),  # version 1
            build_packet(99, SSRC, 1, 160, T0, 7)]  # an unknown stream
    junk += [bytes(rng.getrandbits(8) for _ in range(rng.randrange(0, 300)))
             for _ in range(200)]
    for pkt in junk:
        assert rx.feed(pkt, T0) in (-1, 0)
    s = rx.summary()
    assert s["malformed"] + s["stale"] + s["damaged"] == len(junk)
    assert s["malformed"] >= 5
    assert s["received"] == 0


def test_stale_run_and_misrouted_packets():
    rx = ReceiverStats(run_id=8, ssrcs={0: SSRC, 1: SSRC + 1})
    assert rx.feed(build_packet(0, SSRC, 1, 160, T0, run_id=7), T0) == -1
    assert rx.feed(build_packet(1, SSRC + 1, 1, 160, T0, run_id=8), T0, expect=0) == -1
    assert rx.feed(build_packet(0, SSRC, 1, 160, T0, run_id=8), T0, expect=0) == 0
    s = rx.summary()
    assert (s["stale"], s["misrouted"], s["received"]) == (1, 1, 1)


def test_streams_are_bounded_and_summarised_across_streams():
    rx = ReceiverStats(run_id=7, max_streams=3)
    for sid in range(5):
        for _i, pkt, send in stream(10, sid=sid, ssrc=SSRC + sid):
            rx.feed(pkt, send + (sid + 1) * 100_000)
    assert sorted(rx.streams) == [0, 1, 2]
    s = rx.summary()
    assert s["malformed"] == 20 and s["received"] == 30 and s["streams_heard"] == 3
    assert s["latency_ms"]["min"] == pytest.approx(0.1) and s["latency_ms"]["max"] == \
        pytest.approx(0.3)


def test_stream_stats_alone_and_negative_latency():
    st = StreamStats(4)
    st.packet(10, 1600, 1, T0, T0 - 5)  # arrival before send: a broken clock or tag
    st.packet(11, 1760, 0, T0, T0 + 1000)
    assert (st.received, st.negative_latency, st.hist.n) == (2, 1, 1)
    assert st.summary()["latency_max_ms"] == pytest.approx(0.001)


def test_stream_stats_keep_the_longest_gap_between_arrivals():
    """A restart's media gap: 20 ms apart, then 600 ms without a packet (29 lost)."""
    st = StreamStats(4)
    for seq, at_ms in ((0, 0), (1, 20), (2, 40), (32, 640), (33, 660)):
        st.packet(seq, seq * 160, 0, T0, T0 + at_ms * 1_000_000)
    assert st.summary()["max_gap_ms"] == 600.0
    assert st.lost == 29


def test_callgen_rejects_bad_arguments_with_clear_errors():
    with pytest.raises(CallGenError, match="calls must number"):
        CallGen([])
    with pytest.raises(CallGenError, match=r"\[caller_fd, callee_fd"):
        CallGen([(1, 2, ("127.0.0.1", 1))])
    with pytest.raises(CallGenError, match="appears twice"):
        CallGen([(5, 6, ("127.0.0.1", 1), ("127.0.0.1", 2)),
                 (6, 7, ("127.0.0.1", 3), ("127.0.0.1", 4))], io="plain")
    with pytest.raises(CallGenError, match="io must be"):
        CallGen([(5, 6, ("127.0.0.1", 1), ("127.0.0.1", 2))], io="fast")
