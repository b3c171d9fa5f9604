"""nftables text for the kernel fast path, sans-IO.

In kernel mode media never reaches userspace: netfilter NAT forwards it.  For
every relay port P (RTP; RTCP is P + 1) of a leg X whose partner leg is Y:

* ``fwd``  relay X ip . P  -> Y's peer ip . port      (DNAT of new flows)
* ``mark`` relay X ip . P  -> ct mark (default P)      (tags the conntrack entry)
* ``out``  mark            -> relay Y ip . port        (SNAT of that flow)
* ``adm``  relay X ip . P . X's peer ip                (admission of new flows)
* ``seen`` relay X ip . P                              (per-port counter, every packet)

A forked INVITE's further early dialogs (:class:`ForkSpec`) share leg B's relay
port with the session, so their callees are told apart by source address:

* ``fmark`` relay B ip . P . callee ip . port -> ct mark  (admission + mark, before
  the generic lookups: a fork callee's new flow gets its own mark)
* ``ffwd``  mark -> caller ip . port                   (DNAT of such a flow)

and ``out`` SNATs it from the fork's own A port. Fork B marks are the fork's A mark
plus :data:`FORK_MARK_OFFSET`, never a relay port.

``seen`` exists only with ``counters="rules"``.  With ``counters="conntrack"``
(or ``"none"``, the same ruleset: the daemon then leaves conntrack accounting off)
there is no filter chain: admission runs in the NAT prerouting chain, which
netfilter calls only for a conntrack entry's first packet, so later packets
meet none of lrk's rules (as with plain static NAT), and media is counted by
conntrack accounting (``nf_conntrack_acct``) per flow instead.  (A filter-chain
``ct state established accept`` would not do: a one-way UDP flow stays
``ct state new`` until a reply, so its every packet would still be admitted.)

Replies (Y's peer -> relay Y) match the conntrack reply tuple and are un-NATed
by conntrack, so a NATed caller is latched implicitly.  Each map/set exists per
family (suffix 4/6); a session's legs are both IPv4 or both IPv6.

Marks are relay ports by default (one address per side: one port space over the
relay's addresses). With several addresses per side each address has its own port
space, and its own mark *slot* (:attr:`KernelRuleset.mark_slots`): mark = port +
slot * :data:`MARK_SLOT` (slot 0 keeps mark = port, RTCP = mark + 1), fork B marks
above every slot (:attr:`KernelRuleset.fork_offset`).

Conntrack caveats (measured): removing or changing elements only affects
*new* flows; an established flow keeps its NAT until its conntrack entry is
deleted (``conntrack -D -m MARK`` for :func:`conntrack_marks`) or expires.
If the callee sends first, its flow owns the relay B <-> callee tuple and a
caller whose NAT changed its source port clashes with it at conntrack confirm
(dropped, ``conntrack -S`` insert_failed) while the callee keeps sending.

libnftables is not consulted here: this module only builds command text
(applied by :class:`fastpath.kernel.nft.Nft`, one transaction per call) and reads the
JSON that ``nft -j list`` returns.
"""

from __future__ import annotations

import ipaddress
import re
import zlib
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

from fastpath.errors import LrkError

__all__ = [
    "COUNTER_SOURCES",
    "DROP_COUNTERS",
    "FORK_MARK_OFFSET",
    "MARK_SLOT",
    "ForkSpec",
    "KernelRuleError",
    "KernelRuleset",
    "LAYOUT_VERSION",
    "TableListing",
    "LegSpec",
    "SessionSpec",
    "conntrack_marks",
    "drop_counter",
    "elements",
    "install_commands",
    "parse_counters",
    "parse_table",
    "parse_drop_counter",
    "remove_commands",
    "update_commands",
]

#: named counter objects of new flows to a relay port that no ``adm`` element
#: admits (dropped, or queued in the NFQUEUE variant), per family
DROP_COUNTERS = {4: "unexpected4", 6: "unexpected6"}
#: comment on the rule that uses DROP_COUNTERS[family], so it can be found by listing
DROP_COMMENT = "lrk: unadmitted new flow ipv{}, media.dropped.unexpected_source"
QUEUE_COMMENT = "lrk: unadmitted new flow ipv{}, to NFQUEUE"

#: where kernel mode's per-leg media counters come from: conntrack accounting, per-packet ``seen``
#: sets, or nowhere ("none": the ruleset of "conntrack"; flows carry no counters)
COUNTER_SOURCES = ("conntrack", "none", "rules")

# the sets/maps of one family in the order commands are written
_KINDS = ("fwd", "mark", "out", "adm", "seen", "fmark", "ffwd")
#: the ct marks of one relay address's ports: mark = port + slot * MARK_SLOT
MARK_SLOT = 0x10000
#: ct mark of a fork's B leg with one mark slot: its A leg's mark plus this (above every
#: port-valued mark); with n slots the offset is n * MARK_SLOT (`KernelRuleset.fork_offset`)
FORK_MARK_OFFSET = MARK_SLOT
_NAME_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_]{0,30}$")
_MARK_MAX = 0xFFFFFFFF
#: bumped whenever what the table means changes without its text changing (a restarted
#: lrk of another version then replaces the table instead of adopting it)
LAYOUT_VERSION = 1
#: the one-element set whose element names the layout a table was created with
LAYOUT_SET = "layout"
#: the set whose one element records the accounting sysctls as they were before lrk set
#: them (:func:`acct_record`), so that the stop after a restart that kept its calls (the
#: sysctls still 1) restores the operator's values, not lrk's
ACCT_SET = "acct"
#: the sysctls :data:`ACCT_SET` records, bit i = the i-th was "1"; RECORDED marks a record
ACCT_NAMES = ("nf_conntrack_acct", "nf_conntrack_timestamp")
ACCT_RECORDED = 0x100


