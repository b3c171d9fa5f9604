"""The session engine: offer/answer/delete/expiry over a port allocator.

Sans-IO: every call takes `now` and returns the data-plane actions to carry out.
The daemon applies them to sockets or netfilter, and feeds traffic reports back
through `apply_report`.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Callable, Dict, Iterable, List, Optional, Tuple, Union

from lrk.core.ports import PortAllocator
from lrk.core.session import LEG_A, LEG_B, OTHER, Leg, Session
from lrk.errors import BadRequest, SessionNotFound

PortProbe = Callable[[str, int], bool]

ENGINE_COUNTERS = (
    "sessions.created", "sessions.offers", "sessions.answers", "sessions.deleted",
    "sessions.expired.silence", "sessions.expired.lifetime", "sessions.rebound",
    "sessions.refused.max_sessions", "ports.exhausted",
    "sessions.expired.replaced", "legacy.conflicts.refused", "legacy.conflicts.replaced",
    "legacy.ports_outside_range",
)


@dataclass(frozen=True)
class Install:
    """Start relaying a session (bind/open its four ports)."""

    session: Session


@dataclass(frozen=True)
class Update:
    """A leg's announced peer changed or must re-latch."""

    session: Session
    leg: str


@dataclass(frozen=True)
class Remove:
    """Stop relaying a session and release its ports."""

    session: Session
    reason: str


Action = Union[Install, Update, Remove]


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
            actions.append(Install(session))
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
                actions.append(Update(session, offering.name))
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
            actions.append(Update(session, answering.name))
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

    def due(self, now: float) -> bool:
        """Whether `expire` would end anything (lets the shell refresh counters first)."""
        lifetime = self.config.max_lifetime
        for session in self.by_call.values():
            if lifetime and now - session.created >= lifetime:
                return True
            if now - session.idle_since() >= session.timeout:
                return True
        return False

    def expire(self, now: float) -> List[Action]:
        """End sessions silent for their timeout or older than the maximum lifetime."""
        actions: List[Action] = []
        lifetime = self.config.max_lifetime
        for session in list(self.by_call.values()):
            if lifetime and now - session.created >= lifetime:
                actions.append(self._end(now, session, "lifetime"))
            elif now - session.idle_since() >= session.timeout:
                actions.append(self._end(now, session, "silence"))
        return actions

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
                        actions.append(Update(session, name))
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
        actions.append(Install(session))
        return session, actions, "created"

    # -- data-plane feedback ---------------------------------------------------------
    def apply_report(self, sid: int, report: dict) -> None:
        """Fold a data-plane report (absolute counters since install) into a session."""
        session = self.by_sid.get(sid)
        if session is None:
            return
        last_rx = report.get("last_rx")
        if last_rx is not None and (session.last_media is None or last_rx > session.last_media):
            session.last_media = last_rx
        for name, leg_report in report.get("legs", {}).items():
            leg = session.legs.get(name)
            if leg is None:
                continue
            in_p, in_b, out_p, out_b, drops = leg_report["c"]
            base = leg.base
            c = leg.counters
            c.in_packets = base.in_packets + in_p
            c.in_bytes = base.in_bytes + in_b
            c.out_packets = base.out_packets + out_p
            c.out_bytes = base.out_bytes + out_b
            merged = dict(base.drops)
            for reason, n in drops.items():
                merged[reason] = merged.get(reason, 0) + n
            c.drops = merged
            if leg_report.get("gen") == leg.generation:
                rtp, rtcp = leg_report.get("latched", (None, None))
                leg.latched = tuple(rtp) if rtp else None
                leg.rtcp_latched = tuple(rtcp) if rtcp else None

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
        return [Remove(session, "rebind"), Install(session)]

    def _end(self, now: float, session: Session, reason: str) -> Remove:
        del self.by_call[session.call_id]
        del self.by_sid[session.sid]
        for leg in session.legs.values():
            self.ports.release(leg.relay_port, now)
            if self.owner.get(leg.relay_port) is session:
                del self.owner[leg.relay_port]
        key = "sessions.deleted" if reason == "deleted" else f"sessions.expired.{reason}"
        self.counters[key] += 1
        return Remove(session, reason)



__all__ = ["Action", "Engine", "EngineConfig", "Install", "Remove", "Update"]
