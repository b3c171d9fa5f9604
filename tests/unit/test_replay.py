"""Unit tests of lrk.control.replay.ReplayCache (fake clock)."""

from __future__ import annotations

from lrk.control.replay import ENTRY_OVERHEAD, EXHAUSTED, REPLAY_WINDOW, ReplayCache

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


def _cost(cookie: str, reply: bytes) -> int:
    return len(reply) + len(cookie) + ENTRY_OVERHEAD


def test_byte_bound_evicts_oldest():
    one = _cost("c0", b"r0")
    cache = ReplayCache(max_bytes=3 * one)
    for i in range(5):
        cache.store(A, f"c{i}", b"r%d" % i, float(i))
    assert len(cache) == 3 and cache.bytes == 3 * one
    assert cache.lookup(A, "c0", 5.0) is None
    assert cache.lookup(A, "c1", 5.0) is None
    assert [cache.lookup(A, f"c{i}", 5.0) for i in (2, 3, 4)] == [b"r2", b"r3", b"r4"]


def test_large_replies_take_the_room_of_many_small_ones():
    cache = ReplayCache(max_bytes=_cost("big", b"x" * 10000) + _cost("s", b"s"))
    cache.store(A, "s", b"s", 0.0)
    cache.store(A, "big", b"x" * 10000, 1.0)
    assert cache.lookup(A, "s", 1.0) == b"s" and len(cache) == 2
    cache.store(A, "s2", b"s", 2.0)  # no room: the oldest goes
    assert cache.lookup(A, "s", 2.0) is None
    assert cache.bytes <= cache.max_bytes


def test_a_reply_larger_than_a_datagram_is_not_kept():
    cache = ReplayCache()
    assert cache.store(A, "huge", b"x" * 65508, 0.0) is False
    assert cache.lookup(A, "huge", 0.0) is None and cache.bytes == 0
    assert cache.store(A, "max", b"x" * 65507, 0.0) is True


def test_expiry_and_discard_give_the_bytes_back():
    cache = ReplayCache(window=10.0)
    cache.store(A, "a", b"1234", 0.0)
    cache.store(A, "b", b"5678", 1.0)
    cache.discard(A, "a")
    assert cache.bytes == _cost("b", b"5678")
    assert cache.lookup(A, "b", 11.0) is None
    assert cache.bytes == 0 and len(cache) == 0


def test_an_entry_answers_a_bounded_number_of_retransmissions():
    cache = ReplayCache(max_resends=3)
    cache.store(A, "c", b"reply", 0.0)
    assert [cache.lookup(A, "c", 1.0) for _ in range(3)] == [b"reply"] * 3
    assert cache.lookup(A, "c", 1.0) == EXHAUSTED == b""  # drop it, do not run it again
    assert cache.lookup(A, "c", 31.0) is None  # expired: forgotten


def test_restore_refreshes_entry():
    one = _cost("old", b"1")
    cache = ReplayCache(window=10.0, max_bytes=2 * one)
    cache.store(A, "old", b"1", 0.0)
    cache.store(A, "mid", b"2", 1.0)
    cache.store(A, "old", b"3", 5.0)  # now the newest
    cache.store(A, "new", b"4", 6.0)  # evicts "mid", not "old"
    assert cache.lookup(A, "mid", 6.0) is None
    assert cache.lookup(A, "old", 14.0) == b"3"
    assert cache.lookup(A, "old", 15.0) is None


def test_in_flight_is_bounded():
    cache = ReplayCache(max_in_flight=2)
    assert cache.begin(A, "1") and cache.begin(A, "2")
    assert not cache.begin(A, "3")
    cache.store(A, "1", b"done", 0.0)
    assert cache.begin(A, "3")


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


def test_expiry_still_happens_after_the_oldest_entry_went_early():
    """A purge runs only once the oldest entry may have expired (a lower bound): an entry
    removed before its expiry (discard, a re-store) must not keep later ones alive."""
    cache = ReplayCache(window=30.0)
    cache.store(A, "c1", b"r1", 0.0)
    cache.store(A, "c2", b"r2", 10.0)
    cache.discard(A, "c1")
    cache.store(A, "c3", b"r3", 20.0)
    assert cache.lookup(A, "c2", 39.9) == b"r2"
    assert cache.lookup(A, "c2", 40.0) is None  # c2's own expiry, not c1's or c3's
    assert cache.lookup(A, "c3", 40.0) == b"r3"
    assert len(cache) == 1 and cache.bytes == _cost("c3", b"r3")
    assert cache.lookup(A, "c3", 50.0) is None
    assert len(cache) == 0 and cache.bytes == 0
