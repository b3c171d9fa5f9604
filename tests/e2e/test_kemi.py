"""End to end: Kamailio's app_python3 (KEMI) drives every media stream through lrk.

Real Kamailio 5.6 with etc/kamailio/lrk-kemi.cfg and lrk_kemi.py as shipped, real lrk
relays (socket mode), SIP phones and RTP endpoints, all on loopback.
"""

from __future__ import annotations

import socket

import pytest

from lrk.client import RelayError
from lrk.demo.media import MediaEndpoint, rtcp_sender_report, rtp_packet

from .kemi_fixtures import (
    EXTERNAL_IP,
    INTERNAL_IP,
    ROOT,
    KemiKamailio,
    KemiStack,
    toml_config,
)
from .kemi_sipua import AUDIO, VIDEO, Dialog, Msg, Phone, read_sdp, unique

pytestmark = pytest.mark.kamailio

SSRC = {("alice", AUDIO): 0xA1A1A1A1, ("alice", VIDEO): 0xA2A2A2A2,
        ("bob", AUDIO): 0xB1B1B1B1, ("bob", VIDEO): 0xB2B2B2B2}


@pytest.fixture
def stack(tmp_path, monkeypatch):
    made = KemiStack(tmp_path)
    monkeypatch.setenv("LRK_KEYS", str(made.keys))  # this test's clients sign with its keys
    yield made
    made.close()


@pytest.fixture
def phones():
    made = []

    def make(name, kam, **kwargs) -> Phone:
        phone = Phone(name, kam.addr, **kwargs)
        made.append(phone)
        return phone

    yield make
    for phone in made:
        phone.close()


def relay_range(relay):
    lo, hi = map(int, relay.ports.split("-"))
    return range(lo, hi + 1)


def media_flows(src: Phone, src_view: Msg, dst: Phone, dst_view: Msg, kind: str,
                count: int = 10, first_seq: int = 0) -> None:
    """`count` RTP packets and one RTCP report of stream `kind`, src -> dst, arrive intact
    (byte for byte, in order) and from the relay address dst was told to send to."""
    send_to = read_sdp(src_view.body)[kind]  # the relay, as written into src's SDP
    comes_from = read_sdp(dst_view.body)[kind]
    packets = [rtp_packet(first_seq + i, SSRC[(src.name, kind)]) for i in range(count)]
    for packet in packets:
        src.media[kind].rtp.sendto(packet, send_to)
    endpoint = dst.media[kind]
    got = endpoint.receive(endpoint.rtp, count, 5.0)
    assert got == [(p, comes_from) for p in packets], (kind, src.name, len(got))
    report = rtcp_sender_report(SSRC[(src.name, kind)], count, 172 * count)
    src.media[kind].rtcp.sendto(report, (send_to[0], send_to[1] + 1))
    assert endpoint.receive(endpoint.rtcp, 1, 5.0) == [
        (report, (comes_from[0], comes_from[1] + 1))], (kind, src.name, "rtcp")


def all_media_flows(caller: Phone, caller_view: Msg, callee: Phone, callee_view: Msg,
                    first_seq: int = 0) -> None:
    for kind in (AUDIO, VIDEO):
        media_flows(caller, caller_view, callee, callee_view, kind, first_seq=first_seq)
        media_flows(callee, callee_view, caller, caller_view, kind, first_seq=first_seq)


def relayed(view: Msg, relay, ip: str = INTERNAL_IP) -> dict:
    """The streams of an SDP someone received: every one must point at the relay."""
    streams = read_sdp(view.body)
    assert set(streams) == {AUDIO, VIDEO}, view.body
    for kind, (addr, port) in streams.items():
        assert addr == ip and port in relay_range(relay), (kind, view.body)
    assert "a=candidate" not in view.body and "a=ice-" not in view.body, view.body
    return streams


