"""The shared netlink codec (fastpath.kernel.netlink): exact bytes out, crafted bytes in.

Encoding is compared with layouts written out from linux/netlink.h and
linux/netfilter/nfnetlink.h; decoding is fed well-formed, truncated, misaligned and
oversized input and must either decode it or raise a NetlinkError subclass -- never
another exception type, never loop. The socket shell runs against a datagram socket
pair standing in for the kernel."""

from __future__ import annotations

import errno
import random
import socket
import struct
import sys
from typing import List

import pytest

from fastpath.kernel import netlink as nl
from fastpath.kernel.netlink import (
    Dump,
    ErrorReply,
    NetlinkDecodeError,
    NetlinkError,
    NetlinkLimitError,
    NetlinkRequestError,
    NetlinkSocket,
)

little_only = pytest.mark.skipif(sys.byteorder != "little",
                                 reason="hex literals are for a little-endian host")


def nlh(length: int, mtype: int, flags: int = 0, seq: int = 0, pid: int = 0) -> bytes:
    return struct.pack("=IHHII", length, mtype, flags, seq, pid)


def raw_attr(length: int, kind: int, payload: bytes = b"") -> bytes:
    """An attribute header claiming `length`, followed by `payload` as given."""
    return struct.pack("=HH", length, kind) + payload


def msg(mtype: int, body: bytes = b"", flags: int = 0, seq: int = 0) -> bytes:
    """A message padded to 4 bytes, as the kernel lays them out in one buffer."""
    data = nlh(16 + len(body), mtype, flags, seq) + body
    return data + b"\0" * (-len(data) % 4)


def error(seq: int, err: int, request: bytes = b"", flags: int = 0, tlvs: bytes = b"") -> bytes:
    return msg(nl.NLMSG_ERROR, struct.pack("=i", -err) + request + tlvs, flags, seq)


DATA = 0x0100  # some protocol's message type (>= NLMSG_MIN_TYPE)


# --- encoding ---------------------------------------------------------------------------


def test_attr_pads_to_four_bytes():
    assert nl.attr(1, b"abc") == struct.pack("=HH", 7, 1) + b"abc\0"
    assert nl.attr(2, b"abcd") == struct.pack("=HH", 8, 2) + b"abcd"
    assert nl.attr(3) == struct.pack("=HH", 4, 3)
    assert nl.attr(4, b"x" * 5) == struct.pack("=HH", 9, 4) + b"xxxxx\0\0\0"
    assert [nl.align(n) for n in (0, 1, 4, 5, 7, 8)] == [0, 4, 4, 8, 8, 8]
    with pytest.raises(NetlinkError):
        nl.attr(1, bytes(0xFFFC))  # nla_len is 16 bits


def test_typed_attributes():
    assert nl.attr_be32(8, 0x7531) == struct.pack("=HH", 8, 8) + b"\x00\x00\x75\x31"
    assert nl.attr_be32(8, -1) == struct.pack("=HH", 8, 8) + b"\xff" * 4  # masked to u32
    assert nl.attr_strz(1, "lrk") == struct.pack("=HH", 8, 1) + b"lrk\0"
    assert nl.attr_strz(2, "seen4") == struct.pack("=HH", 10, 2) + b"seen4\0\0\0"
    inner = nl.attr(1, b"x")
    assert nl.nested(3, inner, inner) == struct.pack("=HH", 20, 3 | 0x8000) + inner + inner


def test_message_headers():
    assert nl.message(0x10, 0x5, 7, b"abcd", pid=9) == nlh(20, 0x10, 0x5, 7, 9) + b"abcd"
    assert nl.message(3, 0, 2**32 + 5)[8:12] == struct.pack("=I", 5)  # seq is a u32
    body = nl.attr_be32(8, 1)
    assert nl.nfmessage(0x0101, 0x301, 5, 2, 0x1234, body) == (
        nlh(28, 0x0101, 0x301, 5) + b"\x02\x00\x12\x34" + body)
    assert nl.nfmessage(0x10, 1, 1) == nlh(20, 0x10, 1, 1) + b"\0\0\0\0"


@little_only
def test_nfmessage_golden_hex():
    data = nl.nfmessage(0x0102, nl.NLM_F_REQUEST | nl.NLM_F_ACK, 9, 0, 0,
                        nl.attr_be32(8, 0x7531))
    assert data.hex() == ("1c000000" "0201" "0500" "09000000" "00000000"  # nlmsghdr
                          "00" "00" "0000"  # nfgenmsg: AF_UNSPEC, v0, res_id 0
                          "0800" "0800" "00007531")  # CTA_MARK, be32


# --- decoding: messages -----------------------------------------------------------------


