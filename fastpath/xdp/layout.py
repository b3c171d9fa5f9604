"""Byte layout of the XDP program's maps (relay.bpf.c: keep in step), sans-IO.

Keys and values are packed here and nowhere else; addresses are 16 bytes (IPv4 in
the first 4), ports in network order, as the program compares them with packet bytes.
The stream map is an array: relay address `n` (in the order `configure` got them) owns
indexes n * span .. n * span + span - 1, one per port of the range (`stream_index`).
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
F_LIVE = 4  # a stream is at this index (a removed one is zeroed)
#: what the program saw at an entry
SEEN_NONE, SEEN_EXACT, SEEN_OTHER_PORT = 0, 1, 2
#: bit set by the reverse entry: this entry's destination sends from another port (NAT)
SEEN_PEER_MOVED = 4

_ADDR_KEY = struct.Struct("=I16s")
#: src, src port, flags, new src, new sport, pad, new dst, new dport, pad, counter, seen,
#: peer (the reverse direction's index + 1; 0: none)
_VAL = struct.Struct("=16sHH16sHH16sHHIII")
_COUNTER = struct.Struct("=QQQ")
#: relay addresses the config entry holds inline, per family (relay.bpf.c: INLINE_V4/V6)
INLINE_V4, INLINE_V6 = 16, 8
#: port min, port max, n4, n6, more4, more6, pad, v4[16], base4[16], v6[8] (16 bytes
#: each), base6[8]
_CFG = struct.Struct(f"=HHHHHHI{INLINE_V4 * 4}s{INLINE_V4}I{INLINE_V6 * 16}s{INLINE_V6}I")
CONFIG_SIZE = _CFG.size
assert CONFIG_SIZE == 304  # struct relay_cfg, no padding
VAL_SIZE, COUNTER_SIZE = _VAL.size, _COUNTER.size
assert VAL_SIZE == 72  # struct stream_val, no padding

Addr = Tuple[str, int]


def _addr(ip: str) -> Tuple[int, bytes]:
    a = ipaddress.ip_address(ip)
    return a.version, a.packed.ljust(16, b"\0")


def _be(port: int) -> int:
    """A port as the program sees the packet's 2 bytes (read natively)."""
    return struct.unpack("=H", struct.pack("!H", port))[0]


def packed(ip: str) -> bytes:
    """The 16 bytes an address is stored as (one spelling per address)."""
    return _addr(ip)[1]


def stream_index(base: int, port_min: int, port_max: int, port: int) -> int:
    """The array index of `port` in the block that starts at `base`; ValueError when the
    port is outside the range."""
    if not port_min <= port <= port_max:
        raise ValueError(f"port {port} is outside the relay range {port_min}-{port_max}")
    return base + port - port_min


def u32(n: int) -> bytes:
    """A 4-byte map key or value (array indexes, ifindexes, a block's first index)."""
    return n.to_bytes(4, "little")


def addr_key(ip: str) -> bytes:
    fam, raw = _addr(ip)
    return _ADDR_KEY.pack(fam, raw)


def config_value(port_min: int, port_max: int, blocks: Sequence[Tuple[str, int]] = ()
                 ) -> bytes:
    """The config entry: the port range and the first INLINE_V4 IPv4 and INLINE_V6 IPv6
    relay addresses with their blocks, `blocks` being (address, first index) in order;
    the more4 / more6 flag of a family with more tells the program to look the rest up
    in `relay_addrs` (which `XdpProgram.configure` fills with every address)."""
    v4: list = []
    v6: list = []
    for ip, base in blocks:
        fam, raw = _addr(ip)
        (v4 if fam == 4 else v6).append((raw, base))
    in4, in6 = v4[:INLINE_V4], v6[:INLINE_V6]
    return _CFG.pack(port_min, port_max, len(in4), len(in6), int(len(v4) > INLINE_V4),
                     int(len(v6) > INLINE_V6), 0, b"".join(raw[:4] for raw, _ in in4),
                     *[base for _, base in in4], *[0] * (INLINE_V4 - len(in4)),
                     b"".join(raw for raw, _ in in6),
                     *[base for _, base in in6], *[0] * (INLINE_V6 - len(in6)))


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

    def value(self, seen: int = SEEN_NONE, peer_index: Optional[int] = None) -> bytes:
        """The live entry's bytes; `peer_index`: the array index of `peer`."""
        return _VAL.pack(_addr(self.source[0])[1], _be(self.source[1]),
                         self.flags | F_LIVE,
                         _addr(self.new_src[0])[1], _be(self.new_src[1]), 0,
                         _addr(self.new_dst[0])[1], _be(self.new_dst[1]), 0,
                         self.counter, seen, 0 if peer_index is None else peer_index + 1)


def seen(value: bytes) -> int:
    """The `seen` field (SEEN_*) of a stream value read back from the map (SEEN_NONE
    where no stream is)."""
    fields = _VAL.unpack(value)
    return int(fields[10]) if fields[2] & F_LIVE else SEEN_NONE


def live(value: bytes) -> bool:
    return bool(_VAL.unpack(value)[2] & F_LIVE)


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


def verdict_totals(raws: Sequence[bytes], ncpus: int,
                   names: Sequence[str] = REASONS) -> dict:
    """Per reason (`names`, in the program's index order), the per-CPU u64 counts
    summed."""
    out = {}
    for name, raw in zip(names, raws):
        out[name] = sum(struct.unpack_from("=Q", raw, 8 * i)[0] for i in range(ncpus))
    return out
