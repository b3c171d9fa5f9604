"""Short form of the namespace benchmark (bench.netns_capacity): routing, static NAT and lrk's
kernel, nfqueue, socket and packet modes side by side, a few 0.25 s steps.

* 1 session, every daemon mode and both baselines;
* 10 sessions laid out the way the 100,000-session rig is, shrunk (monkeypatched limits):
  shared caller sockets, callee sockets on explicit ports over several callee addresses,
  three generator processes driven as one, static NAT and kernel mode's ruleset
  (``kernel-rules``, elements installed in bulk, no daemon) over several relay address
  pairs, and routing -- the modes of the 100,000-session form.

pytest-benchmark records the wall time of each run and the figures go to extra_info.
Only behaviour is asserted -- media was delivered, intact, on every session, in every
mode; every new flow's first packet arrived (nfqueue: through userspace, counted by the
relay); every relay exited cleanly and left no table behind; no namespace is left --
never a timing: the machine is shared. Root only (CI runs as root). The full form
gives the figures in docs/benchmarks.md:

    python -m bench.netns_capacity --sessions 1,1000,100000 --out bench/results/netns_capacity.json

    python -m pytest bench/bench_netns.py --benchmark-columns=min,rounds
"""

from __future__ import annotations

import os

import pytest

from bench import netns_capacity as nc
from bench.netns import PREFIX, list_namespaces
from bench.netns_capacity import DAEMON_MODES, MODES, RULES_MODE, SCALE_MODES, run_bench

pytestmark = pytest.mark.netns

EXTRA_KEYS = ("capacity_pps", "generator_bound", "max_delivered_pps", "received_total")
#: the nftables table each mode owns in the relay namespace (must be gone afterwards)
TABLES = {"static-nat": nc.STATIC_TABLE, "kernel": "lrk", "nfqueue": "lrk", "packet": "lrkpkt",
          RULES_MODE: nc.RULES_TABLE}


def check_behaviour(report: dict, sessions: int, modes: list) -> None:
    assert report["namespaces_left"] == [], "a namespace was left behind"
    results = {r["mode"]: r for r in report["results"]}
    assert sorted(results) == sorted(modes)
    flows = report["options"]["latency_flows"]
    for mode, r in results.items():
        assert r["sessions"] == sessions
        assert r["capacity_pps"] > 0, f"{mode}: no step passed: {r['steps']}"
        assert r["checked"] > 0 and r["damaged"] == 0, f"{mode}: damaged packets"
        assert r["min_session_received"] > 0, f"{mode}: a session got no media"
        assert r["latency"]["lost"] == 0, f"{mode}: a new flow's first packets were lost"
        assert r["latency"]["first_median_us"] is not None
        if mode in DAEMON_MODES:
            assert r["relay_exit_code"] == 0, f"{mode}: the relay did not exit cleanly"
            assert not r["relay_traceback"], f"{mode}: the relay logged a traceback"
        if mode != "routing":
            assert r["setup"]["per_second"], f"{mode}: no session installs timed"
            assert r["teardown"]["count"] == flows
        if mode in TABLES:
            assert r["table_left"] is False, f"{mode}: its nftables table outlived it"
    # lrk counted what it relayed in every daemon mode
    for mode, key in (("kernel", "media.received.packets"), ("nfqueue", "media.received.packets"),
                      ("socket", "media.forwarded.packets"),
                      ("packet", "media.forwarded.packets")):
        if mode in results:
            assert results[mode]["relay_counters"][key] > 0, f"{mode}: nothing counted"
    if "nfqueue" in results:  # every flow's first packet went through userspace, admitted
        nfq = results["nfqueue"]["relay_counters"]
        assert nfq["nfqueue.admitted"] >= sessions + flows
        assert nfq["media.latched"] >= sessions + flows


def _run(benchmark, sessions: int, modes: list, tag: str) -> dict:
    if os.geteuid() != 0:
        pytest.fail("network-namespace benchmarks need root (CI runs as root)")
    mine = f"{PREFIX}{os.getpid()}{tag}-"  # Topology's names for this tag
    benchmark.group = f"relay in namespaces, {sessions} session(s)"
    report = benchmark.pedantic(run_bench, args=([sessions], modes),
                                kwargs={"quick": True, "tag": tag}, rounds=1, iterations=1)
    info = benchmark.extra_info
    info["sessions"] = sessions
    for r in report["results"]:
        for k in EXTRA_KEYS:
            info[f"{r['mode']}_{k}"] = r[k]
        info[f"{r['mode']}_first_packet_us"] = r["latency"]["first_median_us"]
    for q in report["ratios"]:
        info[f"{q['mode']}_over_static_nat_capacity"] = q["capacity"]
    assert not [ns for ns in list_namespaces() if ns.startswith(mine)], "namespace left"
    return report


def test_netns_modes_quick(benchmark):
    report = _run(benchmark, 1, list(MODES), "q1")
    check_behaviour(report, 1, list(MODES))


def test_netns_scale_layout_quick(benchmark, monkeypatch):
    """The large-rig code paths at 10 sessions: every limit that splits 100,000 sessions
    over addresses and generator processes is shrunk so that 10 sessions cross it."""
    monkeypatch.setattr(nc, "BULK_SESSIONS", 5)
    monkeypatch.setattr(nc, "GEN_MAX_SESSIONS", 4)
    monkeypatch.setattr(nc, "GEN_CALLERS", 2)
    monkeypatch.setattr(nc, "CALLEE_PER_IP", 4)
    monkeypatch.setattr(nc, "PORTS_PER_ADDRESS", 4)
    modes = list(SCALE_MODES)
    report = _run(benchmark, 10, modes, "q10")
    check_behaviour(report, 10, modes)
    results = {r["mode"]: r for r in report["results"]}
    # three generator processes, their results merged: every session got media (above)
    assert {r["generators"] for r in results.values()} == {3}
    # 10 sessions over 4 ports per relay address pair: 3 relay A addresses carried them
    for mode in ("static-nat", RULES_MODE):
        assert len(results[mode]["relay_ips"]) == 3, results[mode]["relay_ips"]
        assert results[mode]["setup"]["load_sessions"] == 10
