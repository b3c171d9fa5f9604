"""Many sessions on one relay (issue 14): install N calls through the daemon, then read
what holding them costs.

    .venv/bin/python -m bench.many_sessions daemon --sessions 4000 --addresses 4 \\
        --ports 30000-32047 --out bench/results/many-sessions-daemon.json
    .venv/bin/python -m bench.many_sessions engine --sessions 100000 --addresses 8 \\
        --out bench/results/many-sessions-engine.json

``daemon``: an lrk relay in socket mode on loopback with ``--addresses`` relay addresses
per side (127.0.0.1.. internal, 127.0.1.1.. external: loopback answers for all of
127/8, so no address is added anywhere). N calls are installed with msgpack offer
(interface external) + answer (internal), ``--window`` calls in flight, every reply
checked; the requests are packed and signed before the clock starts, so the client
costs one send + one recv + one unpack per request. Then: sessions/s, the relay's
RSS (daemon + workers) per session, the round trip of one ``stats`` at that size, and
that the calls spread over the addresses. Socket mode holds 4 sockets a call, so N is
bound by the fd limit (``ulimit -n``; 20000 here: about 4,800 calls).

``engine``: the sans-IO engine alone (the daemon's control plane without sockets) with
N calls on ``--addresses`` addresses per side and the full port range: offer + answer
per second, RSS per session, one expiry pass with nothing due and with 1% due, one
counter report folded in. No network, no processes.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import select
import socket
import sys
import time
from typing import Any, Dict, List, Optional, Tuple

import msgpack

from lrk.client import LrkClient
from lrk.control.auth import sign
from lrk.demo.relay_process import RelayProcess

MAX_SECONDS = 120.0


def _rss_kib(pid: int) -> int:
    """VmRSS of `pid` and its live children (the relay's workers), KiB."""
    total = 0
    pids = [pid]
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/children") as fh:
                pids.extend(int(c) for c in fh.read().split())
    except FileNotFoundError:
        pass
    for p in pids:
        try:
            with open(f"/proc/{p}/status") as fh:
                for line in fh:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1])
        except FileNotFoundError:
            continue
    return total


def _addresses(n: int) -> Tuple[List[str], List[str]]:
    return ([f"127.0.0.{i + 1}" for i in range(n)], [f"127.0.1.{i + 1}" for i in range(n)])


