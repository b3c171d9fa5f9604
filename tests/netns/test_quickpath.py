"""bench.quickpath end to end at a modest rate: each mode delivers exactly what was sent.

Capacity figures are for the benchmark run, not the test suite; here every mode's setup,
steering, generator and sink work together, and nothing is left behind.
"""

from __future__ import annotations

import sys

import pytest

from bench.netns import Topology, run
from bench.quickpath import SETUPS, Rig, flows_for, step

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
