"""Before vs after in one run: an older lrk tree (a git worktree) against this one.

    .venv/bin/python -m bench.before_after control --before /tmp/lrk-before \\
        --out bench/results/before-after-control-<date>.json
    .venv/bin/python -m bench.before_after socket --before /tmp/lrk-before \\
        --out bench/results/before-after-socket-<date>.json

The old tree runs on the same venvs: each relay is started through a small wrapper
(`cd TREE && PYTHONPATH=TREE exec VENV_PYTHON "$@"`). `python -m` puts the working
directory first on sys.path, ahead of PYTHONPATH and of the editable install, so the
wrapper changes directory as well; `check_tree` proves which tree each wrapper imports.
The old relay does not know signed control requests, so it is always driven unsigned.

Every judged run gets a fresh relay process; the variants of a round run one after the
other and the order is reversed every other round. Before each judged run the 1-minute
load average is read, and the run waits (bounded: `--quiet-wait` seconds) for it to fall
below `--quiet-load`; what it found is recorded with the run (`load_before`, `waited_s`,
`busy`: still above the threshold when the wait ran out).

control: closed-loop offer -> answer -> delete (bench.control_load.run_load, 16 calls in
flight, SDP bodies), audio-only calls and audio+video calls (two m= lines), the new relay
with control_auth hmac (default) and "none", and with --metrics scraped every second.

socket: socket mode on PyPy, N sessions set up through the client, the PyPy load
generator of bench.capacity, CPU per packet of the worker at fixed rates, and a bounded
capacity search.

metrics: this tree only (no --before needed), socket mode on PyPy as in `socket`, the relay
with `--metrics 127.0.0.1:PORT` scraped once a second by a bounded scraper thread of this
process (urllib GET /metrics) against the same relay without metrics; order alternated per
round, a fresh relay per run, no capacity search. CPU per delivered packet of the daemon
(control process, where the endpoint runs) and of the worker separately, over each fixed-
rate step (the generator's "run" command only).

    .venv/bin/python -m bench.before_after metrics --rounds 3 \\
        --out bench/results/metrics-onoff-socket-<date>.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import stat
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from contextlib import ExitStack
from typing import Any, Dict, List, Optional, Tuple

import msgpack

from bench import capacity
from bench.control_load import CALLEE, CALLER, MsgpackProtocol, run_load, tree_cpu_seconds
from bench.interpreters import find_interpreters
from bench.ng import audio_sdp
from lrk.client import LrkClient
from lrk.control.auth import sign
from lrk.demo.relay_process import RelayProcess, free_udp_port

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
#: wrappers and keys; $LRK_BA_WORK gives a run its own (two trees benchmarked at once on
#: one machine would otherwise overwrite each other's "after" wrapper)
WORK = os.environ.get("LRK_BA_WORK") or "/tmp/lrk-ba"


def say(text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


# -- load ------------------------------------------------------------------------------

def wait_quiet(threshold: float, max_wait: float) -> Dict[str, Any]:
    """Wait (at most `max_wait` s, 2 s polls) for the 1-minute load below `threshold`."""
    t0 = time.monotonic()
    load = os.getloadavg()[0]
    polls = 0
    while load >= threshold and time.monotonic() - t0 < max_wait and polls < 1000:
        time.sleep(2.0)
        polls += 1
        load = os.getloadavg()[0]
    return {"load_before": round(load, 2), "waited_s": round(time.monotonic() - t0, 1),
            "busy": load >= threshold, "cpu_busy_before": cpu_busy(0.5)}


def cpu_busy(seconds: float) -> float:
    """Share of both CPUs busy (not idle/iowait) over `seconds`, from /proc/stat: what the
    machine's other tenants use just before a run (their processes may be invisible here)."""
    def read() -> List[int]:
        with open("/proc/stat") as fh:
            return [int(x) for x in fh.readline().split()[1:]]
    a = read()
    time.sleep(seconds)
    b = read()
    d = [y - x for x, y in zip(a, b)]
    total = sum(d[:8]) or 1
    return round(1 - (d[3] + d[4]) / total, 3)


