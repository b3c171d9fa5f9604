"""Per-source request rate limit for the control listeners, sans-IO.

A token bucket per source address (the IP, not the port: one host is one source),
refilled at `rate` requests per second up to one second's worth (`burst`). Memory is
bounded: at most `max_sources` buckets, the least recently seen evicted first (an
evicted source starts again with a full bucket, which only ever errs towards serving).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, Hashable, Optional, Tuple

MAX_SOURCES = 4096


def source_of(sender: Any) -> Hashable:
    """The address a limit applies to: the IP of (ip, port, ...) senders; UNIX and stream
    clients share one key."""
    if isinstance(sender, tuple) and sender:
        return sender[0]
    return "local"


class RateLimiter:
    """`allow(sender, now)`: whether this request is within its source's rate."""

    def __init__(self, rate: float, burst: Optional[float] = None,
                 max_sources: int = MAX_SOURCES) -> None:
        self.rate = float(rate)
        self.burst = float(burst if burst is not None else max(rate, 1.0))
        self.max_sources = max_sources
        self._buckets: OrderedDict[Hashable, Tuple[float, float]] = OrderedDict()

    @property
    def enabled(self) -> bool:
        return self.rate > 0

    def __len__(self) -> int:
        return len(self._buckets)

    def allow(self, sender: Any, now: float) -> bool:
        if self.rate <= 0:
            return True
        key = source_of(sender)
        buckets = self._buckets
        entry = buckets.get(key)
        if entry is None:
            tokens = self.burst
            if len(buckets) >= self.max_sources:
                buckets.popitem(last=False)
        else:
            tokens, then = entry
            tokens = min(self.burst, tokens + (now - then) * self.rate)
            buckets.move_to_end(key)
        if tokens < 1.0:
            buckets[key] = (tokens, now)
            return False
        buckets[key] = (tokens - 1.0, now)
        return True

    def reconfigure(self, rate: float) -> None:
        """A new rate (reload): buckets keep their state, capped to the new burst."""
        self.rate = float(rate)
        self.burst = max(self.rate, 1.0)
