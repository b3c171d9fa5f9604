"""Wire format of the control protocol (docs/protocol.md): cookies, request and reply codec."""

from __future__ import annotations

import itertools
import os
import threading
from typing import Any, Dict, Mapping, Optional

import msgpack

from lrk.client.errors import InvalidArgument

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


def encode_request(message: Mapping[str, Any], cookie: str,
                   token: Optional[str] = None) -> bytes:
    """One request datagram: `v`, `cookie`, optional `token`, then the command fields."""
    body: Dict[str, Any] = {"v": VERSION, "cookie": cookie}
    if token is not None:
        body["token"] = token
    body.update(message)
    data = msgpack.packb(body, use_bin_type=True)
    if len(data) > MAX_REQUEST_BYTES:
        raise InvalidArgument(
            f"{message.get('cmd')} request is {len(data)} bytes; the relay accepts at most "
            f"{MAX_REQUEST_BYTES} (is the SDP body that large?)")
    return data


def decode_reply(data: bytes) -> Optional[Dict[str, Any]]:
    """The reply map, or None for a datagram that is not one (ignored, like a stray packet)."""
    try:
        reply = msgpack.unpackb(data, raw=False, strict_map_key=False)
    except Exception:  # any malformed input: msgpack raises several unrelated types
        return None
    if not isinstance(reply, dict):
        return None
    return reply
