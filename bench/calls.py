"""Calls through each relay at the same load: added latency, jitter, loss, memory per session.

N two-way calls at 50 packets/s per direction (`bench.callgen`: 172-byte PCMU RTP with
send times in the payload) run through each peer of `bench.peers` in turn, in one
caller <-> relay <-> callee topology, with the same sockets and the same generator
process. Per peer:

* the calls' delivery, loss, reordering, added one-way latency percentiles and jitter
  (one discarded warm-up run first: PyPy's JIT and the relays' first packets);
* memory per session: the relay processes' resident memory and the kernel's slab
  (sockets, conntrack entries, nftables elements: /proc/meminfo "Slab") with all N calls
  set up and carrying media, minus the same with the first half only (JIT warm, buffers
  touched), divided by the second half's count (a PyPy relay runs with PyPy's own GC
  nursery here, `bench.peers.MEMORY_ENV`). The slab figure is machine-wide, so
  other tenants add noise; it is only shown from 50 sessions measured up;
* the relay processes' CPU per relayed packet -- their userspace share: the kernel
  modes forward in softirq, which `bench.netns_capacity` measures.

    .venv/bin/python -m bench.calls --calls 200 --duration 5     # root

Root only; namespaces, relays and sockets are gone at the end, also on failure.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import socket
import sys
import time
from typing import Any, Callable, Dict, List, Optional, Tuple

from bench.callgen import CallGenProcess
from bench.interpreters import pypy_or_current
from bench.netns import Topology, list_namespaces, socket_in
from bench.peers import MEMORY_ENV, PEERS, PeerError, make_peer

Progress = Callable[[str], None]

DEFAULT_CALLS = 200
DEFAULT_DURATION = 5.0
PPS_PER_STREAM = 50
MAX_CALLS = 2000
#: relay ports: 4 per call and some room, below the ephemeral range
PORT_START = 20000
#: slab per session is only meaningful when many sessions dwarf the machine's noise
SLAB_MIN_CALLS = 50


class CallsError(RuntimeError):
    """The stage cannot run (not root, bad arguments)."""


def slab_bytes() -> int:
    with open("/proc/meminfo") as fh:
        for line in fh:
            if line.startswith("Slab:"):
                return int(line.split()[1]) * 1024
    return 0


def cpu_seconds(pids: List[int]) -> float:
    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as fh:
                fields = fh.read().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / tick
        except (OSError, ValueError, IndexError):
            pass
    return total


def _bound(ns: str, ip: str) -> socket.socket:
    s = socket_in(ns, socket.AF_INET)
    try:
        s.bind((ip, 0))
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
    except BaseException:
        s.close()
        raise
    return s


def measure_peer(topo: Topology, name: str, gen: CallGenProcess,
                 endpoints: List[Tuple[socket.socket, socket.socket]], duration: float,
                 say: Progress, lrk_python: Optional[str]) -> dict:
    n = len(endpoints)
    ports = f"{PORT_START}-{PORT_START + 4 * n + 63}"
    peer = make_peer(topo, name, ports, python=lrk_python, env=MEMORY_ENV)
    out: Dict[str, Any] = {"mode": name, "calls": n}
    half = max(1, n // 2)
    with peer:
        t0 = time.perf_counter()
        spec = []
        for i, (a, b) in enumerate(endpoints):
            if i == half:
                # memory baseline: half the calls set up and carrying media (JIT warm,
                # buffers touched), so the second half's growth is what a session costs
                out["setup_per_second"] = round(half / (time.perf_counter() - t0), 1)
                gen.setup(spec)
                gen.run(1.0, pps_per_stream=PPS_PER_STREAM)  # warm-up, discarded
                rss0, slab0 = peer.rss_bytes(), slab_bytes()
            to_relay_a, to_relay_b = peer.call(f"cl-{name}-{i}", a.getsockname()[:2],
                                               b.getsockname()[:2])
            spec.append([a.fileno(), b.fileno(), list(to_relay_a), list(to_relay_b)])
        gen.setup(spec)
        gen.run(1.0, pps_per_stream=PPS_PER_STREAM)  # warm-up, discarded
        if n > half:
            rss1, slab1 = peer.rss_bytes(), slab_bytes()
        pids = peer.pids()
        c0 = cpu_seconds(pids)
        res = gen.run(duration, pps_per_stream=PPS_PER_STREAM)
        c1 = cpu_seconds(pids)
        for i in range(n):
            peer.hangup(f"cl-{name}-{i}")
    out["exit_code"] = peer.exit_code
    keys = ("sent", "received", "lost", "loss", "reordered", "duplicates", "damaged",
            "latency_ms", "jitter_ms", "added_jitter_ms", "generator_limited",
            "achieved_rate", "silent_streams", "min_stream_received", "misrouted")
    out.update({k: res.get(k) for k in keys})
    received = res.get("received") or 0
    out["relay_cpu_us_per_packet"] = (round((c1 - c0) * 1e6 / received, 3)
                                      if received else None)
    grown = n - half
    out["memory"] = {"sessions_measured": grown, "rss_bytes_per_session": None,
                     "slab_bytes_per_session": None}
    if grown:
        out["memory"]["rss_bytes_per_session"] = round((rss1 - rss0) / grown)
        if grown >= SLAB_MIN_CALLS:
            out["memory"]["slab_bytes_per_session"] = round((slab1 - slab0) / grown)
    mem = out["memory"]
    out["bytes_per_session"] = (None if mem["rss_bytes_per_session"] is None else
                                max(0, mem["rss_bytes_per_session"])
                                + max(0, mem["slab_bytes_per_session"] or 0))
    lat = res.get("latency_ms") or {}
    say(f"[{name}] {n} calls: received {received}/{res.get('sent')}, loss "
        f"{100 * (res.get('loss') or 0):.3f}%, latency p50 {lat.get('p50')} p99 "
        f"{lat.get('p99')} ms, {out['relay_cpu_us_per_packet']} us/pkt (userspace), "
        f"{mem['rss_bytes_per_session']} B RSS + {mem['slab_bytes_per_session']} B slab "
        f"per session")
    return out


def run_calls(peers: List[str], calls: int = DEFAULT_CALLS,
              duration: float = DEFAULT_DURATION, progress: Optional[Progress] = None,
              tag: str = "cl", lrk_python: Optional[str] = None) -> dict:
    """Every peer with the same calls, one after the other; a JSON-able report."""
    if os.geteuid() != 0:
        raise CallsError("the calls stage runs in network namespaces: it needs root")
    if not 1 <= calls <= MAX_CALLS:
        raise CallsError(f"calls must be in 1..{MAX_CALLS}, got {calls}")
    for name in peers:
        if name not in PEERS:
            raise CallsError(f"unknown peer {name!r}; choose from {', '.join(PEERS)}")
    say = progress or (lambda _text: None)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = min(hard, max(soft, 4 * calls + 1024))
    if want > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    python = lrk_python or pypy_or_current()
    topo = Topology(tag)
    results: List[dict] = []
    errors: Dict[str, str] = {}
    socks: List[socket.socket] = []
    t0 = time.monotonic()
    try:
        topo.create()
        endpoints = []
        for _ in range(calls):
            a = _bound(topo.caller.ns, topo.caller.ip4)
            socks.append(a)
            b = _bound(topo.callee.ns, topo.callee.ip4)
            socks.append(b)
            endpoints.append((a, b))
        with contextlib.closing(CallGenProcess(socks, python=pypy_or_current())) as gen:
            for name in peers:
                try:
                    results.append(measure_peer(topo, name, gen, endpoints, duration, say,
                                                python))
                except (PeerError, RuntimeError, OSError) as exc:
                    errors[name] = f"{type(exc).__name__}: {exc}"
                    say(f"[{name}] failed: {exc}")
    finally:
        for s in socks:
            s.close()
        topo.destroy()
    return {
        "command": "python -m bench.calls",
        "calls": calls,
        "pps_per_stream": PPS_PER_STREAM,
        "duration": duration,
        "lrk_python": python,
        "results": results,
        "errors": errors,
        "namespaces_left": sorted(set(topo.namespaces) & set(list_namespaces())),
        "wall_s": round(time.monotonic() - t0, 1),
    }


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.calls", description=__doc__.split("\n")[0])
    p.add_argument("--peers", default=",".join(PEERS))
    p.add_argument("--calls", type=int, default=DEFAULT_CALLS)
    p.add_argument("--duration", type=float, default=DEFAULT_DURATION)
    p.add_argument("--out")
    args = p.parse_args(argv)

    def say(text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    try:
        report = run_calls([x.strip() for x in args.peers.split(",") if x.strip()],
                           args.calls, args.duration, say)
    except CallsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    text = json.dumps(report, indent=1)
    if args.out:
        with open(args.out, "w") as fh:
            fh.write(text + "\n")
    print(text)
    return 1 if report["errors"] or report["namespaces_left"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