# -- trees -----------------------------------------------------------------------------

def wrapper(side: str, tree: str, python: str) -> str:
    """A script that runs `python` with `tree` first on sys.path (cwd and PYTHONPATH)."""
    os.makedirs(WORK, exist_ok=True)
    label = os.path.basename(os.path.dirname(os.path.dirname(python)))  # .venv / .venv-pypy
    path = os.path.join(WORK, f"{side}-{label}")
    with open(path, "w") as fh:
        fh.write(f"#!/bin/sh\ncd {tree} && PYTHONPATH={tree} exec {python} \"$@\"\n")
    os.chmod(path, os.stat(path).st_mode | stat.S_IXUSR)
    return path


def check_tree(wrapped: str, tree: str) -> Dict[str, str]:
    out = subprocess.run([wrapped, "-c", "import lrk, fastpath, sys; "
                          "print(lrk.__file__); print(fastpath.__file__); print(sys.version)"],
                         capture_output=True, text=True, timeout=60, check=True).stdout
    lrk_file, fp_file, version = out.split("\n", 2)
    for f in (lrk_file, fp_file):
        if not f.startswith(tree + "/"):
            raise SystemExit(f"{wrapped} imports {f}, not from {tree}")
    return {"lrk": lrk_file, "fastpath": fp_file, "version": version.strip().split()[0]}


def sides(before: str) -> Dict[Tuple[str, str], str]:
    """{(side, interpreter label): wrapper}, each checked to import its own tree."""
    found = find_interpreters()
    out = {}
    for label, info in found.items():
        for side, tree in (("before", before), ("after", HERE)):
            w = wrapper(side, tree, info["python"])
            info_side = check_tree(w, tree)
            say(f"{side} {label}: {w} imports {info_side['lrk']}")
            out[(side, label)] = w
    return out


# -- control ---------------------------------------------------------------------------

def av_sdp(ip: str, port: int) -> str:
    """audio_sdp plus a video stream (H.264) two ports up."""
    return (audio_sdp(ip, port) + f"m=video {port + 2} RTP/AVP 96\r\n"
            "a=rtpmap:96 H264/90000\r\na=sendrecv\r\n")


class BodyProtocol(MsgpackProtocol):
    """lrk's offer/answer/delete with an SDP body of one (audio) or two (audio+video)
    streams; unsigned when `key` is None."""

    def __init__(self, streams: str, key: Any) -> None:
        super().__init__("sdp", key)
        self.streams = streams

    def build(self, cycles: int, tag: str) -> List[List[bytes]]:
        make = av_sdp if self.streams == "av" else audio_sdp
        wall = time.time()
        out = []
        for cycle in range(cycles):
            call_id = f"bench-{tag}-{cycle}"
            reqs = [
                {"cmd": "offer", "call_id": call_id, "from_tag": "a",
                 "sdp": make(*CALLER), "interface": "external"},
                {"cmd": "answer", "call_id": call_id, "from_tag": "a", "to_tag": "b",
                 "sdp": make(*CALLEE), "interface": "internal"},
                {"cmd": "delete", "call_id": call_id},
            ]
            data = [msgpack.packb(dict(r, cookie=f"{tag}.{cycle}.{step}"))
                    for step, r in enumerate(reqs)]
            if self.key is not None:
                data = [sign(d, self.key, wall) for d in data]
            out.append(data)
        return out


