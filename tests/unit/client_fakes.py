"""Test doubles for the lrk.client tests: a fake clock, an in-memory network, fake relays."""

from __future__ import annotations

import os
import re
import socket
import tempfile
import threading
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

import msgpack

from lrk.client.nodes import NodeAddress
from lrk.control.auth import trailer_of

Request = Dict[str, Any]


class FakeClock:
    """A clock that only moves when told to."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def _rewrite_sdp(sdp: Union[str, bytes], ip: str, port: int) -> Union[str, bytes]:
    text = sdp.decode("utf-8") if isinstance(sdp, bytes) else sdp
    text = re.sub(r"(?m)^c=IN IP[46] [^\r\n]+", f"c=IN IP4 {ip}", text)
    text = re.sub(r"(?m)^(m=audio )\d+", lambda m: f"{m.group(1)}{port}", text, count=1)
    return text.encode("utf-8") if isinstance(sdp, bytes) else text


class RelayLogic:
    """Enough of the relay's command semantics (docs/protocol.md) to drive the client."""

    def __init__(self, ip: str = "127.0.0.1", base_port: int = 30000) -> None:
        self.ip = ip
        self.next_port = base_port
        self.sessions: Dict[str, Dict[str, Any]] = {}
        self.requests: List[Request] = []

    def _ok(self, req: Request, **fields: Any) -> Request:
        reply = {"v": 1, "cookie": req.get("cookie"), "ok": True}
        reply.update(fields)
        return reply

    def _err(self, req: Request, code: str, message: str) -> Request:
        return {"v": 1, "cookie": req.get("cookie"), "ok": False,
                "error": {"code": code, "message": message}}

    def _media(self, req: Request, leg: str, port: int) -> Request:
        relay = {"ip": self.ip, "port": port, "rtcp_port": port + 1}
        fields: Dict[str, Any] = {"call_id": req["call_id"], "leg": leg, "relay": relay}
        if "sdp" in req:
            fields["sdp"] = _rewrite_sdp(req["sdp"], self.ip, port)
        return self._ok(req, **fields)

    def handle(self, req: Request) -> Request:
        self.requests.append(req)
        cmd = req.get("cmd")
        if cmd == "ping":
            return self._ok(req, pong=True)
        if cmd == "capabilities":
            return self._ok(req, version=1, commands=["ping", "offer"], mode="fake")
        if cmd == "stats":
            return self._ok(req, sessions=len(self.sessions), counters={})
        if cmd == "list":
            return self._ok(req, total=len(self.sessions),
                            sessions=[{"call_id": c} for c in self.sessions])
        if cmd == "offer":
            session = self.sessions.get(req["call_id"])
            if session is None:
                session = self.sessions[req["call_id"]] = {
                    "ports": (self.next_port, self.next_port + 2), "tags": [req["from_tag"]]}
                self.next_port += 4
            return self._media(req, "B", session["ports"][1])
        if cmd in ("answer", "query", "delete"):
            session = self.sessions.get(req["call_id"])
            if session is None:
                return self._err(req, "not_found", f"no session {req['call_id']}")
            if cmd == "answer":
                return self._media(req, "A", session["ports"][0])
            if cmd == "delete":
                del self.sessions[req["call_id"]]
            return self._ok(req, call_id=req["call_id"], session={"call_id": req["call_id"]})
        return self._err(req, "unknown_command", f"unknown command {cmd!r}")


def decode(data: bytes) -> Request:
    """A request map; a signed request's trailer (lrk.control.auth) is dropped unchecked."""
    tail = trailer_of(data)
    return msgpack.unpackb(data if tail is None else tail[0], raw=False)


def encode(reply: Request) -> bytes:
    return msgpack.packb(reply, use_bin_type=True)