def install(addr: Tuple[str, int], datagrams: List[List[bytes]], window: int
            ) -> Dict[str, Any]:
    """Every call's offer then answer, `window` calls in flight; replies checked."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 22)
    sock.connect(addr)
    sock.setblocking(False)
    in_flight: Dict[str, Tuple[int, int]] = {}
    errors: List[str] = []
    next_call = done = resent = 0
    started = time.monotonic()
    stop_at = started + MAX_SECONDS

    def send(call: int, step: int) -> None:
        try:
            sock.send(datagrams[call][step])
        except BlockingIOError:
            pass  # resent after a quiet second
        in_flight[f"{call}.{step}"] = (call, step)

    while next_call < min(window, len(datagrams)):
        send(next_call, 0)
        next_call += 1
    while in_flight and time.monotonic() < stop_at:
        ready, _, _ = select.select([sock], [], [], 1.0)
        if not ready:
            for call, step in list(in_flight.values()):
                resent += 1
                send(call, step)
            continue
        while True:
            try:
                data = sock.recv(65535)
            except BlockingIOError:
                break
            reply = msgpack.unpackb(data, raw=False)
            entry = in_flight.pop(reply.get("cookie"), None)
            if entry is None:
                continue  # a late reply to a resent request
            if reply.get("ok") is not True and len(errors) < 5:
                errors.append(str(reply.get("error")))
            call, step = entry
            if step == 0:
                send(call, 1)
            else:
                done += 1
                if next_call < len(datagrams):
                    send(next_call, 0)
                    next_call += 1
    elapsed = time.monotonic() - started
    sock.close()
    return {"installed": done, "seconds": round(elapsed, 3), "resent": resent,
            "errors": errors, "sessions_per_s": round(done / elapsed, 1) if elapsed else 0.0}


def daemon(args: argparse.Namespace) -> Dict[str, Any]:
    internal, external = _addresses(args.addresses)
    extra = ["--config", args.config] if args.config else []
    for ip in internal:
        extra += ["--internal-ip", ip]
    for ip in external:
        extra += ["--external-ip", ip]
    with RelayProcess(ports=args.ports, extra=extra) as relay:
        pid = relay.proc.pid  # type: ignore[union-attr]
        key, wall = relay.ping_key(), time.time()

        def packed(request: Dict[str, Any]) -> bytes:
            data = msgpack.packb(request)
            return sign(data, key, wall) if key is not None else data

        datagrams = [[packed({"cmd": "offer", "cookie": f"{n}.0", "call_id": f"many-{n}",
                              "from_tag": "a", "interface": "external",
                              "media": {"ip": "127.0.0.1", "port": 7000}}),
                      packed({"cmd": "answer", "cookie": f"{n}.1", "call_id": f"many-{n}",
                              "from_tag": "a", "to_tag": "b", "interface": "internal",
                              "media": {"ip": "127.0.0.1", "port": 7002}})]
                     for n in range(args.sessions)]
        rss0 = _rss_kib(pid)
        result = install(("127.0.0.1", relay.control_port), datagrams, args.window)
        rss1 = _rss_kib(pid)
        times = []
        stats: Dict[str, Any] = {}
        with LrkClient([relay.node]) as client:  # signs each request afresh
            for _ in range(args.repeat):
                t0 = time.perf_counter()
                stats = dict(client.stats())
                times.append(time.perf_counter() - t0)
    times.sort()
    by_address = stats.get("ports_by_address", {})
    result.update({
        "mode": "socket", "addresses_per_side": args.addresses, "ports": args.ports,
        "sessions_held": stats.get("sessions"), "port_pairs": stats.get("ports"),
        "in_use_by_address": {ip: p["in_use"] for ip, p in by_address.items()},
        "rss_kib_before": rss0, "rss_kib_after": rss1,
        "rss_bytes_per_session": round((rss1 - rss0) * 1024 / max(1, result["installed"])),
        "stats_round_trip_ms_median": round(times[len(times) // 2] * 1000, 3),
    })
    return result


def engine(args: argparse.Namespace) -> Dict[str, Any]:
    from fastpath.contract import LegReport, SessionReport, StreamReport
    from lrk.core.engine import Engine, EngineConfig

    internal, external = _addresses(args.addresses)
    lo, hi = (int(x) for x in args.ports.split("-"))
    e = Engine(EngineConfig(internal_ip=internal[0], external_ip=external[0],
                            internal_ips=tuple(internal), external_ips=tuple(external),
                            port_start=lo, port_end=hi, silence_timeout=60.0))
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    for n in range(args.sessions):
        call = f"many-{n}"
        e.offer(float(n) * 1e-4, call, "a", ("198.51.100.10", 7000), interface="external")
        e.answer(float(n) * 1e-4, call, "a", "b", ("198.51.100.20", 7002))
    install_s = time.perf_counter() - t0
    rss1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    in_use = e.ports.in_use
    now = 30.0  # nothing due yet
    t0 = time.perf_counter()
    for _ in range(args.repeat):
        assert e.handle_timer(now) == []
    idle_pass = (time.perf_counter() - t0) / args.repeat
    session = next(iter(e.sessions()))
    report = SessionReport(session.sid, 31.0, (StreamReport(
        0, LegReport(10, 1720, 10, 1720, (), 1, None),
        LegReport(10, 1720, 10, 1720, (), 1, None)),))
    t0 = time.perf_counter()
    for _ in range(args.repeat):
        e.apply_report(report)
    report_s = (time.perf_counter() - t0) / args.repeat
    due = args.sessions // 100  # the first 1% created are due at 60 s + their creation
    t0 = time.perf_counter()
    ended = e.handle_timer(60.0 + due * 1e-4)
    due_pass = time.perf_counter() - t0
    return {
        "mode": "engine (sans-IO)", "addresses_per_side": args.addresses, "ports": args.ports,
        "sessions": args.sessions, "install_seconds": round(install_s, 3),
        "sessions_per_s": round(args.sessions / install_s, 1),
        "ports_total": e.ports.total, "ports_in_use": in_use,
        "max_rss_kib_growth": rss1 - rss0,
        "rss_bytes_per_session": round((rss1 - rss0) * 1024 / args.sessions),
        "expiry_pass_nothing_due_us": round(idle_pass * 1e6, 2),
        "expiry_pass_1pct_due_ms": round(due_pass * 1000, 3), "ended_in_that_pass": len(ended),
        "report_fold_us": round(report_s * 1e6, 2),
    }


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("what", choices=("daemon", "engine"))
    parser.add_argument("--sessions", type=int, default=4000)
    parser.add_argument("--addresses", type=int, default=4, help="relay addresses per side")
    parser.add_argument("--ports", default="30000-32047")
    parser.add_argument("--window", type=int, default=64, help="calls in flight (daemon)")
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument("--config", help="a TOML file for the relay (daemon)")
    parser.add_argument("--out", help="write the JSON here too")
    args = parser.parse_args(argv)
    if not 1 <= args.sessions <= 200_000 or not 1 <= args.addresses <= 64:
        parser.error("--sessions must be within 1..200000, --addresses within 1..64")
    result = daemon(args) if args.what == "daemon" else engine(args)
    result.update({"python": f"{platform.python_implementation()} {platform.python_version()}",
                   "machine": f"{platform.machine()}, {os.cpu_count()} cores, shared",
                   "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                   "loadavg_before": os.getloadavg()[0],
                   "command": " ".join(["python -m bench.many_sessions", *sys.argv[1:]])})
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        with open(args.out, "w") as fh:
            fh.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
