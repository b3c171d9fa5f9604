"""The ctnetlink flush-by-mark request and the parsing of its acks, built by hand (no
kernel; the flush against one: tests/netns/test_ctnetlink.py)."""

from __future__ import annotations

import sys

from fastpath.kernel.ctnetlink import flush_by_mark, parse_acks

HOST = sys.byteorder  # nlmsghdr and nlmsgerr are in host order, attribute values big-endian


def test_message_layout_and_ack_parsing():
    msg = flush_by_mark(0x7531, seq=9)
    assert len(msg) == 16 + 4 + 8 + 8
    assert msg[4:6] == (0x102).to_bytes(2, HOST)  # CTNETLINK << 8 | CT_DELETE
    assert msg[-12:-8] == (0x7531).to_bytes(4, "big")  # CTA_MARK value, network order
    ack = (36).to_bytes(4, HOST) + (2).to_bytes(2, HOST) + b"\0\0" + \
        (9).to_bytes(4, HOST) + b"\0" * 4 + (-2).to_bytes(4, HOST, signed=True) + \
        b"\0" * 16
    assert parse_acks(ack) == [(9, 2)]
    assert parse_acks(b"\x01\x02") == []  # truncated input is ignored, not an error
