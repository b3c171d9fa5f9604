"""fastpath.kernel.nfqueue_socket against a kernel (root only): bind, config, verdicts.

Each test builds two network namespaces joined by a veth pair, 198.51.100.1/2001:db8::1
(sender, ``lrk-t<pid>-q<n>a``) and 198.51.100.2/2001:db8::2 (receiver, ``...b``), loads an
nftables table in the receiver's namespace only and reads its queue with
NfQueue(netns=...): the netlink and UDP sockets are created on threads that setns() into
the namespace, so the test process itself never leaves the root namespace (works on PyPy
and CPython).  This kernel has no nft ``queue`` expression (CONFIG_NFT_QUEUE unset), so
the queue rule is the xtables NFQUEUE target via nft_compat
(fastpath.kernel.nfqueue.build_nft_queue_rule).  Namespaces are deleted in finalizers, also
on failure, and asserted gone; the root ruleset is checked to be unchanged.

Nothing here waits for silence.  A verdict is handled before the netlink send returns (an
accepted packet is in the receiving socket by then, a dropped one gone), and what happens
without a reader is observed through the kernel's counters (rule counters, the queue's
/proc row, the conntrack count), so "nothing arrived" is checked once those moved.  The
codec (no kernel): tests/unit/test_nfqueue.py.
"""

from __future__ import annotations

import os
import re
import select
import socket
import struct
import subprocess
import threading
import time
from typing import Callable, Dict, List, Optional, Tuple

import pytest

from bench.frames import inet_checksum
from bench.netns import PREFIX, list_namespaces
from fastpath.kernel import nfqueue as nfq
from fastpath.kernel.nfqueue import (
    NF_ACCEPT,
    NF_DROP,
    NF_REPEAT,
    NF_STOP,
    NFPROTO_INET,
    NfQueueError,
    QueuedPacket,
    build_config,
    build_maxlen,
    build_unbind,
    build_verdict,
    parse_attrs,
    queue_verdict,
)
from fastpath.kernel.nfqueue_socket import NfQueue, add_queue_rule, call_in_netns
from fastpath.packet import parse_udp

from .throwaway import Namespaces

pytestmark = pytest.mark.netns

WAIT = 3.0  # deadline of every wait for something that must happen
PORT = 40000  # queue 7, the reader under test
PORT_BYPASS = 40001  # queue 8 bypass, never read
PORT_NOBYPASS = 40002  # queue 9, never read
PORT_REPEAT = 40003  # queue 7 only while the mark is 0
A4, B4, A6, B6 = "198.51.100.1", "198.51.100.2", "2001:db8::1", "2001:db8::2"
CFG = 0x0302  # NFNL_SUBSYS_QUEUE << 8 | NFQNL_MSG_CONFIG
REQ_ACK = 0x5  # NLM_F_REQUEST | NLM_F_ACK

RULES = f"""
add table inet lrkq
delete table inet lrkq
table inet lrkq {{
  chain pre {{
    type filter hook prerouting priority -150; policy accept;
    ct state new counter
    udp dport {PORT} counter jump q7
    udp dport {PORT_BYPASS} counter jump q8
    udp dport {PORT_NOBYPASS} counter jump q9
    udp dport {PORT_REPEAT} counter
    udp dport {PORT_REPEAT} meta mark 0 jump q7
  }}
  chain q7 {{
  }}
  chain q8 {{
  }}
  chain q9 {{
  }}
  chain later {{
    type filter hook prerouting priority -100; policy accept;
    meta mark 0x2a counter
  }}
}}
"""

# -- hand-made messages (host order; the layouts are checked in tests/unit/test_nfqueue.py)


def nlh(length: int, mtype: int, flags: int, seq: int, pid: int = 0) -> bytes:
    return struct.pack("=IHHII", length, mtype, flags, seq, pid)


def nla(atype: int, data: bytes) -> bytes:
    n = 4 + len(data)
    return struct.pack("=HH", n, atype) + data + b"\0" * ((4 - n % 4) % 4)


def be32(v: int) -> bytes:
    return v.to_bytes(4, "big")


def msg(mtype: int, flags: int, seq: int, family: int, res_id: int, attrs: bytes) -> bytes:
    return (nlh(20 + len(attrs), mtype, flags, seq) + bytes([family, 0])
            + res_id.to_bytes(2, "big") + attrs)


