"""Unit tests of lrk.core.sdp: parse rules, errors, rewrite rules, v1 wrappers, properties.

Real user agents' bodies with their exact rewritten forms are in test_sdp_golden.py.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lrk.core import sdp
from lrk.core.sdp import StreamRelay
from lrk.errors import BadRequest, SdpError

R = StreamRelay("203.0.113.1", 30000)


def body(*lines: str, eol: str = "\r\n") -> str:
    return "".join(line + eol for line in lines)


HEAD = ("v=0", "o=- 1 1 IN IP4 198.51.100.10", "s=-", "c=IN IP4 198.51.100.10", "t=0 0")
AUDIO = body(*HEAD, "m=audio 4000 RTP/AVP 0 8 101", "a=rtpmap:101 telephone-event/8000")


# -- parse ------------------------------------------------------------------------------


def test_parse_session_values():
    desc = sdp.parse(AUDIO)
    assert (desc.version, desc.address, desc.family, desc.direction, desc.eol) == (
        1, "198.51.100.10", "IP4", "sendrecv", "\r\n")
    (stream,) = desc.streams
    assert (stream.index, stream.line, stream.media, stream.port, stream.port_count,
            stream.proto, stream.formats) == (0, 6, "audio", 4000, 1, "RTP/AVP",
                                              ("0", "8", "101"))
    assert (stream.address, stream.family, stream.media_connection) == (
        "198.51.100.10", "IP4", False)
    assert not (stream.hold or stream.disabled or stream.ice or stream.rtcp_mux)
    assert stream.relayable and stream.needs_relay
    assert desc.first_relayable() is stream


def test_parse_media_level_values_win():
    desc = sdp.parse(body(*HEAD, "a=sendonly", "m=audio 4000/2 RTP/AVP 0",
                          "c=IN IP6 2001:db8::7", "a=rtcp:4011 IN IP6 2001:db8::8",
                          "a=rtcp-mux", "a=inactive", "a=candidate:1 1 UDP 1 1.2.3.4 1 typ host",
                          "m=video 4002 RTP/AVP 96", "a=rtcp:4003", eol="\n"))
    audio, video = desc.streams
    assert (audio.address, audio.family, audio.media_connection) == ("2001:db8::7", "IP6", True)
    assert (audio.port_count, audio.rtcp_port, audio.rtcp_address) == (2, 4011, "2001:db8::8")
    assert (audio.rtcp_mux, audio.direction, audio.hold, audio.ice) == (True, "inactive", True,
                                                                        True)
    assert (video.address, video.direction, video.hold, video.rtcp_port) == (
        "198.51.100.10", "sendonly", True, 4003)
    assert desc.direction == "sendonly" and desc.eol == "\n"


@pytest.mark.parametrize("proto, relayable", [
    ("RTP/AVP", True), ("RTP/AVPF", True), ("RTP/SAVP", True), ("RTP/SAVPF", True),
    ("UDP/TLS/RTP/SAVP", True), ("UDP/TLS/RTP/SAVPF", True), ("udp", True), ("udptl", True),
    ("UDPTL", True), ("TCP", False), ("TCP/MSRP", False), ("TCP/TLS/RTP/SAVP", False),
    ("UDP/DTLS/SCTP", False), ("DTLS/SCTP", False), ("TCP/BFCP", False),
])
def test_relayable_protos(proto, relayable):
    (stream,) = sdp.parse(body(*HEAD, f"m=application 5000 {proto} x")).streams
    assert stream.relayable is relayable and stream.needs_relay is relayable


def test_streams_lrk_does_not_relay_are_read_leniently():
    """A hostname c= (MSRP) or odd a=rtcp in a stream lrk passes through is no error."""
    desc = sdp.parse(body("v=0", "m=audio 4000 RTP/AVP 0", "c=IN IP4 192.0.2.1",
                          "m=message 2855 TCP/MSRP *", "c=IN IP4 msrp.example.com",
                          "a=rtcp:x", "m=audio 0 RTP/AVP 0", "c=IN IP4 relay.example",
                          "m=video 0 RTP/AVP 31"))
    _, msrp, off, bare = desc.streams
    assert (msrp.address, msrp.relayable, msrp.rtcp_port) == ("msrp.example.com", False, None)
    assert off.disabled and not off.needs_relay and off.address == "relay.example"
    assert bare.address is None and bare.family is None


def test_old_style_hold():
    desc = sdp.parse(body(*HEAD[:3], "c=IN IP4 0.0.0.0", "t=0 0", "m=audio 4000 RTP/AVP 0",
                          "m=audio 4002 RTP/AVP 0", "c=IN IP6 ::"))
    assert [(s.null_address, s.hold) for s in desc.streams] == [(True, True), (True, True)]


def test_no_o_line_and_trailing_whitespace():
    desc = sdp.parse("m=audio  4000\tRTP/AVP 0 \nc=IN IP4 192.0.2.1 \na=sendonly \n")
    (stream,) = desc.streams
    assert (desc.version, stream.port, stream.formats, stream.direction) == (
        None, 4000, ("0",), "sendonly")


ERRORS = [
    # (body, line number named, fragment of the reason)
    (body(*HEAD, "m=audio 4000"), 6, "MEDIA PORT PROTO"),
    (body(*HEAD, "m=audio x RTP/AVP 0"), 6, "media port 'x'"),
    (body(*HEAD, "m=audio 70000 RTP/AVP 0"), 6, "0-65535"),
    (body(*HEAD, "m=audio -1 RTP/AVP 0"), 6, "0-65535"),
    (body(*HEAD, "m=audio 4000/0 RTP/AVP 0"), 6, "port count"),
    (body(*HEAD, "m=audio 4000/x RTP/AVP 0"), 6, "port count"),
    (body(*HEAD, "m=audio 40\u00b2 RTP/AVP 0"), 6, "media port"),
    (body(*HEAD, "m=video 0 RTP/AVP 31", "m=audio"), 7, "MEDIA PORT PROTO"),
    (body("v=0", "o=- 1 1 IN IP4", "s=-", "c=IN IP4 192.0.2.1", "m=audio 4000 RTP/AVP 0"),
     2, "6 fields"),
    (body("v=0", "o=- 1 v2 IN IP4 192.0.2.1", "c=IN IP4 192.0.2.1", "m=audio 4000 RTP/AVP 0"),
     2, "version 'v2'"),
    (body("v=0", "c=IN IP4", "m=audio 4000 RTP/AVP 0"), 2, "connection line"),
    (body("v=0", "c=IN ATM 1", "m=audio 4000 RTP/AVP 0"), 2, "connection line"),
    (body("v=0", "c=IN IP4 1.2.3.4 extra", "m=audio 4000 RTP/AVP 0"), 2, "connection line"),
    (body("v=0", "c=IN IP4 host.example", "m=audio 4000 RTP/AVP 0"), 2, "not an IPv4"),
    (body("v=0", "c=IN IP4 2001:db8::1", "m=audio 4000 RTP/AVP 0"), 2, "not an IPv4"),
    (body("v=0", "c=IN IP6 192.0.2.1", "m=audio 4000 RTP/AVP 0"), 2, "not an IPv6"),
    (body("v=0", "c=IN IP4 192.0.2.1", "m=audio 4000 RTP/AVP 0", "m=video 4002 RTP/AVP 31",
          "c=IN IP4 192.0.2.300"), 5, "not an IPv4"),
    (body("v=0", "s=-", "m=audio 4000 RTP/AVP 0"), 3, "no c= line"),
    (body("v=0", "m=audio 4000 RTP/AVP 0", "c=IN IP4 192.0.2.1", "m=text 4002 RTP/AVP 98"),
     4, "no c= line"),
    (body(*HEAD, "m=audio 4000 RTP/AVP 0", "a=rtcp:"), 7, "port 1-65535"),
    (body(*HEAD, "m=audio 4000 RTP/AVP 0", "a=rtcp:abc"), 7, "port 1-65535"),
    (body(*HEAD, "m=audio 4000 RTP/AVP 0", "a=rtcp:0"), 7, "port 1-65535"),
    (body(*HEAD, "m=audio 4000 RTP/AVP 0", "a=rtcp:99999"), 7, "port 1-65535"),
    (body(*HEAD, "m=audio 4000 RTP/AVP 0", "a=rtcp:4001 IN IP4"), 7, "a=rtcp must be"),
    (body(*HEAD, "m=audio 4000 RTP/AVP 0", "a=rtcp:4001 IN IP4 rtcp.example"), 7,
     "not an IP address"),
]


@pytest.mark.parametrize("text, line, fragment", ERRORS)
def test_errors_name_the_line(text, line, fragment):
    relays = [R] * text.count("m=")
    for data, as_text in ((text, text), (text.encode(), text.encode().decode("latin-1"))):
        shown = repr(as_text.split("\r\n")[line - 1])
        for call in (sdp.parse, lambda b: sdp.rewrite(b, relays)):
            with pytest.raises(SdpError) as exc:
                call(data)
            message = str(exc.value)
            assert message.startswith(f"SDP line {line} {shown}: "), message
            assert fragment in message, message
            assert isinstance(exc.value, BadRequest) and exc.value.code == "bad_request"


@pytest.mark.parametrize("text", ["", "v=0\r\n", "\r\n\r\n", "v=0\r\nc=IN IP4 192.0.2.1\r\n",
                                  "m audio 4000 RTP/AVP 0", "v=0\rm=audio 4000 RTP/AVP 0\r"])
def test_no_media_at_all(text):
    with pytest.raises(SdpError, match="no m= line"):
        sdp.parse(text)


def test_long_line_is_truncated_in_the_message():
    line = "c=IN IP4 " + "9" * 200
    with pytest.raises(SdpError) as exc:
        sdp.parse(body("v=0", line, "m=audio 4000 RTP/AVP 0"))
    message = str(exc.value)
    assert f"SDP line 2 {line[:60]!r}"[:-1] + "...'" in message
    assert len(message) < 200


def test_size_limit():
    pad = "a=x-pad:" + "x" * 100 + "\r\n"
    big = AUDIO + pad * (sdp.MAX_SDP_BYTES // len(pad) + 1)
    for data in (big, big.encode()):
        with pytest.raises(SdpError, match="exceeds"):
            sdp.parse(data)
    exact = AUDIO + "a=x-pad:"
    exact += "x" * (sdp.MAX_SDP_BYTES - len(exact))
    assert sdp.parse(exact).streams[0].port == 4000


def test_non_utf8_bytes_pass_through():
    data = AUDIO.encode() + b"a=tool:\xff\xfe\r\n"
    assert sdp.parse(data).streams[0].port == 4000
    assert sdp.rewrite(data, [R]).endswith(b"a=tool:\xff\xfe\r\n")


def test_body_type_is_checked():
    with pytest.raises(TypeError, match="str or bytes"):
        sdp.parse(4000)
    assert sdp.parse(bytearray(AUDIO.encode())).streams[0].port == 4000
    assert isinstance(sdp.rewrite(memoryview(AUDIO.encode()), [R]), bytes)


# -- rewrite ----------------------------------------------------------------------------


def test_rewrite_session_level_and_bump():
    out = sdp.rewrite(AUDIO, [R])
    assert out == AUDIO.replace("c=IN IP4 198.51.100.10", "c=IN IP4 203.0.113.1").replace(
        "m=audio 4000 ", "m=audio 30000 ").replace("o=- 1 1 ", "o=- 1 2 ")
    assert sdp.rewrite(AUDIO, [R], bump_version=False) == out.replace("o=- 1 2 ", "o=- 1 1 ")
    assert sdp.rewrite(AUDIO.encode(), [R]) == out.encode()


def test_rewrite_with_nothing_to_relay_is_the_identity():
    text = body(*HEAD, "m=audio 0 RTP/AVP 0", "a=ice-ufrag:x", "m=message 9 TCP/MSRP *")
    assert sdp.rewrite(text, [None, None]) == text
    assert sdp.rewrite(text.encode(), (None, None)) == text.encode()


def test_rewrite_to_the_same_address_and_port_does_not_bump():
    same = StreamRelay("198.51.100.10", 4000)
    assert sdp.rewrite(AUDIO, [same]) == AUDIO


def test_rewrite_checks_its_relays():
    two = body(*HEAD, "m=audio 4000 RTP/AVP 0", "m=video 0 RTP/AVP 31",
               "m=message 9 TCP/MSRP *")
    with pytest.raises(ValueError, match="the body has 3, got 1"):
        sdp.rewrite(two, [R])
    with pytest.raises(ValueError, match=r"stream 1 \(SDP line 7\) is disabled"):
        sdp.rewrite(two, [R, R, None])
    with pytest.raises(ValueError, match=r"stream 2 \(SDP line 8\) is not relayable \(TCP/MSRP"):
        sdp.rewrite(two, [R, None, R])
    with pytest.raises(TypeError, match="StreamRelay"):
        sdp.rewrite(two, [("203.0.113.1", 30000), None, None])


@pytest.mark.parametrize("args, match", [
    (("relay", 1), "relay ip"), (("203.0.113.\u0661", 1), "relay ip"), ((None, 1), "relay ip"),
    (("203.0.113.1", 0), "port"), (("203.0.113.1", 65536), "port"),
    (("203.0.113.1", True), "port"), (("203.0.113.1", 1, 0), "rtcp_port"),
    (("203.0.113.1", 1, "2"), "rtcp_port"), (("203.0.113.1", 1, None, 1), "rtcp_mux"),
])
def test_stream_relay_is_validated(args, match):
    with pytest.raises(ValueError, match=match):
        StreamRelay(*args)


def test_stream_relay_rtcp_defaults():
    assert (R.family, R.rtcp) == ("IP4", 30001)
    assert StreamRelay("2001:db8::1", 30000, rtcp_mux=True).rtcp == 30000
    assert StreamRelay("2001:db8::1", 30000, 30005, True).family == "IP6"


def test_stream_relay_of_relay_is_the_checked_relay_unchecked():
    for ip, port, mux in (("198.51.100.1", 30000, False), ("2001:db8::1", 30002, True)):
        fast, checked = StreamRelay.of_relay(ip, port, mux), StreamRelay(ip, port, None, mux)
        assert fast == checked and hash(fast) == hash(checked)
        assert (fast.family, fast.rtcp) == (checked.family, checked.rtcp)
        with pytest.raises(AttributeError):
            fast.port = 1  # type: ignore[misc]


def test_rewrite_adds_a_rtcp_only_when_the_relay_port_is_not_the_default():
    text = body(*HEAD, "m=audio 4000 RTP/AVP 0", "a=ptime:20", "")
    out = sdp.rewrite(text, [StreamRelay("203.0.113.1", 30000, 30007)])
    assert out.endswith("m=audio 30000 RTP/AVP 0\r\na=ptime:20\r\na=rtcp:30007\r\n\r\n")
    assert "a=rtcp" not in sdp.rewrite(text, [StreamRelay("203.0.113.1", 30000, 30001)])
    muxed = sdp.rewrite(text, [StreamRelay("203.0.113.1", 30000, None, True)])
    assert "a=rtcp:" not in muxed
    # the relay accepts rtcp-mux on this side even where the body lacks it (it demuxes)
    assert muxed.endswith("a=ptime:20\r\na=rtcp-mux\r\n\r\n")


def test_rewrite_keeps_a_missing_final_newline():
    ended_by_ice = AUDIO + "a=candidate:1 1 UDP 1 198.51.100.10 4000 typ host"
    out = sdp.rewrite(ended_by_ice, [R])
    assert out.endswith("a=rtpmap:101 telephone-event/8000")
    ended_by_m = body(*HEAD) + "m=audio 4000 RTP/AVP 0"
    out = sdp.rewrite(ended_by_m, [StreamRelay("203.0.113.1", 30000, 30004)])
    assert out.endswith("c=IN IP4 203.0.113.1\r\nt=0 0\r\nm=audio 30000 RTP/AVP 0\r\na=rtcp:30004")
    out = sdp.rewrite(ended_by_m + "\r\nm=message 9 TCP/MSRP *", [R, None])
    assert out.endswith("m=audio 30000 RTP/AVP 0\r\nc=IN IP4 203.0.113.1\r\n"
                        "m=message 9 TCP/MSRP *")


def test_rewrite_inserts_media_c_after_an_i_line():
    text = body(*HEAD, "m=audio 4000 RTP/AVP 0", "i=voice", "b=AS:64",
                "m=message 9 TCP/MSRP *")
    out = sdp.rewrite(text, [R, None])
    assert "m=audio 30000 RTP/AVP 0\r\ni=voice\r\nc=IN IP4 203.0.113.1\r\nb=AS:64\r\n" in out


def test_media_c_comes_before_an_added_a_rtcp_mux():
    """RFC 4566 order (c= before a=) when a bare m= line gets both a c= and a=rtcp-mux."""
    text = body(*HEAD, "m=audio 4000 RTP/AVP 0", "m=message 9 TCP/MSRP *")
    assert sdp.rewrite(text, [StreamRelay("203.0.113.1", 30000, None, True), None]) == body(
        "v=0", "o=- 1 2 IN IP4 198.51.100.10", "s=-", "c=IN IP4 198.51.100.10", "t=0 0",
        "m=audio 30000 RTP/AVP 0", "c=IN IP4 203.0.113.1", "a=rtcp-mux",
        "m=message 9 TCP/MSRP *")


def test_session_ice_stays_while_an_untouched_stream_uses_ice():
    text = body(*HEAD, "a=ice-ufrag:u", "a=ice-pwd:p", "m=audio 4000 RTP/AVP 0",
                "a=candidate:1 1 UDP 1 198.51.100.10 4000 typ host",
                "m=application 4002 UDP/DTLS/SCTP webrtc-datachannel",
                "a=candidate:1 1 UDP 1 198.51.100.10 4002 typ host")
    out = sdp.rewrite(text, [R, None])
    assert out.count("a=candidate") == 1 and "a=ice-ufrag:u" in out and "a=ice-pwd:p" in out
    out = sdp.rewrite(text.replace("m=application 4002", "m=application 0"), [R, None])
    assert "a=ice-" not in out


def test_rewrite_m_line_with_extra_spaces_does_not_corrupt():
    text = AUDIO.replace("m=audio 4000 ", "m=audio  4000\t")
    out = sdp.rewrite(text, [R])
    assert "m=audio  30000\tRTP/AVP 0 8 101\r\n" in out and "4000" not in out


def test_rewrite_errors_leave_nothing_behind():
    with pytest.raises(SdpError):
        sdp.rewrite("v=0\r\n", [])
    with pytest.raises(SdpError):
        sdp.rewrite(b"\xff\xfe", [])


CALLEE_HEAD = ("v=0", "o=- 5 5 IN IP4 198.51.100.20", "s=-", "c=IN IP4 198.51.100.20",
               "t=0 0")


def test_rewrite_rejects_what_it_is_told_and_moves_the_session_c():
    """An answer enabling a stream its offer disabled: that stream gets port 0 and no
    ICE, and the session c= moves to the relay (the rejected stream does not hold it)."""
    text = body(*CALLEE_HEAD, "a=ice-ufrag:u", "m=audio 7000 RTP/AVP 0",
                "m=video 7002 RTP/AVP 96", "a=bundle-only",
                "a=candidate:1 1 UDP 1 198.51.100.20 7002 typ host")
    assert sdp.rewrite(text, [R, None], reject=[1]) == body(
        "v=0", "o=- 5 6 IN IP4 198.51.100.20", "s=-", "c=IN IP4 203.0.113.1", "t=0 0",
        "m=audio 30000 RTP/AVP 0", "m=video 0 RTP/AVP 96", "a=bundle-only")
    assert sdp.scan(text.encode()).rewrite([R, None], reject=(1,)) == sdp.rewrite(
        text, [R, None], reject={1}).encode()
    # without `reject` the stream keeps the callee's port, and so the session c=
    assert sdp.rewrite(text, [R, None]) == body(
        "v=0", "o=- 5 6 IN IP4 198.51.100.20", "s=-", "c=IN IP4 198.51.100.20", "t=0 0",
        "a=ice-ufrag:u", "m=audio 30000 RTP/AVP 0", "c=IN IP4 203.0.113.1",
        "m=video 7002 RTP/AVP 96", "a=bundle-only",
        "a=candidate:1 1 UDP 1 198.51.100.20 7002 typ host")


def test_rewrite_reject_of_a_disabled_stream_changes_nothing():
    text = body(*CALLEE_HEAD, "m=audio 7000 RTP/AVP 0", "m=video 0 RTP/AVP 96")
    assert sdp.rewrite(text, [None, None], reject=[1]) == text
    assert sdp.rewrite(text, [R, None], reject=[1]) == sdp.rewrite(text, [R, None])


@pytest.mark.parametrize("reject, match", [
    ([2], "reject names m= line 2; the body has 2"), ([-1], "m= line -1"),
    ([True], "m= line True"), ([0], "stream 0 is both relayed and rejected"),
])
def test_rewrite_checks_what_it_rejects(reject, match):
    text = body(*CALLEE_HEAD, "m=audio 7000 RTP/AVP 0", "m=video 7002 RTP/AVP 96")
    with pytest.raises(ValueError, match=match):
        sdp.rewrite(text, [R, None], reject=reject)


def test_rewrite_drops_the_port_count_of_a_relayed_stream():
    """m=video 4000/2 (layered coding) relayed on one port pair: the relay's m= line
    names that one pair; a count would announce relay ports that are not this call's."""
    text = body(*HEAD, "m=video 4000/2 RTP/AVP 96", "m=audio 4004/2 RTP/AVP 0")
    assert sdp.rewrite(text, [R, None]) == body(
        "v=0", "o=- 1 2 IN IP4 198.51.100.10", "s=-", "c=IN IP4 198.51.100.10", "t=0 0",
        "m=video 30000 RTP/AVP 96", "c=IN IP4 203.0.113.1", "m=audio 4004/2 RTP/AVP 0")
    assert sdp.rewrite_first(text, "10.0.0.1", 30002, 30003).startswith(
        body(*HEAD, "m=video 30002 RTP/AVP 96"))
    assert sdp.rewrite(text, [None, None], reject=[1]).endswith("m=audio 0 RTP/AVP 0\r\n")


