"""xdp mode: the relay daemon in its own namespace with the XDP program on both media
interfaces; caller and callee in namespaces of their own (veth), IPv4 and IPv6.

Media of an audio+video call both ways (RTP and RTCP), exact bytes from the exact relay
source, carried by the XDP program (its redirect counter, and no conntrack flow: the
kernel path never saw them); counters in `query`; junk (spoofed source, unknown port)
dropped and counted; a NATed caller learnt by the kernel path and then carried by XDP;
silence expiry from the XDP last-seen times; nothing left after stop or after a crash
and a restart (no XDP on the interfaces, no program of ours, no table, no flows); media
through a SIGTERM and a kill -9 restart without a packet lost."""

from __future__ import annotations

import ipaddress
import json
import socket
import subprocess
import sys
import threading
import time
from typing import Iterator, List, Optional, Sequence, Tuple

import pytest

from bench.callgen import CallGen
from bench.netns import run, socket_in
from lrk.client import LrkClient
from lrk.demo.media import rtcp_sender_report, rtp_packet
from lrk.demo.relay_process import LaunchError, RelayProcess

from .hosts import endpoint, flows, pending, receive, tables, wait

pytestmark = pytest.mark.netns

PORTS = "30000-30099"
SO_RCVBUFFORCE = 33  # linux/socket.h; root: beyond net.core.rmem_max
#: the restart test: calls (50 pkt/s each way) and seconds of media around the restart
RESTART_CALLS = 20
RESTART_MEDIA = 10.0  # the restart starts 0.5 s in; media goes on for at least 1 s after it


def _pick(family: str):
    return (lambda h: h.ip6) if family == "ipv6" else (lambda h: h.ip4)


def _body(ip: str, audio: int, video: Optional[int] = None) -> str:
    fam = "IP6" if ":" in ip else "IP4"
    body = (f"v=0\r\no=- 11 1 IN {fam} {ip}\r\ns=call\r\nc=IN {fam} {ip}\r\nt=0 0\r\n"
            f"m=audio {audio} RTP/AVP 0\r\na=rtpmap:0 PCMU/8000\r\n")
    if video is not None:
        body += f"m=video {video} RTP/AVP 96\r\na=rtpmap:96 VP8/90000\r\n"
    return body


def _addrs(reply) -> list:
    return [(s["ip"], s["port"]) for s in reply["streams"]]


def _norm(addr):
    return (str(ipaddress.ip_address(addr[0])), addr[1])


def _got(sock, n: int) -> list:
    return [(data, _norm(src)) for data, src in receive(sock, n)]


def _xdp_prog_id(ns: str, dev: str) -> int:
    """The id of the XDP program on an interface (0: none)."""
    info = json.loads(run("ip", "-j", "link", "show", dev, ns=ns).stdout)[0]
    xdp = info.get("xdp") or {}
    return int((xdp.get("prog") or {}).get("id", 0))


def _prog_exists(prog_id: int) -> bool:
    return subprocess.run(["bpftool", "prog", "show", "id", str(prog_id)],
                          capture_output=True).returncode == 0


def _map_ids(prog_id: int) -> List[int]:
    """The maps a loaded program uses (bpftool's JSON)."""
    out = subprocess.run(["bpftool", "-j", "prog", "show", "id", str(prog_id)],
                         capture_output=True, text=True, check=True).stdout
    return list(json.loads(out).get("map_ids", []))


def _map_exists(map_id: int) -> bool:
    return subprocess.run(["bpftool", "map", "show", "id", str(map_id)],
                          capture_output=True).returncode == 0


def _relay(topo, tmp_path, family: str, config: str = "",
           interfaces=("vc1", "ve1")) -> RelayProcess:
    pick = _pick(family)
    cfg = tmp_path / "xdp.toml"
    cfg.write_text("kernel_poll = 0.2\nquarantine = 0\n" + config)
    extra = ["--mode", "xdp", "--internal-ip", pick(topo.relay),
             "--external-ip", pick(topo.relay_ext), "--config", str(cfg)]
    for dev in interfaces:
        extra += ["--xdp-interface", dev]
    return RelayProcess(ports=PORTS, netns=topo.relay.ns, extra=extra)


