"""A bounded fuzz run against a live relay: random and mutated requests on every listener
(msgpack control over UDP, legacy over UDP, legacy over a UNIX stream socket), from a fixed
seed, for at most FUZZ_SECONDS. Afterwards the relay must still answer, its RSS must have
grown less than RSS_BOUND, and once its calls are ended no descriptor and no port may be
left over.
"""

from __future__ import annotations

import random
import select
import socket
import time
from typing import Any, Callable, Dict, List

import pytest

from bench.peers import MEMORY_ENV
from lrk.control.auth import sign
from lrk.control.msgpack_proto import COMMANDS
from lrk.demo.relay_process import free_udp_port, next_port_range, ping

from .hostile import (
    Admin,
    Keys,
    bound_udp_ports,
    children,
    keyed_relay,
    packed,
    rss_bytes,
    tree_fds,
)

pytestmark = pytest.mark.integration

SEED = 20261127
FUZZ_SECONDS = 40.0  # the whole test stays under 60 s on a loaded 2-CPU machine
DATAGRAMS = 48_000  # after a quarter as many for warm-up, unless the time runs out
RSS_BOUND = 48 << 20  # what the relay may grow by while fuzzed (after a warm-up)
INTERNAL = "127.0.0.1"


class Fuzzer:
    """Random and mutated requests for each listener, from one seeded generator."""

    def __init__(self, rng: random.Random, keys: Keys, ports: range) -> None:
        self.rng = rng
        self.keys = keys
        self.ports = ports
        self.calls = [f"fz-{i}" for i in range(24)] + ["é" * 80, "x" * 256]

    def value(self, depth: int = 0) -> Any:
        r = self.rng
        kind = r.randrange(9 if depth < 2 else 6)
        if kind == 0:
            return None
        if kind == 1:
            return r.random() < 0.5
        if kind == 2:
            return r.randrange(-(2 ** 63), 2 ** 64)
        if kind == 3:
            return r.random() * 10 ** r.randrange(-5, 20)
        if kind == 4:
            return "".join(chr(r.randrange(32, 0x2FF)) for _ in range(r.randrange(40)))
        if kind == 5:
            return r.randbytes(r.randrange(40))
        if kind == 6:
            return [self.value(depth + 1) for _ in range(r.randrange(4))]
        return {str(self.value(depth + 1))[:8]: self.value(depth + 1)
                for _ in range(r.randrange(4))}

    def request(self) -> Dict[str, Any]:
        """A request that is often valid: sessions get made, changed and ended."""
        r = self.rng
        cmd = r.choice(["offer", "offer", "answer", "delete", "query", "list", "ping"]
                       + list(COMMANDS) + ["reboot"])
        message: Dict[str, Any] = {"cmd": cmd, "call_id": r.choice(self.calls),
                                   "from_tag": "f", "to_tag": r.choice(["t", "u"]),
                                   "media": {"ip": "198.51.100.10",
                                             "port": r.randrange(1, 65536)}}
        if cmd in ("drain", "reload", "shutdown"):  # not this test's business: keep serving
            message["cmd"] = "stats"
        for _ in range(r.randrange(3)):  # a few wild arguments
            message[r.choice(["v", "timeout", "interface", "latch_any", "limit", "offset",
                              "sdp", "media", "call_id", "cookie", "junk"])] = self.value()
        if message.get("cmd") == "drain":
            message["cmd"] = "stats"
        return message

    def control(self) -> bytes:
        r = self.rng
        roll = r.random()
        key = r.choice([self.keys.client, self.keys.other, self.keys.admin])
        if roll < 0.45:  # signed, plausible
            return sign(packed(self.request()), key, time.time())
        if roll < 0.65:  # signed, then mutated: must be dropped
            data = bytearray(sign(packed(self.request()), key, time.time()))
            for _ in range(r.randrange(1, 4)):
                data[r.randrange(len(data))] ^= r.randrange(1, 256)
            if r.random() < 0.3:
                del data[r.randrange(len(data)):]
            return bytes(data)
        if roll < 0.8:  # signed junk: a compromised client sending garbage
            return sign(r.randbytes(r.randrange(1, 300)), key, time.time())
        return r.randbytes(r.randrange(0, 1500))  # anyone on the host

    def legacy(self) -> bytes:
        r = self.rng
        if r.random() < 0.2:
            return r.randbytes(r.randrange(0, 600))
        a, b = r.choice(self.ports), r.choice(self.ports)
        if r.random() < 0.4:  # as Kamailio sends it: sessions get made and replaced
            return (f"{r.randrange(1000)}_{r.randrange(10 ** 6)} {r.choice('SSSD')} "
                    f"192.0.2.10 {INTERNAL} {INTERNAL} 198.51.100.20 4000 {a} {a + 2} 5000 60 "
                    f"leg-{r.randrange(30)} ").encode()
        ips = ["192.0.2.10", "198.51.100.20", INTERNAL, "0.0.0.0", "255.255.255.255",
               "224.0.0.9", "::1", "x"]
        fields = [r.choice(ips), r.choice([INTERNAL, "10.9.9.9"]),
                  r.choice([INTERNAL, "10.9.9.9"]), r.choice(ips),
                  str(r.choice([0, 4000, 65535, 70000])), str(a), str(b),
                  str(r.choice([0, 5000, 65535])), str(r.choice([-1, 0, 60, 10 ** 9])),
                  r.choice(self.calls + ["y" * 300])]
        cmd = r.choice(["S", "S", "S", "D", "P", "G", "X"])
        text = f"{r.randrange(1000)}_{r.randrange(10 ** 6)} {cmd} " + " ".join(
            fields[:r.randrange(len(fields) + 1)]) + " "
        return text.encode()


