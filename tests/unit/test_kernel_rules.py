"""Tests of fastpath.kernel.kernel_rules: the generated nft text and the parsers of its listings.

The rules in a real kernel (root only, in namespaces of their own):
tests/netns/test_kernel_rules_netns.py.
"""

from __future__ import annotations

from typing import Any, Dict, List

import pytest

from fastpath.kernel.kernel_rules import (
    DROP_COUNTERS,
    FORK_MARK_OFFSET,
    MARK_SLOT,
    ForkSpec,
    KernelRuleError,
    KernelRuleset,
    LegSpec,
    SessionSpec,
    conntrack_marks,
    elements,
    install_commands,
    parse_counters,
    parse_drop_counter,
    remove_commands,
    update_commands,
)

A4, B4, PA4, PB4 = "198.51.100.1", "198.51.100.65", "198.51.100.10", "198.51.100.70"
A6, B6, PA6, PB6 = "2001:db8:1::1", "2001:db8:2::1", "2001:db8:1::10", "2001:db8:2::70"


def session4(**b_overrides: Any) -> SessionSpec:
    b = dict(relay_ip=B4, relay_port=30002, peer_ip=PB4, peer_port=5000)
    b.update(b_overrides)
    return SessionSpec(LegSpec(A4, 30000, PA4, 4000), LegSpec(**b))


def session6() -> SessionSpec:
    return SessionSpec(LegSpec(A6, 30000, PA6, 4000), LegSpec(B6, 30002, PB6, 5000))


def ruleset(**kw: Any) -> KernelRuleset:
    args: Dict[str, Any] = dict(port_start=30000, port_end=30999, relay_ips=[A4, B4, A6, B6])
    args.update(kw)
    return KernelRuleset(**args)


# -- generated text -------------------------------------------------------------

GOLDEN_INSTALL4 = """\
add element inet lrk fwd4 { 198.51.100.1 . 30000 : 198.51.100.70 . 5000, \
198.51.100.1 . 30001 : 198.51.100.70 . 5001, 198.51.100.65 . 30002 : 198.51.100.10 . 4000, \
198.51.100.65 . 30003 : 198.51.100.10 . 4001 }
add element inet lrk mark4 { 198.51.100.1 . 30000 : 30000, 198.51.100.1 . 30001 : 30001, \
198.51.100.65 . 30002 : 30002, 198.51.100.65 . 30003 : 30003 }
add element inet lrk out4 { 30000 : 198.51.100.65 . 30002, 30001 : 198.51.100.65 . 30003, \
30002 : 198.51.100.1 . 30000, 30003 : 198.51.100.1 . 30001 }
add element inet lrk adm4 { 198.51.100.1 . 30000 . 198.51.100.10, \
198.51.100.1 . 30001 . 198.51.100.10, 198.51.100.65 . 30002 . 198.51.100.70, \
198.51.100.65 . 30003 . 198.51.100.70 }
add element inet lrk seen4 { 198.51.100.1 . 30000, 198.51.100.1 . 30001, \
198.51.100.65 . 30002, 198.51.100.65 . 30003 }
"""


def test_install_v4_matches_the_validated_design_plus_rtcp():
    assert install_commands(session4()) == GOLDEN_INSTALL4
    assert ruleset().install_commands(session4()) == GOLDEN_INSTALL4


def test_install_v6_uses_the_6_maps_and_normalised_addresses():
    spec = SessionSpec(
        LegSpec("2001:DB8:1:0::1", 30000, "2001:db8:1:0:0::10", 4000),
        LegSpec(B6, 30002, PB6, 5000),
    )
    assert spec.a.relay_ip == A6 and spec.a.peer_ip == PA6
    text = install_commands(spec, table="media")
    assert "4 {" not in text
    assert text.splitlines()[0] == (
        "add element inet media fwd6 { 2001:db8:1::1 . 30000 : 2001:db8:2::70 . 5000, "
        "2001:db8:1::1 . 30001 : 2001:db8:2::70 . 5001, "
        "2001:db8:2::1 . 30002 : 2001:db8:1::10 . 4000, "
        "2001:db8:2::1 . 30003 : 2001:db8:1::10 . 4001 }"
    )
    assert "add element inet media adm6 { 2001:db8:1::1 . 30000 . 2001:db8:1::10," in text
    assert "add element inet media out6 { 30000 : 2001:db8:2::1 . 30002," in text


