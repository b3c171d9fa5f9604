"""Kernel mode: media relayed by netfilter NAT in the relay's namespace, no userspace hop."""

from __future__ import annotations

import ipaddress
import time

import pytest

from bench.netns import run
from lrk.client import LrkClient
from lrk.client.errors import RelayError
from lrk.demo.media import rtcp_sender_report, rtp_packet, summarize
from lrk.demo.relay_process import RelayProcess

from .hosts import endpoint, flows, pending, receive, tables, wait

pytestmark = pytest.mark.netns

A_SSRC, B_SSRC = 0x61616161, 0x62626262


def _latch(client, leg: str):
    """(rtp, rtcp) latched peers of a leg as `query` shows them, addresses normalised."""
    got = client.query("k-call")["session"]["legs"][leg]

    def norm(a):
        return None if a is None else (str(ipaddress.ip_address(a["ip"])), a["port"])

    return norm(got["latched"]), norm(got["rtcp_latched"])


def _call_both_ways(client, caller_ip: str, callee_ip: str, nat, callee):
    """Call "k-call" (caller SDP port 4000, callee 5000), 20 RTP packets each way: the
    callee gets the caller's from leg B's relay address, and the caller (`nat`, its real
    port) the callee's from leg A's, latched. Returns (leg A's, leg B's) relay address."""
    offer = client.offer("k-call", "a", (caller_ip, 4000), interface="external")
    answer = client.answer("k-call", "a", "b", (callee_ip, 5000), interface="internal")
    to_a = (answer["relay"]["ip"], answer["relay"]["port"])
    to_b = (offer["relay"]["ip"], offer["relay"]["port"])
    for seq in range(20):
        nat.sendto(rtp_packet(seq, A_SSRC), to_a)
    got = summarize(receive(callee, 20), A_SSRC)
    assert got == {"intact": 20, "damaged": 0, "sources": [to_b], "in_order": True}
    for seq in range(20):
        callee.sendto(rtp_packet(seq, B_SSRC), to_b)
    got = summarize(receive(nat, 20), B_SSRC)  # latched: to the NATed port
    assert got == {"intact": 20, "damaged": 0, "sources": [to_a], "in_order": True}
    return to_a, to_b


def _acct(ns: str) -> str:
    """nf_conntrack_acct and nf_conntrack_timestamp of a namespace, e.g. "0 0"."""
    return " ".join(run("sysctl", "-n", f"net.netfilter.nf_conntrack_{name}", ns=ns)
                    .stdout.strip() for name in ("acct", "timestamp"))


