"""manage(): operation detection per message kind, flags, ip_address, body rewrite."""

from __future__ import annotations

import pytest

try:
    from client_fakes import FakeClock, FakeNet
except ImportError:  # tests/ collected as a package
    from tests.unit.client_fakes import FakeClock, FakeNet

from lrk.client import LrkClient
from lrk.client.errors import InvalidArgument, SipParseError
from lrk.client.manage import parse_flags, plan_manage
from lrk.client.sip import parse_sip

A = "udp:10.0.0.1:22222"
B = "udp:10.0.0.2:22222"

OFFER_SDP = ("v=0\r\no=alice 1 1 IN IP4 198.51.100.10\r\ns=-\r\nc=IN IP4 198.51.100.10\r\n"
             "t=0 0\r\nm=audio 4000 RTP/AVP 0\r\n")
ANSWER_SDP = ("v=0\r\no=bob 1 1 IN IP4 198.51.100.20\r\ns=-\r\nc=IN IP4 198.51.100.20\r\n"
              "t=0 0\r\nm=audio 5000 RTP/AVP 0\r\n")


def request(method, body="", to_tag=None, branch="z9hG4bKinv", call_id="call-1",
            from_tag="caller", cseq=None):
    to = "<sip:bob@example.com>" + (f";tag={to_tag}" if to_tag else "")
    return (
        f"{method} sip:bob@example.com SIP/2.0\r\n"
        f"Via: SIP/2.0/UDP 192.0.2.1;branch={branch}\r\n"
        f"From: <sip:alice@example.com>;tag={from_tag}\r\n"
        f"To: {to}\r\n"
        f"Call-ID: {call_id}\r\n"
        f"CSeq: {cseq or '1 ' + method}\r\n"
        + ("Content-Type: application/sdp\r\n" if body else "")
        + f"Content-Length: {len(body)}\r\n\r\n{body}"
    )


def response(status, body="", method="INVITE", to_tag="callee", branch="z9hG4bKinv",
             call_id="call-1"):
    return (
        f"SIP/2.0 {status} Whatever\r\n"
        f"Via: SIP/2.0/UDP 192.0.2.1;branch={branch}\r\n"
        "From: <sip:alice@example.com>;tag=caller\r\n"
        f"To: <sip:bob@example.com>;tag={to_tag}\r\n"
        f"Call-ID: {call_id}\r\n"
        f"CSeq: 1 {method}\r\n"
        + ("Content-Type: application/sdp\r\n" if body else "")
        + f"Content-Length: {len(body)}\r\n\r\n{body}"
    )


@pytest.mark.parametrize(
    "message, op",
    [
        (request("INVITE", OFFER_SDP), "offer"),
        (request("INVITE"), "nothing"),
        (request("UPDATE", OFFER_SDP, to_tag="callee"), "offer"),
        (response(183, ANSWER_SDP), "answer"),
        (response(200, ANSWER_SDP), "answer"),
        (response(200, ANSWER_SDP, method="UPDATE"), "answer"),
        (response(180), "nothing"),
        (response(100), "nothing"),
        (request("ACK", ANSWER_SDP, to_tag="callee"), "answer"),
        (request("ACK", to_tag="callee"), "nothing"),
        (request("BYE", to_tag="callee"), "delete"),
        (request("CANCEL"), "delete"),
        (response(486), "delete"),
        (response(487), "delete"),
        (response(302), "delete"),
        (response(200, method="BYE"), "nothing"),
        (response(488, method="UPDATE"), "nothing"),
        (request("OPTIONS"), "nothing"),
        (request("INFO", OFFER_SDP), "nothing"),
    ],
)
def test_plan_detects_the_operation(message, op):
    assert plan_manage(message).op == op
    assert plan_manage(message.encode()).op == op


def test_plan_arguments_come_from_the_headers():
    plan = plan_manage(response(183, ANSWER_SDP))
    assert (plan.call_id, plan.from_tag, plan.to_tag, plan.via_branch) == (
        "call-1", "caller", "callee", "z9hG4bKinv")
    plan = plan_manage(request("INVITE", OFFER_SDP))
    assert (plan.from_tag, plan.to_tag) == ("caller", None)


def test_plan_rejects_messages_it_cannot_handle():
    with pytest.raises(SipParseError, match="Call-ID"):
        plan_manage(request("BYE").replace("Call-ID: call-1\r\n", ""))
    with pytest.raises(SipParseError, match="To header has no tag"):
        plan_manage(response(200, ANSWER_SDP).replace(";tag=callee", ""))
    with pytest.raises(SipParseError, match="From tag"):
        plan_manage(request("INVITE", OFFER_SDP).replace(";tag=caller", ""))
    with pytest.raises(SipParseError, match="CSeq"):
        plan_manage(response(486).replace("CSeq: 1 INVITE\r\n", ""))


@pytest.mark.parametrize(
    "flags, offer_if, answer_if",
    [(None, "internal", "internal"), ("", "internal", "internal"),
     ("ie", "external", "internal"), ("EI", "internal", "external")],
)
def test_flags(flags, offer_if, answer_if):
    assert parse_flags(flags) == (offer_if, answer_if)


