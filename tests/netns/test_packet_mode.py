"""Packet mode: media read from AF_PACKET taps, sent with one raw-socket sendmmsg per family
and poll round (the relay's UDP sockets hold the ports and are the fallback).

Every packet here is received by a plain UDP socket on the caller or callee: the receiving
kernel verifies UDP checksums and drops bad ones (tests/netns/test_packet_io.py shows it
counting InCsumErrors), so delivery proves the relay-built headers valid."""

from __future__ import annotations

import subprocess
import time

import pytest

from lrk.client import LrkClient
from lrk.demo.media import rtcp_sender_report, rtp_packet, summarize
from lrk.demo.relay_process import RelayProcess

from .hosts import endpoint, flows, pending, receive, tables, wait

pytestmark = pytest.mark.netns

A_SSRC, B_SSRC = 0x81818181, 0x82828282
PORTS = "30000-30399"


def _relay(topo, v6: bool, env=None) -> RelayProcess:
    pick = (lambda h: h.ip6) if v6 else (lambda h: h.ip4)
    return RelayProcess(ports=PORTS, netns=topo.relay.ns, env=env, extra=[
        "--mode", "packet", "--packet-interface", "vc1", "--packet-interface", "ve1",
        "--internal-ip", pick(topo.relay), "--external-ip", pick(topo.relay_ext)]).start()


def _ipv6_ready(topo) -> None:
    """Bounded wait until no address is tentative (before DAD of the link-local addresses
    ends, neighbour discovery resolves nobody and IPv6 packets of any socket are lost)."""
    deadline = time.monotonic() + 10.0
    while time.monotonic() < deadline:
        if not any(subprocess.run(["ip", "netns", "exec", ns, "ip", "-6", "addr", "show",
                                   "tentative"], capture_output=True, text=True,
                                  timeout=20).stdout.strip() for ns in topo.namespaces):
            return
        time.sleep(0.1)
    raise AssertionError("IPv6 addresses still tentative after 10 s")


def _egress(counters: dict) -> dict:
    return {k[len("media.egress."):]: v for k, v in counters.items()
            if k.startswith("media.egress.")}


def call_both_ways(topo, client, v6: bool, call_id: str, sockets: list) -> None:
    """One call through a packet-mode relay: RTP both ways (the caller behind a NAT: SDP
    says port 4000, it sends from 4444), RTCP both ways with odd lengths, a stranger's
    packet dropped as unexpected_source, the caller's leg latched: 71 packets relayed.
    Its sockets go to `sockets` for the caller to close."""
    pick = (lambda h: h.ip6) if v6 else (lambda h: h.ip4)
    caller_ip, callee_ip = pick(topo.caller), pick(topo.callee)
    nat = endpoint(topo.caller.ns, caller_ip, 4444)  # SDP says 4000
    nat_rtcp = endpoint(topo.caller.ns, caller_ip, 4445)
    callee = endpoint(topo.callee.ns, callee_ip, 5000)
    callee_rtcp = endpoint(topo.callee.ns, callee_ip, 5001)
    stranger = endpoint(topo.callee.ns, callee_ip, 5999)
    sockets += [nat, nat_rtcp, callee, callee_rtcp, stranger]
    offer = client.offer(call_id, "a", (caller_ip, 4000), interface="external")
    answer = client.answer(call_id, "a", "b", (callee_ip, 5000), interface="internal")
    to_a = (answer["relay"]["ip"], answer["relay"]["port"])
    to_b = (offer["relay"]["ip"], offer["relay"]["port"])
    to_a_rtcp, to_b_rtcp = (to_a[0], to_a[1] + 1), (to_b[0], to_b[1] + 1)
    for seq in range(30):
        nat.sendto(rtp_packet(seq, A_SSRC), to_a)
    got = summarize(receive(callee, 31), A_SSRC)  # 31: a duplicate would show
    assert got == {"intact": 30, "damaged": 0, "sources": [to_b], "in_order": True}
    for seq in range(30):
        callee.sendto(rtp_packet(seq, B_SSRC), to_b)
    got = summarize(receive(nat, 31), B_SSRC)
    assert got == {"intact": 30, "damaged": 0, "sources": [to_a], "in_order": True}
    # RTCP (odd lengths too: the checksum pads them) latches separately
    reports_a = [rtcp_sender_report(A_SSRC, i, 160 * i) + b"x" * (i % 2)
                 for i in range(5)]
    reports_b = [rtcp_sender_report(B_SSRC, i, 160 * i) + b"y" * (i % 2)
                 for i in range(5)]
    for rep in reports_a:
        nat_rtcp.sendto(rep, to_a_rtcp)
    assert receive(callee_rtcp, 5) == [(rep, to_b_rtcp) for rep in reports_a]
    for rep in reports_b:
        callee_rtcp.sendto(rep, to_b_rtcp)
    assert receive(nat_rtcp, 5) == [(rep, to_a_rtcp) for rep in reports_b]
    # leg A's peer talks (a learning leg keeps a talking peer): a stranger from the
    # callee's host must not take it over
    nat.sendto(rtp_packet(30, A_SSRC), to_a)
    assert len(receive(callee, 1)) == 1
    stranger.sendto(rtp_packet(0, 0xBAD), to_a)
    wait(lambda: client.stats()["counters"]["media.dropped.unexpected_source"] >= 1)
    assert pending(callee) == []  # counted as dropped, and nothing came through
    for s in (nat_rtcp, callee_rtcp):  # no duplicates queued behind the reports
        s.setblocking(False)
        with pytest.raises(BlockingIOError):
            s.recv(100)
    legs = client.query(call_id)["session"]["legs"]
    assert legs["A"]["latched"] == {"ip": caller_ip, "port": 4444}
    assert legs["A"]["counters"]["in_packets"] == 36  # 30 + 5 RTCP + the keep-alive
    assert legs["A"]["counters"]["drops"] == {"unexpected_source": 1}