def test_messages_walk_padded_messages():
    odd = nlh(17, DATA, 2, 4) + b"x"  # 17 bytes, padded to 20 in the buffer
    buf = odd + b"\0\0\0" + msg(DATA, b"abcd", seq=5) + msg(nl.NLMSG_DONE, b"\0" * 4, seq=5)
    assert list(nl.messages(buf)) == [(DATA, 2, 4, 16, 17), (DATA, 0, 5, 36, 40),
                                      (nl.NLMSG_DONE, 0, 5, 56, 60)]
    assert list(nl.messages(odd)) == [(DATA, 2, 4, 16, 17)]  # last one needs no padding
    assert list(nl.messages(buf, 20)) == [(DATA, 2, 4, 16, 17)]  # `length` limits
    assert list(nl.messages(bytearray(buf), 40))[1] == (DATA, 0, 5, 36, 40)
    assert list(nl.messages(memoryview(buf)))[2][0] == nl.NLMSG_DONE
    assert list(nl.messages(b"")) == []


@pytest.mark.parametrize("buf", [
    b"\x10\x00\x00",  # a cut header
    msg(DATA, b"abcd") + b"\0" * 7,  # stray bytes after a message
    nlh(8, DATA) + b"\0" * 8,  # nlmsg_len below the header size
    nlh(0, DATA) + b"\0" * 16,  # nlmsg_len 0 (would never advance)
    nlh(200, DATA) + b"\0" * 20,  # claims more than the buffer
    nlh(0xFFFFFFFF, DATA),  # oversized
    msg(DATA, b"abcd") + nlh(24, DATA) + b"x",  # the second one cut short
])
def test_messages_reject_bad_framing(buf):
    with pytest.raises(NetlinkDecodeError):
        list(nl.messages(buf))


# --- decoding: attributes ---------------------------------------------------------------


def test_attrs_masks_flags_and_walks_nests():
    inner = nl.attr(1, b"\x01") + nl.attr(2 | nl.NLA_F_NET_BYTEORDER, b"\x00\x02")
    buf = nl.attr(5, b"") + nl.nested(6, inner) + nl.attr(7, b"abcde") + b"\0\0"  # + padding
    got = list(nl.attrs(buf, 0, len(buf)))
    assert got == [(5, 4, 4), (6, 8, 8 + len(inner)), (7, 28, 33)]
    kind, a, b = got[1]
    assert [(k, buf[x:y]) for k, x, y in nl.attrs(buf, a, b)] == [(1, b"\x01"), (2, b"\0\x02")]
    assert nl.attr_map(buf) == {5: b"", 6: inner, 7: b"abcde"}
    assert nl.attr_map(nl.attr(1, b"a") + nl.attr(1, b"b")) == {1: b"b"}  # last wins
    assert type(nl.attr_map(bytearray(buf))[7]) is bytes


def test_attrs_misaligned_lengths():
    # a 5-byte attribute is followed by the next one at the aligned offset 8
    buf = raw_attr(5, 1, b"x\0\0\0") + nl.attr(2, b"yz")
    assert [(k, buf[a:b]) for k, a, b in nl.attrs(buf, 0, len(buf))] == [(1, b"x"), (2, b"yz")]
    # the last attribute's padding may be missing: its length still fits
    assert list(nl.attrs(raw_attr(5, 1, b"x"), 0, 5)) == [(1, 4, 5)]


@pytest.mark.parametrize("buf", [
    raw_attr(2, 1, b"\0\0\0\0"),  # nla_len below the header size
    raw_attr(0, 1, b"\0\0\0\0"),  # nla_len 0 (would never advance)
    raw_attr(64, 1, b"\0" * 8),  # runs past its container
    raw_attr(0xFFFF, 1),  # oversized
    nl.attr(1, b"ok") + raw_attr(12, 2, b"\0\0"),  # the second one cut short
])
def test_attrs_reject_bad_lengths(buf):
    with pytest.raises(NetlinkDecodeError):
        list(nl.attrs(buf, 0, len(buf)))
    with pytest.raises(NetlinkDecodeError):
        nl.attr_map(buf)


def test_nested_attribute_must_fit_its_parent():
    child = nl.attr(1, b"abcdefgh")  # 12 bytes
    parent = raw_attr(8, 2, child)  # the parent claims only the child's header
    ((_kind, a, b),) = list(nl.attrs(parent, 0, 8))
    with pytest.raises(NetlinkDecodeError):
        list(nl.attrs(parent, a, b))


# --- decoding: error replies ------------------------------------------------------------


