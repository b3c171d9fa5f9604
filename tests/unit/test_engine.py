"""Unit tests of lrk.core.engine.Engine (sans-IO, fake clock)."""

from __future__ import annotations

import pytest

from fastpath.worker.relay_table import RelayTable
from lrk.core.engine import Engine, EngineConfig, Install, Remove, Update
from lrk.core.session import LEG_A, LEG_B, StreamOffer
from lrk.errors import AtCapacity, BadRequest, PortsExhausted, SessionNotFound

try:
    from reports import feed
except ImportError:  # run from the repository root
    from tests.unit.reports import feed

INTERNAL = "10.0.0.1"
EXTERNAL = "203.0.113.1"
CALLER = ("198.51.100.10", 4000)
CALLEE = ("198.51.100.20", 5000)


def make(**kw) -> Engine:
    cfg = dict(internal_ip=INTERNAL, external_ip=EXTERNAL, port_start=30000, port_end=30099)
    cfg.update(kw)
    return Engine(EngineConfig(**cfg))


def call(engine: Engine, now: float = 0.0, call_id: str = "c1", **kw):
    """Offer + answer; returns the session."""
    session, _, _ = engine.offer(now, call_id, "ft", CALLER, **kw)
    engine.answer(now, call_id, "ft", "tt", CALLEE)
    return session


def report(leg_counts=None, gen=None, latched=None, last_rx=None):
    legs = {}
    for name, counts in (leg_counts or {}).items():
        legs[name] = {
            "c": counts,
            "gen": (gen or {}).get(name, 1),
            "latched": (latched or {}).get(name, [None, None]),
        }
    return {"last_rx": last_rx, "legs": legs}


# -- offer / answer ----------------------------------------------------------------


def test_offer_creates_session_with_two_legs_on_distinct_ports():
    engine = make()
    session, leg, actions = engine.offer(1.0, "c1", "ft", CALLER, rtcp_port=4011)
    assert actions == [Install(session.spec())]
    assert leg is session.legs[LEG_B]
    a, b = session.legs[LEG_A], session.legs[LEG_B]
    assert a.relay_port != b.relay_port
    assert a.relay_port % 2 == 0 and b.relay_port % 2 == 0
    # one address per side: one range shared by both, a port number is unique on the relay
    assert engine.ports.is_in_use(INTERNAL, a.relay_port)
    assert engine.ports.is_in_use(EXTERNAL, b.relay_port)
    assert engine.ports.in_use == 2
    assert a.tag == "ft" and b.tag is None
    assert a.announced == CALLER
    assert a.rtcp_announced == (CALLER[0], 4011)
    assert b.announced is None
    assert a.relay_ip == INTERNAL and b.relay_ip == INTERNAL
    assert session.state == "offered"
    assert session.created == 1.0
    assert session.timeout == 60.0
    assert engine.get("c1") is session
    assert engine.by_sid[session.sid] is session
    assert engine.counters["sessions.created"] == 1


def test_rtcp_announced_defaults_to_port_plus_one():
    engine = make()
    session, _, _ = engine.offer(0.0, "c1", "ft", CALLER)
    assert session.legs[LEG_A].rtcp_announced == (CALLER[0], CALLER[1] + 1)


def test_offer_with_port_zero_disables_rtcp_too():
    """A stream on hold (port 0) must not send RTCP to port 1 of the peer."""
    engine = make()
    session, _, _ = engine.offer(0.0, "c1", "ft", (CALLER[0], 0))
    rtcp = session.legs[LEG_A].rtcp_announced
    assert rtcp is None or rtcp[1] == 0, rtcp


def test_two_sessions_get_distinct_sids_and_ports():
    engine = make()
    s1, _, _ = engine.offer(0.0, "c1", "ft", CALLER)
    s2, _, _ = engine.offer(0.0, "c2", "ft", CALLER)
    assert s1.sid != s2.sid
    assert len(set(s1.ports() + s2.ports())) == 4
    assert engine.ports.in_use == 4


