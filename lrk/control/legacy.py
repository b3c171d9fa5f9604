"""The legacy lrkproxy text protocol (Kamailio's `lrkproxy` module), sans-IO.

Wire format (see docs/kamailio.md): `<cookie> <command...>`; P, G, S and D. Replies
must be exactly what the module expects, or it half-accepts them, so every reply
is built here from the request bytes. Malformed input is a counted drop: the module
could not read an error reply anyway.
"""

from __future__ import annotations

import ipaddress
import logging
import struct
from collections import Counter
from typing import Hashable, List, Optional, Tuple

from netaddr import IPSet

from fastpath.contract import Action
from lrk.control.allow import AllowList
from lrk.control.msgpack_proto import MAX_CALL_ID, Outcome
from lrk.control.ratelimit import RateLimiter
from lrk.control.replay import HIT, MISS, SPENT, ReplayCache
from lrk.core.engine import Engine
from lrk.errors import SessionNotFound

log = logging.getLogger("lrk.legacy")

CONFIG_STRUCT = struct.Struct("<iii20s20s")
#: the module advances its port counter by 4 per call and may overshoot end_port by 3
PORTS_PER_CALL = 4
MAX_REQUEST = 8192
TAKEOVER_IDLE = 30.0  # a holder of a port silent this long is taken to be a dead call
#: the S timeout field: 1..MAX_TIMEOUT is honoured, above it clamped, 0 or less means the
#: relay's silence_timeout (legacy_timeout > 0 replaces the field altogether)
MAX_TIMEOUT = 86400
#: retransmission cache of the UDP listeners, in bytes (replies are at most 8 KB)
CACHE_BYTES = 8 << 20

LEGACY_COUNTERS = (
    "legacy.requests.P", "legacy.requests.G", "legacy.requests.S", "legacy.requests.D",
    "legacy.retransmissions", "legacy.dropped.malformed", "legacy.dropped.not_allowed",
    "legacy.dropped.unknown_command", "legacy.dropped.too_large",
    "legacy.refused.bad_relay_address", "legacy.sessions.created",
    "legacy.sessions.unchanged", "legacy.sessions.updated", "legacy.sessions.refused",
    "legacy.dropped.stream_timeout", "legacy.send_errors", "legacy.dropped.plane_failure",
    "legacy.dropped.rate_limited", "legacy.dropped.draining",
    "legacy.refused.bad_peer_address", "legacy.refused.call_id_too_long",
    "legacy.refused.msgpack_call", "legacy.dropped.resend_limit",
    "legacy.dropped.cookie_reused", "legacy.refused.max_sessions",
    "legacy.dropped.too_many_streams",
)
#: how long a G reply's port advice is reused while no session came or went: finding the
#: longest free run of blocks walks the whole range (milliseconds for a wide one), and a
#: datagram of a few bytes must not buy that each time
ADVICE_TTL = 1.0


def _words(body: bytes) -> List[str]:
    """The fields of an S or D: the bytes split at ASCII whitespace, then decoded (latin-1
    text would also split at 0x1c-0x1f, 0x85 and 0xa0, which occur in UTF-8 Call-IDs:
    "à" is C3 A0)."""
    return [part.decode("latin-1") for part in body.split()]


def _addr(text: str) -> str:
    return str(ipaddress.ip_address(text))


def _port(text: str) -> int:
    value = int(text)
    if not 0 <= value <= 65535:
        raise ValueError(f"port {value} out of range")
    return value


def usable_peer(addr: Tuple[str, int]) -> bool:
    """Whether media can be sent to `addr`: not port 0, not 0.0.0.0 / ::, not a broadcast,
    multicast or reserved IPv4 (240.0.0.0/4) address."""
    ip = ipaddress.ip_address(addr[0])
    return bool(addr[1]) and not (ip.is_unspecified or ip.is_multicast
                                  or (ip.version == 4 and ip.is_reserved))


