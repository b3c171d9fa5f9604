"""nfnetlink_queue (NFQUEUE) wire format, sans-IO: bytes in, bytes out.

Speaks the protocol of ``linux/netfilter/nfnetlink_queue.h`` directly, so the
fast path needs neither libnetfilter_queue nor a C extension and runs the same
on PyPy and CPython.  The socket lives in :mod:`fastpath.kernel.nfqueue_socket`;
netlink framing (headers, attributes, padding, error replies) is
:mod:`fastpath.kernel.netlink`'s.  Attribute payloads of nfnetlink_queue
(packet id, mark, verdict, copy range, flags, ...) are big-endian, as is
``nfgenmsg.res_id`` (the queue number).

Kernel behaviour this codec is written against (net/netfilter/nfnetlink_queue.c):

* ``NFQNL_CFG_CMD_PF_BIND``/``PF_UNBIND`` are no-ops since Linux 3.8; a
  ``BIND`` with the queue number in ``res_id`` is all a queue needs, so
  config messages use ``nfgen_family = AF_UNSPEC``.
* ``BIND`` of a queue that this socket already bound fails with EBUSY; any
  config or verdict on a queue bound by *another* socket fails with EPERM
  (as does everything without CAP_NET_ADMIN).
* ``NFQA_CFG_FLAGS`` needs ``NFQA_CFG_MASK`` (else EINVAL).
* A batch verdict applies to every queued packet whose id is <= the given id
  (in queue order); ENOENT when there is none.
* Verdict ``NF_QUEUE`` carries the target queue number in its upper 16 bits
  (see :func:`queue_verdict`).

Steering packets into a queue: nft's ``queue`` statement needs
CONFIG_NFT_QUEUE, which some kernels (the Linux 6.18 CI VM among them) lack
while they do have xt_NFQUEUE and nft_compat; nft then fails with "Could not
process rule: No such file or directory".  :func:`build_nft_queue_rule`
appends the xtables NFQUEUE target to an existing nftables chain through
nft_compat instead (what iptables-nft does; nft lists it as ``xt target
NFQUEUE``).
"""

from __future__ import annotations

import errno as _errno
import struct
from typing import Dict, List, Optional, Union

from fastpath.errors import LrkError
from fastpath.kernel import netlink
from fastpath.kernel.netlink import (
    NFGENMSG,
    NFNL_MSG_BATCH_BEGIN,
    NFNL_MSG_BATCH_END,
    NLM_F_ACK,
    NLM_F_APPEND,
    NLM_F_CREATE,
    NLM_F_REQUEST,
    NLMSG_ERROR,
    NetlinkDecodeError,
    attr,
    attr_be32,
    attr_strz,
    nested,
    nfmessage,
)

__all__ = [
    "NFNL_SUBSYS_QUEUE",
    "NF_DROP", "NF_ACCEPT", "NF_QUEUE", "NF_REPEAT", "NF_STOP",
    "NFQNL_COPY_NONE", "NFQNL_COPY_META", "NFQNL_COPY_PACKET",
    "NFQA_CFG_F_FAIL_OPEN", "NFQA_CFG_F_CONNTRACK", "NFQA_CFG_F_GSO",
    "NFQA_CFG_F_UID_GID", "NFQA_CFG_F_SECCTX",
    "NfQueueError", "NfQueueDecodeError", "NfQueueArgumentError",
    "QueuedPacket", "NetlinkAck",
    "build_config", "build_bind", "build_unbind", "build_params", "build_maxlen",
    "build_flags", "build_verdict", "build_verdict_batch", "queue_verdict",
    "parse_message", "parse_messages", "parse_attrs", "error_from_errno",
    "build_nft_queue_rule", "NFPROTO_INET", "NFPROTO_IPV4", "NFPROTO_IPV6",
]

# --- constants (linux/netfilter/nfnetlink_queue.h, netfilter.h) ---

NFNL_SUBSYS_QUEUE = 3
NFQNL_MSG_PACKET = 0
NFQNL_MSG_VERDICT = 1
NFQNL_MSG_CONFIG = 2
NFQNL_MSG_VERDICT_BATCH = 3

