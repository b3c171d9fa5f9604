"""xdp mode: kernel mode with an XDP program in front that carries established streams.

Composes a `KernelPlane` (nftables NAT, conntrack latching and counting: everything the
XDP program hands back with XDP_PASS still works as in kernel mode) and writes, for
every stream it relays, one XDP map entry per direction (RTP and RTCP): packets to a
leg's relay port from that leg's peer go out from the other leg's relay port to the
other leg's peer, without netfilter, conntrack or a socket.

What an entry expects and where it sends comes from what the kernel plane knows: the
announced peer (SDP), replaced by the peer conntrack latched (a NATed source port) as
soon as a counter read reports it for the leg's current generation. A packet from the
right address but another port goes to the kernel path (which learns it); a direction
whose destination is only announced forwards once the destination's own entry has
forwarded a packet from exactly that address (F_CHECK_PEER), so a NATed peer is never
sent to its SDP port while conntrack knows better. Sessions with forked early dialogs
stay on the kernel path (their shared B port tells callees apart by source).

Restarts that keep calls lose no packet: a stop that keeps calls leaves the program
attached with their entries (it forwards on; after kill -9 the attachment outlives the
process anyway), and a start loads its own copy but attaches it only in `adopted()`,
once the restore has written every restored call's entries, replacing the old one in
one step. What it reads of the kernel plane goes through `KernelView` (read-only).

Counters: each direction has a per-CPU slot (packets, payload bytes, last packet time
on CLOCK_MONOTONIC); reports are the kernel plane's plus the slots', and `last_rx` the
later of both, so silence expiry sees XDP-carried media.
"""

from __future__ import annotations

import logging
import time
from collections import ChainMap
from typing import Callable, Dict, List, Optional, Sequence, Set, Tuple

from fastpath.contract import (
    Action,
    EventSink,
    Install,
    LegReport,
    PlaneFailure,
    Remove,
    SessionReport,
    StreamReport,
    Update,
    unit_id,
    unit_of,
)
from fastpath.xdp.errors import XdpError
from fastpath.xdp.layout import (
    F_CHECK_PEER,
    F_KERNEL,
    REASONS,
    SEEN_NONE,
    SEEN_PEER_MOVED,
    Entry,
)
from fastpath.xdp.program import BATCH_FROM, XdpProgram
from lrk.daemon.kernel_plane import KEPT, KernelPlane, UnitView
from lrk.errors import ConfigError

log = logging.getLogger("lrk.xdp")
#: shown at every log level: which interfaces run the program, and how
lifecycle = logging.getLogger("lrk.lifecycle")

Addr = Tuple[str, int]
#: (unit id, leg name, rtcp)
LatchKey = Tuple[int, str, bool]
#: verdicts that mean "the kernel path must learn something": a read of conntrack is due
LEARNING = ("pass_source_port", "pass_peer_nat")
#: slots compared as one block of bytes between passes (a block that did not change is
#: not parsed: idle calls cost a memory compare, not a tuple each)
BLOCK_SLOTS = 512


