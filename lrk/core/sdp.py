"""The one SDP module of lrk: read every media stream of a body, point relayed ones at a relay.

Sans-IO and type-preserving: `str` in, `str` out; `bytes` in, `bytes` out. Bytes are
handled as latin-1 text so that every byte lrk does not rewrite (codecs, fmtp, crypto,
fingerprints, UTF-8 session names, CRLF or LF line endings, a missing trailing newline)
comes back exactly as it was sent.

`parse()` describes every `m=` line as a `Stream`; `rewrite()` takes one `StreamRelay`
(or `None`) per `m=` line and returns the body with the relayed streams' ports, connection
addresses and `a=rtcp` pointed at the relay, and the streams it is told to `reject`
disabled (port 0). A body lrk cannot relay raises `SdpError` naming the line; nothing is
ever half rewritten.

Strictness is where lrk needs the data: `m=` and `o=` lines are always checked, `c=` and
`a=rtcp` only for streams lrk relays (an MSRP `c=IN IP4 host.example` passes through).
Lines are split with str methods, not regular expressions: this runs on the control path
under PyPy.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass
from typing import (
    AbstractSet,
    Collection,
    Dict,
    List,
    NamedTuple,
    Optional,
    Sequence,
    Set,
    Tuple,
    Union,
)

from lrk.errors import SdpError

Body = Union[str, bytes]

MAX_SDP_BYTES = 32768

# UDP-based transports the relay can forward datagram by datagram. TCP, TLS and DTLS/SCTP
# m-lines are not relayable: they keep their place and pass through untouched.
RELAYABLE_PROTOS = frozenset({
    "RTP/AVP", "RTP/AVPF", "RTP/SAVP", "RTP/SAVPF",
    "UDP/TLS/RTP/SAVP", "UDP/TLS/RTP/SAVPF",
    "UDP", "UDPTL",
})
DIRECTIONS = frozenset({"sendrecv", "sendonly", "recvonly", "inactive"})
# Removed from relayed streams and the session level, as rtpengine does when it relays
# without ICE: a phone that saw the peer's candidates would route around the relay.
ICE_ATTRIBUTES = frozenset({
    "candidate", "end-of-candidates", "ice-ufrag", "ice-pwd", "ice-options", "ice-lite",
    "remote-candidates",
})
# Old-style hold (RFC 2543): the stream stays held, the relay is not announced there.
NULL_ADDRESSES = frozenset({"0.0.0.0", "::"})
# Attribute lines lrk never looks at (none is rtcp, rtcp-mux, a direction or ICE): the
# bulk of a body's lines, passed over with one startswith
_PASSED_OVER = ("a=rtpmap:", "a=fmtp:", "a=rtcp-fb:", "a=ssrc", "a=extmap", "a=ptime:",
                "a=maxptime:", "a=mid:", "a=msid", "a=fingerprint:", "a=setup:",
                "a=crypto:", "a=group:")

_SHOWN = 60
#: a NamedTuple from all of its fields without its Python-level __new__ (per m= line)
_new = tuple.__new__


class Stream(NamedTuple):
    """One `m=` section as lrk sees it (a NamedTuple: built once per m= line on the
    control path, where a frozen dataclass of 16 fields cost more than parsing the line)."""

    index: int  # position among the m= lines, 0-based
    line: int  # line number of the m= line, 1-based (as in error messages)
    media: str  # audio, video, text, image, application, ...
    port: int  # 0: disabled (rejected or removed stream)
    port_count: int  # the N of "m=video 4000/N", 1 when absent
    proto: str  # RTP/AVP, RTP/SAVPF, udptl, TCP/MSRP, ...
    formats: Tuple[str, ...]
    address: Optional[str]  # effective connection address: media-level c= wins
    family: Optional[str]  # "IP4" or "IP6", from that c= line
    media_connection: bool  # the address comes from a media-level c=
    rtcp_port: Optional[int]  # a=rtcp port, None when absent
    rtcp_address: Optional[str]  # a=rtcp address, None when only a port was given
    rtcp_mux: bool  # a=rtcp-mux present
    direction: str  # sendrecv/sendonly/recvonly/inactive, media-level over session-level
    ice: bool  # has a=candidate lines
    relayable: bool  # a UDP-based proto the relay can forward

    @property
    def disabled(self) -> bool:
        """Port 0: the stream is rejected or removed and carries no media."""
        return self.port == 0

    @property
    def null_address(self) -> bool:
        """Old-style hold: c=IN IP4 0.0.0.0 (or IP6 ::)."""
        return self.address in NULL_ADDRESSES

    @property
    def hold(self) -> bool:
        """On hold: old-style null address, or sendonly/inactive (RFC 3264 section 8.4)."""
        return self.address in NULL_ADDRESSES or self.direction in ("sendonly", "inactive")

    @property
    def needs_relay(self) -> bool:
        """Whether the relay should get ports for it (relayable and not disabled)."""
        return self.relayable and self.port != 0


class SessionDescription(NamedTuple):
    """What `parse()` found: every stream in m= order, and the session-level values (a
    NamedTuple: built per request, where a frozen dataclass cost more than the m= lines)."""

    streams: Tuple[Stream, ...]
    version: Optional[int]  # o= session version, None without an o= line
    address: Optional[str]  # session-level c= address, None when absent
    family: Optional[str]
    direction: str  # session-level direction attribute, sendrecv when absent
    eol: str  # the body's line ending, "\r\n" or "\n"

    def first_relayable(self) -> Optional[Stream]:
        """The first stream that needs a relay (what single-stream relays relay), or None."""
        for stream in self.streams:
            if stream.needs_relay:
                return stream
        return None


@dataclass(frozen=True)
class StreamRelay:
    """Where the relay receives one stream: written into that stream's m=, c= and a=rtcp."""

    ip: str
    port: int
    rtcp_port: Optional[int] = None  # None: port + 1 (the RTP port itself with rtcp_mux)
    rtcp_mux: bool = False  # announce a=rtcp-mux (kept, or added when the body lacks it)

    def __post_init__(self) -> None:
        if not isinstance(self.ip, str) or not is_address(self.ip):
            raise ValueError(f"relay ip {self.ip!r} is not an IPv4 or IPv6 address")
        for name, value in (("port", self.port), ("rtcp_port", self.rtcp_port)):
            if value is None and name == "rtcp_port":
                continue
            if isinstance(value, bool) or not isinstance(value, int) or not 0 < value <= 65535:
                raise ValueError(f"relay {name} must be an integer 1-65535, not {value!r}")
        if not isinstance(self.rtcp_mux, bool):
            raise ValueError(f"relay rtcp_mux must be a bool, not {self.rtcp_mux!r}")

    @classmethod
    def of_relay(cls, ip: str, port: int, rtcp_mux: bool) -> StreamRelay:
        """One of the relay's own addresses (valid by construction: the engine allocated
        it), without __post_init__'s checks: the control path makes one per stream."""
        relay = object.__new__(cls)
        relay.__dict__.update(ip=ip, port=port, rtcp_port=None, rtcp_mux=rtcp_mux)
        return relay

    @property
    def family(self) -> str:
        return "IP6" if ":" in self.ip else "IP4"

    @property
    def rtcp(self) -> int:
        """The RTCP port to announce."""
        if self.rtcp_port is not None:
            return self.rtcp_port
        return self.port if self.rtcp_mux else self.port + 1