def _gro(topo) -> None:
    """The hosts' veth ends as a wire would be: native XDP redirect into a veth needs its
    far end to run NAPI (GRO on, or an XDP program there), and a host's UDP checksums
    complete (tx checksum offload off: a veth otherwise hands on partial checksums,
    which a frame redirected by XDP loses the metadata of; frames from a NIC carry full
    ones)."""
    for ns, dev in ((topo.caller.ns, "vc0"), (topo.callee.ns, "ve0")):
        run("ethtool", "-K", dev, "gro", "on", "tx", "off", ns=ns)


def _resolve(ns: str, pairs) -> None:
    """Make the relay namespace resolve each host's link address (one datagram from the
    relay address to a discard port), and wait until the neighbour entry is there."""
    for relay_ip, host_ip in pairs:
        sock = endpoint(ns, relay_ip, 0)
        try:
            sock.sendto(b"arp", (host_ip, 9))
        finally:
            sock.close()
        wait(lambda ip=host_ip: "lladdr" in run("ip", "neigh", "show", ip, ns=ns).stdout,
             timeout=5)
    run("conntrack", "-F", ns=ns)  # those datagrams' flows: not the relay's


def _counters(client) -> dict:
    return client.stats()["counters"]


def _assert_clean(topo, prog_ids: List[int], map_ids: Sequence[int] = ()) -> None:
    ns = topo.relay.ns
    assert _xdp_prog_id(ns, "vc1") == 0 and _xdp_prog_id(ns, "ve1") == 0, "XDP detached"
    for prog_id in prog_ids:
        assert not _prog_exists(prog_id), f"program {prog_id} outlived the relay"
    for map_id in map_ids:
        assert not _map_exists(map_id), f"map {map_id} outlived the relay"
    assert "table inet lrk" not in tables(ns), "stop removes the table"
    assert flows(ns) == []


class XdpRun:
    """One test's relays (xdp mode, the hosts' links as it needs them) and sockets: what
    every test here sets up, all stopped and closed at the end (the `xdp` fixture)."""

    def __init__(self, topo, tmp_path) -> None:
        self.topo, self.tmp_path = topo, tmp_path
        self.relays: List[RelayProcess] = []
        self.socks: List[socket.socket] = []

    def start(self, family: str = "ipv4", config: str = "") -> RelayProcess:
        _gro(self.topo)
        return self.held(_relay(self.topo, self.tmp_path, family, config).start())

    def held(self, relay: RelayProcess) -> RelayProcess:
        """A relay stopped at the end (one made by `again()`, started or not)."""
        self.relays.append(relay)
        return relay

    def endpoint(self, ns: str, ip: str, port: int) -> socket.socket:
        sock = endpoint(ns, ip, port)
        self.socks.append(sock)
        return sock

    def close(self) -> None:
        for relay in self.relays:
            relay.stop()
        for sock in self.socks:
            sock.close()


@pytest.fixture
def xdp(topo, tmp_path) -> Iterator[XdpRun]:
    run_ = XdpRun(topo, tmp_path)
    try:
        yield run_
    finally:
        run_.close()


def _call(client, call_id: str, caller: Tuple[str, int], callee: Tuple[str, int],
          **offer) -> Tuple[Tuple[str, int], Tuple[str, int]]:
    """An audio call: (where the caller sends, where the callee sends), normalised."""
    to_b = _norm(_addrs(client.offer(call_id, "a", sdp=_body(*caller), interface="external",
                                     **offer))[0])
    to_a = _norm(_addrs(client.answer(call_id, "a", "b", sdp=_body(*callee)))[0])
    return to_a, to_b


def _resolve_hosts(topo, family: str) -> None:
    """The relay knows the caller's (internal side) and callee's (external side) link
    addresses."""
    pick = _pick(family)
    _resolve(topo.relay.ns, [(pick(topo.relay), pick(topo.caller)),
                             (pick(topo.relay_ext), pick(topo.callee))])


