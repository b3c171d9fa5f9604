"""Unit tests of lrk.core.ports.PortAllocator (sans-IO, fake clock)."""

from __future__ import annotations

import pytest

from lrk.core.ports import UNUSABLE_HOLD, PortAllocator
from lrk.errors import ConfigError, PortsExhausted


def drain(alloc: PortAllocator, now: float = 0.0) -> list:
    ports = []
    while True:
        try:
            ports.append(alloc.allocate(now))
        except PortsExhausted:
            return ports


def test_hands_out_even_ports_only_and_never_rtcp():
    alloc = PortAllocator(30000, 30019)
    ports = drain(alloc)
    assert ports == list(range(30000, 30020, 2))
    assert all(p % 2 == 0 for p in ports)
    # RTCP (port + 1) never appears as an allocated port of its own
    assert not set(ports) & {p + 1 for p in ports}
    assert alloc.total == 10
    assert alloc.in_use == 10


def test_never_hands_out_a_port_in_use():
    alloc = PortAllocator(30000, 30099)
    seen = set()
    for _ in range(alloc.total):
        port = alloc.allocate(0.0)
        assert port not in seen
        seen.add(port)
        assert alloc.is_in_use(port)
        assert alloc.is_in_use(port + 1)  # the RTCP port belongs to the pair
    assert alloc.free == 0


def test_odd_start_rounds_up_to_even():
    alloc = PortAllocator(30001, 30010)
    ports = drain(alloc)
    assert ports == [30002, 30004, 30006, 30008]
    assert all(p + 1 <= 30010 for p in ports)


def test_odd_end_includes_last_full_pair():
    alloc = PortAllocator(30000, 30009)
    assert drain(alloc) == [30000, 30002, 30004, 30006, 30008]


def test_even_end_excludes_pair_without_rtcp_room():
    alloc = PortAllocator(30000, 30008)
    ports = drain(alloc)
    assert 30008 not in ports  # 30009 would be out of range
    assert ports == [30000, 30002, 30004, 30006]


def test_top_of_port_space():
    alloc = PortAllocator(65534, 65535)
    assert drain(alloc) == [65534]


@pytest.mark.parametrize(
    "start,end",
    [
        (1000, 2000),  # below 1024
        (30000, 70000),  # above 65535
        (40000, 30000),  # reversed
        (30001, 30001),  # no even port with +1
        (30000, 30000),  # RTCP port out of range
        (65535, 65535),
    ],
)
def test_bad_ranges_raise_config_error(start, end):
    with pytest.raises(ConfigError) as exc:
        PortAllocator(start, end)
    assert str(start) in str(exc.value)


def test_release_quarantines_then_reusable():
    alloc = PortAllocator(30000, 30003, quarantine=5.0)  # two pairs
    a = alloc.allocate(0.0)
    b = alloc.allocate(0.0)
    alloc.release(a, 10.0)
    assert alloc.in_use == 1
    assert alloc.quarantined == 1
    assert not alloc.is_in_use(a)
    with pytest.raises(PortsExhausted):
        alloc.allocate(14.999)
    assert alloc.allocate(15.0) == a
    assert alloc.quarantined == 0
    assert alloc.is_in_use(b)


def test_release_by_rtcp_port_releases_the_pair():
    alloc = PortAllocator(30000, 30001, quarantine=0.0)
    port = alloc.allocate(0.0)
    alloc.release(port + 1, 1.0)
    assert alloc.in_use == 0
    assert alloc.allocate(1.0) == port


def test_release_of_unknown_port_is_a_noop():
    alloc = PortAllocator(30000, 30009)
    alloc.release(30004, 0.0)
    alloc.release(12345, 0.0)
    assert alloc.snapshot() == {"total": 5, "in_use": 0, "quarantined": 0, "free": 5}


def test_double_release_does_not_duplicate_port():
    alloc = PortAllocator(30000, 30003, quarantine=1.0)
    a = alloc.allocate(0.0)
    alloc.release(a, 0.0)
    alloc.release(a, 0.5)
    got = drain(alloc, 10.0)
    assert sorted(got) == [30000, 30002]


def test_least_recently_used_order():
    alloc = PortAllocator(30000, 30009, quarantine=1.0)  # 5 pairs
    first = [alloc.allocate(0.0) for _ in range(3)]  # 30000, 30002, 30004
    assert first == [30000, 30002, 30004]
    alloc.release(30002, 1.0)
    alloc.release(30000, 2.0)
    # never-used ports come before recently released ones, then in release order
    assert [alloc.allocate(10.0) for _ in range(4)] == [30006, 30008, 30002, 30000]