def drain(sock: socket.socket, timeout: float = 0.0) -> int:
    """Read whatever replies are there (within `timeout`), so no buffer fills up."""
    n = 0
    while select.select([sock], [], [], timeout)[0]:
        try:
            sock.recv(65535)
        except OSError:
            pass
        n += 1
        timeout = 0.0
    return n


def stream_request(path: str, data: bytes) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(3.0)
        s.connect(path)
        s.sendall(data)
        s.shutdown(socket.SHUT_WR)
        try:
            while s.recv(65535):
                pass
        except OSError:
            pass


def fuzz(rng: random.Random, fuzzer: Fuzzer, targets: List[Callable[[], None]],
         count: int, deadline: float) -> int:
    sent = 0
    while sent < count and time.monotonic() < deadline:
        for _ in range(32):  # a burst, then the replies are read
            rng.choice(targets)()
            sent += 1
        for sock in fuzzer.sockets:  # type: ignore[attr-defined]
            drain(sock, 0.002)
    return sent


def test_fuzzed_relay_still_answers_within_memory_and_leaks_nothing(tmp_path):
    started = time.monotonic()
    deadline = started + FUZZ_SECONDS
    keys = Keys(str(tmp_path / "keys"))
    legacy_port = free_udp_port()
    unix_path = str(tmp_path / "legacy.sock")
    ports = next_port_range(128)
    first, last = (int(p) for p in ports.split("-"))
    config = "quarantine = 0\nlegacy_takeover_idle = 0.5\nmax_sessions = 24\n"
    with keyed_relay(keys, "--legacy", f"127.0.0.1:{legacy_port}", "--legacy",
                     f"unix:{unix_path}", config=config, ports=ports,
                     tmp=str(tmp_path), env=MEMORY_ENV) as relay:
        pid = relay.proc.pid  # type: ignore[union-attr]
        # a listener in the media range would pass for a media socket left open below
        # (free_udp_port picks outside every next_port_range)
        assert not [p for p in (relay.control_port, legacy_port) if first <= p <= last]
        control = ("127.0.0.1", relay.control_port)
        rng = random.Random(SEED)
        fuzzer = Fuzzer(rng, keys, range(first, last + 1, 2))
        ctl_sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        ctl_sock.bind(("127.0.0.1", 0))
        leg_sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        leg_sock.bind(("127.0.0.1", 0))
        fuzzer.sockets = [ctl_sock, leg_sock]  # type: ignore[attr-defined]
        admin = Admin(relay, keys.admin)
        targets = [
            lambda: ctl_sock.sendto(fuzzer.control(), control),
            lambda: ctl_sock.sendto(fuzzer.control(), control),
            lambda: leg_sock.sendto(fuzzer.legacy(), ("127.0.0.1", legacy_port)),
        ]

        def stream() -> None:
            if rng.random() < 0.05:  # a connection per request: fewer of these
                stream_request(unix_path, fuzzer.legacy()[rng.randrange(12):])

        targets.append(stream)

        def quiesce() -> None:
            """Answering on every listener, then every call ended."""
            assert ping("127.0.0.1", relay.control_port, 2.0, keys.admin)
            leg_sock.settimeout(5.0)
            leg_sock.sendto(b"9_9 P", ("127.0.0.1", legacy_port))
            while leg_sock.recv(65535) != b"9_9 P PONG":  # fuzz replies may come first
                pass
            for _ in range(20):  # max_sessions 24: one round deletes them all
                listed = admin.request({"cmd": "list", "limit": 1000})
                if not listed["sessions"]:
                    break
                for session in listed["sessions"]:
                    admin.request({"cmd": "delete", "call_id": session["call_id"]})
            else:
                raise AssertionError(f"calls left after 20 rounds of deletes: {listed}")
            stats = admin.request({"cmd": "stats"})
            assert stats["sessions"] == 0 and stats["ports"]["in_use"] == 0

        # warm-up (workers running, PyPy's JIT, allocator arenas), then the steady state
        sent = fuzz(rng, fuzzer, targets, DATAGRAMS // 4, deadline)
        quiesce()
        baseline_fds = tree_fds(pid)
        rss_before = rss_bytes(pid)
        sent += fuzz(rng, fuzzer, targets, DATAGRAMS, deadline)
        quiesce()
        rss_grown = rss_bytes(pid) - rss_before
        counters = admin.counters()
        assert counters["control.errors.internal"] == 0
        assert counters.get("control.internal_errors", 0) == 0
        assert counters.get("legacy.internal_errors", 0) == 0
        assert counters["control.dropped.bad_signature"] > 500
        assert counters["control.dropped.unauthenticated"] > 500
        assert counters["sessions.created"] > 10 and counters["legacy.sessions.created"] > 10
        # nothing left over: descriptors (workers close a session's sockets as its Remove
        # arrives: a bounded poll) and ports
        poll_until = time.monotonic() + 10
        while tree_fds(pid) != baseline_fds and time.monotonic() < poll_until:
            time.sleep(0.05)
        assert tree_fds(pid) == baseline_fds
        held = bound_udp_ports([pid, *children(pid)])
        assert relay.control_port in held and legacy_port in held  # the probe sees sockets
        assert not [p for p in held if first <= p <= last], held
        admin.close()
        ctl_sock.close()
        leg_sock.close()
    assert sent > 5000, sent
    assert rss_grown < RSS_BOUND, f"RSS grew {rss_grown / 2**20:.1f} MB over {sent} datagrams"
