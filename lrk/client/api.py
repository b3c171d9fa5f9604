"""LrkClient (blocking) and AsyncLrkClient (asyncio): thin I/O shells around ClientCore.

They own the sockets and the waiting; every decision (which node, resend or
fail over, disable, call table) is made by the sans-IO ClientCore and
RequestState, so both clients behave identically.
"""

from __future__ import annotations

import asyncio
import functools
import threading
import time
from typing import Any, Awaitable, Callable, Dict, List, Optional, Tuple, Union

from lrk.client.calltable import CallTable
from lrk.client.core import ClientCore, NodeLike, Operation, Reply, SetsLike
from lrk.client.errors import ClientError, InvalidArgument, NoNodeAvailable, RelayError
from lrk.client.nodes import Node, NodeAddress, NodeSet
from lrk.client.protocol import TOKEN_GONE, KeyLike, resolve_key
from lrk.client.request import RequestState
from lrk.client.sip import SipData
from lrk.client.transport import AsyncTransport, SyncTransport

ManageResult = Union[SipData, Reply, None]
SyncTransportFactory = Callable[[NodeAddress], Any]
AsyncTransportFactory = Callable[[NodeAddress], Awaitable[Any]]


class _KeyedCore(ClientCore):
    """ClientCore whose requests are signed with the client's key (every RequestState it
    makes, retries on another node included)."""

    key: Any = None

    def request(self, op: Operation) -> RequestState:
        state = super().request(op)
        state.key = self.key
        return state


class _ClientBase:
    def __init__(self, sets: SetsLike, *, algorithm: str = "linear", timeout: float = 1.0,
                 retries: int = 5, disable_period: float = 60.0, table_timeout: float = 3600.0,
                 table_size: int = 100000, token: Optional[str] = None,
                 clock: Callable[[], float] = time.monotonic,
                 default_set: Optional[int] = None, key: KeyLike = None) -> None:
        if token is not None:
            raise InvalidArgument(TOKEN_GONE)
        self._core = _KeyedCore(sets, algorithm=algorithm, timeout=timeout, retries=retries,
                                disable_period=disable_period, table_timeout=table_timeout,
                                table_size=table_size, clock=clock, default_set=default_set)
        self._core.key = resolve_key(key)  # the key file is read once, here
        self._closed = False

    @property
    def key_id(self) -> Optional[str]:
        """The id of the key requests are signed with (None: unsigned)."""
        return None if self._core.key is None else self._core.key.id

    @property
    def sets(self) -> Dict[int, NodeSet]:
        """The node sets by id (nodes carry their enabled / disabled_until state)."""
        return self._core.sets

    @property
    def table(self) -> CallTable:
        """The call table: which node holds which call."""
        return self._core.table

    def node(self, address: NodeLike) -> Node:
        """The configured Node for an address string (to inspect or enable/disable it)."""
        return self._core.resolve_node(address)

    def _check_open(self) -> None:
        if self._closed:
            raise ClientError("this lrk client is closed; create a new one")