class SdpMedia(NamedTuple):
    """The first relayed stream's address and ports (single-stream callers)."""

    ip: str
    port: int
    rtcp_port: Optional[int]  # from a=rtcp, None when absent


# -- public API -------------------------------------------------------------------------


def is_address(text: str, family: Optional[str] = None) -> bool:
    """Whether `text` is a plain IPv4 (family "IP4") or IPv6 ("IP6") address, either when
    `family` is None. inet_pton, not ipaddress: this runs several times per request."""
    if not text.isascii():
        return False
    if family != "IP6" and "." in text and ":" not in text:
        try:
            socket.inet_pton(socket.AF_INET, text)
            return True
        except OSError:
            return False
    if family != "IP4" and ":" in text:
        try:
            socket.inet_pton(socket.AF_INET6, text)
            return True
        except OSError:
            return False
    return False


class Parsed:
    """A body read once: its description, and rewrite() without reading it again."""

    __slots__ = ("_doc", "_is_bytes")

    def __init__(self, body: Body) -> None:
        text, self._is_bytes = _decode(body)
        self._doc = _scan(text)

    @property
    def desc(self) -> SessionDescription:
        return self._doc.desc

    def rewrite(self, relays: Sequence[Optional[StreamRelay]], *,
                bump_version: bool = True, reject: Collection[int] = ()) -> Body:
        """As the module's rewrite() on the body this was read from."""
        return _encode(_apply(self._doc, relays, bump_version, False, reject),
                       self._is_bytes)