def _probe_streams(addr: Tuple[str, int], protocol: BodyProtocol) -> Dict[str, Any]:
    """One call by hand: how many m= lines the offer reply carries, with non-zero ports."""
    import socket
    datagrams = protocol.build(1, "probe" + os.urandom(2).hex())[0]
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(2.0)
        s.connect(addr)
        replies = []
        for d in datagrams:
            s.send(d)
            replies.append(msgpack.unpackb(s.recv(65535), raw=False))
    sdp = replies[0].get("sdp") or ""
    m = [line for line in sdp.split("\r\n") if line.startswith("m=")]
    return {"ok": [r.get("ok") for r in replies], "m_lines": m,
            "relayed_streams": sum(1 for line in m if line.split()[1] != "0")}


def control_run(python: str, side: str, streams: str, auth: str, metrics: bool,
                cycles: int, warmup: int, window: int) -> Dict[str, Any]:
    signed = side == "after" and auth == "hmac"
    with ExitStack() as stack:
        with tempfile.NamedTemporaryFile("w", suffix=".toml", delete=False) as cfg:
            cfg.write("quarantine = 0.5\n")
            if side == "after" and auth == "none":
                cfg.write('control_auth = "none"\n')
        stack.callback(os.unlink, cfg.name)
        extra = ["--config", cfg.name]
        mport = None
        if metrics:
            mport = free_udp_port()  # a TCP port free too, most likely
            extra += ["--metrics", f"127.0.0.1:{mport}"]
        relay = RelayProcess(ports="10000-29999", python=python, extra=extra,
                             auth="hmac" if signed else "none")
        relay.start()
        stack.callback(relay.stop)
        pid = relay.proc.pid  # type: ignore[union-attr]
        addr = ("127.0.0.1", relay.control_port)
        proto = BodyProtocol(streams, relay.ping_key() if signed else None)
        probe = _probe_streams(addr, proto)
        run_load(addr, warmup, window, protocol=proto)
        scraper = None
        if mport:
            # a separate process (not a thread of this client): one GET a second, bounded
            code = ("import sys,time,urllib.request\nok=0\n"
                    "for i in range(int(sys.argv[2])):\n"
                    "    t=time.monotonic()\n"
                    "    try:\n"
                    "        b=urllib.request.urlopen(sys.argv[1],timeout=2).read(); ok+=1\n"
                    "    except Exception as e: print('scrape error',e,file=sys.stderr)\n"
                    "    sys.stdout.write(f'{ok} {len(b) if ok else 0}\\n'); sys.stdout.flush()\n"
                    "    time.sleep(max(0,1-(time.monotonic()-t)))\n")
            scraper = subprocess.Popen(
                [sys.executable, "-c", code, f"http://127.0.0.1:{mport}/metrics", "120"],
                stdout=subprocess.PIPE, text=True)
            time.sleep(0.2)
        res = run_load(addr, cycles, window, protocol=proto,
                       cpu=lambda: tree_cpu_seconds(pid))
        if scraper is not None:
            scraper.terminate()  # by its own handle (pid), nothing broader
            out, _ = scraper.communicate(timeout=10)
            lines = out.split()
            res["scrapes_ok"] = int(lines[-2]) if len(lines) >= 2 else 0
            res["scrape_bytes"] = int(lines[-1]) if len(lines) >= 2 else 0
        res["probe"] = probe
        res["relay_exit_code"] = relay.stop()
        res["relay_traceback"] = "Traceback" in relay.output
    return res


CONTROL_VARIANTS = [
    # (side, streams, auth, metrics)
    ("before", "audio", "-", False),
    ("after", "audio", "hmac", False),
    ("after", "audio", "none", False),
    ("after", "audio", "hmac", True),
    ("after", "av", "hmac", False),
    ("after", "av", "none", False),
]


