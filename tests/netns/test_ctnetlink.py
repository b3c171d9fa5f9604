"""Conntrack flush by mark over ctnetlink, inside the relay's namespace."""

from __future__ import annotations

import socket

import pytest

from fastpath.ctnetlink import NETLINK_NETFILTER, ConntrackSocket, flush_by_mark, parse_acks
from lrk.sim.netns import run, socket_in

pytestmark = pytest.mark.netns


def _flows(ns: str) -> list:
    out = run("conntrack", "-L", ns=ns, check=False).stdout
    return [line for line in out.splitlines() if line.startswith("udp")]


def test_flush_removes_only_the_flows_of_the_given_marks(topo):
    ns = topo.relay.ns
    for mark, sport in ((30000, 1111), (30000, 1112), (30002, 2222), (999, 3333)):
        run("conntrack", "-I", "-p", "udp", "-s", topo.caller.ip4, "-d", topo.relay.ip4,
            "--sport", str(sport), "--dport", "30000", "--timeout", "60", "--mark", str(mark),
            ns=ns)
    assert len(_flows(ns)) == 4
    ct = ConntrackSocket(socket_in(ns, socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER))
    try:
        assert ct.flush_marks([30000, 30002, 30004]) == 3
    finally:
        ct.close()
    left = _flows(ns)
    assert len(left) == 1 and "mark=999" in left[0]


def test_message_layout_and_ack_parsing():
    msg = flush_by_mark(0x7531, seq=9)
    assert len(msg) == 16 + 4 + 8 + 8
    assert msg[4:6] == (0x102).to_bytes(2, "little")  # CTNETLINK << 8 | CT_DELETE
    assert msg[-12:-8] == (0x7531).to_bytes(4, "big")  # CTA_MARK value, network order
    ack = (36).to_bytes(4, "little") + (2).to_bytes(2, "little") + b"\0\0" + \
        (9).to_bytes(4, "little") + b"\0" * 4 + (-2).to_bytes(4, "little", signed=True) + \
        b"\0" * 16
    assert parse_acks(ack) == [(9, 2)]
    assert parse_acks(b"\x01\x02") == []  # truncated input is ignored, not an error
