"""bench.trafgen in namespaces: trafgen sends exactly what it was asked, the sink counts it.

The benchmark's generator has to be trusted before any capacity figure is: every frame
asked for leaves the device, arrives as the exact datagram built in bench.trafgen (payload
and source), and the sink's count matches.
"""

from __future__ import annotations

import socket

from bench.frames import Flow, rtp
from bench.netns import Topology, run, socket_in
from bench.trafgen import Sink, Trafgen, link_mac, steer


def _gen(topo: Topology, flows) -> Trafgen:
    return Trafgen(ns=topo.caller.ns, dev="vc0", src_mac=link_mac(topo.caller.ns, "vc0"),
                   dst_mac=link_mac(topo.relay.ns, "vc1"), flows=flows)


def _resolve_neighbours(topo: Topology) -> None:
    """The relay knows the callee's MAC beforehand, so no routed frame waits on ARP/ND."""
    mac = link_mac(topo.callee.ns, "ve0")
    for ip in (topo.callee.ip4, topo.callee.ip6):
        run("ip", "neigh", "replace", ip, "lladdr", mac, "dev", "ve1", "nud", "permanent",
            ns=topo.relay.ns)


def test_exact_datagram_arrives_through_routing_v4_and_v6(topo: Topology) -> None:
    _resolve_neighbours(topo)
    for fam, src, dst in ((socket.AF_INET, topo.caller.ip4, topo.callee.ip4),
                          (socket.AF_INET6, topo.caller.ip6, topo.callee.ip6)):
        rx = socket_in(topo.callee.ns, fam)
        try:
            rx.bind((dst, 31000))
            rx.settimeout(5)
            assert _gen(topo, [Flow(src, 4000, dst, 31000, ssrc=99)]).run(rate=1000, count=3) == 3
            for _ in range(3):
                data, addr = rx.recvfrom(2048)
                assert data == rtp(99) and addr[:2] == (src, 4000)
        finally:
            rx.close()


def test_sink_counts_every_frame_sent(topo: Topology) -> None:
    _resolve_neighbours(topo)
    flows = [Flow(topo.caller.ip4, 4000 + 2 * i, topo.callee.ip4, 30000 + 4 * i, ssrc=i + 1)
             for i in range(50)]
    with Sink(topo.callee.ns, (30000, 30400)) as sink:
        sent = _gen(topo, flows).run(rate=20_000, count=4_000)
        assert sent == 4_000
        assert sink.packets() == 4_000
    assert "lrksink" not in run("nft", "list", "tables", ns=topo.callee.ns).stdout


def test_steered_relay_work_runs_in_the_pinned_napi_thread(topo: Topology) -> None:
    """After `steer`, the relay namespace's forwarding runs in its NAPI thread on the chosen
    core (its run time grows with the load), and nothing is lost at a modest rate."""
    _resolve_neighbours(topo)
    pid = steer(topo.relay.ns, "vc1", topo.caller.ns, "vc0", cpu=1)
    with open(f"/proc/{pid}/status") as fh:
        allowed = [ln.split()[1] for ln in fh if ln.startswith("Cpus_allowed_list")]
    assert allowed == ["1"]

    def ran_ns() -> int:
        with open(f"/proc/{pid}/schedstat") as fh:
            return int(fh.read().split()[0])

    before = ran_ns()
    flows = [Flow(topo.caller.ip4, 4000, topo.callee.ip4, 30000 + 4 * i) for i in range(10)]
    with Sink(topo.callee.ns, (30000, 30100)) as sink:
        assert _gen(topo, flows).run(rate=20_000, count=4_000) == 4_000
        assert sink.packets() == 4_000
    assert ran_ns() > before