def ipv4_udp(src: str, sport: int, dst: str, dport: int, data: bytes) -> bytes:
    """IPv4 + UDP without a checksum (0: none)."""
    total = 20 + 8 + len(data)
    hdr = struct.pack("!BBHHHBBH4s4s", 0x45, 0, total, 0x1234, 0, 64, 17, 0,
                      socket.inet_aton(src), socket.inet_aton(dst))
    hdr = hdr[:10] + struct.pack("!H", inet_checksum(hdr)) + hdr[12:]
    return hdr + struct.pack("!HHHH", sport, dport, 8 + len(data), 0) + data


def ipv6_udp(src: str, sport: int, dst: str, dport: int, data: bytes) -> bytes:
    """IPv6 + UDP with its (mandatory) checksum."""
    s6, d6 = socket.inet_pton(socket.AF_INET6, src), socket.inet_pton(socket.AF_INET6, dst)
    ulen = 8 + len(data)
    pseudo = s6 + d6 + struct.pack("!IxxxB", ulen, 17)
    udp = struct.pack("!HHHH", sport, dport, ulen, 0) + data
    csum = inet_checksum(pseudo + udp) or 0xFFFF
    udp = udp[:6] + struct.pack("!H", csum) + udp[8:]
    return struct.pack("!IHBB", 0x60000000, ulen, 17, 64) + s6 + d6 + udp


# -- the lab ------------------------------------------------------------------------------


def sh(*argv: str, check: bool = True, stdin: Optional[str] = None) -> str:
    proc = subprocess.run(argv, input=stdin, capture_output=True, text=True, timeout=20,
                          check=False)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(argv)} failed ({proc.returncode}): {proc.stderr}")
    return proc.stdout


def wait_until(predicate: Callable[[], bool], what: str, timeout: float = WAIT) -> None:
    """Poll an observable until `predicate()` holds; fail at the deadline."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout} s")
        time.sleep(0.01)


class Lab:
    """Sender namespace `a` and queue/receiver namespace `b` joined by a veth pair."""

    def __init__(self) -> None:
        self.spaces = Namespaces("q")
        self.socks: List[socket.socket] = []

    def create(self) -> Lab:
        self.a = a = self.spaces.make("a")
        self.b = b = self.spaces.make("b")
        sh("ip", "-n", a, "link", "add", "lrkqa", "type", "veth", "peer", "name", "lrkqb",
           "netns", b)
        for ns, dev, v4, v6 in ((a, "lrkqa", A4, A6), (b, "lrkqb", B4, B6)):
            sh("ip", "-n", ns, "addr", "add", f"{v4}/24", "dev", dev)
            sh("ip", "-n", ns, "-6", "addr", "add", f"{v6}/64", "dev", dev, "nodad")
            sh("ip", "-n", ns, "link", "set", dev, "up")
        # (PyPy 3.9 has no socket.if_nametoindex)
        self.ifindex_b = int(sh("ip", "-n", b, "-o", "link", "show", "lrkqb").split(":")[0])
        return self

    def destroy(self) -> None:
        for s in self.socks:
            s.close()
        self.spaces.destroy()  # asserts that neither namespace is left

    def load_rules(self) -> None:
        sh("ip", "netns", "exec", self.b, "nft", "-f", "-", stdin=RULES)
        add_queue_rule(NFPROTO_INET, "lrkq", "q7", 7, netns=self.b)
        add_queue_rule(NFPROTO_INET, "lrkq", "q8", 8, bypass=True, netns=self.b)
        add_queue_rule(NFPROTO_INET, "lrkq", "q9", 9, netns=self.b)

    def counters(self, chain: str) -> List[int]:
        """Packet counts of the `counter` statements of chain `chain`, in rule order."""
        out = sh("ip", "netns", "exec", self.b, "nft", "list", "chain", "inet", "lrkq", chain)
        return [int(x) for x in re.findall(r"counter packets (\d+)", out)]

    def port_counter(self, port: int) -> int:
        """Packets that reached the first counted rule for `port` in chain `pre`."""
        out = sh("ip", "netns", "exec", self.b, "nft", "list", "chain", "inet", "lrkq", "pre")
        found = re.search(rf"udp dport {port} counter packets (\d+)", out)
        assert found, out
        return int(found.group(1))

    def conntrack_count(self) -> int:
        """Conntrack entries of `b`, the unconfirmed ones of queued packets included."""
        return int(sh("ip", "netns", "exec", self.b, "cat",
                      "/proc/sys/net/netfilter/nf_conntrack_count"))

    def udp(self, ns: str, family: int = socket.AF_INET, bind: Optional[Tuple] = None
            ) -> socket.socket:
        def make() -> socket.socket:
            s = socket.socket(family, socket.SOCK_DGRAM)
            s.setsockopt(socket.SOL_SOCKET, getattr(socket, "SO_RCVBUFFORCE", 33), 4 << 20)
            if bind:
                s.bind(bind)
            s.setblocking(False)
            return s

        s = call_in_netns(ns, make)
        self.socks.append(s)
        return s

    def queue(self, num: int = 7, **kw) -> NfQueue:
        q = NfQueue(num, netns=self.b, **kw)
        q.bind()
        self.socks.append(q)  # type: ignore[arg-type]  # closed (and unbound) at teardown
        return q

    def kernel_stats(self, q: NfQueue) -> Dict[str, int]:
        """The queue's row of /proc/net/netfilter/nfnetlink_queue, read inside `b`."""
        stats = call_in_netns(self.b, q.kernel_stats)
        assert stats is not None, f"queue {q.queue_num} not in {self.b}'s nfnetlink_queue"
        return stats