def control(args: argparse.Namespace, wrappers: Dict[Tuple[str, str], str]) -> Dict[str, Any]:
    runs: List[Dict[str, Any]] = []
    labels = [x for x in args.interpreters.split(",")]
    chosen = CONTROL_VARIANTS if args.variants == "all" else CONTROL_VARIANTS[:3]
    variants = [(lab, *v) for v in chosen for lab in labels]
    deadline = time.monotonic() + args.budget
    for r in range(args.rounds):
        order = variants if r % 2 == 0 else list(reversed(variants))
        for label, side, streams, auth, metrics in order:
            if time.monotonic() > deadline:
                say("time budget spent: stopping")
                break
            q = wait_quiet(args.quiet_load, args.quiet_wait)
            res = control_run(wrappers[(side, label)], side, streams, auth, metrics,
                              args.cycles, args.warmup, args.window)
            res.update(round=r + 1, interpreter=label, side=side, streams=streams,
                       auth=auth, metrics=metrics, **q)
            runs.append(res)
            say(f"r{r + 1} {label:7} {side:6} {streams:5} auth={auth:4} metrics={metrics!s:5} "
                f"{res['cycles_per_s']:8,.0f} calls/s {res['requests_per_s']:8,.0f} req/s "
                f"server {res.get('server_us_per_request')} us/req p99 {res['p99_ms']} ms "
                f"err {res['errors']} load {q['load_before']} busy {q['cpu_busy_before']} streams "
                f"{res['probe']['relayed_streams']}")
    return {"runs": runs, "summary": control_summary(runs)}


