"""A tiny golden harness in the style of rtpengine's `t/auto-daemon-tests`: start the real
daemon (`lrkproxy run`, a child process) in one data-plane mode, send it control requests as
raw bytes (msgpack over UDP, the legacy text protocol over UDP) and compare the replies, and
the media it relays, exactly.

Nothing here goes through `lrk.client`: the tests pin the wire format itself (msgpack
requests are signed with the test session's control key, `tests/control_keys.py`, as every
client's are; the signature is a trailer, the map is what the scripts pin). Every wait is
bounded in count and time; "nothing arrived" is only ever checked after a counter showed
that the relay handled the packet (never by waiting out a timeout).

Two layouts: `loopback_layout()` (socket mode, no root: the relay, the caller and the callee
on loopback addresses of their own, 127.77.N.0/24) and `netns_layout(topology)` (root: the
relay in a namespace of its own between caller and callee namespaces, from
`bench.netns.Topology`). In both, leg A's relay address is `internal` (the caller's side)
and leg B's is `external` (the callee's side), as the namespace topology wires them.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple

import msgpack

from bench.netns import socket_in
from lrk.demo.relay_process import read_log
from tests.control_keys import sign_env

Addr = Tuple[str, int]

READY_TIMEOUT = 30.0  # the daemon's start (PyPy, kernel modes) on a loaded 2-CPU machine
REPLY_TIMEOUT = 3.0  # one control reply
MEDIA_TIMEOUT = 3.0  # one relayed datagram
POLL_TIMEOUT = 8.0  # a counter or a query reaching an expected value (kernel_poll is 0.2 s)
POLL_STEP = 0.05
CONTROL_PORT = 22222  # in a relay namespace of its own the defaults are free
LEGACY_PORT = 22333


# -- where things are ------------------------------------------------------------------------
@dataclass(frozen=True)
class Layout:
    """Addresses of one golden run. `*_ns` is None for the test's own namespace."""

    caller: str  # the caller's host: it announces this IP in its SDP
    callee: str
    internal: str  # relay address of leg A (the caller sends there)
    external: str  # relay address of leg B (the callee sends there)
    port_start: int
    port_end: int
    caller_ns: Optional[str] = None
    callee_ns: Optional[str] = None
    relay_ns: Optional[str] = None
    control_ip: str = "127.0.0.1"  # the control listeners, in the relay's namespace

    @property
    def ports(self) -> str:
        return f"{self.port_start}-{self.port_end}"


def loopback_layout(port_start: int = 30000, port_end: int = 30099) -> Layout:
    """Socket mode without root: every party on a loopback address of its own
    (127.77.N.x, N from the pid, so that parallel runs do not meet). A relay bound to
    127.77.N.1 never collides with one bound to another loopback address; the range must
    still be free of wildcard binds, which `check_ports_free` verifies."""
    net = f"127.77.{os.getpid() % 250}"
    return Layout(caller=f"{net}.10", callee=f"{net}.70", internal=f"{net}.1",
                  external=f"{net}.65", port_start=port_start, port_end=port_end,
                  control_ip=f"{net}.1")


def netns_layout(topo: Any, v6: bool = False, port_start: int = 30000,
                 port_end: int = 30099) -> Layout:
    """The namespace topology of `bench.netns.Topology`, its IPv4 or its IPv6 addresses
    (the control listeners stay on the relay namespace's 127.0.0.1)."""
    def pick(host: Any) -> str:
        return host.ip6 if v6 else host.ip4

    return Layout(caller=pick(topo.caller), callee=pick(topo.callee), internal=pick(topo.relay),
                  external=pick(topo.relay_ext), port_start=port_start, port_end=port_end,
                  caller_ns=topo.caller.ns, callee_ns=topo.callee.ns, relay_ns=topo.relay.ns)


def ipv6_ready(namespaces: Tuple[str, ...], timeout: float = 10.0) -> None:
    """Bounded wait until no address of `namespaces` is tentative: before duplicate address
    detection of the link-local addresses ends, neighbour discovery resolves nobody and
    IPv6 datagrams are lost."""
    def settled() -> bool:
        return not any(subprocess.run(
            ["ip", "netns", "exec", ns, "ip", "-6", "addr", "show", "tentative"],
            capture_output=True, text=True, timeout=20).stdout.strip() for ns in namespaces)

    poll(settled, timeout, lambda: f"IPv6 addresses of {namespaces} no longer tentative")


def udp_socket(ns: Optional[str], ip: str, port: int = 0,
               timeout: float = MEDIA_TIMEOUT) -> socket.socket:
    """A UDP socket bound to (ip, port) in namespace `ns` (None: this process's own)."""
    family = socket.AF_INET6 if ":" in ip else socket.AF_INET
    s = socket_in(ns, family) if ns else socket.socket(family, socket.SOCK_DGRAM)
    try:
        s.bind((ip, port))
    except BaseException:
        s.close()
        raise
    s.settimeout(timeout)
    return s


