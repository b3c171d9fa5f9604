"""Sans-IO state of one control request: retries, failover, and disabling silent nodes.

The I/O shells (sync and asyncio) only move bytes: they ask `start()` what to
send, wait up to `Send.timeout` for datagrams and feed them to `received()`,
and call `timed_out()` when nothing matching came. Everything that decides
*what* happens (resend the identical bytes, give up on a node, disable it,
pick the next node with a new cookie) lives here and takes `now` explicitly.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Dict, List, Mapping, NamedTuple, Optional

from lrk.client.errors import (
    InvalidArgument,
    NodeTimeout,
    NoNodeAvailable,
    ProtocolError,
    RelayError,
)
from lrk.client.nodes import Node, NodeSet
from lrk.client.protocol import TOKEN_GONE, decode_reply, encode_request
from lrk.control.auth import Key


class Send(NamedTuple):
    """Send `data` to `node`, then wait up to `timeout` seconds for the reply."""

    node: Node
    data: bytes
    timeout: float
    attempt: int  # 1-based try number on this node


class RequestState:
    """One request's progress over the nodes of a set.

    Modes: with `node=None` a node is selected from `nodeset` and the request
    fails over to the next selectable node (new cookie) when one stays silent;
    with a `node` given (the call table's node for a known call, or an explicit
    node) only that node is tried. `force=True` sends even to a disabled node
    (an explicit `ping(node)`); otherwise a disabled node is never sent anything.
    With `key`, every datagram is signed (at `wall()`, Unix time, when it is first sent;
    a resend repeats the same bytes, as the relay's retransmission check expects).
    """

    def __init__(self, message: Mapping[str, Any], nodeset: NodeSet, *,
                 retries: int, timeout: float, disable_period: float,
                 cookies: Callable[[], str], token: Optional[str] = None,
                 node: Optional[Node] = None, force: bool = False,
                 key: Optional[Key] = None, wall: Callable[[], float] = time.time) -> None:
        if isinstance(retries, bool) or not isinstance(retries, int) or retries < 1:
            raise InvalidArgument(f"retries must be an integer >= 1 (sends per node), "
                                  f"not {retries!r}")
        if not timeout > 0:
            raise InvalidArgument(f"timeout must be > 0 seconds, not {timeout!r}")
        if token is not None:
            raise InvalidArgument(TOKEN_GONE)
        self.message = dict(message)
        self.nodeset = nodeset
        self.retries = retries
        self.timeout = float(timeout)
        self.disable_period = float(disable_period)
        self.key = key
        self.wall = wall
        self._cookies = cookies
        self._fixed = node
        self._force = force
        self.tried: List[Node] = []
        self.node: Optional[Node] = None
        self.cookie: Optional[str] = None
        self.data = b""
        self.attempt = 0
        self.reply: Optional[Dict[str, Any]] = None

    @property
    def pinned(self) -> Optional[Node]:
        """The one node this request may use (the call's, or an explicit one), else None."""
        return self._fixed

    def start(self, now: float) -> Send:
        """The first datagram to send; raises NoNodeAvailable if no node may be used."""
        if self._fixed is not None:
            node = self._fixed
            if not self._force and not node.is_available(now):
                if not node.enabled:
                    raise NoNodeAvailable(
                        f"relay node {node}, which holds this call, is administratively "
                        "disabled", set_id=self.nodeset.set_id)
                raise NoNodeAvailable(
                    f"relay node {node}, which holds this call, did not answer recently; "
                    "it is tried again in "
                    f"{node.disabled_until - now:.1f} s",
                    set_id=self.nodeset.set_id, retry_at=node.disabled_until)
            return self._begin(self._fixed)
        return self._begin(self.nodeset.select_or_raise(now, self.tried))

    def _begin(self, node: Node) -> Send:
        self.node = node
        self.tried.append(node)
        self.cookie = self._cookies()
        self.data = encode_request(self.message, self.cookie, key=self.key, wall=self.wall())
        self.attempt = 1
        return Send(node, self.data, self.timeout, self.attempt)

    def timed_out(self, now: float) -> Send:
        """No reply within the timeout: resend the same bytes, or fail over to the next node.

        Raises NodeTimeout (single-node request) or NoNodeAvailable (set exhausted).
        """
        if self.node is None:
            raise RuntimeError("timed_out() before start()")
        if self.attempt < self.retries:
            self.attempt += 1
            return Send(self.node, self.data, self.timeout, self.attempt)
        return self.node_failed(now)

    def node_failed(self, now: float) -> Send:
        """The current node is unusable (all tries silent, or no socket to it): move on."""
        node = self.node
        if node is None:
            raise RuntimeError("node_failed() before start()")
        node.disable(now, self.disable_period)
        if self._fixed is not None:
            raise NodeTimeout(str(node), self.attempt, self.timeout)
        return self._begin(self.nodeset.select_or_raise(now, self.tried))

    def received(self, data: bytes, now: float) -> Optional[Dict[str, Any]]:
        """Feed one datagram from the current node.

        Returns the reply when it answers this request (`ok: true`); None when it
        is not ours (other cookie, garbage: keep waiting). Raises RelayError for
        `ok: false` (the node is alive, so it is not disabled).
        """
        if self.node is None:
            raise RuntimeError("received() before start()")
        reply = decode_reply(data)
        if reply is None:
            return None
        cookie = reply.get("cookie")
        if isinstance(cookie, bytes):
            cookie = cookie.decode("utf-8", "replace")
        ok = reply.get("ok")
        # the relay sends cookie nil when it could not read ours (e.g. too_large): ours too
        if cookie != self.cookie and not (cookie is None and ok is False):
            return None
        self.node.mark_alive()
        if ok is True:
            self.reply = reply
            return reply
        if ok is False:
            error = reply.get("error")
            if not isinstance(error, dict):
                error = {}
            raise RelayError(str(error.get("code", "unknown")), str(error.get("message", "")),
                             node=str(self.node), reply=reply)
        raise ProtocolError(f"reply from {self.node} has no boolean 'ok': {reply!r}")
