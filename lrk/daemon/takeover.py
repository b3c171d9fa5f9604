"""A warm standby: copies of peers' session records, and taking a dead peer's calls over.

Two (or more) relays share a Redis (`lrk.daemon.redis_store`); each writes its own
sessions. A node with `standby_for = ["node1"]` keeps a copy of node1's records: every
`poll` seconds it reads node1's generation counter (one MGET for all peers) and re-reads
node1's records only when it moved. Why a poll and not keyspace notifications: a
notification is fire-and-forget (whatever happens while the subscriber reconnects is
lost, and a standby would need a full read after every reconnect anyway), needs
`notify-keyspace-events` on the server and a second connection in the event loop; a
generation poll is one round trip per interval when nothing changed, heals itself after
any outage, and needs nothing from the Redis configuration.

Takeover (`take` below) happens on `lrkproxy ctl takeover NODE` or automatically when an
address the peer's sessions use appears on this host (keepalived/VRRP moved it): each
record becomes a session again (`lrk.core.persist`), the engine adopts it as foreign
(fresh id, the peer's ports), the data plane binds the same address and ports, and the
records move to this node's keys in one transaction. Counters continue from the record.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import struct
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Set, Tuple

from fastpath.kernel import netlink
from lrk.core.persist import RecordError, from_record
from lrk.core.session import Session
from lrk.daemon.redis_store import REDIS_ERRORS, RedisStore

log = logging.getLogger("lrk.takeover")


def record_addresses(record: Any) -> Set[str]:
    """The relay addresses a session record's media uses (legs and early dialogs)."""
    out: Set[str] = set()
    if not isinstance(record, dict):
        return out
    legs = list(record.get("legs") or [])
    for fork in record.get("forks") or []:
        if isinstance(fork, dict):
            legs.extend([fork.get("a"), fork.get("b")])
    for leg in legs:
        if not isinstance(leg, dict):
            continue
        for m in leg.get("media") or []:
            if isinstance(m, dict) and isinstance(m.get("ip"), str):
                out.add(m["ip"])
    return out


#: sysctls under which a bind succeeds for any address (keepalived/HAProxy hosts often
#: set them): a bind then says nothing of where an address is
NONLOCAL_BIND = {socket.AF_INET: "/proc/sys/net/ipv4/ip_nonlocal_bind",
                 socket.AF_INET6: "/proc/sys/net/ipv6/ip_nonlocal_bind"}
_IFADDRMSG = struct.Struct("=BBBBI")  # family, prefixlen, flags, scope, index
RTM_NEWADDR, RTM_GETADDR = 20, 22
IFA_ADDRESS, IFA_LOCAL = 1, 2


def _nonlocal_bind(family: int) -> bool:
    try:
        with open(NONLOCAL_BIND[family]) as fh:
            return fh.read().strip() != "0"
    except OSError:
        return False


def _address(buf: bytes, body: int, end: int) -> Optional[str]:
    """The interface address of one RTM_NEWADDR (IFA_LOCAL for IPv4, whose IFA_ADDRESS is
    the peer's on point-to-point links; IFA_ADDRESS for IPv6), or None."""
    if end - body < _IFADDRMSG.size:
        return None
    family = buf[body]
    size, want = (4, IFA_LOCAL) if family == socket.AF_INET else (16, IFA_ADDRESS)
    raw = netlink.attr_map(buf, body + _IFADDRMSG.size, end).get(want)
    return str(ipaddress.ip_address(raw)) if raw is not None and len(raw) == size else None


def parse_addresses(data: bytes) -> Set[str]:
    """The interface addresses in a buffer of rtnetlink RTM_NEWADDR messages (what comes
    before a message cut short stands)."""
    out: Set[str] = set()
    try:
        for mtype, body, end in netlink.Dump(None).feed(data):
            address = _address(data, body, end) if mtype == RTM_NEWADDR else None
            if address is not None:
                out.add(address)
    except netlink.NetlinkError:
        pass
    return out


def local_addresses() -> Set[str]:
    """Every address of this network namespace's interfaces now (an rtnetlink dump)."""
    sock = netlink.NetlinkSocket(protocol=socket.NETLINK_ROUTE)
    try:
        seq = sock.next_seq()
        request = netlink.message(RTM_GETADDR, netlink.NLM_F_REQUEST | netlink.NLM_F_DUMP,
                                  seq, _IFADDRMSG.pack(socket.AF_UNSPEC, 0, 0, 0, 0))
        out: Set[str] = set()
        for buf, mtype, body, end in sock.dump(request, netlink.Dump(seq), timeout=2.0):
            address = _address(buf, body, end) if mtype == RTM_NEWADDR else None
            if address is not None:
                out.add(address)
        return out
    finally:
        sock.close()


def is_local(ip: str) -> bool:
    """Whether `ip` is an address of this host (network namespace) now: a UDP bind to it
    succeeds (cheap: two syscalls), or, where ip_nonlocal_bind lets a bind succeed for
    any address, the interfaces' addresses (an rtnetlink dump) name it: a standby must
    never take a live peer's calls because a bind said yes."""
    family = socket.AF_INET6 if ":" in ip else socket.AF_INET
    if _nonlocal_bind(family):
        try:
            return str(ipaddress.ip_address(ip)) in local_addresses()
        except (OSError, netlink.NetlinkError) as exc:
            log.error("standby: cannot list this host's addresses (%s): %s is taken as "
                      "not here", exc, ip)
            return False
    try:
        with socket.socket(family, socket.SOCK_DGRAM) as s:
            s.bind((ip, 0))
    except OSError:
        return False
    return True


