"""Short form of the lrk vs rtpengine harness (`python -m bench.compare --quick`).

Runs the whole harness -- media in namespaces, two-way calls, control plane -- with every
peer, writes report.json, results.md and the plots, and asserts behaviour only: every
peer relayed intact media both ways, every relay exited cleanly, nothing was left behind,
each target was judged from a measured figure. Never a timing (the machine is shared).
Root only (CI runs as root).

    python -m pytest bench/bench_compare.py
"""

from __future__ import annotations

import json
import os

import pytest

from bench.compare import main
from bench.netns import PREFIX, list_namespaces
from bench.peers import PEERS

pytestmark = pytest.mark.netns


def test_compare_quick(benchmark, tmp_path):
    if os.geteuid() != 0:
        pytest.fail("the comparison runs in network namespaces: it needs root (CI is root)")
    out = tmp_path / "cmp"
    mine = f"{PREFIX}{os.getpid()}cm"
    code = benchmark.pedantic(main, args=(["--quick", "--sessions", "1", "--out", str(out)],),
                              rounds=1, iterations=1)
    report = json.loads((out / "report.json").read_text())
    assert report["errors"] == {}, report["errors"]
    assert code == 0
    # media: every relay and baseline, intact, relays stopped cleanly
    media = {r["mode"]: r for r in report["media"]["results"]}
    assert set(PEERS) | {"routing", "static-nat"} <= set(media)
    for mode, r in media.items():
        # rtpengine's userspace path discards a single stream it cannot keep up with (its
        # flood protection), so it may pass no step; it must still have relayed media
        assert r["capacity_pps"] > 0 or mode == "rtpengine", f"{mode}: no step passed"
        assert r["received_total"] > 0, f"{mode}: relayed nothing"
        assert r["damaged"] == 0 and r["checked"] > 0, f"{mode}: damaged media"
        assert r["relay_exit_code"] in (None, 0), f"{mode}: relay exit {r['relay_exit_code']}"
    # calls: both directions of every call, through every peer
    calls = {c["mode"]: c for c in report["calls"]["results"]}
    assert sorted(calls) == sorted(PEERS)
    for mode, c in calls.items():
        assert c["received"] > 0 and c["silent_streams"] == 0, f"{mode}: a stream got nothing"
        assert c["damaged"] == 0 and c["misrouted"] == 0, f"{mode}: damaged or misrouted"
        assert c["loss"] <= 0.01, f"{mode}: {100 * c['loss']:.2f}% lost at 2,000 pkt/s"
        assert c["latency_ms"]["p50"] > 0
        assert c["exit_code"] == 0, f"{mode}: relay exit {c['exit_code']}"
    assert report["calls"]["namespaces_left"] == []
    # control: every peer answered every request
    for c in report["control"]["results"]:
        assert c["errors"] == 0 and c["req_per_s"] > 0, c
    # every target judged from a figure; the table and the plots exist
    assert report["targets"] and all(t["figure"] for t in report["targets"])
    text = (out / "results.md").read_text()
    for heading in ("## Media", "## Calls", "## Control plane", "## Targets"):
        assert heading in text
    for png in report["plots"]:
        assert (out / png).read_bytes()[:4] == b"\x89PNG"
    assert "capacity.png" in report["plots"] and "latency.png" in report["plots"]
    assert not [ns for ns in list_namespaces() if ns.startswith(mine)]
    benchmark.extra_info.update({t["target"]: t["figure"] for t in report["targets"]})
