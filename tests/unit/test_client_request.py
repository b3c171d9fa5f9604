"""Retries, failover, disabling and call-table routing, with a fake clock and network."""

from __future__ import annotations

import msgpack
import pytest

try:
    from client_fakes import FakeClock, FakeNet, decode
except ImportError:  # tests/ collected as a package
    from tests.unit.client_fakes import FakeClock, FakeNet, decode

from lrk.client import LrkClient
from lrk.client.errors import (
    InvalidArgument,
    NodeTimeout,
    NoNodeAvailable,
    ProtocolError,
    RelayError,
)
from lrk.client.nodes import NodeSet
from lrk.client.protocol import CookieFactory, encode_request
from lrk.client.request import RequestState
from lrk.control.auth import sign, trailer_of
from tests.control_keys import TEST_KEY, WALL

A = "udp:10.0.0.1:22222"
B = "udp:10.0.0.2:22222"
C = "udp:10.0.0.3:22222"


def _state(nodeset, **kw):
    args = dict(retries=5, timeout=1.0, disable_period=60.0, cookies=CookieFactory())
    args.update(kw)
    return RequestState({"cmd": "ping"}, nodeset, **args)


def _reply(cookie, **fields):
    body = {"v": 1, "cookie": cookie}
    body.update(fields)
    return msgpack.packb(body, use_bin_type=True)


# -- the sans-IO request state ----------------------------------------------------------

def test_state_resends_identical_bytes_then_fails_over_with_new_cookie():
    nodeset = NodeSet(0, [A, B])
    a, b = nodeset.nodes
    state = _state(nodeset)
    first = state.start(now=0.0)
    assert (first.node, first.attempt, first.timeout) == (a, 1, 1.0)
    cookie_a = decode(first.data)["cookie"]
    resends = [state.timed_out(now=float(i)) for i in range(1, 5)]
    assert [s.data for s in resends] == [first.data] * 4
    assert [s.attempt for s in resends] == [2, 3, 4, 5]
    assert a.is_available(4.0)
    over = state.timed_out(now=5.0)
    assert over.node is b and over.attempt == 1
    assert decode(over.data)["cookie"] != cookie_a
    assert decode(over.data)["cmd"] == "ping"
    assert a.disabled_until == 65.0
    assert state.tried == [a, b]


def test_state_exhausting_every_node_raises_no_node_available():
    nodeset = NodeSet(4, [A, B])
    state = _state(nodeset, retries=1)
    state.start(0.0)
    state.timed_out(1.0)
    with pytest.raises(NoNodeAvailable) as info:
        state.timed_out(2.0)
    assert info.value.set_id == 4
    assert "no answer from udp:10.0.0.1:22222, udp:10.0.0.2:22222" in str(info.value)
    assert info.value.retry_at == 61.0


def test_state_accepts_only_its_cookie():
    nodeset = NodeSet(0, [A])
    state = _state(nodeset)
    state.start(0.0)
    assert state.received(_reply("other", ok=True), 0.1) is None
    assert state.received(b"\xc1garbage", 0.1) is None
    assert state.received(msgpack.packb([1, 2]), 0.1) is None
    reply = state.received(_reply(state.cookie, ok=True, pong=True), 0.2)
    assert reply["pong"] is True


def test_state_error_reply_raises_and_keeps_node_enabled():
    nodeset = NodeSet(0, [A])
    state = _state(nodeset)
    state.start(0.0)
    err = {"code": "bad_request", "message": "call_id missing"}
    with pytest.raises(RelayError) as info:
        state.received(_reply(state.cookie, ok=False, error=err), 0.1)
    assert (info.value.code, info.value.message) == ("bad_request", "call_id missing")
    assert info.value.node == A
    assert nodeset.nodes[0].is_available(0.1)


def test_state_cookieless_error_reply_is_ours():
    state = _state(NodeSet(0, [A]))
    state.start(0.0)
    err = {"code": "too_large", "message": "65001 bytes"}
    with pytest.raises(RelayError, match="too_large"):
        state.received(_reply(None, ok=False, error=err), 0.1)
    with pytest.raises(ProtocolError):
        state.received(_reply(state.cookie), 0.1)


