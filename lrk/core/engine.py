"""The session engine: offer/answer/delete/expiry over a port allocator.

Sans-IO, as aioquic's connection is: every call takes `now` and returns the data-plane
actions (`fastpath.contract`) to carry out. Time enters through `get_timer()` (the one
deadline the shell arms) and `handle_timer(now)`; what the data plane observed enters
through `handle_event` (reports and failures). Nothing else writes session state.
"""

from __future__ import annotations

import heapq
from collections import Counter
from dataclasses import dataclass
from functools import partial
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple, Union

from fastpath.contract import (
    MAX_FORKS,
    MAX_STREAMS,
    Action,
    Addr,
    Event,
    Install,
    PlaneFailure,
    Remove,
    SessionReport,
    Update,
)
from lrk.core.ports import AddressPorts
from lrk.core.session import LEG_A, LEG_B, OTHER, Fork, Leg, Media, Session, StreamOffer
from lrk.errors import AtCapacity, BadRequest, Draining, PortsExhausted, SessionNotFound

#: a NamedTuple from all of its fields, without its Python-level __new__ (hot paths)
_new = tuple.__new__

PortProbe = Callable[[str, int], bool]

ENGINE_COUNTERS = (
    "sessions.created", "sessions.offers", "sessions.answers", "sessions.deleted",
    "sessions.expired.silence", "sessions.expired.lifetime", "sessions.rebound",
    "sessions.refused.max_sessions", "sessions.refused.draining", "ports.exhausted",
    "sessions.expired.replaced", "legacy.conflicts.refused", "legacy.conflicts.replaced",
    "legacy.ports_outside_range", "sessions.failed", "streams.removed",
    "sessions.early_dialogs", "sessions.early_dialogs.won", "sessions.early_dialogs.freed",
    "sessions.restored", "sessions.restore_refused",
)


@dataclass
class EngineConfig:
    internal_ip: str = "127.0.0.1"
    external_ip: str = "127.0.0.1"
    port_start: int = 30000
    port_end: int = 40000
    silence_timeout: float = 60.0
    max_lifetime: float = 10800.0  # 0 disables
    quarantine: float = 5.0
    max_sessions: int = 0  # 0: bounded by the port range only
    #: True: a leg accepts media only from the address its SDP announced (v0.1's rule);
    #: False: it learns its peer from the first packet (NAT), see RelayTable._admit
    strict_source: bool = False
    #: every relay address per side (empty: the one internal_ip / external_ip); each has
    #: its own port range unless `shared_ports`. None: one range shared by the internal
    #: and external address while each side has one (kernel modes then mark flows by
    #: port alone, as before several were possible; with more, each address has a mark
    #: slot, fastpath/kernel/kernel_rules.py)
    internal_ips: Tuple[str, ...] = ()
    external_ips: Tuple[str, ...] = ()
    shared_ports: Optional[bool] = None

    def side(self, interface: str) -> Tuple[str, ...]:
        if interface == "internal":
            return self.internal_ips or (self.internal_ip,)
        return self.external_ips or (self.external_ip,)


