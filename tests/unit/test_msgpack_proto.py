"""Unit tests of lrk.control.msgpack_proto.MsgpackControl (sans-IO, fake clock)."""

from __future__ import annotations

import msgpack
import pytest
from netaddr import IPSet

from lrk.control.allow import AllowList
from lrk.control.msgpack_proto import (
    COMMANDS,
    MAX_DEPTH,
    MAX_REQUEST_BYTES,
    NEEDS_COUNTERS,
    MsgpackControl,
    Outcome,
    Request,
    pack,
)
from lrk.core.engine import Engine, EngineConfig, Install, Remove, Update
from tests.control_keys import authenticator, signed, wall_clock

CLIENT = ("127.0.0.1", 5060)
OTHER_CLIENT = ("127.0.0.1", 5061)
CALLER = {"ip": "198.51.100.10", "port": 4000}
CALLEE = {"ip": "198.51.100.20", "port": 5000}
SDP = (
    "v=0\r\no=- 1 1 IN IP4 198.51.100.10\r\ns=-\r\nc=IN IP4 198.51.100.10\r\nt=0 0\r\n"
    "m=audio 4000 RTP/AVP 0\r\n"
)
DOC_ERROR_CODES = (
    "malformed",
    "too_large",
    "bad_request",
    "unknown_command",
    "unsupported_version",
    "unauthorized",
    "not_found",
    "ports_exhausted",
    "internal",
)


def make(media=None, port_end=30999, **engine_kw):
    engine = Engine(
        EngineConfig(
            internal_ip="10.0.0.1",
            external_ip="203.0.113.1",
            port_start=30000,
            port_end=port_end,
            **engine_kw,
        )
    )
    return MsgpackControl(
        engine,
        info={"mode": "socket", "workers": 1},
        media_counters=media,
        started=100.0,
        allow=IPSet(["127.0.0.0/8", "::1/128"]),
        auth=authenticator(),
        wall_clock=wall_clock,
    )


def raw(ctl, data: bytes, sender=CLIENT, now=100.0, sign=True) -> Outcome:
    """One datagram, signed (as a relay's clients sign; tests/control_keys.py) unless
    `sign` is false."""
    return ctl.handle(signed(data) if sign else data, sender, now)


def send(ctl, msg: dict, sender=CLIENT, now=100.0) -> dict:
    out = raw(ctl, pack(msg), sender, now)
    assert out.reply is not None
    return msgpack.unpackb(out.reply, raw=False)


_n = [0]


def cookie() -> str:
    _n[0] += 1
    return f"k{_n[0]}"


def cmd(ctl, name, sender=CLIENT, now=100.0, **args) -> dict:
    msg = {"v": 1, "cookie": cookie(), "cmd": name}
    msg.update(args)
    return send(ctl, msg, sender, now)


def assert_error(reply: dict, code: str, fragment: str = "") -> None:
    assert reply["ok"] is False, reply
    assert reply["v"] == 1
    err = reply["error"]
    assert err["code"] == code, err
    assert isinstance(err["message"], str) and err["message"]
    assert fragment in err["message"], err


# -- happy paths -------------------------------------------------------------------


def test_ping():
    ctl = make()
    reply = send(ctl, {"v": 1, "cookie": "a1", "cmd": "ping"})
    assert reply == {"v": 1, "cookie": "a1", "ok": True, "pong": True}


def test_version_is_optional_and_bytes_cookie_echoed():
    ctl = make()
    reply = send(ctl, {"cookie": b"\x00\x01bin", "cmd": "ping"})
    assert reply["ok"] is True
    assert reply["cookie"] == b"\x00\x01bin"


def test_capabilities():
    ctl = make()
    reply = cmd(ctl, "capabilities")
    assert reply["ok"] is True
    assert reply["version"] == 1
    assert reply["commands"] == list(COMMANDS)
    assert reply["port_range"] == [30000, 30999]
    assert reply["internal_ip"] == "10.0.0.1"
    assert reply["external_ip"] == "203.0.113.1"
    assert reply["silence_timeout"] == 60
    assert reply["max_lifetime"] == 10800
    assert reply["max_request_bytes"] == MAX_REQUEST_BYTES == 65000
    assert reply["mode"] == "socket"


