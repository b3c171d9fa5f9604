"""RTP/RTCP port-pair allocator over a configured range.

Pure bookkeeping: callers pass `now`, and may pass a `usable` probe (the socket
shell binds there) so a port held by a foreign process is skipped, not handed out.
Freed pairs sit in quarantine before reuse, so late packets of an ended call never
reach a new one.
"""

from __future__ import annotations

import heapq
from collections import Counter, deque
from typing import Callable, Deque, Dict, List, Optional, Set, Tuple

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
            if usable is not None and not usable(port):
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
        if not self.contains(base):
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
