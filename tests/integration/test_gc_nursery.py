"""PyPy's GC nursery reaches every relay process: the launcher's value, or the operator's
when one is set; the worker gets the daemon's (fastpath.jit.with_gc_nursery), and the start
line says which nursery a PyPy daemon runs with."""

from __future__ import annotations

import platform
import sys

import pytest

from fastpath import jit
from lrk.demo.relay_process import RelayProcess, next_port_range
from tests.integration.hostile import children


def _environ(pid: int) -> dict:
    with open(f"/proc/{pid}/environ", "rb") as fh:
        pairs = [item.split(b"=", 1) for item in fh.read().split(b"\0") if b"=" in item]
    return {k.decode(): v.decode() for k, v in pairs}


def _worker(pid: int) -> int:
    kids = children(pid)
    assert len(kids) == 1, f"one worker expected, found {kids}"
    return kids[0]


@pytest.mark.parametrize("given, expected", [(None, jit.GC_NURSERY), ("32M", "32M")])
def test_daemon_and_worker_run_with_the_nursery(monkeypatch, given, expected):
    monkeypatch.delenv(jit.GC_NURSERY_ENV, raising=False)
    env = {} if given is None else {jit.GC_NURSERY_ENV: given}
    with RelayProcess(ports=next_port_range(), python=sys.executable, env=env) as relay:
        pid = relay.proc.pid
        assert _environ(pid)[jit.GC_NURSERY_ENV] == expected
        assert _environ(_worker(pid))[jit.GC_NURSERY_ENV] == expected
        line = next(ln for ln in relay.read_output().splitlines() if " serving: " in ln)
    if platform.python_implementation() == "PyPy":
        assert f"interpreter=pypy(gc_nursery={expected})" in line, line
    else:
        assert "interpreter=cpython" in line, line
