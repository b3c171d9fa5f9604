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
