"""Kernel and nfqueue planes across a restart, with fake nft and conntrack: a stop that
keeps calls leaves the table and flows; a start adopts a table of its own layout (the
restored sessions claim their elements, only differences are rewritten), then removes
what no restored session owns (elements, flows) and counts from the adoption on; a table
of another layout, or a start that restores nothing, gets a fresh table."""

from __future__ import annotations

import asyncio
from typing import Any, Dict, List, Optional

from fastpath.contract import (
    Install,
    LegSpec,
    Remove,
    SessionReport,
    SessionSpec,
    StreamSpec,
    unit_id,
)
from fastpath.kernel.ctnetlink import ConntrackError, CtFlow
from fastpath.kernel.kernel_rules import (
    DROP_COUNTERS,
    FORK_MARK_OFFSET,
    KernelRuleset,
    elements,
    parse_table,
)
from fastpath.kernel.kernel_rules import LegSpec as KLeg
from fastpath.kernel.kernel_rules import SessionSpec as KSession
from fastpath.kernel.nft import NftError
from lrk.daemon.kernel_plane import KEPT, KernelPlane, session_spec
from lrk.daemon.nfqueue_plane import NfqueuePlane

RELAY = "198.51.100.1"
CALLER, CALLEE = ("198.51.100.10", 4000), ("198.51.100.20", 5000)
NAT = ("198.51.100.99", 61000)  # where a NATed callee really sends from


def spec(sid: int, port_a: int, port_b: int, callee=CALLEE) -> SessionSpec:
    return SessionSpec(sid, f"c{sid}", (StreamSpec(0, LegSpec("A", RELAY, port_a, CALLER),
                                                   LegSpec("B", RELAY, port_b, callee)),))


def kernel_view(s: SessionSpec) -> KSession:
    view = session_spec(s.streams[0])
    assert view is not None
    return view


class FakeNft:
    """Records every command text; `list table` answers with `table` (None: no table)."""

    backend = "fake"

    def __init__(self, table: Optional[Dict[str, Any]]) -> None:
        self.table = table
        self.runs: List[str] = []

    def run(self, text: str) -> str:
        self.runs.append(text)
        return ""

    def run_json(self, text: str) -> Dict[str, Any]:
        if text.startswith("list table"):
            if self.table is None:
                raise NftError("Error: No such file or directory")
            return self.table
        return {"nftables": [{"counter": {"name": n, "packets": 0, "bytes": 0}}
                             for n in DROP_COUNTERS.values()]}

    def close(self) -> None:
        pass


class FakeCt:
    def __init__(self, flows: List[CtFlow]) -> None:
        self.flows_now = flows
        self.flushed: List[int] = []

    def flush_marks(self, marks: Any) -> None:
        self.flushed.extend(marks)

    def flows(self, filters: Any, timeout: float = 0, max_flows: int = 0) -> List[CtFlow]:
        return list(self.flows_now)

    def close(self) -> None:
        pass


def _part(text: str) -> Any:
    return int(text) if text.isdigit() else text


def _value(text: str) -> Any:
    parts = [_part(p) for p in text.split(" . ")]
    return parts[0] if len(parts) == 1 else {"concat": parts}


def to_json(table: str, layout: int, elems: Dict[str, Dict[str, Optional[str]]]
            ) -> Dict[str, Any]:
    """`nft -j list table` of a table with this layout marker and these elements (maps
    as [key, value] pairs, sets with counters as nft 1.0.6 prints them)."""
    objs: List[Dict[str, Any]] = [
        {"table": {"family": "inet", "name": table}},
        {"set": {"family": "inet", "name": "layout", "table": table, "type": "mark",
                 "elem": [layout]}},
        {"rule": {"family": "inet", "table": table, "chain": "pre_nat"}}]
    for name, items in elems.items():
        if any(v is not None for v in items.values()):
            objs.append({"map": {"name": name, "table": table, "elem": [
                [_value(k), _value(v)] for k, v in items.items() if v is not None]}})
        else:
            objs.append({"set": {"name": name, "table": table, "elem": [
                {"elem": {"val": _value(k), "counter": {"packets": 1, "bytes": 2}}}
                for k in items]}})
    return {"nftables": objs}