def test_answer_returns_leg_a():
    engine = make()
    session, _, _ = engine.offer(0.0, "c1", "ft", CALLER)
    s, leg, actions = engine.answer(1.0, "c1", "ft", "tt", CALLEE)
    assert s is session
    assert leg is session.legs[LEG_A]
    assert actions == [Update(session.spec(), LEG_B)]
    b = session.legs[LEG_B]
    assert b.tag == "tt"
    assert b.announced == CALLEE
    assert b.generation == 1
    assert session.state == "answered"
    assert engine.ports.in_use == 2  # no new ports
    assert engine.counters["sessions.answers"] == 1


def test_answer_is_idempotent():
    engine = make()
    session = call(engine)
    port_a = session.legs[LEG_A].relay_port
    _, leg, actions = engine.answer(2.0, "c1", "ft", "tt", CALLEE)
    assert leg.relay_port == port_a
    assert actions == [Update(session.spec(), LEG_B)]
    assert engine.ports.in_use == 2


def test_answer_unknown_call():
    engine = make()
    with pytest.raises(SessionNotFound):
        engine.answer(0.0, "nope", "ft", "tt", CALLEE)


def test_reoffer_relatches_and_emits_update():
    engine = make()
    session = call(engine)
    a = session.legs[LEG_A]
    feed(engine,
        session.sid,
        report({"A": [1, 100, 0, 0, {}]}, gen={"A": 1}, latched={"A": [CALLER, None]}),
    )
    assert a.latched == CALLER
    ports_before = session.ports()
    s, leg, actions = engine.offer(5.0, "c1", "ft", ("198.51.100.11", 4100), to_tag="tt")
    assert s is session
    assert leg is session.legs[LEG_B]
    assert actions == [Update(session.spec(), LEG_A)]
    assert a.generation == 2
    assert a.latched is None and a.rtcp_latched is None
    assert a.announced == ("198.51.100.11", 4100)
    assert session.ports() == ports_before
    assert engine.counters["sessions.created"] == 1


def test_callee_reinvite_returns_a_relay():
    engine = make()
    session = call(engine)
    b = session.legs[LEG_B]
    s, leg, actions = engine.offer(5.0, "c1", "tt", ("198.51.100.21", 5100), to_tag="ft")
    assert leg is session.legs[LEG_A]
    assert actions == [Update(session.spec(), LEG_B)]
    assert b.announced == ("198.51.100.21", 5100)
    assert b.generation == 2
    assert session.legs[LEG_A].announced == CALLER  # untouched
    # and the caller's answer to it returns B's relay
    _, leg2, actions2 = engine.answer(6.0, "c1", "tt", "ft", ("198.51.100.12", 4200))
    assert leg2 is session.legs[LEG_B]
    assert actions2 == [Update(session.spec(), LEG_A)]
    assert session.legs[LEG_A].announced == ("198.51.100.12", 4200)


def test_offer_timeout_override_on_existing_session():
    engine = make()
    session = call(engine)
    engine.offer(1.0, "c1", "ft", CALLER, timeout=15.0)
    assert session.timeout == 15.0


def test_bad_interface_creates_nothing():
    engine = make()
    with pytest.raises(BadRequest):
        engine.offer(0.0, "c1", "ft", CALLER, interface="dmz")
    assert "c1" not in engine.by_call
    assert engine.ports.in_use == 0


# -- interfaces --------------------------------------------------------------------


def test_interface_external_picks_external_ip_for_offer_target():
    engine = make()
    session, leg, _ = engine.offer(0.0, "c1", "ft", CALLER, interface="external")
    assert leg.name == LEG_B
    assert leg.relay_ip == EXTERNAL
    assert session.legs[LEG_A].relay_ip == INTERNAL


