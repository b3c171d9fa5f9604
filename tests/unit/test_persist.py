"""Session records (lrk.core.persist), the SQLite store and Engine.adopt: what a
restarted relay reads back is the session it wrote, on the same ports."""

from __future__ import annotations

import pytest

from fastpath.contract import Install, LegReport, SessionReport, StreamReport
from lrk.core.engine import Engine, EngineConfig, relay_addrs
from lrk.core.persist import RecordError, from_record, owner_of, to_record
from lrk.core.session import StreamOffer
from lrk.daemon.store import SqliteStore, path_for

CALLER = ("198.51.100.10", 4000)
CALLEE = ("198.51.100.20", 5000)
CALLEE2 = ("198.51.100.21", 6000)


def engine() -> Engine:
    return Engine(EngineConfig(port_start=30000, port_end=30199, quarantine=0))


def a_call(e: Engine):
    session, _leg, _ = e.offer(10.0, "c1", "ft", [StreamOffer(*CALLER),
                                                  StreamOffer(CALLER[0], 4002, kind="video")])
    e.answer(11.0, "c1", "ft", "tt", [StreamOffer(*CALLEE), StreamOffer(CALLEE[0], 5002)],
             provisional=True)
    e.answer(11.5, "c1", "ft", "t2", [StreamOffer(*CALLEE2), StreamOffer(CALLEE2[0], 0)],
             provisional=True)
    b = session.legs["B"]
    e.apply_report(SessionReport(session.sid, 12.0, (StreamReport(
        0, LegReport(5, 500, 4, 400, (("unexpected_source", 1),), session.legs["A"].generation,
                     ("198.51.100.99", 4444)),
        LegReport(4, 400, 5, 500, (), b.generation, CALLEE)),)))
    return session


def test_a_record_rebuilds_the_session_with_ports_peers_counters_and_forks():
    e = engine()
    session = a_call(e)
    rec = to_record(session, now=20.0, wall=1_000_000.0, owner="proxy-1")
    back = from_record(rec, now=500.0, wall=1_000_010.0)  # another process, 10 s later
    assert back.spec() == session.spec()
    assert back.call_id == "c1" and back.state == "early" and owner_of(rec) == "proxy-1"
    assert back.created == pytest.approx(500.0 - 20.0)  # created 20 s before the write
    assert back.last_media == pytest.approx(500.0 - 18.0)
    a = back.legs["A"].media[0]
    assert a.latched == ("198.51.100.99", 4444)
    assert (a.counters.in_packets, a.counters.drops) == (5, {"unexpected_source": 1})
    # a new data plane counts from zero: the stored counts are the base
    assert a.base.in_packets == 5
    assert list(back.forks) == ["t2"] and back.forks["t2"].b.media[0].announced == CALLEE2


def test_a_store_keeps_records_by_session_and_forgets_ended_ones(tmp_path):
    e = engine()
    session = a_call(e)
    store = SqliteStore(str(tmp_path / "s.sqlite"))
    store.put(session.sid, session.call_id, to_record(session, 20.0, 1e6))
    store.put(session.sid, session.call_id, to_record(session, 21.0, 1e6 + 1))  # replaced
    store.put(99, "other", {"v": 1})
    assert store.count() == 2
    store.delete(99)
    ((sid, rec),) = store.load()
    assert sid == session.sid and from_record(rec, 30.0, 1e6 + 9).spec() == session.spec()
    store.close()
    again = SqliteStore(str(tmp_path / "s.sqlite"))  # what a restarted relay opens
    assert again.count() == 1 and again.counters["store.written"] == 0
    again.clear()
    assert again.load() == []
    again.close()


def test_two_relays_on_one_host_get_two_stores():
    a = path_for("/var/lib/lrk", "127.0.0.1:22222", "30000-40000")
    b = path_for("/var/lib/lrk", "127.0.0.1:22223", "30000-40000")
    c = path_for("/var/lib/lrk", "unix:/run/lrk/control.sock", "30000-40000")
    assert len({a, b, c}) == 3 and all(p.startswith("/var/lib/lrk/sessions-") for p in (a, b, c))
    assert "/" not in c[len("/var/lib/lrk/"):]


def test_adopt_claims_the_same_ports_and_refuses_a_clash():
    e = engine()
    session = a_call(e)
    rec = to_record(session, 20.0, 1e6)
    fresh = engine()
    actions = fresh.adopt(5.0, from_record(rec, 5.0, 1e6))
    assert [type(a) for a in actions] == [Install]
    assert actions[0].spec == session.spec()
    assert sorted(fresh.owner) == sorted(("127.0.0.1", p) for p in session.ports())
    assert fresh.ports.in_use == e.ports.in_use
    assert fresh.counters["sessions.restored"] == 1
    # the same record again (a duplicate): refused, nothing changes
    assert fresh.adopt(5.0, from_record(rec, 5.0, 1e6)) == []
    assert fresh.counters["sessions.restore_refused"] == 1
    # new calls get new ids and free ports
    new, _leg, _ = fresh.offer(6.0, "c2", "x", [StreamOffer(*CALLER)])
    assert new.sid > session.sid and not set(new.ports()) & set(session.ports())


def test_adopt_refuses_ports_outside_the_range():
    e = engine()
    rec = to_record(a_call(e), 20.0, 1e6)
    other = Engine(EngineConfig(port_start=40000, port_end=40099))
    assert other.adopt(1.0, from_record(rec, 1.0, 1e6)) == []
    assert other.ports.in_use == 0


def test_adopt_taken_keeps_id_ports_outside_the_range_and_the_peers_addresses():
    """A call this node took over, restored after its restart: same id, the peer's
    ports and addresses (a plain restore would refuse it as outside the range)."""
    e = engine()
    session = a_call(e)
    rec = to_record(session, 20.0, 1e6, interfaces=("198.51.100.100", "198.51.100.100"))
    other = Engine(EngineConfig(port_start=40000, port_end=40099))
    restored = from_record(rec, 1.0, 1e6)
    actions = other.adopt(1.0, restored, taken=True)
    assert [type(a) for a in actions] == [Install]
    assert restored.sid == session.sid
    assert restored.interfaces == ("198.51.100.100", "198.51.100.100")
    assert sorted(other.owner) == sorted(relay_addrs(session))


@pytest.mark.parametrize("damage", [
    lambda r: r.update(v=2),
    lambda r: r.pop("legs"),
    lambda r: r["legs"].reverse(),
    lambda r: r["legs"][0]["media"][0].update(announced="1.2.3.4"),
    lambda r: r["legs"][0]["media"][0]["counters"].pop(),
    lambda r: r["forks"][0].pop("tag"),
])
def test_a_damaged_record_is_a_record_error(damage):
    rec = to_record(a_call(engine()), 20.0, 1e6)
    damage(rec)
    with pytest.raises(RecordError):
        from_record(rec, 1.0, 1e6)


def test_a_burst_is_one_transaction_and_a_failing_store_is_counted(tmp_path):
    store = SqliteStore(str(tmp_path / "s.sqlite"))
    store.write([(1, "a", {"v": 1}), (2, "b", {"v": 1})], [])
    store.write([(3, "c", {"v": 1})], [1])
    assert [sid for sid, _ in store.load()] == [2, 3]
    assert store.counters == {"store.written": 3, "store.deleted": 1, "store.failed": 0}
    store.db.close()  # the store breaks under the relay (disk gone): writes fail, counted
    store.write([(4, "d", {"v": 1})], [2])
    store.put(5, "e", {"v": 1})
    assert store.counters["store.failed"] == 2 and store.counters["store.written"] == 3