NFQNL_CFG_CMD_NONE = 0
NFQNL_CFG_CMD_BIND = 1
NFQNL_CFG_CMD_UNBIND = 2
NFQNL_CFG_CMD_PF_BIND = 3
NFQNL_CFG_CMD_PF_UNBIND = 4

NFQNL_COPY_NONE = 0
NFQNL_COPY_META = 1
NFQNL_COPY_PACKET = 2
#: the kernel clamps copy_range to 0xffff - NLA_HDRLEN
NFQNL_MAX_COPY_RANGE = 0xFFFF - 4

NFQA_CFG_CMD = 1
NFQA_CFG_PARAMS = 2
NFQA_CFG_QUEUE_MAXLEN = 3
NFQA_CFG_MASK = 4
NFQA_CFG_FLAGS = 5

NFQA_CFG_F_FAIL_OPEN = 1 << 0
NFQA_CFG_F_CONNTRACK = 1 << 1
NFQA_CFG_F_GSO = 1 << 2
NFQA_CFG_F_UID_GID = 1 << 3
NFQA_CFG_F_SECCTX = 1 << 4
NFQA_CFG_F_MAX = 1 << 5

NFQA_PACKET_HDR = 1
NFQA_VERDICT_HDR = 2
NFQA_MARK = 3
NFQA_TIMESTAMP = 4
NFQA_IFINDEX_INDEV = 5
NFQA_IFINDEX_OUTDEV = 6
NFQA_IFINDEX_PHYSINDEV = 7
NFQA_IFINDEX_PHYSOUTDEV = 8
NFQA_HWADDR = 9
NFQA_PAYLOAD = 10
NFQA_CT = 11
NFQA_CT_INFO = 12
NFQA_CAP_LEN = 13
NFQA_SKB_INFO = 14
NFQA_EXP = 15
NFQA_UID = 16
NFQA_GID = 17

NFQA_SKB_CSUMNOTREADY = 1 << 0
NFQA_SKB_GSO = 1 << 1
NFQA_SKB_CSUM_NOTVERIFIED = 1 << 2

NF_DROP = 0
NF_ACCEPT = 1
NF_STOLEN = 2
NF_QUEUE = 3
NF_REPEAT = 4
NF_STOP = 5
NF_VERDICT_MASK = 0xFF
#: with NF_QUEUE: accept instead of drop when the target queue has no reader
NF_VERDICT_FLAG_QUEUE_BYPASS = 0x8000
#: verdicts userspace may give (NF_STOLEN would leak the packet in the kernel)
_VALID_VERDICTS = frozenset((NF_DROP, NF_ACCEPT, NF_QUEUE, NF_REPEAT, NF_STOP))

#: nlmsg_type of every nfnetlink_queue message: subsystem << 8 | message
NFQ_TYPE_PACKET = (NFNL_SUBSYS_QUEUE << 8) | NFQNL_MSG_PACKET
NFQ_TYPE_VERDICT = (NFNL_SUBSYS_QUEUE << 8) | NFQNL_MSG_VERDICT
NFQ_TYPE_CONFIG = (NFNL_SUBSYS_QUEUE << 8) | NFQNL_MSG_CONFIG
NFQ_TYPE_VERDICT_BATCH = (NFNL_SUBSYS_QUEUE << 8) | NFQNL_MSG_VERDICT_BATCH

AF_UNSPEC = 0

_BE32 = struct.Struct("!I")
_BE64X2 = struct.Struct("!QQ")
_PKT_HDR = struct.Struct("!IHB")  # nfqnl_msg_packet_hdr, packed: id, hw_protocol, hook

_U16 = 0xFFFF
_U32 = 0xFFFFFFFF


# --- errors ---

#: names the kernel sources use where Python's errorcode differs (95 is "ENOTSUP" there),
#: and kernel-internal values that leak to netlink
_KERNEL_ERRNO_NAMES = {_errno.EOPNOTSUPP: "EOPNOTSUPP", 524: "ENOTSUPP"}

