"""The XDP program tested like code: BPF_PROG_TEST_RUN feeds crafted frames to the
loaded relay program (exact bytes in, exact bytes and verdict out) for every branch,
IPv4 and IPv6. bpf_fib_lookup runs in a namespace made here, with permanent neighbour
entries, so the rewritten frames' MAC addresses are known exactly."""

from __future__ import annotations

import struct
from typing import Dict, Iterator, NamedTuple

import pytest

from bench.frames import ones_sum, udp_checksum
from bench.frames import udp_frame as frame
from bench.netns import in_netns, run
from fastpath.xdp.errors import XdpError
from fastpath.xdp.layout import (
    F_CHECK_PEER,
    F_KERNEL,
    INLINE_V4,
    INLINE_V6,
    SEEN_EXACT,
    SEEN_NONE,
    SEEN_OTHER_PORT,
    SEEN_PEER_MOVED,
    Entry,
    addr_key,
)
from fastpath.xdp.libbpf import XDP_DROP, XDP_PASS, XDP_REDIRECT, XDP_TX, if_nametoindex
from fastpath.xdp.program import XdpProgram

from .throwaway import Namespaces

pytestmark = pytest.mark.netns

RA_MAC, EA_MAC = "02:00:00:00:01:01", "02:00:00:00:02:01"
CALLER_MAC, CALLEE_MAC, OTHER_MAC = "02:00:00:00:01:0a", "02:00:00:00:02:46", "02:00:00:00:01:0b"
PAYLOAD = bytes(range(12)) + b"media payload" * 3


class Net(NamedTuple):
    relay_a: str
    relay_b: str
    caller: str
    callee: str
    other: str  # a second host on the caller's link (XDP_TX)
    unresolved: str  # on the caller's link, no neighbour entry
    plen: int


NETS = {
    4: Net("198.51.100.1", "198.51.100.65", "198.51.100.10", "198.51.100.70",
           "198.51.100.11", "198.51.100.20", 26),
    6: Net("2001:db8:1::1", "2001:db8:2::1", "2001:db8:1::10", "2001:db8:2::70",
           "2001:db8:1::11", "2001:db8:1::20", 64),
}


@pytest.fixture(scope="module")
def env() -> Iterator[Dict[str, object]]:
    spaces = Namespaces("xp")
    prog = None
    try:
        ns = spaces.make()
        for dev, peer, mac in (("ra", "rap", RA_MAC), ("ea", "eap", EA_MAC)):
            run("ip", "link", "add", dev, "address", mac, "type", "veth", "peer", "name", peer,
                ns=ns)
            run("ip", "link", "set", dev, "up", ns=ns)
            run("ip", "link", "set", peer, "up", ns=ns)
        run("sysctl", "-qw", "net.ipv4.ip_forward=1", "net.ipv6.conf.all.forwarding=1", ns=ns)
        for fam, net in NETS.items():
            for dev, ip in (("ra", net.relay_a), ("ea", net.relay_b)):
                run("ip", f"-{fam}", "addr", "add", f"{ip}/{net.plen}", "dev", dev,
                    *(["nodad"] if fam == 6 else []), ns=ns)
            for ip, mac, dev in ((net.caller, CALLER_MAC, "ra"), (net.other, OTHER_MAC, "ra"),
                                 (net.callee, CALLEE_MAC, "ea")):
                run("ip", f"-{fam}", "neigh", "replace", ip, "lladdr", mac, "dev", dev,
                    "nud", "permanent", ns=ns)
        ifindex = in_netns(ns, lambda: if_nametoindex("ra"))
        ifindex_b = in_netns(ns, lambda: if_nametoindex("ea"))
        prog = XdpProgram.load(max_streams=1024, max_counters=1024)
        prog.allow_egress(ifindex)  # as attaching to ra and ea would
        prog.allow_egress(ifindex_b)
        prog.configure(30000, 30099, [n.relay_a for n in NETS.values()]
                       + [n.relay_b for n in NETS.values()])
        for fam, net in NETS.items():
            base = 100 * fam
            a, b = net.relay_a, net.relay_b
            prog.put(Entry((a, 30000), (net.caller, 4000), (b, 30002), (net.callee, 5000),
                           base + 0))
            prog.put(Entry((b, 30002), (net.callee, 5000), (a, 30000), (net.caller, 4000),
                           base + 1))
            prog.put(Entry((a, 30001), (net.caller, 4001), (b, 30003), (net.callee, 5001),
                           base + 2))  # RTCP
            prog.put(Entry((a, 30010), (net.caller, 4000), (a, 30012), (net.other, 4010),
                           base + 3))  # both legs on one link: XDP_TX
            prog.put(Entry((b, 30020), (net.callee, 5020), (a, 30022), (net.caller, 4020),
                           base + 4, F_CHECK_PEER, peer=(a, 30022)))
            prog.put(Entry((a, 30022), (net.caller, 4020), (b, 30020), (net.callee, 5020),
                           base + 5, peer=(b, 30020)))
            prog.put(Entry((a, 30030), (net.caller, 4000), (b, 30032), (net.callee, 5000),
                           base + 6, F_KERNEL))
            prog.put(Entry((a, 30040), (net.caller, 4040), (b, 30042),
                           (net.unresolved, 6000), base + 7))
            prog.put(Entry((a, 30050), (net.caller, 0), (b, 30052), (net.callee, 5050),
                           base + 8))  # any port of the caller's address
        yield {"ns": ns, "prog": prog, "ifindex": ifindex, "ifindex_b": ifindex_b}
    finally:
        if prog is not None:
            prog.close()
        spaces.destroy()


