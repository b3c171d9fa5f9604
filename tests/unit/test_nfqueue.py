"""Tests of fastpath.kernel.nfqueue (codec) and fastpath.kernel.nfqueue_socket (shell).

The codec tests compare against bytes laid out by hand from the uapi structs
(linux/netlink.h, linux/netfilter/nfnetlink.h, nfnetlink_queue.h).

The kernel tests (root only) build two network namespaces joined by a veth
pair, 198.51.100.1/2001:db8::1 (sender, lrk-q<pid>-<n>a) and 198.51.100.2/
2001:db8::2 (receiver, lrk-q<pid>-<n>b), load an nftables table in the
receiver's namespace only and read its queue with NfQueue(netns=...): the
netlink and UDP sockets are created on threads that setns() into the
namespace, so the test process itself never leaves the root namespace (works
on PyPy and CPython).  This kernel has no nft ``queue`` expression
(CONFIG_NFT_QUEUE unset), so the queue rule is the xtables NFQUEUE target via
nft_compat (fastpath.kernel.nfqueue.build_nft_queue_rule).  Namespaces are deleted
in finalizers, also on failure; the root ruleset is checked to be unchanged.
"""

from __future__ import annotations

import errno
import itertools
import os
import random
import re
import select
import shutil
import socket
import struct
import subprocess
import sys
import threading
import time
from typing import List, Optional, Tuple

import pytest

from fastpath.kernel import netlink as nl
from fastpath.kernel import nfqueue as nfq
from fastpath.kernel.nfqueue import (
    NF_ACCEPT,
    NF_DROP,
    NF_REPEAT,
    NF_STOP,
    NFPROTO_INET,
    NetlinkAck,
    NfQueueArgumentError,
    NfQueueDecodeError,
    NfQueueError,
    QueuedPacket,
    build_bind,
    build_config,
    build_flags,
    build_maxlen,
    build_nft_queue_rule,
    build_params,
    build_unbind,
    build_verdict,
    build_verdict_batch,
    error_from_errno,
    parse_attrs,
    parse_messages,
    queue_verdict,
)
from fastpath.kernel.nfqueue_socket import NfQueue, add_queue_rule, call_in_netns
from fastpath.packet import parse_udp

LITTLE = sys.byteorder == "little"
little_only = pytest.mark.skipif(not LITTLE, reason="hex literals are for a little-endian host")

# -- hand-made layouts ------------------------------------------------------------------


def nlh(length: int, mtype: int, flags: int, seq: int, pid: int = 0) -> bytes:
    """struct nlmsghdr, host order."""
    return struct.pack("=IHHII", length, mtype, flags, seq, pid)


def nfgen(family: int, res_id: int) -> bytes:
    """struct nfgenmsg: u8 family, u8 version (0), __be16 res_id."""
    return bytes([family, 0]) + res_id.to_bytes(2, "big")


def nla(atype: int, data: bytes) -> bytes:
    """struct nlattr (host order) + data + padding to 4."""
    n = 4 + len(data)
    return struct.pack("=HH", n, atype) + data + b"\0" * ((4 - n % 4) % 4)


def be32(v: int) -> bytes:
    return v.to_bytes(4, "big")


def msg(mtype: int, flags: int, seq: int, family: int, res_id: int, attrs: bytes) -> bytes:
    return nlh(20 + len(attrs), mtype, flags, seq) + nfgen(family, res_id) + attrs


def ipv4_udp(src: str, sport: int, dst: str, dport: int, data: bytes, *, options: bytes = b"",
             frag: int = 0, proto: int = 17) -> bytes:
    ihl = (20 + len(options)) // 4
    total = ihl * 4 + 8 + len(data)
    hdr = struct.pack("!BBHHHBBH4s4s", 0x40 | ihl, 0, total, 0x1234, frag, 64, proto, 0,
                      socket.inet_aton(src), socket.inet_aton(dst)) + options
    hdr = hdr[:10] + struct.pack("!H", inet_checksum(hdr)) + hdr[12:]
    return hdr + struct.pack("!HHHH", sport, dport, 8 + len(data), 0) + data


def inet_checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    s = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


