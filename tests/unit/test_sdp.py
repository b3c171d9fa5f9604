"""Unit tests of lrk.core.sdp: parse and rewrite of c=, m= and a=rtcp."""

from __future__ import annotations

import pytest

from lrk.core import sdp
from lrk.errors import BadRequest, SdpError

SESSION_C = (
    "v=0\r\n"
    "o=- 1 1 IN IP4 198.51.100.10\r\n"
    "s=-\r\n"
    "c=IN IP4 198.51.100.10\r\n"
    "t=0 0\r\n"
    "m=audio 4000 RTP/AVP 0 8 101\r\n"
    "a=rtpmap:0 PCMU/8000\r\n"
    "a=rtpmap:101 telephone-event/8000\r\n"
    "a=sendrecv\r\n"
)

MEDIA_C = (
    "v=0\r\n"
    "o=- 1 1 IN IP4 198.51.100.10\r\n"
    "s=-\r\n"
    "c=IN IP4 198.51.100.10\r\n"
    "t=0 0\r\n"
    "m=audio 4000 RTP/AVP 0\r\n"
    "c=IN IP4 203.0.113.7\r\n"
    "a=rtcp:4011\r\n"
)


def lines(text):
    return text.split("\r\n")


# -- parse -------------------------------------------------------------------------


def test_parse_session_level_connection():
    assert sdp.parse(SESSION_C) == sdp.SdpMedia("198.51.100.10", 4000, None)


def test_parse_media_level_connection_wins():
    media = sdp.parse(MEDIA_C)
    assert media.ip == "203.0.113.7"
    assert media.port == 4000
    assert media.rtcp_port == 4011


def test_parse_a_rtcp_with_address():
    body = SESSION_C + "a=rtcp:4001 IN IP4 198.51.100.10\r\n"
    assert sdp.parse(body).rtcp_port == 4001


def test_parse_ignores_a_rtcp_of_another_stream():
    body = SESSION_C + "m=video 5000 RTP/AVP 31\r\na=rtcp:5009\r\n"
    media = sdp.parse(body)
    assert media.port == 4000
    assert media.rtcp_port is None


def test_parse_ipv6():
    body = (
        "v=0\r\no=- 1 1 IN IP6 2001:db8::1\r\ns=-\r\nc=IN IP6 2001:db8::1\r\nt=0 0\r\n"
        "m=audio 4000 RTP/AVP 0\r\n"
    )
    assert sdp.parse(body) == ("2001:db8::1", 4000, None)


def test_parse_multicast_ttl_suffix():
    body = SESSION_C.replace("c=IN IP4 198.51.100.10", "c=IN IP4 233.252.0.1/127")
    assert sdp.parse(body).ip == "233.252.0.1"


def test_parse_skips_m_line_with_port_zero():
    body = (
        "v=0\r\ns=-\r\nc=IN IP4 198.51.100.10\r\nt=0 0\r\n"
        "m=video 0 RTP/AVP 31\r\n"
        "c=IN IP4 192.0.2.99\r\n"
        "m=audio 4000 RTP/AVP 0\r\n"
        "c=IN IP4 203.0.113.7\r\n"
    )
    assert sdp.parse(body) == ("203.0.113.7", 4000, None)


def test_parse_port_with_count():
    body = SESSION_C.replace("m=audio 4000 ", "m=audio 4000/2 ")
    assert sdp.parse(body).port == 4000


def test_parse_bytes_and_lf_only():
    assert sdp.parse(SESSION_C.encode()).port == 4000
    assert sdp.parse(SESSION_C.replace("\r\n", "\n")).ip == "198.51.100.10"


@pytest.mark.parametrize(
    "body,fragment",
    [
        ("v=0\r\ns=-\r\nt=0 0\r\nm=audio 4000 RTP/AVP 0\r\n", "c="),
        ("v=0\r\ns=-\r\nc=IN IP4 198.51.100.10\r\nt=0 0\r\n", "m="),
        ("v=0\r\nc=IN IP4 198.51.100.10\r\nm=audio 0 RTP/AVP 0\r\n", "m="),
        ("v=0\r\nc=IN IP4 198.51.100.10\r\nm=audio x RTP/AVP 0\r\n", "m="),
        ("v=0\r\nc=IN IP4 host.example\r\nm=audio 4000 RTP/AVP 0\r\n", "not an IP"),
        ("v=0\r\nc=IN ATM 1\r\nm=audio 4000 RTP/AVP 0\r\n", "connection line"),
        ("v=0\r\nc=IN IP4\r\nm=audio 4000 RTP/AVP 0\r\n", "connection line"),
        ("v=0\r\nc=IN IP4 198.51.100.10\r\nm=audio 70000 RTP/AVP 0\r\n", "out of range"),
        ("", "m="),
    ],
)
def test_parse_errors(body, fragment):
    with pytest.raises(SdpError) as exc:
        sdp.parse(body)
    assert fragment in str(exc.value)
    assert isinstance(exc.value, BadRequest)
    assert exc.value.code == "bad_request"


