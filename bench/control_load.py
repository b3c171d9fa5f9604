"""Control-plane load: pipelined offer+answer+delete cycles over UDP, with latency percentiles.

`python -m bench.control_load --interpreters cpython,pypy --cycles 3000` starts a relay per
interpreter and drives it side by side in one run. Bounded: a cycle count and a deadline.
"""

from __future__ import annotations

import argparse
import json
import os
import select
import socket
import sys
import tempfile
import time
from typing import Dict, List, Tuple

import msgpack

from lrk.daemon.launcher import RelayProcess

MAX_SECONDS = 60.0


def _requests(cycle: int, tag: str) -> List[Dict[str, object]]:
    call_id = f"bench-{tag}-{cycle}"
    return [
        {"cmd": "offer", "call_id": call_id, "from_tag": "a",
         "media": {"ip": "127.0.0.1", "port": 7000}},
        {"cmd": "answer", "call_id": call_id, "from_tag": "a", "to_tag": "b",
         "media": {"ip": "127.0.0.1", "port": 7002}},
        {"cmd": "delete", "call_id": call_id},
    ]


def run_load(addr: Tuple[str, int], cycles: int, window: int = 16,
             deadline: float = MAX_SECONDS) -> Dict[str, float]:
    """`window` calls in flight at once, each running offer -> answer -> delete in order."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setblocking(False)
    tag = os.urandom(3).hex()
    next_cycle = 0
    in_flight: Dict[str, Tuple[int, int, float]] = {}  # cookie -> (cycle, step, sent at)
    latencies: List[float] = []
    errors = 0
    done = 0
    seq = 0
    started = time.monotonic()
    stop_at = started + deadline

    def send(cycle: int, step: int) -> None:
        nonlocal seq
        seq += 1
        cookie = f"{tag}{seq}"
        message = dict(_requests(cycle, tag)[step], cookie=cookie)
        sock.sendto(msgpack.packb(message), addr)
        in_flight[cookie] = (cycle, step, time.monotonic())

    while next_cycle < min(window, cycles):
        send(next_cycle, 0)
        next_cycle += 1
    while in_flight and time.monotonic() < stop_at:
        ready, _, _ = select.select([sock], [], [], 1.0)
        if not ready:
            for cookie, (cycle, step, _t) in list(in_flight.items()):  # lost: resend
                del in_flight[cookie]
                send(cycle, step)
            continue
        while True:
            try:
                data = sock.recv(65535)
            except BlockingIOError:
                break
            reply = msgpack.unpackb(data, raw=False)
            entry = in_flight.pop(reply.get("cookie"), None)
            if entry is None:
                continue
            cycle, step, sent_at = entry
            latencies.append(time.monotonic() - sent_at)
            if not reply.get("ok"):
                errors += 1
            if step < 2:
                send(cycle, step + 1)
            else:
                done += 1
                if next_cycle < cycles:
                    send(next_cycle, 0)
                    next_cycle += 1
    elapsed = time.monotonic() - started
    sock.close()
    latencies.sort()

    def pct(p: float) -> float:
        return latencies[min(len(latencies) - 1, int(p * len(latencies)))] * 1000 if latencies \
            else float("nan")

    return {
        "cycles": done,
        "requests": len(latencies),
        "errors": errors,
        "seconds": round(elapsed, 3),
        "requests_per_s": round(len(latencies) / elapsed, 1) if elapsed else 0.0,
        "cycles_per_s": round(done / elapsed, 1) if elapsed else 0.0,
        "p50_ms": round(pct(0.50), 3),
        "p99_ms": round(pct(0.99), 3),
    }


def measure(python: str, cycles: int, window: int = 16) -> Dict[str, float]:
    """Start a relay with interpreter `python` and load its control plane."""
    with tempfile.NamedTemporaryFile("w", suffix=".toml", delete=False) as cfg:
        cfg.write("quarantine = 0.5\n")
    try:
        with RelayProcess(ports="10000-29999", python=python,
                          extra=["--config", cfg.name]) as relay:
            run_load(("127.0.0.1", relay.control_port), min(200, cycles), window)  # warm-up
            return run_load(("127.0.0.1", relay.control_port), cycles, window)
    finally:
        os.unlink(cfg.name)


def main(argv: List[str] = None) -> int:  # type: ignore[assignment]
    from bench.interpreters import find_interpreters

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--cycles", type=int, default=3000)
    parser.add_argument("--window", type=int, default=16)
    parser.add_argument("--interpreters", default="cpython,pypy")
    parser.add_argument("--out", help="write JSON results here")
    args = parser.parse_args(argv)
    found = find_interpreters()
    results = {}
    for label in args.interpreters.split(","):
        if label not in found:
            print(f"{label}: not available, skipped", file=sys.stderr)
            continue
        results[label] = measure(found[label]["python"], args.cycles, args.window)
        print(f"{label}: {json.dumps(results[label])}", file=sys.stderr)
    if "cpython" in results and "pypy" in results:
        results["pypy_over_cpython"] = round(
            results["pypy"]["requests_per_s"] / results["cpython"]["requests_per_s"], 2)
    print(json.dumps(results, indent=2))
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(results, fh, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
