"""lrk against rtpengine, side by side, in one run: the numbers an operator chooses by.

    .venv/bin/python -m bench.compare                 # full form, root, ~10 min
    .venv/bin/python -m bench.compare --quick         # the test suite's short form

Stages, each against every peer in the same run and the same topology:

1. media (root): caller <-> relay <-> callee network namespaces (`bench.netns_capacity`):
   plain routing and a static DNAT/SNAT rule set as baselines, lrk in every mode the
   machine allows (kernel, nfqueue, socket, packet) and Debian's rtpengine-daemon
   (userspace forwarding: its kernel module cannot load here). Capacity (< 1 % loss),
   loss against offered rate, delivered at 2x capacity, CPU per packet at equal load,
   first-packet latency, session installs per second, memory per session;
2. calls (root): `bench.callgen` -- N calls at 50 packets/s per direction through each
   relay: added latency percentiles, jitter, loss, reordering;
3. control: pipelined offer + answer + delete against lrk (msgpack; CPython + uvloop and
   PyPy) and rtpengine (NG, bencode over UDP), reply latency percentiles.

Output: a directory under bench/results/ with report.json (every figure and the machine
description), results.md (the table) and PNG plots (`bench.plots`). Progress goes to
stderr while it runs. Every process, namespace and table it makes is gone at the end,
also on Ctrl-C.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import time
from typing import Any, Callable, Dict, List, Optional

from bench.capacity import machine as _machine_basics
from bench.interpreters import REPO_ROOT, find_interpreters
from lrk.errors import LrkError

RESULTS_DIR = os.path.join(REPO_ROOT, "bench", "results")
#: lrk modes in the media stage, in table order; rtpengine last
LRK_MODES = ("kernel", "nfqueue", "socket", "packet")
BASELINES = ("routing", "static-nat")
PEER = "rtpengine"


class CompareError(RuntimeError):
    """A stage could not run (not root, rtpengine missing, ...): the message says how to fix."""


class Progress:
    """One line per event on stderr, with the elapsed time and the stage it belongs to."""

    def __init__(self, stages: int, stream: Any = None) -> None:
        self.stages = stages
        self.stage = 0
        self.name = ""
        self.t0 = time.monotonic()
        self.stream = stream or sys.stderr

    def begin(self, name: str) -> None:
        self.stage += 1
        self.name = name
        self(f"=== stage {self.stage}/{self.stages}: {name}")

    def __call__(self, text: str) -> None:
        elapsed = int(time.monotonic() - self.t0)
        prefix = f"[{elapsed // 60:02d}:{elapsed % 60:02d} {self.stage}/{self.stages}"
        prefix += f" {self.name}]" if self.name else "]"
        print(f"{prefix} {text}", file=self.stream, flush=True)


# -- machine description ---------------------------------------------------------------


def _first_line(cmd: List[str]) -> Optional[str]:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    text = (out.stdout or out.stderr).strip()
    return text.splitlines()[0] if text else None


def cpus_allowed(task: str = "self") -> Optional[str]:
    """The CPUs a task may run on, as /proc says them ("0-1"): this process, or "PID" or
    "PID/task/TID" (PyPy has no os.sched_getaffinity); None when /proc has no such task."""
    try:
        with open(f"/proc/{task}/status") as fh:
            for line in fh:
                if line.startswith("Cpus_allowed_list:"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def machine() -> Dict[str, Any]:
    """What the figures were measured on; a ratio is only comparable within one machine."""
    info: Dict[str, Any] = dict(_machine_basics())
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemTotal:"):
                    info["mem_total_kib"] = int(line.split()[1])
                    break
    except OSError:
        pass
    try:
        with open("/etc/os-release") as fh:
            rel = dict(line.rstrip("\n").split("=", 1) for line in fh if "=" in line)
        info["os"] = rel.get("PRETTY_NAME", "").strip('"')
    except OSError:
        pass
    info["arch"] = platform.machine()
    info["affinity"] = cpus_allowed()
    info["interpreters"] = {k: {"python": v["python"], "version": v.get("version"),
                                "pypy": v.get("pypy")}
                            for k, v in find_interpreters().items()}
    info["rtpengine"] = _first_line(["rtpengine", "--version"])
    info["virtualization"] = _first_line(["systemd-detect-virt"])
    return info


# -- stages ----------------------------------------------------------------------------


def media_stage(sessions: List[int], modes: List[str], quick: bool, say: Progress,
                **over: Any) -> dict:
    from bench.netns_capacity import run_bench

    return run_bench(sessions, modes, quick=quick, progress=say, tag="cmp", **over)


def calls_stage(peers: List[str], quick: bool, say: Progress) -> dict:
    from bench.calls import run_calls

    return run_calls(peers, calls=20 if quick else 200, duration=1.0 if quick else 5.0,
                     progress=say, tag="cmc")


def control_stage(quick: bool, say: Progress) -> dict:
    from bench import control_load

    return control_load.compare(quick=quick, progress=say)


# -- the table -------------------------------------------------------------------------


def _f(v: Any, spec: str = ",.0f") -> str:
    if v is None:
        return "-"
    try:
        return format(v, spec)
    except (TypeError, ValueError):
        return str(v)


def table(report: dict) -> str:
    """results.md: the figures as Markdown tables, with the machine they come from."""
    m = report.get("machine", {})
    lines = [f"# lrk vs rtpengine, {m.get('time', '')}", "",
             f"Command: `{report.get('command', '')}`", "",
             f"Machine: {m.get('nproc')} CPUs ({m.get('cpu')}), "
             f"{_f((m.get('mem_total_kib') or 0) / 1048576, '.1f')} GiB, {m.get('os')}, "
             f"kernel {m.get('kernel')}, {m.get('virtualization') or 'bare metal?'}, load "
             f"{' '.join(m.get('loadavg', []))} at start. rtpengine {m.get('rtpengine')}.", ""]
    media = (report.get("media") or {}).get("results") or []
    memory = {c["mode"]: c.get("memory") or {}
              for c in (report.get("calls") or {}).get("results") or []}
    if media:
        lines += ["## Media (caller -> relay -> callee namespaces, one direction)", "",
                  "| relay | sessions | capacity pkt/s | delivered at 2x | CPU µs/pkt at "
                  "equal load | first packet µs | installs/s | memory/session (RSS + slab) |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|"]
        for r in media:
            ov = r.get("overload") or {}
            mem = memory.get(r["mode"]) or {}
            lines.append(
                f"| {r['mode']} | {r['sessions']} | {_f(r.get('capacity_pps'))}"
                f"{' (gen)' if r.get('generator_bound') else ''} | "
                f"{_f(ov.get('delivered_over_capacity'), '.2f')}x | "
                f"{_f((r.get('cpu') or {}).get('relay_ns_us'), '.2f')} | "
                f"{_f((r.get('latency') or {}).get('first_median_us'))} | "
                f"{_f((r.get('setup') or {}).get('per_second'))} | "
                f"{_f(mem.get('rss_bytes_per_session'), ',.0f')} + "
                f"{_f(mem.get('slab_bytes_per_session'), ',.0f')} B |")
        lines.append("")
    calls = (report.get("calls") or {}).get("results") or []
    if calls:
        c0 = report["calls"]
        lines += [f"## Calls: {c0.get('calls')} calls x 2 directions at "
                  f"{c0.get('pps_per_stream')} pkt/s", "",
                  "| relay | delivered | loss | reordered | latency p50 / p90 / p99 / max ms "
                  "| jitter p50 / max ms |", "|---|---:|---:|---:|---|---|"]
        for c in calls:
            lat, jit = c.get("latency_ms") or {}, c.get("jitter_ms") or {}
            lines.append(
                f"| {c['mode']} | {_f(c.get('received'))} | {_f(100 * (c.get('loss') or 0), '.3f')}"
                f" % | {_f(c.get('reordered'))} | {_f(lat.get('p50'), '.3f')} / "
                f"{_f(lat.get('p90'), '.3f')} / {_f(lat.get('p99'), '.3f')} / "
                f"{_f(lat.get('max'), '.3f')} | {_f(jit.get('p50'), '.3f')} / "
                f"{_f(jit.get('max'), '.3f')} |")
        lines.append("")
    control = (report.get("control") or {}).get("results") or []
    if control:
        lines += ["## Control plane (offer + answer + delete, pipelined)", "",
                  "| peer | requests/s | p50 ms | p99 ms | errors |", "|---|---:|---:|---:|---:|"]
        for c in control:
            lines.append(f"| {c['peer']} | {_f(c.get('req_per_s'))} | "
                         f"{_f(c.get('p50_ms'), '.2f')} | {_f(c.get('p99_ms'), '.2f')} | "
                         f"{_f(c.get('errors'))} |")
        lines.append("")
    targets = report.get("targets") or []
    if targets:
        lines += ["## Targets", "", "| target | figure | met |", "|---|---|---|"]
        for t in targets:
            lines.append(f"| {t['target']} | {t['figure']} | "
                         f"{'yes' if t['met'] else 'no' if t['met'] is False else '-'} |")
        lines.append("")
    plots = report.get("plots") or []
    if plots:
        lines += ["## Plots", ""] + [f"![{p}]({p})" for p in plots] + [""]
    return "\n".join(lines)


# -- the run ---------------------------------------------------------------------------


def run(args: argparse.Namespace, say: Progress) -> dict:
    report: Dict[str, Any] = {"machine": machine(), "errors": {}}
    stages: List[tuple] = []
    if "media" in args.stages:
        modes = [*BASELINES, *LRK_MODES, PEER] if not args.modes else args.modes
        stages.append(("media", lambda: media_stage(args.sessions, modes, args.quick, say)))
    if "calls" in args.stages:
        peers = [m for m in (args.modes or [*LRK_MODES, PEER]) if m not in BASELINES]
        stages.append(("calls", lambda: calls_stage(peers, args.quick, say)))
    if "control" in args.stages:
        stages.append(("control", lambda: control_stage(args.quick, say)))
    say.stages = len(stages)
    for name, fn in stages:
        say.begin(name)
        try:
            report[name] = fn()
        except (CompareError, LrkError, RuntimeError, OSError) as exc:
            # one stage failing (e.g. not root) still leaves the others' figures
            report["errors"][name] = f"{type(exc).__name__}: {exc}"
            say(f"stage {name} failed: {exc}")
    report["targets"] = targets(report)
    return report


def _ratio(a: Optional[float], b: Optional[float]) -> Optional[float]:
    return round(a / b, 3) if a and b else None


def targets(report: dict) -> List[dict]:
    """The issue's targets, each judged by the figure named beside it (None: not measured)."""
    out: List[dict] = []
    media = (report.get("media") or {}).get("results") or []
    by = {(r["mode"], r["sessions"]): r for r in media}
    for n in sorted({r["sessions"] for r in media}):
        peer = by.get((PEER, n))
        for mode in ("socket", "packet"):
            r = by.get((mode, n))
            if r is None or peer is None:
                continue
            target = (f"lrk {mode} (PyPy, 1 worker) capacity >= 2x rtpengine (1 thread), "
                      f"{n} session(s)")
            gen = " (lrk generator-bound)" if r.get("generator_bound") else ""
            start = (report.get("media") or {}).get("options", {}).get("start_rate")
            if not peer.get("capacity_pps") and r.get("capacity_pps") and start:
                # rtpengine lost even the search's first step: its capacity is below it
                low = round(r["capacity_pps"] / start, 2)
                out.append({"target": target, "met": low >= 2.0,
                            "figure": f">= {low}x ({r['capacity_pps']} pkt/s vs rtpengine "
                                      f"failing the first step, {start} pkt/s){gen}"})
            else:
                cap = _ratio(r.get("capacity_pps"), peer.get("capacity_pps"))
                out.append({"target": target, "met": None if cap is None else cap >= 2.0,
                            "figure": f"{cap}x ({r.get('capacity_pps')} vs "
                                      f"{peer.get('capacity_pps')} pkt/s){gen}"})
            cpu = _ratio((r.get("cpu") or {}).get("relay_us"),
                         (peer.get("cpu") or {}).get("relay_us"))
            if cpu is None and not (peer.get("cpu") or {}).get("relay_us"):
                continue  # rtpengine did not carry the equal load: no figure to judge by
            rate = (report.get("media") or {}).get("options", {}).get("cpu_rate")
            out.append({"target": f"lrk {mode} CPU/packet <= 1/3 of rtpengine's at equal load "
                                  f"({rate} pkt/s), {n} session(s)",
                        "figure": f"{cpu}x ({(r.get('cpu') or {}).get('relay_us')} vs "
                                  f"{(peer.get('cpu') or {}).get('relay_us')} µs/pkt, "
                                  "relay processes)",
                        "met": None if cpu is None else cpu <= 1 / 3})
    calls = {c["mode"]: c for c in (report.get("calls") or {}).get("results") or []}
    if PEER in calls:
        for mode in ("socket", "packet"):
            if mode in calls:
                cpu = _ratio(calls[mode].get("relay_cpu_us_per_packet"),
                             calls[PEER].get("relay_cpu_us_per_packet"))
                out.append({"target": f"lrk {mode} CPU/packet <= 1/3 of rtpengine's, "
                                      f"{calls[mode]['calls']} two-way calls at 50 pkt/s",
                            "figure": f"{cpu}x", "met": None if cpu is None else cpu <= 1 / 3})
    control = {c["peer"]: c for c in (report.get("control") or {}).get("results") or []}
    rtpe = next((c for name, c in control.items() if name.startswith(PEER)
                 and name.endswith("1t")), None)
    lrk = [c for name, c in control.items() if name.startswith("lrk")]
    if rtpe and lrk:
        best = max(lrk, key=lambda c: c.get("req_per_s") or 0)
        ratio = _ratio(best.get("req_per_s"), rtpe.get("req_per_s"))
        out.append({"target": "lrk control plane >= 2x rtpengine's offer+answer+delete rate",
                    "figure": f"{ratio}x ({best['peer']} {best.get('req_per_s')} vs "
                              f"{rtpe['peer']} {rtpe.get('req_per_s')} req/s)",
                    "met": None if ratio is None else ratio >= 2.0})
    return out