_HINTS = {
    "EPERM": "needs CAP_NET_ADMIN in the socket's network namespace (run as root or grant "
             "the capability), or the queue is bound by another netlink socket/process: "
             "stop that process or use another queue number",
    "EBUSY": "this socket already bound the queue; bind once per queue",
    "ENODEV": "the queue is not bound (call bind() first); after unbind or close the "
              "queue is gone",
    "ENOENT": "no packet with that id (or none up to that id for a batch) is waiting: "
              "it already got a verdict or the id is wrong",
    "EINVAL": "the kernel rejected the message: verdict out of range, flags without a "
              "mask or a malformed attribute",
    "EOPNOTSUPP": "the kernel lacks this feature: nfnetlink_queue itself, or for the "
                  "conntrack flag CONFIG_NETFILTER_NETLINK_GLUE_CT (secctx: "
                  "CONFIG_NETWORK_SECMARK), or a flag unknown to it",
    "ENOTSUPP": "unknown config command for this kernel",
    "ENOBUFS": "the socket receive buffer overflowed; raise rcvbuf or read faster",
    "EPROTONOSUPPORT": "no NETLINK_NETFILTER in this kernel (CONFIG_NETFILTER_NETLINK)",
    "EAFNOSUPPORT": "no AF_NETLINK sockets in this kernel or sandbox",
    "ETIMEDOUT": "the kernel did not answer; is the socket in the right network namespace?",
}


class NfQueueError(LrkError):
    """An nfnetlink_queue operation failed; carries the errno name and what to do."""

    code = "nfqueue"

    def __init__(self, message: str, errno: int = 0, op: str = "") -> None:
        super().__init__(message)
        self.errno = errno
        self.errno_name = errno_name(errno) if errno else ""
        self.op = op


class NfQueueDecodeError(NfQueueError):
    """A buffer read from the netlink socket is not a well-formed netlink message."""


class NfQueueArgumentError(NfQueueError, ValueError):
    """A message builder got a value the kernel would reject or mis-read."""


def errno_name(err: int) -> str:
    """Symbolic name of a positive errno value, e.g. 1 -> "EPERM"."""
    return _KERNEL_ERRNO_NAMES.get(err) or _errno.errorcode.get(err, f"errno {err}")


def error_from_errno(err: int, op: str, detail: str = "",
                     hints: Optional[Dict[str, str]] = None) -> NfQueueError:
    """The typed error for a negative-errno netlink answer (or OSError) to `op`.

    `hints` (errno name -> text) overrides the generic hints for this operation.
    """
    err = abs(err)
    name = errno_name(err)
    hint = (hints or {}).get(name) or _HINTS.get(name, "")
    text = f"nfqueue {op}: {name}"
    if detail:
        text += f" ({detail})"
    if hint:
        text += f": {hint}"
    return NfQueueError(text, err, op)


# --- message building ---


def _check_range(name: str, value: int, hi: int, lo: int = 0) -> None:
    if not isinstance(value, int) or not lo <= value <= hi:
        raise NfQueueArgumentError(f"nfqueue {name} must be an integer in {lo}..{hi}, "
                                   f"got {value!r}")


def build_config(queue_num: int, *, command: Optional[int] = None, pf: int = AF_UNSPEC,
                 copy_mode: Optional[int] = None, copy_range: int = 0xFFFF,
                 maxlen: Optional[int] = None, flags: Optional[int] = None,
                 mask: Optional[int] = None, seq: int = 0, ack: bool = True) -> bytes:
    """One NFQNL_MSG_CONFIG; the kernel applies command, params, maxlen, flags in that order."""
    _check_range("queue number", queue_num, _U16)
    attrs = b""
    if command is not None:
        _check_range("config command", command, 0xFF)
        _check_range("pf", pf, _U16)
        attrs += attr(NFQA_CFG_CMD, struct.pack("!BBH", command, 0, pf))
    if copy_mode is not None:
        _check_range("copy mode", copy_mode, NFQNL_COPY_PACKET)
        _check_range("copy range", copy_range, _U32)
        attrs += attr(NFQA_CFG_PARAMS, struct.pack("!IB", copy_range, copy_mode))
    if maxlen is not None:
        _check_range("queue maxlen", maxlen, _U32)
        attrs += attr_be32(NFQA_CFG_QUEUE_MAXLEN, maxlen)
    if flags is not None:
        _check_range("flags", flags, NFQA_CFG_F_MAX - 1)
        mask = flags if mask is None else mask
        _check_range("flag mask", mask, _U32)
        attrs += attr_be32(NFQA_CFG_MASK, mask) + attr_be32(NFQA_CFG_FLAGS, flags)
    elif mask is not None:
        raise NfQueueArgumentError("nfqueue flag mask given without flags")
    msg_flags = NLM_F_REQUEST | (NLM_F_ACK if ack else 0)
    return nfmessage(NFQ_TYPE_CONFIG, msg_flags, seq, AF_UNSPEC, queue_num, attrs)


