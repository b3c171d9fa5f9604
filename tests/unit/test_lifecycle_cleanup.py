"""What a start that fails part of the way, a stop step that fails, and a failed flow
flush leave behind: nothing. Fakes only (nft, conntrack, the queue socket, worker
processes, Redis' script): no table, flow, sysctl or program of the machine is touched;
the accounting sysctls are files under a temporary directory."""

from __future__ import annotations

import asyncio
import errno
import os
import shutil
import socket
import tempfile
from typing import Any, Dict, Iterator, List, Optional

import pytest

from fastpath import channel
from fastpath.contract import Install, LegSpec, Remove, SessionSpec, StreamSpec
from fastpath.kernel.ctnetlink import ConntrackError, CtFlow
from fastpath.kernel.kernel_rules import DROP_COUNTERS, conntrack_marks
from fastpath.kernel.nft import NftError
from lrk.daemon import kernel_plane, nfqueue_plane, relay, socket_plane
from lrk.daemon.config import load
from lrk.daemon.kernel_plane import KEPT, KernelPlane, session_spec
from lrk.daemon.nfqueue_plane import NfqueuePlane
from lrk.daemon.redis_store import RedisStore, open_session_store
from lrk.daemon.relay import Relay
from lrk.daemon.socket_plane import SocketPlane, WorkerHandle
from lrk.errors import ConfigError

RELAY = "127.0.0.1"
CALLER, CALLEE = ("198.51.100.10", 4000), ("198.51.100.20", 5000)


# -- fakes ------------------------------------------------------------------------------
class FakeNft:
    """Records what it runs; refuses text containing `fail_on`."""

    made: List[FakeNft] = []

    def __init__(self, fail_on: str = "") -> None:
        self.fail_on = fail_on
        self.runs: List[str] = []
        self.closed = False
        self.backend = "fake"
        FakeNft.made.append(self)

    def run(self, text: str) -> str:
        if self.fail_on and self.fail_on in text:
            raise NftError(f"Error: Could not process rule: {self.fail_on}")
        self.runs.append(text)
        return ""

    def run_json(self, text: str) -> Dict[str, Any]:
        return {"nftables": [{"counter": {"name": n, "packets": 0, "bytes": 0}}
                             for n in DROP_COUNTERS.values()]}

    def close(self) -> None:
        self.closed = True


class FakeCt:
    """A conntrack socket: its flows, the marks flushed; the next `fail` flushes fail."""

    made: List[FakeCt] = []

    def __init__(self, flows: Optional[List[CtFlow]] = None) -> None:
        self.flows_now = list(flows or [])
        self.flushed: List[int] = []
        self.fail = 0
        self.closed = False
        FakeCt.made.append(self)

    def flush_marks(self, marks: Any) -> int:
        marks = list(marks)
        if self.fail:
            self.fail -= 1
            raise ConntrackError("conntrack flush failed: No buffer space available")
        self.flushed.extend(marks)
        return len(marks)

    def flows(self, filters: Any, timeout: float = 0, max_flows: int = 0) -> List[CtFlow]:
        return list(self.flows_now)

    def close(self) -> None:
        self.closed = True


def _no_socket(*args: Any, **kw: Any) -> Any:
    raise OSError(errno.EPROTONOSUPPORT, "no nf_tables netlink socket here")


@pytest.fixture
def fake_kernel(tmp_path: Any, monkeypatch: Any) -> Dict[str, str]:
    """A kernel plane's start without a kernel: forwarding on, the accounting sysctls as
    files (start values "0"), fake nft and conntrack, no nf_tables netlink sockets."""
    FakeNft.made.clear()
    FakeCt.made.clear()
    forwarding = tmp_path / "ip_forward"
    forwarding.write_text("1\n")
    monkeypatch.setattr(kernel_plane, "FORWARDING", {4: str(forwarding), 6: str(forwarding)})
    acct = {}
    for name in ("nf_conntrack_acct", "nf_conntrack_timestamp"):
        path = tmp_path / name
        path.write_text("0\n")
        acct[name] = str(path)
    monkeypatch.setattr(kernel_plane, "ACCT", acct)
    monkeypatch.setattr(kernel_plane, "read_udp_timeouts", lambda: (30, 120))
    monkeypatch.setattr(kernel_plane, "Nft", FakeNft)
    monkeypatch.setattr(kernel_plane, "ConntrackSocket", FakeCt)
    monkeypatch.setattr(kernel_plane, "ElementWriter", _no_socket)
    monkeypatch.setattr(kernel_plane, "SetElemReader", _no_socket)
    monkeypatch.setattr(relay, "_detach_xdp_leftovers", lambda mode: None)  # no BPF here
    return acct