def test_parse_error_ack_errno_and_request_type():
    ack = error(5, 0, nlh(20, 0x0302, 5, 5))
    ((mtype, flags, seq, body, end),) = nl.messages(ack)
    assert (mtype, seq) == (nl.NLMSG_ERROR, 5)
    assert nl.parse_error(ack, body, end, flags) == ErrorReply(0, 0x0302, "")
    bare = error(6, errno.EPERM)  # no copy of the request
    (m,) = nl.messages(bare)
    assert nl.parse_error(bare, m[3], m[4]) == ErrorReply(errno.EPERM, 0, "")


def test_parse_error_extended_ack_text():
    text = nl.attr(1, b"bad attr\0")  # NLMSGERR_ATTR_MSG
    capped = error(7, errno.EINVAL, nlh(40, 0x0302, 5, 7), 0x100 | 0x200, text)
    (m,) = nl.messages(capped)
    assert nl.parse_error(capped, m[3], m[4], m[1]) == ErrorReply(errno.EINVAL, 0x0302,
                                                                  "bad attr")
    # not capped: the whole request (21 bytes, aligned to 24) precedes the text
    full = error(8, errno.EINVAL, nlh(21, 0x0302, 5, 8) + b"\x01" + b"\0" * 7, 0x200, text)
    (m,) = nl.messages(full)
    assert nl.parse_error(full, m[3], m[4], m[1]).message == "bad attr"
    garbled = error(9, errno.EINVAL, nlh(16, 0x0302, 5, 9), 0x300, raw_attr(99, 1))
    (m,) = nl.messages(garbled)
    assert nl.parse_error(garbled, m[3], m[4], m[1]) == ErrorReply(errno.EINVAL, 0x0302, "")


def test_parse_error_without_errno_is_a_decode_error():
    short = nlh(18, nl.NLMSG_ERROR) + b"\0\0"
    (m,) = nl.messages(short)
    with pytest.raises(NetlinkDecodeError):
        nl.parse_error(short, m[3], m[4])


# --- dumps ------------------------------------------------------------------------------


def test_dump_across_buffers_until_done():
    dump = Dump(seq=3)
    first = msg(DATA, b"a", seq=3) + msg(DATA, b"stale", seq=2) + msg(nl.NLMSG_NOOP, seq=3)
    assert [(t, e - b) for t, b, e in dump.feed(first)] == [(DATA, 1)]
    assert not dump.done and dump.count == 1
    done = msg(nl.NLMSG_DONE, b"\0" * 4, seq=3)
    assert list(dump.feed(msg(DATA, b"bb", seq=3) + error(3, 0) + done)) == [(DATA, 16, 18)]
    assert dump.done and not dump.interrupted and dump.count == 2
    other = Dump(seq=None)  # every seq
    assert len(list(other.feed(first))) == 2


def test_dump_interrupted_error_and_bound():
    dump = Dump(seq=4)
    list(dump.feed(msg(nl.NLMSG_DONE, b"\0" * 4, nl.NLM_F_DUMP_INTR, seq=4)))
    assert dump.done and dump.interrupted
    with pytest.raises(NetlinkRequestError) as info:
        list(Dump(seq=4).feed(error(4, errno.ENOENT)))
    assert info.value.errno == errno.ENOENT and "ENOENT" in str(info.value)
    assert isinstance(info.value, NetlinkError)
    list(Dump(seq=4).feed(error(5, errno.ENOENT)))  # another request's error: not ours
    bounded = Dump(seq=1, max_messages=2)
    with pytest.raises(NetlinkLimitError):
        list(bounded.feed(msg(DATA, seq=1) * 3))


def test_garbage_raises_only_typed_errors():
    rng = random.Random(4)
    good = (msg(DATA, nl.attr(1, b"abc") + nl.nested(2, nl.attr(3, b"\0" * 4)), seq=1)
            + error(1, 0, nlh(20, DATA, 5, 1)) + msg(nl.NLMSG_DONE, b"\0" * 4, seq=1))
    outcomes = {"ok": 0, "error": 0}

    def walk(buf: bytes) -> None:
        items = 0
        try:
            for _mtype, body, end in Dump(seq=1).feed(buf):
                for _kind, a, b in nl.attrs(buf, body, end):
                    list(nl.attrs(buf, a, b))
                    items += 1
            outcomes["ok"] += 1
        except NetlinkError:
            outcomes["error"] += 1
        assert items <= len(buf) // 4  # every step advanced

    for cut in range(len(good) + 1):
        walk(good[:cut])
    for _ in range(3000):
        if rng.random() < 0.3:
            walk(bytes(rng.getrandbits(8) for _ in range(rng.randrange(0, 80))))
        else:
            buf = bytearray(good)
            for _ in range(rng.randrange(1, 6)):
                buf[rng.randrange(len(buf))] = rng.getrandbits(8)
            walk(bytes(buf))
    assert outcomes["ok"] > 0 and outcomes["error"] > 0


# --- the socket shell -------------------------------------------------------------------


