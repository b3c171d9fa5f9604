"""NFT_MSG_GETSETELEM dump: request bytes and reply parsing (pure; the kernel side is
tested in tests/netns/test_nft_setelem.py)."""

from __future__ import annotations

import socket
import struct

import pytest

from fastpath.kernel import netlink as nl
from fastpath.kernel import nft_setelem as se

NLA_F_NESTED = 0x8000
HDR = struct.Struct("=IHHII")


def attr(kind: int, payload: bytes, nested: bool = False) -> bytes:
    data = struct.pack("=HH", 4 + len(payload), kind | (NLA_F_NESTED if nested else 0))
    data += payload
    return data + b"\0" * (-len(data) % 4)


def counter_expr(packets: int, nbytes: int) -> bytes:
    data = attr(se.NFTA_COUNTER_BYTES, struct.pack("!Q", nbytes))
    data += attr(se.NFTA_COUNTER_PACKETS, struct.pack("!Q", packets))
    data += attr(3, struct.pack("!Q", 0))  # NFTA_COUNTER_PAD: ignored
    return attr(se.NFTA_EXPR_NAME, b"counter\0") + attr(se.NFTA_EXPR_DATA, data, True)


def element(key: bytes, packets: int, nbytes: int, as_list: bool = False) -> bytes:
    body = attr(se.NFTA_SET_ELEM_KEY, attr(se.NFTA_DATA_VALUE, key), True)
    body += attr(3, struct.pack("!I", 0))  # NFTA_SET_ELEM_FLAGS: ignored
    expr = counter_expr(packets, nbytes)
    if as_list:
        body += attr(se.NFTA_SET_ELEM_EXPRESSIONS, attr(se.NFTA_LIST_ELEM, expr, True), True)
    else:
        body += attr(se.NFTA_SET_ELEM_EXPR, expr, True)
    return attr(se.NFTA_LIST_ELEM, body, True)


def message(kind: int, seq: int, body: bytes) -> bytes:
    return HDR.pack(HDR.size + len(body), kind, 2, seq, 0) + body


def setelem_msg(seq: int, elements: bytes) -> bytes:
    body = struct.pack("!BBH", se.NFPROTO_INET, 0, 0)
    body += attr(se.NFTA_SET_ELEM_LIST_TABLE, b"lrk\0")
    body += attr(se.NFTA_SET_ELEM_LIST_SET, b"seen4\0")
    body += attr(se.NFTA_SET_ELEM_LIST_ELEMENTS, elements, True)
    return message((se.NFNL_SUBSYS_NFTABLES << 8) | se.NFT_MSG_NEWSETELEM, seq, body)


def key4(ip: str, port: int) -> bytes:
    return socket.inet_aton(ip) + struct.pack("!H", port) + b"\0\0"


def key6(ip: str, port: int) -> bytes:
    return socket.inet_pton(socket.AF_INET6, ip) + struct.pack("!H", port) + b"\0\0"


def test_request_names_table_and_set_and_asks_for_a_dump():
    raw = se.dump_request("lrk", "seen4", seq=7)
    length, kind, flags, seq, _pid = HDR.unpack_from(raw)
    assert length == len(raw) and seq == 7
    assert kind == (10 << 8) | 13  # NFNL_SUBSYS_NFTABLES, NFT_MSG_GETSETELEM
    assert flags & nl.NLM_F_DUMP == nl.NLM_F_DUMP and flags & nl.NLM_F_REQUEST
    assert raw[HDR.size] == se.NFPROTO_INET
    assert b"lrk\0" in raw and b"seen4\0" in raw


def test_parse_keys_of_both_families():
    assert se.parse_key(key4("198.51.100.1", 30000)) == ("198.51.100.1", 30000)
    assert se.parse_key(key6("2001:db8:0:0::1", 65534)) == ("2001:db8::1", 65534)
    with pytest.raises(se.NftDumpError):
        se.parse_key(b"\0" * 6)


