"""Tests of fastpath.kernel.kernel_rules: the generated nft text, then the rules in a real kernel.

Kernel tests (root only) load rules exclusively inside network namespaces
they create (``lrk-t<pid>-<n>``) and delete, also on failure; the host's
ruleset is never touched.  Code that must run inside a namespace runs as a
subprocess under ``ip netns exec`` with a timeout.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import select
import shutil
import subprocess
import sys
from typing import Any, Dict, List, Optional, Tuple

import pytest

from fastpath.kernel.kernel_rules import (
    DROP_COUNTERS,
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
        (dict(relay_ip=A4, relay_port=30000, peer_ip=PA4, peer_port=0), "peer_port"),
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
        "    meta nfproto ipv4 meta l4proto udp ct mark 20000-20099 snat ip to ct mark map @out4",
        "    meta nfproto ipv6 meta l4proto udp ct mark 20000-20099 snat ip6 to ct mark map @out6",
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
    assert [x for x in rules[:start] + rules[end:] if "seen" not in x] == \
        lines[:nat + 2] + lines[nat + 4:]
    # no seen elements in install, update or remove
    spec, moved = session4(), session4(peer_port=5002)
    assert rs.install_commands(spec) == GOLDEN_INSTALL4.split("add element inet lrk seen4")[0]
    for text in (rs.update_commands(spec, moved), rs.remove_commands(spec, idempotent=True)):
        assert text and "seen" not in text
    with pytest.raises(KernelRuleError, match="counters"):
        ruleset(counters="packets")
    with pytest.raises(KernelRuleError, match="NFQUEUE"):
        ruleset(counters="conntrack", queue=1)


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


# -- real kernel ------------------------------------------------------------------

CMD_TIMEOUT = 20.0
_IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0
_TOOLS = all(shutil.which(t) or shutil.which(t, path="/usr/sbin:/sbin") for t in ("ip", "nft"))
kernel = pytest.mark.skipif(
    not (_IS_ROOT and _TOOLS and sys.platform.startswith("linux")),
    reason="needs root, Linux, ip and nft (loads rules in a throwaway network namespace)",
)
_ns_seq = itertools.count()


def sh(*argv: str, check: bool = True, timeout: float = CMD_TIMEOUT) -> str:
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(argv)} failed ({proc.returncode}): {proc.stderr}")
    return proc.stdout


def our_namespaces() -> List[str]:
    names = [line.split()[0] for line in sh("ip", "netns", "list").splitlines() if line.strip()]
    return [n for n in names if re.match(r"^lrk-t\d+-\d+$", n)]


@pytest.fixture(scope="module", autouse=True)
def _remove_stale_namespaces():
    """Delete lrk-t<pid>-<n> namespaces whose creating test process is gone."""
    if _IS_ROOT and _TOOLS:
        for name in our_namespaces():
            pid = name.split("-")[1][1:]
            if not os.path.exists(f"/proc/{pid}"):
                sh("ip", "netns", "del", name, check=False)
    yield


@pytest.fixture
def make_ns():
    made: List[str] = []

    def make() -> str:
        name = f"lrk-t{os.getpid()}-{next(_ns_seq)}"
        sh("ip", "netns", "add", name)
        made.append(name)
        sh("ip", "-n", name, "link", "set", "lo", "up")
        return name

    yield make
    for name in reversed(made):
        sh("ip", "netns", "del", name, check=False)


NFT_HELPER = r"""
import json, sys
from fastpath.kernel.nft import Nft, NftError
nft = Nft()
try:
    print(json.dumps({"ok": nft.run(sys.stdin.read())}))
except NftError as exc:
    print(json.dumps({"error": str(exc)}))