def ipv6_udp(src: str, sport: int, dst: str, dport: int, data: bytes, *,
             ext: Tuple[Tuple[int, bytes], ...] = ()) -> bytes:
    """IPv6 + extension headers ((type, body-after-first-2-bytes), ...) + UDP with checksum."""
    s6, d6 = socket.inet_pton(socket.AF_INET6, src), socket.inet_pton(socket.AF_INET6, dst)
    ulen = 8 + len(data)
    pseudo = s6 + d6 + struct.pack("!IxxxB", ulen, 17)
    udp = struct.pack("!HHHH", sport, dport, ulen, 0) + data
    csum = inet_checksum(pseudo + udp) or 0xFFFF
    udp = udp[:6] + struct.pack("!H", csum) + udp[8:]
    chain = b""
    types = [t for t, _ in ext] + [17]
    for i, (_t, body) in enumerate(ext):
        nxt = types[i + 1]
        if _t == 44:
            chain += bytes([nxt, 0]) + body
        else:
            chain += bytes([nxt, (2 + len(body)) // 8 - 1]) + body
    first = types[0]
    return struct.pack("!IHBB", 0x60000000, len(chain) + ulen, first, 64) + s6 + d6 + chain + udp


# -- codec: building --------------------------------------------------------------------

CFG = 0x0302
VERDICT = 0x0301
BATCH = 0x0303
REQ_ACK = 0x5


def test_message_types_and_constants():
    assert nfq.NFQ_TYPE_PACKET == 0x0300 and nfq.NFQ_TYPE_CONFIG == CFG
    assert nfq.NFQ_TYPE_VERDICT == VERDICT and nfq.NFQ_TYPE_VERDICT_BATCH == BATCH
    assert (nl.NETLINK_NETFILTER, nfq.NFNL_SUBSYS_QUEUE) == (12, 3)
    assert (NF_DROP, NF_ACCEPT, NF_REPEAT, NF_STOP) == (0, 1, 4, 5)
    assert (nfq.NFQA_CFG_F_FAIL_OPEN, nfq.NFQA_CFG_F_CONNTRACK, nfq.NFQA_CFG_F_GSO) == (1, 2, 4)
    assert (nfq.NFQA_PAYLOAD, nfq.NFQA_CT, nfq.NFQA_CAP_LEN, nfq.NFQA_GID) == (10, 11, 13, 17)


def test_bind_unbind_golden():
    cmd = lambda c, pf=0: nla(1, bytes([c, 0]) + pf.to_bytes(2, "big"))  # noqa: E731
    assert build_bind(7, seq=1) == msg(CFG, REQ_ACK, 1, 0, 7, cmd(1))
    assert build_unbind(7, seq=2) == msg(CFG, REQ_ACK, 2, 0, 7, cmd(2))
    assert build_config(0x1234, command=nfq.NFQNL_CFG_CMD_PF_BIND, pf=socket.AF_INET6,
                        seq=9) == msg(CFG, REQ_ACK, 9, 0, 0x1234, cmd(3, 10))
    assert build_config(7, command=1, ack=False)[6:8] == struct.pack("=H", 1)


@little_only
def test_bind_golden_hex():
    assert build_bind(7, seq=1).hex() == (
        "1c000000" "0203" "0500" "01000000" "00000000"  # nlmsghdr (little-endian)
        "00" "00" "0007"  # nfgenmsg: AF_UNSPEC, v0, queue 7 big-endian
        "0800" "0100" "01000000")  # NFQA_CFG_CMD {BIND, pad, pf 0}


def test_params_maxlen_flags_golden():
    params = nla(2, be32(256) + bytes([2]))  # packed nfqnl_msg_config_params, 5 bytes
    assert len(params) == 12
    assert build_params(7, 256, seq=3) == msg(CFG, REQ_ACK, 3, 0, 7, params)
    assert build_maxlen(7, 4096, seq=4) == msg(CFG, REQ_ACK, 4, 0, 7, nla(3, be32(4096)))
    assert build_flags(7, 5, seq=5) == msg(CFG, REQ_ACK, 5, 0, 7, nla(4, be32(5)) + nla(5, be32(5)))
    assert build_flags(7, 4, mask=5, seq=6) == msg(CFG, REQ_ACK, 6, 0, 7,
                                                   nla(4, be32(5)) + nla(5, be32(4)))
    full = build_config(7, command=1, copy_mode=2, copy_range=256, maxlen=10, flags=1, mask=1,
                        seq=8)
    assert full == msg(CFG, REQ_ACK, 8, 0, 7, nla(1, b"\x01\x00\x00\x00") + params
                       + nla(3, be32(10)) + nla(4, be32(1)) + nla(5, be32(1)))


@little_only
def test_params_golden_hex():
    assert build_params(7, 256, seq=3).hex() == (
        "20000000" "0203" "0500" "03000000" "00000000" "00000007"
        "0900" "0200" "00000100" "02" "000000")


def test_verdict_golden():
    vhdr = lambda v, i: nla(2, be32(v) + be32(i))  # noqa: E731
    assert build_verdict(7, 5, NF_ACCEPT, seq=3) == msg(VERDICT, 1, 3, 0, 7, vhdr(1, 5))
    assert build_verdict(7, 5, NF_DROP, mark=0x2A, seq=4) == msg(
        VERDICT, 1, 4, 0, 7, vhdr(0, 5) + nla(3, be32(0x2A)))
    assert build_verdict(7, 0xFFFFFFFF, NF_ACCEPT, payload=b"abcde", seq=5, ack=True) == msg(
        VERDICT, REQ_ACK, 5, 0, 7, vhdr(1, 0xFFFFFFFF) + nla(10, b"abcde"))
    assert build_verdict_batch(7, 99, NF_ACCEPT, seq=6) == msg(BATCH, 1, 6, 0, 7, vhdr(1, 99))
    assert build_verdict_batch(7, 99, NF_DROP, mark=1, seq=7) == msg(
        BATCH, 1, 7, 0, 7, vhdr(0, 99) + nla(3, be32(1)))
    assert build_verdict(7, 1, queue_verdict(11)) == msg(VERDICT, 1, 0, 0, 7, vhdr(0x000B0003, 1))
    assert queue_verdict(12, bypass=True) == 0x000C8003


@little_only
def test_verdict_golden_hex():
    assert build_verdict(7, 5, NF_ACCEPT, mark=0x2A, payload=b"abcde", seq=3).hex() == (
        "34000000" "0103" "0100" "03000000" "00000000" "00000007"
        "0c00" "0200" "00000001" "00000005"  # NFQA_VERDICT_HDR {ACCEPT, id 5}
        "0800" "0300" "0000002a"  # NFQA_MARK
        "0900" "0a00" "6162636465" "000000")  # NFQA_PAYLOAD + pad
    assert build_verdict_batch(7, 9, NF_DROP, seq=1).hex() == (
        "20000000" "0303" "0100" "01000000" "00000000" "00000007"
        "0c00" "0200" "00000000" "00000009")


@pytest.mark.parametrize("call", [
    lambda: build_bind(-1), lambda: build_bind(65536), lambda: build_bind("7"),
    lambda: build_verdict(7, 1, 2), lambda: build_verdict(7, 1, 6),
    lambda: build_verdict(7, 1, 0x0101), lambda: build_verdict(7, -1, 1),
    lambda: build_verdict(7, 1, 1, mark=1 << 32), lambda: build_verdict_batch(7, 1 << 32, 1),
    lambda: build_verdict(7, 1, 1, payload=b"x" * 70000),
    lambda: build_flags(7, nfq.NFQA_CFG_F_MAX), lambda: build_config(7, mask=1),
    lambda: build_params(7, 256, copy_mode=3), lambda: queue_verdict(70000),
    lambda: build_nft_queue_rule(1, "t", "c", 65535, queues_total=2),
])
def test_builders_reject_bad_values(call):
    with pytest.raises(NfQueueArgumentError) as info:
        call()
    assert isinstance(info.value, ValueError) and isinstance(info.value, NfQueueError)
    assert "nfqueue" in str(info.value)


def test_nft_queue_rule_layout():
    data = build_nft_queue_rule(NFPROTO_INET, "lrkq", "q7", 7, bypass=True, seq=10)
    hdrs = []
    off = 0
    while off < len(data):
        length, mtype, flags, seq, _ = struct.unpack_from("=IHHII", data, off)
        hdrs.append((mtype, flags, seq, data[off + 16], int.from_bytes(data[off + 18:off + 20],
                                                                      "big")))
        off += length
    assert hdrs == [(0x10, 1, 10, 0, 10), (0x0A06, 0x0C05, 11, 1, 0), (0x11, 1, 12, 0, 10)]
    rule = parse_attrs(data, 20 + 20, 20 + struct.unpack_from("=I", data, 20)[0])
    assert rule[1] == b"lrkq\0" and rule[2] == b"q7\0"
    elem = parse_attrs(parse_attrs(rule[4])[1])
    assert elem[1] == b"target\0"
    target = parse_attrs(elem[2])
    assert target == {1: b"NFQUEUE\0", 2: be32(3), 3: struct.pack("=HHH", 7, 1, 1) + b"\0\0"}


# -- codec: parsing ---------------------------------------------------------------------

UDP4 = ipv4_udp("198.51.100.1", 5004, "198.51.100.2", 40000, b"\x80\x00\x00\x01rtp-data")


def packet_msg(pid: int, payload: bytes, *, queue: int = 7, extra: bytes = b"",
               seq: int = 0) -> bytes:
    attrs = (nla(1, struct.pack("!IHB", pid, 0x0800, 0))  # NFQA_PACKET_HDR, 7 bytes + pad
             + extra + nla(10, payload))
    return msg(0x0300, 0, seq, socket.AF_INET, queue, attrs)


def error_msg(seq: int, err: int, orig_type: int = CFG, text: Optional[str] = None) -> bytes:
    body = struct.pack("=i", -err) + nlh(24, orig_type, REQ_ACK, seq)
    flags = 0
    if text is not None:
        flags = 0x100 | 0x200  # NLM_F_CAPPED | NLM_F_ACK_TLVS
        body += nla(1, text.encode() + b"\0")
    return nlh(16 + len(body), 2, flags, seq) + body


def test_parse_synthesized_packet_all_attributes():
    ct_nest = nla(8, be32(0x77))  # CTA_MARK inside NFQA_CT
    extra = (nla(3 | nl.NLA_F_NET_BYTEORDER, be32(0x2A))  # NFQA_MARK, flag bit masked off
             + nla(5, be32(3)) + nla(6, be32(4))  # in/out ifindex
             + nla(9, struct.pack("!HH", 6, 0) + b"\x02\x00\x00\x00\x00\x01" + b"\0\0")
             + nla(4, struct.pack("!QQ", 1_700_000_000, 250_000))  # NFQA_TIMESTAMP
             + nla(14, be32(1)) + nla(13, be32(1500))  # SKB_INFO, CAP_LEN
             + nla(11 | nl.NLA_F_NESTED, ct_nest) + nla(12, be32(2))  # CT, CT_INFO
             + nla(16, be32(1000)) + nla(17, be32(1001))  # UID, GID
             + nla(99, b"xyz"))  # unknown: skipped
    buf = packet_msg(0x01020304, UDP4, extra=extra)
    (pkt,) = parse_messages(buf)
    assert isinstance(pkt, QueuedPacket)
    assert (pkt.packet_id, pkt.hw_protocol, pkt.hook, pkt.queue_num) == (0x01020304, 0x0800, 0, 7)
    assert (pkt.mark, pkt.family, pkt.indev, pkt.outdev) == (0x2A, socket.AF_INET, 3, 4)
    assert pkt.payload == UDP4 and isinstance(pkt.payload, bytes)
    assert (pkt.cap_len, pkt.truncated, pkt.skb_info) == (1500, True, 1)
    assert pkt.ct == ct_nest and parse_attrs(pkt.ct) == {8: be32(0x77)} and pkt.ct_info == 2
    assert (pkt.uid, pkt.gid, pkt.timestamp) == (1000, 1001, 1_700_000_000.25)
    assert "id=16909060" in repr(pkt)


def test_parse_minimal_packet_defaults():
    (pkt,) = parse_messages(msg(0x0300, 0, 0, 10, 3, nla(1, struct.pack("!IHB", 9, 0x86DD, 4))))
    assert pkt == QueuedPacket(9, 0x86DD, 4, 0, b"", 3, 10)
    assert pkt.payload == b"" and pkt.mark == 0 and pkt.cap_len is None and not pkt.truncated
    assert pkt.ct is None and pkt.indev is None


def test_parse_stream_of_packets_acks_errors_done():
    buf = (packet_msg(1, UDP4) + error_msg(5, 0) + nlh(20, 3, 2, 0) + b"\0" * 4  # NLMSG_DONE
           + nlh(16, 1, 0, 0)  # NLMSG_NOOP
           + packet_msg(2, UDP4[:-1])  # odd length: padding before the next message
           + error_msg(6, errno.ENOENT, VERDICT)
           + error_msg(7, errno.EINVAL, CFG, text="bad attr")
           + msg(0x0A06, 0, 0, 1, 0, b""))  # another subsystem: skipped
    items = parse_messages(buf)
    assert [type(i).__name__ for i in items] == [
        "QueuedPacket", "NetlinkAck", "QueuedPacket", "NetlinkAck", "NetlinkAck"]
    assert items[1] == NetlinkAck(5, 0, CFG)
    assert items[2].packet_id == 2 and items[2].payload == UDP4[:-1]
    assert items[3] == NetlinkAck(6, errno.ENOENT, VERDICT)
    assert items[4].message == "bad attr"
    exc = items[3].exception()
    assert isinstance(exc, NfQueueError) and exc.errno_name == "ENOENT" and exc.op == "verdict"
    assert "ENOENT" in str(exc) and "already got a verdict" in str(exc)
    assert "bad attr" in str(items[4].exception("configure"))
    # length limits the view; a bytearray or memoryview works the same
    one = packet_msg(1, UDP4)
    assert parse_messages(bytearray(one + b"\xff" * 40), len(one))[0].payload == UDP4
    assert parse_messages(memoryview(one))[0].packet_id == 1
    assert parse_messages(b"") == []


def test_parse_rejects_malformed_with_typed_error():
    good = packet_msg(1, UDP4, extra=nla(3, be32(1)))
    bad = [
        good[:10],  # short header
        nlh(8, 0x0300, 0, 0) + b"\0" * 8,  # nlmsg_len below header size
        nlh(200, 0x0300, 0, 0) + b"\0" * 20,  # claims more than the buffer
        msg(0x0300, 0, 0, 2, 7, nla(3, be32(1))),  # no NFQA_PACKET_HDR
        msg(0x0300, 0, 0, 2, 7, nla(1, b"\0" * 6)),  # short NFQA_PACKET_HDR
        msg(0x0300, 0, 0, 2, 7, struct.pack("=HH", 2, 1) + b"\0" * 8),  # nla_len < 4
        msg(0x0300, 0, 0, 2, 7, struct.pack("=HH", 64, 10) + b"\0" * 8),  # nla past the end
        nlh(16, 0x0300, 0, 0),  # packet without nfgenmsg
        nlh(18, 2, 0, 0) + b"\0\0",  # error without its errno
        good + b"\0" * 7,  # trailing junk shorter than a header
    ]
    for buf in bad:
        with pytest.raises(NfQueueDecodeError):
            parse_messages(buf)


def test_parse_garbage_and_truncations_raise_only_typed_errors():
    rng = random.Random(1234)
    good = (packet_msg(7, UDP4, extra=nla(3, be32(1)) + nla(11 | 0x8000, nla(8, be32(1))))
            + error_msg(3, errno.EPERM, text="nope"))
    outcomes = {"ok": 0, "err": 0}

    def attempt(buf):
        try:
            parse_messages(buf)
            outcomes["ok"] += 1
        except NfQueueDecodeError:
            outcomes["err"] += 1

    for cut in range(len(good) + 1):
        attempt(good[:cut])
    for _ in range(3000):
        if rng.random() < 0.5:
            attempt(bytes(rng.getrandbits(8) for _ in range(rng.randrange(0, 120))))
        else:
            b = bytearray(good)
            for _ in range(rng.randrange(1, 6)):
                b[rng.randrange(len(b))] = rng.getrandbits(8)
            attempt(bytes(b))
    assert outcomes["ok"] > 0 and outcomes["err"] > 0


def test_errors_name_the_errno_and_hint():
    e = error_from_errno(-errno.EPERM, "bind of queue 7")
    assert e.errno == errno.EPERM and e.errno_name == "EPERM" and isinstance(e, Exception)
    assert "CAP_NET_ADMIN" in str(e) and "another" in str(e)
    assert "bind once" in str(error_from_errno(errno.EBUSY, "bind"))
    assert "bind() first" in str(error_from_errno(errno.ENODEV, "verdict"))
    assert error_from_errno(524, "x").errno_name == "ENOTSUPP"
    assert "create them" in str(error_from_errno(errno.ENOENT, "rule",
                                                 hints=nfq.NFT_RULE_HINTS))
    assert NfQueueError.code == "nfqueue"


# -- real kernel ------------------------------------------------------------------------

_IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0
_TOOLS = all(shutil.which(t) or shutil.which(t, path="/usr/sbin:/sbin") for t in ("ip", "nft"))
kernel = pytest.mark.skipif(
    not (_IS_ROOT and _TOOLS and sys.platform.startswith("linux")),
    reason="needs root, Linux, ip and nft (works in throwaway network namespaces)")
_ns_ids = itertools.count()
WAIT = 3.0
QUIET = 0.3
PORT = 40000  # queue 7, the reader under test
PORT_BYPASS = 40001  # queue 8 bypass, never read
PORT_NOBYPASS = 40002  # queue 9, never read
PORT_REPEAT = 40003  # queue 7 only while the mark is 0
A4, B4, A6, B6 = "198.51.100.1", "198.51.100.2", "2001:db8::1", "2001:db8::2"

RULES = f"""
add table inet lrkq
delete table inet lrkq
table inet lrkq {{
  chain pre {{
    type filter hook prerouting priority -150; policy accept;
    ct state new counter
    udp dport {PORT} counter jump q7
    udp dport {PORT_BYPASS} jump q8
    udp dport {PORT_NOBYPASS} jump q9
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


def sh(*argv: str, check: bool = True, stdin: Optional[str] = None) -> str:
    proc = subprocess.run(argv, input=stdin, capture_output=True, text=True, timeout=20,
                          check=False)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(argv)} failed ({proc.returncode}): {proc.stderr}")
    return proc.stdout


def _namespaces() -> List[str]:
    return [line.split()[0] for line in sh("ip", "netns", "list").splitlines() if line.strip()]


class Lab:
    """Sender namespace `a` and queue/receiver namespace `b` joined by a veth pair."""

    def __init__(self) -> None:
        n = next(_ns_ids)
        self.a = f"lrk-q{os.getpid()}-{n}a"
        self.b = f"lrk-q{os.getpid()}-{n}b"
        self.socks: List[socket.socket] = []

    def create(self) -> Lab:
        a, b = self.a, self.b
        sh("ip", "netns", "add", a)
        sh("ip", "netns", "add", b)
        sh("ip", "-n", a, "link", "add", "lrkqa", "type", "veth", "peer", "name", "lrkqb",
           "netns", b)
        for ns, dev, v4, v6 in ((a, "lrkqa", A4, A6), (b, "lrkqb", B4, B6)):
            sh("ip", "-n", ns, "addr", "add", f"{v4}/24", "dev", dev)
            sh("ip", "-n", ns, "-6", "addr", "add", f"{v6}/64", "dev", dev, "nodad")
            sh("ip", "-n", ns, "link", "set", dev, "up")
            sh("ip", "-n", ns, "link", "set", "lo", "up")
        # (PyPy 3.9 has no socket.if_nametoindex)
        self.ifindex_b = int(sh("ip", "-n", b, "-o", "link", "show", "lrkqb").split(":")[0])
        return self

    def destroy(self) -> None:
        for s in self.socks:
            s.close()
        for ns in (self.a, self.b):
            sh("ip", "netns", "del", ns, check=False)

    def load_rules(self) -> None:
        sh("ip", "netns", "exec", self.b, "nft", "-f", "-", stdin=RULES)
        add_queue_rule(NFPROTO_INET, "lrkq", "q7", 7, netns=self.b)
        add_queue_rule(NFPROTO_INET, "lrkq", "q8", 8, bypass=True, netns=self.b)
        add_queue_rule(NFPROTO_INET, "lrkq", "q9", 9, netns=self.b)

    def counters(self, chain: str) -> List[int]:
        """Packet counts of the `counter` statements of chain `chain`, in rule order."""
        out = sh("ip", "netns", "exec", self.b, "nft", "list", "chain", "inet", "lrkq", chain)
        return [int(x) for x in re.findall(r"counter packets (\d+)", out)]

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


@pytest.fixture(scope="module")
def root_state():
    """The root namespace's ruleset and namespace list, asserted unchanged at the end."""
    before = sh("nft", "list", "ruleset")
    yield
    assert sh("nft", "list", "ruleset") == before, "the root ruleset changed"
    assert not [n for n in _namespaces() if n.startswith(f"lrk-q{os.getpid()}-")]


@pytest.fixture
def lab(root_state):
    lab = Lab()
    try:
        lab.create()
        lab.load_rules()
        yield lab
    finally:
        lab.destroy()
    assert lab.a not in _namespaces() and lab.b not in _namespaces()


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


def drain(sock: socket.socket, quiet: float = QUIET, limit: int = 10_000) -> List[bytes]:
    """Datagrams until none came for `quiet` seconds."""
    out: List[bytes] = []
    poller = select.poll()
    poller.register(sock.fileno(), select.POLLIN)
    for _ in range(limit):
        if not poller.poll(int(quiet * 1000)):
            break
        try:
            out.append(sock.recv(65535))
        except BlockingIOError:
            continue
    return out


def payloads(tag: str, n: int) -> List[bytes]:
    return [f"{tag}-{i}".encode() for i in range(n)]


@kernel
def test_call_in_netns_leaves_the_caller_in_place(lab):
    mine = os.readlink("/proc/thread-self/ns/net")
    theirs = call_in_netns(lab.b, lambda: os.readlink("/proc/thread-self/ns/net"))
    assert theirs != mine and os.readlink("/proc/thread-self/ns/net") == mine
    with pytest.raises(NfQueueError, match="ip netns add"):
        call_in_netns("lrk-q-no-such-namespace", lambda: None)
    with pytest.raises(ZeroDivisionError):
        call_in_netns(lab.b, lambda: 1 // 0)


@kernel
def test_bind_config_errors_and_release(lab):
    q = lab.queue(7)
    assert call_in_netns(lab.b, q.kernel_stats) == {
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


@kernel
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
    assert sorted(drain(rx)) == sorted(data[0::2])
    assert q.receive_batch(10) == [] and q.stats()["verdict_errors"] == {}


@kernel
def test_batch_verdict_covers_ids_up_to_n(net):
    lab, tx, rx, _, _ = net
    q = lab.queue(7)
    data = payloads("batch", 10)
    send(tx, (B4, PORT), data)
    got = collect(q, 10)
    assert len(got) == 10
    q.verdict_batch(got[4].packet_id, NF_ACCEPT)  # the first five
    assert sorted(drain(rx)) == sorted(data[:5])
    q.verdict_batch(got[-1].packet_id, NF_DROP, wait=True)  # the rest
    assert drain(rx) == []
    with pytest.raises(NfQueueError) as info:
        q.verdict_batch(got[-1].packet_id, NF_ACCEPT, wait=True)  # nothing left
    assert info.value.errno_name == "ENOENT"
    # fire-and-forget errors show up in the counters once read
    q.verdict(got[0].packet_id, NF_ACCEPT)
    q.verdict_batch(got[0].packet_id, NF_ACCEPT)
    assert q.receive_batch(10, timeout=QUIET) == []
    assert q.stats()["verdict_errors"] == {"ENOENT": 2}
    assert q.last_error is not None and q.last_error.errno_name == "ENOENT"


@kernel
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
    assert sorted(drain(rx)) == sorted(data)
    assert lab.counters("later") == [5]


@kernel
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
    assert drain(rx4) == [b"rewritten by lrk, and longer"]
    assert drain(rx6) == [b"rewritten by lrk, and longer6"]


@kernel
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
    assert drain(rx) == [b"again"]
    assert lab.counters("pre")[-1] == 3  # the counter before the queue rule saw it 3 times
    # NF_QUEUE to another queue, and to an unbound one with and without bypass
    send(tx, (B4, PORT_REPEAT), [b"moved", b"bypassed", b"lost"])
    moved, bypassed, lost = collect(q, 3)
    q.verdict(moved.packet_id, queue_verdict(11))
    (again,) = collect(q11, 1)
    assert again.payload == moved.payload and again.queue_num == 11
    q11.verdict(again.packet_id, NF_ACCEPT)
    q.verdict(bypassed.packet_id, queue_verdict(12, bypass=True))
    q.verdict(lost.packet_id, queue_verdict(13))
    assert sorted(drain(rx)) == [b"bypassed", b"moved"]


@kernel
def test_bypass_without_reader(lab):
    """No reader bound: `queue ... bypass` lets packets pass, plain `queue` drops them."""
    tx = lab.udp(lab.a)
    rx_bypass = lab.udp(lab.b, bind=(B4, PORT_BYPASS))
    rx_plain = lab.udp(lab.b, bind=(B4, PORT_NOBYPASS))
    n = 50
    send(tx, (B4, PORT_BYPASS), payloads("b", n))
    send(tx, (B4, PORT_NOBYPASS), payloads("p", n))
    passed, dropped = len(drain(rx_bypass)), len(drain(rx_plain))
    print(f"no reader: bypass rule delivered {passed}/{n}, plain rule delivered {dropped}/{n}")
    assert (passed, dropped) == (n, 0)
    # a reader that goes away: its waiting packets are dropped, later ones follow the rule
    q = lab.queue(8)
    send(tx, (B4, PORT_BYPASS), payloads("w", 3))
    assert len(collect(q, 3)) == 3
    q.close()
    assert drain(rx_bypass) == []
    send(tx, (B4, PORT_BYPASS), [b"after"])
    assert drain(rx_bypass) == [b"after"]


@kernel
@pytest.mark.parametrize("fail_open", [False, True], ids=["drop", "fail-open"])
def test_maxlen_full_queue(net, fail_open):
    lab, tx, rx, _, _ = net
    q = lab.queue(7, maxlen=2, fail_open=fail_open)
    data = payloads("full", 10)
    send(tx, (B4, PORT), data)
    first = drain(rx)
    assert len(first) == (8 if fail_open else 0)
    stats = call_in_netns(lab.b, q.kernel_stats)
    assert stats is not None and stats["queue_total"] == 2
    assert stats["queue_dropped"] == (0 if fail_open else 8)
    got = collect(q, 2)
    assert [p.payload[-6:] for p in got] == [b"full-0", b"full-1"]
    q.verdict_batch(got[-1].packet_id, NF_ACCEPT)
    assert sorted(first + drain(rx)) == sorted(data if fail_open else data[:2])


@kernel
def test_overload_small_rcvbuf_keeps_reading(net):
    """With NETLINK_NO_ENOBUFS the reader survives a full socket buffer; the kernel counts."""
    lab, tx, rx, _, _ = net
    q = lab.queue(7, rcvbuf=4096)
    assert q.no_enobufs
    send(tx, (B4, PORT), payloads("flood", 40))
    time.sleep(QUIET)
    got = collect(q, 40, timeout=QUIET)
    stats = call_in_netns(lab.b, q.kernel_stats)
    assert stats is not None
    assert 0 < len(got) < 40 and stats["user_dropped"] == 40 - len(got)
    assert q.enobufs == 0
    q.verdict_batch(got[-1].packet_id, NF_ACCEPT)
    assert len(drain(rx)) == len(got)
    send(tx, (B4, PORT), [b"still-alive"])
    (p,) = collect(q, 1)
    q.verdict(p.packet_id, NF_ACCEPT)
    assert drain(rx) == [b"still-alive"]


@kernel
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
    assert drain(rx) == [b"x" * 200]


@kernel
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
        assert drain(rx) == [b"tracked"]
    finally:
        q.close()


@kernel
def test_blocking_reader_and_pending_during_ack(net):
    lab, tx, rx, _, _ = net
    q = lab.queue(7, blocking=True)
    send(tx, (B4, PORT), payloads("blk", 3))
    time.sleep(0.1)
    # an acked request reads the socket: packets it meets are kept for receive_batch
    q.request(build_maxlen(7, 100, seq=q.next_seq()), "maxlen")
    assert q.stats()["pending"] >= 1
    got = collect(q, 3)
    assert [p.payload[-5:] for p in got] == payloads("blk", 3)
    q.verdict_batch(got[-1].packet_id, NF_ACCEPT)
    assert len(drain(rx)) == 3
    # a blocking socket waits for the first packet (sent 0.2 s later by another thread)
    sender = threading.Timer(0.2, send, (tx, (B4, PORT), [b"blocking"]))
    sender.start()
    try:
        started = time.monotonic()
        (p,) = q.receive_batch(1)
        assert time.monotonic() - started >= 0.1
    finally:
        sender.join(WAIT)
    assert p.payload.endswith(b"blocking")
    q.verdict(p.packet_id, NF_DROP)


def test_nfqueue_rejects_bad_arguments():
    for kw in ({"queue_num": 70000}, {"queue_num": 1, "copy_range": 0},
               {"queue_num": 1, "maxlen": 0}):
        with pytest.raises(NfQueueArgumentError):
            NfQueue(**kw)  # type: ignore[arg-type]
