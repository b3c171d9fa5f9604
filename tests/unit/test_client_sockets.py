"""The clients over real sockets: a fake relay thread on loopback, a dead node, unix, asyncio."""

from __future__ import annotations

import asyncio
import os
import socket

import pytest

try:
    from client_fakes import DeadNode, FakeClock, SocketRelay, decode
except ImportError:  # tests/ collected as a package
    from tests.unit.client_fakes import DeadNode, FakeClock, SocketRelay, decode

from lrk.client import AsyncLrkClient, LrkClient
from lrk.client.errors import NodeTimeout, NoNodeAvailable, RelayError
from lrk.client.nodes import parse_node_address

SDP = ("v=0\r\no=- 1 1 IN IP4 198.51.100.10\r\ns=-\r\nc=IN IP4 198.51.100.10\r\nt=0 0\r\n"
       "m=audio 4000 RTP/AVP 0\r\n")
INVITE = ("INVITE sip:bob@example.com SIP/2.0\r\n"
          "Via: SIP/2.0/UDP 192.0.2.1;branch=z9hG4bKsock\r\n"
          "From: <sip:alice@example.com>;tag=caller\r\nTo: <sip:bob@example.com>\r\n"
          "Call-ID: sock-call\r\nCSeq: 1 INVITE\r\nContent-Type: application/sdp\r\n"
          f"Content-Length: {len(SDP)}\r\n\r\n{SDP}")


@pytest.fixture
def relay():
    node = SocketRelay()
    yield node
    node.close()


@pytest.fixture
def dead():
    node = DeadNode()
    yield node
    node.close()


def test_commands_over_udp(relay):
    with LrkClient([relay.node], timeout=2.0) as client:
        assert client.ping()["pong"] is True
        assert client.capabilities()["version"] == 1
        reply = client.offer("c1", "ft", ("198.51.100.10", 4000))
        assert reply["relay"] == {"ip": "127.0.0.1", "port": 30002, "rtcp_port": 30003}
        assert client.answer("c1", "ft", "tt", ("198.51.100.20", 5000))["leg"] == "A"
        assert client.query("c1")["session"]["call_id"] == "c1"
        assert client.list()["total"] == 1
        out = client.manage(INVITE.encode())
        assert b"m=audio 30006 RTP/AVP 0\r\n" in out
        assert client.delete("c1")["ok"] is True
        with pytest.raises(RelayError) as info:
            client.delete("c1")
        assert info.value.code == "not_found"
    cmds = [decode(d)["cmd"] for d in relay.datagrams]
    assert cmds == ["ping", "capabilities", "offer", "answer", "query", "list", "offer",
                    "delete", "delete"]


def test_silent_relay_gets_identical_retries(relay):
    relay.silent_for(2)
    with LrkClient([relay.node], timeout=0.2, retries=5) as client:
        assert client.ping()["pong"] is True
    # 2 ignored + the answered one (one more only if the answer took over 0.2 s)
    assert len(relay.datagrams) >= 3
    assert len(set(relay.datagrams)) == 1


def test_dead_node_failover_and_no_sends_while_disabled(relay, dead):
    clock = FakeClock()
    client = LrkClient([dead.node, relay.node], timeout=0.1, retries=5,
                       disable_period=60.0, clock=clock)

    def relay_cookies():
        return {decode(d)["cookie"] for d in relay.datagrams}

    with client:
        client.ping()
        to_dead = dead.drain()
        assert len(to_dead) == 5 and len(set(to_dead)) == 1
        assert relay_cookies() == {decode(relay.datagrams[0])["cookie"]}
        assert decode(relay.datagrams[0])["cookie"] != decode(to_dead[0])["cookie"]
        client.ping()
        clock.advance(59.0)
        client.ping()
        assert len(dead.drain()) == 5
        assert len(relay_cookies()) == 3
        clock.advance(1.0)  # disable period over: the dead node is tried again
        client.ping()
        assert len(dead.drain()) == 10


def test_only_dead_nodes(dead):
    clock = FakeClock()
    with LrkClient([dead.node], timeout=0.02, retries=2, clock=clock) as client:
        with pytest.raises(NoNodeAvailable, match="set 0"):
            client.ping()
        with pytest.raises(NodeTimeout, match="did not answer 2 tries"):
            client.ping(dead.node)  # explicit: sent even though disabled
    assert len(dead.drain()) == 4