def listing(rules: KernelRuleset, *specs: KSession, layout: Optional[int] = None,
            extra: Optional[Dict[str, Dict[str, Optional[str]]]] = None) -> Dict[str, Any]:
    """What `nft -j list table` shows of a table holding these sessions' elements."""
    elems: Dict[str, Dict[str, Optional[str]]] = {}
    for s in specs:
        for name, items in elements(s, rules.seen).items():
            elems.setdefault(name, {}).update(items)
    for name, items in (extra or {}).items():
        elems.setdefault(name, {}).update(items)
    return to_json(rules.table, rules.layout if layout is None else layout, elems)


def flow(mark: int, relay_port: int, src, packets: int) -> CtFlow:
    return CtFlow(mark, 17, src[0], src[1], RELAY, relay_port, replied=True,
                  reply_src=CALLEE[0], reply_sport=CALLEE[1], reply_dst=RELAY,
                  reply_dport=relay_port + 2, orig_packets=packets, orig_bytes=packets * 200,
                  reply_packets=packets, reply_bytes=packets * 200, id=mark, start=1)


def adopting(plane: KernelPlane, table: Optional[Dict[str, Any]],
             flows: List[CtFlow]) -> FakeNft:
    nft = FakeNft(table)
    plane.nft = nft  # type: ignore[assignment]
    plane.ct = plane.ct_dump = FakeCt(flows)  # type: ignore[assignment]
    plane._open_table()
    return nft


def test_the_layout_marker_names_the_ruleset():
    rules = KernelRuleset(port_start=31000, port_end=31099, relay_ips=[RELAY])
    same = KernelRuleset(port_start=31000, port_end=31099, relay_ips=[RELAY])
    assert rules.layout == same.layout
    assert f"set layout {{ type mark; elements = {{ {rules.layout} }} }}" in rules.create()
    for other in (KernelRuleset(port_start=31000, port_end=31199, relay_ips=[RELAY]),
                  KernelRuleset(port_start=31000, port_end=31099, relay_ips=["198.51.100.2"]),
                  KernelRuleset(port_start=31000, port_end=31099, relay_ips=[RELAY],
                                counters="conntrack"),
                  KernelRuleset(port_start=31000, port_end=31099, relay_ips=[RELAY], queue=0,
                                queue_chain=True),
                  KernelRuleset(port_start=31000, port_end=31099, relay_ips=[RELAY], queue=0,
                                queue_bypass=True, queue_chain=True)):
        assert other.layout != rules.layout


def test_a_listing_reads_back_as_the_elements_that_were_written():
    rules = KernelRuleset(port_start=31000, port_end=31099, relay_ips=[RELAY, "2001:db8::1"])
    four = kernel_view(spec(1, 31000, 31002))
    six = KSession(KLeg("2001:db8::1", 31010, "2001:db8::10", 4000),
                   KLeg("2001:db8::1", 31012, "2001:db8::20", 5000))
    table = parse_table(listing(rules, four, six))
    assert table.layout == rules.layout
    want = {**elements(four), **elements(six)}
    assert {k: v for k, v in table.elements.items() if v} == want


def test_a_start_adopts_its_table_and_removes_what_the_store_does_not_know():
    rules_plane = KernelPlane(31000, 31099, [RELAY], adopt=True)
    kept, gone = spec(1, 31000, 31002), spec(2, 31004, 31006)
    table = listing(rules_plane.rules, kernel_view(kept), kernel_view(gone))
    flows = [flow(31000, 31000, CALLER, 50), flow(31004, 31004, CALLER, 7)]
    nft = adopting(rules_plane, table, flows)
    plane = rules_plane
    assert nft.runs == [], "the table is kept, nothing re-created"
    assert plane.apply([Install(kept)]) == []
    assert nft.runs == [], "the restored call's elements are there already"
    plane.adopted()
    assert len(nft.runs) == 1
    removed = nft.runs[0]
    assert all(line.startswith("delete element inet lrk ") for line in removed.splitlines())
    assert "31004" in removed and "31006" in removed and "31000" not in removed
    assert plane.ct.flushed == [31004]  # type: ignore[union-attr]
    assert plane.counters["kernel.sessions.adopted"] == 1
    assert plane.counters["kernel.adopt.removed_elements"] == sum(
        len(v) for v in elements(kernel_view(gone), seen=False).values())
    # counters count from the adoption: the 50 packets before it are the store's
    events: List[Any] = []
    plane.sink = events.append
    plane.ct_dump.flows_now = [flow(31000, 31000, CALLER, 55)]  # type: ignore[union-attr]
    plane._poll()
    report = [e for e in events if isinstance(e, SessionReport)][-1]
    assert (report.streams[0].a.in_packets, report.streams[0].b.in_packets) == (5, 5)
    assert report.streams[0].a.latched == CALLER