class KernelEnd:
    """A datagram socket pair standing in for a netlink socket: what the test writes to
    `kernel` is what the NetlinkSocket reads; what it sends is recorded."""

    def __init__(self, enobufs: int = 0) -> None:
        self.user, self.kernel = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sent: List[bytes] = []
        self.enobufs = enobufs

    def reply(self, *datagrams: bytes) -> None:
        for d in datagrams:
            self.kernel.send(d)

    # the socket interface NetlinkSocket uses
    def bind(self, _addr) -> None:
        pass

    def setblocking(self, flag: bool) -> None:
        self.user.setblocking(flag)

    def getsockname(self):
        return (4242, 0)

    def fileno(self) -> int:
        return self.user.fileno()

    def sendto(self, data: bytes, _addr) -> None:
        self.sent.append(bytes(data))

    def recv_into(self, buf, n, flags) -> int:
        if self.enobufs:
            self.enobufs -= 1
            raise OSError(errno.ENOBUFS, "No buffer space available")
        return self.user.recv_into(buf, n, flags)

    def close(self) -> None:
        self.user.close()
        self.kernel.close()


class Boom(Exception):
    def __init__(self, err: int, op: str, detail: str) -> None:
        super().__init__(err, op, detail)
        self.errno = err
        self.op = op


def test_socket_dump_yields_until_done_and_skips_stale_replies():
    fake = KernelEnd()
    sock = NetlinkSocket(fake, error=Boom)
    assert sock.portid == 4242
    seq = sock.next_seq()
    fake.reply(msg(DATA, b"old", seq=seq + 7) + msg(DATA, b"a", seq=seq),
               msg(DATA, b"bc", seq=seq) + msg(nl.NLMSG_DONE, b"\0" * 4, seq=seq))
    state = Dump(seq)
    got = [(mtype, data[b:e]) for data, mtype, b, e in
           sock.dump(nl.message(DATA, nl.NLM_F_DUMP, seq), state, timeout=5.0)]
    assert got == [(DATA, b"a"), (DATA, b"bc")]
    assert state.done and fake.sent == [nl.message(DATA, nl.NLM_F_DUMP, seq)]
    sock.close()


def test_socket_dump_error_reply_and_silence():
    fake = KernelEnd()
    sock = NetlinkSocket(fake, error=Boom)
    fake.reply(error(1, errno.EPERM))
    with pytest.raises(NetlinkRequestError):
        list(sock.dump(b"req", Dump(1), idle=5.0))
    with pytest.raises(Boom) as info:  # nothing comes: the error factory names the op
        list(sock.dump(b"req", Dump(2), idle=0.0, op="dump of x"))
    assert info.value.errno == errno.ETIMEDOUT and info.value.op == "dump of x"
    with pytest.raises(Boom):
        sock.recv(deadline=0.0)  # a deadline long past
    with pytest.raises(NetlinkError):
        sock.recv()  # neither bound: refused, never an endless wait
    sock.close()


def test_socket_acks_collects_answers_and_hands_on_the_rest():
    fake = KernelEnd(enobufs=2)
    sock = NetlinkSocket(fake, error=Boom)
    others = []
    fake.reply(b"\x01\x02",  # garbage: counted, skipped
               error(5, 0) + msg(DATA, b"pkt", seq=0) + error(9, errno.ENOENT),
               error(6, errno.EPERM, nlh(16, DATA, 5, 6)))
    got = sock.acks([5, 6], timeout=5.0,
                    other=lambda buf, t, f, s, b, e: others.append((t, s, bytes(buf[b:e]))))
    assert got == {5: ErrorReply(0), 6: ErrorReply(errno.EPERM, DATA)}
    assert others == [(DATA, 0, b"pkt"), (nl.NLMSG_ERROR, 9, struct.pack("=i", -2))]
    assert sock.decode_errors == 1 and sock.enobufs == 2
    with pytest.raises(Boom) as info:
        sock.acks([7], timeout=0.0, op="flush")
    assert info.value.errno == errno.ETIMEDOUT and info.value.op == "flush"
    sock.close()


def test_socket_seq_wraps_and_errors_go_through_the_factory():
    fake = KernelEnd()
    sock = NetlinkSocket(fake)
    sock.seq = 0xFFFFFFFE
    assert [sock.next_seq(), sock.next_seq()] == [0xFFFFFFFF, 1]
    sock.close()

    class Refusing(KernelEnd):
        def sendto(self, data, _addr):
            raise OSError(errno.EPERM, "Operation not permitted")

    sock = NetlinkSocket(Refusing())
    with pytest.raises(NetlinkError) as info:  # the default factory
        sock.send(b"x", "bind")
    assert info.value.errno == errno.EPERM and "bind" in str(info.value)
    sock.close()