def _values(paths: Dict[str, str]) -> Dict[str, str]:
    out = {}
    for name, path in paths.items():
        with open(path) as fh:
            out[name] = fh.read().strip()
    return out


@pytest.fixture
def short_dir() -> Iterator[str]:
    """A directory whose paths fit a UNIX socket address (108 bytes)."""
    path = tempfile.mkdtemp(prefix="lrk-")
    yield path
    shutil.rmtree(path, ignore_errors=True)


def spec(sid: int, port_a: int, port_b: int) -> SessionSpec:
    return SessionSpec(sid, f"c{sid}", (StreamSpec(0, LegSpec("A", RELAY, port_a, CALLER),
                                                   LegSpec("B", RELAY, port_b, CALLEE)),))


def marks_of(s: SessionSpec) -> List[int]:
    view = session_spec(s.streams[0])
    assert view is not None
    return list(conntrack_marks(view))


def running_plane(nft: Optional[FakeNft] = None) -> KernelPlane:
    """A kernel plane as start leaves it (fake nft and conntrack)."""
    plane = KernelPlane(31000, 31099, [RELAY])
    plane.nft = nft or FakeNft()  # type: ignore[assignment]
    plane.ct = plane.ct_dump = FakeCt()  # type: ignore[assignment]
    return plane


# -- 1: a start that fails part of the way undoes itself -------------------------------
def test_a_relay_start_that_fails_after_the_plane_started_leaves_nothing(fake_kernel,
                                                                         short_dir):
    """Kernel mode: the table was made, the sysctls switched on, a legacy UNIX socket
    bound; then the control address cannot be used. The start's own error comes out,
    and the table, the sysctls, the netlink sockets and the UNIX path are gone (the
    operator's file at the control path stays)."""
    legacy = os.path.join(short_dir, "legacy.sock")
    control = os.path.join(short_dir, "control")
    with open(control, "w") as fh:
        fh.write("not a socket\n")
    node = Relay(load(None, {"mode": "kernel", "ports": "31000-31099",
                             "control": f"unix:{control}", "legacy": [f"unix:{legacy}"],
                             "control_keys": [os.path.join(short_dir, "keys")]}))
    plane = node.plane
    assert isinstance(plane, KernelPlane)
    with pytest.raises(ConfigError, match="not a socket"):
        asyncio.run(node.start())
    nft = FakeNft.made[0]
    assert nft.runs[0] == plane.rules.create()
    assert nft.runs[-1] == plane.rules.destroy() and nft.closed
    assert _values(fake_kernel) == {"nf_conntrack_acct": "0", "nf_conntrack_timestamp": "0"}
    assert FakeCt.made and all(ct.closed for ct in FakeCt.made)
    assert not os.path.exists(legacy)
    assert os.path.exists(control)


class FakePlane:
    """The DataPlane contract, recording start, apply and stop; `fail` names a step
    that raises."""

    def __init__(self, fail: str = "") -> None:
        self.fail = fail
        self.steps: List[str] = []
        self.applied: List[Any] = []
        self.sink: Any = None

    def _step(self, name: str) -> None:
        self.steps.append(name)
        if self.fail == name:
            raise RuntimeError(f"{name} failed")

    async def start(self) -> None:
        self._step("start")

    async def stop(self) -> None:
        self._step("stop")

    def apply(self, actions: Any) -> list:
        self.applied.extend(actions)
        self._step("apply")
        return []

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


class FakeStore:
    """A session store whose `load` fails (a damaged database)."""

    path = "fake"
    counters: Dict[str, int] = {}

    def __init__(self, fail_load: bool = False) -> None:
        self.fail_load = fail_load
        self.closed = False
        self.written: List[Any] = []

    def load(self) -> list:
        if self.fail_load:
            raise OSError("database disk image is malformed")
        return []

    def write(self, puts: Any, deletes: Any) -> bool:
        self.written.append((puts, deletes))
        return True

    def delete(self, sid: int) -> None:
        pass

    def clear(self) -> None:
        pass

    def close(self) -> None:
        self.closed = True


