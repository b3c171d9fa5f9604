"""Throwaway network namespaces for tests that build their own topology (not `topo`'s).

Names are ``lrk-t<pid>-<tag><n>``: the conftest's sweep of crashed earlier runs finds them by
the prefix and the pid. `Namespaces.destroy` deletes what was made and then asserts that none
of it is left (as the `topo` fixture does), so a leak fails the test that made it, whatever
order the tests run in.
"""

from __future__ import annotations

import itertools
import os
from typing import List

from bench.netns import PREFIX, list_namespaces, run

_seq = itertools.count()


class Namespaces:
    """Namespaces made one by one (loopback up), deleted together, leaks asserted."""

    def __init__(self, tag: str) -> None:
        self.tag = tag
        self.made: List[str] = []

    def make(self, suffix: str = "") -> str:
        name = f"{PREFIX}{os.getpid()}-{self.tag}{next(_seq)}{suffix}"
        run("ip", "netns", "add", name)
        self.made.append(name)
        run("ip", "link", "set", "lo", "up", ns=name)
        return name

    def destroy(self) -> None:
        made, self.made = self.made, []
        for name in reversed(made):
            run("ip", "netns", "del", name, check=False)
        leaked = sorted(set(made) & set(list_namespaces()))
        assert not leaked, f"namespaces left behind: {leaked}"
