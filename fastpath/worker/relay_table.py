"""Per-port forwarding state of the socket relay, sans-IO.

One `Endpoint` per relay socket (RTP or RTCP of one leg). A datagram that arrives
on an endpoint is checked against the leg's peer (latching it on first sight) and
goes out of the partner endpoint (same kind, other leg) to that leg's peer.
Tuned for PyPy: slots, plain attributes, no per-packet allocation beyond the
output tuple.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Tuple

from fastpath.contract import Addr, LegReport, LegSpec, SessionReport, SessionSpec

RTP = 0
RTCP = 1

#: drop reasons, in the order of the `drops` list of an endpoint
UNEXPECTED_SOURCE = 0
NO_DESTINATION = 1
SEND_ERROR = 2
DROP_NAMES = ("unexpected_source", "no_destination", "send_error")


class Endpoint:
    """A relay socket and what the relay knows of the peer on its side."""

    __slots__ = (
        "fd", "sid", "leg", "kind", "expected_ip", "latch_any", "peer", "announced",
        "partner", "gen", "in_packets", "in_bytes", "out_packets", "out_bytes", "drops",
        "session",
    )

    def __init__(self, fd: int, sid: int, leg: str, kind: int) -> None:
        self.fd = fd
        self.sid = sid
        self.leg = leg
        self.kind = kind
        self.expected_ip: Optional[str] = None
        self.latch_any = False
        self.peer: Optional[Addr] = None
        self.announced: Optional[Addr] = None
        self.partner: Optional[Endpoint] = None
        self.gen = 0
        self.in_packets = 0
        self.in_bytes = 0
        self.out_packets = 0
        self.out_bytes = 0
        self.drops = [0, 0, 0]
        self.session: Optional[RelaySession] = None

    def configure(self, announced: Optional[Addr], latch_any: bool, gen: int) -> None:
        """A new offer/answer for this leg: new expected peer, forget the latch."""
        self.announced = announced
        self.expected_ip = self.announced[0] if self.announced else None
        self.latch_any = latch_any
        self.peer = None
        self.gen = gen


class RelaySession:
    """The four endpoints of a call in one worker, plus its activity stamp."""

    __slots__ = ("sid", "endpoints", "last_rx", "dirty")

    def __init__(self, sid: int, endpoints: List[Endpoint]) -> None:
        self.sid = sid
        self.endpoints = endpoints  # A-RTP, A-RTCP, B-RTP, B-RTCP
        self.last_rx: Optional[float] = None
        self.dirty = True
        for ep in endpoints:
            ep.session = self
        a_rtp, a_rtcp, b_rtp, b_rtcp = endpoints
        a_rtp.partner, b_rtp.partner = b_rtp, a_rtp
        a_rtcp.partner, b_rtcp.partner = b_rtcp, a_rtcp

    def report(self) -> SessionReport:
        eps = self.endpoints
        return SessionReport(self.sid, self.last_rx, _leg_report(eps[0], eps[1]),
                             _leg_report(eps[2], eps[3]))


def _leg_report(rtp: Endpoint, rtcp: Endpoint) -> LegReport:
    drops = tuple((reason, rtp.drops[i] + rtcp.drops[i]) for i, reason in enumerate(DROP_NAMES)
                  if rtp.drops[i] + rtcp.drops[i])
    return LegReport(rtp.in_packets + rtcp.in_packets, rtp.in_bytes + rtcp.in_bytes,
                     rtp.out_packets + rtcp.out_packets, rtp.out_bytes + rtcp.out_bytes,
                     drops, rtp.gen, rtp.peer, rtcp.peer)


class RelayTable:
    """All endpoints of one worker, keyed by socket fd."""

    def __init__(self) -> None:
        self.by_fd: Dict[int, Endpoint] = {}
        self.sessions: Dict[int, RelaySession] = {}
        self.forwarded_packets = 0
        self.forwarded_bytes = 0
        self.dropped = [0, 0, 0]
        self.latched = 0

    def install(self, sid: int, fds: List[int], spec: SessionSpec) -> RelaySession:
        """`fds` in order A-RTP, A-RTCP, B-RTP, B-RTCP."""
        eps = [
            Endpoint(fds[0], sid, "A", RTP), Endpoint(fds[1], sid, "A", RTCP),
            Endpoint(fds[2], sid, "B", RTP), Endpoint(fds[3], sid, "B", RTCP),
        ]
        session = RelaySession(sid, eps)
        self.sessions[sid] = session
        for ep in eps:
            self.by_fd[ep.fd] = ep
        self.update(sid, spec.a)
        self.update(sid, spec.b)
        return session

    def update(self, sid: int, leg: LegSpec) -> None:
        session = self.sessions.get(sid)
        if session is None:
            return
        base = 0 if leg.name == "A" else 2
        session.endpoints[base].configure(leg.announced, leg.latch_any, leg.generation)
        session.endpoints[base + 1].configure(leg.rtcp_announced, leg.latch_any, leg.generation)
        session.dirty = True

    def remove(self, sid: int) -> Optional[RelaySession]:
        session = self.sessions.pop(sid, None)
        if session is not None:
            for ep in session.endpoints:
                self.by_fd.pop(ep.fd, None)
        return session

    def forward(
        self, ep: Endpoint, packets: List[Tuple[bytes, Addr]], now: float
    ) -> Tuple[Optional[Endpoint], List[Tuple[bytes, Addr]]]:
        """Decide a batch received on `ep`: returns the endpoint to send from and what to send."""
        out: List[Tuple[bytes, Addr]] = []
        peer = ep.peer
        partner = ep.partner
        dest = partner.peer or partner.announced  # type: ignore[union-attr]
        if dest is not None and dest[1] == 0:
            dest = None  # port 0: stream disabled / on hold
        accepted = 0
        nbytes = 0
        for data, src in packets:
            if peer is None:
                if ep.latch_any or src[0] == ep.expected_ip:
                    ep.peer = peer = src
                    self.latched += 1
                else:
                    ep.drops[UNEXPECTED_SOURCE] += 1
                    self.dropped[UNEXPECTED_SOURCE] += 1
                    continue
            elif src != peer:
                ep.drops[UNEXPECTED_SOURCE] += 1
                self.dropped[UNEXPECTED_SOURCE] += 1
                continue
            accepted += 1
            nbytes += len(data)
            if dest is None:
                ep.drops[NO_DESTINATION] += 1
                self.dropped[NO_DESTINATION] += 1
                continue
            out.append((data, dest))
        session = ep.session
        session.dirty = True  # type: ignore[union-attr]
        if accepted:
            ep.in_packets += accepted
            ep.in_bytes += nbytes
            session.last_rx = now  # type: ignore[union-attr]
        return (partner if out else None), out

    def sent(self, ep: Endpoint, out: List[Tuple[bytes, Addr]], sent: int) -> None:
        """Account a send batch from `ep` of which `sent` datagrams left."""
        nbytes = 0
        for i in range(sent):
            nbytes += len(out[i][0])
        ep.out_packets += sent
        ep.out_bytes += nbytes
        self.forwarded_packets += sent
        self.forwarded_bytes += nbytes
        failed = len(out) - sent
        if failed:
            src = ep.partner
            src.drops[SEND_ERROR] += failed  # type: ignore[union-attr]
            self.dropped[SEND_ERROR] += failed

    def totals(self) -> Dict[str, int]:
        totals = {
            "media.forwarded.packets": self.forwarded_packets,
            "media.forwarded.bytes": self.forwarded_bytes,
            "media.latched": self.latched,
        }
        for i, reason in enumerate(DROP_NAMES):
            totals[f"media.dropped.{reason}"] = self.dropped[i]
        return totals
