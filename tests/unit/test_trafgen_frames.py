"""The frames bench.trafgen hands to trafgen are valid to the byte (checksums, lengths)."""

from __future__ import annotations

import socket
import struct

import dpkt
import pytest

from bench.frames import Flow, frame, rtp
from bench.frames import inet_checksum as _csum
from bench.trafgen import MAX_FLOWS, flows_for, render

MAC_A, MAC_B = "02:00:00:00:00:0a", "02:00:00:00:00:0b"


def _pseudo_ok(src: bytes, dst: bytes, udp: bytes, v6: bool) -> bool:
    if v6:
        pseudo = src + dst + struct.pack("!I3xB", len(udp), 17)
    else:
        pseudo = src + dst + struct.pack("!BBH", 0, 17, len(udp))
    return _csum(pseudo + udp) == 0


def test_ipv4_frame_is_valid_and_carries_the_rtp_packet() -> None:
    f = frame(Flow("198.51.100.10", 4000, "198.51.100.1", 30000, ssrc=7), MAC_A, MAC_B)
    eth = dpkt.ethernet.Ethernet(f)
    assert f[:6] == bytes.fromhex("02000000000b") and f[6:12] == bytes.fromhex("02000000000a")
    ip = eth.data
    assert isinstance(ip, dpkt.ip.IP) and ip.ttl == 64 and ip.len == 20 + 8 + 172
    assert _csum(f[14:34]) == 0  # header checksum
    udp = f[34:]
    assert (ip.data.sport, ip.data.dport) == (4000, 30000)
    assert _pseudo_ok(socket.inet_aton("198.51.100.10"), socket.inet_aton("198.51.100.1"),
                      udp, v6=False)
    assert bytes(ip.data.data) == rtp(7) and len(rtp(7)) == 172


def test_ipv6_frame_is_valid() -> None:
    f = frame(Flow("2001:db8:1::10", 4000, "2001:db8:1::1", 30002), MAC_A, MAC_B)
    eth = dpkt.ethernet.Ethernet(f)
    ip6 = eth.data
    assert isinstance(ip6, dpkt.ip6.IP6) and ip6.hlim == 64 and ip6.plen == 8 + 172
    assert _pseudo_ok(socket.inet_pton(socket.AF_INET6, "2001:db8:1::10"),
                      socket.inet_pton(socket.AF_INET6, "2001:db8:1::1"), f[54:], v6=True)


def test_mixed_families_and_too_many_flows_are_refused() -> None:
    with pytest.raises(ValueError, match="mixes"):
        frame(Flow("198.51.100.10", 1, "2001:db8::1", 2), MAC_A, MAC_B)
    with pytest.raises(ValueError, match="at most"):
        render([b"\x00"] * (MAX_FLOWS + 1))
    with pytest.raises(ValueError, match="port range"):
        flows_for("198.51.100.10", "198.51.100.1", 10_000)


def test_render_writes_constant_bytes_one_block_per_frame() -> None:
    text = render([b"\x01\xff", b"\x02"])
    assert text == "{ 0x01, 0xff }\n{ 0x02 }\n"