def build_bind(queue_num: int, seq: int = 0) -> bytes:
    """Create queue `queue_num` owned by the sending socket (acked)."""
    return build_config(queue_num, command=NFQNL_CFG_CMD_BIND, seq=seq)


def build_unbind(queue_num: int, seq: int = 0) -> bytes:
    """Destroy queue `queue_num`; packets still waiting in it are dropped (acked)."""
    return build_config(queue_num, command=NFQNL_CFG_CMD_UNBIND, seq=seq)


def build_params(queue_num: int, copy_range: int, copy_mode: int = NFQNL_COPY_PACKET,
                 seq: int = 0) -> bytes:
    """Copy mode and how many bytes of each packet the kernel sends up (acked)."""
    return build_config(queue_num, copy_mode=copy_mode, copy_range=copy_range, seq=seq)


def build_maxlen(queue_num: int, maxlen: int, seq: int = 0) -> bytes:
    """Packets the kernel keeps waiting for a verdict before it drops (or fails open)."""
    return build_config(queue_num, maxlen=maxlen, seq=seq)


def build_flags(queue_num: int, flags: int, mask: Optional[int] = None, seq: int = 0) -> bytes:
    """Set the NFQA_CFG_F_* bits in `mask` to their value in `flags` (mask defaults to flags)."""
    return build_config(queue_num, flags=flags, mask=mask, seq=seq)


def queue_verdict(queue_num: int, bypass: bool = False) -> int:
    """The verdict that moves a packet on to queue `queue_num` (NF_QUEUE | num << 16)."""
    _check_range("queue number", queue_num, _U16)
    return NF_QUEUE | (queue_num << 16) | (NF_VERDICT_FLAG_QUEUE_BYPASS if bypass else 0)


def _check_verdict(verdict: int) -> None:
    _check_range("verdict", verdict, _U32)
    if verdict & NF_VERDICT_MASK not in _VALID_VERDICTS or verdict & 0x7F00:
        raise NfQueueArgumentError(
            f"nfqueue verdict {verdict:#x} is not NF_DROP(0), NF_ACCEPT(1), NF_REPEAT(4), "
            "NF_STOP(5) or queue_verdict(n)")


def build_verdict(queue_num: int, packet_id: int, verdict: int, *, mark: Optional[int] = None,
                  payload: Optional[bytes] = None, seq: int = 0, ack: bool = False) -> bytes:
    """NFQNL_MSG_VERDICT for one packet, optionally setting its mark or replacing its bytes.

    A replacement payload is the whole L3 packet: never send back a payload
    that arrived truncated (``QueuedPacket.truncated``), it would cut the
    packet.  The kernel does not fix checksums and marks the packet as
    unchecked, so the caller must (a UDP/IPv4 checksum may be zeroed); with
    NFQA_SKB_CSUMNOTREADY in ``skb_info`` the received checksum is only a
    partial one (offload) and must be recomputed even for unchanged data.
    """
    _check_range("queue number", queue_num, _U16)
    _check_range("packet id", packet_id, _U32)
    _check_verdict(verdict)
    attrs = attr(NFQA_VERDICT_HDR, struct.pack("!II", verdict, packet_id))
    if mark is not None:
        _check_range("mark", mark, _U32)
        attrs += attr_be32(NFQA_MARK, mark)
    if payload is not None:
        if len(payload) > NFQNL_MAX_COPY_RANGE:
            raise NfQueueArgumentError(f"nfqueue replacement payload of {len(payload)} bytes "
                                       f"exceeds {NFQNL_MAX_COPY_RANGE}")
        attrs += attr(NFQA_PAYLOAD, bytes(payload))
    return nfmessage(NFQ_TYPE_VERDICT, NLM_F_REQUEST | (NLM_F_ACK if ack else 0), seq,
                    AF_UNSPEC, queue_num, attrs)


