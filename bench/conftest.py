"""Fixtures of the relay benchmarks: which interpreters can run the relay."""

from __future__ import annotations

from typing import Dict

import pytest

from bench.interpreters import find_interpreters


@pytest.fixture(autouse=True)
def _control_keys(control_keys_env: str) -> str:
    """Relays started here and the clients talking to them share a temporary key directory
    ($LRK_KEYS; see the root conftest.py), never the real home or /etc."""
    return control_keys_env


@pytest.fixture(scope="session")
def relay_interpreters() -> Dict[str, dict]:
    """{"cpython": {...}, "pypy": {...}}: one usable interpreter per implementation."""
    return find_interpreters()


@pytest.fixture
def relay_python(relay_interpreters, request) -> dict:
    """The interpreter named by the test's `label` parameter; skips when it is missing."""
    label = request.getfixturevalue("label")
    info = relay_interpreters.get(label)
    if info is None:
        pytest.fail(f"no {label} interpreter that can import lrk and msgpack "
                    f"(found: {sorted(relay_interpreters) or 'none'}); scripts/install.sh "
                    "makes both")
    return info


@pytest.fixture(scope="session")
def interpreters(relay_interpreters) -> Dict[str, str]:
    """{"cpython": path, "pypy": path} of the interpreters found; skips when there is none."""
    if not relay_interpreters:
        pytest.fail("no interpreter that can import lrk and msgpack")
    return {label: info["python"] for label, info in relay_interpreters.items()}
