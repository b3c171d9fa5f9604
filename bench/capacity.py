"""Relay capacity in socket mode: the highest offered RTP rate a relay forwards with < 1% loss.

`find_capacity(python, sessions)` starts `lrkproxy run` with that interpreter
(one worker), sets up `sessions` calls through the control client, starts the
load generator (`bench.loadgen --serve`, PyPy when available) with the
caller/callee sockets inherited by fd, and searches the rate: a doubling ramp,
then bisection, every step bounded in time, the number of steps bounded.  At
the end one fixed-rate step measures the worker's CPU time per packet, so the
interpreters can be compared at equal load.  Rates are packets/s in one
direction (caller -> relay -> callee), summed over all sessions.

    python -m bench.capacity --sessions 1,100 --interpreters cpython,pypy \\
        --out bench/results/capacity.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import socket
import sys
import time
from typing import Callable, Dict, List, Optional, Tuple

from bench import jsonlines
from bench.interpreters import find_interpreters, pypy_or_current
from bench.loadgen import MAX_DURATION, MAX_RATE, udp_socket
from lrk.client import LrkClient
from lrk.demo.relay_process import RelayProcess

LOSS_LIMIT = 0.01
#: full form: doubling from START_RATE, <= MAX_STEPS steps of STEP_DURATION s
START_RATE = 5000
MAX_STEPS = 12
STEP_DURATION = 1.0
#: quick form (the test suite): fewer and shorter steps
QUICK_START_RATE = 10000
QUICK_MAX_STEPS = 6
QUICK_STEP_DURATION = 0.3
#: the equal-load step that measures CPU per packet
CPU_RATE = 20000
#: full form only: a second equal-load point closer to saturation, where the worker
#: sleeps rarely and the per-packet cost is its own rather than that of wake-ups
HIGH_CPU_RATE = 100000
#: bisection stops once the bracket is this tight (relative)
PRECISION = 0.05
GRACE = 0.3
#: relay port region: below the ephemeral range and below the default 30000-40000
PORT_REGION = (12000, 29999)

_port_slices = itertools.count()
Progress = Callable[[str], None]
#: what the result keeps of each search step
STEP_KEYS = ("rate", "achieved_rate", "loss", "sent", "received", "relay_forwarded",
             "relay_drops", "udp_rcvbuf_errors", "late", "stale", "skipped", "stalls", "max_gap_ms",
             "generator_limited", "worker_cpu_s", "worker_wakeups", "verdict")


def next_ports(sessions: int) -> str:
    """A port range of 4 ports per session plus slack, unique per run and process."""
    size = 4 * sessions + max(32, sessions)
    size += (-size) % 64
    lo, hi = PORT_REGION
    span = hi - lo + 1 - size
    start = lo + ((os.getpid() % 61) * 320 + next(_port_slices) * size) % span
    start -= start % 2
    return f"{start}-{start + size - 1}"


def worker_pids(pid: int) -> List[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as fh:
            return [int(p) for p in fh.read().split()]
    except OSError:
        return []


_CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def cpu_seconds(pid: int) -> Optional[float]:
    """CPU time of a process (all threads): schedstat run time (ns precision) when
    the kernel has it, else utime + stime from /proc/PID/stat (clock ticks)."""
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return None
    total = 0
    try:
        for tid in tids:
            with open(f"/proc/{pid}/task/{tid}/schedstat") as fh:
                total += int(fh.read().split()[0])
        return total / 1e9
    except (OSError, ValueError, IndexError):
        pass
    try:
        with open(f"/proc/{pid}/stat") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / _CLK_TCK  # utime, stime
    except (OSError, ValueError, IndexError):
        return None


def ctx_switches(pid: int) -> Optional[Tuple[int, int]]:
    """(voluntary, involuntary) context switches of a process's main thread: the
    voluntary ones count the worker's sleeps in epoll, i.e. its wake-ups."""
    try:
        with open(f"/proc/{pid}/status") as fh:
            values = {k: v for k, _, v in (line.partition(":") for line in fh)}
        return (int(values["voluntary_ctxt_switches"]),
                int(values["nonvoluntary_ctxt_switches"]))
    except (OSError, KeyError, ValueError):
        return None


def udp_rcvbuf_errors() -> Optional[int]:
    """Udp RcvbufErrors of this network namespace (all sockets, also other processes')."""
    try:
        with open("/proc/net/snmp") as fh:
            rows = [line.split() for line in fh if line.startswith("Udp:")]
        return int(rows[1][rows[0].index("RcvbufErrors")])
    except (OSError, ValueError, IndexError):
        return None


class BenchError(RuntimeError):
    pass


