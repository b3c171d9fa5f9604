"""rtpengine's NG control protocol: bencode, message framing and a small UDP client.

The benchmarks drive rtpengine (the reference media relay) with the same calls they
give lrk, so this module speaks just enough NG to set up, query and tear down calls.

An NG datagram is ``<cookie> <bencoded dictionary>``; the reply carries the same
cookie, and a retransmitted request must reuse its cookie so the daemon can answer
it from its cache instead of running the command twice. Bencode has four types:
byte strings (``4:spam``), integers (``i42e``), lists (``l...e``) and dictionaries
(``d...e``, string keys). rtpengine does not sort the keys of its replies, so the
decoder accepts any key order; the encoder sorts, as bencode asks.

The codec is sans-IO (`encode`, `decode`, `encode_message`, `decode_message`);
`NgClient` is the only part that touches a socket.
"""

from __future__ import annotations

import os
import re
import socket
import time
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

from fastpath.errors import LrkError

#: nesting bound of the decoder and encoder (NG messages nest 3-4 levels)
MAX_DEPTH = 64
#: digits of the longest integer or string length accepted (NG uses 64-bit counters)
MAX_INT_DIGITS = 20
#: the largest datagram the client reads (rtpengine's replies fit well within it)
MAX_DATAGRAM = 65535

Addr = Tuple[str, int]
Value = Union[bytes, str, int, List[Any], Dict[str, Any]]


class NgError(LrkError):
    """Malformed bencode or NG framing, or a value bencode cannot carry."""

    code = "ng"


class NgTimeout(NgError):
    """No reply with the request's cookie came within the client's tries."""

    code = "ng_timeout"


class NgReplyError(NgError):
    """rtpengine answered ``result: error``; the message carries its ``error-reason``."""

    code = "ng_reply"

    def __init__(self, command: str, reason: str, reply: Dict[str, Any]) -> None:
        super().__init__(f"rtpengine refused {command!r}: {reason}")
        self.command = command
        self.reason = reason
        self.reply = reply


# -- bencode -------------------------------------------------------------------------

def encode(value: Value, max_depth: int = MAX_DEPTH) -> bytes:
    """Bencode `value`; str is sent as UTF-8 (surrogate escapes turn back into their bytes)."""
    out: List[bytes] = []
    _encode(value, out, max_depth)
    return b"".join(out)


def _as_bytes(value: Union[str, bytes, bytearray]) -> bytes:
    if isinstance(value, str):
        return value.encode("utf-8", "surrogateescape")
    return bytes(value)


def _encode(value: Any, out: List[bytes], depth: int) -> None:
    if depth <= 0:
        raise NgError(f"value nests deeper than {MAX_DEPTH} levels; flatten it")
    if isinstance(value, (str, bytes, bytearray)):
        data = _as_bytes(value)
        out.append(b"%d:" % len(data))
        out.append(data)
    elif isinstance(value, bool):
        # bool is an int subclass; NG has no booleans, so saying 1/0 silently would hide bugs
        raise NgError(f"bencode has no booleans (got {value!r}); send 1/0 or a flag name")
    elif isinstance(value, int):
        out.append(b"i%de" % value)
    elif isinstance(value, (list, tuple)):
        out.append(b"l")
        for item in value:
            _encode(item, out, depth - 1)
        out.append(b"e")
    elif isinstance(value, dict):
        keys = []
        for key in value:
            if not isinstance(key, (str, bytes)):
                raise NgError(f"bencode dictionary keys must be strings, not {key!r}")
            keys.append((_as_bytes(key), key))
        keys.sort(key=lambda pair: pair[0])
        out.append(b"d")
        previous = None
        for raw, key in keys:
            if raw == previous:
                raise NgError(f"dictionary key {raw!r} given twice (as str and bytes)")
            previous = raw
            out.append(b"%d:" % len(raw))
            out.append(raw)
            _encode(value[key], out, depth - 1)
        out.append(b"e")
    else:
        raise NgError(f"bencode cannot carry {type(value).__name__} ({value!r}); "
                      "use bytes, str, int, list or dict")


_DIGITS = b"0123456789"


