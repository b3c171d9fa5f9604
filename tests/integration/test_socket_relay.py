"""The real daemon in socket mode: media both ways, latching, drops, expiry, port release."""

from __future__ import annotations

import ctypes
import os
import signal
import socket
import time
from typing import Dict, Optional

import msgpack
import pytest

from lrk.client import LrkClient
from lrk.client.errors import RelayError
from lrk.demo.media import check_rtp, rtcp_sender_report, rtp_packet, summarize
from tests.control_keys import sign_env
from tests.sockets import pending

from .conftest import port_free, worker_pids

pytestmark = pytest.mark.integration

A_SSRC, B_SSRC = 0xA0A0A0A0, 0xB0B0B0B0


def setup_call(client: LrkClient, caller, callee, call_id: str = "call-1", **kw):
    offer = client.offer(call_id, "tag-a", caller.address, **kw)
    answer = client.answer(call_id, "tag-a", "tag-b", callee.address, **kw)
    to_callee_side = (offer["relay"]["ip"], offer["relay"]["port"])  # the callee sends here
    to_caller_side = (answer["relay"]["ip"], answer["relay"]["port"])  # the caller sends here
    return to_caller_side, to_callee_side


def wait_until(predicate, timeout: float = 10.0, step: float = 0.05):
    """Poll a condition with a deadline: the relay's own clock decides, we only observe it."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(step)
    raise AssertionError(f"condition not met within {timeout:.1f}s")


def leg_drops(client: LrkClient, call_id: str, leg: str) -> Dict[str, int]:
    return client.query(call_id)["session"]["legs"][leg]["counters"]["drops"]


def test_rtp_and_rtcp_both_ways_with_payloads_sources_and_counters(client, endpoints):
    caller, callee = endpoints(), endpoints()
    relay_a, relay_b = setup_call(client, caller, callee)
    assert relay_a != relay_b

    caller.send_rtp(relay_a, 50, A_SSRC)
    at_callee = summarize(callee.receive(callee.rtp, 50, 5.0), A_SSRC)
    callee.send_rtp(relay_b, 40, B_SSRC)
    at_caller = summarize(caller.receive(caller.rtp, 40, 5.0), B_SSRC)
    assert at_callee == {"intact": 50, "damaged": 0, "sources": [relay_b], "in_order": True}
    assert at_caller == {"intact": 40, "damaged": 0, "sources": [relay_a], "in_order": True}

    sr = rtcp_sender_report(A_SSRC, 50, 8000)
    caller.rtcp.sendto(sr, (relay_a[0], relay_a[1] + 1))
    got = callee.receive(callee.rtcp, 1, 5.0)
    assert got == [(sr, (relay_b[0], relay_b[1] + 1))]
    callee.rtcp.sendto(b"\x81\xc9\x00\x01" + b"\x00" * 4, (relay_b[0], relay_b[1] + 1))
    got = caller.receive(caller.rtcp, 1, 5.0)
    assert got and got[0][1] == (relay_a[0], relay_a[1] + 1)

    legs = client.query("call-1")["session"]["legs"]
    assert legs["A"]["counters"]["in_packets"] == 51
    assert legs["A"]["counters"]["in_bytes"] == 50 * 172 + len(sr)
    assert legs["A"]["counters"]["out_packets"] == 41
    assert legs["B"]["counters"]["in_packets"] == 41
    assert legs["B"]["counters"]["out_packets"] == 51
    assert legs["A"]["latched"] == {"ip": "127.0.0.1", "port": caller.port}
    assert legs["A"]["rtcp_latched"] == {"ip": "127.0.0.1", "port": caller.port + 1}
    stats = client.stats()["counters"]
    assert stats["media.forwarded.packets"] == 92


def test_natted_caller_is_latched_to_its_real_port(client, endpoints):
    caller, callee, nat = endpoints(), endpoints(), endpoints()
    # the caller's SDP says caller.port, but its packets leave from nat.port (same IP)
    relay_a, relay_b = setup_call(client, caller, callee, "nat-call")
    nat.send_rtp(relay_a, 5, A_SSRC)
    assert summarize(callee.receive(callee.rtp, 5, 5.0), A_SSRC)["intact"] == 5
    callee.send_rtp(relay_b, 5, B_SSRC)
    assert summarize(nat.receive(nat.rtp, 5, 5.0), B_SSRC)["intact"] == 5
    leg_a = client.query("nat-call")["session"]["legs"]["A"]
    assert leg_a["latched"] == {"ip": "127.0.0.1", "port": nat.port}
    # the relay sent leg A's peer exactly the 5 packets the NATed port got: none went to
    # the SDP port (had one, it would be queued there by now)
    assert leg_a["counters"]["out_packets"] == 5
    assert pending(caller.rtp) == []


def test_unexpected_sources_are_dropped_and_counted(start_relay, endpoints):
    # strict admission: a leg accepts only its SDP address (by default it learns its peer
    # from the first packet, NAT-style, and only the second rule below applies)
    relay = start_relay(config="strict_source = true\n")
    client = LrkClient([relay.node], timeout=1.0, retries=3)
    caller, callee, intruder = endpoints(), endpoints(), endpoints()
    stranger = endpoints("127.0.0.2")
    relay_a, _ = setup_call(client, caller, callee, "drop-call")
    # before latching: a packet from another IP than the SDP's is refused
    stranger.rtp.sendto(rtp_packet(0, 0xDEAD), relay_a)
    caller.send_rtp(relay_a, 3, A_SSRC)
    # after latching: another port of the right IP is refused too
    intruder.rtp.sendto(rtp_packet(1, 0xBEEF), relay_a)
    got = callee.receive(callee.rtp, 3, 5.0)
    assert [check_rtp(d, A_SSRC) for d, _ in got] == [0, 1, 2]
    # the intruder's packet, sent last, is counted as a drop (bounded poll: a query may
    # reach the worker before that packet does) ...
    wait_until(lambda: leg_drops(client, "drop-call", "A") == {"unexpected_source": 2})
    # ... and, handled, nothing of it or of the stranger's reached the callee
    assert pending(callee.rtp) == []
    legs = client.query("drop-call")["session"]["legs"]
    assert legs["A"]["counters"]["in_packets"] == 3 and legs["B"]["counters"]["out_packets"] == 3
    assert client.stats()["counters"]["media.dropped.unexpected_source"] == 2
    client.close()


def test_latch_any_accepts_a_peer_whose_sdp_address_is_private(client, endpoints):
    caller, callee = endpoints(), endpoints()
    client.offer("any-call", "tag-a", ("198.51.100.7", 4000), latch_any=True)
    answer = client.answer("any-call", "tag-a", "tag-b", callee.address)
    relay_a = (answer["relay"]["ip"], answer["relay"]["port"])
    caller.send_rtp(relay_a, 4, A_SSRC)
    assert summarize(callee.receive(callee.rtp, 4, 5.0), A_SSRC)["intact"] == 4


def test_new_offer_relatches(client, endpoints):
    caller, callee, moved = endpoints(), endpoints(), endpoints()
    relay_a, relay_b = setup_call(client, caller, callee, "move-call")
    caller.send_rtp(relay_a, 2, A_SSRC)
    assert len(callee.receive(callee.rtp, 2, 5.0)) == 2
    # re-INVITE: the caller moved to another port; the old latch must go
    reoffer = client.offer("move-call", "tag-a", moved.address, to_tag="tag-b")
    assert (reoffer["relay"]["ip"], reoffer["relay"]["port"]) == relay_b
    moved.send_rtp(relay_a, 2, A_SSRC, first_seq=2)
    got = callee.receive(callee.rtp, 2, 5.0)
    assert [check_rtp(d, A_SSRC) for d, _ in got] == [2, 3]
    callee.send_rtp(relay_b, 1, B_SSRC)
    assert len(moved.receive(moved.rtp, 1, 5.0)) == 1


def test_delete_releases_ports_and_later_calls_reuse_nothing_live(start_relay, endpoints):
    relay = start_relay(config="quarantine = 0\n")
    with LrkClient([relay.node]) as client:
        caller, callee = endpoints(), endpoints()
        relay_a, relay_b = setup_call(client, caller, callee, "del-call")
        assert not port_free(*relay_a)
        reply = client.delete("del-call")
        assert reply["session"]["call_id"] == "del-call"
        for host, port in (relay_a, relay_b):
            wait_until(lambda h=host, p=port: port_free(h, p) and port_free(h, p + 1))
        with pytest.raises(RelayError) as err:
            client.query("del-call")
        assert err.value.code == "not_found"
        assert client.stats()["counters"]["sessions.deleted"] == 1


def test_session_expires_after_media_silence_and_frees_ports(start_relay, endpoints):
    relay = start_relay(config="quarantine = 0\nsilence_timeout = 30\n")
    with LrkClient([relay.node]) as client:
        caller, callee = endpoints(), endpoints()
        relay_a, relay_b = setup_call(client, caller, callee, "quiet-call", timeout=2)
        client.offer("long-call", "x", ("127.0.0.1", 5000))  # default 30 s: must survive
        started = time.monotonic()
        for i in range(6):  # 1 s of media keeps the session alive past its creation + 2 s
            if i:
                time.sleep(0.2)  # paces the media stream
            last_send = time.monotonic()  # the relay's last media time is later than this
            caller.send_rtp(relay_a, 1, A_SSRC, first_seq=i)
            assert len(callee.receive(callee.rtp, 1, 2.0)) == 1
        wait_until(lambda: client.list()["total"] == 1, timeout=10)
        ended = time.monotonic()
        # monotonic clocks are one clock across processes: the relay ended it no sooner than
        # its timeout after the last packet arrived (silence), so after creation + 3 s (not age)
        assert ended - last_send >= 2.0
        assert ended - started >= 3.0
        assert client.list()["sessions"][0]["call_id"] == "long-call"
        for host, port in (relay_a, relay_b):
            wait_until(lambda h=host, p=port: port_free(h, p) and port_free(h, p + 1))
        assert client.stats()["counters"]["sessions.expired.silence"] == 1


#: datagrams for the control socket and what each must cost: an error reply with this code,
#: or (None) a silent drop as too short (lrk/control/msgpack_proto.py, MsgpackControl.receive)
CONTROL_JUNK = [
    (b"", None),
    (b"\x00", None),
    (b"\x81\xa1", None),  # 2 bytes; 4 is the shortest request considered
    (b"\xc1\xc1\xc1\xc1", "malformed"),  # 0xc1: the one byte msgpack never uses
    (b"\x01" + b"junk" * 350, "malformed"),  # an integer, then extra data
    (msgpack.packb([1, 2, 3]), "malformed"),  # valid msgpack, not a map
    (b"\x91" * 5000, "too_large"),  # arrays nested 5000 deep
    (b"\xdf" * 8, "too_large"),  # a map header claiming 3.7e9 entries
    (msgpack.packb({"cmd": "ping"}), "bad_request"),  # no cookie
    (msgpack.packb({"cookie": "junk-1", "cmd": "ping", "v": 2}), "unsupported_version"),
    (msgpack.packb({"cookie": "junk-2", "cmd": "reboot"}), "unknown_command"),
]
SLOT = 2048  # longest datagram a worker relays (fastpath.worker.mmsg.SLOT_SIZE)


def _junk_deltas(before: Dict[str, int], after: Dict[str, int]) -> Dict[str, int]:
    """How the counters junk can touch (drops, errors) moved."""
    return {k: v - before.get(k, 0) for k, v in after.items()
            if k.startswith(("control.dropped.", "control.errors.", "media.dropped."))
            and v != before.get(k, 0)}


def test_garbage_on_control_and_media_sockets_does_not_hurt(start_relay, endpoints):
    # strict admission: junk from another address can never become leg A's peer, whatever
    # reaches the relay first (a learning leg would take the first source)
    relay = start_relay(config="strict_source = true\n")
    client = LrkClient([relay.node], timeout=1.0, retries=3)
    caller, callee = endpoints(), endpoints()
    relay_a, relay_b = setup_call(client, caller, callee, "junk-call")
    media_junk = [data for data, _ in CONTROL_JUNK] + [b"\x80" * SLOT, b"\x80" * (SLOT + 1)]
    oversized = [data for data in media_junk if len(data) > SLOT]
    assert len(oversized) == 2  # the 5000-byte nest and SLOT + 1
    before = client.stats()["counters"]
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.2", 0))  # not the caller's SDP address: can never latch
        for data, code in CONTROL_JUNK:  # signed (but the too short): errors, not drops
            s.sendto(data if code is None else sign_env(data), ("127.0.0.1", relay.control_port))
        for data in media_junk:
            s.sendto(data, relay_a)
        # media after the junk, on the same socket: relayed intact, so the junk was handled
        caller.send_rtp(relay_a, 3, A_SSRC)
        assert summarize(callee.receive(callee.rtp, 3, 5.0), A_SSRC)["intact"] == 3
        # the ping queues behind the junk on the control socket: once it is answered, every
        # junk reply has been sent, in order (none for the silent drops)
        assert client.ping()["ok"] is True
        replies = [msgpack.unpackb(r, raw=False) for r in pending(s)]
    assert [r["error"]["code"] for r in replies] == [code for _, code in CONTROL_JUNK if code]
    assert all(r["ok"] is False for r in replies)
    assert [r["cookie"] for r in replies[-2:]] == ["junk-1", "junk-2"]
    assert pending(callee.rtp) == [] and pending(caller.rtp) == []  # no junk relayed
    after = client.stats()["counters"]
    expected: Dict[str, int] = {"control.dropped.too_short": 3}
    for _, code in CONTROL_JUNK:
        if code:
            expected[f"control.errors.{code}"] = expected.get(f"control.errors.{code}", 0) + 1
    expected["media.dropped.unexpected_source"] = len(media_junk) - len(oversized)  # b"" too
    expected["media.dropped.oversized"] = len(oversized)
    assert _junk_deltas(before, after) == expected
    assert after["control.requests.ping"] - before["control.requests.ping"] == 1
    legs = client.query("junk-call")["session"]["legs"]
    assert legs["A"]["counters"]["in_packets"] == 3
    assert legs["A"]["counters"]["drops"] == {"unexpected_source": len(media_junk) - 2}
    client.close()


def test_worker_crash_is_survived_with_sessions_reinstalled(client, relay, endpoints):
    caller, callee = endpoints(), endpoints()
    relay_a, relay_b = setup_call(client, caller, callee, "crash-call")
    caller.send_rtp(relay_a, 2, A_SSRC)
    assert len(callee.receive(callee.rtp, 2, 5.0)) == 2
    # counted before the crash (a query makes the worker report): kept across the restart
    assert client.query("crash-call")["session"]["legs"]["A"]["counters"]["in_packets"] == 2
    children = worker_pids(relay)
    assert len(children) == 1
    os.kill(int(children[0]), signal.SIGKILL)
    wait_until(lambda: client.stats()["counters"]["workers.restarts"] == 1)

    def flows() -> bool:
        caller.send_rtp(relay_a, 1, A_SSRC, first_seq=7)
        return bool(callee.receive(callee.rtp, 1, 0.2))

    wait_until(flows)
    callee.send_rtp(relay_b, 1, B_SSRC)
    assert len(caller.receive(caller.rtp, 1, 5.0)) == 1
    assert client.query("crash-call")["session"]["legs"]["A"]["counters"]["in_packets"] >= 3


def test_two_workers_serve_concurrent_calls(start_relay, endpoints):
    relay = start_relay("--workers", "2")
    children = worker_pids(relay)
    assert len(children) == 2
    with LrkClient([relay.node]) as client:
        calls = []
        for n in range(4):
            caller, callee = endpoints(), endpoints()
            calls.append((caller, callee, *setup_call(client, caller, callee, f"w-{n}")))
        for n, (caller, callee, relay_a, relay_b) in enumerate(calls):
            caller.send_rtp(relay_a, 10, A_SSRC + n)
            callee.send_rtp(relay_b, 10, B_SSRC + n)
        for n, (caller, callee, _a, _b) in enumerate(calls):
            assert summarize(callee.receive(callee.rtp, 10, 5.0), A_SSRC + n)["intact"] == 10
            assert summarize(caller.receive(caller.rtp, 10, 5.0), B_SSRC + n)["intact"] == 10


def test_ipv6_relay_and_control(start_relay, endpoints):
    relay = start_relay("--internal-ip", "::1", host="::1")
    with LrkClient([relay.node]) as client:
        caller, callee = endpoints("::1"), endpoints("::1")
        relay_a, relay_b = setup_call(client, caller, callee, "v6-call")
        assert relay_a[0] == "::1"
        caller.send_rtp(relay_a, 5, A_SSRC)
        got = summarize(callee.receive(callee.rtp, 5, 5.0), A_SSRC)
        assert got["intact"] == 5 and got["sources"] == [relay_b]


def test_sdp_is_rewritten_by_the_relay(client, endpoints):
    caller = endpoints()
    # the phone announces 127.0.0.3; the relay (127.0.0.1) puts itself in its place (c=;
    # o= names the session's originator and keeps its address)
    body = (f"v=0\r\no=- 1 1 IN IP4 127.0.0.3\r\ns=-\r\nc=IN IP4 127.0.0.3\r\nt=0 0\r\n"
            f"m=audio {caller.port} RTP/AVP 0\r\na=rtcp:{caller.port + 1}\r\n")
    reply = client.offer("sdp-call", "tag-a", sdp=body)
    port = reply["relay"]["port"]
    lines = reply["sdp"].split("\r\n")
    assert f"m=audio {port} RTP/AVP 0" in lines and "c=IN IP4 127.0.0.1" in lines
    # a=rtcp without an address stays without one: it means c=, now the relay's
    assert f"a=rtcp:{port + 1}" in lines and "c=IN IP4 127.0.0.3" not in lines
    leg_a = client.query("sdp-call")["session"]["legs"]["A"]
    assert leg_a["announced"] == {"ip": "127.0.0.3", "port": caller.port}
    # with an address, a=rtcp gets the relay's
    with_addr = body.replace(f"a=rtcp:{caller.port + 1}",
                             f"a=rtcp:{caller.port + 1} IN IP4 127.0.0.3")
    reply = client.offer("sdp-call-2", "tag-a", sdp=with_addr)
    port = reply["relay"]["port"]
    assert f"a=rtcp:{port + 1} IN IP4 127.0.0.1" in reply["sdp"].split("\r\n")


def test_stop_releases_every_port(start_relay, endpoints):
    relay = start_relay()
    with LrkClient([relay.node]) as client:
        ports = []
        for n in range(3):
            caller, callee = endpoints(), endpoints()
            ports += list(setup_call(client, caller, callee, f"s-{n}"))
    assert relay.stop() == 0
    for host, port in ports:
        assert port_free(host, port) and port_free(host, port + 1)


PR_SET_CHILD_SUBREAPER = 36


def _child_subreaper(on: bool) -> None:
    """While on, processes orphaned below this one are re-parented to it (not to init), so
    it can collect their exit status."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, int(on), 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"prctl(PR_SET_CHILD_SUBREAPER): {os.strerror(err)}")


