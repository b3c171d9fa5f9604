"""Wire format of the control protocol (docs/protocol.md): cookies, request and reply codec,
and the key requests are signed with (docs/security.md)."""

from __future__ import annotations

import itertools
import logging
import os
import threading
import time
from typing import Any, Dict, Mapping, Optional, Union

import msgpack

from lrk.client.errors import InvalidArgument
from lrk.control.auth import Key, KeyFileError, default_key_dir, find_key, sign

log = logging.getLogger("lrk.client")
#: what a client may be given as its key: a Key, a key file or directory, "none" (send
#: unsigned, for a relay with control_auth = "none"), or None (the default key, if any)
KeyLike = Union[Key, str, "os.PathLike[str]", None]
NO_KEY = "none"
TOKEN_GONE = ("token= is gone: the relay authenticates requests by their HMAC signature; "
              "pass key= (a key file or directory; default: client.key in "
              "lrk.control.auth.default_key_dir()), see docs/security.md")

VERSION = 1
MAX_REQUEST_BYTES = 65000
MAX_REPLY_BYTES = 65535


class CookieFactory:
    """Random, never-repeating cookies: a random prefix per request plus a counter.

    The counter makes cookies unique within a client even if the random part
    collided; the random part makes them unique across clients and restarts
    (the relay caches replies per cookie and sender for 30 s).
    """

    def __init__(self) -> None:
        self._counter = itertools.count(1)
        self._lock = threading.Lock()

    def __call__(self) -> str:
        with self._lock:
            n = next(self._counter)
        return f"{os.urandom(6).hex()}{n:x}"


def encode_request(message: Mapping[str, Any], cookie: str, token: Optional[str] = None, *,
                   key: Optional[Key] = None, wall: Optional[float] = None) -> bytes:
    """One request datagram: `v`, `cookie`, then the command fields; signed with `key`
    (a 60-byte trailer, docs/protocol.md) at Unix time `wall` (default: now)."""
    if token is not None:
        raise InvalidArgument(TOKEN_GONE)
    body: Dict[str, Any] = {"v": VERSION, "cookie": cookie}
    body.update(message)
    data = msgpack.packb(body, use_bin_type=True)
    if len(data) > MAX_REQUEST_BYTES:
        raise InvalidArgument(
            f"{message.get('cmd')} request is {len(data)} bytes; the relay accepts at most "
            f"{MAX_REQUEST_BYTES} (is the SDP body that large?)")
    if key is not None:
        data = sign(data, key, time.time() if wall is None else wall)
    return data


def resolve_key(key: KeyLike = None, admin: bool = False) -> Optional[Key]:
    """The key to sign with: a Key as given; a key file, or a directory (its client.key,
    or admin.key for `admin` tools); "none": unsigned; None: the same lookup in
    `default_key_dir()`, unsigned (with a warning) when it holds no key."""
    if isinstance(key, Key):
        return key
    if key is not None and not isinstance(key, (str, os.PathLike)):
        raise InvalidArgument(f"key must be a key file or directory path, a Key or "
                              f"\"none\", not {type(key).__name__}")
    if key is not None and os.fspath(key) == NO_KEY:
        return None
    try:
        found = find_key(None if key is None else os.fspath(key), admin=admin)
    except KeyFileError as exc:
        raise InvalidArgument(str(exc)) from None
    if found is None:
        log.warning("no lrk control key in %s: requests go unsigned, and a relay with "
                    "control_auth = \"hmac\" (the default) drops them; pass key= or set "
                    "LRK_KEYS (docs/security.md)", default_key_dir())
    return found


def decode_reply(data: bytes) -> Optional[Dict[str, Any]]:
    """The reply map, or None for a datagram that is not one (ignored, like a stray packet)."""
    try:
        reply = msgpack.unpackb(data, raw=False, strict_map_key=False)
    except Exception:  # any malformed input: msgpack raises several unrelated types
        return None
    if not isinstance(reply, dict):
        return None
    return reply
