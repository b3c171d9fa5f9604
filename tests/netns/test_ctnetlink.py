"""Conntrack flush by mark and flow dumps over ctnetlink, inside the relay's namespace."""

from __future__ import annotations

import os
import socket

import pytest

from bench.netns import run, socket_in
from fastpath.kernel.ctnetlink import ConntrackError, ConntrackSocket, mark_filters
from fastpath.kernel.netlink import NETLINK_NETFILTER

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


def _insert(ns: str, src: str, dst: str, sport: int, dport: int, mark: int) -> None:
    run("conntrack", "-I", "-p", "udp", "-s", src, "-d", dst, "--sport", str(sport),
        "--dport", str(dport), "--timeout", "60", "--mark", str(mark), ns=ns)


def test_dump_by_mark_returns_each_flows_original_source(topo):
    ns = topo.relay.ns
    c4, r4, c6, r6 = topo.caller.ip4, topo.relay.ip4, topo.caller.ip6, topo.relay.ip6
    _insert(ns, c4, r4, 4444, 30000, 30000)
    _insert(ns, c4, r4, 4445, 30001, 30001)
    _insert(ns, c6, r6, 6666, 30002, 30002)
    _insert(ns, c4, r4, 7777, 30003, 0)  # not lrk's: unmarked
    _insert(ns, c4, r4, 8888, 30004, 50000)  # a mark outside lrk's range
    ct = ConntrackSocket(socket_in(ns, socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER))
    try:
        filters = mark_filters(30000, 30099)
        got = sorted(ct.flows(filters))
        assert [f[:6] for f in got] == [(30000, 17, c4, 4444, r4, 30000),
                                        (30001, 17, c4, 4445, r4, 30001),
                                        (30002, 17, c6, 6666, r6, 30002)]
        everything = ct.flows()  # unfiltered: the kernel sends all five
        assert sorted(f.mark for f in everything) == [0, 30000, 30001, 30002, 50000]
        ipv6 = ct.flows(filters, family=socket.AF_INET6)
        assert [f.src for f in ipv6] == [c6]
        with pytest.raises(ConntrackError, match="max_flows"):
            ct.flows(filters, max_flows=2)
    finally:
        ct.close()


def test_dump_spans_many_messages(topo):
    """More flows than one netlink read carries: the dump continues until NLMSG_DONE."""
    ns = topo.relay.ns
    lines = "".join(f"-I -p udp -s {topo.caller.ip4} -d {topo.relay.ip4} --sport {10000 + i} "
                    f"--dport 30010 --timeout 60 --mark 30010\n" for i in range(400))
    path = f"/tmp/{ns}-ct.txt"
    with open(path, "w") as fh:
        fh.write(lines)
    try:
        run("conntrack", "-R", path, ns=ns)
    finally:
        os.unlink(path)
    ct = ConntrackSocket(socket_in(ns, socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER))
    try:
        got = ct.flows(mark_filters(30000, 30099))
    finally:
        ct.close()
    assert sorted(f.sport for f in got) == list(range(10000, 10400))
