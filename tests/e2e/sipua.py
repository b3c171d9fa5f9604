"""Minimal SIP user agents over UDP for end-to-end tests through a real Kamailio.

Just enough of RFC 3261 for INVITE / 183 / 200 / ACK / BYE through a record-routing
proxy: no authentication, no retransmission timers beyond a bounded wait.
"""

from __future__ import annotations

import itertools
import re
import select
import socket
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

Addr = Tuple[str, int]

_ids = itertools.count(1)  # branches and tags: unique in a run, the same in every run


def _unique(width: int) -> str:
    return f"{next(_ids):0{width}x}"


@dataclass
class SipMessage:
    first_line: str
    headers: List[Tuple[str, str]]
    body: str

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
    def cseq_method(self) -> str:
        return (self.header("CSeq") or "0 X").split()[1]

    def sdp_media(self) -> Addr:
        ip = re.search(r"^c=IN IP4 (\S+)", self.body, re.M)
        port = re.search(r"^m=audio (\d+)", self.body, re.M)
        assert ip and port, f"no media in SDP: {self.body!r}"
        return ip.group(1), int(port.group(1))

    def encode(self) -> bytes:
        lines = [self.first_line] + [f"{k}: {v}" for k, v in self.headers
                                     if k.lower() != "content-length"]
        lines.append(f"Content-Length: {len(self.body.encode())}")
        return ("\r\n".join(lines) + "\r\n\r\n" + self.body).encode()


def parse(data: bytes) -> SipMessage:
    text = data.decode("utf-8", "replace")
    head, _, body = text.partition("\r\n\r\n")
    lines = head.split("\r\n")
    headers = []
    for line in lines[1:]:
        key, _, value = line.partition(":")
        headers.append((key.strip(), value.strip()))
    return SipMessage(lines[0], headers, body)


def sdp(ip: str, port: int) -> str:
    return (f"v=0\r\no=- 1 1 IN IP4 {ip}\r\ns=call\r\nc=IN IP4 {ip}\r\nt=0 0\r\n"
            f"m=audio {port} RTP/AVP 0\r\na=rtpmap:0 PCMU/8000\r\n")


@dataclass
class Dialog:
    call_id: str
    local_tag: str
    remote_tag: str = ""
    route: List[str] = field(default_factory=list)
    remote_target: str = ""
    cseq: int = 1