def test_rtcp_is_plus_one_unless_the_peer_announced_a_rtcp_port():
    els = elements(session4(peer_rtcp_port=6001))
    assert els["fwd4"][f"{A4} . 30001"] == f"{PB4} . 6001"  # a=rtcp of B's peer
    assert els["fwd4"][f"{B4} . 30003"] == f"{PA4} . 4001"  # A's peer: port + 1
    assert els["mark4"][f"{A4} . 30001"] == "30001"
    assert els["out4"]["30001"] == f"{B4} . 30003"


def test_a_peer_on_hold_gets_nothing_and_its_music_goes_through():
    """Old-style hold (c=0.0.0.0): leg B's peer port is 0 and its address the one from
    before the hold. What B's phone sends (music on hold) is admitted from that address
    and forwarded to A's peer; nothing is forwarded toward B (A's packets meet the
    unadmitted rule: dropped and counted)."""
    spec = session4(peer_port=0)
    assert spec.b.held and not spec.a.held and spec.b.peer(True) == (PB4, 0)
    els = elements(spec)
    assert els["fwd4"] == {f"{B4} . 30002": f"{PA4} . 4000", f"{B4} . 30003": f"{PA4} . 4001"}
    assert els["adm4"] == {f"{B4} . 30002 . {PB4}": None, f"{B4} . 30003 . {PB4}": None}
    assert els["mark4"] == {f"{B4} . 30002": "30002", f"{B4} . 30003": "30003"}
    assert els["out4"] == {"30002": f"{A4} . 30000", "30003": f"{A4} . 30001"}
    assert not any(A4 + " . " in key for table in els.values() for key in table)
    # resumed: both ways again (what an update installs)
    assert elements(session4()) == elements(session4(peer_port=5000))


def test_explicit_marks_replace_the_relay_port():
    spec = session4(mark=0x10000 + 30002)
    els = elements(spec)
    assert els["mark4"][f"{B4} . 30003"] == str(0x10000 + 30003)
    assert els["out4"][str(0x10000 + 30002)] == f"{A4} . 30000"
    assert conntrack_marks(spec) == [30000, 30001, 0x10000 + 30002, 0x10000 + 30003]


@pytest.mark.parametrize(
    "a, b",
    [
        (LegSpec(A4, 30000, PA4, 4000), LegSpec(B6, 30002, PB6, 5000)),
        (LegSpec(A6, 30000, PA6, 4000), LegSpec(B4, 30002, PB4, 5000)),
    ],
)
def test_legs_of_different_families_are_refused(a, b):
    with pytest.raises(KernelRuleError, match="both legs in one family"):
        SessionSpec(a, b)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(relay_ip=A4, relay_port=30000, peer_ip=PA6, peer_port=1), "is IPv4 but its peer"),
        (dict(relay_ip="198.51.100.300", relay_port=30000, peer_ip=PA4, peer_port=1), "not an"),
        (dict(relay_ip=A4, relay_port=65535, peer_ip=PA4, peer_port=1), "relay_port"),
        (dict(relay_ip=A4, relay_port=30000, peer_ip=PA4, peer_port=-1), "peer_port"),  # 0: on hold
        (dict(relay_ip=A4, relay_port=True, peer_ip=PA4, peer_port=1), "relay_port"),
        (dict(relay_ip=A4, relay_port=30000, peer_ip=PA4, peer_port=1, mark=0), "mark"),
    ],
)
def test_bad_legs_are_refused(kwargs, match):
    with pytest.raises(KernelRuleError, match=match):
        LegSpec(**kwargs)


def test_legs_sharing_a_relay_port_or_mark_are_refused():
    with pytest.raises(KernelRuleError, match="share relay address"):
        SessionSpec(LegSpec(A4, 30000, PA4, 4000), LegSpec(A4, 30000, PB4, 5000))
    with pytest.raises(KernelRuleError, match="marks"):
        SessionSpec(LegSpec(A4, 30000, PA4, 4000), LegSpec(B4, 30001 + 1, PB4, 5000, mark=30001))