def scan(body: Body) -> Parsed:
    """Read `body` once for both parse() and rewrite() (the control path does both)."""
    return Parsed(body)


def parse(body: Body) -> SessionDescription:
    """Describe every m= line; SdpError (naming the line) when lrk cannot relay the body."""
    return _scan(_decode(body)[0]).desc


def unrelayed(streams: Sequence[Stream], relays: Sequence[Optional[StreamRelay]]
              ) -> List[int]:
    """The m= lines `relays` gives no relay although they are enabled UDP streams (an
    answer enabling a stream its offer disabled, or adding one): their media does not
    pass the relay, so a rewrite must `reject` them rather than pass the peer's address
    on."""
    return [stream.index for stream, relay in zip(streams, relays)
            if relay is None and stream.needs_relay]


def rewrite(body: Body, relays: Sequence[Optional[StreamRelay]], *,
            bump_version: bool = True, reject: Collection[int] = ()) -> Body:
    """The body with each relayed stream pointed at its relay; same type as `body`.

    `relays` has one entry per m= line: a `StreamRelay`, or None to leave that stream
    alone (it must be None for a disabled or non-relayable stream). A relayed m= line
    carries the relay's one port, without a port count ("m=video 4000/2" becomes
    "m=video PORT": the relay has one port pair per stream). ICE lines go from
    relayed streams and, when no untouched stream still uses ICE, from the session
    level; an old-style held stream keeps its null address; the o= version goes up by
    one when anything changed (unless `bump_version=False`).

    `reject`: indices of m= lines (each None in `relays`) to disable: their port becomes
    0 and their ICE lines go, so that no peer address of a stream the relay does not
    relay is announced (an answer enabling a stream its offer disabled, or adding one,
    RFC 3264 section 6). They count as disabled for the session-level c=.

    Raises SdpError for a body lrk cannot relay, ValueError when `relays` or `reject`
    does not fit the body.
    """
    text, is_bytes = _decode(body)
    return _encode(_apply(_scan(text), relays, bump_version, False, reject), is_bytes)


def parse_first(body: Body) -> SdpMedia:
    """The first relayable, enabled stream's (address, port, a=rtcp port): v1's one stream."""
    stream = _first(parse(body))
    assert stream.address is not None  # _scan checked every stream that needs a relay
    return SdpMedia(stream.address, stream.port, stream.rtcp_port)


def rewrite_first(body: Body, ip: str, port: int, rtcp_port: Optional[int]) -> Body:
    """Relay only the stream parse_first() picks, for single-stream callers (v1's daemon).

    Like v1, so that today's replies keep their shape: a=rtcp-mux is kept as offered,
    a=rtcp always names the relay address and o= is not bumped. Unlike v1, other
    streams are really left alone (a session-level c= they share gets a media-level c=
    for the relayed stream instead of moving), line endings are kept and the relayed
    stream loses its ICE lines.
    """
    text, is_bytes = _decode(body)
    doc = _scan(text)
    stream = _first(doc.desc)
    relays: List[Optional[StreamRelay]] = [None] * len(doc.desc.streams)
    relays[stream.index] = StreamRelay(ip, port, rtcp_port, stream.rtcp_mux)
    return _encode(_apply(doc, relays, False, True), is_bytes)


# -- parsing ----------------------------------------------------------------------------


class _Section:
    """Line indices of one m= section, for rewrite()."""

    __slots__ = ("m", "insert_at", "conns", "rtcp", "mux", "ice", "candidates", "direction",
                 "end")

    def __init__(self, m: int) -> None:
        self.m = m
        self.insert_at = m  # a new c= goes after this line (the m=, or an i= right after it)
        self.conns: List[int] = []
        self.rtcp: List[int] = []
        self.mux: List[int] = []
        self.ice: List[int] = []
        self.candidates = False
        self.direction: Optional[str] = None
        self.end = m + 1


