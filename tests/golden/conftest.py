"""Golden daemon tests: relays and raw requests share the session's temporary control keys."""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def _control_keys(control_keys_env: str) -> str:
    """$LRK_KEYS for the relays started here and for `GoldenRelay.request_raw`'s signature
    (see the root conftest.py)."""
    return control_keys_env
