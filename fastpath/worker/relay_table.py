"""Per-port forwarding state of the socket relay, sans-IO.

One `RelaySession` per relayed stream (a data-plane *unit*: one m= line of one call),
one `Endpoint` per relay socket (RTP or RTCP of one leg). A datagram that arrives on
an endpoint is checked against the leg's peer (latching it on first sight) and goes
out of the partner endpoint (same kind, other leg) to that leg's peer. rtcp-mux: a
leg whose peer multiplexes RTCP on the RTP port takes and sends both there; when only
one leg multiplexes, its RTP endpoint tells RTCP from RTP by payload type (RFC 5761)
and hands RTCP to the other leg's RTCP endpoint, and back.
Forked INVITEs: an early dialog beyond the first is a *fork* unit whose A endpoints have
sockets of their own and whose B endpoints share the main unit's B sockets (every forked
callee sends where the one offer said); what arrives there is handed to the endpoint
whose peer sent it (`forward_split`). `promote` makes a fork the main unit when its
dialog wins.
Tuned for PyPy: slots, plain attributes, no per-packet allocation beyond the
output tuple.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Tuple

from fastpath.contract import Addr, LegReport, LegSpec, StreamSpec

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
        "session", "mux", "demux", "rtcp_partner", "spec", "last", "sibling", "rtcp_addr",
        "forks", "split",
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
        self.mux = False  # this leg's peer sends RTCP on the RTP port
        self.demux = False  # mux here, not on the other leg: split RTCP off by type
        self.rtcp_partner: Optional[Endpoint] = None  # where split-off RTCP leaves
        self.spec: Optional[LegSpec] = None
        self.last = 0.0  # when the latched peer last sent (NAT re-learning after silence)
        self.sibling: Optional[Endpoint] = None  # RTCP: this leg's RTP endpoint
        self.rtcp_addr: Optional[Addr] = None  # RTCP: the announced RTCP address, exactly
        self.forks: List[Endpoint] = []  # fork endpoints sharing this socket (leg B only)
        self.split = False  # demux or forks: a batch may leave from several endpoints

    def configure(self, announced: Optional[Addr], latch_any: bool, gen: int) -> None:
        """A new offer/answer for this leg: new expected peer, forget the latch."""
        self.rtcp_addr = announced if self.kind == RTCP else None
        self.announced = announced
        self.expected_ip = self.announced[0] if self.announced else None
        self.latch_any = latch_any
        self.peer = None
        self.gen = gen


def is_rtcp(data: bytes) -> bool:
    """RFC 5761: RTCP packet types 192-223 sit where RTP has marker + payload type."""
    return len(data) > 1 and 192 <= data[1] <= 223


class RelaySession:
    """The four endpoints of one stream (unit) in one worker, plus its activity stamp."""

    __slots__ = ("sid", "endpoints", "last_rx", "dirty", "main", "forks")

    def __init__(self, sid: int, endpoints: List[Endpoint], main: Optional[int] = None) -> None:
        self.sid = sid
        self.endpoints = endpoints  # A-RTP, A-RTCP, B-RTP, B-RTCP
        self.last_rx: Optional[float] = None
        #: counters or latches the daemon has not seen; a new unit has none to tell (the
        #: daemon starts a stream at zero, unlatched), so it is not reported before media
        self.dirty = False
        self.main = main  # a fork: the unit whose B sockets it shares
        self.forks: List[int] = []  # a main unit: its forks' unit ids
        for ep in endpoints:
            ep.session = self
        endpoints[1].sibling, endpoints[3].sibling = endpoints[0], endpoints[2]
        a_rtp, a_rtcp, b_rtp, b_rtcp = endpoints
        self.wire()

    def wire(self) -> None:
        """Partners by each leg's rtcp-mux: RTCP of a muxed leg travels on its RTP socket."""
        a_rtp, a_rtcp, b_rtp, b_rtcp = self.endpoints
        a_rtp.partner, b_rtp.partner = b_rtp, a_rtp
        # what arrives on an RTCP socket leaves where the other leg's peer takes RTCP
        a_rtcp.partner = b_rtp if b_rtp.mux else b_rtcp
        b_rtcp.partner = a_rtp if a_rtp.mux else a_rtcp
        for rtp, other_rtp, other_rtcp in ((a_rtp, b_rtp, b_rtcp), (b_rtp, a_rtp, a_rtcp)):
            rtp.demux = rtp.mux and not other_rtp.mux
            rtp.rtcp_partner = other_rtcp if rtp.demux else None
        for ep in self.endpoints:
            ep.split = ep.demux or bool(ep.forks)

    def owned(self) -> List[Endpoint]:
        """The endpoints whose sockets this unit owns (a fork shares B's)."""
        return self.endpoints if self.main is None else self.endpoints[:2]

    def report(self) -> tuple:
        """(unit id, last_rx, leg A, leg B) in wire form: each leg a plain tuple with
        LegReport's fields in order (`channel.encode_reports`)."""
        eps = self.endpoints
        return (self.sid, self.last_rx, _leg_report(eps[0], eps[1]),
                _leg_report(eps[2], eps[3]))


