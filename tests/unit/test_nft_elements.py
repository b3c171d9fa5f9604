"""fastpath.kernel.nft_elements: element text as an nf_tables netlink batch (encoding only;
the kernel's reading of it: tests/netns/test_nft_elements.py)."""

from __future__ import annotations

import socket
import struct

import pytest

from fastpath.kernel import netlink as nl
from fastpath.kernel.kernel_rules import KernelRuleset, SessionSpec
from fastpath.kernel.nft_elements import DELSETELEM, NEWSETELEM, ElementTextError, batch


def _messages(data: bytes):
    return [(mtype, flags, seq, body, end) for mtype, flags, seq, body, end
            in nl.messages(data)]


def _elements(data: bytes, body: int, end: int):
    """(table, set, [(key bytes, value bytes or None)]) of one NEWSETELEM/DELSETELEM."""
    top = nl.attr_map(data, body + nl.NFGENMSG.size, end)
    table, name = top[1].rstrip(b"\0").decode(), top[2].rstrip(b"\0").decode()
    out = []
    elems = top[3]
    for _, a, b in nl.attrs(elems, 0, len(elems)):
        parts = nl.attr_map(elems, a, b)
        key = nl.attr_map(parts[1])[1]
        value = nl.attr_map(parts[2])[1] if 2 in parts else None
        out.append((key, value))
    return table, name, out


def test_an_install_is_one_batch_of_one_message_per_set_in_order():
    rs = KernelRuleset(port_start=30000, port_end=30999, relay_ips=["198.51.100.1",
                       "198.51.100.65"], mark_slots=["198.51.100.1", "198.51.100.65"],
                       counters="conntrack")
    spec = SessionSpec(rs.leg("198.51.100.1", 30000, "198.51.100.10", 4000),
                       rs.leg("198.51.100.65", 30002, "198.51.100.70", 5000))
    data, seqs = batch(rs.install_commands(spec), 100)
    msgs = _messages(data)
    assert [m[0] for m in msgs] == [nl.NFNL_MSG_BATCH_BEGIN, NEWSETELEM, NEWSETELEM,
                                    NEWSETELEM, NEWSETELEM, nl.NFNL_MSG_BATCH_END]
    assert seqs == [101, 102, 103, 104] and [m[2] for m in msgs] == [100, *seqs, 105]
    assert all(m[1] & nl.NLM_F_ACK and m[1] & nl.NLM_F_CREATE for m in msgs[1:5])
    # the batch is addressed to nf_tables (res_id 10, big-endian)
    assert nl.NFGENMSG.unpack_from(data, msgs[0][3]) == (0, 0, 10)
    ip = socket.inet_aton
    port = struct.Struct("!Hxx").pack
    mark = struct.Struct("=I").pack
    table, name, fwd = _elements(data, msgs[1][3], msgs[1][4])
    assert (table, name) == ("lrk", "fwd4")
    assert fwd[0] == (ip("198.51.100.1") + port(30000), ip("198.51.100.70") + port(5000))
    table, name, marks = _elements(data, msgs[2][3], msgs[2][4])
    # the external address has slot 1: its marks are port + 0x10000, host order
    assert name == "mark4" and marks[2] == (ip("198.51.100.65") + port(30002),
                                            mark(30002 + 0x10000))
    _, name, out = _elements(data, msgs[3][3], msgs[3][4])
    assert name == "out4" and out[0] == (mark(30000), ip("198.51.100.65") + port(30002))
    _, name, adm = _elements(data, msgs[4][3], msgs[4][4])
    assert name == "adm4" and adm[0] == (ip("198.51.100.1") + port(30000)
                                         + ip("198.51.100.10"), None)


def test_ipv6_keys_and_deletes():
    text = "delete element inet lrk fwd6 { 2001:db8:1::1 . 30000, 2001:db8:1::1 . 30001 }\n"
    data, seqs = batch(text, 1)
    msgs = _messages(data)
    assert msgs[1][0] == DELSETELEM and not msgs[1][1] & nl.NLM_F_CREATE
    _, name, keys = _elements(data, msgs[1][3], msgs[1][4])
    addr = socket.inet_pton(socket.AF_INET6, "2001:db8:1::1")
    assert name == "fwd6" and keys == [(addr + struct.pack("!Hxx", 30000), None),
                                       (addr + struct.pack("!Hxx", 30001), None)]


@pytest.mark.parametrize("text", [
    "add table inet lrk\n",
    "add element inet lrk other4 { 198.51.100.1 . 1 }\n",
    "add element inet lrk fwd4 { 198.51.100.1 . 1 }\n",  # a map element without a value
    "add element inet lrk adm4 { 198.51.100.1 . 1 . 198.51.100.2 : 5 }\n",
    "add element inet lrk fwd4 { 198.51.100.1 . 70000 : 198.51.100.2 . 1 }\n",
    "add element inet lrk fwd4 { nope . 1 : 198.51.100.2 . 1 }\n",
    "add element inet lrk mark4 { 198.51.100.1 . 1 : 4294967296 }\n",
    "add element ip lrk fwd4 { 198.51.100.1 . 1 : 198.51.100.2 . 1 }\n",
])
def test_text_it_cannot_express_is_refused_before_sending(text):
    with pytest.raises(ElementTextError):
        batch(text, 1)


def test_the_inline_element_encoding_is_the_generic_one():
    from fastpath.kernel.nft_elements import _element

    key, value = bytes(range(8)), bytes(range(20))
    assert _element(key, value) == nl.nested(
        1, nl.nested(1, nl.attr(1, key)), nl.nested(2, nl.attr(1, value)))
    assert _element(key, None) == nl.nested(1, nl.nested(1, nl.attr(1, key)))


@pytest.mark.parametrize("held", [None, "a", "b"])
@pytest.mark.parametrize("v6", [False, True])
@pytest.mark.parametrize("seen", [False, True])
@pytest.mark.parametrize("admission", [False, True])
def test_a_units_batch_from_its_spec_is_the_batch_of_its_text(v6, seen, admission, held):
    """Also with a leg on hold (peer port 0): nothing toward it, in both writers alike."""
    from fastpath.kernel.nft_elements import spec_batch

    a, b = ("2001:db8:1::1", "2001:db8:2::1") if v6 else ("198.51.100.1", "198.51.100.65")
    pa, pb = ("2001:db8:1::10", "2001:db8:2::70") if v6 else ("198.51.100.10", "198.51.100.70")
    rs = KernelRuleset(port_start=30000, port_end=30999, relay_ips=[a, b], mark_slots=[a, b],
                       counters="rules" if seen else "conntrack")
    spec = SessionSpec(rs.leg(a, 30000, pa, 0 if held == "a" else 4000,
                              None if held == "a" else 4005),
                       rs.leg(b, 30002, pb, 0 if held == "b" else 5000))
    for add in (True, False):
        text = rs.install_commands(spec) if add else rs.remove_commands(spec)
        if not admission:
            text = "".join(ln + "\n" for ln in text.splitlines() if " adm" not in ln)
        data, seqs, names = spec_batch(spec, 7, "lrk", seen, admission, add)
        assert (data, seqs) == batch(text, 7)
        assert names == [ln.split()[4] for ln in text.splitlines()]