def _run(env, data: bytes, ingress: str = "ifindex"):
    prog: XdpProgram = env["prog"]  # type: ignore[assignment]
    before = prog.verdict_counts()
    verdict, out = in_netns(env["ns"], lambda: prog.test_run(data, env[ingress]))
    after = prog.verdict_counts()
    moved = {k: after[k] - before[k] for k in after if after[k] != before[k]}
    return verdict, out, moved


def _in(net: Net, dport: int, sport: int = 4000, payload: bytes = PAYLOAD, **kw) -> bytes:
    return frame(CALLER_MAC, RA_MAC, net.caller, net.relay_a, sport, dport, payload, **kw)


@pytest.fixture(params=[4, 6], ids=["ipv4", "ipv6"])
def net(request) -> Net:
    return NETS[request.param]


def _fam(net: Net) -> int:
    return 6 if ":" in net.caller else 4


def test_admitted_stream_is_rewritten_and_redirected(env, net):
    prog: XdpProgram = env["prog"]  # type: ignore[assignment]
    idx = 100 * _fam(net)
    before = prog.read_counter(idx)
    verdict, out, moved = _run(env, _in(net, 30000))
    assert verdict == XDP_REDIRECT
    assert out == frame(EA_MAC, CALLEE_MAC, net.relay_b, net.callee, 30002, 5000, PAYLOAD,
                        ttl=63)
    assert moved == {"redirect": 1}
    packets, octets, last = prog.read_counter(idx)
    assert (packets - before[0], octets - before[1]) == (1, len(PAYLOAD))
    assert last > 0
    assert prog.seen((net.relay_a, 30000)) == SEEN_EXACT


def test_callee_direction_and_ethernet_padding(env, net):
    """The other direction (ingress on the callee's link); a frame padded past the IP
    length (Ethernet minimum) keeps its padding and is still admitted."""
    data = frame(CALLEE_MAC, EA_MAC, net.callee, net.relay_b, 5000, 30002, b"x", pad=30)
    verdict, out, moved = _run(env, data, "ifindex_b")
    assert verdict == XDP_REDIRECT
    assert out == frame(RA_MAC, CALLER_MAC, net.relay_a, net.caller,
                        30000, 4000, b"x", ttl=63, pad=30)
    assert moved == {"redirect": 1}


def test_rtcp_port_is_its_own_stream(env, net):
    verdict, out, moved = _run(env, _in(net, 30001, sport=4001))
    assert verdict == XDP_REDIRECT
    assert out == frame(EA_MAC, CALLEE_MAC, net.relay_b, net.callee, 30003, 5001, PAYLOAD,
                        ttl=63)
    assert moved == {"redirect": 1}


def test_same_link_is_xdp_tx(env, net):
    verdict, out, moved = _run(env, _in(net, 30010))
    assert verdict == XDP_TX
    assert out == frame(RA_MAC, OTHER_MAC, net.relay_a, net.other, 30012, 4010, PAYLOAD, ttl=63)
    assert moved == {"tx": 1}