def _median(xs: List[float]) -> Optional[float]:
    xs = sorted(x for x in xs if x is not None)
    if not xs:
        return None
    n = len(xs)
    return xs[n // 2] if n % 2 else (xs[n // 2 - 1] + xs[n // 2]) / 2


def control_summary(runs: List[Dict[str, Any]]) -> Dict[str, Any]:
    groups: Dict[str, List[Dict[str, Any]]] = {}
    for r in runs:
        key = f"{r['interpreter']}/{r['side']}/{r['streams']}/auth={r['auth']}" + \
              ("/metrics" if r["metrics"] else "")
        groups.setdefault(key, []).append(r)
    out = {}
    for key, rs in groups.items():
        out[key] = {
            "runs": len(rs),
            "cycles_per_s_median": _median([r["cycles_per_s"] for r in rs]),
            "cycles_per_s_all": [r["cycles_per_s"] for r in rs],
            "requests_per_s_median": _median([r["requests_per_s"] for r in rs]),
            "server_us_per_request_median": _median([r.get("server_us_per_request")
                                                     for r in rs]),
            "p50_ms_median": _median([r["p50_ms"] for r in rs]),
            "p99_ms_median": _median([r["p99_ms"] for r in rs]),
            "errors": sum(r["errors"] for r in rs),
            "relayed_streams": sorted({r["probe"]["relayed_streams"] for r in rs}),
        }
    return out


# -- socket mode -----------------------------------------------------------------------

class SideHarness(capacity.Harness):
    """bench.capacity's harness with the relay unsigned (`auth` "none") when it is the old
    tree, which knows no signed requests."""

    def __init__(self, python: str, sessions: int, auth: str,
                 extra: Optional[List[str]] = None, **kw: Any) -> None:
        super().__init__(python, sessions, **kw)
        self.auth = auth
        self.extra = list(extra or [])
        self.daemon_pid: Optional[int] = None
        self.scraper: Optional[Scraper] = None

    def _command(self, cmd: dict, timeout: float) -> dict:
        """As the base, plus the daemon's CPU and the scrapes over a generator "run"."""
        if cmd.get("cmd") != "run" or not self.daemon_pid:
            return super()._command(cmd, timeout)
        s0 = self.scraper.ok if self.scraper else None
        d0 = capacity.cpu_seconds(self.daemon_pid)
        res = super()._command(cmd, timeout)
        d1 = capacity.cpu_seconds(self.daemon_pid)
        if d0 is not None and d1 is not None:
            res["daemon_cpu_s"] = round(d1 - d0, 6)
            res["daemon_cpu_us_per_packet"] = (
                round(1e6 * (d1 - d0) / res["received"], 3) if res.get("received") else None)
        if self.scraper is not None and s0 is not None:
            res["scrapes_ok"] = self.scraper.ok - s0
        return res

    def _start(self) -> None:
        callers = [capacity.udp_socket(self.host) for _ in range(self.sessions)]
        callees = [capacity.udp_socket(self.host) for _ in range(self.sessions)]
        self.socks = callers + callees
        self.relay = RelayProcess(ports=self.ports, host=self.host, python=self.python,
                                  extra=["--workers", str(self.workers), *self.extra],
                                  auth=self.auth)
        self.relay.start(ready_timeout=30.0)
        self.daemon_pid = self.relay.proc.pid
        pids = capacity.worker_pids(self.relay.proc.pid)
        self.worker_pid = pids[0] if len(pids) == 1 else None
        self.client = LrkClient([self.relay.node], timeout=2.0, retries=3,
                                key="none" if self.auth == "none" else None)
        spec = []
        for i, (a, b) in enumerate(zip(callers, callees)):
            call_id = f"capacity-{i}"
            self.client.offer(call_id, "cap-a", a.getsockname()[:2])
            answer = self.client.answer(call_id, "cap-a", "cap-b", b.getsockname()[:2])
            spec.append([a.fileno(), b.fileno(), [answer["relay"]["ip"],
                                                  answer["relay"]["port"]]])
        self.gen = capacity.jsonlines.ChildProcess("bench.loadgen", self.socks,
                                                   self.loadgen_python, capacity.BenchError)
        self.loadgen_info = self._command({"cmd": "setup", "sessions": spec}, timeout=60.0)


STEP_KEEP = ("rate", "achieved_rate", "loss", "sent", "received", "relay_forwarded",
             "udp_rcvbuf_errors", "generator_limited", "worker_cpu_s",
             "worker_cpu_us_per_packet", "worker_wakeups", "verdict", "damaged", "checked",
             "min_session_received")


class Scraper:
    """GET `url` once a second from a daemon thread of this process, at most `limit` times,
    until stop(); counts successes, errors and the last body's size."""

    def __init__(self, url: str, limit: int = 600, interval: float = 1.0) -> None:
        self.url, self.limit, self.interval = url, limit, interval
        self.ok = 0
        self.errors: List[str] = []
        self.last_bytes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="scraper", daemon=True)

    def _run(self) -> None:
        for _ in range(self.limit):
            t = time.monotonic()
            try:
                with urllib.request.urlopen(self.url, timeout=2) as r:
                    self.last_bytes = len(r.read())
                self.ok += 1
            except Exception as e:  # recorded, not raised: a failed scrape is a finding
                if len(self.errors) < 20:
                    self.errors.append(repr(e))
            if self._stop.wait(max(0.0, self.interval - (time.monotonic() - t))):
                return

    def start(self) -> Scraper:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


def free_tcp_port(host: str = "127.0.0.1") -> int:
    import socket
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def socket_run(python: str, side: str, sessions: int, rates: List[int], cpu_duration: float,
               max_steps: int, start_rate: int) -> Dict[str, Any]:
    t0 = time.monotonic()
    with SideHarness(python, sessions, "none" if side == "before" else "hmac") as h:
        gen = h.loadgen_info
        warm = h.step(rates[0], 1.0)
        points = []
        for rate in rates:
            res = h.step(rate, cpu_duration)
            points.append({k: res.get(k) for k in STEP_KEEP})
            say(f"  {side} x{sessions} @ {rate}: achieved {res['achieved_rate']:.0f} loss "
                f"{100 * res['loss']:.2f}% worker {res.get('worker_cpu_us_per_packet')} us/pkt")

        def measure(rate: int) -> dict:
            res = h.step(rate, 1.0)
            say(f"  {side} x{sessions} search {rate}: achieved {res['achieved_rate']:.0f} "
                f"loss {100 * res['loss']:.2f}% verdict {capacity.verdict(res)}")
            return res

        found = capacity.search(measure, start_rate, max_steps) if max_steps else None
    out: Dict[str, Any] = {
        "side": side, "sessions": sessions, "points": points,
        "warmup": {"rate": warm["rate"], "loss": warm["loss"]},
        "loadgen": {"impl": gen.get("impl"), "python": gen.get("python"), "io": gen.get("io")},
        "relay_exit_code": h.exit_code, "relay_traceback": "Traceback" in h.relay_output,
        "wall_s": round(time.monotonic() - t0, 1),
    }
    if found is not None:
        out.update({k: v for k, v in found.items() if k != "steps"})
        out["steps"] = [{k: s.get(k) for k in STEP_KEEP} for s in found["steps"]]
    return out