@pytest.mark.parametrize("family", ["ipv4", "ipv6"])
def test_xdp_mode_call(topo, xdp, family):
    pick = _pick(family)
    caller_ip, callee_ip = pick(topo.caller), pick(topo.callee)
    ns = topo.relay.ns
    relay = xdp.start(family)
    out = relay.read_output()
    assert "attached to vc1 in native mode" in out and "attached to ve1 in native mode" in out
    prog_ids = [_xdp_prog_id(ns, "vc1"), _xdp_prog_id(ns, "ve1")]
    assert prog_ids[0] and prog_ids[0] == prog_ids[1]
    map_ids = _map_ids(prog_ids[0])
    assert len(map_ids) >= 5 and all(_map_exists(m) for m in map_ids)
    with LrkClient([relay.node]) as client:
        caller = {p: xdp.endpoint(topo.caller.ns, caller_ip, p) for p in range(4000, 4004)}
        callee = {p: xdp.endpoint(topo.callee.ns, callee_ip, p) for p in range(5000, 5004)}
        spoof = xdp.endpoint(topo.callee.ns, callee_ip, 5999)
        offer = client.offer("x-call", "a", sdp=_body(caller_ip, 4000, 4002),
                             interface="external")
        answer = client.answer("x-call", "a", "b", sdp=_body(callee_ip, 5000, 5002))
        to_b, to_a = [_norm(a) for a in _addrs(offer)], [_norm(a) for a in _addrs(answer)]
        # the relay knows both hosts' link addresses already (a frame towards a host
        # it has no neighbour entry for goes the kernel path, which resolves it:
        # xdp.verdicts.pass_fib, tested in test_xdp_prog.py)
        _resolve_hosts(topo, family)
        before = _counters(client)
        sent = 0
        for i in range(2):  # audio, video
            a_port, b_port = 4000 + 2 * i, 5000 + 2 * i
            pkts = [rtp_packet(seq, 0x100 + i) for seq in range(20)]
            for p in pkts:
                caller[a_port].sendto(p, to_a[i])
            assert _got(callee[b_port], 20) == [(p, to_b[i]) for p in pkts], (family, i)
            back = [rtp_packet(seq, 0x200 + i) for seq in range(20)]
            for p in back:
                callee[b_port].sendto(p, to_b[i])
            assert _got(caller[a_port], 20) == [(p, to_a[i]) for p in back], (family, i)
            rtcp_a, rtcp_b = (to_a[i][0], to_a[i][1] + 1), (to_b[i][0], to_b[i][1] + 1)
            report = rtcp_sender_report(0x100 + i, 20, 3440)
            caller[a_port + 1].sendto(report, rtcp_a)
            assert _got(callee[b_port + 1], 1) == [(report, rtcp_b)]
            report = rtcp_sender_report(0x200 + i, 20, 3440)
            callee[b_port + 1].sendto(report, rtcp_b)
            assert _got(caller[a_port + 1], 1) == [(report, rtcp_a)]
            sent += 42
        after = _counters(client)
        # every packet went through the XDP program, none through netfilter
        assert after["xdp.verdicts.redirect"] - before["xdp.verdicts.redirect"] == sent, \
            str({k: v for k, v in after.items() if k.startswith(("xdp", "media"))})
        assert after["xdp.verdicts.pass_peer_nat"] == 0
        assert after["xdp.verdicts.pass_source_port"] == 0
        assert flows(ns) == [], "the kernel path carried nothing"

        # the program's counters are read at most every kernel_poll (0.2 s here)
        def counted() -> bool:
            legs = client.query("x-call")["session"]["legs"]
            return all((c["in_packets"], c["out_packets"]) == (21, 21)
                       for leg in ("A", "B") for c in
                       (legs[leg]["streams"][i]["counters"] for i in range(2)))

        wait(counted, timeout=5)
        legs = client.query("x-call")["session"]["legs"]
        size = len(rtp_packet(0, 0))
        c = legs["A"]["streams"][0]["counters"]
        assert c["in_bytes"] == 20 * size + len(rtcp_sender_report(0x100, 20, 3440))
        assert _norm((legs["A"]["latched"]["ip"], legs["A"]["latched"]["port"])) == \
            _norm((caller_ip, 4000))

        # junk to the relay's ports: dropped at the driver, counted
        spoof.sendto(rtp_packet(0, 0xBAD), tuple(to_a[0]))  # not leg A's peer
        caller[4000].sendto(rtp_packet(0, 0xBAD), (to_a[0][0], 30098))  # no session
        wait(lambda: _counters(client)["media.dropped.unexpected_source"]
             == before["media.dropped.unexpected_source"] + 1, timeout=5)
        wait(lambda: _counters(client)["media.dropped.no_destination"]
             == before.get("media.dropped.no_destination", 0) + 1, timeout=5)
        assert pending(callee[5000]) == [] and pending(callee[5002]) == []

        client.delete("x-call")
        assert client.stats()["ports"]["in_use"] == 0
        # the deleted session's ports now drop at the driver
        caller[4000].sendto(rtp_packet(1, 0xBAD), to_a[0])
        wait(lambda: _counters(client)["xdp.verdicts.drop_no_destination"]
             == after["xdp.verdicts.drop_no_destination"] + 2, timeout=5)
    assert relay.stop() == 0
    assert "program detached" in relay.output
    _assert_clean(topo, prog_ids, map_ids)


