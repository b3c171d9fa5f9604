"""RTP/RTCP port-pair allocator over a configured range.

Pure bookkeeping: callers pass `now`, and may pass a `usable` probe (the socket
shell binds there) so a port held by a foreign process is skipped, not handed out.
Freed pairs sit in quarantine before reuse, so late packets of an ended call never
reach a new one.
"""

from __future__ import annotations

import heapq
from collections import Counter, deque
from typing import Callable, Deque, Dict, List, Optional, Sequence, Set, Tuple

from lrk.errors import ConfigError, PortsExhausted

#: how long a port that failed its probe (held outside lrk) is kept out of rotation
UNUSABLE_HOLD = 60.0


class PortAllocator:
    """Hands out even RTP ports (RTCP = port + 1) from [start, end], least recently used first."""

    def __init__(self, start: int, end: int, quarantine: float = 5.0) -> None:
        if start < 1024 or end > 65535 or start > end:
            raise ConfigError(
                f"port range {start}-{end} is unusable: it must lie within 1024-65535 "
                "with start <= end"
            )
        first = start + (start & 1)
        if first + 1 > end:
            raise ConfigError(f"port range {start}-{end} holds no even RTP port with RTCP port + 1")
        self.start = start
        self.end = end
        self.quarantine = quarantine
        self._free: Deque[int] = deque(range(first, end, 2))
        self._free_set: Set[int] = set(self._free)
        self._in_use: Set[int] = set()
        self._queued: Counter = Counter(self._free)  # deque entries per port (lazy deletion)
        self._held: List[Tuple[float, int]] = []  # heap of (release time, port)
        self._held_set: Dict[int, float] = {}
        self.total = len(self._free)

    # -- queries ---------------------------------------------------------------------
    @property
    def in_use(self) -> int:
        return len(self._in_use)

    @property
    def quarantined(self) -> int:
        return len(self._held_set)

    @property
    def free(self) -> int:
        return len(self._free_set)

    def is_in_use(self, port: int) -> bool:
        return (port & ~1) in self._in_use

    def contains(self, port: int) -> bool:
        base = port & ~1
        return self.start <= base and base + 1 <= self.end

    def snapshot(self) -> Dict[str, int]:
        return {
            "total": self.total,
            "in_use": self.in_use,
            "quarantined": self.quarantined,
            "free": self.free,
        }

    # -- changes ---------------------------------------------------------------------
    def allocate(self, now: float, usable: Optional[Callable[[int], bool]] = None) -> int:
        """Return a free even port; `usable(port)` may veto it (it is then held a while)."""
        self._expire(now)
        while self._free:
            port = self._free.popleft()
            self._queued[port] -= 1
            if port not in self._free_set or self._queued[port] > 0:
                continue  # stale entry: claimed out of order, or queued again further back
            self._free_set.discard(port)
            if usable is not None:
                try:
                    ok = usable(port)
                except BaseException:  # the probe could not judge it: it stays free, first
                    self._free.appendleft(port)
                    self._queued[port] += 1
                    self._free_set.add(port)
                    raise
                if not ok:
                    self._hold(port, now + UNUSABLE_HOLD)
                    continue
            self._in_use.add(port)
            return port
        raise PortsExhausted(
            f"no free RTP/RTCP port pair in {self.start}-{self.end}: "
            f"{self.in_use} in use, {self.quarantined} in quarantine; "
            "widen --ports or lower the session timeout"
        )

    def claim(self, port: int, now: float) -> bool:
        """Take a specific pair (legacy clients pick ports themselves); False if taken."""
        base = port & ~1
        if base in self._in_use:
            return False
        self._expire(now)
        if base in self._held_set:
            del self._held_set[base]  # quarantine is lazily purged from the deque
        self._free_set.discard(base)
        self._in_use.add(base)
        return True

    def release(self, port: int, now: float, quarantine: bool = True) -> None:
        """Free a pair; `quarantine=False` for a pair that never carried media."""
        base = port & ~1
        if base not in self._in_use:
            return
        self._in_use.discard(base)
        if not self.start <= base < self.end:  # contains(), inline: every call end runs it
            return
        if quarantine and self.quarantine > 0:
            self._hold(base, now + self.quarantine)
        else:
            self._enqueue(base)

    def next_free_after(self, port: int, step: int, now: float) -> List[int]:
        """Ports a client stepping by `step` from `port` would get that are not in use."""
        self._expire(now)
        return [p for p in range(port, self.end + 1, step) if not self.is_in_use(p)]

    def _hold(self, port: int, until: float) -> None:
        heapq.heappush(self._held, (until, port))
        self._held_set[port] = until

    def _enqueue(self, port: int) -> None:
        self._free.append(port)
        self._queued[port] += 1
        self._free_set.add(port)

    def _expire(self, now: float) -> None:
        held = self._held
        while held and held[0][0] <= now:
            until, port = heapq.heappop(held)
            if self._held_set.get(port) != until:
                continue  # claimed or re-held since
            del self._held_set[port]
            if port not in self._in_use:
                self._enqueue(port)


