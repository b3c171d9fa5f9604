"""xdp mode's daemon side without a kernel: which XDP entries the plane writes from what
the kernel plane holds (announced peers, conntrack latches of the current generation,
forked sessions on the kernel path), how it merges the program's counters into reports,
and what it frees. The kernel plane and the loaded program are fakes here; the real ones
run in tests/netns/test_xdp_mode.py."""

from __future__ import annotations

import asyncio
import struct
from typing import Dict, List, Tuple

from fastpath.contract import (
    ForkSpec,
    Install,
    LegReport,
    LegSpec,
    Remove,
    SessionReport,
    SessionSpec,
    StreamReport,
    StreamSpec,
    Update,
    unit_id,
)
from fastpath.xdp.layout import (
    F_CHECK_PEER,
    F_KERNEL,
    REASONS,
    SEEN_EXACT,
    SEEN_NONE,
    SEEN_OTHER_PORT,
    SEEN_PEER_MOVED,
    Entry,
)
from lrk.daemon.kernel_plane import KernelView, fork_spec, session_spec
from lrk.daemon.xdp_plane import XdpPlane

RA, RB = "198.51.100.1", "198.51.100.65"
CALLER, CALLEE = "198.51.100.10", "198.51.100.70"


class FakeProgram:
    def __init__(self) -> None:
        self.entries: Dict[Tuple[str, int], Entry] = {}
        self.seen_values: Dict[Tuple[str, int], int] = {}  # what the program wrote
        self.counts: Dict[int, Tuple[int, int, int]] = {}
        self.resets: List[int] = []
        self.verdicts = {r: 0 for r in REASONS}
        self.closed = False
        #: (interface, entries in the map at that moment) per attach
        self.attaches: List[Tuple[str, int]] = []
        self.released = False
        self.checked: List[str] = []
        self.batch_reads = 0
        self.parsed = 0
        self.relay_ips: set = set()

    def put(self, entry: Entry, seen: int = SEEN_NONE) -> None:
        self.entries[entry.relay] = entry
        self.seen_values[entry.relay] = seen

    def remove(self, relay) -> bool:
        return self.entries.pop(relay, None) is not None

    def seen(self, relay) -> int:
        return self.seen_values.get(relay, SEEN_NONE)

    def reset_counter(self, index: int) -> None:
        self.resets.append(index)
        self.counts[index] = (0, 0, 0)

    def read_counter(self, index: int):
        return self.counts.get(index, (0, 0, 0))

    def read_counters(self, indexes):
        self.batch_reads += 1
        return {i: self.counts.get(i, (0, 0, 0)) for i in indexes}

    slot_size = 24

    def read_raw(self, count: int) -> bytes:
        self.batch_reads += 1
        return b"".join(struct.pack("=QQQ", *self.counts.get(i, (0, 0, 0)))
                        for i in range(count))

    def parse_slot(self, raw: bytes, index: int):
        self.parsed += 1
        return struct.unpack_from("=QQQ", raw, index * 24)

    def verdict_counts(self):
        return dict(self.verdicts)

    def configure(self, port_min: int, port_max: int, relay_ips) -> None:
        self.relay_ips = set(relay_ips)

    def owns(self, ip: str) -> bool:
        return ip in self.relay_ips

    def attachable(self, ifname: str) -> int:
        self.checked.append(ifname)
        return 1

    def attach(self, ifname: str, mode: str) -> str:
        self.attaches.append((ifname, len(self.entries)))
        return "native"

    def detach_all(self) -> list:
        return []

    def close(self) -> None:
        self.closed = True

    def release(self) -> None:
        self.released = True