def acct_record(values: Dict[str, str]) -> int:
    """The :data:`ACCT_SET` element for sysctl values (name -> "0"/"1")."""
    return ACCT_RECORDED | sum(1 << i for i, name in enumerate(ACCT_NAMES)
                               if values.get(name) == "1")


def acct_values(record: int) -> Dict[str, str]:
    """The sysctl values an :data:`ACCT_SET` element records."""
    return {name: "1" if record >> i & 1 else "0" for i, name in enumerate(ACCT_NAMES)}

Elements = Dict[str, Dict[str, Optional[str]]]


class KernelRuleError(LrkError):
    """A session or ruleset parameter the kernel rules cannot express, or unreadable nft JSON."""

    code = "bad_request"


#: addresses already normalised (relay addresses and peers repeat on every install:
#: ipaddress costs ~10 us a call); cleared when full
_IP_CACHE: Dict[str, Tuple[str, int]] = {}
_IP_CACHE_MAX = 65536


def _ip(value: str, what: str) -> Tuple[str, int]:
    """Normalise an address to nft's spelling (compressed IPv6); returns (text, family)."""
    hit = _IP_CACHE.get(value) if type(value) is str else None
    if hit is not None:
        return hit
    try:
        addr = ipaddress.ip_address(str(value).strip())
    except ValueError:
        raise KernelRuleError(f"{what} {value!r} is not an IPv4 or IPv6 address") from None
    out = (str(addr), addr.version)
    if type(value) is str:
        if len(_IP_CACHE) >= _IP_CACHE_MAX:
            _IP_CACHE.clear()
        _IP_CACHE[value] = out
    return out


def _port(value: int, what: str, lo: int = 1, hi: int = 65535) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise KernelRuleError(f"{what} {value!r} is not an integer in {lo}..{hi}")
    return value


@dataclass(frozen=True)
class LegSpec:
    """One leg as the kernel sees it: the relay port its peer sends to, and that peer.

    ``peer_port`` is the SDP port media is sent to; the peer may send from a
    different (NATed) port, admission only checks the source address. ``peer_port`` 0:
    the peer is on hold (old-style, c=0.0.0.0): what it sends is admitted from
    ``peer_ip`` (its address before the hold) and forwarded, nothing is sent to it.
    """

    relay_ip: str
    relay_port: int  # RTP; RTCP on relay_port + 1
    peer_ip: str
    peer_port: int
    peer_rtcp_port: Optional[int] = None  # a=rtcp; None means peer_port + 1
    mark: Optional[int] = None  # ct mark of the RTP flow (RTCP: mark + 1); None = relay_port

    def __post_init__(self) -> None:
        relay_ip, fam = _ip(self.relay_ip, "relay_ip")
        peer_ip, peer_fam = _ip(self.peer_ip, "peer_ip")
        if fam != peer_fam:
            raise KernelRuleError(
                f"leg relay {relay_ip} is IPv{fam} but its peer {peer_ip} is IPv{peer_fam}; "
                "kernel mode relays a leg within one family"
            )
        object.__setattr__(self, "relay_ip", relay_ip)
        object.__setattr__(self, "peer_ip", peer_ip)
        _port(self.relay_port, "relay_port", 1, 65534)
        _port(self.peer_port, "peer_port", 0)
        if self.peer_rtcp_port is not None:
            _port(self.peer_rtcp_port, "peer_rtcp_port")
        if self.mark is not None and (
            isinstance(self.mark, bool)
            or not isinstance(self.mark, int)
            or not 1 <= self.mark < _MARK_MAX
        ):
            raise KernelRuleError(f"mark {self.mark!r} is not an integer in 1..{_MARK_MAX - 1}")

    @property
    def family(self) -> int:
        return 6 if ":" in self.relay_ip else 4

    @property
    def rtp_mark(self) -> int:
        return self.relay_port if self.mark is None else self.mark

    @property
    def held(self) -> bool:
        """On hold: nothing may be sent to this leg's peer (its port is 0)."""
        return not self.peer_port

    def relay(self, rtcp: bool) -> Tuple[str, int]:
        return self.relay_ip, self.relay_port + rtcp

    def peer(self, rtcp: bool) -> Tuple[str, int]:
        if not rtcp or self.held:
            return self.peer_ip, self.peer_port
        port = self.peer_rtcp_port if self.peer_rtcp_port is not None else self.peer_port + 1
        if port > 65535:
            raise KernelRuleError(
                f"peer RTCP port {port} (peer_port + 1) is out of range; give peer_rtcp_port"
            )
        return self.peer_ip, port


@dataclass(frozen=True)
class SessionSpec:
    """A session's two legs (A: caller, B: callee), both IPv4 or both IPv6."""

    a: LegSpec
    b: LegSpec

    def __post_init__(self) -> None:
        if self.a.family != self.b.family:
            raise KernelRuleError(
                f"leg A is IPv{self.a.family} ({self.a.relay_ip}) but leg B is "
                f"IPv{self.b.family} ({self.b.relay_ip}); kernel mode needs both legs in one "
                "family (relay such a session in userspace)"
            )
        if self.a.relay(False) == self.b.relay(False):
            raise KernelRuleError(
                f"legs A and B share relay address {self.a.relay_ip} port {self.a.relay_port}"
            )
        if self.a.rtp_mark in (self.b.rtp_mark - 1, self.b.rtp_mark, self.b.rtp_mark + 1):
            raise KernelRuleError(
                f"ct marks of legs A ({self.a.rtp_mark}) and B ({self.b.rtp_mark}) overlap "
                "(each leg uses mark and mark + 1)"
            )

    @property
    def family(self) -> int:
        return self.a.family