# -- the single-stream wrappers (v1's daemon semantics) ---------------------------------


def test_parse_first_picks_the_first_enabled_relayable_stream():
    text = body("v=0", "c=IN IP4 198.51.100.10", "m=video 0 RTP/AVP 31",
                "m=message 2855 TCP/MSRP *", "m=audio 4000 RTP/AVP 0", "c=IN IP4 203.0.113.7",
                "a=rtcp:4011")
    assert sdp.parse_first(text) == sdp.SdpMedia("203.0.113.7", 4000, 4011)
    assert sdp.parse(text).first_relayable().index == 2
    with pytest.raises(SdpError, match="no relayable m= line"):
        sdp.parse_first(body("v=0", "c=IN IP4 198.51.100.10", "m=audio 0 RTP/AVP 0"))
    with pytest.raises(SdpError, match="no relayable m= line"):
        sdp.parse_first(body("v=0", "c=IN IP4 198.51.100.10", "m=message 9 TCP/MSRP *"))


def test_rewrite_first_matches_v1_replies():
    """No o= bump, a=rtcp names the relay, a=rtcp-mux kept: the daemon's replies of v1."""
    text = body(*HEAD, "m=audio 4000 RTP/AVP 0", "a=rtcp:4001", "a=rtcp-mux")
    out = sdp.rewrite_first(text, "10.0.0.1", 30002, 30003)
    assert out == body(*HEAD[:3], "c=IN IP4 10.0.0.1", "t=0 0", "m=audio 30002 RTP/AVP 0",
                       "a=rtcp:30003 IN IP4 10.0.0.1", "a=rtcp-mux")
    assert sdp.rewrite_first(text.encode(), "10.0.0.1", 30002, 30003) == out.encode()