def test_peer_rtcp_port_past_65535_is_reported():
    with pytest.raises(KernelRuleError, match="peer_rtcp_port"):
        elements(session4(peer_port=65535))


def test_batched_install_merges_sessions_and_refuses_conflicts():
    other = SessionSpec(LegSpec(A4, 30004, PA4, 4100), LegSpec(B4, 30006, PB4, 5100))
    text = install_commands(session4(), other, session4())  # a duplicate is harmless
    assert len(text.splitlines()) == 5  # one statement per set for the whole batch
    assert text.count(" : ") == 3 * 8  # fwd, mark, out: 8 elements each
    clash = SessionSpec(LegSpec(A4, 30000, PA4, 4000), LegSpec(B4, 30008, PB4, 5000))
    with pytest.raises(KernelRuleError, match="same relay port"):
        install_commands(session4(), clash)


def test_remove_deletes_exactly_the_installed_keys():
    text = remove_commands(session4())
    keys = f"{A4} . 30000, {A4} . 30001, {B4} . 30002, {B4} . 30003"
    assert text.splitlines() == [
        f"delete element inet lrk fwd4 {{ {keys} }}",
        f"delete element inet lrk mark4 {{ {keys} }}",
        "delete element inet lrk out4 { 30000, 30001, 30002, 30003 }",
        f"delete element inet lrk adm4 {{ {A4} . 30000 . {PA4}, {A4} . 30001 . {PA4}, "
        f"{B4} . 30002 . {PB4}, {B4} . 30003 . {PB4} }}",
        f"delete element inet lrk seen4 {{ {keys} }}",
    ]


def test_idempotent_remove_re_adds_then_deletes():
    text = remove_commands(session4(), idempotent=True)
    lines = text.splitlines()
    assert lines[:5] == GOLDEN_INSTALL4.splitlines()
    assert lines[5:] == remove_commands(session4()).splitlines()


def test_update_touches_only_what_changed():
    old = session4()
    assert update_commands(old, old) == ""
    # B's peer moves port only: A's fwd entries point elsewhere, nothing else changes
    text = update_commands(old, session4(peer_port=5008))
    assert text.splitlines() == [
        f"delete element inet lrk fwd4 {{ {A4} . 30000, {A4} . 30001 }}",
        f"add element inet lrk fwd4 {{ {A4} . 30000 : {PB4} . 5008, {A4} . 30001 : {PB4} . 5009 }}",
    ]
    # B's peer moves address: also its admission entries
    text = update_commands(old, session4(peer_ip="198.51.100.71"))
    assert [line.split(" {")[0] for line in text.splitlines()] == [
        "delete element inet lrk fwd4",
        "delete element inet lrk adm4",
        "add element inet lrk fwd4",
        "add element inet lrk adm4",
    ]
    assert "198.51.100.65 . 30002 . 198.51.100.71" in text


def test_update_to_another_relay_port_moves_every_set_of_that_leg():
    text = update_commands(session4(), session4(relay_port=30010))
    assert f"{B4} . 30002" in text.splitlines()[0]  # deletes first
    assert text.index("delete") < text.index("add")
    added = "".join(line for line in text.splitlines() if line.startswith("add"))
    for name in ("fwd4", "mark4", "out4", "adm4", "seen4"):
        assert f"add element inet lrk {name} " in added
    assert f"{A4} . 30000 : {PB4} . 5000" not in added  # A's forward target is unchanged


