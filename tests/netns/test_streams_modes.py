"""Every stream of a call, in every mode that runs here: audio + video relayed both ways,
RTP and RTCP, exact bytes from the exact relay source; a re-INVITE that disables video
frees its ports (and its kernel elements), one that adds it back relays it again.

On 7d500b6 the video stream of an audio+video offer was left pointing at the phone, so
nothing relayed it in any mode.
"""

from __future__ import annotations

import ipaddress
from contextlib import contextmanager
from typing import Iterator, List

import pytest

from bench.netns import run
from lrk.client import LrkClient
from lrk.core import sdp
from lrk.demo.media import rtcp_sender_report, rtp_packet
from lrk.demo.relay_process import RelayProcess

from .hosts import endpoint, flows, receive, relay_flow, tables, wait

pytestmark = pytest.mark.netns

PORTS = "30000-30099"


def _ip4(host) -> str:
    return host.ip4


def _relay(topo, mode: str, tmp_path, config: str = "", ip=_ip4) -> RelayProcess:
    """A started relay in the relay namespace; `config`: more TOML lines, `ip` picks the
    relay's addresses (IPv4 by default)."""
    cfg = tmp_path / f"{mode}.toml"
    cfg.write_text("kernel_poll = 0.2\nquarantine = 0\n" + config)
    extra = ["--mode", mode, "--internal-ip", ip(topo.relay),
             "--external-ip", ip(topo.relay_ext), "--config", str(cfg)]
    if mode == "packet":
        extra += ["--packet-interface", "vc1", "--packet-interface", "ve1"]
    if mode == "xdp":
        extra += ["--xdp-interface", "vc1", "--xdp-interface", "ve1"]
        # the hosts' veth ends as a wire: NAPI for native redirect into them, full UDP
        # checksums (tests/netns/test_xdp_mode.py says why)
        for ns, dev in ((topo.caller.ns, "vc0"), (topo.callee.ns, "ve0")):
            run("ethtool", "-K", dev, "gro", "on", "tx", "off", ns=ns)
    return RelayProcess(ports=PORTS, netns=topo.relay.ns, extra=extra).start()


@contextmanager
def _stops_cleanly(topo, mode: str, relays: List[RelayProcess]) -> Iterator[list]:
    """Yields a list for the test's sockets; at the end every relay of `relays` (a relay
    and its restarts) is stopped, the last one started must exit 0, the sockets close,
    and in kernel modes the table is gone."""
    socks: list = []
    try:
        yield socks
    finally:
        started = [r for r in relays if r.proc is not None]
        codes = [r.stop() for r in started]
        for sock in socks:
            sock.close()
    assert codes[-1] == 0, started[-1].output
    if mode in ("kernel", "nfqueue", "xdp"):
        assert "table inet lrk" not in tables(topo.relay.ns), "stop removes the table"
    if mode == "xdp":
        assert "xdp" not in run("ip", "link", "show", "vc1", ns=topo.relay.ns).stdout


def _body(ip: str, audio: int, video: int) -> str:
    return (f"v=0\r\no=- 11 1 IN IP4 {ip}\r\ns=call\r\nc=IN IP4 {ip}\r\nt=0 0\r\n"
            f"m=audio {audio} RTP/AVP 0\r\na=rtpmap:0 PCMU/8000\r\n"
            f"m=video {video} RTP/AVP 96\r\na=rtpmap:96 VP8/90000\r\n")


def _relay_addrs(reply) -> list:
    return [None if s is None else (s["ip"], s["port"]) for s in reply["streams"]]