def _ours() -> List[str]:
    return [n for n in list_namespaces() if n.startswith(f"{PREFIX}{os.getpid()}-q")]


@pytest.fixture(scope="module")
def root_state():
    """The root namespace's ruleset, asserted unchanged at the end, and no lab left."""
    before = sh("nft", "list", "ruleset")
    yield
    assert sh("nft", "list", "ruleset") == before, "the root ruleset changed"
    assert _ours() == []


@pytest.fixture
def lab(root_state):
    lab = Lab()
    try:
        lab.create()
        lab.load_rules()
        yield lab
    finally:
        lab.destroy()


@pytest.fixture
def net(lab):
    """(lab, sender v4, receiver v4, sender v6, receiver v6) for port PORT."""
    return (lab, lab.udp(lab.a), lab.udp(lab.b, bind=(B4, PORT)),
            lab.udp(lab.a, socket.AF_INET6), lab.udp(lab.b, socket.AF_INET6, bind=(B6, PORT)))


def send(sock: socket.socket, dst: Tuple, payloads: List[bytes]) -> None:
    for p in payloads:
        sock.sendto(p, dst)


def collect(q: NfQueue, n: int, timeout: float = WAIT) -> List[QueuedPacket]:
    got: List[QueuedPacket] = []
    deadline = time.monotonic() + timeout
    for _ in range(10_000):
        left = deadline - time.monotonic()
        if len(got) >= n or left <= 0:
            break
        got.extend(q.receive_batch(n - len(got), timeout=left))
    return got


def drain(sock: socket.socket, n: int, timeout: float = WAIT) -> List[bytes]:
    """The `n` datagrams expected on `sock` (waited for until `timeout`), and whatever else
    is queued there by then.  Callers know that delivery is over when they call this (a
    verdict was handled, or a counter showed the packets were): `drain(sock, 0)` checks
    that nothing arrived without waiting for anything."""
    out: List[bytes] = []
    poller = select.poll()
    poller.register(sock.fileno(), select.POLLIN)
    deadline = time.monotonic() + timeout
    for _ in range(100_000):
        try:
            out.append(sock.recv(65535))
            continue
        except BlockingIOError:
            pass
        left = deadline - time.monotonic()
        if len(out) >= n or left <= 0:
            break
        poller.poll(max(1, int(left * 1000)))
    return out


def payloads(tag: str, n: int) -> List[bytes]:
    return [f"{tag}-{i}".encode() for i in range(n)]