def test_create_is_idempotent_and_scoped_to_relay_ips_and_ports():
    rs = ruleset(relay_ips=[A4, "2001:DB8:1::1"], port_start=20000, port_end=20099)
    text = rs.create()
    lines = text.splitlines()
    assert lines[:3] == ["add table inet lrk", "delete table inet lrk", "table inet lrk {"]
    assert "  set relay_ips4 { type ipv4_addr; elements = { 198.51.100.1 } }" in lines
    assert "  set relay_ips6 { type ipv6_addr; elements = { 2001:db8:1::1 } }" in lines
    for expected in (
        "    ip daddr @relay_ips4 udp dport 20000-20099 jump media4",
        "    ip6 daddr @relay_ips6 udp dport 20000-20099 jump media6",
        "    ct mark != 0 ip daddr . udp dport @seen4",
        "    ct state new ip daddr . udp dport . ip saddr @adm4 "
        "ct mark set ip daddr . udp dport map @mark4",
        '    ct state new ct mark 0 counter name "unexpected4" drop '
        'comment "lrk: unadmitted new flow ipv4, media.dropped.unexpected_source"',
        "    ip6 daddr @relay_ips6 udp dport 20000-20099 "
        "dnat ip6 to ip6 daddr . udp dport map @fwd6",
        "    meta nfproto ipv4 meta l4proto udp ct mark { 20000-20099, 85536-85635 } "
        "snat ip to ct mark map @out4",
        "    meta nfproto ipv6 meta l4proto udp ct mark { 20000-20099, 85536-85635 } "
        "snat ip6 to ct mark map @out6",
        # forked INVITEs: a further callee on the shared B port, by source address
        "    ct state new ct mark set ip daddr . udp dport . ip saddr . udp sport map @fmark4",
        "    ip daddr @relay_ips4 udp dport 20000-20099 dnat ip to ct mark map @ffwd4",
    ):
        assert expected in lines
    assert "  set seen6 { type ipv6_addr . inet_service; counter; }" in lines
    assert "  counter unexpected6 { }" in lines
    assert rs.create() == text
    assert rs.destroy() == "add table inet lrk\ndelete table inet lrk\n"


def test_conntrack_counting_ruleset_admits_in_the_nat_chain_only():
    rs = ruleset(counters="conntrack")
    lines = rs.create().splitlines()
    assert "  chain pre_filter {" not in lines and not any("seen" in x for x in lines)
    nat = lines.index("  chain pre_nat {")
    assert lines[nat + 1:nat + 4] == [
        "    type nat hook prerouting priority dstnat; policy accept;",
        "    ip daddr @relay_ips4 udp dport 30000-30999 jump media4",  # before the DNAT
        "    ip6 daddr @relay_ips6 udp dport 30000-30999 jump media6"]
    assert lines[nat + 4].startswith("    ip daddr @relay_ips4 udp dport 30000-30999 dnat")
    # admission, the drop counter and NAT are those of the rules variant
    rules = ruleset().create().splitlines()
    start, end = rules.index("  chain pre_filter {"), rules.index("  chain media4 {")
    def same(text):  # the layout markers differ: the rulesets do
        return [x for x in text if "seen" not in x and "set layout" not in x]

    assert same(rules[:start] + rules[end:]) == same(lines[:nat + 2] + lines[nat + 4:])
    # no seen elements in install, update or remove
    spec, moved = session4(), session4(peer_port=5002)
    assert rs.install_commands(spec) == GOLDEN_INSTALL4.split("add element inet lrk seen4")[0]
    for text in (rs.update_commands(spec, moved), rs.remove_commands(spec, idempotent=True)):
        assert text and "seen" not in text
    with pytest.raises(KernelRuleError, match="counters"):
        ruleset(counters="packets")
    with pytest.raises(KernelRuleError, match="NFQUEUE"):
        ruleset(counters="conntrack", queue=1)


def test_uncounted_ruleset_is_the_conntrack_one():
    """counters="none" only tells the daemon to leave accounting off: the table, its layout
    (a restart adopts across the change) and every element command are conntrack's."""
    counted, uncounted = ruleset(counters="conntrack"), ruleset(counters="none")
    assert not uncounted.seen
    assert uncounted.create() == counted.create() and uncounted.layout == counted.layout
    spec, moved = session4(), session4(peer_port=5002)
    assert uncounted.install_commands(spec) == counted.install_commands(spec)
    assert uncounted.update_commands(spec, moved) == counted.update_commands(spec, moved)
    assert (uncounted.remove_commands(spec, idempotent=True)
            == counted.remove_commands(spec, idempotent=True))
    with pytest.raises(KernelRuleError, match="NFQUEUE"):
        ruleset(counters="none", queue=1)