class Harness:
    """A relay with `sessions` calls set up and a load generator wired to them."""

    def __init__(self, python: str, sessions: int, *, loadgen_python: Optional[str] = None,
                 workers: int = 1, host: str = "127.0.0.1",
                 relay_env: Optional[Dict[str, str]] = None) -> None:
        self.python = python
        self.relay_env = relay_env
        self.sessions = sessions
        self.loadgen_python = loadgen_python or pypy_or_current()
        self.workers = workers
        self.host = host
        self.ports = next_ports(sessions)
        self.relay: Optional[RelayProcess] = None
        self.client: Optional[LrkClient] = None
        self.gen: Optional[jsonlines.ChildProcess] = None
        self.socks: List[socket.socket] = []
        self.worker_pid: Optional[int] = None
        self.exit_code: Optional[int] = None
        self.relay_output = ""
        self.loadgen_info: dict = {}

    # -- lifecycle ------------------------------------------------------------------
    def __enter__(self) -> Harness:
        try:
            self._start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _start(self) -> None:
        callers = [udp_socket(self.host) for _ in range(self.sessions)]
        callees = [udp_socket(self.host) for _ in range(self.sessions)]
        self.socks = callers + callees
        self.relay = RelayProcess(ports=self.ports, host=self.host, python=self.python,
                                  extra=["--workers", str(self.workers)], env=self.relay_env)
        self.relay.start(ready_timeout=30.0)
        pids = worker_pids(self.relay.proc.pid)
        self.worker_pid = pids[0] if len(pids) == 1 else None
        self.client = LrkClient([self.relay.node], timeout=2.0, retries=3)
        spec = []
        for i, (a, b) in enumerate(zip(callers, callees)):
            call_id = f"capacity-{i}"
            self.client.offer(call_id, "cap-a", a.getsockname()[:2])
            answer = self.client.answer(call_id, "cap-a", "cap-b", b.getsockname()[:2])
            # answer's relay port is where the caller sends
            spec.append([a.fileno(), b.fileno(), [answer["relay"]["ip"], answer["relay"]["port"]]])
        self.gen = jsonlines.ChildProcess("bench.loadgen", self.socks, self.loadgen_python,
                                          BenchError)
        self.loadgen_info = self._command({"cmd": "setup", "sessions": spec}, timeout=60.0)

    def close(self) -> None:
        if self.gen is not None:
            gen, self.gen = self.gen, None
            gen.close()
        if self.client is not None:
            self.client.close()
            self.client = None
        if self.relay is not None:
            relay, self.relay = self.relay, None
            self.exit_code = relay.stop()
            self.relay_output = relay.output
        for s in self.socks:
            s.close()
        self.socks = []

    # -- steps ----------------------------------------------------------------------
    def _command(self, cmd: dict, timeout: float) -> dict:
        assert self.gen is not None
        return self.gen.command(cmd, timeout)

    def counters(self) -> Optional[Dict[str, int]]:
        """The relay's media counters (the worker reports them on a flush)."""
        try:
            counters = self.client.stats()["counters"]
        except Exception:
            return None
        return {k: int(v) for k, v in counters.items() if k.startswith("media.")}

    def step(self, rate: float, duration: float, grace: float = GRACE) -> dict:
        """One load step; adds the relay's forwarded count, the worker's CPU time and
        the namespace's UDP receive-buffer overflows over the step."""
        rate = min(float(rate), MAX_RATE)
        duration = min(float(duration), MAX_DURATION)
        c0 = self.counters()
        rcv0 = udp_rcvbuf_errors()
        wpid = self.worker_pid
        cpu0 = cpu_seconds(wpid) if wpid else None
        ctx0 = ctx_switches(wpid) if wpid else None
        res = self._command({"cmd": "run", "rate": rate, "duration": duration, "grace": grace},
                            timeout=duration + grace + 30.0)
        cpu1 = cpu_seconds(wpid) if wpid else None
        ctx1 = ctx_switches(wpid) if wpid else None
        rcv1 = udp_rcvbuf_errors()
        c1 = self.counters()
        if c0 is not None and c1 is not None:
            res["relay_forwarded"] = c1["media.forwarded.packets"] - c0["media.forwarded.packets"]
            # drops and send errors the relay itself counted (not socket-buffer overflows)
            res["relay_drops"] = {k: c1[k] - c0.get(k, 0) for k in c1
                                  if (".dropped." in k or ".send_errors." in k or
                                      ".recv_errors." in k) and c1[k] != c0.get(k, 0)}
        else:
            res["relay_forwarded"] = None
            res["relay_drops"] = None
        res["udp_rcvbuf_errors"] = rcv1 - rcv0 if rcv0 is not None and rcv1 is not None else None
        if cpu0 is not None and cpu1 is not None:
            res["worker_cpu_s"] = round(cpu1 - cpu0, 6)
            res["worker_cpu_us_per_packet"] = (
                round(1e6 * (cpu1 - cpu0) / res["received"], 3) if res["received"] else None)
        if ctx0 is not None and ctx1 is not None:
            res["worker_wakeups"] = ctx1[0] - ctx0[0]
            res["worker_preempted"] = ctx1[1] - ctx0[1]
        return res


