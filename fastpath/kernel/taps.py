"""AF_PACKET taps of the ``packet`` data-plane mode, as the daemon opens them (no kernel NAT).

Media is read from a packet socket bound to one interface, i.e. at the device
tap, before the IP stack: ``SOCK_DGRAM`` gives L3 packets (no link header).
Taps run before netfilter, so an nftables rule at prerouting priority ``raw``
(:func:`drop_rules`) can drop the very same packets afterwards and the kernel
never handles them a second time (no socket delivery, no ICMP unreachable, no
forwarding, no conntrack entry).

Only relay traffic should wake userspace, so a classic BPF program
(:func:`build_filter`) runs in the kernel on every packet of the interface and
accepts just: pkttype HOST (not sent by us, not promiscuous), IPv4 or IPv6,
UDP (IPv6 without extension headers), not a fragment, optionally one of the
relay addresses, destination port in ``[port_lo, port_hi]``; or, for a standby
(``standby_media``), destination exactly one of the peers' (address, port range)
pairs, so calls taken over from a peer are read too.

The daemon opens the taps (:func:`open_packet_socket`, so they queue media from
that moment on) and loads the drop rules; a worker reads them with
:class:`fastpath.worker.packet_io.PacketReader` and parses each packet with
:func:`fastpath.packet.parse_media`. ``build_filter``, ``drop_rules`` and
``destroy_rules`` are pure (sans-IO).
"""

from __future__ import annotations

import ipaddress
import re
import socket
import struct
from typing import List, Optional, Sequence, Tuple

from fastpath.packet import PacketIoError

__all__ = [
    "DEFAULT_TABLE",
    "ETH_P_ALL",
    "ETH_P_IP",
    "ETH_P_IPV6",
    "PacketIoError",
    "build_filter",
    "destroy_rules",
    "drop_rules",
    "open_packet_socket",
]

ETH_P_ALL = 0x0003
ETH_P_IP = 0x0800
ETH_P_IPV6 = 0x86DD

SOL_PACKET = 263
PACKET_IGNORE_OUTGOING = 23
SO_ATTACH_FILTER = 26
SO_RCVBUFFORCE = 33
PACKET_HOST = 0

#: nftables table (family inet) that holds the drop rules
DEFAULT_TABLE = "lrkpkt"
#: most relay addresses per family the BPF program compares against
MAX_FILTER_IPS = 32
#: most extra (address, port range) pairs (a standby's peers' media)
MAX_EXTRA_RANGES = 64
#: what the filter lets through of an accepted packet (all of it, GSO included)
SNAPLEN = 0x40000


# --- classic BPF ---------------------------------------------------------

BPF_LD, BPF_LDX, BPF_ST, BPF_JMP, BPF_RET = 0x00, 0x01, 0x02, 0x05, 0x06
BPF_W, BPF_H, BPF_B = 0x00, 0x08, 0x10
BPF_ABS, BPF_IND, BPF_MEM, BPF_MSH = 0x20, 0x40, 0x60, 0xA0
BPF_JA, BPF_JEQ, BPF_JGT, BPF_JGE, BPF_JSET = 0x00, 0x10, 0x20, 0x30, 0x40
SKF_AD_OFF = -0x1000
SKF_AD_PROTOCOL = 0
SKF_AD_PKTTYPE = 4
_INSN = struct.Struct("=HBBI")  # struct sock_filter, native byte order

# an instruction: (code, jt label, jf label, k); a label is a str, None means "next"
_Insn = Tuple[int, Optional[str], Optional[str], int]


def _assemble(items: List[object]) -> bytes:
    """Resolve label names (str items) into the relative jt/jf/ja offsets."""
    labels = {}
    insns: List[_Insn] = []
    for item in items:
        if isinstance(item, str):
            labels[item] = len(insns)
        else:
            insns.append(item)  # type: ignore[arg-type]
    out = bytearray()
    for i, (code, jt, jf, k) in enumerate(insns):
        def rel(label: Optional[str], i: int = i) -> int:
            if label is None:
                return 0
            off = labels[label] - i - 1
            if off < 0:
                raise PacketIoError(f"bpf: backward jump to {label}")
            return off
        if code == BPF_JMP | BPF_JA:
            out += _INSN.pack(code, 0, 0, rel(jt))
            continue
        t, f = rel(jt), rel(jf)
        if t > 255 or f > 255:
            raise PacketIoError("bpf: jump too far (too many filter addresses)")
        out += _INSN.pack(code, t, f, k & 0xFFFFFFFF)
    return bytes(out)


