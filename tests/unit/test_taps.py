"""fastpath.kernel.taps without a kernel: the BPF filter and the drop-rule text refuse bad
input (the tap and the rules in a namespace: tests/netns/test_packet_io.py)."""

from __future__ import annotations

import struct

import pytest

from fastpath.kernel.taps import build_filter, drop_rules
from fastpath.packet import PacketIoError

TABLE = "lrkpkt"
LO, HI = 30000, 30099


def test_filter_and_rule_text_validation():
    prog = build_filter(LO, HI, ["198.51.100.1", "2001:db8:1::1"])
    assert len(prog) % 8 == 0
    assert struct.unpack_from("=HBBI", prog, len(prog) - 8) == (0x06, 0, 0, 0)  # ret #0
    assert len(build_filter(LO, HI)) < len(prog)
    for args in ((0, 10), (10, 5), (1, 70000)):
        with pytest.raises(PacketIoError):
            build_filter(*args)
    with pytest.raises(PacketIoError):
        build_filter(LO, HI, ["not-an-ip"])
    with pytest.raises(PacketIoError):
        build_filter(LO, HI, [f"198.51.100.{i}" for i in range(40)])
    with pytest.raises(PacketIoError):
        drop_rules(TABLE, LO, HI, [])
    with pytest.raises(PacketIoError):
        drop_rules("bad table;", LO, HI, ["198.51.100.1"])
    with pytest.raises(PacketIoError):
        drop_rules(TABLE, LO, HI, ["198.51.100.1"], ifnames=['x" drop'])
    text = drop_rules(TABLE, LO, LO, ["2001:db8:1::1"])
    assert "udp dport 30000 " in text and "ip daddr" not in text


# --- the filter run on packets: a classic BPF interpreter of the opcodes build_filter uses

HOST, OTHERHOST = 0, 3


def _run(prog: bytes, pkt: bytes, proto: int, pkttype: int = HOST) -> int:
    """Execute `prog` on an L3 packet as the kernel would (return value: bytes kept)."""
    insns = [struct.unpack_from("=HBBI", prog, off) for off in range(0, len(prog), 8)]
    assert len(insns) <= 4096  # BPF_MAXINSNS
    a = x = 0
    mem = [0] * 16
    pc = 0
    while True:
        code, jt, jf, k = insns[pc]
        pc += 1
        cls = code & 0x07
        if cls in (0x00, 0x01):  # LD, LDX
            size, mode = code & 0x18, code & 0xE0
            if mode == 0x60:  # MEM
                val = mem[k]
            elif mode == 0xA0:  # MSH: X = 4 * (pkt[k] & 0xf)
                val = 4 * (pkt[k] & 0x0F)
            else:
                off = k if mode == 0x20 else x + k
                if off >= 0xFFFFF000:  # SKF_AD_OFF + n
                    val = {0: proto, 4: pkttype}[off - 0xFFFFF000]
                else:
                    n = {0x00: 4, 0x08: 2, 0x10: 1}[size]
                    if off + n > len(pkt):
                        return 0
                    val = int.from_bytes(pkt[off:off + n], "big")
            if cls == 0x00:
                a = val
            else:
                x = val
        elif cls == 0x02:  # ST
            mem[k] = a
        elif cls == 0x05:  # JMP
            op = code & 0xF0
            if op == 0x00:
                pc += k
                continue
            hit = {0x10: a == k, 0x20: a > k, 0x30: a >= k, 0x40: bool(a & k)}[op]
            pc += jt if hit else jf
        elif cls == 0x06:  # RET
            return k
        else:
            raise AssertionError(f"opcode {code:#x} not expected")


def _udp4(dst: str, dport: int, frag: int = 0, proto: int = 17) -> bytes:
    import ipaddress

    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 28, 0, frag, 64, proto, 0,
                     ipaddress.ip_address("198.51.100.10").packed,
                     ipaddress.ip_address(dst).packed)
    return ip + struct.pack("!HHHH", 4000, dport, 8, 0)


def _udp6(dst: str, dport: int, nh: int = 17) -> bytes:
    import ipaddress

    ip = struct.pack("!IHBB16s16s", 6 << 28, 8, nh, 64,
                     ipaddress.ip_address("2001:db8::10").packed,
                     ipaddress.ip_address(dst).packed)
    return ip + struct.pack("!HHHH", 4000, dport, 8, 0)


V4, V6 = 0x0800, 0x86DD
PEERS = [("198.51.100.100", 20000, 20099), ("2001:db8::100", 21000, 21000),
         ("198.51.100.101", 22000, 22009)]


