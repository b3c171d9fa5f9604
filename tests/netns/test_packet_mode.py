"""Packet mode: media read from AF_PACKET taps, forwarded from the relay's UDP sockets."""

from __future__ import annotations

import pytest

from lrk.client import LrkClient
from lrk.daemon.launcher import RelayProcess
from lrk.sim.rtp import rtp_packet, summarize

from .hosts import endpoint, receive, tables

pytestmark = pytest.mark.netns

A_SSRC, B_SSRC = 0x81818181, 0x82828282


@pytest.mark.parametrize("family", ["ipv4", "ipv6"])
def test_packet_mode_call(topo, family):
    v6 = family == "ipv6"
    pick = (lambda h: h.ip6) if v6 else (lambda h: h.ip4)
    caller_ip, callee_ip = pick(topo.caller), pick(topo.callee)
    ns = topo.relay.ns
    relay = RelayProcess(ports="30000-30099", netns=ns, extra=[
        "--mode", "packet", "--packet-interface", "vc1", "--packet-interface", "ve1",
        "--internal-ip", pick(topo.relay), "--external-ip", pick(topo.relay_ext)]).start()
    sockets = []
    try:
        assert "table inet lrkpkt" in tables(ns)
        with LrkClient([relay.node]) as client:
            nat = endpoint(topo.caller.ns, caller_ip, 4444)  # SDP says 4000
            callee = endpoint(topo.callee.ns, callee_ip, 5000)
            stranger = endpoint(topo.callee.ns, callee_ip, 5999)
            sockets += [nat, callee, stranger]
            offer = client.offer("p-call", "a", (caller_ip, 4000), interface="external")
            answer = client.answer("p-call", "a", "b", (callee_ip, 5000), interface="internal")
            to_a = (answer["relay"]["ip"], answer["relay"]["port"])
            to_b = (offer["relay"]["ip"], offer["relay"]["port"])
            for seq in range(30):
                nat.sendto(rtp_packet(seq, A_SSRC), to_a)
            got = summarize(receive(callee, 31), A_SSRC)  # 31: a duplicate would show
            assert got == {"intact": 30, "damaged": 0, "sources": [to_b], "in_order": True}
            for seq in range(30):
                callee.sendto(rtp_packet(seq, B_SSRC), to_b)
            got = summarize(receive(nat, 31), B_SSRC)
            assert got == {"intact": 30, "damaged": 0, "sources": [to_a], "in_order": True}
            stranger.sendto(rtp_packet(0, 0xBAD), to_a)  # the callee's host is not leg A's peer
            callee.settimeout(0.3)
            assert receive(callee, 1) == []
            legs = client.query("p-call")["session"]["legs"]
            assert legs["A"]["latched"] == {"ip": caller_ip, "port": 4444}
            assert legs["A"]["counters"]["in_packets"] == 30
            assert legs["A"]["counters"]["drops"] == {"unexpected_source": 1}
        assert relay.stop() == 0
        assert "lrkpkt" not in tables(ns), "stop removes the drop rules"
    finally:
        relay.stop()
        for s in sockets:
            s.close()