def _split_ips(ips: Sequence[str]) -> Tuple[List[int], List[bytes]]:
    v4: List[int] = []
    v6: List[bytes] = []
    for ip in ips:
        try:
            a = ipaddress.ip_address(str(ip).split("%", 1)[0])
        except ValueError as exc:
            raise PacketIoError(f"not an IP address: {ip!r}") from exc
        if a.version == 4:
            v4.append(int(a))
        else:
            v6.append(a.packed)
    if len(v4) > MAX_FILTER_IPS or len(v6) > MAX_FILTER_IPS:
        raise PacketIoError(f"at most {MAX_FILTER_IPS} addresses per family")
    return v4, v6


def _check_range(port_lo: int, port_hi: int) -> None:
    if not (isinstance(port_lo, int) and isinstance(port_hi, int)
            and 1 <= port_lo <= port_hi <= 65535):
        raise PacketIoError(f"bad port range {port_lo!r}-{port_hi!r}")


def _check_extra(extra: Sequence[Tuple[str, int, int]]) -> Tuple[List[Tuple[int, int, int]],
                                                                   List[Tuple[bytes, int, int]]]:
    """`extra` split by family: (address, first port, last port) each, validated."""
    if len(extra) > MAX_EXTRA_RANGES:
        raise PacketIoError(f"at most {MAX_EXTRA_RANGES} extra (address, port range) pairs")
    v4: List[Tuple[int, int, int]] = []
    v6: List[Tuple[bytes, int, int]] = []
    for item in extra:
        try:
            ip, lo, hi = item
        except (TypeError, ValueError) as exc:
            raise PacketIoError(f"extra entry {item!r} must be (address, first, last)") from exc
        _check_range(lo, hi)
        a4, a6 = _split_ips([ip])
        if a4:
            v4.append((a4[0], lo, hi))
        else:
            v6.append((a6[0], lo, hi))
    return v4, v6


def build_filter(port_lo: int, port_hi: int, dst_ips: Sequence[str] = (),
                 extra: Sequence[Tuple[str, int, int]] = ()) -> bytes:
    """Classic BPF (array of struct sock_filter) accepting only relay-bound UDP.

    Offsets are L3 (a SOCK_DGRAM packet socket sees the network header at 0).
    The own range: with `dst_ips` empty any destination address passes; otherwise
    a family without listed addresses is rejected entirely.  `extra`: more
    (address, first port, last port) pairs accepted too (a standby's peers'
    media, ``standby_media``): the address must match exactly.

    Every conditional jump lands within a few instructions (a local ``ret``
    follows each accepting or rejecting branch), so the 8-bit jump offsets of
    classic BPF never limit how many addresses or pairs there are; the family
    dispatch uses ``ja`` (32-bit offset).  The UDP destination port is kept in
    scratch memory M[0] while addresses are compared.
    """
    _check_range(port_lo, port_hi)
    v4, v6 = _split_ips(dst_ips)
    x4, x6 = _check_extra(extra)
    anyip = not dst_ips
    J = BPF_JMP
    ret_ok = (BPF_RET, None, None, SNAPLEN)
    ret_no = (BPF_RET, None, None, 0)
    p: List[object] = [
        (BPF_LD | BPF_W | BPF_ABS, None, None, SKF_AD_OFF + SKF_AD_PKTTYPE),
        (J | BPF_JEQ, None, "reject0", PACKET_HOST),
        (BPF_LD | BPF_W | BPF_ABS, None, None, SKF_AD_OFF + SKF_AD_PROTOCOL),
        (J | BPF_JEQ, "v4", None, ETH_P_IP),
        (J | BPF_JEQ, None, "reject0", ETH_P_IPV6),
        (J | BPF_JA, "v6", None, 0),
        "reject0",
        ret_no,
        # IPv4
        "v4",
        (BPF_LD | BPF_B | BPF_ABS, None, None, 9),  # protocol
        (J | BPF_JEQ, None, "reject4", 17),
        (BPF_LD | BPF_H | BPF_ABS, None, None, 6),  # flags + fragment offset
        (J | BPF_JSET, "reject4", "udp4", 0x3FFF),  # MF or offset: a fragment
        "reject4",
        ret_no,
        "udp4",
        (BPF_LDX | BPF_B | BPF_MSH, None, None, 0),  # X = 4 * IHL
        (BPF_LD | BPF_H | BPF_IND, None, None, 2),  # UDP dport
        (BPF_ST, None, None, 0),  # M[0] = dport
        (J | BPF_JGE, None, "far4", port_lo),
        (J | BPF_JGT, "far4", "own4", port_hi),
        "far4",
        (J | BPF_JA, "extra4", None, 0),  # past the own addresses
        "own4",
    ]
    if anyip:
        p.append(ret_ok)
    elif v4:
        p.append((BPF_LD | BPF_W | BPF_ABS, None, None, 16))  # daddr
        for i, a in enumerate(v4):
            p.append((J | BPF_JEQ, "ok4", "extra4" if i == len(v4) - 1 else None, a))
        p += ["ok4", ret_ok]
    p.append("extra4")
    for i, (a, lo, hi) in enumerate(x4):
        nxt = f"extra4_{i + 1}"
        p += [
            (BPF_LD | BPF_W | BPF_ABS, None, None, 16),  # daddr
            (J | BPF_JEQ, None, nxt, a),
            (BPF_LD | BPF_MEM, None, None, 0),  # dport
            (J | BPF_JGE, None, nxt, lo),
            (J | BPF_JGT, nxt, None, hi),
            ret_ok,
            nxt,
        ]
    p += [
        ret_no,
        # IPv6 (no extension headers)
        "v6",
        (BPF_LD | BPF_B | BPF_ABS, None, None, 6),  # next header
        (J | BPF_JEQ, "udp6", None, 17),
        ret_no,
        "udp6",
        (BPF_LD | BPF_H | BPF_ABS, None, None, 42),  # UDP dport after a 40-byte header
        (BPF_ST, None, None, 0),
        (J | BPF_JGE, None, "far6", port_lo),
        (J | BPF_JGT, "far6", "own6", port_hi),
        "far6",
        (J | BPF_JA, "extra6", None, 0),  # past the own addresses
        "own6",
    ]

    def addr6(a: bytes, miss: str) -> List[object]:
        out: List[object] = []
        for w in range(4):
            out.append((BPF_LD | BPF_W | BPF_ABS, None, None, 24 + 4 * w))
            out.append((J | BPF_JEQ, None, miss, int.from_bytes(a[4 * w:4 * w + 4], "big")))
        return out

    if anyip:
        p.append(ret_ok)
    elif v6:
        for i, a in enumerate(v6):
            nxt = f"own6_{i + 1}" if i < len(v6) - 1 else "extra6"
            p += addr6(a, nxt)
            p.append(ret_ok)
            if nxt != "extra6":
                p.append(nxt)
    p.append("extra6")
    for i, (a, lo, hi) in enumerate(x6):
        nxt = f"extra6_{i + 1}"
        p += addr6(a, nxt)
        p += [
            (BPF_LD | BPF_MEM, None, None, 0),
            (J | BPF_JGE, None, nxt, lo),
            (J | BPF_JGT, nxt, None, hi),
            ret_ok,
            nxt,
        ]
    p.append(ret_no)
    return _assemble(p)


