"""Operating a live relay: drain (and the client moving new calls on), reload, limits, top.

Each test starts real relays (`start_relay` in conftest) and talks to them through
`lrk.client` or `lrkproxy ctl`, as an operator and a control layer would.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time

import msgpack
import pytest

from lrk.client import LrkClient
from lrk.client.errors import NodeTimeout, NoNodeAvailable, RelayError
from lrk.ctl import top_view
from lrk.demo.relay_process import free_udp_port
from tests.control_keys import sign_env

pytestmark = pytest.mark.integration


def _ctl(relay, *args: str, timeout: float = 30.0) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lrk.cli", "ctl", "--node", relay.node,
                           *args], capture_output=True, text=True, timeout=timeout)


def _wait_for(predicate, what: str, limit: float = 10.0) -> None:
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)  # polling an observable, bounded by `limit`
    raise AssertionError(f"timed out waiting for {what}")


def test_drain_moves_new_calls_to_the_next_node_and_keeps_old_calls(start_relay, endpoints):
    one, two = start_relay(), start_relay()
    caller, callee = endpoints(), endpoints()
    with LrkClient([one.node, two.node], algorithm="linear", timeout=1.0, retries=2) as c:
        old = c.offer("old-call", "ft", caller.address)
        c.answer("old-call", "ft", "tt", callee.address)
        assert c.stats(one.node)["sessions"] == 1
        drained = c.drain(node=one.node)
        assert drained["draining"] is True and drained["sessions"] == 1

        # a new call: node one refuses with `draining`, the client lands it on node two
        new = c.offer("new-call", "ft", caller.address)
        assert c.stats(two.node)["sessions"] == 1
        assert c.stats(one.node)["counters"]["sessions.refused.draining"] == 1
        assert new["relay"]["port"] != old["relay"]["port"] or one.ports != two.ports

        # the old call keeps its media on node one
        a_port = c.query("old-call")["session"]["legs"]["A"]["relay"]["port"]
        caller.rtp.sendto(b"\x80\x00old-call-media", ("127.0.0.1", a_port))
        got = callee.receive(callee.rtp, 1, 2.0)
        assert [data for data, _src in got] == [b"\x80\x00old-call-media"]

        # without a second node the refusal reaches the caller as such
        with LrkClient([one.node], timeout=1.0, retries=1) as alone:
            with pytest.raises(RelayError) as refused:
                alone.offer("third-call", "ft", caller.address)
            assert refused.value.code == "draining"

        # ctl drain --wait returns once the last call has ended
        waiter = subprocess.Popen(
            [sys.executable, "-m", "lrk.cli", "ctl", "--node", one.node, "drain", "--wait",
             "--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        _wait_for(lambda: c.stats(one.node)["counters"]["control.requests.drain"] >= 2,
                  "ctl drain to reach the relay")
        assert waiter.poll() is None  # a call is still up
        c.delete("old-call")
        out, err = waiter.communicate(timeout=20)
        assert waiter.returncode == 0, err
        assert json.loads(out)["drained"] is True

        undrained = c.drain(False, node=one.node)
        assert undrained["draining"] is False
        c.offer("after", "ft", caller.address)  # linear: node one again
        assert c.stats(one.node)["sessions"] == 1


def test_max_sessions_refusal_is_capacity(start_relay, endpoints):
    relay = start_relay(config="max_sessions = 1\n")
    caller = endpoints()
    with LrkClient([relay.node], timeout=1.0, retries=1) as c:
        c.offer("a", "ft", caller.address)
        with pytest.raises(RelayError) as refused:
            c.offer("b", "ft", caller.address)
        assert refused.value.code == "capacity"
        assert c.stats()["counters"]["sessions.refused.max_sessions"] == 1


def test_control_rate_limit_drops_a_flooding_source_not_others(start_relay):
    relay = start_relay(config="max_control_rate = 5\n")
    flood = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    flood.bind(("127.0.0.1", 0))
    for i in range(30):  # a bounded burst, far above 5/s, sent at once
        flood.sendto(_ping_bytes(f"f{i}"), (relay.host, relay.control_port))
    # another source address is served meanwhile: its bucket is its own. Its request queues
    # behind the burst on the control socket, so once it is answered every flood datagram
    # has been handled and every reply to the flood sent (queued on `flood` by now)
    other = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    other.bind(("127.0.0.2", 0))
    other.settimeout(5.0)
    other.sendto(_request_bytes("other", "stats"), (relay.host, relay.control_port))
    reply = msgpack.unpackb(other.recv(65535), raw=False)
    other.close()
    assert reply["ok"] is True and reply["cookie"] == "other"
    served = 0
    flood.setblocking(False)
    while True:
        try:
            assert msgpack.unpackb(flood.recv(4096), raw=False)["pong"] is True
        except BlockingIOError:
            break
        served += 1
    flood.close()
    # one second's burst (5), less the readiness ping from the same IP, and what refilled
    # (5/s) while the relay worked through the burst: the flood is cut, whatever the pace
    assert 4 <= served <= 15, served
    assert reply["counters"]["control.dropped.rate_limited"] == 30 - served
    # and the flooding address is served again once its bucket has refilled
    with LrkClient([relay.node], timeout=1.0, retries=3) as later:
        _wait_for(lambda: _stats_ok(later), "the bucket to refill", 5.0)


def _ping_bytes(cookie: str) -> bytes:
    return _request_bytes(cookie, "ping")


def _request_bytes(cookie: str, cmd: str) -> bytes:
    return sign_env(msgpack.packb({"v": 1, "cookie": cookie, "cmd": cmd}))


def _stats_ok(client: LrkClient) -> bool:
    try:
        client.stats()
        return True
    except (NodeTimeout, NoNodeAvailable):
        return False


def test_sighup_and_ctl_reload_change_allow_list_and_log_level(start_relay, tmp_path):
    relay = start_relay("--legacy", f"127.0.0.1:{free_udp_port()}",
                        config="log_level = \"error\"\n")
    path = next(p for p in tmp_path.iterdir() if p.suffix == ".toml")
    with LrkClient([relay.node], timeout=1.0, retries=3) as c:
        c.drain()  # logs a warning, not shown at level error
        c.drain(False)
        path.write_text('log_level = "warning"\nlegacy_allow = ["192.0.2.0/24"]\n'
                        "silence_timeout = 33\n")
        reply = c.reload()
        assert set(reply["applied"]) >= {"log_level", "legacy_allow", "silence_timeout"}
        assert reply["restart_needed"] == []
        c.drain()  # now the warning shows
        c.drain(False)
        path.write_text('log_level = "warning"\nmode = "kernel"\n')
        reply = c.reload()
        assert reply["restart_needed"] == ["mode"]
        # SIGHUP does the same as ctl reload
        path.write_text('log_level = "error"\n')
        relay.proc.send_signal(__import__("signal").SIGHUP)
        _wait_for(lambda: "reload: applied" in relay.read_output().split("restart: mode")[-1],
                  "the SIGHUP reload to be logged")
    out = relay.read_output()
    assert out.count("draining, no new calls") == 1, out
    assert "changed but need a restart: mode" in out


def test_ctl_top_frames_and_json(start_relay, endpoints):
    relay = start_relay()
    with LrkClient([relay.node], timeout=1.0, retries=3) as c:
        c.offer("t", "ft", endpoints().address)
    done = _ctl(relay, "top", "--count", "2", "--interval", "0.2", "--json")
    assert done.returncode == 0, done.stderr
    frames = [json.loads(line) for line in done.stdout.splitlines()]
    assert len(frames) == 2 and all(f["sessions"] == 1 for f in frames)
    assert {"pps_in", "pps_out", "drops", "ports"} <= set(frames[0])
    text = _ctl(relay, "top", "--count", "1", "--interval", "0.1")
    assert "sessions 1" in text.stdout and "pps in" in text.stdout


def test_top_view_rates():
    prev = {"counters": {"media.forwarded.packets": 100, "media.dropped.unexpected_source": 1}}
    cur = {"sessions": 3, "counters": {"media.forwarded.packets": 600,
                                       "media.dropped.unexpected_source": 4}}
    frame = top_view(prev, cur, 2.0)
    assert frame["pps_out"] == 250.0 and frame["pps_in"] == 250.0
    assert frame["drops"] == {"unexpected_source": 4} and frame["sessions"] == 3


def test_reload_reads_rotated_keys(start_relay, tmp_path, monkeypatch):
    """Key rotation without a restart: a key added to the key directory works after
    `ctl reload`; one removed stops working."""
    from lrk.control.auth import KEYS_ENV, create_key

    keys = tmp_path / "keys"
    old = create_key(str(keys), "admin", admin=True)
    monkeypatch.setenv(KEYS_ENV, str(keys))  # this relay's keys (and its readiness ping)
    relay = start_relay()
    new = create_key(str(keys), "rotated", admin=True)
    with LrkClient([relay.node], timeout=0.5, retries=1, key=new) as rotated, \
            pytest.raises((NodeTimeout, NoNodeAvailable)):
        rotated.ping(relay.node)  # not known yet: no reply at all
    with LrkClient([relay.node], timeout=1.0, retries=3, key=old) as admin:
        assert "keys" in admin.reload()["applied"]
    with LrkClient([relay.node], timeout=1.0, retries=3, key=new) as rotated:
        assert rotated.ping(relay.node)["pong"] is True
        kept = str(tmp_path / "retired.key")
        shutil.copy2(old, kept)  # a client that still holds it
        os.unlink(old)  # the old key retires from the relay's directory
        assert "keys" in rotated.reload()["applied"]
    with LrkClient([relay.node], timeout=0.5, retries=1, key=kept) as retired, \
            pytest.raises((NodeTimeout, NoNodeAvailable)):
        retired.ping(relay.node)
