"""bench.quickpath end to end at a modest rate: each mode delivers exactly what was sent.

Capacity figures are for the benchmark run, not the test suite; here every mode's setup,
steering, generator and sink work together, and nothing is left behind.
"""

from __future__ import annotations

import sys

import pytest

from bench.netns import Topology, run
from bench.quickpath import SETUPS, Rig, flows_for, junk_flood, step

pytestmark = pytest.mark.timeout(120)


@pytest.mark.parametrize("generator", ["xdp", "trafgen"])
@pytest.mark.parametrize("mode", ["routing", "static-nat", "kernel", "xdp"])
def test_mode_delivers_every_packet_at_a_modest_rate(topo: Topology, mode: str,
                                                     generator: str) -> None:
    """Every frame sent arrives; the relay's work shows in its pinned NAPI thread (so the
    steering holds for XDP frames too, whatever the mode does with them)."""
    rig = Rig(topo, generator)
    pairs = flows_for(topo, 20)
    with SETUPS[mode](rig, pairs, sys.executable) as dests:
        assert len(dests) == 20
        with rig.generating(pairs, dests) as gen, rig.sink(20) as sink:
            r = step(gen, sink, rate=20_000, seconds=0.2, napi_pid=rig.napi_pid)
            assert (r["sent"], r["received"], r["loss"]) == (4000, 4000, 0.0)
            assert 0.0 <= r["relay_core_busy"] <= 1.0
            assert 0.0 < r["relay_napi_busy"] <= 1.0
            if generator == "xdp":
                assert r["ring_refused"] == 0
    tables = run("nft", "list", "tables", ns=topo.relay.ns).stdout
    assert "qpnat" not in tables and "inet lrk" not in tables
    for ns, dev in ((topo.relay.ns, "vc1"), (topo.relay.ns, "ve1"), (topo.callee.ns, "ve0")):
        assert "xdp" not in run("ip", "link", "show", "dev", dev, ns=ns).stdout


def test_junk_flood_from_the_xdp_generator_costs_xdp_calls_nothing(topo: Topology) -> None:
    """xdp mode, 1,000 calls set up through the daemon, each call's media frame followed by
    19 junk frames (a stranger at the call's relay port, and at relay ports with no
    session), 40,000 frames at 50,000 pkt/s from the XDP generator (veth's 256-frame ring
    covers a 5 ms stall of a shared machine; bench.quickpath --junk floods at the
    generator's highest rate): every media frame
    arrives at the callee, every junk frame is dropped by the relay and counted in its
    media.dropped.* counters, none reaches the callee."""
    rig = Rig(topo, "xdp")
    r = junk_flood(rig, sessions=1000, junk_per_media=19, rounds=2, rate=50_000,
                   python=sys.executable)
    assert r["ring_refused"] == 0, "the relay's veth refused frames: not a junk verdict"
    assert (r["media_sent"], r["junk_sent"]) == (2_000, 38_000)
    assert (r["media_delivered"], r["media_lost"]) == (2_000, 0)
    assert r["redirected"] == 2_000
    assert r["junk_dropped_counted"] == 38_000
    assert min(r["dropped"].values()) > 0  # both kinds of junk were seen
    assert "inet lrk" not in run("nft", "list", "tables", ns=topo.relay.ns).stdout
    for ns, dev in ((topo.relay.ns, "vc1"), (topo.relay.ns, "ve1"), (topo.callee.ns, "ve0")):
        assert "xdp" not in run("ip", "link", "show", "dev", dev, ns=ns).stdout