def test_offer_answer_query_list_delete():
    ctl = make()
    engine = ctl.engine
    out = raw(
        ctl,
        pack(
            {
                "v": 1,
                "cookie": "o",
                "cmd": "offer",
                "call_id": "c1@host",
                "from_tag": "ft1",
                "media": CALLER,
            }
        ),
    )
    offer = msgpack.unpackb(out.reply, raw=False)
    session = engine.get("c1@host")
    assert out.actions == [Install(session.spec())]
    b = session.legs["B"]
    assert offer == {
        "v": 1,
        "cookie": "o",
        "ok": True,
        "call_id": "c1@host",
        "leg": "B",
        "relay": {"ip": "10.0.0.1", "port": b.relay_port, "rtcp_port": b.relay_port + 1},
        "streams": [{"ip": "10.0.0.1", "port": b.relay_port, "rtcp_port": b.relay_port + 1,
                     "rtcp_mux": False}],
    }

    out = raw(
        ctl,
        pack(
            {
                "v": 1,
                "cookie": "a",
                "cmd": "answer",
                "call_id": "c1@host",
                "from_tag": "ft1",
                "to_tag": "tt1",
                "media": CALLEE,
            }
        ),
    )
    answer = msgpack.unpackb(out.reply, raw=False)
    a = session.legs["A"]
    assert out.actions == [Update(session.spec(), "B")]
    assert answer["leg"] == "A"
    assert answer["relay"] == {
        "ip": "10.0.0.1",
        "port": a.relay_port,
        "rtcp_port": a.relay_port + 1,
    }
    assert a.relay_port != b.relay_port

    query = cmd(ctl, "query", now=112.5, call_id="c1@host")
    s = query["session"]
    assert s["call_id"] == "c1@host"
    assert s["state"] == "answered"
    assert s["age"] == 12.5
    assert s["media_seen"] is False
    assert s["legs"]["A"]["tag"] == "ft1"
    assert s["legs"]["A"]["announced"] == {"ip": "198.51.100.10", "port": 4000}
    assert s["legs"]["B"]["announced"] == {"ip": "198.51.100.20", "port": 5000}
    assert s["legs"]["B"]["tag"] == "tt1"
    assert s["legs"]["A"]["counters"]["in_packets"] == 0

    listed = cmd(ctl, "list")
    assert listed["total"] == 1
    assert listed["sessions"][0]["call_id"] == "c1@host"
    assert listed["sessions"][0]["ports"] == [a.relay_port, b.relay_port]

    out = raw(
        ctl, pack({"v": 1, "cookie": "d", "cmd": "delete", "call_id": "c1@host", "from_tag": "tt1"})
    )
    deleted = msgpack.unpackb(out.reply, raw=False)
    assert out.actions == [Remove(session.sid, session.call_id, "deleted")]
    assert deleted["ok"] is True
    assert deleted["call_id"] == "c1@host"
    assert deleted["session"]["legs"]["B"]["tag"] == "tt1"
    assert engine.ports.in_use == 0
    assert_error(cmd(ctl, "query", call_id="c1@host"), "not_found", "c1@host")


def test_offer_options_reach_engine():
    ctl = make()
    reply = cmd(
        ctl,
        "offer",
        call_id="c1",
        from_tag="ft",
        media={"ip": "2001:db8:0::1", "port": 4000, "rtcp_port": 4011},
        interface="external",
        latch_any=True,
        timeout=30,
        via_branch="z9hG4bK1",
    )
    assert reply["relay"]["ip"] == "203.0.113.1"
    session = ctl.engine.get("c1")
    a = session.legs["A"]
    assert a.announced == ("2001:db8::1", 4000)  # normalised
    assert a.rtcp_announced == ("2001:db8::1", 4011)
    assert a.latch_any is True
    assert session.timeout == 30.0
    assert session.via_branch == "z9hG4bK1"


