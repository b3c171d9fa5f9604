"""The (Call-ID, Via branch) -> node table, so answer/delete reach the node that got the offer.

Like lrkproxy's hash table: entries expire `timeout` seconds after they were
last stored, and the table holds at most `max_size` entries (the oldest, which
are also the first to expire, are evicted first). A Call-ID-only index is kept
as fallback because ACK and BYE carry a new Via branch. Time is injected.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from typing import Callable, Dict, Optional, Tuple

from lrk.client.errors import InvalidArgument
from lrk.client.nodes import Node

_Key = Tuple[str, str]
#: how long a removed call is remembered as ended (`ended`): SIP's transaction timeout
#: (64 x T1) covers a CANCEL's 487 and retransmitted BYEs
ENDED_FOR = 32.0


class CallTable:
    """Bounded, expiring map of calls to the relay node that holds their session."""

    def __init__(self, timeout: float = 3600.0, max_size: int = 100000,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if not timeout > 0:
            raise InvalidArgument(f"call table timeout must be > 0 seconds, not {timeout!r}")
        if isinstance(max_size, bool) or not isinstance(max_size, int) or max_size < 1:
            raise InvalidArgument(f"call table size must be an integer >= 1, not {max_size!r}")
        self.timeout = float(timeout)
        self.max_size = max_size
        self._clock = clock
        # insertion order == expiry order, since every entry lives `timeout` from its store
        self._entries: OrderedDict[_Key, Tuple[Node, float]] = OrderedDict()
        self._by_call: Dict[str, Dict[str, None]] = {}  # call_id -> branches, oldest first
        #: calls removed lately -> when that is forgotten (bounded as the table)
        self._ended: OrderedDict[str, float] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def _now(self, now: Optional[float]) -> float:
        return self._clock() if now is None else now

    def store(self, call_id: str, branch: Optional[str], node: Node,
              now: Optional[float] = None) -> None:
        """Remember (or refresh) that this call and branch live on `node`."""
        now = self._now(now)
        key = (call_id, branch or "")
        if key in self._entries:
            self._unlink(key)
        self.expire(now)
        while len(self._entries) >= self.max_size:
            self._unlink(next(iter(self._entries)))
        self._entries[key] = (node, now + self.timeout)
        self._by_call.setdefault(call_id, {})[key[1]] = None

    def lookup(self, call_id: str, branch: Optional[str] = None,
               now: Optional[float] = None) -> Optional[Node]:
        """The node for (call_id, branch), else the newest live entry of call_id, else None."""
        now = self._now(now)
        entry = self._entries.get((call_id, branch or ""))
        if entry is not None and entry[1] > now:
            return entry[0]
        branches = self._by_call.get(call_id)
        if not branches:
            return None
        for other in reversed(list(branches)):
            node, expires = self._entries[(call_id, other)]
            if expires > now:
                return node
        return None

    def ended(self, call_id: str, now: Optional[float] = None) -> bool:
        """Whether the call was removed within ENDED_FOR seconds (a delete or not_found):
        a later delete of it (the 487 after a CANCEL, a retransmitted BYE) need not look
        for it on every node."""
        until = self._ended.get(call_id)
        return until is not None and until > self._now(now)

    def remove(self, call_id: str, now: Optional[float] = None) -> int:
        """Forget every entry of the call (and remember it ended); returns how many
        entries were dropped."""
        now = self._now(now)
        ended = self._ended
        ended.pop(call_id, None)
        while ended and (len(ended) >= self.max_size or next(iter(ended.values())) <= now):
            ended.popitem(last=False)
        ended[call_id] = now + ENDED_FOR
        branches = self._by_call.pop(call_id, None)
        if not branches:
            return 0
        for branch in branches:
            del self._entries[(call_id, branch)]
        return len(branches)

    def expire(self, now: Optional[float] = None) -> int:
        """Drop the expired entries (oldest first); returns how many."""
        now = self._now(now)
        dropped = 0
        while self._entries:
            key, (_node, expires) = next(iter(self._entries.items()))
            if expires > now:
                break
            self._unlink(key)
            dropped += 1
        return dropped

    def _unlink(self, key: _Key) -> None:
        del self._entries[key]
        branches = self._by_call[key[0]]
        del branches[key[1]]
        if not branches:
            del self._by_call[key[0]]
