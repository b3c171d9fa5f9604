"""Forked INVITEs and early media, sans-IO: several 183s with SDP from different To-tags
each get an early dialog with A-side relay ports of its own; the final answer's To-tag
wins (its ports become leg A's), the other early dialogs are freed.

Before this, a second To-tag re-tagged leg B: the first callee's early media stopped and
the caller could never reach the second one on its own ports.
"""

from __future__ import annotations

import pytest

from fastpath.contract import MAX_FORKS, Update
from lrk.core.engine import Engine, EngineConfig
from lrk.core.session import StreamOffer
from lrk.errors import BadRequest

CALLER = ("198.51.100.10", 4000)
CALLEE1 = ("198.51.100.21", 5000)
CALLEE2 = ("198.51.100.22", 6000)
CALLEE3 = ("198.51.100.23", 7000)


def engine() -> Engine:
    return Engine(EngineConfig(port_start=30000, port_end=30199, quarantine=0))


def audio(addr) -> list:
    return [StreamOffer(addr[0], addr[1])]


def offered(e: Engine):
    session, leg_b, actions = e.offer(1.0, "fork", "a", audio(CALLER))
    return session, leg_b.relay_port


def test_second_to_tag_is_an_early_dialog_with_its_own_caller_side_ports():
    e = engine()
    session, b_port = offered(e)
    _s, to_caller1, _ = e.answer(2.0, "fork", "a", "t1", audio(CALLEE1), provisional=True)
    assert session.state == "early" and session.legs["B"].tag == "t1"
    _s, to_caller2, actions = e.answer(3.0, "fork", "a", "t2", audio(CALLEE2),
                                       provisional=True)
    assert session.legs["B"].tag == "t1", "the first callee's dialog is not re-tagged"
    assert to_caller2.relay_port not in (to_caller1.relay_port, b_port)
    spec = actions[0].spec
    assert isinstance(actions[0], Update)
    assert spec.streams[0].b.announced == CALLEE1
    (fork,) = spec.forks
    assert fork.tag == "t2"
    stream = fork.streams[0]
    assert stream.a.relay_port == to_caller2.relay_port
    assert stream.a.announced == CALLER  # the caller sends there too
    assert stream.b.relay_port == b_port  # every callee sends where the offer said
    assert stream.b.announced == CALLEE2
    assert e.ports.in_use == 3  # leg A, leg B, the early dialog's A side
    assert e.counters["sessions.early_dialogs"] == 1


def test_the_same_to_tag_again_updates_its_early_dialog():
    e = engine()
    session, _ = offered(e)
    e.answer(2.0, "fork", "a", "t1", audio(CALLEE1), provisional=True)
    _s, first, _ = e.answer(3.0, "fork", "a", "t2", audio(CALLEE2), provisional=True)
    _s, again, actions = e.answer(3.5, "fork", "a", "t2", audio(CALLEE3), provisional=True)
    assert again is first and len(session.forks) == 1
    assert actions[0].spec.forks[0].streams[0].b.announced == CALLEE3
    assert e.ports.in_use == 3


def test_200_from_a_later_dialog_wins_and_the_others_are_freed():
    e = engine()
    session, b_port = offered(e)
    _s, to_caller1, _ = e.answer(2.0, "fork", "a", "t1", audio(CALLEE1), provisional=True)
    old_a = to_caller1.relay_port
    _s, to_caller2, _ = e.answer(3.0, "fork", "a", "t2", audio(CALLEE2), provisional=True)
    _s, to_caller3, _ = e.answer(3.1, "fork", "a", "t3", audio(CALLEE3), provisional=True)
    _s, final, actions = e.answer(4.0, "fork", "a", "t2", audio(CALLEE2))
    assert session.state == "answered" and session.legs["B"].tag == "t2"
    assert final.relay_port == to_caller2.relay_port, "the caller keeps its 183's ports"
    spec = actions[0].spec
    assert spec.forks == ()
    assert spec.streams[0].a.relay_port == to_caller2.relay_port
    assert spec.streams[0].b.relay_port == b_port
    assert spec.streams[0].b.announced == CALLEE2
    assert not e.ports.is_in_use("127.0.0.1", old_a)
    assert not e.ports.is_in_use("127.0.0.1", to_caller3.relay_port)
    assert e.ports.in_use == 2
    assert e.counters["sessions.early_dialogs.won"] == 1
    assert e.counters["sessions.early_dialogs.freed"] == 1
    e.delete(5.0, "fork")
    assert e.ports.in_use == 0 and not e.owner


