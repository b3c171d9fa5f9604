"""rtpengine as a benchmark peer, on loopback: start it, relay one call both ways, stop it.

rtpengine is a required test dependency (scripts/install.sh installs rtpengine-daemon);
a missing binary fails these tests with the install hint rather than skipping them.
"""

from __future__ import annotations

import os
import socket
from typing import Iterator

import pytest

from bench.ng import NgReplyError, setup_call
from bench.rtpengine import INSTALL_HINT, RtpengineError, RtpengineProcess, find_rtpengine
from lrk.demo.relay_process import next_port_range

pytestmark = pytest.mark.integration

CALLER_SIDE = "127.0.0.1"  # rtpengine's address facing the caller ("internal")
CALLEE_SIDE = "127.0.0.2"  # and the callee ("external"): another loopback address


@pytest.fixture
def rtpengine() -> Iterator[RtpengineProcess]:
    try:
        find_rtpengine()
    except RtpengineError as exc:
        pytest.fail(f"{exc} ({INSTALL_HINT})")
    rtpe = RtpengineProcess({"internal": CALLER_SIDE, "external": CALLEE_SIDE},
                            ports=next_port_range(64), threads=1, log_level=5)
    rtpe.start()
    try:
        yield rtpe
    finally:
        rtpe.stop()


def _udp(host: str) -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind((host, 0))
    s.settimeout(2.0)
    return s


def _rtp(seq: int) -> bytes:
    header = bytes([0x80, 0x00]) + seq.to_bytes(2, "big") + (seq * 160).to_bytes(4, "big")
    return header + b"\x11\x22\x33\x44" + bytes((seq + i) % 256 for i in range(160))


def test_one_call_relayed_both_ways_then_deleted_and_stopped(rtpengine):
    config = rtpengine.config_text()
    assert "table = -1" in config and "num-threads = 1" in config
    pid = rtpengine.pid
    caller, callee = _udp("127.0.0.1"), _udp("127.0.0.1")
    try:
        with rtpengine.client(timeout=1.0) as ng:
            assert ng.ping()
            call = setup_call(ng, "it-call-1", caller.getsockname(), callee.getsockname())
            # each side is offered the relay address of its own interface
            assert call.caller_sends_to[0] == CALLER_SIDE
            assert call.callee_sends_to[0] == CALLEE_SIDE
            for port in (call.caller_sends_to[1], call.callee_sends_to[1]):
                assert rtpengine.port_min <= port <= rtpengine.port_max

            for seq in range(1, 6):
                caller.sendto(_rtp(seq), call.caller_sends_to)
                data, source = callee.recvfrom(2048)
                assert data == _rtp(seq)
                assert source == call.callee_sends_to  # from rtpengine, not the caller
                callee.sendto(_rtp(100 + seq), call.callee_sends_to)
                data, source = caller.recvfrom(2048)
                assert data == _rtp(100 + seq)
                assert source == call.caller_sends_to

            stats = ng.query("it-call-1")["totals"]["RTP"]
            assert stats["packets"] == 10, stats
            assert stats["errors"] == 0, stats

            ng.delete("it-call-1", "a")
            with pytest.raises(NgReplyError):
                ng.query("it-call-1")  # the call is gone
            # delete-delay 0: the relay ports are free again at once
            for host, port in ((CALLER_SIDE, call.caller_sends_to[1]),
                               (CALLEE_SIDE, call.callee_sends_to[1])):
                with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
                    probe.bind((host, port))
    finally:
        caller.close()
        callee.close()

    assert rtpengine.stop() == 0, rtpengine.log_text
    assert not os.path.exists(f"/proc/{pid}"), "rtpengine still running after stop()"
    # the one complaint is about the query of the deleted call
    problems = rtpengine.log_problems()
    assert len(problems) == 1 and "Unknown call-id" in problems[0], rtpengine.log_text
    assert "Creating new call" in rtpengine.log_text  # the log file was written and kept


def test_start_failure_raises_with_the_log_and_leaves_nothing():
    # the NG port is taken: rtpengine cannot listen there and exits at once
    holder = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    holder.bind(("127.0.0.1", 0))
    rtpe = RtpengineProcess(ng=holder.getsockname(), ports=next_port_range(64))
    try:
        with pytest.raises(RtpengineError, match="Address already in use") as info:
            rtpe.start(ready_timeout=10.0)
        assert "exited with code" in str(info.value)
        assert rtpe.proc is not None and rtpe.proc.poll() is not None
        assert rtpe._tmp is not None and not os.path.exists(rtpe._tmp.name)
    finally:
        rtpe.stop()
        holder.close()