@dataclass(frozen=True)
class ForkSpec(SessionSpec):
    """Another early dialog of a forked INVITE: leg A is the fork's own relay port and
    the caller; leg B is the session's (shared) leg B relay port and this fork's callee,
    matched by source address and port (its SDP's) before the session's generic
    lookups. B's mark defaults to A's mark + FORK_MARK_OFFSET."""

    def __post_init__(self) -> None:
        if self.b.mark is None:
            object.__setattr__(self, "b", LegSpec(
                self.b.relay_ip, self.b.relay_port, self.b.peer_ip, self.b.peer_port,
                self.b.peer_rtcp_port, self.a.rtp_mark + FORK_MARK_OFFSET))
        super().__post_init__()


def _addr(ip_port: Tuple[str, int]) -> str:
    return f"{ip_port[0]} . {ip_port[1]}"


def elements(spec: SessionSpec, seen: bool = True) -> Elements:
    """The map/set elements of a session as nft text: set name -> {key: value or None}.

    ``seen=False`` leaves out the ``seen`` counters (conntrack-counted rulesets have none).
    """
    fam = spec.family
    out: Elements = {f"{kind}{fam}": {} for kind in _KINDS[:5] if seen or kind != "seen"}
    fork = isinstance(spec, ForkSpec)
    if fork:
        out[f"fmark{fam}"] = {}
        out[f"ffwd{fam}"] = {}
    for leg, other in ((spec.a, spec.b), (spec.b, spec.a)):
        if other.held and not fork:
            # toward a peer on hold: nothing is forwarded (no admission either: such
            # packets meet the unadmitted rule, dropped and counted)
            continue
        for rtcp in (False, True):
            key = _addr(leg.relay(rtcp))
            mark = str(leg.rtp_mark + rtcp)
            if fork and leg is spec.b:
                # the shared B port: only this callee's source address and port
                out[f"fmark{fam}"][f"{key} . {_addr(leg.peer(rtcp))}"] = mark
                out[f"ffwd{fam}"][mark] = _addr(other.peer(rtcp))
                out[f"out{fam}"][mark] = _addr(other.relay(rtcp))
                continue
            out[f"fwd{fam}"][key] = _addr(other.peer(rtcp))
            out[f"mark{fam}"][key] = mark
            out[f"out{fam}"][mark] = _addr(other.relay(rtcp))
            out[f"adm{fam}"][f"{key} . {leg.peer_ip}"] = None
            if seen:
                out[f"seen{fam}"][key] = None
    return out


def conntrack_marks(spec: SessionSpec) -> List[int]:
    """ct marks of a session's flows (for ``conntrack -D -m MARK`` after remove/update).

    Removing elements only stops *new* flows: conntrack keeps forwarding an
    established flow with its old NAT until the entry expires.
    """
    return sorted(m for leg in (spec.a, spec.b) for m in (leg.rtp_mark, leg.rtp_mark + 1))


def _merge(specs: Iterable[SessionSpec], seen: bool = True) -> Elements:
    """Union of the elements of several sessions; refuses conflicting keys."""
    merged: Elements = {}
    for spec in specs:
        for name, elems in elements(spec, seen).items():
            dest = merged.setdefault(name, {})
            for key, value in elems.items():
                old = dest.setdefault(key, value)
                if old != value:
                    raise KernelRuleError(
                        f"{name} key {key} maps to both {old} and {value}: two sessions use "
                        "the same relay port or mark"
                    )
    return merged


def _lines(verb: str, table: str, elems: Elements, with_values: bool) -> List[str]:
    lines = []
    for kind in _KINDS:
        for fam in (4, 6):
            items = elems.get(f"{kind}{fam}")
            if not items:
                continue
            if with_values:
                body = ", ".join(k if v is None else f"{k} : {v}" for k, v in items.items())
            else:
                body = ", ".join(items)
            lines.append(f"{verb} element inet {table} {kind}{fam} {{ {body} }}")
    return lines


def _text(lines: List[str]) -> str:
    return "".join(line + "\n" for line in lines)


def _check_table(table: str) -> str:
    if not _NAME_RE.match(table):
        raise KernelRuleError(f"table name {table!r} must be a letter then up to 30 [A-Za-z0-9_]")
    return table


def install_commands(*specs: SessionSpec, table: str = "lrk", seen: bool = True) -> str:
    """``add element`` lines of sessions, to be applied as ONE transaction (all or nothing)."""
    return _text(_lines("add", _check_table(table), _merge(specs, seen), True))


def remove_commands(*specs: SessionSpec, table: str = "lrk", idempotent: bool = False,
                    seen: bool = True) -> str:
    """``delete element`` lines of sessions, to be applied as one transaction.

    The spec that was installed is the source of truth: nft rejects deleting
    an absent element, which fails the whole transaction (nothing removed).
    Keep the installed spec and pass exactly it.  With ``idempotent`` each
    element is first re-added with the same value (a no-op when present), so
    removal also succeeds for elements already gone, e.g. after the table was
    recreated; it still fails when a key is present with a *different* value.
    """
    _check_table(table)
    elems = _merge(specs, seen)
    lines = _lines("add", table, elems, True) if idempotent else []
    return _text(lines + _lines("delete", table, elems, False))


