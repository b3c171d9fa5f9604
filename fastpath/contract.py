"""The data-plane contract: what the engine tells a data plane, and what comes back.

One vocabulary for every mode (socket, packet, kernel, nfqueue) and both processes
(daemon and worker): small immutable records. The engine owns sessions and sends
*actions* carrying immutable snapshots (`SessionSpec`); a plane owns only what it
observed (counters, latched peers, failures) and sends it back as *reports* and
*events*; it never writes engine state. `DataPlane` is the interface each mode's
adapter implements (`lrk/daemon/*_plane.py`).

The records built once per request or per report (specs, reports and the actions) are
NamedTuples: as immutable as frozen dataclasses, but built by tuple.__new__ and compared
in C, which on CPython made a session's spec about four times cheaper to build
(docs/benchmarks.md). Actions are dispatched by type (isinstance), never as tuples.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple, Union

try:  # Python 3.8+: typing.Protocol
    from typing import Protocol
except ImportError:  # pragma: no cover
    Protocol = object  # type: ignore[assignment,misc]

Addr = Tuple[str, int]

LEG_A = "A"  # caller side: the caller sends to leg A's relay port
LEG_B = "B"  # callee side: the callee sends to leg B's relay port
LEGS = (LEG_A, LEG_B)

#: drop reasons a packet can meet in a data plane; every one is a counter
DROP_REASONS = ("unexpected_source", "no_destination", "send_error")


# -- engine -> plane ---------------------------------------------------------------------
#: relayed streams (m= lines) per session: a unit id packs (session id, stream index)
MAX_STREAMS = 16


def unit_id(sid: int, index: int) -> int:
    """The data plane's key of one stream of one session (socket worker, kernel state)."""
    return sid * MAX_STREAMS + index


def unit_of(uid: int) -> Tuple[int, int]:
    """(session id, stream index) of a unit id."""
    return divmod(uid, MAX_STREAMS)


class LegSpec(NamedTuple):
    """One leg's side of one stream, as a data plane must serve it: where the peer sends,
    who that peer is."""

    name: str
    relay_ip: str
    relay_port: int  # even; RTCP on relay_port + 1 (unused while rtcp_mux)
    announced: Optional[Addr] = None  # from SDP; port 0: on hold / disabled
    rtcp_announced: Optional[Addr] = None
    latch_any: bool = False  # accept the first source from any address (NAT learning)
    generation: int = 0  # bumped by every offer/answer that makes the leg latch afresh
    rtcp_mux: bool = False  # this leg's peer sends and takes RTCP on the RTP port

    @property
    def rtcp_port(self) -> int:
        return self.relay_port + 1


class StreamSpec(NamedTuple):
    """One relayed stream (m= line `index` of the SDP) on both legs."""

    index: int
    a: LegSpec
    b: LegSpec

    def leg(self, name: str) -> LegSpec:
        return self.a if name == LEG_A else self.b


class ForkSpec(NamedTuple):
    """An early dialog beyond the first (a forked INVITE: another callee's 183 with SDP,
    another To-tag). Its A side has relay ports of its own (the caller got them in that
    183) and expects the caller; its B side shares the session's leg B relay ports (every
    forked callee sends where the one offer told it to) and expects that callee, so a
    plane tells the callees apart by source address. `key` (1..MAX_FORKS) is unique
    within the session."""

    key: int
    tag: str
    streams: Tuple[StreamSpec, ...]


#: early dialogs per session beyond the first (forked INVITEs)
MAX_FORKS = 8


class SessionSpec(NamedTuple):
    """A session as a data plane must serve it (a snapshot: the engine's own state moves
    on). Disabled streams (port 0) are absent; `streams` keeps SDP order. `forks`: the
    other early dialogs while the call is not yet answered (see ForkSpec)."""

    sid: int
    call_id: str
    streams: Tuple[StreamSpec, ...]
    forks: Tuple[ForkSpec, ...] = ()

    def stream(self, index: int) -> Optional[StreamSpec]:
        for stream in self.streams:
            if stream.index == index:
                return stream
        return None

    @property
    def a(self) -> LegSpec:
        """Leg A of the first stream (one-stream callers: the legacy protocol, tests)."""
        return self.streams[0].a

    @property
    def b(self) -> LegSpec:
        return self.streams[0].b

    def leg(self, name: str) -> LegSpec:
        return self.a if name == LEG_A else self.b