# -- the search ---------------------------------------------------------------------


def verdict(step: dict, loss_limit: float = LOSS_LIMIT) -> str:
    """"pass" (the relay forwarded the offered rate), "fail" (loss at or over the
    limit) or "generator" (no loss to speak of, but the generator fell short of R)."""
    if step["sent"] == 0 or step["loss"] >= loss_limit:
        return "fail"
    if step["generator_limited"]:
        return "generator"
    return "pass"


def _round_rate(rate: float) -> int:
    unit = 1000 if rate >= 20000 else 100
    return max(unit, int(round(rate / unit)) * unit)


def search(measure: Callable[[int], dict], start: int, max_steps: int,
           loss_limit: float = LOSS_LIMIT, precision: float = PRECISION,
           generator_retries: int = 1, transient_retries: int = 0) -> dict:
    """Doubling ramp from `start` (halving if `start` already fails), then bisection.

    A rate is measured once more (at most once) when its first step could not judge the
    relay: the generator fell short (`generator_retries`), or, with `transient_retries`,
    it lost frames while neither side was saturated (the step's ``saturated`` is
    "neither": a pause of a shared machine, which would otherwise send the bisection
    below a rate the relay core was far from full at)."""
    steps: List[dict] = []
    lo: Optional[int] = None  # highest rate that passed
    hi: Optional[int] = None  # lowest rate that did not
    best: Optional[dict] = None
    generator_bound = False
    retried = set()
    rate = int(start)
    while len(steps) < max_steps:
        res = measure(rate)
        v = verdict(res, loss_limit)
        res["verdict"] = v
        steps.append(res)
        # a stall of a shared machine (the generator fell short, or frames were lost with
        # neither side full): measure the same rate once more
        unjudged = ((v == "generator" and generator_retries > 0)
                    or (v == "fail" and res.get("saturated") == "neither"
                        and transient_retries > 0))
        if unjudged and rate not in retried:
            retried.add(rate)
            continue
        if v == "pass":
            if lo is None or rate > lo:
                lo, best = rate, res
        else:
            if hi is None or rate < hi:
                hi = rate
                generator_bound = v == "generator"
        if hi is None:
            if rate >= MAX_RATE:
                break
            rate = min(rate * 2, MAX_RATE)
        elif lo is None:
            if rate <= 200:
                break
            rate = _round_rate(rate / 2)
        else:
            if hi - lo <= max(precision * lo, 100):
                break
            nxt = _round_rate((lo + hi) / 2)
            if nxt <= lo or nxt >= hi:
                break
            rate = nxt
    return {
        "capacity_pps": lo or 0,
        "loss_at_capacity": best["loss"] if best else None,
        "achieved_at_capacity": best["achieved_rate"] if best else None,
        "upper_bound_pps": hi,
        "generator_bound": generator_bound,
        "steps": steps,
    }


def _cpu_at(found: dict) -> Optional[float]:
    rate = found["capacity_pps"]
    for s in reversed(found["steps"]):
        if s["rate"] == rate and s["verdict"] == "pass":
            return s.get("worker_cpu_us_per_packet")
    return None


