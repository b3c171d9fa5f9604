"""The msgpack control protocol, sans-IO: bytes in, reply bytes and data-plane actions out.

`receive` turns a datagram into a `Request` (or an immediate reply: cached, error,
or a counted drop); `execute` runs it against the engine. The daemon sits between
the two so it can refresh counters from the data plane before a query.
"""

from __future__ import annotations

import ipaddress
import logging
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Hashable, List, Optional, Tuple, Union

import msgpack
import msgpack.exceptions
from netaddr import IPSet

from fastpath.contract import MAX_STREAMS, Action
from lrk.control.allow import AllowList
from lrk.control.auth import MAGIC, TRAILER_BYTES, Authenticator, NotOwner
from lrk.control.ratelimit import RateLimiter
from lrk.control.replay import HIT, MISS, SPENT, ReplayCache
from lrk.control.wire import packb
from lrk.core import sdp
from lrk.core.engine import Engine
from lrk.core.session import Session, StreamOffer
from lrk.errors import BadRequest, ConfigError, LrkError, SessionNotFound

_new = tuple.__new__

log = logging.getLogger("lrk.control")

VERSION = 1
MAX_REQUEST_BYTES = 65000
MIN_REQUEST_BYTES = 4
MAX_COOKIE = 64
MAX_NAME = 256  # bytes (UTF-8) of a Call-ID, tag or branch; the legacy protocol's limit too
MAX_CALL_ID = MAX_NAME
#: the largest reply sent: a UDP datagram's payload (IPv4); a larger one becomes an error
MAX_REPLY_BYTES = 65507
#: error messages are cut here (bytes), so a reply never quotes much of its request
MAX_ERROR_MESSAGE = 200
#: args key under which `receive` hands the verified key to the commands (not a str: no
#: request can carry it)
CALLER = ("caller",)
MAX_DEPTH = 8  # requests nest two levels; deeper is an attack or a bug
LIST_REPLY_BUDGET = 60000  # a list reply must fit one UDP datagram
ERROR_CODES = ("malformed", "too_large", "bad_request", "unknown_command",
               "unsupported_version", "unauthorized", "forbidden", "not_found",
               "ports_exhausted",
               "data_plane", "draining", "capacity", "internal")
COMMANDS = ("ping", "capabilities", "offer", "answer", "delete", "query", "list", "stats",
            "drain", "reload", "shutdown", "takeover")
_KNOWN = frozenset(COMMANDS)
#: per command: its request counter and its handler's name (no f-strings per request)
_REQUEST_COUNTER = {cmd: f"control.requests.{cmd}" for cmd in COMMANDS}
#: commands whose reply shows traffic counters: the daemon refreshes them first
NEEDS_COUNTERS = frozenset(("delete", "query", "list", "stats"))

_UNPACK_LIMITS = dict(
    raw=False,
    strict_map_key=True,
    max_str_len=MAX_REQUEST_BYTES,
    max_bin_len=MAX_REQUEST_BYTES,
    max_array_len=64,
    max_map_len=64,
    max_ext_len=0,
)