def test_answer_same_interface_does_not_rebind():
    engine = make()
    session, _, _ = engine.offer(0.0, "c1", "ft", CALLER)
    port_a = session.legs[LEG_A].relay_port
    _, leg, actions = engine.answer(1.0, "c1", "ft", "tt", CALLEE, interface="internal")
    assert leg.relay_ip == INTERNAL and leg.relay_port == port_a
    assert all(isinstance(x, Update) for x in actions)


def test_answer_other_interface_rebinds_leg_a():
    engine = make()
    session, _, _ = engine.offer(0.0, "c1", "ft", CALLER)
    a = session.legs[LEG_A]
    old = a.relay_port
    port_b = session.legs[LEG_B].relay_port
    _, leg, actions = engine.answer(1.0, "c1", "ft", "tt", CALLEE, interface="external")
    assert leg is a
    # the plane sees the stream's relay port move: it re-installs that stream
    assert actions == [Update(session.spec(), LEG_B)]
    assert actions[0].spec.a.relay_port != old
    assert a.relay_ip == EXTERNAL
    assert a.relay_port != old
    assert not engine.ports.is_in_use(INTERNAL, old)
    assert engine.ports.is_in_use(INTERNAL, a.relay_port)
    assert engine.ports.in_use == 2
    assert engine.ports.quarantined == 1
    assert session.legs[LEG_B].relay_port == port_b
    assert session.legs[LEG_B].announced == CALLEE
    assert engine.counters["sessions.rebound"] == 1


def test_reoffer_other_interface_rebinds_leg_b():
    engine = make()
    session = call(engine)
    b = session.legs[LEG_B]
    old = b.relay_port
    _, leg, actions = engine.offer(1.0, "c1", "ft", CALLER, to_tag="tt", interface="external")
    assert leg is b
    assert actions == [Update(session.spec(), LEG_A)]
    assert b.relay_ip == EXTERNAL and b.relay_port != old
    assert not engine.ports.is_in_use(INTERNAL, old)
    assert session.legs[LEG_A].generation == 2


def test_rebind_exhaustion_keeps_session_bound():
    engine = make(port_end=30003)  # two pairs only
    session, _, _ = engine.offer(0.0, "c1", "ft", CALLER)
    ports = session.ports()
    with pytest.raises(PortsExhausted):
        engine.answer(1.0, "c1", "ft", "tt", CALLEE, interface="external")
    assert session.ports() == ports
    assert session.legs[LEG_A].relay_ip == INTERNAL
    assert engine.ports.in_use == 2
    assert all(engine.ports.is_in_use(INTERNAL, p) for p in ports)
    assert engine.counters["ports.exhausted"] == 1


# -- delete ------------------------------------------------------------------------


def test_delete_releases_ports():
    engine = make()
    session = call(engine)
    ports = session.ports()
    s, actions = engine.delete(3.0, "c1")
    assert s is session
    assert actions == [Remove(session.sid, session.call_id, "deleted")]
    assert "c1" not in engine.by_call and session.sid not in engine.by_sid
    assert engine.ports.in_use == 0
    assert engine.ports.quarantined == 2
    assert not any(engine.ports.is_in_use(INTERNAL, p) for p in ports)
    assert engine.counters["sessions.deleted"] == 1
    with pytest.raises(SessionNotFound):
        engine.get("c1")


@pytest.mark.parametrize("tag", ["ft", "tt"])
def test_delete_with_either_leg_tag(tag):
    engine = make()
    call(engine)
    engine.delete(1.0, "c1", from_tag=tag)
    assert "c1" not in engine.by_call


def test_delete_with_wrong_tag_keeps_session():
    engine = make()
    session = call(engine)
    with pytest.raises(SessionNotFound) as exc:
        engine.delete(1.0, "c1", from_tag="other")
    assert "other" in str(exc.value)
    assert engine.get("c1") is session
    assert engine.ports.in_use == 2
    assert engine.counters["sessions.deleted"] == 0


def test_delete_unknown_call():
    engine = make()
    with pytest.raises(SessionNotFound):
        engine.delete(0.0, "nope")


# -- expiry ------------------------------------------------------------------------