@pytest.mark.parametrize("case", ["unknown_port", "spoofed_source"])
def test_junk_to_relay_ports_is_dropped(env, net, case):
    if case == "unknown_port":
        data, reason = _in(net, 30098), "drop_no_destination"
    else:
        spoof = net.other
        data = frame(CALLER_MAC, RA_MAC, spoof, net.relay_a, 4000, 30000, PAYLOAD)
        reason = "drop_unexpected_source"
    verdict, out, moved = _run(env, data)
    assert (verdict, out, moved) == (XDP_DROP, data, {reason: 1})


@pytest.mark.parametrize("case", ["outside_range", "not_relay_address", "not_udp"])
def test_foreign_traffic_passes_untouched(env, net, case):
    if case == "outside_range":
        data = _in(net, 5060)
    elif case == "not_relay_address":
        data = frame(CALLER_MAC, RA_MAC, net.caller, net.other, 4000, 30000, PAYLOAD)
    else:
        data = bytearray(_in(net, 30000))
        if _fam(net) == 4:
            data[23] = 6  # TCP
            data[24:26] = b"\0\0"
            data[24:26] = struct.pack("!H", ~ones_sum(bytes(data[14:34])) & 0xFFFF)
        else:
            data[20] = 6
        data = bytes(data)
    verdict, out, moved = _run(env, data)
    assert (verdict, out, moved) == (XDP_PASS, data, {"pass_other": 1})


@pytest.mark.parametrize("case,reason", [
    ("other_source_port", "pass_source_port"),
    ("kernel_entry", "pass_kernel"),
    ("ttl", "pass_ttl"),
    ("no_neighbour", "pass_fib"),
    ("fragment", "pass_fragment"),
    ("options", "pass_options"),
    ("short", "pass_short"),
])
def test_what_the_kernel_must_judge_passes_unchanged(env, net, case, reason):
    v6 = _fam(net) == 6
    if case == "other_source_port":  # a NATed peer: kernel mode learns its port
        data = _in(net, 30000, sport=4444)
    elif case == "kernel_entry":
        data = _in(net, 30030)
    elif case == "ttl":
        data = _in(net, 30000, ttl=1)
    elif case == "no_neighbour":
        data = _in(net, 30040, sport=4040)
    elif case == "fragment":
        if v6:
            data = bytearray(_in(net, 30000))
            data[20] = 44  # a fragment header follows
            data = bytes(data)
        else:
            data = _in(net, 30000, frag=0x2000)  # more fragments
    elif case == "options":
        if v6:
            data = bytearray(_in(net, 30000))
            data[20] = 0  # hop-by-hop options follow
            data = bytes(data)
        else:
            base = _in(net, 30000)
            hdr = bytearray(base[14:34] + b"\x01\x01\x01\x00")  # 4 bytes of NOP/EOL options
            hdr[0] = 0x46
            hdr[2:4] = struct.pack("!H", len(base) - 14 + 4)
            hdr[10:12] = b"\0\0"
            hdr[10:12] = struct.pack("!H", ~ones_sum(bytes(hdr)) & 0xFFFF)
            data = base[:14] + bytes(hdr) + base[34:]
    else:  # cut inside the UDP header
        data = _in(net, 30000)[:14 + (40 if v6 else 20) + 4]
    verdict, out, moved = _run(env, data)
    assert (verdict, out, moved) == (XDP_PASS, data, {reason: 1})


@pytest.mark.parametrize("case", ["ip_length_beyond_frame", "udp_length_mismatch",
                                  "udp_length_short"])
def test_inconsistent_lengths_are_dropped(env, net, case):
    v6 = _fam(net) == 6
    data = bytearray(_in(net, 30000))
    udp = 14 + (40 if v6 else 20)
    if case == "ip_length_beyond_frame":
        data = data[:-5]  # truncated: the IP header claims 5 bytes more than arrived
    elif case == "udp_length_mismatch":
        data[udp + 4:udp + 6] = struct.pack("!H", 8 + len(PAYLOAD) - 2)
    else:
        data[udp + 4:udp + 6] = struct.pack("!H", 4)
    verdict, out, moved = _run(env, bytes(data))
    assert (verdict, out, moved) == (XDP_DROP, bytes(data), {"drop_malformed": 1})


