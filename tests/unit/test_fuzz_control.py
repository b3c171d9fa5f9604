"""Property-based fuzzing (hypothesis, derandomized) of every control-plane parser and codec
touched by issue 11: msgpack requests with and without signatures, the signature trailer,
the legacy protocol, replies as the client reads them, key files, the reply cache.

Each property says what must hold for *any* input: a reply no larger than allowed (or a
counted drop), never an exception escaping, never an `internal` error.
"""

from __future__ import annotations

import ipaddress
from typing import Any, Dict, List, Tuple

import msgpack
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from lrk.client.errors import ProtocolError, RelayError
from lrk.client.nodes import NodeSet
from lrk.client.protocol import decode_reply
from lrk.client.request import RequestState
from lrk.control.auth import (
    TRAILER_BYTES,
    KeyFileError,
    parse_key,
    sign,
    trailer_of,
)
from lrk.control.legacy import LegacyControl, usable_peer
from lrk.control.msgpack_proto import (
    COMMANDS,
    MAX_CALL_ID,
    MAX_ERROR_MESSAGE,
    MAX_REPLY_BYTES,
    MsgpackControl,
    pack,
)
from lrk.control.replay import ENTRY_OVERHEAD, ReplayCache
from lrk.core.engine import Engine, EngineConfig
from tests.control_keys import ADMIN_KEY, OTHER_KEY, TEST_KEY, WALL, authenticator, signed