def check_ports_free(ips: List[str], start: int, end: int) -> None:
    """Fail (clearly) when another program holds a port of the range on one of `ips` (a
    wildcard bind would): the relay would skip it, and the golden ports would move."""
    busy = []
    for ip in ips:
        for port in range(start, end + 1):
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                try:
                    s.bind((ip, port))
                except OSError:
                    busy.append((ip, port))
    if busy:
        raise AssertionError(f"ports of the golden range are held by another program: {busy[:5]}")


# -- the daemon ---------------------------------------------------------------------------------
class GoldenRelay:
    """`lrkproxy run --mode MODE` as a child process (in the layout's relay namespace when it
    has one), with a msgpack control socket and a legacy UDP listener on fixed addresses."""

    def __init__(self, layout: Layout, mode: str, extra: Tuple[str, ...] = (),
                 config: str = "") -> None:
        self.layout = layout
        self.mode = mode
        self._tmp = tempfile.TemporaryDirectory(prefix="lrk-golden-")
        ns = layout.relay_ns
        ip = layout.control_ip
        if ns:
            self.control: Addr = (ip, CONTROL_PORT)
            self.legacy_addr: Addr = (ip, LEGACY_PORT)
        else:
            self.control = (ip, _free_port(ip))
            self.legacy_addr = (ip, _free_port(ip))
        args = ["run", "--mode", mode,
                "--control", f"{self.control[0]}:{self.control[1]}",
                "--legacy", f"{self.legacy_addr[0]}:{self.legacy_addr[1]}",
                "--ports", layout.ports,
                "--internal-ip", layout.internal, "--external-ip", layout.external,
                *extra]
        if config:
            path = os.path.join(self._tmp.name, "golden.toml")
            with open(path, "w") as fh:
                fh.write(config)
            args += ["--config", path]
        self.argv = [sys.executable, "-m", "lrk.cli", *args]
        if ns:
            self.argv = ["ip", "netns", "exec", ns, *self.argv]
        self.proc: Optional[subprocess.Popen] = None
        self._log = None
        self.output = ""
        self._sock: Optional[socket.socket] = None
        self._legacy_sock: Optional[socket.socket] = None
        self._polls = 0
        self.started_in = 0.0

    # -- lifecycle ------------------------------------------------------------------------
    def start(self) -> GoldenRelay:
        """Start and wait (bounded) for the lifecycle line "serving": the control socket
        opens last, so every listener is up then. No ping is sent: the first request a test
        sends is the first the relay sees."""
        self._log = tempfile.TemporaryFile()  # noqa: SIM115 - lives as long as the child
        began = time.monotonic()
        self.proc = subprocess.Popen(self.argv, stdout=self._log, stderr=subprocess.STDOUT)
        deadline = began + READY_TIMEOUT
        while True:
            out = self.read_output()
            if " serving: " in out:
                break
            if self.proc.poll() is not None:
                self.stop()
                raise AssertionError(f"relay ({self.mode}) exited with {self.proc.returncode} "
                                     f"before serving: {out}")
            if time.monotonic() > deadline:
                self.stop()
                raise AssertionError(f"relay ({self.mode}) not serving within {READY_TIMEOUT}s: "
                                     f"{out}")
            time.sleep(0.02)
        self.started_in = time.monotonic() - began
        ns = self.layout.relay_ns
        self._sock = udp_socket(ns, self.layout.control_ip, 0, REPLY_TIMEOUT)
        self._legacy_sock = udp_socket(ns, self.layout.control_ip, 0, REPLY_TIMEOUT)
        return self

    def stop(self, timeout: float = 15.0) -> int:
        """SIGTERM, a bounded wait, SIGKILL if it hangs; the exit code (None: never started)."""
        for s in (self._sock, self._legacy_sock):
            if s is not None:
                s.close()
        self._sock = self._legacy_sock = None
        proc = self.proc
        if proc is None:
            return 0
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout)
        if self._log is not None and not self._log.closed:
            self.output = self.read_output()
            self._log.close()
        self._tmp.cleanup()
        return proc.returncode

    def read_output(self) -> str:
        assert self._log is not None
        return read_log(self._log)

    def __enter__(self) -> GoldenRelay:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- msgpack control ------------------------------------------------------------------
    @staticmethod
    def signed(data: bytes) -> bytes:
        """`data` signed now with the session's key: resending these bytes is a
        retransmission (a second `request_raw(data)` is signed again: a new request)."""
        return sign_env(data)

    def request_raw(self, data: bytes, timeout: float = REPLY_TIMEOUT,
                    sign: bool = True) -> bytes:
        """Send one datagram to the control socket (signed first unless `sign` is False:
        bytes from `signed`); the reply's bytes. The reply must come from the address the
        request went to (docs/protocol.md)."""
        assert self._sock is not None, "relay not started"
        self._sock.sendto(sign_env(data) if sign else data, self.control)  # docs/protocol.md
        reply, src = _recv(self._sock, timeout, f"reply to {data[:60]!r}")
        assert src == self.control, f"reply came from {src}, not {self.control}"
        return reply

    def request(self, message: Dict[str, Any], timeout: float = REPLY_TIMEOUT) -> Any:
        """One msgpack request (a map, packed as a client would) -> the decoded reply."""
        return unpack(self.request_raw(msgpack.packb(message, use_bin_type=True), timeout))

    def no_reply(self, data: bytes, counter: str, before: int) -> None:
        """`data` to the control socket must get no reply, only `counter` moving by one."""
        assert self._sock is not None, "relay not started"
        self._no_reply(self._sock, self.control, data, counter, before)

    def _no_reply(self, sock: socket.socket, to: Addr, data: bytes, counter: str,
                  before: int) -> None:
        """Send `data`, wait until the stats counter `counter` went from `before` to
        `before + 1` (the relay handled it), then the socket must hold no reply."""
        assert self.counter(counter) == before, f"{counter} was not {before} before"
        sock.sendto(data, to)
        self.wait_counter(counter, before + 1)
        # stats replies come to the control socket and were read by wait_counter; anything
        # queued on `sock` now is a reply to `data`
        assert pending(sock) == [], f"{data!r} got a reply"

    # -- legacy protocol ---------------------------------------------------------------------
    def legacy(self, data: bytes, timeout: float = REPLY_TIMEOUT) -> bytes:
        assert self._legacy_sock is not None, "relay not started"
        self._legacy_sock.sendto(data, self.legacy_addr)
        reply, src = _recv(self._legacy_sock, timeout, f"legacy reply to {data[:60]!r}")
        assert src == self.legacy_addr, f"legacy reply came from {src}, not {self.legacy_addr}"
        return reply

    def legacy_no_reply(self, data: bytes, counter: str, before: int) -> None:
        """`data` to the legacy listener must get no reply, only `counter` moving by one."""
        assert self._legacy_sock is not None, "relay not started"
        self._no_reply(self._legacy_sock, self.legacy_addr, data, counter, before)

    # -- polling helpers (not golden: their own cookies) ---------------------------------------
    def _poll_cookie(self) -> str:
        self._polls += 1
        return f"poll-{self._polls}"

    def _polled(self, message: Dict[str, Any]) -> Any:
        cookie = self._poll_cookie()
        message = dict(message, v=1, cookie=cookie)
        reply = self.request(message)
        # anything else on the control socket (a reply to a request that must get none,
        # a late duplicate) shows here
        assert isinstance(reply, dict) and reply.get("cookie") == cookie, \
            f"unexpected datagram on the control socket instead of the reply to {message}: " \
            f"{reply!r}"
        return reply

    def stats(self) -> Dict[str, Any]:
        reply = self._polled({"cmd": "stats"})
        assert reply.get("ok") is True, reply
        return reply

    def counter(self, name: str) -> int:
        return self.stats()["counters"].get(name, 0)

    def wait_counter(self, name: str, value: int, timeout: float = POLL_TIMEOUT) -> None:
        """Poll `stats` until counter `name` equals `value` (bounded); fail on overshoot."""
        seen: List[int] = []

        def reached() -> bool:
            seen.append(self.counter(name))
            assert seen[-1] <= value, f"{name} went past {value}: {seen}"
            return seen[-1] == value

        poll(reached, timeout, lambda: f"{name} == {value} (seen {seen[-5:]})")

    def query(self, call_id: str) -> Any:
        return self._polled({"cmd": "query", "call_id": call_id})

    def wait_query(self, call_id: str, ready: Callable[[Dict[str, Any]], bool],
                   timeout: float = POLL_TIMEOUT) -> None:
        """Poll `query` until `ready(session)` (kernel modes read counters and latches from
        the kernel every kernel_poll seconds)."""
        last: List[Any] = []

        def done() -> bool:
            reply = self.query(call_id)
            last[:] = [reply]
            return reply.get("ok") is True and ready(reply["session"])

        poll(done, timeout, lambda: f"query {call_id!r} ready; last reply {last}")