def test_200_from_the_first_dialog_frees_every_fork():
    e = engine()
    session, _ = offered(e)
    _s, to_caller1, _ = e.answer(2.0, "fork", "a", "t1", audio(CALLEE1), provisional=True)
    _s, to_caller2, _ = e.answer(3.0, "fork", "a", "t2", audio(CALLEE2), provisional=True)
    _s, final, actions = e.answer(4.0, "fork", "a", "t1", audio(CALLEE1))
    assert final.relay_port == to_caller1.relay_port
    assert actions[0].spec.forks == () and not session.forks
    assert not e.ports.is_in_use("127.0.0.1", to_caller2.relay_port) and e.ports.in_use == 2
    assert e.counters["sessions.early_dialogs.freed"] == 1


def test_a_200_from_a_to_tag_without_a_183_wins_too():
    e = engine()
    session, _ = offered(e)
    _s, to_caller1, _ = e.answer(2.0, "fork", "a", "t1", audio(CALLEE1), provisional=True)
    first = to_caller1.relay_port
    _s, final, actions = e.answer(4.0, "fork", "a", "t9", audio(CALLEE3))
    assert session.legs["B"].tag == "t9" and final.relay_port != first
    assert actions[0].spec.streams[0].b.announced == CALLEE3
    assert e.ports.in_use == 2 and not e.ports.is_in_use("127.0.0.1", first)


def test_answers_without_the_provisional_flag_keep_the_old_meaning():
    """A client that sends every answer as final: the last To-tag's answer re-tags leg B
    (what older clients rely on), no early dialog is made."""
    e = engine()
    session, _ = offered(e)
    e.answer(2.0, "fork", "a", "t1", audio(CALLEE1))
    _s, leg, actions = e.answer(3.0, "fork", "a", "t2", audio(CALLEE2))
    assert session.legs["B"].tag == "t2" and not session.forks
    assert actions[0].spec.streams[0].b.announced == CALLEE2


def test_early_dialogs_are_bounded():
    e = engine()
    offered(e)
    e.answer(2.0, "fork", "a", "t0", audio(CALLEE1), provisional=True)
    for n in range(MAX_FORKS):
        e.answer(2.0, "fork", "a", f"f{n}", audio(CALLEE2), provisional=True)
    in_use = e.ports.in_use
    with pytest.raises(BadRequest, match="early dialogs"):
        e.answer(2.0, "fork", "a", "one-too-many", audio(CALLEE2), provisional=True)
    assert e.ports.in_use == in_use


def test_an_early_dialog_that_rejects_a_stream_has_no_ports_for_it():
    e = engine()
    e.offer(1.0, "av", "a", [StreamOffer(*CALLER), StreamOffer(CALLER[0], 4002,
                                                               kind="video")])
    e.answer(2.0, "av", "a", "t1", [StreamOffer(*CALLEE1), StreamOffer(CALLEE1[0], 5002)],
             provisional=True)
    before = e.ports.in_use
    _s, to_caller2, actions = e.answer(
        3.0, "av", "a", "t2", [StreamOffer(*CALLEE2), StreamOffer(CALLEE2[0], 0)],
        provisional=True)
    assert to_caller2.media[1] is None
    assert [s.index for s in actions[0].spec.forks[0].streams] == [0]
    assert e.ports.in_use == before + 1


def test_fork_reports_fold_into_the_early_dialog_and_keep_the_call_alive():
    from fastpath.contract import LegReport, SessionReport, StreamReport

    e = engine()
    session, _ = offered(e)
    e.answer(2.0, "fork", "a", "t1", audio(CALLEE1), provisional=True)
    e.answer(3.0, "fork", "a", "t2", audio(CALLEE2), provisional=True)
    fork = session.forks["t2"]
    stream = StreamReport(0, LegReport(), LegReport(
        in_packets=7, in_bytes=700, generation=fork.b.generation, latched=CALLEE2))
    e.apply_report(SessionReport(session.sid, 9.0, (), ((fork.key, (stream,)),)))
    assert fork.b.media[0].counters.in_packets == 7
    assert fork.b.media[0].latched == CALLEE2
    assert session.last_media == 9.0
    early = e.get("fork").as_dict(10.0)["early_dialogs"]
    assert early[0]["tag"] == "t2"
    assert early[0]["legs"]["B"]["streams"][0]["counters"]["in_packets"] == 7
    # its 200 OK: the early media counted on the shared ports stays with leg B
    e.answer(11.0, "fork", "a", "t2", audio(CALLEE2))
    assert session.legs["B"].media[0].base.in_packets == 7
