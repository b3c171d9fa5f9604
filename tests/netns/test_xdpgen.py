"""bench.xdpgen in namespaces: the XDP generator sends exactly what it was asked, byte for
byte and in rotation, at no more than its rate; the XDP sink counts exactly that; nothing
of either is left attached or loaded afterwards.

A capacity figure is only as good as its generator: these are the checks that make the
figures of bench.quickpath --generator xdp trustworthy.
"""

from __future__ import annotations

import json
import socket
import subprocess
from typing import List

import pytest

from bench.frames import Flow, frame
from bench.netns import Topology, run, socket_in
from bench.quickpath import NAPI_RT_PRIO
from bench.trafgen import link_mac, steer
from bench.xdpgen import MAX_BURST, XdpGen, XdpSink, xmit_errors

from .hosts import wait

pytestmark = [pytest.mark.netns, pytest.mark.timeout(60)]

ETH_P_ALL = 0x0003


def _route_to_callee(topo: Topology) -> None:
    """Plain forwarding caller -> relay -> callee, the relay knowing the callee's MAC, its
    caller-side veth with NAPI (steered) so it takes XDP frames."""
    mac = link_mac(topo.callee.ns, "ve0")
    run("ip", "neigh", "replace", topo.callee.ip4, "lladdr", mac, "dev", "ve1", "nud",
        "permanent", ns=topo.relay.ns)
    run("ethtool", "-K", "ve0", "gro", "on", "tx", "off", ns=topo.callee.ns)
    steer(topo.relay.ns, "vc1", topo.caller.ns, "vc0", cpu=1, rt_prio=NAPI_RT_PRIO)


def _flows(topo: Topology, n: int) -> List[Flow]:
    return [Flow(topo.caller.ip4, 4000 + 2 * i, topo.callee.ip4, 30000 + 2 * i, ssrc=i + 1)
            for i in range(n)]


def _gen(topo: Topology, flows: List[Flow]) -> XdpGen:
    return XdpGen.for_flows(topo.caller.ns, "vc0", link_mac(topo.caller.ns, "vc0"),
                            link_mac(topo.relay.ns, "vc1"), flows, cpu=0)


def _prog_ids(name: str) -> List[int]:
    out = subprocess.run(["bpftool", "-j", "prog", "show"], capture_output=True, text=True,
                         check=True).stdout
    return [p["id"] for p in json.loads(out) if p.get("name") == name]


def _xdp_on(ns: str, dev: str) -> bool:
    return "xdp" in run("ip", "link", "show", "dev", dev, ns=ns).stdout


@pytest.mark.parametrize("family", ["ipv4", "ipv6"])
def test_frames_arrive_byte_for_byte_in_rotation(topo: Topology, family: str) -> None:
    """Captured at the relay's veth: exactly bench.frames' bytes, flow 0, 1, 2, 0, ...;
    recycled pages that the relay's stack rewrote (TTL, MACs) go out whole again."""
    _route_to_callee(topo)
    v6 = family == "ipv6"
    src, dst = (topo.caller.ip6, topo.callee.ip6) if v6 else (topo.caller.ip4,
                                                                topo.callee.ip4)
    if v6:
        run("ip", "-6", "neigh", "replace", dst, "lladdr", link_mac(topo.callee.ns, "ve0"),
            "dev", "ve1", "nud", "permanent", ns=topo.relay.ns)
    flows = [Flow(src, 4000 + 2 * i, dst, 30000 + 2 * i, ssrc=i + 1) for i in range(3)]
    ethertype, proto_at = (b"\x86\xdd", 20) if v6 else (b"\x08\x00", 23)
    cap = socket_in(topo.relay.ns, socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
    try:
        cap.bind(("vc1", 0))
        cap.settimeout(3)
        gen_mac, relay_mac = link_mac(topo.caller.ns, "vc0"), link_mac(topo.relay.ns, "vc1")
        with _gen(topo, flows) as gen:
            assert gen.run(rate=10_000, count=30) == 30
            assert (gen.last.frames, gen.last.lag_resets) == (30, 0)
            got = []
            while len(got) < 30:
                data, _addr = cap.recvfrom(4096)
                if data[12:14] == ethertype and data[proto_at] == 17:  # not ARP, ND, MLD
                    got.append(data)
        assert got == [frame(flows[i % 3], gen_mac, relay_mac) for i in range(30)]
    finally:
        cap.close()


def test_n_frames_asked_n_frames_counted_at_the_sink(topo: Topology) -> None:
    """2,000 frames of 50 flows at 2,000 pkt/s (veth's 256-frame ring then covers a
    128 ms stall of a shared machine; at 20,000 pkt/s a loaded one lost frames): the
    program sent 2,000, the relay's veth refused none, the sink counted 2,000 (and their
    bytes); never faster than the schedule allows; then nothing of either program is
    left."""
    _route_to_callee(topo)
    with _gen(topo, _flows(topo, 50)) as gen:
        gen_ids = _prog_ids("lrk_gen")
        assert gen_ids
        with XdpSink(topo.callee.ns, "ve0", (30000, 30100)) as sink:
            sink_ids = _prog_ids("lrk_sink")
            assert sink.attached()
            refused0 = xmit_errors(topo.caller.ns, "vc0")
            assert gen.run(rate=2_000, count=2_000) == 2_000
            span = (gen.last.last_ns - gen.last.first_ns) / 1e9
            assert span >= (2_000 - 1 - MAX_BURST) / 2_000
            assert xmit_errors(topo.caller.ns, "vc0") == refused0
            wait(lambda: sink.packets() >= 2_000, timeout=5)
            assert (sink.packets(), sink.bytes()) == (2_000, 2_000 * len(
                frame(_flows(topo, 1)[0], "00:00:00:00:00:01", "00:00:00:00:00:02")))
        assert not _xdp_on(topo.callee.ns, "ve0")
    assert not set(gen_ids) & set(_prog_ids("lrk_gen"))
    assert not set(sink_ids) & set(_prog_ids("lrk_sink"))


def test_frames_that_differ_beyond_the_header_are_refused() -> None:
    """The generator rewrites only the first bytes of each frame: frames of other lengths
    or payloads would be sent wrong, so they are refused before anything loads."""
    a = frame(Flow("198.51.100.10", 4000, "198.51.100.70", 30000), "02:00:00:00:00:01",
              "02:00:00:00:00:02")
    b = frame(Flow("198.51.100.10", 4002, "198.51.100.70", 30002), "02:00:00:00:00:01",
              "02:00:00:00:00:02", payload=b"x" * 172)
    with pytest.raises(ValueError, match="beyond byte"):
        XdpGen("unused-ns", "vc0", [a, b])
