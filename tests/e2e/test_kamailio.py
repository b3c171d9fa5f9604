"""End to end: SIP calls through an unmodified Kamailio 5.6 (lrkproxy module) and lrk."""

from __future__ import annotations

import os

import pytest

from lrk.client import LrkClient
from lrk.client.errors import RelayError
from lrk.demo.media import MediaEndpoint, rtcp_sender_report, summarize

from .conftest import EXTERNAL_IP, INTERNAL_IP, port_free, wait_for
from .sipua import UserAgent

pytestmark = pytest.mark.kamailio

A_SSRC, B_SSRC = 0x0A0A0A0A, 0x0B0B0B0B


class Call:
    """Caller and callee (SIP agent plus media endpoint) and one call between them."""

    def __init__(self, kam, call_id: str, flags: str = "", early: bool = True) -> None:
        self.caller, self.callee = UserAgent("alice", kam.addr), UserAgent("bob", kam.addr)
        self.caller_media, self.callee_media = MediaEndpoint(), MediaEndpoint()
        self.call_id = call_id
        extra = {"X-Lrk-Flags": flags} if flags else None
        self.dialog = self.caller.invite(self.callee, call_id, self.caller_media.address, extra)
        self.invite_at_callee, _tag = self._answer(early, extra)
        self.ok_at_caller = self.caller.await_final(self.dialog)
        assert self.ok_at_caller.status == 200, self.ok_at_caller.first_line
        self.callee.await_ack(call_id)
        # where each side was told to send its media: the relay
        self.caller_sends_to = self.ok_at_caller.sdp_media()
        self.callee_sends_to = self.invite_at_callee.sdp_media()

    def _answer(self, early, extra):
        return self.callee.answer(self.callee_media.address, early=early, extra=extra)

    def media_both_ways(self, n: int = 20, first_seq: int = 0) -> None:
        self.caller_media.send_rtp(self.caller_sends_to, n, A_SSRC, first_seq)
        got = summarize(self.callee_media.receive(self.callee_media.rtp, n, 5.0), A_SSRC)
        assert got == {"intact": n, "damaged": 0, "sources": [self.callee_sends_to],
                       "in_order": True}, got
        self.callee_media.send_rtp(self.callee_sends_to, n, B_SSRC, first_seq)
        got = summarize(self.caller_media.receive(self.caller_media.rtp, n, 5.0), B_SSRC)
        assert got == {"intact": n, "damaged": 0, "sources": [self.caller_sends_to],
                       "in_order": True}, got

    def rtcp_both_ways(self) -> None:
        for src, dst, to in ((self.caller_media, self.callee_media, self.caller_sends_to),
                             (self.callee_media, self.caller_media, self.callee_sends_to)):
            report = rtcp_sender_report(A_SSRC, 1, 172)
            src.rtcp.sendto(report, (to[0], to[1] + 1))
            got = dst.receive(dst.rtcp, 1, 5.0)
            relay_rtcp = (self.callee_sends_to if dst is self.callee_media
                          else self.caller_sends_to)
            assert got == [(report, (relay_rtcp[0], relay_rtcp[1] + 1))]

    def hang_up(self) -> None:
        import threading

        t = threading.Thread(target=self.callee.answer_bye, args=(self.call_id,))
        t.start()
        reply = self.caller.bye(self.dialog)
        t.join(10)
        assert reply.status == 200

    def close(self) -> None:
        for thing in (self.caller, self.callee, self.caller_media, self.callee_media):
            thing.close()


@pytest.fixture
def calls():
    made = []

    def make(*args, **kwargs) -> Call:
        call = Call(*args, **kwargs)
        made.append(call)
        return call

    yield make
    for call in made:
        call.close()


