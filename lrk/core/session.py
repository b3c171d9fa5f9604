"""Sessions (calls), their two legs, and each leg's side of every stream.

A session holds every stream (m= line) of the SDP: stream `i` has relay ports on leg
A (the caller sends there) and on leg B (the callee sends there). A disabled stream
(port 0) holds no ports and keeps its place (`None`). `spec()` turns a session into
the immutable snapshot the data plane gets; `observe()` folds back what it saw.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, NamedTuple, Optional, Tuple

from fastpath.contract import (
    DROP_REASONS,
    LEG_A,
    LEG_B,
    Addr,
    ForkSpec,
    LegReport,
    LegSpec,
    SessionReport,
    SessionSpec,
    StreamSpec,
)

OTHER = {LEG_A: LEG_B, LEG_B: LEG_A}
#: c= addresses of old-style hold (RFC 2543)
NULL_ADDRESSES = ("0.0.0.0", "::")

__all__ = ["DROP_REASONS", "LEG_A", "LEG_B", "OTHER", "Addr", "Fork", "Leg", "LegCounters",
           "Media", "Session", "StreamOffer"]


#: builds a NamedTuple from all of its fields without its Python-level __new__
_new = tuple.__new__

class StreamOffer(NamedTuple):
    """One stream as an offer or answer announces it (port 0: disabled or rejected). A
    NamedTuple: one per m= line of every request, built in C (a frozen dataclass cost
    about 1.5 µs each on CPython)."""

    ip: str
    port: int
    rtcp_port: Optional[int] = None  # a=rtcp; None: port + 1
    rtcp_mux: bool = False
    kind: str = "audio"
    #: an m= line with port 0 is disabled (no relay ports); `media {ip, port: 0}` of the
    #: one-stream protocol form keeps its ports and only stops sending (on hold)
    keep_ports: bool = False
    rtcp_ip: Optional[str] = None  # a=rtcp's address, when it names one

    @property
    def active(self) -> bool:
        return self.port != 0 or self.keep_ports


@dataclass
class LegCounters:
    """What the relay received from (in) and sent to (out) a peer, RTP and RTCP."""

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

    def copy(self) -> LegCounters:
        return LegCounters(self.in_packets, self.in_bytes, self.out_packets, self.out_bytes,
                           dict(self.drops))

    def add(self, other: LegCounters) -> None:
        self.in_packets += other.in_packets
        self.in_bytes += other.in_bytes
        self.out_packets += other.out_packets
        self.out_bytes += other.out_bytes
        for reason, n in other.drops.items():
            self.drops[reason] = self.drops.get(reason, 0) + n

    @property
    def packets(self) -> int:
        return self.in_packets


#: the `base` of a stream never re-installed (shared: a base is replaced, never changed)
_NO_COUNTS = LegCounters()


def _addr(a: Optional[Addr]) -> Optional[Dict[str, Any]]:
    return None if a is None else {"ip": a[0], "port": a[1]}


@dataclass
class Media:
    """One leg's side of one stream: its relay ports and the peer there."""

    relay_ip: str
    relay_port: int  # even; RTCP on relay_port + 1
    kind: str = "audio"
    announced: Optional[Addr] = None  # from SDP
    rtcp_announced: Optional[Addr] = None  # a=rtcp, else announced port + 1
    rtcp_mux: bool = False  # the peer multiplexes RTCP on the RTP port (a=rtcp-mux)
    latched: Optional[Addr] = None  # learned from traffic (reported by the data plane)
    rtcp_latched: Optional[Addr] = None
    counters: LegCounters = field(default_factory=LegCounters)
    # counters of earlier data-plane installs (kept when the stream moves to other ports);
    # never changed in place (replaced), so every new stream shares one zero
    base: LegCounters = field(default_factory=lambda: _NO_COUNTS)

    @property
    def rtcp_port(self) -> int:
        return self.relay_port + 1

    def fold(self) -> None:
        """Freeze the current counters as the base for the next data-plane install."""
        self.base = self.counters.copy()

    def announce(self, offer: StreamOffer) -> None:
        """Record what the peer's SDP says of this stream.

        Old-style hold (c= 0.0.0.0 or ::, RFC 3264 section 8.4) means "send nothing to
        me", not "I moved to 0.0.0.0": the port becomes 0 (nothing is sent to the peer)
        and the peer's previous address stays, so that a strict leg still admits what
        the holder sends (music on hold). Without a previous address it stays null."""
        # unpacked: CPython 3.11 looks NamedTuple fields up by name generically
        ip, port, rtcp_port, rtcp_mux, kind, _keep_ports, rtcp_ip = offer
        if ip in NULL_ADDRESSES:
            previous, previous_rtcp = self.announced, self.rtcp_announced
            if previous is not None:
                ip = previous[0]
            rtcp_ip = previous_rtcp[0] if previous_rtcp is not None else ip
            port = 0
        self.announced = (ip, port)
        rtcp_ip = rtcp_ip or ip
        self.rtcp_announced = (rtcp_ip, 0 if not port else rtcp_port if rtcp_port
                               else (port if rtcp_mux else port + 1))
        self.rtcp_mux = rtcp_mux
        self.kind = kind
        self.latched = None
        self.rtcp_latched = None

    def observe(self, report: LegReport, generation: int) -> None:
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
        if report.generation == generation:
            if report.latched is not None:
                self.latched = report.latched
            if report.rtcp_latched is not None:
                self.rtcp_latched = report.rtcp_latched

    def as_dict(self) -> Dict[str, Any]:
        port = self.relay_port
        announced, latched, rtcp_latched = self.announced, self.latched, self.rtcp_latched
        c = self.counters
        return {  # _addr() and LegCounters.as_dict(), inline: a delete's reply has 2+
            "kind": self.kind,
            "relay": {"ip": self.relay_ip, "port": port,
                      "rtcp_port": port if self.rtcp_mux else port + 1},
            "rtcp_mux": self.rtcp_mux,
            "announced": None if announced is None else {"ip": announced[0],
                                                         "port": announced[1]},
            "latched": None if latched is None else {"ip": latched[0], "port": latched[1]},
            "rtcp_latched": None if rtcp_latched is None else {"ip": rtcp_latched[0],
                                                               "port": rtcp_latched[1]},
            "counters": {"in_packets": c.in_packets, "in_bytes": c.in_bytes,
                         "out_packets": c.out_packets, "out_bytes": c.out_bytes,
                         "drops": dict(c.drops)},
        }