@pytest.mark.parametrize("mode", ["socket", "packet", "kernel", "nfqueue", "xdp"])
def test_audio_and_video_both_ways_then_video_off_and_on(topo, tmp_path, mode):
    caller_ip, callee_ip = topo.caller.ip4, topo.callee.ip4
    relay = _relay(topo, mode, tmp_path)
    with _stops_cleanly(topo, mode, [relay]) as socks, LrkClient([relay.node]) as client:
        caller = {kind: endpoint(topo.caller.ns, caller_ip, port)
                  for kind, port in (("audio", 4000), ("audio_rtcp", 4001),
                                     ("video", 4002), ("video_rtcp", 4003))}
        callee = {kind: endpoint(topo.callee.ns, callee_ip, port)
                  for kind, port in (("audio", 5000), ("audio_rtcp", 5001),
                                     ("video", 5002), ("video_rtcp", 5003))}
        socks += list(caller.values()) + list(callee.values())
        offer = client.offer("av", "a", sdp=_body(caller_ip, 4000, 4002),
                             interface="external")
        answer = client.answer("av", "a", "b", sdp=_body(callee_ip, 5000, 5002))
        to_b, to_a = _relay_addrs(offer), _relay_addrs(answer)
        assert None not in to_a + to_b and len(set(to_a + to_b)) == 4
        # the SDPs point every stream at the relay
        assert [(s.address, s.port) for s in sdp.parse(offer["sdp"]).streams] == to_b
        assert [(s.address, s.port) for s in sdp.parse(answer["sdp"]).streams] == to_a

        for i, kind in enumerate(("audio", "video")):
            forth = [rtp_packet(seq, 0x100 + i) for seq in range(3)]
            back = [rtp_packet(seq, 0x200 + i) for seq in range(3)]
            assert relay_flow(caller[kind], callee[kind], forth, to_a[i]) == [
                (pkt, to_b[i]) for pkt in forth], (mode, kind)
            assert relay_flow(callee[kind], caller[kind], back, to_b[i]) == [
                (pkt, to_a[i]) for pkt in back], (mode, kind)
            report = rtcp_sender_report(0x100 + i, 1, 160)
            rtcp_a = (to_a[i][0], to_a[i][1] + 1)
            rtcp_b = (to_b[i][0], to_b[i][1] + 1)
            caller[kind + "_rtcp"].sendto(report, rtcp_a)
            assert receive(callee[kind + "_rtcp"], 1) == [(report, rtcp_b)], (mode, kind)

        stats = client.stats()
        assert stats["ports"]["in_use"] == 4  # pairs: two streams on two legs
        if mode in ("kernel", "nfqueue", "xdp"):
            assert "table inet lrk" in tables(topo.relay.ns)

        # re-INVITE disabling video: its ports go (both legs)
        off = client.offer("av", "a", sdp=_body(caller_ip, 4000, 0), to_tag="b",
                           interface="external")
        assert off["streams"][1] is None
        client.answer("av", "a", "b", sdp=_body(callee_ip, 5000, 0))
        assert client.stats()["ports"]["in_use"] == 2
        legs = client.query("av")["session"]["legs"]
        assert legs["A"]["streams"][1] is None and legs["B"]["streams"][1] is None

        # and adding it back relays it again, on new ports
        on = client.offer("av", "a", sdp=_body(caller_ip, 4000, 4002), to_tag="b",
                          interface="external")
        back = client.answer("av", "a", "b", sdp=_body(callee_ip, 5000, 5002))
        to_b2, to_a2 = _relay_addrs(on), _relay_addrs(back)
        caller["video"].sendto(rtp_packet(9, 0x109), to_a2[1])
        assert receive(callee["video"], 1) == [(rtp_packet(9, 0x109), to_b2[1])]
        client.delete("av")
        assert client.stats()["ports"]["in_use"] == 0


def _audio(ip: str, port: int) -> str:
    return (f"v=0\r\no=- 12 1 IN IP4 {ip}\r\ns=call\r\nc=IN IP4 {ip}\r\nt=0 0\r\n"
            f"m=audio {port} RTP/AVP 0\r\na=rtpmap:0 PCMU/8000\r\n")


def _drops(client, leg: str) -> int:
    counters = client.query("fork")["session"]["legs"][leg]["streams"][0]["counters"]
    return counters["drops"].get("unexpected_source", 0)


def _unexpected(client) -> int:
    return client.stats()["counters"]["media.dropped.unexpected_source"]


#: a second address of the callee host (kernel and nfqueue modes admit new flows by source IP, so
#: the losing callee must be elsewhere than the winner to be refused once it lost)
CALLEE2_IP4 = "198.51.100.71"