# --- nftables text -------------------------------------------------------

_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_]{0,31}\Z")
_IFNAME = re.compile(r"[A-Za-z0-9_.:@-]{1,15}\Z")


def _table(table: str) -> str:
    if not isinstance(table, str) or not _NAME.match(table):
        raise PacketIoError(f"bad nftables table name {table!r}")
    return table


def _ports(lo: int, hi: int) -> str:
    return f"{lo}-{hi}" if lo != hi else str(lo)


def drop_rules(table: str, port_start: int, port_end: int, relay_ips: Sequence[str],
               *, ifnames: Sequence[str] = (),
               extra: Sequence[Tuple[str, int, int]] = ()) -> str:
    """nft text (re)creating ``inet <table>``: drop UDP to `relay_ips` in the port range.

    Priority raw (-300) in prerouting runs after the AF_PACKET tap, which has
    already copied the packet, and before conntrack (no entries are made).
    Both families count into the named counter ``dropped``.  `ifnames`
    restricts the drop to the interfaces a packet socket listens on (else media
    arriving elsewhere would vanish unread).  An output chain exempts the relay's own
    egress (source: a relay address and port) from conntrack.  Replacing is atomic
    in one run; prerouting never sees locally sent packets, so egress is never dropped.
    `extra` (address, first port, last port) pairs (a standby's peers' media) are
    dropped and exempted the same way, each address with its own range only.
    """
    table = _table(table)
    _check_range(port_start, port_end)
    v4, v6 = _split_ips(relay_ips)
    x4, x6 = _check_extra(extra)
    if not v4 and not v6:
        raise PacketIoError("drop_rules needs at least one relay address")
    for name in ifnames:
        if not isinstance(name, str) or not _IFNAME.match(name):
            raise PacketIoError(f"bad interface name {name!r}")
    iif = ""
    if ifnames:
        iif = "iifname { " + ", ".join(f'"{n}"' for n in ifnames) + " } "
    ports = _ports(port_start, port_end)
    lines = [
        f"table inet {table} {{}}",
        f"delete table inet {table}",
        f"table inet {table} {{",
        "\tcounter dropped {}",
        "\tchain prerouting {",
        "\t\ttype filter hook prerouting priority raw; policy accept;",
    ]
    ips4 = ", ".join(str(ipaddress.IPv4Address(a)) for a in v4)
    ips6 = ", ".join(str(ipaddress.IPv6Address(a)) for a in v6)
    if v4:
        lines.append(f'\t\t{iif}ip daddr {{ {ips4} }} udp dport {ports} '
                     f'counter name "dropped" drop')
    if v6:
        lines.append(f'\t\t{iif}ip6 daddr {{ {ips6} }} udp dport {ports} '
                     f'counter name "dropped" drop')
    peers = [("ip", str(ipaddress.IPv4Address(a)), lo, hi) for a, lo, hi in x4] + \
        [("ip6", str(ipaddress.IPv6Address(a)), lo, hi) for a, lo, hi in x6]
    for fam, addr, lo, hi in peers:
        lines.append(f'\t\t{iif}{fam} daddr {addr} udp dport {_ports(lo, hi)} '
                     f'counter name "dropped" drop')
    # the relay's own egress (raw sockets or its UDP sockets) bypasses conntrack: with
    # the ingress dropped before conntrack, an entry would only cost memory and a lookup
    lines += [
        "\t}",
        "\tchain output {",
        "\t\ttype filter hook output priority raw; policy accept;",
    ]
    if v4:
        lines.append(f"\t\tip saddr {{ {ips4} }} udp sport {ports} notrack")
    if v6:
        lines.append(f"\t\tip6 saddr {{ {ips6} }} udp sport {ports} notrack")
    for fam, addr, lo, hi in peers:
        lines.append(f"\t\t{fam} saddr {addr} udp sport {_ports(lo, hi)} notrack")
    lines += ["\t}", "}", ""]
    return "\n".join(lines)