def test_call_with_media_rtcp_and_relay_addresses(stack, calls):
    relay, kam, _legacy, _ = stack()
    call = calls(kam, "e2e-1@test")
    # the SDP each agent received points at lrk's internal address and its own ports
    assert call.callee_sends_to[0] == INTERNAL_IP
    assert call.caller_sends_to == (INTERNAL_IP, call.callee_sends_to[1] + 2)
    lo, hi = map(int, relay.ports.split("-"))
    assert lo <= call.callee_sends_to[1] <= hi
    call.media_both_ways(30)
    call.rtcp_both_ways()
    call.hang_up()
    with LrkClient([relay.node]) as client:
        session = client.query("e2e-1@test")["session"]  # 5.6.3 sends no delete on BYE
        assert session["legs"]["A"]["counters"]["in_packets"] == 31
        assert session["legs"]["B"]["counters"]["in_packets"] == 31
        counters = client.stats()["counters"]
    assert counters["legacy.requests.S"] == 2  # 183 and 200, idempotent
    assert counters["legacy.sessions.created"] == 1
    assert counters["legacy.sessions.unchanged"] == 1


@pytest.mark.parametrize("flags, expected", [("ie", EXTERNAL_IP), ("ei", INTERNAL_IP)])
def test_flags_select_external_or_internal_address(stack, calls, flags, expected):
    _relay, kam, _legacy, _ = stack()
    call = calls(kam, f"e2e-flags-{flags}@test", flags=flags)
    assert call.callee_sends_to[0] == expected
    assert call.caller_sends_to[0] == expected
    call.media_both_ways(10)


def test_concurrent_calls_do_not_disturb_one_another(stack, calls):
    # four calls are set up before the first one's media (on a loaded PyPy run that took
    # longer than a 3 s silence timeout once: the fixture's is 30 s)
    relay, kam, _legacy, _ = stack()
    active = [calls(kam, f"e2e-multi-{n}@test", early=bool(n % 2)) for n in range(4)]
    ports = {c.callee_sends_to[1] for c in active} | {c.caller_sends_to[1] for c in active}
    assert len(ports) == 8
    for round_ in range(2):
        for call in active:
            call.media_both_ways(10, first_seq=round_ * 10)
    with LrkClient([relay.node]) as client:
        assert client.list()["total"] == 4


def test_session_released_after_silence(stack, calls):
    # the silence timeout must outlast the call's setup through Kamailio: seconds under a
    # loaded PyPy run, and a lost SIP datagram's retransmission adds 4 s more (a clean
    # clone's CPython run once lost the call's media to a 5 s timeout). A session that
    # expires before its first packet has no media
    relay, kam, _legacy, _ = stack("legacy_timeout = 15\nquarantine = 0\n")
    call = calls(kam, "e2e-quiet@test")
    call.media_both_ways(5)
    with LrkClient([relay.node]) as client:
        wait_for(lambda: client.list()["total"] == 0, 40, "the silent session to expire")
        with pytest.raises(RelayError):
            client.query("e2e-quiet@test")
        assert client.stats()["counters"]["sessions.expired.silence"] == 1
        assert client.stats()["ports"]["in_use"] == 0


def test_relay_restart_keeps_new_calls_working(stack, calls):
    relay, kam, legacy, start_relay = stack()
    first = calls(kam, "e2e-before@test")
    first.media_both_ways(5)
    assert relay.stop() == 0
    # while lrk is down the call still completes: the module rewrites the offer itself,
    # then its S for the answer times out and it disables the node
    down = calls(kam, "e2e-down@test")
    # both sides were told lrk's address and ports (the module's own pick from lrk's range),
    # where nothing listens while lrk is down: the call has no media path, not a direct one
    lo, hi = map(int, relay.ports.split("-"))
    for addr in (down.caller_sends_to, down.callee_sends_to):
        assert addr[0] == INTERNAL_IP and lo <= addr[1] <= hi, addr
        assert port_free(*addr), f"{addr} is bound while lrk is down"
    again = start_relay(legacy, "legacy_timeout = 30\nquarantine = 0\n", ports=relay.ports)
    second = calls(kam, "e2e-after@test")
    second.media_both_ways(5)
    with LrkClient([again.node]) as client:
        assert client.list()["total"] == 1
        counters = client.stats()["counters"]
    # the module re-pinged the restarted relay and re-read its config before using it
    assert counters["legacy.requests.P"] >= 1 and counters["legacy.requests.G"] >= 1


def test_unix_stream_socket(stack, calls):
    _relay, kam, _legacy, _ = stack(unix=True)
    call = calls(kam, "e2e-unix@test")
    call.media_both_ways(10)
    assert os.path.exists(kam.workdir / "lrk.sock")