class FakeKernel(KernelView):
    """A KernelPlane's state kept as it keeps it, read through its read-only seam
    (KernelView) as XdpPlane reads the real one."""

    def __init__(self) -> None:
        self.specs: Dict[int, SessionSpec] = {}
        self.streams: Dict[int, StreamSpec] = {}
        self.installed: dict = {}
        self.session_forks: Dict[int, Dict[Tuple[int, int], int]] = {}
        self.fork_of: Dict[int, Tuple[int, int, int]] = {}
        self.sink = lambda event: None
        self.refreshed = 0
        self._next = -1

    def apply(self, actions) -> list:
        for action in actions:
            self._drop(action.sid)
            if isinstance(action, (Install, Update)):
                spec = action.spec
                self.specs[spec.sid] = spec
                for s in spec.streams:
                    uid = unit_id(spec.sid, s.index)
                    self.streams[uid] = s
                    self.installed[uid] = session_spec(s)
                for f in spec.forks:
                    for s in f.streams:
                        uid, self._next = self._next, self._next - 1
                        self.session_forks.setdefault(spec.sid, {})[(f.key, s.index)] = uid
                        self.fork_of[uid] = (spec.sid, f.key, s.index)
                        self.streams[uid] = s
                        self.installed[uid] = fork_spec(s)
        return []

    def _drop(self, sid: int) -> None:
        spec = self.specs.pop(sid, None)
        for uid in self.session_forks.pop(sid, {}).values():
            self.fork_of.pop(uid)
            self.streams.pop(uid)
            self.installed.pop(uid)
        for s in spec.streams if spec else ():
            self.streams.pop(unit_id(sid, s.index))
            self.installed.pop(unit_id(sid, s.index))

    def refresh(self, then) -> None:
        self.refreshed += 1
        then()

    def get_timer(self):
        return None

    def handle_timer(self, now: float) -> None:
        pass

    def media_counters(self) -> dict:
        return {"media.dropped.unexpected_source": 2, "media.received.packets": 5,
                "media.received.bytes": 500}

    async def start(self) -> None:
        pass

    async def stop(self) -> None:
        pass

    def adopted(self) -> None:
        pass


def _stream(index: int, gen_a: int = 0, gen_b: int = 0, base: int = 30000) -> StreamSpec:
    port = base + 4 * index
    return StreamSpec(index,
                      LegSpec("A", RA, port, (CALLER, 4000 + 2 * index), generation=gen_a),
                      LegSpec("B", RB, port + 2, (CALLEE, 5000 + 2 * index), generation=gen_b))


def _plane(events: list):
    prog = FakeProgram()
    plane = XdpPlane(30000, 30099, [RA, RB], ["vc1"], load=lambda **kw: prog)
    plane.kernel = FakeKernel()  # type: ignore[assignment]
    plane.kernel.sink = plane._on_kernel_event
    plane.sink = events.append
    asyncio.run(plane.start())
    return plane, prog


def test_the_program_is_attached_only_after_the_restore_wrote_the_entries():
    """A restart: start checks the interfaces but attaches nothing, the restore installs
    the calls (their entries go into the map), and `adopted` attaches once, with every
    entry there (attached earlier, the program would drop the calls' packets as
    unknown while the kernel path could carry them)."""
    plane, prog = _plane([])
    assert prog.checked == ["vc1"] and prog.attaches == []
    plane.apply([Install(SessionSpec(1, "c", (_stream(0),)))])
    assert prog.attaches == []
    plane.adopted()
    assert prog.attaches == [("vc1", 4)]
    plane.adopted()
    assert len(prog.attaches) == 1, "attached once"


def test_a_stop_that_keeps_calls_leaves_the_program_attached_with_their_entries():
    """SIGTERM with a store: Remove(KEPT) leaves the entries, and the stop releases the
    program without detaching it (it forwards until the next start replaces it); a stop
    with nothing kept detaches and closes."""
    plane, prog = _plane([])
    plane.apply([Install(SessionSpec(1, "c", (_stream(0),)))])
    plane.adopted()
    assert plane.apply([Remove(1, "c", "restart")]) == []
    assert len(prog.entries) == 4, "a kept call's entries stay"
    asyncio.run(plane.stop())
    assert prog.released and not prog.closed
    plane, prog = _plane([])
    plane.apply([Install(SessionSpec(1, "c", (_stream(0),)))])
    plane.adopted()
    plane.apply([Remove(1, "c", "deleted")])
    assert prog.entries == {}
    asyncio.run(plane.stop())
    assert prog.closed and not prog.released


def test_a_call_on_another_nodes_addresses_stays_on_the_kernel_path():
    """A takeover adopts a peer's calls, on the peer's addresses: the program serves only
    this node's (its stream array has no block for others), so such a call gets no entry
    and no counter slot; the kernel path beneath carries it."""
    plane, prog = _plane([])
    other = "198.51.100.129"
    stream = StreamSpec(0, LegSpec("A", other, 30000, (CALLER, 4000)),
                        LegSpec("B", other, 30002, (CALLEE, 5000)))
    assert plane.apply([Install(SessionSpec(1, "c", (stream,)))]) == []
    assert prog.entries == {} and plane.slots == {}
    assert plane.apply([Install(SessionSpec(2, "d", (_stream(0),)))]) == []
    assert len(prog.entries) == 4