class Install(NamedTuple):
    """Start relaying a session: bind or open its four ports, write its kernel state."""

    spec: SessionSpec

    @property
    def sid(self) -> int:
        return self.spec.sid


class Update(NamedTuple):
    """The session changed (new offer/answer): `spec` is the whole session as it now is;
    the plane diffs it per stream against what it holds (streams added, removed, moved
    to other relay ports, re-latched). `leg` names the leg that latches afresh."""

    spec: SessionSpec
    leg: str

    @property
    def sid(self) -> int:
        return self.spec.sid


class Remove(NamedTuple):
    """Stop relaying a session and release everything the plane holds for it."""

    sid: int
    call_id: str
    reason: str


Action = Union[Install, Update, Remove]


# -- plane -> engine ---------------------------------------------------------------------
class LegReport(NamedTuple):
    """What a plane observed on one leg since the session was installed there (absolute
    counts, so a lost report loses nothing). `generation` is the leg generation the
    latches belong to (-1: the plane has no latch to report)."""

    in_packets: int = 0
    in_bytes: int = 0
    out_packets: int = 0
    out_bytes: int = 0
    drops: Tuple[Tuple[str, int], ...] = ()
    generation: int = -1
    latched: Optional[Addr] = None
    rtcp_latched: Optional[Addr] = None


class StreamReport(NamedTuple):
    """What a plane observed on one stream, per leg."""

    index: int
    a: LegReport
    b: LegReport


class SessionReport(NamedTuple):
    """Counters and latches of one session's streams; `last_rx` is the monotonic time
    media last arrived on any of them (None: none seen since install)."""

    sid: int
    last_rx: Optional[float]
    streams: Tuple[StreamReport, ...]
    forks: Tuple[Tuple[int, Tuple[StreamReport, ...]], ...] = ()  # (ForkSpec.key, streams)

    @property
    def a(self) -> LegReport:
        """Leg A of the first stream reported (one-stream callers)."""
        return self.streams[0].a if self.streams else LegReport()

    @property
    def b(self) -> LegReport:
        return self.streams[0].b if self.streams else LegReport()


@dataclass(frozen=True)
class PlaneFailure:
    """The plane could not do what an action asked, or lost what it had done (a bind
    that failed, an nft or netlink error, a worker that died and could not re-install).
    The engine ends the session; a pending reply becomes an error."""

    sid: int
    reason: str  # bind_failed | kernel_error | worker_lost | channel_error
    detail: str


Event = Union[SessionReport, PlaneFailure]
EventSink = Callable[[Event], None]


class DataPlane(Protocol):
    """What every mode implements. The relay calls these from its event loop only.

    - `apply` performs or queues actions; failures it can see at once come back as the
      returned list (and are not also sent to the sink).
    - `commit(then)` calls `then` once every action applied so far is in effect in the
      data plane (socket mode: written to the worker channel); replies wait for it.
    - `refresh(then)` calls `then` once every report of current counters has reached
      the sink (or after the plane's own bounded timeout, counted).
    - `get_timer`/`handle_timer` schedule the plane's own work (kernel counter polls).
    """

    sink: EventSink

    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    def apply(self, actions: Sequence[Action]) -> List[PlaneFailure]: ...

    def commit(self, then: Callable[[], None]) -> None: ...

    def refresh(self, then: Callable[[], None]) -> None: ...

    def get_timer(self) -> Optional[float]: ...

    def handle_timer(self, now: float) -> None: ...

    def media_counters(self) -> Dict[str, int]: ...


def drops_dict(drops: Tuple[Tuple[str, int], ...]) -> Dict[str, int]:
    return dict(drops)


__all__ = [
    "Action", "Addr", "DROP_REASONS", "DataPlane", "Event", "EventSink", "ForkSpec", "Install",
    "LEGS", "LEG_A", "LEG_B", "LegReport", "LegSpec", "MAX_FORKS", "MAX_STREAMS",
    "PlaneFailure", "Remove",
    "SessionReport", "SessionSpec", "StreamReport", "StreamSpec", "Update", "drops_dict",
    "unit_id", "unit_of",
]
