"""The data-plane contract: engine timers, failures as events, planes behind fakes.

Each failure path here failed on 7d500b6: a bind failure was only logged (the engine
kept a session no worker served, and the client was told OK), nft errors were
swallowed, kernel mode polled counters only when someone asked for stats (a call that
went silent right after it started expired at about twice its timeout), and the
nfqueue plane wrote latches straight into engine state.
"""

from __future__ import annotations

import asyncio
import os
import socket
import time
from typing import Any, Dict, List

import msgpack
import pytest

from fastpath import channel
from fastpath.contract import (
    MAX_STREAMS,
    Install,
    LegReport,
    LegSpec,
    PlaneFailure,
    Remove,
    SessionReport,
    SessionSpec,
    StreamReport,
    StreamSpec,
    Update,
    unit_id,
)
from fastpath.kernel.ctnetlink import CtFlow
from fastpath.kernel.kernel_rules import DROP_COUNTERS
from fastpath.kernel.nft import NftError
from lrk.control.auth import find_key, sign
from lrk.core.engine import Engine, EngineConfig
from lrk.daemon.config import Config
from lrk.daemon.kernel_plane import KernelPlane
from lrk.daemon.nfqueue_plane import NfqueuePlane
from lrk.daemon.relay import Relay
from lrk.daemon.socket_plane import SocketPlane, WorkerHandle, add_reports

CALLER = ("198.51.100.10", 4000)
CALLEE = ("198.51.100.20", 5000)


def engine(**kw: Any) -> Engine:
    cfg = dict(internal_ip="127.0.0.1", external_ip="127.0.0.1", port_start=31000,
               port_end=31099, silence_timeout=10.0, max_lifetime=0.0, quarantine=0.0)
    cfg.update(kw)
    return Engine(EngineConfig(**cfg))


def call(e: Engine, call_id: str = "c1", now: float = 0.0) -> Any:
    session, _leg, _actions = e.offer(now, call_id, "ft", CALLER)
    e.answer(now, call_id, "ft", "tt", CALLEE)
    return session


def media(sid: int, at: float, packets: int = 1) -> SessionReport:
    return SessionReport(sid, at, (StreamReport(0, LegReport(packets, 100 * packets),
                                                LegReport()),))


# -- engine: time --------------------------------------------------------------------------
def test_no_timer_without_sessions():
    assert engine().get_timer() is None


def test_timer_is_the_earliest_deadline_and_moves_with_media():
    e = engine()
    s1 = call(e, "c1", now=0.0)
    call(e, "c2", now=3.0)
    assert e.get_timer() == 10.0
    e.handle_event(8.0, media(s1.sid, 8.0))
    assert e.get_timer() == 13.0  # c2's silence deadline now comes first
    assert e.handle_timer(12.99) == []
    assert [(a.call_id, a.reason) for a in e.handle_timer(13.0)] == [("c2", "silence")]
    assert e.get_timer() == 18.0
    assert [(a.call_id, a.reason) for a in e.handle_timer(18.0)] == [("c1", "silence")]
    assert e.get_timer() is None
    assert e.counters["sessions.expired.silence"] == 2


def test_shorter_timeout_from_a_reoffer_brings_the_deadline_forward():
    e = engine()
    call(e)
    assert e.get_timer() == 10.0
    e.offer(1.0, "c1", "ft", CALLER, to_tag="tt", timeout=2.0)
    assert e.get_timer() == 2.0
    assert [a.reason for a in e.handle_timer(2.0)] == ["silence"]


def test_longer_timeout_postpones_without_a_scan():
    e = engine()
    call(e)
    e.offer(1.0, "c1", "ft", CALLER, to_tag="tt", timeout=100.0)
    assert e.handle_timer(50.0) == []
    assert e.get_timer() == 100.0


def test_lifetime_ends_a_busy_call():
    e = engine(max_lifetime=30.0)
    s = call(e)
    for t in range(5, 35, 5):
        e.handle_event(float(t), media(s.sid, float(t)))
    assert e.get_timer() == 30.0
    assert [a.reason for a in e.handle_timer(30.0)] == ["lifetime"]
    assert e.counters["sessions.expired.lifetime"] == 1


def test_reports_do_not_grow_the_timer_heap():
    e = engine()
    sessions = [call(e, f"c{i}") for i in range(20)]
    for t in range(1, 200):
        for s in sessions:
            e.handle_event(float(t), media(s.sid, float(t)))
        e.get_timer()
    assert len(e._timers) <= 2 * len(sessions)


def test_deleted_session_leaves_no_live_timer():
    e = engine()
    call(e)
    e.delete(1.0, "c1")
    assert e.get_timer() is None
    assert e.handle_timer(100.0) == []


# -- engine: failures and reports -----------------------------------------------------------
def test_plane_failure_ends_the_session_and_frees_its_ports():
    e = engine()
    s = call(e)
    used = e.ports.snapshot()["in_use"]
    actions = e.handle_event(1.0, PlaneFailure(s.sid, "bind_failed", "cannot bind"))
    assert actions == [Remove(s.sid, "c1", "failed")]
    assert "c1" not in e.by_call
    assert e.counters["sessions.failed"] == 1
    assert e.counters["sessions.failed.bind_failed"] == 1
    assert (used, e.ports.snapshot()["in_use"]) == (2, 0)  # both legs' port pairs
    assert e.handle_event(2.0, PlaneFailure(s.sid, "bind_failed", "again")) == []


def test_report_of_an_older_generation_keeps_counters_but_not_its_latch():
    e = engine()
    s = call(e)
    gen = s.legs["A"].generation
    e.offer(1.0, "c1", "ft", CALLER, to_tag="tt")  # re-latch
    e.apply_report(SessionReport(s.sid, 1.5, (StreamReport(
        0, LegReport(3, 300, generation=gen, latched=("198.51.100.10", 61000)),
        LegReport()),)))
    assert s.legs["A"].latched is None
    assert s.legs["A"].counters.in_packets == 3
    assert s.last_media == 1.5


def test_actions_carry_immutable_snapshots():
    e = engine()
    session, _leg, actions = e.offer(0.0, "c1", "ft", CALLER)
    spec = actions[0].spec
    e.answer(1.0, "c1", "ft", "tt", CALLEE)
    assert spec.b.announced is None  # the snapshot did not move with the engine
    assert session.legs["B"].announced == CALLEE
    with pytest.raises(AttributeError):  # immutable records (NamedTuple)
        spec.b.announced = CALLEE  # type: ignore[misc]


