"""The object Kamailio's app_python3 holds: `python_exec("lrk_manage", ...)` in place of
`lrkproxy_manage()`, driving every media stream of a call through lrk with `lrk.client`.

Kamailio imports the script and calls `mod_init()` in its main process, then forks its
workers; `child_init(rank)` runs in each. A worker makes its own `LrkClient` (its own
sockets) on its first message, never in the main process. What the workers must agree
on lives in a Kamailio htable (shared memory) when `call_table` names one:

* `call:<Call-ID>` -> the node that holds the call, so the answer, re-INVITE or BYE that
  another worker handles goes to the node that got the offer (lrkproxy's hash table);
* `node:<node>` -> until when (CLOCK_MONOTONIC, as `time.monotonic()`) a silent node is
  disabled, so one worker's timeout spares the others theirs (lrkproxy's disabled flag).

What `lrk_manage` does with each message is `LrkClient.manage()`, except where that does
not fit a proxy (see `docs/kamailio.md`, "Every stream through KEMI"):

* a 1xx/2xx with SDP to an INVITE that had none is the offer (late offer), and an ACK with
  SDP the answer to it (tags and interfaces the other way round);
* a final failure to a re-INVITE keeps the call (manage() would delete it).

Return values, as native functions: 1 done, 2 nothing to do, -1 failed (logged). Never 0,
which would end the route.
"""

from __future__ import annotations

import ipaddress
import os
import platform
import traceback
from typing import Any, Callable, Dict, Iterator, List, NamedTuple, Optional

from lrk.client import LrkClient, parse_sip, plan_manage
from lrk.client.errors import ClientError, InvalidArgument, RelayError
from lrk.client.manage import OFFER, apply_reply, parse_flags
from lrk.client.nodes import Node
from lrk.client.sip import SipMessage
from lrk.errors import LrkError
from lrk.kemi.config import KemiConfig

DONE, NOTHING, FAILED = 1, 2, -1

#: transaction AVPs (tm hands them to the reply route): the INVITE had no SDP / a To tag
LATE_OFFER_AVP = "$avp(lrk_late_offer)"
REINVITE_AVP = "$avp(lrk_reinvite)"
#: what a null pseudo-variable prints as in a python_exec() argument
_PV_NULL = "<null>"


class ManageArgs(NamedTuple):
    """The words of a python_exec() argument: `ie`/`ei`, `set=N`, `ip=ADDRESS`."""

    flags: Optional[str] = None
    set_id: Optional[int] = None
    ip: Optional[str] = None


def parse_args(text: Optional[str]) -> ManageArgs:
    """Parse `"ie set=1 ip=203.0.113.5"` (any order, any part left out; `<null>` ignored)."""
    flags = ip = None
    set_id = None
    for word in (text or "").split():
        low = word.lower()
        if word == _PV_NULL:
            continue
        if low in ("ie", "ei"):
            if flags is not None:
                raise InvalidArgument(f"flags given twice in {text!r}")
            flags = low
        elif low.startswith("set="):
            value = word[4:]
            if not value.isdigit():
                raise InvalidArgument(f"set={value!r} in {text!r} is not a set number")
            set_id = int(value)
        elif low.startswith("ip="):
            ip = word[3:]
            try:
                ipaddress.ip_address(ip)
            except ValueError:
                raise InvalidArgument(f"ip={ip!r} in {text!r} is not an IP address") from None
        else:
            raise InvalidArgument(f"unknown word {word!r} in {text!r}; use ie or ei, set=N, "
                                  "ip=ADDRESS")
    return ManageArgs(flags, set_id, ip)


