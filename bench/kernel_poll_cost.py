"""Kernel mode: the CPU cost of one counter poll (`KernelPlane._poll`) at N sessions.

Run as root from the repository root (it creates, and always deletes, three network
namespaces lrk-t<pid>kp-{a,r,b}; addresses only from 198.51.100.0/24):

    .venv/bin/python bench/kernel_poll_cost.py --sessions 1000 --polls 20 \
        --python .venv/bin/python --python .venv-pypy/bin/python \
        --src . --src /tmp/lrk-before

(`/tmp/lrk-before`: an older tree to compare with, e.g. ``git archive HEAD | tar -x -C
/tmp/lrk-before``; by default only `--src .` with this interpreter.)

For every (interpreter, source tree) pair, in the same topology, one after the other: a
child process runs inside the relay namespace (``ip netns exec``), starts a `KernelPlane`
(the plane `lrkproxy run --mode kernel` uses) and installs N sessions with `Install`
actions (leg A: caller side, leg B: callee side, RTP and RTCP), then sends a few UDP
packets per session from the caller namespace (and answers from the callee for every
other session) so each session has conntrack flows with counters, some replied. It polls
once (warm-up), then `--polls` times, and reports the process CPU time of each poll
(``time.process_time()`` plus the children's rusage, so an ``nft`` binary it spawns
counts too), the wall time, and a digest of the reports the last poll sent to the sink
(per-leg counters and latches, times left out): two source trees that report the same
state print the same digest. `periodic_interval_s` is how often the plane's own timer
reads (conntrack counting: min(15 s, udp_timeout / 2) since reads date each flow's last
packet; before that, and with `"rules"`, every `kernel_poll`), `cpu_ms_per_s_periodic`
the resulting CPU per second of an idle relay (reads before expiry decisions and
queries come on top, at most one per `kernel_poll`). ``--profile`` adds a cProfile of
the polls (CPython).
The plane is stopped (table deleted, flows flushed) and conntrack flushed after each
child; the namespaces are deleted at the end, also on failure or Ctrl-C.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import signal
import socket
import subprocess
import sys
import time
from typing import Any, Dict, List

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
#: the daemon's default `ports` (30000-40000): its ct mark range takes two filtered
#: conntrack dumps (fastpath.kernel.ctnetlink.mark_filters), as a default relay does
PORT_BASE, PORT_END = 30000, 40000


def _cpu() -> float:
    """CPU seconds of this process and its waited-for children."""
    ch = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + ch.ru_utime + ch.ru_stime


def _digest(reports: List[Any]) -> str:
    """A digest of the last poll's reports without their times (last_rx)."""
    rows = sorted((r.sid, repr(r.streams)) for r in reports)
    return hashlib.sha256(repr(rows).encode()).hexdigest()[:16]