class Engine:
    """Owns sessions and ports; the single source of truth of the control plane."""

    def __init__(self, config: EngineConfig, probe: Optional[PortProbe] = None) -> None:
        self.config = config
        shared = config.shared_ports
        if shared is None:
            shared = len(config.side("internal")) == 1 and len(config.side("external")) == 1
        self.ports = AddressPorts(config.side("internal") + config.side("external"),
                                  config.port_start, config.port_end, config.quarantine,
                                  shared=shared)
        self.probe = probe
        self.by_call: Dict[str, Session] = {}
        self.by_sid: Dict[int, Session] = {}
        #: (relay address, even relay port) -> session holding it
        self.owner: Dict[Tuple[str, int], Session] = {}
        self.counters: Counter = Counter({name: 0 for name in ENGINE_COUNTERS})
        self._next_sid = 1
        #: (deadline, sid) per session; an entry is live while it equals the session's
        #: `timer_at`, so stale entries (media came, timeout changed) drop off when popped
        self._timers: List[Tuple[float, int]] = []
        #: no new sessions (msgpack offers are refused with `draining`); calls continue
        self.draining = False

    # -- helpers -------------------------------------------------------------------
    def interface_ip(self, interface: str, session: Optional[Session] = None) -> str:
        """The relay address of `interface`: the engine's, or those of the node a
        `session` was taken over from (Session.interfaces)."""
        pinned = session.interfaces if session is not None else None
        if interface == "internal":
            return pinned[0] if pinned else self.config.internal_ip
        if interface == "external":
            return pinned[1] if pinned else self.config.external_ip
        raise BadRequest(f"interface must be 'internal' or 'external', not {interface!r}")

    def _side(self, interface: str, session: Optional[Session] = None) -> Tuple[str, ...]:
        """Every relay address of `interface` a new leg may use (a taken-over session's
        pinned one only)."""
        if session is not None and session.interfaces:
            return (self.interface_ip(interface, session),)
        if interface not in ("internal", "external"):
            self.interface_ip(interface)  # raises BadRequest
        return self.config.side(interface)

    def _allocate(self, now: float, ip: str) -> int:
        probe = self.probe
        usable = None if probe is None else partial(probe, ip)  # usable(port), built in C
        try:
            return self.ports.allocate(now, ip, usable)
        except PortsExhausted:  # (out of descriptors is the plane's to count)
            self.counters["ports.exhausted"] += 1
            raise

    def _learning(self, latch_any: bool, strict_source: Optional[bool]) -> bool:
        """Whether a leg learns its peer from traffic: asked for, or not strict."""
        strict = self.config.strict_source if strict_source is None else strict_source
        return latch_any or not strict

    def get(self, call_id: str) -> Session:
        session = self.by_call.get(call_id)
        if session is None:
            raise SessionNotFound(f"no session with Call-ID {call_id!r}")
        return session

    def sessions(self) -> Iterable[Session]:
        return self.by_call.values()

    # -- commands ------------------------------------------------------------------
    def offer(
        self,
        now: float,
        call_id: str,
        from_tag: str,
        media: Union[Addr, Sequence[StreamOffer]],
        rtcp_port: Optional[int] = None,
        to_tag: Optional[str] = None,
        interface: str = "internal",
        latch_any: bool = False,
        timeout: Optional[float] = None,
        via_branch: Optional[str] = None,
        strict_source: Optional[bool] = None,
    ) -> Tuple[Session, Leg, List[Action]]:
        """Record the offerer's streams; return the leg whose relay addresses the offer
        announces. `media` is every m= line in order (or one (ip, port) for one stream)."""
        streams = _streams(media, rtcp_port)
        session = self.by_call.get(call_id)
        target_ips = self._side(interface, session)
        latch_any = self._learning(latch_any, strict_source)
        actions: List[Action] = []
        wanted = [s.port != 0 or s.keep_ports for s in streams]  # StreamOffer.active
        if session is None:
            if not any(wanted):
                raise BadRequest("the offer has no stream with a non-zero port to relay")
            session = self._create(now, call_id, from_tag, self.ports.pick(target_ips), timeout,
                                   via_branch)
            offering = session.legs[LEG_A]
            try:
                self._shape(now, session, wanted)
            except Exception:
                self._end(now, session, "failed", count=False)
                raise
            self._announce(offering, streams, latch_any)
            actions.append(_new(Install, (session.spec(),)))
        else:
            offering = session.leg_by_tag(from_tag)
            if offering is None:
                answering = session.leg_by_tag(to_tag)
                offering = session.legs[OTHER[answering.name]] if answering else session.legs[LEG_A]
                offering.tag = from_tag
            if timeout is not None:
                session.timeout = timeout
            target = session.legs[OTHER[offering.name]]
            self._ensure_ip(now, session, target, target_ips)
            self._shape(now, session, wanted)
            self._announce(offering, streams, latch_any)
            actions.append(_new(Update, (session.spec(), offering.name)))
            self._schedule(session)
        self.counters["sessions.offers"] += 1
        return session, session.legs[OTHER[offering.name]], actions

    def answer(
        self,
        now: float,
        call_id: str,
        from_tag: str,
        to_tag: str,
        media: Union[Addr, Sequence[StreamOffer]],
        rtcp_port: Optional[int] = None,
        interface: str = "internal",
        latch_any: bool = False,
        timeout: Optional[int] = None,
        strict_source: Optional[bool] = None,
        provisional: bool = False,
    ) -> Tuple[Session, Leg, List[Action]]:
        """Record the answerer's streams; return the leg whose relay addresses the answer
        announces. A stream the answer rejects (port 0) frees its ports on both legs. An
        answer cannot enable a stream: one the offer disabled, or an m= line beyond the
        offer's, gets no relay ports (the reply's rewrite disables it). An answer with
        fewer streams than the offer (a list: one per m= line) rejects the missing ones,
        as port 0 would; the one-stream `(ip, port)` form answers the first.

        `provisional`: a 1xx (183) answer. Until a final answer, a provisional answer from
        another To-tag than leg B's (a forked INVITE) is another early dialog with its
        own A-side relay ports; the final answer's To-tag wins and the other early
        dialogs are freed."""
        streams = _streams(media, rtcp_port)
        session = self.by_call.get(call_id)
        if session is None:
            raise SessionNotFound(f"no session with Call-ID {call_id!r}")
        offered = session.legs[LEG_A].media
        if len(streams) < len(offered) and not _one_stream_form(media):
            # an answer that leaves m= lines out (invalid, RFC 3264 section 6, but some
            # endpoints drop a declined video): the missing ones are rejected, as port 0
            # would (refusing the answer would leave the proxy the callee's SDP as it is)
            ip = streams[0].ip if streams else "0.0.0.0"
            streams = list(streams) + [
                StreamOffer(ip, 0, kind=m.kind if m is not None else "audio")
                for m in offered[len(streams):]]
        target_ips = self._side(interface, session)
        latch_any = self._learning(latch_any, strict_source)
        answering = session.leg_by_tag(to_tag)
        fork = session.forks.get(to_tag)
        if answering is None and fork is None:
            offerer = session.leg_by_tag(from_tag)
            answering = session.legs[OTHER[offerer.name]] if offerer else session.legs[LEG_B]
            if (answering.name == LEG_B and answering.tag is not None
                    and session.state != "answered"):
                fork = self._fork(now, session, to_tag)  # another callee of a forked INVITE
                answering = None
            else:
                answering.tag = to_tag
        if timeout is not None:
            session.timeout = timeout
        if fork is not None and provisional:
            return self._early(now, session, fork, streams, latch_any)
        if fork is not None:
            answering = self._promote(now, session, fork)
        assert answering is not None
        target = session.legs[OTHER[answering.name]]
        self._ensure_ip(now, session, target, target_ips)
        # an answer cannot enable a stream the offer did not: only rejections count
        n_streams = len(streams)
        self._shape(now, session, [m is not None and i < n_streams
                                   and (streams[i].port != 0 or streams[i].keep_ports)
                                   for i, m in enumerate(target.media)])
        self._announce(answering, streams, latch_any)
        if not provisional and session.forks:
            self._drop_forks(now, session)
        actions: List[Action] = [_new(Update, (session.spec(), answering.name))]
        self._schedule(session)
        if not provisional:
            session.state = "answered"
        elif session.state == "offered":
            session.state = "early"
        self.counters["sessions.answers"] += 1
        return session, target, actions

    # -- forked INVITEs: early dialogs -------------------------------------------------
    def _fork(self, now: float, session: Session, tag: str) -> Fork:
        """Another early dialog: A-side relay ports of its own for every stream leg A has
        (the caller learns them from this dialog's 183), leg B's relay ports shared."""
        if len(session.forks) >= MAX_FORKS:
            raise BadRequest(f"call {session.call_id!r} already has {MAX_FORKS + 1} early "
                             "dialogs; lrk relays at most that many forks of one INVITE")
        a, b = session.legs[LEG_A], session.legs[LEG_B]
        key = max([f.key for f in session.forks.values()], default=0) + 1
        fork = Fork(key, tag, Leg(LEG_A, a.relay_ip, latch_any=a.latch_any,
                                  generation=a.generation),
                    Leg(LEG_B, b.relay_ip, tag=tag))
        added: List[int] = []
        ip = a.relay_ip
        try:
            for m in a.media:
                if m is None:
                    fork.a.media.append(None)
                    continue
                port = self._allocate(now, a.relay_ip)
                added.append(port)
                copy = Media(a.relay_ip, port, m.kind, m.announced, m.rtcp_announced,
                             m.rtcp_mux)
                fork.a.media.append(copy)
        except Exception:
            for port in added:
                self.ports.release(ip, port, now, quarantine=False)  # never carried media
            raise
        for port in added:
            self.owner[(ip, port)] = session
        fork.b.media = [None if m is None else Media(b.relay_ip, m.relay_port, m.kind)
                        for m in b.media]
        session.forks[tag] = fork
        self.counters["sessions.early_dialogs"] += 1
        return fork

    def _early(self, now: float, session: Session, fork: Fork, streams: List[StreamOffer],
               latch_any: bool) -> Tuple[Session, Leg, List[Action]]:
        """A provisional answer of an early dialog that is not leg B's: its callee's
        streams; a stream it rejects has no relay ports in this dialog."""
        for i, m in enumerate(fork.a.media):
            if m is not None and not (i < len(streams) and streams[i].active
                                      and i < len(fork.b.media) and fork.b.media[i]):
                self._release(now, session, m, quarantine=False)
                fork.a.media[i] = None
                if i < len(fork.b.media):
                    fork.b.media[i] = None
        self._announce(fork.b, streams, latch_any)
        self._schedule(session)
        self.counters["sessions.answers"] += 1
        return session, fork.a, [Update(session.spec(), LEG_B)]

    def _promote(self, now: float, session: Session, fork: Fork) -> Leg:
        """The final answer came from this early dialog: the caller keeps sending where
        its 183 said (the fork's A-side ports replace leg A's), leg B expects its callee
        on the same relay ports. Returns leg B, the answering leg."""
        a, b = session.legs[LEG_A], session.legs[LEG_B]
        for i, new in enumerate(fork.a.media):
            old = a.media[i] if i < len(a.media) else None
            if new is None or old is None:
                continue
            self._release(now, session, old)
            a.media[i] = new
        for i, m in enumerate(fork.b.media):
            mb = b.media[i] if i < len(b.media) else None
            if m is not None and mb is not None:
                base = mb.base.copy()  # a base is replaced, never changed (it may be shared)
                base.add(m.counters)  # its early media, counted on the shared ports
                mb.base = base
        del session.forks[fork.tag]
        b.tag = fork.tag
        self.counters["sessions.early_dialogs.won"] += 1
        return b

    def _drop_forks(self, now: float, session: Session) -> None:
        """The call is answered: the early dialogs that lost are freed."""
        for fork in session.forks.values():
            for m in fork.a.media:
                if m is not None:
                    self._release(now, session, m)
            self.counters["sessions.early_dialogs.freed"] += 1
        session.forks.clear()

    def _release(self, now: float, session: Session, m: Media, quarantine: bool = True
                 ) -> None:
        key = (m.relay_ip, m.relay_port)
        self.ports.release(m.relay_ip, m.relay_port, now, quarantine=quarantine)
        if self.owner.get(key) is session:
            del self.owner[key]

    def delete(
        self, now: float, call_id: str, from_tag: Optional[str] = None, reason: str = "deleted"
    ) -> Tuple[Session, List[Action]]:
        session = self.get(call_id)
        if from_tag is not None and session.leg_by_tag(from_tag) is None:
            raise SessionNotFound(f"session {call_id!r} has no leg with tag {from_tag!r}")
        return session, [self._end(now, session, reason)]

    # -- time ------------------------------------------------------------------------
    def deadline(self, session: Session) -> float:
        """When a session ends unless media arrives: silence timeout or maximum lifetime."""
        at = session.idle_since() + session.timeout
        lifetime = self.config.max_lifetime
        if lifetime:
            at = min(at, session.created + lifetime)
        return at

    def _schedule(self, session: Session) -> None:
        """Make sure a live timer entry is no later than the session's deadline."""
        at = self.deadline(session)
        if session.timer_at is None or at < session.timer_at:
            session.timer_at = at
            heapq.heappush(self._timers, (at, session.sid))

    def get_timer(self) -> Optional[float]:
        """The earliest time `handle_timer` may end a session (None: no session)."""
        timers = self._timers
        by_sid = self.by_sid
        while timers:
            at, sid = timers[0]
            session = by_sid.get(sid)
            if session is None or session.timer_at != at:
                heapq.heappop(timers)  # ended, or superseded by an earlier entry
                continue
            actual = self.deadline(session)
            if actual > at:  # media arrived since: move the entry (O(log n), no scan)
                heapq.heapreplace(timers, (actual, sid))
                session.timer_at = actual
                continue
            return at
        return None

    def timer_floor(self) -> Optional[float]:
        """A lower bound of `get_timer()` in O(1), without its clean-up (None: no entry):
        the earliest heap entry, live or not (a live session's deadline is never before
        its entry). The shell's per-request re-arm reads this instead of `get_timer()`."""
        timers = self._timers
        return timers[0][0] if timers else None

    def due(self, now: float) -> bool:
        """Whether `handle_timer(now)` would end something: the shell then refreshes the
        data plane's counters first, so that no call ends on stale ones."""
        at = self.get_timer()
        return at is not None and at <= now

    def handle_timer(self, now: float) -> List[Action]:
        """End sessions silent for their timeout or older than the maximum lifetime."""
        actions: List[Action] = []
        lifetime = self.config.max_lifetime
        while True:
            at = self.get_timer()
            if at is None or at > now:
                return actions
            _at, sid = heapq.heappop(self._timers)
            session = self.by_sid[sid]
            session.timer_at = None
            reason = ("lifetime" if lifetime and now - session.created >= lifetime
                      else "silence")
            actions.append(self._end(now, session, reason))

    def expire(self, now: float) -> List[Action]:
        """`handle_timer` under its older name."""
        return self.handle_timer(now)

    def set_fixed(
        self,
        now: float,
        call_id: str,
        a_relay: Addr,
        a_peer: Addr,
        b_relay: Addr,
        b_peer: Addr,
        timeout: float,
        takeover_idle: float,
    ) -> Tuple[Optional[Session], List[Action], str]:
        """Create or update a one-stream session whose relay ports the client chose (legacy
        protocol).

        Returns (session or None, actions, outcome) where outcome is one of
        "created", "unchanged", "updated", "refused" (a port is held by a live call that
        must not be hijacked, or the Call-ID or a port belongs to a msgpack call, which
        the unauthenticated legacy protocol may never touch). A legacy holder silent for
        `takeover_idle` seconds is ended first.
        """
        session = self.by_call.get(call_id)
        wanted = {LEG_A: (a_relay, a_peer), LEG_B: (b_relay, b_peer)}
        actions: List[Action] = []
        if session is not None and session.origin != "legacy":
            # a msgpack call is its client's: the legacy protocol cannot authenticate
            self.counters["legacy.conflicts.refused"] += 1
            return None, [], "refused"
        # refusing must have no side effect: check everything before ending anything
        if not all(self.ports.contains(relay[1]) for relay, _peer in wanted.values()):
            self.counters["legacy.ports_outside_range"] += 1
            return None, [], "refused"
        holders: List[Session] = []
        for relay, _peer in wanted.values():
            holder = self.owner.get((relay[0], relay[1] & ~1))
            if holder is not None and holder is not session and \
                    all(h is not holder for h in holders):
                holders.append(holder)
        if any(h.origin != "legacy" or now - h.idle_since() < takeover_idle for h in holders):
            self.counters["legacy.conflicts.refused"] += 1
            return None, [], "refused"
        for holder in holders:
            self.counters["legacy.conflicts.replaced"] += 1
            actions.append(self._end(now, holder, "replaced"))
        if session is not None:
            legs = session.legs
            if any((legs[n].relay_ip, legs[n].relay_port) != wanted[n][0] for n in wanted) \
                    or len(legs[LEG_A].media) != 1:
                actions.append(self._end(now, session, "replaced"))
                session = None
            elif all(legs[n].announced == peer for n, (_relay, peer) in wanted.items()):
                session.timeout = timeout
                self._schedule(session)
                return session, actions, "unchanged"
            else:
                session.timeout = timeout
                for name, (_relay, peer) in wanted.items():
                    leg = legs[name]
                    if leg.announced != peer:
                        leg.relatch(self._learning(False, None))
                        leg.media[0].announce(StreamOffer(peer[0], peer[1]))  # type: ignore[union-attr]
                        actions.append(Update(session.spec(), name))
                self._schedule(session)
                return session, actions, "updated"
        for relay, _peer in wanted.values():
            self.ports.claim(relay[0], relay[1], now)
        sid = self._next_sid
        self._next_sid += 1
        session = Session(
            sid=sid, call_id=call_id, created=now, timeout=timeout,
            legs={LEG_A: Leg(LEG_A, a_relay[0], [Media(a_relay[0], a_relay[1] & ~1)]),
                  LEG_B: Leg(LEG_B, b_relay[0], [Media(b_relay[0], b_relay[1] & ~1)])},
            state="answered", origin="legacy",
        )
        for name, (_relay, peer) in wanted.items():
            leg = session.legs[name]
            leg.relatch(self._learning(False, None))
            leg.media[0].announce(StreamOffer(peer[0], peer[1]))  # type: ignore[union-attr]
        self._register(session)
        actions.append(Install(session.spec()))
        return session, actions, "created"

    # -- restart: sessions from a store -------------------------------------------------
    def adopt(self, now: float, session: Session, foreign: bool = False,
              taken: bool = False) -> List[Action]:
        """Take over a session rebuilt from a store (a restarted relay): its relay ports
        are claimed as they were, so the calls' media keeps its addresses. Refused
        (counted, nothing changes) when its Call-ID or id is taken or a port is outside
        this relay's range or in use.

        `foreign`: a session of another node (a standby's takeover): it gets a fresh id
        here, and its ports may lie outside this relay's range (the peer's range; they
        go back to no pool when the call ends).

        `taken`: this node's own record of a call it took over earlier (restored after a
        restart): its id stays, and so do its ports outside the range and the peer's
        addresses (`Session.interfaces`)."""
        addrs = relay_addrs(session)
        if not foreign and not taken:
            session.interfaces = None  # our own call: our addresses (as configured now)
        if foreign and session.call_id not in self.by_call:
            session.sid = self._next_sid
        if (session.call_id in self.by_call or session.sid in self.by_sid
                or not addrs or any((not (foreign or taken) and not self.ports.contains(p))
                                    or self.ports.is_in_use(ip, p) for ip, p in addrs)
                or len(set(addrs)) != len(addrs)):
            self.counters["sessions.restore_refused"] += 1
            return []
        for ip, port in addrs:
            self.ports.claim(ip, port, now)
        self._next_sid = max(self._next_sid, session.sid + 1)
        session.timer_at = None
        self.by_call[session.call_id] = session
        self.by_sid[session.sid] = session
        for key in addrs:
            self.owner[key] = session
        self._schedule(session)
        self.counters["sessions.restored"] += 1
        return [Install(session.spec())]

    # -- data-plane feedback ---------------------------------------------------------
    def handle_event(self, now: float, event: Event) -> List[Action]:
        """What a data plane observed: counters and latches, or a failure that ends a
        session (the plane keeps nothing of it once it gets the returned Remove)."""
        if isinstance(event, SessionReport):
            self.apply_report(event)
            return []
        if isinstance(event, PlaneFailure):
            return self.fail(now, event)
        raise TypeError(f"not a data-plane event: {event!r}")

    def apply_report(self, report: SessionReport) -> None:
        """Fold a data-plane report (absolute counters since install) into a session."""
        session = self.by_sid.get(report.sid)
        if session is None:
            return  # ended meanwhile: the report raced the Remove
        last_rx = report.last_rx
        if last_rx is not None and (session.last_media is None or last_rx > session.last_media):
            session.last_media = last_rx
        session.observe(report)

    def fail(self, now: float, failure: PlaneFailure) -> List[Action]:
        """The data plane cannot serve a session: end it (counted by reason)."""
        session = self.by_sid.get(failure.sid)
        if session is None:
            return []
        self.counters[f"sessions.failed.{failure.reason}"] += 1
        return [self._end(now, session, "failed")]

    # -- internals -------------------------------------------------------------------
    def _create(
        self,
        now: float,
        call_id: str,
        from_tag: str,
        b_ip: str,
        timeout: Optional[float],
        via_branch: Optional[str],
    ) -> Session:
        if self.draining:
            self.counters["sessions.refused.draining"] += 1
            raise Draining("this relay is draining: it takes no new calls; use another node")
        if self.config.max_sessions and len(self.by_call) >= self.config.max_sessions:
            self.counters["sessions.refused.max_sessions"] += 1
            raise AtCapacity(
                f"session limit of {self.config.max_sessions} reached; raise max_sessions "
                "or use another node"
            )
        sid = self._next_sid
        self._next_sid += 1
        session = Session(
            sid=sid,
            call_id=call_id,
            created=now,
            timeout=self.config.silence_timeout if timeout is None else timeout,
            legs={
                LEG_A: Leg(LEG_A, self.ports.pick(self.config.side("internal")), tag=from_tag),
                LEG_B: Leg(LEG_B, b_ip),
            },
            via_branch=via_branch,
        )
        self._register(session)
        return session

    def _register(self, session: Session) -> None:
        self.by_call[session.call_id] = session
        self.by_sid[session.sid] = session
        for key in relay_addrs(session):  # none yet for a new call: _shape adds them
            self.owner[key] = session
        self.counters["sessions.created"] += 1
        self._schedule(session)

    def _shape(self, now: float, session: Session, wanted: List[bool]) -> None:
        """Give stream i relay ports on both legs where `wanted[i]`, free them elsewhere.
        All or nothing: when ports run out, what this call allocated is released."""
        if len(wanted) > MAX_STREAMS:
            raise BadRequest(f"{len(wanted)} media streams; lrk relays at most {MAX_STREAMS}")
        a, b = session.legs[LEG_A], session.legs[LEG_B]
        am, bm = a.media, b.media
        n = len(wanted)
        if n == 1 and not am and not bm and wanted[0]:  # a new one-stream call
            owner = self.owner
            ip_a, ip_b = a.relay_ip, b.relay_ip
            port_a = self._allocate(now, ip_a)
            try:
                port_b = self._allocate(now, ip_b)
            except Exception:
                self.ports.release(ip_a, port_a, now, quarantine=False)  # never carried media
                raise
            am.append(Media(ip_a, port_a))
            bm.append(Media(ip_b, port_b))
            owner[(ip_a, port_a)] = session
            owner[(ip_b, port_b)] = session
            return
        if len(am) == n and len(bm) == n:  # an answer or re-offer: usually nothing changes
            for i in range(n):
                if (am[i] is not None) != bool(wanted[i]):
                    break
            else:
                return
        if len(am) < n:
            am.extend([None] * (n - len(am)))
        if len(bm) < n:
            bm.extend([None] * (n - len(bm)))
        added: List[Tuple[str, int]] = []
        try:
            for i, want in enumerate(wanted):
                if want and am[i] is None:
                    port_a = self._allocate(now, a.relay_ip)
                    am[i] = Media(a.relay_ip, port_a)
                    self.owner[(a.relay_ip, port_a)] = session
                    added.append((a.relay_ip, port_a))
                    port_b = self._allocate(now, b.relay_ip)
                    bm[i] = Media(b.relay_ip, port_b)
                    self.owner[(b.relay_ip, port_b)] = session
                    added.append((b.relay_ip, port_b))
        except Exception:
            for media in (am, bm):
                for i, m in enumerate(media):
                    if m is not None and (m.relay_ip, m.relay_port) in added:
                        media[i] = None
            for ip, port in added:
                self.ports.release(ip, port, now, quarantine=False)  # never carried media
                self.owner.pop((ip, port), None)
            raise
        for i, m in enumerate(am):
            if m is not None and (i >= n or not wanted[i]):
                self._free_stream(now, session, i)
        while len(am) > n and am[-1] is None:
            am.pop()
        while len(bm) > n and bm[-1] is None:
            bm.pop()

    def _free_stream(self, now: float, session: Session, index: int) -> None:
        for leg in session.legs.values():
            m = leg.media[index]
            if m is None:
                continue
            self._release(now, session, m)
            leg.media[index] = None
        self.counters["streams.removed"] += 1

    @staticmethod
    def _announce(leg: Leg, streams: List[StreamOffer], latch_any: bool) -> None:
        leg.relatch(latch_any)
        for i, offer in enumerate(streams):
            m = leg.media[i] if i < len(leg.media) else None
            if m is not None:
                m.announce(offer)

    def _ensure_ip(self, now: float, session: Session, leg: Leg, ips: Tuple[str, ...]
                   ) -> None:
        """Move a leg to another relay address (interface flag changed): new ports for
        each of its streams; the data plane re-installs them (counters fold)."""
        if leg.relay_ip in ips:
            return
        ip = self.ports.pick(ips)
        moved = []
        for i, m in enumerate(leg.media):
            if m is None:
                continue
            new_port = self._allocate(now, ip)
            moved.append(i)
            self.ports.release(m.relay_ip, m.relay_port, now)
            self.owner.pop((m.relay_ip, m.relay_port), None)
            self.owner[(ip, new_port)] = session
            m.relay_ip = ip
            m.relay_port = new_port
        leg.relay_ip = ip
        for each in session.legs.values():
            for i in moved:
                m = each.media[i] if i < len(each.media) else None
                if m is not None:
                    m.fold()
        self.counters["sessions.rebound"] += 1

    def _end(self, now: float, session: Session, reason: str, count: bool = True) -> Remove:
        del self.by_call[session.call_id]
        del self.by_sid[session.sid]
        for key in relay_addrs(session):
            self.ports.release(key[0], key[1], now)
            if self.owner.get(key) is session:
                del self.owner[key]
        session.timer_at = None
        if not count:
            self.counters["sessions.created"] -= 1  # it never got to exist
        elif reason == "deleted":
            self.counters["sessions.deleted"] += 1
        elif reason == "failed":
            self.counters["sessions.failed"] += 1
        else:
            self.counters[f"sessions.expired.{reason}"] += 1
        return _new(Remove, (session.sid, session.call_id, reason))