SENDER = ("127.0.0.1", 5060)
INTERNAL = "127.0.0.1"
FUZZ = settings(derandomize=True, max_examples=300, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
FEW = settings(FUZZ, max_examples=100)


def control(auth: bool = True) -> MsgpackControl:
    engine = Engine(EngineConfig(internal_ip=INTERNAL, external_ip="127.0.0.2",
                                 port_start=30000, port_end=30199, quarantine=0))
    return MsgpackControl(engine, auth=authenticator() if auth else None,
                          wall_clock=lambda: WALL)


def executed(ctl: MsgpackControl) -> int:
    return sum(v for k, v in ctl.counters.items() if k.startswith("control.requests."))


def drops(ctl: MsgpackControl) -> int:
    return sum(v for k, v in ctl.counters.items() if k.startswith("control.dropped."))


# -- strategies ------------------------------------------------------------------------------
leaves = st.one_of(st.none(), st.booleans(), st.integers(-(2 ** 63), 2 ** 64 - 1),
                   st.floats(), st.text(max_size=30), st.binary(max_size=30))
values = st.recursive(leaves, lambda inner: st.lists(inner, max_size=4)
                      | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=12)
ips = st.sampled_from(["198.51.100.10", "192.0.2.1", "::1", "0.0.0.0", "255.255.255.255",
                       "224.0.0.1", "not-an-ip", "127.0.0.1"])
ports = st.integers(-1, 70000)
call_ids = st.sampled_from(["c1", "c2", "é" * 10, "x" * MAX_CALL_ID]) | st.text(max_size=300)
SDP = ("v=0\r\no=- 1 1 IN IP4 198.51.100.10\r\ns=-\r\nc=IN IP4 198.51.100.10\r\nt=0 0\r\n"
       "m=audio 4000 RTP/AVP 0\r\n")
sdps = st.sampled_from([SDP, SDP.replace("4000", "0"), "v=0\r\n", ""]) | st.text(max_size=200)
media = st.fixed_dictionaries({"ip": ips, "port": ports}) | st.lists(
    st.fixed_dictionaries({"ip": ips, "port": ports}), max_size=3) | values
ARGS = {
    "v": st.sampled_from([1, 2, "1", None]) | values,
    "call_id": call_ids, "from_tag": call_ids | values, "to_tag": call_ids | values,
    "media": media, "sdp": sdps | values, "interface": st.sampled_from(["internal", "external"])
    | values, "latch_any": st.booleans() | values, "timeout": st.integers(-5, 100000) | values,
    "via_branch": call_ids | values, "strict_source": st.booleans() | values,
    "limit": st.integers(-5, 2000) | values, "offset": st.integers(-5, 2 ** 40) | values,
    "on": st.booleans() | values, "token": values,
}
wild = st.fixed_dictionaries(
    {"cmd": st.sampled_from(COMMANDS) | st.text(max_size=10),
     "cookie": st.text(min_size=1, max_size=70) | st.binary(min_size=1, max_size=70) | values},
    optional=ARGS)
#: requests that mostly pass validation, so that sessions get made, changed and ended
plausible = st.fixed_dictionaries(
    {"cmd": st.sampled_from(["offer", "offer", "answer", "delete", "query", "list"]),
     "cookie": st.text(min_size=1, max_size=20), "v": st.just(1),
     "call_id": st.sampled_from(["c1", "c2", "é" * 10]), "from_tag": st.just("f"),
     "to_tag": st.sampled_from(["t", "u"]),
     "media": st.fixed_dictionaries({"ip": st.sampled_from(["198.51.100.10", "::1"]),
                                     "port": st.integers(0, 65535)})},
    optional={"sdp": st.sampled_from([SDP, SDP.replace("4000", "0")]),
              "interface": st.sampled_from(["internal", "external"]),
              "timeout": st.integers(1, 86400), "latch_any": st.booleans(),
              "limit": st.integers(1, 1000)})
requests = wild | plausible


def check_reply(ctl: MsgpackControl, reply: Any) -> None:
    """What every reply must be: one datagram, a map with v/ok, a short error message."""
    assert len(reply) <= MAX_REPLY_BYTES
    body = msgpack.unpackb(reply, raw=False, strict_map_key=False)
    assert body["v"] == 1 and isinstance(body["ok"], bool)
    if not body["ok"]:
        assert len(body["error"]["message"].encode("utf-8")) <= MAX_ERROR_MESSAGE
        assert body["error"]["code"] != "internal", body
    assert ctl.counters["control.errors.internal"] == 0


# -- msgpack requests ---------------------------------------------------------------------------
@FUZZ
@given(st.binary(max_size=3000))
def test_unsigned_bytes_to_an_authenticated_relay_are_a_counted_drop(data):
    ctl = control()
    out = ctl.handle(data, SENDER, 10.0)
    assert out.reply is None and out.actions == []
    assert drops(ctl) == 1 and executed(ctl) == 0


@FUZZ
@given(requests, st.data())
def test_mutated_signed_requests_never_run(message, data):
    ctl = control()
    wire = bytearray(signed(pack(message)))
    how = data.draw(st.sampled_from(["flip", "truncate", "extend", "key"]))
    if how == "flip":
        i = data.draw(st.integers(0, len(wire) - 1))
        wire[i] ^= data.draw(st.integers(1, 255))
    elif how == "truncate":
        del wire[len(wire) - data.draw(st.integers(1, len(wire))):]
    elif how == "extend":
        wire += data.draw(st.binary(min_size=1, max_size=80))
    else:  # another key's id, this key's MAC
        wire[-56:-40] = OTHER_KEY.wire_id
    out = ctl.handle(bytes(wire), SENDER, 10.0)
    assert out.reply is None and executed(ctl) == 0 and drops(ctl) == 1


@FUZZ
@given(st.lists(requests, min_size=1, max_size=6),
       st.lists(st.sampled_from([TEST_KEY, OTHER_KEY, ADMIN_KEY]), min_size=6, max_size=6))
def test_signed_arbitrary_requests_get_a_bounded_reply_never_an_internal_error(messages, keys):
    ctl = control()
    for i, message in enumerate(messages):
        out = ctl.handle(signed(pack(message), keys[i]), SENDER, 10.0 + i)
        if out.reply is not None:
            check_reply(ctl, out.reply)
            body = msgpack.unpackb(out.reply, raw=False, strict_map_key=False)
            event(f"{message['cmd']!s:.12} " + ("ok" if body["ok"] else body["error"]["code"]))
    for session in ctl.engine.sessions():
        assert len(session.call_id.encode("utf-8")) <= MAX_CALL_ID


@FUZZ
@given(st.binary(max_size=3000) | requests.map(pack))
def test_an_unauthenticated_relay_never_answers_more_than_it_got_unless_it_ran_it(data):
    ctl = control(auth=False)
    out = ctl.handle(data, SENDER, 10.0)
    if out.reply is not None and not executed(ctl):
        assert len(out.reply) <= len(data)


@FEW
@given(st.lists(st.tuples(st.sampled_from([TEST_KEY, OTHER_KEY, ADMIN_KEY]),
                          st.sampled_from(["offer", "answer", "delete", "query"]),
                          st.sampled_from(["a", "b", "c"])), max_size=25))
def test_ownership_holds_whatever_the_order(ops):
    """Whatever several clients do, a call is changed only by the key that made it (or an
    admin key), and `list` shows each key its own calls, an admin key all of them."""
    ctl = control()
    owner: Dict[str, str] = {}
    for n, (key, cmd, call_id) in enumerate(ops):
        args: Dict[str, Any] = {"cmd": cmd, "cookie": f"k{n}", "call_id": call_id}
        if cmd in ("offer", "answer"):
            args.update(from_tag="f", media={"ip": "198.51.100.10", "port": 4000})
        if cmd == "answer":
            args["to_tag"] = "t"
        existed = call_id in ctl.engine.by_call
        before = owner.get(call_id)
        reply = msgpack.unpackb(ctl.handle(signed(pack(args), key), SENDER, 10.0).reply,
                                raw=False)
        allowed = key.admin or not existed or before == key.owner
        if existed and not allowed:
            assert reply["ok"] is False and reply["error"]["code"] in ("not_found", "forbidden")
        if cmd == "offer" and not existed and reply["ok"]:
            owner[call_id] = key.owner
        if call_id not in ctl.engine.by_call:
            owner.pop(call_id, None)
    for key in (TEST_KEY, OTHER_KEY, ADMIN_KEY):
        listed = msgpack.unpackb(ctl.handle(signed(pack(
            {"cmd": "list", "cookie": f"list-{key.id}"}), key), SENDER, 10.0).reply, raw=False)
        want = {c for c, o in owner.items() if key.admin or o == key.owner}
        assert {s["call_id"] for s in listed["sessions"]} == want


# -- the trailer and keys ----------------------------------------------------------------------
@FUZZ
@given(st.binary(max_size=200))
def test_trailer_parsing_and_verification_never_raise(data):
    tail = trailer_of(data)
    assert tail is None or len(tail[0]) == len(data) - TRAILER_BYTES
    key, reason = authenticator().verify(data, WALL)
    assert key is None and reason in ("unauthenticated", "bad_signature")


@FUZZ
@given(st.binary(min_size=1, max_size=300), st.floats(0, 4e9))
def test_sign_then_verify_round_trips(data, wall):
    auth = authenticator(window=300.0)
    assert auth.verify(sign(data, TEST_KEY, wall), wall) == (TEST_KEY, "fresh")


@FUZZ
@given(st.text(max_size=300) | st.builds(
    lambda i, s, a, o: f'id = {i}\nsecret = {s}\nadmin = {a}\nowner = {o}\n',
    st.sampled_from(['"k"', '"bad id"', "1", '"' + "k" * 17 + '"']),
    st.sampled_from(['"' + "00" * 16 + '"', '"zz"', '"00"', "[]"]),
    st.sampled_from(["true", "false", '"x"']), st.sampled_from(['"o"', '"a b"', "2"])))
def test_key_files_parse_or_fail_with_a_key_file_error(text):
    try:
        key = parse_key(text, "/fuzz.key")
    except KeyFileError as exc:
        assert str(exc)
    else:
        assert key.id and 16 <= len(key.secret) <= 64


# -- the legacy protocol -----------------------------------------------------------------------
legacy_ips = st.sampled_from(["192.0.2.10", "198.51.100.20", "127.0.0.1", "0.0.0.0",
                              "255.255.255.255", "239.1.1.1", "240.0.0.1", "::1", "x"])
legacy_ports = st.sampled_from([0, 1, 4000, 30000, 30002, 30004, 30199, 65535, 70000, -1])


@st.composite
def legacy_requests(draw: Any) -> bytes:
    cookie = draw(st.sampled_from([b"1_1", b"2_2", b"x" * 100]))
    cmd = draw(st.sampled_from([b"S", b"D", b"P", b"G", b"Q", b"Sx"]))
    fields = [draw(legacy_ips) for _ in range(4)] + [str(draw(legacy_ports)) for _ in range(4)]
    fields.append(str(draw(st.integers(-10, 10 ** 12))))
    fields.append(draw(st.sampled_from(["c@x", "y" * 256, "z" * 257]) | st.text(
        st.characters(min_codepoint=33, max_codepoint=126), min_size=1, max_size=300)))
    body = " ".join(fields[:draw(st.integers(0, len(fields)))])
    return cookie + b" " + cmd + b" " + body.encode() + draw(st.sampled_from([b" ", b""]))


@FUZZ
@given(st.lists(st.binary(max_size=400) | legacy_requests(), max_size=8),
       st.booleans())
def test_legacy_requests_never_raise_and_create_only_usable_sessions(datas, with_cookie):
    engine = Engine(EngineConfig(internal_ip=INTERNAL, external_ip=INTERNAL,
                                 port_start=30000, port_end=30199, quarantine=0))
    legacy = LegacyControl(engine)
    for i, data in enumerate(datas):
        out = legacy.handle(data, ("127.0.0.1", 41000), float(i), with_cookie=with_cookie)
        if out.reply is not None:
            # the module's replies echo the request: P PONG (+5), G + 52 bytes (+53),
            # S/D + OK (+2); never more
            assert len(out.reply) <= len(data) + 53
            if with_cookie:
                assert out.reply.startswith(data.partition(b" ")[0] + b" ")
    for session in engine.sessions():
        assert len(session.call_id) <= MAX_CALL_ID
        assert 1 <= session.timeout <= 86400
        for leg in session.legs.values():
            assert leg.announced is None or usable_peer(leg.announced)


@FUZZ
@given(st.tuples(legacy_ips, legacy_ports))
def test_usable_peer_is_a_pure_predicate(addr):
    try:
        ipaddress.ip_address(addr[0])
    except ValueError:
        return
    verdict = usable_peer(addr)
    assert verdict == (addr[1] != 0 and addr[0] not in (
        "0.0.0.0", "255.255.255.255", "239.1.1.1", "240.0.0.1"))


# -- replies, as the client reads them ---------------------------------------------------------
replies = st.fixed_dictionaries({}, optional={
    "v": values, "cookie": st.sampled_from(["mine", None, b"mine"]) | values,
    "ok": st.booleans() | values, "error": values | st.fixed_dictionaries(
        {"code": values, "message": values})})


@FUZZ
@given(st.binary(max_size=500) | replies.map(lambda r: msgpack.packb(r, use_bin_type=True)))
def test_the_client_takes_any_datagram_as_a_reply_or_a_typed_error(data):
    assert decode_reply(data) is None or isinstance(decode_reply(data), dict)
    state = RequestState({"cmd": "ping"}, NodeSet(0, ["udp:127.0.0.1:9"]), retries=1,
                         timeout=1.0, disable_period=1.0, cookies=lambda: "mine")
    state.start(0.0)
    try:
        reply = state.received(data, 0.1)
    except (RelayError, ProtocolError) as exc:
        assert str(exc)
    else:
        assert reply is None or reply["ok"] is True


# -- the reply cache -----------------------------------------------------------------------------
@FUZZ
@given(st.lists(st.tuples(st.sampled_from(["store", "lookup", "discard", "begin"]),
                          st.integers(0, 20), st.integers(0, 70000), st.floats(0, 100)),
                max_size=60))
def test_the_reply_cache_never_holds_more_bytes_than_its_bound(ops: List[Tuple]):
    cache = ReplayCache(max_bytes=200_000)
    now = 0.0
    for op, cookie, size, dt in ops:
        now += dt
        key = f"c{cookie}"
        if op == "store":
            cache.store(SENDER, key, b"r" * size, now)
        elif op == "lookup":
            cache.lookup(SENDER, key, now)
        elif op == "discard":
            cache.discard(SENDER, key)
        else:
            cache.begin(SENDER, key)
        assert 0 <= cache.bytes <= cache.max_bytes
        assert cache.bytes == sum(len(e[1]) + len(k[1]) + ENTRY_OVERHEAD
                                  for k, e in cache._entries.items())


@pytest.mark.parametrize("cmd", sorted(set(COMMANDS)))
def test_every_command_with_no_arguments_is_answered(cmd):
    """A deterministic floor under the properties: each command alone, signed."""
    ctl = control()
    out = ctl.handle(signed(pack({"cmd": cmd, "cookie": cmd})), SENDER, 10.0)
    check_reply(ctl, out.reply)
