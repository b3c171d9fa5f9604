"""What signed control requests cost (docs/security.md): the sans-IO control core running
offer+answer+delete cycles with `control_auth = "hmac"` and with `"none"`, side by side,
and the signature check alone. pytest-benchmark; timings go to the report, never asserted:

    .venv-pypy/bin/python -m pytest bench/bench_auth.py --benchmark-columns=mean,ops
    .venv/bin/python -m pytest bench/bench_auth.py --benchmark-columns=mean,ops

The daemon-level figure (sockets, event loop, worker) is `python -m bench.control_load
--peers pypy,pypy-noauth,cpython,cpython-noauth`.
"""

from __future__ import annotations

from typing import List

import msgpack
import pytest

from lrk.control.auth import Authenticator, Key, sign
from lrk.control.msgpack_proto import MsgpackControl
from lrk.core.engine import Engine, EngineConfig

SENDER = ("127.0.0.1", 5060)
KEY = Key("client", bytes(range(32)))
WALL = 1_800_000_000.0
CYCLES = 2000


def _datagrams(round_no: int, auth: bool) -> List[bytes]:
    out = []
    for i in range(CYCLES):
        call_id = f"bench-{round_no}-{i}"
        for message in (
            {"cookie": f"o{i}", "cmd": "offer", "call_id": call_id, "from_tag": "a",
             "media": {"ip": "127.0.0.1", "port": 7000}},
            {"cookie": f"a{i}", "cmd": "answer", "call_id": call_id, "from_tag": "a",
             "to_tag": "b", "media": {"ip": "127.0.0.1", "port": 7002}},
            {"cookie": f"d{i}", "cmd": "delete", "call_id": call_id},
        ):
            data = msgpack.packb(message)
            out.append(sign(data, KEY, WALL + round_no) if auth else data)
    return out


@pytest.mark.parametrize("auth", ["hmac", "none"])
def test_bench_core_cycles_signed_and_not(benchmark, auth):
    """Requests/s of codec + signature check + engine, no sockets."""
    state = {"round": 0}

    def setup():
        state["round"] += 1
        control = MsgpackControl(
            Engine(EngineConfig(port_start=10000, port_end=20000, quarantine=0)),
            auth=Authenticator([KEY]) if auth == "hmac" else None,
            wall_clock=lambda: WALL + state["round"])
        return (control, _datagrams(state["round"], auth == "hmac")), {}

    def run(control, datagrams):
        ok = 0
        now = 1000.0 * state["round"]
        for data in datagrams:
            now += 0.0001
            ok += control.handle(data, SENDER, now).reply is not None
        return ok

    ok = benchmark.pedantic(run, setup=setup, rounds=7, iterations=1, warmup_rounds=2)
    assert ok == 3 * CYCLES
    benchmark.extra_info["requests_per_round"] = 3 * CYCLES
    benchmark.extra_info["us_per_request"] = round(benchmark.stats["mean"] / (3 * CYCLES)
                                                   * 1e6, 2)


def test_bench_verify_alone(benchmark):
    """One signature check (a typical offer: about 150 bytes signed)."""
    auth = Authenticator([KEY], max_seen=1 << 22)
    signed = iter([sign(msgpack.packb({"v": 1, "cookie": f"{i:012x}", "cmd": "offer",
                                       "call_id": "bench-1234567890@host", "from_tag": "a",
                                       "media": {"ip": "127.0.0.1", "port": 7000}}),
                        KEY, WALL) for i in range(30_000)])

    def verify():
        return auth.verify(next(signed), WALL)

    key, verdict = benchmark.pedantic(verify, rounds=25000, iterations=1, warmup_rounds=2000)
    assert key is KEY and verdict == "fresh"