def destroy_rules(table: str) -> str:
    """nft text removing the table; succeeds when it is already gone (nft 1.0.6
    has no ``destroy``, so the table is declared first, then deleted)."""
    table = _table(table)
    return f"table inet {table} {{}}\ndelete table inet {table}\n"


# --- sockets -------------------------------------------------------------

def _fprog(code: bytes) -> Tuple[bytes, object]:
    """struct sock_fprog bytes pointing at a ctypes copy of the program (keep it alive)."""
    import ctypes

    buf = ctypes.create_string_buffer(code, len(code))
    return struct.pack("@HP", len(code) // _INSN.size, ctypes.addressof(buf)), buf


def open_packet_socket(ifname: str, port_lo: int, port_hi: int, *,
                       dst_ips: Sequence[str] = (),
                       extra: Sequence[Tuple[str, int, int]] = (),
                       protocol: int = ETH_P_ALL,
                       rcvbuf: int = 8 << 20,
                       sock: Optional[socket.socket] = None) -> socket.socket:
    """A non-blocking AF_PACKET/SOCK_DGRAM socket on `ifname` that reads relay media.

    The filter is attached before the socket is bound to a protocol, so no
    unfiltered packet is ever queued.  `sock` may be an unbound
    ``socket(AF_PACKET, SOCK_DGRAM, 0)`` made elsewhere (e.g. in another network
    namespace; the interface is looked up in the socket's namespace).  `extra`: more
    (address, first port, last port) pairs to read (:func:`build_filter`).  On
    failure the socket is closed and PacketIoError raised.
    """
    if protocol not in (ETH_P_ALL, ETH_P_IP, ETH_P_IPV6):
        raise PacketIoError(f"protocol must be ETH_P_ALL/IP/IPV6, got {protocol:#x}")
    if not isinstance(ifname, str) or not _IFNAME.match(ifname):
        raise PacketIoError(f"bad interface name {ifname!r}")
    code = build_filter(port_lo, port_hi, dst_ips, extra)
    try:
        if sock is None:
            sock = socket.socket(socket.AF_PACKET, socket.SOCK_DGRAM, 0)
        elif sock.family != socket.AF_PACKET or sock.type != socket.SOCK_DGRAM:
            raise PacketIoError("sock must be an AF_PACKET/SOCK_DGRAM socket")
    except OSError as exc:
        raise PacketIoError(f"packet socket: {exc}") from exc
    try:
        prog, keep = _fprog(code)
        sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, prog)
        del keep  # the kernel copied the program
        try:
            sock.setsockopt(SOL_PACKET, PACKET_IGNORE_OUTGOING, 1)
        except OSError:
            pass  # before Linux 4.20; the filter's pkttype test still drops them
        try:
            sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, rcvbuf)
        except OSError:  # not CAP_NET_ADMIN: capped by net.core.rmem_max
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.setblocking(False)
        sock.bind((ifname, protocol))
    except OSError as exc:
        sock.close()
        raise PacketIoError(f"packet socket on {ifname}: {exc}") from exc
    except BaseException:
        sock.close()
        raise
    return sock