def test_expire_on_silence_from_creation():
    engine = make()
    session = call(engine, now=100.0)
    assert not engine.due(159.9)
    assert engine.expire(159.9) == []
    assert engine.due(160.0)
    assert engine.expire(160.0) == [Remove(session.sid, session.call_id, "silence")]
    assert engine.ports.in_use == 0
    assert engine.counters["sessions.expired.silence"] == 1
    assert engine.expire(1000.0) == []
    assert not engine.due(1000.0)


def test_per_session_timeout_override():
    engine = make()
    short, _, _ = engine.offer(0.0, "short", "ft", CALLER, timeout=10.0)
    engine.offer(0.0, "long", "ft", CALLER)
    assert engine.expire(9.0) == []
    assert engine.expire(10.0) == [Remove(short.sid, short.call_id, "silence")]
    assert list(engine.by_call) == ["long"]


def test_configured_silence_timeout():
    engine = make(silence_timeout=5.0)
    session = call(engine)
    assert session.timeout == 5.0
    assert engine.expire(5.0) == [Remove(session.sid, session.call_id, "silence")]


def test_media_postpones_expiry():
    engine = make()
    session = call(engine)
    feed(engine, session.sid, report(last_rx=50.0))
    assert session.last_media == 50.0
    assert not engine.due(100.0)
    assert engine.expire(109.0) == []
    assert engine.expire(110.0) == [Remove(session.sid, session.call_id, "silence")]


def test_older_report_does_not_move_last_media_back():
    engine = make()
    session = call(engine)
    feed(engine, session.sid, report(last_rx=50.0))
    feed(engine, session.sid, report(last_rx=40.0))
    feed(engine, session.sid, report(last_rx=None))
    assert session.last_media == 50.0


def test_max_lifetime():
    engine = make(max_lifetime=100.0)
    session = call(engine)
    for t in range(10, 100, 10):
        feed(engine, session.sid, report(last_rx=float(t)))
        assert engine.expire(float(t)) == []
    assert engine.due(100.0)
    assert engine.expire(100.0) == [Remove(session.sid, session.call_id, "lifetime")]
    assert engine.counters["sessions.expired.lifetime"] == 1
    assert engine.counters["sessions.expired.silence"] == 0
    assert engine.ports.in_use == 0


def test_max_lifetime_zero_disables():
    engine = make(max_lifetime=0.0)
    session = call(engine)
    feed(engine, session.sid, report(last_rx=1e6))
    assert engine.expire(1e6 + 1) == []
    assert session.call_id in engine.by_call


def test_due_agrees_with_expire():
    for step in (0.5, 3.0):
        engine = make(max_lifetime=200.0)
        sessions = []
        for i in range(4):
            s, _, _ = engine.offer(i * 7.0, f"c{i}", "ft", CALLER, timeout=20.0 + 15 * i)
            sessions.append(s)
        feed(engine, sessions[1].sid, report(last_rx=30.0))
        feed(engine, sessions[3].sid, report(last_rx=190.0))
        t = 0.0
        while engine.by_call:
            due = engine.due(t)
            ended = engine.expire(t)
            assert due == bool(ended), t
            t += step
            assert t < 400


def test_expired_ports_reusable_after_quarantine():
    engine = make(port_end=30003, quarantine=5.0)  # room for one session only
    call(engine, now=0.0)
    engine.expire(60.0)
    with pytest.raises(PortsExhausted):
        engine.offer(61.0, "c2", "ft", CALLER)
    session, _, _ = engine.offer(65.0, "c2", "ft", CALLER)
    assert sorted(session.ports()) == [30000, 30002]


# -- reports -----------------------------------------------------------------------