def _fake_relay(short_dir: str, plane: FakePlane, store: Optional[FakeStore] = None
                ) -> Relay:
    node = Relay(load(None, {"mode": "kernel", "ports": "31000-31099",
                             "control": f"unix:{os.path.join(short_dir, 'control.sock')}",
                             "legacy": ["off"],
                             "control_keys": [os.path.join(short_dir, "keys")]}))
    node.plane = plane  # type: ignore[assignment]
    node.store = store  # type: ignore[assignment]
    return node


def test_a_relay_start_whose_restore_fails_stops_the_plane_and_closes_the_store(
        fake_kernel, short_dir):
    plane, store = FakePlane(), FakeStore(fail_load=True)
    node = _fake_relay(short_dir, plane, store)
    with pytest.raises(OSError, match="malformed"):
        asyncio.run(node.start())
    assert plane.steps == ["start", "apply", "stop"]
    assert store.closed


def test_an_nfqueue_start_whose_queue_cannot_be_bound_removes_its_table(fake_kernel,
                                                                         monkeypatch):
    """The table (with its NFQUEUE rules) exists when the queue's bind fails (another
    process owns queue 0): the table and the queue socket go, the error comes out."""
    rules: List[str] = []
    queues: List[Any] = []

    class BusyQueue:
        def __init__(self, queue_num: int, **kw: Any) -> None:
            self.closed = False
            queues.append(self)

        def bind(self) -> None:
            raise OSError(errno.EBUSY, "queue 0 is bound by another process")

        def fileno(self) -> int:
            return 1000  # never registered with the loop

        def close(self) -> None:
            self.closed = True

    monkeypatch.setattr(nfqueue_plane, "NfQueue", BusyQueue)
    monkeypatch.setattr(nfqueue_plane, "add_queue_rule",
                        lambda family, table, chain, num, bypass: rules.append(chain))
    plane = NfqueuePlane(31000, 31099, [RELAY])
    with pytest.raises(OSError, match="bound by another process"):
        asyncio.run(plane.start())
    assert rules == ["nfq4", "nfq6"]
    nft = FakeNft.made[0]
    assert nft.runs[-1] == plane.rules.destroy() and nft.closed
    assert queues[0].closed and plane.nfq is None
    assert all(ct.closed for ct in FakeCt.made)


def test_a_kernel_start_that_fails_after_making_its_table_removes_it(fake_kernel,
                                                                     monkeypatch):
    """The flush of a crashed run's flows fails once the table is made: the table goes,
    the sockets close and the sysctls go back (before: only the sysctls)."""
    class BrokenCt(FakeCt):
        def __init__(self) -> None:
            super().__init__([CtFlow(31000, 17, CALLER[0], CALLER[1], RELAY, 31000)])
            self.fail = 1

    monkeypatch.setattr(kernel_plane, "ConntrackSocket", BrokenCt)
    plane = KernelPlane(31000, 31099, [RELAY])
    with pytest.raises(ConntrackError):
        asyncio.run(plane.start())
    nft = FakeNft.made[0]
    assert nft.runs == [plane.rules.create(), plane.rules.destroy()] and nft.closed
    assert _values(fake_kernel) == {"nf_conntrack_acct": "0", "nf_conntrack_timestamp": "0"}
    assert FakeCt.made and all(ct.closed for ct in FakeCt.made)


# -- 2: an ended call's flows are flushed even when a step of its removal fails ----------
def test_a_removal_whose_element_write_fails_still_flushes_its_flows():
    plane = running_plane(FakeNft(fail_on="delete element"))
    s = spec(1, 31000, 31002)
    assert plane.apply([Install(s)]) == []
    assert plane.apply([Remove(1, "c1", "deleted")]) == []
    assert plane.ct.flushed == marks_of(s)  # type: ignore[union-attr]
    assert plane.counters["kernel.errors"] == 1


