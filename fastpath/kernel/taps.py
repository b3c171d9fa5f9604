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
relay addresses, destination port in ``[port_lo, port_hi]``.

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
#: what the filter lets through of an accepted packet (all of it, GSO included)
SNAPLEN = 0x40000


# --- classic BPF ---------------------------------------------------------

BPF_LD, BPF_LDX, BPF_JMP, BPF_RET = 0x00, 0x01, 0x05, 0x06
BPF_W, BPF_H, BPF_B = 0x00, 0x08, 0x10
BPF_ABS, BPF_IND, BPF_MSH = 0x20, 0x40, 0xA0
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


def build_filter(port_lo: int, port_hi: int, dst_ips: Sequence[str] = ()) -> bytes:
    """Classic BPF (array of struct sock_filter) accepting only relay-bound UDP.

    Offsets are L3 (a SOCK_DGRAM packet socket sees the network header at 0).
    With `dst_ips` empty any destination address passes; otherwise a family
    without listed addresses is rejected entirely.
    """
    _check_range(port_lo, port_hi)
    v4, v6 = _split_ips(dst_ips)
    anyip = not dst_ips
    J = BPF_JMP
    p: List[object] = [
        (BPF_LD | BPF_W | BPF_ABS, None, None, SKF_AD_OFF + SKF_AD_PKTTYPE),
        (J | BPF_JEQ, None, "reject", PACKET_HOST),
        (BPF_LD | BPF_W | BPF_ABS, None, None, SKF_AD_OFF + SKF_AD_PROTOCOL),
        (J | BPF_JEQ, "v4", None, ETH_P_IP),
        (J | BPF_JEQ, "v6", "reject", ETH_P_IPV6),
        "v4",
        (BPF_LD | BPF_B | BPF_ABS, None, None, 9),  # protocol
        (J | BPF_JEQ, None, "reject", 17),
        (BPF_LD | BPF_H | BPF_ABS, None, None, 6),  # flags + fragment offset
        (J | BPF_JSET, "reject", None, 0x3FFF),  # MF or offset: a fragment
    ]
    if not anyip and not v4:
        p.append((J | BPF_JA, "reject", None, 0))
    elif not anyip:
        p.append((BPF_LD | BPF_W | BPF_ABS, None, None, 16))  # daddr
        for i, a in enumerate(v4):
            last = i == len(v4) - 1
            p.append((J | BPF_JEQ, "ok4", "reject" if last else None, a))
    p += [
        "ok4",
        (BPF_LDX | BPF_B | BPF_MSH, None, None, 0),  # X = 4 * IHL
        (BPF_LD | BPF_H | BPF_IND, None, None, 2),  # UDP dport
        (J | BPF_JA, "ports", None, 0),
        "v6",
        (BPF_LD | BPF_B | BPF_ABS, None, None, 6),  # next header
        (J | BPF_JEQ, None, "reject", 17),
    ]
    if not anyip:
        for i, a in enumerate(v6):
            nxt = f"v6addr{i + 1}" if i < len(v6) - 1 else "reject"
            for w in range(4):
                p.append((BPF_LD | BPF_W | BPF_ABS, None, None, 24 + 4 * w))
                word = int.from_bytes(a[4 * w:4 * w + 4], "big")
                p.append((J | BPF_JEQ, "ok6" if w == 3 else None, nxt, word))
            if nxt != "reject":
                p.append(nxt)
        if not v6:
            p.append((J | BPF_JA, "reject", None, 0))
    p += [
        "ok6",
        (BPF_LD | BPF_H | BPF_ABS, None, None, 42),  # UDP dport after a 40-byte header
        "ports",
        (J | BPF_JGE, None, "reject", port_lo),
        (J | BPF_JGT, "reject", None, port_hi),
        (BPF_RET, None, None, SNAPLEN),
        "reject",
        (BPF_RET, None, None, 0),
    ]
    return _assemble(p)


# --- nftables text -------------------------------------------------------

_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_]{0,31}\Z")
_IFNAME = re.compile(r"[A-Za-z0-9_.:@-]{1,15}\Z")


def _table(table: str) -> str:
    if not isinstance(table, str) or not _NAME.match(table):
        raise PacketIoError(f"bad nftables table name {table!r}")
    return table


def drop_rules(table: str, port_start: int, port_end: int, relay_ips: Sequence[str],
               *, ifnames: Sequence[str] = ()) -> str:
    """nft text (re)creating ``inet <table>``: drop UDP to `relay_ips` in the port range.

    Priority raw (-300) in prerouting runs after the AF_PACKET tap, which has
    already copied the packet, and before conntrack (no entries are made).
    Both families count into the named counter ``dropped``.  `ifnames`
    restricts the drop to the interfaces a packet socket listens on (else media
    arriving elsewhere would vanish unread).  An output chain exempts the relay's own
    egress (source: a relay address and port) from conntrack.  Replacing is atomic
    in one run; prerouting never sees locally sent packets, so egress is never dropped.
    """
    table = _table(table)
    _check_range(port_start, port_end)
    v4, v6 = _split_ips(relay_ips)
    if not v4 and not v6:
        raise PacketIoError("drop_rules needs at least one relay address")
    for name in ifnames:
        if not isinstance(name, str) or not _IFNAME.match(name):
            raise PacketIoError(f"bad interface name {name!r}")
    iif = ""
    if ifnames:
        iif = "iifname { " + ", ".join(f'"{n}"' for n in ifnames) + " } "
    ports = f"{port_start}-{port_end}" if port_start != port_end else str(port_start)
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
                       dst_ips: Sequence[str] = (), protocol: int = ETH_P_ALL,
                       rcvbuf: int = 8 << 20,
                       sock: Optional[socket.socket] = None) -> socket.socket:
    """A non-blocking AF_PACKET/SOCK_DGRAM socket on `ifname` that reads relay media.

    The filter is attached before the socket is bound to a protocol, so no
    unfiltered packet is ever queued.  `sock` may be an unbound
    ``socket(AF_PACKET, SOCK_DGRAM, 0)`` made elsewhere (e.g. in another network
    namespace; the interface is looked up in the socket's namespace).  On
    failure the socket is closed and PacketIoError raised.
    """
    if protocol not in (ETH_P_ALL, ETH_P_IP, ETH_P_IPV6):
        raise PacketIoError(f"protocol must be ETH_P_ALL/IP/IPV6, got {protocol:#x}")
    if not isinstance(ifname, str) or not _IFNAME.match(ifname):
        raise PacketIoError(f"bad interface name {ifname!r}")
    code = build_filter(port_lo, port_hi, dst_ips)
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
