"""Calls survive a relay restart (issue: calls survive): with `state_dir` set, every
session is written to a SQLite store before the reply that announces it, and a relay
started again with the same command line takes the calls back on the same ports.

Each test runs real relays in socket mode on loopback and real media through them.
"""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import time
from contextlib import contextmanager
from typing import Iterator, List

import pytest

from lrk.client import LrkClient
from lrk.client.errors import RelayError
from lrk.daemon.store import path_for
from lrk.demo.media import MediaEndpoint
from lrk.demo.relay_process import RelayProcess

from .conftest import next_ports, worker_pids

pytestmark = pytest.mark.integration

CALLS = 5


def _store_path(relay: RelayProcess, tmp_path) -> str:
    control = relay.argv[relay.argv.index("--control") + 1]
    return path_for(str(tmp_path / "state"), control, relay.ports)


def _running(pid: int) -> bool:
    """Whether a process is alive (a zombie waiting for its new parent to reap it is not)."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _store_rows(relay: RelayProcess, tmp_path) -> int:
    with sqlite3.connect(_store_path(relay, tmp_path)) as db:
        return db.execute("SELECT COUNT(*) FROM sessions").fetchone()[0]


class _Relays:
    """A test's relay (socket mode, its own state_dir) and its restarts, and the calls
    set up through them."""

    def __init__(self, tmp_path) -> None:
        self.current = RelayProcess(ports=next_ports(),
                                    extra=["--state-dir", str(tmp_path / "state")]).start()
        self.calls: List[tuple] = []

    def restart(self) -> RelayProcess:
        """The same command line started again (the current relay is stopped or dead)."""
        self.current = self.current.again().start()
        return self.current


@contextmanager
def _relays(tmp_path) -> Iterator[_Relays]:
    """At the end the current relay stops (it must exit 0) and the calls' sockets close."""
    relays = _Relays(tmp_path)
    try:
        yield relays
    finally:
        code = relays.current.stop()
        _close(relays.calls)
    assert code == 0, relays.current.output


def _setup(client: LrkClient, n: int) -> List[tuple]:
    calls = []
    for i in range(n):
        caller, callee = MediaEndpoint(), MediaEndpoint()
        to_b = client.offer(f"call-{i}", "ft", caller.address)["relay"]
        to_a = client.answer(f"call-{i}", "ft", "tt", callee.address)["relay"]
        calls.append((caller, callee, (to_a["ip"], to_a["port"]), (to_b["ip"], to_b["port"])))
    return calls


def _flows(calls, ssrc_base: int, first_seq: int) -> None:
    """Three packets each way on every call, exact bytes, from the relay's address."""
    for i, (caller, callee, to_a, to_b) in enumerate(calls):
        caller.send_rtp(to_a, 3, ssrc_base + i, first_seq)
        got = callee.receive(callee.rtp, 3, 3.0)
        assert [src for _d, src in got] == [to_b] * 3, f"call {i}: {got}"
        callee.send_rtp(to_b, 3, ssrc_base + 0x100 + i, first_seq)
        got = caller.receive(caller.rtp, 3, 3.0)
        assert [src for _d, src in got] == [to_a] * 3, f"call {i}: {got}"


def _close(calls) -> None:
    for caller, callee, _a, _b in calls:
        caller.close()
        callee.close()


@pytest.mark.parametrize("how", ["sigterm", "kill -9"])
def test_restart_keeps_every_call_on_its_ports(tmp_path, how):
    with _relays(tmp_path) as relays:
        first = relays.current
        with LrkClient([first.node], timeout=1.0, retries=3) as client:
            relays.calls = calls = _setup(client, CALLS)
            _flows(calls, 0x1000, 0)
            before = client.query("call-0")["session"]
        assert _store_rows(first, tmp_path) == CALLS
        if how == "sigterm":
            assert first.stop() == 0
            assert f"{CALLS} call(s) kept in the session store" in first.output
        else:
            workers = worker_pids(first)
            first.kill()
            assert workers
            # its workers exit on their own (channel closed): no orphan holds the ports
            deadline = time.monotonic() + 5.0
            while any(_running(pid) for pid in workers) and time.monotonic() < deadline:
                time.sleep(0.02)
            assert not [pid for pid in workers if _running(pid)], "orphaned workers"
        second = relays.restart()
        assert f"restored {CALLS} of {CALLS} call(s)" in second.read_output()
        with LrkClient([second.node], timeout=1.0, retries=3) as client:
            after = client.query("call-0")["session"]
            for leg in ("A", "B"):
                assert after["legs"][leg]["relay"] == before["legs"][leg]["relay"]
                assert after["legs"][leg]["tag"] == before["legs"][leg]["tag"]
            assert client.stats()["sessions"] == CALLS
            _flows(calls, 0x2000, 10)
            again = client.query("call-0")["session"]["legs"]["A"]["counters"]
            # counters continue: the 3 packets before the restart and the 3 after
            assert again["in_packets"] == 6, again
            for i in range(CALLS):
                client.delete(f"call-{i}")
            assert client.stats()["ports"]["in_use"] == 0
        assert _store_rows(second, tmp_path) == 0, "an ended call leaves no record"