class FakeNet:
    """An in-memory network of relay nodes for LrkClient(transport_factory=net.factory).

    Every datagram sent is recorded per node. A node answers with its RelayLogic
    unless it is dead, or told to stay silent for its next N requests, or given a
    custom handler. A receive with nothing queued advances the fake clock by the
    wait time, as a real timeout would.
    """

    def __init__(self, clock: FakeClock) -> None:
        self.clock = clock
        self.sent: List[Tuple[str, bytes]] = []
        self.logic: Dict[str, RelayLogic] = {}
        self.dead: set = set()
        self.silent: Dict[str, int] = {}
        self.handlers: Dict[str, Callable[[Request], Optional[Request]]] = {}
        self.opened: List[str] = []

    def relay(self, address: str) -> RelayLogic:
        if address not in self.logic:
            self.logic[address] = RelayLogic(base_port=30000 + 1000 * len(self.logic))
        return self.logic[address]

    def sent_to(self, address: str) -> List[bytes]:
        return [data for addr, data in self.sent if addr == address]

    def requests_to(self, address: str) -> List[Request]:
        return [decode(data) for data in self.sent_to(address)]

    def factory(self, address: NodeAddress) -> FakeTransport:
        self.opened.append(str(address))
        return FakeTransport(self, str(address))

    def respond(self, address: str, data: bytes) -> Optional[bytes]:
        self.sent.append((address, data))
        if address in self.dead:
            return None
        if self.silent.get(address, 0) > 0:
            self.silent[address] -= 1
            return None
        req = decode(data)
        handler = self.handlers.get(address)
        reply = handler(req) if handler else self.relay(address).handle(req)
        return None if reply is None else encode(reply)


class FakeTransport:
    def __init__(self, net: FakeNet, address: str) -> None:
        self.net = net
        self.address = address
        self.queue: List[bytes] = []
        self.closed = False

    def send(self, data: bytes) -> None:
        reply = self.net.respond(self.address, data)
        if reply is not None:
            self.queue.append(reply)

    def recv(self, timeout: float) -> Optional[bytes]:
        if self.queue:
            return self.queue.pop(0)
        self.net.clock.advance(timeout)
        return None

    def close(self) -> None:
        self.closed = True


class SocketRelay:
    """A fake relay node on a real socket (UDP on loopback, or a unix datagram path).

    Runs RelayLogic in a thread; `silent_for(n)` makes it ignore its next n
    requests. `datagrams` holds every datagram received, in order; it is
    appended before any reply is sent, so once a client has its reply, every
    earlier datagram is recorded.
    """

    def __init__(self, family: int = socket.AF_INET, host: str = "127.0.0.1") -> None:
        self.logic = RelayLogic(ip=host if family != socket.AF_UNIX else "127.0.0.1")
        self.datagrams: List[bytes] = []
        self._silent = 0
        self._lock = threading.Lock()
        self.sock = socket.socket(family, socket.SOCK_DGRAM)
        self._dir: Optional[str] = None
        if family == socket.AF_UNIX:
            self._dir = tempfile.mkdtemp(prefix="lrk-fake-relay-")
            self.path = os.path.join(self._dir, "relay.sock")
            self.sock.bind(self.path)
            self.node = f"unix:{self.path}"
        else:
            self.sock.bind((host, 0))
            port = self.sock.getsockname()[1]
            self.node = f"udp6:[{host}]:{port}" if family == socket.AF_INET6 \
                else f"udp:{host}:{port}"
        self.sock.settimeout(0.05)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def silent_for(self, n: int) -> None:
        with self._lock:
            self._silent = n

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                data, addr = self.sock.recvfrom(65535)
            except socket.timeout:
                continue
            except OSError:
                return
            with self._lock:
                self.datagrams.append(data)
                if self._silent > 0:
                    self._silent -= 1
                    continue
            reply = self.logic.handle(decode(data))
            try:
                self.sock.sendto(encode(reply), addr)
            except OSError:
                pass

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.sock.close()
        if self._dir:
            os.unlink(self.path)
            os.rmdir(self._dir)


class DeadNode:
    """A bound UDP socket that never answers; counts what reached it."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.setblocking(False)
        self.node = f"udp:127.0.0.1:{self.sock.getsockname()[1]}"
        self.datagrams: List[bytes] = []

    def drain(self) -> List[bytes]:
        """Every datagram received so far (loopback delivery is synchronous with send)."""
        while True:
            try:
                self.datagrams.append(self.sock.recv(65535))
            except BlockingIOError:
                return self.datagrams

    def close(self) -> None:
        self.sock.close()