def test_apply_report_counters_are_absolute():
    engine = make()
    session = call(engine)
    feed(engine, session.sid, report({"A": [10, 1000, 9, 900, {"unexpected_source": 1}]}))
    feed(engine, session.sid, report({"A": [20, 2000, 19, 1900, {"unexpected_source": 2}]}))
    c = session.legs[LEG_A].counters
    assert (c.in_packets, c.in_bytes, c.out_packets, c.out_bytes) == (20, 2000, 19, 1900)
    assert c.drops == {"unexpected_source": 2}
    assert session.legs[LEG_B].counters.in_packets == 0
    assert session.packets() == 20


def test_apply_report_adds_base_after_rebind():
    engine = make()
    session, _, _ = engine.offer(0.0, "c1", "ft", CALLER)
    feed(engine,
        session.sid,
        report({"A": [10, 1000, 5, 500, {"no_destination": 3}], "B": [0, 0, 10, 1000, {}]}),
    )
    engine.answer(1.0, "c1", "ft", "tt", CALLEE, interface="external")  # rebind folds
    # the new data-plane install counts from zero again
    feed(engine,
        session.sid,
        report(
            {
                "A": [2, 200, 1, 100, {"no_destination": 1, "unexpected_source": 4}],
                "B": [1, 10, 0, 0, {}],
            },
            gen={"A": 1, "B": 1},
        ),
    )
    a = session.legs[LEG_A].counters
    b = session.legs[LEG_B].counters
    assert (a.in_packets, a.in_bytes, a.out_packets, a.out_bytes) == (12, 1200, 6, 600)
    assert a.drops == {"no_destination": 4, "unexpected_source": 4}
    assert (b.in_packets, b.in_bytes, b.out_packets, b.out_bytes) == (1, 10, 10, 1000)


def test_apply_report_latched_only_when_generation_matches():
    engine = make()
    session = call(engine)
    a = session.legs[LEG_A]
    assert a.generation == 1
    nat = ("198.51.100.10", 61000)
    feed(engine,
        session.sid,
        report(
            {"A": [1, 10, 0, 0, {}]},
            gen={"A": 1},
            latched={"A": [list(nat), ["198.51.100.10", 61001]]},
        ),
    )
    assert a.latched == nat
    assert a.rtcp_latched == ("198.51.100.10", 61001)
    engine.offer(2.0, "c1", "ft", CALLER, to_tag="tt")  # re-latch: generation 2
    assert a.latched is None
    # a report from before the re-offer still carries gen 1: its latch is stale
    feed(engine,
        session.sid,
        report({"A": [2, 20, 0, 0, {}]}, gen={"A": 1}, latched={"A": [list(nat), None]}),
    )
    assert a.latched is None
    assert a.counters.in_packets == 2  # counters still apply
    feed(engine,
        session.sid,
        report({"A": [3, 30, 0, 0, {}]}, gen={"A": 2}, latched={"A": [None, None]}),
    )
    assert a.latched is None
    feed(engine,
        session.sid,
        report(
            {"A": [4, 40, 0, 0, {}]}, gen={"A": 2}, latched={"A": [["198.51.100.10", 62000], None]}
        ),
    )
    assert a.latched == ("198.51.100.10", 62000)


def test_apply_report_unknown_sid_or_leg_ignored():
    engine = make()
    session = call(engine)
    feed(engine, session.sid + 100, report({"A": [5, 5, 5, 5, {}]}, last_rx=9.0))
    feed(engine, session.sid, report({"X": [5, 5, 5, 5, {}]}))
    assert session.legs[LEG_A].counters.in_packets == 0
    assert session.last_media is None


def test_apply_report_after_delete_is_ignored():
    engine = make()
    session = call(engine)
    engine.delete(1.0, "c1")
    feed(engine, session.sid, report({"A": [5, 5, 5, 5, {}]}))
    assert session.legs[LEG_A].counters.in_packets == 0


# -- limits ------------------------------------------------------------------------