def socket_mode(args: argparse.Namespace,
                wrappers: Dict[Tuple[str, str], str]) -> Dict[str, Any]:
    rates = [int(x) for x in args.rates.split(",")]
    runs = []
    deadline = time.monotonic() + args.budget
    for r in range(args.rounds):
        order = ["before", "after"] if r % 2 == 0 else ["after", "before"]
        for side in order:
            if time.monotonic() > deadline:
                say("time budget spent: stopping")
                break
            q = wait_quiet(args.quiet_load, args.quiet_wait)
            say(f"r{r + 1} socket {side} (load {q['load_before']})")
            res = socket_run(wrappers[(side, "pypy")], side, args.sessions, rates,
                             args.cpu_duration, args.max_steps, args.start_rate)
            res.update(round=r + 1, **q)
            runs.append(res)
            say(f"r{r + 1} socket {side}: capacity {res.get('capacity_pps')} "
                f"(generator-bound {res.get('generator_bound')}), "
                f"worker us/pkt {[p['worker_cpu_us_per_packet'] for p in res['points']]}")
    summary = {}
    for side in ("before", "after"):
        rs = [x for x in runs if x["side"] == side]
        summary[side] = {
            "capacity_pps_all": [x.get("capacity_pps") for x in rs],
            "generator_bound_all": [x.get("generator_bound") for x in rs],
            **{f"worker_us_per_pkt_at_{rate}_median": _median(
                [x["points"][i]["worker_cpu_us_per_packet"] for x in rs])
               for i, rate in enumerate(rates)},
            **{f"worker_us_per_pkt_at_{rate}_all": [x["points"][i]["worker_cpu_us_per_packet"]
                                                    for x in rs]
               for i, rate in enumerate(rates)},
        }
    return {"runs": runs, "summary": summary}


METRICS_KEEP = STEP_KEEP + ("worker_preempted", "daemon_cpu_s", "daemon_cpu_us_per_packet",
                            "scrapes_ok", "relay_drops")


def metrics_run(python: str, metrics: bool, sessions: int, rates: List[int],
                cpu_duration: float) -> Dict[str, Any]:
    """One fresh relay (this tree, signed control), with or without the metrics endpoint;
    the scraper runs from before the warm-up to after the last fixed-rate step."""
    t0 = time.monotonic()
    mport = free_tcp_port() if metrics else None
    extra = ["--metrics", f"127.0.0.1:{mport}"] if metrics else []
    out: Dict[str, Any] = {"metrics": metrics, "metrics_port": mport, "sessions": sessions}
    with SideHarness(python, sessions, "hmac", extra=extra) as h:
        if metrics:
            h.scraper = Scraper(f"http://127.0.0.1:{mport}/metrics").start()
        try:
            warm = h.step(rates[0], 1.0)
            points = []
            for rate in rates:
                res = h.step(rate, cpu_duration)
                points.append({k: res.get(k) for k in METRICS_KEEP})
                say(f"  metrics={'on' if metrics else 'off'} x{sessions} @ {rate}: achieved "
                    f"{res['achieved_rate']:.0f} loss {100 * res['loss']:.2f}% worker "
                    f"{res.get('worker_cpu_us_per_packet')} daemon "
                    f"{res.get('daemon_cpu_us_per_packet')} us/pkt "
                    f"gen-limited {res.get('generator_limited')} scrapes {res.get('scrapes_ok')}")
        finally:
            if h.scraper is not None:
                h.scraper.stop()
        if h.scraper is not None:
            out["scraper"] = {"ok": h.scraper.ok, "errors": h.scraper.errors,
                              "last_bytes": h.scraper.last_bytes}
        gen = h.loadgen_info
    out.update({
        "points": points, "warmup": {"rate": warm["rate"], "loss": warm["loss"]},
        "loadgen": {"impl": gen.get("impl"), "python": gen.get("python"), "io": gen.get("io")},
        "relay_exit_code": h.exit_code, "relay_traceback": "Traceback" in h.relay_output,
        "wall_s": round(time.monotonic() - t0, 1),
    })
    return out