# -- the channel ------------------------------------------------------------------------------
def test_channel_messages_round_trip_as_typed_values():
    stream = StreamSpec(1, LegSpec("A", "127.0.0.1", 31000, CALLER, (CALLER[0], 4001),
                                   False, 2, True),
                        LegSpec("B", "127.0.0.1", 31002, None, None, True, 0))
    report = channel.UnitReport(7 * MAX_STREAMS + 1, 1.5, LegReport(
        1, 2, 3, 4, (("send_error", 1),), 2, CALLER, None), LegReport())
    messages = [
        channel.InstallSession(113, stream, (("127.0.0.1", 31000),) * 4),
        channel.UpdateSession(113, stream), channel.RemoveSession(113), channel.Flush(3),
        channel.Flushed(3), channel.Stop(), channel.Taps(),
        channel.Reports((report,), {"media.forwarded.packets": 9}),
        channel.Batch((channel.RemoveSession(1), channel.Flush(2)), (0, 0)),
    ]
    for message in messages:
        assert channel.decode_message(channel.encode_message(message)) == message


def test_a_received_message_outlives_the_next_receive_into_the_same_buffer():
    """receive() reads every message into one buffer kept per thread: what it returned
    must not change when the next, shorter message lands in that buffer, and fds and EOF
    come through as before."""
    a, b = channel.pair()
    spare = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        long_message = channel.Reports((), {f"counter.{i}": i for i in range(200)})
        short_message = channel.RemoveSession(7)
        channel.send(a, long_message, [spare.fileno()])
        channel.send(a, short_message)
        first = channel.receive(b, socket.MSG_DONTWAIT)
        second = channel.receive(b, socket.MSG_DONTWAIT)
        assert first is not None and second is not None
        assert first[0] == long_message and len(first[1]) == 1
        assert second == (short_message, [])
        os.close(first[1][0])
        with pytest.raises(BlockingIOError):
            channel.receive(b, socket.MSG_DONTWAIT)
        a.close()
        assert channel.receive(b) is None  # EOF
    finally:
        for s in (a, b, spare):
            s.close()


def test_channel_rejects_untagged_bytes():
    import marshal

    with pytest.raises(ValueError):
        channel.decode_message(marshal.dumps({"op": "install"}))
    with pytest.raises(ValueError):
        channel.decode_message(marshal.dumps(("?", 1)))


# -- socket plane ---------------------------------------------------------------------------
def test_socket_plane_bind_failure_is_a_failure_not_a_log_line():
    plane = SocketPlane(31000, 31099, ["127.0.0.1"])
    plane.workers = [FakeWorker()]  # type: ignore[list-item]
    squatter = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    squatter.bind(("127.0.0.1", 31003))  # B's RTCP port
    try:
        spec = one_stream(1, "c1", 31000, 31002)
        failures = plane.apply([Install(spec)])
    finally:
        squatter.close()
    assert [(f.sid, f.reason) for f in failures] == [(1, "bind_failed")]
    assert "127.0.0.1:31002-31003" in failures[0].detail
    assert plane.installed == {}
    assert plane.counters["plane.bind_failures"] == 1
    # A's ports were bound and released again: nothing leaks
    probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    probe.bind(("127.0.0.1", 31000))
    probe.close()


def one_stream(sid: int, call_id: str, port_a: int, port_b: int) -> SessionSpec:
    return SessionSpec(sid, call_id, (StreamSpec(0, LegSpec("A", "127.0.0.1", port_a, CALLER),
                                                 LegSpec("B", "127.0.0.1", port_b, CALLEE)),))


def test_reports_continue_from_a_dead_workers_counts():
    base = channel.UnitReport(16, 5.0, LegReport(10, 1000, 9, 900, (("no_destination", 1),),
                                                 1, CALLER), LegReport(9, 900, 10, 1000))
    new = channel.UnitReport(16, None, LegReport(2, 200, 1, 100, (("no_destination", 2),), 1),
                             LegReport())
    total = add_reports(base, new)
    assert total.last_rx == 5.0
    assert (total.a.in_packets, total.a.in_bytes, total.a.out_packets) == (12, 1200, 10)
    assert dict(total.a.drops) == {"no_destination": 3}
    assert total.b.in_packets == 9


class FakeWorker:
    def __init__(self) -> None:
        self.sent: List[Any] = []
        self.outbox: List[Any] = []
        self.chan = object()
        self.media_fds = 0

    def has_room(self, uid: int, nfds: int) -> bool:
        return True

    def send(self, message: Any, socks: Any = ()) -> None:
        self.sent.append(message)
        for s in socks:
            s.close()

    def _flush_outbox(self) -> None:
        pass


def test_socket_plane_reply_waits_for_a_full_channel():
    plane = SocketPlane(31000, 31099, ["127.0.0.1"])
    worker = FakeWorker()
    plane.workers = [worker]  # type: ignore[list-item]
    worker.outbox = ["queued install"]  # the channel was full: nothing left yet
    sent: List[str] = []
    plane.commit(lambda: sent.append("reply"))
    assert sent == []  # the client must not hear of a session the worker does not know
    worker.outbox = []
    plane.committed()
    assert sent == ["reply"]


def test_socket_plane_reports_reach_the_sink_for_installed_sessions_only():
    plane = SocketPlane(31000, 31099, ["127.0.0.1"])
    worker = FakeWorker()
    plane.workers = [worker]  # type: ignore[list-item]
    events: List[Any] = []
    plane.sink = events.append
    spec = one_stream(4, "c4", 31010, 31012)
    assert plane.apply([Install(spec)]) == []
    assert isinstance(worker.sent[0], channel.InstallSession)
    ours = channel.UnitReport(unit_id(4, 0), 1.0, LegReport(1, 100), LegReport())
    stranger = channel.UnitReport(unit_id(99, 0), 1.0, LegReport(1, 100), LegReport())
    plane.on_message(worker, channel.Reports((ours, stranger), {"media.latched": 1}))  # type: ignore[arg-type]
    assert events == [media(4, 1.0)]
    assert plane.media_counters()["media.latched"] == 1
    relatched = SessionSpec(4, "c4", (StreamSpec(0, LegSpec("A", "127.0.0.1", 31010, CALLER,
                                                            generation=1),
                                                 spec.b),))
    plane.apply([Update(relatched, "A"), Remove(4, "c4", "deleted")])
    assert [type(m) for m in worker.sent] == [channel.InstallSession, channel.UpdateSession,
                                              channel.RemoveSession]


class FakeLoop:
    """call_soon/call_later recorded, run only when the test says so."""

    def __init__(self) -> None:
        self.soon: List[Any] = []

    def call_soon(self, fn: Any, *args: Any) -> None:
        self.soon.append((fn, args))

    def call_later(self, delay: float, fn: Any, *args: Any) -> Any:
        return FakeTimer()


class FakeTimer:
    def cancel(self) -> None:
        pass