def inner(args: argparse.Namespace) -> Dict[str, Any]:
    """In the relay namespace: install, make flows, poll; returns the measurements."""
    import asyncio

    if os.stat("/proc/self/ns/net").st_ino == args.outer_ns:
        raise SystemExit("refusing to run in the caller's network namespace")
    from bench.netns import socket_in
    from fastpath.contract import Install, LegSpec, SessionSpec, StreamSpec
    from lrk.daemon.kernel_plane import KernelPlane

    n = args.sessions
    plane = KernelPlane(PORT_BASE, PORT_END, [args.relay_a, args.relay_b],
                        poll_interval=2.0, counters=args.counters)
    reports: List[Any] = []
    plane.sink = reports.append
    loop = asyncio.new_event_loop()
    loop.run_until_complete(plane.start())
    out: Dict[str, Any] = {"python": sys.version.split()[0]
                           + (" pypy" if hasattr(sys, "pypy_version_info") else ""),
                           "src": args.src}
    socks: List[socket.socket] = []
    try:
        if args.nft_backend:
            from fastpath.kernel.nft import Nft
            plane.nft = Nft(backend=args.nft_backend)
        out["nft_backend"] = plane.nft.backend if plane.nft else None
        actions = []
        for i in range(n):
            pa, pb = PORT_BASE + 4 * i, PORT_BASE + 4 * i + 2
            a = LegSpec("A", args.relay_a, pa, (args.caller, 4000), (args.caller, 4001))
            b = LegSpec("B", args.relay_b, pb, (args.callee, 5000), (args.callee, 5001))
            actions.append(Install(SessionSpec(i + 1, f"kp-{i}", (StreamSpec(0, a, b),))))
        t0 = time.monotonic()
        for i in range(0, n, 100):
            failures = plane.apply(actions[i:i + 100])
            if failures:
                raise SystemExit(f"install failed: {failures[:3]}")
        out["install_s"] = round(time.monotonic() - t0, 2)
        # flows: caller -> relay A (RTP, RTCP); every other session the callee answers
        caller = [socket_in(args.caller_ns) for _ in range(2)]
        callee = [socket_in(args.callee_ns) for _ in range(2)]
        socks += caller + callee
        for k in range(2):
            caller[k].bind((args.caller, 4000 + k))
            callee[k].bind((args.callee, 5000 + k))
        payload = b"\x80\x00" + b"\x00" * 170
        for _ in range(args.packets):
            for i in range(n):
                for k in range(2):
                    caller[k].sendto(payload, (args.relay_a, PORT_BASE + 4 * i + k))
            time.sleep(0.02)
        time.sleep(0.1)
        for _ in range(args.packets):
            for i in range(0, n, 2):
                for k in range(2):
                    callee[k].sendto(payload, (args.relay_b, PORT_BASE + 4 * i + 2 + k))
            time.sleep(0.02)
        time.sleep(0.2)
        plane._poll()  # warm-up: the first poll also sees every flow appear
        out["flows_dumped_first_poll"] = plane.counters["kernel.flows.dumped"]
        prof = None
        if args.profile:
            import cProfile
            prof = cProfile.Profile()
        cpu: List[float] = []
        wall: List[float] = []
        for _ in range(args.polls):
            reports.clear()
            w0, c0 = time.perf_counter(), _cpu()
            if prof is not None:
                prof.enable()
            plane._poll()
            if prof is not None:
                prof.disable()
            cpu.append(_cpu() - c0)
            wall.append(time.perf_counter() - w0)
        cpu_ms = sorted(c * 1000 for c in cpu)
        dump: List[float] = []  # the conntrack dump alone (kernel + parse), same count
        recv: List[float] = []
        if not plane.rules.seen:
            for _ in range(args.polls):
                c0 = _cpu()
                plane._dump()
                dump.append(_cpu() - c0)
            dump.sort()
            # the floor: the same dumps received and framed, no flow parsed
            from fastpath.kernel import netlink
            from fastpath.kernel.ctnetlink import dump_request, mark_filters
            nl = plane.ct_dump.nl
            lo, hi = plane.rules.mark_range
            for _ in range(args.polls):
                c0 = _cpu()
                for mark, mask in mark_filters(lo, hi):
                    seq = nl.next_seq()
                    for _msg in nl.dump(dump_request(seq, 0, mark, mask), netlink.Dump(seq),
                                        timeout=5.0):
                        pass
                recv.append(_cpu() - c0)
            recv.sort()
        out.update({
            "sessions": n, "polls": args.polls,
            "cpu_ms_per_poll_mean": round(sum(cpu_ms) / len(cpu_ms), 3),
            "cpu_ms_per_poll_median": round(cpu_ms[len(cpu_ms) // 2], 3),
            "cpu_ms_per_poll_min": round(cpu_ms[0], 3),
            "wall_ms_per_poll_median": round(sorted(wall)[len(wall) // 2] * 1000, 3),
            "ct_dump_cpu_ms_median": round(dump[len(dump) // 2] * 1000, 3) if dump else None,
            "ct_recv_only_cpu_ms_median": round(recv[len(recv) // 2] * 1000, 3) if recv else None,
            "flows_per_poll": (plane.counters["kernel.flows.dumped"]
                               - out["flows_dumped_first_poll"]) // args.polls,
            "reports_last_poll": len(reports),
            "report_digest": _digest(reports),
            "received_packets": plane.media_counters()["media.received.packets"],
            "dropped_unexpected": plane.counters["media.dropped.unexpected_source"],
            "kernel_errors": plane.counters["kernel.errors"],
        })
        # what an idle relay pays per second: one periodic read every `sweep_interval`
        # (conntrack counting: min(15 s, udp_timeout / 2); older trees: every poll_interval)
        interval = getattr(plane, "sweep_interval", plane.poll_interval)
        out["periodic_interval_s"] = interval
        out["cpu_ms_per_s_periodic"] = round(out["cpu_ms_per_poll_mean"] / interval, 3)
        if prof is not None:
            import io
            import pstats
            text = io.StringIO()
            pstats.Stats(prof, stream=text).sort_stats("tottime").print_stats(args.profile)
            out["profile"] = text.getvalue()
    finally:
        for s in socks:
            s.close()
        loop.run_until_complete(plane.stop())
        loop.close()
    return out


def outer(args: argparse.Namespace) -> int:
    sys.path.insert(0, ROOT)
    from bench.netns import Topology, run

    if os.geteuid() != 0:
        raise SystemExit("needs root: network namespaces, nftables, conntrack")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    pythons = [os.path.abspath(py) if os.sep in py else py
               for py in (args.python or [sys.executable])]
    srcs = [os.path.abspath(s) for s in (args.src or [ROOT])]
    topo = Topology("kp")
    results = []
    try:
        topo.create()
        for src in srcs:
            for python in pythons:
                cmd = ["ip", "netns", "exec", topo.relay.ns, python, os.path.abspath(__file__),
                       "--inner", "--sessions", str(args.sessions), "--polls", str(args.polls),
                       "--packets", str(args.packets), "--counters", args.counters,
                       "--profile", str(args.profile), "--src", src,
                       "--relay-a", topo.relay.ip4, "--relay-b", topo.relay_ext.ip4,
                       "--caller", topo.caller.ip4, "--callee", topo.callee.ip4,
                       "--caller-ns", topo.caller.ns, "--callee-ns", topo.callee.ns,
                       "--outer-ns", str(os.stat("/proc/self/ns/net").st_ino)]
                if args.nft_backend:
                    cmd += ["--nft-backend", args.nft_backend]
                env = dict(os.environ, PYTHONPATH=src)
                proc = subprocess.run(cmd, env=env, cwd=src, capture_output=True, text=True,
                                      timeout=args.timeout)
                run("conntrack", "-F", ns=topo.relay.ns, check=False)
                if proc.returncode != 0:
                    sys.stderr.write(proc.stdout + proc.stderr)
                    raise SystemExit(f"{python} on {src} failed ({proc.returncode})")
                got = json.loads(proc.stdout.strip().splitlines()[-1])
                profile = got.pop("profile", None)
                results.append(got)
                print(json.dumps(got), flush=True)
                if profile:
                    print(profile, flush=True)
    finally:
        topo.destroy()
    if len({r["report_digest"] for r in results}) > 1:
        print("NOTE: report digests differ between runs", flush=True)
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sessions", type=int, default=1000)
    p.add_argument("--polls", type=int, default=20)
    p.add_argument("--packets", type=int, default=3, help="per flow, each direction")
    p.add_argument("--counters", default="conntrack", choices=("conntrack", "rules"))
    p.add_argument("--python", action="append", help="interpreter(s) (default: this one)")
    p.add_argument("--src", action="append", help="source tree(s) to measure (default: .)")
    p.add_argument("--nft-backend", choices=("library", "subprocess"))
    p.add_argument("--profile", type=int, default=0, help="print the top N of a cProfile")
    p.add_argument("--timeout", type=float, default=600.0)
    p.add_argument("--inner", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--outer-ns", type=int, default=-1, help=argparse.SUPPRESS)
    for name in ("relay-a", "relay-b", "caller", "callee", "caller-ns", "callee-ns"):
        p.add_argument(f"--{name}", help=argparse.SUPPRESS)
    args = p.parse_args()
    if not 1 <= args.sessions <= (PORT_END - PORT_BASE) // 4 or not 1 <= args.polls <= 1000:
        p.error(f"--sessions 1..{(PORT_END - PORT_BASE) // 4}, --polls 1..1000")
    if args.inner:
        if args.outer_ns < 0:
            p.error("--inner is the child's half: run without it")
        print(json.dumps(inner(args)), flush=True)
        return 0
    return outer(args)


if __name__ == "__main__":
    sys.exit(main())
