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


@pytest.mark.skipif(IMPL != "CPython", reason="uvloop is only used on CPython")
def test_uvloop_on_cpython():
    import asyncio

    import uvloop

    async def probe():
        return asyncio.get_running_loop()

    loop = uvloop.new_event_loop()
    try:
        assert isinstance(loop.run_until_complete(probe()), uvloop.Loop)
    finally:
        loop.close()


def test_tomllib_available():
    if sys.version_info >= (3, 11):
        import tomllib
    else:
        import tomli as tomllib
    assert tomllib.loads('a = 1\n') == {"a": 1}