@pytest.mark.parametrize("counters", ["conntrack", "rules"])
@pytest.mark.parametrize("family", ["ipv4", "ipv6"])
def test_kernel_mode_call(topo, tmp_path, family, counters):
    v6 = family == "ipv6"
    pick = (lambda h: h.ip6) if v6 else (lambda h: h.ip4)
    caller_ip, callee_ip = pick(topo.caller), pick(topo.callee)
    internal, external = pick(topo.relay), pick(topo.relay_ext)
    cfg = tmp_path / "kernel.toml"
    cfg.write_text(f'kernel_poll = 0.2\nquarantine = 0\nkernel_counters = "{counters}"\n')
    ns = topo.relay.ns
    run("sysctl", "-qw", "net.netfilter.nf_conntrack_acct=0",
        "net.netfilter.nf_conntrack_timestamp=0", ns=ns)
    relay = RelayProcess(ports="30000-30099", netns=ns, extra=[
        "--mode", "kernel", "--internal-ip", internal, "--external-ip", external,
        "--config", str(cfg)]).start()
    sockets = []
    try:
        assert "table inet lrk" in tables(ns)
        listing = run("nft", "list", "table", "inet", "lrk", ns=ns).stdout
        if counters == "conntrack":
            assert _acct(ns) == "1 1", "conntrack counting switches accounting on"
            assert "pre_filter" not in listing and "seen4" not in listing
        else:
            assert _acct(ns) == "0 0", "rules counting leaves the sysctls alone"
            assert "seen4" in listing and "pre_filter" in listing
        with LrkClient([relay.node]) as client:
            nat = endpoint(topo.caller.ns, caller_ip, 4444)  # the caller's real port
            callee = endpoint(topo.callee.ns, callee_ip, 5000)
            callee_rtcp = endpoint(topo.callee.ns, callee_ip, 5001)
            spoof = endpoint(topo.callee.ns, callee_ip, 5999)
            sockets += [nat, callee, callee_rtcp, spoof]
            to_a, to_b = _call_both_ways(client, caller_ip, callee_ip, nat, callee)
            report = rtcp_sender_report(A_SSRC, 20, 3440)
            nat.sendto(report, (to_a[0], to_a[1] + 1))
            assert receive(callee_rtcp, 1) == [(report, (to_b[0], to_b[1] + 1))]

            # the callee's host is not leg A's peer: refused by admission, counted
            spoof.sendto(rtp_packet(0, 0xBAD), to_a)
            wait(lambda: client.stats()["counters"]["media.dropped.unexpected_source"] == 1,
                 timeout=5)  # the ruleset dropped it (read from the kernel every 0.2 s) ...
            assert pending(callee) == []  # ... so nothing of it reached the callee
            # counters are read from the kernel at most every kernel_poll (0.2 s here)
            def counted() -> bool:
                legs = client.query("k-call")["session"]["legs"]
                return (legs["A"]["counters"]["in_packets"] == 21
                        and legs["B"]["counters"]["in_packets"] == 20)

            wait(counted, timeout=5)
            # conntrack latched the caller's real port; query shows it like the other modes
            real = (str(ipaddress.ip_address(caller_ip)), 4444)
            callee_real = (str(ipaddress.ip_address(callee_ip)), 5000)
            wait(lambda: _latch(client, "A") == (real, real), timeout=5)
            assert _latch(client, "B") == (callee_real, None)  # the callee sent no RTCP
            assert flows(ns), "conntrack carries the call's flows"

            # a re-offer starts a new generation: the old flows are flushed and their latch
            # is not reported again, across several kernel polls
            client.offer("k-call", "a", (caller_ip, 4000), interface="external")
            stale_until = time.monotonic() + 1.0  # five kernel_poll periods
            while time.monotonic() < stale_until:
                assert _latch(client, "A") == (None, None)
                time.sleep(0.1)
            moved = endpoint(topo.caller.ns, caller_ip, 4446)  # the NAT picked a new port
            sockets.append(moved)
            for seq in range(5):
                moved.sendto(rtp_packet(100 + seq, A_SSRC), to_a)
            assert len(receive(callee, 5)) == 5
            new_real = (real[0], 4446)
            wait(lambda: _latch(client, "A") == (new_real, None), timeout=5)

            # counters never go back when flows vanish: the re-offer flushed the first
            # flows, now every flow goes (as on expiry); more media only adds
            history = []

            def in_packets(expected: int) -> bool:
                legs = client.query("k-call")["session"]["legs"]
                history.append((legs["A"]["counters"]["in_packets"],
                                legs["B"]["counters"]["in_packets"]))
                return history[-1] == (expected, 20)

            wait(lambda: in_packets(26), timeout=5)
            run("conntrack", "-F", ns=ns)
            assert flows(ns) == []
            for seq in range(5):
                moved.sendto(rtp_packet(200 + seq, A_SSRC), to_a)
            assert len(receive(callee, 5)) == 5
            wait(lambda: in_packets(31), timeout=5)
            a_seen = [a for a, _ in history]
            assert a_seen == sorted(a_seen) and a_seen[0] >= 21, history

            client.delete("k-call")
            assert flows(ns) == [], "a deleted session leaves no conntrack flow"
            nat.sendto(rtp_packet(99, A_SSRC), to_a)
            # nothing admits it after delete: the ruleset drops and counts it
            wait(lambda: client.stats()["counters"]["media.dropped.unexpected_source"] == 2,
                 timeout=5)
            assert pending(callee) == []  # nothing relayed after delete

            # silence expiry works from the kernel's counters
            client.offer("k-quiet", "a", (caller_ip, 4000), timeout=1)
            client.answer("k-quiet", "a", "b", (callee_ip, 5000))
            wait(lambda: client.list()["total"] == 0)
            assert client.stats()["counters"]["sessions.expired.silence"] == 1
        assert relay.stop() == 0
        assert "table inet lrk" not in tables(ns), "stop removes the table"
        assert _acct(ns) == "0 0", "stop restores nf_conntrack_acct and _timestamp"
        assert flows(ns) == []
    finally:
        relay.stop()
        for s in sockets:
            s.close()


