"""A small SIP phone for the KEMI end-to-end tests, through a record-routing proxy.

Any SDP (audio + video), re-INVITE and UPDATE in both directions, ACK with or without
SDP (late offer), CANCEL, and several provisional answers with different To tags (the
early dialogs of a forked call). UDP on loopback; every wait is bounded.
"""

from __future__ import annotations

import itertools
import re
import select
import socket
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from lrk.demo.media import MediaEndpoint

Addr = Tuple[str, int]

_ids = itertools.count(1)  # tags, branches: unique within a run, the same in every run


def unique(prefix: str) -> str:
    return f"{prefix}{next(_ids):06x}"


@dataclass
class Msg:
    first_line: str
    headers: List[Tuple[str, str]]
    body: str = ""

    @property
    def is_request(self) -> bool:
        return not self.first_line.startswith("SIP/2.0")

    @property
    def method(self) -> str:
        return self.first_line.split()[0]

    @property
    def status(self) -> int:
        return int(self.first_line.split()[1])

    def header(self, name: str) -> Optional[str]:
        for key, value in self.headers:
            if key.lower() == name.lower():
                return value
        return None

    def all(self, name: str) -> List[str]:
        return [v for k, v in self.headers if k.lower() == name.lower()]

    @property
    def call_id(self) -> str:
        return self.header("Call-ID") or ""

    @property
    def cseq(self) -> Tuple[int, str]:
        number, method = (self.header("CSeq") or "0 X").split()
        return int(number), method

    @property
    def to_tag(self) -> str:
        return _tag(self.header("To") or "")

    @property
    def from_tag(self) -> str:
        return _tag(self.header("From") or "")

    def encode(self) -> bytes:
        lines = [self.first_line] + [f"{k}: {v}" for k, v in self.headers]
        if self.body:
            lines.append("Content-Type: application/sdp")
        lines.append(f"Content-Length: {len(self.body.encode())}")
        return ("\r\n".join(lines) + "\r\n\r\n" + self.body).encode()


def _tag(value: str) -> str:
    match = re.search(r";\s*tag=([^;>\s]+)", value)
    return match.group(1) if match else ""


def parse(data: bytes) -> Msg:
    text = data.decode("utf-8", "replace")
    head, _, body = text.partition("\r\n\r\n")
    lines = head.split("\r\n")
    headers = []
    for line in lines[1:]:
        key, _, value = line.partition(":")
        if key.strip().lower() not in ("content-length", "l", "content-type", "c"):
            headers.append((key.strip(), value.strip()))
    return Msg(lines[0], headers, body)


# -- SDP: written and read here, independently of lrk's own parser --------------------------

AUDIO, VIDEO = "audio", "video"
FORMATS = {AUDIO: ("0", "a=rtpmap:0 PCMU/8000"), VIDEO: ("96", "a=rtpmap:96 H264/90000")}


def make_sdp(name: str, media: Dict[str, MediaEndpoint], version: int = 1,
             ice: bool = False) -> str:
    """One m= line per entry of `media` (in order), all at the first endpoint's address."""
    host = next(iter(media.values())).host
    lines = ["v=0", f"o={name} 4711 {version} IN IP4 {host}", "s=-", f"c=IN IP4 {host}",
             "t=0 0"]
    if ice:
        lines += ["a=ice-ufrag:F7gI", "a=ice-pwd:x9cml/YzichV2+XlhiMu8g"]
    for kind, endpoint in media.items():
        pt, rtpmap = FORMATS[kind]
        lines += [f"m={kind} {endpoint.port} RTP/AVP {pt}", rtpmap, "a=sendrecv"]
        if ice:
            lines.append(f"a=candidate:1 1 UDP 2130706431 {host} {endpoint.port} typ host")
    return "\r\n".join(lines) + "\r\n"


def read_sdp(body: str) -> Dict[str, Addr]:
    """media kind -> (connection address, port) of each m= line (media-level c= wins)."""
    session_ip = None
    streams: Dict[str, Addr] = {}
    current: Optional[str] = None
    for line in body.splitlines():
        if line.startswith("c=IN IP4 "):
            ip = line.split()[2]
            if current is None:
                session_ip = ip
            else:
                streams[current] = (ip, streams[current][1])
        elif line.startswith("m="):
            kind, port = line[2:].split()[:2]
            current = kind
            streams[kind] = (session_ip or "", int(port))
    return streams