def metrics_mode(args: argparse.Namespace, python: str) -> Dict[str, Any]:
    rates = [int(x) for x in args.rates.split(",")]
    runs: List[Dict[str, Any]] = []
    deadline = time.monotonic() + args.budget
    for r in range(args.rounds):
        order = [False, True] if r % 2 == 0 else [True, False]
        for metrics in order:
            if time.monotonic() > deadline:
                say("time budget spent: stopping")
                break
            q = wait_quiet(args.quiet_load, args.quiet_wait)
            say(f"r{r + 1} metrics={'on' if metrics else 'off'} (load {q['load_before']}, "
                f"waited {q['waited_s']} s)")
            res = metrics_run(python, metrics, args.sessions, rates, args.cpu_duration)
            res.update(round=r + 1, **q)
            runs.append(res)
    return {"runs": runs, "summary": metrics_summary(runs, rates)}


def metrics_summary(runs: List[Dict[str, Any]], rates: List[int]) -> Dict[str, Any]:
    """Per round and rate: on, off and on / off of worker, daemon and total CPU per packet."""
    def per_pkt(run: Dict[str, Any], i: int, what: str) -> Optional[float]:
        p = run["points"][i]
        if what == "total":
            w, d = p.get("worker_cpu_us_per_packet"), p.get("daemon_cpu_us_per_packet")
            return round(w + d, 3) if w is not None and d is not None else None
        return p.get(f"{what}_cpu_us_per_packet")

    rounds: Dict[int, Dict[str, Any]] = {}
    for run in runs:
        rounds.setdefault(run["round"], {})["on" if run["metrics"] else "off"] = run
    table = []
    for rnd, pair in sorted(rounds.items()):
        if "on" not in pair or "off" not in pair:
            continue
        for i, rate in enumerate(rates):
            row: Dict[str, Any] = {"round": rnd, "rate": rate}
            for side in ("off", "on"):
                p = pair[side]["points"][i]
                row[f"achieved_{side}"] = p.get("achieved_rate")
                row[f"generator_limited_{side}"] = p.get("generator_limited")
                row[f"loss_{side}"] = p.get("loss")
                row[f"load_before_{side}"] = pair[side]["load_before"]
            for what in ("worker", "daemon", "total"):
                on, off = per_pkt(pair["on"], i, what), per_pkt(pair["off"], i, what)
                row[f"{what}_us_per_pkt_off"] = off
                row[f"{what}_us_per_pkt_on"] = on
                row[f"{what}_ratio_on_off"] = round(on / off, 3) if on and off else None
            for side in ("off", "on"):  # absolute: the daemon's CPU over the step (ms)
                d = pair[side]["points"][i].get("daemon_cpu_s")
                row[f"daemon_cpu_ms_{side}"] = round(1e3 * d, 2) if d is not None else None
            row["scrapes_ok_on"] = pair["on"]["points"][i].get("scrapes_ok")
            table.append(row)
    medians = {}
    for rate in rates:
        rows = [x for x in table if x["rate"] == rate]
        for what in ("worker", "daemon", "total"):
            medians[f"{what}_ratio_on_off_at_{rate}_median"] = _median(
                [x[f"{what}_ratio_on_off"] for x in rows])
            for side in ("off", "on"):
                medians[f"{what}_us_per_pkt_{side}_at_{rate}_median"] = _median(
                    [x[f"{what}_us_per_pkt_{side}"] for x in rows])
    return {"paired": table, **medians}