def update_commands(old: SessionSpec, new: SessionSpec, table: str = "lrk",
                    seen: bool = True) -> str:
    """Minimal delete/add lines turning ``old``'s elements into ``new``'s (one transaction).

    Unchanged elements are not touched, so their counters keep counting; a
    map key whose value changes is deleted then re-added (nft cannot replace
    a value in place).  Empty text when nothing changed.
    """
    _check_table(table)
    before, after = elements(old, seen), elements(new, seen)
    gone: Elements = {}
    added: Elements = {}
    for name in set(before) | set(after):
        was, now = before.get(name, {}), after.get(name, {})
        gone[name] = {k: v for k, v in was.items() if k not in now or now[k] != v}
        added[name] = {k: v for k, v in now.items() if k not in was or was[k] != v}
    return _text(_lines("delete", table, gone, False) + _lines("add", table, added, True))


def claim_commands(found: Elements, *specs: SessionSpec, table: str = "lrk",
                   seen: bool = True) -> str:
    """Delete/add lines turning what an adopted table holds under these sessions' keys
    into what they need (one transaction); elements already right are not touched, so
    their counters keep counting. The keys are taken out of `found`: what is left there
    at the end of a restore belongs to no session."""
    _check_table(table)
    gone: Elements = {}
    added: Elements = {}
    for name, want in _merge(specs, seen).items():
        have = found.get(name, {})
        for key, value in want.items():
            if key in have:
                old = have.pop(key)
                if old == value:
                    continue
                gone.setdefault(name, {})[key] = None
            added.setdefault(name, {})[key] = value
    return _text(_lines("delete", table, gone, False) + _lines("add", table, added, True))


def leftover_commands(found: Elements, table: str = "lrk") -> str:
    """``delete element`` lines for every element in `found` (the ones no session
    claimed), as one transaction; empty text when there are none."""
    _check_table(table)
    return _text(_lines("delete", table, found, False))


@dataclass
class TableListing:
    """What ``nft -j list table`` shows of an existing lrk table: its layout marker
    (None: none, an older lrk's table), session elements as :func:`elements` spells them,
    and the chains that hold rules added beside the ruleset text (NFQUEUE rules)."""

    layout: Optional[int]
    elements: Elements = field(default_factory=dict)
    chains_with_rules: Dict[str, int] = field(default_factory=dict)
    #: the :data:`ACCT_SET` record (:func:`acct_values`), None: none (or an older table)
    acct: Optional[int] = None


def _spell(value: Any) -> str:
    """One element key or value from nft's JSON as :func:`elements` writes it."""
    if isinstance(value, dict) and isinstance(value.get("concat"), list):
        return " . ".join(_spell(v) for v in value["concat"])
    if isinstance(value, bool):
        raise KernelRuleError(f"unexpected element part {value!r}")
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        try:
            return str(ipaddress.ip_address(value))
        except ValueError:
            return value
    raise KernelRuleError(f"unexpected element part {value!r} in an nft listing")


def parse_table(json_obj: Dict[str, Any]) -> TableListing:
    """Read ``nft -j list table inet <table>``: the layout marker, every session set and
    map (``fwd``, ``mark``, ``out``, ``adm``, ``seen``, ``fmark``, ``ffwd`` of both
    families) and how many rules each chain has."""
    listing = TableListing(None)
    names = {f"{kind}{fam}" for kind in _KINDS for fam in (4, 6)}
    for obj in _objects(json_obj, "a table"):
        rule = obj.get("rule")
        if isinstance(rule, dict) and isinstance(rule.get("chain"), str):
            chain = rule["chain"]
            listing.chains_with_rules[chain] = listing.chains_with_rules.get(chain, 0) + 1
            continue
        body = obj.get("set") or obj.get("map")
        if not isinstance(body, dict):
            continue
        name = body.get("name")
        items = body.get("elem") or ()
        if name in (LAYOUT_SET, ACCT_SET):
            for item in items:
                if isinstance(item, int) and not isinstance(item, bool):
                    if name == LAYOUT_SET:
                        listing.layout = item
                    elif item & ACCT_RECORDED:
                        listing.acct = item
            continue
        if name not in names:
            continue
        elems = listing.elements.setdefault(name, {})
        for item in items:
            if isinstance(item, dict) and isinstance(item.get("elem"), dict):
                item = item["elem"].get("val")  # an element with a counter
            if isinstance(item, list) and len(item) == 2:  # a map element: key, value
                elems[_spell(item[0])] = _spell(item[1])
            else:
                elems[_spell(item)] = None
    return listing