def test_socket_plane_refresh_rides_in_the_commit_that_follows_it():
    """A burst's refresh (its deletes' counters) leaves with the burst's installs, as one
    batch, instead of in a worker message of its own."""
    plane = SocketPlane(31000, 31099, ["127.0.0.1"])
    plane.loop = FakeLoop()  # type: ignore[assignment]
    worker = FakeWorker()
    plane.workers = [worker]  # type: ignore[list-item]
    refreshed: List[str] = []
    assert plane.apply([Install(one_stream(5, "c5", 31020, 31022))]) == []
    plane.refresh(lambda: refreshed.append("counters"))
    order: List[str] = []
    plane.commit(lambda: order.append(f"reply after {len(worker.sent)} messages"))
    assert [type(m) for m in worker.sent] == [channel.InstallSession, channel.Flush]
    assert order == ["reply after 2 messages"]
    for fn, args in plane.loop.soon:  # the refresh's own scheduled send finds nothing
        fn(*args)
    assert [type(m) for m in worker.sent] == [channel.InstallSession, channel.Flush]
    assert refreshed == []  # not before the worker has answered
    plane.on_message(worker, channel.Flushed(worker.sent[1].req))  # type: ignore[arg-type]
    assert refreshed == ["counters"]


def test_socket_plane_install_and_refresh_reach_the_worker_in_one_channel_message():
    plane = SocketPlane(31000, 31099, ["127.0.0.1"])
    plane.loop = FakeLoop()  # type: ignore[assignment]
    mine, theirs = channel.pair()
    mine.setblocking(False)
    worker = WorkerHandle(0, plane)
    worker.chan = mine
    plane.workers = [worker]
    try:
        assert plane.apply([Install(one_stream(6, "c6", 31030, 31032))]) == []
        plane.refresh(lambda: None)
        plane.commit(lambda: None)
        got = channel.receive(theirs, socket.MSG_DONTWAIT)
        assert got is not None
        message, fds = got
        for fd in fds:
            os.close(fd)
        assert isinstance(message, channel.Batch)
        assert [type(m) for m in message.messages] == [channel.InstallSession, channel.Flush]
        assert len(fds) == 4
        with pytest.raises(BlockingIOError):  # nothing else was sent
            channel.receive(theirs, socket.MSG_DONTWAIT)
    finally:
        mine.close()
        theirs.close()


# -- kernel plane ---------------------------------------------------------------------------
class FakeNft:
    def __init__(self, fail_on: str = "") -> None:
        self.fail_on = fail_on
        self.runs: List[str] = []
        self.backend = "fake"

    def run(self, text: str) -> None:
        if self.fail_on and self.fail_on in text:
            raise NftError(f"Error: Could not process rule: {self.fail_on}")
        self.runs.append(text)

    def run_json(self, text: str) -> Dict[str, Any]:
        return {"nftables": [{"counter": {"name": name, "packets": 0, "bytes": 0}}
                             for name in DROP_COUNTERS.values()]}


class FakeCt:
    def __init__(self) -> None:
        self.flows_now: List[CtFlow] = []
        self.flushed: List[int] = []

    def flush_marks(self, marks: Any) -> None:
        self.flushed.extend(marks)

    def flows(self, filters: Any, timeout: float = 0, max_flows: int = 0) -> List[CtFlow]:
        return list(self.flows_now)

    def close(self) -> None:
        pass


def kernel_plane(nft: FakeNft) -> KernelPlane:
    plane = KernelPlane(31000, 31099, ["127.0.0.1"], poll_interval=2.0)
    plane.nft = nft  # type: ignore[assignment]
    plane.ct = plane.ct_dump = FakeCt()  # type: ignore[assignment]
    return plane


def test_kernel_plane_nft_error_is_a_failure():
    e = engine()
    plane = kernel_plane(FakeNft(fail_on="add element"))
    session = call(e)
    failures = plane.apply([Install(session.spec())])
    assert [(f.sid, f.reason) for f in failures] == [(session.sid, "kernel_error")]
    assert "Could not process rule" in failures[0].detail
    assert plane.installed == {} and plane.specs == {}
    assert plane.counters["kernel.errors"] == 1


@pytest.mark.parametrize("timeouts", [True, False])
def test_kernel_plane_silence_expiry_is_exact_with_sparse_periodic_reads(timeouts):
    """Media for the first second, then silence; the shell refreshes the plane before
    every expiry decision, as the relay does. With the flow's remaining timeout (what
    the kernel sends) the last packet is dated to within a second whenever it is read:
    the call ends within 1 s + kernel_poll of last packet + timeout (10 s), while the
    plane's own timer reads only every 15 s. Without it (a kernel sending no
    CTA_TIMEOUT) the read that saw the counters move dates the media: later, never
    earlier."""
    e = engine()
    plane = kernel_plane(FakeNft())
    clock = 0.0
    plane.clock = lambda: clock
    plane.sink = lambda event: e.handle_event(clock, event)
    session = call(e)
    assert plane.apply([Install(session.spec())]) == []
    a = session.spec().a
    ct: FakeCt = plane.ct_dump  # type: ignore[assignment]
    # the flow entered at leg A's RTP port; packets until t=1.0, then silence
    mark = plane.installed[unit_id(session.sid, 0)].a.rtp_mark
    flow = CtFlow(mark, 17, CALLER[0], CALLER[1], "127.0.0.1", a.relay_port,
                  orig_packets=50, orig_bytes=5000, status=0x8)
    reads: List[float] = []

    def dump(*_args: Any, **_kw: Any) -> List[CtFlow]:
        reads.append(clock)
        # the kernel: 30 s from the last packet, whole seconds left, rounded down
        left = int(30 - (clock - 1.0)) if timeouts else None
        return [flow._replace(timeout=left)] if left is None or left >= 0 else []

    ct.flows = dump  # type: ignore[method-assign]
    assert plane.sweep_interval == 15.0  # udp_timeout 30 s / 2
    plane._last_poll = 0.0
    ended_at = None
    for step in range(1, 200):
        clock = step * 0.5
        if plane.get_timer() is not None and plane.get_timer() <= clock:
            plane.handle_timer(clock)
        if e.due(clock):
            plane.refresh(lambda: None)
            actions = e.handle_timer(clock)
            if actions:
                plane.apply(actions)
                ended_at = clock
                break
    assert session.legs["A"].counters.in_packets == 50
    if timeouts:
        assert 1.0 <= session.last_media <= 2.0  # the packet at 1.0, read at 10.0
        assert ended_at is not None and 11.0 <= ended_at <= 12.0 + 0.5, ended_at
    else:
        assert session.last_media == 10.0  # the first read, before the first expiry
        assert ended_at == 20.0
    assert reads[0] == 10.0  # no periodic read before 15 s: the expiry's refresh read
    assert plane.installed == {}