def test_a_failed_flush_of_an_ended_call_is_retried_on_the_timer_and_the_next_read():
    plane = running_plane()
    ct = plane.ct
    s1, s2 = spec(1, 31000, 31002), spec(2, 31004, 31006)
    assert plane.apply([Install(s1), Install(s2)]) == []
    ct.fail = 1  # type: ignore[union-attr]
    assert plane.apply([Remove(1, "c1", "deleted")]) == []
    assert plane.counters["kernel.errors"] == 1
    assert ct.flushed == []  # type: ignore[union-attr]
    plane._poll(100.0)  # the next read flushes them
    assert ct.flushed == marks_of(s1)  # type: ignore[union-attr]
    # with no call left, the timer still comes for a failed flush
    ct.flushed.clear()  # type: ignore[union-attr]
    ct.fail = 1  # type: ignore[union-attr]
    assert plane.apply([Remove(2, "c2", "deleted")]) == []
    assert plane.counters["kernel.errors"] == 2
    at = plane.get_timer()
    assert at is not None
    plane.handle_timer(at)
    assert ct.flushed == marks_of(s2)  # type: ignore[union-attr]
    assert plane.get_timer() is None


@pytest.mark.parametrize("keep", [False, True])
def test_stop_flushes_the_flows_of_ended_calls_whose_flush_failed(keep):
    """A plain stop flushes them with everything else; a stop that keeps the other
    calls flushes them too (but not the kept calls' flows, nor its table)."""
    nft = FakeNft()
    plane = running_plane(nft)
    ct = plane.ct
    ended, kept = spec(1, 31000, 31002), spec(2, 31004, 31006)
    assert plane.apply([Install(ended), Install(kept)]) == []
    ct.fail = 1  # type: ignore[union-attr]
    assert plane.apply([Remove(1, "c1", "deleted")]) == []
    assert ct.flushed == []  # type: ignore[union-attr]
    if keep:
        assert plane.apply([Remove(2, "c2", KEPT)]) == []
    nft.runs.clear()
    asyncio.run(plane.stop())
    if keep:
        assert ct.flushed == marks_of(ended) and nft.runs == []  # type: ignore[union-attr]
    else:
        assert sorted(ct.flushed) == sorted(marks_of(ended) + marks_of(kept))  # type: ignore[union-attr]
        assert nft.runs == [plane.rules.destroy()]


def test_a_failed_held_flush_of_an_ended_call_is_kept_for_the_retry():
    """nfqueue's batches hold flushes to the end (`deferred_end`): an ended unit's marks
    whose held flush failed are retried too (a re-latched unit's are, as before)."""
    plane = running_plane()
    ct = plane.ct
    s = spec(1, 31000, 31002)
    assert plane.apply([Install(s)]) == []
    plane.deferred_begin()
    first = plane.deferred_mark()
    assert plane.apply([Remove(1, "c1", "deleted")]) == []
    ct.fail = 1  # type: ignore[union-attr]
    assert plane.deferred_end([(first, plane.deferred_mark(), None)]) == set()
    assert ct.flushed == []  # type: ignore[union-attr]
    at = plane.get_timer()
    assert at is not None
    plane.handle_timer(at)
    assert ct.flushed == marks_of(s)  # type: ignore[union-attr]


# -- 3: each stop step runs whatever the one before it did ------------------------------
def test_a_kernel_stop_whose_flush_fails_still_closes_and_restores(fake_kernel):
    nft = FakeNft()
    plane = running_plane(nft)
    ct = plane.ct
    plane._enable_acct()
    assert _values(fake_kernel) == {"nf_conntrack_acct": "1", "nf_conntrack_timestamp": "1"}
    assert plane.apply([Install(spec(1, 31000, 31002))]) == []
    ct.fail = 1  # type: ignore[union-attr]
    with pytest.raises(ConntrackError):
        asyncio.run(plane.stop())
    assert plane.counters["kernel.errors"] == 1
    assert nft.runs[-1] == plane.rules.destroy() and nft.closed
    assert ct.closed and plane.ct is None  # type: ignore[union-attr]
    assert _values(fake_kernel) == {"nf_conntrack_acct": "0", "nf_conntrack_timestamp": "0"}


class FakeProc:
    def __init__(self) -> None:
        self.killed = False
        self.waited = False
        self.code: Optional[int] = None

    def poll(self) -> Optional[int]:
        return self.code

    def kill(self) -> None:
        self.killed = True
        self.code = -9

    def wait(self, timeout: Optional[float] = None) -> int:
        self.waited = True
        return self.code if self.code is not None else 0