def build_verdict_batch(queue_num: int, last_id: int, verdict: int, *,
                        mark: Optional[int] = None, seq: int = 0, ack: bool = False) -> bytes:
    """NFQNL_MSG_VERDICT_BATCH: `verdict` (and `mark`) for all waiting packets with id<=last_id."""
    _check_range("queue number", queue_num, _U16)
    _check_range("packet id", last_id, _U32)
    _check_verdict(verdict)
    attrs = attr(NFQA_VERDICT_HDR, struct.pack("!II", verdict, last_id))
    if mark is not None:
        _check_range("mark", mark, _U32)
        attrs += attr_be32(NFQA_MARK, mark)
    return nfmessage(NFQ_TYPE_VERDICT_BATCH, NLM_F_REQUEST | (NLM_F_ACK if ack else 0), seq,
                    AF_UNSPEC, queue_num, attrs)


# --- an xt NFQUEUE rule for nftables (nft_compat) ---

NFNL_SUBSYS_NFTABLES = 10
NFT_MSG_NEWRULE = 6
NFPROTO_INET = 1
NFPROTO_IPV4 = 2
NFPROTO_IPV6 = 10
NFQ_FLAG_BYPASS = 0x01
NFQ_FLAG_CPU_FANOUT = 0x02
_NFT_RULE_SEQ_OFFSET = 1

#: hints for errors of :func:`build_nft_queue_rule` batches
NFT_RULE_HINTS = {
    "ENOENT": "the table or chain does not exist in this network namespace; create them "
              "first (nft add table / add chain) with the same family",
    "EOPNOTSUPP": "nft_compat or xt_NFQUEUE is missing from this kernel "
                  "(CONFIG_NFT_COMPAT, CONFIG_NETFILTER_XT_TARGET_NFQUEUE)",
    "EINVAL": "queue range invalid (queue_num + queues_total - 1 must be <= 65535)",
}


def build_nft_queue_rule(family: int, table: str, chain: str, queue_num: int, *,
                         queues_total: int = 1, bypass: bool = False, cpu_fanout: bool = False,
                         seq: int = 0) -> bytes:
    """An nf_tables batch appending ``xt NFQUEUE`` to `family` `table` `chain`.

    For kernels without nft's own queue expression.  The rule has no match:
    jump to its chain from a rule that selects the packets.  Only the rule
    message (sequence ``seq + 1``) is acked.  `bypass`: accept instead of
    drop while no reader is bound.  `queues_total` > 1 spreads flows over
    queue_num.. (by hash, or by CPU with `cpu_fanout`).
    """
    _check_range("nfproto family", family, 0xFF)
    _check_range("queue number", queue_num, _U16)
    _check_range("queues total", queues_total, _U16 - queue_num + 1, 1)
    flags = (NFQ_FLAG_BYPASS if bypass else 0) | (NFQ_FLAG_CPU_FANOUT if cpu_fanout else 0)
    info = struct.pack("=HHH", queue_num, queues_total, flags) + b"\0\0"  # XT_ALIGN(6)
    target = (attr_strz(1, "NFQUEUE")  # NFTA_TARGET_NAME
              + attr_be32(2, 3)  # NFTA_TARGET_REV: xt_NFQ_info_v3
              + attr(3, info))  # NFTA_TARGET_INFO
    expr = attr_strz(1, "target") + nested(2, target)  # EXPR_NAME, EXPR_DATA
    rule = (attr_strz(1, table) + attr_strz(2, chain)  # NFTA_RULE_TABLE, _CHAIN
            + nested(4, nested(1, expr)))  # NFTA_RULE_EXPRESSIONS [NFTA_LIST_ELEM]
    res_id = NFNL_SUBSYS_NFTABLES
    return (nfmessage(NFNL_MSG_BATCH_BEGIN, NLM_F_REQUEST, seq, AF_UNSPEC, res_id)
            + nfmessage((NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_NEWRULE,
                        NLM_F_REQUEST | NLM_F_CREATE | NLM_F_APPEND | NLM_F_ACK,
                        seq + _NFT_RULE_SEQ_OFFSET, family, 0, rule)
            + nfmessage(NFNL_MSG_BATCH_END, NLM_F_REQUEST, seq + 2, AF_UNSPEC, res_id))


# --- parsing ---


class QueuedPacket:
    """A packet waiting in the kernel for a verdict (one NFQNL_MSG_PACKET).

    `payload` starts at the L3 header and holds at most copy_range bytes;
    `cap_len` is the full packet length when the payload was cut short
    (None otherwise).  `mark` is 0 when the kernel sent no NFQA_MARK.
    `ct` is the raw NFQA_CT nest (see :func:`parse_attrs`), present with
    the CONNTRACK flag.
    """

    __slots__ = ("packet_id", "hw_protocol", "hook", "mark", "payload", "queue_num", "family",
                 "indev", "outdev", "cap_len", "skb_info", "ct", "ct_info", "uid", "gid",
                 "timestamp")

    def __init__(self, packet_id: int, hw_protocol: int, hook: int, mark: int = 0,
                 payload: bytes = b"", queue_num: int = 0, family: int = AF_UNSPEC,
                 indev: Optional[int] = None, outdev: Optional[int] = None,
                 cap_len: Optional[int] = None, skb_info: int = 0, ct: Optional[bytes] = None,
                 ct_info: Optional[int] = None, uid: Optional[int] = None,
                 gid: Optional[int] = None, timestamp: Optional[float] = None) -> None:
        self.packet_id = packet_id
        self.hw_protocol = hw_protocol
        self.hook = hook
        self.mark = mark
        self.payload = payload
        self.queue_num = queue_num
        self.family = family
        self.indev = indev
        self.outdev = outdev
        self.cap_len = cap_len
        self.skb_info = skb_info
        self.ct = ct
        self.ct_info = ct_info
        self.uid = uid
        self.gid = gid
        self.timestamp = timestamp

    @property
    def truncated(self) -> bool:
        """True when `payload` is only the first copy_range bytes of the packet."""
        return self.cap_len is not None and self.cap_len > len(self.payload)

    def _key(self) -> tuple:
        return tuple(getattr(self, name) for name in self.__slots__)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, QueuedPacket) and self._key() == other._key()

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return (f"QueuedPacket(id={self.packet_id}, queue={self.queue_num}, hook={self.hook}, "
                f"hw_protocol={self.hw_protocol:#06x}, mark={self.mark:#x}, "
                f"len={len(self.payload)}, cap_len={self.cap_len})")