def setup_call(caller: Phone, callee: Phone, call_id: str, early: bool = True):
    """INVITE (audio + video) / 183 / 200 / ACK; returns what each side saw."""
    dialog = caller.invite(callee, call_id, caller.sdp(ice=True))
    invite = callee.request("INVITE", call_id)
    tag = unique("b")
    if early:
        callee.reply(invite, "183 Session Progress", callee.sdp(), tag)
        caller.response(dialog, "INVITE", lambda s: s == 183)
    callee.reply(invite, "200 OK", callee.sdp(), tag)
    ok = caller.response(dialog, "INVITE", lambda s: s == 200)
    caller.confirmed(dialog, ok)
    caller.ack(dialog)
    callee.request("ACK", call_id)
    return dialog, callee.callee_dialog(invite, tag), invite, ok


def hang_up(caller: Phone, dialog: Dialog, callee: Phone) -> None:
    caller.in_dialog(dialog, "BYE")
    bye = callee.request("BYE", dialog.call_id)
    callee.reply(bye, "200 OK")
    caller.response(dialog, "BYE", lambda s: s == 200)


def test_audio_video_call_reinvite_update_bye(stack, phones):
    relay = stack.relay()
    kam = stack.kamailio({0: [relay.node]})
    # Debian's app_python3 embeds the system CPython 3.11; lrk and its packages (the
    # checkout's .venv) import there, and the workers sign with this test's client.key
    started = [line for line in kam.output().splitlines() if "lrk: lrk.kemi on" in line]
    assert len(started) == 1, kam.output()[-3000:]
    assert "lrk.kemi on CPython 3.11." in started[0]
    assert f"set 0: {relay.node}; algorithm linear, key client, call table lrk" in started[0]
    assert f"lrk from {ROOT}, packages from {ROOT}/.venv/lib/python3.11/site-packages" \
        in started[0]
    caller, callee = phones("alice", kam), phones("bob", kam)
    call_id = "kemi-av@test"

    dialog, callee_dialog, invite, ok = setup_call(caller, callee, call_id)
    # both streams of both SDPs point at the relay, each at its own port pair
    to_relay_a, to_relay_b = relayed(invite, relay), relayed(ok, relay)
    ports = {p for _ip, p in to_relay_a.values()} | {p for _ip, p in to_relay_b.values()}
    assert len(ports) == 4
    all_media_flows(caller, ok, callee, invite)
    client = stack.client(relay)
    session = client.query(call_id)["session"]
    assert session["call_id"] == call_id

    # re-INVITE from the caller: its video moves to a new endpoint; the relay keeps its
    # ports and sends the callee's video to the new one
    caller.media[VIDEO].close()
    caller.media[VIDEO] = MediaEndpoint()
    caller.in_dialog(dialog, "INVITE", caller.sdp())
    reinvite = callee.request("INVITE", call_id)
    assert relayed(reinvite, relay) == to_relay_a
    callee.reply(reinvite, "200 OK", callee.sdp(), callee_dialog.local_tag)
    ok2 = caller.response(dialog, "INVITE", lambda s: s == 200)
    assert relayed(ok2, relay) == to_relay_b
    caller.ack(dialog)
    callee.request("ACK", call_id)
    all_media_flows(caller, ok2, callee, reinvite, first_seq=100)

    # UPDATE from the callee (the other direction): its audio moves
    callee.media[AUDIO].close()
    callee.media[AUDIO] = MediaEndpoint()
    callee.in_dialog(callee_dialog, "UPDATE", callee.sdp())
    update = caller.request("UPDATE", call_id)
    assert relayed(update, relay) == to_relay_b
    caller.reply(update, "200 OK", caller.sdp())
    ok3 = callee.response(callee_dialog, "UPDATE", lambda s: s == 200)
    assert relayed(ok3, relay) == to_relay_a
    all_media_flows(caller, update, callee, ok3, first_seq=200)

    counters = client.query(call_id)["session"]["legs"]
    assert counters  # the session is still there, with its counters
    hang_up(caller, dialog, callee)
    # the BYE deleted the session before Kamailio relayed it: nothing is left
    assert client.list()["total"] == 0
    with pytest.raises(RelayError) as err:
        client.query(call_id)
    assert err.value.code == "not_found"
    assert client.stats()["ports"]["in_use"] == 0


