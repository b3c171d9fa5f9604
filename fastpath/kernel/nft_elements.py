"""Set and map elements written straight to the kernel: one nf_tables netlink batch.

Kernel mode writes a call's elements as nft command text (`kernel_rules`); through
libnftables every such transaction costs about 300 us whatever its size (it parses the
text and fetches its cache of the ruleset from the kernel first), which capped installs
through the daemon near 1,700 calls/s. This module reads the same text -- only
``add element`` / ``delete element`` lines of the sets `kernel_rules` declares -- and sends
it as one NFNL batch (NFT_MSG_NEWSETELEM / NFT_MSG_DELSETELEM per line, in order): the
kernel applies all or nothing, as for nft's transaction, and acks each message.

Encoding (what nft itself sends): a concatenation's parts are each padded to 4 bytes;
addresses and ports in network order, marks (``type mark``) in host order. The set a
line names fixes its key and value types (`SET_TYPES`). Text this module cannot express
raises `ElementTextError` before anything is sent (the caller then runs it through nft).
"""

from __future__ import annotations

import errno
import os
import socket
import struct
from typing import Dict, List, Optional, Tuple

from fastpath.kernel import netlink
from fastpath.kernel.kernel_rules import ForkSpec, SessionSpec
from fastpath.kernel.netlink import (
    NFNL_MSG_BATCH_BEGIN,
    NFNL_MSG_BATCH_END,
    NLM_F_ACK,
    NLM_F_CREATE,
    NLM_F_REQUEST,
    NetlinkError,
    attr_strz,
    nested,
    nfmessage,
)
from fastpath.kernel.nft import NftError
from fastpath.kernel.nft_setelem import (
    NFNL_SUBSYS_NFTABLES,
    NFPROTO_INET,
    NFTA_DATA_VALUE,
    NFTA_LIST_ELEM,
    NFTA_SET_ELEM_KEY,
    NFTA_SET_ELEM_LIST_ELEMENTS,
    NFTA_SET_ELEM_LIST_SET,
    NFTA_SET_ELEM_LIST_TABLE,
)

__all__ = ["ElementTextError", "ElementWriter", "SET_TYPES", "batch", "spec_batch"]

# the element-list attributes nft_setelem's reader decodes; the writer adds its own
NEWSETELEM = (NFNL_SUBSYS_NFTABLES << 8) | 12
DELSETELEM = (NFNL_SUBSYS_NFTABLES << 8) | 14
NFTA_SET_ELEM_DATA = 2

#: set name without its family digit -> (key parts, value parts or None for a set):
#: "a" an address, "p" a port, "m" a ct mark
SET_TYPES: Dict[str, Tuple[str, Optional[str]]] = {
    "fwd": ("ap", "ap"), "mark": ("ap", "m"), "out": ("m", "ap"), "adm": ("apa", None),
    "seen": ("ap", None), "fmark": ("apap", "m"), "ffwd": ("m", "ap"),
}
_PORT = struct.Struct("!Hxx")
_MARK = struct.Struct("=I")
_NESTED = 0x8000  # NLA_F_NESTED
#: LIST_ELEM { KEY { VALUE ...: their three nlattr headers (host order)
_ELEM_KEY = struct.Struct("=HHHHHH")
#: DATA { VALUE ...
_ELEM_DATA = struct.Struct("=HHHH")
#: addresses as inet_pton gives them (relay addresses and peers repeat); cleared when full
_ADDR: Dict[Tuple[str, int], bytes] = {}


class ElementTextError(ValueError):
    """Text this writer does not express (anything but element lines of lrk's sets)."""


def _part(kind: str, text: str, family: int) -> bytes:
    if kind == "a":
        got = _ADDR.get((text, family))
        if got is None:
            if len(_ADDR) >= 65536:
                _ADDR.clear()
            got = _ADDR[(text, family)] = socket.inet_pton(
                socket.AF_INET6 if family == 6 else socket.AF_INET, text)
        return got
    value = int(text)
    if kind == "p":
        if not 0 <= value <= 0xFFFF:
            raise ElementTextError(f"port {text} out of range")
        return _PORT.pack(value)
    if not 0 <= value <= 0xFFFFFFFF:
        raise ElementTextError(f"mark {text} out of range")
    return _MARK.pack(value)


def _data(kinds: str, text: str, family: int) -> bytes:
    parts = text.split(" . ")
    if len(parts) != len(kinds):
        raise ElementTextError(f"{text!r} does not have the parts {kinds!r}")
    try:
        return b"".join(_part(k, p, family) for k, p in zip(kinds, parts))
    except (OSError, ValueError) as exc:
        raise ElementTextError(f"{text!r}: {exc}") from None


