"""What keeping calls across restarts costs the control plane: session setup with the
embedded SQLite store (`state_dir`) and with Redis (`store = "redis"`, a redis-server
on a unix socket started per run) against no store, side by side in one run.

    .venv/bin/python -m bench.store_cost --rounds 3 --cycles 6000 \\
        --out bench/results/store-cost-<date>.json

Per judged run a fresh relay (socket mode, loopback, `control_auth = "hmac"`, the
default, `quarantine = 0.5` as in `bench.before_after`); the closed loop of
`bench.control_load` (16 calls in flight, offer -> answer -> delete with one-stream SDP
bodies, every reply checked) after 2,000 warm-up calls. With a store every offer,
answer and delete writes (or deletes) a SQLite row, or a Redis key in one script call per
burst, before its reply leaves. Variants alternate, the order reversed every other
round; both interpreters. `server_us_per_request` is the relay's CPU (daemon + worker)
per request; `redis_us_per_request` the redis-server's.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from typing import Any, Dict, List, Optional

from bench.before_after import BodyProtocol
from bench.control_load import run_load, tree_cpu_seconds
from bench.interpreters import find_interpreters
from bench.redis_server import RedisServer
from lrk.demo.relay_process import RelayProcess

VARIANTS = ("none", "sqlite", "redis")


def one_run(python: str, store: str, cycles: int, warmup: int) -> Dict[str, Any]:
    redis = RedisServer().start() if store == "redis" else None
    try:
        return _one_run(python, store, cycles, warmup, redis)
    finally:
        if redis is not None:
            redis.close()


def _one_run(python: str, store: str, cycles: int, warmup: int,
             redis: Optional[RedisServer]) -> Dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="lrk-store-") as state:
        # as bench.before_after's control runs: a short quarantine, or 5,000 calls/s run
        # the 10,000 port pairs out within the default 5 s
        cfg = os.path.join(state, "relay.toml")
        with open(cfg, "w") as fh:
            fh.write("quarantine = 0.5\n")
            if redis is not None:
                fh.write(f"store = \"redis\"\nredis_url = \"{redis.url}\"\n"
                         "node_id = \"bench\"\n")
        extra = ["--config", cfg]
        if store == "sqlite":
            extra += ["--state-dir", os.path.join(state, "store")]
        relay = RelayProcess(ports="10000-29999", python=python, extra=extra)
        relay.start()
        try:
            pid = relay.proc.pid  # type: ignore[union-attr]
            addr = ("127.0.0.1", relay.control_port)
            proto = BodyProtocol("audio", relay.ping_key())
            run_load(addr, warmup, 16, protocol=proto)
            redis_cpu0 = _cpu_of(redis)
            res = run_load(addr, cycles, 16, protocol=proto,
                           cpu=lambda: tree_cpu_seconds(pid))
            redis_cpu = _cpu_of(redis) - redis_cpu0
        finally:
            res_code = relay.stop()
    res["relay_exit_code"] = res_code
    if redis is not None:
        res["redis_us_per_request"] = round(redis_cpu * 1e6 / max(1, res["requests"]), 1)
        res["redis_keys_left"] = len(redis.keys("lrk:*:session:*"))
    return res


def _cpu_of(redis: Optional[RedisServer]) -> float:
    if redis is None or redis.proc is None:
        return 0.0
    return tree_cpu_seconds(redis.proc.pid)


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--cycles", type=int, default=6000)
    p.add_argument("--warmup", type=int, default=2000)
    p.add_argument("--interpreters", default="cpython,pypy")
    p.add_argument("--out")
    args = p.parse_args(argv)
    found = find_interpreters()
    runs: List[Dict[str, Any]] = []
    for rnd in range(1, max(1, min(args.rounds, 10)) + 1):
        order = VARIANTS if rnd % 2 else tuple(reversed(VARIANTS))
        for label in args.interpreters.split(","):
            if label not in found:
                print(f"no {label} interpreter found", file=sys.stderr)
                return 2
            for store in order:
                res = one_run(found[label]["python"], store, args.cycles, args.warmup)
                res.update(round=rnd, interpreter=label, store=store,
                           load_before=os.getloadavg()[0])
                if res["errors"]:
                    print(f"r{rnd} {label} store={store}: {res['errors']} errors: the run is "
                          "not valid", file=sys.stderr)
                print(f"r{rnd} {label:7s} store={store:6s} {res['cycles_per_s']:8.1f} calls/s "
                      f"{res['server_us_per_request']:6.1f} us/req err {res['errors']}",
                      file=sys.stderr, flush=True)
                runs.append(res)
    summary: Dict[str, Any] = {}
    for label in args.interpreters.split(","):
        for store in VARIANTS:
            rs = [r for r in runs if r["interpreter"] == label and r["store"] == store]
            summary[f"{label}/{store}"] = {
                "calls_per_s_median": statistics.median(r["cycles_per_s"] for r in rs),
                "server_us_per_request_median": statistics.median(
                    r["server_us_per_request"] for r in rs),
                "errors": sum(r["errors"] for r in rs)}
        for store in VARIANTS[1:]:
            ratios = []
            for rnd in {r["round"] for r in runs}:
                by = {r["store"]: r for r in runs
                      if r["round"] == rnd and r["interpreter"] == label}
                ratios.append(round(by[store]["server_us_per_request"]
                                    / by["none"]["server_us_per_request"], 3))
            summary[f"{label}/{store}_over_none_cpu_per_request"] = sorted(ratios)
        rs = [r for r in runs if r["interpreter"] == label and r["store"] == "redis"]
        summary[f"{label}/redis"]["redis_us_per_request_median"] = statistics.median(
            r["redis_us_per_request"] for r in rs)
    print(json.dumps(summary, indent=1))
    if args.out:
        with open(args.out, "w") as fh:
            json.dump({"argv": sys.argv, "finished": time.strftime("%Y-%m-%d %H:%M:%S UTC",
                                                                    time.gmtime()),
                       "runs": runs, "summary": summary}, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
