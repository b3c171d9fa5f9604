"""Unit tests of lrk.control.legacy.LegacyControl: the Kamailio lrkproxy wire protocol.

Sans-IO with a fake clock (plain floats): requests are built byte for byte as Kamailio
5.6.3's lrkproxy module builds them, and replies are checked the way the module checks
them (see docs/kamailio.md).
"""

from __future__ import annotations

import struct
from typing import Any, List, Tuple

import pytest
from netaddr import IPSet

from lrk.control.legacy import LEGACY_COUNTERS, MAX_REQUEST, LegacyControl
from lrk.core.engine import Engine, EngineConfig, Install, Remove, Update
from lrk.core.session import LEG_A, LEG_B
from lrk.daemon.config import Config

try:
    from reports import feed
except ImportError:  # run from the repository root
    from tests.unit.reports import feed

INTERNAL, EXTERNAL = "127.0.0.1", "127.0.0.2"
KAM = ("127.0.0.1", 41000)  # one Kamailio worker's connected UDP socket
COOKIE = b"4242_7"  # 5.6.3 cookies are <pid>_<seq>
CALLER = ("192.0.2.10", 40000)  # src: the caller's SDP media address
CALLEE = ("198.51.100.20", 50000)  # dnat: the callee's SDP media address
G_STRUCT = "<iii20s20s"


def make_engine(**kw) -> Engine:
    cfg = dict(internal_ip=INTERNAL, external_ip=EXTERNAL, port_start=30000,
               port_end=30099, quarantine=0)
    cfg.update(kw)
    return Engine(EngineConfig(**cfg))


def make(engine: Engine = None, **kw) -> Tuple[LegacyControl, Engine]:
    engine = engine or make_engine()
    return LegacyControl(engine, **kw), engine


def fields(src=CALLER, dst=(INTERNAL, 30000), snat=(INTERNAL, 30002), dnat=CALLEE,
           timeout="60", call_id="call-1@test") -> bytes:
    """The module's S/D body after the command letter: ' src dst snat dnat sp dp np nnp T id '."""
    return (f" {src[0]} {dst[0]} {snat[0]} {dnat[0]} {src[1]} {dst[1]} {snat[1]} {dnat[1]} "
            f"{timeout} {call_id} ").encode()


def s_req(cookie: bytes = COOKIE, cmd: bytes = b"S", **kw) -> bytes:
    return cookie + b" " + cmd + fields(**kw)


def dropped(legacy: LegacyControl) -> dict:
    return {k: v for k, v in legacy.counters.items() if k.startswith("legacy.dropped.") and v}


def still_works(legacy: LegacyControl, now: float = 100.0) -> None:
    assert legacy.handle(b"999_1 P", KAM, now).reply == b"999_1 P PONG"


def module_allocations(start: int, end: int, current: int, n: int) -> List[int]:
    """current_port as the module hands it out: use it, then +4, or wrap to start once
    current >= end (so the value that first reaches or passes end is still handed out)."""
    out = []
    for _ in range(n):
        out.append(current)
        current = start if current >= end else current + 4
    return out


def held(engine: Engine, port: int) -> bool:
    """Whether `port` is in use on either relay address (each has its own range)."""
    return any(engine.ports.is_in_use(ip, port) for ip in (INTERNAL, EXTERNAL))


def owner_at(engine: Engine, port: int) -> Any:
    """The session holding `port` on either relay address, or None."""
    found = [engine.owner.get((ip, port)) for ip in (INTERNAL, EXTERNAL)]
    return next((s for s in found if s is not None), None)


def run_before_held(engine: Engine, seq: List[int]) -> int:
    """How many of the module's allocations (each p and p+2, RTCP +1) miss every held port."""
    for i, p in enumerate(seq):
        if held(engine, p) or held(engine, p + 2):
            return i
    return len(seq)


def g_config(legacy: LegacyControl, now: float = 0.0, cookie: bytes = b"4242_99"):
    reply = legacy.handle(cookie + b" G", KAM, now).reply
    prefix = cookie + b" G "
    assert reply.startswith(prefix)
    assert len(reply) == len(cookie + b" ") + 1 + 52 + 1  # the module's length check
    return struct.unpack(G_STRUCT, reply[len(prefix):])


# -- P and G -------------------------------------------------------------------------------
def test_ping_reply_is_exact():
    legacy, _ = make()
    out = legacy.handle(COOKIE + b" P", KAM, 0.0)
    assert out.reply == COOKIE + b" P PONG"
    assert out.actions == []
    # the module: len == len(cookie + " ") + len("P") + 4 + 1
    assert len(out.reply) == len(COOKIE + b" ") + 1 + 4 + 1
    assert legacy.counters["legacy.requests.P"] == 1


def test_every_counter_is_present_from_the_start():
    legacy, _ = make()
    assert set(LEGACY_COUNTERS) <= set(legacy.counters)
    assert all(legacy.counters[name] == 0 for name in LEGACY_COUNTERS)


