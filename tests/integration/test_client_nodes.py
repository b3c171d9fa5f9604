"""The client library against real relays and a dead node: selection, failover, disable."""

from __future__ import annotations

import socket

import pytest

from lrk.client import LrkClient
from lrk.client.errors import NoNodeAvailable

pytestmark = pytest.mark.integration


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def dead_node():
    """A bound UDP socket that never answers: requests to it time out."""
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("127.0.0.1", 0))
    yield s
    s.close()


def _received(sock: socket.socket) -> int:
    sock.setblocking(False)
    n = 0
    while True:
        try:
            sock.recv(65535)
        except BlockingIOError:
            return n
        n += 1


def test_linear_fails_over_from_a_dead_node_and_keeps_it_disabled(start_relay, dead_node):
    relay = start_relay()
    clock = FakeClock()
    dead = f"udp:127.0.0.1:{dead_node.getsockname()[1]}"
    # the timeout must also cover a live relay's first delete (a counter refresh from a
    # cold PyPy worker on a loaded machine): 0.5 s a try
    with LrkClient([dead, relay.node], timeout=0.5, retries=3, disable_period=30,
                   clock=clock) as client:
        reply = client.offer("fo-1", "a", ("127.0.0.1", 4000))
        assert reply["ok"] is True
        assert _received(dead_node) == 3  # one cookie, three sends, then failover
        client.offer("fo-2", "a", ("127.0.0.1", 4002))
        assert _received(dead_node) == 0  # disabled: not tried again meanwhile
        # the call's answer and delete go to the node that got its offer
        client.answer("fo-1", "a", "b", ("127.0.0.1", 5000))
        assert client.delete("fo-1")["ok"] is True
        clock.now += 31  # disable period over: the dead node is tried again first
        client.offer("fo-3", "a", ("127.0.0.1", 4004))
        assert _received(dead_node) == 3
    with LrkClient([relay.node]) as check:
        assert {s["call_id"] for s in check.list()["sessions"]} == {"fo-2", "fo-3"}


def test_round_robin_spreads_calls_over_live_relays(start_relay):
    first, second = start_relay(), start_relay()
    with LrkClient([first.node, second.node], algorithm="round-robin") as client:
        for n in range(6):
            client.offer(f"rr-{n}", "a", ("127.0.0.1", 4000 + 2 * n))
        for n in range(6):  # known calls stick to their relay
            client.answer(f"rr-{n}", "a", "b", ("127.0.0.1", 6000 + 2 * n))
    counts = []
    for relay in (first, second):
        with LrkClient([relay.node]) as one:
            counts.append(one.list()["total"])
            assert all(s["state"] == "answered" for s in one.list()["sessions"])
    assert counts == [3, 3]


def test_all_nodes_dead_raises_and_names_the_set(dead_node):
    dead = f"udp:127.0.0.1:{dead_node.getsockname()[1]}"
    with LrkClient({7: [dead]}, timeout=0.05, retries=2) as client, \
            pytest.raises(NoNodeAvailable) as err:
        client.offer("x", "a", ("127.0.0.1", 4000), set_id=7)
    assert "7" in str(err.value)