def test_entries_from_announced_peers_both_directions_rtp_and_rtcp():
    plane, prog = _plane([])
    spec = SessionSpec(1, "c", (_stream(0), _stream(1)))
    assert plane.apply([Install(spec)]) == []
    assert len(prog.entries) == 8  # 2 streams x (RTP, RTCP) x 2 directions
    e = prog.entries[(RA, 30000)]
    assert (e.source, e.new_src, e.new_dst) == ((CALLER, 4000), (RB, 30002), (CALLEE, 5000))
    assert (e.flags, e.peer) == (F_CHECK_PEER, (RB, 30002))
    rtcp = prog.entries[(RB, 30007)]  # video, leg B, RTCP
    assert (rtcp.source, rtcp.new_src, rtcp.new_dst) == ((CALLEE, 5003), (RA, 30005),
                                                        (CALLER, 4003))
    assert len({x.counter for x in prog.entries.values()}) == 8, "a slot per direction"


def test_a_conntrack_latch_of_the_current_generation_rewrites_both_directions():
    events: list = []
    plane, prog = _plane(events)
    spec = SessionSpec(1, "c", (_stream(0, gen_a=3),))
    plane.apply([Install(spec)])
    stale = StreamReport(0, LegReport(generation=2, latched=(CALLER, 4444)), LegReport())
    plane.kernel.sink(SessionReport(1, None, (stale,)))
    assert prog.entries[(RA, 30000)].source == (CALLER, 4000), "an old generation's latch"
    fresh = StreamReport(0, LegReport(in_packets=1, generation=3, latched=(CALLER, 4444)),
                         LegReport())
    plane.kernel.sink(SessionReport(1, 10.0, (fresh,)))
    a, b = prog.entries[(RA, 30000)], prog.entries[(RB, 30002)]
    assert a.source == (CALLER, 4444)
    assert (b.new_dst, b.flags) == ((CALLER, 4444), 0), "the latch needs no peer check"
    assert prog.entries[(RA, 30001)].source == (CALLER, 4001), "RTCP latches on its own"
    assert events[-1].a.latched == (CALLER, 4444) and events[-1].a.in_packets == 1


def test_every_entry_names_its_reverse_one_and_a_new_destination_forgets_its_nat_mark():
    """The program marks an entry SEEN_PEER_MOVED from its reverse entry (named in every
    entry) when the destination sends from another port; a rewrite to a new destination
    drops that mark and keeps what was seen of the unchanged source."""
    plane, prog = _plane([])
    spec = SessionSpec(1, "c", (_stream(0),))
    plane.apply([Install(spec)])
    a, b = prog.entries[(RA, 30000)], prog.entries[(RB, 30002)]
    assert (a.peer, b.peer) == ((RB, 30002), (RA, 30000))
    assert a.flags == b.flags == F_CHECK_PEER
    # the program: the caller sent exactly (a), the callee from another port (b saw it
    # and marked a)
    prog.seen_values[(RA, 30000)] = SEEN_EXACT | SEEN_PEER_MOVED
    prog.seen_values[(RB, 30002)] = SEEN_OTHER_PORT
    # conntrack learnt the callee's port: a sends there now, b expects it
    latch = StreamReport(0, LegReport(), LegReport(generation=0, latched=(CALLEE, 5555)))
    plane.kernel.sink(SessionReport(1, 10.0, (latch,)))
    a, b = prog.entries[(RA, 30000)], prog.entries[(RB, 30002)]
    assert (a.new_dst, a.flags, a.peer) == ((CALLEE, 5555), 0, (RB, 30002))
    assert prog.seen_values[(RA, 30000)] == SEEN_EXACT  # the NAT mark went with the old port
    assert b.source == (CALLEE, 5555) and prog.seen_values[(RB, 30002)] == SEEN_NONE


def test_reports_add_the_program_counters_and_last_seen():
    events: list = []
    plane, prog = _plane(events)
    plane.apply([Install(SessionSpec(1, "c", (_stream(0),)))])
    slot = {relay: e.counter for relay, e in prog.entries.items()}
    prog.counts[slot[(RA, 30000)]] = (10, 1600, 7_000_000_000)
    prog.counts[slot[(RA, 30001)]] = (1, 52, 6_000_000_000)
    prog.counts[slot[(RB, 30002)]] = (8, 1280, 9_500_000_000)
    base = StreamReport(0, LegReport(in_packets=2, in_bytes=320), LegReport(out_packets=2,
                                                                           out_bytes=320))
    plane.kernel.sink(SessionReport(1, 5.0, (base,)))
    rep = events[-1]
    assert rep.last_rx == 9.5
    assert (rep.a.in_packets, rep.a.in_bytes, rep.a.out_packets, rep.a.out_bytes) == \
        (13, 1972, 8, 1280)
    assert (rep.b.in_packets, rep.b.out_packets, rep.b.out_bytes) == (8, 13, 1972)
    assert rep.a.latched == (CALLER, 4000) and rep.a.rtcp_latched == (CALLER, 4001)
    # refresh reads every session's slots without a kernel report
    prog.counts[slot[(RA, 30000)]] = (11, 1760, 12_000_000_000)
    done: list = []
    plane.refresh(lambda: done.append(1))
    assert done == [1] and events[-1].last_rx == 12.0 and events[-1].a.in_packets == 14


