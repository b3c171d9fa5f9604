"""nfqueue mode under a burst of new flows (a takeover, 200 calls starting at once): one
transaction per queue batch, packets queued behind their flow's first one re-injected
without writes, and a failed write refusing only the packets that needed it."""

from __future__ import annotations

import socket
import struct
from typing import Any, List, Tuple

from fastpath.contract import Install, LegSpec, Remove, SessionSpec, StreamSpec
from fastpath.kernel.nfqueue import NF_DROP, NF_REPEAT
from fastpath.kernel.nft import NftError
from lrk.daemon.nfqueue_plane import NfqueuePlane

RELAY = "198.51.100.1"
CALLS = 20


def _udp4(src: Tuple[str, int], dst: Tuple[str, int]) -> bytes:
    payload = b"\x80" + b"\x00" * 11
    udp = struct.pack("!HHHH", src[1], dst[1], 8 + len(payload), 0) + payload
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 0, 0, 64, 17, 0,
                     socket.inet_aton(src[0]), socket.inet_aton(dst[0]))
    return ip + udp


class Log:
    """What the plane did, in order: nft transactions and conntrack flushes."""

    def __init__(self, fail_on: str = "") -> None:
        self.events: List[Tuple[str, Any]] = []
        self.fail_on = fail_on
        self.backend = "fake"

    # nft
    def run(self, text: str) -> None:
        if self.fail_on and self.fail_on in text:
            raise NftError(f"Error: Could not process rule: {self.fail_on}")
        self.events.append(("nft", text))

    # conntrack
    def flush_marks(self, marks: Any) -> None:
        self.events.append(("flush", sorted(marks)))

    def flows(self, filters: Any, timeout: float = 0, max_flows: int = 0) -> list:
        return []

    def close(self) -> None:
        pass

    def writes(self) -> List[str]:
        return [text for kind, text in self.events if kind == "nft"]


class Packet:
    def __init__(self, packet_id: int, payload: bytes) -> None:
        self.packet_id, self.payload = packet_id, payload


class FakeQueue:
    def __init__(self, packets: List[bytes], log: Any = None) -> None:
        self.waiting = [Packet(i + 1, p) for i, p in enumerate(packets)]
        self.given: List[Tuple[int, int]] = []
        self.log = log

    def receive_batch(self, max_n: int = 64) -> List[Packet]:
        out, self.waiting = self.waiting[:max_n], self.waiting[max_n:]
        return out

    def verdicts(self, decided: List[Tuple[int, int]]) -> None:
        """One datagram of verdicts, as the real queue sends them."""
        self.given.extend(decided)
        if self.log is not None:
            self.log.events.append(("verdicts", [packet_id for packet_id, _ in decided]))


def _plane(log: Log) -> Tuple[NfqueuePlane, List[int]]:
    plane = NfqueuePlane(31000, 31999, [RELAY])
    plane.nft = log  # type: ignore[assignment]
    plane.ct = plane.ct_dump = log  # type: ignore[assignment]
    plane.sink = lambda event: None
    relay_ports = []
    for i in range(CALLS):
        port = 31000 + 4 * i
        a = LegSpec("A", RELAY, port, ("198.51.100.10", 4000 + 2 * i))
        b = LegSpec("B", RELAY, port + 2, ("198.51.100.70", 5000 + 2 * i))
        assert plane.apply([Install(SessionSpec(i + 1, f"c{i}", (StreamSpec(0, a, b),)))]) == []
        relay_ports.append(port)
    log.events.clear()
    return plane, relay_ports


def _burst(relay_ports: List[int], behind: int) -> List[bytes]:
    """Each call's caller, behind a NAT: its first packet, then `behind` more queued
    before the first was decided; calls interleaved as they arrive."""
    packets = []
    for _k in range(1 + behind):
        for i, port in enumerate(relay_ports):
            packets.append(_udp4(("198.51.100.10", 61000 + i), (RELAY, port)))
    return packets