def no_session_left(client, call_id: str) -> None:
    assert client.list()["total"] == 0
    with pytest.raises(RelayError) as err:
        client.query(call_id)
    assert err.value.code == "not_found"


def test_forked_early_dialogs(stack, phones):
    """Two 183s with different To tags (a fork further on), then the 200 of the first:
    each early dialog has relay ports of its own for the caller and media flows in both
    at once; the 200's dialog keeps its ports, the other is freed."""
    relay = stack.relay()
    kam = stack.kamailio({0: [relay.node]})
    caller, bob, carol = phones("alice", kam), phones("bob", kam), phones("carol", kam)
    call_id = "kemi-fork@test"
    dialog = caller.invite(bob, call_id, caller.sdp())
    invite = bob.request("INVITE", call_id)
    tag_bob, tag_carol = unique("b"), unique("c")
    bob.reply(invite, "183 Session Progress", bob.sdp(), tag_bob)
    early_bob = caller.response(dialog, "INVITE", lambda s: s == 183)
    assert early_bob.to_tag == tag_bob
    media_flows(caller, early_bob, bob, invite, AUDIO)
    # the second fork answers early too (sent through the same transaction)
    bob.reply(invite, "183 Session Progress", carol.sdp(), tag_carol)
    early_carol = caller.response(dialog, "INVITE", lambda s: s == 183)
    assert early_carol.to_tag == tag_carol
    assert read_sdp(early_carol.body) != read_sdp(early_bob.body)  # its own relay ports
    media_flows(caller, early_carol, carol, invite, AUDIO, first_seq=50)
    media_flows(caller, early_carol, carol, invite, VIDEO, first_seq=50)
    media_flows(caller, early_bob, bob, invite, AUDIO, first_seq=70)  # both at once
    # the first fork answers: its dialog is the call
    bob.reply(invite, "200 OK", bob.sdp(), tag_bob)
    ok = caller.response(dialog, "INVITE", lambda s: s == 200)
    assert ok.to_tag == tag_bob and read_sdp(ok.body) == read_sdp(early_bob.body)
    caller.confirmed(dialog, ok)
    caller.ack(dialog)
    bob.request("ACK", call_id)
    all_media_flows(caller, ok, bob, invite, first_seq=100)
    hang_up(caller, dialog, bob)
    no_session_left(stack.client(relay), call_id)


def test_late_offer_ack_with_sdp(stack, phones):
    """INVITE without SDP: the 200 carries the offer (callee -> caller), the ACK the answer.
    (Kamailio's workers sign with the key file the config names, not $LRK_KEYS.)"""
    relay = stack.relay()
    kam = stack.kamailio({0: [relay.node]}, keys_env=False, key=str(stack.keys / "client.key"))
    caller, callee = phones("alice", kam), phones("bob", kam)
    call_id = "kemi-late@test"
    dialog = caller.invite(callee, call_id)
    invite = callee.request("INVITE", call_id)
    assert invite.body == ""
    tag = unique("b")
    callee.reply(invite, "200 OK", callee.sdp(ice=True), tag)
    ok = caller.response(dialog, "INVITE", lambda s: s == 200)
    relayed(ok, relay)
    caller.confirmed(dialog, ok)
    caller.ack(dialog, caller.sdp())
    ack = callee.request("ACK", call_id)
    relayed(ack, relay)
    assert set(read_sdp(ok.body).values()).isdisjoint(read_sdp(ack.body).values())
    all_media_flows(caller, ok, callee, ack)
    hang_up(caller, dialog, callee)
    no_session_left(stack.client(relay), call_id)