def test_kernel_mode_without_counters_relays_latches_and_expires(topo, tmp_path):
    """kernel_counters = none: conntrack's ruleset, the sysctls left as they are (0 here), so
    the call's flows carry no accounting; media still flows both ways, the caller's real
    port is latched, counters read 0, and a silent call still ends on its own."""
    caller_ip, callee_ip = topo.caller.ip4, topo.callee.ip4
    ns = topo.relay.ns
    cfg = tmp_path / "kernel.toml"
    cfg.write_text('kernel_poll = 0.2\nquarantine = 0\nkernel_counters = "none"\n'
                   'log_level = "info"\n')
    run("sysctl", "-qw", "net.netfilter.nf_conntrack_acct=0",
        "net.netfilter.nf_conntrack_timestamp=0", ns=ns)
    relay = RelayProcess(ports="30000-30099", netns=ns, extra=[
        "--mode", "kernel", "--internal-ip", topo.relay.ip4,
        "--external-ip", topo.relay_ext.ip4, "--config", str(cfg)]).start()
    sockets = []
    try:
        assert _acct(ns) == "0 0", "kernel_counters = none touches no sysctl"
        listing = run("nft", "list", "table", "inet", "lrk", ns=ns).stdout
        assert "pre_filter" not in listing and "seen4" not in listing
        with LrkClient([relay.node]) as client:
            nat = endpoint(topo.caller.ns, caller_ip, 4444)  # the caller's real port
            callee = endpoint(topo.callee.ns, callee_ip, 5000)
            sockets += [nat, callee]
            _call_both_ways(client, caller_ip, callee_ip, nat, callee)
            call_flows = flows(ns)
            assert call_flows and not any("packets=" in f for f in call_flows), call_flows
            real = (str(ipaddress.ip_address(caller_ip)), 4444)
            wait(lambda: _latch(client, "A") == (real, None), timeout=5)
            legs = client.query("k-call")["session"]["legs"]
            assert legs["A"]["counters"]["in_packets"] == 0
            assert legs["B"]["counters"]["in_packets"] == 0
            client.delete("k-call")
            assert flows(ns) == [], "a deleted session leaves no conntrack flow"

            # silence expiry works from the flows' timeouts alone
            client.offer("k-quiet", "a", (caller_ip, 4000), timeout=1)
            client.answer("k-quiet", "a", "b", (callee_ip, 5000))
            wait(lambda: client.list()["total"] == 0)
            assert client.stats()["counters"]["sessions.expired.silence"] == 1
        assert relay.stop() == 0
        assert "media not counted (kernel_counters = none)" in relay.output
        assert "table inet lrk" not in tables(ns), "stop removes the table"
        assert _acct(ns) == "0 0"
        assert flows(ns) == []
    finally:
        relay.stop()
        for s in sockets:
            s.close()


def test_kernel_mode_refuses_to_start_without_forwarding(topo):
    run("sysctl", "-qw", "net.ipv4.ip_forward=0", ns=topo.relay.ns)
    relay = RelayProcess(ports="30000-30099", netns=topo.relay.ns, extra=[
        "--mode", "kernel", "--internal-ip", topo.relay.ip4])
    with pytest.raises(Exception) as err:
        relay.start(ready_timeout=10)
    assert "ip_forward" in str(err.value)
    assert "lrk" not in tables(topo.relay.ns)


def test_leftover_table_of_a_crashed_relay_is_replaced(topo):
    ns = topo.relay.ns
    run("nft", "add", "table", "inet", "lrk", ns=ns)
    run("nft", "add", "chain", "inet", "lrk", "stale", ns=ns)
    with RelayProcess(ports="30000-30099", netns=ns, extra=[
            "--mode", "kernel", "--internal-ip", topo.relay.ip4]) as relay:
        listing = run("nft", "list", "table", "inet", "lrk", ns=ns).stdout
        assert "stale" not in listing and "pre_nat" in listing and "media4" in listing
        with LrkClient([relay.node]) as client, pytest.raises(RelayError):
            client.query("nothing")
    assert "lrk" not in tables(ns)
