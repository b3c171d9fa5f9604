"""Who may talk to a control socket: an IP allow-list with a per-address verdict cache."""

from __future__ import annotations

from typing import Dict, Hashable, Optional

from netaddr import IPAddress, IPSet

CACHE_MAX = 4096


class AllowList:
    """`allows(sender)`; UNIX-socket senders (paths, not tuples) are trusted: the file mode
    guards them. IPSet membership costs tens of microseconds, so verdicts are cached."""

    def __init__(self, networks: Optional[IPSet]) -> None:
        self.networks = networks
        self._cache: Dict[str, bool] = {}

    def allows(self, sender: Hashable) -> bool:
        if self.networks is None or not isinstance(sender, tuple):
            return True
        verdict = self._cache.get(sender[0])
        if verdict is None:
            try:
                verdict = IPAddress(sender[0]) in self.networks
            except Exception:
                verdict = False
            if len(self._cache) >= CACHE_MAX:
                self._cache.clear()
            self._cache[sender[0]] = verdict
        return verdict