def test_ports_exhaustion_leaves_no_half_session():
    engine = make(port_end=30005)  # three pairs: one session and a half
    call(engine)
    with pytest.raises(PortsExhausted):
        engine.offer(1.0, "c2", "ft", CALLER)
    assert "c2" not in engine.by_call
    assert len(engine.by_sid) == 1
    assert engine.ports.in_use == 2  # the half-allocated pair went back
    assert engine.counters["sessions.created"] == 1
    assert engine.counters["ports.exhausted"] == 1
    # nothing leaked: after deleting c1 and the quarantine, a full session fits again
    engine.delete(2.0, "c1")
    session, _, _ = engine.offer(10.0, "c3", "ft", CALLER)
    assert engine.ports.in_use == 2
    assert len(set(session.ports())) == 2


def test_max_sessions():
    engine = make(max_sessions=1)
    call(engine)
    with pytest.raises(AtCapacity, match="max_sessions") as refused:
        engine.offer(0.0, "c2", "ft", CALLER)
    assert refused.value.code == "capacity"  # lrk.client moves the call to another node
    assert engine.ports.in_use == 2
    assert engine.counters["sessions.refused.max_sessions"] == 1
    # re-offers of the existing call are not refused
    engine.offer(1.0, "c1", "ft", CALLER, to_tag="tt")


def test_probe_receives_leg_ip():
    probed = []

    def probe(ip, port):
        probed.append((ip, port))
        return port != 30000

    engine = Engine(
        EngineConfig(internal_ip=INTERNAL, external_ip=EXTERNAL, port_start=30000, port_end=30099),
        probe=probe,
    )
    session, _, _ = engine.offer(0.0, "c1", "ft", CALLER, interface="external")
    assert probed == [(INTERNAL, 30000), (INTERNAL, 30002), (EXTERNAL, 30004)]
    assert session.ports() == [30002, 30004]


def test_counters_over_lifecycle():
    engine = make(max_lifetime=1000.0)
    call(engine, call_id="d")
    call(engine, call_id="s")
    long_call = call(engine, call_id="l")
    engine.delete(1.0, "d")
    feed(engine, long_call.sid, report(last_rx=900.0))
    engine.expire(61.0)  # "s" silent
    engine.expire(1000.0)  # "l" too old
    assert engine.counters["sessions.created"] == 3
    assert engine.counters["sessions.deleted"] == 1
    assert engine.counters["sessions.expired.silence"] == 1
    assert engine.counters["sessions.expired.lifetime"] == 1
    assert engine.counters["sessions.offers"] == 3
    assert engine.counters["sessions.answers"] == 3
    assert engine.ports.in_use == 0
    assert not engine.by_call and not engine.by_sid


def test_timer_floor_is_a_lower_bound_of_get_timer():
    """The relay re-arms after a request from timer_floor(): it must never be later than
    the earliest deadline, including after the earliest call ended or had media."""
    engine = make(silence_timeout=60.0)
    assert engine.timer_floor() is None and engine.get_timer() is None
    call(engine, now=0.0, call_id="c1")
    call(engine, now=5.0, call_id="c2")
    assert engine.timer_floor() == engine.get_timer() == 60.0
    engine.delete(6.0, "c1")
    assert engine.timer_floor() == 60.0  # c1's entry is dead, still the floor
    assert engine.get_timer() == 65.0  # cleaned up on the full read
    assert engine.timer_floor() == 65.0
    engine.by_call["c2"].last_media = 30.0  # media since: the deadline moved later
    assert engine.timer_floor() <= engine.get_timer() == 90.0


# -- answers that do not fit their offer -----------------------------------------------

AV_OFFER = [StreamOffer(CALLER[0], 4000), StreamOffer(CALLER[0], 4002, kind="video")]


def test_answer_with_fewer_streams_than_its_offer_rejects_the_missing_ones():
    """The streams an answer leaves out are rejected as with port 0: their ports go on
    both legs, the answered ones are relayed."""
    engine = make()
    session, _, _ = engine.offer(0.0, "c1", "ft", AV_OFFER)
    assert engine.ports.in_use == 4
    engine.answer(1.0, "c1", "ft", "tt", [StreamOffer(CALLEE[0], 5000)])
    assert session.state == "answered" and session.legs[LEG_B].tag == "tt"
    assert session.legs[LEG_B].media[0].announced == (CALLEE[0], 5000)
    assert session.legs[LEG_A].media[1] is None and session.legs[LEG_B].media[1] is None
    assert engine.ports.in_use == 2 and [s.index for s in session.spec().streams] == [0]