class NetlinkAck:
    """An NLMSG_ERROR: `error` 0 is an ack, else the positive errno of request `seq`."""

    __slots__ = ("seq", "error", "request_type", "message")

    def __init__(self, seq: int, error: int, request_type: int = 0, message: str = "") -> None:
        self.seq = seq
        self.error = error
        self.request_type = request_type
        self.message = message

    def exception(self, op: str = "", hints: Optional[Dict[str, str]] = None) -> NfQueueError:
        """The typed error this answer stands for (call only when `error` is non-zero)."""
        return error_from_errno(self.error, op or _op_name(self.request_type), self.message,
                                hints)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, NetlinkAck) and (
            self.seq, self.error, self.request_type, self.message) == (
            other.seq, other.error, other.request_type, other.message)

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        what = "ack" if not self.error else errno_name(self.error)
        return f"NetlinkAck(seq={self.seq}, {what}, type={self.request_type:#x})"


def _op_name(mtype: int) -> str:
    return {NFQ_TYPE_CONFIG: "config", NFQ_TYPE_VERDICT: "verdict",
            NFQ_TYPE_VERDICT_BATCH: "batch verdict"}.get(mtype, f"message {mtype:#x}")


def parse_attrs(data: bytes, start: int = 0, end: Optional[int] = None) -> Dict[int, bytes]:
    """{type: payload} of the attributes in data[start:end] (flags masked off, last wins)."""
    try:
        return netlink.attr_map(data, start, end)
    except NetlinkDecodeError as exc:
        raise NfQueueDecodeError(f"nfqueue: {exc}") from None


def _ack(buf: bytes, flags: int, seq: int, body: int, end: int) -> NetlinkAck:
    """The NetlinkAck of one NLMSG_ERROR (body at `body`)."""
    reply = netlink.parse_error(buf, body, end, flags)
    return NetlinkAck(seq, reply.error, reply.request_type, reply.message)


