"""Media gap per call across a relay restart (calls survive: `state_dir`).

    .venv/bin/python -m bench.restart_gap --calls 200 --how sigterm,kill \\
        --python .venv-pypy/bin/python --out bench/results/restart-gap-<date>.json

For each way of restarting (`sigterm`: what `systemctl restart` does; `kill`: SIGKILL of
the daemon, a crash), in socket mode on loopback: a fresh relay with a temporary
state_dir, N two-way calls set up through `lrk.client`, RTP at 50 packets/s per
direction on every call (one 172-byte packet per call and direction every 20 ms, sent
by this process), then the relay is restarted with the same command line while media
keeps flowing, and media goes on for `--after` seconds once the new relay answers.

Per call and direction: the longest interval between two packets that arrived (20 ms
when nothing was lost) and the packets lost. The figure is the media gap: median and
worst over every direction of every call, and the loss per call. The generator is one
thread sending 2N packets per 20 ms tick and draining its sockets in between; it
records how many ticks it missed (`late_ticks`), so a gap it caused itself shows.
Bounded: at most 2,000 calls and 30 s per restart.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import select
import socket
import statistics
import struct
import sys
import tempfile
import threading
import time
from typing import Any, Dict, List, Optional

from lrk.client import LrkClient
from lrk.demo.relay_process import RelayProcess, next_port_range

TICK = 0.020
MAX_CALLS = 2000
MAX_SECONDS = 30.0


def _socket() -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("127.0.0.1", 0))
    s.setblocking(False)
    return s


def _packet(stream: int, seq: int) -> bytes:
    return struct.pack("!BBHII", 0x80, 0, seq & 0xFFFF, seq * 160, stream) + bytes(160)


def run_once(how: str, calls: int, before: float, after: float,
             python: Optional[str]) -> Dict[str, Any]:
    """One relay, `calls` calls, one restart `how`; the gaps and losses it caused."""
    state = tempfile.TemporaryDirectory(prefix="lrk-restart-")
    relay = RelayProcess(ports=next_port_range(4 * calls + 64), python=python,
                         extra=["--state-dir", state.name])
    relay.start()
    socks: List[socket.socket] = []
    second: Optional[RelayProcess] = None
    try:
        legs = []  # per call: (caller sock, callee sock, relay addr for A, for B)
        with LrkClient([relay.node], timeout=2.0, retries=3) as client:
            for i in range(calls):
                caller, callee = _socket(), _socket()
                socks += [caller, callee]
                to_b = client.offer(f"gap-{i}", "a", caller.getsockname())["relay"]
                to_a = client.answer(f"gap-{i}", "a", "b", callee.getsockname())["relay"]
                legs.append((caller, callee, (to_a["ip"], to_a["port"]),
                             (to_b["ip"], to_b["port"])))
        # stream 2i: caller -> callee, 2i+1: callee -> caller; the receiving socket
        by_fd = {}
        for i, (caller, callee, _a, _b) in enumerate(legs):
            by_fd[callee.fileno()] = (callee, 2 * i)
            by_fd[caller.fileno()] = (caller, 2 * i + 1)
        sent = [0] * (2 * calls)
        got = [0] * (2 * calls)
        last = [0.0] * (2 * calls)
        gap = [0.0] * (2 * calls)
        events: Dict[str, float] = {}
        restarted = threading.Event()

        def restart() -> None:
            nonlocal second
            events["restart"] = time.monotonic()
            if how == "sigterm":
                relay.stop()
            else:
                relay.kill()
            events["old_gone"] = time.monotonic()
            second = relay.again().start()
            events["new_ready"] = time.monotonic()
            restarted.set()

        poller = select.epoll()
        for fd in by_fd:
            poller.register(fd, select.EPOLLIN)
        t0 = time.monotonic()
        deadline = t0 + MAX_SECONDS
        next_tick = t0
        late = 0
        thread: Optional[threading.Thread] = None
        seq = 0
        while True:
            now = time.monotonic()
            if now >= deadline:
                break
            if thread is None and now - t0 >= before:
                thread = threading.Thread(target=restart, daemon=True)
                thread.start()
            if restarted.is_set() and now - events["new_ready"] >= after:
                break
            if now >= next_tick:
                if now - next_tick > TICK:
                    late += 1
                for i, (caller, callee, to_a, to_b) in enumerate(legs):
                    try:
                        caller.sendto(_packet(2 * i, seq), to_a)
                        sent[2 * i] += 1
                    except OSError:
                        pass
                    try:
                        callee.sendto(_packet(2 * i + 1, seq), to_b)
                        sent[2 * i + 1] += 1
                    except OSError:
                        pass
                seq += 1
                next_tick += TICK
                if next_tick < now - 5 * TICK:
                    next_tick = now  # far behind: skip, counted in `late`
            wait = max(0.0, min(next_tick - time.monotonic(), TICK))
            for fd, _ev in poller.poll(wait):
                sock, stream = by_fd[fd]
                while True:
                    try:
                        sock.recv(2048)
                    except (BlockingIOError, OSError):
                        break
                    t = time.monotonic()
                    if last[stream]:
                        gap[stream] = max(gap[stream], t - last[stream])
                    last[stream] = t
                    got[stream] += 1
        if thread is not None:
            thread.join(MAX_SECONDS)
        poller.close()
        gaps_ms = sorted(g * 1000 for g in gap)
        lost = [sent[s] - got[s] for s in range(2 * calls)]
        per_call_lost = [lost[2 * i] + lost[2 * i + 1] for i in range(calls)]
        return {
            "how": how, "calls": calls, "relay_python": python or sys.executable,
            "restart_s": round(events.get("new_ready", 0) - events.get("restart", 0), 3),
            "old_gone_s": round(events.get("old_gone", 0) - events.get("restart", 0), 3),
            "gap_ms_median": round(statistics.median(gaps_ms), 1),
            "gap_ms_p90": round(gaps_ms[int(0.9 * (len(gaps_ms) - 1))], 1),
            "gap_ms_worst": round(gaps_ms[-1], 1),
            "lost_per_call_median": statistics.median(per_call_lost),
            "lost_per_call_worst": max(per_call_lost),
            "calls_without_media_after": sum(
                1 for s in range(2 * calls) if last[s] < events.get("new_ready", 0)),
            "sent": sum(sent), "received": sum(got), "late_ticks": late,
        }
    finally:
        for s in socks:
            s.close()
        if second is not None:
            second.stop()
        else:
            relay.stop()
        state.cleanup()


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--calls", type=int, default=200)
    p.add_argument("--how", default="sigterm,kill")
    p.add_argument("--before", type=float, default=2.0, help="media before the restart (s)")
    p.add_argument("--after", type=float, default=3.0, help="media after it is ready (s)")
    p.add_argument("--python", help="the relay's interpreter (default: this one)")
    p.add_argument("--out")
    args = p.parse_args(argv)
    if not 0 < args.calls <= MAX_CALLS:
        p.error(f"--calls must be 1..{MAX_CALLS}")
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = 2 * args.calls + 256
    if soft < need:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(need, hard), hard))
    results = []
    for how in args.how.split(","):
        res = run_once(how, args.calls, args.before, args.after, args.python)
        print(json.dumps(res), flush=True)
        results.append(res)
    if args.out:
        with open(args.out, "w") as fh:
            json.dump({"argv": sys.argv, "started": time.strftime("%Y-%m-%d %H:%M:%S UTC",
                                                                   time.gmtime()),
                       "loadavg": os.getloadavg(), "results": results}, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