def test_offer_with_sdp_str_returns_rewritten_str():
    ctl = make()
    reply = cmd(ctl, "offer", call_id="c2", from_tag="ft", sdp=SDP)
    port = reply["relay"]["port"]
    assert reply["sdp"] == SDP.replace(
        "c=IN IP4 198.51.100.10\r\nt", "c=IN IP4 10.0.0.1\r\nt"
    ).replace("m=audio 4000", f"m=audio {port}").replace("o=- 1 1 ", "o=- 1 2 ")
    assert ctl.engine.get("c2").legs["A"].announced == ("198.51.100.10", 4000)


def test_answer_with_sdp_bytes_returns_bytes():
    ctl = make()
    cmd(ctl, "offer", call_id="c2", from_tag="ft", sdp=SDP)
    reply = cmd(
        ctl,
        "answer",
        call_id="c2",
        from_tag="ft",
        to_tag="tt",
        sdp=SDP.replace("198.51.100.10", "198.51.100.20").encode(),
        interface="external",
    )
    assert isinstance(reply["sdp"], bytes)
    assert b"c=IN IP4 203.0.113.1\r\n" in reply["sdp"]
    assert f"m=audio {reply['relay']['port']} ".encode() in reply["sdp"]


def sdp_of(ip: str, *media: str, version: int = 1, conn: str = "") -> str:
    """A body from `ip` (o=), its session c= `conn` (`ip` unless given)."""
    return "".join(line + "\r\n" for line in (
        "v=0", f"o=- 1 {version} IN IP4 {ip}", "s=-", f"c=IN IP4 {conn or ip}", "t=0 0",
        *media))


CALLEE_IP = "198.51.100.20"


def test_answer_enabling_a_stream_the_offer_disabled_rejects_it():
    """RFC 8843 bundle-only (port 0 in the offer) answered with a port: the relay has no
    ports for it, so the answer it returns rejects it instead of naming the callee."""
    ctl = make()
    cmd(ctl, "offer", call_id="c", from_tag="ft", sdp=sdp_of(
        "198.51.100.10", "m=audio 4000 RTP/AVP 0", "m=video 0 RTP/AVP 96", "a=bundle-only"))
    reply = cmd(ctl, "answer", call_id="c", from_tag="ft", to_tag="tt", sdp=sdp_of(
        CALLEE_IP, "m=audio 7000 RTP/AVP 0", "m=video 7002 RTP/AVP 96",
        f"a=candidate:1 1 UDP 1 {CALLEE_IP} 7002 typ host"))
    port = reply["streams"][0]["port"]
    assert reply["streams"][1] is None and len(reply["streams"]) == 2
    assert reply["sdp"] == sdp_of(CALLEE_IP, f"m=audio {port} RTP/AVP 0",
                                  "m=video 0 RTP/AVP 96", version=2, conn="10.0.0.1")


def test_answer_with_an_m_line_beyond_its_offer_rejects_it():
    ctl = make()
    cmd(ctl, "offer", call_id="c", from_tag="ft", sdp=SDP)
    reply = cmd(ctl, "answer", call_id="c", from_tag="ft", to_tag="tt", sdp=sdp_of(
        CALLEE_IP, "m=audio 7000 RTP/AVP 0", "m=video 7002 RTP/AVP 96",
        "m=message 2855 TCP/MSRP *"))
    port = reply["streams"][0]["port"]
    assert reply["streams"][1:] == [None, None]  # one entry per m= line of the answer
    # the MSRP stream is not relayed anywhere, offered or not: it passes as it came
    assert reply["sdp"] == sdp_of(CALLEE_IP, f"m=audio {port} RTP/AVP 0", "c=IN IP4 10.0.0.1",
                                  "m=video 0 RTP/AVP 96", "m=message 2855 TCP/MSRP *",
                                  version=2)
    assert ctl.engine.ports.in_use == 2