class _Doc:
    """A body split into lines plus where the parts rewrite() touches are."""

    __slots__ = ("contents", "eols", "eol", "origin", "session_conns", "session_ice",
                 "sections", "desc", "crlf")

    def __init__(self, contents: List[str], eols: List[str], crlf: bool = False) -> None:
        self.contents = contents
        self.eols = eols
        #: every line ends in CRLF, the last one too (the usual body): joined in one go
        self.crlf = crlf
        self.eol = "\n" if eols and eols[0] == "\n" else "\r\n"
        self.origin: Optional[int] = None
        self.session_conns: List[int] = []
        self.session_ice: List[int] = []
        self.sections: List[_Section] = []
        self.desc: SessionDescription


def _shown(text: str, limit: int = _SHOWN) -> str:
    return repr(text if len(text) <= limit else text[:limit] + "...")


def _error(doc: _Doc, index: int, reason: str) -> SdpError:
    return SdpError(f"SDP line {index + 1} {_shown(doc.contents[index])}: {reason}")


def _decode(body: Body) -> Tuple[str, bool]:
    if isinstance(body, str):
        text, is_bytes, unit = body, False, "characters"
    elif isinstance(body, (bytes, bytearray, memoryview)):
        text, is_bytes, unit = bytes(body).decode("latin-1"), True, "bytes"
    else:
        raise TypeError(f"an SDP body must be str or bytes, not {type(body).__name__}")
    if len(text) > MAX_SDP_BYTES:
        raise SdpError(f"SDP body of {len(text)} {unit} exceeds {MAX_SDP_BYTES}")
    return text, is_bytes


def _encode(text: str, is_bytes: bool) -> Body:
    return text.encode("latin-1") if is_bytes else text


def _number(text: str, digits: int) -> Optional[int]:
    """An ASCII decimal of at most `digits` digits (str.isdigit() alone accepts '²')."""
    if 0 < len(text) <= digits and text.isascii() and text.isdigit():
        return int(text)
    return None


def _split_lines(text: str) -> Tuple[List[str], List[str], bool]:
    """(line contents, line endings, whether every line ends in CRLF)."""
    crlf = text.count("\r\n")
    if crlf and crlf == text.count("\n") and not text.endswith("\r"):
        contents = text.split("\r\n")  # the usual body: CRLF everywhere, nothing else
        if contents[-1] == "":
            contents.pop()
            return contents, ["\r\n"] * len(contents), True
        eols = ["\r\n"] * len(contents)
        eols[-1] = ""
        return contents, eols, False
    pieces = text.split("\n")
    ends_with_newline = pieces[-1] == ""
    if ends_with_newline:
        pieces.pop()
    contents: List[str] = []
    eols: List[str] = []
    last = len(pieces) - 1
    for i, piece in enumerate(pieces):
        newline = "\n" if i < last or ends_with_newline else ""
        if piece.endswith("\r"):
            contents.append(piece[:-1])
            eols.append("\r" + newline)
        else:
            contents.append(piece)
            eols.append(newline)
    return contents, eols, False


def _connection(line: str) -> Tuple[Optional[str], Optional[str], Optional[str]]:
    """(family, address, problem) of a c= line; problem is None when lrk can use it."""
    tokens = line[2:].split()
    if len(tokens) != 3 or tokens[0].upper() != "IN" or tokens[1].upper() not in ("IP4", "IP6"):
        return None, None, "a connection line must be 'c=IN IP4|IP6 ADDRESS'"
    family = tokens[1].upper()
    address = tokens[2].split("/", 1)[0]  # multicast TTL / count suffix
    if not is_address(address, family):
        kind = "IPv4" if family == "IP4" else "IPv6"
        return family, address, (f"connection address {_shown(address, 40)} is not an "
                                 f"{kind} address")
    return family, address, None


def _rtcp(value: str) -> Tuple[Optional[int], Optional[str], Optional[str]]:
    """(port, address, problem) of an a=rtcp value ("PORT" or "PORT IN IP4|IP6 ADDRESS")."""
    tokens = value.split()
    port = _number(tokens[0], 5) if tokens else None
    if port is None or not 0 < port <= 65535:
        return None, None, "a=rtcp needs a port 1-65535"
    if len(tokens) == 1:
        return port, None, None
    if len(tokens) != 4 or tokens[1].upper() != "IN" or tokens[2].upper() not in ("IP4", "IP6"):
        return port, None, "a=rtcp must be 'a=rtcp:PORT' or 'a=rtcp:PORT IN IP4|IP6 ADDRESS'"
    if not is_address(tokens[3]):
        return port, None, f"a=rtcp address {_shown(tokens[3], 40)} is not an IP address"
    return port, tokens[3], None