def test_a_burst_of_new_flows_is_one_transaction_per_queue_batch():
    log = Log()
    plane, ports = _plane(log)
    queue = FakeQueue(_burst(ports, behind=2), log)  # 60 packets: one batch of 64
    plane.nfq = queue  # type: ignore[assignment]
    plane._on_queue()
    assert queue.given == [(i + 1, NF_REPEAT) for i in range(3 * CALLS)]
    writes = log.writes()
    assert len(writes) == 1  # every latch and admission of the batch in one transaction
    assert writes[0].count("add element inet lrk adm4") == CALLS
    # flows NATed towards the announced addresses go after the new elements are in, and
    # only then are the packets re-injected, in order, in one datagram
    assert [kind for kind, _ in log.events] == ["nft", "flush", "verdicts"]
    assert log.events[2] == ("verdicts", list(range(1, 3 * CALLS + 1)))
    assert plane.counters["nfqueue.admitted"] == CALLS
    assert plane.counters["media.latched"] == CALLS  # latches, not packets
    assert plane.counters["nfqueue.requeued"] == 2 * CALLS
    assert plane.counters["nfqueue.packets"] == 3 * CALLS
    assert len(plane.latched) == CALLS


def test_packets_behind_an_admitted_flow_write_nothing():
    log = Log()
    plane, ports = _plane(log)
    plane.nfq = FakeQueue(_burst(ports[:1], behind=0))  # type: ignore[assignment]
    plane._on_queue()
    assert len(log.writes()) == 1
    queue = FakeQueue(_burst(ports[:1], behind=4))
    plane.nfq = queue  # type: ignore[assignment]
    plane._on_queue()
    assert [v for _, v in queue.given] == [NF_REPEAT] * 5
    assert len(log.writes()) == 1  # nothing new to write
    assert plane.counters["nfqueue.requeued"] == 5


def test_a_failed_write_refuses_only_the_packets_that_needed_it():
    bad = f"{RELAY} . 31008 . 198.51.100.10"  # call 2's admission
    log = Log(fail_on=bad)
    plane, ports = _plane(log)
    # calls 0-3 first packets, then one more packet of each, all in one batch
    queue = FakeQueue(_burst(ports[:4], behind=1))
    plane.nfq = queue  # type: ignore[assignment]
    plane._on_queue()
    assert queue.given == [(1, NF_REPEAT), (2, NF_REPEAT), (3, NF_DROP), (4, NF_REPEAT),
                              (5, NF_REPEAT), (6, NF_REPEAT), (7, NF_DROP), (8, NF_REPEAT)]
    assert plane.counters["kernel.errors"] == 1
    # the batch failed as a whole, then each decision went alone: the others are in,
    # nothing of call 2's decision is
    applied = "".join(log.writes())
    assert applied.count("add element inet lrk adm4") == 3 and bad not in applied
    assert all(f"{RELAY} . 31008" not in text for text in log.writes())
    # call 2's next packet decides afresh, and now the write goes through: the re-point
    # of its other direction too (the plane knows the kernel never got it)
    sid = plane.by_relay[(RELAY, ports[2])][0]
    assert plane.installed[sid].a.peer(False) == ("198.51.100.10", 4004)  # as announced
    log.fail_on = ""
    retry = FakeQueue([_udp4(("198.51.100.10", 61002), (RELAY, ports[2]))])
    plane.nfq = retry  # type: ignore[assignment]
    plane._on_queue()
    assert retry.given == [(1, NF_REPEAT)]
    assert bad in log.writes()[-1]
    assert plane.installed[sid].a.peer(False) == ("198.51.100.10", 61002)
    assert "61002" in log.writes()[-1].replace(bad, "")  # the re-point, written now
    assert plane.counters["nfqueue.admitted"] == 4


def test_ended_calls_leave_no_relay_address_behind():
    log = Log()
    plane, ports = _plane(log)
    plane.nfq = FakeQueue(_burst(ports, behind=1))  # type: ignore[assignment]
    plane._on_queue()
    assert len(plane.by_relay) == 4 * CALLS and len(plane.relays_of) == CALLS
    plane.apply([Remove(i + 1, f"c{i}", "deleted") for i in range(CALLS)])
    assert plane.by_relay == {} and plane.relays_of == {} and plane.latched == {}
    assert plane.admitted == {}