def test_config_reply_layout():
    legacy, _ = make()
    reply = legacy.handle(COOKIE + b" G", KAM, 0.0).reply
    assert reply[:len(COOKIE) + 3] == COOKIE + b" G "
    payload = reply[len(COOKIE) + 3:]
    assert len(payload) == 52 == struct.calcsize(G_STRUCT)
    start, end, current, internal, external = struct.unpack(G_STRUCT, payload)
    assert internal == INTERNAL.encode().ljust(20, b"\0")
    assert external == EXTERNAL.encode().ljust(20, b"\0")
    assert (start, current) == (30000, 30000)  # nothing held: the first block
    assert end == 30096  # highest block start whose p .. p+3 fits in 30000-30099
    assert legacy.counters["legacy.requests.G"] == 1


@pytest.mark.parametrize("port_start, port_end", [
    (30000, 30099), (30000, 30100), (30001, 30099), (30001, 30050), (30003, 30010),
    (30000, 30003),
])
def test_config_keeps_every_allocation_inside_the_range(port_start, port_end):
    legacy, engine = make(make_engine(port_start=port_start, port_end=port_end))
    start, end, current, _, _ = g_config(legacy)
    assert start >= port_start and start % 2 == 0  # an odd range start is rounded up
    assert (end - start) % 4 == 0 and (current - start) % 4 == 0
    assert end + 3 <= port_end  # current_port + 3 never leaves the range ...
    assert end + 4 + 3 > port_end  # ... and no whole block is wasted at the top
    seq = module_allocations(start, end, current, 3 * ((end - start) // 4 + 1))
    for p in seq:
        assert port_start <= p and p + 3 <= port_end
        # the S the module sends for this call (dst = p, snat = p + 2) is accepted
        assert engine.ports.contains(p) and engine.ports.contains(p + 2)


def test_config_current_port_starts_the_longest_run_of_free_blocks():
    legacy, engine = make()
    for n, dst in enumerate((30000, 30040)):  # two live legacy calls hold blocks
        out = legacy.handle(s_req(cookie=b"1_%d" % n, dst=(INTERNAL, dst),
                                  snat=(INTERNAL, dst + 2), call_id=f"held-{n}"), KAM, 0.0)
        assert isinstance(out.actions[-1], Install)
    # and a msgpack call, its ports from the allocator (not on the module's 4-port grid)
    engine.offer(0.0, "msgpack-call", "tag", CALLER)
    taken = sorted(p for p in range(30000, 30100, 2) if held(engine, p))
    assert taken == [30000, 30002, 30004, 30006, 30040, 30042]
    start, end, current, _, _ = g_config(legacy, 1.0)
    assert (start, end) == (30000, 30096)
    # free blocks: 30008..30036 (8) and 30044..30096 (14): the module starts on the longer
    assert current == 30044
    n_blocks = (end - start) // 4 + 1
    best = max(run_before_held(engine, module_allocations(start, end, b, n_blocks))
               for b in range(start, end + 1, 4))
    got = run_before_held(engine, module_allocations(start, end, current, n_blocks))
    assert got == best == 14


def test_config_longest_run_may_wrap_past_the_end():
    legacy, engine = make()
    # hold only 30040: free blocks are 30044..30096 then (wrapping) 30000..30036
    legacy.handle(s_req(dst=(INTERNAL, 30040), snat=(INTERNAL, 30042)), KAM, 0.0)
    start, end, current, _, _ = g_config(legacy, 1.0)
    seq = module_allocations(start, end, current, 25)
    assert current == 30044
    assert run_before_held(engine, seq) == 24  # every free block before reaching 30040
    assert seq[13] == 30096 and seq[14] == 30000  # wraps at end_port to start_port


def test_config_follows_the_sessions_that_ended():
    legacy, engine = make()
    legacy.handle(s_req(dst=(INTERNAL, 30000), snat=(INTERNAL, 30002)), KAM, 0.0)
    assert g_config(legacy, 1.0)[2] == 30004
    assert engine.expire(61.0)  # the call fell silent and ended: its block is free again
    assert g_config(legacy, 62.0, cookie=b"1_9")[2] == 30000


# -- S ---------------------------------------------------------------------------------------
def test_set_creates_the_session_and_echoes_the_request():
    legacy, engine = make()
    req = s_req(dst=(INTERNAL, 30010), snat=(EXTERNAL, 30012))
    out = legacy.handle(req, KAM, 0.0)
    assert out.reply == req + b"OK"
    assert len(out.reply) == len(req) + 2  # the module: len == more + len(cookie " ") + 2
    assert req.endswith(b"call-1@test ")  # the module's trailing space is kept in the echo
    assert len(out.actions) == 1 and isinstance(out.actions[0], Install)
    session = legacy.engine.by_sid[out.actions[0].sid]
    assert engine.by_call["call-1@test"] is session
    a, b = session.legs[LEG_A], session.legs[LEG_B]
    assert (a.relay_ip, a.relay_port) == (EXTERNAL, 30012)  # snat: the caller sends here
    assert a.announced == CALLER  # src
    assert a.rtcp_announced == (CALLER[0], CALLER[1] + 1)
    assert (b.relay_ip, b.relay_port) == (INTERNAL, 30010)  # dst: the callee sends here
    assert b.announced == CALLEE  # dnat
    assert b.rtcp_announced == (CALLEE[0], CALLEE[1] + 1)
    assert a.rtcp_port == 30013 and b.rtcp_port == 30011
    assert session.timeout == 60.0
    for port in (30010, 30011, 30012, 30013):
        assert held(engine, port)
    assert owner_at(engine, 30010) is session and owner_at(engine, 30012) is session
    assert legacy.counters["legacy.requests.S"] == 1
    assert legacy.counters["legacy.sessions.created"] == 1


def test_set_again_with_a_new_cookie_is_unchanged():
    """183 with SDP then 200 with SDP: two S, different cookies, identical fields."""
    legacy, engine = make()
    first = legacy.handle(s_req(cookie=b"100_1"), KAM, 0.0)
    session = legacy.engine.by_sid[first.actions[0].sid]
    req = s_req(cookie=b"100_2")
    out = legacy.handle(req, KAM, 3.0)
    assert out.reply == req + b"OK"
    assert out.actions == []
    assert engine.by_call["call-1@test"] is session and len(engine.by_call) == 1
    assert legacy.counters["legacy.sessions.unchanged"] == 1
    assert legacy.counters["legacy.sessions.created"] == 1
    assert legacy.counters["legacy.requests.S"] == 2


def test_retransmission_gets_the_same_bytes_and_no_second_side_effect():
    legacy, engine = make()
    req = s_req()
    first = legacy.handle(req, KAM, 0.0)
    again = legacy.handle(req, KAM, 1.0)
    assert again.reply == first.reply == req + b"OK"
    assert again.actions == []
    assert legacy.counters["legacy.retransmissions"] == 1
    assert legacy.counters["legacy.requests.S"] == 1
    assert legacy.counters["legacy.sessions.created"] == 1
    assert legacy.counters["legacy.sessions.unchanged"] == 0
    assert len(engine.by_call) == 1
    # P and G retransmissions too
    ping = legacy.handle(b"100_5 P", KAM, 2.0).reply
    assert legacy.handle(b"100_5 P", KAM, 2.5).reply == ping
    assert legacy.counters["legacy.retransmissions"] == 2
    # the same cookie from another worker's socket is a new request, not a retransmission
    other = legacy.handle(req, ("127.0.0.1", 41001), 3.0)
    assert other.reply == req + b"OK" and other.actions == []
    assert legacy.counters["legacy.retransmissions"] == 2
    assert legacy.counters["legacy.sessions.unchanged"] == 1


def test_changed_peer_updates_the_leg():
    legacy, engine = make()
    session = created(legacy, legacy.handle(s_req(cookie=b"1_1"), KAM, 0.0))
    gen_a, gen_b = session.legs[LEG_A].generation, session.legs[LEG_B].generation
    session.legs[LEG_B].media[0].latched = ("198.51.100.20", 50000)
    req = s_req(cookie=b"1_2", dnat=("198.51.100.20", 50002))  # another branch answered
    out = legacy.handle(req, KAM, 2.0)
    assert out.reply == req + b"OK"
    assert len(out.actions) == 1 and isinstance(out.actions[0], Update)
    assert out.actions[0].sid == session.sid and out.actions[0].leg == LEG_B
    assert engine.by_call["call-1@test"] is session
    assert session.legs[LEG_B].announced == ("198.51.100.20", 50002)
    assert session.legs[LEG_B].latched is None  # re-latches
    assert session.legs[LEG_B].generation == gen_b + 1
    assert session.legs[LEG_A].generation == gen_a  # untouched
    assert legacy.counters["legacy.sessions.updated"] == 1
    # the caller's address changing re-latches leg A
    out = legacy.handle(s_req(cookie=b"1_3", src=("192.0.2.11", 40000),
                              dnat=("198.51.100.20", 50002)), KAM, 3.0)
    assert [(type(a), a.leg) for a in out.actions] == [(Update, LEG_A)]


def test_changed_relay_ports_replace_the_session():
    legacy, engine = make()
    old = created(legacy, legacy.handle(s_req(cookie=b"1_1"), KAM, 0.0))
    req = s_req(cookie=b"1_2", dst=(INTERNAL, 30020), snat=(INTERNAL, 30022))
    out = legacy.handle(req, KAM, 1.0)
    assert out.reply == req + b"OK"
    assert [type(a) for a in out.actions] == [Remove, Install]
    assert out.actions[0].sid == old.sid and out.actions[0].reason == "replaced"
    new = legacy.engine.by_sid[out.actions[1].sid]
    assert new is not old and new.sid != old.sid
    assert engine.by_call["call-1@test"] is new
    assert not held(engine, 30000) and not held(engine, 30002)
    assert held(engine, 30020) and held(engine, 30022)
    assert owner_at(engine, 30000) is None and owner_at(engine, 30020) is new
    assert engine.counters["sessions.expired.replaced"] == 1
    assert legacy.counters["legacy.sessions.created"] == 2


def created(legacy: LegacyControl, outcome: Any) -> Any:
    """The session an S created (its Install action names it)."""
    return legacy.engine.by_sid[outcome.actions[0].sid]


# -- port conflicts --------------------------------------------------------------------------
def _holder(legacy: LegacyControl, now: float = 0.0):
    return created(legacy, legacy.handle(s_req(cookie=b"1_1", call_id="old@test"), KAM, now))


@pytest.mark.parametrize("media_at, now", [(None, 3.0), (5.0, 12.0), (5.0, 14.99)])
def test_port_of_a_live_call_is_not_hijacked(media_at, now):
    legacy, engine = make()
    old = _holder(legacy)
    if media_at is not None:
        feed(engine, old.sid, {"last_rx": media_at, "legs": {}})
    # another Kamailio (or one restarted) hands out the same ports for another call
    req = s_req(cookie=b"2_1", call_id="new@test", src=("192.0.2.99", 41000))
    out = legacy.handle(req, ("127.0.0.1", 42000), now)
    assert out.reply == req + b"OK"  # the module cannot read an error anyway
    assert out.actions == []
    assert engine.by_call == {"old@test": old}
    assert owner_at(engine, 30000) is old and owner_at(engine, 30002) is old
    assert old.legs[LEG_A].announced == CALLER and old.legs[LEG_B].announced == CALLEE
    assert held(engine, 30000) and held(engine, 30002)
    assert engine.counters["legacy.conflicts.refused"] == 1
    assert legacy.counters["legacy.sessions.refused"] == 1
    assert legacy.counters["legacy.sessions.created"] == 1


@pytest.mark.parametrize("media_at, now", [(None, 10.0), (5.0, 15.0), (5.0, 100.0)])
def test_port_of_a_silent_call_is_taken_over(media_at, now):
    legacy, engine = make(takeover_idle=10.0)
    old = _holder(legacy)
    if media_at is not None:
        feed(engine, old.sid, {"last_rx": media_at, "legs": {}})
    req = s_req(cookie=b"2_1", call_id="new@test")
    out = legacy.handle(req, ("127.0.0.1", 42000), now)
    assert out.reply == req + b"OK"
    assert [type(a) for a in out.actions] == [Remove, Install]
    assert out.actions[0].sid == old.sid and out.actions[0].reason == "replaced"
    new = legacy.engine.by_sid[out.actions[1].sid]
    assert new.call_id == "new@test"
    assert engine.by_call == {"new@test": new}
    assert owner_at(engine, 30000) is new and owner_at(engine, 30002) is new
    assert engine.counters["legacy.conflicts.replaced"] == 1
    assert engine.counters["sessions.expired.replaced"] == 1
    assert legacy.counters["legacy.sessions.created"] == 2


def test_takeover_idle_is_configurable():
    legacy, engine = make(takeover_idle=30.0)
    _holder(legacy)
    assert legacy.handle(s_req(cookie=b"2_1", call_id="new@test"), KAM, 29.0).actions == []
    assert list(engine.by_call) == ["old@test"]
    out = legacy.handle(s_req(cookie=b"2_2", call_id="new@test"), KAM, 30.0)
    assert [type(a) for a in out.actions] == [Remove, Install]


def test_refused_set_leaves_engine_and_data_plane_consistent():
    """A refused S must not end a session without telling the data plane (no Remove).

    A silent call holds 30000/30002. An S (e.g. from a Kamailio whose current_port
    predates a change of lrk's range) names snat 30000, held by the silent call, and
    dst 29998, outside the range. It is refused for the out-of-range port; whatever
    happens to the silent call, the engine and the actions must agree on it.
    """
    legacy, engine = make()
    old = _holder(legacy)
    req = s_req(cookie=b"2_1", call_id="new@test", dst=(INTERNAL, 29998),
                snat=(INTERNAL, 30000))
    out = legacy.handle(req, ("127.0.0.1", 42000), 60.0)
    assert out.reply == req + b"OK"
    assert "new@test" not in engine.by_call
    assert legacy.counters["legacy.sessions.refused"] == 1
    removed = [a.sid for a in out.actions if isinstance(a, Remove)]
    ended = "old@test" not in engine.by_call
    assert ended == (old.sid in removed), (
        "the silent call was ended in the engine but no Remove reached the data plane: "
        "its sockets stay bound while its ports count as free")


def test_port_of_a_live_msgpack_call_is_not_hijacked():
    legacy, engine = make()
    session, _, _ = engine.offer(0.0, "msgpack@test", "tag", CALLER)
    assert session.ports() == [30000, 30002]
    out = legacy.handle(s_req(call_id="legacy@test"), KAM, 2.0)
    assert out.actions == [] and list(engine.by_call) == ["msgpack@test"]
    # refused before the engine is asked: a legacy S never touches a msgpack call
    assert legacy.counters["legacy.refused.msgpack_call"] == 1


def test_client_chosen_ports_bypass_quarantine_and_stay_out_of_the_allocator():
    legacy, engine = make(make_engine(quarantine=5.0))
    legacy.handle(s_req(cookie=b"1_1", call_id="first@test"), KAM, 0.0)
    legacy.handle(s_req(cookie=b"1_2", cmd=b"D", call_id="first@test"), KAM, 1.0)
    assert engine.ports.quarantined == 2
    # the module hands the same block out again at once: lrk cannot refuse it
    out = legacy.handle(s_req(cookie=b"1_3", call_id="second@test"), KAM, 2.0)
    assert isinstance(out.actions[0], Install)
    assert engine.ports.quarantined == 0
    # the quarantine ending later does not free the ports the second call now holds
    session, _, _ = engine.offer(10.0, "msgpack@test", "tag", CALLER)
    assert not set(session.ports()) & {30000, 30002}
    assert owner_at(engine, 30000).call_id == "second@test"


# -- refused relay addresses -----------------------------------------------------------------
@pytest.mark.parametrize("dst, snat, counter", [
    (("10.9.9.9", 30000), (INTERNAL, 30002), "legacy.refused.bad_relay_address"),
    ((INTERNAL, 30000), ("10.9.9.9", 30002), "legacy.refused.bad_relay_address"),
    ((INTERNAL, 30001), (INTERNAL, 30002), "legacy.refused.bad_relay_address"),
    ((INTERNAL, 30000), (INTERNAL, 30003), "legacy.refused.bad_relay_address"),
    ((INTERNAL, 30000), (INTERNAL, 30000), "legacy.refused.bad_relay_address"),
    ((INTERNAL, 30000), (EXTERNAL, 30000), "legacy.refused.bad_relay_address"),
    ((INTERNAL, 40000), (INTERNAL, 40002), "legacy.sessions.refused"),
    ((INTERNAL, 30098), (INTERNAL, 30100), "legacy.sessions.refused"),
])
def test_unusable_relay_address_is_refused_but_answered(dst, snat, counter):
    legacy, engine = make()
    req = s_req(dst=dst, snat=snat)
    out = legacy.handle(req, KAM, 0.0)
    assert out.reply == req + b"OK"
    assert out.actions == []
    assert engine.by_call == {}
    assert engine.ports.in_use == 0
    assert legacy.counters[counter] == 1
    assert legacy.counters["legacy.sessions.created"] == 0
    if counter == "legacy.sessions.refused":
        assert engine.counters["legacy.ports_outside_range"] == 1
    assert dropped(legacy) == {}


# -- D -----------------------------------------------------------------------------------------
def test_delete_ends_the_session_and_releases_its_ports():
    legacy, engine = make()
    session = created(legacy, legacy.handle(s_req(cookie=b"1_1"), KAM, 0.0))
    req = s_req(cookie=b"1_2", cmd=b"D")
    out = legacy.handle(req, KAM, 5.0)
    assert out.reply == req + b"OK"
    assert [type(a) for a in out.actions] == [Remove]
    assert out.actions[0].sid == session.sid and out.actions[0].reason == "deleted"
    assert engine.by_call == {} and engine.owner == {}
    assert engine.ports.in_use == 0
    assert engine.counters["sessions.deleted"] == 1
    assert legacy.counters["legacy.requests.D"] == 1


def test_delete_of_an_unknown_call_still_replies():
    legacy, engine = make()
    legacy.handle(s_req(cookie=b"1_1"), KAM, 0.0)
    req = s_req(cookie=b"1_2", cmd=b"D", call_id="nobody@test")
    out = legacy.handle(req, KAM, 1.0)
    assert out.reply == req + b"OK"
    assert out.actions == []
    assert list(engine.by_call) == ["call-1@test"]


# -- timeout -----------------------------------------------------------------------------------
def test_timeout_field_is_the_silence_timeout():
    legacy, engine = make(make_engine(silence_timeout=600.0))
    session = created(legacy, legacy.handle(s_req(timeout="60"), KAM, 0.0))
    assert session.timeout == 60.0
    assert engine.expire(59.9) == []
    feed(engine, session.sid, {"last_rx": 50.0, "legs": {}})
    assert engine.expire(109.9) == []
    actions = engine.expire(110.0)
    assert [(type(a), a.sid, a.reason) for a in actions] == [(Remove, session.sid, "silence")]
    assert engine.by_call == {} and engine.ports.in_use == 0
    for port in (30000, 30002):
        assert not held(engine, port)
    # the ports are free for the module's next call on them
    out = legacy.handle(s_req(cookie=b"1_2", call_id="next@test"), KAM, 111.0)
    assert isinstance(out.actions[0], Install)


@pytest.mark.parametrize("field", ["0", "-5"])
def test_timeout_field_out_of_bounds_uses_the_engine_default(field):
    legacy, _ = make(make_engine(silence_timeout=42.0))
    session = created(legacy, legacy.handle(s_req(timeout=field), KAM, 0.0))
    assert session.timeout == 42.0


@pytest.mark.parametrize("field, want", [("1", 1.0), ("86400", 86400.0), ("86401", 86400.0),
                                         ("99999999999", 86400.0)])
def test_timeout_field_is_honoured_and_clamped(field, want):
    legacy, _ = make(make_engine(silence_timeout=42.0))
    session = created(legacy, legacy.handle(s_req(timeout=field), KAM, 0.0))
    assert session.timeout == want


def test_legacy_timeout_option_wins_over_the_field():
    legacy, engine = make(timeout=5.0)
    session = created(legacy, legacy.handle(s_req(cookie=b"1_1", timeout="60"), KAM, 0.0))
    assert session.timeout == 5.0
    # a second S for the same call keeps the override
    legacy.handle(s_req(cookie=b"1_2", timeout="60"), KAM, 1.0)
    assert session.timeout == 5.0
    assert engine.expire(4.9) == []
    assert [a.reason for a in engine.expire(5.0)] == ["silence"]
    assert engine.ports.in_use == 0


# -- Call-ID lengths ---------------------------------------------------------------------------
@pytest.mark.parametrize("length", [48, 49, 200, 256])
def test_long_call_ids_are_accepted(length):
    legacy, engine = make()
    call_id = ("c" * length)[:length - 5] + "@test"
    assert len(call_id) == length
    req = s_req(call_id=call_id)
    out = legacy.handle(req, KAM, 0.0)
    assert out.reply == req + b"OK"
    assert isinstance(out.actions[0], Install)
    assert list(engine.by_call) == [call_id]
    out = legacy.handle(s_req(cookie=b"1_2", cmd=b"D", call_id=call_id), KAM, 1.0)
    assert [type(a) for a in out.actions] == [Remove]


# -- malformed requests ------------------------------------------------------------------------
def _s_with_fields(n_fields: int) -> bytes:
    parts = fields().split()
    parts = (parts + [b"extra"] * 5)[:n_fields]
    return COOKIE + b" S " + b" ".join(parts) + b" "


MALFORMED = [
    (b"P", "legacy.dropped.malformed"),  # no cookie on UDP
    (b" P", "legacy.dropped.malformed"),  # empty cookie
    (b"", "legacy.dropped.malformed"),
    (COOKIE, "legacy.dropped.malformed"),
    (COOKIE + b" ", "legacy.dropped.malformed"),
    (COOKIE + b" X", "legacy.dropped.unknown_command"),
    (COOKIE + b" p", "legacy.dropped.unknown_command"),
    (COOKIE + b" Px", "legacy.dropped.unknown_command"),
    (COOKIE + b" PONG", "legacy.dropped.unknown_command"),
    (COOKIE + b" GG", "legacy.dropped.unknown_command"),
    (COOKIE + b"  P", "legacy.dropped.unknown_command"),
    (_s_with_fields(9), "legacy.dropped.malformed"),
    (_s_with_fields(11), "legacy.dropped.malformed"),
    (COOKIE + b" S", "legacy.dropped.malformed"),
    (s_req(src=("192.0.2.10", "4000a")), "legacy.dropped.malformed"),
    (s_req(dst=(INTERNAL, "0x7530")), "legacy.dropped.malformed"),
    (s_req(dnat=("198.51.100.20", "")), "legacy.dropped.malformed"),
    (s_req(src=("192.0.2.999", 40000)), "legacy.dropped.malformed"),
    (s_req(dnat=("callee.example", 50000)), "legacy.dropped.malformed"),
    (s_req(snat=("127.0.0", 30002)), "legacy.dropped.malformed"),
    (s_req(src=("192.0.2.10", 70000)), "legacy.dropped.malformed"),
    (s_req(dst=(INTERNAL, 70000), snat=(INTERNAL, 70002)), "legacy.dropped.malformed"),
    (s_req(dnat=("198.51.100.20", -2)), "legacy.dropped.malformed"),
    (s_req(timeout="sixty"), "legacy.dropped.malformed"),
    (COOKIE + b" D", "legacy.dropped.malformed"),
    (b"\x00\xff\x13\x37\x80", "legacy.dropped.malformed"),
    (b"\x00\xff \xfe\x01\x02", "legacy.dropped.unknown_command"),
    (bytes(range(256)), "legacy.dropped.unknown_command"),  # cookie b"\x00".."\x1f", then "!"
    (COOKIE + b" P" + b" " * MAX_REQUEST, "legacy.dropped.too_large"),
    (s_req(call_id="x" * (MAX_REQUEST + 1)), "legacy.dropped.too_large"),
]


@pytest.mark.parametrize("data, counter", MALFORMED)
def test_malformed_request_is_dropped_and_counted(data, counter):
    legacy, engine = make()
    out = legacy.handle(data, KAM, 0.0)
    assert out.reply is None
    assert out.actions == []
    assert dropped(legacy) == {counter: 1}
    assert engine.by_call == {} and engine.ports.in_use == 0
    assert not any(legacy.counters[f"legacy.sessions.{k}"] for k in ("created", "refused"))
    still_works(legacy)
    # and a well-formed S right after it goes through
    req = s_req(cookie=b"999_2")
    assert legacy.handle(req, KAM, 100.0).reply == req + b"OK"
    assert list(engine.by_call) == ["call-1@test"]


def test_largest_accepted_request():
    legacy, engine = make()
    base = s_req(cookie=b"", call_id="y" * 256)
    cookie = b"c" * (MAX_REQUEST - len(base))
    req = s_req(cookie=cookie, call_id="y" * 256)
    assert len(req) == MAX_REQUEST
    assert legacy.handle(req, KAM, 0.0).reply == req + b"OK"
    assert list(engine.by_call) == ["y" * 256]


@pytest.mark.parametrize("length", [257, 1000])
def test_call_ids_longer_than_msgpack_allows_are_refused(length):
    """One limit for both protocols (256 bytes): every legacy call can be queried and
    deleted over msgpack."""
    legacy, engine = make()
    req = s_req(call_id="c" * length)
    assert legacy.handle(req, KAM, 0.0).reply == req + b"OK"
    assert engine.by_call == {}
    assert legacy.counters["legacy.refused.call_id_too_long"] == 1


def test_malformed_retransmission_is_not_cached_as_an_answer():
    legacy, _ = make()
    assert legacy.handle(COOKIE + b" Px", KAM, 0.0).reply is None
    assert legacy.handle(COOKIE + b" Px", KAM, 0.5).reply is None
    assert legacy.counters["legacy.dropped.unknown_command"] == 2
    assert legacy.counters["legacy.retransmissions"] == 0
    # the cookie is free for a valid request
    assert legacy.handle(COOKIE + b" P", KAM, 1.0).reply == COOKIE + b" P PONG"


# -- allow-list --------------------------------------------------------------------------------
def test_sender_outside_the_allow_list_gets_nothing():
    legacy, engine = make(allow=Config().legacy_allow_set)  # 127.0.0.0/8, ::1/128
    for sender in (("192.0.2.1", 5060), ("10.0.0.1", 41000), ("2001:db8::1", 5060, 0, 0)):
        out = legacy.handle(s_req(), sender, 0.0)
        assert out.reply is None and out.actions == []
        assert legacy.handle(COOKIE + b" P", sender, 0.0).reply is None
    assert legacy.counters["legacy.dropped.not_allowed"] == 6
    assert legacy.counters["legacy.requests.S"] == 0
    assert legacy.counters["legacy.requests.P"] == 0
    assert engine.by_call == {}
    # loopback, IPv4 and IPv6, and a UNIX stream client are served
    assert legacy.handle(b"1_1 P", ("127.0.0.5", 41000), 1.0).reply == b"1_1 P PONG"
    assert legacy.handle(b"1_1 P", ("::1", 41000, 0, 0), 1.0).reply == b"1_1 P PONG"
    assert legacy.handle(b"P", "unix", 1.0, with_cookie=False).reply == b"P PONG"
    assert legacy.counters["legacy.dropped.not_allowed"] == 6


def test_allow_list_narrower_than_loopback():
    legacy, _ = make(allow=IPSet(["127.0.0.1/32"]))
    assert legacy.handle(b"1_1 P", ("127.0.0.2", 1), 0.0).reply is None
    assert legacy.handle(b"1_1 P", ("127.0.0.1", 1), 0.0).reply == b"1_1 P PONG"
    assert legacy.counters["legacy.dropped.not_allowed"] == 1


# -- UNIX stream mode (no cookie) --------------------------------------------------------------
def test_unix_mode_ping_and_config():
    legacy, _ = make()
    assert legacy.handle(b"P", "unix", 0.0, with_cookie=False).reply == b"P PONG"
    assert legacy.handle(b"P\n", "unix", 0.0, with_cookie=False).reply == b"P PONG"
    reply = legacy.handle(b"G", "unix", 0.0, with_cookie=False).reply
    assert reply[:2] == b"G " and len(reply) == 2 + 52
    start, end, current, internal, external = struct.unpack(G_STRUCT, reply[2:])
    assert (start, end, current) == (30000, 30096, 30000)
    assert internal.rstrip(b"\0") == INTERNAL.encode()
    assert external.rstrip(b"\0") == EXTERNAL.encode()
    assert legacy.handle(b"G\r\n", "unix", 0.0, with_cookie=False).reply == reply


def test_unix_mode_set_and_delete():
    legacy, engine = make()
    req = b"S" + fields()  # the module writes the request without its cookie
    out = legacy.handle(req, "unix", 0.0, with_cookie=False)
    assert out.reply == req + b"OK"
    assert isinstance(out.actions[0], Install)
    # no replay cache without cookies: the same request again is an idempotent S
    out = legacy.handle(req + b"\n", "unix", 1.0, with_cookie=False)
    assert out.reply == req + b"OK" and out.actions == []
    assert legacy.counters["legacy.sessions.unchanged"] == 1
    assert legacy.counters["legacy.retransmissions"] == 0
    req = b"D" + fields()
    out = legacy.handle(req, "unix", 2.0, with_cookie=False)
    assert out.reply == req + b"OK"
    assert [type(a) for a in out.actions] == [Remove]
    assert engine.ports.in_use == 0


def test_unix_mode_malformed():
    legacy, _ = make()
    for data, counter in ((b"", "unknown_command"), (b"Px", "unknown_command"),
                          (b"S 1 2 3", "malformed"), (b"1_1 P", "unknown_command")):
        assert legacy.handle(data, "unix", 0.0, with_cookie=False).reply is None
        assert legacy.counters[f"legacy.dropped.{counter}"] >= 1
    assert legacy.handle(b"P", "unix", 0.0, with_cookie=False).reply == b"P PONG"


# -- found in review (2026-12-05) ----------------------------------------------------------
def test_config_advice_is_reused_for_a_second_then_recomputed(monkeypatch):
    """A G of a few bytes does not buy a walk of the whole port range each time (6 ms on
    CPython for the default range): the advice is reused for ADVICE_TTL while no call
    comes or goes; a call that does is followed at once."""
    from lrk.control import legacy as legacy_module

    legacy, _engine = make()
    walks: List[float] = []
    find = LegacyControl._find_advice

    def counting(self: LegacyControl) -> Tuple[int, int, int]:
        walks.append(1)
        return find(self)

    monkeypatch.setattr(LegacyControl, "_find_advice", counting)
    first = g_config(legacy, 10.0)
    assert [g_config(legacy, t, cookie=b"4242_%d" % i) for i, t in
            enumerate((10.2, 10.0 + legacy_module.ADVICE_TTL - 0.01))] == [first, first]
    assert len(walks) == 1
    later = g_config(legacy, 10.0 + legacy_module.ADVICE_TTL, cookie=b"4242_77")
    assert later == first and len(walks) == 2  # after the second: walked again
    # a call that comes (or goes) is followed at once
    legacy.handle(s_req(dst=(INTERNAL, later[2]), snat=(INTERNAL, later[2] + 2)), KAM, 11.1)
    moved = g_config(legacy, 11.2, cookie=b"4242_78")
    assert len(walks) == 3 and moved[2] != later[2]


def test_utf8_call_id_is_one_field():
    """Fields are split on ASCII whitespace only: a UTF-8 Call-ID ('à' is C3 A0, and A0 is
    whitespace to a latin-1 str) is one field, the call is set up and answered (a dropped S
    makes the module retry for seconds and then disable the node)."""
    legacy, engine = make()
    call_id = "voil\u00e0@host"  # sent as UTF-8 (fields() encodes), kept byte for byte
    out = legacy.handle(s_req(call_id=call_id), KAM, 1.0)
    assert out.reply is not None and out.reply.endswith(b"OK")
    assert isinstance(out.actions[-1], Install)
    assert list(engine.by_call) == [call_id.encode().decode("latin-1")]
    assert dropped(legacy) == {}
    out = legacy.handle(COOKIE + b"9 D" + fields(call_id=call_id), KAM, 2.0)
    assert out.reply.endswith(b"OK") and isinstance(out.actions[-1], Remove)
    assert engine.by_call == {}


def test_set_respects_max_sessions():
    """Legacy S creates sessions within max_sessions, as offers do; a refused one is still
    answered OK (the module reads no error) and counted, and an existing call's S is not
    refused."""
    legacy, engine = make(make_engine(max_sessions=1))
    first = legacy.handle(s_req(cookie=b"1_1"), KAM, 1.0)
    assert isinstance(first.actions[-1], Install)
    second = legacy.handle(s_req(cookie=b"1_2", dst=(INTERNAL, 30004),
                                 snat=(INTERNAL, 30006), call_id="call-2@test"), KAM, 1.0)
    assert second.reply.endswith(b"OK") and second.actions == []
    assert list(engine.by_call) == ["call-1@test"]
    assert legacy.counters["legacy.refused.max_sessions"] == 1
    assert engine.counters["sessions.refused.max_sessions"] == 1
    again = legacy.handle(s_req(cookie=b"1_3"), KAM, 2.0)  # the live call's refresh
    assert again.reply.endswith(b"OK") and legacy.counters["legacy.refused.max_sessions"] == 1
