"""The minimal SIP parser and body rewrite with Content-Length (SDP: test_sdp*.py)."""

from __future__ import annotations

import pytest

import lrk.client.sip as sip_module
from lrk.client.errors import SipParseError
from lrk.client.sip import parse_sip

SDP = (
    "v=0\r\n"
    "o=alice 2890844526 2890844526 IN IP4 198.51.100.10\r\n"
    "s=-\r\n"
    "c=IN IP4 198.51.100.10\r\n"
    "t=0 0\r\n"
    "m=audio 49170 RTP/AVP 0 8\r\n"
    "a=rtcp:49171 IN IP4 198.51.100.10\r\n"
)

INVITE = (
    "INVITE sip:bob@example.com SIP/2.0\r\n"
    "Via: SIP/2.0/UDP pc33.example.com;branch=z9hG4bK776asdhds;rport, "
    "SIP/2.0/UDP proxy.example.com;branch=z9hG4bKsecond\r\n"
    "Via: SIP/2.0/UDP third.example.com;branch=z9hG4bKthird\r\n"
    "Max-Forwards: 70\r\n"
    'From: "Alice; <the first>" <sip:alice@example.com;tag=uri-param>;tag=1928301774\r\n'
    "To: Bob <sip:bob@example.com>\r\n"
    "Call-ID: a84b4c76e66710@pc33.example.com\r\n"
    "CSeq: 314159 INVITE\r\n"
    "Contact: <sip:alice@pc33.example.com>\r\n"
    "Content-Type: application/sdp\r\n"
    f"Content-Length: {len(SDP)}\r\n"
    "\r\n" + SDP
)

COMPACT = (
    "INVITE sip:bob@example.com SIP/2.0\r\n"
    "v: SIP/2.0/UDP 192.0.2.4;branch=z9hG4bKcompact\r\n"
    "f: <sip:alice@example.com>;tag=ftag\r\n"
    "t: sip:bob@example.com;tag=ttag\r\n"
    "i: compact-call@192.0.2.4\r\n"
    "CSeq: 2 INVITE\r\n"
    "c: application/sdp\r\n"
    f"l: {len(SDP)}\r\n"
    "\r\n" + SDP
)


def test_parse_request_headers_and_body():
    msg = parse_sip(INVITE)
    assert msg.is_request and msg.method == "INVITE" and msg.uri == "sip:bob@example.com"
    assert msg.status is None
    assert msg.call_id == "a84b4c76e66710@pc33.example.com"
    assert msg.cseq == (314159, "INVITE")
    assert msg.via_branch == "z9hG4bK776asdhds"
    assert msg.header_values("via")[1] == "SIP/2.0/UDP proxy.example.com;branch=z9hG4bKsecond"
    assert len(msg.header_values("v")) == 3
    assert msg.from_tag == "1928301774"
    assert msg.to_tag is None
    assert msg.content_type == "application/sdp"
    assert msg.body == SDP and msg.has_sdp()
    assert msg.header("max-forwards") == "70"
    assert msg.header("X-Missing") is None


def test_parse_compact_headers():
    msg = parse_sip(COMPACT.encode())
    assert msg.is_bytes
    assert msg.call_id == "compact-call@192.0.2.4"
    assert msg.via_branch == "z9hG4bKcompact"
    assert (msg.from_tag, msg.to_tag) == ("ftag", "ttag")
    assert msg.content_type == "application/sdp"
    assert msg.header("Content-Length") == str(len(SDP))
    assert msg.sdp == SDP.encode()


def test_parse_response_and_folded_header():
    text = (
        "SIP/2.0 183 Session Progress\r\n"
        "Via: SIP/2.0/UDP pc33.example.com\r\n"
        " ;branch=z9hG4bKfolded\r\n"
        "From: <sip:alice@example.com>;tag=caller\r\n"
        "To: <sip:bob@example.com>;tag=callee\r\n"
        "Call-ID: x\r\n"
        "CSeq: 1 INVITE\r\n"
        "Content-Length: 0\r\n\r\n"
    )
    msg = parse_sip(text)
    assert not msg.is_request
    assert (msg.status, msg.reason, msg.method) == (183, "Session Progress", None)
    assert msg.via_branch == "z9hG4bKfolded"
    assert (msg.from_tag, msg.to_tag) == ("caller", "callee")
    assert msg.body == "" and not msg.has_sdp()


def test_lf_only_message_and_body_cut_at_content_length():
    text = INVITE.replace("\r\n", "\n").replace(f"Content-Length: {len(SDP)}",
                                                "Content-Length: 4") + "trailing"
    msg = parse_sip(text)
    assert msg.call_id == "a84b4c76e66710@pc33.example.com"
    assert msg.body == "v=0\n"


