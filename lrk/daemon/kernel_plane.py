"""Kernel mode: media forwarded by netfilter NAT, sessions as nftables map elements.

The shell around `fastpath.kernel.kernel_rules` (what to write) and `fastpath.kernel.nft` /
`fastpath.kernel.ctnetlink` (how). Runs in the relay's network namespace; owns the
`table inet lrk` there: created (replacing a leftover) on start, deleted on stop,
and every session's conntrack flows flushed when it ends or re-latches.

Restarts (`adopt`, a relay with a session store): the kernel forwards on while no
process runs. A stop that keeps the calls (Remove with reason KEPT for each) leaves
the table, its flows and the accounting sysctls as they are; the next start adopts a
table of the same layout (`KernelRuleset.layout`, a marker element) instead of
replacing it: each restored session claims its elements (only what differs is
rewritten), then `adopted()` deletes the elements and flushes the flows no restored
session owns, and counts from there on. A table of another layout, or no restored
session at all, is replaced as on a plain start.

Per-leg counters come from conntrack accounting (``counters="conntrack"``, the
namespace's `nf_conntrack_acct` and `nf_conntrack_timestamp` are switched on while
running) or from the ruleset's per-packet `seen` sets (``"rules"``, ~1.5 us/pkt more),
or from nowhere (``"none"``: the ruleset and reads of ``"conntrack"``, the sysctls left
as they are; flows created with them off carry no conntrack extension, whose cache line
every packet of a flow that has one touches: 5-10 % of a relay core at 100,000 flows).

When media last flowed: with conntrack counting, from each flow's remaining timeout
(every packet resets it; `fastpath.kernel.ctnetlink.udp_last_packet`), so one read tells
the last packet's time to about a second whenever it is made. The periodic read then
only has to see every flow before it expires (`udp_timeout` after its last packet): it
runs every `sweep_interval` (about 15 s); reads before an expiry decision or a query
(`refresh`) still come at most `poll_interval` apart. `"rules"` counting has only
counters: a read that sees them move dates the media to itself, every `poll_interval`.
"""

from __future__ import annotations

import logging
import time
from typing import (
    Any,
    Callable,
    Dict,
    Iterable,
    List,
    NamedTuple,
    Optional,
    Sequence,
    Set,
    Tuple,
)

from fastpath.contract import (
    Action,
    EventSink,
    Install,
    LegReport,
    PlaneFailure,
    Remove,
    SessionReport,
    StreamReport,
    StreamSpec,
    Update,
    unit_id,
    unit_of,
)
from fastpath.contract import LegSpec as PlaneLeg
from fastpath.contract import SessionSpec as PlaneSession
from fastpath.kernel.ctnetlink import (
    IPS_ASSURED,
    ConntrackError,
    ConntrackSocket,
    CtFlow,
    mark_filters,
    udp_last_packet,
)
from fastpath.kernel.kernel_rules import (
    ACCT_NAMES,
    Elements,
    ForkSpec,
    KernelRuleError,
    KernelRuleset,
    LegSpec,
    SessionSpec,
    TableListing,
    acct_record,
    acct_values,
    conntrack_marks,
    drop_counter,
    leftover_commands,
    parse_counters,
    parse_drop_counter,
    parse_table,
)
from fastpath.kernel.nft import Nft, NftError
from fastpath.kernel.nft_elements import ElementTextError, ElementWriter
from fastpath.kernel.nft_setelem import NftDumpError, SetElemReader
from lrk.errors import ConfigError, LrkError

log = logging.getLogger("lrk.kernel")
#: restart events (table kept, adopted): shown whatever the log level (`fastpath.logs`)
lifecycle = logging.getLogger("lrk.lifecycle")

#: IP + UDP header bytes netfilter counts in each packet (no IP options on media)
HEADER_BYTES = {4: 20 + 8, 6: 40 + 8}


def _moved_marks(old: SessionSpec, new: SessionSpec) -> List[int]:
    """Conntrack marks of the flows NATed towards a peer that moved between `old` and
    `new`: they entered at the other leg (same kind, RTP or RTCP). The others keep going
    (flushing them would lose the only record of who latched there)."""
    if (old.a.relay(False), old.b.relay(False)) != (new.a.relay(False), new.b.relay(False)):
        return conntrack_marks(old)
    marks = []
    for rtcp in (False, True):
        for leg_old, leg_new, other in ((old.a, new.a, old.b), (old.b, new.b, old.a)):
            if leg_old.peer(rtcp) != leg_new.peer(rtcp):
                marks.append(other.rtp_mark + rtcp)
    return marks


FORWARDING = {4: "/proc/sys/net/ipv4/ip_forward", 6: "/proc/sys/net/ipv6/conf/all/forwarding"}
#: per-flow packet/byte counters and start times; apply to flows created while they are 1
ACCT = {name: f"/proc/sys/net/netfilter/{name}" for name in ACCT_NAMES}
#: what every packet resets a UDP flow's timeout to: not assured, assured (read, not written)
UDP_TIMEOUTS = ("/proc/sys/net/netfilter/nf_conntrack_udp_timeout",
                "/proc/sys/net/netfilter/nf_conntrack_udp_timeout_stream")
#: the kernel's defaults, until start reads the namespace's values
DEFAULT_UDP_TIMEOUTS = (30, 120)
#: the longest time between periodic reads in conntrack counting (latches and relay-wide
#: counters of sessions nobody queries are at most this old)
MAX_SWEEP = 15.0
#: the reason of the Remove a relay that keeps its calls sends for each at stop: the
#: kernel state stays for the next start to adopt
KEPT = "restart"
#: (received from A's peer: packets, bytes, received from B's peer: packets, bytes)
Counts = Tuple[int, int, int, int]
_ZERO: Counts = (0, 0, 0, 0)
#: what a unit with nothing to report last said: no counts, media time, latch or drops
_IDLE = (_ZERO, None, None, None, None, None, (), ())


def read_udp_timeouts(paths: Sequence[str] = UDP_TIMEOUTS) -> Tuple[int, int]:
    """(nf_conntrack_udp_timeout, nf_conntrack_udp_timeout_stream) of this namespace, in
    seconds; the kernel's defaults for one that cannot be read (logged). lrk never
    writes them: a change takes effect for lrk at its next start."""
    values = list(DEFAULT_UDP_TIMEOUTS)
    for i, path in enumerate(paths):
        try:
            with open(path) as fh:
                value = int(fh.read().strip())
        except (OSError, ValueError) as exc:
            log.warning("cannot read %s (%s): assuming %d s", path, exc, values[i])
            continue
        if value > 0:
            values[i] = value
    return values[0], values[1]


def leg_spec(leg: PlaneLeg, rules: Optional[KernelRuleset] = None,
             held: bool = False) -> Optional[LegSpec]:
    """The kernel's view of a leg, or None while its peer is unknown, or on hold (port 0)
    unless `held` (then a LegSpec with peer port 0: admitted from its address, nothing
    sent to it); with `rules`, its ct mark is its relay address's (mark slots)."""
    if leg.announced is None or not (leg.announced[1] or held):
        return None
    if not leg.announced[1]:
        if rules is not None and rules.slot_of:
            return rules.leg(leg.relay_ip, leg.relay_port, leg.announced[0], 0, None)
        return LegSpec(leg.relay_ip, leg.relay_port, leg.announced[0], 0)
    rtcp = leg.rtcp_announced[1] if leg.rtcp_announced else None
    if rules is not None and rules.slot_of:
        return rules.leg(leg.relay_ip, leg.relay_port, leg.announced[0], leg.announced[1],
                         rtcp or None)
    return LegSpec(leg.relay_ip, leg.relay_port, leg.announced[0], leg.announced[1],
                   peer_rtcp_port=rtcp or None)


def session_spec(stream: StreamSpec, rules: Optional[KernelRuleset] = None
                 ) -> Optional[SessionSpec]:
    """The kernel's view of one stream (a unit), or None while a peer is unknown or both
    are on hold. One peer on hold (old-style, c=0.0.0.0): what it sends (music on hold)
    is forwarded, nothing goes to it."""
    a, b = leg_spec(stream.a, rules, held=True), leg_spec(stream.b, rules, held=True)
    if a is None or b is None or (a.held and b.held):
        return None
    return SessionSpec(a, b)


