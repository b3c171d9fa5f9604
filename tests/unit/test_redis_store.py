"""The Redis session store (a real redis-server on a unix socket, started here), Redis
down and the catch-up, the standby's warm copy, and the takeover's adopt (Engine.adopt
with foreign=True)."""

from __future__ import annotations

from typing import Iterator, List, Optional

import msgpack
import pytest
from netaddr import IPSet

from bench.redis_server import RedisServer
from lrk.control.msgpack_proto import MsgpackControl
from lrk.core.engine import Engine, EngineConfig
from lrk.core.persist import from_record, to_record
from lrk.core.session import StreamOffer
from lrk.daemon import redis_store
from lrk.daemon.config import Config
from lrk.daemon.redis_store import RedisStore, gen_key, open_session_store, session_key
from lrk.daemon.takeover import Standby, record_addresses, take
from lrk.errors import ConfigError
from tests.control_keys import ADMIN_KEY, TEST_KEY, authenticator, signed, wall_clock
from tests.unit.test_persist import a_call


@pytest.fixture(scope="module")
def server() -> Iterator[RedisServer]:
    with RedisServer() as r:
        yield r


@pytest.fixture
def redis_url(server: RedisServer) -> Iterator[str]:
    if server.proc is None:
        server.start()
    server.client().flushall()
    yield server.url


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def engine(start: int = 30000, end: int = 30199) -> Engine:
    return Engine(EngineConfig(port_start=start, port_end=end, quarantine=0))


def test_records_live_under_the_node_with_a_ttl_and_go_when_deleted(server, redis_url):
    e = engine()
    session = a_call(e)
    store = RedisStore(redis_url, "n1", ttl=600)
    rec = to_record(session, 20.0, 1e6, owner="proxy-1")
    assert store.write([(session.sid, "c1", rec)], [])
    key = session_key("n1", session.sid)
    assert server.keys() == sorted([key, gen_key("n1")])
    assert 590 < server.client().ttl(key) <= 600
    assert store.load() == [(session.sid, rec)]
    assert store.load_node("n1") == {session.sid: rec}
    assert store.generations(["n1", "n2"]) == [1, None]
    store.delete(session.sid)
    assert server.keys("lrk:*:session:*") == []
    assert store.counters["store.written"] == 1 and store.counters["store.deleted"] == 1
    store.close()


def test_redis_down_keeps_pending_sids_and_catches_up_on_the_timer(server, redis_url):
    clock = Clock()
    store = RedisStore(redis_url, "n1", clock=clock)
    now_live = {1: {"v": 1, "n": 1}, 3: {"v": 1, "n": 3}}  # what the relay holds

    def source(sids: Optional[List[int]]):
        sids = sorted(now_live) if sids is None else sids
        return ([(s, f"c{s}", now_live[s]) for s in sids if s in now_live],
                [s for s in sids if s not in now_live])

    store.source = source
    assert store.write([(1, "c1", {"old": 1}), (2, "c2", {"old": 2})], [])
    server.stop()
    assert store.write([(3, "c3", {"v": 1})], [2]) is False
    assert (store.up, store.counters["store.up"], store.counters["store.failed"]) == (False, 0, 1)
    assert store.write([(1, "c1", {"v": 1})], []) is False  # no network while down
    assert store.counters["store.failed"] == 1 and sorted(store.pending) == [1, 2, 3]
    assert store.get_timer() == pytest.approx(clock.t + redis_store.RETRY)
    store.handle_timer(clock.t + redis_store.RETRY)  # still down: tries, stays down
    assert not store.up and store.get_timer() == pytest.approx(clock.t + 2 * redis_store.RETRY)
    server.start()
    server.client().set(session_key("n1", 2), b"stale")  # the ended one, still there
    store.handle_timer(clock.t + 1.5 * redis_store.RETRY)  # not due yet
    assert not store.up
    store.handle_timer(clock.t + 2 * redis_store.RETRY)
    assert store.up and store.counters["store.up"] == 1 and store.pending == {}
    assert dict(store.load()) == now_live  # written as the relay holds them now
    assert store.get_timer() is None
    store.close()


def test_after_an_outage_of_the_same_server_only_pending_sids_are_written(
        server, redis_url):
    clock = Clock()
    store = RedisStore(redis_url, "n1", clock=clock)
    store.source = lambda sids: ([(s, f"c{s}", {"now": s}) for s in sids or [] if s != 2],
                                 [s for s in sids or [] if s == 2])
    assert store.write([(1, "c1", {"v": 1}), (2, "c2", {"v": 2}), (3, "c3", {"v": 3})], [])
    store.mark_down(OSError("network unreachable"))  # the same server, unreachable a while
    store.write([(1, "c1", {"v": 1})], [2])
    store.handle_timer(clock.t + redis_store.RETRY)
    assert store.up and dict(store.load()) == {1: {"now": 1}, 3: {"v": 3}}  # 3 untouched
    store.close()


