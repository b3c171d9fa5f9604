"""Client logic shared by the sync and asyncio clients: requests, node choice, call table.

Sans-IO: each public client method is built here as an `Operation` (the
command map, which node or set to use, and what to do with the reply); the
I/O shells run it through a `RequestState` and hand the outcome back.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Dict, Iterable, NamedTuple, Optional, Tuple, Union

from lrk.client.calltable import CallTable
from lrk.client.errors import InvalidArgument, RelayError
from lrk.client.manage import (
    ANSWER,
    DELETE,
    NOTHING,
    apply_reply,
    check_ip_address,
    plan_manage,
)
from lrk.client.nodes import Node, NodeSet, build_sets, parse_node
from lrk.client.protocol import CookieFactory
from lrk.client.request import RequestState
from lrk.client.sip import SipData

Reply = Dict[str, Any]
NodeLike = Union[str, Node]
SetsLike = Union[Dict[int, Iterable[NodeLike]], Iterable[NodeLike]]
INTERFACES = ("internal", "external")


class Operation(NamedTuple):
    """One client call, ready to be sent: what, where, and how to finish it."""

    message: Dict[str, Any]
    nodeset: NodeSet
    node: Optional[Node]  # an explicit node, else None = the call's node or select
    force: bool  # send even to a disabled fixed node (explicit admin request)
    on_reply: Callable[[Node, Reply], Any]
    on_error: Optional[Callable[[RelayError], Any]] = None
    #: (Call-ID, Via branch) of a call's request: its node is looked up in the call table
    #: when the request starts (under the client's lock, after the call's earlier
    #: requests), not when it is built
    call: Optional[Tuple[str, Optional[str]]] = None


#: refusals of a new call that another node of the set may not give
MOVE_ON = frozenset(("draining", "capacity", "ports_exhausted"))
#: requests that, for a call the table does not know (its entry expired, or another
#: client process set it up), ask the set's other nodes after a `not_found`
ROAMING = frozenset(("delete", "query"))


def _check_str(name: str, value: Any, required: bool = True) -> None:
    if value is None and not required:
        return
    if not isinstance(value, str) or not value:
        raise InvalidArgument(f"{name} must be a non-empty string, not {value!r}")


def _return_reply(_node: Node, reply: Reply) -> Reply:
    return reply


class ClientCore:
    """Configuration and state of a client (node sets, call table, cookies); no I/O."""

    def __init__(self, sets: SetsLike, *, algorithm: str = "linear", timeout: float = 1.0,
                 retries: int = 5, disable_period: float = 60.0, table_timeout: float = 3600.0,
                 table_size: int = 100000, token: Optional[str] = None,
                 clock: Callable[[], float] = time.monotonic,
                 default_set: Optional[int] = None) -> None:
        self.sets = build_sets(sets, algorithm)
        if default_set is None:
            default_set = next(iter(self.sets))
        if default_set not in self.sets:
            raise InvalidArgument(f"default_set {default_set!r} is not one of the node sets "
                                  f"{sorted(self.sets)}")
        if isinstance(retries, bool) or not isinstance(retries, int) or retries < 1:
            raise InvalidArgument(f"retries must be an integer >= 1 (sends per node), "
                                  f"not {retries!r}")
        if not timeout > 0:
            raise InvalidArgument(f"timeout must be > 0 seconds, not {timeout!r}")
        if not disable_period >= 0:
            raise InvalidArgument(f"disable_period must be >= 0 seconds, not {disable_period!r}")
        if token is not None and not isinstance(token, str):
            raise InvalidArgument("token must be a string")
        self.default_set = default_set
        self.timeout = float(timeout)
        self.retries = retries
        self.disable_period = float(disable_period)
        self.token = token
        self.clock = clock
        self.table = CallTable(table_timeout, table_size, clock)
        self.cookies = CookieFactory()

    # -- plumbing -------------------------------------------------------------------------

    def nodeset(self, set_id: Optional[int] = None) -> NodeSet:
        """The node set to use; `None` means the default set."""
        key = self.default_set if set_id is None else set_id
        try:
            return self.sets[key]
        except (KeyError, TypeError):
            raise InvalidArgument(f"unknown node set {set_id!r}; configured sets: "
                                  f"{sorted(self.sets)}") from None

    def resolve_node(self, node: NodeLike) -> Node:
        """A configured node (so its state is shared) for a node string, else a one-off Node."""
        if isinstance(node, Node):
            return node
        address = parse_node(node).address
        for nodeset in self.sets.values():
            found = nodeset.find(address)
            if found is not None:
                return found
        return Node(address)

    def request(self, op: Operation) -> RequestState:
        """The sans-IO request state that runs `op` (a call's node looked up now)."""
        node = op.node
        if node is None and op.call is not None:
            node = self.table.lookup(*op.call)
        return RequestState(op.message, op.nodeset, retries=self.retries, timeout=self.timeout,
                            disable_period=self.disable_period, cookies=self.cookies,
                            token=self.token, node=node, force=op.force)

    def finish(self, op: Operation, state: RequestState, reply: Reply) -> Any:
        """The method's result for a successful reply (updates the call table)."""
        assert state.node is not None
        return op.on_reply(state.node, reply)

    def move_on(self, op: Operation, state: RequestState, error: RelayError
                ) -> Optional[RequestState]:
        """A node refused a new call for a reason another node may not have (`draining`,
        `capacity`, `ports_exhausted`), or does not know a call the table has no node for
        (`not_found` to a delete or query): the request for the next node of the set, with
        the nodes asked so far skipped (they stay enabled: their calls go on). None when
        the call is pinned to that node or the error is of another kind."""
        if state.pinned is not None:
            return None
        if error.code not in MOVE_ON and not (
                error.code == "not_found" and op.message.get("cmd") in ROAMING
                and not self.table.ended(str(op.message.get("call_id")))):
            return None
        retry = self.request(op)
        retry.tried = list(state.tried)
        return retry

    def failed(self, op: Operation, error: RelayError) -> Any:
        """The method's result (or the re-raised error) for an `ok: false` reply."""
        if op.on_error is None:
            raise error
        return op.on_error(error)

    def _admin(self, cmd: str, node: Optional[NodeLike], set_id: Optional[int],
               **args: Any) -> Operation:
        message: Dict[str, Any] = {"cmd": cmd}
        message.update({k: v for k, v in args.items() if v is not None})
        fixed = self.resolve_node(node) if node is not None else None
        return Operation(message, self.nodeset(set_id), fixed, fixed is not None, _return_reply)

    def _media_message(self, cmd: str, call_id: str, from_tag: str, to_tag: Optional[str],
                       media: Optional[Tuple[str, int]], sdp: Optional[SipData], interface: str,
                       latch_any: bool, timeout: Optional[int],
                       provisional: bool = False) -> Dict[str, Any]:
        _check_str("call_id", call_id)
        _check_str("from_tag", from_tag)
        _check_str("to_tag", to_tag, required=cmd == "answer")
        if interface not in INTERFACES:
            raise InvalidArgument(f"interface must be 'internal' or 'external', not {interface!r}")
        message: Dict[str, Any] = {"cmd": cmd, "call_id": call_id, "from_tag": from_tag}
        if to_tag is not None:
            message["to_tag"] = to_tag
        if (media is None) == (sdp is None):
            raise InvalidArgument(f"{cmd} needs exactly one of media=(ip, port) or sdp=...")
        if media is not None:
            try:
                ip, port = media
            except (TypeError, ValueError):
                raise InvalidArgument(f"media must be an (ip, port) pair, not {media!r}") \
                    from None
            if not isinstance(ip, str) or isinstance(port, bool) or not isinstance(port, int):
                raise InvalidArgument(f"media must be (str ip, int port), not {media!r}")
            message["media"] = {"ip": ip, "port": port}
        else:
            if not isinstance(sdp, (str, bytes)):
                raise InvalidArgument(f"sdp must be str or bytes, not {type(sdp).__name__}")
            message["sdp"] = sdp
        message["interface"] = interface
        if provisional:
            message["provisional"] = True  # a 183's answer: an early dialog (forking)
        if latch_any:
            message["latch_any"] = True
        if timeout is not None:
            if isinstance(timeout, bool) or not isinstance(timeout, int) \
                    or not 1 <= timeout <= 86400:
                raise InvalidArgument(f"session timeout must be an integer 1-86400 s, "
                                      f"not {timeout!r}")
            message["timeout"] = timeout
        return message

    def _media_op(self, message: Dict[str, Any], call_id: str, via_branch: Optional[str],
                  set_id: Optional[int],
                  result: Callable[[Reply], Any] = lambda reply: reply) -> Operation:
        def on_reply(node: Node, reply: Reply) -> Any:
            self.table.store(call_id, via_branch, node)
            return result(reply)

        return Operation(message, self.nodeset(set_id), None, False, on_reply,
                         call=(call_id, via_branch))

    # -- operations ---------------------------------------------------------------------

    def ping(self, node: Optional[NodeLike] = None, set_id: Optional[int] = None) -> Operation:
        return self._admin("ping", node, set_id)

    def capabilities(self, node: Optional[NodeLike] = None,
                     set_id: Optional[int] = None) -> Operation:
        return self._admin("capabilities", node, set_id)

    def stats(self, node: Optional[NodeLike] = None, set_id: Optional[int] = None) -> Operation:
        return self._admin("stats", node, set_id)

    def list(self, limit: Optional[int] = None, offset: Optional[int] = None,
             node: Optional[NodeLike] = None, set_id: Optional[int] = None) -> Operation:
        return self._admin("list", node, set_id, limit=limit, offset=offset)

    def drain(self, on: bool = True, node: Optional[NodeLike] = None,
              set_id: Optional[int] = None) -> Operation:
        return self._admin("drain", node, set_id, on=on)

    def reload(self, node: Optional[NodeLike] = None, set_id: Optional[int] = None
               ) -> Operation:
        return self._admin("reload", node, set_id)

    def shutdown(self, node: Optional[NodeLike] = None, set_id: Optional[int] = None
                 ) -> Operation:
        return self._admin("shutdown", node, set_id)

    def takeover(self, peer: str, node: Optional[NodeLike] = None,
                 set_id: Optional[int] = None) -> Operation:
        _check_str("peer", peer)
        return self._admin("takeover", node, set_id, node_id=peer)

    def offer(self, call_id: str, from_tag: str, media: Optional[Tuple[str, int]] = None, *,
              sdp: Optional[SipData] = None, to_tag: Optional[str] = None,
              interface: str = "internal", latch_any: bool = False,
              timeout: Optional[int] = None, via_branch: Optional[str] = None,
              set_id: Optional[int] = None) -> Operation:
        message = self._media_message("offer", call_id, from_tag, to_tag, media, sdp,
                                      interface, latch_any, timeout)
        return self._media_op(message, call_id, via_branch, set_id)

    def answer(self, call_id: str, from_tag: str, to_tag: str,
               media: Optional[Tuple[str, int]] = None, *, sdp: Optional[SipData] = None,
               interface: str = "internal", latch_any: bool = False,
               timeout: Optional[int] = None, via_branch: Optional[str] = None,
               set_id: Optional[int] = None, provisional: bool = False) -> Operation:
        message = self._media_message("answer", call_id, from_tag, to_tag, media, sdp,
                                      interface, latch_any, timeout, provisional)
        return self._media_op(message, call_id, via_branch, set_id)

    def delete(self, call_id: str, from_tag: Optional[str] = None, *,
               via_branch: Optional[str] = None, set_id: Optional[int] = None,
               quiet_not_found: bool = False) -> Operation:
        _check_str("call_id", call_id)
        _check_str("from_tag", from_tag, required=False)
        message: Dict[str, Any] = {"cmd": "delete", "call_id": call_id}
        if from_tag is not None:
            message["from_tag"] = from_tag

        def on_reply(_node: Node, reply: Reply) -> Reply:
            self.table.remove(call_id)
            return reply

        def on_error(error: RelayError) -> Reply:
            if error.code == "not_found":
                self.table.remove(call_id)  # the relay no longer has it either
                if quiet_not_found:
                    return error.reply
            raise error

        return Operation(message, self.nodeset(set_id), None, False, on_reply, on_error,
                         call=(call_id, via_branch))

    def query(self, call_id: str, set_id: Optional[int] = None) -> Operation:
        _check_str("call_id", call_id)
        return Operation({"cmd": "query", "call_id": call_id}, self.nodeset(set_id), None,
                         False, _return_reply, call=(call_id, None))

    def manage(self, sip_message: SipData, flags: Optional[str] = None,
               ip_address: Optional[str] = None,
               set_id: Optional[int] = None) -> Optional[Operation]:
        """The operation lrkproxy_manage() would run for this message, or None (nothing)."""
        check_ip_address(ip_address)
        plan = plan_manage(sip_message, flags)
        if plan.op == NOTHING:
            return None
        assert plan.call_id is not None
        if plan.op == DELETE:
            return self.delete(plan.call_id, via_branch=plan.via_branch, set_id=set_id,
                               quiet_not_found=True)
        assert plan.from_tag is not None
        msg = plan.message
        provisional = not msg.is_request and msg.status is not None and msg.status < 200
        message = self._media_message(plan.op, plan.call_id, plan.from_tag, plan.to_tag, None,
                                      msg.sdp, plan.interface, False, None,
                                      plan.op == ANSWER and provisional)
        return self._media_op(message, plan.call_id, plan.via_branch, set_id,
                              lambda reply: apply_reply(plan, reply, ip_address))