def test_reverse_direction_passes_while_its_peer_is_behind_a_nat(env, net):
    """F_CHECK_PEER: callee -> caller goes to the caller's SDP port until the caller is
    seen sending from another port (a NAT): then the kernel path (conntrack knows the
    real port) until the daemon writes the latched port into both entries."""
    prog: XdpProgram = env["prog"]  # type: ignore[assignment]
    fam = _fam(net)
    a, b = net.relay_a, net.relay_b
    prog.put(Entry((b, 30024), (net.callee, 5024), (a, 30026), (net.caller, 4024),
                   100 * fam + 9, F_CHECK_PEER, peer=(a, 30026)))
    prog.put(Entry((a, 30026), (net.caller, 4024), (b, 30024), (net.callee, 5024),
                   100 * fam + 10, peer=(b, 30024)))
    data = frame(CALLEE_MAC, EA_MAC, net.callee, net.relay_b, 5024, 30024, PAYLOAD)
    verdict, out, _ = _run(env, data, "ifindex_b")  # the caller has not sent: SDP port
    assert verdict == XDP_REDIRECT
    assert out == frame(RA_MAC, CALLER_MAC, a, net.caller, 30026, 4024, PAYLOAD, ttl=63)
    nat = _in(net, 30026, sport=4444)
    assert _run(env, nat) == (XDP_PASS, nat, {"pass_source_port": 1})
    assert prog.seen((a, 30026)) == SEEN_OTHER_PORT
    # ... which marked the reverse entry, whose hot path reads only its own value
    assert prog.seen((b, 30024)) & SEEN_PEER_MOVED
    assert _run(env, data, "ifindex_b") == (XDP_PASS, data, {"pass_peer_nat": 1})
    # the daemon learnt the real port (conntrack): both entries name it
    prog.put(Entry((a, 30026), (net.caller, 4444), (b, 30024), (net.callee, 5024),
                   100 * fam + 10))
    prog.put(Entry((b, 30024), (net.callee, 5024), (a, 30026), (net.caller, 4444),
                   100 * fam + 9))
    assert prog.seen((a, 30026)) == SEEN_NONE
    verdict, out, _ = _run(env, data, "ifindex_b")
    assert verdict == XDP_REDIRECT
    assert out == frame(RA_MAC, CALLER_MAC, a, net.caller, 30026, 4444, PAYLOAD, ttl=63)
    verdict, out, _ = _run(env, nat)
    assert verdict == XDP_REDIRECT
    assert out == frame(EA_MAC, CALLEE_MAC, b, net.callee, 30024, 5024, PAYLOAD, ttl=63)


def test_next_hop_on_an_interface_without_the_program_passes(env, net):
    """A driver may take redirected frames only where an XDP program runs: a next hop
    out of another interface is the kernel path's."""
    prog: XdpProgram = env["prog"]  # type: ignore[assignment]
    key = env["ifindex_b"].to_bytes(4, "little")
    prog.tx_ifaces.delete(key)
    try:
        data = _in(net, 30000)
        assert _run(env, data) == (XDP_PASS, data, {"pass_egress": 1})
    finally:
        prog.allow_egress(env["ifindex_b"])
    assert _run(env, _in(net, 30000))[0] == XDP_REDIRECT


def test_any_source_port_entry(env, net):
    verdict, out, _ = _run(env, _in(net, 30050, sport=61000))
    assert verdict == XDP_REDIRECT
    assert out == frame(EA_MAC, CALLEE_MAC, net.relay_b, net.callee, 30052, 5050,
                        PAYLOAD, ttl=63)


def test_checksum_edge_cases(env, net):
    v6 = _fam(net) == 6
    # a payload whose rewritten UDP checksum sums to zero: it must go out as 0xffff
    even = PAYLOAD[:50]  # the word below must sit on a 16-bit boundary
    probe = even + b"\0\0"
    udp = struct.pack("!HHHH", 30002, 5000, 8 + len(probe), 0) + probe
    word = udp_checksum(net.relay_b, net.callee, udp)  # the checksum with a zero word
    payload = even + struct.pack("!H", word)  # adding it makes the sum all ones
    expected = frame(EA_MAC, CALLEE_MAC, net.relay_b, net.callee, 30002, 5000, payload, ttl=63)
    assert expected[-len(payload) - 2:-len(payload)] == b"\xff\xff"
    verdict, out, _ = _run(env, _in(net, 30000, payload=payload))
    assert (verdict, out) == (XDP_REDIRECT, expected)
    # TTL 255 and a max-value identification still give a valid IPv4 header checksum;
    # hop limit 255 over IPv6
    verdict, out, _ = _run(env, _in(net, 30000, ttl=255, ident=0xFFFF))
    assert verdict == XDP_REDIRECT
    assert out == frame(EA_MAC, CALLEE_MAC, net.relay_b, net.callee, 30002, 5000, PAYLOAD,
                        ttl=254, ident=0xFFFF)
    # no UDP checksum: allowed over IPv4 (stays 0), invalid over IPv6 (dropped)
    data = _in(net, 30000, csum=0)
    verdict, out, moved = _run(env, data)
    if v6:
        assert (verdict, out, moved) == (XDP_DROP, data, {"drop_malformed": 1})
    else:
        assert verdict == XDP_REDIRECT
        assert out == frame(EA_MAC, CALLEE_MAC, net.relay_b, net.callee, 30002, 5000, PAYLOAD,
                            ttl=63, csum=0)


