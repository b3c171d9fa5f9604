"""msgpack packing of control replies, the same bytes as `msgpack.packb(obj, use_bin_type=True)`.

On CPython msgpack's C extension packs. On PyPy msgpack is pure Python (its `fallback`
module: a BytesIO, a `struct.pack` per item, an isinstance ladder per value) and
packing a delete's reply (~880 bytes, the session's per-stream counters) cost about
15 µs, a third of PyPy's sans-IO time per request; the packer here writes the same
bytes with precomputed headers and a type dispatch the JIT traces well (about 4x
faster there). What it does not know (ExtType, datetime, a type msgpack would refuse)
goes to msgpack itself, so errors stay msgpack's.
"""

from __future__ import annotations

import platform
import struct
from typing import Any, Callable, List

import msgpack

__all__ = ["packb", "py_packb", "PURE_PYTHON_MSGPACK"]

#: msgpack runs as pure Python here (PyPy, or no C extension): use py_packb
PURE_PYTHON_MSGPACK = (platform.python_implementation() != "CPython"
                       or msgpack.Packer.__module__ == "msgpack.fallback")

_POSFIX = [bytes((i,)) for i in range(0x80)]
_NEGFIX = {i: struct.pack("b", i) for i in range(-32, 0)}
_FIXSTR = [bytes((0xA0 | n,)) for n in range(32)]
_FIXARRAY = [bytes((0x90 | n,)) for n in range(16)]
_FIXMAP = [bytes((0x80 | n,)) for n in range(16)]
_pack_B = struct.Struct(">BB").pack
_pack_H = struct.Struct(">BH").pack
_pack_I = struct.Struct(">BI").pack
_pack_Q = struct.Struct(">BQ").pack
_pack_b = struct.Struct(">Bb").pack
_pack_h = struct.Struct(">Bh").pack
_pack_i = struct.Struct(">Bi").pack
_pack_q = struct.Struct(">Bq").pack
_pack_d = struct.Struct(">Bd").pack


_MSGPACK_OWN = (msgpack.ExtType, msgpack.Timestamp)


class _Unknown(Exception):
    """A value this packer leaves to msgpack."""


def _int(n: int, out: List[bytes]) -> None:
    if 0 <= n < 0x80:
        out.append(_POSFIX[n])
    elif -0x20 <= n < 0:
        out.append(_NEGFIX[n])
    elif 0 < n <= 0xFF:
        out.append(_pack_B(0xCC, n))
    elif 0 < n <= 0xFFFF:
        out.append(_pack_H(0xCD, n))
    elif 0 < n <= 0xFFFFFFFF:
        out.append(_pack_I(0xCE, n))
    elif 0 < n <= 0xFFFFFFFFFFFFFFFF:
        out.append(_pack_Q(0xCF, n))
    elif -0x80 <= n < 0:
        out.append(_pack_b(0xD0, n))
    elif -0x8000 <= n < 0:
        out.append(_pack_h(0xD1, n))
    elif -0x80000000 <= n < 0:
        out.append(_pack_i(0xD2, n))
    elif -0x8000000000000000 <= n < 0:
        out.append(_pack_q(0xD3, n))
    else:
        raise _Unknown  # msgpack raises its OverflowError


def _str(s: str, out: List[bytes]) -> None:
    data = s.encode("utf-8")
    n = len(data)
    if n < 32:
        out.append(_FIXSTR[n])
    elif n <= 0xFF:
        out.append(_pack_B(0xD9, n))
    elif n <= 0xFFFF:
        out.append(_pack_H(0xDA, n))
    else:
        out.append(_pack_I(0xDB, n))
    out.append(data)


def _bin(data: Any, out: List[bytes]) -> None:
    data = bytes(data)
    n = len(data)
    if n <= 0xFF:
        out.append(_pack_B(0xC4, n))
    elif n <= 0xFFFF:
        out.append(_pack_H(0xC5, n))
    else:
        out.append(_pack_I(0xC6, n))
    out.append(data)


def _pack(obj: Any, out: List[bytes], depth: int) -> None:
    t = type(obj)
    if t is str:
        _str(obj, out)
    elif t is int:
        _int(obj, out)
    elif obj is None:
        out.append(b"\xc0")
    elif t is bool:
        out.append(b"\xc3" if obj else b"\xc2")
    elif t is dict:
        _map(obj, out, depth)
    elif t is list or t is tuple:
        _array(obj, out, depth)
    elif t is float:
        out.append(_pack_d(0xCB, obj))
    elif t is bytes:
        _bin(obj, out)
    else:
        _other(obj, out, depth)


def _map(obj: Any, out: List[bytes], depth: int) -> None:
    if depth <= 0:
        raise _Unknown
    n = len(obj)
    if n < 16:
        out.append(_FIXMAP[n])
    elif n <= 0xFFFF:
        out.append(_pack_H(0xDE, n))
    else:
        out.append(_pack_I(0xDF, n))
    for key, value in obj.items():
        _pack(key, out, depth - 1)
        _pack(value, out, depth - 1)


def _array(obj: Any, out: List[bytes], depth: int) -> None:
    if depth <= 0:
        raise _Unknown
    n = len(obj)
    if n < 16:
        out.append(_FIXARRAY[n])
    elif n <= 0xFFFF:
        out.append(_pack_H(0xDC, n))
    else:
        out.append(_pack_I(0xDD, n))
    for item in obj:
        _pack(item, out, depth - 1)


def _other(obj: Any, out: List[bytes], depth: int) -> None:
    """Subclasses, in msgpack's order of checks (bool before int, bytes before str, its
    own ExtType and Timestamp, which are tuples, before lists)."""
    if isinstance(obj, _MSGPACK_OWN):
        raise _Unknown
    if isinstance(obj, bool):
        out.append(b"\xc3" if obj else b"\xc2")
    elif isinstance(obj, int):
        _int(obj, out)
    elif isinstance(obj, (bytes, bytearray, memoryview)) and not isinstance(obj, str):
        _bin(obj, out)
    elif isinstance(obj, str):
        _str(obj, out)
    elif isinstance(obj, float):
        out.append(_pack_d(0xCB, obj))
    elif isinstance(obj, (list, tuple)):
        _array(obj, out, depth)
    elif isinstance(obj, dict):
        _map(obj, out, depth)
    else:
        raise _Unknown


def py_packb(obj: Any) -> bytes:
    """As msgpack.packb(obj, use_bin_type=True), in plain Python (PyPy's JIT)."""
    out: List[bytes] = []
    try:
        _pack(obj, out, 512)  # msgpack's own recursion limit
    except (_Unknown, RecursionError, UnicodeEncodeError):
        return msgpack.packb(obj, use_bin_type=True)
    return b"".join(out)


#: one C packer for every reply (msgpack.packb builds a Packer per call)
_C_PACKER = msgpack.Packer(use_bin_type=True)


def _c_packb(obj: Any) -> bytes:
    try:
        return _C_PACKER.pack(obj)
    except Exception:
        _C_PACKER.reset()  # nothing half-packed leaks into the next reply
        return msgpack.packb(obj, use_bin_type=True)  # msgpack's own error, as packb


#: the packer of this interpreter
packb: Callable[[Any], bytes] = py_packb if PURE_PYTHON_MSGPACK else _c_packb