def _scan(text: str) -> _Doc:
    contents, eols, crlf = _split_lines(text)
    doc = _Doc(contents, eols, crlf)
    sections = doc.sections
    session_direction = "sendrecv"
    version: Optional[int] = None
    cur: Optional[_Section] = None
    for i, line in enumerate(contents):
        kind = line[:2]
        if kind == "a=":
            if line.startswith(_PASSED_OVER):
                continue
            name, colon, _ = line[2:].partition(":")
            if not colon:
                name = name.rstrip()
            if cur is None:
                if name in ICE_ATTRIBUTES:
                    doc.session_ice.append(i)
                elif not colon and name in DIRECTIONS:
                    session_direction = name
            elif colon and name == "rtcp":
                cur.rtcp.append(i)
            elif name in ICE_ATTRIBUTES:
                cur.ice.append(i)
                if name == "candidate":
                    cur.candidates = True
            elif not colon:
                if name == "rtcp-mux":
                    cur.mux.append(i)
                elif name in DIRECTIONS:
                    cur.direction = name
        elif kind == "c=":
            if cur is None:
                doc.session_conns.append(i)
            else:
                cur.conns.append(i)
        elif kind == "m=":
            if cur is not None:
                cur.end = i
            cur = _Section(i)
            sections.append(cur)
        elif kind == "i=":
            if cur is not None and cur.insert_at == i - 1 == cur.m:
                cur.insert_at = i
        elif kind == "o=" and cur is None and doc.origin is None:
            tokens = line[2:].split()
            if len(tokens) != 6:
                raise _error(doc, i, "an o= line needs 6 fields: "
                                     "USER SESSION-ID VERSION IN IP4|IP6 ADDRESS")
            version = _number(tokens[2], 20)
            if version is None:
                raise _error(doc, i, f"o= session version {_shown(tokens[2], 20)} is not a "
                                     "number")
            doc.origin = i
    if cur is not None:
        cur.end = len(contents)
    if not sections:
        raise SdpError("SDP has no m= line: there is no media stream to relay")

    s_family = s_address = None
    s_problem: Optional[str] = None
    if doc.session_conns:
        s_family, s_address, s_problem = _connection(contents[doc.session_conns[0]])
    streams: List[Stream] = []
    for index, sec in enumerate(sections):
        streams.append(_stream(doc, index, sec, s_family, s_address, s_problem,
                               session_direction))
    doc.desc = _new(SessionDescription, (tuple(streams), version, s_address, s_family,
                                         session_direction, doc.eol))
    return doc


def _stream(doc: _Doc, index: int, sec: _Section, s_family: Optional[str],
            s_address: Optional[str], s_problem: Optional[str], s_direction: str) -> Stream:
    line = doc.contents[sec.m]
    tokens = line[2:].split()
    if len(tokens) < 3:
        raise _error(doc, sec.m, "an m= line needs MEDIA PORT PROTO [FORMATS...]")
    port_text, slash, count_text = tokens[1].partition("/")
    port = _number(port_text, 5)
    if port is None or port > 65535:
        raise _error(doc, sec.m, f"media port {_shown(port_text, 20)} is not a number 0-65535")
    count = 1
    if slash:
        count = _number(count_text, 5) or 0
        if not 0 < count <= 65535:
            raise _error(doc, sec.m, f"port count {_shown(count_text, 20)} is not a number "
                                     "1-65535")
    proto = tokens[2]
    relayable = proto.upper() in RELAYABLE_PROTOS
    strict = relayable and port != 0

    if sec.conns:
        conn_line = sec.conns[0]
        family, address, problem = _connection(doc.contents[conn_line])
        media_connection = True
    else:
        conn_line = doc.session_conns[0] if doc.session_conns else -1
        family, address, problem = s_family, s_address, s_problem
        media_connection = False
    if strict:
        if conn_line < 0:
            raise _error(doc, sec.m, "no c= line for this stream, at media or session level")
        if problem is not None:
            raise _error(doc, conn_line, problem)

    rtcp_port = rtcp_address = None
    for i in sec.rtcp:
        port_found, address_found, rtcp_problem = _rtcp(doc.contents[i][7:])
        if rtcp_problem is not None:
            if strict:
                raise _error(doc, i, rtcp_problem)
            continue
        if rtcp_port is None:
            rtcp_port, rtcp_address = port_found, address_found
    return _new(Stream, (index, sec.m + 1, tokens[0], port, count, proto, tuple(tokens[3:]),
                         address, family, media_connection, rtcp_port, rtcp_address,
                         bool(sec.mux), sec.direction or s_direction, sec.candidates,
                         relayable))