def test_counters_read_in_batches_equal_one_lookup_each(env):
    """`read_counters` of many slots reads the per-CPU array in batches (one syscall per
    8,192 slots): every slot comes back as `read_counter` reads it, including slots past
    the last one written and slots read twice."""
    from fastpath.xdp.layout import COUNTER_SIZE
    from fastpath.xdp.program import BATCH_FROM

    prog: XdpProgram = env["prog"]  # type: ignore[assignment]
    stride = (COUNTER_SIZE + 7) // 8 * 8
    slots = list(range(700, 700 + BATCH_FROM + 44))  # clear of the slots other tests use
    for i in slots[::7]:  # per CPU: packets i, bytes 10 i, last seen ns 1000 i + cpu
        prog.counters.update(i.to_bytes(4, "little"), b"".join(
            struct.pack("=QQQ", i, 10 * i, 1000 * i + cpu).ljust(stride, b"\0")
            for cpu in range(prog.ncpus)))
    batch = prog.read_counters(slots + slots[:5])
    assert sorted(batch) == slots
    assert batch == {i: prog.read_counter(i) for i in slots}
    assert batch[700] == (700 * prog.ncpus, 7000 * prog.ncpus, 700_000 + prog.ncpus - 1)
    assert batch[701] == (0, 0, 0)
    for i in slots:
        prog.reset_counter(i)


def test_each_relay_address_has_its_own_block_and_a_removed_entry_drops(env, net):
    """The stream array: the same port on the other relay address is another entry (none
    here: junk, dropped), a removed entry is zeroed and drops as unknown, and writing it
    again relays again; ports outside the range are not the program's."""
    prog: XdpProgram = env["prog"]  # type: ignore[assignment]
    a, b = net.relay_a, net.relay_b
    assert prog.index((a, 30000)) != prog.index((b, 30000))
    assert prog.index((a, 30099)) - prog.index((a, 30000)) == 99
    to_b_port = frame(CALLER_MAC, RA_MAC, net.caller, net.relay_b, 4000, 30000, PAYLOAD)
    assert _run(env, to_b_port)[0::2] == (XDP_DROP, {"drop_no_destination": 1})
    entry = Entry((a, 30060), (net.caller, 4060), (b, 30062), (net.callee, 5060),
                  100 * _fam(net) + 9)
    prog.put(entry)
    assert _run(env, _in(net, 30060, sport=4060))[0] == XDP_REDIRECT
    assert prog.remove((a, 30060)) is True
    assert prog.remove((a, 30060)) is False  # nothing there any more
    assert prog.seen((a, 30060)) == SEEN_NONE
    assert _run(env, _in(net, 30060, sport=4060))[0::2] == (
        XDP_DROP, {"drop_no_destination": 1})
    prog.put(entry)
    assert _run(env, _in(net, 30060, sport=4060))[0] == XDP_REDIRECT
    prog.remove((a, 30060))
    assert _run(env, _in(net, 30100))[0::2] == (XDP_PASS, {"pass_other": 1})
    with pytest.raises(XdpError, match="outside the relay range"):
        prog.index((a, 30100))
    with pytest.raises(XdpError, match="not one of the relay addresses"):
        prog.index((net.caller, 30000))


