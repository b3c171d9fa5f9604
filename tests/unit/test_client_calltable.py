"""The (Call-ID, Via branch) -> node table: lookup, fallback, expiry, bounded size."""

from __future__ import annotations

import pytest

try:
    from client_fakes import FakeClock
except ImportError:  # tests/ collected as a package
    from tests.unit.client_fakes import FakeClock

from lrk.client.calltable import CallTable
from lrk.client.errors import InvalidArgument
from lrk.client.nodes import Node

A = Node("udp:10.0.0.1:1")
B = Node("udp:10.0.0.2:1")


def test_lookup_by_branch_then_call_id_fallback():
    table = CallTable(timeout=100, max_size=10)
    table.store("c1", "z9hG4bK-inv", A, now=0)
    table.store("c2", "z9hG4bK-x", B, now=0)
    assert table.lookup("c1", "z9hG4bK-inv", now=1) is A
    # ACK/BYE carry a new branch: the Call-ID index answers
    assert table.lookup("c1", "z9hG4bK-bye", now=1) is A
    assert table.lookup("c1", now=1) is A
    assert table.lookup("c3", "z9hG4bK-inv", now=1) is None


def test_fallback_prefers_the_newest_branch_of_the_call():
    table = CallTable(timeout=100, max_size=10)
    table.store("c1", "br1", A, now=0)
    table.store("c1", "br2", B, now=1)
    assert table.lookup("c1", "br1", now=2) is A
    assert table.lookup("c1", "other", now=2) is B
    table.store("c1", "br1", A, now=3)  # refresh moves it to newest
    assert table.lookup("c1", "other", now=4) is A


def test_entries_expire_after_timeout_and_refresh_extends():
    clock = FakeClock(0.0)
    table = CallTable(timeout=3600, max_size=10, clock=clock)
    table.store("c1", "br", A)
    clock.advance(3599.9)
    assert table.lookup("c1", "br") is A
    table.store("c1", "br", A)  # e.g. an answer refreshes the entry
    clock.advance(3599.9)
    assert table.lookup("c1", "br") is A
    clock.advance(0.1)
    assert table.lookup("c1", "br") is None
    assert table.lookup("c1") is None
    assert table.expire() == 1
    assert len(table) == 0


def test_bounded_size_evicts_oldest():
    table = CallTable(timeout=1000, max_size=3)
    for i, call in enumerate(["c1", "c2", "c3", "c4"]):
        table.store(call, "br", A, now=i)
    assert len(table) == 3
    assert table.lookup("c1", now=5) is None
    assert [table.lookup(c, now=5) for c in ("c2", "c3", "c4")] == [A, A, A]


def test_full_table_drops_expired_entries_before_live_ones():
    table = CallTable(timeout=100, max_size=3)
    table.store("old1", "br", A, now=0)
    table.store("old2", "br", A, now=0)
    table.store("live", "br", B, now=90)
    table.store("new", "br", B, now=150)  # old1, old2 expired at 100
    assert len(table) == 2
    assert table.lookup("live", now=150) is B
    assert table.lookup("new", now=150) is B


def test_remove_forgets_every_branch_of_a_call():
    table = CallTable(timeout=100, max_size=10)
    table.store("c1", "br1", A, now=0)
    table.store("c1", "br2", A, now=0)
    table.store("c2", None, B, now=0)
    assert table.remove("c1") == 2
    assert table.remove("c1") == 0
    assert table.lookup("c1", "br1", now=1) is None
    assert table.lookup("c2", now=1) is B
    assert len(table) == 1


@pytest.mark.parametrize("kwargs", [{"timeout": 0}, {"max_size": 0}, {"max_size": 1.5}])
def test_bad_table_configuration(kwargs):
    with pytest.raises(InvalidArgument):
        CallTable(**kwargs)