@pytest.mark.parametrize("mode", ["socket", "packet", "kernel", "nfqueue", "xdp"])
def test_forked_invite_each_early_dialog_has_media_and_the_200s_wins(topo, tmp_path, mode):
    """Two callees of one forked INVITE answer 183 with SDP: each one's early media
    reaches the caller (from that dialog's own relay port), the caller reaches each on
    the port its 183 named; the 200 OK's dialog keeps relaying on those ports, the other
    is freed and its callee no longer gets through. Before: the second 183 re-tagged leg
    B and the first callee's media was dropped (kernel mode: it was never relayed; nfqueue
    mode: only the first dialog's was)."""
    kernel = mode in ("kernel", "xdp")  # xdp: forked calls take the kernel path
    caller_ip, callee_ip = topo.caller.ip4, topo.callee.ip4
    callee2_ip = callee_ip
    if mode in ("kernel", "nfqueue", "xdp"):
        callee2_ip = CALLEE2_IP4
        run("ip", "addr", "add", f"{callee2_ip}/26", "dev", "ve0", ns=topo.callee.ns)
    relay = _relay(topo, mode, tmp_path)
    with _stops_cleanly(topo, mode, [relay]) as socks, LrkClient([relay.node]) as client:
        caller = endpoint(topo.caller.ns, caller_ip, 4000)
        callee1 = endpoint(topo.callee.ns, callee_ip, 5000)
        callee2 = endpoint(topo.callee.ns, callee2_ip, 6000)
        socks += [caller, callee1, callee2]
        offer = client.offer("fork", "a", sdp=_audio(caller_ip, 4000),
                             interface="external")
        to_b = _relay_addrs(offer)[0]
        early1 = client.answer("fork", "a", "t1", sdp=_audio(callee_ip, 5000),
                               provisional=True)
        early2 = client.answer("fork", "a", "t2", sdp=_audio(callee2_ip, 6000),
                               provisional=True)
        to_a1, to_a2 = _relay_addrs(early1)[0], _relay_addrs(early2)[0]
        assert to_a1 != to_a2
        assert client.stats()["ports"]["in_use"] == 3

        # early media from each callee reaches the caller, from its dialog's port
        callee1.sendto(rtp_packet(1, 0x501), to_b)
        assert receive(caller, 1) == [(rtp_packet(1, 0x501), to_a1)]
        callee2.sendto(rtp_packet(1, 0x602), to_b)
        assert receive(caller, 1) == [(rtp_packet(1, 0x602), to_a2)]
        # and the caller reaches each callee through the port its 183 named
        caller.sendto(rtp_packet(2, 0x400), to_a2)
        assert receive(callee2, 1) == [(rtp_packet(2, 0x400), to_b)]
        caller.sendto(rtp_packet(3, 0x400), to_a1)
        assert receive(callee1, 1) == [(rtp_packet(3, 0x400), to_b)]
        early = client.query("fork")["session"]["early_dialogs"]
        assert [d["tag"] for d in early] == ["t2"]

        def fork_in(leg: str) -> int:
            dialog = client.query("fork")["session"]["early_dialogs"][0]
            return dialog["legs"][leg]["streams"][0]["counters"]["in_packets"]

        if kernel:  # counters come from conntrack, read every kernel_poll
            wait(lambda: (fork_in("A"), fork_in("B")) == (1, 1))
        if mode == "nfqueue":
            # counted by the ruleset's per-port `seen` elements, read every
            # kernel_poll: the shared B port's counts every callee, in the main unit
            wait(lambda: fork_in("A") == 1)
        else:
            assert fork_in("B") == 1

        # the 200 OK comes from the second callee: its dialog wins
        final = client.answer("fork", "a", "t2", sdp=_audio(callee2_ip, 6000))
        assert _relay_addrs(final)[0] == to_a2, "the caller keeps its 183's port"
        assert client.stats()["ports"]["in_use"] == 2
        assert "early_dialogs" not in client.query("fork")["session"]
        callee2.sendto(rtp_packet(4, 0x602), to_b)
        assert receive(caller, 1) == [(rtp_packet(4, 0x602), to_a2)]
        caller.sendto(rtp_packet(5, 0x400), to_a2)
        assert receive(callee2, 1) == [(rtp_packet(5, 0x400), to_b)]
        # the losing callee is dropped at the relay (counted), not relayed
        dropped = _unexpected(client)
        callee1.sendto(rtp_packet(6, 0x501), to_b)
        if kernel:  # refused by admission: the relay-wide counter of new flows
            wait(lambda: _unexpected(client) == dropped + 1)
        else:
            wait(lambda: _drops(client, "B") >= 1)
        callee2.sendto(rtp_packet(7, 0x602), to_b)
        assert receive(caller, 1) == [(rtp_packet(7, 0x602), to_a2)]
        client.delete("fork")
        assert client.stats()["ports"]["in_use"] == 0


def _audio_any(ip: str, port: int) -> str:
    return _audio(ip, port).replace("IN IP4", "IN IP6" if ":" in ip else "IN IP4")