def test_unknown_flags_are_rejected():
    with pytest.raises(InvalidArgument, match="'xy'"):
        parse_flags("xy")


@pytest.fixture
def clock():
    return FakeClock()


@pytest.fixture
def net(clock):
    return FakeNet(clock)


@pytest.fixture
def client(clock, net):
    return LrkClient([A, B], algorithm="round-robin", clock=clock,
                     transport_factory=net.factory)


def test_offer_rewrites_sdp_and_fixes_content_length(client, net):
    out = client.manage(request("INVITE", OFFER_SDP))
    assert isinstance(out, str)
    (req,) = net.requests_to(A)
    assert (req["cmd"], req["call_id"], req["from_tag"], req["interface"]) == (
        "offer", "call-1", "caller", "internal")
    assert "to_tag" not in req and req["sdp"] == OFFER_SDP
    msg = parse_sip(out)
    assert "c=IN IP4 127.0.0.1\r\n" in msg.body
    assert "m=audio 30002 RTP/AVP 0\r\n" in msg.body
    assert msg.header("content-length") == str(len(msg.body.encode()))
    assert msg.call_id == "call-1" and msg.via_branch == "z9hG4bKinv"


def test_bytes_in_bytes_out_with_sdp_sent_as_bin(client, net):
    out = client.manage(request("INVITE", OFFER_SDP).encode())
    assert isinstance(out, bytes)
    assert net.requests_to(A)[0]["sdp"] == OFFER_SDP.encode()
    assert b"m=audio 30002 RTP/AVP 0\r\n" in out


def test_whole_call_goes_to_one_node(client, net):
    client.manage(request("INVITE", OFFER_SDP))
    client.manage(request("INVITE", OFFER_SDP, call_id="call-2"))  # round-robin: B
    out = client.manage(response(183, ANSWER_SDP))
    client.manage(response(200, ANSWER_SDP))
    client.manage(request("ACK", ANSWER_SDP, to_tag="callee", branch="z9hG4bKack"))
    result = client.manage(request("BYE", to_tag="callee", branch="z9hG4bKbye"))
    assert [r["cmd"] for r in net.requests_to(A)] == [
        "offer", "answer", "answer", "answer", "delete"]
    assert [r["cmd"] for r in net.requests_to(B)] == ["offer"]
    answer = net.requests_to(A)[1]
    assert (answer["from_tag"], answer["to_tag"]) == ("caller", "callee")
    assert "c=IN IP4 127.0.0.1\r\nt=0 0\r\nm=audio 30000 " in out  # leg A's relay port
    assert result["ok"] is True and result["call_id"] == "call-1"
    assert client.table.lookup("call-1") is None


@pytest.mark.parametrize("message", [request("CANCEL"), response(486)])
def test_cancel_and_failure_delete(client, net, message):
    client.manage(request("INVITE", OFFER_SDP))
    result = client.manage(message)
    assert result["ok"] is True
    assert [r["cmd"] for r in net.requests_to(A)] == ["offer", "delete"]


def test_delete_of_an_ended_call_returns_the_error_reply(client, net):
    client.manage(request("INVITE", OFFER_SDP))
    client.manage(request("CANCEL"))
    result = client.manage(response(487))  # the 487 after CANCEL: already deleted
    assert result["ok"] is False
    assert result["error"]["code"] == "not_found"


def test_nothing_sends_nothing(client, net):
    assert client.manage(request("INVITE")) is None
    assert client.manage(response(180)) is None
    assert client.manage(request("OPTIONS")) is None
    assert net.sent == []


@pytest.mark.parametrize(
    "flags, offer_if, answer_if",
    [(None, "internal", "internal"), ("ie", "external", "internal"),
     ("ei", "internal", "external")],
)
def test_flags_choose_the_interface_per_direction(client, net, flags, offer_if, answer_if):
    client.manage(request("INVITE", OFFER_SDP), flags=flags)
    client.manage(response(200, ANSWER_SDP), flags=flags)
    offer, answer = net.requests_to(A)
    assert (offer["interface"], answer["interface"]) == (offer_if, answer_if)


def test_ip_address_overrides_the_connection_address_only(client, net):
    out = client.manage(request("INVITE", OFFER_SDP), ip_address="203.0.113.7")
    body = parse_sip(out).body
    assert "c=IN IP4 203.0.113.7\r\n" in body
    assert "127.0.0.1" not in body
    assert "m=audio 30002 " in body  # the relay's port stays
    assert "o=alice 1 1 IN IP4 198.51.100.10" in body
    out6 = client.manage(response(200, ANSWER_SDP), ip_address="2001:db8::7")
    assert "c=IN IP6 2001:db8::7\r\n" in parse_sip(out6).body
    assert parse_sip(out6).header("content-length") == str(len(parse_sip(out6).body))


def test_bad_ip_address_is_rejected_before_sending(client, net):
    with pytest.raises(InvalidArgument, match="ip_address"):
        client.manage(request("INVITE", OFFER_SDP), ip_address="public")
    assert net.sent == []