def test_non_sdp_body_is_not_sdp():
    text = INVITE.replace("application/sdp", "multipart/mixed;boundary=x")
    assert not parse_sip(text).has_sdp()
    no_type = INVITE.replace("Content-Type: application/sdp\r\n", "")
    assert parse_sip(no_type).has_sdp()


@pytest.mark.parametrize(
    "data, where",
    [
        ("", "empty"),
        ("\r\n\r\n", "empty"),
        ("INVITE sip:bob@example.com\r\nCall-ID: x\r\n\r\n", "request line"),
        ("HELLO WORLD\r\n\r\n", "request line"),
        ("SIP/2.0 99 Too Low\r\n\r\n", "status"),
        ("SIP/2.0 abc OK\r\n\r\n", "status line"),
        ("INVITE sip:b SIP/2.0\r\nthis is not a header\r\n\r\n", "header line"),
        ("INVITE sip:b SIP/2.0\r\n continuation\r\n\r\n", "continuation"),
        ("INVITE sip:b SIP/2.0\r\nContent-Length: ten\r\n\r\n", "Content-Length"),
        ("INVITE sip:b SIP/2.0\r\nContent-Length: 10\r\n\r\nshort", "only 5 body bytes"),
        (12345, "bytes or str"),
    ],
)
def test_bad_messages_raise_sip_parse_error(data, where):
    with pytest.raises(SipParseError, match=where):
        parse_sip(data)


def test_garbled_cseq_and_tags_raise_when_used():
    msg = parse_sip("SIP/2.0 200 OK\r\nCSeq: INVITE\r\nFrom: <sip:a;tag=x\r\n\r\n")
    with pytest.raises(SipParseError, match="CSeq"):
        _ = msg.cseq_method
    with pytest.raises(SipParseError, match="From"):
        _ = msg.from_tag


def test_with_body_fixes_content_length_and_keeps_type_and_form():
    new = SDP.replace("49170", "30002")
    out = parse_sip(COMPACT.encode()).with_body(new.encode())
    assert isinstance(out, bytes)
    assert f"\r\nl: {len(new)}\r\n".encode() in out
    assert out.endswith(new.encode())
    again = parse_sip(out)
    assert again.body == new and again.call_id == "compact-call@192.0.2.4"

    out_str = parse_sip(INVITE).with_body("v=0\r\n")
    assert isinstance(out_str, str)
    assert "\r\nContent-Length: 5\r\n" in out_str
    assert out_str.count("Content-Length") == 1
    assert out_str.startswith("INVITE sip:bob@example.com SIP/2.0\r\nVia: ")


def test_with_body_counts_utf8_bytes_and_adds_missing_content_length():
    text = "UPDATE sip:b SIP/2.0\r\nCall-ID: x\r\n\r\n"
    out = parse_sip(text).with_body("s=caf\u00e9\r\n")
    assert out.endswith("Content-Length: 9\r\n\r\ns=caf\u00e9\r\n")
    raw = b"INVITE sip:b SIP/2.0\r\nContent-Length: 0\r\n\r\n"
    out_b = parse_sip(raw).with_body("s=caf\u00e9\r\n".encode())
    assert b"Content-Length: 9\r\n" in out_b


def test_bytes_outside_latin1_range_survive_a_round_trip():
    body = "s=\u00fcber\r\n".encode()
    raw = b"INVITE sip:b SIP/2.0\r\nSubject: \xe2\x98\x83\r\nContent-Length: %d\r\n\r\n" % len(body)
    msg = parse_sip(raw + body)
    assert msg.sdp == body
    assert msg.with_body(body) == raw + body


def test_sip_module_has_no_sdp_code():
    """SDP is lrk.core.sdp's alone: one parser, one set of rules."""
    for name in ("parse_sdp", "sdp_media", "rewrite_sdp_address", "SdpInfo"):
        assert not hasattr(sip_module, name), name


def test_a_display_name_may_hold_angle_brackets():
    """`From: "a<b" <sip:alice@x>;tag=a1` is one quoted display name and a URI: the tag is
    read (before, the raw < > count refused the message and the call got no relay); an
    unquoted stray bracket is still refused."""
    msg = parse_sip("INVITE sip:bob@x SIP/2.0\r\nVia: SIP/2.0/UDP h;branch=z9hG4bK1\r\n"
                    'From: "a<b \\" x" <sip:alice@x>;tag=a1\r\nTo: <sip:bob@x>\r\n'
                    "Call-ID: c1\r\nCSeq: 1 INVITE\r\nContent-Length: 0\r\n\r\n")
    assert msg.from_tag == "a1"
    bad = parse_sip("BYE sip:bob@x SIP/2.0\r\nFrom: a<b <sip:alice@x>;tag=a1\r\n"
                    "To: <sip:bob@x>;tag=b1\r\nCall-ID: c1\r\nCSeq: 2 BYE\r\n\r\n")
    with pytest.raises(SipParseError, match="unbalanced"):
        _ = bad.from_tag