@pytest.mark.parametrize("family", ["ipv4", "ipv6"])
def test_forked_invite_in_kernel_mode_tells_callees_on_one_ip_apart_by_port(
        topo, tmp_path, family):
    """Kernel mode: two forked callees on ONE address (different ports) share leg B's
    relay port; each one's early media (RTP and RTCP) reaches the caller from its own
    dialog's port and the caller reaches each through its 183's port. When the 200
    picks the first dialog, the other's elements and conntrack flows go."""
    pick = (lambda h: h.ip6) if family == "ipv6" else _ip4
    caller_ip, callee_ip = pick(topo.caller), pick(topo.callee)
    ns = topo.relay.ns
    relay = _relay(topo, "kernel", tmp_path, ip=pick)
    with _stops_cleanly(topo, "kernel", [relay]) as socks, LrkClient([relay.node]) as client:
        caller = endpoint(topo.caller.ns, caller_ip, 4000)
        caller_rtcp = endpoint(topo.caller.ns, caller_ip, 4001)
        callee = {port: endpoint(topo.callee.ns, callee_ip, port)
                  for port in (5000, 5001, 6000, 6001)}
        socks += [caller, caller_rtcp, *callee.values()]
        offer = client.offer("fork", "a", sdp=_audio_any(caller_ip, 4000),
                             interface="external")
        to_b = _relay_addrs(offer)[0]
        to_a = {}
        for tag, port in (("t1", 5000), ("t2", 6000)):
            early = client.answer("fork", "a", tag, sdp=_audio_any(callee_ip, port),
                                  provisional=True)
            to_a[port] = _relay_addrs(early)[0]
        assert to_a[5000] != to_a[6000]

        def norm(addr):
            return (str(ipaddress.ip_address(addr[0])), addr[1])

        def rtcp(addr):
            return (addr[0], addr[1] + 1)

        for seq, port in enumerate((6000, 5000, 6000)):  # t2 first, then both
            callee[port].sendto(rtp_packet(seq, port), to_b)
            got = receive(caller, 1)
            assert [(p, norm(a)) for p, a in got] == [
                (rtp_packet(seq, port), norm(to_a[port]))], (family, port)
            report = rtcp_sender_report(port, seq, 160)
            callee[port + 1].sendto(report, rtcp(to_b))
            got = receive(caller_rtcp, 1)
            assert [(p, norm(a)) for p, a in got] == [
                (report, norm(rtcp(to_a[port])))], (family, port)
        for seq, port in enumerate((5000, 6000)):
            caller.sendto(rtp_packet(10 + seq, 0x400), to_a[port])
            got = receive(callee[port], 1)
            assert [(p, norm(a)) for p, a in got] == [
                (rtp_packet(10 + seq, 0x400), norm(to_b))], (family, port)
            caller_rtcp.sendto(rtcp_sender_report(0x400, seq, 160), rtcp(to_a[port]))
            got = receive(callee[port + 1], 1)
            assert [(p, norm(a)) for p, a in got] == [
                (rtcp_sender_report(0x400, seq, 160), norm(rtcp(to_b)))], (family, port)

        def fork_flows() -> list:
            return [f for f in flows(ns) if "sport=6000 " in f or "sport=6001 " in f]

        def fork_map() -> str:
            fam = 6 if family == "ipv6" else 4
            return run("nft", "list", "map", "inet", "lrk", f"fmark{fam}", ns=ns).stdout

        assert fork_flows(), "the second callee's flows exist"
        assert "elements" in fork_map()
        final = client.answer("fork", "a", "t1", sdp=_audio_any(callee_ip, 5000))
        assert _relay_addrs(final)[0] == to_a[5000]
        assert client.stats()["ports"]["in_use"] == 2
        wait(lambda: fork_flows() == [])  # freed: its flows were flushed
        assert "elements" not in fork_map(), "the fork's source-qualified elements went"
        callee[5000].sendto(rtp_packet(20, 0x500), to_b)
        got = receive(caller, 1)
        assert [(p, norm(a)) for p, a in got] == [(rtp_packet(20, 0x500), norm(to_a[5000]))]
        caller.sendto(rtp_packet(21, 0x400), to_a[5000])
        got = receive(callee[5000], 1)
        assert [(p, norm(a)) for p, a in got] == [(rtp_packet(21, 0x400), norm(to_b))]
        client.delete("fork")
        assert client.stats()["ports"]["in_use"] == 0


