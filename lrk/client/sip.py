"""A minimal, strict-enough SIP message parser (SIP only: SDP is lrk.core.sdp's job).

It reads what lrkproxy_manage() needs (start line, Call-ID, CSeq, top Via
branch, From/To tags, Content-Type, body) and can put a new body back with a
correct Content-Length. Bytes input is handled as latin-1 text so that every
byte outside the parts we rewrite comes back unchanged.
"""

from __future__ import annotations

import re
from typing import Dict, List, Optional, Tuple, Union

from lrk.client.errors import SipParseError

SipData = Union[str, bytes]

COMPACT_FORMS = {
    "i": "call-id", "v": "via", "f": "from", "t": "to", "c": "content-type",
    "l": "content-length", "m": "contact", "s": "subject", "k": "supported",
    "e": "content-encoding", "o": "event", "r": "refer-to", "u": "allow-events",
    "x": "session-expires",
}

_TOKEN = re.compile(r"[A-Za-z0-9.!%*_+`'~-]+\Z")
_LINE_SPLIT = re.compile(r"\r\n|\n")
_MAX_SHOWN = 60


def _shown(text: str) -> str:
    return repr(text if len(text) <= _MAX_SHOWN else text[:_MAX_SHOWN] + "...")


def _split_top(value: str, sep: str = ",") -> List[str]:
    """Split on `sep` outside quoted strings and <...> (URIs may hold `;` and `,`)."""
    parts: List[str] = []
    start = 0
    quoted = escaped = False
    depth = 0
    for i, ch in enumerate(value):
        if quoted:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                quoted = False
        elif ch == '"':
            quoted = True
        elif ch == "<":
            depth += 1
        elif ch == ">" and depth:
            depth -= 1
        elif ch == sep and not depth:
            parts.append(value[start:i])
            start = i + 1
    parts.append(value[start:])
    return parts


def _params(parts: List[str]) -> Dict[str, str]:
    result: Dict[str, str] = {}
    for part in parts:
        name, _, val = part.partition("=")
        name = name.strip().lower()
        if name and name not in result:
            val = val.strip()
            if len(val) >= 2 and val[0] == val[-1] == '"':
                val = val[1:-1]
            result[name] = val
    return result


def header_params(value: str) -> Dict[str, str]:
    """The header parameters of a From/To/Contact-like value (not the URI's parameters)."""
    pieces = _split_top(value, ";")
    return _params(pieces[1:])


class SipMessage:
    """A parsed SIP request or response; header names are stored lower-case, long form."""

    def __init__(self, start_line: str, header_lines: List[str], headers: List[Tuple[str, str]],
                 body: str, is_bytes: bool, eol: str) -> None:
        self.start_line = start_line
        self.headers = headers  # (canonical lower-case name, value), in message order
        self.body = body  # text; latin-1 decoded when the input was bytes
        self.is_bytes = is_bytes
        self._header_lines = header_lines  # raw lines, continuations included
        self._eol = eol
        parts = start_line.split(" ", 2)
        self.method: Optional[str] = None
        self.uri: Optional[str] = None
        self.status: Optional[int] = None
        self.reason: Optional[str] = None
        if parts[0].upper().startswith("SIP/"):
            if len(parts) < 2 or not (len(parts[1]) == 3 and parts[1].isdigit()):
                raise SipParseError(f"bad status line {_shown(start_line)}")
            self.status = int(parts[1])
            if not 100 <= self.status <= 699:
                raise SipParseError(f"status code {self.status} is not in 100-699")
            self.reason = parts[2] if len(parts) > 2 else ""
        else:
            parts = start_line.split(" ")
            if (len(parts) != 3 or not _TOKEN.match(parts[0]) or not parts[1]
                    or not parts[2].upper().startswith("SIP/")):
                raise SipParseError(f"bad request line {_shown(start_line)}")
            self.method = parts[0].upper()
            self.uri = parts[1]

    def __repr__(self) -> str:
        return f"SipMessage({self.start_line!r})"

    @property
    def is_request(self) -> bool:
        return self.method is not None

    def header(self, name: str) -> Optional[str]:
        """The first value of a header (long or compact name, any case), or None."""
        key = name.lower()
        key = COMPACT_FORMS.get(key, key)
        for hname, value in self.headers:
            if hname == key:
                return value
        return None

    def header_values(self, name: str) -> List[str]:
        """Every comma-separated value of every header with that name, in order."""
        key = name.lower()
        key = COMPACT_FORMS.get(key, key)
        values: List[str] = []
        for hname, value in self.headers:
            if hname == key:
                values.extend(v.strip() for v in _split_top(value) if v.strip())
        return values

    @property
    def call_id(self) -> Optional[str]:
        value = self.header("call-id")
        return value.strip() if value and value.strip() else None

    @property
    def cseq(self) -> Optional[Tuple[int, str]]:
        """(number, METHOD) from CSeq, None when absent; raises SipParseError when garbled."""
        value = self.header("cseq")
        if value is None:
            return None
        parts = value.split()
        if len(parts) != 2 or not parts[0].isdigit() or not _TOKEN.match(parts[1]):
            raise SipParseError(f"bad CSeq header {_shown(value)}")
        return int(parts[0]), parts[1].upper()

    @property
    def cseq_method(self) -> Optional[str]:
        cseq = self.cseq
        return cseq[1] if cseq else None

    @property
    def via_branch(self) -> Optional[str]:
        """The branch parameter of the top-most Via, or None."""
        vias = self.header_values("via")
        if not vias:
            return None
        return _params(_split_top(vias[0], ";")[1:]).get("branch") or None

    def _tag(self, name: str) -> Optional[str]:
        value = self.header(name)
        if value is None:
            return None
        unquoted = re.sub(r'"(?:[^"\\]|\\.)*"', "", value)  # a display name may hold <>
        if unquoted.count("<") != unquoted.count(">"):
            raise SipParseError(f"unbalanced <> in {name.capitalize()} header {_shown(value)}")
        return header_params(value).get("tag") or None

    @property
    def from_tag(self) -> Optional[str]:
        return self._tag("from")

    @property
    def to_tag(self) -> Optional[str]:
        return self._tag("to")

    @property
    def content_type(self) -> Optional[str]:
        """The media type, lower-case, without parameters (`application/sdp`)."""
        value = self.header("content-type")
        if value is None:
            return None
        return value.split(";", 1)[0].strip().lower()

    def has_sdp(self) -> bool:
        """Whether the body is an SDP (non-empty, Content-Type application/sdp or absent)."""
        if not self.body.strip():
            return False
        ctype = self.content_type
        return ctype is None or ctype == "application/sdp"

    @property
    def sdp(self) -> SipData:
        """The body in the input's type (bytes in, bytes out)."""
        return self.body.encode("latin-1") if self.is_bytes else self.body

    def with_body(self, body: SipData) -> SipData:
        """The whole message with a new body and Content-Length fixed, in the input's type."""
        if self.is_bytes:
            text = body.decode("latin-1") if isinstance(body, bytes) else \
                body.encode("utf-8").decode("latin-1")
            length = len(text)
        else:
            text = body.decode("utf-8") if isinstance(body, bytes) else body
            length = len(text.encode("utf-8"))
        lines: List[str] = []
        replaced = skipping = False
        for line in self._header_lines:
            if line[:1] in (" ", "\t"):
                if not skipping:
                    lines.append(line)
                continue
            raw_name = line.split(":", 1)[0].strip()
            key = COMPACT_FORMS.get(raw_name.lower(), raw_name.lower())
            skipping = key == "content-length"
            if skipping:
                if not replaced:
                    lines.append(f"{raw_name}: {length}")
                    replaced = True
                continue
            lines.append(line)
        if not replaced:
            lines.append(f"Content-Length: {length}")
        eol = self._eol
        out = self.start_line + eol + "".join(line + eol for line in lines) + eol + text
        return out.encode("latin-1") if self.is_bytes else out