@pytest.mark.parametrize("family", ["ipv4", "ipv6"])
def test_xdp_mode_learns_a_nated_caller_then_carries_it(topo, xdp, family):
    """The caller sends from another port than its SDP's: the XDP program hands those
    packets to the kernel path (conntrack NAT relays and latches them); after the next
    counter read the entries name the real port and XDP carries both directions."""
    pick = _pick(family)
    caller_ip, callee_ip = pick(topo.caller), pick(topo.callee)
    relay = xdp.start(family)
    with LrkClient([relay.node]) as client:
        nat = xdp.endpoint(topo.caller.ns, caller_ip, 4444)
        sdp_port = xdp.endpoint(topo.caller.ns, caller_ip, 4000)
        callee = xdp.endpoint(topo.callee.ns, callee_ip, 5000)
        to_a, to_b = _call(client, "n-call", (caller_ip, 4000), (callee_ip, 5000))
        _resolve_hosts(topo, family)
        # the callee first: before the caller sent anything its SDP port is all there
        # is (as in kernel mode), and XDP carries it, so no conntrack flow is made
        # that the caller's NATed flow would clash with (kernel mode's limit)
        callee.sendto(rtp_packet(100, 0x500), to_b)
        assert _got(sdp_port, 1) == [(rtp_packet(100, 0x500), to_a)]
        assert flows(topo.relay.ns) == []
        nat.sendto(rtp_packet(0, 0x400), to_a)
        assert _got(callee, 1) == [(rtp_packet(0, 0x400), to_b)]
        # the caller was seen behind a NAT: the callee's answer goes the kernel path,
        # whose conntrack flow sends it to the caller's real port
        callee.sendto(rtp_packet(0, 0x500), to_b)
        assert _got(nat, 1) == [(rtp_packet(0, 0x500), to_a)]
        counters = _counters(client)
        assert counters["xdp.verdicts.pass_source_port"] == 1
        assert counters["xdp.verdicts.pass_peer_nat"] == 1
        real = _norm((caller_ip, 4444))

        def learnt() -> bool:
            latched = client.query("n-call")["session"]["legs"]["A"]["latched"]
            return latched is not None and _norm((latched["ip"], latched["port"])) == real

        wait(learnt, timeout=5)
        redirect = _counters(client)["xdp.verdicts.redirect"]
        assert redirect == 1  # the callee's first packet
        for seq in range(1, 6):
            nat.sendto(rtp_packet(seq, 0x400), to_a)
        assert [d for d, _ in _got(callee, 5)] == [rtp_packet(s, 0x400) for s in range(1, 6)]
        for seq in range(1, 6):
            callee.sendto(rtp_packet(seq, 0x500), to_b)
        assert _got(nat, 5) == [(rtp_packet(s, 0x500), to_a) for s in range(1, 6)]
        assert _counters(client)["xdp.verdicts.redirect"] == redirect + 10

        def counted() -> bool:  # read at most every kernel_poll (0.2 s here)
            legs = client.query("n-call")["session"]["legs"]
            return (legs["A"]["counters"]["in_packets"],
                    legs["B"]["counters"]["in_packets"]) == (6, 7)

        wait(counted, timeout=5)
        client.delete("n-call")
    assert relay.stop() == 0