def test_nfqueue_plane_reports_latches_instead_of_writing_engine_state():
    e = engine()
    plane = NfqueuePlane(31000, 31099, ["127.0.0.1"])
    plane.nft = FakeNft()  # type: ignore[assignment]
    plane.ct = plane.ct_dump = FakeCt()  # type: ignore[assignment]
    events: List[Any] = []
    plane.sink = events.append
    session = call(e)
    assert plane.apply([Install(session.spec())]) == []
    relay_a = session.legs["A"].relay_port
    nat = (CALLER[0], 61000)
    packet = _udp4(nat, ("127.0.0.1", relay_a))
    from fastpath.kernel.nfqueue import NF_REPEAT

    assert plane._decide(packet) == NF_REPEAT
    assert session.legs["A"].latched is None  # the engine's state is the engine's
    plane._poll()
    reports = [ev for ev in events if isinstance(ev, SessionReport)]
    assert reports and reports[-1].a.latched == nat
    assert reports[-1].a.generation == session.legs["A"].generation
    e.handle_event(1.0, reports[-1])
    assert session.legs["A"].latched == nat


def _forked_nfqueue_plane() -> Any:
    from fastpath.contract import ForkSpec

    plane = NfqueuePlane(31000, 31099, ["198.51.100.1"])
    plane.nft = FakeNft()  # type: ignore[assignment]
    plane.ct = plane.ct_dump = FakeCt()  # type: ignore[assignment]
    plane.sink = lambda event: None
    caller, callee1, callee2 = (("198.51.100.10", 4000), ("198.51.100.70", 5000),
                                ("198.51.100.71", 6000))
    a = LegSpec("A", "198.51.100.1", 31000, caller)
    # leg B learns (latch_any): it would take any first source, a fork's callee included
    b = LegSpec("B", "198.51.100.1", 31002, callee1, latch_any=True)
    fa = LegSpec("A", "198.51.100.1", 31004, caller)
    fb = LegSpec("B", "198.51.100.1", 31002, callee2)
    early = SessionSpec(1, "c1", (StreamSpec(0, a, b),),
                        (ForkSpec(1, "t2", (StreamSpec(0, fa, fb),)),))
    assert plane.apply([Update(early, "B")]) == []
    return plane, early, (fa, fb)


def test_nfqueue_plane_admits_each_early_dialog_of_a_forked_invite():
    """A first packet to a fork's own A port is the fork's leg A's (latched, admitted, the
    fork's elements re-pointed); one to the shared B port from the exact address a fork's
    callee announced is re-injected for the ruleset's fmark/ffwd entries without latching
    or admitting anything for the session's leg B; anything else there is leg B's."""
    from fastpath.kernel.kernel_rules import ForkSpec as KernelFork
    from fastpath.kernel.nfqueue import NF_DROP, NF_REPEAT

    plane, _early, (fa, fb) = _forked_nfqueue_plane()
    main = unit_id(1, 0)
    (fork,) = [uid for uid in plane.installed if uid < 0]
    relay = "198.51.100.1"
    assert plane.by_relay[(relay, 31004)] == (fork, "A", False)
    assert plane.by_relay[(relay, 31005)] == (fork, "A", True)
    assert plane.by_relay[(relay, 31002)] == (main, "B", False)  # shared: the session's
    # the caller (behind NAT) on the fork's A port: that fork's leg A latches and admits
    nat = ("198.51.100.10", 61000)
    assert plane._decide(_udp4(nat, (relay, 31004))) == NF_REPEAT
    assert plane.latched == {(fork, "A", False): nat}
    assert isinstance(plane.installed[fork], KernelFork)
    assert plane.installed[fork].a.peer(False) == nat  # the callee's media goes there
    assert plane.admitted == {fork: {f"adm4 {{ {relay} . 31004 . {nat[0]} }}"}}
    # the fork's callee, from exactly its SDP's address, on the shared B port
    runs = len(plane.nft.runs)
    assert plane._decide(_udp4(fb.announced, (relay, 31002))) == NF_REPEAT
    assert (main, "B", False) not in plane.latched
    assert plane.latched[(fork, "B", False)] == fb.announced
    assert main not in plane.admitted and len(plane.nft.runs) == runs  # nothing added
    # the same callee IP from another port is not that fork's: leg B's rules (learning)
    other = (fb.announced[0], 6002)
    assert plane._decide(_udp4(other, (relay, 31002))) == NF_REPEAT
    assert plane.latched[(main, "B", False)] == other
    assert plane.admitted[main] == {f"adm4 {{ {relay} . 31002 . {other[0]} }}"}
    # leg B latched: a new flow from elsewhere is refused, counted on leg B
    assert plane._decide(_udp4(("198.51.100.70", 5000), (relay, 31002))) == NF_DROP
    assert plane.leg_drops == {(main, "B"): 1}
    # nothing to the fork's A port from elsewhere than the caller's IP
    assert plane._decide(_udp4(("198.51.100.99", 4000), (relay, 31004))) == NF_DROP
    assert plane.leg_drops == {(main, "B"): 1, (fork, "A"): 1}


@pytest.mark.parametrize("end", ["freed", "promoted"])
def test_nfqueue_plane_cleans_up_a_fork_as_a_removed_unit(end):
    """A freed or promoted fork's adm elements, relay ports and latches go; the shared B
    port stays the session's."""
    from fastpath.kernel.nfqueue import NF_REPEAT

    plane, early, (fa, fb) = _forked_nfqueue_plane()
    main = unit_id(1, 0)
    (fork,) = [uid for uid in plane.installed if uid < 0]
    relay = "198.51.100.1"
    nat = ("198.51.100.10", 61000)
    assert plane._decide(_udp4(nat, (relay, 31004))) == NF_REPEAT
    assert plane._decide(_udp4(fb.announced, (relay, 31002))) == NF_REPEAT
    assert plane._decide(_udp4(("198.51.100.10", 4000), (relay, 31000))) == NF_REPEAT
    adm = f"adm4 {{ {relay} . 31004 . {nat[0]} }}"
    assert adm in plane.admitted[fork]
    if end == "freed":  # the 200 came from the first callee
        spec = early._replace(forks=())
    else:  # from the fork's callee: the session's A side moves to the fork's A port
        spec = SessionSpec(1, "c1", (StreamSpec(0, fa, fb._replace(generation=1)),))
    assert plane.apply([Update(spec, "B")]) == []
    assert plane.fork_of == {} and plane.session_forks == {}
    assert f"delete element inet lrk {adm}" in "".join(plane.nft.runs)
    assert fork not in plane.admitted and fork not in plane.leg_drops
    assert [k for k in plane.latched if k[0] == fork] == []
    assert [v for v in plane.by_relay.values() if v[0] == fork] == []
    assert plane.by_relay[(relay, 31002)] == (main, "B", False)
    assert plane.by_relay[(relay, 31003)] == (main, "B", True)
    if end == "freed":
        assert plane.by_relay[(relay, 31000)] == (main, "A", False)
        assert (relay, 31004) not in plane.by_relay
        assert plane.latched == {(main, "A", False): ("198.51.100.10", 4000)}
    else:
        assert plane.by_relay[(relay, 31004)] == (main, "A", False)
        assert (relay, 31000) not in plane.by_relay  # the old A port is not the session's
        assert plane.latched == {} and main not in plane.admitted  # A moved, B re-answered
        assert plane._decide(_udp4(nat, (relay, 31004))) == NF_REPEAT  # the session's now
        assert plane.latched == {(main, "A", False): nat}
    plane.apply([Remove(1, "c1", "deleted")])
    assert plane.by_relay == {} and plane.latched == {} and plane.admitted == {}