def _leg_report(rtp: Endpoint, rtcp: Endpoint) -> tuple:
    a, b = rtp.drops, rtcp.drops
    if a[0] or a[1] or a[2] or b[0] or b[1] or b[2]:
        drops = tuple([(reason, a[i] + b[i]) for i, reason in enumerate(DROP_NAMES)
                       if a[i] + b[i]])
    else:
        drops = ()
    return (rtp.in_packets + rtcp.in_packets, rtp.in_bytes + rtcp.in_bytes,
            rtp.out_packets + rtcp.out_packets, rtp.out_bytes + rtcp.out_bytes,
            drops, rtp.gen, rtp.peer, rtcp.peer)


def leg_report(rtp: Endpoint, rtcp: Endpoint) -> LegReport:
    """One leg's counters and latches as the contract's LegReport."""
    return LegReport._make(_leg_report(rtp, rtcp))


class RelayTable:
    """All endpoints of one worker, keyed by socket fd."""

    def __init__(self, relearn_after: float = 3.0) -> None:
        self.by_fd: Dict[int, Endpoint] = {}
        self.sessions: Dict[int, RelaySession] = {}
        self.forwarded_packets = 0
        self.forwarded_bytes = 0
        self.dropped = [0, 0, 0]
        self.latched = 0
        self.latched_announced = 0  # first packet came from the SDP's address
        self.latched_learned = 0  # ... from elsewhere (NAT), allowed unless strict_source
        self.relatched = 0  # a new source after the latched peer fell silent
        #: a learning leg's latched peer may be replaced by another source once it has
        #: been silent this long (a phone whose NAT binding changed); never while it talks
        self.relearn_after = relearn_after

    def install(self, sid: int, fds: List[int], spec: StreamSpec) -> RelaySession:
        """`fds` in order A-RTP, A-RTCP, B-RTP, B-RTCP; `sid` is the unit id."""
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
        """A leg's spec as the engine now has it; the leg latches afresh only if it
        changed (an update of the other leg keeps this one's latch)."""
        session = self.sessions.get(sid)
        if session is None:
            return
        base = 0 if leg.name == "A" else 2
        rtp, rtcp = session.endpoints[base], session.endpoints[base + 1]
        if rtp.spec == leg:
            return
        rtp.spec = leg
        rtp.configure(leg.announced, leg.latch_any, leg.generation)
        rtcp.configure(leg.rtcp_announced, leg.latch_any, leg.generation)
        rtp.mux = leg.rtcp_mux
        session.wire()
        # not dirty: a forgotten latch is nothing to report (the engine forgot it with
        # the offer or answer that made this spec; a report carries no latch to clear)

    def install_fork(self, uid: int, main_uid: int, fds: List[int], spec: StreamSpec
                     ) -> RelaySession:
        """Another early dialog of `main_uid`'s stream: `fds` are its A-RTP and A-RTCP
        sockets; its B endpoints share the main unit's B sockets."""
        main = self.sessions.get(main_uid)
        if main is None:
            raise ValueError(f"fork {uid} of unit {main_uid}, which is not installed")
        if len(fds) != 2:
            raise ValueError(f"fork install of {uid} carries {len(fds)} fds, not 2")
        b_rtp, b_rtcp = main.endpoints[2], main.endpoints[3]
        eps = [
            Endpoint(fds[0], uid, "A", RTP), Endpoint(fds[1], uid, "A", RTCP),
            Endpoint(b_rtp.fd, uid, "B", RTP), Endpoint(b_rtcp.fd, uid, "B", RTCP),
        ]
        session = RelaySession(uid, eps, main=main_uid)
        self.sessions[uid] = session
        self.by_fd[fds[0]], self.by_fd[fds[1]] = eps[0], eps[1]
        b_rtp.forks.append(eps[2])
        b_rtcp.forks.append(eps[3])
        main.forks.append(uid)
        main.wire()
        self.update(uid, spec.a)
        self.update(uid, spec.b)
        return session

    def promote(self, main_uid: int, fork_uid: int) -> List[int]:
        """The fork's dialog won: its A endpoints (sockets, counters, latches) replace the
        main unit's; returns the fds of the main unit's old A sockets, to close."""
        main = self.sessions.get(main_uid)
        fork = self.sessions.get(fork_uid)
        if main is None or fork is None or fork.main != main_uid:
            raise ValueError(f"cannot promote {fork_uid} into {main_uid}: not its fork")
        self._unlink_fork(fork)
        del self.sessions[fork_uid]
        old = main.endpoints[:2]
        for ep in old:
            self.by_fd.pop(ep.fd, None)
        for ep in fork.endpoints[:2]:
            ep.sid = main_uid
            ep.session = main
        main.endpoints[0], main.endpoints[1] = fork.endpoints[0], fork.endpoints[1]
        main.endpoints[1].sibling = main.endpoints[0]
        main.wire()
        main.dirty = True
        return [ep.fd for ep in old]

    def _unlink_fork(self, fork: RelaySession) -> None:
        main = self.sessions.get(fork.main)  # type: ignore[arg-type]
        if main is None:
            return
        for i in (2, 3):
            shared = main.endpoints[i]
            shared.forks = [f for f in shared.forks if f is not fork.endpoints[i]]
        main.forks = [uid for uid in main.forks if uid != fork.sid]
        main.wire()

    def remove(self, sid: int) -> Optional[RelaySession]:
        """Forget a unit (a main unit's forks must be removed first: the worker does)."""
        session = self.sessions.pop(sid, None)
        if session is not None:
            if session.main is not None:
                self._unlink_fork(session)
            for ep in session.owned():
                self.by_fd.pop(ep.fd, None)
        return session

    def forward_split(
        self, ep: Endpoint, packets: List[Tuple[bytes, Addr]], now: float
    ) -> List[Tuple[Optional[Endpoint], List[Tuple[bytes, Addr]]]]:
        """A batch on an endpoint with forks (shared by several callees) or with demux:
        each packet goes to the endpoint whose peer sent it, then as `forward` (or
        `forward_demux`) decides. Returns (endpoint, packets) per destination."""
        if not ep.forks:
            return self.forward_demux(ep, packets, now)
        groups: Dict[Endpoint, List[Tuple[bytes, Addr]]] = {}
        for pkt in packets:
            target = self._fork_of(ep, pkt[1])
            group = groups.get(target)
            if group is None:
                groups[target] = [pkt]
            else:
                group.append(pkt)
        done: List[Tuple[Optional[Endpoint], List[Tuple[bytes, Addr]]]] = []
        for target, group in groups.items():
            if target.demux:
                done.extend(self.forward_demux(target, group, now))
            else:
                done.append(self.forward(target, group, now))
        return done

    @staticmethod
    def _fork_of(ep: Endpoint, src: Addr) -> Endpoint:
        """Which dialog a packet on a shared socket belongs to: the one latched to its
        source; else the not yet latched one whose callee announced exactly that address,
        then that IP (for RTCP: the IP its RTP latched to); else the main dialog, which
        admits or drops it by its own rule."""
        if ep.peer == src:
            return ep
        forks = ep.forks
        for fork in forks:
            if fork.peer == src:
                return fork
        if ep.peer is None and src == ep.announced:
            return ep
        for fork in forks:
            if fork.peer is None and src == fork.announced:
                return fork
        for fork in forks:
            if fork.peer is not None:
                continue
            if fork.kind == RTCP:
                rtp_peer = fork.sibling.peer if fork.sibling is not None else None
                if rtp_peer is not None and rtp_peer[0] == src[0]:
                    return fork
            elif src[0] == fork.expected_ip:
                return fork
        return ep

    def forward_demux(
        self, ep: Endpoint, packets: List[Tuple[bytes, Addr]], now: float
    ) -> List[Tuple[Optional[Endpoint], List[Tuple[bytes, Addr]]]]:
        """A batch on a muxed RTP endpoint whose other leg does not mux: RTP and RTCP
        leave from different sockets. Returns (endpoint, packets) per destination."""
        rtp = [p for p in packets if not is_rtcp(p[0])]
        rtcp = [p for p in packets if is_rtcp(p[0])]
        done = []
        if rtp:
            done.append(self.forward(ep, rtp, now))
        if rtcp:
            done.append(self.forward(ep, rtcp, now, ep.rtcp_partner))
        return done

    def forward(
        self, ep: Endpoint, packets: List[Tuple[bytes, Addr]], now: float,
        partner: Optional[Endpoint] = None,
    ) -> Tuple[Optional[Endpoint], List[Tuple[bytes, Addr]]]:
        """Decide a batch received on `ep`: returns the endpoint to send from and what to send."""
        out: List[Tuple[bytes, Addr]] = []
        peer = ep.peer
        if partner is None:
            partner = ep.partner
        dest = partner.peer or partner.announced  # type: ignore[union-attr]
        if dest is not None and dest[1] == 0:
            dest = None  # port 0: stream disabled / on hold
        accepted = 0
        nbytes = 0
        for data, src in packets:
            if peer is None or src != peer:
                if not self._admit(ep, src, now):
                    ep.drops[UNEXPECTED_SOURCE] += 1
                    self.dropped[UNEXPECTED_SOURCE] += 1
                    continue
                peer = src
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
            ep.last = now
            ep.in_packets += accepted
            ep.in_bytes += nbytes
            session.last_rx = now  # type: ignore[union-attr]
        return (partner if out else None), out

    def forward_one(self, ep: Endpoint, data: bytes, src: Addr, now: float) -> Optional[Addr]:
        """`forward` for one packet on an endpoint that is not split: where it goes (it
        leaves from ``ep.partner``), or None when it is dropped (counted). Packet mode's
        readers call this per packet: at call rates consecutive packets seldom share an
        endpoint, and a function without a loop is one PyPy's JIT inlines into the
        reader's loop (a batch of one through `forward` costs a frame and a list)."""
        session = ep.session
        session.dirty = True  # type: ignore[union-attr]  # drops are news too
        if src != ep.peer and not self._admit(ep, src, now):
            ep.drops[UNEXPECTED_SOURCE] += 1
            self.dropped[UNEXPECTED_SOURCE] += 1
            return None
        ep.last = now
        ep.in_packets += 1
        ep.in_bytes += len(data)
        session.last_rx = now  # type: ignore[union-attr]
        partner = ep.partner
        dest = partner.peer or partner.announced  # type: ignore[union-attr]
        if dest is None or dest[1] == 0:  # port 0: stream disabled / on hold
            ep.drops[NO_DESTINATION] += 1
            self.dropped[NO_DESTINATION] += 1
            return None
        return dest

    def _admit(self, ep: Endpoint, src: Addr, now: float) -> bool:
        """Whether `src` may become the endpoint's peer (it then is).

        RTP: the first source from the announced IP; from any address on a learning leg
        (`latch_any`: the default, unless strict_source), where a latched peer is also
        replaced by a new source once it has been silent `relearn_after` seconds.
        RTCP: only the exact announced RTCP address, or the IP its leg's RTP latched to
        (so no stranger can take RTCP before the phone's RTP arrives)."""
        if ep.peer is not None and (not ep.latch_any or now - ep.last < self.relearn_after):
            return False
        if ep.kind == RTCP:
            rtp_peer = ep.sibling.peer if ep.sibling is not None else None
            if src != ep.rtcp_addr and (rtp_peer is None or rtp_peer[0] != src[0]):
                return False
            learned = False
        elif src[0] == ep.expected_ip:
            learned = False
        elif ep.latch_any:
            learned = True
        else:
            return False
        if ep.peer is not None:
            self.relatched += 1
        elif learned:
            self.latched_learned += 1
        else:
            self.latched_announced += 1
        self.latched += 1
        ep.peer = src
        return True

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

    def sent_one(self, ep: Endpoint, nbytes: int) -> None:
        """Account one datagram of `nbytes` sent from `ep` (`sent`, loop-free)."""
        ep.out_packets += 1
        ep.out_bytes += nbytes
        self.forwarded_packets += 1
        self.forwarded_bytes += nbytes

    def send_failed(self, ep: Endpoint) -> None:
        """Account one datagram that could not be sent from `ep` (`sent`, loop-free)."""
        ep.partner.drops[SEND_ERROR] += 1  # type: ignore[union-attr]
        self.dropped[SEND_ERROR] += 1

    def totals(self) -> Dict[str, int]:
        totals = {
            "media.forwarded.packets": self.forwarded_packets,
            "media.forwarded.bytes": self.forwarded_bytes,
            "media.latched": self.latched,
            "media.latched.announced": self.latched_announced,
            "media.latched.learned": self.latched_learned,
            "media.relatched": self.relatched,
        }
        for i, reason in enumerate(DROP_NAMES):
            totals[f"media.dropped.{reason}"] = self.dropped[i]
        return totals