def test_rewrite_first_no_longer_moves_a_shared_session_c():
    text = body(*HEAD, "m=audio 4000 RTP/AVP 0", "m=video 4002 RTP/AVP 96")
    assert sdp.rewrite_first(text, "10.0.0.1", 30002, 30003) == body(
        *HEAD, "m=audio 30002 RTP/AVP 0", "c=IN IP4 10.0.0.1", "m=video 4002 RTP/AVP 96")


# -- properties -------------------------------------------------------------------------

_GOOD = [
    "s=-", "t=0 0", "c=IN IP4 192.0.2.1", "c=IN IP6 2001:db8::1", "c=IN IP4 0.0.0.0",
    "c=IN IP4 1.2.3.4/127", "m=audio 4000 RTP/AVP 0", "m=video 0 RTP/AVP 31",
    "m=video 4002/2 RTP/SAVPF 96", "m=image 4004 udptl t38", "m=message 9 TCP/MSRP *",
    "m=application 9 UDP/DTLS/SCTP webrtc-datachannel", "m=audio 65535 RTP/AVP",
    "a=rtcp:4001", "a=rtcp:4001 IN IP4 192.0.2.1", "a=rtcp:4001 IN IP6 ::1", "a=rtcp-mux",
    "a=sendonly", "a=inactive", "a=candidate:1 1 UDP 1 h 1 typ host", "a=ice-ufrag:u",
    "a=end-of-candidates", "i=info", "", " ", "a=rtpmap:0 PCMU/8000",
]
_BAD = ["o=- 1 x IN IP4 h", "c=IN IP4 host", "m=audio 99999 RTP/AVP 0", "m=audio", "a=rtcp:0"]
_HEAD = ["v=0", "o=- 1 1 IN IP4 192.0.2.1", "s=-", "c=IN IP4 192.0.2.1", "t=0 0"]
_JUNK = st.text(alphabet="acimov= 0123456789./:\r\tINP4", max_size=24)