def test_state_fixed_node_times_out_without_failover():
    nodeset = NodeSet(0, [A, B])
    a = nodeset.nodes[0]
    state = _state(nodeset, retries=2, node=a)
    state.start(0.0)
    state.timed_out(1.0)
    with pytest.raises(NodeTimeout) as info:
        state.timed_out(2.0)
    assert info.value.node == A and info.value.tries == 2
    assert a.disabled_until == 62.0


def test_state_fixed_disabled_node_is_not_sent_unless_forced():
    nodeset = NodeSet(0, [A])
    a = nodeset.nodes[0]
    a.disable(0.0, 60.0)
    with pytest.raises(NoNodeAvailable, match="tried again in 50.0 s"):
        _state(nodeset, node=a).start(10.0)
    assert _state(nodeset, node=a, force=True).start(10.0).node is a


def test_state_rejects_bad_retry_settings():
    with pytest.raises(InvalidArgument, match="retries"):
        _state(NodeSet(0, [A]), retries=0)
    with pytest.raises(InvalidArgument, match="timeout"):
        _state(NodeSet(0, [A]), timeout=0)


def test_cookies_are_unique_and_short():
    cookies = CookieFactory()
    values = [cookies() for _ in range(1000)]
    assert len(set(values)) == 1000
    assert all(12 < len(c) <= 64 for c in values)


def test_encode_request_adds_version_cookie_signs_and_bounds_size():
    data = encode_request({"cmd": "ping"}, "abc")
    assert decode(data) == {"v": 1, "cookie": "abc", "cmd": "ping"}
    signed = encode_request({"cmd": "ping"}, "abc", key=TEST_KEY, wall=WALL)
    assert signed == sign(data, TEST_KEY, WALL)  # the same map, then the trailer
    with pytest.raises(InvalidArgument, match="65000"):
        encode_request({"cmd": "offer", "sdp": "x" * 70000}, "abc")
    with pytest.raises(InvalidArgument, match="key="):  # control_token is gone
        encode_request({"cmd": "ping"}, "abc", token="s3cret")


# -- LrkClient over the fake network ----------------------------------------------------

def _client(nodes, clock, net, **kw):
    return LrkClient(nodes, clock=clock, transport_factory=net.factory, **kw)


@pytest.fixture
def clock():
    return FakeClock(1000.0)


@pytest.fixture
def net(clock):
    return FakeNet(clock)


def test_retries_resend_identical_bytes_with_one_cookie(clock, net):
    client = _client([A], clock, net, timeout=0.5, retries=5)
    net.silent[A] = 2
    assert client.ping()["pong"] is True
    sent = net.sent_to(A)
    assert len(sent) == 3
    assert sent[0] == sent[1] == sent[2]
    assert clock.now == 1001.0  # two timeouts of 0.5 s passed


def test_dead_node_fails_over_and_is_not_sent_anything_while_disabled(clock, net):
    client = _client([A, B], clock, net, timeout=1.0, retries=5, disable_period=60.0)
    net.dead.add(A)
    assert client.ping()["pong"] is True
    to_a, to_b = net.requests_to(A), net.requests_to(B)
    assert len(to_a) == 5 and len({r["cookie"] for r in to_a}) == 1
    assert len(to_b) == 1 and to_b[0]["cookie"] != to_a[0]["cookie"]
    assert client.node(A).disabled_until == 1005.0 + 60.0

    for _ in range(3):
        client.ping()
    clock.advance(59.9)
    client.ping()
    assert len(net.sent_to(A)) == 5  # no re-pinging during the disable period
    assert len(net.sent_to(B)) == 5

    clock.advance(0.1)  # the period is over: A is selected (linear) and now answers
    net.dead.discard(A)
    client.ping()
    assert len(net.sent_to(A)) == 6
    assert len(net.sent_to(B)) == 5
    assert client.node(A).is_available(clock.now)


def test_all_nodes_dead_raises_then_fails_fast(clock, net):
    client = _client([A, B], clock, net, retries=2, disable_period=30.0)
    net.dead.update([A, B])
    with pytest.raises(NoNodeAvailable) as info:
        client.ping()
    assert info.value.set_id == 0
    assert "set 0" in str(info.value)
    assert len(net.sent) == 4
    with pytest.raises(NoNodeAvailable, match=r"first node back: udp:10\.0\.0\.1:22222 in"):
        client.ping()
    assert len(net.sent) == 4  # nothing sent: every node is disabled