def _first(desc: SessionDescription) -> Stream:
    stream = desc.first_relayable()
    if stream is None:
        raise SdpError("SDP has no relayable m= line with a non-zero port "
                       "(every stream is disabled or not over UDP)")
    return stream


# -- rewriting --------------------------------------------------------------------------


def _token_span(line: str, k: int) -> Tuple[int, int]:
    """Start and end of the k-th whitespace-separated field after 'x=' (as str.split())."""
    if line[2:3] != " " and "  " not in line and line.isprintable():  # the usual line
        start = 2
        for _ in range(k):
            start = line.find(" ", start) + 1
            if start == 0:
                return len(line), len(line)
        end = line.find(" ", start)
        return start, (len(line) if end < 0 else end)
    i, n = 2, len(line)
    start = i
    for _ in range(k + 1):
        while i < n and line[i].isspace():
            i += 1
        start = i
        while i < n and not line[i].isspace():
            i += 1
    return start, i


def _with_port(line: str, port: int) -> str:
    """The m= line with `port` in place of its port and port count ("4000/2"): the relay
    receives a stream on one port (pair), so announcing a count would name relay ports
    +2, +3, ... that belong to no stream of this call, or to another call."""
    start, end = _token_span(line, 1)
    return line[:start] + str(port) + line[end:]


def _bumped(line: str) -> str:
    start, end = _token_span(line, 2)
    return line[:start] + str(int(line[start:end]) + 1) + line[end:]


def _rtcp_line(line: str, port: int, relay: Optional[StreamRelay], always: bool) -> str:
    """a=rtcp with the relay's port; its address is the relay's where one was given.

    `relay` is None for an old-style held stream: its address part stays as it was.
    """
    tokens = line[7:].split()
    if len(tokens) == 4:
        where = " " + " ".join(tokens[1:]) if relay is None else f" IN {relay.family} {relay.ip}"
    elif always and relay is not None:
        where = f" IN {relay.family} {relay.ip}"
    else:
        where = ""
    return f"a=rtcp:{port}{where}"


def _apply(doc: _Doc, relays: Sequence[Optional[StreamRelay]], bump: bool,
           rtcp_address_always: bool, reject: Collection[int] = ()) -> str:
    streams = doc.desc.streams
    relays = list(relays)
    if len(relays) != len(streams):
        raise ValueError(f"rewrite needs one relay entry (or None) per m= line: the body has "
                         f"{len(streams)}, got {len(relays)}")
    rejected: AbstractSet[int] = frozenset()
    if reject:
        rejected = frozenset(reject)
        for index in rejected:
            if isinstance(index, bool) or not isinstance(index, int) \
                    or not 0 <= index < len(streams):
                raise ValueError(f"reject names m= line {index!r}; the body has "
                                 f"{len(streams)} (0-based)")
            if relays[index] is not None:
                raise ValueError(f"stream {index} is both relayed and rejected")
    for stream, relay in zip(streams, relays):
        if relay is None:
            continue
        if not isinstance(relay, StreamRelay):
            raise TypeError(f"relay entries must be StreamRelay or None, not {relay!r}")
        if not stream.needs_relay:
            why = "disabled (port 0)" if stream.relayable else f"not relayable ({stream.proto})"
            raise ValueError(f"stream {stream.index} (SDP line {stream.line}) is {why}: "
                             "pass None for it")

    contents = doc.contents
    new: List[Optional[str]] = list(contents)
    after: Dict[int, List[str]] = {}
    relayed = False
    for sec, stream, relay in zip(doc.sections, streams, relays):
        if relay is None:
            if stream.index in rejected and stream.port != 0:
                relayed = True  # the body changes: session c=, ICE and o= as for a relay
                new[sec.m] = _with_port(contents[sec.m], 0)
                for i in sec.ice:
                    new[i] = None
            continue
        relayed = True
        new[sec.m] = _with_port(contents[sec.m], relay.port)
        held = stream.null_address
        if not held:
            conn = f"c=IN {relay.family} {relay.ip}"
            for i in sec.conns:
                new[i] = conn
        rtcp = relay.rtcp
        for i in sec.rtcp:
            new[i] = _rtcp_line(contents[i], rtcp, None if held else relay, rtcp_address_always)
        if not relay.rtcp_mux:
            for i in sec.mux:
                new[i] = None
        for i in sec.ice:
            new[i] = None
        extra = []
        if not sec.rtcp and not relay.rtcp_mux and rtcp != relay.port + 1:
            extra.append(f"a=rtcp:{rtcp}")
        if relay.rtcp_mux and not sec.mux:
            # the relay accepts rtcp-mux on this side even where the far side declined
            # it (it demultiplexes RTCP by payload type, RFC 5761)
            extra.append("a=rtcp-mux")
        if extra:  # after the section's last line that is kept and not blank
            last = max(i for i in range(sec.m, sec.end) if new[i] is not None and new[i].strip())
            after.setdefault(last, []).extend(extra)
    if not relayed:
        return "".join(line + eol for line, eol in zip(contents, doc.eols))

    _session_connection(doc, relays, new, after, rejected)
    if doc.session_ice and not any(
            relay is None and stream.ice and not stream.disabled
            and stream.index not in rejected
            for stream, relay in zip(streams, relays)):
        for i in doc.session_ice:
            new[i] = None
    changed = bool(after) or new != contents
    if changed and bump and doc.origin is not None:
        new[doc.origin] = _bumped(contents[doc.origin])

    eols = doc.eols
    if not after and new[-1] is not None:
        if doc.crlf:
            return "\r\n".join([line for line in new if line is not None]) + "\r\n"
        return "".join([line + eol for line, eol in zip(new, eols) if line is not None])
    parts: List[str] = []
    for i, line in enumerate(new):
        eol = eols[i]
        if line is not None:
            parts.append(line)
            parts.append(eol)
        for extra in after.get(i, ()):
            if eol:
                parts.append(extra)
                parts.append(eol)
            else:  # after the body's last line, which has no newline: keep it that way
                parts.append(doc.eol)
                parts.append(extra)
    if new[-1] is None and len(new) - 1 not in after and parts:
        parts[-1] = eols[-1]  # the removed last line's ending (or its lack of one) stays last
    return "".join(parts)


