"""Root-only topologies: caller, relay and callee in namespaces this test run creates."""

from __future__ import annotations

import itertools
import os
from typing import Iterator

import pytest

from bench.netns import Topology, list_namespaces, sweep

_ids = itertools.count()


@pytest.fixture(autouse=True)
def _control_keys(control_keys_env: str) -> str:
    """Relays started here and the clients talking to them share a temporary key directory
    ($LRK_KEYS; see the root conftest.py), never the real home or /etc."""
    return control_keys_env


def pytest_configure(config) -> None:
    if os.geteuid() == 0:
        sweep()  # leftovers of crashed earlier runs


@pytest.fixture(autouse=True)
def _root() -> None:
    """Every test here is root-only: without root it fails (it is never skipped, so a run
    that could not exercise the privileged paths can never pass as if it had)."""
    if os.geteuid() != 0:
        pytest.fail("tests/netns needs root (CI runs as root): network namespaces, nftables, "
                    "conntrack and AF_PACKET")


@pytest.fixture
def topo() -> Iterator[Topology]:
    t = Topology(f"n{next(_ids)}").create()
    try:
        yield t
    finally:
        t.destroy()
        assert not set(t.namespaces) & set(list_namespaces()), "a namespace leaked"