"""


def nft_apply(ns: str, text: str) -> Optional[str]:
    """Apply text through fastpath.kernel.nft.Nft inside ``ns``; nft's error, or None."""
    proc = subprocess.run(
        ["ip", "netns", "exec", ns, sys.executable, "-c", NFT_HELPER],
        input=text,
        capture_output=True,
        text=True,
        timeout=CMD_TIMEOUT * 3,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    return result.get("error")


def nft_ok(ns: str, text: str) -> None:
    error = nft_apply(ns, text)
    assert error is None, error


def nft_json(ns: str, *args: str) -> Dict[str, Any]:
    return json.loads(sh("ip", "netns", "exec", ns, "nft", "-j", *args))


def set_keys(ns: str, name: str) -> List[Any]:
    kind = "map" if name.startswith(("fwd", "mark", "out")) else "set"
    doc = nft_json(ns, "list", kind, "inet", "lrk", name)
    body = next(o for o in doc["nftables"] if "set" in o or "map" in o)
    return (body.get("set") or body.get("map")).get("elem", [])


@kernel
@pytest.mark.parametrize("spec_fn", [session4, session6], ids=["v4", "v6"])
def test_kernel_accepts_ruleset_install_update_remove_destroy(make_ns, spec_fn):
    ns = make_ns()
    rs = ruleset()
    spec = spec_fn()
    fam = spec.family
    nft_ok(ns, rs.create())
    nft_ok(ns, rs.install_commands(spec))
    for kind in ("fwd", "mark", "out", "adm", "seen"):
        assert len(set_keys(ns, f"{kind}{fam}")) == 4, kind
    counters = parse_counters(nft_json(ns, "list", "set", "inet", "lrk", f"seen{fam}"))
    assert counters == {
        (spec.a.relay_ip, 30000): (0, 0),
        (spec.a.relay_ip, 30001): (0, 0),
        (spec.b.relay_ip, 30002): (0, 0),
        (spec.b.relay_ip, 30003): (0, 0),
    }
    assert parse_drop_counter(nft_json(ns, "list", "counters", "table", "inet", "lrk")) == (0, 0)

    moved = SessionSpec(spec.a, LegSpec(spec.b.relay_ip, 30002, spec.b.peer_ip, 5008))
    nft_ok(ns, rs.update_commands(spec, moved))
    fwd = {json.dumps(k): json.dumps(v) for k, v in set_keys(ns, f"fwd{fam}")}
    assert fwd[json.dumps({"concat": [spec.a.relay_ip, 30000]})] == json.dumps(
        {"concat": [spec.b.peer_ip, 5008]}
    )

    # removing with the stale spec fails as a whole and leaves everything in place
    error = nft_apply(ns, rs.remove_commands(spec) + rs.remove_commands(moved))
    assert error is not None and "No such file or directory" in error
    assert len(set_keys(ns, f"seen{fam}")) == 4
    nft_ok(ns, rs.remove_commands(moved))
    for kind in ("fwd", "mark", "out", "adm", "seen"):
        assert set_keys(ns, f"{kind}{fam}") == [], kind
    # a second removal: plain fails, idempotent succeeds
    assert nft_apply(ns, rs.remove_commands(moved)) is not None
    nft_ok(ns, rs.remove_commands(moved, idempotent=True))

    nft_ok(ns, rs.destroy())
    nft_ok(ns, rs.destroy())  # absent table: still fine
    assert sh("ip", "netns", "exec", ns, "nft", "list", "tables") == ""


@kernel
def test_kernel_create_replaces_a_leftover_table_and_batches_are_atomic(make_ns):
    ns = make_ns()
    rs = ruleset()
    nft_ok(ns, rs.create())
    nft_ok(ns, rs.install_commands(session4()))
    nft_ok(ns, rs.create())  # e.g. after a crash: a fresh, empty table
    assert set_keys(ns, "seen4") == []
    nft_ok(ns, rs.install_commands(session4()))
    specs = [
        SessionSpec(
            LegSpec(A4, 30004 + 4 * i, PA4, 4000 + i), LegSpec(B4, 30006 + 4 * i, PB4, 5000)
        )
        for i in range(200)
    ]
    nft_ok(ns, rs.install_commands(*specs))
    assert len(set_keys(ns, "seen4")) == 4 * 201
    # one batch with a session that clashes with an installed one: nothing of it applies
    new = SessionSpec(LegSpec(A4, 30900, PA4, 4000), LegSpec(B4, 30902, PB4, 5000))
    clash = session4(peer_port=5555)
    error = nft_apply(ns, rs.install_commands(new, clash))
    assert error is not None and "File exists" in error
    assert (A4, 30900) not in parse_counters(nft_json(ns, "list", "set", "inet", "lrk", "seen4"))
    nft_ok(ns, rs.destroy())


@kernel
def test_kernel_nfqueue_variant_loads_where_nft_queue_exists(make_ns):
    ns = make_ns()
    error = nft_apply(ns, ruleset(queue=3, queue_bypass=True).create())
    if error is not None:
        # a kernel without CONFIG_NFT_QUEUE (like CI's) refuses the rule by name, and the
        # transaction leaves nothing behind
        assert "queue num 3 bypass" in error and "No such file" in error, error
        assert "lrk" not in sh("ip", "netns", "exec", ns, "nft", "list", "tables")
        return
    listing = sh("ip", "netns", "exec", ns, "nft", "list", "chain", "inet", "lrk", "media4")
    assert "queue" in listing and "bypass" in listing


# -- real forwarding: caller <-> relay <-> callee --------------------------------

UDP_PEER = r"""
import json, select, socket, sys, time
cfg = json.loads(sys.argv[1])
fam = socket.AF_INET6 if ":" in cfg["bind"][0] else socket.AF_INET
s = socket.socket(fam, socket.SOCK_DGRAM)
s.bind((cfg["bind"][0], cfg["bind"][1]))
print("ready", flush=True)
for i in range(cfg.get("send", 0)):
    s.sendto(("%s-%d" % (cfg["tag"], i)).encode(), (cfg["to"][0], cfg["to"][1]))
    time.sleep(0.01)
got = []
deadline = time.monotonic() + cfg["wait"]
while len(got) < cfg["expect"]:
    left = deadline - time.monotonic()
    if left <= 0 or not select.select([s], [], [], left)[0]:
        break
    data, src = s.recvfrom(2048)
    got.append([data.decode(), src[0], src[1]])
    if cfg.get("echo"):
        s.sendto(b"re:" + data, src)
print(json.dumps(got), flush=True)
"""

Got = List[Tuple[str, str, int]]


def _peer_argv(ns: str, **cfg: Any) -> List[str]:
    return ["ip", "netns", "exec", ns, sys.executable, "-c", UDP_PEER, json.dumps(cfg)]


def _parse_got(out: str) -> Got:
    return [tuple(x) for x in json.loads(out.strip().splitlines()[-1])]  # type: ignore[misc]


def run_peer(ns: str, **cfg: Any) -> Got:
    """Send cfg['send'] datagrams from cfg['bind'] to cfg['to']; what came back."""
    proc = subprocess.run(
        _peer_argv(ns, **cfg), capture_output=True, text=True, timeout=cfg["wait"] + 30
    )
    assert proc.returncode == 0, proc.stderr
    return _parse_got(proc.stdout)


class Echo:
    """A UDP echo peer in a namespace, bound before the test sends anything."""

    def __init__(self, ns: str, bind: Tuple[str, int], expect: int, wait: float = 8.0) -> None:
        self.proc = subprocess.Popen(
            _peer_argv(ns, bind=list(bind), expect=expect, wait=wait, echo=True),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.wait = wait
        ready, _, _ = select.select([self.proc.stdout], [], [], 30)
        line = self.proc.stdout.readline() if ready else ""
        if line.strip() != "ready":
            self.proc.kill()
            _, err = self.proc.communicate(timeout=10)
            raise AssertionError(f"echo peer did not start: {line!r} {err}")

    def result(self) -> Got:
        try:
            out, err = self.proc.communicate(timeout=self.wait + 30)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.communicate(timeout=10)
        assert self.proc.returncode == 0, err
        return _parse_got(out)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.communicate(timeout=10)


@pytest.fixture
def echoes():
    started: List[Echo] = []

    def start(ns: str, bind: Tuple[str, int], expect: int, wait: float = 8.0) -> Echo:
        echo = Echo(ns, bind, expect, wait)
        started.append(echo)
        return echo

    yield start
    for echo in started:
        echo.stop()


TOPOLOGY = {
    4: dict(a=A4, b=B4, caller=PA4, rogue="198.51.100.11", callee=PB4, plen_a=26, plen_b=26),
    6: dict(a=A6, b=B6, caller=PA6, rogue="2001:db8:1::11", callee=PB6, plen_a=64, plen_b=64),
}
HEADER = {4: 20 + 8, 6: 40 + 8}  # the counters count IP packets


def build_topology(make_ns, fam: int) -> Tuple[str, str, str]:
    """caller --veth-- relay --veth-- callee; forwarding on in the relay namespace only."""
    t = TOPOLOGY[fam]
    caller, relay, callee = make_ns(), make_ns(), make_ns()
    # each pair is created inside a test namespace directly: the host never sees it
    veth = ("type", "veth", "peer", "name")
    sh("ip", "-n", caller, "link", "add", "c0", *veth, "r0", "netns", relay)
    sh("ip", "-n", callee, "link", "add", "e0", *veth, "r1", "netns", relay)
    nodad = ["nodad"] if fam == 6 else []
    for ns, dev, addrs, plen in (
        (caller, "c0", [t["caller"], t["rogue"]], t["plen_a"]),
        (relay, "r0", [t["a"]], t["plen_a"]),
        (relay, "r1", [t["b"]], t["plen_b"]),
        (callee, "e0", [t["callee"]], t["plen_b"]),
    ):
        for addr in addrs:
            sh("ip", "-n", ns, "addr", "add", f"{addr}/{plen}", "dev", dev, *nodad)
        sh("ip", "-n", ns, "link", "set", dev, "up")
    key = "net.ipv4.ip_forward" if fam == 4 else "net.ipv6.conf.all.forwarding"
    sh("ip", "netns", "exec", relay, "sysctl", "-q", "-w", f"{key}=1")
    return caller, relay, callee


def conntrack_count(ns: str, fam: int, mark: int) -> int:
    proc = subprocess.run(
        ["ip", "netns", "exec", ns, "conntrack", "-L", "-f", f"ipv{fam}", "-m", str(mark)],
        capture_output=True,
        text=True,
        timeout=CMD_TIMEOUT,
        check=False,
    )
    return len([line for line in proc.stdout.splitlines() if line.startswith("udp")])


_CONNTRACK = shutil.which("conntrack") or shutil.which("conntrack", path="/usr/sbin:/sbin")


@kernel
@pytest.mark.skipif(_CONNTRACK is None, reason="needs the conntrack CLI")
@pytest.mark.parametrize("fam", [4, 6], ids=["v4", "v6"])
def test_kernel_forwards_a_natted_caller_drops_strangers_and_counts(make_ns, echoes, fam):
    t = TOPOLOGY[fam]
    caller, relay, callee = build_topology(make_ns, fam)
    rs = KernelRuleset(port_start=30000, port_end=30999, relay_ips=[t["a"], t["b"]])
    # the SDP says the caller receives on 4000/4001; its NAT sends from 4444/4445
    spec = SessionSpec(
        LegSpec(t["a"], 30000, t["caller"], 4000), LegSpec(t["b"], 30002, t["callee"], 5000)
    )
    nft_ok(relay, rs.create())
    nft_ok(relay, rs.install_commands(spec))

    n, n_rtcp, n_rogue = 5, 2, 3
    rtp_echo = echoes(callee, (t["callee"], 5000), expect=n)
    rtcp_echo = echoes(callee, (t["callee"], 5001), expect=n_rtcp)
    rogue = run_peer(
        caller, bind=[t["rogue"], 4444], to=[t["a"], 30000], send=n_rogue, tag="rogue",
        expect=1, wait=0.5,
    )  # fmt: skip
    got_rtp = run_peer(
        caller, bind=[t["caller"], 4444], to=[t["a"], 30000], send=n, tag="rtp", expect=n, wait=8
    )
    got_rtcp = run_peer(
        caller, bind=[t["caller"], 4445], to=[t["a"], 30001], send=n_rtcp, tag="rtcp",
        expect=n_rtcp, wait=8,
    )  # fmt: skip
    assert rogue == []
    # the callee sees relay B's address/port, never the caller's
    assert rtp_echo.result() == [(f"rtp-{i}", t["b"], 30002) for i in range(n)]
    assert rtcp_echo.result() == [(f"rtcp-{i}", t["b"], 30003) for i in range(n_rtcp)]
    # replies reach the caller's real (NATed) port, from relay A
    assert got_rtp == [(f"re:rtp-{i}", t["a"], 30000) for i in range(n)]
    assert got_rtcp == [(f"re:rtcp-{i}", t["a"], 30001) for i in range(n_rtcp)]

    h = HEADER[fam]
    counters = parse_counters(nft_json(relay, "list", "set", "inet", "lrk", f"seen{fam}"))
    size = len("rtp-0")
    rogue_bytes = n_rogue * (h + len("rogue-0"))
    assert counters == {
        # every admitted packet; the strangers' show only in the drop counter
        (t["a"], 30000): (n, n * (h + size)),
        (t["a"], 30001): (n_rtcp, n_rtcp * (h + len("rtcp-0"))),
        # reply direction: conntrack reply-tuple packets count on relay B's port too
        (t["b"], 30002): (n, n * (h + len("re:rtp-0"))),
        (t["b"], 30003): (n_rtcp, n_rtcp * (h + len("re:rtcp-0"))),
    }
    drops = nft_json(relay, "list", "counters", "table", "inet", "lrk")
    assert parse_drop_counter(drops, fam) == (n_rogue, rogue_bytes)
    assert parse_drop_counter(drops) == (n_rogue, rogue_bytes)

    # removal stops new flows only: the established flow keeps its NAT in conntrack
    assert conntrack_count(relay, fam, 30000) == 1
    nft_ok(relay, rs.remove_commands(spec))
    late = echoes(callee, (t["callee"], 5000), expect=1, wait=3)
    got = run_peer(
        caller, bind=[t["caller"], 4444], to=[t["a"], 30000], send=1, tag="late", expect=1, wait=3
    )
    assert late.result() == [("late-0", t["b"], 30002)] and len(got) == 1
    # ... until its conntrack entries (found by mark) are deleted
    for mark in conntrack_marks(spec):
        subprocess.run(
            ["ip", "netns", "exec", relay, "conntrack", "-D", "-f", f"ipv{fam}", "-m", str(mark)],
            capture_output=True,
            timeout=CMD_TIMEOUT,
            check=False,
        )
    assert conntrack_count(relay, fam, 30000) == 0
    rtp_again = echoes(callee, (t["callee"], 5000), expect=1, wait=1)
    got = run_peer(
        caller, bind=[t["caller"], 4444], to=[t["a"], 30000], send=1, tag="gone", expect=1, wait=1
    )
    assert got == [] and rtp_again.result() == []
    dropped = parse_drop_counter(nft_json(relay, "list", "counters", "table", "inet", "lrk"), fam)
    assert dropped[0] == n_rogue + 1
    nft_ok(relay, rs.destroy())


CT_DUMP = """
import json
from fastpath.kernel.ctnetlink import ConntrackSocket
ct = ConntrackSocket()
print(json.dumps([f._asdict() for f in ct.flows([(30000, 0xFFFFFFFC)])]))
ct.close()
"""


@kernel
@pytest.mark.parametrize("fam", [4, 6], ids=["v4", "v6"])
def test_kernel_conntrack_counting_ruleset_forwards_and_conntrack_counts(make_ns, echoes, fam):
    """counters="conntrack": established packets skip the chain, accounting counts them."""
    t = TOPOLOGY[fam]
    caller, relay, callee = build_topology(make_ns, fam)
    sh("ip", "netns", "exec", relay, "sysctl", "-q", "-w", "net.netfilter.nf_conntrack_acct=1",
       "net.netfilter.nf_conntrack_timestamp=1")
    rs = KernelRuleset(port_start=30000, port_end=30999, relay_ips=[t["a"], t["b"]],
                       counters="conntrack")
    spec = SessionSpec(
        LegSpec(t["a"], 30000, t["caller"], 4000), LegSpec(t["b"], 30002, t["callee"], 5000)
    )
    nft_ok(relay, rs.create())
    nft_ok(relay, rs.install_commands(spec))
    n, n_rogue = 5, 3
    rtp_echo = echoes(callee, (t["callee"], 5000), expect=n)
    rogue = run_peer(caller, bind=[t["rogue"], 4444], to=[t["a"], 30000], send=n_rogue,
                     tag="rogue", expect=1, wait=0.5)
    got = run_peer(caller, bind=[t["caller"], 4444], to=[t["a"], 30000], send=n, tag="rtp",
                   expect=n, wait=8)
    assert rogue == []
    assert rtp_echo.result() == [(f"rtp-{i}", t["b"], 30002) for i in range(n)]
    assert got == [(f"re:rtp-{i}", t["a"], 30000) for i in range(n)]
    drops = nft_json(relay, "list", "counters", "table", "inet", "lrk")
    assert parse_drop_counter(drops, fam)[0] == n_rogue  # admission is unchanged
    # our own ctnetlink dump, in the relay namespace, reads the per-direction counters
    proc = subprocess.run(["ip", "netns", "exec", relay, sys.executable, "-c", CT_DUMP],
                          capture_output=True, text=True, timeout=CMD_TIMEOUT, check=False)
    assert proc.returncode == 0, proc.stderr
    (flow,) = json.loads(proc.stdout)
    h = HEADER[fam]
    assert (flow["mark"], flow["src"], flow["sport"]) == (30000, t["caller"], 4444)
    assert (flow["orig_packets"], flow["orig_bytes"]) == (n, n * (h + len("rtp-0")))
    assert (flow["reply_packets"], flow["reply_bytes"]) == (n, n * (h + len("re:rtp-0")))
    assert isinstance(flow["id"], int) and flow["start"] > 0
    nft_ok(relay, rs.destroy())


@kernel
@pytest.mark.xfail(
    strict=True,
    reason="design limit: a callee-first flow owns the relay B <-> callee conntrack tuple, so "
    "the NATed caller's own flow clashes with it at conntrack confirm and is dropped "
    "(conntrack -S: insert_failed) for as long as the callee keeps sending",
)
def test_kernel_natted_caller_after_the_callee_spoke_first(make_ns, echoes):
    t = TOPOLOGY[4]
    caller, relay, callee = build_topology(make_ns, 4)
    rs = KernelRuleset(port_start=30000, port_end=30999, relay_ips=[t["a"], t["b"]])
    spec = SessionSpec(
        LegSpec(t["a"], 30000, t["caller"], 4000), LegSpec(t["b"], 30002, t["callee"], 5000)
    )
    nft_ok(relay, rs.create())
    nft_ok(relay, rs.install_commands(spec))
    # the callee's first packets go to the caller's SDP port 4000 (not where its NAT is)
    run_peer(
        callee, bind=[t["callee"], 5000], to=[t["b"], 30002], send=2, tag="early",
        expect=1, wait=0.3,
    )  # fmt: skip
    echo = echoes(callee, (t["callee"], 5000), expect=2, wait=2)
    run_peer(
        caller, bind=[t["caller"], 4444], to=[t["a"], 30000], send=2, tag="rtp", expect=2, wait=2
    )
    assert echo.result() == [(f"rtp-{i}", t["b"], 30002) for i in range(2)]


@kernel
def test_no_namespace_of_this_process_is_left():
    """Runs last in this module (pytest keeps file order): earlier finalizers cleaned up."""
    mine = [n for n in our_namespaces() if n.startswith(f"lrk-t{os.getpid()}-")]
    assert mine == []