def _line(line: str) -> Tuple[bool, str, str, List[Tuple[bytes, Optional[bytes]]]]:
    """(add?, table, set, [(key, value)]) of one ``add|delete element inet T S { ... }``."""
    head, sep, body = line.partition(" { ")
    words = head.split()
    if not sep or not body.endswith(" }") or len(words) != 5 or words[1] != "element" \
            or words[0] not in ("add", "delete") or words[2] != "inet":
        raise ElementTextError(f"not an element line: {line[:80]!r}")
    add, table, name = words[0] == "add", words[3], words[4]
    types = SET_TYPES.get(name[:-1]) if name[-1:] in ("4", "6") else None
    if types is None:
        raise ElementTextError(f"set {name!r} is not one of kernel mode's")
    family = int(name[-1])
    items = []
    for item in body[:-2].split(", "):
        key, _, value = item.partition(" : ")
        if value and (types[1] is None or not add):
            raise ElementTextError(f"{name}: a value where none is expected: {item!r}")
        if add and types[1] is not None and not value:
            raise ElementTextError(f"{name}: no value in {item!r}")
        items.append((_data(types[0], key, family),
                      _data(types[1], value, family) if value else None))
    return add, table, name, items


def _element(key: bytes, value: Optional[bytes]) -> bytes:
    """NFTA_LIST_ELEM { KEY { VALUE key }, DATA { VALUE value } } (keys and values are
    whole 4-byte words: no padding), as `netlink.nested`/`attr` would build it."""
    k = len(key)
    size = 12 + k + (0 if value is None else 8 + len(value))
    head = _ELEM_KEY.pack(size, NFTA_LIST_ELEM | _NESTED, 8 + k,
                          NFTA_SET_ELEM_KEY | _NESTED, 4 + k, NFTA_DATA_VALUE)
    if value is None:
        return head + key
    v = len(value)
    return b"".join((head, key, _ELEM_DATA.pack(8 + v, NFTA_SET_ELEM_DATA | _NESTED, 4 + v,
                                                 NFTA_DATA_VALUE), value))



def _setelem_message(add: bool, seq: int, table: str, name: str, elems: bytes) -> bytes:
    """One NEWSETELEM / DELSETELEM message of a batch: `elems` into set `name`."""
    return nfmessage(NEWSETELEM if add else DELSETELEM,
                     NLM_F_REQUEST | NLM_F_ACK | (NLM_F_CREATE if add else 0), seq,
                     NFPROTO_INET, 0,
                     attr_strz(NFTA_SET_ELEM_LIST_TABLE, table)
                     + attr_strz(NFTA_SET_ELEM_LIST_SET, name)
                     + nested(NFTA_SET_ELEM_LIST_ELEMENTS, elems))

def batch(text: str, first_seq: int) -> Tuple[bytes, List[int]]:
    """The NFNL batch for element `text`, and the sequence numbers whose acks to await.
    Raises ElementTextError (nothing built) for text it cannot express."""
    msgs = []
    seqs = []
    seq = first_seq
    for line in text.splitlines():
        if not line.strip():
            continue
        add, table, name, items = _line(line)
        elems = b"".join(_element(key, value) for key, value in items)
        seq += 1
        msgs.append(_setelem_message(add, seq, table, name, elems))
        seqs.append(seq)
    begin = nfmessage(NFNL_MSG_BATCH_BEGIN, NLM_F_REQUEST, first_seq, 0, NFNL_SUBSYS_NFTABLES)
    end = nfmessage(NFNL_MSG_BATCH_END, NLM_F_REQUEST, seq + 1, 0, NFNL_SUBSYS_NFTABLES)
    return begin + b"".join(msgs) + end, seqs