def test_cancel_deletes_the_session(stack, phones):
    relay = stack.relay()
    kam = stack.kamailio({0: [relay.node]})
    caller, callee = phones("alice", kam), phones("bob", kam)
    call_id = "kemi-cancel@test"
    dialog = caller.invite(callee, call_id, caller.sdp())
    invite = callee.request("INVITE", call_id)
    tag = unique("b")
    callee.reply(invite, "183 Session Progress", callee.sdp(), tag)
    early = caller.response(dialog, "INVITE", lambda s: s == 183)
    media_flows(caller, early, callee, invite, AUDIO)
    client = stack.client(relay)
    assert client.query(call_id)["session"]["call_id"] == call_id
    caller.cancel(dialog)
    caller.response(dialog, "CANCEL", lambda s: s == 200)
    cancel = callee.request("CANCEL", call_id)
    callee.reply(cancel, "200 OK")
    callee.reply(invite, "487 Request Terminated", tag=tag)
    failed = caller.response(dialog, "INVITE", lambda s: s == 487)
    assert dialog.invite is not None
    caller.ack_failure(dialog.invite, failed)
    no_session_left(client, call_id)


def test_failed_reinvite_keeps_the_call(stack, phones):
    relay = stack.relay()
    kam = stack.kamailio({0: [relay.node]})
    caller, callee = phones("alice", kam), phones("bob", kam)
    call_id = "kemi-488@test"
    dialog, _callee_dialog, invite, ok = setup_call(caller, callee, call_id, early=False)
    all_media_flows(caller, ok, callee, invite)
    sent = caller.in_dialog(dialog, "INVITE", caller.sdp())
    reinvite = callee.request("INVITE", call_id)
    callee.reply(reinvite, "488 Not Acceptable Here")
    failed = caller.response(dialog, "INVITE", lambda s: s == 488)
    caller.ack_failure(sent, failed)
    client = stack.client(relay)
    assert client.query(call_id)["session"]["call_id"] == call_id
    all_media_flows(caller, ok, callee, reinvite, first_seq=100)
    hang_up(caller, dialog, callee)
    no_session_left(client, call_id)


def test_flags_ie_and_requests_from_the_callee(stack, phones):
    """LRK_FLAGS="ie": the callee is external. A re-INVITE from the callee goes upstream,
    so the config passes "ei": nothing moves, both sides keep their relay addresses."""
    relay = stack.relay()
    kam = stack.kamailio({0: [relay.node]}, flags="ie")
    caller, callee = phones("alice", kam), phones("bob", kam)
    call_id = "kemi-ie@test"
    dialog, callee_dialog, invite, ok = setup_call(caller, callee, call_id)
    to_relay_callee, to_relay_caller = relayed(invite, relay, EXTERNAL_IP), relayed(ok, relay)
    all_media_flows(caller, ok, callee, invite)
    callee.in_dialog(callee_dialog, "INVITE", callee.sdp())
    reinvite = caller.request("INVITE", call_id)
    assert relayed(reinvite, relay) == to_relay_caller
    caller.reply(reinvite, "200 OK", caller.sdp())
    ok2 = callee.response(callee_dialog, "INVITE", lambda s: s == 200)
    assert relayed(ok2, relay, EXTERNAL_IP) == to_relay_callee
    callee.ack(callee_dialog)
    caller.request("ACK", call_id)
    all_media_flows(caller, reinvite, callee, ok2, first_seq=100)
    hang_up(caller, dialog, callee)