def test_relay_error_is_raised_without_retry_or_disable(clock, net):
    client = _client([A, B], clock, net)
    with pytest.raises(RelayError) as info:
        client.answer("nope", "ft", "tt", ("192.0.2.9", 5000))
    assert info.value.code == "not_found"
    assert len(net.sent_to(A)) == 1
    assert net.sent_to(B) == []
    assert client.node(A).is_available(clock.now)


def test_a_call_the_table_does_not_know_is_looked_for_on_every_node(clock, net):
    """A delete or query for a call without a table entry (it expired while the call went
    on, or another client process set the call up) asks the set's nodes in turn until one
    has it: the BYE reaches the session instead of leaving it to the silence timeout.
    Each node is asked once and none is disabled; a call no node has is not_found."""
    client = _client([A, B, C], clock, net, algorithm="round-robin", table_timeout=100)
    client.offer("c1", "ft", ("192.0.2.1", 4000))
    client.offer("c2", "ft", ("192.0.2.1", 4002))
    assert "c2" in net.relay(B).sessions
    clock.advance(101)  # both entries expire; the calls go on
    assert client.table.lookup("c2") is None
    assert client.query("c2")["session"]["call_id"] == "c2"
    assert client.delete("c2")["ok"] is True
    assert "c2" not in net.relay(B).sessions
    for node in (A, B, C):
        assert client.node(node).is_available(clock.now)
    with pytest.raises(RelayError) as info:
        client.query("never")
    assert info.value.code == "not_found"
    assert [len([r for r in net.requests_to(n) if r.get("call_id") == "never"])
            for n in (A, B, C)] == [1, 1, 1]
    # a known call's delete goes to its node only, even when that node answers not_found
    client.offer("c3", "ft", ("192.0.2.1", 4004))
    holder = client.table.lookup("c3")
    assert holder is not None
    del net.relay(str(holder.address)).sessions["c3"]  # the relay expired it meanwhile
    before = {n: len(net.sent_to(n)) for n in (A, B, C)}
    with pytest.raises(RelayError):
        client.query("c3")
    assert sum(len(net.sent_to(n)) - before[n] for n in (A, B, C)) == 1


def test_round_robin_offers_and_call_table_routing(clock, net):
    client = _client([A, B], clock, net, algorithm="round-robin")
    client.offer("call-1", "ft1", ("192.0.2.1", 4000), via_branch="br1")
    client.offer("call-2", "ft2", ("192.0.2.2", 4000), via_branch="br2")
    assert [r["call_id"] for r in net.requests_to(A)] == ["call-1"]
    assert [r["call_id"] for r in net.requests_to(B)] == ["call-2"]
    # answers, re-offers, queries and deletes follow the offer, whatever round-robin says
    client.answer("call-1", "ft1", "tt1", ("192.0.2.9", 5000), via_branch="br1")
    client.offer("call-1", "ft1", ("192.0.2.1", 4002), to_tag="tt1", via_branch="reinv")
    client.query("call-2")
    client.delete("call-2")
    client.delete("call-1", via_branch="bye-branch")
    assert [r["cmd"] for r in net.requests_to(A)] == ["offer", "answer", "offer", "delete"]
    assert [r["cmd"] for r in net.requests_to(B)] == ["offer", "query", "delete"]
    assert len(client.table) == 0


def test_known_call_on_disabled_node_sends_nothing(clock, net):
    client = _client([A, B], clock, net, retries=1, algorithm="round-robin")
    client.offer("call-1", "ft", ("192.0.2.1", 4000))
    assert len(net.sent_to(A)) == 1
    net.dead.add(A)
    with pytest.raises(NodeTimeout):
        client.answer("call-1", "ft", "tt", ("192.0.2.2", 4000))
    assert len(net.sent_to(A)) == 2 and net.sent_to(B) == []
    with pytest.raises(NoNodeAvailable, match="holds this call"):
        client.delete("call-1")
    assert len(net.sent_to(A)) == 2 and net.sent_to(B) == []


def test_delete_not_found_forgets_the_call(clock, net):
    client = _client([A], clock, net)
    client.offer("call-1", "ft", ("192.0.2.1", 4000))
    net.relay(A).sessions.clear()  # the relay expired it
    with pytest.raises(RelayError, match="not_found"):
        client.delete("call-1")
    assert client.table.lookup("call-1") is None