def session_media(session: Session) -> List[Tuple[str, int]]:
    """Every (relay address, RTP port) a session binds: legs, and early dialogs' A sides."""
    media = [m for leg in session.legs.values() for m in leg.media if m is not None]
    for fork in session.forks.values():
        media.extend(m for m in fork.a.media if m is not None)
    return [(m.relay_ip, m.relay_port) for m in media]


@dataclass
class Taken:
    """What a takeover did: sessions adopted, and records it could not take."""

    peer: str
    adopted: List[Session] = field(default_factory=list)
    #: peer sid -> this node's sid, for the adopted ones
    moved: Dict[int, int] = field(default_factory=dict)
    refused: Dict[int, str] = field(default_factory=dict)  # peer sid -> why

    def summary(self) -> Dict[str, Any]:
        return {"node": self.peer, "adopted": len(self.adopted), "refused": len(self.refused),
                "reasons": sorted(set(self.refused.values()))}


class Standby:
    """Warm copies of `peers`' records (polled), and the automatic takeover trigger."""

    def __init__(self, store: RedisStore, peers: List[str], poll: float = 0.5,
                 local: Callable[[str], bool] = is_local) -> None:
        self.store = store
        self.peers = list(peers)
        self.poll = poll
        self.local = local
        self.copies: Dict[str, Dict[int, Any]] = {p: {} for p in self.peers}
        self.gens: Dict[str, Optional[int]] = {p: None for p in self.peers}
        self.counters: Dict[str, int] = {"standby.refreshes": 0, "standby.peer_sessions": 0,
                                         "takeover.runs": 0, "takeover.sessions": 0,
                                         "takeover.refused": 0}
        self._next: Optional[float] = 0.0
        #: per peer, the local addresses and the generation of the copy at the last trigger:
        #: the same again (calls spanning an address that has not moved here) does not
        #: trigger a takeover every poll
        self._triggered: Dict[str, Tuple[frozenset, Any]] = {}

    def get_timer(self) -> Optional[float]:
        return self._next

    def handle_timer(self, now: float) -> Optional[Tuple[str, Set[str]]]:
        """Refresh the copies (when Redis answers); the peer to take over now and its
        addresses that are local (keepalived moved them here), if any."""
        if self._next is None or now < self._next:
            return None
        self._next = now + self.poll
        if self.store.up:
            self.refresh()
        for peer in self.peers:
            if self.copies[peer]:
                here = {ip for ip in self.addresses(peer) if self.local(ip)}
                if here:
                    seen = (frozenset(here), self.gens.get(peer))
                    if self._triggered.get(peer) == seen:
                        continue  # nothing new since the last try
                    self._triggered[peer] = seen
                    return peer, here
        return None

    def refresh(self, force: bool = False) -> None:
        """Re-read the peers whose generation moved (all of them with `force`)."""
        try:
            gens = self.store.generations(self.peers)
            for peer, gen in zip(self.peers, gens):
                if force or gen != self.gens[peer]:
                    self.copies[peer] = self.store.load_node(peer)
                    self.gens[peer] = gen
                    self.counters["standby.refreshes"] += 1
        except REDIS_ERRORS as exc:
            # the store logs it once and retries on its timer; the copies stay as they are
            self.store.mark_down(exc)
            return
        self.counters["standby.peer_sessions"] = sum(len(c) for c in self.copies.values())

    def addresses(self, peer: str) -> Set[str]:
        out: Set[str] = set()
        for record in self.copies.get(peer, {}).values():
            out |= record_addresses(record)
        return out

    def records(self, peer: str) -> Dict[int, Any]:
        """The freshest records of `peer`: from Redis when it answers, else the copy."""
        if self.store.up:
            try:
                self.copies[peer] = self.store.load_node(peer)
            except REDIS_ERRORS as exc:
                self.store.mark_down(exc)
                log.warning("takeover of %s: Redis did not answer; using the warm copy", peer)
        return self.copies.get(peer, {})

    def forget(self, peer: str, sids: List[int]) -> None:
        """Drop records from the copy: taken over, or tried and refused (so the automatic
        trigger does not retry them every poll; `ctl takeover` re-reads Redis)."""
        copy = self.copies.get(peer, {})
        for sid in sids:
            copy.pop(sid, None)


def take(peer: str, records: Dict[int, Any], now: float, wall: float,
         adopt: Callable[[Session, Any], bool], only: Optional[Set[str]] = None) -> Taken:
    """Rebuild every record of `peer` and hand it (and its record) to `adopt` (the relay:
    engine, data plane); what cannot be read or adopted is named in `refused`. `only`:
    just the records whose every address is one of these (the rest stay for a later
    takeover, when their addresses arrive too)."""
    taken = Taken(peer)
    for sid, record in sorted(records.items()):
        if only is not None and record is not None and not record_addresses(record) <= only:
            continue
        try:
            session = from_record(record, now, wall)
        except RecordError as exc:
            log.error("takeover of %s: record %d unreadable (%s)", peer, sid, exc)
            taken.refused[sid] = "unreadable"
            continue
        if adopt(session, record):
            taken.adopted.append(session)
            taken.moved[sid] = session.sid
        else:
            taken.refused[sid] = "not_adopted"
    return taken


__all__ = ["Standby", "Taken", "is_local", "record_addresses", "session_media", "take"]