@pytest.mark.parametrize("how", ["sigterm", "kill -9"])
@pytest.mark.parametrize("mode", ["socket", "packet", "kernel", "nfqueue", "xdp"])
def test_calls_survive_a_restart(topo, tmp_path, mode, how):
    """With state_dir, SIGTERM (or kill -9 of the daemon: its workers exit when their
    channel closes) and a start with the same command line keep the call: same
    relay ports, media flows again both ways (kernel modes adopt their table: see
    test_kernel_adopt.py; xdp mode adopts the table beneath its program, which the kernel
    path carries media on until the new process attaches its program), and the stop after
    the delete leaves nothing behind."""
    caller_ip, callee_ip = topo.caller.ip4, topo.callee.ip4
    first = _relay(topo, mode, tmp_path, config=f"state_dir = \"{tmp_path / 'state'}\"\n")
    relays = [first]
    with _stops_cleanly(topo, mode, relays) as socks:
        caller = endpoint(topo.caller.ns, caller_ip, 4000)
        callee = endpoint(topo.callee.ns, callee_ip, 5000)
        socks += [caller, callee]
        with LrkClient([first.node]) as client:
            to_b = _relay_addrs(client.offer("keep", "a", sdp=_audio(caller_ip, 4000),
                                             interface="external"))[0]
            to_a = _relay_addrs(client.answer("keep", "a", "b",
                                              sdp=_audio(callee_ip, 5000)))[0]
            caller.sendto(rtp_packet(1, 0x400), to_a)
            assert receive(callee, 1) == [(rtp_packet(1, 0x400), to_b)]
        second = first.again()  # before the stop: it takes the control directory along
        relays.append(second)
        if how == "sigterm":
            assert first.stop() == 0
            assert "1 call(s) kept in the session store" in first.output
        else:
            first.kill()
        second.start()
        with LrkClient([second.node]) as client:
            legs = client.query("keep")["session"]["legs"]
            assert (legs["A"]["relay"]["port"], legs["B"]["relay"]["port"]) == (to_a[1], to_b[1])
            caller.sendto(rtp_packet(2, 0x400), to_a)
            assert receive(callee, 1) == [(rtp_packet(2, 0x400), to_b)], mode
            callee.sendto(rtp_packet(3, 0x500), to_b)
            assert receive(caller, 1) == [(rtp_packet(3, 0x500), to_a)], mode
            client.delete("keep")
            assert client.stats()["ports"]["in_use"] == 0


def _held_audio(port: int) -> str:
    """The caller's re-INVITE putting the call on hold the old way (RFC 2543): c=0.0.0.0."""
    return _audio("0.0.0.0", port)


@pytest.mark.parametrize("mode", ["socket", "packet", "kernel", "nfqueue", "xdp"])
def test_old_style_hold_lets_the_holders_music_through_and_resume_relays_both_ways(
        topo, tmp_path, mode):
    """The caller puts the call on hold with c=0.0.0.0 and plays music on hold from the
    address it used before: the callee hears it, from the relay's port, in every mode
    (before, kernel modes installed nothing for a held stream and socket/packet modes
    with strict sources took 0.0.0.0 for the caller's address). Resuming relays both
    ways again."""
    caller_ip, callee_ip = topo.caller.ip4, topo.callee.ip4
    relay = _relay(topo, mode, tmp_path, config="strict_source = true\n")
    with _stops_cleanly(topo, mode, [relay]) as socks, LrkClient([relay.node]) as client:
        caller = endpoint(topo.caller.ns, caller_ip, 4000)
        callee = endpoint(topo.callee.ns, callee_ip, 5000)
        socks += [caller, callee]
        offer = client.offer("hold", "a", sdp=_audio(caller_ip, 4000), interface="external")
        answer = client.answer("hold", "a", "b", sdp=_audio(callee_ip, 5000))
        to_b, to_a = _relay_addrs(offer)[0], _relay_addrs(answer)[0]
        forth = [rtp_packet(seq, 0x100) for seq in range(3)]
        assert relay_flow(caller, callee, forth, to_a) == [(p, to_b) for p in forth], mode
        back = [rtp_packet(seq, 0x200) for seq in range(3)]
        assert relay_flow(callee, caller, back, to_b) == [(p, to_a) for p in back], mode

        held = client.offer("hold", "a", sdp=_held_audio(4000), to_tag="b",
                            interface="external")
        assert "c=IN IP4 0.0.0.0" in held["sdp"]  # the callee is told not to send
        client.answer("hold", "a", "b", sdp=_audio(callee_ip, 5000))
        assert _relay_addrs(held)[0] == to_b
        music = [rtp_packet(seq, 0x100) for seq in range(10, 13)]
        assert relay_flow(caller, callee, music, to_a) == [(p, to_b) for p in music], mode

        client.offer("hold", "a", sdp=_audio(caller_ip, 4000), to_tag="b",
                     interface="external")
        client.answer("hold", "a", "b", sdp=_audio(callee_ip, 5000))
        forth = [rtp_packet(seq, 0x100) for seq in range(20, 23)]
        assert relay_flow(caller, callee, forth, to_a) == [(p, to_b) for p in forth], mode
        back = [rtp_packet(seq, 0x200) for seq in range(20, 23)]
        assert relay_flow(callee, caller, back, to_b) == [(p, to_a) for p in back], mode
        assert client.stats()["counters"].get("kernel.errors", 0) == 0
        client.delete("hold")
