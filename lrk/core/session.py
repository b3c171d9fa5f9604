"""Sessions (calls) and their two legs, as the engine owns them.

`spec()` turns one into the immutable snapshot the data plane gets; `observe()` folds
back what the data plane saw.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, Optional

from fastpath.contract import DROP_REASONS, LEG_A, LEG_B, Addr, LegReport, LegSpec, SessionSpec

OTHER = {LEG_A: LEG_B, LEG_B: LEG_A}

__all__ = ["DROP_REASONS", "LEG_A", "LEG_B", "OTHER", "Addr", "Leg", "LegCounters", "Session"]


@dataclass
class LegCounters:
    """What the relay received from (in) and sent to (out) a leg's peer, RTP and RTCP."""

    in_packets: int = 0
    in_bytes: int = 0
    out_packets: int = 0
    out_bytes: int = 0
    drops: Dict[str, int] = field(default_factory=dict)

    def as_dict(self) -> Dict[str, Any]:
        return {
            "in_packets": self.in_packets,
            "in_bytes": self.in_bytes,
            "out_packets": self.out_packets,
            "out_bytes": self.out_bytes,
            "drops": dict(self.drops),
        }

    @property
    def packets(self) -> int:
        return self.in_packets


@dataclass
class Leg:
    """One side of a call: the relay port its peer sends to, and who that peer is."""

    name: str
    relay_ip: str
    relay_port: int  # even; RTCP on relay_port + 1
    tag: Optional[str] = None
    announced: Optional[Addr] = None  # from SDP
    rtcp_announced: Optional[Addr] = None  # a=rtcp, else announced port + 1
    latch_any: bool = False
    latched: Optional[Addr] = None  # learned from traffic (reported by the data plane)
    rtcp_latched: Optional[Addr] = None
    generation: int = 0  # bumped by every offer/answer that re-latches the leg
    counters: LegCounters = field(default_factory=LegCounters)
    # counters of earlier data-plane installs of this leg (kept when a leg is re-bound)
    base: LegCounters = field(default_factory=LegCounters)

    def fold(self) -> None:
        """Freeze the current counters as the base for the next data-plane install."""
        c = self.counters
        self.base = LegCounters(c.in_packets, c.in_bytes, c.out_packets, c.out_bytes, dict(c.drops))

    @property
    def rtcp_port(self) -> int:
        return self.relay_port + 1

    def spec(self) -> LegSpec:
        """The leg as the data plane must serve it (an immutable snapshot)."""
        return LegSpec(self.name, self.relay_ip, self.relay_port, self.announced,
                       self.rtcp_announced, self.latch_any, self.generation)

    def observe(self, report: LegReport) -> None:
        """Fold what the data plane observed (absolute counts since its install)."""
        base = self.base
        c = self.counters
        c.in_packets = base.in_packets + report.in_packets
        c.in_bytes = base.in_bytes + report.in_bytes
        c.out_packets = base.out_packets + report.out_packets
        c.out_bytes = base.out_bytes + report.out_bytes
        if report.drops or base.drops:
            merged = dict(base.drops)
            for reason, n in report.drops:
                merged[reason] = merged.get(reason, 0) + n
            c.drops = merged
        # latches of an older generation belong to a peer this leg no longer expects
        if report.generation == self.generation:
            if report.latched is not None:
                self.latched = report.latched
            if report.rtcp_latched is not None:
                self.rtcp_latched = report.rtcp_latched

    def announce(self, ip: str, port: int, rtcp_port: Optional[int], latch_any: bool) -> bool:
        """Record the peer's SDP address; True when it changed (the leg re-latches either way)."""
        new = (ip, port)
        new_rtcp = (ip, rtcp_port if rtcp_port else (port + 1 if port else 0))
        changed = new != self.announced or new_rtcp != self.rtcp_announced
        self.announced = new
        self.rtcp_announced = new_rtcp
        self.latch_any = latch_any
        self.latched = None
        self.rtcp_latched = None
        self.generation += 1
        return changed

    def as_dict(self) -> Dict[str, Any]:
        def addr(a: Optional[Addr]) -> Optional[Dict[str, Any]]:
            return None if a is None else {"ip": a[0], "port": a[1]}

        return {
            "tag": self.tag,
            "relay": {"ip": self.relay_ip, "port": self.relay_port, "rtcp_port": self.rtcp_port},
            "announced": addr(self.announced),
            "latched": addr(self.latched),
            "rtcp_latched": addr(self.rtcp_latched),
            "latch_any": self.latch_any,
            "counters": self.counters.as_dict(),
        }


@dataclass
class Session:
    """A call relayed between leg A (caller) and leg B (callee)."""

    sid: int
    call_id: str
    created: float
    timeout: float
    legs: Dict[str, Leg]
    last_media: Optional[float] = None
    state: str = "offered"  # offered -> answered
    via_branch: Optional[str] = None
    timer_at: Optional[float] = None  # the engine's live expiry entry for this session

    def leg_by_tag(self, tag: Optional[str]) -> Optional[Leg]:
        if tag is None:
            return None
        for leg in self.legs.values():
            if leg.tag == tag:
                return leg
        return None

    def idle_since(self) -> float:
        return self.created if self.last_media is None else self.last_media

    def spec(self) -> SessionSpec:
        return SessionSpec(self.sid, self.call_id, self.legs[LEG_A].spec(),
                           self.legs[LEG_B].spec())

    def packets(self) -> int:
        return sum(leg.counters.in_packets for leg in self.legs.values())

    def ports(self) -> list:
        return [self.legs[LEG_A].relay_port, self.legs[LEG_B].relay_port]

    def as_dict(self, now: float) -> Dict[str, Any]:
        return {
            "call_id": self.call_id,
            "state": self.state,
            "age": round(now - self.created, 3),
            "idle": round(now - self.idle_since(), 3),
            "timeout": self.timeout,
            "media_seen": self.last_media is not None,
            "legs": {name: leg.as_dict() for name, leg in self.legs.items()},
        }

    def summary(self, now: float) -> Dict[str, Any]:
        return {
            "call_id": self.call_id,
            "state": self.state,
            "age": round(now - self.created, 3),
            "idle": round(now - self.idle_since(), 3),
            "ports": self.ports(),
            "packets": self.packets(),
        }