class StopWorker:
    """A worker handle that exits at once when told to stop."""

    def __init__(self) -> None:
        self.chan: Any = object()
        self.proc = FakeProc()
        self.outbox: List[Any] = []
        self.sent: List[Any] = []

    def send(self, message: Any, socks: Any = ()) -> None:
        self.sent.append(message)
        if isinstance(message, channel.Stop):
            self.proc.code = 0

    def _flush_outbox(self) -> None:
        pass

    def drop_outbox(self) -> None:
        self.outbox.clear()

    def close(self) -> None:
        self.chan = None


class FakeSteering:
    def __init__(self) -> None:
        self.closed = False

    def close(self) -> None:
        self.closed = True


def test_a_socket_plane_stop_whose_drop_table_cannot_go_still_stops_everything():
    plane = SocketPlane(31000, 31099, [RELAY])
    plane.nft = FakeNft(fail_on="delete table")
    workers = [StopWorker(), StopWorker()]
    plane.workers = workers  # type: ignore[assignment]
    prog = FakeSteering()
    plane.steering = {"eth0": prog}
    a, b = socket.socket(socket.AF_INET, socket.SOCK_DGRAM), \
        socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    plane.pending[(RELAY, 31000)] = (a, b)
    with pytest.raises(NftError):
        asyncio.run(plane.stop())
    for w in workers:
        assert [type(m) for m in w.sent] == [channel.Stop] and w.chan is None
    assert prog.closed and plane.steering == {}
    assert plane.pending == {} and a.fileno() == -1 and b.fileno() == -1


@pytest.mark.parametrize("fail", ["apply", "stop"])
def test_a_relay_stop_step_that_fails_does_not_skip_the_later_ones(fake_kernel, short_dir,
                                                                   fail):
    plane, store = FakePlane(fail=fail), FakeStore()
    node = _fake_relay(short_dir, plane, store)

    async def scenario() -> None:
        await node.start()
        control = node.control_address
        assert os.path.exists(control)
        with pytest.raises(RuntimeError, match=f"{fail} failed"):
            await node.stop()
        assert not os.path.exists(control)

    asyncio.run(scenario())
    assert plane.steps == ["start", "apply", "stop"]
    assert store.closed


# -- 4: a worker that cannot be started leaves no channel or process ----------------------
def _pairs(monkeypatch: Any) -> List[Any]:
    made: List[Any] = []
    real = channel.pair

    def pair() -> Any:
        got = real()
        made.append(got)
        return got

    monkeypatch.setattr(socket_plane.channel, "pair", pair)
    return made


def test_a_worker_whose_process_cannot_be_spawned_closes_both_channel_ends(monkeypatch):
    made = _pairs(monkeypatch)

    def no_fork(*args: Any, **kw: Any) -> Any:
        raise OSError(errno.EAGAIN, "Resource temporarily unavailable")

    monkeypatch.setattr(socket_plane.subprocess, "Popen", no_fork)
    handle = WorkerHandle(0, SocketPlane(31000, 31099, [RELAY]))
    with pytest.raises(OSError, match="temporarily unavailable"):
        handle.start()
    mine, theirs = made[0]
    assert mine.fileno() == -1 and theirs.fileno() == -1
    assert handle.chan is None and handle.proc is None


class ReaderLoop:
    def __init__(self) -> None:
        self.readers: Dict[int, Any] = {}

    def add_reader(self, fd: int, callback: Any) -> None:
        self.readers[fd] = callback

    def remove_reader(self, fd: int) -> bool:
        return self.readers.pop(fd, None) is not None

    def remove_writer(self, fd: int) -> bool:
        return False

    def call_soon(self, fn: Any, *args: Any) -> None:
        pass


def test_a_worker_whose_taps_cannot_be_opened_is_not_left_running(monkeypatch):
    """Packet mode: the process runs when its interface's tap fails to open; the start
    fails, and the process and the daemon's channel end go with it."""
    made = _pairs(monkeypatch)
    procs: List[FakeProc] = []

    def spawn(*args: Any, **kw: Any) -> FakeProc:
        procs.append(FakeProc())
        return procs[-1]

    monkeypatch.setattr(socket_plane.subprocess, "Popen", spawn)
    plane = SocketPlane(31000, 31099, [RELAY], packet_ifaces=["nosuch0"])
    loop = ReaderLoop()
    plane.loop = loop  # type: ignore[assignment]

    def no_tap() -> list:
        raise OSError(errno.ENODEV, "No such device: nosuch0")

    plane.open_taps = no_tap  # type: ignore[method-assign]
    handle = WorkerHandle(0, plane)
    with pytest.raises(OSError, match="No such device"):
        handle.start()
    assert procs[0].killed and procs[0].waited
    assert made[0][0].fileno() == -1 and handle.chan is None and handle.proc is None
    assert loop.readers == {}