def test_answer_with_fewer_m_lines_than_its_offer_rejects_the_missing_ones():
    """Invalid (RFC 3264 section 6), but some endpoints drop a declined video: the lines
    left out are rejected as port 0 would (their ports freed on both legs); the reply
    has one entry per m= line of the answer, and its SDP points the rest at the relay
    (refusing it would leave the proxy the callee's own SDP)."""
    ctl = make()
    offer = sdp_of("198.51.100.10", "m=audio 4000 RTP/AVP 0", "m=video 4002 RTP/AVP 96")
    cmd(ctl, "offer", call_id="c", from_tag="ft", sdp=offer)
    assert ctl.engine.ports.in_use == 4
    reply = cmd(ctl, "answer", call_id="c", from_tag="ft", to_tag="tt",
                sdp=sdp_of(CALLEE_IP, "m=audio 7000 RTP/AVP 0"))
    assert reply["ok"] and len(reply["streams"]) == 1 and reply["streams"][0] is not None
    port = reply["streams"][0]["port"]
    body = reply["sdp"].split("\r\n", 2)[2]  # after o= (its address is the phone's)
    assert f"m=audio {port} RTP/AVP 0" in body and CALLEE_IP not in body
    assert ctl.engine.ports.in_use == 2
    legs = ctl.engine.get("c").legs
    assert legs["A"].media[1] is None and legs["B"].media[1] is None


def test_offer_with_a_port_count_announces_one_relay_port():
    ctl = make()
    reply = cmd(ctl, "offer", call_id="c", from_tag="ft",
                sdp=sdp_of("198.51.100.10", "m=video 4000/2 RTP/AVP 96"))
    port = reply["streams"][0]["port"]
    assert reply["sdp"] == sdp_of("198.51.100.10", f"m=video {port} RTP/AVP 96", version=2,
                                  conn="10.0.0.1")
    assert ctl.engine.ports.in_use == 2


def test_list_paging():
    ctl = make()
    for i in range(5):
        cmd(ctl, "offer", call_id=f"c{i}", from_tag="ft", media=CALLER)
    reply = cmd(ctl, "list", limit=2, offset=1)
    assert reply["total"] == 5
    assert [s["call_id"] for s in reply["sessions"]] == ["c1", "c2"]
    assert cmd(ctl, "list", offset=10)["sessions"] == []


def test_list_reply_fits_in_a_datagram():
    """The largest page the protocol allows must still fit in one UDP datagram."""
    ctl = make(port_end=31999)
    for i in range(300):
        cmd(ctl, "offer", call_id=f"{i:04d}" + "x" * 250, from_tag="ft", media=CALLER)
    out = raw(ctl, pack({"cookie": "big", "cmd": "list", "limit": 1000}))
    assert out.reply is not None
    assert len(out.reply) <= 65507


def test_stats():
    ctl = make(media=lambda: {"media.forwarded.packets": 7})
    cmd(ctl, "offer", call_id="c1", from_tag="ft", media=CALLER)
    cmd(ctl, "query", call_id="nope")
    raw(ctl, b"\xc1\xc1\xc1\xc1")
    reply = cmd(ctl, "stats", now=160.0)
    assert reply["uptime"] == 60.0
    assert reply["sessions"] == 1
    assert reply["ports"] == {"total": 500, "in_use": 2, "quarantined": 0, "free": 498}
    # one address per side: one range shared by both (each shows it)
    assert [p["in_use"] for p in reply["ports_by_address"].values()] == [2, 2]
    c = reply["counters"]
    assert c["control.requests.offer"] == 1
    assert c["control.requests.query"] == 1
    assert c["control.requests.stats"] == 1
    assert c["control.errors.not_found"] == 1
    assert c["control.errors.malformed"] == 1
    assert c["sessions.created"] == 1
    assert c["media.forwarded.packets"] == 7


def test_stats_lists_every_error_code_even_when_zero():
    """docs/protocol.md: stats shows 'every command, every error code, every drop reason'."""
    ctl = make()
    counters = cmd(ctl, "stats")["counters"]
    for code in DOC_ERROR_CODES:
        assert counters.get(f"control.errors.{code}") == 0, code


