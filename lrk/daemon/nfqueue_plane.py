"""NFQUEUE mode: the first packet of every flow is decided in userspace, the rest in the kernel.

Like kernel mode, but no flow is admitted by the ruleset alone: a new flow's first
packet goes to NFQUEUE; userspace checks it against the session (announced address,
or any with latch_any), latches the leg to the packet's real source (so the other
direction is forwarded to it), flushes flows that were NATed towards the old address,
admits the source and re-injects the packet (NF_REPEAT). From then on conntrack and
NAT carry the flow. This also settles the case kernel mode cannot: a callee that
sends before a NATed caller.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from dataclasses import replace
from typing import Callable, Dict, List, Optional, Sequence, Set, Tuple

from fastpath.contract import LegSpec as PlaneLeg
from fastpath.contract import StreamSpec
from fastpath.kernel.ctnetlink import CtFlow
from fastpath.kernel.kernel_rules import KernelRuleError, KernelRuleset, SessionSpec
from fastpath.kernel.nfqueue import NF_DROP, NF_REPEAT
from fastpath.kernel.nfqueue_socket import NfQueue, add_queue_rule
from fastpath.kernel.nft import NftError
from fastpath.packet import parse_udp
from lrk.daemon.kernel_plane import KernelPlane, session_spec

log = logging.getLogger("lrk.nfqueue")

NFPROTO_INET = 1
Addr = Tuple[str, int]


def _without_admission(text: str) -> str:
    """Drop the adm* element lines: in this mode only userspace admits sources."""
    keep = [line for line in text.splitlines()
            if " adm4 " not in line and " adm6 " not in line]
    return "\n".join(keep) + ("\n" if keep else "")


class NfqueuePlane(KernelPlane):
    """Kernel mode plus userspace admission and latching of each flow's first packet."""

    #: admission and latching here are per relay port: a forked INVITE's further early
    #: dialogs are not relayed (the first one is; the 200 OK's dialog after it)
    relays_forks = False

    def __init__(self, port_start: int, port_end: int, relay_ips: Sequence[str],
                 table: str = "lrk", poll_interval: float = 2.0,
                 queue_num: int = 0, bypass: bool = False) -> None:
        # the queued first packet is re-run (NF_REPEAT): kept on the per-packet `seen` counting
        super().__init__(port_start, port_end, relay_ips, table, poll_interval,
                         counters="rules")
        self.rules = KernelRuleset(table=table, port_start=port_start, port_end=port_end,
                                   relay_ips=sorted(set(relay_ips)),
                                   queue=queue_num, queue_bypass=bypass, queue_chain=True)
        self.queue_num = queue_num
        self.bypass = bypass
        self.nfq: Optional[NfQueue] = None
        # relay address -> (sid, leg name, is RTCP)
        self.by_relay: Dict[Addr, Tuple[int, str, bool]] = {}
        # (sid, leg, rtcp) -> latched source
        self.latched: Dict[Tuple[int, str, bool], Addr] = {}
        self.admitted: Dict[int, Set[str]] = {}  # unit id -> adm element keys added
        self.streams_applied: Dict[int, StreamSpec] = {}  # unit id -> as last installed
        self._latch_news = False  # a latch (or refusal) decided since the last poll
        #: (unit id, leg) -> new flows refused in userspace (per-leg drops, as query shows)
        self.leg_drops: Dict[Tuple[int, str], int] = {}
        self.counters.update({"nfqueue.packets": 0, "nfqueue.admitted": 0,
                              "nfqueue.queued": 0, "media.latched": 0})
        self.drop_counter = "nfqueue.queued"  # the ruleset's counter counts queued packets

    async def start(self) -> None:
        await super().start()
        for fam in (4, 6):
            add_queue_rule(NFPROTO_INET, self.rules.table, f"nfq{fam}", self.queue_num,
                           bypass=self.bypass)
        self.nfq = NfQueue(self.queue_num, copy_range=128, fail_open=self.bypass)
        self.nfq.bind()
        asyncio.get_running_loop().add_reader(self.nfq.fileno(), self._on_queue)

    async def stop(self) -> None:
        if self.nfq is not None:
            asyncio.get_running_loop().remove_reader(self.nfq.fileno())
            self.nfq.close()
            self.nfq = None
        await super().stop()

    # -- sessions ----------------------------------------------------------------------
    def _spec(self, uid: int, stream: StreamSpec) -> Optional[SessionSpec]:
        """The unit with latched sources in place of announced ones."""
        spec = session_spec(stream)
        if spec is None:
            return None
        legs = {}
        for name, leg in (("A", spec.a), ("B", spec.b)):
            rtp = self.latched.get((uid, name, False))
            rtcp = self.latched.get((uid, name, True))
            if rtp is not None or rtcp is not None:
                leg = replace(leg, peer_ip=(rtp or rtcp)[0],
                              peer_port=rtp[1] if rtp else leg.peer_port,
                              peer_rtcp_port=rtcp[1] if rtcp else leg.peer(True)[1])
            legs[name] = leg
        return SessionSpec(legs["A"], legs["B"])

    def _elements(self, commands: str) -> str:
        return _without_admission(commands)

    def _install(self, sid: int, stream: StreamSpec, relatch: bool) -> None:
        before = self.streams_applied.get(sid)
        if relatch and before is not None:  # a new offer/answer: that leg latches afresh
            for name in ("A", "B"):
                if before.leg(name).generation != stream.leg(name).generation:
                    for rtcp in (False, True):
                        self.latched.pop((sid, name, rtcp), None)
            self._drop_admissions(sid)
        self.streams_applied[sid] = stream
        super()._install(sid, stream, relatch)
        new = self.installed.get(sid)
        if new is not None:
            for name, leg in (("A", new.a), ("B", new.b)):
                for rtcp in (False, True):
                    self.by_relay[leg.relay(rtcp)] = (sid, name, rtcp)

    def _forget(self, sid: int, spec: SessionSpec) -> None:
        self.streams_applied.pop(sid, None)
        self.leg_drops.pop((sid, "A"), None)
        self.leg_drops.pop((sid, "B"), None)
        self._drop_admissions(sid)
        for leg in (spec.a, spec.b):
            for rtcp in (False, True):
                self.by_relay.pop(leg.relay(rtcp), None)
        for key in [k for k in self.latched if k[0] == sid]:
            del self.latched[key]

    def _drop_admissions(self, sid: int) -> None:
        keys = self.admitted.pop(sid, set())
        if keys and self.nft is not None:
            lines = [f"delete element inet {self.rules.table} {key}" for key in sorted(keys)]
            self.nft.run("\n".join(lines) + "\n")

    # -- first packets -----------------------------------------------------------------
    def _on_queue(self) -> None:
        nfq = self.nfq
        if nfq is None:
            return
        packets = nfq.receive_batch(64)
        for pkt in packets:
            self.counters["nfqueue.packets"] += 1
            verdict = NF_DROP
            try:
                verdict = self._decide(pkt.payload)
            except (NftError, KernelRuleError, OSError) as exc:
                self.counters["kernel.errors"] += 1
                log.error("could not admit a flow: %s", exc)
            nfq.verdict(pkt.packet_id, verdict)

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
        leg = stream.leg(name)
        if not self._admits(sid, name, rtcp, leg, (src_ip, sport)):
            self.counters["media.dropped.unexpected_source"] += 1
            key = (sid, name)
            self.leg_drops[key] = self.leg_drops.get(key, 0) + 1
            self._latch_news = True  # reported with the next refresh, as latches are
            return NF_DROP
        # latch: the other direction now goes to this real source (reported to the
        # engine with the next counter poll, with the generation it belongs to)
        self.latched[(sid, name, rtcp)] = (src_ip, sport)
        self.counters["media.latched"] += 1
        self._latch_news = True
        # re-points the other direction at this source and, when that changed anything,
        # flushes the flows NATed towards the old address (the other side spoke first)
        self._install(sid, stream, False)
        key = f"adm{fam} {{ {dst_ip} . {dport} . {src_ip} }}"
        if key not in self.admitted.setdefault(sid, set()):
            assert self.nft is not None
            self.nft.run(f"add element inet {self.rules.table} {key}\n")
            self.admitted[sid].add(key)
            self.counters["nfqueue.admitted"] += 1
        return NF_REPEAT

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