def _session_connection(doc: _Doc, relays: Sequence[Optional[StreamRelay]],
                        new: List[Optional[str]], after: Dict[int, List[str]],
                        rejected: AbstractSet[int]) -> None:
    """Move the session-level c= to the relay, or give relayed streams their own c=.

    The session c= moves when every enabled stream that inherits it is relayed to one
    address (disabled and `rejected` streams carry no media and do not count).
    Otherwise each relayed stream that inherits it gets a media-level c= and the
    session c= stays for the others. A null (held) session c= always stays.
    """
    desc = doc.desc
    if not doc.session_conns or desc.address in NULL_ADDRESSES:
        return
    # the usual body: every stream inherits the session c= and every enabled one is
    # relayed to one address: the session c= moves (as below, without the bookkeeping)
    target: Optional[StreamRelay] = None
    for stream, relay in zip(desc.streams, relays):
        if stream.media_connection:
            break
        if relay is None:
            if stream.port != 0 and stream.index not in rejected:
                break
        elif target is None:
            target = relay
        elif relay.ip != target.ip:
            break
    else:
        if target is not None:
            conn = f"c=IN {target.family} {target.ip}"
            for i in doc.session_conns:
                new[i] = conn
            return
    inheritors = [(stream, relay) for stream, relay in zip(desc.streams, relays)
                  if not stream.media_connection]
    untouched = any(relay is None and not stream.disabled and stream.index not in rejected
                    for stream, relay in inheritors)
    moved = [(stream, relay) for stream, relay in inheritors if relay is not None]
    if moved:
        targets: Set[Tuple[str, str]] = {(relay.family, relay.ip) for _, relay in moved}
    else:  # no stream uses the session c=: hide the peer's address if the relay has one
        targets = {(relay.family, relay.ip) for stream, relay in zip(desc.streams, relays)
                   if relay is not None and not stream.null_address}
    if not untouched and len(targets) == 1:
        family, ip = next(iter(targets))
        for i in doc.session_conns:
            new[i] = f"c=IN {family} {ip}"
        return
    for stream, relay in moved:
        # first: an a= line added after the same (m=) line must follow the c= (RFC 4566)
        after.setdefault(doc.sections[stream.index].insert_at, []).insert(
            0, f"c=IN {relay.family} {relay.ip}")
