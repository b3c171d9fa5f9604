"""Read and rewrite the parts of an SDP body a relay cares about (c=, m=, a=rtcp).

Only the first media stream with a non-zero port is relayed; other streams are
left untouched (documented limitation of v1).
"""

from __future__ import annotations

import ipaddress
import re
from typing import List, NamedTuple, Optional, Union

from lrk.errors import SdpError

MAX_SDP_BYTES = 32768
_M_PORT = re.compile(r"^(m=\S+\s+)\d+")


class SdpMedia(NamedTuple):
    """The connection address and ports of the relayed media stream."""

    ip: str
    port: int
    rtcp_port: Optional[int]  # from a=rtcp, None when absent


def _lines(body: Union[str, bytes]) -> List[str]:
    if isinstance(body, bytes):
        if len(body) > MAX_SDP_BYTES:
            raise SdpError(f"SDP body of {len(body)} bytes exceeds {MAX_SDP_BYTES}")
        try:
            text = body.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise SdpError(f"SDP body is not UTF-8 text: {exc}") from None
    else:
        text = body
        if len(text) > MAX_SDP_BYTES:
            raise SdpError(f"SDP body of {len(text)} characters exceeds {MAX_SDP_BYTES}")
    return text.replace("\r\n", "\n").split("\n")


def _conn_addr(line: str) -> str:
    parts = line[2:].split()
    if len(parts) < 3 or parts[0] != "IN" or parts[1] not in ("IP4", "IP6"):
        raise SdpError(f"unusable SDP connection line {line!r}")
    addr = parts[2].split("/")[0]
    try:
        ipaddress.ip_address(addr)
    except ValueError:
        raise SdpError(f"SDP connection address {addr!r} is not an IP address") from None
    return addr


def _media_index(lines: List[str]) -> int:
    for i, line in enumerate(lines):
        if line.startswith("m="):
            parts = line[2:].split()
            if len(parts) >= 3 and parts[1].split("/")[0].isdigit() and int(parts[1].split("/")[0]):
                return i
    raise SdpError("SDP has no m= line with a non-zero port")


def _media_end(lines: List[str], start: int) -> int:
    for j in range(start + 1, len(lines)):
        if lines[j].startswith("m="):
            return j
    return len(lines)


def parse(body: Union[str, bytes]) -> SdpMedia:
    """Find the relayed stream's address (media-level c= wins over session-level)."""
    lines = _lines(body)
    mi = _media_index(lines)
    port = int(lines[mi][2:].split()[1].split("/")[0])
    if port > 65535:
        raise SdpError(f"SDP media port {port} is out of range")
    ip = None
    rtcp = None
    for line in lines[mi + 1 : _media_end(lines, mi)]:
        if line.startswith("c="):
            ip = _conn_addr(line)
        elif line.startswith("a=rtcp:"):
            parts = line[7:].split()
            value = parts[0] if parts else ""
            if value.isdigit() and 0 < int(value) <= 65535:
                rtcp = int(value)
    if ip is None:
        for line in lines[:mi]:
            if line.startswith("c="):
                ip = _conn_addr(line)
                break
    if ip is None:
        raise SdpError("SDP has no c= line for its media stream")
    return SdpMedia(ip, port, rtcp)


def _family(ip: str) -> str:
    return "IP6" if ":" in ip else "IP4"


def rewrite(body: Union[str, bytes], ip: str, port: int, rtcp_port: int) -> Union[str, bytes]:
    """Point the relayed stream (and any c= that governs it) at the relay."""
    lines = _lines(body)
    mi = _media_index(lines)
    end = _media_end(lines, mi)
    conn = f"c=IN {_family(ip)} {ip}"
    media_has_c = any(line.startswith("c=") for line in lines[mi + 1 : end])
    out: List[str] = []
    for i, line in enumerate(lines):
        if line.startswith("c=") and (i < mi and not media_has_c or mi < i < end):
            line = conn
        elif i == mi:
            line = _M_PORT.sub(lambda m: m.group(1) + str(port), line, count=1)
        elif mi < i < end and line.startswith("a=rtcp:"):
            line = f"a=rtcp:{rtcp_port} IN {_family(ip)} {ip}"
        out.append(line)
    text = "\r\n".join(out)
    return text.encode("utf-8") if isinstance(body, bytes) else text
