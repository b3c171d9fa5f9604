"""NFQUEUE mode: the first packet of every flow is decided in userspace, the rest in the kernel.

Like kernel mode, but no flow is admitted by the ruleset alone: a new flow's first
packet goes to NFQUEUE; userspace checks it against the session (announced address,
or any with latch_any), latches the leg to the packet's real source (so the other
direction is forwarded to it), flushes flows that were NATed towards the old address,
admits the source and re-injects the packet (NF_REPEAT). From then on conntrack and
NAT carry the flow. This also settles the case kernel mode cannot: a callee that
sends before a NATed caller.

A forked INVITE's further early dialogs are fork units (as in kernel mode): a first
packet to a fork's own A port is judged by that fork's leg A; one to the shared B port
from the exact address a fork's callee announced is that fork's (re-injected for the
ruleset's `fmark`/`ffwd` entries to take, the session's leg B not latched to it); any
other one there is the session's leg B's.

Restarts: the NFQUEUE rule sits in the table (chains nfq4/nfq6), so an adopted table
keeps it; flows admitted before the stop keep going in conntrack. While no process
reads the queue, a new flow's first packets are dropped by the kernel (accepted
unrelayed with `nfqueue_bypass`): a restart loses only flows that start meanwhile.
On adoption the admitted sources (`adm` elements) become this plane's again and, where
a leg was admitted, the other leg's forwarding element gives that leg's latch back.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from dataclasses import replace
from typing import Callable, Dict, List, Optional, Sequence, Set, Tuple

from fastpath.contract import LegSpec as PlaneLeg
from fastpath.contract import StreamSpec, unit_of
from fastpath.kernel.ctnetlink import CtFlow
from fastpath.kernel.kernel_rules import ForkSpec, KernelRuleError, KernelRuleset, SessionSpec
from fastpath.kernel.nfqueue import NF_DROP, NF_REPEAT
from fastpath.kernel.nfqueue_socket import NfQueue, add_queue_rule
from fastpath.kernel.nft import NftError
from fastpath.packet import parse_udp
from lrk.daemon.kernel_plane import KernelPlane

log = logging.getLogger("lrk.nfqueue")

NFPROTO_INET = 1
#: packets the kernel holds for a verdict, and the queue socket's receive buffer
QUEUE_MAXLEN = 20_000
QUEUE_RCVBUF = 48 << 20
Addr = Tuple[str, int]
#: what a decision changed: (unit id, its elements before, latch key, latch before)
_Before = Tuple[int, Optional[SessionSpec], Tuple[int, str, bool], Optional[Addr]]


def _without_admission(text: str) -> str:
    """Drop the adm* element lines: in this mode only userspace admits sources."""
    keep = [line for line in text.splitlines()
            if " adm4 " not in line and " adm6 " not in line]
    return "\n".join(keep) + ("\n" if keep else "")


class NfqueuePlane(KernelPlane):
    """Kernel mode plus userspace admission and latching of each flow's first packet."""

    #: every early dialog of a forked INVITE is relayed (fork units, as in kernel mode)
    relays_forks = True
    #: admission elements are written when userspace admits a first packet
    writes_admission = False

    def __init__(self, port_start: int, port_end: int, relay_ips: Sequence[str],
                 table: str = "lrk", poll_interval: float = 2.0,
                 queue_num: int = 0, bypass: bool = False, adopt: bool = False,
                 extra: Sequence[Tuple[str, int, int]] = (),
                 mark_slots: Sequence[str] = ()) -> None:
        # the queued first packet is re-run (NF_REPEAT): kept on the per-packet `seen` counting
        super().__init__(port_start, port_end, relay_ips, table, poll_interval,
                         counters="rules", adopt=adopt, extra=extra, mark_slots=mark_slots)
        # extra: a standby's peers' media, as in kernel mode (admission is by relay
        # address and port, whatever range it is in)
        self.rules = KernelRuleset(table=table, port_start=port_start, port_end=port_end,
                                   relay_ips=sorted(set(relay_ips)),
                                   queue=queue_num, queue_bypass=bypass, queue_chain=True,
                                   extra=extra, mark_slots=mark_slots)
        self.queue_num = queue_num
        self.bypass = bypass
        self.nfq: Optional[NfQueue] = None
        # relay address -> (unit id, leg name, is RTCP); a fork unit's own A ports only
        # (the B port it shares is the session's unit's: forks' callees are found by source)
        self.by_relay: Dict[Addr, Tuple[int, str, bool]] = {}
        self.relays_of: Dict[int, Set[Addr]] = {}  # unit id -> its keys in by_relay
        # (sid, leg, rtcp) -> latched source
        self.latched: Dict[Tuple[int, str, bool], Addr] = {}
        self.admitted: Dict[int, Set[str]] = {}  # unit id -> adm element keys added
        self.streams_applied: Dict[int, StreamSpec] = {}  # unit id -> as last installed
        self._latch_news = False  # a latch (or refusal) decided since the last poll
        #: the admission (unit id, adm key) the packet being decided relies on, whether
        #: its decision added that admission, and what it changed: (unit id, the unit's
        #: elements before, the latch key, the latch before)
        self._relied: Optional[Tuple[int, str]] = None
        self._added = False
        self._before: Optional[_Before] = None
        #: (unit id, leg) -> new flows refused in userspace (per-leg drops, as query shows)
        self.leg_drops: Dict[Tuple[int, str], int] = {}
        self.counters.update({"nfqueue.packets": 0, "nfqueue.admitted": 0,
                              "nfqueue.queued": 0, "nfqueue.requeued": 0,
                              "nfqueue.batches.retried": 0,
                              "media.latched": 0, "media.dropped.no_destination": 0})
        self.drop_counter = "nfqueue.queued"  # the ruleset's counter counts queued packets
        #: while adopting: relay address ("ip . port") -> the adopted table's adm keys there
        self._found_adm: Optional[Dict[str, List[str]]] = None

    async def start(self) -> None:
        await super().start()
        try:
            if self._found is not None:  # adopted: its NFQUEUE rules are there (unless a
                for fam in (4, 6):       # crash came between the table and its rules)
                    if not self._found_chains.get(f"nfq{fam}"):
                        self._add_queue_rule(fam)
            # a burst of new flows (a takeover: every call at once) queues each flow's
            # packets until userspace admits its first one; room for about a second of
            # 200 calls' media (20,000 packets of 128 copied bytes: ~40 MB of socket
            # buffer at most, held only while a burst lasts)
            self.nfq = NfQueue(self.queue_num, copy_range=128, fail_open=self.bypass,
                               maxlen=QUEUE_MAXLEN, rcvbuf=QUEUE_RCVBUF)
            self.nfq.bind()
            asyncio.get_running_loop().add_reader(self.nfq.fileno(), self._on_queue)
        except BaseException:  # e.g. the queue is bound by another process: the table
            await self._undo_start()  # made above goes with the queue socket
            raise

    def _fresh_table(self) -> None:
        super()._fresh_table()
        for fam in (4, 6):
            self._add_queue_rule(fam)

    def _add_queue_rule(self, fam: int) -> None:
        add_queue_rule(NFPROTO_INET, self.rules.table, f"nfq{fam}", self.queue_num,
                       bypass=self.bypass)

    def adopted(self) -> None:
        self._found_adm = None
        super().adopted()

    def _adopt_unit(self, uid: int, stream: StreamSpec) -> None:
        """A restored unit in an adopted table: the sources admitted on its relay ports
        become its admissions again, and a leg admitted there is latched to where the
        other leg's `fwd` element sends (what `_decide` wrote before the restart)."""
        found = self._found
        spec = super()._spec(uid, stream)
        if found is None or spec is None:
            return
        fam = spec.family
        adm = found.get(f"adm{fam}", {})
        if self._found_adm is None:  # once per restore, both families (addresses differ)
            index: Dict[str, List[str]] = {}
            for family in (4, 6):
                for key in found.get(f"adm{family}", {}):
                    index.setdefault(key.rsplit(" . ", 1)[0], []).append(key)
            self._found_adm = index
        fwd = found.get(f"fwd{fam}", {})
        fork = isinstance(spec, ForkSpec)
        legs = (("A", spec.a, spec.b),) if fork else (("A", spec.a, spec.b),
                                                      ("B", spec.b, spec.a))
        for name, leg, other in legs:
            for rtcp in (False, True):
                relay = f"{leg.relay_ip} . {leg.relay_port + rtcp}"
                keys = [k for k in self._found_adm.pop(relay, ()) if k in adm]
                if not keys:
                    continue
                for key in keys:
                    del adm[key]
                    self.admitted.setdefault(uid, set()).add(f"adm{fam} {{ {key} }}")
                peer = fwd.get(f"{other.relay_ip} . {other.relay_port + rtcp}")
                if peer is not None and not fork:
                    ip, port = peer.split(" . ")
                    self.latched[(uid, name, rtcp)] = (ip, int(port))

    async def stop(self) -> None:
        nfq, self.nfq = self.nfq, None
        try:
            if nfq is not None:
                try:
                    asyncio.get_running_loop().remove_reader(nfq.fileno())
                finally:
                    nfq.close()
        finally:
            await super().stop()

    # -- sessions ----------------------------------------------------------------------
    def _spec(self, uid: int, stream: StreamSpec) -> Optional[SessionSpec]:
        """The unit with latched sources in place of announced ones."""
        spec = super()._spec(uid, stream)
        if spec is None:
            return None
        legs = {}
        for name, leg in (("A", spec.a), ("B", spec.b)):
            rtp = self.latched.get((uid, name, False))
            rtcp = self.latched.get((uid, name, True))
            if rtp is not None or rtcp is not None:
                # (a leg on hold that sends again is sent to where it sends from)
                leg = replace(leg, peer_ip=(rtp or rtcp)[0],
                              peer_port=rtp[1] if rtp else leg.peer_port,
                              peer_rtcp_port=rtcp[1] if rtcp
                              else None if leg.held else leg.peer(True)[1])
            legs[name] = leg
        return type(spec)(legs["A"], legs["B"])  # a fork unit's stays a ForkSpec

    def _elements(self, commands: str) -> str:
        return _without_admission(commands)

    def _install(self, sid: int, stream: StreamSpec, relatch: bool) -> None:
        if self._found is not None and sid not in self.installed:
            self._adopt_unit(sid, stream)
        before = self.streams_applied.get(sid)
        if before is not None:
            moved = False
            for name in ("A", "B"):
                old_leg, new_leg = before.leg(name), stream.leg(name)
                # a new offer/answer, or a leg moved to another relay port (a fork's
                # dialog won): that leg latches afresh
                if (relatch and old_leg.generation != new_leg.generation) or (
                        old_leg.relay_ip, old_leg.relay_port) != (new_leg.relay_ip,
                                                                  new_leg.relay_port):
                    moved = True
                    for rtcp in (False, True):
                        self.latched.pop((sid, name, rtcp), None)
            if relatch or moved:
                self._drop_admissions(sid)
        self.streams_applied[sid] = stream
        super()._install(sid, stream, relatch)
        new = self.installed.get(sid)
        mine: Set[Addr] = set()
        if new is not None:
            legs = (("A", new.a),) if isinstance(new, ForkSpec) else (("A", new.a), ("B", new.b))
            for name, leg in legs:
                for rtcp in (False, True):
                    self.by_relay[leg.relay(rtcp)] = (sid, name, rtcp)
                    mine.add(leg.relay(rtcp))
        self._drop_relays(sid, keep=mine)  # ports it no longer has
        if mine:
            self.relays_of[sid] = mine

    def _drop_relays(self, uid: int, keep: Set[Addr]) -> None:
        """Forget the relay addresses `by_relay` gives to unit `uid` (but `keep`); from
        the unit's own index: a first packet re-installs its unit, and a scan of every
        relay address per first packet made a burst of new flows quadratic."""
        for addr in self.relays_of.pop(uid, set()) - keep:
            if self.by_relay.get(addr, (None,))[0] == uid:
                del self.by_relay[addr]

    def _remove(self, sid: int) -> None:
        super()._remove(sid)
        # whether or not the unit ever had elements (an offer never answered, a leg on
        # hold has none, and no `_forget`): its plane-side records go
        self.streams_applied.pop(sid, None)
        self._drop_relays(sid, keep=set())  # only its own: a fork's B port is the session's
        self.leg_drops.pop((sid, "A"), None)
        self.leg_drops.pop((sid, "B"), None)

    def _forget(self, sid: int, spec: SessionSpec) -> None:
        self._drop_admissions(sid)
        for key in [k for k in self.latched if k[0] == sid]:
            del self.latched[key]

    def _drop_admissions(self, sid: int) -> None:
        keys = self.admitted.pop(sid, set())
        if keys and self.nft is not None:
            lines = [f"delete element inet {self.rules.table} {key}" for key in sorted(keys)]
            self._write("\n".join(lines) + "\n")

    # -- first packets -----------------------------------------------------------------
    def _on_queue(self) -> None:
        nfq = self.nfq
        if nfq is None:
            return
        packets = nfq.receive_batch(64)
        if not packets:
            return
        # one transaction for the batch's element writes (a burst of new flows, as
        # after a takeover, must not queue behind one netlink round trip per flow),
        # then the flushes (a flow NATed towards a latched leg's old address would
        # clash with the re-injected packet's at conntrack confirm), then the verdicts
        # in one message: a packet is re-injected only once its admission is written,
        # and every packet taken gets its verdict. A flow's packets that reach the
        # kernel after the commit take the ruleset's path and may overtake its first,
        # still queued, packet (docs/fastpath.md)
        self.deferred_begin()
        decided: List[Tuple[int, int, Optional[Tuple[int, str]], bool]] = []
        groups: List[Tuple[int, int, Optional[int]]] = []
        befores: List[Optional[_Before]] = []
        try:
            for pkt in packets:
                self.counters["nfqueue.packets"] += 1
                verdict = NF_DROP
                first = self.deferred_mark()
                self._relied, self._added, self._before = None, False, None
                try:
                    verdict = self._decide(pkt.payload)
                except (NftError, KernelRuleError, OSError) as exc:
                    self.counters["kernel.errors"] += 1
                    log.error("could not admit a flow: %s", exc)
                except Exception:  # a bug must cost this packet, not the queue
                    self.counters["kernel.errors"] += 1
                    log.exception("could not decide a queued packet")
                decided.append((pkt.packet_id, verdict, self._relied, self._added))
                befores.append(self._before)
                groups.append((first, self.deferred_mark(),
                               self._before[0] if self._before else None))
        finally:
            failed = self.deferred_end(groups)
            self._undo(failed, decided, befores)
            verdicts: List[Tuple[int, int]] = []
            for i, (packet_id, verdict, relied, added) in enumerate(decided):
                if verdict == NF_REPEAT and relied is not None and (
                        i in failed or relied[1] not in self.admitted.get(relied[0], ())):
                    verdict = NF_DROP  # it would only come back to the queue
                elif added:
                    self.counters["nfqueue.admitted"] += 1
                verdicts.append((packet_id, verdict))
            for pkt in packets[len(decided):]:  # not reached (a bug above): refused
                verdicts.append((pkt.packet_id, NF_DROP))
            nfq.verdicts(verdicts)

    def _undo(self, failed: Set[int], decided: list, befores: List[Optional[_Before]]) -> None:
        """Nothing of a failed decision was applied: its admission, its latch and its
        unit's element view go back to what they were (the earliest failure's view
        last), so the flow's next packet decides afresh, as one whose write failed
        always did."""
        for i in sorted(failed, reverse=True):
            _pid, _verdict, relied, added = decided[i]
            if relied is not None and added:
                self.admitted.get(relied[0], set()).discard(relied[1])
            before = befores[i]
            if before is None:
                continue
            sid, spec, latch_key, latch = before
            self._restore_unit(sid, spec)
            if latch is None:
                self.latched.pop(latch_key, None)
            else:
                self.latched[latch_key] = latch
            self.counters["media.latched"] -= 1

    def _decide(self, payload: bytes) -> int:
        parsed = parse_udp(payload)
        if parsed is None:
            self.counters["media.dropped.unexpected_source"] += 1
            return NF_DROP
        family, src_ip, sport, dst_ip, dport, _off = parsed
        fam = 6 if family == socket.AF_INET6 else 4
        entry = self.by_relay.get((dst_ip, dport))
        stream = self.streams.get(entry[0]) if entry else None
        if entry is None or stream is None:
            self.counters["media.dropped.unexpected_source"] += 1
            return NF_DROP
        sid, name, rtcp = entry
        if name == "B":
            fork = self._fork_callee(sid, rtcp, (dst_ip, dport), (src_ip, sport))
            if fork is not None:
                # a fork's callee: the ruleset's fmark/ffwd entries take it on re-injection
                # (no adm element: that would admit its IP to the session's leg B too)
                self.latched[(fork, "B", rtcp)] = (src_ip, sport)
                self.counters["media.latched"] += 1
                self._latch_news = True
                return NF_REPEAT
        leg = stream.leg(name)
        spec = self.installed.get(sid)
        if isinstance(spec, SessionSpec) and (spec.b if name == "A" else spec.a).held:
            # toward a peer on hold: no element forwards it, so a re-injected packet
            # would come back here for ever
            self.counters["media.dropped.no_destination"] += 1
            return NF_DROP
        key = f"adm{fam} {{ {dst_ip} . {dport} . {src_ip} }}"
        if self.latched.get((sid, name, rtcp)) == (src_ip, sport) \
                and key in self.admitted.get(sid, ()):
            # queued behind its flow's first packet, which admitted it meanwhile:
            # re-injected as it is (nothing to write; not a new latch)
            self.counters["nfqueue.requeued"] += 1
            self._relied = (sid, key)
            return NF_REPEAT
        if not self._admits(sid, name, rtcp, leg, (src_ip, sport)):
            self.counters["media.dropped.unexpected_source"] += 1
            key = (sid, name)
            self.leg_drops[key] = self.leg_drops.get(key, 0) + 1
            self._latch_news = True  # reported with the next refresh, as latches are
            return NF_DROP
        # latch: the other direction now goes to this real source (reported to the
        # engine with the next counter poll, with the generation it belongs to)
        before_latch = self.latched.get((sid, name, rtcp))
        self.latched[(sid, name, rtcp)] = (src_ip, sport)
        self.counters["media.latched"] += 1
        self._latch_news = True
        self._before = (sid, self.installed.get(sid), (sid, name, rtcp), before_latch)
        # re-points the other direction at this source and, when that changed anything,
        # flushes the flows NATed towards the old address (the other side spoke first)
        self._install(sid, stream, False)
        if key not in self.admitted.setdefault(sid, set()):
            assert self.nft is not None
            self._write(f"add element inet {self.rules.table} {key}\n")
            self.admitted[sid].add(key)
            self._added = True  # counted once written (`_on_queue`)
        self._relied = (sid, key)
        return NF_REPEAT

    def _fork_callee(self, uid: int, rtcp: bool, relay: Addr, src: Addr) -> Optional[int]:
        """The fork unit of unit `uid`'s session whose callee, on this shared B port, is
        exactly `src` (as its SDP announced it); None when none is."""
        for fork in self.session_forks.get(unit_of(uid)[0], {}).values():
            spec = self.installed.get(fork)
            if isinstance(spec, ForkSpec) and spec.b.relay(rtcp) == relay \
                    and spec.b.peer(rtcp) == src:
                return fork
        return None

    def _admits(self, uid: int, name: str, rtcp: bool, leg: PlaneLeg, src: Addr) -> bool:
        """A new flow's source, judged as the socket relay judges a first packet: the
        announced IP, or anywhere on a learning leg; RTCP only from RTP's latched IP or
        the announced RTCP address. A latched leg keeps its peer (no re-learning here: a
        new flow from elsewhere while the old one may still be live is refused)."""
        latched = self.latched.get((uid, name, rtcp))
        if latched is not None:
            return src == latched
        if rtcp:
            rtp = self.latched.get((uid, name, False))
            return src == leg.rtcp_announced or (rtp is not None and rtp[0] == src[0])
        announced = leg.announced
        return leg.latch_any or (announced is not None and announced[0] == src[0])

    def _drop_units(self) -> Set[int]:
        return {uid for uid, _ in self.leg_drops}

    def _leg_drops(self, sid: int, name: str) -> Tuple[Tuple[str, int], ...]:
        n = self.leg_drops.get((sid, name), 0)
        return (("unexpected_source", n),) if n else ()

    def refresh(self, then: Callable[[], None]) -> None:
        """As kernel mode, but a latch decided since the last poll is reported at once
        (a `query` right after a phone's first packet shows where it latched)."""
        if self._latch_news:
            self._poll()
        super().refresh(then)

    def _poll(self, now: Optional[float] = None) -> None:
        self._latch_news = False
        super()._poll(now)

    def _latched(self, flows: List[CtFlow], owners: Dict[int, tuple]
                 ) -> Dict[Tuple[int, str, bool], Tuple[str, int]]:
        """Conntrack's latches, overridden by the ones this plane decided itself."""
        latched = super()._latched(flows, owners)
        latched.update(self.latched)
        return latched

    def media_counters(self) -> Dict[str, int]:
        counters = super().media_counters()
        if self.nfq is not None:
            errors = getattr(self.nfq, "verdict_errors", {}) or {}
            counters["nfqueue.verdict_errors"] = sum(errors.values())
        return counters


__all__: List[str] = ["NfqueuePlane"]