# -- the phone ---------------------------------------------------------------------------


@dataclass
class Dialog:
    call_id: str
    local_tag: str
    local_uri: str
    remote_uri: str
    remote_tag: str = ""
    route: List[str] = field(default_factory=list)
    target: str = ""
    cseq: int = 1
    invite: Optional[Msg] = None  # the initial INVITE we sent (CANCEL, ACK of failures)


class Phone:
    """A SIP endpoint on a loopback UDP port, with one media endpoint per stream kind."""

    def __init__(self, name: str, proxy: Addr, kinds: Sequence[str] = (AUDIO, VIDEO),
                 host: str = "127.0.0.1") -> None:
        self.name = name
        self.proxy = proxy
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind((host, 0))
        self.addr: Addr = self.sock.getsockname()[:2]
        self.uri = f"sip:{name}@{self.addr[0]}:{self.addr[1]}"
        self.aor = f"sip:{name}@test.invalid"
        self.media: Dict[str, MediaEndpoint] = {k: MediaEndpoint(host) for k in kinds}
        self.pending: List[Msg] = []
        self.version = 1

    def close(self) -> None:
        self.sock.close()
        for endpoint in self.media.values():
            endpoint.close()

    def sdp(self, ice: bool = False) -> str:
        self.version += 1
        return make_sdp(self.name, self.media, self.version, ice)

    def send(self, msg: Msg, dest: Optional[Addr] = None) -> None:
        self.sock.sendto(msg.encode(), dest or self.proxy)

    def _via(self, branch: Optional[str] = None) -> str:
        branch = branch or unique("z9hG4bK")
        return f"SIP/2.0/UDP {self.addr[0]}:{self.addr[1]};branch={branch};rport"

    def wait(self, predicate: Callable[[Msg], bool], timeout: float = 5.0,
             what: str = "a SIP message") -> Msg:
        """The first message (queued or new) matching `predicate`, within `timeout`."""
        deadline = time.monotonic() + timeout
        while True:
            for msg in self.pending:
                if predicate(msg):
                    self.pending.remove(msg)
                    return msg
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"{self.name}: no {what} within {timeout} s; got "
                                     f"{[m.first_line for m in self.pending]}")
            ready, _, _ = select.select([self.sock], [], [], left)
            if ready:
                self.pending.append(parse(self.sock.recv(65535)))

    def response(self, dialog: Dialog, method: str, status: Callable[[int], bool],
                 timeout: float = 5.0) -> Msg:
        return self.wait(lambda m: not m.is_request and m.call_id == dialog.call_id
                         and m.cseq[1] == method and status(m.status), timeout,
                         f"{method} response")

    def request(self, method: str, call_id: str, timeout: float = 5.0) -> Msg:
        return self.wait(lambda m: m.is_request and m.method == method
                         and m.call_id == call_id, timeout, f"{method} request")

    # -- as the caller -------------------------------------------------------------------
    def invite(self, callee: Phone, call_id: str, body: str = "") -> Dialog:
        dialog = Dialog(call_id, unique("t"), self.aor, callee.aor, target=callee.uri)
        msg = Msg(f"INVITE {callee.uri} SIP/2.0", [
            ("Via", self._via()), ("Max-Forwards", "70"),
            ("From", f"<{self.aor}>;tag={dialog.local_tag}"), ("To", f"<{callee.aor}>"),
            ("Call-ID", call_id), ("CSeq", "1 INVITE"), ("Contact", f"<{self.uri}>"),
        ], body)
        dialog.invite = msg
        self.send(msg)
        return dialog

    def confirmed(self, dialog: Dialog, ok: Msg) -> None:
        """Take the dialog's remote tag, route set and target from a 2xx to our INVITE."""
        dialog.remote_tag = ok.to_tag
        dialog.route = list(reversed(ok.all("Record-Route")))
        dialog.target = (ok.header("Contact") or "").strip("<>")

    def cancel(self, dialog: Dialog) -> None:
        invite = dialog.invite
        assert invite is not None
        self.send(Msg(f"CANCEL {invite.first_line.split()[1]} SIP/2.0", [
            ("Via", invite.header("Via") or ""), ("Max-Forwards", "70"),
            ("From", invite.header("From") or ""), ("To", invite.header("To") or ""),
            ("Call-ID", dialog.call_id), ("CSeq", "1 CANCEL"),
        ]))

    def ack_failure(self, invite: Msg, failure: Msg) -> None:
        """The hop-by-hop ACK of a final failure to an INVITE we sent: its Request-URI,
        Via (branch), Route and CSeq number, the failure's To (RFC 3261 17.1.1.3)."""
        headers = [("Via", invite.header("Via") or ""), ("Max-Forwards", "70")]
        headers += [("Route", r) for r in invite.all("Route")]
        headers += [("From", invite.header("From") or ""), ("To", failure.header("To") or ""),
                    ("Call-ID", invite.call_id), ("CSeq", f"{invite.cseq[0]} ACK")]
        self.send(Msg(f"ACK {invite.first_line.split()[1]} SIP/2.0", headers))

    # -- in a dialog, either side ----------------------------------------------------------
    def in_dialog(self, dialog: Dialog, method: str, body: str = "",
                  cseq: Optional[int] = None) -> Msg:
        if cseq is None:
            dialog.cseq += 1
            cseq = dialog.cseq
        headers = [("Via", self._via()), ("Max-Forwards", "70")]
        headers += [("Route", r) for r in dialog.route]
        headers += [
            ("From", f"<{dialog.local_uri}>;tag={dialog.local_tag}"),
            ("To", f"<{dialog.remote_uri}>;tag={dialog.remote_tag}"),
            ("Call-ID", dialog.call_id), ("CSeq", f"{cseq} {method}"),
            ("Contact", f"<{self.uri}>"),
        ]
        msg = Msg(f"{method} {dialog.target} SIP/2.0", headers, body)
        self.send(msg)
        return msg

    def ack(self, dialog: Dialog, body: str = "") -> None:
        """The ACK of a 2xx to the INVITE of CSeq `dialog.cseq` (its own transaction)."""
        self.in_dialog(dialog, "ACK", body, cseq=dialog.cseq)

    # -- as the one who answers ---------------------------------------------------------
    def reply(self, request: Msg, status: str, body: str = "", tag: str = "") -> None:
        """A response to `request`, with our To tag (and our Contact on 1xx/2xx)."""
        to = request.header("To") or ""
        if tag and not request.to_tag:
            to = f"{to};tag={tag}"
        headers = [(k, v) for k, v in request.headers if k.lower() == "via"]
        code = int(status.split()[0])
        if code < 300 and request.method == "INVITE":
            headers += [("Record-Route", r) for r in request.all("Record-Route")]
        headers += [("From", request.header("From") or ""), ("To", to),
                    ("Call-ID", request.call_id), ("CSeq", request.header("CSeq") or "")]
        if code < 300:
            headers.append(("Contact", f"<{self.uri}>"))
        self.send(Msg(f"SIP/2.0 {status}", headers, body), via_address(request))

    def callee_dialog(self, invite: Msg, tag: str) -> Dialog:
        """The dialog as the callee sees it, once it answered `invite` with To tag `tag`."""
        return Dialog(invite.call_id, tag, _uri(invite.header("To")),
                      _uri(invite.header("From")), invite.from_tag,
                      route=list(invite.all("Record-Route")),
                      target=(invite.header("Contact") or "").strip("<>"),
                      cseq=100)


def _uri(value: Optional[str]) -> str:
    match = re.search(r"<([^>]*)>", value or "")
    assert match, value
    return match.group(1)


def via_address(request: Msg) -> Addr:
    """Where a response goes: the top Via's host and port (received/rport honoured)."""
    top = request.all("Via")[0]
    hostport, _, params = top.split()[1].partition(";")
    host, _, port = hostport.partition(":")
    values = dict(p.partition("=")[::2] for p in params.split(";") if p)
    return values.get("received") or host, int(values.get("rport") or port or 5060)