def test_forked_sessions_stay_on_the_kernel_path_until_the_200():
    plane, prog = _plane([])
    fork = ForkSpec(1, "t2", (StreamSpec(0, LegSpec("A", RA, 30010, (CALLER, 4000)),
                                         LegSpec("B", RB, 30002, ("198.51.100.71", 6000))),))
    spec = SessionSpec(1, "c", (_stream(0),), forks=(fork,))
    plane.apply([Install(spec)])
    assert set(prog.entries) == {(RA, 30000), (RA, 30001), (RB, 30002), (RB, 30003),
                                 (RA, 30010), (RA, 30011)}
    assert all(e.flags == F_KERNEL for e in prog.entries.values())
    plane.apply([Update(SessionSpec(1, "c", (_stream(0),)), "B")])
    assert set(prog.entries) == {(RA, 30000), (RA, 30001), (RB, 30002), (RB, 30003)}
    assert not any(e.flags & F_KERNEL for e in prog.entries.values())


def test_remove_frees_entries_and_slots_which_start_from_zero_when_reused():
    plane, prog = _plane([])
    plane.apply([Install(SessionSpec(1, "c", (_stream(0),)))])
    used = sorted(e.counter for e in prog.entries.values())
    plane.apply([Remove(1, "c", "deleted")])
    assert prog.entries == {} and plane.entries == {} and plane.slots == {}
    prog.resets.clear()
    plane.apply([Install(SessionSpec(2, "d", (_stream(1),)))])
    assert sorted(e.counter for e in prog.entries.values()) == used
    assert sorted(prog.resets) == used


def test_relay_counters_add_the_program_verdicts_and_drops():
    plane, prog = _plane([])
    plane.apply([Install(SessionSpec(1, "c", (_stream(0),)))])
    prog.verdicts.update(redirect=40, drop_unexpected_source=3, drop_no_destination=4)
    prog.counts[prog.entries[(RA, 30000)].counter] = (40, 6400, 1)
    plane.refresh(lambda: None)  # the relay refreshes before `stats`
    prog.counts[prog.entries[(RA, 30000)].counter] = (41, 6560, 2)  # not read yet
    total = plane.media_counters()
    assert total["xdp.verdicts.redirect"] == 40
    assert total["media.dropped.unexpected_source"] == 5
    assert total["media.dropped.no_destination"] == 4
    assert (total["media.received.packets"], total["media.received.bytes"]) == (45, 6900)


def test_refresh_reads_the_slots_at_most_every_poll_interval():
    """The relay refreshes before every delete, query and stats: reading every slot each
    time would cost O(sessions) map lookups per request."""
    events: list = []
    plane, prog = _plane(events)
    now = [100.0]
    plane.clock = lambda: now[0]
    plane.apply([Install(SessionSpec(1, "c", (_stream(0),)))])
    plane.refresh(lambda: None)
    plane.refresh(lambda: None)
    assert len(events) == 1 and prog.batch_reads == 1
    now[0] += plane.poll_interval
    slot = next(iter(prog.entries.values())).counter
    prog.counts[slot] = (5, 800, 101_000_000_000)
    plane.refresh(lambda: None)
    assert len(events) == 2 and prog.batch_reads == 2


def test_a_pass_reports_only_sessions_whose_slots_moved():
    """At 100,000 calls a report per call per pass cost seconds: a pass reads every slot
    in one batch and reports the sessions whose counts moved (and each new one once)."""
    events: list = []
    plane, prog = _plane(events)
    now = [100.0]
    plane.clock = lambda: now[0]
    plane.apply([Install(SessionSpec(1, "c", (_stream(0),))),
                 Install(SessionSpec(2, "d", (_stream(0, base=30010),)))])
    plane.refresh(lambda: None)
    assert sorted(e.sid for e in events) == [1, 2]  # each new session once
    now[0] += plane.poll_interval
    plane.refresh(lambda: None)
    assert len(events) == 2, "nothing moved: no report"
    slots = {relay: e.counter for relay, e in prog.entries.items()}
    prog.counts[slots[(RA, 30010)]] = (3, 480, 102_000_000_000)
    now[0] += plane.poll_interval
    plane.refresh(lambda: None)
    assert [e.sid for e in events[2:]] == [2]
    assert events[-1].a.in_packets == 3 and events[-1].last_rx == 102.0