def decode(data: bytes, *, text: bool = True, max_depth: int = MAX_DEPTH) -> Any:
    """Decode one bencoded value that fills `data` exactly.

    With `text`, byte strings come back as str (UTF-8, undecodable bytes kept as
    surrogate escapes, so `encode` gives the same bytes back); otherwise as bytes.
    Dictionary keys are always str. Raises `NgError` on anything malformed.
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise NgError(f"bencode input must be bytes, not {type(data).__name__}")
    data = bytes(data)
    if not data:
        raise NgError("empty bencode input")
    value, end = _decode(data, 0, text, max_depth)
    if end != len(data):
        raise NgError(f"{len(data) - end} trailing byte(s) after the bencoded value "
                      f"at offset {end}")
    return value


def _decode_int(data: bytes, start: int, terminator: int, what: str) -> Tuple[int, int]:
    """Parse the digits of an integer (i...e) or string length (...:) at `start`."""
    end = data.find(terminator, start)
    if end < 0:
        raise NgError(f"truncated {what} at offset {start}")
    digits = data[start:end]
    body = digits[1:] if digits[:1] == b"-" and what == "integer" else digits
    if not body or body.strip(_DIGITS):
        raise NgError(f"bad {what} {digits!r} at offset {start}")
    if (len(body) > 1 and body[:1] == b"0") or digits == b"-0":
        raise NgError(f"{what} {digits!r} at offset {start} has a leading zero")
    if len(body) > MAX_INT_DIGITS:
        raise NgError(f"{what} at offset {start} has {len(body)} digits, more than "
                      f"{MAX_INT_DIGITS}")
    return int(digits), end + 1


def _decode(data: bytes, pos: int, text: bool, depth: int) -> Tuple[Any, int]:
    if depth <= 0:
        raise NgError(f"bencode nests deeper than {MAX_DEPTH} levels at offset {pos}")
    if pos >= len(data):
        raise NgError(f"truncated bencode: value expected at offset {pos}")
    lead = data[pos]
    if 0x30 <= lead <= 0x39:  # string: <length>:<bytes>
        length, start = _decode_int(data, pos, 0x3A, "string length")
        end = start + length
        if end > len(data):
            raise NgError(f"truncated string at offset {pos}: {length} bytes announced, "
                          f"{len(data) - start} present")
        raw = data[start:end]
        return (raw.decode("utf-8", "surrogateescape") if text else raw), end
    if lead == 0x69:  # i<int>e
        return _decode_int(data, pos + 1, 0x65, "integer")
    if lead == 0x6C:  # l...e
        items = []
        pos += 1
        while True:
            if pos >= len(data):
                raise NgError("truncated list: no closing 'e'")
            if data[pos] == 0x65:
                return items, pos + 1
            item, pos = _decode(data, pos, text, depth - 1)
            items.append(item)
    if lead == 0x64:  # d...e
        result: Dict[str, Any] = {}
        pos += 1
        while True:
            if pos >= len(data):
                raise NgError("truncated dictionary: no closing 'e'")
            if data[pos] == 0x65:
                return result, pos + 1
            if not 0x30 <= data[pos] <= 0x39:
                raise NgError(f"dictionary key at offset {pos} is not a string")
            key, pos = _decode(data, pos, True, depth - 1)
            if key in result:
                raise NgError(f"dictionary key {key!r} repeated at offset {pos}")
            result[key], pos = _decode(data, pos, text, depth - 1)
    raise NgError(f"unexpected byte {bytes([lead])!r} at offset {pos}")


# -- NG framing ----------------------------------------------------------------------

def encode_message(cookie: str, message: Dict[str, Any]) -> bytes:
    """``<cookie> <bencoded dict>``: the datagram of one NG request or reply."""
    raw = cookie.encode("ascii", "strict") if isinstance(cookie, str) else bytes(cookie)
    if not raw or any(c in b" \t\r\n" for c in raw):
        raise NgError(f"NG cookie must be non-empty with no whitespace, got {cookie!r}")
    if not isinstance(message, dict):
        raise NgError(f"an NG message is a dictionary, not {type(message).__name__}")
    return raw + b" " + encode(message)


def decode_message(data: bytes, *, text: bool = True) -> Tuple[str, Dict[str, Any]]:
    """Split one NG datagram into (cookie, dictionary); `NgError` if it is not one."""
    data = bytes(data)
    space = data.find(b" ")
    if space <= 0:
        raise NgError("NG datagram has no '<cookie> ' prefix")
    try:
        cookie = data[:space].decode("ascii")
    except UnicodeDecodeError:
        raise NgError(f"NG cookie {data[:space]!r} is not ASCII") from None
    body = decode(data[space + 1:], text=text)
    if not isinstance(body, dict):
        raise NgError(f"NG body must be a dictionary, got {type(body).__name__}")
    return cookie, body


# -- SDP helpers ---------------------------------------------------------------------

#: static RTP payload types audio_sdp can name (RFC 3551)
_RTPMAP = {0: "PCMU/8000", 8: "PCMA/8000"}


def audio_sdp(ip: str, port: int, session_id: int = 1,
              payload_types: Sequence[int] = (0, 8)) -> str:
    """A minimal SDP: one G.711 audio stream at ip:port (IPv4 or IPv6). Both PCMU and PCMA
    by default: the load generators alternate them between runs, and rtpengine drops RTP
    whose payload type the SDP did not name."""
    family = "IP6" if ":" in ip else "IP4"
    for pt in payload_types:
        if pt not in _RTPMAP:
            raise ValueError(f"payload type {pt}: audio_sdp knows {sorted(_RTPMAP)}")
    return (
        "v=0\r\n"
        f"o=- {session_id} 1 IN {family} {ip}\r\n"
        "s=lrk-bench\r\n"
        f"c=IN {family} {ip}\r\n"
        "t=0 0\r\n"
        f"m=audio {port} RTP/AVP {' '.join(str(pt) for pt in payload_types)}\r\n"
        + "".join(f"a=rtpmap:{pt} {_RTPMAP[pt]}\r\n" for pt in payload_types)
        + "a=sendrecv\r\n"
    )


_C_LINE = re.compile(r"^c=IN IP[46] (\S+)\s*$", re.M)


def parse_media(sdp: str) -> Addr:
    """(address, port) of the first audio stream: media-level c= wins over session-level."""
    lines = sdp.replace("\r\n", "\n").split("\n")
    session_ip: Optional[str] = None
    media_ip: Optional[str] = None
    port: Optional[int] = None
    in_audio = False
    for line in lines:
        if line.startswith("m="):
            if port is not None:
                break  # the first audio stream is read; later streams do not matter
            fields = line[2:].split()
            in_audio = len(fields) >= 2 and fields[0] == "audio"
            if in_audio:
                try:
                    port = int(fields[1].split("/")[0])
                except ValueError:
                    raise NgError(f"bad port in SDP line {line!r}") from None
        elif line.startswith("c="):
            match = _C_LINE.match(line)
            if match is None:
                raise NgError(f"unreadable SDP connection line {line!r}")
            if port is None and not in_audio:
                session_ip = match.group(1)
            elif in_audio:
                media_ip = match.group(1)
    ip = media_ip or session_ip
    if port is None or ip is None:
        raise NgError(f"SDP has no audio stream with an address: {sdp!r}")
    return ip, port


# -- client --------------------------------------------------------------------------

def _ng_key(name: str) -> str:
    return name.replace("_", "-")


class NgClient:
    """Blocking NG client for one rtpengine: a connected UDP socket, retries, timeouts.

    Keyword flags of `offer`/`answer` become NG keys with ``_`` turned into ``-``
    (``replace=["origin"]``, ``ICE="remove"``, ``direction=["internal", "external"]``,
    ``transport_protocol="RTP/AVP"``).
    """

    def __init__(self, address: Addr, timeout: float = 1.0, retries: int = 2,
                 sock: Optional[socket.socket] = None) -> None:
        if timeout <= 0 or retries < 0:
            raise ValueError(f"timeout must be > 0 and retries >= 0, got {timeout}, {retries}")
        self.address = address
        self.timeout = timeout
        self.retries = retries
        family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        self.sock = sock if sock is not None else socket.socket(family, socket.SOCK_DGRAM)
        try:
            self.sock.connect(address)
        except BaseException:
            self.sock.close()
            raise
        self._prefix = os.urandom(4).hex()
        self._seq = 0

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> NgClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def next_cookie(self) -> str:
        self._seq += 1
        return f"{self._prefix}{self._seq}"

    def request(self, command: str, **params: Any) -> Dict[str, Any]:
        """Send `command` and return the reply dictionary.

        Raises `NgTimeout` after ``1 + retries`` tries (each resent with the same
        cookie, so rtpengine replays rather than repeats), `NgReplyError` when the
        reply says ``result: error``.
        """
        message: Dict[str, Any] = {"command": command}
        message.update(params)
        cookie = self.next_cookie()
        data = encode_message(cookie, message)
        for _attempt in range(1 + self.retries):
            try:
                self.sock.send(data)
            except OSError:
                pass  # e.g. ECONNREFUSED from an earlier send: the try times out
            reply = self._wait(cookie, self.timeout)
            if reply is not None:
                if reply.get("result") == "error":
                    raise NgReplyError(command, str(reply.get("error-reason", "?")), reply)
                return reply
        raise NgTimeout(f"no NG reply to {command!r} from {self.address[0]}:{self.address[1]} "
                        f"after {1 + self.retries} tries of {self.timeout}s; is rtpengine "
                        "running and listening for NG (--listen-ng) there?")

    def _wait(self, cookie: str, timeout: float) -> Optional[Dict[str, Any]]:
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            self.sock.settimeout(remaining)
            try:
                data = self.sock.recv(MAX_DATAGRAM)
            except socket.timeout:
                return None
            except ConnectionRefusedError:
                continue  # ICMP port unreachable for an earlier send
            try:
                got, reply = decode_message(data)
            except NgError:
                continue  # not a reply we can read; the try may still get a good one
            if got == cookie:
                return reply

    def ping(self) -> bool:
        """True when the daemon answers ``pong`` (a failed or missing reply raises)."""
        return self.request("ping").get("result") == "pong"

    def offer(self, call_id: str, from_tag: str, sdp: str, **flags: Any) -> Dict[str, Any]:
        params = {_ng_key(k): v for k, v in flags.items()}
        return self.request("offer", **{"call-id": call_id, "from-tag": from_tag, "sdp": sdp},
                            **params)

    def answer(self, call_id: str, from_tag: str, to_tag: str, sdp: str,
               **flags: Any) -> Dict[str, Any]:
        params = {_ng_key(k): v for k, v in flags.items()}
        return self.request("answer", **{"call-id": call_id, "from-tag": from_tag,
                                         "to-tag": to_tag, "sdp": sdp}, **params)

    def delete(self, call_id: str, from_tag: Optional[str] = None,
               **flags: Any) -> Dict[str, Any]:
        params = {_ng_key(k): v for k, v in flags.items()}
        params["call-id"] = call_id
        if from_tag is not None:
            params["from-tag"] = from_tag
        return self.request("delete", **params)

    def query(self, call_id: str, **flags: Any) -> Dict[str, Any]:
        params = {_ng_key(k): v for k, v in flags.items()}
        params["call-id"] = call_id
        return self.request("query", **params)


# -- one relayed call ----------------------------------------------------------------

#: offer/answer flags for a plain relayed audio call (no ICE, no SDP origin leak)
CALL_FLAGS: Dict[str, Any] = {"replace": ["origin", "session-connection"], "ICE": "remove"}


@dataclass(frozen=True)
class RelayedCall:
    """Where each endpoint must send once rtpengine relays the call."""

    call_id: str
    from_tag: str
    to_tag: str
    caller_sends_to: Addr  # rtpengine's port on the caller's side (from the answer's SDP)
    callee_sends_to: Addr  # rtpengine's port on the callee's side (from the offer's SDP)


def setup_call(client: NgClient, call_id: str, caller: Addr, callee: Addr, *,
               from_tag: str = "a", to_tag: str = "b",
               caller_interface: Optional[str] = "internal",
               callee_interface: Optional[str] = "external") -> RelayedCall:
    """Offer from the caller, answer from the callee; returns the two relay addresses.

    `caller_interface`/`callee_interface` name rtpengine's logical interfaces
    (``--interface NAME/IP``) facing each endpoint: the offer's ``direction`` is
    [sender's side, recipient's side]. With `bench.netns.Topology` the caller faces
    the relay's 198.51.100.1 and the callee its 198.51.100.65; lrk's netns benchmark
    calls those internal and external (lrk: offer ``interface="external"``, answer
    ``interface="internal"``, each naming the side the SDP's *recipient* uses). Pass
    None for both when rtpengine has a single unnamed interface.
    """
    flags: Dict[str, Any] = dict(CALL_FLAGS)
    if (caller_interface is None) != (callee_interface is None):
        raise ValueError("give both interfaces or neither")
    if caller_interface is not None:
        flags["direction"] = [caller_interface, callee_interface]
    offered = client.offer(call_id, from_tag, audio_sdp(caller[0], caller[1]), **flags)
    answered = client.answer(call_id, from_tag, to_tag, audio_sdp(callee[0], callee[1]),
                             **CALL_FLAGS)
    return RelayedCall(call_id, from_tag, to_tag,
                       caller_sends_to=parse_media(_sdp_of(answered, "answer")),
                       callee_sends_to=parse_media(_sdp_of(offered, "offer")))


def _sdp_of(reply: Dict[str, Any], command: str) -> str:
    sdp = reply.get("sdp")
    if not isinstance(sdp, str):
        raise NgError(f"rtpengine's {command} reply has no SDP: {reply!r}")
    return sdp