def test_needs_counters():
    assert {"delete", "query", "list", "stats"} == NEEDS_COUNTERS
    ctl = make()
    got = ctl.receive(signed(pack({"cookie": "q", "cmd": "query", "call_id": "x"})), CLIENT,
                      0.0)
    assert isinstance(got, Request)
    assert got.cmd == "query" and got.cookie == "q" and got.sender == CLIENT


# -- malformed input ---------------------------------------------------------------


def test_truncated_msgpack():
    ctl = make()
    data = pack({"v": 1, "cookie": "t", "cmd": "ping"})[:-3]
    reply = msgpack.unpackb(raw(ctl, data).reply, raw=False)
    assert_error(reply, "malformed")
    assert reply["cookie"] is None
    assert ctl.counters["control.errors.malformed"] == 1


@pytest.mark.parametrize(
    "data",
    [
        pack([1, 2, 3, 4]),
        pack("a string of text"),
        pack(12345678),
        pack({"cookie": "x"}) + b"\x00",  # trailing garbage
        pack({1: "int key", "cookie": "x"}),
        b"\xc1\xc1\xc1\xc1",  # never-used byte
        b"GET / HTTP/1.0\r\n\r\n",
    ],
)
def test_not_a_map_is_malformed(data):
    ctl = make()
    reply = msgpack.unpackb(raw(ctl, data).reply, raw=False)
    assert_error(reply, "malformed")
    assert reply["cookie"] is None


def test_huge_map_is_too_large():
    ctl = make()
    msg = {"cookie": "h", "cmd": "ping"}
    msg.update({f"k{i}": i for i in range(70)})
    reply = send(ctl, msg)
    assert_error(reply, "too_large")


def test_huge_array_is_too_large():
    ctl = make()
    reply = send(ctl, {"cookie": "h", "cmd": "ping", "x": list(range(65))})
    assert_error(reply, "too_large")


@pytest.mark.parametrize("depth", [3, 100, 2000, 60000])
def test_nesting_depth_bomb_gets_error_reply(depth):
    ctl = make()
    data = b"\x81\xa1x" + b"\x91" * depth + b"\xc0"  # {"x": [[[...nil...]]]}
    assert len(data) < MAX_REQUEST_BYTES
    out = raw(ctl, data)
    assert out.reply is not None
    reply = msgpack.unpackb(out.reply, raw=False)
    if depth <= MAX_DEPTH:
        assert_error(reply, "bad_request", "cookie")  # decodes fine, but has no cookie
    else:  # our depth check or the decoder's own limit: the same verdict everywhere
        assert_error(reply, "too_large", "nest")
    assert ctl.counters["control.dropped.too_short"] == 0


def test_oversized_request():
    ctl = make()
    msg = {"cookie": "big", "cmd": "ping", "pad": "x" * MAX_REQUEST_BYTES}
    data = pack(msg)
    assert len(data) > MAX_REQUEST_BYTES
    reply = msgpack.unpackb(raw(ctl, data).reply, raw=False)
    assert_error(reply, "too_large", str(MAX_REQUEST_BYTES))
    assert reply["cookie"] is None
    # exactly at the limit is accepted
    msg["pad"] = ""
    msg["pad"] = "x" * (MAX_REQUEST_BYTES - len(pack(msg)) - 2)
    data = pack(msg)
    assert len(data) == MAX_REQUEST_BYTES
    assert msgpack.unpackb(raw(ctl, data).reply, raw=False)["ok"] is True


def test_short_input_gets_no_reply():
    ctl = make()
    for data in (b"", b"\x80", b"\x81\xa1", b"abc"):
        assert raw(ctl, data, sign=False).reply is None
    assert ctl.counters["control.dropped.too_short"] == 4
    assert not any(v for k, v in ctl.counters.items() if k.startswith("control.errors"))