@dataclass
class Leg:
    """One side of a call: its tag, the relay address its peer sends to, and its side of
    every stream (`media[i]` for m= line i; None while that stream is disabled)."""

    name: str
    relay_ip: str
    media: List[Optional[Media]] = field(default_factory=list)
    tag: Optional[str] = None
    latch_any: bool = False
    generation: int = 0  # bumped by every offer/answer that re-latches the leg

    # -- the first stream, for one-stream callers (legacy protocol, older clients) -------
    @property
    def first(self) -> Optional[Media]:
        for m in self.media:
            if m is not None:
                return m
        return None

    @property
    def relay_port(self) -> int:
        m = self.first
        return m.relay_port if m is not None else 0

    @property
    def rtcp_port(self) -> int:
        return self.relay_port + 1

    @property
    def announced(self) -> Optional[Addr]:
        m = self.first
        return m.announced if m is not None else None

    @property
    def rtcp_announced(self) -> Optional[Addr]:
        m = self.first
        return m.rtcp_announced if m is not None else None

    @property
    def latched(self) -> Optional[Addr]:
        m = self.first
        return m.latched if m is not None else None

    @property
    def rtcp_latched(self) -> Optional[Addr]:
        m = self.first
        return m.rtcp_latched if m is not None else None

    @property
    def counters(self) -> LegCounters:
        """Totals over every stream of this leg."""
        total = LegCounters()
        for m in self.media:
            if m is not None:
                total.add(m.counters)
        return total

    # -- changes -------------------------------------------------------------------------
    def fold(self) -> None:
        for m in self.media:
            if m is not None:
                m.fold()

    def relatch(self, latch_any: bool) -> None:
        """A new offer/answer from this leg's peer: every stream latches afresh."""
        self.latch_any = latch_any
        self.generation += 1

    def spec(self, index: int) -> LegSpec:
        m = self.media[index]
        assert m is not None
        return LegSpec(self.name, m.relay_ip, m.relay_port, m.announced, m.rtcp_announced,
                       self.latch_any, self.generation, m.rtcp_mux)

    def observe(self, report: LegReport) -> None:
        """One-stream form of `Session.observe` (stream 0)."""
        m = self.first
        if m is not None:
            m.observe(report, self.generation)

    def as_dict(self) -> Dict[str, Any]:
        media = self.media
        if len(media) == 1 and media[0] is not None:
            # one stream (nearly every call): the leg's fields are that stream's, so the
            # leg shares the stream's dicts instead of building them twice
            d = media[0].as_dict()
            port = media[0].relay_port
            return {
                "tag": self.tag,
                "relay": {"ip": self.relay_ip, "port": port, "rtcp_port": port + 1},
                "announced": d["announced"],
                "latched": d["latched"],
                "rtcp_latched": d["rtcp_latched"],
                "latch_any": self.latch_any,
                "counters": d["counters"],
                "streams": [d],
            }
        # one pass over the streams (a delete's reply has this per leg): the first
        # stream's fields and the totals of `counters`, without the properties' rescans
        first = None
        streams: List[Optional[Dict[str, Any]]] = []
        in_packets = in_bytes = out_packets = out_bytes = 0
        drops: Dict[str, int] = {}
        for m in self.media:
            if m is None:
                streams.append(None)
                continue
            if first is None:
                first = m
            streams.append(m.as_dict())
            c = m.counters
            in_packets += c.in_packets
            in_bytes += c.in_bytes
            out_packets += c.out_packets
            out_bytes += c.out_bytes
            for reason, n in c.drops.items():
                drops[reason] = drops.get(reason, 0) + n
        counters = {"in_packets": in_packets, "in_bytes": in_bytes,
                    "out_packets": out_packets, "out_bytes": out_bytes, "drops": drops}
        if first is None:
            return {"tag": self.tag, "relay": None, "announced": None, "latched": None,
                    "rtcp_latched": None, "latch_any": self.latch_any,
                    "counters": counters, "streams": streams}
        port = first.relay_port
        return {
            "tag": self.tag,
            "relay": {"ip": self.relay_ip, "port": port, "rtcp_port": port + 1},
            "announced": _addr(first.announced),
            "latched": _addr(first.latched),
            "rtcp_latched": _addr(first.rtcp_latched),
            "latch_any": self.latch_any,
            "counters": counters,
            "streams": streams,
        }