def test_an_element_that_differs_is_rewritten_and_the_rest_left_alone():
    plane = KernelPlane(31000, 31099, [RELAY], adopt=True)
    old = kernel_view(spec(1, 31000, 31002, callee=("198.51.100.21", 5000)))
    nft = adopting(plane, listing(plane.rules, old), [])
    assert plane.apply([Install(spec(1, 31000, 31002))]) == []
    text = nft.runs[0]
    assert "delete element inet lrk fwd4 { 198.51.100.1 . 31000, 198.51.100.1 . 31001 }" in text
    assert ("add element inet lrk fwd4 { 198.51.100.1 . 31000 : 198.51.100.20 . 5000, "
            "198.51.100.1 . 31001 : 198.51.100.20 . 5001 }") in text
    assert "mark4" not in text and "out4" not in text  # unchanged: not touched
    plane.adopted()
    # the old callee's admission element is no session's now
    assert nft.runs[-1] == ("delete element inet lrk adm4 { 198.51.100.1 . 31002 . "
                            "198.51.100.21, 198.51.100.1 . 31003 . 198.51.100.21 }\n")


def test_a_table_of_another_layout_or_none_is_created_afresh():
    for table in (None, listing(KernelRuleset(port_start=31000, port_end=31099,
                                              relay_ips=[RELAY]), layout=7)):
        plane = KernelPlane(31000, 31099, [RELAY], adopt=True)
        # a leftover flow of lrk (and a fork's), and one with a mark outside lrk's ranges
        left = [flow(31004, 31004, ("198.51.100.20", 4000), 3),
                flow(31004 + FORK_MARK_OFFSET, 31006, ("198.51.100.21", 4000), 1),
                flow(29000, 31004, ("198.51.100.20", 4002), 1)]
        nft = adopting(plane, table, left)
        assert nft.runs == [plane.rules.create()]
        # only the marks a dump found are flushed (one flush walks all of conntrack)
        assert plane.ct.flushed == [31004, 31004 + FORK_MARK_OFFSET]  # type: ignore[union-attr]


def test_a_fresh_table_flushes_every_mark_when_the_dump_fails():
    plane = KernelPlane(31000, 31099, [RELAY, "198.51.100.2"], adopt=True,
                        mark_slots=[RELAY, "198.51.100.2"])
    nft = FakeNft(None)
    plane.nft = nft  # type: ignore[assignment]
    plane.ct = FakeCt([])  # type: ignore[assignment]

    class Broken(FakeCt):
        def flows(self, filters: Any, timeout: float = 0, max_flows: int = 0) -> List[CtFlow]:
            raise ConntrackError("dump refused")

    plane.ct_dump = Broken([])  # type: ignore[assignment]
    plane._open_table()
    flushed = plane.ct.flushed  # type: ignore[union-attr]
    # two slots of 100 marks, and their forks' (offset 2 x 0x10000)
    assert len(flushed) == 400
    assert flushed[:2] == [31000, 31001] and 31000 + 0x10000 in flushed
    assert 31000 + 0x20000 in flushed and 31099 + 0x30000 in flushed


def test_without_a_store_the_table_is_never_adopted():
    plane = KernelPlane(31000, 31099, [RELAY])
    nft = adopting(plane, listing(plane.rules, kernel_view(spec(1, 31000, 31002))), [])
    assert nft.runs == [plane.rules.create()]


def test_nothing_restored_means_a_fresh_table():
    plane = KernelPlane(31000, 31099, [RELAY], adopt=True)
    nft = adopting(plane, listing(plane.rules, kernel_view(spec(1, 31000, 31002))),
                   [flow(31000, 31000, CALLER, 3)])
    plane.adopted()
    assert nft.runs == [plane.rules.create()]
    assert 31000 in plane.ct.flushed  # type: ignore[union-attr]