def test_learning_verdicts_bring_the_kernel_read_forward():
    plane, prog = _plane([])
    plane.apply([Install(SessionSpec(1, "c", (_stream(0),)))])
    plane.handle_timer(100.0)
    assert plane.kernel.refreshed == 0
    assert plane.get_timer() == 100.0 + plane.poll_interval
    prog.verdicts["pass_source_port"] = 1
    plane.handle_timer(100.0 + plane.poll_interval)
    assert plane.kernel.refreshed == 1


def test_stop_releases_the_program():
    plane, prog = _plane([])
    plane.apply([Install(SessionSpec(1, "c", (_stream(0),)))])
    asyncio.run(plane.stop())
    assert prog.closed and plane.prog is None and plane.entries == {}


def test_a_batched_pass_parses_only_blocks_that_changed(monkeypatch):
    """Past BATCH_FROM slots a pass reads the whole array and parses only the blocks of
    slots whose bytes changed since the last pass: idle calls cost a compare."""
    import lrk.daemon.xdp_plane as xdp_plane

    monkeypatch.setattr(xdp_plane, "BATCH_FROM", 1)
    monkeypatch.setattr(xdp_plane, "BLOCK_SLOTS", 4)  # one session's 4 directions a block
    events: list = []
    plane, prog = _plane(events)
    now = [100.0]
    plane.clock = lambda: now[0]
    plane.apply([Install(SessionSpec(sid, f"c{sid}", (_stream(0, base=30000 + 8 * sid),)))
                 for sid in (1, 2, 3)])
    plane.refresh(lambda: None)
    assert sorted(e.sid for e in events) == [1, 2, 3] and prog.parsed == 12
    now[0] += plane.poll_interval
    plane.refresh(lambda: None)
    assert len(events) == 3 and prog.parsed == 12, "nothing changed: nothing parsed"
    slot = {relay: e.counter for relay, e in prog.entries.items()}[(RA, 30016)]  # call 2
    prog.counts[slot] = (4, 640, 103_000_000_000)
    now[0] += plane.poll_interval
    plane.refresh(lambda: None)
    assert [e.sid for e in events[3:]] == [2] and prog.parsed == 16  # one block
    assert events[-1].a.in_packets == 4 and events[-1].last_rx == 103.0


def test_a_hold_keeps_what_xdp_counted_in_the_session_counters():
    """B goes on hold (old style, port 0): the entry toward B goes and its slot with it,
    but what that slot counted stays in leg A's counters (they never go back); resumed,
    a fresh slot counts on top."""
    events: list = []
    plane, prog = _plane(events)
    plane.apply([Install(SessionSpec(1, "c", (_stream(0),)))])
    slot = {relay: e.counter for relay, e in prog.entries.items()}
    prog.counts[slot[(RA, 30000)]] = (1000, 160000, 7_000_000_000)
    plane.kernel.sink(SessionReport(1, 5.0, (StreamReport(0, LegReport(), LegReport()),)))
    assert events[-1].a.in_packets == 1000
    s = _stream(0)
    held = StreamSpec(0, s.a, s.b._replace(announced=(CALLEE, 0), rtcp_announced=(CALLEE, 0)))
    plane.apply([Update(SessionSpec(1, "c", (held,)), "B")])
    assert (RA, 30000) not in prog.entries
    plane.kernel.sink(SessionReport(1, 6.0, (StreamReport(0, LegReport(), LegReport()),)))
    assert events[-1].a.in_packets == 1000 and events[-1].a.in_bytes == 160000
    plane.apply([Update(SessionSpec(1, "c", (s,)), "B")])  # resumed: a fresh slot
    fresh = prog.entries[(RA, 30000)].counter
    prog.counts[fresh] = (10, 1600, 8_000_000_000)
    plane.kernel.sink(SessionReport(1, 7.0, (StreamReport(0, LegReport(), LegReport()),)))
    assert events[-1].a.in_packets == 1010
    plane.apply([Remove(1, "c", "deleted")])
    assert plane._carry == {}
