"""Several relay addresses per side (issue 14), socket and packet modes: two calls get the SAME port
number on different relay addresses and both relay media exactly; nothing is left after
the deletes."""

from __future__ import annotations

import pytest

from bench.netns import run
from lrk.client import LrkClient
from lrk.demo.media import rtp_packet
from lrk.demo.relay_process import RelayProcess

from .hosts import endpoint, receive, wait

pytestmark = pytest.mark.netns

IN2, EX2 = "198.51.100.2", "198.51.100.66"  # second addresses, beside topo's relay ones


def _bound(ns: str) -> list:
    """UDP sockets bound in the relay's namespace on the relay port range."""
    out = run("ss", "-Huan", ns=ns).stdout.splitlines()
    return [line for line in out if any(f":{p} " in line + " " for p in range(30000, 30004))]


@pytest.mark.parametrize("mode", ["socket", "packet"])
def test_same_port_on_two_addresses_relays_both_calls(topo, mode):
    ns = topo.relay.ns
    run("ip", "addr", "add", f"{IN2}/26", "dev", "vc1", ns=ns)
    run("ip", "addr", "add", f"{EX2}/26", "dev", "ve1", ns=ns)
    in1, ex1 = topo.relay.ip4, topo.relay_ext.ip4
    caller_ip, callee_ip = topo.caller.ip4, topo.callee.ip4
    extra = ["--internal-ip", in1, "--internal-ip", IN2, "--external-ip", ex1,
             "--external-ip", EX2]
    if mode == "packet":  # taps on both links; sockets only hold the ports
        extra += ["--mode", "packet", "--packet-interface", "vc1", "--packet-interface", "ve1"]
    # two pairs per address: one call of one stream per address and side
    with RelayProcess(ports="30000-30003", netns=ns, extra=extra) as relay, \
            LrkClient([relay.node]) as client:
        socks = []
        try:
            relays = []
            for n in range(2):
                caller = endpoint(topo.caller.ns, caller_ip, 4000 + 2 * n)
                callee = endpoint(topo.callee.ns, callee_ip, 5000 + 2 * n)
                socks += [caller, callee]
                offer = client.offer(f"ma-{n}", "a", (caller_ip, 4000 + 2 * n),
                                     interface="external")
                answer = client.answer(f"ma-{n}", "a", "b", (callee_ip, 5000 + 2 * n),
                                       interface="internal")
                to_a = (answer["relay"]["ip"], answer["relay"]["port"])
                to_b = (offer["relay"]["ip"], offer["relay"]["port"])
                relays.append((caller, callee, to_a, to_b))
            # the engine spread the calls: each on its own addresses, the same port numbers
            assert [r[2][0] for r in relays] == [in1, IN2]
            assert [r[3][0] for r in relays] == [ex1, EX2]
            assert relays[0][2][1] == relays[1][2][1] and relays[0][3][1] == relays[1][3][1]
            stats = client.stats()
            assert stats["ports"]["in_use"] == 4 and stats["ports"]["total"] == 8
            assert {ip: p["in_use"] for ip, p in stats["ports_by_address"].items()} == {
                in1: 1, IN2: 1, ex1: 1, EX2: 1}
            for n, (caller, callee, to_a, to_b) in enumerate(relays):
                sent = [rtp_packet(seq, 0x5A000000 + n) for seq in range(5)]
                for pkt in sent:
                    caller.sendto(pkt, to_a)
                assert receive(callee, 5) == [(pkt, to_b) for pkt in sent]
                back = [rtp_packet(seq, 0x5B000000 + n) for seq in range(5)]
                for pkt in back:
                    callee.sendto(pkt, to_b)
                assert receive(caller, 5) == [(pkt, to_a) for pkt in back]
            assert len(_bound(ns)) == 8  # 2 calls x 2 legs x RTP/RTCP, the check can see
            for n in range(2):
                client.delete(f"ma-{n}")
            assert client.stats()["ports"]["in_use"] == 0
            wait(lambda: _bound(ns) == [])
        finally:
            for s in socks:
                s.close()