@pytest.mark.parametrize("family", ["ipv4", "ipv6"])
def test_packet_mode_call(topo, family):
    """RTP and RTCP both ways through the raw egress; sources are the relay's ports."""
    v6 = family == "ipv6"
    ns = topo.relay.ns
    _ipv6_ready(topo)
    relay = _relay(topo, v6)
    sockets = []
    try:
        assert "table inet lrkpkt" in tables(ns)
        with LrkClient([relay.node]) as client:
            call_both_ways(topo, client, v6, "p-call", sockets)
            counters = client.stats()["counters"]
            eg = _egress(counters)
            assert counters["media.forwarded.packets"] == 71
            assert eg["raw.packets"] == 71 and eg["fallback.packets"] == 0, eg
            assert eg["raw.disabled"] == 0 and 1 <= eg["raw.calls"] <= 71
        assert relay.stop() == 0
        assert "lrkpkt" not in tables(ns), "stop removes the drop rules"
    finally:
        relay.stop()
        for s in sockets:
            s.close()


CT_TABLE = """table inet lrkcttest {
    chain out {
        type filter hook output priority 0; policy accept;
        ct state untracked udp sport 30000-30399 counter
    }
}
"""


def _ct_untracked(ns: str) -> int:
    out = subprocess.run(["ip", "netns", "exec", ns, "nft", "list", "table", "inet",
                          "lrkcttest"], capture_output=True, text=True, timeout=20).stdout
    return int(out.split("counter packets ")[1].split()[0])


def _burst(topo, relay, sessions: int, per_leg: int, tag: str):
    """`sessions` calls set up, then every caller and callee socket sends `per_leg`
    packets back to back; returns (what each side got, expected, relay counters)."""
    sockets = []
    try:
        with LrkClient([relay.node]) as client:
            calls = []
            for i in range(sessions):
                a = endpoint(topo.caller.ns, topo.caller.ip4, 6000 + 2 * i)
                b = endpoint(topo.callee.ns, topo.callee.ip4, 6000 + 2 * i)
                sockets += [a, b]
                offer = client.offer(f"{tag}{i}", "a", (topo.caller.ip4, 6000 + 2 * i),
                                     interface="external")
                answer = client.answer(f"{tag}{i}", "a", "b", (topo.callee.ip4, 6000 + 2 * i),
                                       interface="internal")
                calls.append((a, b, (answer["relay"]["ip"], answer["relay"]["port"]),
                              (offer["relay"]["ip"], offer["relay"]["port"])))
            # one packet each way per call first: every leg latches
            for a, _b, to_a, _to_b in calls:
                a.sendto(rtp_packet(0, 1), to_a)
            for _a, b, _to_a, to_b in calls:
                assert len(receive(b, 1)) == 1
                b.sendto(rtp_packet(0, 2), to_b)
            for a, _b, _to_a, _to_b in calls:
                assert len(receive(a, 1)) == 1
            for seq in range(1, per_leg):  # then the burst, back to back
                for a, b, to_a, to_b in calls:
                    a.sendto(rtp_packet(seq, 1), to_a)
                    b.sendto(rtp_packet(seq, 2), to_b)
            ok = 0
            for a, b, to_a, to_b in calls:
                for s, ssrc, src in ((b, 1, to_b), (a, 2, to_a)):
                    s.settimeout(2.0)
                    got = summarize(receive(s, per_leg - 1), ssrc)
                    ok += got == {"intact": per_leg - 1, "damaged": 0, "sources": [src],
                                  "in_order": True}
            for s in sockets:  # nothing more: no duplicates
                s.setblocking(False)
                with pytest.raises(BlockingIOError):
                    s.recv(100)
            return ok, client.stats()["counters"]
    finally:
        for s in sockets:
            s.close()


def test_packet_mode_burst_across_sessions_is_batched(topo):
    """50 calls, packets sent back to back from all of them: everything arrives, and the
    relay needed fewer sendmmsg calls than packets.  Conntrack is active in the relay's
    namespace (a ct rule loads it) and the relay's egress bypasses it (notrack)."""
    ns = topo.relay.ns
    subprocess.run(["ip", "netns", "exec", ns, "nft", "-f", "-"], input=CT_TABLE, text=True,
                   check=True, timeout=20)
    relay = _relay(topo, False)
    try:
        ok, counters = _burst(topo, relay, 50, 5, "burst")
        eg = _egress(counters)
        assert ok == 100, (ok, eg)
        total = 50 * 2 * 5
        assert counters["media.forwarded.packets"] == total
        assert eg["raw.packets"] == total and eg["fallback.packets"] == 0, eg
        assert eg["raw.calls"] < total / 2, eg  # batched across sessions
        assert _ct_untracked(ns) == total
        assert not [f for f in flows(ns) if "sport=30" in f or "dport=30" in f]
        assert relay.stop() == 0
    finally:
        relay.stop()


def test_packet_mode_udp_fallback_still_delivers(topo):
    """Raw egress off (as when the raw sockets cannot be opened): each session's UDP
    socket sends, every packet is counted as a fallback, delivery is the same."""
    relay = _relay(topo, False, env={"LRK_PACKET_EGRESS": "udp"})
    try:
        ok, counters = _burst(topo, relay, 10, 4, "fb")
        eg = _egress(counters)
        assert ok == 20, (ok, eg)
        assert counters["media.forwarded.packets"] == 10 * 2 * 4
        assert eg == {"fallback.packets": 80, "raw.disabled": 1}
        assert relay.stop() == 0
    finally:
        relay.stop()