class KernelRuleset:
    """The ``table inet <table>`` of the kernel fast path for one relay.

    Only UDP to ``relay_ips`` and ports ``port_start..port_end`` is touched (and, for
    a standby, ``extra`` (address, first port, last port): its peers' media, which it
    serves after a takeover; every address with every range: one set, one port set).
    ``queue`` selects the NFQUEUE variant: a new flow that no ``adm`` element
    admits goes to queue ``queue`` instead of being dropped (``queue_bypass``:
    accept it when no reader is bound).  The reader admits by adding the
    session's elements and re-injecting with NF_REPEAT (the admission rule
    then sets the ct mark; the packet is counted in ``seen`` a second time),
    or answers NF_DROP.  The ``queue`` expression needs CONFIG_NFT_QUEUE.

    ``counters="conntrack"``: no ``seen`` sets and no filter chain; the NAT
    prerouting chain jumps to ``media4``/``media6`` before DNAT, so admission
    runs once per conntrack entry (read per-flow counters from conntrack, which
    needs ``net.netfilter.nf_conntrack_acct=1``).  Not with ``queue``.
    ``counters="none"``: the same ruleset (and layout); nothing counts media.
    """

    def __init__(
        self,
        *,
        table: str = "lrk",
        port_start: int,
        port_end: int,
        relay_ips: Sequence[str],
        queue: Optional[int] = None,
        queue_bypass: bool = False,
        mark_range: Optional[Tuple[int, int]] = None,
        queue_chain: bool = False,
        counters: str = "rules",
        extra: Sequence[Tuple[str, int, int]] = (),
        mark_slots: Sequence[str] = (),
    ) -> None:
        self.table = _check_table(table)
        if counters not in COUNTER_SOURCES:
            raise KernelRuleError(f"counters {counters!r} must be one of {COUNTER_SOURCES}")
        self.counters = counters
        if counters != "rules" and queue is not None:
            raise KernelRuleError("the NFQUEUE variant counts with counters=\"rules\"")
        self.port_start = _port(port_start, "port_start")
        self.port_end = _port(port_end, "port_end")
        if port_end <= port_start:
            raise KernelRuleError(
                f"port range {port_start}-{port_end} must hold at least one RTP/RTCP pair"
            )
        if isinstance(relay_ips, str):
            raise KernelRuleError("relay_ips must be a list of addresses, not one string")
        self.relay_ips: Dict[int, List[str]] = {4: [], 6: []}
        for value in relay_ips:
            ip, fam = _ip(value, "relay IP")
            if ip not in self.relay_ips[fam]:
                self.relay_ips[fam].append(ip)
        if not relay_ips:
            raise KernelRuleError("relay_ips is empty: give the relay's own media addresses")
        #: port ranges served: this relay's, then a standby's peers' (``extra``: address,
        #: first port, last port); their addresses join ``relay_ips``
        self.ranges: List[Tuple[int, int]] = [(self.port_start, self.port_end)]
        for value, lo_port, hi_port in extra:
            ip, fam = _ip(value, "standby relay IP")
            if ip not in self.relay_ips[fam]:
                self.relay_ips[fam].append(ip)
            lo_port, hi_port = _port(lo_port, "port_start"), _port(hi_port, "port_end")
            if hi_port <= lo_port:
                raise KernelRuleError(f"standby port range {lo_port}-{hi_port} must hold at "
                                      "least one RTP/RTCP pair")
            if (lo_port, hi_port) not in self.ranges:
                if any(lo_port <= hi and lo <= hi_port for lo, hi in self.ranges):
                    raise KernelRuleError(f"standby port range {lo_port}-{hi_port} overlaps "
                                          f"{self.ranges}: nodes need disjoint ranges")
                self.ranges.append((lo_port, hi_port))
        if queue is not None:
            _port(queue, "queue number", 0, 65535)
        self.queue = queue
        self.queue_bypass = bool(queue_bypass)
        # kernels without CONFIG_NFT_QUEUE: jump to an empty chain nfq4/nfq6 to which the
        # caller appends an xt NFQUEUE rule over netlink (fastpath.kernel.nfqueue_socket)
        self.queue_chain = bool(queue_chain) and queue is not None
        # several addresses per side: each address its own port space, so its own mark
        # slot (mark = port + slot * MARK_SLOT); none given: every mark is slot 0's
        if isinstance(mark_slots, str):
            raise KernelRuleError("mark_slots must be a list of addresses, not one string")
        #: relay address -> its mark slot (empty: every address slot 0, mark = port)
        self.slot_of: Dict[str, int] = {}
        for value in mark_slots:
            ip, fam = _ip(value, "mark slot address")
            if ip in self.slot_of:
                raise KernelRuleError(f"mark_slots names {ip} twice")
            if ip not in self.relay_ips[fam]:
                raise KernelRuleError(f"mark slot address {ip} is not one of the relay IPs "
                                      f"{self.relay_ips[4] + self.relay_ips[6]}")
            self.slot_of[ip] = len(self.slot_of)
        self.mark_slots = max(1, len(self.slot_of))
        #: fork B marks: the fork's A mark plus this, above every slot's marks
        self.fork_offset = self.mark_slots * MARK_SLOT
        # marks are relay ports (+ slot): their hull covers every range served
        lo, hi = mark_range if mark_range is not None else (
            min(r[0] for r in self.ranges), max(r[1] for r in self.ranges))
        if not 1 <= lo <= hi < _MARK_MAX:
            raise KernelRuleError(f"mark range {lo}-{hi} must be within 1..{_MARK_MAX - 1}")
        if hi - lo >= MARK_SLOT and self.slot_of:
            raise KernelRuleError(f"mark range {lo}-{hi} spans more than one mark slot "
                                  f"({MARK_SLOT} marks)")
        #: slot 0's marks (the only ones with one address per side)
        self.mark_range = (lo, hi)
        if hi + 2 * self.fork_offset - MARK_SLOT >= _MARK_MAX:
            raise KernelRuleError(f"mark range {lo}-{hi} leaves no room for fork marks "
                                  f"(+{self.fork_offset})")
        #: ct marks of forks' B legs (ForkSpec) of slot 0
        self.fork_mark_range = (lo + self.fork_offset, hi + self.fork_offset)
        #: every slot's marks, and forks' B marks: [(first, last)], slot by slot
        self.mark_ranges = [(lo + s * MARK_SLOT, hi + s * MARK_SLOT)
                            for s in range(self.mark_slots)]
        self.fork_mark_ranges = [(a + self.fork_offset, b + self.fork_offset)
                                 for a, b in self.mark_ranges]
        #: hulls of mark_ranges and fork_mark_ranges (a conntrack dump filters by these,
        #: a few aligned blocks, and checks each mark after)
        self.mark_hull = (self.mark_ranges[0][0], self.mark_ranges[-1][1])
        self.fork_mark_hull = (self.fork_mark_ranges[0][0], self.fork_mark_ranges[-1][1])

    def mark(self, ip: str, port: int) -> Optional[int]:
        """The RTP ct mark of relay (ip, port) when it is not the port itself (an address
        with a mark slot above 0), else None (:attr:`LegSpec.mark`'s default)."""
        slot = self.slot_of.get(ip, 0)
        return port + slot * MARK_SLOT if slot else None

    def leg(self, relay_ip: str, relay_port: int, peer_ip: str, peer_port: int,
            peer_rtcp_port: Optional[int] = None) -> LegSpec:
        """A leg with the mark of its relay address's slot."""
        return LegSpec(relay_ip, relay_port, peer_ip, peer_port, peer_rtcp_port,
                       self.mark(_ip(relay_ip, "relay_ip")[0], relay_port))

    def fork(self, a: LegSpec, b: LegSpec) -> ForkSpec:
        """A fork unit whose B mark is A's plus :attr:`fork_offset` (above every slot),
        whatever mark `b` came with (the shared B port's own is the session's)."""
        mark = a.rtp_mark + self.fork_offset
        if b.mark != mark:
            b = LegSpec(b.relay_ip, b.relay_port, b.peer_ip, b.peer_port, b.peer_rtcp_port,
                        mark)
        return ForkSpec(a, b)

    def all_marks(self) -> List[int]:
        """Every ct mark this ruleset may give a flow (own and fork ranges)."""
        return [m for lo, hi in self.mark_ranges + self.fork_mark_ranges
                for m in range(lo, hi + 1)]

    def owns_mark(self, mark: int) -> bool:
        """Whether `mark` lies in one of this ruleset's mark ranges."""
        return any(lo <= mark <= hi for lo, hi in self.mark_ranges + self.fork_mark_ranges)

    @property
    def seen(self) -> bool:
        """Whether this ruleset counts every packet in ``seen`` sets."""
        return self.counters == "rules"

    @property
    def layout(self) -> int:
        """A 32-bit digest of this ruleset (its text, the NFQUEUE rule's queue and
        bypass, LAYOUT_VERSION): a restarted relay adopts a table with the same one and
        replaces any other (an upgrade, another port range, relay IPs, counting)."""
        text = (f"lrk table layout {LAYOUT_VERSION}\n{self._body()}"
                f"queue {self.queue} bypass {self.queue_bypass}\n")
        if self.slot_of:  # which address has which mark slot (absent: as before)
            text += "".join(f"slot {ip} {n}\n" for ip, n in self.slot_of.items())
        return zlib.crc32(text.encode())

    # -- ruleset ---------------------------------------------------------

    def _unadmitted(self, fam: int) -> str:
        name = DROP_COUNTERS[fam]
        if self.queue is None:
            verdict, comment = "drop", DROP_COMMENT.format(fam)
        elif self.queue_chain:
            verdict, comment = f"jump nfq{fam}", QUEUE_COMMENT.format(fam)
        else:
            verdict = f"queue num {self.queue}" + (" bypass" if self.queue_bypass else "")
            comment = QUEUE_COMMENT.format(fam)
        # admitted new flows got their ct mark (a relay port, never 0) from the rule before
        return f'ct state new ct mark 0 counter name "{name}" {verdict} comment "{comment}"'

    def create(self) -> str:
        """The whole table; replaces a leftover one (e.g. of a crashed run) atomically.
        Its ``layout`` set names :attr:`layout`, which a restarted relay checks before it
        adopts the table."""
        t = self.table
        body = self._body()
        marker = (f"  set {LAYOUT_SET} {{ type mark; elements = {{ {self.layout} }} }}\n"
                  f"  set {ACCT_SET} {{ type mark; }}\n")  # beside the layout, not in it
        return f"add table inet {t}\ndelete table inet {t}\ntable inet {t} {{\n{marker}{body}"

    def acct_command(self, record: int) -> str:
        """Record the accounting sysctls' values from before lrk (:func:`acct_record`)."""
        return f"add element inet {self.table} {ACCT_SET} {{ {record} }}\n"

    def adopt_query(self) -> str:
        """List command whose ``nft -j`` output :func:`parse_table` reads."""
        return f"list table inet {self.table}\n"

    def claim_commands(self, found: Elements, *specs: SessionSpec) -> str:
        """:func:`claim_commands` for this table, after :meth:`check` of every session."""
        for spec in specs:
            self.check(spec)
        return claim_commands(found, *specs, table=self.table, seen=self.seen)

    def _body(self) -> str:
        """The table's contents after its opening line (what :attr:`layout` digests)."""
        spans = [f"{lo}-{hi}" for lo, hi in sorted(self.ranges)]
        # one range: the text (and so the layout) of a relay without standby ranges
        ports = spans[0] if len(spans) == 1 else "{ " + ", ".join(spans) + " }"
        marks = "{ " + ", ".join(f"{lo}-{hi}" for lo, hi in
                                 self.mark_ranges + self.fork_mark_ranges) + " }"
        ip = {4: "ip", 6: "ip6"}
        addr = {4: "ipv4_addr", 6: "ipv6_addr"}
        lines = []
        for fam in (4, 6):
            name = DROP_COUNTERS[fam]
            lines.append(f"  counter {name} {{ }}")
        for fam in (4, 6):
            a = addr[fam]
            elems = ", ".join(self.relay_ips[fam])
            body = f"type {a}; elements = {{ {elems} }}" if elems else f"type {a};"
            lines += [
                f"  set relay_ips{fam} {{ {body} }}",
                f"  map fwd{fam} {{ type {a} . inet_service : {a} . inet_service; }}",
                f"  map mark{fam} {{ type {a} . inet_service : mark; }}",
                f"  map out{fam} {{ type mark : {a} . inet_service; }}",
                f"  set adm{fam} {{ type {a} . inet_service . {a}; counter; }}",
                f"  map fmark{fam} {{ type {a} . inet_service . {a} . inet_service : mark; }}",
                f"  map ffwd{fam} {{ type mark : {a} . inet_service; }}",
            ]
            if self.seen:
                lines.append(f"  set seen{fam} {{ type {a} . inet_service; counter; }}")
        jumps = [
            f"    ip daddr @relay_ips4 udp dport {ports} jump media4",
            f"    ip6 daddr @relay_ips6 udp dport {ports} jump media6",
        ]
        if self.seen:
            lines += ["  chain pre_filter {",
                      "    type filter hook prerouting priority -150; policy accept;",
                      *jumps, "  }"]
        for fam in (4, 6):
            p = ip[fam]
            lines += [
                f"  chain media{fam} {{",
                f"    ct state new {p} daddr . udp dport . {p} saddr @adm{fam} "
                f"ct mark set {p} daddr . udp dport map @mark{fam}",
                # a forked callee on the shared B port: its own mark (after the generic
                # rule, which a callee at the main callee's IP also matches)
                f"    ct state new ct mark set {p} daddr . udp dport . {p} saddr . udp sport "
                f"map @fmark{fam}",
                f"    {self._unadmitted(fam)}",
            ]
            if self.seen:
                # counted after admission: refused packets show only in the drop counter
                lines.append(f"    ct mark != 0 {p} daddr . udp dport @seen{fam}")
            lines.append("  }")
            if self.queue_chain:
                lines.append(f"  chain nfq{fam} {{ }}")
        lines += [
            "  chain pre_nat {",
            "    type nat hook prerouting priority dstnat; policy accept;",
            # conntrack counting: admission here, once per conntrack entry, before DNAT
            *([] if self.seen else jumps),
            # forks' callees first (by their mark; a miss falls through to the generic)
            f"    ip daddr @relay_ips4 udp dport {ports} dnat ip to ct mark map @ffwd4",
            f"    ip6 daddr @relay_ips6 udp dport {ports} dnat ip6 to ct mark map @ffwd6",
            f"    ip daddr @relay_ips4 udp dport {ports} dnat ip to ip daddr . udp dport map @fwd4",
            f"    ip6 daddr @relay_ips6 udp dport {ports} "
            "dnat ip6 to ip6 daddr . udp dport map @fwd6",
            "  }",
            "  chain post_nat {",
            "    type nat hook postrouting priority srcnat; policy accept;",
            f"    meta nfproto ipv4 meta l4proto udp ct mark {marks} snat ip to ct mark map @out4",
            f"    meta nfproto ipv6 meta l4proto udp ct mark {marks} snat ip6 to ct mark map @out6",
            "  }",
            "}",
        ]
        return _text(lines)

    def destroy(self) -> str:
        """Remove the table; succeeds also when it does not exist."""
        return f"add table inet {self.table}\ndelete table inet {self.table}\n"

    # -- sessions --------------------------------------------------------

    def check(self, spec: SessionSpec) -> None:
        """Refuse a session these rules would silently not forward."""
        for name, leg in (("A", spec.a), ("B", spec.b)):
            if leg.relay_ip not in self.relay_ips[leg.family]:
                raise KernelRuleError(
                    f"leg {name} relay address {leg.relay_ip} is not one of the ruleset's "
                    f"relay IPs {self.relay_ips[4] + self.relay_ips[6]}"
                )
            if not any(lo <= leg.relay_port < hi for lo, hi in self.ranges):
                spans = ", ".join(f"{lo}-{hi}" for lo, hi in self.ranges)
                raise KernelRuleError(
                    f"leg {name} relay port {leg.relay_port} (RTCP +1) is outside the "
                    f"ruleset's port ranges {spans}"
                )
            fork_b = name == "B" and isinstance(spec, ForkSpec)
            if self.slot_of and not fork_b:
                want = self.mark(leg.relay_ip, leg.relay_port) or leg.relay_port
                if leg.rtp_mark != want:
                    raise KernelRuleError(
                        f"leg {name} ct mark {leg.rtp_mark} is not its relay address's "
                        f"({leg.relay_ip} port {leg.relay_port}: mark {want}); build legs "
                        "with KernelRuleset.leg")
            ranges = self.fork_mark_ranges if fork_b else self.mark_ranges
            if not any(lo <= leg.rtp_mark < hi for lo, hi in ranges):
                spans = ", ".join(f"{lo}-{hi}" for lo, hi in ranges)
                raise KernelRuleError(
                    f"leg {name} ct mark {leg.rtp_mark} (RTCP +1) is outside the mark "
                    f"range(s) {spans}; post-routing would not SNAT it"
                )

    def install_commands(self, *specs: SessionSpec) -> str:
        """:func:`install_commands` for this table, after :meth:`check` of every session."""
        for spec in specs:
            self.check(spec)
        return install_commands(*specs, table=self.table, seen=self.seen)

    def remove_commands(self, *specs: SessionSpec, idempotent: bool = False) -> str:
        """:func:`remove_commands` for this table."""
        return remove_commands(*specs, table=self.table, idempotent=idempotent, seen=self.seen)

    def update_commands(self, old: SessionSpec, new: SessionSpec) -> str:
        """:func:`update_commands` for this table, after :meth:`check` of ``new``."""
        self.check(new)
        return update_commands(old, new, table=self.table, seen=self.seen)

    # -- reading back ----------------------------------------------------

    def counters_query(self, family: int) -> str:
        """List command whose ``nft -j`` output :func:`parse_counters` reads.

        One family per call: nft 1.0.6 fails several ``list set`` in one run.
        Cost grows faster than linearly in nft 1.0.6 userspace: about 0.7 s for
        80,000 elements, 13-20 s for 400,000 (100,000 sessions); poll sparingly.
        """
        if family not in (4, 6):
            raise KernelRuleError(f"family {family!r} is not 4 or 6")
        return f"list set inet {self.table} seen{family}\n"

    def drops_query(self) -> str:
        """List command whose ``nft -j`` output :func:`parse_drop_counter` reads."""
        return f"list counters table inet {self.table}\n"