def test_sender_outside_allow_list_gets_no_reply():
    ctl = make()
    data = pack({"cookie": "x", "cmd": "offer", "call_id": "c", "from_tag": "f", "media": CALLER})
    for sender in (("192.0.2.1", 5060), ("::2", 5060, 0, 0), ("not-an-ip", 1)):
        out = raw(ctl, data, sender=sender)
        assert out.reply is None and out.actions == []
    assert ctl.counters["control.dropped.not_allowed"] == 3
    assert ctl.engine.ports.in_use == 0
    assert not ctl.engine.by_call


def test_allowed_senders():
    ctl = make()
    assert cmd(ctl, "ping", sender=("127.9.9.9", 1))["ok"] is True
    assert cmd(ctl, "ping", sender=("::1", 1, 0, 0))["ok"] is True
    assert cmd(ctl, "ping", sender="/run/lrk/control.sock")["ok"] is True  # UNIX socket


def test_no_allow_list_allows_everyone():
    ctl = make()
    ctl.allow = AllowList(None)  # what MsgpackControl(allow=None) builds
    assert cmd(ctl, "ping", sender=("192.0.2.1", 1))["ok"] is True


# -- envelope errors ---------------------------------------------------------------


def test_unknown_command():
    ctl = make()
    reply = send(ctl, {"cookie": "u", "cmd": "reboot"})
    assert_error(reply, "unknown_command", "reboot")
    assert reply["cookie"] == "u"
    assert "offer" in reply["error"]["message"]
    assert_error(send(ctl, {"cookie": "u2"}), "unknown_command")
    assert_error(send(ctl, {"cookie": "u3", "cmd": ["ping"]}), "unknown_command")


@pytest.mark.parametrize("version", [0, 2, "1", None, [1], True, 1.0])
def test_bad_version(version):
    ctl = make()
    reply = send(ctl, {"v": version, "cookie": "v", "cmd": "ping"})
    assert_error(reply, "unsupported_version")
    assert reply["cookie"] == "v"


@pytest.mark.parametrize("bad", [None, "", "x" * 65, b"", b"y" * 65, 5, ["c"], {"c": 1}, True])
def test_bad_cookie(bad):
    ctl = make()
    msg = {"v": 1, "cmd": "ping"}
    if bad is not None:
        msg["cookie"] = bad
    reply = send(ctl, msg)
    assert_error(reply, "bad_request", "cookie")
    assert reply["cookie"] is None


def test_cookie_limits_accepted():
    ctl = make()
    assert send(ctl, {"cookie": "x", "cmd": "ping"})["ok"] is True
    assert send(ctl, {"cookie": "x" * 64, "cmd": "ping"})["ok"] is True


def test_a_token_field_is_ignored():
    """control_token is gone (requests are signed, tests/unit/test_auth.py): a `token`
    field is one more unknown argument."""
    ctl = make()
    assert send(ctl, {"cookie": "t1", "cmd": "ping", "token": "anything"})["ok"] is True


# -- argument validation -----------------------------------------------------------

OFFER = {"call_id": "c1", "from_tag": "ft", "media": CALLER}
ANSWER = {"call_id": "c1", "from_tag": "ft", "to_tag": "tt", "media": CALLEE}