def test_call_in_netns_leaves_the_caller_in_place(lab):
    mine = os.readlink("/proc/thread-self/ns/net")
    theirs = call_in_netns(lab.b, lambda: os.readlink("/proc/thread-self/ns/net"))
    assert theirs != mine and os.readlink("/proc/thread-self/ns/net") == mine
    with pytest.raises(NfQueueError, match="ip netns add"):
        call_in_netns("lrk-q-no-such-namespace", lambda: None)
    with pytest.raises(ZeroDivisionError):
        call_in_netns(lab.b, lambda: 1 // 0)


def test_bind_config_errors_and_release(lab):
    q = lab.queue(7)
    assert lab.kernel_stats(q) == {
        "queue_total": 0, "copy_mode": 2, "copy_range": 256, "queue_dropped": 0,
        "user_dropped": 0, "id_sequence": 0}
    with pytest.raises(NfQueueError) as info:  # same socket, second BIND
        q.bind()
    assert info.value.errno_name == "EBUSY"
    other = NfQueue(7, netns=lab.b)
    try:
        with pytest.raises(NfQueueError) as info:  # another socket: the kernel says EPERM
            other.bind()
        assert info.value.errno_name == "EPERM" and "another" in str(info.value)
        # PF_BIND / PF_UNBIND are accepted no-ops on modern kernels
        q.request(build_config(7, command=nfq.NFQNL_CFG_CMD_PF_BIND, pf=socket.AF_INET,
                               seq=q.next_seq()), "pf bind")
        q.request(build_config(7, command=nfq.NFQNL_CFG_CMD_PF_UNBIND, pf=socket.AF_INET,
                               seq=q.next_seq()), "pf unbind")
        # flags the kernel does not know, and flags without a mask (built by hand)
        with pytest.raises(NfQueueError) as info:
            q.request(msg(CFG, REQ_ACK, q.next_seq(), 0, 7, nla(4, be32(32)) + nla(5, be32(32))),
                      "flags")
        assert info.value.errno_name == "EOPNOTSUPP" and "flag unknown" in str(info.value)
        with pytest.raises(NfQueueError) as info:
            q.request(msg(CFG, REQ_ACK, q.next_seq(), 0, 7, nla(5, be32(1))), "flags")
        assert info.value.errno_name == "EINVAL"
        with pytest.raises(NfQueueError) as info:
            q.verdict(12345, NF_ACCEPT, wait=True)
        assert info.value.errno_name == "ENOENT"
        with pytest.raises(NfQueueError) as info:
            other.verdict(1, NF_ACCEPT, wait=True)  # queue owned by q
        assert info.value.errno_name == "EPERM"
        q.close()
        assert q.sock.fileno() < 0
        q.close()  # idempotent
        other.bind()  # released: the queue is free again
        with pytest.raises(NfQueueError) as info:
            other.request(build_unbind(99, seq=other.next_seq()), "unbind")
        assert info.value.errno_name == "ENODEV"
        with pytest.raises(NfQueueError) as info:
            other.request(build_verdict(99, 1, NF_ACCEPT, seq=other.next_seq(), ack=True), "v")
        assert info.value.errno_name == "ENODEV"
    finally:
        other.close()
    with pytest.raises(NfQueueError) as info:
        add_queue_rule(NFPROTO_INET, "lrkq", "no-such-chain", 7, netns=lab.b)
    assert info.value.errno_name == "ENOENT" and "create them" in str(info.value)


@pytest.mark.parametrize("v6", [False, True], ids=["v4", "v6"])
def test_receive_accept_and_drop(net, v6):
    lab, tx4, rx4, tx6, rx6 = net
    tx, rx, src, dst = (tx6, rx6, A6, B6) if v6 else (tx4, rx4, A4, B4)
    q = lab.queue(7)
    data = payloads("pkt", 6)
    send(tx, (dst, PORT), data)
    got = collect(q, 6)
    assert [p.payload[-len(d):] for p, d in zip(got, data)] == data
    ids = [p.packet_id for p in got]
    assert ids == sorted(ids) and len(set(ids)) == 6
    for p, d in zip(got, data):
        info = parse_udp(p.payload)
        assert info is not None
        family, sip, sport, dip, dport, off = info
        assert (family, sip, dip, dport) == (socket.AF_INET6 if v6 else socket.AF_INET,
                                             src, dst, PORT)
        assert sport == tx.getsockname()[1] and p.payload[off:] == d
        assert p.hook == 0 and p.queue_num == 7 and p.indev == lab.ifindex_b
        assert p.hw_protocol == (0x86DD if v6 else 0x0800) and p.cap_len is None
    for i, p in enumerate(got):
        q.verdict(p.packet_id, NF_ACCEPT if i % 2 == 0 else NF_DROP)
    assert sorted(drain(rx, 3)) == sorted(data[0::2])
    assert q.receive_batch(10) == [] and q.stats()["verdict_errors"] == {}


def test_verdicts_in_one_datagram_apply_each_in_order(net):
    """`verdicts`: many packets' verdicts in one send, each applied, in the order given
    (the plane re-injects a batch with it); an unknown id among them costs only itself."""
    lab, tx, rx, _, _ = net
    q = lab.queue(7)
    data = payloads("one", 5)
    send(tx, (B4, PORT), data)
    got = collect(q, 5)
    q.verdicts([(got[0].packet_id, NF_ACCEPT), (got[1].packet_id, NF_DROP),
                (99999, NF_ACCEPT), (got[2].packet_id, NF_ACCEPT),
                (got[3].packet_id, NF_ACCEPT), (got[4].packet_id, NF_DROP)])
    assert drain(rx, 3) == [data[0], data[2], data[3]]
    assert q.receive_batch(10) == []
    assert q.stats()["verdict_errors"] == {"ENOENT": 1}
    q.verdicts([])  # nothing to send: no datagram, no error
    assert q.stats()["verdict_errors"] == {"ENOENT": 1}


def test_batch_verdict_covers_ids_up_to_n(net):
    lab, tx, rx, _, _ = net
    q = lab.queue(7)
    data = payloads("batch", 10)
    send(tx, (B4, PORT), data)
    got = collect(q, 10)
    assert len(got) == 10
    q.verdict_batch(got[4].packet_id, NF_ACCEPT)  # the first five
    assert sorted(drain(rx, 5)) == sorted(data[:5])
    q.verdict_batch(got[-1].packet_id, NF_DROP, wait=True)  # the rest
    assert drain(rx, 0) == []
    with pytest.raises(NfQueueError) as info:
        q.verdict_batch(got[-1].packet_id, NF_ACCEPT, wait=True)  # nothing left
    assert info.value.errno_name == "ENOENT"
    # fire-and-forget errors show up in the counters once read
    q.verdict(got[0].packet_id, NF_ACCEPT)
    q.verdict_batch(got[0].packet_id, NF_ACCEPT)
    stray: List[QueuedPacket] = []

    def both_answers_read() -> bool:
        stray.extend(q.receive_batch(10))
        return q.verdict_errors.get("ENOENT", 0) >= 2

    wait_until(both_answers_read, "both error answers read")
    assert stray == [] and q.stats()["verdict_errors"] == {"ENOENT": 2}
    assert q.last_error is not None and q.last_error.errno_name == "ENOENT"


def test_mark_set_by_verdict_seen_by_later_chain(net):
    lab, tx, rx, _, _ = net
    q = lab.queue(7)
    data = payloads("mark", 8)
    send(tx, (B4, PORT), data)
    got = collect(q, 8)
    assert len(got) == 8 and all(p.mark == 0 for p in got)
    for p in got[:3]:
        q.verdict(p.packet_id, NF_ACCEPT, mark=0x2A)
    q.verdict(got[3].packet_id, NF_ACCEPT, mark=0x2B)
    q.verdict(got[4].packet_id, NF_STOP, mark=0x2A)  # STOP skips the later chain
    q.verdict_batch(got[6].packet_id, NF_ACCEPT, mark=0x2A)  # got[5], got[6]
    q.verdict(got[7].packet_id, NF_ACCEPT, wait=True)
    assert sorted(drain(rx, 8)) == sorted(data)
    assert lab.counters("later") == [5]


def test_payload_rewrite(net):
    lab, tx4, rx4, tx6, rx6 = net
    q = lab.queue(7)
    send(tx4, (B4, PORT), [b"original"])
    send(tx6, (B6, PORT), [b"original6"])
    got = collect(q, 2)
    assert len(got) == 2
    for p in got:
        info = parse_udp(p.payload)
        assert info is not None and p.cap_len is None
        family, sip, sport, dip, dport, _ = info
        new = b"rewritten by lrk, and longer"
        if family == socket.AF_INET:  # UDP checksum 0: none (kernel does not fix checksums)
            packet = ipv4_udp(sip, sport, dip, dport, new)
        else:
            packet = ipv6_udp(sip, sport, dip, dport, new + b"6")
        q.verdict(p.packet_id, NF_ACCEPT, payload=packet, wait=True)
    assert drain(rx4, 1) == [b"rewritten by lrk, and longer"]
    assert drain(rx6, 1) == [b"rewritten by lrk, and longer6"]


def test_repeat_requeue_and_queue_verdicts(lab):
    tx = lab.udp(lab.a)
    rx = lab.udp(lab.b, bind=(B4, PORT_REPEAT))
    q = lab.queue(7)
    q11 = lab.queue(11)
    send(tx, (B4, PORT_REPEAT), [b"again"])
    (first,) = collect(q, 1)
    q.verdict(first.packet_id, NF_REPEAT)  # chain runs again, mark still 0: queued again
    (second,) = collect(q, 1)
    assert second.packet_id > first.packet_id and second.payload == first.payload
    q.verdict(second.packet_id, NF_REPEAT, mark=1)  # chain runs again, now not queued
    assert drain(rx, 1) == [b"again"]
    assert lab.port_counter(PORT_REPEAT) == 3  # the rule before the queue rule saw it 3 times
    # NF_QUEUE to another queue, and to an unbound one with and without bypass
    send(tx, (B4, PORT_REPEAT), [b"moved", b"bypassed", b"lost"])
    moved, bypassed, lost = collect(q, 3)
    q.verdict(moved.packet_id, queue_verdict(11))
    (again,) = collect(q11, 1)
    assert again.payload == moved.payload and again.queue_num == 11
    q11.verdict(again.packet_id, NF_ACCEPT)
    q.verdict(bypassed.packet_id, queue_verdict(12, bypass=True))
    q.verdict(lost.packet_id, queue_verdict(13))
    assert sorted(drain(rx, 2)) == [b"bypassed", b"moved"]


def test_bypass_without_reader(lab):
    """No reader bound: `queue ... bypass` lets packets pass, plain `queue` drops them."""
    tx = lab.udp(lab.a)
    rx_bypass = lab.udp(lab.b, bind=(B4, PORT_BYPASS))
    rx_plain = lab.udp(lab.b, bind=(B4, PORT_NOBYPASS))
    n = 50
    send(tx, (B4, PORT_BYPASS), payloads("b", n))
    send(tx, (B4, PORT_NOBYPASS), payloads("p", n))
    passed = len(drain(rx_bypass, n))
    # every packet of the plain rule reached its queue rule (counted just before it)
    wait_until(lambda: lab.port_counter(PORT_NOBYPASS) >= n, "the plain rule's packets")
    dropped = len(drain(rx_plain, 0))
    print(f"no reader: bypass rule delivered {passed}/{n}, plain rule delivered {dropped}/{n}")
    assert (passed, dropped) == (n, 0)
    assert (lab.port_counter(PORT_BYPASS), lab.port_counter(PORT_NOBYPASS)) == (n, n)
    # conntrack: the bypass flow is confirmed; the dropped packets confirmed nothing
    wait_until(lambda: lab.conntrack_count() == 1, "the bypass flow's entry only")
    base = 1

    # a reader that goes away: its waiting packets are dropped, later ones follow the rule.
    # Each waiting packet of a new flow holds an unconfirmed conntrack entry (counted in
    # nf_conntrack_count).  The kernel flushes the queue after an RCU grace period; once
    # the count is back the packets are gone.  Accepted, they would have confirmed their
    # flow on the way to the socket and one entry would stay.
    q = lab.queue(8)
    fresh = lab.udp(lab.a)  # a new flow: its queued packets are not confirmed yet
    send(fresh, (B4, PORT_BYPASS), payloads("w", 3))
    assert len(collect(q, 3)) == 3
    assert lab.conntrack_count() == base + 3
    q.close()
    wait_until(lambda: lab.conntrack_count() == base, "the flushed packets' entries freed")
    assert drain(rx_bypass, 0) == []
    send(tx, (B4, PORT_BYPASS), [b"after"])
    assert drain(rx_bypass, 1) == [b"after"]


@pytest.mark.parametrize("fail_open", [False, True], ids=["drop", "fail-open"])
def test_maxlen_full_queue(net, fail_open):
    lab, tx, rx, _, _ = net
    q = lab.queue(7, maxlen=2, fail_open=fail_open)
    data = payloads("full", 10)
    send(tx, (B4, PORT), data)
    # two wait in the queue; the other 8 are accepted (fail-open) or dropped and counted
    wait_until(lambda: lab.kernel_stats(q)["queue_total"] == 2, "two packets queued")
    if fail_open:
        first = drain(rx, 8)
    else:
        wait_until(lambda: lab.kernel_stats(q)["queue_dropped"] >= 8, "8 drops counted")
        first = drain(rx, 0)
    assert len(first) == (8 if fail_open else 0)
    stats = lab.kernel_stats(q)
    assert stats["queue_total"] == 2 and stats["id_sequence"] == 2
    assert stats["queue_dropped"] == (0 if fail_open else 8)
    got = collect(q, 2)
    assert [p.payload[-6:] for p in got] == [b"full-0", b"full-1"]
    q.verdict_batch(got[-1].packet_id, NF_ACCEPT)
    assert sorted(first + drain(rx, 2)) == sorted(data if fail_open else data[:2])


def test_overload_small_rcvbuf_keeps_reading(net):
    """With NETLINK_NO_ENOBUFS the reader survives a full socket buffer; the kernel counts."""
    lab, tx, rx, _, _ = net
    q = lab.queue(7, rcvbuf=4096)
    assert q.no_enobufs
    send(tx, (B4, PORT), payloads("flood", 40))
    # each packet gets an id, then is queued (delivered to the socket) or, the socket
    # being full, counted as user_dropped
    wait_until(lambda: lab.kernel_stats(q)["id_sequence"] == 40, "all 40 packets handled")
    stats = lab.kernel_stats(q)
    queued = stats["queue_total"]
    assert 0 < queued < 40 and stats["user_dropped"] == 40 - queued
    got = collect(q, queued)
    assert len(got) == queued and q.receive_batch(40) == []
    assert q.enobufs == 0
    q.verdict_batch(got[-1].packet_id, NF_ACCEPT)
    assert len(drain(rx, len(got))) == len(got)
    send(tx, (B4, PORT), [b"still-alive"])
    (p,) = collect(q, 1)
    q.verdict(p.packet_id, NF_ACCEPT)
    assert drain(rx, 1) == [b"still-alive"]


def test_copy_range_truncates(net):
    lab, tx, rx, _, _ = net
    q = lab.queue(7, copy_range=40)
    send(tx, (B4, PORT), [b"x" * 200])
    (p,) = collect(q, 1)
    assert len(p.payload) == 40 and p.cap_len == 228 and p.truncated
    info = parse_udp(p.payload)
    assert info is not None and info[4] == PORT and info[5] == 28
    assert p.ct is None
    q.verdict(p.packet_id, NF_ACCEPT)
    assert drain(rx, 1) == [b"x" * 200]


def test_conntrack_flag(net):
    """NFQA_CT needs CONFIG_NETFILTER_NETLINK_GLUE_CT; without it bind() fails and unbinds."""
    lab, tx, rx, _, _ = net
    q = NfQueue(7, conntrack=True, netns=lab.b)
    try:
        try:
            q.bind()
        except NfQueueError as exc:
            assert exc.errno_name == "EOPNOTSUPP" and "GLUE_CT" in str(exc)
            assert not q.bound
            lab.queue(7).close()  # the failed configure left the queue free
            return
        send(tx, (B4, PORT), [b"tracked"])
        (p,) = collect(q, 1)
        assert p.ct is not None and 1 in parse_attrs(p.ct)  # CTA_TUPLE_ORIG
        assert p.ct_info == 2  # IP_CT_NEW
        q.verdict(p.packet_id, NF_ACCEPT)
        assert drain(rx, 1) == [b"tracked"]
    finally:
        q.close()


def test_blocking_reader_and_pending_during_ack(net):
    lab, tx, rx, _, _ = net
    q = lab.queue(7, blocking=True)
    send(tx, (B4, PORT), payloads("blk", 3))
    wait_until(lambda: lab.kernel_stats(q)["queue_total"] == 3, "3 packets in the socket")
    # an acked request reads the socket: packets it meets are kept for receive_batch
    q.request(build_maxlen(7, 100, seq=q.next_seq()), "maxlen")
    assert q.stats()["pending"] == 3
    got = collect(q, 3)
    assert [p.payload[-5:] for p in got] == payloads("blk", 3)
    q.verdict_batch(got[-1].packet_id, NF_ACCEPT)
    assert len(drain(rx, 3)) == 3
    # a blocking socket waits for the first packet, sent 0.2 s later by another thread
    # (were it lost, a second one after WAIT ends the wait, and the test fails on it)
    sender = threading.Timer(0.2, send, (tx, (B4, PORT), [b"blocking"]))
    rescue = threading.Timer(WAIT, send, (tx, (B4, PORT), [b"rescue"]))
    sender.start()
    rescue.start()
    try:
        assert q.stats()["pending"] == 0  # nothing to return without waiting
        (p,) = q.receive_batch(1)
    finally:
        rescue.cancel()
        sender.join(WAIT)
    assert p.payload.endswith(b"blocking")
    q.verdict(p.packet_id, NF_DROP)