def _free_port(ip: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind((ip, 0))
        return s.getsockname()[1]


def unpack(data: bytes) -> Any:
    """A reply as the wire has it: str stays str, bin stays bytes, ints stay ints."""
    return msgpack.unpackb(data, raw=False, strict_map_key=False)


# -- datagrams -----------------------------------------------------------------------------------
def _recv(sock: socket.socket, timeout: float, what: str) -> Tuple[bytes, Addr]:
    sock.settimeout(timeout)
    try:
        data, addr = sock.recvfrom(65535)
    except socket.timeout:
        raise AssertionError(f"no {what} within {timeout}s") from None
    return data, (addr[0], addr[1])


def receive(sock: socket.socket, what: str, timeout: float = MEDIA_TIMEOUT) -> Tuple[bytes, Addr]:
    """The next datagram on `sock` and its source (waited for at most `timeout`)."""
    return _recv(sock, timeout, what)


def pending(sock: socket.socket) -> List[Tuple[bytes, Addr]]:
    """What is queued on `sock` right now, without waiting."""
    got = []
    timeout = sock.gettimeout()
    sock.setblocking(False)
    try:
        for _ in range(1000):
            try:
                data, addr = sock.recvfrom(65535)
            except BlockingIOError:
                break
            got.append((data, (addr[0], addr[1])))
    finally:
        sock.settimeout(timeout)
    return got


def poll(predicate: Callable[[], bool], timeout: float, what: Callable[[], str]) -> None:
    """Call `predicate` until it holds: at most `timeout` seconds, POLL_STEP apart."""
    deadline = time.monotonic() + timeout
    for _ in range(int(timeout / POLL_STEP) + 2):
        if predicate():
            return
        if time.monotonic() > deadline:
            break
        time.sleep(POLL_STEP)
    raise AssertionError(f"not reached within {timeout}s: {what()}")


# -- golden comparison ------------------------------------------------------------------------
class Between:
    """A value that genuinely varies (age, idle): its type and bounds, nothing more."""

    def __init__(self, kind: type, low: float, high: float) -> None:
        self.kind, self.low, self.high = kind, low, high

    def mismatch(self, value: Any) -> Optional[str]:
        if type(value) is not self.kind or not self.low <= value <= self.high:
            return (f"a {self.kind.__name__} in [{self.low}, {self.high}], got {value!r} "
                    f"({type(value).__name__})")
        return None

    def __repr__(self) -> str:
        return f"<{self.kind.__name__} in [{self.low}, {self.high}]>"


@dataclass
class _Diff:
    lines: List[str] = field(default_factory=list)

    def walk(self, path: str, got: Any, want: Any) -> None:
        if isinstance(want, Between):
            why = want.mismatch(got)
            if why:
                self.lines.append(f"{path}: expected {why}")
            return
        if type(got) is not type(want):
            self.lines.append(f"{path}: expected {want!r} ({type(want).__name__}), "
                              f"got {got!r} ({type(got).__name__})")
            return
        if isinstance(want, dict):
            for key in sorted(set(want) | set(got), key=repr):
                if key not in got:
                    self.lines.append(f"{path}.{key}: missing (expected {want[key]!r})")
                elif key not in want:
                    self.lines.append(f"{path}.{key}: unexpected, got {got[key]!r}")
                else:
                    self.walk(f"{path}.{key}", got[key], want[key])
        elif isinstance(want, list):
            if len(got) != len(want):
                self.lines.append(f"{path}: expected {len(want)} items {want!r}, "
                                  f"got {len(got)} {got!r}")
                return
            for i, (g, w) in enumerate(zip(got, want)):
                self.walk(f"{path}[{i}]", g, w)
        elif got != want:
            self.lines.append(f"{path}: expected {want!r}, got {got!r}")


def assert_golden(got: Any, want: Any, what: str = "reply") -> None:
    """`got` equals `want` exactly: same keys, same values, same types (int is not float,
    str is not bytes, bool is not int); `Between` matches a varying number. The message
    lists every difference and shows the whole reply."""
    assert_all_golden([(got, want, what)])


def assert_all_golden(cases: List[Tuple[Any, Any, str]]) -> None:
    """`assert_golden` for several (got, want, what) at once: one failure lists them all."""
    lines: List[str] = []
    for got, want, what in cases:
        diff = _Diff()
        diff.walk(what, got, want)
        if diff.lines:
            lines += diff.lines + [f"{what} was: {got!r}"]
    if lines:
        raise AssertionError("golden mismatch:\n  " + "\n  ".join(lines))


def assert_bytes(got: bytes, want: bytes, what: str) -> None:
    if got != want:
        at = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b),
                  min(len(got), len(want)))
        raise AssertionError(f"{what}: bytes differ at offset {at} (lengths {len(got)} and "
                             f"{len(want)})\n  expected {want!r}\n  got      {got!r}")