def test_shutdown_ends_every_call_and_the_next_start_has_none(tmp_path):
    with _relays(tmp_path) as relays:
        first = relays.current
        with LrkClient([first.node], timeout=1.0, retries=3) as client:
            relays.calls = _setup(client, 2)
            reply = client.shutdown()
            assert reply["stopping"] is True and reply["sessions_ended"] == 2
        assert first.proc.wait(10) == 0
        first.stop()
        assert "shutdown requested" in first.output
        assert _store_rows(first, tmp_path) == 0
        second = relays.restart()
        with LrkClient([second.node], timeout=1.0, retries=3) as client:
            assert client.stats()["sessions"] == 0


def test_a_record_that_cannot_be_read_is_dropped_not_fatal(tmp_path):
    with _relays(tmp_path) as relays:
        first = relays.current
        with LrkClient([first.node], timeout=1.0, retries=3) as client:
            relays.calls = _setup(client, 2)
        assert first.stop() == 0
        with sqlite3.connect(_store_path(first, tmp_path)) as db:
            db.execute("UPDATE sessions SET record = x'c1' WHERE call_id = 'call-0'")
        second = relays.restart()
        assert "restored 1 of 2 call(s)" in second.read_output()
        with LrkClient([second.node], timeout=1.0, retries=3) as client:
            assert [s["call_id"] for s in client.list()["sessions"]] == ["call-1"]
            assert client.stats()["counters"]["sessions.restore_refused"] == 1
        assert _store_rows(second, tmp_path) == 1


def test_ctl_shutdown_stops_the_relay_and_ends_its_calls(tmp_path):
    """The operator's way to end everything for good: `lrkproxy ctl shutdown` (admin key,
    found in $LRK_KEYS as the relay's own)."""
    with _relays(tmp_path) as relays:
        relay = relays.current
        with LrkClient([relay.node], timeout=1.0, retries=3) as client:
            relays.calls = _setup(client, 1)
        done = subprocess.run([sys.executable, "-m", "lrk.cli", "ctl", "--node", relay.node,
                               "shutdown"], capture_output=True, text=True, timeout=30)
        assert done.returncode == 0, done.stderr
        assert "stopping" in done.stdout and "sessions_ended" in done.stdout
        assert relay.proc.wait(10) == 0
    assert "shutdown requested over the control protocol" in relay.output
    assert _store_rows(relay, tmp_path) == 0


def test_a_restart_with_fewer_descriptors_restores_what_fits_and_starts(tmp_path):
    """Six calls kept across a restart whose RLIMIT_NOFILE lets the worker hold four
    calls' sockets: the relay starts all the same (never exits for it), serves the four,
    and the two that do not fit end as failed, their ports free."""
    from lrk.daemon.socket_plane import FD_RESERVE

    with _relays(tmp_path) as relays:
        first = relays.current
        with LrkClient([first.node], timeout=1.0, retries=3) as client:
            relays.calls = calls = _setup(client, 6)
        assert first.stop() == 0
        twin = first.again()
        limit = FD_RESERVE + 16
        twin.argv[0:0] = ["prlimit", f"--nofile={limit}:{limit}"]
        relays.current = second = twin.start()
        with LrkClient([second.node], timeout=1.0, retries=3) as client:
            stats = client.stats()
            assert stats["sessions"] == 4, stats["sessions"]
            assert stats["ports"]["in_use"] == 8
            assert stats["counters"]["plane.no_descriptors"] >= 2
            kept = [i for i in range(6) if _exists(client, f"call-{i}")]
            assert len(kept) == 4
            _flows([calls[i] for i in kept], 0x3000, 20)
            for i in kept:
                client.delete(f"call-{i}")
        assert "no file descriptor left" in second.read_output()


def _exists(client: LrkClient, call_id: str) -> bool:
    try:
        client.query(call_id)
    except RelayError as exc:
        assert exc.code == "not_found", exc
        return False
    return True