def parse_sip(data: SipData) -> SipMessage:
    """Parse a SIP message from bytes or str; raises SipParseError naming the problem."""
    if isinstance(data, (bytes, bytearray, memoryview)):
        is_bytes = True
        text = bytes(data).decode("latin-1")
    elif isinstance(data, str):
        is_bytes = False
        text = data
    else:
        raise SipParseError(f"a SIP message must be bytes or str, not {type(data).__name__}")
    text = text.lstrip("\r\n")
    if not text.strip():
        raise SipParseError("empty SIP message")
    crlf = text.find("\r\n\r\n")
    lf = text.find("\n\n")
    if crlf >= 0 and (lf < 0 or crlf < lf):
        head, rest, eol = text[:crlf], text[crlf + 4:], "\r\n"
    elif lf >= 0:
        head, rest, eol = text[:lf], text[lf + 2:], "\n"
    else:  # no blank line: headers only, no body
        head, rest = text.rstrip("\r\n"), ""
        eol = "\r\n" if "\r\n" in head else "\n"
    lines = _LINE_SPLIT.split(head)
    start_line, header_lines = lines[0].strip(), lines[1:]
    headers: List[Tuple[str, str]] = []
    for line in header_lines:
        if line[:1] in (" ", "\t"):
            if not headers:
                raise SipParseError(f"continuation line before any header: {_shown(line)}")
            name, value = headers[-1]
            headers[-1] = (name, f"{value} {line.strip()}".strip())
            continue
        name, sep, value = line.partition(":")
        name = name.strip().lower()
        if not sep or not _TOKEN.match(name):
            raise SipParseError(f"bad header line {_shown(line)}")
        headers.append((COMPACT_FORMS.get(name, name), value.strip()))
    body = _cut_body(headers, rest, is_bytes)
    return SipMessage(start_line, header_lines, headers, body, is_bytes, eol)


def _cut_body(headers: List[Tuple[str, str]], rest: str, is_bytes: bool) -> str:
    lengths = [v for n, v in headers if n == "content-length"]
    if not lengths:
        return rest
    value = lengths[0]
    if not value.isdigit():
        raise SipParseError(f"Content-Length {value!r} is not a number")
    length = int(value)
    if is_bytes:
        if length > len(rest):
            raise SipParseError(f"Content-Length {length} but only {len(rest)} body bytes")
        return rest[:length]
    raw = rest.encode("utf-8")
    if length > len(raw):
        raise SipParseError(f"Content-Length {length} but only {len(raw)} body bytes")
    try:
        return raw[:length].decode("utf-8")
    except UnicodeDecodeError:
        raise SipParseError(f"Content-Length {length} ends inside a character") from None