class UserAgent:
    """One SIP endpoint bound to a loopback UDP port."""

    def __init__(self, name: str, proxy: Addr, host: str = "127.0.0.1") -> None:
        self.name = name
        self.proxy = proxy
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind((host, 0))
        self.addr: Addr = self.sock.getsockname()[:2]
        self.uri = f"sip:{name}@{self.addr[0]}:{self.addr[1]}"
        self.pending: List[SipMessage] = []

    def close(self) -> None:
        self.sock.close()

    def send(self, msg: SipMessage, dest: Optional[Addr] = None) -> None:
        self.sock.sendto(msg.encode(), dest or self.proxy)

    def via(self) -> str:
        branch = "z9hG4bK" + _unique(10)
        return f"SIP/2.0/UDP {self.addr[0]}:{self.addr[1]};branch={branch};rport"

    def wait(self, predicate, timeout: float = 5.0) -> SipMessage:
        """The first message (queued or new) matching `predicate`, within `timeout`."""
        deadline = time.monotonic() + timeout
        while True:
            for msg in self.pending:
                if predicate(msg):
                    self.pending.remove(msg)
                    return msg
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"{self.name}: no matching SIP message within {timeout}s; "
                                     f"got {[m.first_line for m in self.pending]}")
            ready, _, _ = select.select([self.sock], [], [], left)
            if ready:
                data, _ = self.sock.recvfrom(65535)
                self.pending.append(parse(data))

    # -- caller side ---------------------------------------------------------------------
    def invite(self, callee: UserAgent, call_id: str, media: Addr,
               extra: Optional[Dict[str, str]] = None) -> Dialog:
        dialog = Dialog(call_id=call_id, local_tag=_unique(8))
        headers = [
            ("Via", self.via()), ("Max-Forwards", "70"),
            ("From", f"<sip:{self.name}@test.invalid>;tag={dialog.local_tag}"),
            ("To", f"<sip:{callee.name}@test.invalid>"),
            ("Call-ID", call_id), ("CSeq", "1 INVITE"),
            ("Contact", f"<{self.uri}>"), ("Content-Type", "application/sdp"),
        ]
        headers += list((extra or {}).items())
        self.send(SipMessage(f"INVITE {callee.uri} SIP/2.0", headers, sdp(*media)))
        return dialog

    def await_final(self, dialog: Dialog, timeout: float = 10.0) -> SipMessage:
        """Wait for the 200 OK, remember dialog state from it, and ACK it."""
        ok = self.wait(lambda m: not m.is_request and m.header("Call-ID") == dialog.call_id
                       and m.cseq_method == "INVITE" and m.status >= 200, timeout)
        to = ok.header("To") or ""
        dialog.remote_tag = to.split("tag=")[1].split(";")[0] if "tag=" in to else ""
        dialog.route = list(reversed(ok.all("Record-Route")))
        dialog.remote_target = (ok.header("Contact") or "").strip("<>")
        self.send(self._in_dialog("ACK", dialog, cseq=1))
        return ok

    def bye(self, dialog: Dialog) -> SipMessage:
        dialog.cseq += 1
        self.send(self._in_dialog("BYE", dialog, cseq=dialog.cseq))
        return self.wait(lambda m: not m.is_request and m.cseq_method == "BYE"
                         and m.header("Call-ID") == dialog.call_id)

    def _in_dialog(self, method: str, dialog: Dialog, cseq: int) -> SipMessage:
        headers = [("Via", self.via()), ("Max-Forwards", "70")]
        headers += [("Route", r) for r in dialog.route]
        headers += [
            ("From", f"<sip:{self.name}@test.invalid>;tag={dialog.local_tag}"),
            ("To", f"<sip:x@test.invalid>;tag={dialog.remote_tag}"),
            ("Call-ID", dialog.call_id), ("CSeq", f"{cseq} {method}"),
        ]
        return SipMessage(f"{method} {dialog.remote_target} SIP/2.0", headers, "")

    # -- callee side ---------------------------------------------------------------------
    def answer(self, media: Addr, early: bool = True, extra: Optional[Dict[str, str]] = None,
               timeout: float = 10.0) -> Tuple[SipMessage, str]:
        """Take the next INVITE; reply 183 (if `early`) and 200, both with SDP (no ACK wait)."""
        invite = self.wait(lambda m: m.is_request and m.method == "INVITE", timeout)
        tag = _unique(8)
        for status in (["183 Session Progress"] if early else []) + ["200 OK"]:
            headers = [(k, v) for k, v in invite.headers
                       if k.lower() in ("via", "record-route", "from", "call-id", "cseq")]
            headers.insert(3, ("To", f"{invite.header('To')};tag={tag}"))
            headers += [("Contact", f"<{self.uri}>"), ("Content-Type", "application/sdp")]
            headers += list((extra or {}).items())
            self.send(SipMessage(f"SIP/2.0 {status}", headers, sdp(*media)),
                      self._reply_dest(invite))
        return invite, tag

    def await_ack(self, call_id: str, timeout: float = 10.0) -> SipMessage:
        return self.wait(lambda m: m.is_request and m.method == "ACK"
                         and m.header("Call-ID") == call_id, timeout)

    def answer_bye(self, call_id: str, timeout: float = 10.0) -> None:
        bye = self.wait(lambda m: m.is_request and m.method == "BYE"
                        and m.header("Call-ID") == call_id, timeout)
        headers = [(k, v) for k, v in bye.headers
                   if k.lower() in ("via", "from", "to", "call-id", "cseq")]
        self.send(SipMessage("SIP/2.0 200 OK", headers, ""), self._reply_dest(bye))

    def _reply_dest(self, request: SipMessage) -> Addr:
        top = request.all("Via")[0]
        hostport = top.split()[1].split(";")[0]
        host, _, port = hostport.partition(":")
        return host, int(port or 5060)