# -- command line ----------------------------------------------------------------------

def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("what", choices=("control", "socket", "metrics"))
    p.add_argument("--before", default="/tmp/lrk-before", help="the old tree (a worktree)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--interpreters", default="cpython,pypy")
    p.add_argument("--variants", choices=("all", "audio"), default="all",
                   help="control: every variant, or only audio calls (v0.1, hmac, none): "
                        "more rounds of the like-for-like pair in the same time")
    p.add_argument("--cycles", type=int, default=10000, help="control: calls per judged run")
    p.add_argument("--warmup", type=int, default=2000, help="control: warm-up calls per relay")
    p.add_argument("--window", type=int, default=16)
    p.add_argument("--sessions", type=int, default=1000, help="socket: sessions")
    p.add_argument("--rates", default="20000,50000", help="socket: fixed rates (pkt/s)")
    p.add_argument("--cpu-duration", type=float, default=2.0)
    p.add_argument("--max-steps", type=int, default=7, help="socket: capacity search steps")
    p.add_argument("--start-rate", type=int, default=40000)
    p.add_argument("--quiet-load", type=float, default=0.7)
    p.add_argument("--quiet-wait", type=float, default=20.0,
                   help="longest wait for a quiet machine before each judged run (s)")
    p.add_argument("--budget", type=float, default=900.0, help="no new run after this (s)")
    p.add_argument("--out")
    args = p.parse_args(argv)
    # a private key directory, shared by relay (environment) and this client
    os.makedirs(os.path.join(WORK, "keys"), mode=0o700, exist_ok=True)
    os.environ["LRK_KEYS"] = os.path.join(WORK, "keys")
    if args.what == "metrics":  # this tree only
        pypy = find_interpreters()["pypy"]["python"]
        w = wrapper("after", HERE, pypy)
        say(f"after pypy: {w} imports {check_tree(w, HERE)['lrk']}")
        wrappers = {("after", "pypy"): w}
    else:
        wrappers = sides(args.before)
    before_rev = subprocess.run(["git", "-C", args.before, "rev-parse", "HEAD"],
                                capture_output=True, text=True).stdout.strip()
    after_rev = subprocess.run(["git", "-C", HERE, "rev-parse", "HEAD"],
                               capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "-C", HERE, "status", "--short", "lrk", "fastpath"],
                           capture_output=True, text=True).stdout
    report: Dict[str, Any] = {
        "what": args.what, "argv": sys.argv, "args": vars(args),
        "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "loadavg_at_start": os.getloadavg(),
        "before": (None if args.what == "metrics"
                   else {"tree": args.before, "commit": before_rev}),
        "after": {"tree": HERE, "commit": after_rev, "uncommitted_product_changes": dirty},
        "wrappers": {f"{s}/{lab}": w for (s, lab), w in wrappers.items()},
        "machine": capacity.machine(), "client": sys.executable,
        "platform": platform.platform(),
    }
    if args.what == "control":
        report.update(control(args, wrappers))
    elif args.what == "metrics":
        report.update(metrics_mode(args, wrappers[("after", "pypy")]))
    else:
        report.update(socket_mode(args, wrappers))
    report["finished"] = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    report["loadavg_at_end"] = os.getloadavg()
    text = json.dumps(report, indent=1, default=str)
    if args.out:
        with open(args.out, "w") as fh:
            fh.write(text + "\n")
    print(json.dumps(report["summary"], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