def write(report: dict, outdir: str, say: Callable[[str], None]) -> List[str]:
    from bench.plots import PlotError, draw_in_cpython

    os.makedirs(outdir, exist_ok=True)
    path = os.path.join(outdir, "report.json")
    with open(path, "w") as fh:
        json.dump(report, fh, indent=1)
        fh.write("\n")
    try:
        report["plots"] = [os.path.basename(p) for p in draw_in_cpython(path, outdir)]
    except PlotError as exc:
        report["errors"]["plots"] = str(exc)
        say(f"plots: {exc}")
    with open(path, "w") as fh:
        json.dump(report, fh, indent=1)
        fh.write("\n")
    md = os.path.join(outdir, "results.md")
    with open(md, "w") as fh:
        fh.write(table(report))
    return [path, md] + [os.path.join(outdir, p) for p in report.get("plots", [])]


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.compare",
                                description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="short form (the test suite's)")
    p.add_argument("--sessions", default=None, help="media stage session counts (1,1000)")
    p.add_argument("--modes", default=None, help="media stage relays (default: all)")
    p.add_argument("--stages", default="media,calls,control")
    p.add_argument("--out", default=None, help="output directory "
                   "(default bench/results/compare-<time>)")
    p.add_argument("--render", metavar="DIR", help="redo the targets, table and plots of an "
                   "earlier run's DIR/report.json (nothing is measured)")
    args = p.parse_args(argv)
    if args.render:
        with open(os.path.join(args.render, "report.json")) as fh:
            report = json.load(fh)
        report["targets"] = targets(report)
        for path in write(report, args.render, lambda text: print(text, file=sys.stderr)):
            print(path)
        return 0
    args.sessions = [int(x) for x in (args.sessions or ("1,10" if args.quick else "1,1000"))
                     .split(",") if x.strip()]
    args.modes = [x.strip() for x in args.modes.split(",")] if args.modes else None
    args.stages = [x.strip() for x in args.stages.split(",") if x.strip()]
    outdir = args.out or os.path.join(RESULTS_DIR, time.strftime("compare-%Y%m%d-%H%M%S"))

    def stop(signum: int, _frame: Any) -> None:
        raise SystemExit(128 + signum)  # unwinds: relays stopped, namespaces deleted

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGHUP, stop)
    say = Progress(0)
    report = run(args, say)
    report["command"] = "python -m bench.compare " + " ".join(
        argv if argv is not None else sys.argv[1:])
    for path in write(report, outdir, say):
        print(path)
    print(table(report))
    return 1 if report["errors"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