def _udp4(src: Any, dst: Any) -> bytes:
    import struct

    payload = b"\x80" + b"\x00" * 11
    udp = struct.pack("!HHHH", src[1], dst[1], 8 + len(payload), 0) + payload
    total = 20 + len(udp)
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, total, 0, 0, 64, 17, 0,
                     socket.inet_aton(src[0]), socket.inet_aton(dst[0]))
    return ip + udp


# -- the relay shell ------------------------------------------------------------------------
class FailingPlane:
    """A plane that refuses every install (as a full disk of nft, or a taken port, would)."""

    def __init__(self) -> None:
        self.sink: Any = None
        self.applied: List[Any] = []

    async def start(self) -> None:
        pass

    async def stop(self) -> None:
        pass

    def apply(self, actions: Any) -> List[PlaneFailure]:
        self.applied.extend(actions)
        return [PlaneFailure(a.sid, "bind_failed", "port taken") for a in actions
                if isinstance(a, Install)]

    def commit(self, then: Any) -> None:
        then()

    def refresh(self, then: Any) -> None:
        then()

    def get_timer(self) -> None:
        return None

    def handle_timer(self, now: float) -> None:
        pass

    def media_counters(self) -> Dict[str, int]:
        return {}


class FakeEndpoint:
    def __init__(self) -> None:
        self.replies: List[bytes] = []

    def sendto(self, data: bytes, addr: Any) -> None:
        self.replies.append(data)


def _relay(tmp_path: Any) -> Relay:
    relay = Relay(Config(control="127.0.0.1:0", ports="31100-31199",
                         control_keys=[str(tmp_path / "keys")]))  # created on first start
    relay.plane = FailingPlane()  # type: ignore[assignment]
    relay.plane.sink = relay.on_plane_event
    return relay


def test_offer_the_data_plane_refuses_gets_an_error_reply_and_no_session(tmp_path: Any):
    relay = _relay(tmp_path)
    endpoint = FakeEndpoint()
    request = sign(msgpack.packb({"v": 1, "cookie": "k1", "cmd": "offer", "call_id": "c1",
                                  "from_tag": "ft", "media": {"ip": CALLER[0],
                                                              "port": CALLER[1]}}),
                   find_key(str(tmp_path / "keys")), time.time())
    relay.on_control(request, ("127.0.0.1", 40000), endpoint)  # type: ignore[arg-type]
    reply = msgpack.unpackb(endpoint.replies[0], raw=False)
    assert reply["ok"] is False and reply["error"]["code"] == "data_plane"
    assert "port taken" in reply["error"]["message"]
    assert relay.engine.by_call == {}
    assert relay.engine.counters["sessions.failed.bind_failed"] == 1
    assert any(isinstance(a, Remove) and a.reason == "failed" for a in relay.plane.applied)
    # a retransmission gets the same error, not a second attempt
    relay.on_control(request, ("127.0.0.1", 40000), endpoint)  # type: ignore[arg-type]
    assert endpoint.replies[1] == endpoint.replies[0]


def test_legacy_set_the_data_plane_refuses_gets_no_ok(tmp_path: Any):
    relay = _relay(tmp_path)
    endpoint = FakeEndpoint()
    request = (b"1_1 S 198.51.100.10 127.0.0.1 127.0.0.1 198.51.100.20 4000 31102 31100 "
               b"5000 60 call@test ")
    relay.on_legacy(request, ("127.0.0.1", 40001), endpoint)  # type: ignore[arg-type]
    assert endpoint.replies == []  # Kamailio retries, then fails the call
    assert relay.legacy.counters["legacy.dropped.plane_failure"] == 1
    assert relay.engine.by_call == {}
    relay.on_legacy(request, ("127.0.0.1", 40001), endpoint)  # type: ignore[arg-type]
    assert relay.legacy.counters["legacy.dropped.plane_failure"] == 2  # tried afresh


def test_relay_arms_one_timer_at_the_engine_deadline(tmp_path: Any):
    async def scenario() -> None:
        relay = _relay(tmp_path)
        relay.plane = FakeAcceptingPlane()  # type: ignore[assignment]
        relay._loop = asyncio.get_running_loop()
        relay.engine.offer(0.0, "c1", "ft", CALLER)
        relay._rearm()
        deadline = relay.engine.get_timer()
        assert relay._timer is not None and relay._timer_at == deadline
        relay.engine.offer(0.0, "c2", "ft", CALLER, timeout=1.0)
        relay._rearm()
        assert relay._timer_at == relay.engine.get_timer() < deadline
        relay._timer.cancel()

    asyncio.run(scenario())


class FakeAcceptingPlane(FailingPlane):
    def apply(self, actions: Any) -> List[PlaneFailure]:
        self.applied.extend(actions)
        return []


class RecordingPlane(FakeAcceptingPlane):
    """Accepts everything; refreshes wait until the test runs them; commits counted."""

    def __init__(self) -> None:
        super().__init__()
        self.refreshes: List[Any] = []
        self.commits = 0

    def refresh(self, then: Any) -> None:
        self.refreshes.append(then)

    def commit(self, then: Any) -> None:
        self.commits += 1
        then()


class ControlRig:
    """A relay on a test plane, driven with signed msgpack requests from one sender; its
    session timer is never run."""

    def __init__(self, tmp_path: Any, plane: Any) -> None:
        self.relay = _relay(tmp_path)  # creates the control keys
        self.key = find_key(str(tmp_path / "keys"))
        self.plane = self.relay.plane = plane
        self.relay._loop = FakeLoop()  # type: ignore[assignment]
        self.endpoint = FakeEndpoint()

    def send(self, **request: Any) -> None:
        data = sign(msgpack.packb({"v": 1, **request}), self.key, time.time())
        self.relay.on_control(data, ("127.0.0.1", 40000), self.endpoint)  # type: ignore[arg-type]

    def offer(self, cookie: str, call: str, tag: str = "ft") -> None:
        self.send(cookie=cookie, cmd="offer", call_id=call, from_tag=tag,
                  media={"ip": CALLER[0], "port": CALLER[1]})

    def replies(self) -> List[Dict[str, Any]]:
        return [msgpack.unpackb(r, raw=False) for r in self.endpoint.replies]

    def cookies(self) -> List[str]:
        return [r["cookie"] for r in self.replies()]