# -- JSON readers -------------------------------------------------------------


def _objects(json_obj: Any, what: str) -> List[Dict[str, Any]]:
    if not isinstance(json_obj, dict) or not isinstance(json_obj.get("nftables"), list):
        raise KernelRuleError(
            f"expected nft JSON output ({{'nftables': [...]}}) to read {what}, "
            f"got {type(json_obj).__name__}"
        )
    return [o for o in json_obj["nftables"] if isinstance(o, dict)]


def _key(val: Any) -> Optional[Tuple[str, int]]:
    """(ip, port) of a ``{"concat": [ip, port]}`` element value, else None."""
    if isinstance(val, dict) and isinstance(val.get("concat"), list) and len(val["concat"]) == 2:
        ip, port = val["concat"]
        if isinstance(ip, str) and isinstance(port, int):
            return ip, port
    return None


def parse_counters(
    json_obj: Dict[str, Any], set_names: Sequence[str] = ("seen4", "seen6")
) -> Dict[Tuple[str, int], Tuple[int, int]]:
    """(relay ip, relay port) -> (packets, bytes) received, from ``nft -j list set ... seen4``.

    Reads every set named in ``set_names`` found in the listing (one set, both
    or a whole table).  Packets are counted on arrival, before the admission
    check, so they include packets later dropped as from an unexpected source.
    """
    result: Dict[Tuple[str, int], Tuple[int, int]] = {}
    for obj in _objects(json_obj, "counters"):
        body = obj.get("set")
        if not isinstance(body, dict) or body.get("name") not in set_names:
            continue
        for item in body.get("elem", ()):
            wrapped = item.get("elem") if isinstance(item, dict) else None
            if isinstance(wrapped, dict):
                key = _key(wrapped.get("val"))
                counter = wrapped.get("counter") or {}
            else:
                key, counter = _key(item), {}
            if key is None:
                raise KernelRuleError(f"unexpected element {item!r} in set {body.get('name')}")
            ip = str(ipaddress.ip_address(key[0]))
            result[(ip, key[1])] = (int(counter.get("packets", 0)), int(counter.get("bytes", 0)))
    return result