def _sdp_like(line: st.SearchStrategy) -> st.SearchStrategy:
    return st.builds(lambda head, lines, eol, end: eol.join(head + lines) + (eol if end else ""),
                     st.sampled_from([[], _HEAD]), st.lists(line, max_size=12),
                     st.sampled_from(["\r\n", "\n"]), st.booleans())


def _m_lines(data: bytes) -> int:
    return sum(1 for line in data.split(b"\n") if line.startswith(b"m="))


@settings(derandomize=True, max_examples=100, deadline=None)
@given(st.one_of(st.binary(max_size=200),
                 _sdp_like(st.one_of(st.sampled_from(_GOOD + _BAD), _JUNK)).map(str.encode)))
def test_any_bytes_parse_or_raise_sdp_error(data):
    try:
        sdp.parse(data)
    except SdpError:
        pass


@settings(derandomize=True, max_examples=100, deadline=None)
@given(_sdp_like(st.sampled_from(_GOOD)).map(lambda s: s.encode("latin-1")))
def test_rewrite_of_a_parsed_body_keeps_its_streams(data):
    try:
        desc = sdp.parse(data)
    except SdpError:
        return
    relays = [StreamRelay("203.0.113.1", 30000 + 2 * s.index) if s.needs_relay else None
              for s in desc.streams]
    try:
        out = sdp.rewrite(data, relays)
    except SdpError:
        return
    assert isinstance(out, bytes)
    assert _m_lines(out) == _m_lines(data) == len(desc.streams)
    again = sdp.parse(out)  # what lrk writes, lrk reads back
    for stream, relay in zip(again.streams, relays):
        if relay is not None:
            assert stream.port == relay.port
            assert stream.null_address or stream.address == "203.0.113.1"
