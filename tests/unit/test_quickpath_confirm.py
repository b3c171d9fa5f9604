"""bench.quickpath's confirmation: three passing runs in a row, else 5 % lower, bounded."""

from __future__ import annotations

import os
from typing import List

import pytest

from bench.capacity import search
from bench.netns_capacity import runtime_ns
from bench.quickpath import (
    CONFIRM_ATTEMPTS,
    QuickpathError,
    confirm,
    run_bench,
    table,
    work_us_per_packet,
)


def _fake(limit: int, flaky_at: List[int]):
    """A path that passes below `limit`; the rates in `flaky_at` fail once each."""
    calls: List[int] = []

    def measure(rate: int) -> dict:
        calls.append(rate)
        fails = rate >= limit or (rate in flaky_at and calls.count(rate) == 2)
        sent = 10_000
        return {"rate": rate, "sent": sent, "received": sent // 2 if fails else sent,
                "loss": 0.5 if fails else 0.0, "generator_limited": False,
                "relay_core_busy": 0.9, "saturated": "neither"}
    return measure, calls


def test_three_passes_in_a_row_confirm_the_rate() -> None:
    measure, calls = _fake(limit=1_000_000, flaky_at=[])
    res = confirm(measure, 500_000)
    assert res["confirmed_pps"] == 500_000 and calls == [500_000] * 3


def test_a_failure_steps_down_five_percent_and_starts_over() -> None:
    measure, calls = _fake(limit=1_000_000, flaky_at=[500_000])
    res = confirm(measure, 500_000)
    assert calls == [500_000, 500_000, 475_000, 475_000, 475_000]
    assert res["confirmed_pps"] == 475_000
    assert [len(a["runs"]) for a in res["attempts"]] == [2, 3]


def test_never_confirmed_is_reported_not_invented() -> None:
    measure, calls = _fake(limit=100, flaky_at=[])
    res = confirm(measure, 500_000)
    assert res["confirmed_pps"] is None and len(res["attempts"]) == CONFIRM_ATTEMPTS
    assert len(calls) == CONFIRM_ATTEMPTS


def test_table_names_why_the_next_rate_did_not_pass() -> None:
    steps = [{"rate": 100, "verdict": "pass", "saturated": "neither"},
             {"rate": 200, "verdict": "fail", "saturated": "relay core"}]
    row = table([{"mode": "kernel", "sessions": 1000, "capacity_pps": 100,
                  "relay_core_busy_at_capacity": 0.8, "relay_napi_busy_at_capacity": 0.7,
                  "upper_bound_pps": 200, "search": {"steps": steps},
                  "overload": [{"saturated": "relay core"}],
                  "forwarded_at_overload_pps": 150}]).splitlines()[-1]
    assert row == ("| kernel | 1,000 | 100 | 0.7 | 0.8 | 200 | fail | relay core | 150 | "
                   "relay core | - |")


def test_the_relay_work_per_packet_at_an_equal_load() -> None:
    """NAPI thread + relay threads busy 0.5 of a 2 s step that delivered 100,000: 10 us."""
    r = {"relay_work_busy": 0.5, "wall_s": 2.0, "received": 100_000}
    assert work_us_per_packet(r) == 10.0
    assert work_us_per_packet({"relay_work_busy": None, "wall_s": 1.0, "received": 5}) is None
    assert work_us_per_packet({"relay_work_busy": 0.5, "wall_s": 1.0, "received": 0}) is None
    steps = [{"rate": 100, "verdict": "pass", "saturated": "neither"}]
    row = table([{"mode": "socket", "sessions": 1000, "capacity_pps": 100,
                  "relay_core_busy_at_capacity": 0.8, "relay_napi_busy_at_capacity": 0.7,
                  "upper_bound_pps": None, "search": {"steps": steps}, "overload": [],
                  "equal_load": {"rate": 50_000,
                                 "relay_work_us_per_packet": [9.5, 10.0, 10.25]}}])
    assert row.splitlines()[-1].endswith("| - | - | 9.5 / 10.0 / 10.25 at 50,000 |")


def test_thread_run_time_covers_every_thread_and_skips_gone_processes() -> None:
    # the main thread's run time first: it only grows, so the sum over every thread read
    # after it cannot be smaller (read the other way round, the main thread's later
    # reading could exceed the earlier sum)
    with open(f"/proc/{os.getpid()}/schedstat") as fh:
        main_thread = int(fh.read().split()[0])
    own = runtime_ns([os.getpid()])  # what bench.quickpath counts for a userspace relay
    assert own >= main_thread > 0
    assert runtime_ns([2 ** 22 + 7]) == 0  # no such process


def _search_path(limit: int, transient_at: int, saturated: str):
    """A path that passes below `limit`; its first step at `transient_at` loses frames
    with the relay in state `saturated`."""
    calls: List[int] = []

    def measure(rate: int) -> dict:
        calls.append(rate)
        fails = rate >= limit or (rate == transient_at and calls.count(rate) == 1)
        return {"rate": rate, "sent": 10_000, "received": 5_000 if fails else 10_000,
                "loss": 0.5 if fails else 0.0, "generator_limited": False,
                "achieved_rate": rate, "saturated": "relay core" if rate >= limit else saturated}
    return measure, calls


def test_a_loss_with_neither_side_saturated_is_measured_once_more() -> None:
    """The kernel run of 16:37 UTC: the first step lost 1.9 % with the relay's NAPI thread
    83 % busy, and the bisection then confirmed 194,000 pkt/s at 58 % busy."""
    measure, calls = _search_path(500_000, 200_000, "neither")
    found = search(measure, 200_000, 14, transient_retries=1)
    assert calls[:3] == [200_000, 200_000, 400_000]
    assert 400_000 <= found["capacity_pps"] < 500_000
    measure, calls = _search_path(500_000, 200_000, "neither")
    assert search(measure, 200_000, 14)["capacity_pps"] < 200_000  # without: misjudged


def test_a_loss_at_a_saturated_relay_is_not_retried() -> None:
    measure, calls = _search_path(500_000, 200_000, "relay core")
    found = search(measure, 200_000, 14, transient_retries=1)
    assert calls[:2] == [200_000, 100_000] and found["capacity_pps"] < 200_000


def test_an_unknown_napi_policy_is_refused_before_anything_is_set_up() -> None:
    with pytest.raises(QuickpathError, match="NAPI policy"):
        run_bench([1], ["routing"], napi_policy="deadline")


@pytest.mark.parametrize("rate", [99_999, 6_000_001])
def test_an_overload_rate_out_of_bounds_is_refused_before_anything_is_set_up(rate) -> None:
    with pytest.raises(QuickpathError, match="--overload-rate"):
        run_bench([1], ["routing"], overload_rate=rate)
