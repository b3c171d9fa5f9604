"""Several relay addresses per side (issue 14), in every mode: two calls get the SAME port
number on different relay addresses and both relay media exactly (bytes and source);
nothing is left after the deletes (sockets; nft elements and conntrack flows in the
kernel modes, where each address has its own ct mark slot: mark = port + slot * 0x10000)."""

from __future__ import annotations

import re

import pytest

from bench.netns import run
from lrk.client import LrkClient
from lrk.demo.media import rtcp_sender_report, rtp_packet
from lrk.demo.relay_process import RelayProcess

from .hosts import endpoint, flows, pending, receive, relay_flow, wait
from .test_xdp_mode import _gro, _resolve

pytestmark = pytest.mark.netns

IN2, EX2 = "198.51.100.2", "198.51.100.66"  # second addresses, beside topo's relay ones
SLOT = 0x10000
KERNEL_MODES = ("kernel", "nfqueue", "xdp")
ELEMENT_SETS = ("fwd4", "mark4", "out4", "adm4", "fmark4", "ffwd4")


def _bound(ns: str) -> list:
    """UDP sockets bound in the relay's namespace on the relay port range."""
    out = run("ss", "-Huan", ns=ns).stdout.splitlines()
    return [line for line in out if any(f":{p} " in line + " " for p in range(30000, 30004))]


def _marks(ns: str) -> set:
    """The ct marks of the relay namespace's flows."""
    return {int(m) for line in flows(ns) for m in re.findall(r"\bmark=(\d+)", line)}


def _elements(ns: str) -> dict:
    """Session elements of the table, per set/map (none once every call is deleted)."""
    out = {}
    for name in ELEMENT_SETS:
        kind = "set" if name.startswith("adm") else "map"
        text = run("nft", "list", kind, "inet", "lrk", name, ns=ns).stdout
        body = re.search(r"elements = \{([^}]*)\}", text)
        out[name] = body.group(1).split(",") if body else []
    return {k: v for k, v in out.items() if v}


def _two_addresses(topo, tmp_path, config: str) -> list:
    """The relay namespace gets a second address on each side (IN2, EX2); returns the
    relay's options for both addresses per side and a config file (`config` added)."""
    ns = topo.relay.ns
    run("ip", "addr", "add", f"{IN2}/26", "dev", "vc1", ns=ns)
    run("ip", "addr", "add", f"{EX2}/26", "dev", "ve1", ns=ns)
    cfg = tmp_path / "lrk.toml"
    cfg.write_text("kernel_poll = 0.2\nquarantine = 0\n" + config)
    return ["--internal-ip", topo.relay.ip4, "--internal-ip", IN2,
            "--external-ip", topo.relay_ext.ip4, "--external-ip", EX2, "--config", str(cfg)]


@pytest.mark.parametrize("mode", ["socket", "packet", "kernel", "nfqueue", "xdp"])
def test_same_port_on_two_addresses_relays_both_calls(topo, tmp_path, mode):
    ns = topo.relay.ns
    in1, ex1 = topo.relay.ip4, topo.relay_ext.ip4
    caller_ip, callee_ip = topo.caller.ip4, topo.callee.ip4
    extra = _two_addresses(topo, tmp_path, "")
    if mode == "packet":  # taps on both links; sockets only hold the ports
        extra += ["--mode", "packet", "--packet-interface", "vc1", "--packet-interface", "ve1"]
    elif mode == "xdp":
        _gro(topo)
        extra += ["--mode", "xdp", "--xdp-interface", "vc1", "--xdp-interface", "ve1"]
    elif mode != "socket":
        extra += ["--mode", mode]
    # two pairs per address: one call of one stream per address and side
    with RelayProcess(ports="30000-30003", netns=ns, extra=extra) as relay, \
            LrkClient([relay.node]) as client:
        socks = []
        try:
            if mode == "xdp":  # the program redirects only towards resolved neighbours
                _resolve(ns, [(in1, caller_ip), (ex1, callee_ip)])
            relays = []
            for n in range(2):
                caller = endpoint(topo.caller.ns, caller_ip, 4000 + 2 * n)
                callee = endpoint(topo.callee.ns, callee_ip, 5000 + 2 * n)
                callee_rtcp = endpoint(topo.callee.ns, callee_ip, 5001 + 2 * n)
                socks += [caller, callee, callee_rtcp]
                offer = client.offer(f"ma-{n}", "a", (caller_ip, 4000 + 2 * n),
                                     interface="external")
                answer = client.answer(f"ma-{n}", "a", "b", (callee_ip, 5000 + 2 * n),
                                       interface="internal")
                to_a = (answer["relay"]["ip"], answer["relay"]["port"])
                to_b = (offer["relay"]["ip"], offer["relay"]["port"])
                relays.append((caller, callee, callee_rtcp, to_a, to_b))
            # the engine spread the calls: each on its own addresses, the same port numbers
            assert [r[3][0] for r in relays] == [in1, IN2]
            assert [r[4][0] for r in relays] == [ex1, EX2]
            assert relays[0][3][1] == relays[1][3][1] and relays[0][4][1] == relays[1][4][1]
            stats = client.stats()
            assert stats["ports"]["in_use"] == 4 and stats["ports"]["total"] == 8
            assert {ip: p["in_use"] for ip, p in stats["ports_by_address"].items()} == {
                in1: 1, IN2: 1, ex1: 1, EX2: 1}
            for n, (caller, callee, callee_rtcp, to_a, to_b) in enumerate(relays):
                sent = [rtp_packet(seq, 0x5A000000 + n) for seq in range(5)]
                assert relay_flow(caller, callee, sent, to_a) == [
                    (pkt, to_b) for pkt in sent], (mode, n)
                back = [rtp_packet(seq, 0x5B000000 + n) for seq in range(5)]
                assert relay_flow(callee, caller, back, to_b) == [
                    (pkt, to_a) for pkt in back], (mode, n)
                report = rtcp_sender_report(0x5A000000 + n, 5, 800)
                caller.sendto(report, (to_a[0], to_a[1] + 1))  # RTCP: port + 1, mark + 1
                assert receive(callee_rtcp, 1) == [(report, (to_b[0], to_b[1] + 1))]
            # nothing crossed between the calls
            assert all(pending(s) == [] for s in socks)
            port_a = relays[0][3][1]
            if mode in ("kernel", "nfqueue"):
                # each call's flows carry the marks of the address they entered at:
                # slots in order in1 (0), IN2 (1), ex1 (2), EX2 (3)
                assert _marks(ns) == {port_a, port_a + 1, port_a + SLOT, port_a + 1 + SLOT}
            elif mode == "xdp":
                # the program carried RTP both ways; a one-way RTCP stream's first packet
                # takes the kernel path (its peer never answered: xdp.verdicts.pass_*),
                # under the mark of the address it entered at
                assert _marks(ns) == {port_a + 1, port_a + 1 + SLOT}
            if mode in ("socket", "packet"):
                assert len(_bound(ns)) == 8  # 2 calls x 2 legs x RTP/RTCP
            for n in range(2):
                client.delete(f"ma-{n}")
            assert client.stats()["ports"]["in_use"] == 0
            if mode in KERNEL_MODES:
                assert _elements(ns) == {}, "every call's elements went with it"
                assert flows(ns) == [], "every call's flows were flushed"
            else:
                wait(lambda: _bound(ns) == [])
        finally:
            for s in socks:
                s.close()
    if mode in KERNEL_MODES:
        assert "table inet lrk" not in run("nft", "list", "tables", ns=ns).stdout


