"""Short form of the socket-mode relay-capacity benchmark (bench.capacity).

For each available interpreter (CPython, PyPy) a relay is started and its
capacity searched with 1 and 10 sessions in a few 0.3 s steps; pytest-benchmark
records the wall time of the search and the figures go to extra_info.  Only
behaviour is asserted (a capacity was found, loss under the limit there, intact
packets on every session, a clean relay exit), never a timing: the machine is
shared.  The full form (its figures are in docs/benchmarks.md):

    python -m bench.capacity --sessions 1,100 --interpreters cpython,pypy \\
        --out bench/results/capacity.json

    python -m pytest bench/bench_relay.py --benchmark-columns=min,rounds
"""

from __future__ import annotations

import pytest

from bench.capacity import LOSS_LIMIT, find_capacity

LABELS = ["cpython", "pypy"]
EXTRA_KEYS = (
    "capacity_pps", "loss_at_capacity", "achieved_at_capacity", "upper_bound_pps",
    "generator_bound", "worker_cpu_us_per_packet", "cpu_rate", "cpu_loss", "checked",
    "damaged", "received_total",
)


def check_behaviour(result: dict) -> None:
    assert result["relay_exit_code"] == 0, "the relay did not exit cleanly"
    assert not result["relay_traceback"], "the relay logged a traceback"
    assert result["capacity_pps"] > 0, f"no step passed: {result['steps']}"
    assert result["loss_at_capacity"] < LOSS_LIMIT
    assert result["checked"] > 0 and result["damaged"] == 0, "the relay damaged packets"
    assert result["min_session_received"] > 0, "a session got no media through the relay"
    assert all(step["relay_forwarded"] is not None for step in result["steps"])


@pytest.mark.parametrize("sessions", [1, 10])
@pytest.mark.parametrize("label", LABELS)
def test_relay_capacity_quick(benchmark, relay_python, label, sessions):
    benchmark.group = f"relay capacity, socket mode, {sessions} session(s)"
    result = benchmark.pedantic(
        find_capacity, args=(relay_python["python"], sessions),
        kwargs={"quick": True, "label": label}, rounds=1, iterations=1)
    benchmark.extra_info["interpreter"] = relay_python["version"]
    benchmark.extra_info["sessions"] = sessions
    benchmark.extra_info.update({k: result[k] for k in EXTRA_KEYS})
    benchmark.extra_info["steps"] = [(s["rate"], round(s["loss"], 4), s["achieved_rate"])
                                     for s in result["steps"]]
    check_behaviour(result)


def test_relay_capacity_pypy_vs_cpython(benchmark, relay_interpreters):
    """Both interpreters back to back in one run (same machine state, as far as it goes)."""
    if not {"cpython", "pypy"} <= set(relay_interpreters):
        pytest.fail(f"needs both CPython and PyPy (found: {sorted(relay_interpreters)}); "
                    "scripts/install.sh makes both")
    sessions = 10
    benchmark.group = "relay capacity, PyPy vs CPython"

    def both():
        return {label: find_capacity(relay_interpreters[label]["python"], sessions,
                                     quick=True, label=label)
                for label in ("cpython", "pypy")}

    results = benchmark.pedantic(both, rounds=1, iterations=1)
    cpy, pypy = results["cpython"], results["pypy"]
    info = benchmark.extra_info
    info["sessions"] = sessions
    for label, r in results.items():
        info[f"{label}_capacity_pps"] = r["capacity_pps"]
        info[f"{label}_cpu_us_per_packet"] = r["worker_cpu_us_per_packet"]
    if cpy["capacity_pps"]:
        info["capacity_ratio_pypy_over_cpython"] = round(
            pypy["capacity_pps"] / cpy["capacity_pps"], 3)
    if cpy["worker_cpu_us_per_packet"] and pypy["worker_cpu_us_per_packet"]:
        info["cpu_per_packet_ratio_cpython_over_pypy"] = round(
            cpy["worker_cpu_us_per_packet"] / pypy["worker_cpu_us_per_packet"], 3)
    for r in results.values():
        check_behaviour(r)