class ProtocolError(LrkError):
    """A request that cannot be executed; `code` goes into the error reply."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass
class Request:
    sender: Hashable
    cookie: Union[str, bytes]
    cmd: str
    args: Dict[str, Any]


@dataclass
class Outcome:
    """What the shell must do: send `reply` (if any) after applying `actions`."""

    reply: Optional[bytes]
    actions: List[Action] = field(default_factory=list)


def pack(message: Dict[str, Any]) -> bytes:
    return packb(message)


class MsgpackControl:
    """Validates, de-duplicates and dispatches control requests to the engine."""

    def __init__(
        self,
        engine: Engine,
        info: Optional[Dict[str, Any]] = None,
        media_counters: Optional[Callable[[], Dict[str, int]]] = None,
        started: float = 0.0,
        allow: Optional[IPSet] = None,
        rate: float = 0.0,
        auth: Optional[Authenticator] = None,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.engine = engine
        self.allow = AllowList(allow)
        self.limiter = RateLimiter(rate)
        #: the shell's reload (`reload` command): returns (applied, restart_needed) names
        self.on_reload: Optional[Callable[[], Tuple[List[str], List[str]]]] = None
        #: stop the relay and end every call (`shutdown`): set by the daemon
        self.on_shutdown: Optional[Callable[[], None]] = None
        #: adopt every call of another node (`takeover`): set by the daemon
        self.on_takeover: Optional[Callable[[str], Dict[str, Any]]] = None
        #: the session store's state for `stats` (None: no store)
        self.store_status: Optional[Callable[[], Optional[Dict[str, Any]]]] = None
        self.info = dict(info or {})
        #: None: no authentication (control_auth = "none"): every sender may do anything
        self.auth = auth
        self.wall_clock = wall_clock  # Unix time, for signature timestamps
        #: sid -> owner of the key that created it; a session without one is legacy's
        #: (admin keys only). At most 2 x sessions + 64 entries (pruned as it grows).
        self.owners: Dict[int, str] = {}
        self.media_counters = media_counters or (lambda: {})
        self.started = started
        self.replay = ReplayCache()
        self.counters: Counter = Counter()
        for cmd in COMMANDS:  # every counter shows, zero or not
            self.counters[f"control.requests.{cmd}"] = 0
        for code in ERROR_CODES:
            self.counters[f"control.errors.{code}"] = 0
        for name in ("control.dropped.too_short", "control.dropped.not_allowed",
                     "control.dropped.rate_limited", "control.dropped.unauthenticated",
                     "control.dropped.bad_signature", "control.dropped.expired",
                     "control.dropped.replayed", "control.dropped.replay_guard_full",
                     "control.dropped.resend_limit", "control.dropped.amplification",
                     "control.dropped.busy", "control.dropped.cookie_reused",
                     "control.retransmissions", "control.retransmissions.in_flight"):
            self.counters[name] = 0

    # -- phase 1 ---------------------------------------------------------------------
    def receive(self, data: bytes, sender: Hashable, now: float,
                wall: Optional[float] = None) -> Union[Request, Outcome]:
        """Phase 1: who may ask (allow-list, rate, signature), is it new (retransmission,
        replay), is it readable. `wall` is Unix time for signature timestamps (default: the
        wall clock). Unverified senders never get a reply larger than their request."""
        counters = self.counters
        if not self.allow.allows(sender):
            counters["control.dropped.not_allowed"] += 1
            return Outcome(None)
        if not self.limiter.allow(sender, now):
            counters["control.dropped.rate_limited"] += 1
            return Outcome(None)
        size = len(data)
        if size < MIN_REQUEST_BYTES:
            counters["control.dropped.too_short"] += 1
            return Outcome(None)
        caller = None
        repeat = False
        limit: Optional[int] = size  # the largest reply an unverified sender may get
        unverified: Optional[bytes] = data  # what a retransmission must repeat exactly
        if self.auth is not None:
            caller, verdict = self.auth.verify(data, self.wall_clock() if wall is None
                                               else wall)
            if caller is None:  # no reply, no effect
                counters[f"control.dropped.{verdict}"] += 1
                return Outcome(None)
            repeat = verdict == "repeat"
            limit = unverified = None
            data = data[:-TRAILER_BYTES]
        elif size > TRAILER_BYTES and data[-TRAILER_BYTES:4 - TRAILER_BYTES] == MAGIC:
            data = data[:-TRAILER_BYTES]  # signed for a relay that checks nothing: ignored
        if len(data) > MAX_REQUEST_BYTES:
            return self._error(None, "too_large", f"request of {len(data)} bytes exceeds "
                               f"{MAX_REQUEST_BYTES}", limit)
        try:
            message = msgpack.unpackb(data, **_UNPACK_LIMITS)
        except (RecursionError, msgpack.exceptions.StackError):  # decoders' own depth limits
            return self._error(None, "too_large", f"request nests deeper than {MAX_DEPTH} "
                               "levels", limit)
        except msgpack.exceptions.ExtraData:
            return self._error(None, "malformed", "request is not valid msgpack: bytes after "
                               "the map (a signature for another protocol version?)", limit)
        except ValueError as exc:  # msgpack's limit errors are ValueErrors too
            code = "too_large" if "exceeds" in str(exc) else "malformed"
            return self._error(None, code, f"request is not valid msgpack: {exc}", limit)
        except Exception as exc:  # truncated input, anything else the decoder raises
            return self._error(None, "malformed", f"request is not valid msgpack: "
                               f"{type(exc).__name__}", limit)
        if _too_deep(message, MAX_DEPTH):
            return self._error(None, "too_large", f"request nests deeper than {MAX_DEPTH} "
                               "levels", limit)
        if not isinstance(message, dict):
            return self._error(None, "malformed", "request must be a msgpack map", limit)
        cookie = message.get("cookie")
        if not isinstance(cookie, (str, bytes)) or not 0 < len(cookie) <= MAX_COOKIE:
            return self._error(None, "bad_request", f"cookie must be a string of 1-{MAX_COOKIE} "
                               "bytes", limit)
        verdict, cached = self.replay.answer(sender, cookie, now, unverified)
        if verdict == HIT:
            counters["control.retransmissions"] += 1
            return Outcome(cached)
        if verdict != MISS:  # resends used up; or, unverified, other bytes under the cookie
            counters["control.dropped.resend_limit" if verdict == SPENT
                     else "control.dropped.cookie_reused"] += 1
            return Outcome(None)
        if self.replay.in_flight(sender, cookie):
            counters["control.retransmissions.in_flight"] += 1
            return Outcome(None)
        if repeat:  # signed bytes seen before, and not a retransmission of this sender's
            counters["control.dropped.replayed"] += 1
            return Outcome(None)
        version = message.get("v", VERSION)
        if type(version) is not int or version != VERSION:
            return self._error(cookie, "unsupported_version", f"protocol version "
                               f"{_clip(version)} is not supported; this relay speaks "
                               f"{VERSION}", limit, sender, now, unverified)
        cmd = message.get("cmd")
        if type(cmd) is not str or cmd not in _KNOWN:
            return self._error(cookie, "unknown_command", f"unknown command {_clip(cmd)}; "
                               "known: " + ", ".join(COMMANDS), limit, sender, now,
                               unverified)
        if not self.replay.begin(sender, cookie, unverified):
            counters["control.dropped.busy"] += 1
            return Outcome(None)
        message[CALLER] = caller
        return Request(sender, cookie, cmd, message)

    # -- phase 2 ---------------------------------------------------------------------
    def execute(self, request: Request, now: float) -> Outcome:
        self.counters[_REQUEST_COUNTER[request.cmd]] += 1
        handler = _HANDLER[request.cmd]
        actions: List[Action] = []
        try:
            body, actions = handler(self, request.args, now)
            reply = {"v": VERSION, "cookie": request.cookie, "ok": True}
            reply.update(body)
        except LrkError as exc:
            reply = self._error_msg(request.cookie, exc.code, str(exc))
        except Exception:
            log.exception("internal error on %s", request.cmd)
            reply = self._error_msg(request.cookie, "internal", "internal error; see relay log")
        return self._final(request.sender, request.cookie, now, reply, actions)

    def plane_failed(self, request: Request, detail: str, now: float) -> Outcome:
        """The data plane refused what `request` set up (the engine has ended the session):
        the reply becomes an error, cached in place of the success it would have been."""
        return self._final(request.sender, request.cookie, now, self._error_msg(
            request.cookie, "data_plane", f"the relay's data plane failed: {detail[:120]}"))

    def handle(self, data: bytes, sender: Hashable, now: float) -> Outcome:
        """Both phases at once, for callers with nothing to refresh in between."""
        received = self.receive(data, sender, now)
        if isinstance(received, Outcome):
            return received
        return self.execute(received, now)

    # -- commands --------------------------------------------------------------------
    def _cmd_ping(self, args: Dict[str, Any], now: float):
        return {"pong": True}, []

    def _cmd_capabilities(self, args: Dict[str, Any], now: float):
        cfg = self.engine.config
        body = {
            "version": VERSION,
            "commands": list(COMMANDS),
            "port_range": [cfg.port_start, cfg.port_end],
            "internal_ip": cfg.internal_ip,
            "external_ip": cfg.external_ip,
            "internal_ips": list(cfg.side("internal")),
            "external_ips": list(cfg.side("external")),
            "silence_timeout": cfg.silence_timeout,
            "max_lifetime": cfg.max_lifetime,
            "max_request_bytes": MAX_REQUEST_BYTES,
        }
        body.update(self.info)
        return body, []

    def _media_args(self, args: Dict[str, Any]) -> Tuple[Any, Optional[int], Any]:
        """Every stream of the request: from `sdp` (each m= line; a stream lrk cannot or
        need not relay counts as disabled), from a `media` list, or one `media` map."""
        body = args.get("sdp")
        if body is not None:
            if not isinstance(body, (str, bytes)):
                raise BadRequest("sdp must be a string or binary")
            parsed = sdp.scan(body)
            desc = parsed.desc
            if desc.first_relayable() is None:
                raise BadRequest("sdp has no stream lrk can relay (every m= line is "
                                 "disabled, or not over UDP)")
            streams = [_stream_of(st) for st in desc.streams]
            return streams, None, parsed
        media = args.get("media")
        if isinstance(media, list):
            if not 0 < len(media) <= MAX_STREAMS:
                raise BadRequest(f"media must list 1-{MAX_STREAMS} streams")
            return [_media_stream(m, f"media[{i}]") for i, m in enumerate(media)], None, None
        if not isinstance(media, dict):
            raise BadRequest("media {ip, port} (or a list of them) or sdp is required")
        ip = _ip(media.get("ip"), "media.ip")
        port = _int(media.get("port"), "media.port", 0, 65535)
        rtcp = media.get("rtcp_port")
        rtcp = None if rtcp is None else _int(rtcp, "media.rtcp_port", 1, 65535)
        return (ip, port), rtcp, None

    def _relay_reply(self, session: Any, leg: Any, body: Any, offered: List[StreamOffer],
                     answer: bool) -> Dict[str, Any]:
        """The relay addresses to announce: `relay` for the first stream (one-stream
        clients), `streams` for every m= line (None: left alone), `sdp` rewritten.

        rtcp-mux: each leg muxes as its own peer said. An offer passes the offerer's
        a=rtcp-mux on; an answer announces it wherever the offerer asked for it, even if
        the answerer declined (the relay demultiplexes RTCP between the legs).

        `streams` has one entry per m= line of the request. An enabled UDP stream the
        relay gives no ports (an answer enabling a stream its offer disabled, or an m=
        line beyond the offer's) is rejected in `sdp`: port 0, never the peer's address
        (clients rewriting from `streams` do the same, lrk.client.manage)."""
        relays: List[Optional[Any]] = []
        rewrite: List[Optional[sdp.StreamRelay]] = []
        first = None
        n_offered = len(offered)
        for i, m in enumerate(leg.media):
            if m is None:
                relays.append(None)
                rewrite.append(None)
                continue
            if first is None:
                first = m
            mux = m.rtcp_mux if answer else (i < n_offered and offered[i].rtcp_mux)
            port = m.relay_port
            relays.append({"ip": m.relay_ip, "port": port,
                           "rtcp_port": port if mux else port + 1, "rtcp_mux": mux})
            rewrite.append(sdp.StreamRelay.of_relay(m.relay_ip, port, mux))
        port = 0 if first is None else first.relay_port
        reply: Dict[str, Any] = {
            "call_id": session.call_id,
            "leg": leg.name,
            "relay": {"ip": leg.relay_ip, "port": port, "rtcp_port": port + 1},
            "streams": relays,
        }
        # one entry per m= line of the request (an answer may have more than its offer)
        count = len(body.desc.streams) if body is not None else n_offered
        if len(relays) < count:
            relays.extend([None] * (count - len(relays)))
        if body is not None:
            del relays[count:]  # (or fewer: the lines it left out were rejected)
            streams = body.desc.streams
            for i, st in enumerate(streams):
                if i >= len(rewrite):
                    rewrite.append(None)
                elif not st.needs_relay:
                    rewrite[i] = None
            del rewrite[len(streams):]
            # enabled but not relayed: disabled, never the peer's address
            reply["sdp"] = body.rewrite(rewrite, reject=sdp.unrelayed(streams, rewrite))
        return reply

    def _cmd_offer(self, args: Dict[str, Any], now: float):
        call_id = _name(args.get("call_id"), "call_id")
        fresh = self._may_offer(args, call_id)
        media, rtcp, body = self._media_args(args)
        session, leg, actions = self.engine.offer(
            now,
            call_id,
            _name(args.get("from_tag"), "from_tag"),
            media,
            rtcp_port=rtcp,
            to_tag=_opt_name(args.get("to_tag"), "to_tag"),
            interface=_choice(args.get("interface", "internal"), "interface"),
            latch_any=_bool(args.get("latch_any", False), "latch_any"),
            timeout=_opt_timeout(args.get("timeout")),
            via_branch=_opt_name(args.get("via_branch"), "via_branch"),
            strict_source=_opt_bool(args.get("strict_source"), "strict_source"),
        )
        if fresh:
            self._claim(args, session)
        return self._relay_reply(session, leg, body, _offers(media), False), actions

    def _cmd_answer(self, args: Dict[str, Any], now: float):
        call_id = _name(args.get("call_id"), "call_id")
        self._visible(args, call_id)
        media, rtcp, body = self._media_args(args)
        session, leg, actions = self.engine.answer(
            now,
            call_id,
            _name(args.get("from_tag"), "from_tag"),
            _name(args.get("to_tag"), "to_tag"),
            media,
            rtcp_port=rtcp,
            interface=_choice(args.get("interface", "internal"), "interface"),
            latch_any=_bool(args.get("latch_any", False), "latch_any"),
            timeout=_opt_timeout(args.get("timeout")),
            strict_source=_opt_bool(args.get("strict_source"), "strict_source"),
            provisional=_bool(args.get("provisional", False), "provisional"),
        )
        return self._relay_reply(session, leg, body, _offers(media), True), actions

    def _cmd_delete(self, args: Dict[str, Any], now: float):
        call_id = _name(args.get("call_id"), "call_id")
        self._visible(args, call_id)
        session, actions = self.engine.delete(
            now,
            call_id,
            _opt_name(args.get("from_tag"), "from_tag"),
        )
        return {"call_id": session.call_id, "session": session.as_dict(now)}, actions

    def _cmd_query(self, args: Dict[str, Any], now: float):
        session = self._visible(args, _name(args.get("call_id"), "call_id"))
        return {"session": session.as_dict(now)}, []

    # -- ownership: a call belongs to the key (owner) that created it ----------------
    def _may_touch(self, args: Dict[str, Any], session: Session) -> bool:
        """Whether the request's key may see and change `session`: its owner's keys and
        admin keys may; a session no key created (legacy) is admin-only. Without
        authentication everyone may."""
        if self.auth is None:
            return True
        caller = args.get(CALLER)
        return caller is not None and (caller.admin
                                       or self.owners.get(session.sid) == caller.owner)

    def _visible(self, args: Dict[str, Any], call_id: str) -> Session:
        """The session, if this key may touch it; another's is as absent as a missing one
        (same error, same message), so Call-IDs cannot be probed."""
        session = self.engine.by_call.get(call_id)
        if session is None or not self._may_touch(args, session):
            raise SessionNotFound(f"no session with Call-ID {call_id!r}")
        return session

    def _may_offer(self, args: Dict[str, Any], call_id: str) -> bool:
        """True when the offer creates a session (to be claimed); refused when the Call-ID
        is a call of another client (or a legacy call, for a key that is not admin)."""
        session = self.engine.by_call.get(call_id)
        if session is None:
            return True
        if not self._may_touch(args, session):
            raise NotOwner("this Call-ID is a call another control client (or Kamailio's "
                           "legacy module) made; only its key or an admin key may change it")
        return False

    def _require_admin(self, args: Dict[str, Any], what: str) -> None:
        """Relay-wide changes (drain, reload) are for admin keys: a SIP proxy's key must not
        be able to take the relay out of service."""
        if self.auth is None:
            return
        caller = args.get(CALLER)
        if caller is None or not caller.admin:
            raise NotOwner(f"{what} needs an admin key (lrkproxy ctl signs with admin.key)")

    def _claim(self, args: Dict[str, Any], session: Session) -> None:
        """Record who created `session`; ended sessions are pruned as the table grows."""
        caller = args.get(CALLER)
        if self.auth is None or caller is None:
            return
        owners = self.owners
        if len(owners) >= 2 * len(self.engine.by_sid) + 64:
            live = self.engine.by_sid
            self.owners = owners = {sid: o for sid, o in owners.items() if sid in live}
        owners[session.sid] = caller.owner

    def _cmd_list(self, args: Dict[str, Any], now: float):
        limit = _int(args.get("limit", 100), "limit", 1, 1000)
        offset = _int(args.get("offset", 0), "offset", 0, 1 << 31)
        sessions = [s for s in self.engine.sessions() if self._may_touch(args, s)]
        page = []
        size = 0
        for session in sessions[offset : offset + limit]:
            summary = session.summary(now)
            size += len(pack(summary))  # encoded bytes, whatever the Call-IDs hold
            if size > LIST_REPLY_BUDGET:
                break
            page.append(summary)
        body = {"total": len(sessions), "sessions": page}
        if offset + len(page) < len(sessions):
            body["next_offset"] = offset + len(page)
        return body, []

    def _cmd_drain(self, args: Dict[str, Any], now: float):
        """Take no new calls (`on`, default true) or take them again (`on: false`);
        established calls continue either way."""
        self._require_admin(args, "drain")
        on = _bool(args.get("on", True), "on")
        if on != self.engine.draining:
            log.warning("relay %s: %d call(s) continue", "draining, no new calls" if on
                        else "taking new calls again", len(self.engine.by_call))
        self.engine.draining = on
        return {"draining": on, "sessions": len(self.engine.by_call)}, []

    def _cmd_reload(self, args: Dict[str, Any], now: float):
        """Re-read the configuration file (as SIGHUP does); names what took effect."""
        self._require_admin(args, "reload")
        if self.on_reload is None:
            raise BadRequest("this relay was started without a reloadable configuration")
        try:
            applied, restart = self.on_reload()
        except ConfigError as exc:
            raise BadRequest(f"configuration not applied: {exc}") from exc
        return {"applied": applied, "restart_needed": restart}, []

    def _cmd_shutdown(self, args: Dict[str, Any], now: float):
        """Stop the relay and end every call for good: the session store is emptied, so
        the next start begins with no calls (a plain SIGTERM keeps them for a restart)."""
        self._require_admin(args, "shutdown")
        if self.on_shutdown is None:
            raise BadRequest("this relay cannot be shut down over the control protocol")
        sessions = len(self.engine.by_call)
        self.on_shutdown()
        return {"stopping": True, "sessions_ended": sessions}, []

    def _cmd_takeover(self, args: Dict[str, Any], now: float):
        """Adopt every call of another node that shares this one's Redis (its media
        addresses must be on this host now: keepalived moved them)."""
        self._require_admin(args, "takeover")
        node = _name(args.get("node_id"), "node_id")
        if self.on_takeover is None:
            raise BadRequest("this relay cannot take calls over")
        try:
            return self.on_takeover(node), []
        except ConfigError as exc:
            raise BadRequest(f"takeover of {node!r}: {exc}") from exc

    def _cmd_stats(self, args: Dict[str, Any], now: float):
        counters: Dict[str, int] = {}
        counters.update(self.counters)
        counters.update(self.engine.counters)
        counters.update(self.media_counters())
        body = {
            "uptime": round(now - self.started, 3),
            "draining": self.engine.draining,
            "sessions": len(self.engine.by_call),
            "ports": self.engine.ports.snapshot(),
            "ports_by_address": self.engine.ports.by_address(),
            "counters": counters,
        }
        store = self.store_status() if self.store_status is not None else None
        if store is not None:
            body["store"] = store
        return body, []

    # -- replies ---------------------------------------------------------------------
    def _error_msg(self, cookie: Any, code: str, message: str) -> Dict[str, Any]:
        self.counters[f"control.errors.{code}"] += 1
        return _error_body(cookie, code, message)

    def _error(self, cookie: Any, code: str, message: str, limit: Optional[int] = None,
               sender: Optional[Hashable] = None, now: float = 0.0,
               request: Optional[bytes] = None) -> Outcome:
        """An error reply to a request that was not run. `limit`: the most bytes the
        sender may get (an unverified sender: its request's size); a larger reply is a
        counted drop. With `sender`, the reply is cached for retransmissions (of exactly
        `request`, when given)."""
        data = pack(_error_body(cookie, code, message))
        if limit is not None and len(data) > limit:
            self.counters["control.dropped.amplification"] += 1
            return Outcome(None)
        self.counters[f"control.errors.{code}"] += 1
        if sender is not None:
            self.replay.store(sender, cookie, data, now, request)
        return Outcome(data)

    def _final(self, sender: Hashable, cookie: Any, now: float, reply: Dict[str, Any],
               actions: Optional[List[Action]] = None) -> Outcome:
        """Pack, cache and return the reply (with `actions`); one too large for a datagram
        becomes a small `too_large` error (the request has run: its effect stays)."""
        data = packb(reply)
        if len(data) > MAX_REPLY_BYTES:
            data = pack(self._error_msg(
                cookie, "too_large", f"the request was carried out, but its reply of "
                f"{len(data)} bytes does not fit one datagram ({MAX_REPLY_BYTES})"))
        self.replay.store(sender, cookie, data, now)
        return Outcome(data) if actions is None else Outcome(data, actions)


#: command -> MsgpackControl._cmd_<command>, the plain function (no getattr and bound
#: method per request)
_HANDLER: Dict[str, Callable[..., Any]] = {
    cmd: getattr(MsgpackControl, f"_cmd_{cmd}") for cmd in COMMANDS}


def _error_body(cookie: Any, code: str, message: str) -> Dict[str, Any]:
    if len(message) > MAX_ERROR_MESSAGE // 4:  # may be longer than the limit in bytes
        message = message.encode("utf-8")[:MAX_ERROR_MESSAGE].decode("utf-8", "ignore")
    return {"v": VERSION, "cookie": cookie, "ok": False,
            "error": {"code": code, "message": message}}


def _clip(value: Any, limit: int = 40) -> str:
    """repr(value) for an error message, at most `limit` characters of it."""
    if isinstance(value, (bytes, str)) and len(value) > limit:
        value = value[:limit]
        return repr(value) + "..."
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def _offers(media: Any) -> List[StreamOffer]:
    return media if isinstance(media, list) else []


def _stream_of(st: Any) -> StreamOffer:
    """A parsed m= line as the engine takes it: port 0 where lrk does not relay it."""
    # unpacked (sdp.Stream's fields in order): CPython 3.11 looks NamedTuple fields up by
    # name generically, eight times here
    (_index, _line, media, port, _port_count, _proto, _formats, address, _family,
     _media_connection, rtcp_port, rtcp_address, rtcp_mux, _direction, _ice, relayable) = st
    if not relayable or port == 0:
        return _new(StreamOffer, (address or "0.0.0.0", 0, None, False, media, False, None))
    # every field given, through tuple.__new__: StreamOffer's own __new__ is Python
    return _new(StreamOffer, (address, port, rtcp_port, rtcp_mux, media, False, rtcp_address))


def _media_stream(value: Any, what: str) -> StreamOffer:
    if not isinstance(value, dict):
        raise BadRequest(f"{what} must be a map {{ip, port[, rtcp_port, rtcp_mux]}}")
    rtcp = value.get("rtcp_port")
    return StreamOffer(
        _ip(value.get("ip"), f"{what}.ip"), _int(value.get("port"), f"{what}.port", 0, 65535),
        None if rtcp is None else _int(rtcp, f"{what}.rtcp_port", 1, 65535),
        _bool(value.get("rtcp_mux", False), f"{what}.rtcp_mux"))


def _too_deep(obj: Any, limit: int) -> bool:
    """Iterative depth check: decoders differ in how deep they go before failing. Only
    containers are stacked (a request is mostly strings and numbers)."""
    if type(obj) is dict:
        children = obj.values()
    elif type(obj) is list:
        children = obj
    else:
        return False
    kinds = set(map(type, children))  # in C: a flat request stacks nothing
    if dict not in kinds and list not in kinds:
        return False
    stack = [(child, 2) for child in children if type(child) is dict or type(child) is list]
    while stack:
        item, depth = stack.pop()
        if depth > limit:
            return True
        for child in (item.values() if type(item) is dict else item):
            if type(child) is dict or type(child) is list:
                stack.append((child, depth + 1))
    return False


# -- argument checks ---------------------------------------------------------------------
def _name(value: Any, what: str) -> str:
    if isinstance(value, bytes):
        try:
            value = value.decode("utf-8")
        except UnicodeDecodeError:
            raise BadRequest(f"{what} must be UTF-8 text") from None
    if not isinstance(value, str) or not value:
        raise BadRequest(f"{what} is required and must be a non-empty string")
    if len(value) > MAX_NAME or (len(value) * 4 > MAX_NAME
                                 and len(value.encode("utf-8")) > MAX_NAME):
        raise BadRequest(f"{what} is longer than {MAX_NAME} bytes (UTF-8)")
    return value


def _opt_name(value: Any, what: str) -> Optional[str]:
    return None if value is None else _name(value, what)


def _int(value: Any, what: str, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise BadRequest(f"{what} must be an integer in {low}..{high}, not {_clip(value)}")
    return value


def _bool(value: Any, what: str) -> bool:
    if not isinstance(value, bool):
        raise BadRequest(f"{what} must be true or false, not {_clip(value)}")
    return value


def _opt_bool(value: Any, what: str) -> Optional[bool]:
    return None if value is None else _bool(value, what)


def _choice(value: Any, what: str) -> str:
    if value not in ("internal", "external"):
        raise BadRequest(f"{what} must be 'internal' or 'external', not {_clip(value)}")
    return value


def _opt_timeout(value: Any) -> Optional[float]:
    return None if value is None else float(_int(value, "timeout", 1, 86400))


def _ip(value: Any, what: str) -> str:
    if not isinstance(value, str):
        raise BadRequest(f"{what} must be an IP address string")
    try:
        return str(ipaddress.ip_address(value))
    except ValueError:
        raise BadRequest(f"{what} {_clip(value)} is not an IP address") from None
