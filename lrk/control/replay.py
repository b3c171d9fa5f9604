"""Retransmission cache: a repeated cookie from the same sender gets the same reply bytes."""

from __future__ import annotations

from collections import OrderedDict
from typing import Hashable, Optional, Set, Tuple

REPLAY_WINDOW = 30.0


class ReplayCache:
    """Remembers replies by (sender, cookie) for `window` seconds, at most `size` of them."""

    def __init__(self, window: float = REPLAY_WINDOW, size: int = 65536) -> None:
        self.window = window
        self.size = size
        self._entries: OrderedDict[Tuple[Hashable, Hashable], Tuple[float, bytes]] = (
            OrderedDict()
        )
        self._in_flight: Set[Tuple[Hashable, Hashable]] = set()

    def __len__(self) -> int:
        return len(self._entries)

    def lookup(self, sender: Hashable, cookie: Hashable, now: float) -> Optional[bytes]:
        self._purge(now)
        entry = self._entries.get((sender, cookie))
        return None if entry is None else entry[1]

    def in_flight(self, sender: Hashable, cookie: Hashable) -> bool:
        return (sender, cookie) in self._in_flight

    def begin(self, sender: Hashable, cookie: Hashable) -> None:
        """Mark a request as being executed (its reply is not ready yet)."""
        self._in_flight.add((sender, cookie))

    def store(self, sender: Hashable, cookie: Hashable, reply: bytes, now: float) -> None:
        key = (sender, cookie)
        self._in_flight.discard(key)
        self._entries[key] = (now + self.window, reply)
        self._entries.move_to_end(key)
        while len(self._entries) > self.size:
            self._entries.popitem(last=False)

    def discard(self, sender: Hashable, cookie: Hashable) -> None:
        """Forget a request: its retransmission runs it again (a legacy request whose data
        plane failed gets no reply, so the module's retry is a fresh attempt)."""
        self._in_flight.discard((sender, cookie))
        self._entries.pop((sender, cookie), None)

    def _purge(self, now: float) -> None:
        entries = self._entries
        while entries:
            key = next(iter(entries))
            if entries[key][0] > now:
                break
            del entries[key]
