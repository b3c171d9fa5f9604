"""Sessions as records a store keeps: plain dicts of str/int/float/None/list, so any
store (SQLite, Redis) can hold them as msgpack bytes. Sans-IO.

A record holds everything needed to rebuild a session in another process: Call-ID,
tags, legs, every stream's relay address and port, announced and latched peers, the
early dialogs of a forked INVITE, timers and counters. Times are wall-clock (Unix)
seconds, because the monotonic clock of the process that wrote a record means nothing
to the one that reads it; `restore` turns them back into the reader's monotonic time.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple

from lrk.core.session import Fork, Leg, LegCounters, Media, Session

#: the record layout; a reader refuses records of a newer version
RECORD_VERSION = 1

Record = Dict[str, Any]


class RecordError(ValueError):
    """A stored record that cannot be turned back into a session (named in the message)."""


def _addr(a: Any) -> Optional[List[Any]]:
    return None if a is None else [a[0], a[1]]


def _counters(c: LegCounters) -> List[Any]:
    return [c.in_packets, c.in_bytes, c.out_packets, c.out_bytes, dict(c.drops)]


def _media(m: Optional[Media]) -> Optional[Record]:
    if m is None:
        return None
    return {"ip": m.relay_ip, "port": m.relay_port, "kind": m.kind,
            "announced": _addr(m.announced), "rtcp_announced": _addr(m.rtcp_announced),
            "rtcp_mux": m.rtcp_mux, "latched": _addr(m.latched),
            "rtcp_latched": _addr(m.rtcp_latched), "counters": _counters(m.counters)}


def _leg(leg: Leg) -> Record:
    return {"name": leg.name, "ip": leg.relay_ip, "tag": leg.tag, "latch_any": leg.latch_any,
            "generation": leg.generation, "media": [_media(m) for m in leg.media]}


def to_record(session: Session, now: float, wall: float, owner: Optional[str] = None,
              interfaces: Optional[Tuple[str, str]] = None) -> Record:
    """`session` as a record; `now` (monotonic) and `wall` (Unix) are the same instant.
    `interfaces`: the writer's (internal, external) relay addresses, which a node that
    takes the call over keeps using for it (unless the session has its own)."""
    pinned = session.interfaces or interfaces
    def to_wall(t: Optional[float]) -> Optional[float]:
        return None if t is None else wall - (now - t)

    return {
        "v": RECORD_VERSION, "sid": session.sid, "call_id": session.call_id,
        "created": to_wall(session.created), "last_media": to_wall(session.last_media),
        "timeout": session.timeout, "state": session.state, "via_branch": session.via_branch,
        "origin": session.origin, "owner": owner,
        "interfaces": None if pinned is None else [pinned[0], pinned[1]],
        "legs": [_leg(session.legs["A"]), _leg(session.legs["B"])],
        "forks": [{"key": f.key, "tag": f.tag, "a": _leg(f.a), "b": _leg(f.b)}
                  for f in session.forks.values()],
    }


# -- back --------------------------------------------------------------------------------

def _peer(value: Any, what: str) -> Optional[tuple]:
    if value is None:
        return None
    if not isinstance(value, (list, tuple)) or len(value) != 2 \
            or not isinstance(value[0], str) or not isinstance(value[1], int):
        raise RecordError(f"{what} must be [ip, port], not {value!r}")
    return (value[0], value[1])


def _media_back(rec: Any, what: str) -> Optional[Media]:
    if rec is None:
        return None
    try:
        m = Media(rec["ip"], int(rec["port"]), rec["kind"],
                  _peer(rec["announced"], f"{what}.announced"),
                  _peer(rec["rtcp_announced"], f"{what}.rtcp_announced"),
                  bool(rec["rtcp_mux"]), _peer(rec["latched"], f"{what}.latched"),
                  _peer(rec["rtcp_latched"], f"{what}.rtcp_latched"))
        c = rec["counters"]
        counters = LegCounters(int(c[0]), int(c[1]), int(c[2]), int(c[3]),
                               {str(k): int(v) for k, v in dict(c[4]).items()})
    except (KeyError, TypeError, ValueError, IndexError) as exc:
        raise RecordError(f"{what}: {type(exc).__name__}: {exc}") from None
    # a new data-plane install counts from zero: what was counted so far is the base
    m.base = counters
    m.counters = counters.copy()
    return m


def _leg_back(rec: Any, what: str) -> Leg:
    try:
        leg = Leg(rec["name"], rec["ip"], tag=rec["tag"], latch_any=bool(rec["latch_any"]),
                  generation=int(rec["generation"]))
        leg.media = [_media_back(m, f"{what}.media[{i}]") for i, m in enumerate(rec["media"])]
    except (KeyError, TypeError, ValueError) as exc:
        raise RecordError(f"{what}: {type(exc).__name__}: {exc}") from None
    return leg


def from_record(rec: Any, now: float, wall: float) -> Session:
    """The session a record describes, its times on this process's monotonic clock
    (`now` and `wall` being the same instant). RecordError when it cannot be read."""
    if not isinstance(rec, dict):
        raise RecordError(f"a session record must be a map, not {type(rec).__name__}")
    version = rec.get("v")
    if version != RECORD_VERSION:
        raise RecordError(f"session record version {version!r}; this relay reads "
                          f"{RECORD_VERSION}")

    def to_now(t: Any) -> Optional[float]:
        return None if t is None else now - (wall - float(t))

    try:
        legs = [_leg_back(leg, f"legs[{i}]") for i, leg in enumerate(rec["legs"])]
        if [leg.name for leg in legs] != ["A", "B"]:
            raise RecordError("a session record needs legs A and B")
        session = Session(
            sid=int(rec["sid"]), call_id=str(rec["call_id"]),
            created=to_now(rec["created"]),  # type: ignore[arg-type]
            timeout=float(rec["timeout"]), legs={"A": legs[0], "B": legs[1]},
            last_media=to_now(rec["last_media"]), state=str(rec["state"]),
            via_branch=rec["via_branch"], origin=str(rec["origin"]),
        )
        for i, f in enumerate(rec["forks"]):
            fork = Fork(int(f["key"]), str(f["tag"]), _leg_back(f["a"], f"forks[{i}].a"),
                        _leg_back(f["b"], f"forks[{i}].b"))
            session.forks[fork.tag] = fork
        pinned = rec.get("interfaces")
        if pinned is not None:
            if not (isinstance(pinned, list) and len(pinned) == 2
                    and all(isinstance(ip, str) for ip in pinned)):
                raise RecordError(f"interfaces must be [internal, external], not {pinned!r}")
            session.interfaces = (pinned[0], pinned[1])
    except RecordError:
        raise
    except (KeyError, TypeError, ValueError) as exc:
        raise RecordError(f"session record: {type(exc).__name__}: {exc}") from None
    return session


def owner_of(rec: Record) -> Optional[str]:
    """The control key's owner that created the session (None: legacy or no auth)."""
    owner = rec.get("owner")
    return owner if isinstance(owner, str) else None


__all__ = ["RECORD_VERSION", "Record", "RecordError", "from_record", "owner_of", "to_record"]
