"""Root-only topologies: caller, relay and callee in namespaces this test run creates."""

from __future__ import annotations

import itertools
import os
from typing import Iterator

import pytest

from bench.netns import Topology, list_namespaces, sweep

_ids = itertools.count()


def pytest_configure(config) -> None:
    if os.geteuid() == 0:
        sweep()  # leftovers of crashed earlier runs


@pytest.fixture
def topo() -> Iterator[Topology]:
    if os.geteuid() != 0:
        pytest.fail("network-namespace tests need root (CI runs as root)")
    t = Topology(f"n{next(_ids)}").create()
    try:
        yield t
    finally:
        t.destroy()
        assert not set(t.namespaces) & set(list_namespaces()), "a namespace leaked"
