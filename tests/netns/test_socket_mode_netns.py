"""Socket mode with the relay in a namespace of its own, between a caller and a callee host."""

from __future__ import annotations

import pytest

from lrk.client import LrkClient
from lrk.demo.media import rtp_packet, summarize
from lrk.demo.relay_process import RelayProcess

from .hosts import endpoint, pending, receive, wait

pytestmark = pytest.mark.netns

A_SSRC, B_SSRC = 0x51515151, 0x52525252


@pytest.mark.parametrize("family", ["ipv4", "ipv6"])
def test_call_across_namespaces(topo, family):
    v6 = family == "ipv6"
    caller_ip = topo.caller.ip6 if v6 else topo.caller.ip4
    callee_ip = topo.callee.ip6 if v6 else topo.callee.ip4
    internal = topo.relay.ip6 if v6 else topo.relay.ip4
    external = topo.relay_ext.ip6 if v6 else topo.relay_ext.ip4
    with RelayProcess(ports="30000-30099", netns=topo.relay.ns,
                      extra=["--internal-ip", internal, "--external-ip", external]) as relay, \
            LrkClient([relay.node]) as client:
        caller = endpoint(topo.caller.ns, caller_ip, 4000)
        nat = endpoint(topo.caller.ns, caller_ip, 4444)  # the caller's real (NATed) port
        callee = endpoint(topo.callee.ns, callee_ip, 5000)
        try:
            offer = client.offer("ns-call", "a", (caller_ip, 4000), interface="external")
            answer = client.answer("ns-call", "a", "b", (callee_ip, 5000),
                                   interface="internal")
            to_a = (answer["relay"]["ip"], answer["relay"]["port"])
            to_b = (offer["relay"]["ip"], offer["relay"]["port"])
            assert to_a[0] == internal and to_b[0] == external
            for seq in range(10):
                nat.sendto(rtp_packet(seq, A_SSRC), to_a)
            got = summarize(receive(callee, 10), A_SSRC)
            assert got["intact"] == 10 and got["sources"] == [to_b]
            for seq in range(10):
                callee.sendto(rtp_packet(seq, B_SSRC), to_b)
            got = summarize(receive(nat, 10), B_SSRC)
            assert got["intact"] == 10 and got["sources"] == [to_a]
            # a spoofer on the callee's host (other port) is refused after latching
            spoof = endpoint(topo.callee.ns, callee_ip, 5555)
            spoof.sendto(rtp_packet(99, 0xBAD), to_b)
            spoof.close()

            def b_drops() -> dict:
                return client.query("ns-call")["session"]["legs"]["B"]["counters"]["drops"]

            wait(lambda: b_drops() == {"unexpected_source": 1})  # handled: counted, and ...
            assert pending(caller) == [] and pending(nat) == []  # ... relayed to nobody
            legs = client.query("ns-call")["session"]["legs"]
            assert legs["A"]["latched"] == {"ip": caller_ip, "port": 4444}
            assert legs["A"]["counters"]["out_packets"] == 10
        finally:
            for s in (caller, nat, callee):
                s.close()