def spec_batch(spec: SessionSpec, first_seq: int, table: str = "lrk", seen: bool = True,
               admission: bool = True, add: bool = True) -> Tuple[bytes, List[int], List[str]]:
    """What `batch` makes of ``install_commands(spec)`` (`add`) or ``remove_commands(spec)``,
    built from the spec itself (no text to write and parse: a third of an install's
    cost); `admission` False leaves out the ``adm`` set (nfqueue mode). A plain unit only
    (a ForkSpec goes through text). Returns the batch, the acks to await and each
    message's set name."""
    if isinstance(spec, ForkSpec):
        raise ElementTextError("fork units are written from their text")
    fam = spec.family
    kinds = ["fwd", "mark", "out"] + (["adm"] if admission else []) + (["seen"] if seen else [])
    items: Dict[str, List[Tuple[bytes, Optional[bytes]]]] = {k: [] for k in kinds}
    for leg, other in ((spec.a, spec.b), (spec.b, spec.a)):
        if other.held:  # nothing toward a peer on hold (as kernel_rules.elements)
            continue
        relay = _part("a", leg.relay_ip, fam)
        peer = _part("a", other.peer_ip, fam)
        other_relay = _part("a", other.relay_ip, fam)
        for rtcp in (False, True):
            key = relay + _PORT.pack(leg.relay_port + rtcp)
            mark = _MARK.pack(leg.rtp_mark + rtcp)
            items["fwd"].append((key, peer + _PORT.pack(other.peer(rtcp)[1])))
            items["mark"].append((key, mark))
            items["out"].append((mark, other_relay + _PORT.pack(other.relay_port + rtcp)))
            if admission:
                items["adm"].append((key + _part("a", leg.peer_ip, fam), None))
            if seen:
                items["seen"].append((key, None))
    msgs = []
    seqs = []
    names = []
    seq = first_seq
    for kind in kinds:
        name = f"{kind}{fam}"
        seq += 1
        elems = b"".join(_element(k, v if add else None) for k, v in items[kind])
        msgs.append(_setelem_message(add, seq, table, name, elems))
        seqs.append(seq)
        names.append(name)
    begin = nfmessage(NFNL_MSG_BATCH_BEGIN, NLM_F_REQUEST, first_seq, 0, NFNL_SUBSYS_NFTABLES)
    end = nfmessage(NFNL_MSG_BATCH_END, NLM_F_REQUEST, seq + 1, 0, NFNL_SUBSYS_NFTABLES)
    return begin + b"".join(msgs) + end, seqs, names


def _io_error(err: int, op: str, detail: str = "") -> NftError:
    return NftError(f"nf_tables netlink {op}: {detail or os.strerror(err)}")


class ElementWriter:
    """An nf_tables netlink socket in the calling thread's network namespace that applies
    element text as one batch (about 20 us of kernel time per call's elements)."""

    backend = "netlink"

    def __init__(self, sock: Optional[socket.socket] = None, timeout: float = 5.0) -> None:
        self.nl = netlink.NetlinkSocket(sock, error=_io_error)
        self.nl.setopt(netlink.NETLINK_CAP_ACK)  # acks carry only the request's header
        self.nl.setopt(netlink.NETLINK_EXT_ACK)
        self.timeout = timeout

    def run(self, text: str) -> str:
        """Apply element `text` as one transaction; NftError (nothing applied) when the
        kernel refuses any of it, ElementTextError when it is not element text."""
        if not text.strip():
            return ""
        first = self.nl.next_seq()
        data, seqs = batch(text, first)
        self._apply(data, first, seqs, [ln for ln in text.splitlines() if ln.strip()])
        return ""

    def run_spec(self, spec: SessionSpec, table: str, seen: bool, admission: bool = True,
                 add: bool = True) -> None:
        """A plain unit's install (`add`) or removal, built from the spec (`spec_batch`)."""
        first = self.nl.next_seq()
        data, seqs, names = spec_batch(spec, first, table, seen, admission, add)
        self._apply(data, first, seqs, [f"{'add' if add else 'delete'} element inet "
                                        f"{table} {name} (call {spec.a.relay_ip} port "
                                        f"{spec.a.relay_port})" for name in names])

    def _apply(self, data: bytes, first: int, seqs: List[int], what: List[str]) -> None:
        """Send one batch and wait for every message's ack; NftError on any refusal."""
        for _ in range(len(seqs) + 1):
            self.nl.next_seq()  # keep the socket's numbering past this batch
        try:
            self.nl.send(data, "element batch")
            replies = self.nl.acks(seqs, self.timeout, "element batch")
        except NetlinkError as exc:
            raise NftError(f"element batch: {exc}") from None
        failed = [(seq, r.error) for seq, r in sorted(replies.items()) if r.error]
        if failed:
            line = what[failed[0][0] - first - 1]
            err = failed[0][1]
            raise NftError(f"the kernel refused {line[:160]!r}: {os.strerror(err)}"
                           + (" (an element already holds another value)"
                              if err in (errno.EEXIST, errno.EBUSY) else ""))

    def close(self) -> None:
        self.nl.close()