# -- 5: a Redis key's TTL follows a reload ------------------------------------------------
def _capture_writes(store: RedisStore) -> List[Any]:
    calls: List[Any] = []

    def script(keys: Any, args: Any) -> int:
        calls.append((list(keys), list(args)))
        return 1

    store._write_script = script  # type: ignore[method-assign]
    return calls


def test_a_redis_keys_ttl_is_read_from_the_live_settings_at_each_write():
    cfg = load(None, {"store": "redis", "redis_url": "unix:///nowhere.sock",
                      "max_lifetime": 100, "silence_timeout": 10})
    store = open_session_store(cfg)
    assert isinstance(store, RedisStore)
    try:
        calls = _capture_writes(store)
        assert store.ttl == 100 + 20 + 60
        cfg.max_lifetime = 1000.0  # what a reload does to the running configuration
        cfg.silence_timeout = 30.0
        assert store.write([(1, "c1", {"v": 1})], [])
        assert calls[-1][1][1] == 1000 + 60 + 60
        cfg.max_lifetime = 0.0  # no maximum: no TTL
        assert store.write([(1, "c1", {"v": 1})], [])
        assert calls[-1][1][1] == 0 and store.ttl is None
    finally:
        store.close()


class FakeTimerLoop:
    """Keeps what is scheduled (call_soon / call_later) for the test to run by hand."""

    def __init__(self) -> None:
        self.scheduled: List[Any] = []

    def call_later(self, delay: float, fn: Any, *args: Any) -> Any:
        self.scheduled.append((fn, args))
        return self

    def call_soon(self, fn: Any, *args: Any) -> Any:
        return self.call_later(0.0, fn, *args)

    def pending(self, name: str) -> List[Any]:
        return [s for s in self.scheduled if getattr(s[0], "__name__", "") == name]

    def run_all(self, name: str, limit: int = 1000) -> int:
        """Run the callbacks called `name`, and those they schedule (at most `limit`)."""
        ran = 0
        while self.pending(name) and ran < limit:
            entry = self.pending(name)[0]
            self.scheduled.remove(entry)
            entry[0](*entry[1])
            ran += 1
        return ran

    def cancel(self) -> None:
        pass


def test_a_reload_that_lengthens_the_ttl_rewrites_the_live_calls_keys(short_dir,
                                                                      monkeypatch):
    """A longer max_lifetime applies to calls already running: their keys, written with
    the old TTL, are written again with the new one (else they would expire first), a
    chunk of TTL_CHUNK calls a loop turn (one script for 100,000 would stall the loop
    and time out)."""
    monkeypatch.setattr(relay.logs, "setup", lambda level, fmt: None)  # keep pytest's
    base = {"mode": "kernel", "ports": "31000-31099", "store": "redis",
            "redis_url": "unix:///nowhere.sock", "max_lifetime": 100, "silence_timeout": 10,
            "control": f"unix:{os.path.join(short_dir, 'control.sock')}", "legacy": ["off"],
            "control_keys": [os.path.join(short_dir, "keys")]}
    fresh = dict(base)
    node = Relay(load(None, base), load_config=lambda: load(None, fresh))
    store = node.store
    assert isinstance(store, RedisStore)
    monkeypatch.setattr(relay, "TTL_CHUNK", 2)
    try:
        loop = node._loop = FakeTimerLoop()  # type: ignore[assignment]
        calls = _capture_writes(store)
        for i in range(5):
            node.engine.offer(0.0, f"c{i}", "ft", CALLER)
        fresh["max_lifetime"] = 100  # unchanged: nothing to rewrite
        node.reload()
        assert calls == [] and loop.pending("_rewrite_ttl_chunk") == []
        fresh["max_lifetime"] = 1000
        node.reload()
        assert calls == []  # not within the reload
        assert loop.run_all("_rewrite_ttl_chunk") == 3  # chunks of 2, 2 and 1
        assert len(calls) == 3 and all(args[1] == 1000 + 20 + 60 for _keys, args in calls)
        written = [k for keys, _args in calls for k in keys if ":session:" in k]
        assert written == [f"lrk:{store.node}:session:{sid}" for sid in node.engine.by_sid]
    finally:
        store.close()


