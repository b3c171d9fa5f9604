"""Kernel-side corners found in the second reading of 2026-12-05: a failed start after an
adoption keeps the kept calls' table and flows; missing accounting sysctls fail the start
instead of counting nothing; an ended call's unflushed mark taken by a new call is not
flushed under it; nfqueue drops (once) a packet toward a peer on hold instead of
re-queueing it for ever. Fakes only."""

from __future__ import annotations

import asyncio
import errno
from typing import Any, List

import pytest

from fastpath.contract import Install, LegSpec, Remove, SessionSpec, StreamSpec
from fastpath.kernel.kernel_rules import elements
from fastpath.kernel.nfqueue import NF_DROP
from lrk.daemon import kernel_plane, nfqueue_plane
from lrk.daemon.kernel_plane import KernelPlane
from lrk.daemon.nfqueue_plane import NfqueuePlane
from lrk.errors import ConfigError

try:
    from test_kernel_adopt import CALLER, RELAY, FakeCt, FakeNft, flow, kernel_view, listing
    from test_kernel_adopt import spec as adopt_spec
    from test_lifecycle_cleanup import fake_kernel, marks_of, running_plane, spec
    from test_nfqueue_burst import FakeQueue, Log, _udp4
except ImportError:  # tests/ collected as a package
    from tests.unit.test_kernel_adopt import (
        CALLER,
        RELAY,
        FakeCt,
        FakeNft,
        flow,
        kernel_view,
        listing,
    )
    from tests.unit.test_kernel_adopt import spec as adopt_spec
    from tests.unit.test_lifecycle_cleanup import fake_kernel, marks_of, running_plane, spec
    from tests.unit.test_nfqueue_burst import FakeQueue, Log, _udp4

__all__ = ["fake_kernel"]  # a fixture, used by name


def test_a_failed_start_after_an_adoption_keeps_the_adopted_table(fake_kernel, monkeypatch):
    """A restart that kept its calls adopts the table; then the start fails (nfqueue's
    queue cannot be bound): the kept calls' table and flows stay for the next start."""
    probe = NfqueuePlane(31000, 31099, [RELAY])
    table = listing(probe.rules, kernel_view(adopt_spec(1, 31000, 31002)))
    nfts: List[Any] = []
    cts: List[Any] = []
    monkeypatch.setattr(kernel_plane, "Nft", lambda: nfts.append(FakeNft(table)) or nfts[-1])
    monkeypatch.setattr(kernel_plane, "ConntrackSocket",
                        lambda: cts.append(FakeCt([flow(31000, 31000, CALLER, 5)])) or cts[-1])

    class BusyQueue:
        def __init__(self, *args: Any, **kw: Any) -> None:
            pass

        def bind(self) -> None:
            raise OSError(errno.EBUSY, "queue busy")

        def fileno(self) -> int:
            return 1000

        def close(self) -> None:
            pass

    monkeypatch.setattr(nfqueue_plane, "NfQueue", BusyQueue)
    monkeypatch.setattr(nfqueue_plane, "add_queue_rule", lambda *a, **kw: None)
    plane = NfqueuePlane(31000, 31099, [RELAY], adopt=True)
    with pytest.raises(OSError):
        asyncio.run(plane.start())
    runs = [r for n in nfts for r in n.runs]
    assert plane.rules.destroy() not in runs, "the kept calls' table was destroyed"
    assert 31000 not in [m for c in cts for m in c.flushed], "a kept call's flows flushed"


def test_missing_accounting_sysctls_fail_the_start(fake_kernel, tmp_path, monkeypatch):
    """Conntrack counting without the sysctls (nf_conntrack absent) would count nothing:
    the start fails, naming them."""
    missing = {name: str(tmp_path / "absent" / name) for name in fake_kernel}
    monkeypatch.setattr(kernel_plane, "ACCT", missing)
    plane = KernelPlane(31000, 31099, ["127.0.0.1"])
    with pytest.raises(ConfigError, match="nf_conntrack_acct"):
        asyncio.run(plane.start())


def test_a_mark_a_new_call_took_is_not_flushed_under_it():
    plane = running_plane()
    ct = plane.ct
    assert plane.apply([Install(spec(1, 31000, 31002))]) == []
    ct.fail = 1
    assert plane.apply([Remove(1, "c1", "deleted")]) == []  # its flush fails: kept to retry
    ct.fail = 1  # and the install's retry fails too
    new = spec(2, 31000, 31002)  # the same ports, so the same marks
    assert plane.apply([Install(new)]) == []
    ct.flushed.clear()
    plane._poll(100.0)
    assert not set(marks_of(new)) & set(ct.flushed)


def test_a_mark_taken_in_a_deferred_burst_is_not_flushed_later():
    plane = running_plane()
    ct = plane.ct
    assert plane.apply([Install(spec(1, 31000, 31002))]) == []
    ct.fail = 1
    assert plane.apply([Remove(1, "c1", "deleted")]) == []
    plane.deferred_begin()  # the retry is skipped inside a burst
    first = plane.deferred_mark()
    new = spec(2, 31000, 31002)
    assert plane.apply([Install(new)]) == []
    plane.deferred_end([(first, plane.deferred_mark(), None)])
    ct.flushed.clear()
    plane._poll(100.0)
    assert not set(marks_of(new)) & set(ct.flushed)


def test_nfqueue_drops_a_packet_toward_a_peer_on_hold_once():
    """B is on hold (peer port 0): A's peer still sends. No element forwards it, so a
    repeat would bring it back for ever: it is dropped and counted, every time it comes."""
    log = Log()
    plane = NfqueuePlane(31000, 31999, [RELAY])
    plane.nft = log
    plane.ct = plane.ct_dump = log
    plane.sink = lambda event: None
    a = LegSpec("A", RELAY, 31000, ("198.51.100.10", 4000))
    b = LegSpec("B", RELAY, 31002, ("198.51.100.70", 0))
    assert plane.apply([Install(SessionSpec(1, "c1", (StreamSpec(0, a, b),)))]) == []
    uid = next(iter(plane.installed))
    assert plane.installed[uid].b.held
    packet = _udp4(("198.51.100.10", 4000), (RELAY, 31000))
    verdicts = []
    for _ in range(3):
        queue = FakeQueue([packet])
        plane.nfq = queue
        plane._on_queue()
        verdicts += queue.given
    assert f"{RELAY} . 31000" not in elements(plane.installed[uid], seen=False)["mark4"]
    assert [v for _, v in verdicts] == [NF_DROP] * 3
    assert plane.counters["media.dropped.no_destination"] == 3
