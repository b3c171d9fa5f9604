"""Short form of the RTP call generator (bench.callgen) driven through ``--serve``.

A relay (PyPy when there is one) carries 10 calls; the generator runs in a child
process (PyPy when there is one) with the caller/callee sockets inherited by fd,
once paced (50 packets/s per stream) and once flat-out.  Only behaviour and the
JSON shape are asserted (intact media on every stream, no damage), never a timing:
the machine is shared.  The figures go to pytest-benchmark's extra_info.

    python -m pytest bench/bench_callgen.py --benchmark-columns=min,rounds
    python -m bench.callgen --node udp:127.0.0.1:22222 --calls 20 --duration 2
"""

from __future__ import annotations

from typing import List

import pytest

from bench.callgen import CallGenError, CallGenProcess
from bench.interpreters import pypy_or_current
from bench.loadgen import udp_socket
from lrk.client import LrkClient
from lrk.demo.relay_process import RelayProcess, next_port_range

CALLS = 10
RESULT_KEYS = {
    "mode", "calls", "streams", "duration", "rate", "pps_per_stream", "sent", "datagrams",
    "received", "expected", "lost", "loss", "gaps_lost", "gap_loss", "reordered",
    "duplicates", "damaged", "inconsistent", "negative_latency", "malformed", "stale",
    "misrouted", "streams_heard", "latency_ms", "jitter_ms", "added_jitter_ms",
    "received_caller_to_callee", "received_callee_to_caller", "silent_streams",
    "min_stream_received", "achieved_rate", "achieved_per_stream", "generator_limited",
    "skipped", "send_failed", "recv_errors", "stale_flushed", "stalls", "max_gap_ms",
    "send_wall", "drain_wall", "run_id", "io", "impl",
}
LATENCY_KEYS = {"samples", "p50", "p90", "p99", "max", "min", "mean"}


def session() -> dict:
    """Relay + 10 calls + generator process: one paced and one flat-out run."""
    python = pypy_or_current()
    socks = [udp_socket() for _ in range(2 * CALLS)]
    out: dict = {}
    try:
        with RelayProcess(ports=next_port_range(4 * CALLS + 24), python=python) as relay, \
                LrkClient([relay.node], timeout=2.0, retries=3) as client:
            spec: List[list] = []
            for i in range(CALLS):
                a, b = socks[2 * i], socks[2 * i + 1]
                offer = client.offer(f"bench-cg-{i}", "a", a.getsockname()[:2])
                ans = client.answer(f"bench-cg-{i}", "a", "b", b.getsockname()[:2])
                spec.append([a.fileno(), b.fileno(), [ans["relay"]["ip"], ans["relay"]["port"]],
                             [offer["relay"]["ip"], offer["relay"]["port"]]])
            gen = CallGenProcess(socks, python=python)
            try:
                with pytest.raises(CallGenError, match="run before setup"):
                    gen.run(0.1)
                out["setup"] = gen.setup(spec)
                out["paced"] = gen.run(0.5, pps_per_stream=50, grace=0.5)
                out["flat"] = gen.run(0.3, rate=20000, grace=0.5)
                with pytest.raises(CallGenError, match="duration must be"):
                    gen.run(31.0)
            finally:
                out["exit_code"] = gen.close()
            out["forwarded"] = client.stats()["counters"]["media.forwarded.packets"]
        out["relay_exit_code"] = relay.proc.returncode
    finally:
        for s in socks:
            s.close()
    return out


def test_callgen_serve_paced_and_flat_out(benchmark):
    benchmark.group = f"call generator --serve, {CALLS} calls through the relay"
    out = benchmark.pedantic(session, rounds=1, iterations=1)
    setup, paced, flat = out["setup"], out["paced"], out["flat"]
    benchmark.extra_info.update({
        "generator": setup["impl"], "io": setup["io"],
        "paced_achieved": paced["achieved_rate"], "paced_latency_ms": paced["latency_ms"],
        "paced_jitter_ms": paced["jitter_ms"], "flat_achieved": flat["achieved_rate"],
        "flat_loss": flat["loss"], "flat_generator_limited": flat["generator_limited"]})
    assert out["exit_code"] == 0 and out["relay_exit_code"] == 0
    assert setup["calls"] == CALLS and setup["streams"] == 2 * CALLS
    for res, mode in ((paced, "paced"), (flat, "flat")):
        assert set(res) == RESULT_KEYS, set(res) ^ RESULT_KEYS
        assert set(res["latency_ms"]) == LATENCY_KEYS
        assert set(res["jitter_ms"]) == set(res["added_jitter_ms"]) == {"p50", "max"}
        assert res["mode"] == mode and res["impl"] == setup["impl"]
        assert res["sent"] > 0 and res["received"] > 0
        assert res["damaged"] == res["malformed"] == res["misrouted"] == 0
        assert res["inconsistent"] == res["duplicates"] == 0
        assert res["silent_streams"] == 0 and res["streams_heard"] == 2 * CALLS
        assert res["received_caller_to_callee"] > 0 and res["received_callee_to_caller"] > 0
        assert res["latency_ms"]["samples"] == res["received"]
    assert paced["rate"] == 50 * 2 * CALLS and paced["lost"] == 0  # loopback, 1,000 pkt/s
    assert paced["run_id"] + 1 == flat["run_id"]
    # the relay forwarded every datagram the generator received (it may have forwarded
    # more in flat-out mode: a datagram lost after the relay is still counted there)
    assert out["forwarded"] >= paced["received"] + flat["received"]