def test_exhaustion_message_and_state_intact():
    alloc = PortAllocator(30000, 30005, quarantine=5.0)  # 3 pairs
    a, b, c = (alloc.allocate(0.0) for _ in range(3))
    alloc.release(b, 1.0)
    before = alloc.snapshot()
    with pytest.raises(PortsExhausted) as exc:
        alloc.allocate(2.0)
    msg = str(exc.value)
    assert "30000-30005" in msg
    assert "2 in use" in msg
    assert "1 in quarantine" in msg
    assert "--ports" in msg
    assert exc.value.code == "ports_exhausted"
    assert alloc.snapshot() == before
    # still consistent: the quarantined port comes back in time
    assert alloc.allocate(6.0) == b
    assert alloc.is_in_use(a) and alloc.is_in_use(c)


def test_usable_probe_veto_holds_port_out():
    alloc = PortAllocator(30000, 30005)
    probed = []

    def usable(port):
        probed.append(port)
        return port != 30000

    assert alloc.allocate(0.0, usable) == 30002
    assert probed == [30000, 30002]
    assert not alloc.is_in_use(30000)
    assert alloc.quarantined == 1
    # held out: the next allocations skip it even without a probe
    assert alloc.allocate(1.0) == 30004
    with pytest.raises(PortsExhausted):
        alloc.allocate(UNUSABLE_HOLD - 1)
    # after the hold it is offered again
    assert alloc.allocate(UNUSABLE_HOLD) == 30000


def test_probe_vetoing_everything_exhausts():
    alloc = PortAllocator(30000, 30005)
    with pytest.raises(PortsExhausted):
        alloc.allocate(0.0, lambda port: False)
    assert alloc.in_use == 0
    assert alloc.quarantined == 3


def test_quarantine_not_blocked_by_earlier_probe_veto():
    """A 5 s quarantine must end after 5 s even if a 60 s probe hold was queued before it."""
    alloc = PortAllocator(30000, 30003, quarantine=5.0)  # two pairs
    port = alloc.allocate(0.0, lambda p: p != 30000)  # 30000 vetoed: held 60 s
    assert port == 30002
    alloc.release(port, 1.0)  # quarantined until 6.0
    assert alloc.allocate(10.0) == 30002


def test_claim_specific_ports():
    alloc = PortAllocator(30000, 30009)
    assert alloc.claim(30004, 0.0)
    assert alloc.is_in_use(30004)
    assert alloc.claim(30005, 0.0) is False  # RTCP of a taken pair
    assert alloc.claim(30004, 0.0) is False
    got = drain(alloc)
    assert 30004 not in got
    assert sorted(got) == [30000, 30002, 30006, 30008]


def test_claim_takes_port_out_of_quarantine():
    alloc = PortAllocator(30000, 30003, quarantine=5.0)
    a = alloc.allocate(0.0)
    alloc.release(a, 0.0)
    assert alloc.claim(a, 1.0)
    assert alloc.quarantined == 0
    assert alloc.in_use == 1
    # the stale quarantine entry must not free the claimed port later
    assert alloc.allocate(10.0) == 30002
    with pytest.raises(PortsExhausted):
        alloc.allocate(20.0)


def test_claimed_then_released_port_keeps_lru_order():
    alloc = PortAllocator(30000, 30005, quarantine=1.0)  # 30000, 30002, 30004
    assert alloc.claim(30000, 0.0)
    alloc.release(30000, 0.0)
    # 30000 was just used: ports never used come first
    assert [alloc.allocate(10.0) for _ in range(3)] == [30002, 30004, 30000]


def test_next_free_after_skips_ports_in_use():
    alloc = PortAllocator(30000, 30011)
    alloc.claim(30004, 0.0)
    assert alloc.next_free_after(30000, 2, 0.0) == [30000, 30002, 30006, 30008, 30010]


def test_contains():
    alloc = PortAllocator(30001, 30010)
    assert alloc.contains(30002)
    assert alloc.contains(30003)
    assert not alloc.contains(30000)  # pair 30000/30001 starts below the range
    assert not alloc.contains(30010)  # 30011 beyond the end


def test_a_probe_that_cannot_judge_leaves_the_port_free_and_first():
    """A probe that raises (the relay is out of file descriptors: every port would fail
    alike) must not lose the port nor hold it as taken: it stays free, next in line."""
    pool = PortAllocator(30000, 30009)
    first = pool.allocate(0.0)
    pool.release(first, 0.0, quarantine=False)  # back at the end of the line

    def out_of_fds(port: int) -> bool:
        raise OSError(24, "Too many open files")

    with pytest.raises(OSError):
        pool.allocate(1.0, out_of_fds)
    assert pool.snapshot() == {"total": 5, "in_use": 0, "quarantined": 0, "free": 5}
    assert pool.allocate(2.0) == 30002  # the one the probe saw, not one further on
    assert [pool.allocate(2.0) for _ in range(4)] == [30004, 30006, 30008, 30000]