def test_an_overflow_of_pending_sids_rewrites_everything_and_drops_stale_keys(
        server, redis_url, monkeypatch):
    monkeypatch.setattr(redis_store, "MAX_PENDING", 2)
    clock = Clock()
    store = RedisStore(redis_url, "n1", clock=clock)
    store.source = lambda sids: ([(7, "c7", {"v": 7})], [])  # only sid 7 lives now
    assert store.write([(5, "c5", {"v": 5})], [])
    server.stop()
    for sid in (8, 9, 10):
        store.write([(sid, f"c{sid}", {"v": sid})], [])
    assert store.overflow and store.pending == {}
    server.start()
    server.client().set(session_key("n1", 5), b"x")  # a key of a session gone meanwhile
    server.client().set(session_key("n2", 5), b"y")  # another node's: untouched
    store.handle_timer(clock.t + redis_store.RETRY)
    assert store.up and not store.overflow
    assert server.keys("lrk:*:session:*") == [session_key("n1", 7), session_key("n2", 5)]
    store.close()


def test_a_standby_rereads_a_peer_only_when_its_generation_moves_and_sees_addresses(
        server, redis_url):
    e = engine()
    session = a_call(e)
    peer = RedisStore(redis_url, "n1")
    standby_store = RedisStore(redis_url, "n2")
    local = {"127.0.0.1": False}
    standby = Standby(standby_store, ["n1"], poll=0.5, local=lambda ip: local.get(ip, False))
    assert standby.handle_timer(0.0) is None and standby.copies["n1"] == {}
    peer.write([(session.sid, "c1", to_record(session, 20.0, 1e6))], [])
    assert standby.handle_timer(0.2) is None  # not due
    assert standby.handle_timer(0.5) is None  # read, but the address is not local
    assert list(standby.copies["n1"]) == [session.sid]
    assert standby.addresses("n1") == {"127.0.0.1"}
    refreshes = standby.counters["standby.refreshes"]
    assert standby.handle_timer(1.0) is None
    assert standby.counters["standby.refreshes"] == refreshes  # generation unchanged
    local["127.0.0.1"] = True  # keepalived moved the address here
    assert standby.handle_timer(1.5) == ("n1", {"127.0.0.1"})
    peer.close()
    standby_store.close()


def test_take_adopts_foreign_sessions_with_fresh_ids_outside_the_range_with_forks():
    source = engine(30000, 30199)
    session = a_call(source)
    assert session.forks  # an early dialog of a forked INVITE
    record = to_record(session, 20.0, 1e6)
    assert record_addresses(record) == {"127.0.0.1"}
    target = engine(31000, 31199)  # the standby's own range
    own, _, _ = target.offer(1.0, "mine", "x", [StreamOffer("198.51.100.30", 4000)])
    assert own.sid == session.sid  # the ids collide: the adopted one is renumbered
    taken = take("n1", {session.sid: record, 99: {"v": 1}}, 50.0, 1e6 + 5,
                 lambda s, _rec: bool(target.adopt(50.0, s, foreign=True)))
    assert taken.summary() == {"node": "n1", "adopted": 1, "refused": 1,
                               "reasons": ["unreadable"]}
    back = taken.adopted[0]
    assert back.sid != own.sid and taken.moved == {session.sid: back.sid}
    assert sorted(back.ports()) == sorted(session.ports())
    assert target.by_call["c1"] is back and list(back.forks) == list(session.forks)
    # a takeover limited to addresses that are not this record's leaves it alone
    assert take("n1", {session.sid: record}, 50.0, 1e6 + 5, lambda s, _rec: True,
                only={"198.51.100.77"}).summary()["adopted"] == 0
    # the same call again (a second takeover run) is refused, nothing changes
    again = take("n1", {session.sid: record}, 51.0, 1e6 + 6,
                 lambda s, _rec: bool(target.adopt(51.0, s, foreign=True)))
    assert again.refused == {session.sid: "not_adopted"}
    assert engine(31000, 31199).adopt(50.0, a_call(engine()), foreign=False) == []  # range


def test_config_for_redis_and_standby_is_validated():
    with pytest.raises(ConfigError, match="redis_url"):
        Config(store="redis").validate()
    with pytest.raises(ConfigError, match="store = \"redis\""):
        Config(standby_for=["n1"]).validate()
    with pytest.raises(ConfigError, match="itself"):
        Config(store="redis", redis_url="unix:///x", node_id="n1", standby_for=["n1"]).validate()
    with pytest.raises(ConfigError, match="store"):
        Config(store="etcd").validate()
    cfg = Config(store="redis", redis_url="unix:///nowhere.sock", max_lifetime=100,
                 silence_timeout=10).validate()
    assert ":" not in cfg.node_name and cfg.node_name  # derived from host and control
    store = open_session_store(cfg)
    assert isinstance(store, RedisStore) and store.ttl == 100 + 20 + 60
    assert store.load() == [] and not store.up  # no server there: down, not fatal
    store.close()