# -- the accounting sysctls across a restart that kept its calls --------------------------
class ListingNft(FakeNft):
    """A FakeNft whose table listing is the one a kept stop left: this ruleset's layout
    and, unless `record` is None, the accounting sysctls' record."""

    layout = 0
    record: Optional[int] = None

    def run_json(self, text: str) -> Dict[str, Any]:
        if text.startswith("list table"):
            sets = [{"set": {"name": "layout", "elem": [ListingNft.layout]}}]
            if ListingNft.record is not None:
                sets.append({"set": {"name": "acct", "elem": [ListingNft.record]}})
            return {"nftables": sets}
        return super().run_json(text)


def test_the_sysctls_lrk_set_go_back_after_a_restart_that_kept_the_calls(fake_kernel,
                                                                         monkeypatch):
    """The first start records the sysctls as it found them (0) in its table; a stop that
    keeps the calls leaves them at 1 with the table; the next start adopts the table and
    takes the record, not the 1 it finds, so its final stop puts the operator's 0 back.
    An older table without the record: the values found are restored, as before."""
    from fastpath.kernel.kernel_rules import ACCT_SET, acct_record

    first = KernelPlane(31000, 31099, [RELAY], adopt=True)
    asyncio.run(first.start())
    record = acct_record({"nf_conntrack_acct": "0", "nf_conntrack_timestamp": "0"})
    assert f"add element inet lrk {ACCT_SET} {{ {record} }}\n" in FakeNft.made[-1].runs
    assert _values(fake_kernel) == {"nf_conntrack_acct": "1", "nf_conntrack_timestamp": "1"}
    first.apply([Install(spec(1, 31010, 31012))])
    first.apply([Remove(1, "c1", KEPT)])
    asyncio.run(first.stop())
    assert _values(fake_kernel) == {"nf_conntrack_acct": "1", "nf_conntrack_timestamp": "1"}

    monkeypatch.setattr(kernel_plane, "Nft", ListingNft)
    ListingNft.layout, ListingNft.record = first.rules.layout, record
    second = KernelPlane(31000, 31099, [RELAY], adopt=True)
    asyncio.run(second.start())
    assert not any(ACCT_SET in text for text in FakeNft.made[-1].runs)  # adopted as is
    second.apply([Install(spec(1, 31010, 31012))])
    second.adopted()
    asyncio.run(second.stop())
    assert _values(fake_kernel) == {"nf_conntrack_acct": "0", "nf_conntrack_timestamp": "0"}

    for path in fake_kernel.values():  # a table of an older lrk: no record
        with open(path, "w") as fh:
            fh.write("1\n")
    ListingNft.record = None
    third = KernelPlane(31000, 31099, [RELAY], adopt=True)
    asyncio.run(third.start())
    third.apply([Install(spec(1, 31010, 31012))])
    third.adopted()
    asyncio.run(third.stop())
    assert _values(fake_kernel) == {"nf_conntrack_acct": "1", "nf_conntrack_timestamp": "1"}


def test_a_newer_lrks_records_are_left_in_the_store_and_damaged_ones_dropped(short_dir):
    """A downgrade finds records of a newer lrk: they are refused (counted) but left for
    it, not deleted; a damaged record is refused and deleted."""

    class Records(FakeStore):
        def __init__(self) -> None:
            super().__init__()
            self.deleted: List[int] = []

        def load(self) -> list:
            return [(7, {"v": 99, "sid": 7, "call_id": "future"}), (8, {"v": 1, "legs": 3})]

        def delete(self, sid: int) -> None:
            self.deleted.append(sid)

    node = Relay(load(None, {"ports": "31000-31099", "legacy": ["off"],
                             "control": f"unix:{os.path.join(short_dir, 'control.sock')}",
                             "control_keys": [os.path.join(short_dir, "keys")]}))
    store = node.store = Records()  # type: ignore[assignment]
    asyncio.run(node._restore())
    assert store.deleted == [8]
    assert node.engine.counters["sessions.restore_refused"] == 2
    assert node.engine.by_sid == {}