class LrkClient(_ClientBase):
    """Blocking client. Thread-safe: one request at a time per client (a lock).

    `sets` is `{set_id: [node, ...]}` or one list of nodes (set 0); a node is
    `udp:HOST:PORT`, `udp6:[HOST]:PORT` or `unix:PATH`, optionally `=WEIGHT`.
    `timeout` is per send, `retries` the sends per node, `disable_period` how
    long a silent node is skipped, `clock` the time source of both. Requests are
    signed with `key`: a key file or directory, a `lrk.control.auth.Key`, or "none";
    by default client.key of `lrk.control.auth.default_key_dir()` (docs/security.md).
    """

    def __init__(self, sets: SetsLike, *, algorithm: str = "linear", timeout: float = 1.0,
                 retries: int = 5, disable_period: float = 60.0, table_timeout: float = 3600.0,
                 table_size: int = 100000, token: Optional[str] = None,
                 clock: Callable[[], float] = time.monotonic, default_set: Optional[int] = None,
                 transport_factory: Optional[SyncTransportFactory] = None,
                 key: KeyLike = None) -> None:
        super().__init__(sets, algorithm=algorithm, timeout=timeout, retries=retries,
                         disable_period=disable_period, table_timeout=table_timeout,
                         table_size=table_size, token=token, clock=clock,
                         default_set=default_set, key=key)
        self._factory = transport_factory or SyncTransport
        self._transports: Dict[str, Any] = {}
        self._lock = threading.RLock()

    def __enter__(self) -> LrkClient:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        """Close every socket (and remove unix client paths)."""
        with self._lock:
            self._closed = True
            transports, self._transports = self._transports, {}
            for transport in transports.values():
                transport.close()

    def _transport(self, node: Node) -> Any:
        key = str(node.address)
        transport = self._transports.get(key)
        if transport is None:
            transport = self._transports[key] = self._factory(node.address)
        return transport

    def _exchange(self, state: RequestState) -> Reply:
        clock = self._core.clock
        action = state.start(clock())
        while True:
            try:
                transport = self._transport(action.node)
            except OSError:
                action = state.node_failed(clock())
                continue
            try:
                transport.send(action.data)
            except OSError:
                pass  # as if the datagram was lost: this try times out
            deadline = time.monotonic() + action.timeout
            remaining = action.timeout
            while remaining > 0:
                data = transport.recv(remaining)
                if data is None:
                    break
                reply = state.received(data, clock())
                if reply is not None:
                    return reply
                remaining = deadline - time.monotonic()  # a stray datagram: wait the rest
            action = state.timed_out(clock())

    def _run(self, op: Operation) -> Any:
        with self._lock:
            self._check_open()
            state = self._core.request(op)
            refusal: Optional[RelayError] = None
            while True:
                try:
                    reply = self._exchange(state)
                except RelayError as error:
                    retry = self._core.move_on(op, state, error)
                    if retry is None:
                        return self._core.failed(op, error)
                    state, refusal = retry, error  # draining or full: the next node, at once
                    continue
                except NoNodeAvailable:
                    if refusal is None:
                        raise
                    return self._core.failed(op, refusal)  # every node refused: say why
                return self._core.finish(op, state, reply)

    def ping(self, node: Optional[NodeLike] = None, *, set_id: Optional[int] = None) -> Reply:
        """Ping a selected node, or `node` (even a disabled one: it is re-enabled if it answers)."""
        return self._run(self._core.ping(node, set_id))

    def capabilities(self, node: Optional[NodeLike] = None, *,
                     set_id: Optional[int] = None) -> Reply:
        """The relay's capabilities map (commands, port range, addresses, limits)."""
        return self._run(self._core.capabilities(node, set_id))

    def stats(self, node: Optional[NodeLike] = None, *, set_id: Optional[int] = None) -> Reply:
        """Relay-wide counters of one node."""
        return self._run(self._core.stats(node, set_id))

    def drain(self, on: bool = True, node: Optional[NodeLike] = None, *,
              set_id: Optional[int] = None) -> Reply:
        """Stop (or with on=False resume) taking new calls on a node; calls continue."""
        return self._run(self._core.drain(on, node, set_id))

    def reload(self, node: Optional[NodeLike] = None, *, set_id: Optional[int] = None
               ) -> Reply:
        """Make a node re-read its configuration file (as SIGHUP does)."""
        return self._run(self._core.reload(node, set_id))

    def shutdown(self, node: Optional[NodeLike] = None, *, set_id: Optional[int] = None
                 ) -> Reply:
        """Stop a node and end its calls for good (a SIGTERM keeps them for a restart)."""
        return self._run(self._core.shutdown(node, set_id))

    def takeover(self, peer: str, node: Optional[NodeLike] = None, *,
                 set_id: Optional[int] = None) -> Reply:
        """Make a node adopt every call of node `peer` (its node_id; the two share a
        Redis, and peer's media addresses have moved to that node)."""
        return self._run(self._core.takeover(peer, node, set_id))

    def list(self, limit: Optional[int] = None, offset: Optional[int] = None, *,
             node: Optional[NodeLike] = None, set_id: Optional[int] = None) -> Reply:
        """One page of a node's sessions (`total`, `sessions`)."""
        return self._run(self._core.list(limit, offset, node, set_id))

    def offer(self, call_id: str, from_tag: str, media: Optional[Tuple[str, int]] = None, *,
              sdp: Optional[SipData] = None, to_tag: Optional[str] = None,
              interface: str = "internal", latch_any: bool = False,
              timeout: Optional[int] = None, via_branch: Optional[str] = None,
              set_id: Optional[int] = None) -> Reply:
        """Send an offer; a known call goes to its node, a new one to a selected node.

        `timeout` is the session's silence timeout (relay side), not the request's.
        """
        return self._run(self._core.offer(
            call_id, from_tag, media, sdp=sdp, to_tag=to_tag, interface=interface,
            latch_any=latch_any, timeout=timeout, via_branch=via_branch, set_id=set_id))

    def answer(self, call_id: str, from_tag: str, to_tag: str,
               media: Optional[Tuple[str, int]] = None, *, sdp: Optional[SipData] = None,
               interface: str = "internal", latch_any: bool = False,
               timeout: Optional[int] = None, via_branch: Optional[str] = None,
               set_id: Optional[int] = None, provisional: bool = False) -> Reply:
        """Send an answer to the node that got the call's offer (from the call table).
        `provisional`: the SDP of a 1xx (183): an early dialog; with a forked INVITE each
        To-tag's gets its own relay ports until the final answer picks one."""
        return self._run(self._core.answer(
            call_id, from_tag, to_tag, media, sdp=sdp, interface=interface,
            latch_any=latch_any, timeout=timeout, via_branch=via_branch, set_id=set_id,
            provisional=provisional))

    def delete(self, call_id: str, from_tag: Optional[str] = None, *,
               via_branch: Optional[str] = None, set_id: Optional[int] = None) -> Reply:
        """End the call's session on its node and forget it in the call table."""
        return self._run(self._core.delete(call_id, from_tag, via_branch=via_branch,
                                           set_id=set_id))

    def query(self, call_id: str, *, set_id: Optional[int] = None) -> Reply:
        """The call's session and counters."""
        return self._run(self._core.query(call_id, set_id))

    def manage(self, sip_message: SipData, flags: Optional[str] = None,
               ip_address: Optional[str] = None, *,
               set_id: Optional[int] = None) -> ManageResult:
        """Do what lrkproxy_manage() does: offer/answer (returns the rewritten message,
        same type as given), delete (returns the delete reply) or nothing (None)."""
        op = self._core.manage(sip_message, flags, ip_address, set_id)
        return None if op is None else self._run(op)