def _drop_names(family: Optional[int]) -> set:
    if family is not None and family not in DROP_COUNTERS:
        raise KernelRuleError(f"family {family!r} is not 4 or 6 (or None for both)")
    return {DROP_COUNTERS[family]} if family else set(DROP_COUNTERS.values())


def drop_counter(named: Dict[str, Tuple[int, int]], family: Optional[int] = None
                 ) -> Tuple[int, int]:
    """(packets, bytes) of new flows no session admits, from the table's named counters
    (name -> (packets, bytes), e.g. as `fastpath.kernel.nft_setelem` reads them from the
    kernel); ``family`` 4 or 6, None for both summed. Raises KernelRuleError when one
    is missing."""
    wanted = _drop_names(family)
    missing = wanted - set(named)
    if missing:
        raise KernelRuleError(
            f"counter(s) {sorted(missing)} not in the nft listing; list them with "
            "'nft -j list counters table inet lrk'"
        )
    return sum(named[n][0] for n in wanted), sum(named[n][1] for n in wanted)


def parse_drop_counter(json_obj: Dict[str, Any], family: Optional[int] = None) -> Tuple[int, int]:
    """(packets, bytes) of new flows no session admits (media.dropped.unexpected_source).

    Reads the named counters from ``nft -j list counters table inet lrk`` (or
    a listing of the whole table); ``family`` 4 or 6, None for both summed.
    In the NFQUEUE variant these are the packets handed to the queue.
    """
    wanted = _drop_names(family)
    found: Dict[str, Tuple[int, int]] = {}
    for obj in _objects(json_obj, "drop counters"):
        body = obj.get("counter")
        if isinstance(body, dict) and body.get("name") in wanted:
            found[body["name"]] = (int(body.get("packets", 0)), int(body.get("bytes", 0)))
    return drop_counter(found, family)