def fork_spec(stream: StreamSpec, rules: Optional[KernelRuleset] = None
              ) -> Optional[ForkSpec]:
    """The kernel's view of one stream of a further early dialog (a fork unit): its own
    A port and the caller, the session's B port and this fork's callee (B's mark above
    every slot's, `KernelRuleset.fork_offset`)."""
    a, b = leg_spec(stream.a, rules), leg_spec(stream.b, rules)
    if a is None or b is None:
        return None
    return rules.fork(a, b) if rules is not None else ForkSpec(a, b)


class UnitView(NamedTuple):
    """One unit (a stream, or a fork's stream) as the kernel path holds it: the engine's
    stream spec (leg generations) and the rules' spec (relay addresses, peers, RTCP)."""

    uid: int
    stream: StreamSpec
    rules: SessionSpec


class KernelView:
    """The read-only seam over what a kernel plane holds, for the xdp plane that composes
    one (and its fakes in tests): no caller outside this module reads the dicts."""

    specs: Dict[int, PlaneSession]
    streams: Dict[int, StreamSpec]
    installed: Dict[int, SessionSpec]
    session_forks: Dict[int, Dict[Tuple[int, int], int]]

    def session_ids(self) -> List[int]:
        """Every session installed now."""
        return list(self.specs)

    def session(self, sid: int) -> Optional[PlaneSession]:
        """The engine's last spec of a session."""
        return self.specs.get(sid)

    def stream(self, uid: int) -> Optional[StreamSpec]:
        """The engine's stream spec of a unit (main or fork)."""
        return self.streams.get(uid)

    def forked(self, sid: int) -> bool:
        """Whether the session has fork units (forked early dialogs)."""
        return bool(self.session_forks.get(sid))

    def units(self, sid: int) -> List[UnitView]:
        """The session's units with elements written (main units, then fork units)."""
        spec = self.specs.get(sid)
        uids = [unit_id(sid, s.index) for s in spec.streams] if spec is not None else []
        uids += list(self.session_forks.get(sid, {}).values())
        out = []
        for uid in uids:
            rules, stream = self.installed.get(uid), self.streams.get(uid)
            if rules is not None and stream is not None:
                out.append(UnitView(uid, stream, rules))
        return out