BAD_ARGS = [
    ("offer", "call_id", None),
    ("offer", "call_id", 5),
    ("offer", "call_id", ""),
    ("offer", "call_id", "c" * 257),
    ("offer", "call_id", b"\xff\xfe"),
    ("offer", "from_tag", None),
    ("offer", "from_tag", ["ft"]),
    ("offer", "to_tag", 7),
    ("offer", "to_tag", "t" * 300),
    ("offer", "media", None),
    ("offer", "media", [CALLER["ip"], 4000]),
    ("offer", "media", {"port": 4000}),
    ("offer", "media", {"ip": 3232235777, "port": 4000}),
    ("offer", "media", {"ip": "caller.example", "port": 4000}),
    ("offer", "media", {"ip": "198.51.100.10"}),
    ("offer", "media", {"ip": "198.51.100.10", "port": "4000"}),
    ("offer", "media", {"ip": "198.51.100.10", "port": 70000}),
    ("offer", "media", {"ip": "198.51.100.10", "port": -1}),
    ("offer", "media", {"ip": "198.51.100.10", "port": True}),
    ("offer", "media", {"ip": "198.51.100.10", "port": 4000.0}),
    ("offer", "media", {"ip": "198.51.100.10", "port": 4000, "rtcp_port": 0}),
    ("offer", "media", {"ip": "198.51.100.10", "port": 4000, "rtcp_port": "x"}),
    ("offer", "sdp", 5),
    ("offer", "sdp", "v=0\r\n"),
    ("offer", "sdp", b"\xff" * 10),
    ("offer", "interface", "dmz"),
    ("offer", "interface", 1),
    ("offer", "latch_any", 1),
    ("offer", "latch_any", "yes"),
    ("offer", "timeout", 0),
    ("offer", "timeout", 86401),
    ("offer", "timeout", 1.5),
    ("offer", "timeout", "60"),
    ("offer", "timeout", True),
    ("offer", "via_branch", 9),
    ("answer", "to_tag", None),
    ("answer", "to_tag", 1),
    ("answer", "media", {"ip": "::zz", "port": 1}),
    ("answer", "timeout", -5),
    ("delete", "call_id", None),
    ("delete", "call_id", {}),
    ("delete", "from_tag", 3),
    ("query", "call_id", None),
    ("query", "call_id", 1.5),
    ("list", "limit", 0),
    ("list", "limit", 1001),
    ("list", "limit", "5"),
    ("list", "limit", True),
    ("list", "offset", -1),
    ("list", "offset", "0"),
]


@pytest.mark.parametrize("name,field,value", BAD_ARGS)
def test_bad_arguments(name, field, value):
    ctl = make()
    if name in ("answer", "delete", "query"):
        assert cmd(ctl, "offer", **OFFER)["ok"] is True
    args = {"offer": OFFER, "answer": ANSWER}.get(name, {"call_id": "c1"} if name != "list" else {})
    args = dict(args)
    if value is None:
        args.pop(field, None)
    else:
        args[field] = value
    before = ctl.engine.ports.snapshot()
    sessions_before = len(ctl.engine.by_call)
    out = raw(ctl, pack({"v": 1, "cookie": "bad", "cmd": name, **args}))
    reply = msgpack.unpackb(out.reply, raw=False)
    assert_error(reply, "bad_request")
    msg = reply["error"]["message"]
    key = "media" if field == "media" else field
    assert key in msg or (field in ("sdp",) and "SDP" in msg), msg
    assert out.actions == []
    assert ctl.engine.ports.snapshot() == before
    assert len(ctl.engine.by_call) == sessions_before
    assert ctl.counters["control.errors.bad_request"] == 1


def test_huge_string_field():
    ctl = make()
    reply = cmd(ctl, "offer", call_id="c" * 60000, from_tag="ft", media=CALLER)
    assert_error(reply, "bad_request", "call_id")
    reply = cmd(ctl, "offer", call_id="c", from_tag="ft", sdp=SDP + "a=x:" + "y" * 40000 + "\r\n")
    assert_error(reply, "bad_request", "exceeds")
    assert not ctl.engine.by_call


def test_not_found_and_ports_exhausted():
    ctl = make(port_end=30003)
    assert_error(cmd(ctl, "answer", **ANSWER), "not_found", "c1")
    assert_error(cmd(ctl, "delete", call_id="nope"), "not_found")
    assert cmd(ctl, "offer", **OFFER)["ok"] is True
    assert_error(cmd(ctl, "delete", call_id="c1", from_tag="stranger"), "not_found", "stranger")
    reply = cmd(ctl, "offer", call_id="c2", from_tag="ft", media=CALLER)
    assert_error(reply, "ports_exhausted", "30000-30003")
    assert ctl.counters["control.errors.ports_exhausted"] == 1