def _parse_packet(buf: bytes, body: int, end: int) -> QueuedPacket:
    """The QueuedPacket of one NFQNL_MSG_PACKET (nfgenmsg at `body`)."""
    if end - body < NFGENMSG.size:
        raise NfQueueDecodeError(f"nfqueue: packet message of {end - body + 16} bytes has no "
                                 "nfgenmsg")
    family, _version, queue_num = NFGENMSG.unpack_from(buf, body)
    pkt: Optional[QueuedPacket] = None
    mark = 0
    payload = b""
    indev = outdev = cap_len = ct_info = uid = gid = None
    skb_info = 0
    ct = None
    timestamp = None
    attr_at = netlink.attr_at
    a = body + NFGENMSG.size
    while a + 4 <= end:
        atype, e, a_next = attr_at(buf, a, end)
        d = a + 4
        a = a_next
        dlen = e - d
        if atype == NFQA_PAYLOAD:
            payload = bytes(buf[d:e])
        elif atype == NFQA_PACKET_HDR:
            if dlen < 7:
                raise NfQueueDecodeError(f"nfqueue: NFQA_PACKET_HDR of {dlen} bytes (need 7)")
            pkt = QueuedPacket(*_PKT_HDR.unpack_from(buf, d))
        elif dlen >= 4 and atype <= NFQA_GID:
            if atype == NFQA_MARK:
                mark = _BE32.unpack_from(buf, d)[0]
            elif atype == NFQA_IFINDEX_INDEV:
                indev = _BE32.unpack_from(buf, d)[0]
            elif atype == NFQA_IFINDEX_OUTDEV:
                outdev = _BE32.unpack_from(buf, d)[0]
            elif atype == NFQA_CAP_LEN:
                cap_len = _BE32.unpack_from(buf, d)[0]
            elif atype == NFQA_SKB_INFO:
                skb_info = _BE32.unpack_from(buf, d)[0]
            elif atype == NFQA_CT:
                ct = bytes(buf[d:e])
            elif atype == NFQA_CT_INFO:
                ct_info = _BE32.unpack_from(buf, d)[0]
            elif atype == NFQA_UID:
                uid = _BE32.unpack_from(buf, d)[0]
            elif atype == NFQA_GID:
                gid = _BE32.unpack_from(buf, d)[0]
            elif atype == NFQA_TIMESTAMP and dlen >= 16:
                sec, usec = _BE64X2.unpack_from(buf, d)
                timestamp = sec + usec / 1e6
    if pkt is None:
        raise NfQueueDecodeError("nfqueue: packet message without NFQA_PACKET_HDR")
    pkt.mark = mark
    pkt.payload = payload
    pkt.queue_num = queue_num
    pkt.family = family
    pkt.indev = indev
    pkt.outdev = outdev
    pkt.cap_len = cap_len
    pkt.skb_info = skb_info
    pkt.ct = ct
    pkt.ct_info = ct_info
    pkt.uid = uid
    pkt.gid = gid
    pkt.timestamp = timestamp
    return pkt


def parse_message(buf: Union[bytes, bytearray, memoryview], mtype: int, flags: int, seq: int,
                  body: int, end: int) -> Union[QueuedPacket, NetlinkAck, None]:
    """A packet or an ack/error of one netlink message; None for anything else.
    Raises NfQueueDecodeError for a malformed one."""
    try:
        if mtype == NFQ_TYPE_PACKET:
            return _parse_packet(buf, body, end)
        if mtype == NLMSG_ERROR:
            return _ack(buf, flags, seq, body, end)
    except NetlinkDecodeError as exc:
        raise NfQueueDecodeError(f"nfqueue: {exc}") from None
    return None


def parse_messages(buf: Union[bytes, bytearray, memoryview],
                   length: Optional[int] = None) -> List[Union[QueuedPacket, NetlinkAck]]:
    """Packets and acks/errors in the first `length` bytes of what the socket returned.

    NLMSG_DONE/NOOP/OVERRUN and messages of other subsystems are skipped.
    Raises NfQueueDecodeError (and nothing else) for a malformed buffer.
    """
    out: List[Union[QueuedPacket, NetlinkAck]] = []
    try:
        for mtype, flags, seq, body, end in netlink.messages(buf, length):
            item = parse_message(buf, mtype, flags, seq, body, end)
            if item is not None:
                out.append(item)
    except NetlinkDecodeError as exc:
        raise NfQueueDecodeError(f"nfqueue: {exc}") from None
    return out