def test_a_stop_that_keeps_the_calls_leaves_table_and_flows():
    plane = KernelPlane(31000, 31099, [RELAY])
    nft = adopting(plane, None, [])
    plane.apply([Install(spec(1, 31000, 31002))])
    ct = plane.ct
    nft.runs.clear()
    ct.flushed.clear()  # type: ignore[union-attr]
    assert plane.apply([Remove(1, "c1", KEPT)]) == []
    asyncio.run(plane.stop())
    assert nft.runs == [] and ct.flushed == []  # type: ignore[union-attr]
    # a stop that ends the calls removes everything
    plane = KernelPlane(31000, 31099, [RELAY])
    nft = adopting(plane, None, [])
    plane.apply([Install(spec(1, 31000, 31002))])
    ct = plane.ct
    plane.apply([Remove(1, "c1", "deleted")])
    asyncio.run(plane.stop())
    assert nft.runs[-1] == plane.rules.destroy()
    assert 31000 in ct.flushed  # type: ignore[union-attr]


def test_nfqueue_adoption_takes_back_admissions_and_latches():
    """Both legs were admitted before the restart, the callee from behind a NAT: the adm
    elements are the plane's again (removed with the session), each leg latched to where
    the other leg's forwarding element sends, and no element is rewritten."""
    plane = NfqueuePlane(31000, 31099, [RELAY], adopt=True)
    view = kernel_view(spec(1, 31000, 31002))
    natted = KSession(view.a, KLeg(RELAY, 31002, NAT[0], NAT[1], peer_rtcp_port=NAT[1] + 1))
    nft = adopting(plane, listing(plane.rules, natted), [])
    assert plane.apply([Install(spec(1, 31000, 31002))]) == []
    assert nft.runs == [], "the elements are right already"
    uid = unit_id(1, 0)
    assert plane.latched == {(uid, "A", False): CALLER, (uid, "A", True): (CALLER[0], 4001),
                             (uid, "B", False): NAT, (uid, "B", True): (NAT[0], NAT[1] + 1)}
    plane.adopted()
    assert nft.runs == [], "every element belongs to the restored call"
    assert plane.admitted[uid] == {f"adm4 {{ {RELAY} . {port} . {ip} }}" for port, ip in (
        (31000, CALLER[0]), (31001, CALLER[0]), (31002, NAT[0]), (31003, NAT[0]))}
    plane.apply([Remove(1, "c1", "deleted")])
    assert any(f"delete element inet lrk adm4 {{ {RELAY} . 31002 . {NAT[0]} }}" in run
               for run in nft.runs), nft.runs


def test_nfqueue_adoption_finds_admissions_of_both_families():
    """An IPv6 call restored after an IPv4 one gets its admissions and latches back too."""
    relay6, caller6, callee6 = "2001:db8::1", ("2001:db8::10", 4000), ("2001:db8::20", 5000)
    plane = NfqueuePlane(31000, 31099, [RELAY, relay6], adopt=True)
    four = spec(1, 31000, 31002)
    six = SessionSpec(2, "c2", (StreamSpec(0, LegSpec("A", relay6, 31010, caller6),
                                           LegSpec("B", relay6, 31012, callee6)),))
    nft = adopting(plane, listing(plane.rules, kernel_view(four), kernel_view(six)), [])
    assert plane.apply([Install(four), Install(six)]) == []
    plane.adopted()
    assert nft.runs == []
    assert plane.latched[(unit_id(2, 0), "B", False)] == callee6
    assert plane.admitted[unit_id(2, 0)] == {
        f"adm6 {{ {relay6} . {port} . {ip} }}" for port, ip in (
            (31010, caller6[0]), (31011, caller6[0]), (31012, callee6[0]),
            (31013, callee6[0]))}