def test_internal_error_is_reported_not_raised(monkeypatch, caplog):
    ctl = make()

    def boom(*a, **kw):
        raise RuntimeError("kaboom")

    monkeypatch.setattr(ctl.engine, "offer", boom)
    with caplog.at_level("ERROR", logger="lrk.control"):
        reply = cmd(ctl, "offer", **OFFER)
    assert_error(reply, "internal")
    assert "kaboom" not in reply["error"]["message"]
    assert any("internal error" in r.getMessage() for r in caplog.records)
    assert ctl.counters["control.errors.internal"] == 1
    # the relay still answers afterwards
    assert cmd(ctl, "ping")["ok"] is True


# -- retransmissions ---------------------------------------------------------------


def test_replayed_offer_has_one_side_effect():
    ctl = make()
    data = pack({"v": 1, "cookie": "same", "cmd": "offer", **OFFER})
    first = raw(ctl, data, now=100.0)
    second = raw(ctl, data, now=101.0)
    assert second.reply == first.reply
    assert len(first.actions) == 1 and second.actions == []
    assert len(ctl.engine.by_call) == 1
    assert ctl.engine.ports.in_use == 2
    assert ctl.engine.counters["sessions.created"] == 1
    assert ctl.engine.counters["sessions.offers"] == 1
    assert ctl.counters["control.requests.offer"] == 1
    assert ctl.counters["control.retransmissions"] == 1


def test_replayed_delete_returns_same_reply():
    ctl = make()
    cmd(ctl, "offer", **OFFER)
    data = pack({"v": 1, "cookie": "del", "cmd": "delete", "call_id": "c1"})
    first = raw(ctl, data)
    second = raw(ctl, data, now=110.0)
    assert msgpack.unpackb(first.reply, raw=False)["ok"] is True
    assert second.reply == first.reply
    assert second.actions == []
    assert ctl.engine.counters["sessions.deleted"] == 1
    assert ctl.counters["control.errors.not_found"] == 0


def test_replayed_error_reply_is_cached_too():
    ctl = make()
    data = pack({"v": 1, "cookie": "e", "cmd": "query", "call_id": "nope"})
    first = raw(ctl, data)
    cmd(ctl, "offer", call_id="nope", from_tag="ft", media=CALLER)
    assert raw(ctl, data).reply == first.reply  # still the cached not_found


def test_same_cookie_other_sender_is_new_request():
    ctl = make()
    data = pack({"v": 1, "cookie": "same", "cmd": "offer", **OFFER})
    first = raw(ctl, data, sender=CLIENT)
    second = raw(ctl, data, sender=OTHER_CLIENT)
    assert second.actions and isinstance(second.actions[0], Update)
    assert ctl.engine.counters["sessions.offers"] == 2
    assert ctl.engine.counters["sessions.created"] == 1
    assert ctl.counters["control.retransmissions"] == 0
    assert (
        msgpack.unpackb(second.reply, raw=False)["relay"]
        == msgpack.unpackb(first.reply, raw=False)["relay"]
    )


def test_replay_window_expires():
    ctl = make()
    data = pack({"v": 1, "cookie": "w", "cmd": "offer", **OFFER})
    raw(ctl, data, now=100.0)
    assert raw(ctl, data, now=129.9).actions == []
    later = raw(ctl, data, now=131.0)
    assert later.actions  # executed again: a re-offer
    assert ctl.engine.counters["sessions.offers"] == 2


def test_in_flight_retransmission_is_dropped():
    ctl = make()
    data = pack({"v": 1, "cookie": "f", "cmd": "query", "call_id": "x"})
    req = ctl.receive(signed(data), CLIENT, 100.0)
    assert isinstance(req, Request)
    again = ctl.receive(signed(data), CLIENT, 100.1)
    assert isinstance(again, Outcome) and again.reply is None
    assert ctl.counters["control.retransmissions.in_flight"] == 1
    # other senders are not affected
    assert isinstance(ctl.receive(signed(data), OTHER_CLIENT, 100.1), Request)
    done = ctl.execute(req, 100.2)
    assert_error(msgpack.unpackb(done.reply, raw=False), "not_found")
    after = ctl.receive(signed(data), CLIENT, 100.3)
    assert isinstance(after, Outcome) and after.reply == done.reply
