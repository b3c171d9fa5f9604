"""Signing for tests that speak msgpack to a relay by hand (raw bytes, not lrk.client).

Two kinds of keys:

- `TEST_KEY` / `ADMIN_KEY` / `OTHER_KEY`: fixed keys for sans-IO tests of MsgpackControl
  (`authenticator()` builds the relay side, `signed()` the client side, on a fixed clock
  `WALL` that `wall_clock` returns);
- `env_key()`: the client key of the key directory the test session's relays use
  (`$LRK_KEYS`, set by the `control_keys_env` fixture of the root conftest).
"""

from __future__ import annotations

import itertools
from typing import Any, Dict, Optional

import msgpack

from lrk.control.auth import Authenticator, Key, find_key, sign

#: the fixed Unix time of sans-IO tests
WALL = 1_800_000_000.0
TEST_KEY = Key("client", bytes(range(32)), owner="proxy-a")
OTHER_KEY = Key("other", bytes(range(32, 64)), owner="proxy-b")
ADMIN_KEY = Key("admin", bytes(range(64, 96)), admin=True)
_ticks = itertools.count()


def wall_clock() -> float:
    return WALL


def authenticator(window: float = 30.0) -> Authenticator:
    """The relay side of the fixed keys."""
    return Authenticator([TEST_KEY, OTHER_KEY, ADMIN_KEY], window)


def signed(data: bytes, key: Key = TEST_KEY, wall: Optional[float] = None) -> bytes:
    """`data` signed. Without `wall`, each call gets a timestamp 1 ms after the previous
    one (within 20 s of WALL), so that two sends of one message are two requests, as two
    real ones are; resending the returned bytes is a retransmission."""
    if wall is None:
        wall = WALL + (next(_ticks) % 20000) / 1000.0
    return sign(data, key, wall)


def packb_signed(message: Dict[str, Any], key: Optional[Key] = None,
                 wall: Optional[float] = None) -> bytes:
    """A request map packed as lrk.client packs it, then signed (default: the session's
    client key from $LRK_KEYS, at the current time)."""
    data = msgpack.packb(message, use_bin_type=True)
    if key is None:
        return sign_env(data)
    return signed(data, key, wall)


def env_key(admin: bool = False) -> Key:
    """The key of $LRK_KEYS a client (or, `admin`, lrkproxy ctl) would use."""
    key = find_key(admin=admin, required=True)
    assert key is not None
    return key


def sign_env(data: bytes, admin: bool = False) -> bytes:
    """`data` signed now with the session's client (or admin) key."""
    import time

    return sign(data, env_key(admin), time.time())