@pytest.mark.parametrize("dst_ips", [(), ("198.51.100.1", "2001:db8:1::1")],
                         ids=["any_address", "own_addresses"])
def test_filter_accepts_the_own_range_and_each_peer_pair_only(dst_ips):
    prog = build_filter(LO, HI, dst_ips, PEERS)
    ok4, ok6 = ("198.51.100.1", "2001:db8:1::1")
    run = _run
    # the own range (any address, or the listed ones)
    assert run(prog, _udp4(ok4, LO), V4) and run(prog, _udp4(ok4, HI), V4)
    assert run(prog, _udp6(ok6, LO), V6) and run(prog, _udp6(ok6, HI), V6)
    assert not run(prog, _udp4(ok4, LO - 1), V4) and not run(prog, _udp4(ok4, HI + 1), V4)
    assert bool(run(prog, _udp4("198.51.100.2", LO), V4)) == (not dst_ips)
    assert bool(run(prog, _udp6("2001:db8:1::2", LO), V6)) == (not dst_ips)
    # each peer pair: its address with its range, nothing crossed
    assert run(prog, _udp4("198.51.100.100", 20000), V4)
    assert run(prog, _udp4("198.51.100.100", 20099), V4)
    assert not run(prog, _udp4("198.51.100.100", 20100), V4)
    assert not run(prog, _udp4("198.51.100.100", 19999), V4)
    assert not run(prog, _udp4("198.51.100.100", 22000), V4)  # the other peer's range
    assert run(prog, _udp4("198.51.100.101", 22005), V4)
    assert not run(prog, _udp4("198.51.100.102", 20000), V4)  # not a peer address
    assert run(prog, _udp6("2001:db8::100", 21000), V6)
    assert not run(prog, _udp6("2001:db8::100", 21001), V6)
    assert not run(prog, _udp6("2001:db8::101", 21000), V6)
    assert not run(prog, _udp6("2001:db8::100", 20000), V6)  # the v4 peer's range
    # never: fragments, not UDP, IPv6 extension headers, not for this host, other protocols
    assert not run(prog, _udp4("198.51.100.100", 20000, frag=0x2000), V4)
    assert not run(prog, _udp4("198.51.100.100", 20000, proto=6), V4)
    assert not run(prog, _udp6("2001:db8::100", 21000, nh=0), V6)
    assert not run(prog, _udp4("198.51.100.100", 20000), V4, pkttype=OTHERHOST)
    assert not run(prog, _udp4("198.51.100.100", 20000), 0x0806)


def test_filter_without_peers_is_unchanged_in_behaviour_and_many_peers_fit():
    prog = build_filter(LO, HI)
    assert _run(prog, _udp4("198.51.100.100", LO), V4)
    assert not _run(prog, _udp4("198.51.100.100", 20000), V4)
    # the most pairs and addresses: every jump still within 8 bits (local returns)
    many = [(f"198.51.100.{i}", 20000 + 10 * i, 20000 + 10 * i + 9) for i in range(32)] + \
        [(f"2001:db8::{i:x}", 40000 + 10 * i, 40000 + 10 * i + 9) for i in range(32)]
    prog = build_filter(LO, HI, [f"198.51.100.{200 + i}" for i in range(32)]
                        + [f"2001:db8:1::{i:x}" for i in range(32)], many)
    assert _run(prog, _udp4("198.51.100.31", 20319), V4)
    assert not _run(prog, _udp4("198.51.100.31", 20320), V4)
    assert _run(prog, _udp6("2001:db8::1f", 40310), V6)
    assert _run(prog, _udp4("198.51.100.231", LO), V4)
    assert _run(prog, _udp6("2001:db8:1::1f", HI), V6)
    assert not _run(prog, _udp6("2001:db8:1::20", HI), V6)
    with pytest.raises(PacketIoError):
        build_filter(LO, HI, (), many + [("198.51.100.1", 1, 2)])
    with pytest.raises(PacketIoError):
        build_filter(LO, HI, (), [("198.51.100.1", 5, 2)])
    with pytest.raises(PacketIoError):
        build_filter(LO, HI, (), [("198.51.100.1", 5)])


def test_drop_rules_cover_each_peer_pair():
    text = drop_rules(TABLE, LO, HI, ["198.51.100.22"], ifnames=["e0"], extra=PEERS)
    assert 'iifname { "e0" } ip daddr 198.51.100.100 udp dport 20000-20099 counter' in text
    assert 'iifname { "e0" } ip6 daddr 2001:db8::100 udp dport 21000 counter' in text
    assert "ip saddr 198.51.100.101 udp sport 22000-22009 notrack" in text
    assert "ip daddr { 198.51.100.22 } udp dport 30000-30099" in text
