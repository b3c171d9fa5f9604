"""manage(): operation detection per message kind, flags, ip_address, body rewrite."""

from __future__ import annotations

import msgpack
import pytest

try:
    from client_fakes import FakeClock, FakeNet
except ImportError:  # tests/ collected as a package
    from tests.unit.client_fakes import FakeClock, FakeNet

import lrk.client
from lrk.client import LrkClient
from lrk.client.errors import InvalidArgument, ProtocolError, SipParseError
from lrk.client.manage import parse_flags, parse_sdp, plan_manage, reply_relays, sdp_media
from lrk.client.sip import parse_sip
from lrk.control.msgpack_proto import MsgpackControl
from lrk.core import sdp
from lrk.core.engine import Engine, EngineConfig

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
    # an ACK with SDP answers a late offer (the callee offered in its 2xx): tags swap
    ack = net.requests_to(A)[3]
    assert (ack["cmd"], ack["from_tag"], ack["to_tag"]) == ("answer", "callee", "caller")


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
    assert "o=alice 1 2 IN IP4 198.51.100.10" in body  # o= address kept, version bumped
    out6 = client.manage(response(200, ANSWER_SDP), ip_address="2001:db8::7")
    assert "c=IN IP6 2001:db8::7\r\n" in parse_sip(out6).body
    assert parse_sip(out6).header("content-length") == str(len(parse_sip(out6).body))


def test_bad_ip_address_is_rejected_before_sending(client, net):
    with pytest.raises(InvalidArgument, match="ip_address"):
        client.manage(request("INVITE", OFFER_SDP), ip_address="public")
    assert net.sent == []


# -- every stream through lrk.core.sdp ---------------------------------------------------

AV_SDP = ("v=0\r\no=alice 7 7 IN IP4 198.51.100.10\r\ns=-\r\nc=IN IP4 198.51.100.10\r\n"
          "t=0 0\r\nm=audio 4000 RTP/AVP 0\r\na=rtcp-mux\r\nm=video 4002 RTP/AVP 96\r\n"
          "a=rtpmap:96 VP8/90000\r\n")


def test_plan_carries_the_parsed_sdp():
    plan = plan_manage(request("INVITE", AV_SDP))
    assert plan.description == sdp.parse(AV_SDP)
    assert [s.media for s in plan.description.streams] == ["audio", "video"]
    assert plan_manage(request("BYE", to_tag="callee")).description is None


def test_sdp_lrk_cannot_relay_fails_before_sending(client, net):
    bad = OFFER_SDP.replace("m=audio 4000", "m=audio 99999")
    with pytest.raises(SipParseError, match=r"SDP line 6 'm=audio 99999 RTP/AVP 0'"):
        client.manage(request("INVITE", bad))
    assert net.sent == []


def test_v1_reply_moves_only_the_first_stream(client, net):
    """Today's relay allocates one stream: the video keeps the session-level c=."""
    out = client.manage(request("INVITE", AV_SDP))
    assert parse_sip(out).body == (
        "v=0\r\no=alice 7 8 IN IP4 198.51.100.10\r\ns=-\r\nc=IN IP4 198.51.100.10\r\n"
        "t=0 0\r\nm=audio 30002 RTP/AVP 0\r\nc=IN IP4 127.0.0.1\r\na=rtcp-mux\r\n"
        "m=video 4002 RTP/AVP 96\r\na=rtpmap:96 VP8/90000\r\n")


def with_streams(net, address, streams):
    """A relay that answers like RelayLogic plus a `streams` list (the multi-stream reply)."""
    def handler(req):
        reply = net.relay(address).handle(req)
        reply["streams"] = streams
        return reply
    net.handlers[address] = handler


def test_streams_reply_moves_every_stream(client, net):
    with_streams(net, A, [
        {"ip": "203.0.113.1", "port": 31000, "rtcp_port": 31000, "rtcp_mux": True},
        {"ip": "203.0.113.1", "port": 31002, "rtcp_port": 31003, "rtcp_mux": False},
    ])
    out = client.manage(request("INVITE", AV_SDP).encode())
    assert isinstance(out, bytes)
    assert parse_sip(out).body == (
        "v=0\r\no=alice 7 8 IN IP4 198.51.100.10\r\ns=-\r\nc=IN IP4 203.0.113.1\r\n"
        "t=0 0\r\nm=audio 31000 RTP/AVP 0\r\na=rtcp-mux\r\n"
        "m=video 31002 RTP/AVP 96\r\na=rtpmap:96 VP8/90000\r\n")