def test_unix_datagram_node():
    relay = SocketRelay(family=socket.AF_UNIX)
    try:
        client = LrkClient([relay.node], timeout=2.0)
        assert client.ping()["pong"] is True
        transport = client._transports[relay.node]
        local = transport.local_path
        assert os.path.exists(local)
        assert client.offer("u1", "ft", ("198.51.100.10", 4000))["leg"] == "B"
        client.close()
        assert not os.path.exists(local)
        assert not os.path.exists(os.path.dirname(local))
    finally:
        relay.close()


def test_unix_node_without_socket_times_out(tmp_path):
    clock = FakeClock()
    path = str(tmp_path / "missing.sock")
    client = LrkClient([f"unix:{path}"], timeout=0.02, retries=2, clock=clock)
    with client, pytest.raises(NoNodeAvailable):
        client.ping()


def test_udp6_node():
    # ::1 exists wherever the project runs: without it this fails (in SocketRelay's bind)
    relay = SocketRelay(family=socket.AF_INET6, host="::1")
    try:
        with LrkClient([relay.node], timeout=2.0) as client:
            assert client.ping()["pong"] is True
    finally:
        relay.close()


def test_async_client_concurrency_retries_and_failover(relay, dead):
    async def scenario():
        clock = FakeClock()
        # 0.5 s a try: 20 offers at once wait on a one-thread fake relay (a loaded machine)
        client = AsyncLrkClient([dead.node, relay.node], timeout=0.5, retries=3, clock=clock)
        async with client:
            # the first request fails over from the dead node; the rest skip it
            assert (await client.ping())["pong"] is True
            replies = await asyncio.gather(*(
                client.offer(f"a{i}", "ft", ("198.51.100.10", 4000 + i)) for i in range(20)))
            assert [r["call_id"] for r in replies] == [f"a{i}" for i in range(20)]
            assert len({r["relay"]["port"] for r in replies}) == 20
            relay.silent_for(1)
            assert (await client.query("a3"))["session"]["call_id"] == "a3"
            out = await client.manage(INVITE)
            assert "m=audio " in out and "c=IN IP4 127.0.0.1" in out
            with pytest.raises(RelayError, match="not_found"):
                await client.delete("nope")
            # a second client with only the dead node: asyncio path of NoNodeAvailable
            lonely = AsyncLrkClient([dead.node], timeout=0.02, retries=2, clock=clock)
            with pytest.raises(NoNodeAvailable):
                await lonely.ping()
            await lonely.close()

    asyncio.run(scenario())
    to_dead = dead.drain()
    assert len(to_dead) == 3 + 2
    queries = [d for d in relay.datagrams if decode(d)["cmd"] == "query"]
    assert len(queries) >= 2 and len(set(queries)) == 1  # 1 ignored, then answered


def test_async_unix_node():
    relay = SocketRelay(family=socket.AF_UNIX)

    async def scenario():
        client = AsyncLrkClient([relay.node], timeout=2.0)
        reply = await client.offer("u1", "ft", sdp=SDP.encode())
        assert isinstance(reply["sdp"], bytes)
        local = client._transports[relay.node].local_path
        assert os.path.exists(local)
        await client.close()
        return local

    try:
        local = asyncio.run(scenario())
        assert not os.path.exists(local)
    finally:
        relay.close()


def test_async_node_whose_socket_cannot_open_is_failed_over(relay):
    from lrk.client.transport import AsyncTransport

    opened = []

    async def factory(address):
        opened.append(str(address))
        if str(address) == "udp:10.255.255.1:9":
            raise OSError("no route")
        return await AsyncTransport.open(address)

    async def scenario():
        client = AsyncLrkClient(["udp:10.255.255.1:9", relay.node], timeout=2.0,
                                transport_factory=factory)
        replies = await asyncio.gather(*(client.ping() for _ in range(5)))
        await client.close()
        return replies

    replies = asyncio.run(scenario())
    assert all(r["pong"] is True for r in replies)
    # the five concurrent requests shared one opening attempt per node
    assert sorted(opened) == sorted(["udp:10.255.255.1:9", relay.node])


def test_unix_client_path_is_reachable_by_another_user():
    import stat

    from lrk.client.transport import SyncTransport

    transport = SyncTransport(parse_node_address("unix:/nonexistent/relay.sock"))
    try:
        path = transport.local_path
        assert stat.S_IMODE(os.stat(os.path.dirname(path)).st_mode) == 0o711
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o666
        assert stat.S_ISSOCK(os.stat(path).st_mode)
    finally:
        transport.close()
    assert not os.path.exists(path)