def test_same_port_on_two_addresses_gets_two_mark_sets_and_an_adopted_table_keeps_them():
    """Several addresses per side: each relay address its own ct mark slot, so two calls
    on the same port numbers of different addresses own different flows."""
    other = "198.51.100.2"
    slots = [RELAY, other]

    def on(sid: int, ip: str) -> SessionSpec:
        return SessionSpec(sid, f"c{sid}", (StreamSpec(0, LegSpec("A", ip, 31000, CALLER),
                                                       LegSpec("B", ip, 31002, CALLEE)),))

    plane = KernelPlane(31000, 31099, slots, adopt=True, mark_slots=slots)
    adopting(plane, None, [])
    assert plane.apply([Install(on(1, RELAY)), Install(on(2, other))]) == []
    one, two = (plane.installed[unit_id(sid, 0)] for sid in (1, 2))
    assert [one.a.rtp_mark, one.b.rtp_mark] == [31000, 31002]  # slot 0: marks = ports
    assert [two.a.rtp_mark, two.b.rtp_mark] == [31000 + 0x10000, 31002 + 0x10000]
    owners = plane._owners()
    assert len(owners) == 8 and owners[31000 + 0x10000][3] == (other, 31000)
    # a flow of each: counted for its own session only
    flows = [flow(31000, 31000, CALLER, 3),
             CtFlow(31000 + 0x10000, 17, CALLER[0], CALLER[1], other, 31000, replied=False,
                    orig_packets=5, orig_bytes=1000, id=9, start=1)]
    totals = plane._flow_totals(flows, owners)
    assert totals[unit_id(1, 0)] == (3, 600, 3, 600)
    assert totals[unit_id(2, 0)] == (5, 1000, 0, 0)
    plane.ct.flushed.clear()  # type: ignore[union-attr]
    plane.apply([Remove(2, "c2", "deleted")])
    assert plane.ct.flushed == [31000 + 0x10000, 31001 + 0x10000,  # type: ignore[union-attr]
                                31002 + 0x10000, 31003 + 0x10000]
    # a restart: the slotted table adopted, a foreign-slot stray flow flushed
    again = KernelPlane(31000, 31099, slots, adopt=True, mark_slots=slots)
    stray = CtFlow(31004 + 0x10000, 17, CALLER[0], CALLER[1], other, 31004, id=11, start=1)
    nft = adopting(again, listing(again.rules, kernel_view_in(again, on(1, RELAY))),
                   [flow(31000, 31000, CALLER, 3), stray])
    again.apply([Install(on(1, RELAY))])
    assert nft.runs == []  # claimed: nothing rewritten
    again.adopted()
    assert again.ct.flushed == [31004 + 0x10000]  # type: ignore[union-attr]


def kernel_view_in(plane: KernelPlane, s: SessionSpec) -> KSession:
    view = session_spec(s.streams[0], plane.rules)
    assert view is not None
    return view


def test_a_poll_reports_only_units_that_changed():
    """At 100,000 calls most units carry no change between two reads: they are not
    reported again (the engine holds their last report); a change, or any action on the
    unit (the engine may count from a new base), reports it again."""
    plane = KernelPlane(31000, 31099, [RELAY], counters="conntrack")
    reports: List[SessionReport] = []
    plane.sink = reports.append
    adopting(plane, None, [])
    plane.ct.flows_now = []  # type: ignore[union-attr]
    assert plane.apply([Install(spec(1, 31000, 31002)), Install(spec(2, 31004, 31006))]) == []
    ct = plane.ct
    assert ct is not None
    ct.flows_now = [flow(31000, 31000, CALLER, 3)]  # type: ignore[attr-defined]
    plane._poll(10.0)
    assert sorted(r.sid for r in reports) == [1, 2]  # the first read: everything
    reports.clear()
    plane._poll(11.0)
    assert reports == []  # nothing moved
    ct.flows_now = [flow(31000, 31000, CALLER, 5)]  # type: ignore[attr-defined]
    plane._poll(12.0)
    assert [r.sid for r in reports] == [1]
    assert reports[0].streams[0].a.in_packets == 5
    reports.clear()
    plane.apply([Install(spec(2, 31004, 31006, callee=NAT))])  # re-pointed: reported again
    plane._poll(13.0)
    assert [r.sid for r in reports] == [2]


def test_the_owner_map_is_kept_up_to_date_not_rebuilt():
    plane = KernelPlane(31000, 31099, [RELAY])
    adopting(plane, None, [])
    plane.apply([Install(spec(1, 31000, 31002)), Install(spec(2, 31004, 31006))])
    owners = plane._owners()
    plane.apply([Install(spec(3, 31008, 31010)),
                 Install(SessionSpec(1, "c1", (StreamSpec(0, LegSpec("A", RELAY, 31012, CALLER),
                                                          LegSpec("B", RELAY, 31002, CALLEE)),))),
                 Remove(2, "c2", "deleted")])
    assert plane._owners() is owners  # the same map, changed in place
    plane._owner_map = None
    assert plane._owners() == owners  # what a rebuild gives
    assert sorted(owners) == [31002, 31003, 31008, 31009, 31010, 31011, 31012, 31013]
