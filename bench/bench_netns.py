"""Short form of the namespace benchmark (bench.netns_capacity): routing, static NAT,
lrk kernel mode and lrk socket mode side by side, 1 and 10 sessions, a few 0.25 s steps.

pytest-benchmark records the wall time of each run and the figures go to extra_info.
Only behaviour is asserted -- media was delivered, intact, on every session, in every
mode; every relay exited cleanly and left no table behind; no namespace is left --
never a timing: the machine is shared. Root only (CI runs as root). The full form
writes docs/benchmarks.md:

    python -m bench.netns_capacity --sessions 1,1000 --out /tmp/netns_capacity.json

    python -m pytest bench/bench_netns.py --benchmark-columns=min,rounds
"""

from __future__ import annotations

import os

import pytest

from bench.netns_capacity import MODES, run_bench
from lrk.sim.netns import PREFIX, list_namespaces

pytestmark = pytest.mark.netns

EXTRA_KEYS = ("capacity_pps", "generator_bound", "max_delivered_pps", "received_total")


def check_behaviour(report: dict, sessions: int) -> None:
    assert report["namespaces_left"] == [], "a namespace was left behind"
    results = {r["mode"]: r for r in report["results"]}
    assert sorted(results) == sorted(MODES)
    for mode, r in results.items():
        assert r["sessions"] == sessions
        assert r["capacity_pps"] > 0, f"{mode}: no step passed: {r['steps']}"
        assert r["checked"] > 0 and r["damaged"] == 0, f"{mode}: damaged packets"
        assert r["min_session_received"] > 0, f"{mode}: a session got no media"
        assert r["latency"]["lost"] == 0, f"{mode}: a new flow's first packets were lost"
        assert r["latency"]["first_median_us"] is not None
        if mode in ("kernel", "socket"):
            assert r["relay_exit_code"] == 0, f"{mode}: the relay did not exit cleanly"
            assert not r["relay_traceback"], f"{mode}: the relay logged a traceback"
            assert r["setup"]["per_second"], f"{mode}: no session installs timed"
            assert r["teardown"]["count"] == report["options"]["latency_flows"]
        if mode in ("kernel", "static-nat"):
            assert r["table_left"] is False, f"{mode}: its nftables table outlived it"
    # lrk counted what it relayed in both modes
    assert results["kernel"]["relay_counters"]["media.received.packets"] > 0
    assert results["socket"]["relay_counters"]["media.forwarded.packets"] > 0


@pytest.mark.parametrize("sessions", [1, 10])
def test_netns_modes_quick(benchmark, sessions):
    if os.geteuid() != 0:
        pytest.fail("network-namespace benchmarks need root (CI runs as root)")
    mine = f"{PREFIX}{os.getpid()}q{sessions}-"  # Topology's names for this tag
    benchmark.group = f"relay in namespaces, {sessions} session(s)"
    report = benchmark.pedantic(run_bench, args=([sessions], list(MODES)),
                                kwargs={"quick": True, "tag": f"q{sessions}"},
                                rounds=1, iterations=1)
    info = benchmark.extra_info
    info["sessions"] = sessions
    for r in report["results"]:
        for k in EXTRA_KEYS:
            info[f"{r['mode']}_{k}"] = r[k]
        info[f"{r['mode']}_first_packet_us"] = r["latency"]["first_median_us"]
    for q in report["ratios"]:
        info[f"{q['mode']}_over_static_nat_capacity"] = q["capacity"]
    check_behaviour(report, sessions)
    assert not [ns for ns in list_namespaces() if ns.startswith(mine)], "namespace left"