def test_a_bursts_deletes_share_one_refresh_and_one_commit(tmp_path: Any):
    rig = ControlRig(tmp_path, RecordingPlane())
    relay, plane = rig.relay, rig.plane
    for call in ("c1", "c2"):
        rig.offer(f"o-{call}", call)
    assert len(rig.endpoint.replies) == 2
    plane.applied.clear()
    commits = plane.commits
    relay._hold_replies()  # what the control endpoint does around a burst of datagrams
    for call in ("c1", "c2"):
        rig.send(cookie=f"d-{call}", cmd="delete", call_id=call)
    assert plane.refreshes == []  # asked once, at the burst's end
    relay._release_replies()
    assert len(plane.refreshes) == 1 and len(rig.endpoint.replies) == 2
    plane.refreshes.pop()()  # the counters are fresh: both deletes finish together
    assert sorted(a.call_id for a in plane.applied if isinstance(a, Remove)) == ["c1", "c2"]
    assert plane.commits == commits + 1  # their removes and replies: one commit
    replies = rig.replies()[2:]
    assert [(r["cookie"], r["ok"]) for r in replies] == [("d-c1", True), ("d-c2", True)]
    assert relay.engine.by_call == {}


def test_a_request_outside_a_burst_is_refreshed_alone(tmp_path: Any):
    rig = ControlRig(tmp_path, RecordingPlane())
    rig.send(cookie="q1", cmd="list")
    assert len(rig.plane.refreshes) == 1 and rig.endpoint.replies == []
    rig.plane.refreshes.pop()()
    assert rig.replies()[0]["ok"] is True


class AtOncePlane(RecordingPlane):
    """Refreshes at once, as the kernel, nfqueue and xdp planes do."""

    def refresh(self, then: Any) -> None:
        self.refreshes.append(then)
        then()


@pytest.mark.parametrize("plane_kind", [AtOncePlane, RecordingPlane])
def test_a_burst_runs_in_arrival_order_whatever_the_plane(tmp_path: Any, plane_kind: Any):
    """A delete then a new offer of the same Call-ID in one burst (an INVITE retried after
    a 407): the offer must not run first and then be deleted."""
    rig = ControlRig(tmp_path, plane_kind())
    rig.offer("o1", "c1", "ft1")
    rig.relay._hold_replies()
    rig.send(cookie="d1", cmd="delete", call_id="c1")
    rig.offer("o2", "c1", "ft2")
    rig.relay._release_replies()
    while rig.plane.refreshes and plane_kind is RecordingPlane:
        rig.plane.refreshes.pop(0)()
    assert rig.cookies() == ["o1", "d1", "o2"]
    assert list(rig.relay.engine.by_call) == ["c1"]  # the second attempt's call lives on


def test_a_request_arriving_while_a_refresh_is_out_waits_behind_it(tmp_path: Any):
    rig = ControlRig(tmp_path, RecordingPlane())
    plane = rig.plane
    rig.offer("o1", "c1", "ft1")
    rig.send(cookie="d1", cmd="delete", call_id="c1")
    assert len(plane.refreshes) == 1  # the delete waits for the worker's counters
    rig.offer("o2", "c1", "ft2")
    assert len(rig.endpoint.replies) == 1 and len(plane.refreshes) == 1  # behind the delete
    rig.send(cookie="q1", cmd="list")
    assert len(plane.refreshes) == 2  # needs counters asked after it arrived: its own
    plane.refreshes.pop(1)()  # the later refresh answers first: nothing may overtake
    assert len(rig.endpoint.replies) == 1
    plane.refreshes.pop(0)()
    assert rig.cookies() == ["o1", "d1", "o2", "q1"]
    assert list(rig.relay.engine.by_call) == ["c1"]
    assert not rig.relay._batches


class BrokenRefreshPlane(RecordingPlane):
    def refresh(self, then: Any) -> None:
        raise OSError("the worker channel is gone")


def test_a_refresh_that_fails_still_answers_the_burst_and_releases_it(tmp_path: Any):
    rig = ControlRig(tmp_path, BrokenRefreshPlane())
    rig.offer("o1", "c1", "ft1")
    rig.relay._hold_replies()
    rig.send(cookie="d1", cmd="delete", call_id="c1")
    rig.relay._release_replies()
    assert rig.cookies() == ["o1", "d1"]
    assert rig.relay._held is None and not rig.relay._batches
    assert rig.relay.control.counters["control.internal_errors"] == 1


def test_another_calls_request_does_not_wait_behind_a_delete(tmp_path: Any):
    rig = ControlRig(tmp_path, RecordingPlane())
    rig.offer("o1", "c1", "ft1")
    rig.send(cookie="d1", cmd="delete", call_id="c1")
    rig.offer("o2", "c2", "ft1")
    rig.send(cookie="x", cmd="offer", call_id=["not", "a", "str"], from_tag="ft")
    assert rig.cookies() == ["o1", "o2", "x"]  # c2 and the malformed one: not behind c1's
    rig.plane.refreshes.pop()()
    assert rig.cookies()[-1] == "d1"
    assert list(rig.relay.engine.by_call) == ["c2"] and not rig.relay._waiting_calls


def test_socket_plane_keeps_each_worker_within_its_file_descriptor_limit():
    """The daemon counts the media sockets it hands each worker (a worker past its
    RLIMIT_NOFILE would lose fds in transit, and with them which socket is whose): a call
    that would not fit is refused before its ports are bound, with the reason and the
    fix, and its ports stay free; removals, forks and re-installs count right."""
    from lrk.errors import DescriptorsExhausted

    plane = SocketPlane(31000, 31099, ["127.0.0.1"])
    plane.loop = FakeLoop()  # type: ignore[assignment]
    worker = WorkerHandle(0, plane)
    worker.chan = object()  # type: ignore[assignment]  # running (never flushed: FakeLoop)
    plane.workers = [worker]
    plane.fd_budget = 10
    try:
        assert plane.apply([Install(one_stream(1, "c1", 31010, 31012))]) == []
        assert plane.apply([Install(one_stream(2, "c2", 31020, 31022))]) == []
        assert worker.media_fds == 8
        assert plane.probe("127.0.0.1", 31030)  # 8 + 2 fits exactly
        with pytest.raises(DescriptorsExhausted, match="LimitNOFILE") as err:
            plane.probe("127.0.0.1", 31032)  # the pair bound a moment ago counts
        assert err.value.code == "capacity"
        assert plane.counters["plane.no_descriptors"] == 1
        assert ("127.0.0.1", 31032) not in plane.pending
        for s in plane.pending.pop(("127.0.0.1", 31030)):  # (the request gave up)
            s.close()
        # a session the allocator never saw (restored, claimed) is refused at install
        failures = plane.apply([Install(one_stream(3, "c3", 31040, 31042))])
        assert [f.reason for f in failures] == ["bind_failed"]
        assert "no file descriptor left" in failures[0].detail
        assert worker.media_fds == 8 and plane.counters["plane.no_descriptors"] == 2
        # the same unit again replaces its sockets: nothing more is held
        worker.send(channel.InstallSession(unit_id(1, 0), None, ()), [object()] * 4)
        assert worker.media_fds == 8
        plane.apply([Remove(1, "c1", "deleted")])
        assert worker.media_fds == 4
        worker.send(channel.InstallFork(-1, unit_id(2, 0), None, ()), [object()] * 2)
        assert worker.media_fds == 6
        worker.send(channel.PromoteFork(unit_id(2, 0), -1))  # its two replace the main's
        assert worker.media_fds == 4
        assert plane.probe("127.0.0.1", 31050) and plane.probe("127.0.0.1", 31052)
    finally:
        for s in [s for pair_ in plane.pending.values() for s in pair_]:
            s.close()
        for _message, socks in worker.outbox:
            for s in socks:
                if isinstance(s, socket.socket):
                    s.close()