def find_capacity(python: str, sessions: int, *, quick: bool = False,
                  start_rate: Optional[int] = None, max_steps: Optional[int] = None,
                  step_duration: Optional[float] = None, cpu_rate: int = CPU_RATE,
                  cpu_duration: Optional[float] = None, loss_limit: float = LOSS_LIMIT,
                  workers: int = 1, loadgen_python: Optional[str] = None,
                  label: Optional[str] = None, progress: Optional[Progress] = None,
                  relay_env: Optional[Dict[str, str]] = None,
                  high_cpu_rate: Optional[int] = None) -> dict:
    """Capacity (pkt/s at < `loss_limit` loss) of a relay run by `python` with `sessions`
    calls; see the module docstring.  `relay_env` adds environment variables for the
    relay (e.g. PYTHONPATH of a patched copy).  Returns a JSON-able dict."""
    start_rate = start_rate or (QUICK_START_RATE if quick else START_RATE)
    max_steps = min(max_steps or (QUICK_MAX_STEPS if quick else MAX_STEPS), MAX_STEPS)
    duration = step_duration or (QUICK_STEP_DURATION if quick else STEP_DURATION)
    cpu_duration = cpu_duration or (0.5 if quick else 1.0)
    if high_cpu_rate is None:
        high_cpu_rate = 0 if quick else HIGH_CPU_RATE
    label = label or os.path.basename(python)
    say = progress or (lambda _text: None)
    t0 = time.monotonic()
    with Harness(python, sessions, loadgen_python=loadgen_python, workers=workers,
                 relay_env=relay_env) as h:
        say(f"[{label} x{sessions}] relay up (ports {h.ports}, worker pid {h.worker_pid}), "
            f"load generator {h.loadgen_info.get('impl')} io={h.loadgen_info.get('io')}")
        # JIT warm-up of relay and generator; not a search step
        warm = h.step(min(cpu_rate, start_rate * 2), duration)
        say(f"[{label} x{sessions}] warm-up {warm['rate']:.0f} pkt/s: "
            f"loss {100 * warm['loss']:.2f}%")

        def measure(rate: int) -> dict:
            res = h.step(rate, duration)
            say(f"[{label} x{sessions}] step {rate:>8} pkt/s: achieved "
                f"{res['achieved_rate']:>9.0f}, loss {100 * res['loss']:6.2f}%, "
                f"relay fwd {res['relay_forwarded']}, verdict {verdict(res, loss_limit)}")
            return res

        found = search(measure, start_rate, max_steps, loss_limit,
                       generator_retries=0 if quick else 1)
        cpu_points = []
        for rate in [cpu_rate] + ([high_cpu_rate] if high_cpu_rate else []):
            res = h.step(rate, cpu_duration)
            say(f"[{label} x{sessions}] equal load {rate} pkt/s: worker "
                f"{res.get('worker_cpu_us_per_packet')} us/packet, "
                f"loss {100 * res['loss']:.2f}%")
            cpu_points.append(res)
        cpu = cpu_points[0]
        loadgen = dict(h.loadgen_info)
    steps = found["steps"]
    all_steps = [warm, *steps, *cpu_points]
    return {
        "interpreter": label,
        "python": python,
        "sessions": sessions,
        "quick": quick,
        "workers": workers,
        **{k: v for k, v in found.items() if k != "steps"},
        "steps": [{k: s.get(k) for k in STEP_KEYS} for s in steps],
        "warmup": {"rate": warm["rate"], "loss": warm["loss"]},
        "cpu_rate": cpu_rate,
        "cpu_loss": cpu["loss"],
        "cpu_achieved_rate": cpu["achieved_rate"],
        "worker_cpu_s": cpu.get("worker_cpu_s"),
        "worker_cpu_us_per_packet": cpu.get("worker_cpu_us_per_packet"),
        "cpu_points": [{k: p.get(k) for k in ("rate", "achieved_rate", "loss", "received",
                                              "worker_cpu_s", "worker_cpu_us_per_packet",
                                              "worker_wakeups")} for p in cpu_points],
        # near saturation the per-packet cost is the relay's own; at CPU_RATE it is
        # mostly wake-ups (see docs/benchmarks.md)
        "worker_cpu_us_per_packet_at_capacity": _cpu_at(found),
        "checked": sum(s["checked"] for s in all_steps),
        "damaged": sum(s["damaged"] for s in all_steps),
        "received_total": sum(s["received"] for s in all_steps),
        "min_session_received": min(s["min_session_received"] for s in all_steps),
        "loadgen": {"impl": loadgen.get("impl"), "python": loadgen.get("python"),
                    "io": loadgen.get("io")},
        "relay_exit_code": h.exit_code,
        "relay_traceback": "Traceback" in h.relay_output,
        "wall_s": round(time.monotonic() - t0, 2),
    }


# -- command line -------------------------------------------------------------------


def machine() -> Dict[str, object]:
    model = ""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        with open("/proc/loadavg") as fh:
            load = fh.read().split()[:3]
    except OSError:
        load = []
    return {"nproc": os.cpu_count(), "cpu": model, "kernel": platform.release(),
            "loadavg": load, "time": time.strftime("%Y-%m-%d %H:%M:%S %z")}


def _cpu_point(r: dict, index: int) -> Optional[float]:
    points = r.get("cpu_points") or []
    return points[index].get("worker_cpu_us_per_packet") if len(points) > index else None


def _fmt(value: Optional[float], spec: str) -> str:
    return "-" if value is None else format(value, spec)