def test_relay_ips_of_one_family_leave_the_other_set_empty():
    text = ruleset(relay_ips=[A4]).create()
    assert "  set relay_ips6 { type ipv6_addr; }" in text.splitlines()


@pytest.mark.parametrize("bypass, verdict", [(True, "queue num 7 bypass"), (False, "queue num 7")])
def test_nfqueue_variant_queues_unadmitted_new_flows(bypass, verdict):
    text = ruleset(queue=7, queue_bypass=bypass).create()
    assert " drop " not in text
    for fam in (4, 6):
        rule = (
            f'    ct state new ct mark 0 counter name "unexpected{fam}" {verdict} '
            f'comment "lrk: unadmitted new flow ipv{fam}, to NFQUEUE"'
        )
        assert rule in text.splitlines()


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(port_start=30000, port_end=30000), "port range"),
        (dict(port_start=0), "port_start"),
        (dict(relay_ips=[]), "relay_ips is empty"),
        (dict(relay_ips="198.51.100.1"), "list of addresses"),
        (dict(relay_ips=["example.org"]), "relay IP"),
        (dict(table="lrk; flush ruleset"), "table name"),
        (dict(queue=70000), "queue number"),
    ],
)
def test_bad_ruleset_parameters_are_refused(kwargs, match):
    with pytest.raises(KernelRuleError, match=match):
        ruleset(**kwargs)


def test_ruleset_refuses_sessions_it_would_not_forward():
    rs = ruleset(relay_ips=[A4, B4], port_start=30000, port_end=30003)
    rs.check(session4())
    with pytest.raises(KernelRuleError, match="port range"):
        rs.install_commands(session4(relay_port=30004))
    with pytest.raises(KernelRuleError, match="relay IPs"):
        rs.install_commands(session4(relay_ip="198.51.100.66"))
    with pytest.raises(KernelRuleError, match="mark range"):
        rs.update_commands(session4(), session4(mark=40000))


def test_standby_ranges_join_the_ruleset_and_change_its_layout():
    """A standby's peers' media (address, ports): served after a takeover; a ruleset
    without them keeps the text (so the layout) of before."""
    plain = ruleset(relay_ips=[A4], port_start=34000, port_end=37999)
    rs = ruleset(relay_ips=[A4], port_start=34000, port_end=37999,
                 extra=[("198.51.100.100", 30000, 33999)])
    lines = rs.create().splitlines()
    assert "  set relay_ips4 { type ipv4_addr; elements = { 198.51.100.1, 198.51.100.100 } }" \
        in lines
    assert "    ip daddr @relay_ips4 udp dport { 30000-33999, 34000-37999 } jump media4" in lines
    assert "    meta nfproto ipv4 meta l4proto udp ct mark { 30000-37999, 95536-103535 } " \
        "snat ip to ct mark map @out4" in lines
    assert rs.layout != plain.layout
    assert plain.layout == ruleset(relay_ips=[A4], port_start=34000, port_end=37999,
                                   extra=[]).layout
    taken = SessionSpec(LegSpec("198.51.100.100", 30000, PA4, 4000),
                        LegSpec("198.51.100.100", 30002, PB4, 5000))
    rs.check(taken)  # the peer's address and ports
    with pytest.raises(KernelRuleError, match="relay IPs"):
        plain.check(taken)
    with pytest.raises(KernelRuleError, match="port ranges 34000-37999, 30000-33999"):
        rs.check(SessionSpec(LegSpec(A4, 38000, PA4, 4000), LegSpec(A4, 34002, PB4, 5000)))
    with pytest.raises(KernelRuleError, match="overlaps"):
        ruleset(port_start=34000, port_end=37999, extra=[(A4, 37000, 39999)])


def _set_json(name: str, elems: List[Any]) -> Dict[str, Any]:
    meta = {"metainfo": {"version": "1.0.6", "json_schema_version": 1}}
    body = {"family": "inet", "name": name, "table": "lrk", "elem": elems}
    return {"nftables": [meta, {"set": body}]}