def _free_fd_numbers_below(limit: int) -> int:
    taken = {int(n) for n in os.listdir("/proc/self/fd")}
    return sum(1 for n in range(limit) if n not in taken)


def test_a_channel_message_whose_fds_were_cut_short_is_refused_not_misread():
    """A receiver at its RLIMIT_NOFILE gets fewer fds than the message carried (the kernel
    says MSG_CTRUNC): which socket was whose is lost, so the message must not be used and
    the fds that did arrive must not leak."""
    import gc
    import resource

    gc.collect()  # sockets earlier tests left to the GC close now, not while we count
    a, b = channel.pair()
    socks = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(4)]
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        channel.send(a, channel.RemoveSession(7), [s.fileno() for s in socks])
        limit = 3
        while _free_fd_numbers_below(limit) < 2:  # room for two or three of the four
            limit += 1
        resource.setrlimit(resource.RLIMIT_NOFILE, (limit, hard))
        try:
            free = _free_fd_numbers_below(limit)
            with pytest.raises(channel.FdsTruncated, match="RLIMIT_NOFILE"):
                channel.receive(b, socket.MSG_DONTWAIT)
            assert _free_fd_numbers_below(limit) == free, "what arrived is closed again"
        finally:
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        channel.send(a, channel.RemoveSession(8), [socks[0].fileno()])
        message, fds = channel.receive(b, socket.MSG_DONTWAIT)  # type: ignore[misc]
        assert message == channel.RemoveSession(8) and len(fds) == 1
        os.close(fds[0])
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        for s in (*socks, a, b):
            s.close()


def test_an_offer_that_fails_after_a_probe_lets_the_probed_ports_go(tmp_path: Any):
    """ports_exhausted on the second leg, after the first leg's pair was probed (bound):
    the failed request has no actions for the plane, and the bound pair must not wait
    for another request's (on a quiet relay it would stay bound for good)."""
    from lrk.daemon.socket_plane import bind_pair

    plane = SocketPlane(31100, 31199, ["127.0.0.1"])
    plane.loop = FakeLoop()  # type: ignore[assignment]  # (no workers: no install runs)
    rig = ControlRig(tmp_path, plane)
    engine = rig.relay.engine
    ip = engine.config.internal_ip
    for port in range(31100, 31198, 2):  # every pair but the last is in use
        assert engine.ports.claim(ip, port, 0.0)
    probed: List[Any] = []

    def probe(ip_: str, port: int) -> bool:
        probed.append((port, plane.probe(ip_, port)))
        return probed[-1][1]

    engine.probe = probe
    try:
        rig.offer("o1", "c1")
        assert rig.replies()[0]["error"]["code"] == "ports_exhausted"
        assert probed == [(31198, True)]  # the test is about a pair bound, then given up
        assert plane.pending == {}
        pair_ = bind_pair(ip, 31198)
        assert pair_ is not None, "the probed pair is still bound"
        for s in pair_:
            s.close()
    finally:
        for s in [s for pair_ in plane.pending.values() for s in pair_]:
            s.close()


class CountingWorker(FakeWorker):
    """Queues what it is sent until flushed, and counts the media sockets it holds as the
    daemon's WorkerHandle does."""

    def send(self, message: Any, socks: Any = ()) -> None:
        super().send(message, socks)
        self.outbox.append(message)
        if isinstance(message, channel.InstallSession):
            self.media_fds += 4
        elif isinstance(message, channel.RemoveSession):
            self.media_fds -= 4

    def _flush_outbox(self) -> None:
        self.outbox.clear()


def test_socket_plane_places_a_burst_on_one_worker_and_single_calls_on_the_lightest():
    """One request at a time (the outboxes flushed between): each new session goes to the
    worker holding the fewest sockets. In one burst (messages still queued): to the worker
    the burst already writes to, until it holds PLACE_SLACK sockets more than the
    lightest. A session's every message goes to its worker, and its removal frees it. A
    worker that could not be restarted gets no new session."""
    from lrk.daemon.socket_plane import PLACE_SLACK

    plane = SocketPlane(31000, 31999, ["127.0.0.1"])
    workers = [CountingWorker() for _ in range(3)]
    plane.workers = workers  # type: ignore[assignment]

    def install(sid: int) -> None:
        assert plane.apply([Install(one_stream(sid, f"c{sid}", 31000 + 4 * sid,
                                               31002 + 4 * sid))]) == []

    def flush() -> None:
        for w in workers:
            w._flush_outbox()

    for sid in range(1, 7):  # one at a time: round the workers, lightest first
        install(sid)
        flush()
    assert [plane.placed[sid] for sid in range(1, 7)] == [0, 1, 2, 0, 1, 2]
    calls_in_slack = PLACE_SLACK // 4
    burst = list(range(7, 7 + calls_in_slack + 2))
    for sid in burst:  # one burst: worker 0 until it is PLACE_SLACK above the lightest
        install(sid)
    assert [plane.placed[sid] for sid in burst] == [0] * (calls_in_slack + 1) + [1]
    assert len(workers[0].outbox) == calls_in_slack + 1 and len(workers[1].outbox) == 1
    flush()
    assert plane.apply([Remove(7, "c7", "deleted")]) == []
    assert isinstance(workers[0].sent[-1], channel.RemoveSession) and 7 not in plane.placed
    assert [w.media_fds for w in workers] == [4 * (2 + calls_in_slack), 4 * 3, 4 * 2]
    install(100)  # the lightest again
    assert plane.placed[100] == 2
    flush()
    workers[2].chan = None  # could not be restarted: nothing new goes to it
    workers[2].media_fds = 0
    install(101)
    assert plane.placed[101] == 1


