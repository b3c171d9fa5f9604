"""bench.quickpath end to end at a modest rate: each mode delivers exactly what was sent.

Capacity figures are for the benchmark run, not the test suite; here every mode's setup,
steering, generator and sink work together, and nothing is left behind.
"""

from __future__ import annotations

import sys

import pytest

from bench.netns import Topology, run
from bench.quickpath import SETUPS, Rig, flows_for, step
from bench.trafgen import Sink

pytestmark = pytest.mark.timeout(120)


@pytest.mark.parametrize("mode", ["routing", "static-nat", "kernel", "xdp"])
def test_mode_delivers_every_packet_at_a_modest_rate(topo: Topology, mode: str) -> None:
    rig = Rig(topo)
    pairs = flows_for(topo, 20)
    with SETUPS[mode](rig, pairs, sys.executable) as dests:
        assert len(dests) == 20
        gen = rig.generator(pairs, dests)
        with Sink(topo.callee.ns, (30000, 30040)) as sink:
            r = step(gen, sink, rate=20_000, seconds=0.2)
            assert (r["sent"], r["received"], r["loss"]) == (4000, 4000, 0.0)
            assert 0.0 <= r["relay_core_busy"] <= 1.0
    tables = run("nft", "list", "tables", ns=topo.relay.ns).stdout
    assert "qpnat" not in tables and "inet lrk" not in tables
    for dev in ("vc1", "ve1"):
        assert "xdp" not in run("ip", "link", "show", "dev", dev, ns=topo.relay.ns).stdout