class AsyncLrkClient(_ClientBase):
    """Asyncio client with the same API as LrkClient (methods are coroutines).

    Many requests may be in flight at once; replies are matched by cookie. The requests
    of one call (Call-ID) run one after another, in the order they were made. Use from
    one event loop only.
    """

    def __init__(self, sets: SetsLike, *, algorithm: str = "linear", timeout: float = 1.0,
                 retries: int = 5, disable_period: float = 60.0, table_timeout: float = 3600.0,
                 table_size: int = 100000, token: Optional[str] = None,
                 clock: Callable[[], float] = time.monotonic, default_set: Optional[int] = None,
                 transport_factory: Optional[AsyncTransportFactory] = None,
                 key: KeyLike = None) -> None:
        super().__init__(sets, algorithm=algorithm, timeout=timeout, retries=retries,
                         disable_period=disable_period, table_timeout=table_timeout,
                         table_size=table_size, token=token, clock=clock,
                         default_set=default_set, key=key)
        self._factory = transport_factory or AsyncTransport.open
        self._transports: Dict[str, Any] = {}
        self._opening: Dict[str, asyncio.Future[Any]] = {}
        #: per Call-ID with requests in flight: a lock and how many requests hold or await
        #: it (a call's requests run one after another, so each finds the node its
        #: predecessors left in the call table; other calls' run meanwhile)
        self._calls: Dict[str, List[Any]] = {}

    async def __aenter__(self) -> AsyncLrkClient:
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()

    async def close(self) -> None:
        """Close every socket (and remove unix client paths)."""
        self._closed = True
        transports, self._transports = self._transports, {}
        for transport in transports.values():
            transport.close()

    async def _transport(self, node: Node) -> Any:
        key = str(node.address)
        transport = self._transports.get(key)
        if transport is not None:
            if getattr(transport, "usable", True):
                return transport
            del self._transports[key]  # its socket was lost: open a new one
            transport.close()
        pending = self._opening.get(key)
        if pending is None:  # one opening per node, however many requests wait for it
            pending = asyncio.ensure_future(self._factory(node.address))
            self._opening[key] = pending
            pending.add_done_callback(functools.partial(self._opened, key))
        return await asyncio.shield(pending)

    def _opened(self, key: str, pending: asyncio.Future[Any]) -> None:
        if self._opening.get(key) is pending:
            del self._opening[key]
        if pending.cancelled() or pending.exception() is not None:
            return
        transport = pending.result()
        if self._closed:
            transport.close()
        else:
            self._transports[key] = transport

    async def _exchange(self, state: RequestState) -> Reply:
        clock = self._core.clock
        loop = asyncio.get_running_loop()
        action = state.start(clock())
        while True:
            try:
                transport = await self._transport(action.node)
            except OSError:
                action = state.node_failed(clock())
                continue
            cookie = state.cookie
            assert cookie is not None
            queue = transport.register(cookie)
            try:
                while state.cookie == cookie:  # the tries on this node
                    transport.send(action.data)
                    deadline = loop.time() + action.timeout
                    while True:
                        remaining = deadline - loop.time()
                        if remaining <= 0:
                            break
                        try:
                            data = await asyncio.wait_for(queue.get(), remaining)
                        except asyncio.TimeoutError:
                            break
                        reply = state.received(data, clock())
                        if reply is not None:
                            return reply
                    action = state.timed_out(clock())
            finally:
                transport.unregister(cookie)

    async def _run(self, op: Operation) -> Any:
        self._check_open()
        if op.call is None:
            return await self._run_now(op)
        call_id = op.call[0]
        entry = self._calls.get(call_id)
        if entry is None:
            entry = self._calls[call_id] = [asyncio.Lock(), 0]
        entry[1] += 1
        try:
            async with entry[0]:
                return await self._run_now(op)
        finally:
            entry[1] -= 1
            if not entry[1]:
                del self._calls[call_id]

    async def _run_now(self, op: Operation) -> Any:
        state = self._core.request(op)
        refusal: Optional[RelayError] = None
        while True:
            try:
                reply = await self._exchange(state)
            except RelayError as error:
                retry = self._core.move_on(op, state, error)
                if retry is None:
                    return self._core.failed(op, error)
                state, refusal = retry, error  # draining or full: the next node, at once
                continue
            except NoNodeAvailable:
                if refusal is None:
                    raise
                return self._core.failed(op, refusal)  # every node refused: say why
            return self._core.finish(op, state, reply)

    async def ping(self, node: Optional[NodeLike] = None, *,
                   set_id: Optional[int] = None) -> Reply:
        """See LrkClient.ping."""
        return await self._run(self._core.ping(node, set_id))

    async def capabilities(self, node: Optional[NodeLike] = None, *,
                           set_id: Optional[int] = None) -> Reply:
        """See LrkClient.capabilities."""
        return await self._run(self._core.capabilities(node, set_id))

    async def drain(self, on: bool = True, node: Optional[NodeLike] = None, *,
                    set_id: Optional[int] = None) -> Reply:
        """See LrkClient.drain."""
        return await self._run(self._core.drain(on, node, set_id))

    async def reload(self, node: Optional[NodeLike] = None, *,
                     set_id: Optional[int] = None) -> Reply:
        """See LrkClient.reload."""
        return await self._run(self._core.reload(node, set_id))

    async def shutdown(self, node: Optional[NodeLike] = None, *,
                       set_id: Optional[int] = None) -> Reply:
        """See LrkClient.shutdown."""
        return await self._run(self._core.shutdown(node, set_id))

    async def takeover(self, peer: str, node: Optional[NodeLike] = None, *,
                       set_id: Optional[int] = None) -> Reply:
        """See LrkClient.takeover."""
        return await self._run(self._core.takeover(peer, node, set_id))

    async def stats(self, node: Optional[NodeLike] = None, *,
                    set_id: Optional[int] = None) -> Reply:
        """See LrkClient.stats."""
        return await self._run(self._core.stats(node, set_id))

    async def list(self, limit: Optional[int] = None, offset: Optional[int] = None, *,
                   node: Optional[NodeLike] = None, set_id: Optional[int] = None) -> Reply:
        """See LrkClient.list."""
        return await self._run(self._core.list(limit, offset, node, set_id))

    async def offer(self, call_id: str, from_tag: str,
                    media: Optional[Tuple[str, int]] = None, *, sdp: Optional[SipData] = None,
                    to_tag: Optional[str] = None, interface: str = "internal",
                    latch_any: bool = False, timeout: Optional[int] = None,
                    via_branch: Optional[str] = None, set_id: Optional[int] = None) -> Reply:
        """See LrkClient.offer."""
        return await self._run(self._core.offer(
            call_id, from_tag, media, sdp=sdp, to_tag=to_tag, interface=interface,
            latch_any=latch_any, timeout=timeout, via_branch=via_branch, set_id=set_id))

    async def answer(self, call_id: str, from_tag: str, to_tag: str,
                     media: Optional[Tuple[str, int]] = None, *, sdp: Optional[SipData] = None,
                     interface: str = "internal", latch_any: bool = False,
                     timeout: Optional[int] = None, via_branch: Optional[str] = None,
                     set_id: Optional[int] = None, provisional: bool = False) -> Reply:
        """See LrkClient.answer."""
        return await self._run(self._core.answer(
            call_id, from_tag, to_tag, media, sdp=sdp, interface=interface,
            latch_any=latch_any, timeout=timeout, via_branch=via_branch, set_id=set_id,
            provisional=provisional))

    async def delete(self, call_id: str, from_tag: Optional[str] = None, *,
                     via_branch: Optional[str] = None, set_id: Optional[int] = None) -> Reply:
        """See LrkClient.delete."""
        return await self._run(self._core.delete(call_id, from_tag, via_branch=via_branch,
                                                 set_id=set_id))

    async def query(self, call_id: str, *, set_id: Optional[int] = None) -> Reply:
        """See LrkClient.query."""
        return await self._run(self._core.query(call_id, set_id))

    async def manage(self, sip_message: SipData, flags: Optional[str] = None,
                     ip_address: Optional[str] = None, *,
                     set_id: Optional[int] = None) -> ManageResult:
        """See LrkClient.manage."""
        op = self._core.manage(sip_message, flags, ip_address, set_id)
        return None if op is None else await self._run(op)