def test_xdp_mode_silence_expiry_from_xdp_last_seen(topo, xdp):
    """Media carried only by XDP keeps a call alive (no conntrack flow carries it); when
    it stops, the call ends, not before its silence timeout (how soon after is the poll's
    business: the wait is bounded, not timed)."""
    caller_ip, callee_ip = topo.caller.ip4, topo.callee.ip4
    relay = xdp.start()
    with LrkClient([relay.node]) as client:
        caller = xdp.endpoint(topo.caller.ns, caller_ip, 4000)
        callee = xdp.endpoint(topo.callee.ns, callee_ip, 5000)
        to_a, _ = _call(client, "q-call", (caller_ip, 4000), (callee_ip, 5000), timeout=1)
        _resolve(topo.relay.ns, [(topo.relay_ext.ip4, callee_ip)])
        start = time.monotonic()
        seq = 0
        while time.monotonic() - start < 3.0:  # three timeouts of media, bounded
            last_sent = time.monotonic()
            caller.sendto(rtp_packet(seq, 0x400), to_a)
            assert len(receive(callee, 1)) == 1
            seq += 1
            time.sleep(0.1)  # the send pace
        assert client.list()["total"] == 1, "media through XDP kept the call"
        assert flows(topo.relay.ns) == []
        wait(lambda: client.list()["total"] == 0, timeout=10)
        # the relay saw the last packet after it was sent; 0.1 s for the clocks' rounding
        assert time.monotonic() - last_sent >= 0.9
        assert _counters(client)["sessions.expired.silence"] == 1
    assert relay.stop() == 0


def test_xdp_mode_crash_leftover_is_replaced_and_cleaned(topo, xdp):
    """SIGKILL leaves the program attached (an attachment outlives its process); the
    next start replaces lrk's own leftover, and its stop leaves nothing."""
    ns = topo.relay.ns
    first = xdp.start()
    crashed = _xdp_prog_id(ns, "vc1")
    second = xdp.held(first.again())
    first.kill()
    assert _xdp_prog_id(ns, "vc1") == crashed, "a crash leaves the attachment"
    second.start()
    assert "left on vc1" in second.read_output()
    current = _xdp_prog_id(ns, "vc1")
    assert current and current != crashed
    with LrkClient([second.node]) as client:
        caller = xdp.endpoint(topo.caller.ns, topo.caller.ip4, 4000)
        callee = xdp.endpoint(topo.callee.ns, topo.callee.ip4, 5000)
        to_a, _ = _call(client, "c-call", (topo.caller.ip4, 4000), (topo.callee.ip4, 5000))
        caller.sendto(rtp_packet(1, 0x400), to_a)
        assert len(receive(callee, 1)) == 1
    assert second.stop() == 0
    _assert_clean(topo, [crashed, current])


def test_xdp_mode_refuses_an_interface_it_cannot_attach_to(topo, tmp_path):
    """A clear error naming the interface; nothing left behind (the kernel path's table
    goes too)."""
    relay = _relay(topo, tmp_path, "ipv4", interfaces=("vc1", "nope0"))
    with pytest.raises(LaunchError) as err:
        relay.start(ready_timeout=10)
    assert "nope0" in str(err.value) and "does not exist" in str(err.value)
    assert _xdp_prog_id(topo.relay.ns, "vc1") == 0
    assert "table inet lrk" not in tables(topo.relay.ns)