@dataclass
class Fork:
    """An early dialog beyond the first (forked INVITE): `a` has relay ports of its own and
    expects the caller (as leg A does); `b` expects this dialog's callee on leg B's relay
    ports, which every forked callee shares. The final answer's dialog wins: its fork is
    promoted into the legs, the others are freed."""

    key: int
    tag: str
    a: Leg
    b: Leg

    def stream_specs(self) -> Tuple[StreamSpec, ...]:
        am, bm = self.a.media, self.b.media
        return tuple([StreamSpec(i, self.a.spec(i), self.b.spec(i))
                      for i in range(min(len(am), len(bm)))
                      if am[i] is not None and bm[i] is not None])

    def as_dict(self) -> Dict[str, Any]:
        return {"tag": self.tag, "legs": {LEG_A: self.a.as_dict(), LEG_B: self.b.as_dict()}}


@dataclass
class Session:
    """A call relayed between leg A (caller) and leg B (callee), stream by stream."""

    sid: int
    call_id: str
    created: float
    timeout: float
    legs: Dict[str, Leg]
    last_media: Optional[float] = None
    state: str = "offered"  # offered -> answered
    via_branch: Optional[str] = None
    timer_at: Optional[float] = None  # the engine's live expiry entry for this session
    origin: str = "msgpack"  # "legacy": made by Kamailio's lrkproxy `S` (set_fixed)
    forks: Dict[str, Fork] = field(default_factory=dict)  # To-tag -> other early dialog
    #: (internal, external) relay addresses of a call taken over from another node: its
    #: later requests keep using that node's addresses; None: the engine's own
    interfaces: Optional[Tuple[str, str]] = None

    def leg_by_tag(self, tag: Optional[str]) -> Optional[Leg]:
        if tag is None:
            return None
        for leg in self.legs.values():
            if leg.tag == tag:
                return leg
        return None

    def idle_since(self) -> float:
        return self.created if self.last_media is None else self.last_media

    def active_streams(self) -> List[int]:
        a, b = self.legs[LEG_A].media, self.legs[LEG_B].media
        return [i for i in range(min(len(a), len(b))) if a[i] is not None and b[i] is not None]

    def spec(self) -> SessionSpec:
        a, b = self.legs[LEG_A], self.legs[LEG_B]
        am, bm = a.media, b.media
        if len(am) == 1 and len(bm) == 1:  # one stream (audio): no index loop, no calls
            ma, mb = am[0], bm[0]
            # tuple.__new__ with every field: the NamedTuples' own __new__ is a Python
            # function (its defaults), and a request builds four of them
            streams: Tuple[StreamSpec, ...] = () if ma is None or mb is None else (
                _new(StreamSpec, (
                    0,
                    _new(LegSpec, (a.name, ma.relay_ip, ma.relay_port, ma.announced,
                                   ma.rtcp_announced, a.latch_any, a.generation, ma.rtcp_mux)),
                    _new(LegSpec, (b.name, mb.relay_ip, mb.relay_port, mb.announced,
                                   mb.rtcp_announced, b.latch_any, b.generation,
                                   mb.rtcp_mux)))),)
        else:
            streams = tuple([StreamSpec(i, a.spec(i), b.spec(i))
                             for i in range(min(len(am), len(bm)))
                             if am[i] is not None and bm[i] is not None])
        if not self.forks:
            return _new(SessionSpec, (self.sid, self.call_id, streams, ()))
        return SessionSpec(self.sid, self.call_id, streams, tuple(
            [ForkSpec(f.key, f.tag, f.stream_specs()) for f in self.forks.values()]))

    def observe(self, report: SessionReport) -> None:
        """Fold a data-plane report (absolute counts since each stream's install)."""
        a, b = self.legs[LEG_A], self.legs[LEG_B]
        for stream in report.streams:
            i = stream.index
            if i < len(a.media) and i < len(b.media):
                ma, mb = a.media[i], b.media[i]
                if ma is not None:
                    ma.observe(stream.a, a.generation)
                if mb is not None:
                    mb.observe(stream.b, b.generation)
        if report.forks:
            by_key = {f.key: f for f in self.forks.values()}
            for key, streams in report.forks:
                fork = by_key.get(key)
                if fork is None:
                    continue  # promoted or freed since
                for stream in streams:
                    i = stream.index
                    for leg, leg_report in ((fork.a, stream.a), (fork.b, stream.b)):
                        m = leg.media[i] if i < len(leg.media) else None
                        if m is not None:
                            m.observe(leg_report, leg.generation)

    def packets(self) -> int:
        return sum(leg.counters.in_packets for leg in self.legs.values())

    def ports(self) -> list:
        """Every relay RTP port of the session, leg A's streams then leg B's."""
        legs = self.legs
        ports = [m.relay_port for m in legs[LEG_A].media if m is not None]
        ports.extend([m.relay_port for m in legs[LEG_B].media if m is not None])
        for fork in self.forks.values():  # their own A-side ports (B's are leg B's)
            ports.extend(m.relay_port for m in fork.a.media if m is not None)
        return ports

    def as_dict(self, now: float) -> Dict[str, Any]:
        out = {
            "call_id": self.call_id,
            "state": self.state,
            "age": round(now - self.created, 3),
            "idle": round(now - self.idle_since(), 3),
            "timeout": self.timeout,
            "media_seen": self.last_media is not None,
        }
        legs: Dict[str, Any] = {}  # in the legs' order, as a comprehension would
        out["legs"] = legs
        for name, leg in self.legs.items():
            legs[name] = leg.as_dict()
        if self.forks:
            out["early_dialogs"] = [fork.as_dict() for fork in self.forks.values()]
        return out

    def summary(self, now: float) -> Dict[str, Any]:
        return {
            "call_id": self.call_id,
            "state": self.state,
            "age": round(now - self.created, 3),
            "idle": round(now - self.idle_since(), 3),
            "ports": self.ports(),
            "packets": self.packets(),
        }