class AddressPorts:
    """One PortAllocator per relay address, the same range on each: a relay with several
    addresses per side holds that many times the pairs of one 16-bit range.

    `shared=True` keeps one allocator for every address (a port number is then unique on
    the whole relay): what a relay with one address per side does, in every mode (its
    ct marks in the kernel modes are then port numbers; with several addresses each has
    a mark slot of its own, `fastpath.kernel.kernel_rules.KernelRuleset.mark_slots`).
    Ports claimed on an address that is not configured (a peer's calls taken over) are
    tracked apart and never handed out."""

    def __init__(self, addresses: Sequence[str], start: int, end: int,
                 quarantine: float = 5.0, shared: bool = False) -> None:
        if not addresses:
            raise ConfigError("no relay address: give at least one internal_ip")
        self.addresses: Tuple[str, ...] = tuple(dict.fromkeys(addresses))
        self.shared = shared
        if shared:
            one = PortAllocator(start, end, quarantine)
            self._by_ip: Dict[str, PortAllocator] = {ip: one for ip in self.addresses}
            self._pools: List[PortAllocator] = [one]
        else:
            self._by_ip = {ip: PortAllocator(start, end, quarantine) for ip in self.addresses}
            self._pools = list(self._by_ip.values())
        self._shared_pool = self._pools[0] if shared else None
        self._foreign: Set[Tuple[str, int]] = set()  # (ip, even port) on no configured address
        self.start = start
        self.end = end

    # -- configuration ---------------------------------------------------------------
    @property
    def quarantine(self) -> float:
        return self._pools[0].quarantine

    @quarantine.setter
    def quarantine(self, value: float) -> None:
        for pool in self._pools:
            pool.quarantine = value

    def _pool(self, ip: str) -> Optional[PortAllocator]:
        pool = self._by_ip.get(ip)
        return pool if pool is not None else self._shared_pool

    # -- queries ---------------------------------------------------------------------
    @property
    def total(self) -> int:
        return sum(p.total for p in self._pools)

    @property
    def in_use(self) -> int:
        return sum(p.in_use for p in self._pools) + len(self._foreign)

    @property
    def free(self) -> int:
        return sum(p.free for p in self._pools)

    @property
    def quarantined(self) -> int:
        return sum(p.quarantined for p in self._pools)

    def contains(self, port: int) -> bool:
        """Whether `port` lies in the range (the same on every address)."""
        return self._pools[0].contains(port)

    def is_in_use(self, ip: str, port: int) -> bool:
        pool = self._pool(ip)
        if pool is None:
            return (ip, port & ~1) in self._foreign
        return pool.is_in_use(port)

    def pick(self, candidates: Sequence[str]) -> str:
        """The address of `candidates` with the most free pairs (the first on a tie).

        Most-free rather than round-robin: it also evens out what legacy claims, restores
        and releases did, and it is as cheap (a handful of addresses, O(1) counts)."""
        if len(candidates) == 1 or self.shared:
            return candidates[0]
        best, most = candidates[0], -1
        for ip in candidates:
            pool = self._by_ip.get(ip)
            free = pool.free if pool is not None else -1
            if free > most:
                best, most = ip, free
        return best

    def snapshot(self) -> Dict[str, int]:
        """Totals over every address (RTP/RTCP pairs), as PortAllocator.snapshot()."""
        return {"total": self.total, "in_use": self.in_use,
                "quarantined": self.quarantined, "free": self.free}

    def by_address(self) -> Dict[str, Dict[str, int]]:
        """Each configured address's own counts (with `shared`, every address shows the
        one shared pool)."""
        return {ip: self._by_ip[ip].snapshot() for ip in self.addresses}

    # -- changes ---------------------------------------------------------------------
    def allocate(self, now: float, ip: str,
                 usable: Optional[Callable[[int], bool]] = None) -> int:
        """A free even port on `ip` (a configured address)."""
        pool = self._by_ip.get(ip)
        if pool is None:
            raise PortsExhausted(f"relay address {ip} is not configured "
                                 f"({', '.join(self.addresses)}): no ports to allocate there")
        try:
            return pool.allocate(now, usable)
        except PortsExhausted as exc:
            if len(self._pools) > 1:
                raise PortsExhausted(f"{ip}: {exc}; add relay addresses on this side "
                                     "(internal_ips / external_ips) for more") from None
            raise

    def claim(self, ip: str, port: int, now: float) -> bool:
        """Take `port` on `ip` (legacy clients and restores pick ports); False if taken."""
        pool = self._pool(ip)
        if pool is None:
            key = (ip, port & ~1)
            if key in self._foreign:
                return False
            self._foreign.add(key)
            return True
        return pool.claim(port, now)

    def release(self, ip: str, port: int, now: float, quarantine: bool = True) -> None:
        pool = self._pool(ip)
        if pool is None:
            self._foreign.discard((ip, port & ~1))
        else:
            pool.release(port, now, quarantine)