def test_xdp_mode_junk_flood_costs_established_calls_nothing(topo, xdp):
    """A bounded flood of junk at the relay's ports (a stranger at the call's own relay
    port, and at ports with no session) interleaved with a call's media both ways: every
    media packet arrives intact, every junk packet is dropped at the driver and counted
    (exactly), and none reaches a host."""
    caller_ip, callee_ip = topo.caller.ip4, topo.callee.ip4
    stranger_ip = "198.51.100.72"
    run("ip", "addr", "add", f"{stranger_ip}/26", "dev", "ve0", ns=topo.callee.ns)
    relay = xdp.start()
    with LrkClient([relay.node]) as client:
        caller = xdp.endpoint(topo.caller.ns, caller_ip, 4000)
        callee = xdp.endpoint(topo.callee.ns, callee_ip, 5000)
        stranger = xdp.endpoint(topo.callee.ns, stranger_ip, 7000)
        for s in (caller, callee):
            s.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, 8 << 20)
        to_a, to_b = _call(client, "f-call", (caller_ip, 4000), (callee_ip, 5000))
        _resolve_hosts(topo, "ipv4")
        before = _counters(client)
        calls, per_call = 400, 25  # 10,000 junk packets, bounded
        junk = rtp_packet(0, 0xBAD)
        for seq in range(calls):
            caller.sendto(rtp_packet(seq, 0x400), to_a)
            callee.sendto(rtp_packet(seq, 0x500), to_b)
            for k in range(per_call):
                if k % 2:  # a stranger at the call's relay ports
                    stranger.sendto(junk, to_b)
                else:  # ports without a session
                    stranger.sendto(junk, (to_b[0], 30050 + 2 * (k % 20)))
        assert _got(callee, calls) == [(rtp_packet(s, 0x400), to_b) for s in range(calls)]
        assert _got(caller, calls) == [(rtp_packet(s, 0x500), to_a) for s in range(calls)]
        assert pending(stranger) == []
        after = _counters(client)
        assert after["xdp.verdicts.redirect"] - before["xdp.verdicts.redirect"] == 2 * calls
        dropped = sum(after[k] - before.get(k, 0) for k in (
            "media.dropped.unexpected_source", "media.dropped.no_destination"))
        assert dropped == calls * per_call
        assert flows(topo.relay.ns) == [], "no junk reached netfilter"
    assert relay.stop() == 0


def test_xdp_mode_names_the_missing_capability(topo, tmp_path):
    """Root without CAP_BPF and CAP_SYS_ADMIN (a container, a tight systemd unit): the
    relay does not start, says what is missing and that kernel mode works without it,
    and leaves nothing behind."""
    wrapper = tmp_path / "python-without-bpf"
    wrapper.write_text("#!/bin/sh\nexec setpriv --bounding-set -bpf,-sys_admin,-perfmon "
                       f"{sys.executable} \"$@\"\n")
    wrapper.chmod(0o755)
    relay = _relay(topo, tmp_path, "ipv4")
    relay.argv[relay.argv.index(sys.executable)] = str(wrapper)
    with pytest.raises(LaunchError) as err:
        relay.start(ready_timeout=10)
    text = str(err.value)
    assert "CAP_BPF" in text and "--mode kernel" in text, text
    assert _xdp_prog_id(topo.relay.ns, "vc1") == 0
    assert "table inet lrk" not in tables(topo.relay.ns)