@pytest.mark.parametrize("line", ["a=rtcp:", "a=rtcp: ", "a=rtcp:abc", "a=rtcp:0", "a=rtcp:99999"])
def test_parse_unusable_a_rtcp_is_ignored_or_rejected(line):
    body = SESSION_C + line + "\r\n"
    try:
        media = sdp.parse(body)
    except SdpError:
        return
    assert media.rtcp_port is None


def test_parse_non_utf8_bytes():
    with pytest.raises(SdpError, match="UTF-8"):
        sdp.parse(SESSION_C.encode() + b"a=tool:\xff\xfe\r\n")


def test_parse_oversized():
    pad = "a=x-pad:" + "x" * 100 + "\r\n"
    body = SESSION_C + pad * (sdp.MAX_SDP_BYTES // len(pad) + 1)
    with pytest.raises(SdpError, match="exceeds"):
        sdp.parse(body)
    with pytest.raises(SdpError, match="exceeds"):
        sdp.parse(body.encode())


def test_parse_at_size_limit_is_accepted():
    body = SESSION_C + "a=x-pad:"
    body += "x" * (sdp.MAX_SDP_BYTES - len(body))
    assert len(body) == sdp.MAX_SDP_BYTES
    assert sdp.parse(body).port == 4000


# -- rewrite -----------------------------------------------------------------------


def test_rewrite_session_level_keeps_everything_else():
    out = sdp.rewrite(SESSION_C, "127.0.0.1", 30002, 30003)
    assert isinstance(out, str)
    expected = SESSION_C.replace("c=IN IP4 198.51.100.10", "c=IN IP4 127.0.0.1").replace(
        "m=audio 4000 ", "m=audio 30002 "
    )
    assert out == expected
    # o= keeps the original address
    assert "o=- 1 1 IN IP4 198.51.100.10\r\n" in out


def test_rewrite_bytes_in_bytes_out():
    out = sdp.rewrite(SESSION_C.encode(), "127.0.0.1", 30002, 30003)
    assert isinstance(out, bytes)
    assert out == sdp.rewrite(SESSION_C, "127.0.0.1", 30002, 30003).encode()


def test_rewrite_media_level_c_leaves_session_c():
    out = sdp.rewrite(MEDIA_C, "10.0.0.1", 30010, 30011)
    assert lines(out) == [
        "v=0",
        "o=- 1 1 IN IP4 198.51.100.10",
        "s=-",
        "c=IN IP4 198.51.100.10",
        "t=0 0",
        "m=audio 30010 RTP/AVP 0",
        "c=IN IP4 10.0.0.1",
        "a=rtcp:30011 IN IP4 10.0.0.1",
        "",
    ]


def test_rewrite_ipv6_relay_address():
    out = sdp.rewrite(SESSION_C, "2001:db8::5", 30000, 30001)
    assert "c=IN IP6 2001:db8::5\r\n" in out
    assert sdp.parse(out) == ("2001:db8::5", 30000, None)


def test_rewrite_port_with_count_keeps_count():
    body = SESSION_C.replace("m=audio 4000 ", "m=audio 4000/2 ")
    out = sdp.rewrite(body, "127.0.0.1", 30000, 30001)
    assert "m=audio 30000/2 RTP/AVP 0 8 101\r\n" in out


def test_rewrite_only_first_nonzero_stream():
    body = (
        "v=0\r\ns=-\r\nc=IN IP4 198.51.100.10\r\nt=0 0\r\n"
        "m=video 0 RTP/AVP 31\r\n"
        "m=audio 4000 RTP/AVP 0\r\n"
        "c=IN IP4 203.0.113.7\r\n"
        "m=audio 4002 RTP/AVP 0\r\n"
        "c=IN IP4 203.0.113.8\r\n"
        "a=rtcp:4005\r\n"
    )
    out = lines(sdp.rewrite(body, "127.0.0.1", 30000, 30001))
    assert out == [
        "v=0",
        "s=-",
        "c=IN IP4 198.51.100.10",
        "t=0 0",
        "m=video 0 RTP/AVP 31",
        "m=audio 30000 RTP/AVP 0",
        "c=IN IP4 127.0.0.1",
        "m=audio 4002 RTP/AVP 0",
        "c=IN IP4 203.0.113.8",
        "a=rtcp:4005",
        "",
    ]


def test_rewrite_roundtrip_parses_to_relay():
    out = sdp.rewrite(MEDIA_C, "192.0.2.1", 31000, 31001)
    assert sdp.parse(out) == ("192.0.2.1", 31000, 31001)


def test_rewrite_errors_like_parse():
    with pytest.raises(SdpError):
        sdp.rewrite("v=0\r\n", "127.0.0.1", 30000, 30001)
    with pytest.raises(SdpError):
        sdp.rewrite(b"\xff\xfe", "127.0.0.1", 30000, 30001)


def test_rewrite_m_line_with_extra_spaces_does_not_corrupt():
    body = SESSION_C.replace("m=audio 4000 ", "m=audio  4000 ")
    assert sdp.parse(body).port == 4000  # parse accepts it...
    out = sdp.rewrite(body, "127.0.0.1", 30000, 30001)
    # ...so rewrite must put the relay port in place of 4000, not beside it
    assert sdp.parse(out).port == 30000
    assert "4000" not in out