def test_parse_counters_reads_element_counters_of_both_families():
    doc = _set_json(
        "seen4",
        [
            {"elem": {"val": {"concat": [A4, 30000]}, "counter": {"packets": 3, "bytes": 120}}},
            {"elem": {"val": {"concat": [B4, 30002]}, "counter": {"packets": 0, "bytes": 0}}},
        ],
    )
    doc6 = _set_json(
        "seen6",
        [{"elem": {"val": {"concat": ["2001:db8:1:0::1", 30000]}, "counter": {"packets": 1}}}],
    )
    doc["nftables"] += doc6["nftables"][1:]
    doc["nftables"] += _set_json("adm4", [{"concat": [A4, 1]}])["nftables"][1:]  # ignored
    assert parse_counters(doc) == {
        (A4, 30000): (3, 120),
        (B4, 30002): (0, 0),
        (A6, 30000): (1, 0),
    }
    assert parse_counters(_set_json("seen4", [])) == {}
    assert parse_counters(_set_json("seen4", [{"concat": [A4, 30000]}])) == {(A4, 30000): (0, 0)}


@pytest.mark.parametrize("bad", [None, [], {"nft": []}, _set_json("seen4", [{"concat": [A4]}])])
def test_parse_counters_rejects_what_is_not_a_seen_listing(bad):
    with pytest.raises(KernelRuleError):
        parse_counters(bad)


def test_parse_drop_counter_per_family_and_total():
    doc = {
        "nftables": [
            {"metainfo": {}},
            {"counter": {"name": "unexpected4", "table": "lrk", "packets": 3, "bytes": 105}},
            {"counter": {"name": "unexpected6", "table": "lrk", "packets": 2, "bytes": 110}},
        ]
    }
    assert parse_drop_counter(doc, 4) == (3, 105)
    assert parse_drop_counter(doc, 6) == (2, 110)
    assert parse_drop_counter(doc) == (5, 215)
    with pytest.raises(KernelRuleError, match="unexpected6"):
        parse_drop_counter({"nftables": doc["nftables"][:2]})
    with pytest.raises(KernelRuleError, match="not 4 or 6"):
        parse_drop_counter(doc, 5)
    assert set(DROP_COUNTERS.values()) == {"unexpected4", "unexpected6"}


def test_queries_name_one_listing_each():
    rs = ruleset(table="media")
    assert rs.counters_query(4) == "list set inet media seen4\n"
    assert rs.counters_query(6) == "list set inet media seen6\n"
    assert rs.drops_query() == "list counters table inet media\n"


# -- forked INVITEs: further early dialogs on the shared B port -----------------------


@pytest.mark.parametrize("v6", [False, True])
def test_fork_unit_matches_its_callee_by_source_on_the_shared_b_port(v6):
    a_ip, b_ip, caller, callee = (A6, B6, PA6, "2001:db8:2::71") if v6 else (
        A4, B4, PA4, "198.51.100.71")
    fam = 6 if v6 else 4
    fork = ForkSpec(LegSpec(a_ip, 30010, caller, 4000), LegSpec(b_ip, 30002, callee, 6000))
    assert fork.b.mark == 30010 + FORK_MARK_OFFSET  # never a relay port, never B's
    assert conntrack_marks(fork) == [30010, 30011, 30010 + FORK_MARK_OFFSET,
                                     30011 + FORK_MARK_OFFSET]
    got = elements(fork)
    m = 30010 + FORK_MARK_OFFSET
    # caller -> the fork's own A port: a normal leg, SNAT from the shared B port
    assert got[f"fwd{fam}"] == {f"{a_ip} . 30010": f"{callee} . 6000",
                                f"{a_ip} . 30011": f"{callee} . 6001"}
    assert got[f"adm{fam}"] == {f"{a_ip} . 30010 . {caller}": None,
                                f"{a_ip} . 30011 . {caller}": None}
    assert got[f"seen{fam}"] == {f"{a_ip} . 30010": None, f"{a_ip} . 30011": None}
    # the fork's callee -> the shared B port: only by its source, SNAT from A's port
    assert got[f"fmark{fam}"] == {f"{b_ip} . 30002 . {callee} . 6000": str(m),
                                  f"{b_ip} . 30003 . {callee} . 6001": str(m + 1)}
    assert got[f"ffwd{fam}"] == {str(m): f"{caller} . 4000", str(m + 1): f"{caller} . 4001"}
    assert got[f"out{fam}"] == {"30010": f"{b_ip} . 30002", "30011": f"{b_ip} . 30003",
                                str(m): f"{a_ip} . 30010", str(m + 1): f"{a_ip} . 30011"}
    # nothing generic on the shared port: the session's own elements stay its own
    assert not any(k.startswith(f"{b_ip} . 3000") for k in got[f"fwd{fam}"])
    main = session6() if v6 else session4()
    text = ruleset().install_commands(main, fork)  # no conflicting keys with the session
    assert f"add element inet lrk fmark{fam} " in text
    removal = ruleset().remove_commands(fork)
    assert f"delete element inet lrk fmark{fam} {{ {b_ip} . 30002 . {callee} . 6000, " \
        in removal


