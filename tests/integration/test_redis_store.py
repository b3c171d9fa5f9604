"""The Redis session store with real relays (socket mode, loopback) and a real
redis-server started here: Redis stopped and started during calls loses no call and the
store catches up; `lrkproxy ctl takeover NODE` adopts a killed node's calls; no key is
left for a call that ended."""

from __future__ import annotations

import io
import time
from contextlib import contextmanager
from typing import Iterator, List

import msgpack
import pytest

from bench.redis_server import RedisServer
from lrk.cli import build_parser
from lrk.client import LrkClient
from lrk.ctl import run_ctl
from lrk.demo.media import MediaEndpoint
from lrk.demo.relay_process import RelayProcess

from .conftest import next_ports, port_free, worker_pids
from .test_restart import _close, _flows, _setup

pytestmark = pytest.mark.integration


def _config(tmp_path, name: str, redis: RedisServer, more: str = "") -> str:
    path = tmp_path / f"{name}.toml"
    path.write_text(f"store = \"redis\"\nredis_url = \"{redis.url}\"\nnode_id = \"{name}\"\n"
                    f"quarantine = 0\n{more}")
    return str(path)


@contextmanager
def _stopped_at_end(relays: List[RelayProcess], calls: list) -> Iterator[None]:
    try:
        yield
    finally:
        codes = [r.stop() for r in relays if r.proc is not None]
        _close(calls)
    assert codes[-1] == 0, relays[-1].output


def _wait(predicate, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.05)  # polling an observable, bounded by the deadline


def test_redis_down_keeps_every_call_and_the_store_catches_up(tmp_path):
    with RedisServer() as redis:
        relay = RelayProcess(ports=next_ports(), extra=[
            "--config", _config(tmp_path, "solo", redis)]).start()
        calls: list = []
        with _stopped_at_end([relay], calls), \
                LrkClient([relay.node], timeout=1.0, retries=3) as client:
            calls += _setup(client, 6)
            _flows(calls, 0x1000, 0)
            assert len(redis.keys("lrk:solo:session:*")) == 6
            assert client.stats()["store"]["state"] == "up"
            redis.stop()
            # during the outage: calls end, new ones start, media flows on all of them
            for i in (0, 1):
                client.delete(f"call-{i}")
            calls += _setup_named(client, ["call-6", "call-7"])
            live = calls[2:]
            _flows(live, 0x2000, 10)
            stats = client.stats()
            assert stats["store"]["state"] == "degraded" and stats["sessions"] == 6
            assert stats["counters"]["store.up"] == 0 and stats["counters"]["store.failed"] >= 1
            assert stats["store"]["pending"] >= 4
            redis.start()  # a new, empty server: the catch-up rewrites every call
            _wait(lambda: client.stats()["store"]["state"] == "up")
            want = sorted(f"call-{i}" for i in range(2, 8))
            assert _stored_call_ids(redis, "solo") == want
            assert client.stats()["counters"]["store.up"] == 1
            _flows(live, 0x3000, 20)
            for i in range(2, 8):
                client.delete(f"call-{i}")
            assert redis.keys("lrk:*:session:*") == []
        log = relay.output
        assert log.count("is down") == 1 and "works again" in log


def _setup_named(client: LrkClient, names: List[str]) -> List[tuple]:
    calls = []
    for name in names:
        caller, callee = MediaEndpoint(), MediaEndpoint()
        to_b = client.offer(name, "ft", caller.address)["relay"]
        to_a = client.answer(name, "ft", "tt", callee.address)["relay"]
        calls.append((caller, callee, (to_a["ip"], to_a["port"]), (to_b["ip"], to_b["port"])))
    return calls


def _stored_call_ids(redis: RedisServer, node: str) -> List[str]:
    c = redis.client()
    try:
        keys = list(c.scan_iter(match=f"lrk:{node}:session:*"))
        return sorted(msgpack.unpackb(v, raw=False)["call_id"] for v in c.mget(keys))
    finally:
        c.close()


def test_ctl_takeover_adopts_a_killed_nodes_calls_on_their_ports(tmp_path):
    with RedisServer() as redis:
        node1 = RelayProcess(ports=next_ports(), extra=[
            "--config", _config(tmp_path, "node1", redis)]).start()
        node2 = RelayProcess(ports=next_ports(), extra=[
            "--config", _config(tmp_path, "node2", redis)]).start()
        calls: list = []
        with _stopped_at_end([node1, node2], calls):
            with LrkClient([node1.node], timeout=1.0, retries=3) as c1:
                calls += _setup(c1, 4)
                _flows(calls, 0x1000, 0)
                before = c1.query("call-0")["session"]
            workers = worker_pids(node1)
            node1.kill()
            assert workers
            # on one host the killed node's worker must let go of the ports first (on two
            # hosts the address moves instead)
            _wait(lambda: all(port_free("127.0.0.1", to[1]) for c in calls for to in c[2:]))
            out = io.StringIO()
            args = build_parser().parse_args(["ctl", "--node", node2.node, "--json",
                                              "takeover", "node1"])
            assert run_ctl(args, out) == 0
            assert '"adopted": 4' in out.getvalue() and '"refused": 0' in out.getvalue()
            with LrkClient([node2.node], timeout=1.0, retries=3) as c2:
                after = c2.query("call-0")["session"]
                for leg in ("A", "B"):
                    assert after["legs"][leg]["relay"] == before["legs"][leg]["relay"]
                _flows(calls, 0x2000, 10)
                counters = c2.query("call-0")["session"]["legs"]["A"]["counters"]
                assert counters["in_packets"] >= 4  # continued from node 1's record
                assert all(k.startswith("lrk:node2:") for k in redis.keys("lrk:*:session:*"))
                for i in range(4):
                    c2.delete(f"call-{i}")
                assert c2.stats()["ports"]["in_use"] == 0
            assert redis.keys("lrk:*:session:*") == []