class KernelPlane(KernelView):
    """Applies engine actions as nftables element changes; reads counters back, every
    `poll_interval` on its own timer, and reports them to the engine as events."""

    #: serve every early dialog of a forked INVITE (fork units); False: the first only
    relays_forks = True
    #: a unit's install writes its `adm` elements (nfqueue mode: userspace admits)
    writes_admission = True

    def __init__(self, port_start: int, port_end: int, relay_ips: Sequence[str],
                 table: str = "lrk", poll_interval: float = 2.0,
                 counters: str = "conntrack", adopt: bool = False,
                 extra: Sequence[Tuple[str, int, int]] = (),
                 mark_slots: Sequence[str] = ()) -> None:
        self.port_start = port_start
        self.port_end = port_end
        # extra: a standby's peers' media (address, ports), served once taken over;
        # mark_slots: several addresses per side, each its own port space and marks
        self.rules = KernelRuleset(table=table, port_start=port_start, port_end=port_end,
                                   relay_ips=sorted(set(relay_ips)), counters=counters,
                                   extra=extra, mark_slots=mark_slots)
        self.sink: EventSink = lambda event: None
        #: what the engine asked for, per session, and per unit (one stream of a session;
        #: the kernel state below is keyed by unit id)
        self.specs: Dict[int, PlaneSession] = {}
        self.streams: Dict[int, StreamSpec] = {}
        #: sysctl name -> its value before start set it to 1 (restored on stop)
        self._acct_old: Dict[str, str] = {}
        #: conntrack counting: last counts of each live flow, keyed by (CTA_ID, start, tuple):
        #: (sid, leg name, orig packets, orig bytes, reply packets, reply bytes)
        self._flow_counts: Dict[tuple, Tuple[int, str, int, int, int, int]] = {}
        #: per session, the counts of its flows that vanished (flushed, expired)
        self._base: Dict[int, List[int]] = {}
        #: per session, the counts last reported
        self._totals: Dict[int, Counts] = {}
        self.poll_interval = poll_interval
        self.nft: Optional[Nft] = None
        #: a call's elements as one nf_tables netlink batch (~0.1 ms; libnftables spends
        #: ~0.3 ms a transaction parsing and fetching its cache); None: through nft
        self.writer: Optional[ElementWriter] = None
        #: from `deferred_begin` to `deferred_end`: element texts and flow flushes held
        #: for one transaction (and one flush pass) at the end
        self._deferred: Optional[List[str]] = None
        self._deferred_marks: List[int] = []
        self._deferred_stale: List[int] = []  # units whose held flush ends their `_stale`
        self.ct: Optional[ConntrackSocket] = None
        #: counters straight from the kernel: nft's listing costs 13-20 s at 400,000 elements
        self.dump: Optional[SetElemReader] = None
        #: the drop counters straight from the kernel (a GETOBJ dump, ~0.02 ms): nft's
        #: listing fetches the whole ruleset, set elements too (~50 ms at 1,000 sessions);
        #: None until start, and after a failure until the next poll opens it again
        self.objects: Optional[SetElemReader] = None
        self._objects_wanted = False
        self.installed: Dict[int, SessionSpec] = {}
        #: a second ctnetlink socket for flow dumps (a failed dump leaves it unusable)
        self.ct_dump: Optional[ConntrackSocket] = None
        self.dump_timeout = 2.0
        self.max_flows = 1_000_000
        #: sessions whose re-latch flush failed: their flows may be the old generation's
        self._stale: Dict[int, List[int]] = {}
        #: marks of ended units whose flow flush failed: their flows keep their NAT until
        #: a flush succeeds (the next read, the timer, or stop flushes them again)
        self._unflushed: Set[int] = set()
        #: fork units (forked INVITEs' further early dialogs) have negative unit ids:
        #: per session, (fork key, stream index) -> unit id; and unit id -> (sid, key, index)
        self.session_forks: Dict[int, Dict[Tuple[int, int], int]] = {}
        self.fork_of: Dict[int, Tuple[int, int, int]] = {}
        self._next_fork_uid = -1
        self._seen: Dict[Tuple[str, int], Tuple[int, int]] = {}
        #: `_owners` of the sessions installed now; None after any change to `installed`
        self._owner_map: Optional[Dict[int, Tuple[int, str, bool, Tuple[str, int], str,
                                                  Tuple[str, int]]]] = None
        self._last_poll = 0.0
        #: per unit, what its last report said (counts, media time, latches, drops): an
        #: unchanged unit is not reported again; any action on the unit forgets it
        self._reported: Dict[int, tuple] = {}
        #: conntrack counting: per unit, the latest time one of its flows carried a packet
        #: (plane's monotonic clock), from the flows' remaining timeouts
        self._last_rx: Dict[int, float] = {}
        #: nf_conntrack_udp_timeout and _stream in the relay's namespace (read on start)
        self.udp_timeouts: Tuple[int, int] = DEFAULT_UDP_TIMEOUTS
        #: clocks read right after each flow dump (tests replace them)
        self.clock: Callable[[], float] = time.monotonic
        self.wall_ns: Callable[[], int] = time.time_ns
        self.drop_counter = "media.dropped.unexpected_source"  # what the ruleset counts
        #: keep an existing table of this layout at start (the relay restores sessions)
        self.adopt = adopt
        #: while a restore runs: the adopted table's elements no restored unit claimed yet
        self._found: Optional[Elements] = None
        #: the adopted table's chains with rules (nfqueue mode: its NFQUEUE rules exist)
        self._found_chains: Dict[str, int] = {}
        #: the adopted table's record of the accounting sysctls from before lrk
        self._found_acct: Optional[int] = None
        #: sessions released for the next start (Remove with reason KEPT)
        self._kept: Set[int] = set()
        #: `seen` counts an adopted table held at adoption, per relay address: reports
        #: count from there (the session's stored counters hold what came before)
        self._seen_offset: Dict[Tuple[str, int], Tuple[int, int]] = {}
        self.counters: Dict[str, int] = {
            "media.dropped.unexpected_source": 0,
            "kernel.errors": 0,
            "kernel.sessions.installed": 0,
            "kernel.sessions.adopted": 0,
            "kernel.adopt.removed_elements": 0,
            "kernel.adopt.flushed_marks": 0,
            "kernel.flows.flushed": 0,
            "kernel.flows.dumped": 0,
        }

    # -- lifecycle ---------------------------------------------------------------------
    async def start(self) -> None:
        families = {6 if ":" in ip else 4 for ips in self.rules.relay_ips.values()
                    for ip in ips}
        for fam in families:
            with open(FORWARDING[fam]) as fh:
                if fh.read().strip() != "1":
                    raise ConfigError(
                        f"kernel mode forwards in netfilter: enable {FORWARDING[fam]} "
                        "(sysctl) in the relay's network namespace, or use --mode socket")
        if not self.rules.seen:
            self.udp_timeouts = read_udp_timeouts()
            log.info("kernel mode: UDP flows expire %d s (%d s assured) after their last "
                     "packet: counters read every %g s, and at most %g s old before an "
                     "expiry or a query", self.udp_timeouts[0], self.udp_timeouts[1],
                     self.sweep_interval, self.poll_interval)
            if self.rules.counters != "conntrack":
                self._log_uncounted()
        counts = self._counts_by_acct()
        current = self._read_acct() if counts else {}
        try:
            self._start_tables()
            if counts:  # (unreadable sysctls: _enable_acct says so, and the start fails)
                self._enable_acct(self._acct_originals(current or self._read_acct()))
        except BaseException:
            await self._undo_start()
            raise

    def _counts_by_acct(self) -> bool:
        return not self.rules.seen and self.rules.counters == "conntrack"

    @staticmethod
    def _read_acct() -> Dict[str, str]:
        """The accounting sysctls now (unreadable ones are left out)."""
        values = {}
        for name, path in ACCT.items():
            try:
                with open(path) as fh:
                    values[name] = fh.read().strip()
            except OSError:
                pass
        return values

    def _acct_originals(self, current: Dict[str, str]) -> Dict[str, str]:
        """The sysctls' values from before lrk: the adopted table's record when it has one
        (a restart that kept its calls left them at 1), else `current`, recorded in the
        table for the next start (an older table without the record set: not recorded)."""
        originals = current
        if self._found_acct is not None:  # (also a replaced table's of another layout)
            originals = {**current, **acct_values(self._found_acct)}
        if self._found is None or self._found_acct is None:
            self._record_acct(originals)  # (an adopted table with the record has it)
        return originals

    def _record_acct(self, values: Dict[str, str]) -> None:
        """Write the sysctls' values from before lrk into the table (`set acct`)."""
        assert self.nft is not None
        try:
            self.nft.run(self.rules.acct_command(acct_record(values)))
        except NftError as exc:
            log.warning("kernel mode: the accounting sysctls' values could not be recorded "
                        "in table inet %s (%s): a restart that keeps its calls restores "
                        "them as it finds them", self.rules.table, exc)

    async def _undo_start(self) -> None:
        """A start that failed part of the way: what it made goes (`stop`: the table, its
        flows, the sockets, the sysctls); the start's own error is the one raised."""
        try:
            await self.stop()
        except BaseException:
            log.exception("kernel mode: the clean-up after a failed start failed too")

    def _enable_acct(self, originals: Optional[Dict[str, str]] = None) -> None:
        """Conntrack only counts (acct) and timestamps flows created while these sysctls
        are 1, per namespace; the start time tells a re-created flow from an old one.
        `originals`: what stop restores (default: the values found now)."""
        for name, path in ACCT.items():
            try:
                with open(path) as fh:
                    now = fh.read().strip()
                old = (originals or {}).get(name, now)
                if now != "1":
                    with open(path, "w") as fh:
                        fh.write("1\n")
            except OSError as exc:
                self._restore_acct()
                raise ConfigError(
                    f"kernel_counters = conntrack needs net.netfilter.{name}=1 in the relay's "
                    f"network namespace, and {path} could not be set ({exc}): run lrk as root "
                    "there, set the sysctl yourself, or use kernel_counters = \"rules\""
                ) from exc
            self._acct_old[name] = old
            log.info("kernel mode: counting media with conntrack accounting "
                     "(net.netfilter.%s %s -> 1, restored on stop)", name, old)

    def _log_uncounted(self) -> None:
        """kernel_counters = none: say that media goes uncounted, or name the sysctls
        (set by someone else) that still give every new flow a conntrack extension."""
        on = [f"net.netfilter.{name}" for name, value in self._read_acct().items()
              if value == "1"]
        if on:
            log.info("kernel mode: kernel_counters = none, but %s %s 1 in this namespace: "
                     "new flows still carry conntrack's extension (and, with acct, are "
                     "counted)", " and ".join(on), "are" if len(on) > 1 else "is")
        else:
            log.info("kernel mode: media not counted (kernel_counters = none): per-leg "
                     "packets and bytes read 0; expiry and latching as with conntrack")

    def _restore_acct(self) -> None:
        for name, old in self._acct_old.items():
            if old == "1":
                continue
            try:
                with open(ACCT[name], "w") as fh:
                    fh.write(old + "\n")
                log.info("kernel mode: net.netfilter.%s restored to %s", name, old)
            except OSError as exc:
                log.error("could not restore net.netfilter.%s to %s: %s", name, old, exc)
        self._acct_old = {}

    def _start_tables(self) -> None:
        self.nft = Nft()
        try:
            self.writer = ElementWriter()
        except (NftError, OSError) as exc:
            log.warning("no nf_tables netlink socket (%s): elements written through nft", exc)
        self.ct = ConntrackSocket()
        self._objects_wanted = True
        self._open_objects()
        if self.rules.seen:
            try:
                self.dump = SetElemReader()
            except OSError as exc:
                log.warning("no nf_tables netlink socket (%s): counters read through nft", exc)
        self._open_table()
        log.info("kernel mode: table inet %s ready (%s, counters from %s)", self.rules.table,
                 self.nft.backend, self.rules.counters)

    def _open_table(self) -> None:
        """Adopt an existing table of this layout (`adopt`), else create it afresh."""
        listing = self._existing() if self.adopt else None
        if listing is None:
            self._fresh_table()
            return
        self._found = listing.elements
        self._found_chains = listing.chains_with_rules
        self._found_acct = listing.acct
        lifecycle.info("kernel mode: adopting table inet %s (%d elements) and its flows: media "
                 "kept flowing while no relay ran", self.rules.table,
                 sum(len(e) for e in listing.elements.values()))

    def _existing(self) -> Optional[TableListing]:
        """The table a previous run left, when it has this ruleset's layout."""
        assert self.nft is not None
        try:
            listing = parse_table(self.nft.run_json(self.rules.adopt_query()))
        except NftError:
            return None  # no such table: nothing to adopt
        except KernelRuleError as exc:
            log.warning("kernel mode: table inet %s unreadable (%s): replaced",
                        self.rules.table, exc)
            return None
        if listing.layout != self.rules.layout:
            self._found_acct = listing.acct  # the sysctls from before lrk, all the same
            log.warning("kernel mode: table inet %s has another layout (%s, this lrk writes "
                        "%s: another lrk version, or changed ports, relay addresses or "
                        "counting): replaced; restored calls get new elements and their "
                        "media pauses until then", self.rules.table,
                        "none" if listing.layout is None else f"{listing.layout:08x}",
                        f"{self.rules.layout:08x}")
            return None
        return listing

    def _fresh_table(self) -> None:
        """Create the table (replacing a leftover) and flush every flow lrk marked: the
        marks a filtered dump finds (one flush per mark walks the whole conntrack table,
        so flushing every possible mark blindly costs 2 x slots x range walks), or every
        mark when that dump fails."""
        assert self.nft is not None
        self.nft.run(self.rules.create())  # replaces a table a crashed run left behind
        if self._acct_old:  # re-created after an adoption: the sysctls' record again
            self._record_acct(self._acct_old)
        if self.ct is None:
            return
        self._flush_flows(self._lrk_marks())  # its flows too

    def _lrk_marks(self) -> List[int]:
        """The marks of every flow of lrk's now (a filtered dump), or every mark of the
        ruleset when that dump fails."""
        try:
            flows = self._ruleset_flows()
        except (ConntrackError, OSError) as exc:
            log.warning("kernel mode: conntrack dump failed (%s): flushing every lrk mark", exc)
            return self.rules.all_marks()
        owns = self.rules.owns_mark
        return sorted({f.mark for f in flows if owns(f.mark)})

    def _marks_to_flush(self) -> List[int]:
        """At a stop that ends every call: the installed units' marks that have flows (a
        dump), not every installed mark: each flush walks the whole conntrack table, and
        100,000 calls hold 400,000 marks. Every installed mark when the dump fails."""
        installed = [m for spec in self.installed.values() for m in conntrack_marks(spec)]
        if len(installed) <= 64 or self.ct is None:
            return installed
        try:
            flows = self._ruleset_flows()
        except (ConntrackError, OSError) as exc:
            log.warning("kernel mode: conntrack dump failed (%s): flushing every call's "
                        "marks", exc)
            return installed
        mine = set(installed)
        return sorted({f.mark for f in flows if f.mark in mine})

    def _ruleset_filters(self) -> List[Tuple[int, int]]:
        """(mark, mask) filters covering every mark of the ruleset ([]: dump everything)."""
        hulls = (self.rules.mark_hull, self.rules.fork_mark_hull)
        filters = [f for lo, hi in hulls for f in mark_filters(lo, hi)]
        if any(not mark_filters(lo, hi) for lo, hi in hulls):
            return []  # unfiltered: every mark is checked by the caller
        return filters

    def _ruleset_flows(self) -> List[CtFlow]:
        """Every flow whose mark may be lrk's (callers check each mark)."""
        if self.ct_dump is None:
            self.ct_dump = ConntrackSocket()
        try:
            return self.ct_dump.flows(self._ruleset_filters(), timeout=self.dump_timeout,
                                      max_flows=self.max_flows)
        except (ConntrackError, OSError):
            self.ct_dump.close()
            self.ct_dump = None
            raise

    def adopted(self) -> None:
        """The restore is over: elements of an adopted table no restored session claimed
        are deleted, flows with marks no session owns flushed, and counters start from
        what the kernel holds now (the sessions' stored counters hold the rest). Nothing
        restored: the table is re-created, as on a plain start."""
        found, self._found = self._found, None
        self._found_chains = {}
        self._found_acct = None
        if found is None:
            return
        if not self.installed:
            log.info("kernel mode: no call restored: table inet %s re-created",
                     self.rules.table)
            self._fresh_table()
            return
        stale = sum(len(e) for e in found.values())
        if stale:
            assert self.nft is not None
            try:
                self.nft.run(leftover_commands(found, self.rules.table))
                self.counters["kernel.adopt.removed_elements"] += stale
            except NftError as exc:
                self.counters["kernel.errors"] += 1
                log.error("kernel mode: could not delete %d element(s) no restored call owns: "
                          "%s", stale, exc)
        owners = self._owners()
        flows = self._adopt_flows(owners)
        if self.rules.seen:
            try:
                for fam in sorted({spec.family for spec in self.installed.values()}):
                    self._seen_offset.update(self._read_seen(fam))
            except (NftError, KernelRuleError) as exc:
                self.counters["kernel.errors"] += 1
                log.error("kernel mode: adopted counters unreadable: %s", exc)
        elif flows is not None:
            for uid, counts in self._flow_totals(flows, owners).items():
                self._base[uid] = [-n for n in counts]  # reports count from here
        self._last_poll = self.clock()
        lifecycle.info("kernel mode: adopted %d unit(s) of restored calls; removed %d element(s) "
                 "and the flows of %d mark(s) no restored call owns", len(self.installed),
                 stale, self.counters["kernel.adopt.flushed_marks"])

    def _adopt_flows(self, owners: Dict[int, tuple]) -> Optional[List[CtFlow]]:
        """lrk's flows in an adopted table: those with a mark in lrk's ranges that no
        restored unit owns are flushed; the rest are returned (None: dump failed)."""
        try:
            flows = self._ruleset_flows()
        except (ConntrackError, OSError) as exc:
            self.counters["kernel.errors"] += 1
            log.error("kernel mode: conntrack dump failed: flows of ended calls stay until "
                      "they expire: %s", exc)
            return None
        owns = self.rules.owns_mark
        stray = sorted({f.mark for f in flows if f.mark not in owners and owns(f.mark)})
        try:
            self._flush_flows(stray)
            self.counters["kernel.adopt.flushed_marks"] += len(stray)
        except ConntrackError as exc:
            self.counters["kernel.errors"] += 1
            log.error("kernel mode: could not flush flows no restored call owns: %s", exc)
        return [f for f in flows if f.mark in owners]

    async def stop(self) -> None:
        """Calls kept (Remove with reason KEPT): the table, their flows and the sysctls
        stay for the next start. Otherwise the table goes and every flow of lrk's with it.
        Either way the flows of ended calls whose flush failed are flushed again, and the
        netlink sockets close and the sysctls go back whatever failed before: a table or
        flush that could not go is counted (kernel.errors), and its error raised once all
        that is done. A second stop changes nothing."""
        try:
            self._release_kernel_state()
        finally:
            self._close_sockets()
            self._flow_counts.clear()
            self._reported.clear()
            self._base.clear()
            self._totals.clear()
            self._last_rx.clear()
            self._restore_acct()

    def _release_kernel_state(self) -> None:
        """`stop`'s part in the kernel: the table and the flows (see `stop`)."""
        keep = bool(self._kept)
        if keep:  # the calls live on: only sessions not kept (none, from the relay) go
            for sid in [s for s in self.specs if s not in self._kept]:
                try:
                    self._drop_session(sid)
                except (NftError, KernelRuleError, ConntrackError, OSError) as exc:
                    log.error("kernel mode could not remove session %s: %s", sid, exc)
            # an ended call's mark a kept call has since taken is the kept call's now
            marks = sorted(self._unflushed - self._live_marks())
            lifecycle.info("kernel mode: table inet %s, its flows and the accounting sysctls left "
                     "in place for %d kept call(s): the kernel forwards their media until "
                     "the next start adopts them", self.rules.table, len(self._kept))
            self._kept.clear()
            self._acct_old = {}
        elif self._found is not None:
            # a start that failed before its restore was over: the adopted table, its flows
            # and the sysctls stay as the last run left them (their calls are in the store,
            # and the kernel forwards their media until a start adopts them)
            keep = True
            marks = []
            self._acct_old = {}
            lifecycle.warning("kernel mode: start failed before the restore was over: table "
                              "inet %s and its flows left in place for the next start",
                              self.rules.table)
        else:
            marks = sorted(set(self._marks_to_flush()) | self._unflushed)
        self.installed.clear()
        self._owner_map = None
        self.specs.clear()
        self.streams.clear()
        self.session_forks.clear()
        self.fork_of.clear()
        self._found = None
        self._found_chains = {}
        self._found_acct = None
        self._seen_offset.clear()
        self._stale.clear()
        nft, self.nft = self.nft, None  # a second stop leaves the table (kept or gone) be
        errors: List[Exception] = []
        if nft is not None and not keep:
            try:
                nft.run(self.rules.destroy())
            except Exception as exc:  # the flows below go all the same
                self.counters["kernel.errors"] += 1
                log.error("could not delete table inet %s: %s", self.rules.table, exc)
                errors.append(exc)
        try:
            self._flush_flows(marks)
        except Exception as exc:
            self.counters["kernel.errors"] += 1
            log.error("kernel mode: conntrack flush at stop failed: flows of %d mark(s) keep "
                      "their NAT until they expire: %s", len(marks), exc)
            errors.append(exc)
        else:
            self._unflushed.clear()
        if nft is not None:
            nft.close()
        if errors:
            raise errors[0]

    def _close_sockets(self) -> None:
        """Every netlink socket of the plane, each closed whatever the others did."""
        self._objects_wanted = False
        socks: Tuple[Any, ...] = (self.ct, self.writer, self.ct_dump, self.dump, self.objects)
        self.ct = self.ct_dump = None
        self.writer = None
        self.dump = self.objects = None
        for sock in socks:
            if sock is None:
                continue
            try:
                sock.close()
            except OSError as exc:
                log.error("kernel mode: a netlink socket did not close: %s", exc)

    # -- actions -----------------------------------------------------------------------
    def commit(self, then: Callable[[], None]) -> None:
        """Nothing is queued here: `apply` wrote the kernel's maps already."""
        then()

    def apply(self, actions: Sequence[Action]) -> List[PlaneFailure]:
        """Write each action to the kernel; an install or update the kernel refuses is a
        failure the engine hears of (it ends the session), a failed removal is counted
        and logged (its elements stay until the table goes, on stop)."""
        failures: List[PlaneFailure] = []
        for action in actions:
            sid = action.sid
            if isinstance(action, Remove) and action.reason == KEPT:
                self._kept.add(sid)  # its elements and flows stay for the next start
                continue
            try:
                if isinstance(action, Remove):
                    self._drop_session(sid)
                elif isinstance(action, (Install, Update)):
                    self._converge(action.spec)
            except (NftError, KernelRuleError, ConntrackError, OSError) as exc:
                self.counters["kernel.errors"] += 1
                if isinstance(action, Remove):
                    log.error("kernel mode could not remove session %s: %s",
                              action.call_id, exc)
                    continue
                log.error("kernel mode could not apply %s for %s: %s", type(action).__name__,
                          action.spec.call_id, exc)
                failures.append(PlaneFailure(sid, "kernel_error", str(exc)[:200]))
                try:
                    self._drop_session(sid)
                except (NftError, KernelRuleError, ConntrackError, OSError) as again:
                    log.error("kernel mode could not clean up session %s: %s",
                              action.spec.call_id, again)
        return failures

    def _converge(self, spec: PlaneSession) -> None:
        """One nft element set per stream: added, removed, changed, re-latched."""
        old = self.specs.get(spec.sid)
        self.specs[spec.sid] = spec
        forks = spec.forks if self.relays_forks else ()
        wanted = {(f.key, s.index): s for f in forks for s in f.streams}
        # early dialogs gone (freed, or promoted: then the main unit takes over their A
        # ports, so their elements must go first)
        mine = self.session_forks.get(spec.sid, {})
        for key in [k for k in mine if k not in wanted]:
            self._remove(mine[key])
        if old is not None:
            for stream in old.streams:
                if spec.stream(stream.index) is None:
                    self._remove(unit_id(spec.sid, stream.index))
        for stream in spec.streams:
            uid = unit_id(spec.sid, stream.index)
            before = self.streams.get(uid)
            self.streams[uid] = stream
            relatch = before is not None and (
                before.a.generation != stream.a.generation
                or before.b.generation != stream.b.generation)
            self._install(uid, stream, relatch)
        # a callee is told apart by its source address: a fork whose callee is one that
        # already sends to that B port (the session's, an earlier fork's) is not relayed
        taken = {(s.index, s.b.announced) for s in spec.streams}
        for key, stream in wanted.items():
            peer = (stream.index, stream.b.announced)
            clash = peer in taken
            taken.add(peer)
            mine = self.session_forks.setdefault(spec.sid, {})
            uid = mine.get(key)
            if uid is None:
                uid = mine[key] = self._next_fork_uid
                self._next_fork_uid -= 1
                self.fork_of[uid] = (spec.sid,) + key
            before = self.streams.get(uid)
            self.streams[uid] = stream
            relatch = before is not None and (
                before.a.generation != stream.a.generation
                or before.b.generation != stream.b.generation)
            if clash:
                self._apply_unit(uid, self.installed.get(uid), None, relatch)
            else:
                self._install(uid, stream, relatch)

    def _drop_session(self, sid: int) -> None:
        spec = self.specs.pop(sid, None)
        for uid in list(self.session_forks.get(sid, {}).values()):
            self._remove(uid)
        if spec is None:
            return
        for stream in spec.streams:
            self._remove(unit_id(sid, stream.index))

    def _spec(self, uid: int, stream: StreamSpec) -> Optional[SessionSpec]:
        """What the kernel should hold for a unit (nfqueue mode adds latched sources): a
        fork unit's is a ForkSpec."""
        if uid in self.fork_of:
            return fork_spec(stream, self.rules)
        return session_spec(stream, self.rules)

    def _elements(self, commands: str) -> str:
        """Element commands as applied (nfqueue mode leaves admission to userspace)."""
        return commands

    def _forget(self, sid: int, spec: SessionSpec) -> None:
        """State kept beside the elements, dropped with the session (none here)."""

    def _install(self, sid: int, stream: StreamSpec, relatch: bool) -> None:
        """Install or update one unit (`sid` here is the unit id)."""
        self._apply_unit(sid, self.installed.get(sid), self._spec(sid, stream), relatch)

    def _apply_unit(self, sid: int, old: Optional[SessionSpec], new: Optional[SessionSpec],
                    relatch: bool) -> None:
        """Turn a unit's elements from `old` into `new` (None: none)."""
        self._reported.pop(sid, None)  # the engine may count from a new base: report again
        if new is None:
            if old is not None:
                self._remove(sid)
            return
        assert self.nft is not None
        if old is None and self._found is not None:
            # a restored unit in an adopted table: only what differs is rewritten
            text = self._elements(self.rules.claim_commands(self._found, new))
            if text:
                self._write(text)
            self.counters["kernel.sessions.adopted"] += 1
        elif old is None:
            if self._unflushed:  # an ended unit's flows on these marks go first
                self._retry_unflushed(conntrack_marks(new))
            self._write_unit(new, True)
            self.counters["kernel.sessions.installed"] += 1
        elif old != new:
            self._write(self._elements(self.rules.update_commands(old, new)))
        self.installed[sid] = new
        if self._owner_map is not None and old != new:  # kept up to date, not rebuilt
            if old is not None:
                self._disown(sid, old)
            self._own(self._owner_map, sid, new)
        if old is not None and (old != new or relatch):
            # established flows keep their NAT: a new offer/answer must start afresh;
            # a peer that only moved (a latch) needs only the flows NATed towards it gone
            marks = conntrack_marks(old) if relatch else _moved_marks(old, new)
            if not marks:
                return
            self._stale[sid] = marks  # until flushed: not the new generation's latch
            if self._deferred is not None:  # flushed after the held writes
                self._deferred_marks.extend(marks)
                self._deferred_stale.append(sid)
                return
            self._flush_flows(marks)
            self._stale.pop(sid, None)

    def _remove(self, sid: int) -> None:
        """Remove one unit (`sid` here is the unit id)."""
        self.streams.pop(sid, None)
        fork = self.fork_of.pop(sid, None)
        if fork is not None:
            mine = self.session_forks.get(fork[0])
            if mine is not None:
                mine.pop(fork[1:], None)
                if not mine:
                    del self.session_forks[fork[0]]
        spec = self.installed.pop(sid, None)
        if spec is None:
            return
        self._disown(sid, spec)
        assert self.nft is not None
        self._stale.pop(sid, None)
        self._base.pop(sid, None)
        self._reported.pop(sid, None)
        self._totals.pop(sid, None)
        self._last_rx.pop(sid, None)
        if self._seen_offset:  # a fork's B port is the session's: not its to drop
            legs = (spec.a,) if isinstance(spec, ForkSpec) else (spec.a, spec.b)
            for leg in legs:
                for rtcp in (False, True):
                    self._seen_offset.pop(leg.relay(rtcp), None)
        try:
            try:
                self._forget(sid, spec)
            finally:
                self._write_unit(spec, False)
        finally:
            # whether or not its elements went: its flows would keep their NAT
            self._flush_ended(conntrack_marks(spec))

    def _flush_ended(self, marks: List[int]) -> None:
        """Flush an ended unit's flows; marks whose flush fails are counted (kernel.errors)
        and kept in `_unflushed`, which the next read, the timer and stop flush again."""
        try:
            self._flush_flows(marks)
        except (LrkError, OSError) as exc:
            self.counters["kernel.errors"] += 1
            self._unflushed.update(marks)
            log.error("kernel mode: conntrack flush of an ended call's flows failed (retried "
                      "with the next read): %s", exc)

    def _live_marks(self) -> Set[int]:
        """The ct marks of every unit installed now."""
        return {m for spec in self.installed.values() for m in conntrack_marks(spec)}

    def _retry_unflushed(self, only: Optional[Iterable[int]] = None) -> None:
        """Flush again the ended units' marks whose flush failed (`only`: those of them)."""
        if not self._unflushed or self.ct is None or self._deferred is not None:
            return
        # a mark a live unit has taken since is that unit's: its flows are not flushed
        self._unflushed.difference_update(self._live_marks().difference(only or ()))
        marks = sorted(self._unflushed if only is None else self._unflushed.intersection(only))
        if not marks:
            return
        try:
            self._flush_flows(marks)
        except (LrkError, OSError) as exc:
            self.counters["kernel.errors"] += 1
            log.error("kernel mode: conntrack flush of %d ended call mark(s) still fails: %s",
                      len(marks), exc)
            return
        self._unflushed.difference_update(marks)

    def _write_unit(self, spec: SessionSpec, add: bool) -> None:
        """A unit's install (`add`) or removal: a plain unit's batch straight from its
        spec, a fork unit's (or without a netlink socket) through its text."""
        if self.writer is not None and not isinstance(spec, ForkSpec) \
                and self._deferred is None:
            if add:
                self.rules.check(spec)
            self.writer.run_spec(spec, self.rules.table, self.rules.seen,
                                 self.writes_admission, add)
            return
        self._write(self._elements(self.rules.install_commands(spec) if add
                                   else self.rules.remove_commands(spec)))

    def deferred_begin(self) -> None:
        """Hold element writes and flow flushes until `deferred_end` (a burst of
        decisions becomes one transaction)."""
        self._deferred = []
        self._deferred_marks = []
        self._deferred_stale = []

    def deferred_mark(self) -> int:
        """Where the held writes stand: a decision's writes are [mark before, mark after)."""
        return len(self._deferred or ())

    def deferred_end(self, groups: Sequence[Tuple[int, int, Optional[int]]]) -> Set[int]:
        """Apply the held writes as one transaction, then the held flushes; never raises.
        When that transaction fails, each group of writes (one decision's: a [first, end)
        range of marks, and the unit it changes) is tried as a transaction of its own, and
        a unit's later groups fail with its first failed one (they were computed on top of
        it); returns the indexes of the groups that failed (nothing of theirs applied;
        errors counted and logged), so the caller can refuse and retry what depended on
        them. A flush that fails is retried with the next read (the units stay stale)."""
        texts, marks = self._deferred or [], self._deferred_marks
        stale = self._deferred_stale
        self._deferred, self._deferred_marks, self._deferred_stale = None, [], []
        failed: Set[int] = set()
        if texts:
            try:
                self._write("".join(texts))
            except (NftError, KernelRuleError, OSError) as batch_exc:
                self.counters["nfqueue.batches.retried"] = (
                    self.counters.get("nfqueue.batches.retried", 0) + 1)
                log.warning("kernel mode: a batch of element writes failed (%s): "
                            "writing each decision alone", batch_exc)
                broken: Set[Optional[int]] = set()
                for i, (first, end, unit) in enumerate(groups):
                    if first >= end:
                        continue
                    if unit is not None and unit in broken:
                        failed.add(i)
                        continue
                    try:
                        self._write("".join(texts[first:end]))
                    except (NftError, KernelRuleError, OSError) as exc:
                        failed.add(i)
                        if unit is not None:
                            broken.add(unit)
                        self.counters["kernel.errors"] += 1
                        log.error("kernel mode: element write failed: %s", exc)
        if marks:
            try:
                self._flush_flows(marks)
            except (LrkError, OSError) as exc:
                self.counters["kernel.errors"] += 1
                log.error("kernel mode: conntrack flush failed (retried with the next "
                          "read): %s", exc)
                # the stale units' marks are retried as theirs; the rest are ended units'
                stale_marks = {m for sid in stale for m in self._stale.get(sid, ())}
                self._unflushed.update(m for m in marks if m not in stale_marks)
            else:
                for sid in stale:
                    self._stale.pop(sid, None)
        return failed

    def _restore_unit(self, sid: int, spec: Optional[SessionSpec]) -> None:
        """Record `spec` as unit `sid`'s elements again: a held write that would have
        changed them failed, so the kernel still has `spec` (the next decision rewrites)."""
        current = self.installed.get(sid)
        if current == spec or current is None or spec is None:
            return
        self.installed[sid] = spec
        if self._owner_map is not None:
            self._disown(sid, current)
            self._own(self._owner_map, sid, spec)

    def _write(self, text: str) -> None:
        """Element text as one transaction: a netlink batch, or nft when there is no
        socket or the text is not element lines (NftError either way: nothing applied)."""
        if self._deferred is not None:
            if text:
                self._deferred.append(text if text.endswith("\n") else text + "\n")
            return
        if self.writer is not None:
            try:
                self.writer.run(text)
                return
            except ElementTextError:
                pass
        assert self.nft is not None
        self.nft.run(text)

    def _flush_flows(self, marks) -> None:
        if self.ct is None:
            return
        if self._deferred is not None:
            self._deferred_marks.extend(marks)
            return
        marks = list(marks)
        if marks:
            self.ct.flush_marks(marks)
            self.counters["kernel.flows.flushed"] += len(marks)

    # -- counters ----------------------------------------------------------------------
    def _poll(self, now: Optional[float] = None) -> None:
        """Read per-leg counters (from conntrack flows or `seen` elements) into the sessions."""
        if self.nft is None:
            return
        if now is None:
            now = self.clock()
        self._last_poll = now
        self._retry_unflushed()
        seen: Dict[Tuple[str, int], Tuple[int, int]] = {}
        try:
            if self.rules.seen:
                families = {spec.family for spec in self.installed.values()}
                for fam in sorted(families):
                    seen.update(self._read_seen(fam))
            drops = self._read_drops()
        except (NftError, KernelRuleError) as exc:
            self.counters["kernel.errors"] += 1
            log.error("kernel counters unreadable: %s", exc)
            return
        self.counters[self.drop_counter] = drops
        owners = self._owners()
        flows = self._flows(owners)
        latched = self._latched(flows or [], owners)
        if self.rules.seen:
            totals = self._seen_totals(seen)
        elif flows is None:
            return  # the dump failed (counted, logged): counters stay as they were
        else:
            totals = self._flow_totals(flows, owners)
        previous = self._totals
        self._totals = totals
        by_session: Dict[int, List[StreamReport]] = {}
        by_fork: Dict[int, Dict[int, List[StreamReport]]] = {}
        fork_of = self.fork_of
        last: Dict[int, float] = {}
        stream_of = self.streams.get
        leg_report = self._leg_report
        leg_drops = self._leg_drops
        latched_get = latched.get
        reported = self._reported
        last_rx = self._last_rx
        # units with something to say: counts, a latch, a media time or drops; the others
        # were reported idle before and are passed over without a new object (at 100,000
        # calls most are: allocating per unit woke the garbage collector every read)
        active = set(totals)
        active.update(key[0] for key in latched)
        active.update(last_rx)
        active.update(self._drop_units())
        idle = _IDLE
        for uid, spec in self.installed.items():  # sink() runs after the loop
            if uid not in active and reported.get(uid) is idle:
                continue
            stream = stream_of(uid)
            if stream is None:
                continue
            fork = fork_of.get(uid) if uid < 0 else None
            sid = fork[0] if fork is not None else unit_of(uid)[0]
            counts = totals.get(uid, _ZERO)
            a_p, a_b, b_p, b_b = counts
            # when its flows last carried a packet; without their timeouts ("rules"
            # counting, a kernel that sends none), this read if the counters moved
            t = last_rx.get(uid)
            if t is None and counts != previous.get(uid, _ZERO):
                t = now
            if t is not None and t > last.get(sid, -1e300):
                last[sid] = t
            # a unit whose counts, media time, latches and drops are what it last
            # reported (most of them, at 100,000 calls) sends nothing: the engine has it
            # (no media time now: the one reported before still stands)
            prev = reported.get(uid)
            key = (counts, t if t is not None or prev is None else prev[1],
                   latched_get((uid, "A", False)), latched_get((uid, "A", True)),
                   latched_get((uid, "B", False)), latched_get((uid, "B", True)),
                   leg_drops(uid, "A"), leg_drops(uid, "B"))
            if prev == key:
                continue
            reported[uid] = idle if key == idle else key
            hdr = HEADER_BYTES[spec.family]
            # what B's peer sent was forwarded to A's peer, and back; a leg without a flow
            # reports no latch (a flow that timed out does not un-latch)
            report = StreamReport(
                stream.index,
                leg_report(uid, "A", stream.a.generation, counts, latched, hdr),
                leg_report(uid, "B", stream.b.generation, (b_p, b_b, a_p, a_b), latched,
                           hdr))
            if fork is not None:
                by_fork.setdefault(sid, {}).setdefault(fork[1], []).append(report)
            else:
                by_session.setdefault(sid, []).append(report)
        sink = self.sink
        for sid in list(by_session) + [s for s in by_fork if s not in by_session]:
            forks = tuple((key, tuple(reports))
                          for key, reports in sorted(by_fork.get(sid, {}).items()))
            sink(SessionReport(sid, last.get(sid), tuple(by_session.get(sid, ())), forks))

    def _seen_totals(self, seen: Dict[Tuple[str, int], Tuple[int, int]]) -> Dict[int, Counts]:
        """Per session, packets/bytes received per leg from the `seen` element counters."""
        offset = self._seen_offset
        if offset:  # an adopted table's counts before adoption are the store's
            seen = dict(seen)
            for key, was in list(offset.items()):
                now = seen.get(key)
                if now is None:
                    continue
                if now[0] < was[0]:  # the element was re-created since: counts afresh
                    del offset[key]
                else:
                    seen[key] = (now[0] - was[0], now[1] - was[1])
        self._seen = seen
        totals: Dict[int, Counts] = {}
        for sid, spec in self.installed.items():
            got = [0, 0, 0, 0]
            # a fork's B port is the session's: its `seen` element counts every callee
            legs = ((0, spec.a),) if isinstance(spec, ForkSpec) else ((0, spec.a), (2, spec.b))
            for i, leg in legs:
                for rtcp in (False, True):
                    p, b = seen.get(leg.relay(rtcp), (0, 0))
                    got[i] += p
                    got[i + 1] += b
            totals[sid] = (got[0], got[1], got[2], got[3])
        return totals

    def _flow_totals(self, flows: List[CtFlow], owners: Dict[int, tuple]) -> Dict[int, Counts]:
        """Per session, packets/bytes received per leg from conntrack accounting.

        A flow marked with leg X's mark entered at X: its original direction is what X's
        peer sent, its reply direction what the other leg's peer sent. Flows vanish (flush
        on re-offer, expiry); their last counts move into a per-session base so counters
        never go back. Packets a flow counted after the last poll before it vanished are
        lost (at most one poll interval of that flow; none for flows that expired: the
        periodic read comes more often than flows expire). Each flow's remaining timeout
        also dates its last packet (`_last_rx`, kept after the flow is gone)."""
        base = self._base
        current: Dict[tuple, Tuple[int, str, int, int, int, int]] = {}
        last_rx = self._last_rx
        now, wall_ns = self.clock(), self.wall_ns()  # right after the dump
        udp, stream = self.udp_timeouts
        for flow in flows:
            owner = owners.get(flow.mark)
            if owner is None or flow.proto != 17 or (flow.dst, flow.dport) != owner[3]:
                continue
            key = (flow.id, flow.start, flow.mark, flow.src, flow.sport, flow.dst, flow.dport)
            current[key] = (owner[0], owner[1], flow.orig_packets, flow.orig_bytes,
                            flow.reply_packets, flow.reply_bytes)
            left = flow.timeout
            if left is not None:
                # udp_last_packet, its common cases inline (2,000 flows a read)
                assured = flow.status & IPS_ASSURED
                setting = stream if assured else udp
                if left > setting or (assured and left < udp):
                    t = udp_last_packet(flow, now, udp, stream, wall_ns)
                else:
                    t = now - (setting - left) + 1.0
                    if t > now:
                        t = now
                if t is not None and t > last_rx.get(owner[0], -1e300):
                    last_rx[owner[0]] = t
        for key, old in self._flow_counts.items():
            new = current.get(key)
            # gone, or a later flow with the same id and tuple (its counts restarted)
            restarted = new is None or new[0] != old[0] or new[2] < old[2] or new[4] < old[4]
            if restarted and old[0] in self.installed:
                self._fold(base.setdefault(old[0], [0, 0, 0, 0]), old)
        self._flow_counts = current
        # sparse: only units with flows now or before (the rest count zero); at 100,000
        # calls a list per unit made each read O(calls) and woke the garbage collector
        installed = self.installed
        for sid in [s for s in base if s not in installed]:
            del base[sid]
        totals = {sid: list(b) for sid, b in base.items()}
        for entry in current.values():
            got = totals.get(entry[0])
            if got is None:
                if entry[0] not in installed:
                    continue
                got = totals[entry[0]] = [0, 0, 0, 0]
            self._fold(got, entry)
        return {sid: (g[0], g[1], g[2], g[3]) for sid, g in totals.items()}

    @staticmethod
    def _fold(into: List[int], entry: Tuple[int, str, int, int, int, int]) -> None:
        """Add one flow's counts to [A packets, A bytes, B packets, B bytes] received."""
        orig, reply = (0, 2) if entry[1] == "A" else (2, 0)
        into[orig] += entry[2]
        into[orig + 1] += entry[3]
        into[reply] += entry[4]
        into[reply + 1] += entry[5]

    # -- latching ----------------------------------------------------------------------
    def _owners(self) -> Dict[int, Tuple[int, str, bool, Tuple[str, int], str,
                                         Tuple[str, int]]]:
        """ct mark -> (sid, leg, rtcp, relay address the flow enters at, other leg, its
        relay address), for every installed session; retries failed re-latch flushes."""
        if self._stale:
            for sid in [s for s in self.installed if s in self._stale]:
                self._retry_flush(sid)
        cached = self._owner_map
        if cached is not None:
            return cached
        owners: Dict[int, Tuple[int, str, bool, Tuple[str, int], str, Tuple[str, int]]] = {}
        for sid, spec in self.installed.items():
            self._own(owners, sid, spec)
        self._owner_map = owners
        return owners

    @staticmethod
    def _own(owners: Dict[int, tuple], sid: int, spec: SessionSpec) -> None:
        """A unit's four marks into `owners` (built once, then kept up to date by each
        install and removal: rebuilding 400,000 entries per read cost ~0.3 s)."""
        for name, leg, other, other_leg in (("A", spec.a, "B", spec.b),
                                            ("B", spec.b, "A", spec.a)):
            for rtcp in (False, True):
                owners[leg.rtp_mark + rtcp] = (sid, name, rtcp, leg.relay(rtcp), other,
                                               other_leg.relay(rtcp))

    def _disown(self, sid: int, spec: SessionSpec) -> None:
        """A unit's marks out of the owner map (those still its own)."""
        owners = self._owner_map
        if owners is None:
            return
        for mark in conntrack_marks(spec):
            got = owners.get(mark)
            if got is not None and got[0] == sid:
                del owners[mark]
    def _flows(self, owners: Dict[int, tuple]) -> Optional[List[CtFlow]]:
        """lrk's flows: one mark-filtered dump per poll, O(flows of lrk). None when the
        dump failed (counted and logged)."""
        if not owners:
            return []
        try:
            flows = self._dump()
        except (ConntrackError, OSError) as exc:
            self.counters["kernel.errors"] += 1
            log.error("conntrack dump failed, no latched addresses%s this poll: %s",
                      "" if self.rules.seen else " or counters", exc)
            if self.ct_dump is not None:
                self.ct_dump.close()
                self.ct_dump = None
            return None
        self.counters["kernel.flows.dumped"] += len(flows)
        return flows

    def _latched(self, flows: List[CtFlow], owners: Dict[int, tuple]
                 ) -> Dict[Tuple[int, str, bool], Tuple[str, int]]:
        """(sid, leg, rtcp) -> the peer conntrack latched: the original source of the flow
        carrying that leg's mark. A session whose re-latch flush still fails reports none
        (its flows may be the old generation's)."""
        latched: Dict[Tuple[int, str, bool], Tuple[str, int]] = {}
        answered: Dict[Tuple[int, str, bool], Tuple[str, int]] = {}
        for flow in flows:
            owner = owners.get(flow.mark)
            # the mark alone could be a foreign one in range: the flow must enter at the leg
            if owner is None or flow.proto != 17 or (flow.dst, flow.dport) != owner[3] \
                    or owner[0] in self._stale:
                continue
            sid, name, rtcp = owner[:3]
            latched[(sid, name, rtcp)] = (flow.src, flow.sport)
            # the other leg's peer answered inside this flow (towards its relay port)
            if flow.replied and flow.reply_src is not None \
                    and (flow.reply_dst, flow.reply_dport) == owner[5]:
                answered[(sid, owner[4], rtcp)] = (flow.reply_src, flow.reply_sport)
        for key, addr in answered.items():
            latched.setdefault(key, addr)  # a flow the peer started itself comes first
        return latched

    def _dump(self) -> List[CtFlow]:
        if self.ct_dump is None:
            self.ct_dump = ConntrackSocket()
        lo, hi = self.rules.mark_hull  # every slot's marks (a mark slot per address)
        filters = mark_filters(lo, hi)
        if filters and self.fork_of:  # fork units' B legs carry marks of their own range
            forks = mark_filters(*self.rules.fork_mark_hull)
            filters = filters + forks if forks else []
        return self.ct_dump.flows(filters, timeout=self.dump_timeout,
                                  max_flows=self.max_flows)

    def _retry_flush(self, sid: int) -> None:
        try:
            self._flush_flows(self._stale[sid])
        except ConntrackError as exc:
            self.counters["kernel.errors"] += 1
            log.error("conntrack flush of a re-latched session still fails: %s", exc)
            return
        del self._stale[sid]

    def _leg_report(self, sid: int, name: str, generation: int,
                    counts: Tuple[int, int, int, int],
                    latched: Dict[Tuple[int, str, bool], Tuple[str, int]],
                    hdr: Optional[int] = None) -> LegReport:
        """Netfilter counts IP packets: their IP and UDP headers come off (`hdr` bytes a
        packet; looked up when not given), so that bytes mean payload bytes as in the
        userspace modes."""
        rtp, rtcp = latched.get((sid, name, False)), latched.get((sid, name, True))
        if hdr is None:
            spec = self.installed.get(sid)
            hdr = HEADER_BYTES[spec.family] if spec is not None else 0
        return LegReport(counts[0], max(0, counts[1] - hdr * counts[0]), counts[2],
                         max(0, counts[3] - hdr * counts[2]), self._leg_drops(sid, name),
                         generation if (rtp or rtcp) else -1, rtp, rtcp)

    def _drop_units(self) -> Iterable[int]:
        """Units with per-leg drops to report (none here: netfilter counts table-wide)."""
        return ()

    def _leg_drops(self, sid: int, name: str) -> Tuple[Tuple[str, int], ...]:
        """Per-leg drops: netfilter's drop counter is table-wide (not per leg) here."""
        return ()

    def _read_seen(self, fam: int) -> Dict[Tuple[str, int], Tuple[int, int]]:
        """One family's `seen` counters: a netlink dump (0.3 s at 50,000 elements, 13 s and
        0.27 GB at 400,000; nft's JSON listing: 19 s and 1.6 GB), or that listing when the
        dump is unavailable or failed."""
        if self.dump is not None:
            try:
                return self.dump.counters(self.rules.table, f"seen{fam}")
            except (NftDumpError, OSError) as exc:
                log.warning("set element dump failed (%s): counters read through nft", exc)
                self.dump.close()
                self.dump = None
        assert self.nft is not None
        return parse_counters(self.nft.run_json(self.rules.counters_query(fam)))

    def _open_objects(self) -> None:
        try:
            self.objects = SetElemReader()
        except (NftDumpError, OSError) as exc:
            self._objects_wanted = False  # no socket at all: nft from now on, said once
            log.warning("no nf_tables netlink socket (%s): drop counters read through nft", exc)

    def _read_drops(self) -> int:
        """Packets the table's drop counters counted: a netlink dump of its counter
        objects, or nft's listing when that is unavailable or failed (this poll)."""
        if self.objects is None and self._objects_wanted:
            self._open_objects()
        if self.objects is not None:
            try:
                return drop_counter(self.objects.named_counters(self.rules.table))[0]
            except (NftDumpError, OSError) as exc:
                log.warning("counter object dump failed (%s): drop counters read through nft",
                            exc)
                self.objects.close()
                self.objects = None
        assert self.nft is not None
        return parse_drop_counter(self.nft.run_json(self.rules.drops_query()))[0]

    def refresh(self, then: Callable[[], None]) -> None:
        """Counters no older than `poll_interval` (the relay asks before every expiry
        decision and for delete, query, list, stats; the plane's own timer reads only
        every `sweep_interval`): a full read costs O(sessions) (at 1,000 sessions with
        2,000 flows, conntrack counting: about 45 ms of CPU, over half of it the kernel
        walking its whole conntrack hash once per mark filter;
        bench/kernel_poll_cost.py), far too much to pay on every delete or query."""
        if self.clock() - self._last_poll >= self.poll_interval:
            self._poll()
        then()

    @property
    def sweep_interval(self) -> float:
        """Seconds between periodic reads. Conntrack counting: every flow's last packet
        is dated by its timeout at any read, so a read only has to come before a flow
        that went silent expires (`udp_timeout` after its last packet, when its last
        counts would be lost): half that, at most MAX_SWEEP, never more often than
        `poll_interval`. `"rules"` counting dates media by the read that sees counters
        move: every `poll_interval`."""
        if self.rules.seen:
            return self.poll_interval
        return max(self.poll_interval, min(MAX_SWEEP, self.udp_timeouts[0] / 2.0))

    def get_timer(self) -> Optional[float]:
        """The next periodic counter read, while any session is installed or an ended
        one's flows still wait for their flush."""
        if not self.installed and not self._unflushed:
            return None
        return self._last_poll + self.sweep_interval

    def handle_timer(self, now: float) -> None:
        if now < self._last_poll + self.sweep_interval:
            return
        if self.installed:
            self._poll(now)
        elif self._unflushed:
            self._last_poll = now
            self._retry_unflushed()

    def media_counters(self) -> Dict[str, int]:
        """Relay-wide: what sessions installed now received (payload bytes, as the
        userspace modes count)."""
        total = dict(self.counters)
        packets = payload = 0
        for uid, t in self._totals.items():
            spec = self.installed.get(uid)
            hdr = HEADER_BYTES[spec.family] if spec is not None else 0
            packets += t[0] + t[2]
            payload += max(0, t[1] - hdr * t[0]) + max(0, t[3] - hdr * t[2])
        total["media.received.packets"] = packets
        total["media.received.bytes"] = payload
        return total