def test_parse_a_dump_in_several_messages_until_done():
    out: dict = {}
    first = setelem_msg(3, element(key4("198.51.100.1", 30000), 5, 860)
                        + element(key4("198.51.100.65", 30003), 0, 0, as_list=True))
    second = setelem_msg(3, element(key6("2001:db8:1::1", 30004), 2**40, 2**41))
    assert se.parse_dump(first, 3, out) is False
    done = message(nl.NLMSG_DONE, 3, struct.pack("=i", 0))
    assert se.parse_dump(second + done, 3, out) is True
    assert out == {("198.51.100.1", 30000): (5, 860), ("198.51.100.65", 30003): (0, 0),
                   ("2001:db8:1::1", 30004): (2**40, 2**41)}


def test_replies_to_another_request_are_ignored():
    out: dict = {}
    stale = setelem_msg(2, element(key4("198.51.100.1", 30000), 1, 172))
    assert se.parse_dump(stale + message(nl.NLMSG_DONE, 2, b"\0" * 4), 3, out) is False
    assert out == {}


def test_error_reply_raises_with_the_reason():
    err = message(nl.NLMSG_ERROR, 4, struct.pack("=i", -2) + b"\0" * 16)
    with pytest.raises(se.NftDumpError, match="No such file"):
        se.parse_dump(err, 4, {})


def test_truncated_input_raises():
    msg = setelem_msg(5, element(key4("198.51.100.1", 30000), 1, 1))
    bad = bytearray(msg)
    # claim an attribute longer than the message: the element list's length field
    struct.pack_into("=H", bad, HDR.size + 4 + 8 + 12, 4000)
    with pytest.raises(se.NftDumpError):
        se.parse_dump(bytes(bad), 5, {})


def test_an_interrupted_dump_is_reported_at_its_end():
    out: dict = {}
    part = setelem_msg(6, element(key4("198.51.100.1", 30000), 1, 200))
    done = HDR.pack(HDR.size + 4, nl.NLMSG_DONE, nl.NLM_F_DUMP_INTR, 6, 0) + b"\0" * 4
    with pytest.raises(se.NftDumpInterrupted):
        se.parse_dump(part + done, 6, out)


class FakeSock:
    """Replays canned netlink buffers; records the requests sent. Its fd is one end of a
    socket pair with a byte waiting, so a poll on it always finds it readable."""

    def __init__(self, replies):
        self.replies = list(replies)
        self.sent = []
        self._pair = socket.socketpair()
        self._pair[1].send(b"!")

    def bind(self, _addr):
        pass

    def setblocking(self, _flag):
        pass

    def getsockname(self):
        return (4242, 0)

    def fileno(self):
        return self._pair[0].fileno()

    def sendto(self, data, _addr):
        self.sent.append(data)

    def recv_into(self, buf, _n, _flags):
        data = self.replies.pop(0)
        buf[:len(data)] = data
        return len(data)

    def close(self):
        for s in self._pair:
            s.close()


def test_reader_takes_an_interrupted_dump_again():
    el = element(key4("198.51.100.1", 30000), 4, 800)
    intr = HDR.pack(HDR.size + 4, nl.NLMSG_DONE, nl.NLM_F_DUMP_INTR, 1, 0) + b"\0" * 4
    ok = HDR.pack(HDR.size + 4, nl.NLMSG_DONE, 0, 2, 0) + b"\0" * 4
    sock = FakeSock([setelem_msg(1, el) + intr, setelem_msg(2, el), ok])
    reader = se.SetElemReader(sock=sock)
    assert reader.counters("lrk", "seen4") == {("198.51.100.1", 30000): (4, 800)}
    assert len(sock.sent) == 2
    assert [HDR.unpack_from(m)[3] for m in sock.sent] == [1, 2]  # a fresh seq per dump
    reader.close()


def test_reader_error_reply_and_silence_raise_typed_errors():
    err = message(nl.NLMSG_ERROR, 1, struct.pack("=i", -2) + bytes(16))
    reader = se.SetElemReader(sock=FakeSock([err]))
    with pytest.raises(se.NftDumpError, match="No such file"):
        reader.counters("lrk", "nosuch")
    reader.close()
    garbled = setelem_msg(1, element(key4("198.51.100.1", 30000), 1, 1))[:-3]
    reader = se.SetElemReader(sock=FakeSock([garbled]))
    with pytest.raises(se.NftDumpError):
        reader.counters("lrk", "seen4")
    reader.close()