class XdpPlane:
    """Kernel mode plus XDP entries; the DataPlane contract (fastpath/contract.py)."""

    def __init__(self, port_start: int, port_end: int, relay_ips: Sequence[str],
                 interfaces: Sequence[str], table: str = "lrk", poll_interval: float = 2.0,
                 counters: str = "conntrack", attach_mode: str = "auto",
                 max_streams: int = 65536,
                 load: Callable[..., XdpProgram] = XdpProgram.load, adopt: bool = False,
                 extra: Sequence[Tuple[str, int, int]] = (),
                 mark_slots: Sequence[str] = ()) -> None:
        if not interfaces:
            raise ConfigError("xdp mode needs xdp_interfaces: the media interfaces to attach "
                              "the XDP program to (e.g. --xdp-interface eth0)")
        # adopt: the kernel table beneath the program survives a restart that keeps calls,
        # and so does the program: a stop that keeps calls leaves it attached with their
        # entries (it forwards on; a stop that keeps none detaches it), and the next
        # process attaches its own, replacing it, once the restore has written the calls'
        # entries (`adopted`)
        # extra (a standby's peers' media): served by the kernel path only; the program
        # owns this node's addresses and range and passes the peers' media to it
        self.kernel = KernelPlane(port_start, port_end, relay_ips, table, poll_interval,
                                  counters=counters, adopt=adopt, extra=extra,
                                  mark_slots=mark_slots)
        self.kernel.sink = self._on_kernel_event
        self.port_start, self.port_end = port_start, port_end
        self.relay_ips = sorted(set(relay_ips))
        self.interfaces = list(interfaces)
        self.attach_mode = attach_mode
        self.max_streams = max_streams
        self._load = load
        self.prog: Optional[XdpProgram] = None
        #: the program is on the interfaces (from `adopted`, once the restore is over)
        self._attached = False
        #: sessions a stop keeps for the next start (Remove with reason KEPT): their
        #: entries stay, and the program stays attached to forward them
        self._kept: Set[int] = set()
        self.sink: EventSink = lambda event: None
        self.poll_interval = poll_interval
        self.clock: Callable[[], float] = time.monotonic
        #: per session: relay address -> the entry written there; per relay its counter slot
        self.entries: Dict[int, Dict[Addr, Entry]] = {}
        self.slots: Dict[Addr, int] = {}
        #: the session each slot in use counts for (a pass maps moved slots to sessions)
        self._slot_sid: Dict[int, int] = {}
        self._free: List[int] = []
        #: the counter array as the last pass read it (unchanged blocks are not parsed)
        self._last_raw = b""
        self._next_slot = 0
        #: latches conntrack reported, per session: (uid, leg, rtcp) -> (generation, peer)
        self.latches: Dict[int, Dict[LatchKey, Tuple[int, Addr]]] = {}
        #: per counter slot, its last read (packets, bytes, last ns): relay-wide counters
        #: between reads
        self._slot_counts: Dict[int, Tuple[int, int, int]] = {}
        #: per session, relay address -> (packets, bytes) its freed slots had counted while
        #: the session went on (an entry dropped toward a peer on hold, later written
        #: again on a fresh slot): what the session's counters still include
        self._carry: Dict[int, Dict[Addr, Tuple[int, int]]] = {}
        self._last_read = -1e300
        #: the kernel plane's last report per session (counters since install)
        self._kreports: Dict[int, SessionReport] = {}
        #: sessions the kernel path reported since the last pass, and sessions reported
        #: at least once (a pass reports the others only when their slots moved)
        self._kreports_new: Set[int] = set()
        self._reported: Set[int] = set()
        self._learning_seen = 0
        self._last_check = 0.0
        self.counters: Dict[str, int] = {"xdp.entries.written": 0, "xdp.errors": 0}

    # -- lifecycle ---------------------------------------------------------------------
    async def start(self) -> None:
        """The kernel path, and the program loaded and configured but not attached: the
        restore writes the calls' entries first (`adopted` attaches). Attached any earlier,
        an empty map would drop the adopted calls' packets as unknown, where the previous
        run's program, left attached with its entries (a stop that kept the calls, or
        kill -9), or the kernel table beneath, forwards them."""
        await self.kernel.start()
        try:
            # the stream array: one entry per relay address and port of the range
            slots = len(self.relay_ips) * (self.port_end - self.port_start + 1)
            self.prog = self._load(max_streams=self.max_streams, max_counters=self.max_streams,
                                   stream_slots=slots)
            self.prog.configure(self.port_start, self.port_end, self.relay_ips)
            for ifname in self.interfaces:  # a missing interface fails the start, not later
                self.prog.attachable(ifname)
        except XdpError as exc:
            await self._release()
            raise ConfigError(f"xdp mode: {exc}") from exc
        except BaseException:
            await self._release()
            raise

    def adopted(self) -> None:
        """The restore is over: the kernel path beneath reconciles its adopted table, then
        the program, whose map now holds every restored call, goes onto the interfaces
        (replacing a crashed run's in one step). Raises ConfigError if it cannot attach
        (the program is released; the kernel table keeps forwarding the calls)."""
        self.kernel.adopted()
        if self.prog is None or self._attached:
            return
        try:
            for ifname in self.interfaces:
                mode = self.prog.attach(ifname, self.attach_mode)
                lifecycle.info("xdp mode: program attached to %s in %s mode%s", ifname, mode,
                               "" if mode == "native" else
                               " (the driver has no native XDP: slower, still no netfilter)")
        except XdpError as exc:
            self.prog.close()
            self.prog = None
            raise ConfigError(f"xdp mode: {exc}") from exc
        self._attached = True

    async def _release(self) -> None:
        if self.prog is not None:
            self.prog.close()
            self.prog = None
        await self.kernel.stop()

    async def stop(self) -> None:
        """Calls kept for the next start (SIGTERM with a session store): the program
        stays attached with their entries and forwards their media until the next start
        replaces it in one step (a detach and a later attach would each reconfigure the
        driver's rings, losing what is in flight, and leave the media to the kernel path
        meanwhile). Otherwise: detach from every interface and release the program and its
        maps (the kernel frees them with the last reference). Then the kernel path stops
        (it keeps its table for kept calls)."""
        kept = len(self._kept)
        self._kept.clear()
        self.entries.clear()
        self.slots.clear()
        self._slot_sid.clear()
        self._last_raw = b""
        self.latches.clear()
        self._kreports.clear()
        self._kreports_new.clear()
        self._reported.clear()
        self._slot_counts.clear()
        self._carry.clear()
        if self.prog is not None:
            if kept and self._attached:
                self.prog.release()
                lifecycle.info("xdp mode: program left attached to %s for %d kept call(s): "
                               "it forwards their media until the next start replaces it",
                               ", ".join(self.interfaces), kept)
            else:
                failed = self.prog.detach_all()
                if failed:
                    log.error("xdp mode: still attached to %s", ", ".join(failed))
                self.prog.close()
                if self._attached:
                    lifecycle.info("xdp mode: program detached from %s",
                                   ", ".join(self.interfaces))
            self.prog = None
            self._attached = False
        await self.kernel.stop()

    # -- actions -----------------------------------------------------------------------
    def commit(self, then: Callable[[], None]) -> None:
        then()

    def apply(self, actions: Sequence[Action]) -> List[PlaneFailure]:
        """Kernel elements first (the XDP path hands back to them), then the entries."""
        failures = self.kernel.apply(actions)
        failed = {f.sid for f in failures}
        for action in actions:
            sid = action.sid
            if isinstance(action, Remove) and action.reason == KEPT and sid not in failed:
                # a stop that keeps the call: its entries stay for the program left attached
                self._kept.add(sid)
                continue
            try:
                if isinstance(action, Remove) or sid in failed:
                    self._drop_session(sid)
                elif isinstance(action, (Install, Update)):
                    self._sync_session(sid)
            except XdpError as exc:
                self.counters["xdp.errors"] += 1
                log.error("xdp mode could not write the entries of session %d: %s", sid, exc)
                if isinstance(action, Remove) or sid in failed:
                    continue
                failures.append(PlaneFailure(sid, "kernel_error", f"xdp: {exc}"[:200]))
                failed.add(sid)
                self.kernel.apply([Remove(sid, action.spec.call_id, "xdp_error")])
                self._drop_session(sid)
        return failures

    def _sync_session(self, sid: int) -> None:
        """A session's entries from what the kernel plane holds now (a fork unit shares
        leg B's relay ports with the main unit: entries are per session, by relay)."""
        forked = self.kernel.forked(sid)
        wanted: Dict[Addr, Entry] = {}
        for unit in self.kernel.units(sid):
            wanted.update(self._wanted(unit, forked))
        self._write_session(sid, wanted)

    def _wanted(self, unit: UnitView, forked: bool) -> Dict[Addr, Entry]:
        out: Dict[Addr, Entry] = {}
        uid, stream, kspec = unit
        legs = (("A", kspec.a, stream.a.generation, "B", kspec.b, stream.b.generation),
                ("B", kspec.b, stream.b.generation, "A", kspec.a, stream.a.generation))
        for rtcp in (False, True):
            for name, leg, gen, oname, other, ogen in legs:
                relay = leg.relay(rtcp)
                if other.held and not forked:
                    continue  # toward a peer on hold: nothing is sent (no entry: dropped)
                if forked:  # the kernel path tells forked callees apart by source
                    out[relay] = Entry(relay, relay, relay, relay, 0, F_KERNEL)
                    continue
                source = self._latch(uid, name, rtcp, gen) or leg.peer(rtcp)
                dest = self._latch(uid, oname, rtcp, ogen)
                # every entry names the reverse one: a source seen from another port
                # marks it there (SEEN_PEER_MOVED), which an F_CHECK_PEER entry reads
                flags = 0
                if dest is None:
                    dest = other.peer(rtcp)
                    flags = F_CHECK_PEER
                out[relay] = Entry(relay, source, other.relay(rtcp), dest, 0, flags,
                                   other.relay(rtcp))
        return out

    def _latch(self, uid: int, name: str, rtcp: bool, generation: int) -> Optional[Addr]:
        got = self.latches.get(unit_of(uid)[0], {}).get((uid, name, rtcp))
        return got[1] if got is not None and got[0] == generation else None

    def _write_session(self, sid: int, wanted: Dict[Addr, Entry]) -> None:
        assert self.prog is not None
        old = self.entries.get(sid, {})
        if not wanted:
            self._carry.pop(sid, None)  # the session's XDP counting is over
        for relay in [r for r in old if r not in wanted]:
            self.prog.remove(relay)
            slot = self.slots.pop(relay, None)
            if slot is not None and wanted:
                # the session goes on: what this slot counted stays in its counters
                packets, octets, _last = self._read_slot(slot)
                carried = self._carry.setdefault(sid, {}).get(relay, (0, 0))
                self._carry[sid][relay] = (carried[0] + packets, carried[1] + octets)
            if slot is not None:
                self._free.append(slot)
                self._slot_sid.pop(slot, None)
                self._slot_counts.pop(slot, None)
        held = {}
        for relay, entry in wanted.items():
            if not self.prog.owns(relay[0]):
                continue  # another node's address (a takeover): the kernel path's
            slot = self.slots.get(relay)
            if slot is None:
                slot = self._free.pop() if self._free else self._take_slot()
                self.prog.reset_counter(slot)
                self.slots[relay] = slot
                self._slot_sid[slot] = sid
            entry = entry._replace(counter=slot)
            before = old.get(relay)
            if before != entry:
                # a destination that only moved keeps what was seen of its source; what
                # was seen of the destination (SEEN_PEER_MOVED) goes with a new one
                keep = SEEN_NONE
                if before is not None and before.source == entry.source:
                    keep = self.prog.seen(relay)
                    if before.new_dst != entry.new_dst:
                        keep &= ~SEEN_PEER_MOVED
                self.prog.put(entry, seen=keep)
                self.counters["xdp.entries.written"] += 1
            held[relay] = entry
        if held:
            self.entries[sid] = held
        else:
            self.entries.pop(sid, None)

    def _take_slot(self) -> int:
        if self._next_slot >= self.max_streams:
            raise XdpError(f"all {self.max_streams} XDP counter slots are in use "
                           "(xdp_max_streams)")
        self._next_slot += 1
        return self._next_slot - 1

    def _drop_session(self, sid: int) -> None:
        if self.prog is not None:
            self._write_session(sid, {})
        self.latches.pop(sid, None)
        self._kreports.pop(sid, None)
        self._kreports_new.discard(sid)
        self._reported.discard(sid)

    # -- reports -------------------------------------------------------------------------
    def _on_kernel_event(self, event) -> None:
        """A kernel report: note its latches (rewrite entries that move), add the XDP
        counters, pass it on. Failures pass through."""
        if not isinstance(event, SessionReport):
            self.sink(event)
            return
        self._kreports[event.sid] = event
        self._kreports_new.add(event.sid)
        latches = self.latches.setdefault(event.sid, {})
        moved = False
        for report in event.streams:
            uid = unit_id(event.sid, report.index)
            stream = self.kernel.stream(uid)
            if stream is None:
                continue
            for name, leg, spec in (("A", report.a, stream.a), ("B", report.b, stream.b)):
                if leg.generation != spec.generation:
                    continue
                for rtcp, addr in ((False, leg.latched), (True, leg.rtcp_latched)):
                    if addr is None:
                        continue
                    key = (uid, name, rtcp)
                    value = (spec.generation, (addr[0], addr[1]))
                    if latches.get(key) != value:
                        latches[key] = value
                        moved = True
        if moved and self.prog is not None:
            try:
                self._sync_session(event.sid)
            except XdpError as exc:
                self.counters["xdp.errors"] += 1
                log.error("xdp mode could not re-point session %d: %s", event.sid, exc)
        self.sink(self._merged(event.sid, event))

    def _merged(self, sid: int, base: Optional[SessionReport],
                counts: Optional[Dict[int, Tuple[int, int, int]]] = None) -> SessionReport:
        """The kernel plane's report with every XDP slot of the session added (read now,
        or taken from `counts`, a pass's batch read)."""
        prog = self.prog
        kernel = {r.index: r for r in base.streams} if base is not None else {}
        last_rx = base.last_rx if base is not None else None
        streams = []
        entries = self.entries.get(sid, {})
        carry = self._carry.get(sid, {})
        spec = self.kernel.session(sid)
        for stream in (spec.streams if spec is not None else ()):
            k = kernel.get(stream.index)
            legs = []
            for name, lspec, other in (("A", stream.a, stream.b), ("B", stream.b, stream.a)):
                rep = (k.a if name == "A" else k.b) if k is not None else LegReport()
                add = [0, 0, 0, 0]
                latched = [rep.latched, rep.rtcp_latched]
                for rtcp in (False, True):
                    for mine, relay in ((True, (lspec.relay_ip, lspec.relay_port + rtcp)),
                                        (False, (other.relay_ip, other.relay_port + rtcp))):
                        carried = carry.get(relay)
                        if carried is not None:
                            add[2 * (not mine)] += carried[0]
                            add[2 * (not mine) + 1] += carried[1]
                        entry = entries.get(relay)
                        if entry is None or prog is None or entry.flags & F_KERNEL:
                            continue
                        if counts is not None and entry.counter in counts:
                            packets, octets, last_ns = counts[entry.counter]
                        else:
                            packets, octets, last_ns = self._read_slot(entry.counter)
                        if mine:
                            add[0] += packets
                            add[1] += octets
                            if packets and latched[rtcp] is None:
                                latched[rtcp] = entry.source
                        else:
                            add[2] += packets
                            add[3] += octets
                        if last_ns:
                            t = last_ns / 1e9
                            last_rx = t if last_rx is None else max(last_rx, t)
                generation = rep.generation
                if generation < 0 and (latched[0] or latched[1]):
                    generation = lspec.generation
                legs.append(rep._replace(
                    in_packets=rep.in_packets + add[0], in_bytes=rep.in_bytes + add[1],
                    out_packets=rep.out_packets + add[2], out_bytes=rep.out_bytes + add[3],
                    generation=generation, latched=latched[0], rtcp_latched=latched[1]))
            streams.append(StreamReport(stream.index, legs[0], legs[1]))
        forks = base.forks if base is not None else ()
        return SessionReport(sid, last_rx, tuple(streams), forks)

    def _read_slot(self, slot: int) -> Tuple[int, int, int]:
        assert self.prog is not None
        got = self._slot_counts[slot] = self.prog.read_counter(slot)
        return got

    def _report_all(self) -> None:
        """One pass: the counter array in a few batch reads, parsed only where a block
        of slots changed since the last pass; a report for each session whose slots
        moved, that the kernel path reported since, or that was never reported (at
        100,000 calls a report per call per pass cost seconds)."""
        self._last_read = self.clock()
        fresh = self._read_moved() if self.prog is not None else {}
        old = self._slot_counts
        moved = {self._slot_sid[slot] for slot, counts in fresh.items()
                 if slot in self._slot_sid and counts != old.get(slot)}
        moved |= self._kreports_new
        reported = self._reported
        counts = ChainMap(fresh, old)
        for sid in self.kernel.session_ids():
            if sid in moved or sid not in reported:
                reported.add(sid)
                self.sink(self._merged(sid, self._kreports.get(sid), counts))
        old.update(fresh)
        self._kreports_new.clear()

    def _read_moved(self) -> Dict[int, Tuple[int, int, int]]:
        """Counts of the slots in use whose block of the array changed since the last
        pass (every slot in use on the first pass, or after the array grew)."""
        assert self.prog is not None
        in_use = self._slot_sid
        try:
            if len(in_use) < BATCH_FROM:
                return self.prog.read_counters(list(in_use))
            raw = self.prog.read_raw(self._next_slot)
        except XdpError as exc:
            self.counters["xdp.errors"] += 1
            log.error("xdp counters unreadable: %s", exc)
            return {}
        size = self.prog.slot_size
        last = self._last_raw if len(self._last_raw) == len(raw) else b""
        self._last_raw = raw
        parse = self.prog.parse_slot
        out: Dict[int, Tuple[int, int, int]] = {}
        block = BLOCK_SLOTS * size
        for start in range(0, len(raw), block):
            if last and raw[start:start + block] == last[start:start + block]:
                continue
            first = start // size
            for slot in range(first, min(first + BLOCK_SLOTS, self._next_slot)):
                if slot in in_use:
                    out[slot] = parse(raw, slot)
        return out

    def refresh(self, then: Callable[[], None]) -> None:
        """Kernel counters no older than `poll_interval` (its own rule), and every
        session's XDP slots (a map lookup per direction, no conntrack walk) read again
        when the last read is that old: the relay refreshes before every `delete`,
        `query` and `stats`, and reading every slot of 1,000 sessions each time would
        make a delete cost tens of milliseconds."""
        self.kernel.refresh(lambda: None)
        if self.clock() - self._last_read >= self.poll_interval:
            self._report_all()
        then()

    def get_timer(self) -> Optional[float]:
        """The kernel plane's reads, and while any session is installed a check every
        `poll_interval` whether the kernel path has something to learn (a NATed source
        port, a destination seen behind a NAT): then its conntrack read comes now."""
        timers = [t for t in (self.kernel.get_timer(),
                              self._last_check + self.poll_interval if self.entries else None)
                  if t is not None]
        return min(timers) if timers else None

    def handle_timer(self, now: float) -> None:
        self.kernel.handle_timer(now)
        if self.entries and now >= self._last_check + self.poll_interval:
            self._last_check = now
            if self.prog is None:
                return
            counts = self.prog.verdict_counts()
            learning = sum(counts[r] for r in LEARNING)
            if learning != self._learning_seen:
                self._learning_seen = learning
                self.kernel.refresh(lambda: None)
                self._report_all()

    def media_counters(self) -> Dict[str, int]:
        """The kernel path's counters plus the XDP program's: every verdict per reason
        (`xdp.verdicts.<reason>`), its drops in the relay-wide drop counters, and what its slots
        carried in `media.received.*`."""
        total = self.kernel.media_counters()
        total.update(self.counters)
        if self.prog is None:
            return total
        try:
            verdicts = self.prog.verdict_counts()
        except XdpError as exc:
            log.error("xdp counters unreadable: %s", exc)
            return total
        for reason in REASONS:
            total[f"xdp.verdicts.{reason}"] = verdicts[reason]
        total["media.dropped.unexpected_source"] = (
            total.get("media.dropped.unexpected_source", 0) + verdicts["drop_unexpected_source"])
        total["media.dropped.no_destination"] = (
            total.get("media.dropped.no_destination", 0) + verdicts["drop_no_destination"])
        total["media.dropped.malformed"] = verdicts["drop_malformed"]
        # what the live sessions' slots carried, as of the last read (at most
        # `poll_interval` old after a refresh, which `stats` does first)
        counts = self._slot_counts.values()
        total["media.received.packets"] = (total.get("media.received.packets", 0)
                                           + sum(c[0] for c in counts))
        total["media.received.bytes"] = (total.get("media.received.bytes", 0)
                                         + sum(c[1] for c in counts))
        return total

    @property
    def installed_relays(self) -> Set[Addr]:
        """Every relay address/port with an XDP entry (tests, diagnostics)."""
        return {relay for entries in self.entries.values() for relay in entries}
