"""A call's requests reach the node that holds it even when they overlap: the node is
looked up when a request starts, after the call's earlier requests (sync client: under
its lock; asyncio client: the requests of one Call-ID run in order), not when the
request is built. Before, a CANCEL's delete made while the INVITE's offer waited for its
reply went to another node, got not_found, and the client forgot the real one."""

from __future__ import annotations

import asyncio
import threading
from typing import Any, Dict, List

try:
    from client_fakes import FakeClock, FakeNet, RelayLogic, decode, encode
except ImportError:  # tests/ collected as a package
    from tests.unit.client_fakes import FakeClock, FakeNet, RelayLogic, decode, encode

from lrk.client import AsyncLrkClient, LrkClient

A = "udp:10.0.0.1:22222"
B = "udp:10.0.0.2:22222"
WAIT = 10.0  # bound of every wait below; none comes near it


def test_sync_delete_made_while_the_offer_waits_goes_to_the_offers_node():
    clock = FakeClock(1000.0)
    net = FakeNet(clock)
    offer_sent, release = threading.Event(), threading.Event()
    factory = net.factory

    def gated_factory(address: Any) -> Any:
        transport = factory(address)
        send = transport.send

        def gated_send(data: bytes) -> None:
            if decode(data)["cmd"] == "offer":  # the offer's reply waits for `release`
                offer_sent.set()
                assert release.wait(WAIT)
            send(data)

        transport.send = gated_send
        return transport

    client = LrkClient([A, B], algorithm="round-robin", clock=clock, key="none",
                       transport_factory=gated_factory)
    errors: List[BaseException] = []

    def run(fn: Any) -> None:
        try:
            fn()
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    invite = threading.Thread(target=run, args=(
        lambda: client.offer("c1", "ft", ("198.51.100.1", 4000)),))
    cancel = threading.Thread(target=run, args=(lambda: client.delete("c1"),))
    invite.start()
    assert offer_sent.wait(WAIT)
    cancel.start()  # builds its request now; it may only pick its node after the offer
    release.set()
    invite.join(WAIT)
    cancel.join(WAIT)
    assert not invite.is_alive() and not cancel.is_alive() and errors == []
    assert [r["cmd"] for r in net.requests_to(A)] == ["offer", "delete"]
    assert net.requests_to(B) == []
    assert net.relay(A).sessions == {} and len(client.table) == 0


class _GatedTransport:
    """An asyncio transport to one RelayLogic whose offer replies wait for `release`."""

    def __init__(self, logic: RelayLogic, sent: List[Dict[str, Any]],
                 release: asyncio.Event) -> None:
        self.logic, self.sent, self.release = logic, sent, release
        self.queues: Dict[str, asyncio.Queue] = {}
        self.usable = True

    def register(self, cookie: str) -> asyncio.Queue:
        queue = self.queues[cookie] = asyncio.Queue()
        return queue

    def unregister(self, cookie: str) -> None:
        self.queues.pop(cookie, None)

    def send(self, data: bytes) -> None:
        request = decode(data)
        self.sent.append(request)
        reply = encode(self.logic.handle(request))
        queue = self.queues[request["cookie"]]
        if request["cmd"] == "offer":
            async def later() -> None:
                await self.release.wait()
                queue.put_nowait(reply)
            asyncio.ensure_future(later())
        else:
            queue.put_nowait(reply)

    def close(self) -> None:
        self.usable = False


def test_async_requests_of_one_call_run_in_order_and_other_calls_do_not_wait():
    async def scenario() -> None:
        release = asyncio.Event()
        logic = {A: RelayLogic(base_port=30000), B: RelayLogic(base_port=31000)}
        sent: Dict[str, List[Dict[str, Any]]] = {A: [], B: []}

        async def factory(address: Any) -> _GatedTransport:
            return _GatedTransport(logic[str(address)], sent[str(address)], release)

        client = AsyncLrkClient([A, B], algorithm="round-robin", key="none",
                                transport_factory=factory)
        invite = asyncio.ensure_future(client.offer("c1", "ft", ("198.51.100.1", 4000)))
        for _ in range(20):  # until the offer is on the wire (bounded)
            if sent[A]:
                break
            await asyncio.sleep(0)
        assert [r["cmd"] for r in sent[A]] == ["offer"]
        cancel = asyncio.ensure_future(client.delete("c1"))
        other = await asyncio.wait_for(client.ping(), WAIT)  # no call: not held
        assert other["pong"] is True
        for _ in range(20):
            await asyncio.sleep(0)
        assert [r["cmd"] for r in sent[A] + sent[B] if r["cmd"] == "delete"] == []
        release.set()
        await asyncio.wait_for(asyncio.gather(invite, cancel), WAIT)
        assert [r["cmd"] for r in sent[A] if r["cmd"] != "ping"] == ["offer", "delete"]
        assert [r["cmd"] for r in sent[B] if r["cmd"] != "ping"] == []
        assert logic[A].sessions == {} and len(client.table) == 0
        assert client._calls == {}  # nothing kept once a call's requests are done
        await client.close()

    asyncio.run(scenario())