def test_kernel_mode_keeps_both_calls_across_a_restart_and_adopts_their_slots(topo, tmp_path):
    """Two calls on the same port numbers of two addresses per side; SIGTERM keeps them
    (the kernel forwards on, each flow under its own slot's mark); the next start adopts
    the table (same layout: the slots did not change) and both calls relay on; deleting
    the call on the second addresses flushes only its slot's flows."""
    from .test_kernel_adopt import _both_ways

    ns = topo.relay.ns
    caller_ip, callee_ip = topo.caller.ip4, topo.callee.ip4
    extra = ["--mode", "kernel",
             *_two_addresses(topo, tmp_path, f'state_dir = "{tmp_path / "state"}"\n')]
    first = RelayProcess(ports="30000-30003", netns=ns, extra=extra).start()
    second = None
    socks = []
    try:
        calls = []
        with LrkClient([first.node]) as client:
            for n in range(2):
                caller = endpoint(topo.caller.ns, caller_ip, 4000 + 2 * n)
                callee = endpoint(topo.callee.ns, callee_ip, 5000 + 2 * n)
                socks += [caller, callee]
                offer = client.offer(f"mr-{n}", "a", (caller_ip, 4000 + 2 * n),
                                     interface="external")
                answer = client.answer(f"mr-{n}", "a", "b", (callee_ip, 5000 + 2 * n),
                                       interface="internal")
                to_a = (answer["relay"]["ip"], answer["relay"]["port"])
                to_b = (offer["relay"]["ip"], offer["relay"]["port"])
                calls.append((caller, callee, to_a, to_b))
                _both_ways(caller, callee, to_a, to_b, 0, 3)
        port = calls[0][2][1]
        assert calls[1][2] == (IN2, port)
        assert _marks(ns) == {port, port + SLOT}
        second = first.again()
        assert first.stop() == 0
        assert "left in place for 2 kept call(s)" in first.output
        for caller, callee, to_a, to_b in calls:  # no relay runs: the kernel forwards on
            _both_ways(caller, callee, to_a, to_b, 10, 5)
        second.start()
        out = second.read_output()
        assert "adopting table inet lrk" in out and "restored 2 of 2 call(s)" in out, out
        assert _marks(ns) == {port, port + SLOT}, "both calls' flows kept"
        for caller, callee, to_a, to_b in calls:
            _both_ways(caller, callee, to_a, to_b, 20, 3)
        with LrkClient([second.node]) as client:
            client.delete("mr-1")
            assert _marks(ns) == {port}, "only the second addresses' call was flushed"
            _both_ways(calls[0][0], calls[0][1], calls[0][2], calls[0][3], 30, 3)
            client.delete("mr-0")
            assert _elements(ns) == {} and flows(ns) == []
        assert second.stop() == 0
        assert "table inet lrk" not in run("nft", "list", "tables", ns=ns).stdout
    finally:
        first.stop()
        if second is not None:
            second.stop()
        for s in socks:
            s.close()