class SilentNode:
    """A UDP socket that takes control requests and never answers (a dead relay node)."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind((INTERNAL_IP, 0))
        self.sock.setblocking(False)
        self.node = f"udp:{INTERNAL_IP}:{self.sock.getsockname()[1]}"
        self.received = 0

    def count(self) -> int:
        """Requests received so far (loopback delivers a datagram within its send())."""
        while True:
            try:
                self.sock.recv(65535)
            except BlockingIOError:
                return self.received
            self.received += 1

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def silent():
    made = []

    def make() -> SilentNode:
        node = SilentNode()
        made.append(node)
        return node

    yield make
    for node in made:
        node.close()


def test_failover_to_the_next_node_disables_the_silent_one_for_every_worker(
        stack, phones, silent):
    """linear [dead, live]: the first offer tries the dead node `retries` times, disables
    it and fails over; answers follow the call to the live node, and no worker of
    Kamailio sends the dead node anything more within the disable period."""
    relay, dead = stack.relay(), silent()
    kam = stack.kamailio({0: [dead.node, relay.node]}, timeout=0.3, retries=2,
                         disable_period=60.0)
    caller, callee = phones("alice", kam), phones("bob", kam)
    client = stack.client(relay)
    for n in range(6):  # four workers: later calls land on other workers
        call_id = f"kemi-failover-{n}@test"
        dialog, _callee_dialog, invite, ok = setup_call(caller, callee, call_id)
        relayed(invite, relay)
        relayed(ok, relay)
        media_flows(caller, ok, callee, invite, AUDIO, count=3, first_seq=10 * n)
        assert dead.count() == 2, n  # the first offer's two tries, nothing after
        hang_up(caller, dialog, callee)
    assert client.list()["total"] == 0


def test_round_robin_keeps_each_call_on_its_node(stack, phones):
    """round-robin over two relays: whichever worker handles the 183, 200, re-INVITE or
    BYE, it goes to the relay that got the call's offer (the shared call table)."""
    first, second = stack.relay(), stack.relay()
    kam = stack.kamailio({0: [first.node, second.node]}, algorithm="round-robin")
    caller, callee = phones("alice", kam), phones("bob", kam)
    clients = {first: stack.client(first), second: stack.client(second)}
    held = {first: 0, second: 0}
    for n in range(8):
        call_id = f"kemi-rr-{n}@test"
        dialog, callee_dialog, invite, ok = setup_call(caller, callee, call_id)
        port = read_sdp(invite.body)[AUDIO][1]
        holder = first if port in relay_range(first) else second
        held[holder] += 1
        relayed(invite, holder)
        relayed(ok, holder)
        assert clients[holder].query(call_id)["session"]["call_id"] == call_id
        callee.in_dialog(callee_dialog, "INVITE", callee.sdp())
        reinvite = caller.request("INVITE", call_id)
        assert read_sdp(reinvite.body) == read_sdp(ok.body)
        caller.reply(reinvite, "200 OK", caller.sdp())
        ok2 = callee.response(callee_dialog, "INVITE", lambda s: s == 200)
        assert read_sdp(ok2.body) == read_sdp(invite.body)
        callee.ack(callee_dialog)
        caller.request("ACK", call_id)
        media_flows(caller, reinvite, callee, ok2, VIDEO, count=3, first_seq=10 * n)
        hang_up(caller, dialog, callee)
        for client in clients.values():
            assert client.list()["total"] == 0
    # each worker rotates on its own, starting at the first node; eight new calls over
    # four workers: some worker picks twice, so both relays hold calls
    assert held[first] + held[second] == 8
    assert held[first] >= 1 and held[second] >= 1, held


def test_no_relay_no_call(stack, phones, silent):
    """Every node silent: the offer fails and the config refuses the call with a 503."""
    dead = silent()
    stack.expected_errors.append("no relay node available")
    kam = stack.kamailio({0: [dead.node]}, timeout=0.2, retries=2)
    caller, callee = phones("alice", kam), phones("bob", kam)
    dialog = caller.invite(callee, "kemi-503@test", caller.sdp())
    refused = caller.response(dialog, "INVITE", lambda s: s >= 300)
    assert refused.first_line == "SIP/2.0 503 Media Relay Unavailable"
    caller.ack_failure(dialog.invite, refused)
    assert dead.count() == 2


def test_kamailio_refuses_to_start_without_a_control_key(stack, tmp_path):
    """No key for the workers to sign with: Kamailio stops at start, naming the problem,
    rather than sending requests every relay would drop."""
    relay = stack.relay()
    empty = tmp_path / "no-keys"
    empty.mkdir()
    kam = KemiKamailio(tmp_path / "kamailio-nokey", toml_config({0: [relay.node]}),
                       keys=empty)
    with pytest.raises(AssertionError, match="kamailio exited with 255"):
        kam.start()
    assert kam.stop() == 255
    assert f"no lrk control key in {empty}" in kam.output()
