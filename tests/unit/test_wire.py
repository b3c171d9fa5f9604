"""lrk.control.wire: the PyPy reply packer writes exactly msgpack's bytes."""

from __future__ import annotations

import random
from collections import Counter
from typing import Any, NamedTuple

import msgpack
import pytest

from lrk.control import wire

EDGE_INTS = [0, 1, 127, 128, 255, 256, 65535, 65536, 2**32 - 1, 2**32, 2**64 - 1, -1, -32,
             -33, -128, -129, -32768, -32769, -2**31, -2**31 - 1, -2**63]


def _value(rng: random.Random, depth: int = 0) -> Any:
    kind = rng.randrange(12 if depth < 4 else 8)
    if kind == 0:
        return None
    if kind == 1:
        return rng.random() < 0.5
    if kind == 2:
        return rng.choice(EDGE_INTS + [rng.randrange(-2**63, 2**64)])
    if kind == 3:
        return rng.random() * 1e6 - 5e5
    if kind == 4:
        return "".join(rng.choice("ab\u00e9\u4e2d") for _ in range(
            rng.choice([0, 5, 31, 32, 40, 255, 256, 300])))
    if kind == 5:
        return bytes([rng.randrange(256)]) * rng.choice([0, 3, 255, 256, 70000])
    if kind == 6:
        return "x" * rng.choice([0, 65535, 65536])
    if kind == 7:
        return rng.randrange(-100, 100)
    if kind in (8, 9):
        return [_value(rng, depth + 1) for _ in range(rng.choice([0, 3, 15, 16, 17]))]
    if kind == 10:
        return tuple(_value(rng, depth + 1) for _ in range(rng.randrange(4)))
    return {f"{i}{'k' * rng.randrange(40)}": _value(rng, depth + 1)
            for i in range(rng.choice([0, 2, 15, 16, 20]))}


def test_py_packb_matches_msgpack_on_seeded_values():
    rng = random.Random(20261203)
    for _ in range(600):
        value = _value(rng)
        assert wire.py_packb(value) == msgpack.packb(value, use_bin_type=True), value


class _Pair(NamedTuple):
    ip: str
    port: int


def test_py_packb_subclasses_as_msgpack_does():
    value = {"counters": Counter(a=1, b=2), "peer": _Pair("198.51.100.1", 4000),
             "big": 2**70 - 2**70 + 5, "flag": True, "ba": bytearray(b"\x00\x01"),
             "mv": memoryview(b"xyz")}
    assert wire.py_packb(value) == msgpack.packb(value, use_bin_type=True)


def test_py_packb_leaves_what_it_cannot_pack_to_msgpack():
    for bad in (2**64, -2**63 - 1, object(), {"x": {1, 2}}):
        with pytest.raises((OverflowError, TypeError)):
            msgpack.packb(bad, use_bin_type=True)
        with pytest.raises((OverflowError, TypeError)):
            wire.py_packb(bad)
    ext = msgpack.ExtType(5, b"abc")
    assert wire.py_packb([ext]) == msgpack.packb([ext], use_bin_type=True)


def test_packb_is_msgpacks_where_msgpack_is_compiled():
    assert wire.packb({"ok": True}) == b"\x81\xa2ok\xc3"
    assert (wire.packb is wire.py_packb) == wire.PURE_PYTHON_MSGPACK


def test_the_shared_c_packer_leaves_nothing_behind_after_a_refused_object():
    """The reused packer of the C path: a reply msgpack refuses raises msgpack's own error,
    and the next reply is packed from an empty buffer."""
    with pytest.raises(TypeError):
        wire._c_packb({"ok": True, "bad": object()})
    assert wire._c_packb({"ok": True}) == msgpack.packb({"ok": True}, use_bin_type=True)