def test_streams_reply_with_untouched_stream_and_ip_address(client, net):
    body = AV_SDP.replace("m=video 4002 RTP/AVP 96", "m=video 0 RTP/AVP 96") + (
        "m=message 2855 TCP/MSRP *\r\na=path:msrp://198.51.100.10:2855/s;tcp\r\n")
    with_streams(net, A, [{"ip": "127.0.0.1", "port": 31000, "rtcp_port": 31001,
                           "rtcp_mux": False}, None, None])
    out = client.manage(request("INVITE", body), ip_address="2001:db8::7")
    # the MSRP stream still uses the session c=, so the audio gets its own
    assert parse_sip(out).body == (
        "v=0\r\no=alice 7 8 IN IP4 198.51.100.10\r\ns=-\r\nc=IN IP4 198.51.100.10\r\n"
        "t=0 0\r\nm=audio 31000 RTP/AVP 0\r\nc=IN IP6 2001:db8::7\r\n"
        "m=video 0 RTP/AVP 96\r\na=rtpmap:96 VP8/90000\r\n"
        "m=message 2855 TCP/MSRP *\r\na=path:msrp://198.51.100.10:2855/s;tcp\r\n")


@pytest.mark.parametrize("streams, match", [
    ([{"ip": "127.0.0.1", "port": 31000}], "one entry per m= line"),
    ("all", "one entry per m= line"),
    ([{"ip": "127.0.0.1", "port": 31000}, {"ip": "relay", "port": 1}], "streams\\[1\\]"),
    ([{"ip": "127.0.0.1", "port": 0}, None], "streams\\[0\\]"),
    ([{"ip": "127.0.0.1", "port": 31000, "rtcp_mux": "yes"}, None], "rtcp_mux"),
    (["127.0.0.1:31000", None], "not a map"),
])
def test_unusable_streams_reply_is_a_protocol_error(client, net, streams, match):
    with_streams(net, A, streams)
    with pytest.raises(ProtocolError, match=match):
        client.manage(request("INVITE", AV_SDP))


def test_streams_entry_for_a_disabled_stream_is_a_protocol_error():
    desc = sdp.parse(AV_SDP.replace("m=video 4002", "m=video 0"))
    entry = {"ip": "127.0.0.1", "port": 31000}
    with pytest.raises(ProtocolError, match="disabled or not relayable"):
        reply_relays(desc, {"streams": [entry, entry]})
    assert reply_relays(desc, {"streams": [entry, None]}) == [
        sdp.StreamRelay("127.0.0.1", 31000), None]
    assert reply_relays(desc, {"sdp": "v=0"}) is None


def real_relay(net):
    """Both nodes answer with lrk's own control logic and engine (one relay behind two
    addresses): the replies are the relay's, not a fake's."""
    ctl = MsgpackControl(Engine(EngineConfig(internal_ip="10.0.0.1", external_ip="10.0.0.1",
                                             port_start=30000, port_end=30099)))

    def handler(req):
        out = ctl.handle(msgpack.packb(req, use_bin_type=True), ("127.0.0.1", 5000), 100.0)
        return msgpack.unpackb(out.reply, raw=False)
    net.handlers[A] = net.handlers[B] = handler
    return ctl


def answer_sdp(*media):
    return "".join(line + "\r\n" for line in (
        "v=0", "o=bob 1 1 IN IP4 198.51.100.20", "s=-", "c=IN IP4 198.51.100.20", "t=0 0",
        *media))


def test_answer_enabling_a_stream_its_offer_disabled_gets_it_rejected(client, net):
    """The client's own rewrite agrees with the relay's `sdp`: the stream the relay has no
    ports for gets port 0, and the session c= moves to the relay."""
    ctl = real_relay(net)
    client.manage(request("INVITE", AV_SDP.replace("m=video 4002", "m=video 0")))
    answer = answer_sdp("m=audio 5000 RTP/AVP 0", "m=video 5002 RTP/AVP 96",
                        "m=message 2855 TCP/MSRP *", "m=text 5004 RTP/AVP 98")
    out = parse_sip(client.manage(response(200, answer))).body
    port = ctl.engine.get("call-1").legs["A"].media[0].relay_port
    assert out == answer_sdp(f"m=audio {port} RTP/AVP 0", "c=IN IP4 10.0.0.1", "a=rtcp-mux",
                             "m=video 0 RTP/AVP 96", "m=message 2855 TCP/MSRP *",
                             "m=text 0 RTP/AVP 98").replace(" 1 1 IN", " 1 2 IN")


def test_streams_reply_without_a_relay_for_an_enabled_stream_rejects_it(client, net):
    with_streams(net, A, [{"ip": "203.0.113.1", "port": 31000, "rtcp_port": 31000,
                           "rtcp_mux": True}, None])
    out = client.manage(request("INVITE", AV_SDP))
    assert parse_sip(out).body == (
        "v=0\r\no=alice 7 8 IN IP4 198.51.100.10\r\ns=-\r\nc=IN IP4 203.0.113.1\r\n"
        "t=0 0\r\nm=audio 31000 RTP/AVP 0\r\na=rtcp-mux\r\n"
        "m=video 0 RTP/AVP 96\r\na=rtpmap:96 VP8/90000\r\n")