def test_the_one_stream_form_answers_the_first_stream_only():
    engine = make()
    session, _, _ = engine.offer(0.0, "c1", "ft", AV_OFFER)
    engine.answer(1.0, "c1", "ft", "tt", CALLEE)
    assert session.legs[LEG_B].media[0].announced == CALLEE


def test_answer_cannot_enable_a_stream_or_add_one():
    """A stream the offer disabled, or an m= line beyond the offer's, gets no relay
    ports: the offerer is never told to send it anywhere (the reply rejects it)."""
    engine = make()
    session, _, _ = engine.offer(0.0, "c1", "ft", [StreamOffer(CALLER[0], 4000),
                                                    StreamOffer(CALLER[0], 0, kind="video")])
    engine.answer(1.0, "c1", "ft", "tt", [StreamOffer(CALLEE[0], 5000),
                                          StreamOffer(CALLEE[0], 5002, kind="video"),
                                          StreamOffer(CALLEE[0], 5004, kind="text")])
    assert [m is not None for m in session.legs[LEG_A].media] == [True, False]
    assert [m is not None for m in session.legs[LEG_B].media] == [True, False]
    assert [s.index for s in session.spec().streams] == [0]
    assert engine.ports.in_use == 2


# -- old-style hold: c=0.0.0.0 is "send me nothing", not a new address -------------------

HELD = StreamOffer("0.0.0.0", 4000)


def test_old_style_hold_keeps_the_peer_address_for_admission():
    engine = make(strict_source=True)
    session = call(engine)
    engine.offer(2.0, "c1", "ft", [HELD], to_tag="tt")
    a = session.legs[LEG_A].media[0]
    assert (a.announced, a.rtcp_announced) == ((CALLER[0], 0), (CALLER[0], 0))
    engine.offer(3.0, "c1", "ft", [StreamOffer("::", 4000)], to_tag="tt")  # held again
    assert (a.announced, a.rtcp_announced) == ((CALLER[0], 0), (CALLER[0], 0))
    engine.offer(4.0, "c1", "ft", [StreamOffer(CALLER[0], 4010)], to_tag="tt")  # resumed
    assert (a.announced, a.rtcp_announced) == ((CALLER[0], 4010), (CALLER[0], 4011))
    # a first offer on hold has no address to keep: nothing to admit it from
    held, _, _ = engine.offer(5.0, "c2", "ft", [HELD])
    assert held.legs[LEG_A].media[0].announced == ("0.0.0.0", 0)


def test_old_style_hold_under_strict_source_admits_the_holders_music():
    """The data plane admits the holder from its real address and sends it nothing."""
    engine = make(strict_source=True)
    session = call(engine)
    engine.offer(2.0, "c1", "ft", [HELD], to_tag="tt")
    table = RelayTable()
    relay = table.install(1, [10, 11, 12, 13], session.spec().streams[0])
    a_rtp, a_rtcp = relay.endpoints[0], relay.endpoints[1]
    assert table.forward_one(a_rtp, b"moh", (CALLER[0], 4000), 3.0) == CALLEE
    assert table.forward_one(a_rtcp, b"sr", (CALLER[0], 4001), 3.0) == (CALLEE[0], 5001)
    assert table.forward_one(a_rtp, b"x", ("192.0.2.66", 4000), 3.0) is None  # strict
    fresh = RelayTable()  # the holder has not sent: nothing goes to the null address
    relay = fresh.install(1, [10, 11, 12, 13], session.spec().streams[0])
    assert fresh.forward_one(relay.endpoints[2], b"rtp", CALLEE, 3.0) is None
