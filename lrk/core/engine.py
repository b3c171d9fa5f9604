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
from typing import Callable, Dict, Iterable, List, Optional, Tuple

from fastpath.contract import (
    Action,
    Event,
    Install,
    PlaneFailure,
    Remove,
    SessionReport,
    Update,
)
from lrk.core.ports import PortAllocator
from lrk.core.session import LEG_A, LEG_B, OTHER, Leg, Session
from lrk.errors import BadRequest, SessionNotFound

PortProbe = Callable[[str, int], bool]

ENGINE_COUNTERS = (
    "sessions.created", "sessions.offers", "sessions.answers", "sessions.deleted",
    "sessions.expired.silence", "sessions.expired.lifetime", "sessions.rebound",
    "sessions.refused.max_sessions", "ports.exhausted",
    "sessions.expired.replaced", "legacy.conflicts.refused", "legacy.conflicts.replaced",
    "legacy.ports_outside_range", "sessions.failed",
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


class Engine:
    """Owns sessions and ports; the single source of truth of the control plane."""

    def __init__(self, config: EngineConfig, probe: Optional[PortProbe] = None) -> None:
        self.config = config
        self.ports = PortAllocator(config.port_start, config.port_end, config.quarantine)
        self.probe = probe
        self.by_call: Dict[str, Session] = {}
        self.by_sid: Dict[int, Session] = {}
        self.owner: Dict[int, Session] = {}  # even relay port -> session holding it
        self.counters: Counter = Counter({name: 0 for name in ENGINE_COUNTERS})
        self._next_sid = 1
        #: (deadline, sid) per session; an entry is live while it equals the session's
        #: `timer_at`, so stale entries (media came, timeout changed) drop off when popped
        self._timers: List[Tuple[float, int]] = []

    # -- helpers -------------------------------------------------------------------
    def interface_ip(self, interface: str) -> str:
        if interface == "internal":
            return self.config.internal_ip
        if interface == "external":
            return self.config.external_ip
        raise BadRequest(f"interface must be 'internal' or 'external', not {interface!r}")

    def _allocate(self, now: float, ip: str) -> int:
        probe = self.probe
        usable = None if probe is None else (lambda port: probe(ip, port))
        try:
            return self.ports.allocate(now, usable)
        except Exception:
            self.counters["ports.exhausted"] += 1
            raise

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
        media: Tuple[str, int],
        rtcp_port: Optional[int] = None,
        to_tag: Optional[str] = None,
        interface: str = "internal",
        latch_any: bool = False,
        timeout: Optional[float] = None,
        via_branch: Optional[str] = None,
    ) -> Tuple[Session, Leg, List[Action]]:
        """Record the offerer's media; return the leg whose relay address the offer announces."""
        target_ip = self.interface_ip(interface)
        session = self.by_call.get(call_id)
        actions: List[Action] = []
        if session is None:
            session = self._create(now, call_id, from_tag, target_ip, timeout, via_branch)
            offering = session.legs[LEG_A]
            offering.announce(media[0], media[1], rtcp_port, latch_any)
            actions.append(Install(session.spec()))
        else:
            offering = session.leg_by_tag(from_tag)
            if offering is None:
                answering = session.leg_by_tag(to_tag)
                offering = session.legs[OTHER[answering.name]] if answering else session.legs[LEG_A]
                offering.tag = from_tag
            if timeout is not None:
                session.timeout = timeout
            target = session.legs[OTHER[offering.name]]
            actions.extend(self._ensure_ip(now, session, target, target_ip))
            offering.announce(media[0], media[1], rtcp_port, latch_any)
            if not actions:
                actions.append(Update(session.spec(), offering.name))
            else:  # re-opened: the install must carry the new announcement
                actions[-1] = Install(session.spec())
            self._schedule(session)
        self.counters["sessions.offers"] += 1
        return session, session.legs[OTHER[offering.name]], actions

    def answer(
        self,
        now: float,
        call_id: str,
        from_tag: str,
        to_tag: str,
        media: Tuple[str, int],
        rtcp_port: Optional[int] = None,
        interface: str = "internal",
        latch_any: bool = False,
        timeout: Optional[float] = None,
    ) -> Tuple[Session, Leg, List[Action]]:
        """Record the answerer's media; return the leg whose relay address the answer announces."""
        target_ip = self.interface_ip(interface)
        session = self.get(call_id)
        answering = session.leg_by_tag(to_tag)
        if answering is None:
            offerer = session.leg_by_tag(from_tag)
            answering = session.legs[OTHER[offerer.name]] if offerer else session.legs[LEG_B]
            answering.tag = to_tag
        if timeout is not None:
            session.timeout = timeout
        target = session.legs[OTHER[answering.name]]
        actions = self._ensure_ip(now, session, target, target_ip)
        answering.announce(media[0], media[1], rtcp_port, latch_any)
        if not actions:
            actions.append(Update(session.spec(), answering.name))
        else:
            actions[-1] = Install(session.spec())
        self._schedule(session)
        session.state = "answered"
        self.counters["sessions.answers"] += 1
        return session, target, actions

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
        a_relay: Tuple[str, int],
        a_peer: Tuple[str, int],
        b_relay: Tuple[str, int],
        b_peer: Tuple[str, int],
        timeout: float,
        takeover_idle: float,
    ) -> Tuple[Optional[Session], List[Action], str]:
        """Create or update a session whose relay ports the client chose (legacy protocol).

        Returns (session or None, actions, outcome) where outcome is one of
        "created", "unchanged", "updated", "refused" (a port is held by a live call that
        must not be hijacked). A holder silent for `takeover_idle` seconds is ended first.
        """
        session = self.by_call.get(call_id)
        wanted = {LEG_A: (a_relay, a_peer), LEG_B: (b_relay, b_peer)}
        actions: List[Action] = []
        # refusing must have no side effect: check everything before ending anything
        if not all(self.ports.contains(relay[1]) for relay, _peer in wanted.values()):
            self.counters["legacy.ports_outside_range"] += 1
            return None, [], "refused"
        holders: List[Session] = []
        for relay, _peer in wanted.values():
            holder = self.owner.get(relay[1] & ~1)
            if holder is not None and holder is not session and \
                    all(h is not holder for h in holders):
                holders.append(holder)
        if any(now - h.idle_since() < takeover_idle for h in holders):
            self.counters["legacy.conflicts.refused"] += 1
            return None, [], "refused"
        for holder in holders:
            self.counters["legacy.conflicts.replaced"] += 1
            actions.append(self._end(now, holder, "replaced"))
        if session is not None:
            same = all(
                (session.legs[n].relay_ip, session.legs[n].relay_port) == relay
                and session.legs[n].announced == peer
                for n, (relay, peer) in wanted.items()
            )
            if same:
                session.timeout = timeout
                self._schedule(session)
                return session, actions, "unchanged"
            if any((session.legs[n].relay_ip, session.legs[n].relay_port) != wanted[n][0]
                   for n in wanted):
                actions.append(self._end(now, session, "replaced"))
                session = None
            else:
                session.timeout = timeout
                for name, (_relay, peer) in wanted.items():
                    if session.legs[name].announced != peer:
                        session.legs[name].announce(peer[0], peer[1], None, False)
                        actions.append(Update(session.spec(), name))
                self._schedule(session)
                return session, actions, "updated"
        for relay, _peer in wanted.values():
            self.ports.claim(relay[1], now)
        sid = self._next_sid
        self._next_sid += 1
        session = Session(
            sid=sid, call_id=call_id, created=now, timeout=timeout,
            legs={LEG_A: Leg(LEG_A, a_relay[0], a_relay[1] & ~1),
                  LEG_B: Leg(LEG_B, b_relay[0], b_relay[1] & ~1)},
            state="answered",
        )
        session.legs[LEG_A].announce(a_peer[0], a_peer[1], None, False)
        session.legs[LEG_B].announce(b_peer[0], b_peer[1], None, False)
        self._register(session)
        actions.append(Install(session.spec()))
        return session, actions, "created"

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
        session.legs[LEG_A].observe(report.a)
        session.legs[LEG_B].observe(report.b)

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
        if self.config.max_sessions and len(self.by_call) >= self.config.max_sessions:
            self.counters["sessions.refused.max_sessions"] += 1
            raise BadRequest(
                f"session limit of {self.config.max_sessions} reached; raise max_sessions"
            )
        a_ip = self.config.internal_ip
        a_port = self._allocate(now, a_ip)
        try:
            b_port = self._allocate(now, b_ip)
        except Exception:
            self.ports.release(a_port, now, quarantine=False)  # never carried media
            raise
        sid = self._next_sid
        self._next_sid += 1
        session = Session(
            sid=sid,
            call_id=call_id,
            created=now,
            timeout=self.config.silence_timeout if timeout is None else timeout,
            legs={
                LEG_A: Leg(LEG_A, a_ip, a_port, tag=from_tag),
                LEG_B: Leg(LEG_B, b_ip, b_port),
            },
            via_branch=via_branch,
        )
        self._register(session)
        return session

    def _register(self, session: Session) -> None:
        self.by_call[session.call_id] = session
        self.by_sid[session.sid] = session
        for leg in session.legs.values():
            self.owner[leg.relay_port] = session
        self.counters["sessions.created"] += 1
        self._schedule(session)

    def _ensure_ip(self, now: float, session: Session, leg: Leg, ip: str) -> List[Action]:
        """Move a leg to another relay address (interface flag changed): re-open its ports."""
        if leg.relay_ip == ip:
            return []
        new_port = self._allocate(now, ip)
        self.ports.release(leg.relay_port, now)
        self.owner.pop(leg.relay_port, None)
        self.owner[new_port] = session
        for each in session.legs.values():
            each.fold()
        leg.relay_ip = ip
        leg.relay_port = new_port
        self.counters["sessions.rebound"] += 1
        return [Remove(session.sid, session.call_id, "rebind"), Install(session.spec())]

    def _end(self, now: float, session: Session, reason: str) -> Remove:
        del self.by_call[session.call_id]
        del self.by_sid[session.sid]
        for leg in session.legs.values():
            self.ports.release(leg.relay_port, now)
            if self.owner.get(leg.relay_port) is session:
                del self.owner[leg.relay_port]
        session.timer_at = None
        if reason == "deleted":
            self.counters["sessions.deleted"] += 1
        elif reason == "failed":
            self.counters["sessions.failed"] += 1
        else:
            self.counters[f"sessions.expired.{reason}"] += 1
        return Remove(session.sid, session.call_id, reason)



__all__ = ["Action", "Engine", "EngineConfig", "Install", "Remove", "Update"]  # re-exported