class LegacyControl:
    """P/G/S/D over the same engine the msgpack protocol drives."""

    def __init__(self, engine: Engine, allow: Optional[IPSet] = None,
                 takeover_idle: float = TAKEOVER_IDLE, timeout: float = 0.0,
                 rate: float = 0.0) -> None:
        self.engine = engine
        self.limiter = RateLimiter(rate)
        self.timeout = timeout  # overrides the S field's (always 60 in Kamailio 5.6.3) when > 0
        self.allow = AllowList(allow)
        self.takeover_idle = takeover_idle
        self.replay = ReplayCache(max_bytes=CACHE_BYTES)
        self.counters: Counter = Counter({name: 0 for name in LEGACY_COUNTERS})
        #: the last G's advice: (valid until, the sessions' stamp then, (start, end, current))
        self._advice: Optional[Tuple[float, Tuple[int, ...], Tuple[int, int, int]]] = None

    # -- entry point -------------------------------------------------------------------
    def handle(self, data: bytes, sender: Hashable, now: float, with_cookie: bool = True
               ) -> Outcome:
        """One request. UNIX stream clients send no cookie (`with_cookie=False`)."""
        if not self.allow.allows(sender):
            self.counters["legacy.dropped.not_allowed"] += 1
            return Outcome(None)
        if not self.limiter.allow(sender, now):
            self.counters["legacy.dropped.rate_limited"] += 1
            return Outcome(None)
        if len(data) > MAX_REQUEST:
            self.counters["legacy.dropped.too_large"] += 1
            return Outcome(None)
        if with_cookie:
            cookie, sep, body = data.partition(b" ")
            if not sep or not cookie or not body:
                self.counters["legacy.dropped.malformed"] += 1
                return Outcome(None)
            verdict, cached = self.replay.answer(sender, cookie, now, data)
            if verdict == HIT:
                self.counters["legacy.retransmissions"] += 1
                return Outcome(cached)
            if verdict != MISS:  # resends used up, or another request under this cookie
                self.counters["legacy.dropped.resend_limit" if verdict == SPENT
                              else "legacy.dropped.cookie_reused"] += 1
                return Outcome(None)
            prefix = cookie + b" "
        else:
            body = data.rstrip(b"\r\n\0")
            prefix = b""
        command = body[:1]
        handler = {b"P": self._ping, b"G": self._config, b"S": self._set,
                   b"D": self._delete}.get(command)
        if handler is None or (len(body) > 1 and body[1:2] != b" "):
            self.counters["legacy.dropped.unknown_command"] += 1
            return Outcome(None)
        self.counters[f"legacy.requests.{command.decode()}"] += 1
        if command in (b"P", b"G") and self.engine.draining:
            # a Kamailio that (re)starts or re-checks this node sees it down and picks
            # another; S and D still work: calls already routed here must keep media
            self.counters["legacy.dropped.draining"] += 1
            return Outcome(None)
        try:
            reply, actions = handler(prefix, body, now)
        except (ValueError, UnicodeDecodeError) as exc:
            self.counters["legacy.dropped.malformed"] += 1
            log.debug("malformed legacy request %r: %s", data[:80], exc)
            return Outcome(None)
        if with_cookie:
            self.replay.store(sender, cookie, reply, now, data)
        return Outcome(reply, actions)

    def plane_failed(self, data: bytes, sender: Hashable, with_cookie: bool = True) -> None:
        """The data plane could not serve what this request set up (the engine has ended
        the session): no reply, so Kamailio's module retries and, if the failure persists,
        fails the call and disables the node, the only refusal it understands. Nothing is
        cached: a retransmission is a fresh attempt."""
        self.counters["legacy.dropped.plane_failure"] += 1
        if with_cookie:
            cookie = data.partition(b" ")[0]
            self.replay.discard(sender, cookie)

    # -- commands ----------------------------------------------------------------------
    def _ping(self, prefix: bytes, body: bytes, now: float) -> Tuple[bytes, List[Action]]:
        return prefix + b"P PONG", []

    def _config(self, prefix: bytes, body: bytes, now: float) -> Tuple[bytes, List[Action]]:
        start, end, current = self.advertised_ports(now)
        cfg = self.engine.config
        payload = CONFIG_STRUCT.pack(start, end, current, cfg.internal_ip.encode()[:19],
                                     cfg.external_ip.encode()[:19])
        return prefix + b"G " + payload, []

    def advertised_ports(self, now: float) -> Tuple[int, int, int]:
        """(start, end, current) so that the module's 4-port steps stay in our range and
        start on the longest run of blocks no live session holds (reused for ADVICE_TTL)."""
        engine = self.engine
        counters = engine.counters
        stamp = (engine.ports.in_use, counters["sessions.created"], counters["sessions.offers"],
                 counters["sessions.answers"], counters["sessions.deleted"],
                 counters["sessions.restored"])  # (adopted calls: a takeover)
        cached = self._advice
        if cached is not None and cached[0] > now and cached[1] == stamp:
            return cached[2]
        advice = self._find_advice()
        self._advice = (now + ADVICE_TTL, stamp, advice)
        return advice

    def _find_advice(self) -> Tuple[int, int, int]:
        ports = self.engine.ports
        start = ports.start + (ports.start & 1)
        last_block = ports.end - (PORTS_PER_CALL - 1)  # a block is p .. p+3
        blocks = list(range(start, last_block + 1, PORTS_PER_CALL))
        if not blocks:
            return start, start, start
        # the module hands out current_port while current < end, then wraps: end is the
        # highest block start it may use
        end = blocks[-1]
        best_start, best_len, run_start, run_len = blocks[0], -1, None, 0
        ips = (self.engine.config.internal_ip, self.engine.config.external_ip)
        for p in blocks + blocks:  # twice round: runs may wrap past the end
            free = not any(ports.is_in_use(ip, p) or ports.is_in_use(ip, p + 2) for ip in ips)
            if free:
                if run_start is None:
                    run_start, run_len = p, 0
                run_len += 1
                if run_len > best_len:
                    best_start, best_len = run_start, run_len
            else:
                run_start = None
        return start, end, best_start

    def _fields(self, body: bytes) -> Tuple[str, Tuple[str, int], Tuple[str, int],
                                            Tuple[str, int], Tuple[str, int], float]:
        parts = _words(body)
        if len(parts) != 11:
            raise ValueError(f"expected 10 fields after the command, got {len(parts) - 1}")
        _cmd, src_ip, dst_ip, snat_ip, dnat_ip, src_p, dst_p, snat_p, dnat_p, tout, call_id = parts
        timeout = float(min(int(tout), MAX_TIMEOUT))
        if self.timeout > 0:
            timeout = self.timeout
        elif timeout < 1:
            timeout = self.engine.config.silence_timeout
        return (call_id,
                (_addr(snat_ip), _port(snat_p)),  # leg A relay: the caller sends here
                (_addr(src_ip), _port(src_p)),  # the caller
                (_addr(dst_ip), _port(dst_p)),  # leg B relay: the callee sends here
                (_addr(dnat_ip), _port(dnat_p)),  # the callee
                timeout)

    def _set(self, prefix: bytes, body: bytes, now: float) -> Tuple[bytes, List[Action]]:
        call_id, a_relay, a_peer, b_relay, b_peer, timeout = self._fields(body)
        reply = prefix + body + b"OK"
        if len(call_id) > MAX_CALL_ID:  # latin-1: one character per byte
            self.counters["legacy.refused.call_id_too_long"] += 1
            log.warning("legacy S refused: a Call-ID of %d bytes (at most %d, as over msgpack)",
                        len(call_id), MAX_CALL_ID)
            return reply, []
        cfg = self.engine.config
        ours = cfg.side("internal") + cfg.side("external")
        if (a_relay[0] not in ours or b_relay[0] not in ours or a_relay[1] % 2
                or b_relay[1] % 2 or a_relay[1] == b_relay[1]):
            self.counters["legacy.refused.bad_relay_address"] += 1
            log.warning("legacy S for %s names relay %s / %s, not an even port pair of ours %s",
                        call_id, a_relay, b_relay, ours)
            return reply, []
        if not (usable_peer(a_peer) and usable_peer(b_peer)):
            self.counters["legacy.refused.bad_peer_address"] += 1
            log.warning("legacy S for %.64s names peers %s / %s: media cannot be sent there "
                        "(port 0, unspecified, broadcast, multicast or reserved)", call_id,
                        a_peer, b_peer)
            return reply, []
        if self._msgpack_call(call_id, (a_relay, b_relay)):
            self.counters["legacy.refused.msgpack_call"] += 1
            log.warning("legacy S for %.64s refused: its Call-ID or relay port %d or %d belongs "
                        "to a call of the msgpack protocol", call_id, a_relay[1], b_relay[1])
            return reply, []
        engine = self.engine
        limit = engine.config.max_sessions
        if limit and call_id not in engine.by_call and len(engine.by_call) >= limit:
            self.counters["legacy.refused.max_sessions"] += 1
            engine.counters["sessions.refused.max_sessions"] += 1
            log.warning("legacy S for %.64s refused: the session limit of %d is reached "
                        "(max_sessions)", call_id, limit)
            return reply, []
        session, actions, outcome = self.engine.set_fixed(
            now, call_id, a_relay, a_peer, b_relay, b_peer, timeout, self.takeover_idle)
        self.counters[f"legacy.sessions.{outcome}"] += 1
        if outcome == "refused":
            log.warning("legacy S for %s refused: relay port %d or %d is held by a live call "
                        "or outside the range", call_id, a_relay[1], b_relay[1])
        return reply, actions

    def _delete(self, prefix: bytes, body: bytes, now: float) -> Tuple[bytes, List[Action]]:
        parts = _words(body)
        if len(parts) < 2:
            raise ValueError("D without a Call-ID")
        session = self.engine.by_call.get(parts[-1])
        actions: List[Action] = []
        if session is not None and session.origin != "legacy":
            self.counters["legacy.refused.msgpack_call"] += 1
        elif session is not None:
            try:
                _session, actions = self.engine.delete(now, parts[-1])
            except SessionNotFound:
                actions = []
        return prefix + body + b"OK", actions

    # -- msgpack calls are out of reach --------------------------------------------------
    def _msgpack_call(self, call_id: str, relays: Tuple[Tuple[str, int], ...]) -> bool:
        """Whether the Call-ID, or a relay port's holder, is a session the legacy protocol
        did not make (set_fixed refuses those too; asking first names the reason)."""
        engine = self.engine
        session = engine.by_call.get(call_id)
        if session is not None and session.origin != "legacy":
            return True
        for ip, port in relays:
            holder = engine.owner.get((ip, port & ~1))
            if holder is not None and holder.origin != "legacy":
                return True
        return False