def test_a_failed_conntrack_flush_still_gives_every_packet_its_verdict():
    from fastpath.kernel.ctnetlink import ConntrackError

    log = Log()
    plane, ports = _plane(log)

    def broken(marks: Any) -> None:
        raise ConntrackError("conntrack flush failed: timeout")

    log.flush_marks = broken  # type: ignore[assignment]
    queue = FakeQueue(_burst(ports[:2], behind=1))
    plane.nfq = queue  # type: ignore[assignment]
    plane._on_queue()  # does not raise
    assert [v for _, v in queue.given] == [NF_REPEAT] * 4  # the elements are in
    assert plane.counters["kernel.errors"] == 1
    assert len(plane._stale) == 2  # the flush is retried with the next read
    assert plane._deferred is None  # writes are immediate again


def test_a_bug_in_a_decision_costs_that_packet_only():
    log = Log()
    plane, ports = _plane(log)
    decide = plane._decide
    calls = []

    def buggy(payload: bytes) -> int:
        calls.append(payload)
        if len(calls) == 2:
            raise ValueError("a bug")
        return decide(payload)

    plane._decide = buggy  # type: ignore[assignment]
    queue = FakeQueue(_burst(ports[:3], behind=0))
    plane.nfq = queue  # type: ignore[assignment]
    plane._on_queue()
    assert queue.given == [(1, NF_REPEAT), (2, NF_DROP), (3, NF_REPEAT)]
    assert plane.counters["kernel.errors"] == 1
    # nothing is held any more: the next install is written at once
    writes = len(log.writes())
    a = LegSpec("A", RELAY, 31900, ("198.51.100.10", 4000))
    b = LegSpec("B", RELAY, 31902, ("198.51.100.70", 5000))
    assert plane.apply([Install(SessionSpec(999, "x", (StreamSpec(0, a, b),)))]) == []
    assert len(log.writes()) > writes


def test_a_units_later_decisions_fail_with_its_first_failed_one():
    """Leg A's RTP and RTCP first packets in one batch, RTP's admission write fails: the
    RTCP decision was computed on top of it, so nothing of the unit is applied, and the
    plane's view of the unit, its latches and admissions are as before the batch."""
    bad = f"{RELAY} . 31000 . 198.51.100.10"
    log = Log(fail_on=bad)
    plane, ports = _plane(log)
    sid = plane.by_relay[(RELAY, 31000)][0]
    spec_before = plane.installed[sid]
    queue = FakeQueue([_udp4(("198.51.100.10", 61000), (RELAY, 31000)),
                       _udp4(("198.51.100.10", 61001), (RELAY, 31001))])
    plane.nfq = queue  # type: ignore[assignment]
    plane._on_queue()
    assert queue.given == [(1, NF_DROP), (2, NF_DROP)]
    assert log.writes() == []  # neither decision's writes went in
    assert plane.installed[sid] == spec_before
    assert [k for k in plane.latched if k[0] == sid] == []
    assert plane.admitted.get(sid, set()) == set()
    assert plane.counters["media.latched"] == 0 and plane.counters["nfqueue.admitted"] == 0
    assert plane.counters["nfqueue.batches.retried"] == 1


def test_a_call_never_answered_leaves_nothing_behind():
    log = Log()
    plane, _ports = _plane(log)
    a = LegSpec("A", RELAY, 31900, ("198.51.100.10", 4000))
    b = LegSpec("B", RELAY, 31902, None)  # no answer yet: no elements
    assert plane.apply([Install(SessionSpec(999, "x", (StreamSpec(0, a, b),)))]) == []
    plane.apply([Remove(999, "x", "deleted")])
    ours = {sid for sid in plane.installed}
    assert set(plane.relays_of) <= ours and set(plane.streams_applied) <= ours
