"""Short form of `bench.many_sessions kernel`: a few hundred calls set up through the
daemon, counted, read and deleted, in a caller / relay / callee namespace topology of its
own -- a socket-mode relay with three workers, and a kernel-mode relay.

Only behaviour is asserted, never a rate (the machine is shared): every call installed and
deleted with every reply checked, the calls spread over the relay addresses, the sides'
CPU reported (which side saturated), nothing left behind (sessions, ports, conntrack
flows, the nftables table, the namespaces), a clean exit. Root only (CI runs as root).
The full form gives docs/benchmarks.md section 11:

    python -m bench.many_sessions kernel --mode socket --sessions 100000 --addresses 4 \\
        --ports 10000-65535 --relay-python .venv-pypy/bin/python

    python -m pytest bench/bench_many_sessions.py --benchmark-columns=min,rounds
"""

from __future__ import annotations

import json
import os

import pytest

from bench.many_sessions import main
from bench.netns import PREFIX, list_namespaces

pytestmark = pytest.mark.netns

CALLS = 300


@pytest.mark.parametrize("mode", ["socket", "kernel"])
def test_many_sessions_quick(benchmark, tmp_path, mode):
    if os.geteuid() != 0:
        pytest.fail("network-namespace benchmarks need root (CI runs as root)")
    out = tmp_path / "result.json"
    argv = ["kernel", "--mode", mode, "--sessions", str(CALLS), "--addresses", "2",
            "--passes", "1", "--kernel-poll", "0.5", "--out", str(out)]
    if mode == "socket":
        argv += ["--workers", "3"]
    benchmark.group = "calls through one daemon"
    assert benchmark.pedantic(main, args=(argv,), rounds=1, iterations=1) == 0
    result = json.loads(out.read_text())
    for key in ("sessions_per_s", "daemon_cpu_s_install", "workers_cpu_s_install",
                "client_cpu_s_install", "deletes_per_s"):
        benchmark.extra_info[key] = result[key]
    assert result["installed"] == CALLS and result["failed"] == 0, result["errors"]
    assert result["sessions_held"] == CALLS
    # the calls spread over both relay addresses of each side
    assert len(result["in_use_by_address"]) == 4
    assert sum(result["in_use_by_address"].values()) == 2 * CALLS
    assert result["deleted"] == CALLS and result["delete_failed"] == 0
    assert result["sessions_after_delete"] == 0 and result["ports_in_use_after_delete"] == 0
    assert result["conntrack_flows_left"] == 0 and result["table_left"] is False
    assert result["stop_exit_code"] == 0
    assert result["nursery"] == "launcher"
    # each side's CPU is reported (which side saturated); a few hundred calls can take
    # less than one clock tick of a process, so only that the figures are there
    for key in ("daemon_cpu_s_install", "workers_cpu_s_install", "client_cpu_s_install"):
        assert isinstance(result[key], float) and result[key] >= 0, key
    if mode == "socket":
        assert result["workers"] == 3
        assert result["counters_after_delete"].get("plane.no_descriptors", 0) == 0
    else:
        assert result["workers_cpu_s_install"] == 0  # a kernel-mode relay has no workers
        assert result["kernel_units_installed"] >= CALLS
    mine = f"{PREFIX}{os.getpid()}"
    assert not [ns for ns in list_namespaces() if ns.startswith(mine)], "namespace left"