def test_fork_b_mark_must_lie_in_the_fork_mark_range():
    rs = ruleset()
    assert rs.fork_mark_range == (30000 + FORK_MARK_OFFSET, 30999 + FORK_MARK_OFFSET)
    fork = ForkSpec(LegSpec(A4, 30010, PA4, 4000), LegSpec(B4, 30002, PB4, 6000))
    rs.check(fork)
    odd = ForkSpec(LegSpec(A4, 30010, PA4, 4000), LegSpec(B4, 30002, PB4, 6000, mark=30500))
    with pytest.raises(KernelRuleError, match="mark range"):
        rs.check(odd)
    with pytest.raises(KernelRuleError, match="fork marks"):
        ruleset(mark_range=(1, 0xFFFFFFFE))


def test_fork_update_of_its_callee_moves_only_its_elements():
    old = ForkSpec(LegSpec(A4, 30010, PA4, 4000), LegSpec(B4, 30002, PB4, 6000))
    new = ForkSpec(LegSpec(A4, 30010, PA4, 4000), LegSpec(B4, 30002, PB4, 6008))
    text = update_commands(old, new)
    assert "adm4" not in text and "mark4 " not in text.replace("fmark4", "")
    assert f"delete element inet lrk fmark4 {{ {B4} . 30002 . {PB4} . 6000" in text
    assert f"add element inet lrk fmark4 {{ {B4} . 30002 . {PB4} . 6008" in text


# -- several relay addresses per side: a ct mark slot per address ---------------------

A4B, B4B = "198.51.100.2", "198.51.100.66"


def slotted(**kw: Any) -> KernelRuleset:
    return ruleset(relay_ips=[A4, A4B, B4, B4B], mark_slots=[A4, A4B, B4, B4B], **kw)


def test_marks_are_unique_across_addresses_and_slot_0_keeps_the_port():
    rs = slotted()
    assert rs.slot_of == {A4: 0, A4B: 1, B4: 2, B4B: 3}
    assert rs.mark(A4, 30000) is None  # slot 0: mark = port, as with one address
    assert rs.mark(A4B, 30000) == 30000 + MARK_SLOT
    assert rs.mark(B4B, 30000) == 30000 + 3 * MARK_SLOT
    # the same port pair on all four addresses: two sessions, eight distinct marks
    one = SessionSpec(rs.leg(A4, 30000, PA4, 4000), rs.leg(B4, 30000, PB4, 5000))
    two = SessionSpec(rs.leg(A4B, 30000, PA4, 4000), rs.leg(B4B, 30000, PB4, 5000))
    marks = conntrack_marks(one) + conntrack_marks(two)
    assert marks == [30000, 30001, 30000 + 2 * MARK_SLOT, 30001 + 2 * MARK_SLOT,
                     30000 + MARK_SLOT, 30001 + MARK_SLOT, 30000 + 3 * MARK_SLOT,
                     30001 + 3 * MARK_SLOT]
    assert len(set(marks)) == 8
    # both install in one transaction: no key or mark conflicts
    text = rs.install_commands(one, two)
    assert f"{30000 + MARK_SLOT} : 198.51.100.66 . 30000" in text
    assert f"{A4B} . 30001 : {30001 + MARK_SLOT}" in text
    # the old ruleset (one slot, marks = ports) could not hold them both
    with pytest.raises(KernelRuleError, match="same relay port or mark"):
        install_commands(SessionSpec(LegSpec(A4, 30000, PA4, 4000), LegSpec(B4, 30002, PB4, 5000)),
                         SessionSpec(LegSpec(A4B, 30000, PA4, 4000),
                                     LegSpec(B4B, 30002, PB4, 5000)))