def relay_addrs(session: Session) -> List[Tuple[str, int]]:
    """Every (relay address, RTP port) of the session, as Session.ports() orders them."""
    legs = session.legs
    out = []
    for m in legs[LEG_A].media:  # plain loops: every delete walks these
        if m is not None:
            out.append((m.relay_ip, m.relay_port))
    for m in legs[LEG_B].media:
        if m is not None:
            out.append((m.relay_ip, m.relay_port))
    if session.forks:
        for fork in session.forks.values():  # their own A-side ports (B's are leg B's)
            out.extend([(m.relay_ip, m.relay_port) for m in fork.a.media if m is not None])
    return out


def _one_stream_form(media: Union[Addr, Sequence[StreamOffer]]) -> bool:
    """Whether `media` is the one-stream (ip, port) form (not one entry per m= line)."""
    return isinstance(media, tuple) and len(media) == 2 and isinstance(media[0], str)


def _streams(media: Union[Addr, Sequence[StreamOffer]], rtcp_port: Optional[int]
             ) -> List[StreamOffer]:
    """Every stream of a request: a list of StreamOffer, or one (ip, port) pair."""
    if type(media) is list and media:  # the usual case, as the protocol parsed it
        return media
    if _one_stream_form(media):
        return [StreamOffer(media[0], int(media[1]), rtcp_port,  # type: ignore[arg-type]
                            False, "audio", True)]  # keep_ports
    streams = list(media)  # type: ignore[arg-type]
    if not streams:
        raise BadRequest("no media stream given")
    return streams


__all__ = ["Action", "Engine", "EngineConfig", "Install", "Remove", "Update"]  # re-exported