def _exit_status(pid: int, timeout: float = 10.0) -> Optional[int]:
    """A child's exit code (negative: killed by that signal), or None if it is still running
    at the deadline (then it is killed and reaped)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        time.sleep(0.02)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    return None


def test_killed_daemon_leaves_no_worker_and_no_bound_port(start_relay, endpoints):
    relay = start_relay(expect_exit=-signal.SIGKILL)  # the fixture checks this exit status
    with LrkClient([relay.node]) as client:
        caller, callee = endpoints(), endpoints()
        relay_a, relay_b = setup_call(client, caller, callee, "kill-call")
    workers = worker_pids(relay)
    assert len(workers) == 1
    _child_subreaper(True)  # the orphaned worker becomes our child: its exit status is ours
    try:
        relay.proc.kill()  # no clean shutdown at all
        relay.proc.wait()
        assert relay.proc.returncode == -signal.SIGKILL
        # the worker sees its channel close and exits by itself, cleanly
        statuses = {pid: _exit_status(pid) for pid in workers}
    finally:
        _child_subreaper(False)
    assert statuses == {pid: 0 for pid in workers}, relay.read_output()
    for host, port in (relay_a, relay_b):
        wait_until(lambda h=host, p=port: port_free(h, p) and port_free(h, p + 1))


def test_a_relay_at_its_file_descriptor_limit_refuses_calls_and_recovers(endpoints):
    """Started with RLIMIT_NOFILE 296 (FD_RESERVE + 40), a worker may hold 40 media
    sockets: ten calls. The eleventh is refused with `capacity` and the fix, its ports
    stay free (not held as taken by another process), the ten keep relaying, and a call
    that ends makes room for the next."""
    from lrk.daemon.socket_plane import FD_RESERVE
    from lrk.demo.relay_process import RelayProcess
    from tests.integration.conftest import next_ports

    limit = FD_RESERVE + 40
    relay = RelayProcess(ports=next_ports())
    relay.argv[0:0] = ["prlimit", f"--nofile={limit}:{limit}"]
    relay.start()
    try:
        with LrkClient([relay.node], timeout=1.0, retries=3) as client:
            caller, callee = endpoints(), endpoints()
            routes = [setup_call(client, caller, callee, f"fd-{i}") for i in range(10)]
            with pytest.raises(RelayError) as refused:
                setup_call(client, caller, callee, "fd-10")
            assert refused.value.code == "capacity", refused.value
            assert "no file descriptor left" in refused.value.message
            assert "LimitNOFILE" in refused.value.message
            stats = client.stats()
            assert stats["counters"]["plane.no_descriptors"] == 1
            assert stats["sessions"] == 10
            assert stats["ports"]["in_use"] == 20 and stats["ports"]["quarantined"] == 0
            relay_a, relay_b = routes[9]  # the last call admitted relays both ways
            caller.send_rtp(relay_a, 5, A_SSRC)
            assert summarize(callee.receive(callee.rtp, 5, 5.0), A_SSRC)["intact"] == 5
            callee.send_rtp(relay_b, 5, B_SSRC)
            assert summarize(caller.receive(caller.rtp, 5, 5.0), B_SSRC)["intact"] == 5
            client.delete("fd-0")
            setup_call(client, caller, callee, "fd-11")  # room again
            assert client.stats()["sessions"] == 10
        assert relay.stop() == 0
        assert "Traceback" not in relay.output, relay.output
        assert "worker 0 exited" not in relay.output, "the worker never ran out"
    finally:
        relay.stop()
