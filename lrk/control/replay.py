"""Retransmission cache: a repeated cookie from the same sender gets the same reply bytes.

Bounded in bytes, not entries: a cache of N entries is only as small as its largest
replies, and an attacker picks those. Each entry is charged its reply, its cookie and a
fixed overhead; the oldest go first. A reply larger than one datagram is never kept (it
could not be sent anyway), and an entry answers at most `max_resends` retransmissions, so
one captured request cannot make the relay send its reply to a spoofed address forever.
`answer` also tells a retransmission (the same bytes) from another request that reuses
a cookie: an unverified sender must not get a large cached reply for a tiny datagram.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, Dict, Hashable, Optional, Tuple

REPLAY_WINDOW = 30.0
#: msgpack replies kept at most (bytes, overhead included): about 40,000 small replies,
#: 4 s of a relay's full control load, far more than a client's retries span
MAX_BYTES = 32 << 20
#: what an entry costs beyond its reply and cookie (key and sender tuples, the entry, the
#: OrderedDict node), as measured under CPython 3.11; PyPy needs less
ENTRY_OVERHEAD = 640
#: the largest reply kept: a UDP datagram's payload (IPv4)
MAX_ENTRY = 65507
#: retransmissions one entry answers (clients send 5 tries by default)
MAX_RESENDS = 16
#: requests being executed at once (waiting for the data plane's counters)
MAX_IN_FLIGHT = 4096

#: what `lookup` returns for an entry whose retransmissions are used up: drop, do not run
EXHAUSTED = b""
#: `answer` verdicts
MISS, HIT, SPENT, MISMATCH = "miss", "hit", "exhausted", "mismatch"


def _cost(cookie: Any, reply: bytes) -> int:
    size = len(cookie) if isinstance(cookie, (bytes, str)) else 16
    return len(reply) + size + ENTRY_OVERHEAD


class ReplayCache:
    """Remembers replies by (sender, cookie) for `window` seconds, at most `max_bytes` of
    them (each entry charged reply + cookie + ENTRY_OVERHEAD)."""

    def __init__(self, window: float = REPLAY_WINDOW, max_bytes: int = MAX_BYTES,
                 max_entry: int = MAX_ENTRY, max_resends: int = MAX_RESENDS,
                 max_in_flight: int = MAX_IN_FLIGHT) -> None:
        self.window = window
        self.max_bytes = max_bytes
        self.max_entry = max_entry
        self.max_resends = max_resends
        self.max_in_flight = max_in_flight
        self.bytes = 0
        # key -> (expiry, reply, resends left, cost, hash of the request or None): a tuple
        # of atoms, which the cyclic GC stops tracking (tens of thousands of entries
        # live; as lists every collection of the oldest generation walked them all)
        self._entries: OrderedDict[Tuple[Hashable, Hashable], tuple] = OrderedDict()
        #: (sender, cookie) -> hash of the request or None, while it runs
        self._in_flight: Dict[Tuple[Hashable, Hashable], Optional[int]] = {}
        #: no entry expires before this (a lower bound: entries are kept in expiry order),
        #: so a request walks `_purge` only when something may be due
        self._purge_at = float("inf")

    def __len__(self) -> int:
        return len(self._entries)

    def lookup(self, sender: Hashable, cookie: Hashable, now: float) -> Optional[bytes]:
        """The reply to resend; None when unknown; EXHAUSTED (empty) once the entry has
        answered `max_resends` retransmissions (the request must not run again either)."""
        if now >= self._purge_at:
            self._purge(now)
        key = (sender, cookie)
        entry = self._entries.get(key)
        if entry is None:
            return None
        if entry[2] <= 0:
            return EXHAUSTED
        self._entries[key] = (entry[0], entry[1], entry[2] - 1, entry[3], entry[4])
        return entry[1]

    def answer(self, sender: Hashable, cookie: Hashable, now: float,
               request: Optional[bytes] = None) -> Tuple[str, Optional[bytes]]:
        """(verdict, reply) for a request that may be a retransmission: MISS (run it), HIT
        (send the reply), SPENT (its resends are used up: drop it), MISMATCH (`request`
        differs from the one the entry answered: another request reusing the cookie, drop
        it). Without `request`, only the cookie is compared."""
        if now >= self._purge_at:
            self._purge(now)
        key = (sender, cookie)
        entry = self._entries.get(key)
        if entry is None:
            return MISS, None
        if request is not None and entry[4] is not None and entry[4] != hash(request):
            return MISMATCH, None
        if entry[2] <= 0:
            return SPENT, None
        self._entries[key] = (entry[0], entry[1], entry[2] - 1, entry[3], entry[4])
        return HIT, entry[1]

    def in_flight(self, sender: Hashable, cookie: Hashable) -> bool:
        return (sender, cookie) in self._in_flight

    def begin(self, sender: Hashable, cookie: Hashable, request: Optional[bytes] = None
              ) -> bool:
        """Mark a request as being executed (its reply is not ready yet); `request` is
        remembered for `store`. False when `max_in_flight` requests are executing already:
        the caller drops this one."""
        if len(self._in_flight) >= self.max_in_flight:
            return False
        self._in_flight[(sender, cookie)] = None if request is None else hash(request)
        return True

    def store(self, sender: Hashable, cookie: Hashable, reply: bytes, now: float,
              request: Optional[bytes] = None) -> bool:
        """Keep `reply` for retransmissions (of `request`, when given: see `answer`); False
        (nothing kept) when it is larger than one datagram."""
        key = (sender, cookie)
        began = self._in_flight.pop(key, None)
        fingerprint = began if request is None else hash(request)
        old = self._entries.pop(key, None)
        if old is not None:
            self.bytes -= old[3]
            if fingerprint is None:  # a reply replaced (e.g. by a data-plane failure):
                fingerprint = old[4]  # it still answers only the request's own bytes
        if len(reply) > self.max_entry:
            return False
        # _cost(), inline (every request stores its reply)
        cost = len(reply) + (len(cookie) if isinstance(cookie, (bytes, str)) else 16) \
            + ENTRY_OVERHEAD
        expiry = now + self.window
        entries = self._entries
        entries[key] = (expiry, reply, self.max_resends, cost, fingerprint)
        if expiry < self._purge_at:
            self._purge_at = expiry
        self.bytes += cost
        while self.bytes > self.max_bytes and entries:
            _key, evicted = entries.popitem(last=False)
            self.bytes -= evicted[3]
        return key in entries

    def discard(self, sender: Hashable, cookie: Hashable) -> None:
        """Forget a request: its retransmission runs it again (a legacy request whose data
        plane failed gets no reply, so the module's retry is a fresh attempt)."""
        self._in_flight.pop((sender, cookie), None)
        entry = self._entries.pop((sender, cookie), None)
        if entry is not None:
            self.bytes -= entry[3]

    def _purge(self, now: float) -> None:
        entries = self._entries
        while entries:
            key = next(iter(entries))
            entry = entries[key]
            if entry[0] > now:
                self._purge_at = entry[0]
                return
            del entries[key]
            self.bytes -= entry[3]
        self._purge_at = float("inf")