def test_configure_refuses_an_array_too_small_for_its_addresses_and_range():
    prog = XdpProgram.load(max_streams=64, max_counters=64, stream_slots=150)
    try:
        prog.configure(30000, 30049, ["198.51.100.1", "198.51.100.65", "198.51.100.1"])
        assert prog.index(("198.51.100.65", 30049)) == 99  # a repeated address: one block
        with pytest.raises(XdpError, match="stream_slots >= 200"):
            prog.configure(30000, 30049, ["198.51.100.1", "198.51.100.65", "2001:db8::1",
                                          "2001:db8::2"])
    finally:
        prog.close()


def test_relay_addresses_beyond_the_inline_ones_are_looked_up_in_the_hash(env):
    """The config entry holds the first 16 IPv4 and 8 IPv6 relay addresses; a relay with
    more finds the rest in `relay_addrs`. An address of either kind relays, an address
    that is neither passes, and the unused (zero) inline slots match nothing."""
    extra4 = [f"198.51.100.{100 + i}" for i in range(INLINE_V4 + 3)]
    extra6 = [f"2001:db8:3::{i + 1:x}" for i in range(INLINE_V6 + 3)]
    prog = XdpProgram.load(max_streams=64, max_counters=64,
                           stream_slots=10 * (len(extra4) + len(extra6) + 1))
    try:
        prog.allow_egress(env["ifindex"])
        prog.allow_egress(env["ifindex_b"])
        prog.configure(30000, 30009, extra4 + extra6)
        cases = []
        for fam, addrs, net in ((4, extra4, NETS[4]), (6, extra6, NETS[6])):
            for n, ip in ((0, addrs[0]), (len(addrs) - 1, addrs[-1])):  # inline, hash
                prog.put(Entry((ip, 30004), (net.caller, 4000), (net.relay_b, 30002),
                               (net.callee, 5000), 10 * fam + n))
                cases.append((net, ip))
        for net, ip in cases:
            data = frame(CALLER_MAC, RA_MAC, net.caller, ip, 4000, 30004, PAYLOAD)
            verdict, out = in_netns(env["ns"], lambda d=data: prog.test_run(d, env["ifindex"]))
            assert verdict == XDP_REDIRECT, ip
            assert out == frame(EA_MAC, CALLEE_MAC, net.relay_b, net.callee, 30002, 5000,
                                PAYLOAD, ttl=63)
        for net, ip in ((NETS[4], extra4[-2]), (NETS[6], extra6[-2])):  # no stream there
            data = frame(CALLER_MAC, RA_MAC, net.caller, ip, 4000, 30004, PAYLOAD)
            assert in_netns(env["ns"], lambda d=data: prog.test_run(d, env["ifindex"]))[0] \
                == XDP_DROP
        for net, ip in ((NETS[4], net4_other := "198.51.100.99"), (NETS[6], "2001:db8:4::1"),
                        (NETS[4], "0.0.0.0"), (NETS[6], "::")):
            data = frame(CALLER_MAC, RA_MAC, net.caller, ip, 4000, 30004, PAYLOAD)
            assert in_netns(env["ns"], lambda d=data: prog.test_run(d, env["ifindex"]))[0] \
                == XDP_PASS, ip
        assert prog.verdict_counts()["pass_other"] == 4
        assert net4_other not in extra4
    finally:
        prog.close()


def test_few_relay_addresses_leave_the_hash_unread(env):
    """With one address per family the config entry says no more are in the hash: an
    address found only there (written behind configure's back) is not the relay's."""
    prog = XdpProgram.load(max_streams=64, max_counters=64, stream_slots=40)
    try:
        prog.allow_egress(env["ifindex"])
        prog.allow_egress(env["ifindex_b"])
        prog.configure(30000, 30009, [NETS[4].relay_a, NETS[6].relay_a])
        prog.relay_addrs.update(addr_key("198.51.100.99"), (0).to_bytes(4, "little"))
        net = NETS[4]
        prog.put(Entry((net.relay_a, 30004), (net.caller, 4000), (net.relay_b, 30002),
                       (net.callee, 5000), 1))
        data = frame(CALLER_MAC, RA_MAC, net.caller, "198.51.100.99", 4000, 30004, PAYLOAD)
        assert in_netns(env["ns"], lambda: prog.test_run(data, env["ifindex"]))[0] == XDP_PASS
        data = frame(CALLER_MAC, RA_MAC, net.caller, net.relay_a, 4000, 30004, PAYLOAD)
        assert in_netns(env["ns"], lambda: prog.test_run(data, env["ifindex"]))[0] \
            == XDP_REDIRECT
    finally:
        prog.close()