class LrkKemi:
    """Kamailio's handler object: `mod_init()` of the app_python3 script returns one.

    `ksr` is Kamailio's `KSR` module (imported on first use; tests pass a fake),
    `client_factory(config)` makes a worker's client.
    """

    def __init__(self, config: KemiConfig, *, ksr: Any = None,
                 client_factory: Optional[Callable[[KemiConfig], LrkClient]] = None,
                 getpid: Callable[[], int] = os.getpid) -> None:
        self.config = config
        self._ksr = ksr
        self._factory = client_factory or (lambda cfg: cfg.new_client())
        self._getpid = getpid
        self._client: Optional[LrkClient] = None
        self._pid: Optional[int] = None
        self._inherited: List[LrkClient] = []
        self._node_seen: Dict[str, float] = {}
        self.rank: Optional[int] = None

    # -- Kamailio's hooks -------------------------------------------------------------
    @property
    def ksr(self) -> Any:
        if self._ksr is None:
            import KSR  # only exists inside Kamailio

            self._ksr = KSR
        return self._ksr

    def child_init(self, rank: int) -> int:
        """A new Kamailio process: its client will be made on its first message."""
        self.rank = rank
        self._forget_inherited()
        return 0

    def lrk_manage(self, _msg: Any, param: Optional[str] = None) -> int:
        """`python_exec("lrk_manage", "[ie|ei] [set=N] [ip=ADDRESS]")` on a request or reply."""
        return self._guard("lrk_manage", param, self._manage)

    def lrk_delete(self, _msg: Any, param: Optional[str] = None) -> int:
        """`python_exec("lrk_delete", "[set=N]")`: end the call's session (failure_route)."""
        return self._guard("lrk_delete", param, self._delete)

    # -- the client of this process -----------------------------------------------------
    def client(self) -> LrkClient:
        """This process's client, made on first use (after fork, never in the parent)."""
        pid = self._getpid()
        if self._client is not None and self._pid != pid:
            self._forget_inherited()
        if self._client is None:
            self._client = self._factory(self.config)
            self._pid = pid
        return self._client

    def _forget_inherited(self) -> None:
        # a client made before a fork belongs to the parent: never close it here (that
        # would remove the parent's unix socket path); keep it referenced, unused
        if self._client is not None and self._pid != self._getpid():
            self._inherited.append(self._client)
            self._client = None
            self._node_seen.clear()

    # -- one message ------------------------------------------------------------------
    def _guard(self, name: str, param: Optional[str],
               work: Callable[[ManageArgs], int]) -> int:
        try:
            return work(parse_args(param))
        except (ClientError, LrkError) as exc:
            self.log("err", f"{name}: {exc}")
        except Exception:  # never let Kamailio's worker see a Python exception
            self.log("err", f"{name}: unexpected error: {traceback.format_exc()}")
        return FAILED

    def _manage(self, args: ManageArgs) -> int:
        ksr = self.ksr
        data = ksr.pv.get("$mb")
        if not isinstance(data, str) or not data:
            raise InvalidArgument("the SIP message ($mb) is empty")
        msg = parse_sip(data)
        client = self.client()
        call_id = msg.call_id
        self._pull(client, call_id)
        try:
            result = self._dispatch(client, msg, data, args)
        finally:
            self._push_nodes(client)
        if result is None:
            return NOTHING
        if isinstance(result, dict):  # a delete's reply
            self._forget_call(call_id)
            self.log("dbg", f"deleted {call_id}")
            return DONE
        body = parse_sip(result).body
        ctype = msg.header("content-type") or "application/sdp"
        if ksr.textops.set_body(body, ctype) < 0:
            raise LrkError(f"textops.set_body() failed for {msg.start_line!r} of {call_id}")
        self._remember_call(client, call_id)
        self.log("dbg", f"{msg.start_line!r} of {call_id}: SDP through lrk")
        return DONE

    def _dispatch(self, client: LrkClient, msg: SipMessage, data: str,
                  args: ManageArgs) -> Any:
        pv = self.ksr.pv
        if msg.is_request:
            if msg.method == "INVITE":
                if msg.to_tag:
                    pv.sets(REINVITE_AVP, "1")
                if not msg.has_sdp():
                    pv.sets(LATE_OFFER_AVP, "1")  # the 2xx will carry the offer
                    return None
            elif msg.method == "ACK" and msg.has_sdp():
                return self._late_answer(client, data, args)
        elif msg.cseq_method == "INVITE":
            assert msg.status is not None
            if msg.status >= 300 and _set(pv.get(REINVITE_AVP)):
                self.log("info", f"{msg.status} to a re-INVITE of {msg.call_id}: the call "
                                  "and its session go on")
                return None
            if msg.status < 300 and msg.has_sdp() and _set(pv.get(LATE_OFFER_AVP)):
                return self._late_offer(client, data, args)
        return client.manage(data, args.flags, args.ip, set_id=args.set_id)

    def _late_offer(self, client: LrkClient, data: str, args: ManageArgs) -> Any:
        """A 1xx/2xx with SDP to an INVITE without: the callee offers to the caller."""
        plan = plan_manage(data, args.flags)
        _offer_if, answer_if = parse_flags(args.flags)  # it goes the answer's way
        plan = plan._replace(op=OFFER, from_tag=plan.to_tag, to_tag=plan.from_tag,
                             interface=answer_if)
        assert plan.call_id is not None and plan.from_tag is not None
        reply = client.offer(plan.call_id, plan.from_tag, sdp=plan.message.sdp,
                             to_tag=plan.to_tag, interface=answer_if,
                             via_branch=plan.via_branch, set_id=args.set_id)
        return apply_reply(plan, reply, args.ip)

    def _late_answer(self, client: LrkClient, data: str, args: ManageArgs) -> Any:
        """An ACK with SDP answers the offer of the 2xx: the caller answers the callee."""
        plan = plan_manage(data, args.flags)  # an ACK's tags come swapped: the callee offered
        offer_if, _answer_if = parse_flags(args.flags)  # it goes the offer's way
        plan = plan._replace(interface=offer_if)
        assert plan.call_id is not None and plan.from_tag is not None
        assert plan.to_tag is not None
        reply = client.answer(plan.call_id, plan.from_tag, plan.to_tag, sdp=plan.message.sdp,
                              interface=offer_if, via_branch=plan.via_branch,
                              set_id=args.set_id)
        return apply_reply(plan, reply, args.ip)

    def _delete(self, args: ManageArgs) -> int:
        if args.flags is not None or args.ip is not None:
            raise InvalidArgument("lrk_delete takes only set=N")
        call_id = self.ksr.pv.get("$ci")
        if not isinstance(call_id, str) or not call_id:
            raise InvalidArgument("the message has no Call-ID ($ci)")
        client = self.client()
        self._pull(client, call_id)
        try:
            client.delete(call_id, set_id=args.set_id)
        except RelayError as exc:
            if exc.code != "not_found":
                raise
        finally:
            self._push_nodes(client)
        self._forget_call(call_id)
        return DONE

    # -- state shared by the workers (htable) -------------------------------------------
    def _nodes(self, client: LrkClient) -> Iterator[Node]:
        for nodeset in client.sets.values():
            yield from nodeset.nodes

    def _pull(self, client: LrkClient, call_id: Optional[str]) -> None:
        table = self.config.call_table
        if not table:
            return
        ht = self.ksr.htable
        if call_id:
            held_by = ht.sht_get(table, "call:" + call_id)
            if isinstance(held_by, str) and held_by:
                try:
                    client.table.store(call_id, None, client.node(held_by))
                except ClientError as exc:
                    self.log("warn", f"htable {table}: call {call_id}: {exc}")
        for node in self._nodes(client):
            key = str(node)
            value = ht.sht_get(table, "node:" + key)
            try:
                until = float(value) if value is not None else 0.0
            except (TypeError, ValueError):
                until = 0.0
            node.disabled_until = until
            self._node_seen[key] = until

    def _push_nodes(self, client: LrkClient) -> None:
        table = self.config.call_table
        if not table:
            return
        ht = self.ksr.htable
        for node in self._nodes(client):
            key = str(node)
            until = node.disabled_until
            if self._node_seen.get(key, 0.0) == until:
                continue
            self._node_seen[key] = until
            if until > 0:
                expires = int(self.config.disable_period) + 2
                ht.sht_setxs(table, "node:" + key, repr(until), expires)
                self.log("warn", f"relay node {key} did not answer: disabled for "
                                  f"{self.config.disable_period:g} s (all workers)")
            else:
                ht.sht_rm(table, "node:" + key)

    def _remember_call(self, client: LrkClient, call_id: Optional[str]) -> None:
        table = self.config.call_table
        if not table or not call_id:
            return
        node = client.table.lookup(call_id)
        if node is not None:
            self.ksr.htable.sht_setxs(table, "call:" + call_id, str(node),
                                      max(1, int(self.config.table_timeout)))

    def _forget_call(self, call_id: Optional[str]) -> None:
        table = self.config.call_table
        if table and call_id:
            self.ksr.htable.sht_rm(table, "call:" + call_id)

    def describe(self) -> str:
        """One line for Kamailio's log at start: interpreter, config, nodes, key."""
        cfg = self.config
        key = cfg.client.get("key")
        key_id = "none (unsigned)" if key is None or key == "none" else \
            getattr(key, "id", key)
        sets = "; ".join(f"set {k}: {' '.join(v)}" for k, v in cfg.sets.items())
        return (f"lrk.kemi on {platform.python_implementation()} {platform.python_version()}"
                f", config {cfg.source}: {sets}; algorithm "
                f"{cfg.client.get('algorithm', 'linear')}, key {key_id}, call table "
                f"{cfg.call_table or 'none (each worker alone)'}")

    def log(self, level: str, text: str) -> None:
        """Kamailio's log (KSR.dbg/info/warn/err), prefixed `lrk: `; never raises."""
        try:
            getattr(self.ksr, level)(f"lrk: {text}\n")
        except Exception:  # logging must never be what fails a message
            pass


def _set(value: Any) -> bool:
    """Whether a pseudo-variable read through KSR.pv.get() holds a value."""
    return value is not None and value != "" and value != 0
