"""Packet mode over AF_XDP (``--packet-io af_xdp``): an XDP program steers media to the
relay's ports into one AF_XDP socket per interface, the worker relays it and writes whole
Ethernet frames into the socket of the next hop's interface.

Every packet is received by a plain UDP socket on the caller or callee, whose kernel
verifies the IP checksum, and with af_xdp_checksum "kernel" the UDP checksum too (with
the default, "offload", veth hands the frame on as CHECKSUM_PARTIAL, which the receiver
trusts), so delivery in that run proves the frames the worker built valid.
A next hop the kernel has not resolved yet goes out through the endpoint's UDP socket
(counted as `no_route` and as a fallback), which makes the kernel resolve it; from then
on the AF_XDP socket sends."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import struct
from pathlib import Path
from typing import Optional

import pytest

from bench.frames import udp_frame as frame
from bench.netns import Topology, in_netns, run
from fastpath.worker.nexthop import rx_queues
from fastpath.worker.xsk import (
    TX_META_LEN,
    XDP_TX_METADATA,
    XDP_TXMD_FLAGS_CHECKSUM,
    XskSocket,
)
from fastpath.xdp.errors import XdpAttachError
from fastpath.xdp.libbpf import XDP_PASS, XDP_REDIRECT, if_nametoindex, xdp_query_id
from fastpath.xdp.program import XdpProgram
from fastpath.xdp.steer import SteerProgram
from lrk.client import LrkClient
from lrk.demo.media import rtp_packet
from lrk.demo.relay_process import LaunchError, RelayProcess
from tests.integration.hostile import children

from .hosts import endpoint, pending, receive, tables, wait
from .test_packet_mode import _egress, _ipv6_ready, call_both_ways
from .throwaway import Namespaces

pytestmark = pytest.mark.netns

PORTS = "30000-30399"


def _relay(topo, v6: bool, config: Optional[Path] = None) -> RelayProcess:
    return _relay_process(topo, v6, config).start()


def _relay_process(topo, v6: bool, config: Optional[Path] = None) -> RelayProcess:
    """The packet-mode relay over AF_XDP of these tests, not started yet."""
    pick = (lambda h: h.ip6) if v6 else (lambda h: h.ip4)
    return RelayProcess(ports=PORTS, netns=topo.relay.ns, extra=[
        "--mode", "packet", "--packet-io", "af_xdp", "--packet-interface", "vc1",
        "--packet-interface", "ve1", "--internal-ip", pick(topo.relay),
        "--external-ip", pick(topo.relay_ext),
        *(["--config", str(config)] if config else [])])


def _xdp_ids(ns: str) -> list:
    return in_netns(ns, lambda: [xdp_query_id(if_nametoindex(i)) for i in ("vc1", "ve1")])


@pytest.mark.parametrize("checksum", ["offload", "kernel"])
@pytest.mark.parametrize("family", ["ipv4", "ipv6"])
def test_af_xdp_call(topo, family, checksum, tmp_path):
    """RTP and RTCP both ways; sources are the relay's ports; every packet either left by
    AF_XDP or, while its next hop was unresolved, by the UDP socket (counted as such);
    no drop rule, no tap; stop detaches the programs. With af_xdp_checksum "kernel" the
    receivers verify the UDP checksums of the frames the worker built (TX metadata, the
    kernel's sum). The "kernel" runs also size the rings (af_xdp_ring) themselves."""
    v6 = family == "ipv6"
    ns = topo.relay.ns
    _ipv6_ready(topo)
    config = tmp_path / "lrk.toml"
    ring = 1024 if checksum == "kernel" else 16384  # the default
    config.write_text(f'af_xdp_checksum = "{checksum}"\n'
                      + (f"af_xdp_ring = {ring}\n" if ring != 16384 else ""))
    relay = _relay(topo, v6, config)
    sockets = []
    try:
        assert "lrkpkt" not in tables(ns), "no drop rules: steered media never meets the stack"
        assert all(_xdp_ids(ns)), "the steering program is on both interfaces"
        with LrkClient([relay.node]) as client:
            # the worker opens its sockets as it starts; media before that takes the
            # kernel path (the UDP sockets: test_steering_passes_what_is_not_media)
            wait(lambda: client.stats()["counters"].get("media.xsk.sockets") == 2)
            call_both_ways(topo, client, v6, "x-call", sockets)
            counters = client.stats()["counters"]
            eg = _egress(counters)
            assert counters["media.forwarded.packets"] == 71
            assert eg["xsk.packets"] + eg["fallback.packets"] == 71, eg
            assert eg["fallback.packets"] == eg.get("xsk.errors.no_route", 0), eg
            # both neighbours are known once each side has sent: the rest went by AF_XDP
            assert eg["xsk.packets"] >= 71 - 2 * 30, eg
            assert counters["media.xsk.open_failed"] == 0
            # the UDP checksums go by TX metadata: to the device ("offload": veth leaves
            # them uncomputed, as for any UDP socket's packets) or the kernel ("kernel":
            # computed, so the receivers checked every one the AF_XDP sockets sent)
            assert counters[f"media.xsk.tx_checksum.{checksum}"] == 2
            assert counters["media.xsk.rx_slots"] == 2 * ring  # one queue an interface
            assert counters["media.xsk.steered"] == 71 + 1  # and the stranger's
            assert counters["media.xsk.pass_no_socket"] == 0
            assert counters["media.dropped.tap_overflow"] == 0
            assert {k: v for k, v in counters.items() if k.startswith("media.xsk.dropped.")} \
                == {f"media.xsk.dropped.{k}": 0 for k in (
                    "rx_ring_full", "fill_ring_empty", "other")}
        assert relay.stop() == 0
        assert not any(_xdp_ids(ns)), "stop detaches the steering programs"
    finally:
        relay.stop()
        for s in sockets:
            s.close()


def test_a_pinned_memory_limit_too_low_stops_the_start_and_naming_the_fix(topo, tmp_path):
    """Without CAP_IPC_LOCK the UMEMs count against RLIMIT_MEMLOCK (8 MiB here): the
    default rings (64 MiB an interface) stop the relay at start with an error naming the
    limit and the setting, and leave no program attached; af_xdp_ring = 512 (2 MiB an
    interface) fits and serves."""
    ns = topo.relay.ns

    def confined(relay: RelayProcess) -> RelayProcess:
        at = relay.argv.index("-m") - 1  # the interpreter, after `ip netns exec <ns>`
        relay.argv[at:at] = ["setpriv", "--bounding-set=-ipc_lock",
                             "prlimit", f"--memlock={8 << 20}:{8 << 20}"]
        return relay

    relay = confined(_relay_process(topo, False))
    with pytest.raises(LaunchError) as err:
        relay.start()
    assert "RLIMIT_MEMLOCK" in str(err.value) and "af_xdp_ring" in str(err.value)
    assert "Traceback" not in str(err.value)
    assert not any(_xdp_ids(ns)), "a refused start leaves no steering program"
    config = tmp_path / "lrk.toml"
    config.write_text("af_xdp_ring = 512\n")
    relay = confined(_relay_process(topo, False, config)).start()
    try:
        with LrkClient([relay.node]) as client:
            wait(lambda: client.stats()["counters"].get("media.xsk.sockets") == 2)
            counters = client.stats()["counters"]
            assert counters["media.xsk.rx_slots"] == 2 * 512
            assert counters["media.xsk.open_failed"] == 0
        assert relay.stop() == 0
    finally:
        relay.stop()


def test_steering_passes_what_is_not_media(topo):
    """The steering program takes UDP to the port range only: other ports, fragments
    and ARP/ICMP reach the kernel; a queue without a socket passes too."""
    ns = topo.relay.ns

    def setup():
        prog = SteerProgram.load()
        prog.configure([(topo.relay.ip4, 30000, 30009)])
        return prog, prog.attach("vc1")

    prog, how = in_netns(ns, setup)
    xsk = None
    sockets = []
    try:
        assert how == "native"
        src = endpoint(topo.caller.ns, topo.caller.ip4, 4000)
        plain = endpoint(ns, topo.relay.ip4, 29999)
        ext = endpoint(ns, topo.relay_ext.ip4, 30000)
        media_sock = endpoint(ns, topo.relay.ip4, 30000)
        sockets += [src, plain, ext, media_sock]
        # no socket registered yet: media to the range passes to the kernel's socket
        src.sendto(b"before", (topo.relay.ip4, 30000))
        assert receive(media_sock, 1) == [(b"before", (topo.caller.ip4, 4000))]
        xsk = in_netns(ns, lambda: XskSocket(if_nametoindex("vc1")))
        prog.register(0, xsk.fd)
        src.sendto(b"steered", (topo.relay.ip4, 30000))
        src.sendto(b"other port", (topo.relay.ip4, 29999))
        src.sendto(b"other address", (topo.relay_ext.ip4, 30000))
        src.sendto(b"z" * 3000, (topo.relay.ip4, 30000))  # fragments: kernel reassembles
        assert receive(plain, 1) == [(b"other port", (topo.caller.ip4, 4000))]
        assert receive(ext, 1) == [(b"other address", (topo.caller.ip4, 4000))]
        got = receive(media_sock, 1)
        assert got == [(b"z" * 3000, (topo.caller.ip4, 4000))]
        descs = []
        wait(lambda: descs.extend(xsk.rx(8)) or descs)
        assert [bytes(xsk.view()[o + 42:o + n]) for o, n in descs] == [b"steered"]
        counts = prog.verdict_counts()
        assert counts["steered"] == 1, counts
        assert counts["pass_no_socket"] == 1, counts  # "before": no socket then
        assert counts["pass_port"] == 1 and counts["pass_fragment"] == 3, counts
        assert counts["pass_address"] == 1, counts
        assert pending(media_sock) == []
    finally:
        for s in sockets:
            s.close()
        if xsk is not None:
            xsk.close()
        in_netns(ns, prog.close)
    assert not any(_xdp_ids(ns))


def _vm_flags(ptr) -> list:
    """The VmFlags of this process's mapping that holds cffi pointer `ptr` (smaps)."""
    from cffi import FFI

    addr = int(FFI().cast("uintptr_t", ptr))
    inside = False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split(" ", 1)[0]
            if "-" in head and ":" not in head:
                lo, hi = (int(x, 16) for x in head.split("-"))
                inside = lo <= addr < hi
            elif inside and line.startswith("VmFlags:"):
                return line.split()[1:]
    raise AssertionError(f"no mapping holds {addr:#x}")


@contextlib.contextmanager
def _pinged(topo, **xsk_kwargs):
    """An AF_XDP socket on the relay's vc1 behind the steering program, and the frame of
    a "ping" the caller sent to relay port 30000: yields (socket, the caller's UDP
    socket, the frame's UMEM offset, its bytes); everything is closed after."""
    ns = topo.relay.ns
    prog = in_netns(ns, SteerProgram.load)
    src = xsk = None
    try:
        prog.configure([(topo.relay.ip4, 30000, 30000)])
        in_netns(ns, lambda: prog.attach("vc1"))
        ifindex = in_netns(ns, lambda: if_nametoindex("vc1"))
        xsk = in_netns(ns, lambda: XskSocket(ifindex, frames=64, ring=32, **xsk_kwargs))
        prog.register(0, xsk.fd)
        src = endpoint(topo.caller.ns, topo.caller.ip4, 4000)
        src.sendto(b"ping", (topo.relay.ip4, 30000))
        descs = []
        wait(lambda: descs.extend(xsk.rx(8)) or descs)
        assert len(descs) == 1
        off, ln = descs[0]
        yield xsk, src, off, bytes(xsk.view()[off:off + ln])
    finally:
        if xsk is not None:
            xsk.close()  # idempotent
        if src is not None:
            src.close()
        in_netns(ns, prog.close)


def _reflected(frame: bytes) -> bytearray:
    """`frame` sent back: MACs, addresses and ports swapped."""
    out = bytearray(frame)
    out[0:6], out[6:12] = frame[6:12], frame[0:6]
    out[26:30], out[30:34] = frame[30:34], frame[26:30]
    out[34:36], out[36:38] = frame[36:38], frame[34:36]
    return out


def test_xsk_socket_round_trip(topo):
    """The socket alone: a frame steered in is read with its exact bytes; a frame written
    to the TX ring leaves the interface and is delivered; sent frames come back through
    the completion ring; the UMEM asks for huge pages; close releases everything (a second
    bind on the queue works)."""
    with _pinged(topo) as (xsk, src, off, frame):
        assert len(frame) == 14 + 20 + 8 + 4 and frame.endswith(b"ping")
        assert frame[12:14] == b"\x08\x00" and frame[23] == socket.IPPROTO_UDP
        assert socket.inet_ntoa(frame[26:30]) == topo.caller.ip4
        out = _reflected(frame)
        out[40:42] = b"\0\0"  # UDP checksum 0 (IPv4: none)
        xsk.release([off])
        free = xsk.tx_free()
        t = xsk.tx_frame()
        assert xsk.tx_free() == free - 1
        xsk.view()[t:t + len(out)] = out
        assert xsk.tx_put(t, len(out)) and xsk.kick() == 1
        assert receive(src, 1) == [(b"ping", (topo.relay.ip4, 30000))]
        wait(lambda: xsk.reclaim() >= 0 and xsk.tx_free() == free)  # completion ring
        assert xsk.kernel_stats()["tx_invalid_descs"] == 0
        assert "hg" in _vm_flags(xsk._umem_ptr)  # MADV_HUGEPAGE asked
        xsk.close()
        xsk.close()  # idempotent
        ifindex = xsk.ifindex
        again = in_netns(topo.relay.ns, lambda: XskSocket(ifindex, frames=64, ring=32))
        again.close()


def _udp_checksum_errors(ns: str) -> int:
    lines = [ln.split() for ln in run("cat", "/proc/net/snmp", ns=ns).stdout.splitlines()
             if ln.startswith("Udp:")]
    return int(lines[1][lines[0].index("InCsumErrors")])


def test_the_kernel_completes_the_udp_checksum_tx_metadata_asks_for(topo):
    """tx_checksum "kernel": the UMEM has room for TX metadata and the kernel sums the
    UDP header and payload onto the pseudo-header's sum in the checksum field. The
    receiving kernel verifies it: a frame with the right pseudo-header sum is delivered,
    one whose sum is off by one is dropped as a checksum error. (The default, "offload",
    leaves the sum to the device, which veth never computes, as for a UDP socket's own
    packets.)"""
    with _pinged(topo, tx_checksum="kernel") as (xsk, src, off, frame):
        assert (xsk.tx_checksum, xsk.tx_meta) == ("kernel", TX_META_LEN)
        out = _reflected(frame)
        xsk.release([off])
        pseudo = sum(struct.unpack("!4H", frame[26:34])) + socket.IPPROTO_UDP + 12
        errors = _udp_checksum_errors(topo.caller.ns)
        meta = struct.pack("<QHH4xQ", XDP_TXMD_FLAGS_CHECKSUM, 34, 6, 0)
        for field in ((pseudo + 1) % 0xFFFF, pseudo % 0xFFFF):  # wrong, then right
            struct.pack_into("!H", out, 40, field)
            t = xsk.tx_frame()
            xsk.view()[t - TX_META_LEN:t] = meta
            xsk.view()[t:t + len(out)] = out
            assert xsk.tx_put(t, len(out) | xsk.tx_options)
        assert xsk.kick() == 2
        assert receive(src, 1) == [(b"ping", (topo.relay.ip4, 30000))]
        assert _udp_checksum_errors(topo.caller.ns) == errors + 1
        src.setblocking(False)
        with pytest.raises(BlockingIOError):
            src.recvfrom(64)
        assert xsk.kernel_stats()["tx_invalid_descs"] == 0


def test_the_default_checksum_is_offloaded_where_the_kernel_has_tx_metadata(topo):
    ifindex = in_netns(topo.relay.ns, lambda: if_nametoindex("vc1"))
    xsk = in_netns(topo.relay.ns, lambda: XskSocket(ifindex, frames=64, ring=32))
    try:
        assert (xsk.tx_checksum, xsk.tx_meta, xsk.tx_options) == (
            "offload", TX_META_LEN, XDP_TX_METADATA << 32)
    finally:
        xsk.close()
    with pytest.raises(ValueError, match="tx_checksum"):
        XskSocket(ifindex, tx_checksum="nic")


def test_xsk_refuses_bad_geometry():
    for kwargs in ({"frames": 100}, {"ring": 48}, {"frames": 64, "ring": 64}):
        with pytest.raises(ValueError):
            XskSocket(1, **kwargs)


def test_a_leftover_steering_program_is_replaced_and_a_foreign_one_refused(topo):
    """A crashed daemon's steering program stays attached: the next start detaches it;
    another tool's XDP program is never touched."""
    ns = topo.relay.ns
    first = in_netns(ns, SteerProgram.load)
    in_netns(ns, lambda: first.attach("vc1"))
    first.attached.clear()  # as a crash would: nobody detaches
    first.close()
    assert _xdp_ids(ns)[0]
    second = in_netns(ns, SteerProgram.load)
    try:
        assert in_netns(ns, lambda: second.attach("vc1")) == "native"
    finally:
        in_netns(ns, second.close)
    assert not any(_xdp_ids(ns))
    other = in_netns(ns, XdpProgram.load)
    try:
        in_netns(ns, lambda: other.attach("vc1", "native"))
        third = in_netns(ns, SteerProgram.load)
        try:
            with pytest.raises(XdpAttachError, match="already has an XDP program"):
                in_netns(ns, lambda: third.attach("vc1"))
        finally:
            third.close()
    finally:
        in_netns(ns, other.close)


def _flows(client, topo, n: int, tag: str, sockets: list):
    """`n` calls set up and one packet each way through each: [(caller, callee, to_a,
    to_b)]."""
    calls = []
    for i in range(n):
        a = endpoint(topo.caller.ns, topo.caller.ip4, 7000 + 2 * i)
        b = endpoint(topo.callee.ns, topo.callee.ip4, 7000 + 2 * i)
        sockets += [a, b]
        offer = client.offer(f"{tag}{i}", "a", (topo.caller.ip4, 7000 + 2 * i),
                             interface="external")
        answer = client.answer(f"{tag}{i}", "a", "b", (topo.callee.ip4, 7000 + 2 * i),
                               interface="internal")
        calls.append((a, b, (answer["relay"]["ip"], answer["relay"]["port"]),
                      (offer["relay"]["ip"], offer["relay"]["port"])))
    return calls


def _through(calls, seq: int) -> int:
    """Packets that made it both ways, one per call and direction."""
    ok = 0
    for a, b, to_a, to_b in calls:
        a.sendto(rtp_packet(seq, 1), to_a)
        ok += len(receive(b, 1))
        b.sendto(rtp_packet(seq, 2), to_b)
        ok += len(receive(a, 1))
    return ok


def test_a_killed_worker_is_replaced_and_its_sockets_rebound(topo):
    """SIGKILL the worker: the daemon restarts it and re-installs the calls; the new
    worker binds the queues its predecessor held (released by the kernel a moment
    later) and registers its sockets; media goes by AF_XDP again."""
    relay = _relay(topo, False)
    sockets = []
    try:
        with LrkClient([relay.node]) as client:
            wait(lambda: client.stats()["counters"].get("media.xsk.sockets") == 2)
            calls = _flows(client, topo, 3, "wk", sockets)
            assert _through(calls, 0) == 6
            (pid,) = children(relay.proc.pid)  # the worker
            os.kill(pid, signal.SIGKILL)
            wait(lambda: client.stats()["counters"]["workers.restarts"] == 1)
            wait(lambda: client.stats()["counters"].get("media.xsk.sockets") == 2)
            before = client.stats()["counters"]["media.xsk.steered"]
            assert _through(calls, 1) == 6
            counters = client.stats()["counters"]
            assert counters["media.xsk.open_failed"] == 0
            assert counters["media.xsk.steered"] == before + 6
        assert relay.stop() == 0
        assert not any(_xdp_ids(topo.relay.ns))
    finally:
        relay.stop()
        for s in sockets:
            s.close()


def test_a_crashed_daemons_steering_programs_are_detached_by_the_next_start(topo):
    """SIGKILL the daemon: its programs stay attached (nobody detaches them) and pass
    media to the kernel; the next start, over AF_XDP or with taps, takes them off."""
    ns = topo.relay.ns
    first = _relay(topo, False)
    try:
        first.kill()
        assert all(_xdp_ids(ns)), "a crash leaves the steering programs attached"
        second = first.again()
        second.start()
        assert all(_xdp_ids(ns))  # its own, in place of the leftovers
        assert second.stop() == 0
        assert "detached lrk's XDP program left on vc1 (native, lrk_steer)" in second.output
        assert not any(_xdp_ids(ns))
        third = _relay(topo, False)
        third.kill()
        taps = RelayProcess(ports=PORTS, netns=ns, extra=[
            "--mode", "packet", "--packet-interface", "vc1", "--packet-interface", "ve1",
            "--internal-ip", topo.relay.ip4, "--external-ip", topo.relay_ext.ip4]).start()
        assert not any(_xdp_ids(ns)), "a tap-mode start detaches them"
        assert taps.stop() == 0
        assert "lrk_steer" in taps.output
    finally:
        first.stop()


M1, M2 = "02:00:00:00:00:01", "02:00:00:00:00:02"


def _decide(prog: SteerProgram, frame: bytes) -> str:
    """Which verdict counter one run of the program on `frame` moved (and XDP_PASS: no
    socket is registered here, so a steered frame passes as pass_no_socket)."""
    before = prog.verdict_counts()
    verdict, out = prog.test_run(frame)
    assert verdict == XDP_PASS and out == frame  # never rewritten, never dropped
    after = prog.verdict_counts()
    (moved,) = [k for k in after if after[k] != before[k]]
    return moved


def test_the_steering_program_decides_each_frame():
    """BPF_PROG_TEST_RUN, crafted frames: to a relay address and port of its range
    (v4, v6, IPv4 options) it steers; another address, another port (below, above, the
    other address's range), a fragment (first or later), an IPv6 extension header, TCP,
    ARP, a cut header: the kernel's."""
    prog = SteerProgram.load()
    try:
        prog.configure([("198.51.100.1", 30000, 30009), ("2001:db8:1::1", 40000, 40009),
                        ("198.51.100.65", 31000, 31000)])
        v4 = frame(M1, M2, "198.51.100.10", "198.51.100.1", 4000, 30000, b"rtp")
        assert _decide(prog, v4) == "pass_no_socket"
        assert _decide(prog, frame(M1, M2, "198.51.100.10", "198.51.100.1", 4000, 30009,
                                   b"x")) == "pass_no_socket"
        v6 = frame(M1, M2, "2001:db8:1::10", "2001:db8:1::1", 4000, 40005, b"rtp")
        assert _decide(prog, v6) == "pass_no_socket"
        # IPv4 with 4 bytes of options: the UDP header is found after them
        ip = bytearray(v4[14:34])
        ip[0] = 0x46
        ip[2:4] = struct.pack("!H", 24 + len(v4) - 34)
        opts = v4[:14] + bytes(ip) + b"\x01\x01\x01\x00" + v4[34:]
        assert _decide(prog, opts) == "pass_no_socket"
        cases = {
            "pass_address": [
                frame(M1, M2, "198.51.100.10", "198.51.100.2", 4000, 30000, b"x"),
                frame(M1, M2, "2001:db8:1::10", "2001:db8:1::2", 4000, 40000, b"x")],
            "pass_port": [
                frame(M1, M2, "198.51.100.10", "198.51.100.1", 4000, 29999, b"x"),
                frame(M1, M2, "198.51.100.10", "198.51.100.1", 4000, 30010, b"x"),
                frame(M1, M2, "198.51.100.10", "198.51.100.1", 4000, 31000, b"x"),
                frame(M1, M2, "198.51.100.10", "198.51.100.65", 4000, 30000, b"x")],
            "pass_fragment": [
                frame(M1, M2, "198.51.100.10", "198.51.100.1", 4000, 30000, b"x",
                      frag=0x2000),  # first fragment: more fragments follow
                frame(M1, M2, "198.51.100.10", "198.51.100.1", 4000, 30000, b"x",
                      frag=0x0010)],  # a later one
        }
        for verdict, frames in cases.items():
            for f in frames:
                assert _decide(prog, f) == verdict, (verdict, f.hex())
        ext = bytearray(v6)
        ext[20] = 0  # next header: hop-by-hop options, not UDP
        tcp = bytearray(v4)
        tcp[23] = 6
        arp = bytes.fromhex("ffffffffffff020000000001" + "0806") + bytes(28)
        for f in (bytes(ext), bytes(tcp), arp, v4[:30], v4[:14], v4[:40]):
            assert _decide(prog, f) == "pass_other", f.hex()
    finally:
        prog.close()


def test_each_receive_queue_has_its_socket():
    """A two-queue interface: the program redirects a frame to the socket registered
    under the queue it arrived on (BPF_PROG_TEST_RUN sets the queue): queue 1 has one,
    queue 0 has none and passes. (A test run only returns the verdict; delivery into the
    sockets is what test_a_two_queue_relay_opens_a_socket_per_queue shows.)"""
    spaces = Namespaces("xq")
    try:
        ns = spaces.make()
        run("ip", "link", "add", "r0", "numtxqueues", "2", "numrxqueues", "2", "type", "veth",
            "peer", "name", "p0", "numtxqueues", "2", "numrxqueues", "2", ns=ns)
        run("ip", "addr", "add", "198.51.100.1/24", "dev", "r0", ns=ns)
        for dev in ("r0", "p0"):
            run("ip", "link", "set", dev, "up", ns=ns)

        def scenario():
            prog = SteerProgram.load()
            xsk = None
            try:
                prog.configure([("198.51.100.1", 30000, 30009)])
                assert prog.attach("r0") == "native"
                ifindex = if_nametoindex("r0")
                assert rx_queues(ifindex) == 2
                xsk = XskSocket(ifindex, 1, frames=64, ring=32)
                prog.register(1, xsk.fd)
                f = frame(M1, M2, "198.51.100.10", "198.51.100.1", 4000, 30000, b"q1")
                assert prog.test_run(f, ifindex, rx_queue=1)[0] == XDP_REDIRECT
                assert prog.test_run(f, ifindex, rx_queue=0)[0] == XDP_PASS
                counts = prog.verdict_counts()
                assert (counts["steered"], counts["pass_no_socket"]) == (1, 1), counts
            finally:
                if xsk is not None:
                    xsk.close()
                prog.close()

        in_netns(ns, scenario)
    finally:
        spaces.destroy()


def test_a_two_queue_relay_opens_a_socket_per_queue():
    """The worker asks the kernel how many receive queues each interface uses and binds
    a socket to each: four here, and no media passed for want of a socket, on whichever
    queue the sender's hash put it (which queue is the kernel's choice, not asserted;
    test_each_receive_queue_has_its_socket shows the program keys sockets by queue)."""
    with Topology("q2", queues=2) as topo:
        relay = _relay(topo, False)
        sockets = []
        try:
            with LrkClient([relay.node]) as client:
                wait(lambda: client.stats()["counters"].get("media.xsk.sockets") == 4)
                calls = _flows(client, topo, 8, "q", sockets)
                assert _through(calls, 0) == 16
                counters = client.stats()["counters"]
                assert counters["media.xsk.pass_no_socket"] == 0
                assert counters["media.xsk.steered"] == 16
                assert counters["media.xsk.open_failed"] == 0
                # the interface's af_xdp_ring (16,384 by default) split by its 2 queues
                assert counters["media.xsk.rx_slots"] == 2 * 2 * 8192
            assert relay.stop() == 0
        finally:
            relay.stop()
            for s in sockets:
                s.close()