def test_the_takeover_command_needs_an_admin_and_a_relay_that_can_take_over():
    control = MsgpackControl(engine(), allow=IPSet(["127.0.0.0/8"]))  # no auth: admin
    cookies = iter(range(100))

    def ask(message: dict) -> dict:
        # a long cookie: an unsigned sender gets no reply larger than its request
        request = {"v": 1, "cookie": f"c{next(cookies)}", "pad": "x" * 200, **message}
        out = control.handle(msgpack.packb(request), ("127.0.0.1", 9), 1.0)
        assert out.reply is not None
        return msgpack.unpackb(out.reply, raw=False)

    error = ask({"cmd": "takeover", "node_id": "n1"})["error"]
    assert error["code"] == "bad_request" and "cannot take calls over" in error["message"]
    error = ask({"cmd": "takeover"})["error"]
    assert error["code"] == "bad_request" and "node_id" in error["message"]
    taken = []

    def on_takeover(node: str) -> dict:
        if node == "me":
            raise ConfigError("'me' is this node")
        taken.append(node)
        return {"node": node, "adopted": 2, "refused": 0, "reasons": []}

    control.on_takeover = on_takeover
    reply = ask({"cmd": "takeover", "node_id": "n1"})
    assert (reply["ok"], reply["adopted"], taken) == (True, 2, ["n1"]), reply
    error = ask({"cmd": "takeover", "node_id": "me"})["error"]
    assert error["code"] == "bad_request" and "this node" in error["message"]


def test_only_an_admin_key_may_take_calls_over():
    control = MsgpackControl(engine(), allow=IPSet(["127.0.0.0/8"]), auth=authenticator(),
                             wall_clock=wall_clock)
    control.on_takeover = lambda node: {"node": node, "adopted": 0, "refused": 0,
                                        "reasons": []}
    for key, ok in ((TEST_KEY, False), (ADMIN_KEY, True)):
        data = msgpack.packb({"v": 1, "cookie": key.id, "cmd": "takeover", "node_id": "n1"})
        out = control.handle(signed(data, key), ("127.0.0.1", 9), 1.0)
        reply = msgpack.unpackb(out.reply, raw=False)
        assert reply["ok"] is ok, reply
        if not ok:
            assert reply["error"]["code"] == "forbidden"


def test_a_taken_over_call_keeps_its_old_nodes_addresses_on_later_requests():
    vip, mine = "198.51.100.100", "198.51.100.22"
    source = Engine(EngineConfig(internal_ip=vip, external_ip=vip, port_start=30000,
                                 port_end=30199, quarantine=0))
    session, _, _ = source.offer(1.0, "c", "a", [StreamOffer("198.51.100.10", 4000)])
    source.answer(2.0, "c", "a", "b", [StreamOffer("198.51.100.11", 5000)], provisional=True)
    source.answer(2.5, "c", "a", "b2", [StreamOffer("198.51.100.11", 7000)],
                  provisional=True)
    fork_a = session.forks["b2"].a.media[0].relay_port
    record = to_record(session, 3.0, 1e6, interfaces=(vip, vip))
    target = Engine(EngineConfig(internal_ip=mine, external_ip=mine, port_start=34000,
                                 port_end=34199, quarantine=0))
    taken = take("n1", {session.sid: record}, 10.0, 1e6 + 7,
                 lambda s, _rec: bool(target.adopt(10.0, s, foreign=True)))
    back = taken.adopted[0]
    assert back.interfaces == (vip, vip)
    # the fork's 200 OK on the new node: promoted on its ports, nothing moves to `mine`
    _, leg, actions = target.answer(11.0, "c", "a", "b2", [StreamOffer("198.51.100.11", 7000)])
    assert (leg.relay_ip, leg.media[0].relay_port) == (vip, fork_a)
    assert target.counters["sessions.rebound"] == 0
    _, leg, _ = target.offer(12.0, "c", "a", [StreamOffer("198.51.100.10", 4000)],
                             to_tag="b2", interface="external")  # a re-INVITE
    assert leg.relay_ip == vip
    # its record on the new node carries them on; a restart of our own calls does not
    assert to_record(back, 13.0, 1e6, interfaces=(mine, mine))["interfaces"] == [vip, vip]
    own = from_record(to_record(back, 13.0, 1e6), 20.0, 1e6 + 7)
    assert engine(30000, 30199).adopt(20.0, own)
    assert own.interfaces is None