def test_explicit_ping_reaches_a_disabled_node_and_reenables_it(clock, net):
    client = _client([A, B], clock, net)
    client.node(A).disable(clock.now, 60.0)
    assert client.ping(A)["pong"] is True
    assert len(net.sent_to(A)) == 1
    assert client.node(A).is_available(clock.now)
    client.stats(node="udp:10.0.0.9:1")  # an unconfigured node works too
    assert net.requests_to("udp:10.0.0.9:1")[0]["cmd"] == "stats"


def test_set_id_key_and_arguments_on_the_wire(clock, net):
    client = _client({0: [A], 1: [B, C]}, clock, net, key=TEST_KEY)
    assert client.key_id == "client"
    client.offer("c", "ft", ("192.0.2.1", 4000), interface="external", latch_any=True,
                 timeout=30, set_id=1)
    (req,) = net.requests_to(B)
    assert trailer_of(net.sent_to(B)[0])[1] == b"client"  # signed with the key given
    assert req == {"v": 1, "cookie": req["cookie"], "cmd": "offer",
                   "call_id": "c", "from_tag": "ft",
                   "media": {"ip": "192.0.2.1", "port": 4000}, "interface": "external",
                   "latch_any": True, "timeout": 30}
    client.list(limit=10, set_id=1)
    client.capabilities()
    assert net.requests_to(B)[1] == {"v": 1, "cookie": net.requests_to(B)[1]["cookie"],
                                     "cmd": "list", "limit": 10}
    assert [r["cmd"] for r in net.requests_to(A)] == ["capabilities"]
    with pytest.raises(InvalidArgument, match="node set 5"):
        client.ping(set_id=5)


@pytest.mark.parametrize(
    "call",
    [
        lambda c: c.offer("c", "ft"),
        lambda c: c.offer("c", "ft", ("1.2.3.4", 1), sdp="v=0"),
        lambda c: c.offer("", "ft", ("1.2.3.4", 1)),
        lambda c: c.offer("c", "ft", ("1.2.3.4", "1")),
        lambda c: c.offer("c", "ft", ("1.2.3.4", 1), interface="public"),
        lambda c: c.offer("c", "ft", ("1.2.3.4", 1), timeout=0),
        lambda c: c.answer("c", "ft", None, ("1.2.3.4", 1)),
    ],
)
def test_bad_arguments_are_rejected_before_sending(clock, net, call):
    client = _client([A], clock, net)
    with pytest.raises(InvalidArgument):
        call(client)
    assert net.sent == []


def test_closed_client_refuses_requests(clock, net):
    client = _client([A], clock, net)
    client.ping()
    client.close()
    with pytest.raises(Exception, match="closed"):
        client.ping()


def test_node_whose_socket_cannot_open_is_failed_over_at_once(clock, net):
    def factory(address):
        if str(address) == A:
            raise OSError("Name or service not known")
        return net.factory(address)

    client = LrkClient([A, B], clock=clock, transport_factory=factory)
    assert client.ping()["pong"] is True
    assert clock.now == 1000.0  # no timeout was waited for
    assert not client.node(A).is_available(clock.now)
    assert len(net.sent_to(B)) == 1


def test_a_call_just_ended_is_not_looked_for_on_every_node(clock, net):
    """The 487 after a CANCEL (or a retransmitted BYE) deletes a call this client ended a
    moment ago: one node is asked, not all of them (each a round trip of a SIP worker),
    for ENDED_FOR seconds; after that an unknown call is looked for everywhere again."""
    from lrk.client.calltable import ENDED_FOR

    client = _client([A, B, C], clock, net, algorithm="round-robin")
    client.offer("c1", "ft", ("192.0.2.1", 4000))
    assert client.delete("c1")["ok"] is True  # the CANCEL's
    sent = sum(len(net.sent_to(n)) for n in (A, B, C))
    with pytest.raises(RelayError):
        client.delete("c1")  # the 487's: not_found, from one node
    assert sum(len(net.sent_to(n)) for n in (A, B, C)) == sent + 1
    clock.advance(ENDED_FOR + 1)
    with pytest.raises(RelayError):
        client.delete("c1")
    assert sum(len(net.sent_to(n)) for n in (A, B, C)) == sent + 1 + 3