@pytest.mark.parametrize("how", ["sigterm", "kill -9"])
def test_xdp_mode_media_flows_through_a_restart(topo, tmp_path, xdp, how):
    """Calls with media flowing both ways through a restart (SIGTERM, or kill -9 of the
    daemon): the old program stays attached with its entries (SIGTERM keeps it for the
    kept calls; after kill -9 its attachment outlives the process), the new process
    writes the restored calls' entries into its own map and only then replaces it, in
    one step. The new process drops no packet as no_destination, every receiver sees
    every sequence number (veth: no loss allowed), XDP carries again after the restart,
    and the old program is gone (one program per interface, never two, never none).
    Before the fix the new program was attached before the restore and dropped the
    adopted calls' packets for 180-300 ms (bench/results/history-2026-12.md, section 6);
    detaching at SIGTERM and attaching later also lost the frames in flight in the veth
    rings."""
    ns = topo.relay.ns
    caller_ip, callee_ip = topo.caller.ip4, topo.callee.ip4
    first = xdp.start(config=f"state_dir = \"{tmp_path / 'state'}\"\n")
    spec = []
    with LrkClient([first.node]) as client:
        for i in range(RESTART_CALLS):
            caller, callee = socket_in(topo.caller.ns), socket_in(topo.callee.ns)
            xdp.socks += [caller, callee]
            caller.bind((caller_ip, 0))
            callee.bind((callee_ip, 0))
            to_b = client.offer(f"r-{i}", "a", caller.getsockname(),
                                interface="external")["relay"]
            to_a = client.answer(f"r-{i}", "a", "b", callee.getsockname())["relay"]
            spec.append((caller.fileno(), callee.fileno(), (to_a["ip"], to_a["port"]),
                         (to_b["ip"], to_b["port"])))
        _resolve_hosts(topo, "ipv4")
        old = _xdp_prog_id(ns, "vc1")
        events: dict = {}

        def restart() -> None:
            time.sleep(0.5)  # media runs meanwhile
            second = xdp.held(first.again())
            if how == "sigterm":
                first.stop()
            else:
                first.kill()
            second.start()
            events["ready"] = time.monotonic()

        with CallGen(spec, seed=7) as gen:
            warm = gen.run(0.5, grace=0.3)
            assert warm["lost"] == 0 and warm["received"] == warm["sent"], warm
            assert _counters(client)["xdp.verdicts.redirect"] > 0, "XDP carries"
            thread = threading.Thread(target=restart, daemon=True)
            thread.start()
            result = gen.run(RESTART_MEDIA, detail=True, grace=1.0)
            end = time.monotonic()
            thread.join(RESTART_MEDIA)
    assert "ready" in events and len(xdp.relays) == 2, xdp.relays[-1].read_output()
    assert end - events["ready"] >= 1.0, "media must outlast the restart"
    second = xdp.relays[1]
    if how == "sigterm":
        assert f"left attached to vc1, ve1 for {RESTART_CALLS} kept call(s)" in first.output
    per = result["per_stream"]
    lost = {(s["call"], s["direction"]): (s["sent"], s["received"], s["lost"])
            for s in per if s["received"] != s["sent"] or s["lost"]}
    with LrkClient([second.node]) as client:
        counters = _counters(client)
        assert lost == {}, (lost, run("conntrack", "-S", ns=ns).stdout,
                            {k: v for k, v in counters.items()
                             if k.startswith(("xdp.", "media.dropped"))})
        assert counters["xdp.verdicts.drop_no_destination"] == 0
        assert counters.get("media.dropped.no_destination", 0) == 0
        assert counters["xdp.verdicts.redirect"] > 0, "the new program carries"
        assert client.stats()["sessions"] == RESTART_CALLS
        for i in range(RESTART_CALLS):
            client.delete(f"r-{i}")
    current = _xdp_prog_id(ns, "vc1")
    assert current and current != old and _xdp_prog_id(ns, "ve1") == current
    assert not _prog_exists(old), "the old program went with its attachment"
    assert second.stop() == 0
    _assert_clean(topo, [old, current])


def test_a_relay_in_another_mode_detaches_the_program_an_xdp_run_left(topo, tmp_path, xdp):
    """SIGTERM of an xdp-mode relay with calls keeps its program attached for the next
    xdp run to replace. If the next run is kernel mode, it detaches that program at start
    (logged) instead of letting it take the ports' packets; the kept call goes on through
    the kernel path."""
    ns = topo.relay.ns
    caller_ip, callee_ip = topo.caller.ip4, topo.callee.ip4
    first = xdp.start(config=f"state_dir = \"{tmp_path / 'state'}\"\n")
    caller = xdp.endpoint(topo.caller.ns, caller_ip, 4000)
    callee = xdp.endpoint(topo.callee.ns, callee_ip, 5000)
    with LrkClient([first.node]) as client:
        to_a, _ = _call(client, "m-call", (caller_ip, 4000), (callee_ip, 5000))
    second = xdp.held(first.again())  # before the stop: the control socket's directory
    assert first.stop() == 0
    assert _xdp_prog_id(ns, "vc1") != 0, "a stop that keeps calls leaves the program attached"
    # the same node, its state and addresses, now in kernel mode
    argv = list(first.argv)
    argv[argv.index("--mode") + 1] = "kernel"
    while "--xdp-interface" in argv:
        at = argv.index("--xdp-interface")
        del argv[at:at + 2]
    second.argv = argv
    second.start()
    assert _xdp_prog_id(ns, "vc1") == 0 and _xdp_prog_id(ns, "ve1") == 0
    with LrkClient([second.node]) as client:
        assert client.list()["total"] == 1, "the kept call was adopted"
        caller.sendto(rtp_packet(1, 0x500), to_a)
        assert len(receive(callee, 1)) == 1, "the kept call flows through the kernel path"
        client.delete("m-call")
    assert second.stop() == 0
    assert "detached lrk's XDP program left on vc1" in second.output
