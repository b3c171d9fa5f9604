"""Sanity checks of the interpreter and installed dependencies (both tox envs)."""

import importlib
import platform
import sys

import pytest

IMPL = platform.python_implementation()


def test_interpreter_is_supported():
    if IMPL == "CPython":
        assert sys.version_info >= (3, 11), sys.version
    elif IMPL == "PyPy":
        assert sys.version_info >= (3, 9), sys.version
        assert sys.pypy_version_info >= (7, 3), sys.pypy_version_info
    else:
        pytest.fail(f"unsupported interpreter {IMPL} {sys.version}")


@pytest.mark.parametrize("name", ["msgpack", "netaddr", "dpkt", "cffi"])
def test_runtime_dependency_imports(name):
    mod = importlib.import_module(name)
    assert mod.__name__ == name


def test_msgpack_roundtrip():
    import msgpack

    obj = {"call-id": "a84b4c76e66710", "ports": [30000, 30002], "ok": True}
    assert msgpack.unpackb(msgpack.packb(obj), raw=False) == obj


def test_event_loop_choice_per_interpreter():
    """uvloop drives the control plane on CPython; PyPy keeps asyncio's own loop."""
    import asyncio

    from lrk.cli import _use_uvloop

    before = asyncio.get_event_loop_policy()
    try:
        _use_uvloop()
        loop = asyncio.new_event_loop()
        try:
            name = type(loop).__module__
        finally:
            loop.close()
        if IMPL == "CPython":
            assert name.startswith("uvloop"), name
        else:
            assert name.startswith("asyncio"), name
    finally:
        asyncio.set_event_loop_policy(before)


def test_tomllib_available():
    if sys.version_info >= (3, 11):
        import tomllib
    else:
        import tomli as tomllib
    assert tomllib.loads('a = 1\n') == {"a": 1}