def test_a_leg_with_another_slots_mark_is_refused():
    rs = slotted()
    with pytest.raises(KernelRuleError, match="not its relay address's"):
        rs.check(SessionSpec(LegSpec(A4B, 30000, PA4, 4000), rs.leg(B4, 30002, PB4, 5000)))


def test_fork_marks_lie_above_every_slot():
    rs = slotted()
    assert rs.fork_offset == 4 * MARK_SLOT
    assert rs.mark_ranges == [(30000 + s * MARK_SLOT, 30999 + s * MARK_SLOT)
                              for s in range(4)]
    assert rs.fork_mark_ranges == [(30000 + s * MARK_SLOT, 30999 + s * MARK_SLOT)
                                   for s in range(4, 8)]
    fork = rs.fork(rs.leg(B4B, 30010, PA4, 4000), rs.leg(A4B, 30002, PB4, 6000))
    a_mark = 30010 + 3 * MARK_SLOT
    assert fork.b.mark == a_mark + 4 * MARK_SLOT
    assert conntrack_marks(fork) == [a_mark, a_mark + 1, a_mark + 4 * MARK_SLOT,
                                     a_mark + 4 * MARK_SLOT + 1]
    rs.check(fork)
    highest = max(hi for _, hi in rs.fork_mark_ranges)
    assert highest == 30999 + 7 * MARK_SLOT < 0xFFFFFFFF  # 32-bit ct mark
    every = set(rs.all_marks())
    assert len(every) == 8 * 1000 and all(rs.owns_mark(m) for m in (30000, highest))
    assert not rs.owns_mark(29999) and not rs.owns_mark(31000)  # the gaps are not lrk's
    # post-routing SNATs every slot's marks and every fork range
    assert ("ct mark { 30000-30999, 95536-96535, 161072-162071, 226608-227607, "
            "292144-293143, 357680-358679, 423216-424215, 488752-489751 } snat ip to ct mark "
            "map @out4") in rs.create()
    # the 32-bit mark space bounds the slots: 64 + 64 addresses fit
    many = [f"198.51.100.{i}" for i in range(1, 129)]
    big = ruleset(relay_ips=many, mark_slots=many)
    assert max(hi for _, hi in big.fork_mark_ranges) == 30999 + 255 * MARK_SLOT
    with pytest.raises(KernelRuleError, match="no room for fork marks"):
        ruleset(relay_ips=many, mark_slots=many, mark_range=(0xFF100000, 0xFF1003E7))


def test_one_slot_keeps_the_ruleset_text_and_layout():
    # one address per side: no slots, the text (and so the adopted table) as before
    plain = ruleset()
    assert ruleset(mark_slots=()).create() == plain.create()
    assert plain.fork_offset == FORK_MARK_OFFSET == MARK_SLOT
    assert "ct mark { 30000-30999, 95536-96535 }" in plain.create()
    # slots change the layout, and so does their order (marks would mean other addresses)
    a = slotted()
    b = ruleset(relay_ips=[A4, A4B, B4, B4B], mark_slots=[A4B, A4, B4, B4B])
    assert len({plain.layout, a.layout, b.layout}) == 3


def test_mark_slots_must_be_relay_addresses_named_once():
    with pytest.raises(KernelRuleError, match="not one of the relay IPs"):
        ruleset(mark_slots=["198.51.100.99"])
    with pytest.raises(KernelRuleError, match="twice"):
        ruleset(mark_slots=[A4, A4])
    with pytest.raises(KernelRuleError, match="list of addresses"):
        ruleset(mark_slots=A4)
