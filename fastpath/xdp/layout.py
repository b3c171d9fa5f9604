"""Byte layout of the XDP program's maps (relay.bpf.c: keep in step), sans-IO.

Keys and values are packed here and nowhere else; addresses are 16 bytes (IPv4 in
the first 4), ports in network order, as the program compares them with packet bytes.
"""

from __future__ import annotations

import ipaddress
import struct
from typing import NamedTuple, Optional, Sequence, Tuple

#: verdict counter names, in the program's enum order
REASONS = (
    "redirect", "tx", "pass_other", "pass_short", "pass_kernel", "pass_source_port",
    "pass_peer_nat", "pass_fragment", "pass_options", "pass_ttl", "pass_fib",
    "drop_no_destination", "drop_unexpected_source", "drop_malformed", "pass_egress",
)
#: entry flags
F_KERNEL = 1
F_CHECK_PEER = 2
#: what the program saw at an entry
SEEN_NONE, SEEN_EXACT, SEEN_OTHER_PORT = 0, 1, 2
#: bit set by the reverse entry: this entry's destination sends from another port (NAT)
SEEN_PEER_MOVED = 4

_KEY = struct.Struct("=I16sHH")  # family, addr, port (be), pad
_ADDR_KEY = struct.Struct("=I16s")
_VAL = struct.Struct("=16sHH16sHH16sHHII24s")
_COUNTER = struct.Struct("=QQQ")
_CFG = struct.Struct("=HH")
KEY_SIZE, VAL_SIZE, COUNTER_SIZE = _KEY.size, _VAL.size, _COUNTER.size

Addr = Tuple[str, int]


def _addr(ip: str) -> Tuple[int, bytes]:
    a = ipaddress.ip_address(ip)
    return a.version, a.packed.ljust(16, b"\0")


def _be(port: int) -> int:
    """A port as the program sees the packet's 2 bytes (read natively)."""
    return struct.unpack("=H", struct.pack("!H", port))[0]


def stream_key(relay: Addr) -> bytes:
    fam, raw = _addr(relay[0])
    return _KEY.pack(fam, raw, _be(relay[1]), 0)


def addr_key(ip: str) -> bytes:
    fam, raw = _addr(ip)
    return _ADDR_KEY.pack(fam, raw)


def config_value(port_min: int, port_max: int) -> bytes:
    return _CFG.pack(port_min, port_max)


class Entry(NamedTuple):
    """One direction of one stream: packets to `relay` from `source` go out from
    `new_src` to `new_dst`. `source` port 0: any port of that address."""

    relay: Addr
    source: Addr
    new_src: Addr
    new_dst: Addr
    counter: int
    flags: int = 0
    peer: Optional[Addr] = None  # the reverse direction's relay address

    def key(self) -> bytes:
        return stream_key(self.relay)

    def value(self, seen: int = SEEN_NONE) -> bytes:
        peer = stream_key(self.peer) if self.peer is not None else bytes(KEY_SIZE)
        return _VAL.pack(_addr(self.source[0])[1], _be(self.source[1]), self.flags,
                         _addr(self.new_src[0])[1], _be(self.new_src[1]), 0,
                         _addr(self.new_dst[0])[1], _be(self.new_dst[1]), 0,
                         self.counter, seen, peer)


def seen(value: bytes) -> int:
    """The `seen` field (SEEN_*) of a stream value read back from the map."""
    return int(_VAL.unpack(value)[10])


def counters(raw: bytes, ncpus: int, offset: int = 0) -> Tuple[int, int, int]:
    """(packets, payload bytes, last ns) summed (last: max) over the per-CPU values at
    `offset` of `raw` (a batch read holds many slots' values back to back)."""
    packets = octets = last = 0
    for i in range(ncpus):
        p, b, t = _COUNTER.unpack_from(raw, offset + i * COUNTER_SIZE)
        packets += p
        octets += b
        last = max(last, t)
    return packets, octets, last


def verdict_totals(raws: Sequence[bytes], ncpus: int) -> dict:
    """Per reason, the per-CPU u64 counts summed."""
    out = {}
    for name, raw in zip(REASONS, raws):
        out[name] = sum(struct.unpack_from("=Q", raw, 8 * i)[0] for i in range(ncpus))
    return out