def test_answer_with_fewer_m_lines_than_its_offer_is_rewritten_to_the_relay(client, net):
    """The relay rejects the m= lines the answer left out; the client rewrites the answer
    it has (its one line) to the relay: the callee's address never reaches the caller."""
    ctl = real_relay(net)
    client.manage(request("INVITE", AV_SDP))
    out = parse_sip(client.manage(response(200, ANSWER_SDP))).body
    assert "198.51.100.20" not in out.split("o=", 1)[1].split("\r\n", 1)[1]
    assert out.count("m=") == 1
    assert ctl.engine.get("call-1").state == "answered"


def test_reply_without_relay_address_uses_its_sdp(client, net):
    def handler(req):
        reply = net.relay(A).handle(req)
        del reply["relay"]
        return reply
    net.handlers[A] = net.handlers[B] = handler  # round-robin: calls alternate A, B
    out = client.manage(request("INVITE", OFFER_SDP))
    assert "m=audio 30002 RTP/AVP 0\r\n" in parse_sip(out).body  # RelayLogic's own rewrite
    with pytest.raises(ProtocolError, match="ip_address"):
        client.manage(request("INVITE", OFFER_SDP, call_id="c2"), ip_address="192.0.2.1")
    net.handlers[A] = lambda req: {"v": 1, "cookie": req["cookie"], "ok": True}
    net.handlers[B] = net.handlers[A]
    with pytest.raises(ProtocolError, match="neither"):
        client.manage(request("INVITE", OFFER_SDP, call_id="c3"))


def test_v1_sdp_helpers_use_the_shared_module():
    body = ("v=0\r\no=- 1 1 IN IP4 198.51.100.10\r\ns=-\r\nc=IN IP4 198.51.100.10\r\n"
            "t=0 0\r\nm=audio 49170 RTP/AVP 0 8\r\na=rtcp:49171 IN IP4 198.51.100.10\r\n")
    info = parse_sdp(body)
    assert (info.ip, info.ip_version, info.audio_port) == ("198.51.100.10", 4, 49170)
    assert sdp_media(body.encode()) == ("198.51.100.10", 49170)
    assert lrk.client.parse_sdp is parse_sdp and lrk.client.sdp_media is sdp_media
    v6 = ("v=0\r\nm=video 5000 RTP/AVP 31\r\nc=IN IP6 2001:db8::2\r\n"
          "m=audio 0 RTP/AVP 0\r\nc=IN IP6 2001:db8::1\r\n"
          "m=audio 4000/2 RTP/AVP 0\r\nc=IN IP6 2001:db8::3\r\n")
    assert parse_sdp(v6) == lrk.client.SdpInfo("2001:db8::3", 6, 4000)
    assert parse_sdp("v=0\r\nm=video 5000 RTP/AVP 31\r\nc=IN IP4 192.0.2.1\r\n") == (
        "192.0.2.1", 4, None)
    with pytest.raises(SipParseError, match="m=audio"):
        sdp_media("v=0\r\nm=video 5000 RTP/AVP 31\r\nc=IN IP4 192.0.2.1\r\n")
    with pytest.raises(SipParseError, match="no c="):
        sdp_media("v=0\r\nm=audio 4000 RTP/AVP 0\r\n")
    with pytest.raises(SipParseError, match="no m= line"):
        parse_sdp("v=0\r\nc=IN IP4 192.0.2.1\r\n")
    with pytest.raises(SipParseError, match="connection line"):
        parse_sdp("c=IN IP4\r\nm=audio 4000 RTP/AVP 0\r\n")
    with pytest.raises(SipParseError, match="media port 'none'"):
        parse_sdp("m=audio none RTP/AVP 0\r\n")
    with pytest.raises(SipParseError, match="bytes or str"):
        parse_sdp(42)


def test_a_183_is_a_provisional_answer_and_a_200_a_final_one(client, net):
    """Forking: each 183 with SDP goes as `provisional`, so the relay keeps each To-tag's
    early dialog; the 200 OK is final and picks one."""
    client.manage(request("INVITE", OFFER_SDP))
    client.manage(response(183, ANSWER_SDP, to_tag="fork1"))
    client.manage(response(183, ANSWER_SDP, to_tag="fork2"))
    client.manage(response(200, ANSWER_SDP, to_tag="fork2"))
    answers = [r for r in net.requests_to(A) if r["cmd"] == "answer"]
    assert [(r["to_tag"], r.get("provisional", False)) for r in answers] == [
        ("fork1", True), ("fork2", True), ("fork2", False)]
    assert "provisional" not in answers[2], "a final answer does not carry the flag"