def test_socket_plane_fails_the_sessions_of_a_worker_that_could_not_be_restarted():
    """`lost`: each session on that worker fails (an event for the engine, which ends it),
    the others stay, and its removal later sends nothing to the lost worker."""
    plane = SocketPlane(31000, 31999, ["127.0.0.1"])
    workers = [CountingWorker() for _ in range(2)]
    plane.workers = workers  # type: ignore[assignment]
    events: List[Any] = []
    plane.sink = events.append
    for sid in (1, 2, 3, 4):
        assert plane.apply([Install(one_stream(sid, f"c{sid}", 31000 + 4 * sid,
                                               31002 + 4 * sid))]) == []
        for w in workers:
            w._flush_outbox()
    assert [plane.placed[sid] for sid in (1, 2, 3, 4)] == [0, 1, 0, 1]
    workers[1].chan = None
    plane.lost(workers[1], "worker 1 could not be restarted: test")  # type: ignore[arg-type]
    assert sorted((e.sid, e.reason) for e in events) == [(2, "worker_lost"), (4, "worker_lost")]
    assert sorted(plane.installed) == [1, 3] and sorted(plane.placed) == [1, 3]
    sent = len(workers[1].sent)
    assert plane.apply([Remove(2, "c2", "failed"), Remove(4, "c4", "failed")]) == []
    assert len(workers[1].sent) == sent


def test_a_read_bursts_failed_offer_hands_its_probed_pair_to_the_next_offer(tmp_path: Any):
    """Replies (and with them commit(), which lets unclaimed probes go) wait for the end of
    a read burst. An offer that bound its first pair and then failed (ports_exhausted)
    gave the port back to the allocator; the next offer of the same burst that gets it
    takes the pair already bound, instead of failing to bind against the relay's own
    socket and putting the port out of rotation for a minute as if another program held
    it. Nothing stays bound once the burst's replies are out."""
    plane = SocketPlane(31100, 31199, ["127.0.0.1"])
    plane.loop = FakeLoop()  # type: ignore[assignment]
    worker = CountingWorker()
    plane.workers = [worker]  # type: ignore[list-item]
    rig = ControlRig(tmp_path, plane)
    relay, engine = rig.relay, rig.relay.engine
    ip = engine.config.internal_ip
    for port in range(31100, 31198, 2):  # all but the last pair taken
        assert engine.ports.claim(ip, port, 0.0)
    engine.probe = plane.probe
    relay._hold_replies()  # what a read burst does
    rig.offer("o1", "c1")
    rig.offer("o2", "c2")
    assert ("127.0.0.1", 31198) in plane.pending  # c1's pair, c2 failed alike
    relay._release_replies()
    replies = rig.replies()
    assert [(r["cookie"], r["ok"], r.get("error", {}).get("code")) for r in replies] == [
        ("o1", False, "ports_exhausted"), ("o2", False, "ports_exhausted")]
    assert 31198 not in engine.ports._by_ip[ip]._held_set  # still in rotation
    assert plane.pending == {}  # and let go
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 31198))


def test_with_no_worker_left_a_new_session_fails_and_replies_still_leave():
    """Every worker died and none could be restarted: a new session fails with the
    reason (counted) instead of waiting in a dead worker's outbox, its probed sockets are
    closed, and replies are not held behind that outbox."""
    plane = SocketPlane(31000, 31099, ["127.0.0.1"])
    plane.loop = FakeLoop()  # type: ignore[assignment]
    worker = WorkerHandle(0, plane)  # its restart failed: no channel
    plane.workers = [worker]
    assert plane.probe("127.0.0.1", 31010) and plane.probe("127.0.0.1", 31012)
    failures = plane.apply([Install(one_stream(1, "c1", 31010, 31012))])
    assert [(f.sid, f.reason) for f in failures] == [(1, "worker_lost")]
    assert "restart the relay" in failures[0].detail
    assert plane.counters["plane.no_worker"] == 1
    assert plane.installed == {} and plane.placed == {} and not worker.outbox
    replies: List[str] = []
    plane.commit(lambda: replies.append("reply"))
    assert replies == ["reply"]
    for port in (31010, 31011, 31012, 31013):  # nothing bound is left behind
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.bind(("127.0.0.1", port))


def test_probe_judges_room_on_the_worker_a_new_session_would_go_to():
    """A worker full of long calls does not refuse new calls that the lightest worker,
    where placement puts them, has room for; a burst does not stick to a worker without
    room for the session."""
    from lrk.errors import DescriptorsExhausted

    plane = SocketPlane(31000, 31099, ["127.0.0.1"])
    workers = [CountingWorker() for _ in range(2)]
    plane.workers = workers  # type: ignore[assignment]
    plane.fd_budget = 62
    # worker 0 (where the last session went) has a message queued, so a burst would stick
    # to it while it holds at most PLACE_SLACK more than the lightest; it has 2 fds left
    workers[0].media_fds = 60
    workers[0].outbox.append("queued")
    try:
        assert plane.probe("127.0.0.1", 31050)
        assert plane.probe("127.0.0.1", 31052)
        assert plane.apply([Install(one_stream(1, "c1", 31050, 31052))]) == []
        assert plane.placed[1] == 1 and workers[1].media_fds == 4
        workers[0].media_fds = workers[1].media_fds = 61  # now neither has room for a pair
        with pytest.raises(DescriptorsExhausted):
            plane.probe("127.0.0.1", 31060)
    finally:
        plane._close_unclaimed()


def test_legacy_unix_streams_are_capped(tmp_path: Any):
    """At most MAX_LEGACY_STREAMS legacy UNIX stream connections are served at once; one
    more is closed unread and counted, and a finished one frees its place."""
    import asyncio

    from lrk.daemon.relay import MAX_LEGACY_STREAMS

    relay = _relay(tmp_path)

    class Reader:
        def __init__(self, data: bytes) -> None:
            self.data, self.reads = data, 0

        async def read(self, n: int) -> bytes:
            self.reads += 1
            return self.data

    class Writer:
        closed = False

        def write(self, data: bytes) -> None:
            self.data = data

        async def drain(self) -> None:
            return None

        def close(self) -> None:
            self.closed = True

    async def scenario() -> None:
        relay._legacy_streams = MAX_LEGACY_STREAMS  # that many being served
        reader, writer = Reader(b"P"), Writer()
        await relay._legacy_stream(reader, writer)  # type: ignore[arg-type]
        assert writer.closed and reader.reads == 0
        assert relay.legacy.counters["legacy.dropped.too_many_streams"] == 1
        relay._legacy_streams = MAX_LEGACY_STREAMS - 1
        reader, writer = Reader(b"P"), Writer()
        await relay._legacy_stream(reader, writer)  # type: ignore[arg-type]
        assert reader.reads == 1 and writer.data == b"P PONG" and writer.closed
        assert relay._legacy_streams == MAX_LEGACY_STREAMS - 1  # its place is free again

    asyncio.run(scenario())