def table(results: List[dict]) -> str:
    high = next((int(r["cpu_points"][1]["rate"]) for r in results
                 if len(r.get("cpu_points", [])) > 1), None)
    head = (f"{'interpreter':11} {'sessions':>8} {'capacity pps':>12} {'loss':>7} "
            f"{'us/pkt@' + str(results[0]['cpu_rate'] // 1000) + 'k':>10} "
            + (f"{'us/pkt@' + str(high // 1000) + 'k':>11} " if high else "")
            + f"{'gen achieved':>12} {'failed at':>10}  note")
    rows = [head, "-" * len(head)]
    for r in results:
        loss = r["loss_at_capacity"]
        note = "generator-bound" if r["generator_bound"] else ""
        rows.append(f"{r['interpreter']:11} {r['sessions']:>8} {r['capacity_pps']:>12} "
                    f"{_fmt(None if loss is None else 100 * loss, '.2f') + '%':>7} "
                    f"{_fmt(_cpu_point(r, 0), '.2f'):>10} "
                    + (f"{_fmt(_cpu_point(r, 1), '.2f'):>11} " if high else "")
                    + f"{_fmt(r['achieved_at_capacity'], '.0f'):>12} "
                    f"{r['upper_bound_pps'] or '-':>10}  {note}")
    return "\n".join(rows)


def ratios(results: List[dict]) -> List[dict]:
    """PyPy / CPython per session count, from results of the same run: capacity
    (pypy / cpython) and CPU per packet at the equal loads (cpython / pypy)."""
    out = []
    by = {(r["interpreter"], r["sessions"]): r for r in results}
    for (impl, n), r in by.items():
        other = by.get(("cpython", n))
        if impl != "pypy" or other is None:
            continue
        cap = (r["capacity_pps"] / other["capacity_pps"]) if other["capacity_pps"] else None
        row = {"sessions": n, "capacity_ratio": round(cap, 2) if cap else None}
        for i, point in enumerate(r.get("cpu_points") or []):
            c1, c0 = _cpu_point(r, i), _cpu_point(other, i)
            row[f"cpu_per_packet_ratio_at_{int(point['rate'])}"] = (
                round(c0 / c1, 2) if c0 and c1 else None)
        out.append(row)
    return out


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.capacity", description=__doc__.split("\n")[0])
    p.add_argument("--sessions", default="1,100", help="comma-separated session counts")
    p.add_argument("--interpreters", default="cpython,pypy",
                   help="comma-separated labels (cpython, pypy) or interpreter paths")
    p.add_argument("--out", help="write the results as JSON here")
    p.add_argument("--quick", action="store_true", help="short steps, few of them")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--loadgen-python", help="interpreter of the load generator "
                   "(default: PyPy when available)")
    args = p.parse_args(argv)
    sessions = [int(x) for x in args.sessions.split(",") if x.strip()]
    if not sessions or min(sessions) < 1 or max(sessions) > 2000:
        p.error("--sessions: counts between 1 and 2000")
    found = find_interpreters()
    chosen = []
    for name in (x.strip() for x in args.interpreters.split(",") if x.strip()):
        if name in found:
            chosen.append((name, found[name]["python"]))
        elif os.path.sep in name and os.path.exists(name):
            chosen.append((os.path.basename(name), name))
        else:
            print(f"skipping {name}: not available (found {sorted(found)})", file=sys.stderr)
    if not chosen:
        p.error("no usable interpreter")

    def progress(text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    start = machine()
    results = []
    for n in sessions:  # interpreters side by side for each session count
        for label, python in chosen:
            results.append(find_capacity(python, n, quick=args.quick, workers=args.workers,
                                         loadgen_python=args.loadgen_python, label=label,
                                         progress=progress))
    report = {
        "command": "python -m bench.capacity " + " ".join(argv if argv is not None
                                                          else sys.argv[1:]),
        "machine": {**start, "loadavg_at_end": machine()["loadavg"]},
        "versions": {label: found.get(label, {}).get("version") for label, _ in chosen},
        "loss_limit": LOSS_LIMIT,
        "results": results,
        "ratios": ratios(results),
    }
    print(table(results))
    for r in report["ratios"]:
        cpu = ", ".join(f"{v} at {k.rsplit('_', 1)[1]} pkt/s" for k, v in r.items()
                        if k.startswith("cpu_per_packet_ratio"))
        print(f"pypy vs cpython, {r['sessions']} session(s): capacity x{r['capacity_ratio']}; "
              f"cpython us/pypy us per packet: {cpu}")
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as fh:
            json.dump(report, fh, indent=1)
            fh.write("\n")
    bad = [r for r in results if r["relay_exit_code"] != 0 or r["relay_traceback"]]
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
