"""Unit tests of lrk.control.replay.ReplayCache (fake clock)."""

from __future__ import annotations

from lrk.control.replay import REPLAY_WINDOW, ReplayCache

A = ("127.0.0.1", 5060)
B = ("127.0.0.1", 5061)


def test_default_window_is_30s():
    assert REPLAY_WINDOW == 30.0
    assert ReplayCache().window == 30.0


def test_store_and_lookup_by_sender_and_cookie():
    cache = ReplayCache()
    cache.store(A, "c1", b"reply-1", 0.0)
    assert cache.lookup(A, "c1", 1.0) == b"reply-1"
    assert cache.lookup(B, "c1", 1.0) is None  # another sender
    assert cache.lookup(A, "c2", 1.0) is None
    assert cache.lookup(A, b"c1", 1.0) is None  # bin and str cookies differ
    assert len(cache) == 1


def test_entries_expire_after_window():
    cache = ReplayCache(window=30.0)
    cache.store(A, "c1", b"r1", 0.0)
    cache.store(A, "c2", b"r2", 10.0)
    assert cache.lookup(A, "c1", 29.9) == b"r1"
    assert cache.lookup(A, "c1", 30.0) is None
    assert cache.lookup(A, "c2", 30.0) == b"r2"
    assert len(cache) == 1
    assert cache.lookup(A, "c2", 40.0) is None
    assert len(cache) == 0


def test_size_bound_evicts_oldest():
    cache = ReplayCache(size=3)
    for i in range(5):
        cache.store(A, f"c{i}", b"r%d" % i, float(i))
    assert len(cache) == 3
    assert cache.lookup(A, "c0", 5.0) is None
    assert cache.lookup(A, "c1", 5.0) is None
    assert [cache.lookup(A, f"c{i}", 5.0) for i in (2, 3, 4)] == [b"r2", b"r3", b"r4"]


def test_restore_refreshes_entry():
    cache = ReplayCache(window=10.0, size=2)
    cache.store(A, "old", b"1", 0.0)
    cache.store(A, "mid", b"2", 1.0)
    cache.store(A, "old", b"3", 5.0)  # now the newest
    cache.store(A, "new", b"4", 6.0)  # evicts "mid", not "old"
    assert cache.lookup(A, "mid", 6.0) is None
    assert cache.lookup(A, "old", 14.0) == b"3"
    assert cache.lookup(A, "old", 15.0) is None


def test_in_flight_tracking():
    cache = ReplayCache()
    assert not cache.in_flight(A, "c")
    cache.begin(A, "c")
    assert cache.in_flight(A, "c")
    assert not cache.in_flight(B, "c")
    assert cache.lookup(A, "c", 0.0) is None
    cache.store(A, "c", b"done", 0.0)
    assert not cache.in_flight(A, "c")
    assert cache.lookup(A, "c", 0.0) == b"done"
