"""Control-path cost in CPU instructions, v0.1 vs this tree: a figure no load can move.

    .venv/bin/python -m bench.instructions --before /tmp/lrk-v01 \\
        --out bench/results/instructions-<date>.json

Timing the control path on a shared 2-core machine moves by ±30 % between runs;
instruction counts do not (valgrind's cachegrind counts the instructions a process
executes, whatever else runs). Each tree runs the same sans-IO loop -- the msgpack
control protocol and the engine, no sockets: offer, answer and delete of one audio call
with SDP bodies, unsigned -- under ``valgrind --tool=cachegrind`` twice, with `calls`
and with 0 measured calls after the same warm-up; the difference over `calls` is the
instructions per call. CPython only (valgrind and a JIT do not make a fair count).

What it does not count: the sockets and the worker (the same syscalls in both trees:
``strace -c`` of the daemon, docs/benchmarks.md section 1), and time lost to cache
misses, which instructions do not show.

``--daemon`` counts the whole control process instead: each tree's relay (`lrkproxy
run`, socket mode, unsigned) runs under cachegrind with cache and branch simulation
while `bench.control_load` drives it (offer + answer + delete with SDP, 4 calls in
flight), once with `calls` and once with 0 calls after the same warm-up; per call:
instructions, L1 data misses and branch mispredictions (indirect ones apart: the
interpreter's dispatch). Close to deterministic (the worker's report timing moves
them by about 1 %); slow (a minute per 1,000 calls and tree). The socket worker (a
process of its own, which binds the call's ports) is counted too, apart: cachegrind
follows it (``--trace-children=yes``, one log per process, each process named by the
command its log records).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Any, Dict, List, Optional

from bench import jsonlines
from bench.ng import audio_sdp

WARMUP = 1000
MAX_CALLS = 20000

#: the loop each tree runs: its own MsgpackControl and Engine (v0.1's take no auth)
LOOP = r'''
import pickle, sys
from lrk.core.engine import Engine, EngineConfig
from lrk.control.msgpack_proto import MsgpackControl
warm, n, path = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
with open(path, "rb") as fh:
    calls = pickle.load(fh)
engine = Engine(EngineConfig(port_start=10000, port_end=60000, quarantine=0))
try:
    control = MsgpackControl(engine, auth=None)
except TypeError:
    control = MsgpackControl(engine)
now = 1.0
for datagrams in calls[:warm + n]:
    for data in datagrams:
        now += 0.0001
        control.handle(data, ("127.0.0.1", 9), now)
'''


def requests(count: int) -> List[List[bytes]]:
    """`count` calls of three msgpack requests each (offer, answer, delete)."""
    import msgpack

    out = []
    for i in range(count):
        call_id = f"bench-{i}"
        out.append([msgpack.packb(r) for r in (
            {"cmd": "offer", "call_id": call_id, "from_tag": "a", "cookie": f"{i}.0",
             "sdp": audio_sdp("127.0.0.1", 7000), "interface": "external"},
            {"cmd": "answer", "call_id": call_id, "from_tag": "a", "to_tag": "b",
             "cookie": f"{i}.1", "sdp": audio_sdp("127.0.0.1", 7002),
             "interface": "internal"},
            {"cmd": "delete", "call_id": call_id, "cookie": f"{i}.2"})])
    return out


def instructions(python: str, tree: str, script: str, data: str, warm: int, n: int) -> int:
    """Instructions valgrind counted for one run of the loop in `tree`."""
    env = dict(os.environ, PYTHONPATH=tree)
    out = subprocess.run(
        ["valgrind", "--tool=cachegrind", "--cache-sim=no", "--cachegrind-out-file=/dev/null",
         python, script, str(warm), str(n), data],
        cwd=tree, env=env, capture_output=True, text=True, timeout=900)
    if out.returncode != 0:
        raise SystemExit(f"the loop failed in {tree}: {out.stderr[-2000:]}")
    found = re.search(r"I\s+refs:\s+([\d,]+)", out.stderr)
    if found is None:
        raise SystemExit(f"valgrind printed no instruction count: {out.stderr[-500:]}")
    return int(found.group(1).replace(",", ""))


def per_call(python: str, tree: str, script: str, data: str, calls: int) -> int:
    base = instructions(python, tree, script, data, WARMUP, 0)
    return (instructions(python, tree, script, data, WARMUP, calls) - base) // calls


#: cachegrind's summary lines -> the figures --daemon reports
_DAEMON_FIGURES = {
    "instructions": r"I\s+refs:\s+([\d,]+)",
    "d1_misses": r"D1\s+misses:\s+([\d,]+)",
    "ll_misses": r"LL misses:\s+([\d,]+)",  # data and instructions: what goes to memory
    "branches": r"Branches:\s+([\d,]+)",
    "mispredicts": r"Mispredicts:\s+([\d,]+)",
    "indirect_mispredicts": r"Mispredicts:\s+[\d,]+\s+\(\s*[\d,]+ cond \+\s+([\d,]+) ind",
}
DAEMON_WARMUP = 200


def daemon_run(python: str, tree: str, calls: int, tmp: str) -> Dict[str, Dict[str, int]]:
    """Cachegrind's totals, per process ("daemon", "worker"), for one relay of `tree`
    that served `calls` calls after the warm-up, until it stopped."""
    from bench.before_after import BodyProtocol
    from bench.control_load import run_load
    from lrk.demo.relay_process import RelayProcess

    logs = tempfile.mkdtemp(prefix=f"cachegrind-{calls}-", dir=tmp)
    wrapper = os.path.join(tmp, "relay-under-valgrind")
    with open(wrapper, "w") as fh:
        fh.write(f"#!/bin/sh\ncd {tree} && PYTHONPATH={tree} exec valgrind --tool=cachegrind "
                 f"--cache-sim=yes --branch-sim=yes --cachegrind-out-file=/dev/null "
                 f"--trace-children=yes --log-file={logs}/%p.log {python} \"$@\"\n")
    os.chmod(wrapper, 0o755)
    config = os.path.join(tmp, "relay.toml")
    with open(config, "w") as fh:
        fh.write("quarantine = 0.5\n")
        with open(os.path.join(tree, "lrk", "daemon", "config.py")) as src:
            if "control_auth" in src.read():  # v0.1 has no authentication to turn off
                fh.write('control_auth = "none"\n')
    relay = RelayProcess(ports="10000-29999", python=wrapper, extra=["--config", config],
                         auth="none")
    relay.start(ready_timeout=120)
    try:
        addr = ("127.0.0.1", relay.control_port)
        protocol = BodyProtocol("audio", None)
        for cycles in (DAEMON_WARMUP, calls):
            if cycles:
                done = run_load(addr, cycles, 4, protocol=protocol)
                if done.get("errors"):
                    raise SystemExit(f"the relay of {tree} answered with errors: {done}")
    finally:
        relay.stop(timeout=120)
    texts = []
    for name in sorted(os.listdir(logs)):
        with open(os.path.join(logs, name)) as fh:
            texts.append(fh.read())
    return by_process(texts, tree)


def by_process(texts: List[str], tree: str = "") -> Dict[str, Dict[str, int]]:
    """The figures of each cachegrind log, keyed by the process it names in its
    "Command:" line: the socket worker ("worker") or the control process ("daemon")."""
    out: Dict[str, Dict[str, int]] = {}
    for text in texts:
        command = re.search(r"Command: (.*)", text)
        role = "worker" if command and "worker" in command.group(1) else "daemon"
        if role in out:
            raise SystemExit(f"two {role} processes in one run of {tree}")
        out[role] = figures(text, tree)
    if set(out) != {"daemon", "worker"}:
        raise SystemExit(f"cachegrind logged {sorted(out)} for {tree}, not a daemon and "
                         "its worker")
    return out


def figures(text: str, tree: str = "") -> Dict[str, int]:
    """The --daemon figures from cachegrind's summary (its log file)."""
    out = {}
    for name, pattern in _DAEMON_FIGURES.items():
        found = re.search(pattern, text)
        if found is None:
            raise SystemExit(f"cachegrind printed no {name} for {tree}: {text[-500:]}")
        out[name] = int(found.group(1).replace(",", ""))
    return out


def daemon_per_call(python: str, tree: str, calls: int, tmp: str
                    ) -> Dict[str, Dict[str, int]]:
    """Per call and process ("daemon", "worker", and their "total")."""
    base = daemon_run(python, tree, 0, tmp)
    full = daemon_run(python, tree, calls, tmp)
    out = {role: {name: (full[role][name] - base[role][name]) // calls
                  for name in _DAEMON_FIGURES} for role in ("daemon", "worker")}
    out["total"] = {name: out["daemon"][name] + out["worker"][name] for name in _DAEMON_FIGURES}
    return out


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--before", required=True, help="a checkout of the tree to compare with")
    ap.add_argument("--after", default=os.path.dirname(os.path.dirname(
        os.path.abspath(__file__))))
    ap.add_argument("--calls", type=int, default=2000)
    ap.add_argument("--python", default=sys.executable, help="a CPython interpreter")
    ap.add_argument("--daemon", action="store_true",
                    help="the whole control process (relay under cachegrind, with cache "
                         "and branch simulation) instead of the sans-IO loop")
    ap.add_argument("--out")
    args = ap.parse_args(argv)
    if not 1 <= args.calls <= MAX_CALLS:
        ap.error(f"--calls must be within 1..{MAX_CALLS}")
    if shutil.which("valgrind") is None:
        ap.error("valgrind is not installed (apt-get install valgrind)")
    if args.daemon:
        return _main_daemon(args)
    with tempfile.TemporaryDirectory(prefix="lrk-instr-") as tmp:
        script = os.path.join(tmp, "loop.py")
        data = os.path.join(tmp, "calls.pickle")
        with open(script, "w") as fh:
            fh.write(LOOP)
        import pickle

        with open(data, "wb") as fh:
            pickle.dump(requests(WARMUP + args.calls), fh)
        result: Dict[str, Any] = {
            "command": " ".join(["python -m bench.instructions", *sys.argv[1:]]),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "python": subprocess.run([args.python, "-VV"], capture_output=True,
                                     text=True).stdout.strip(),
            "calls": args.calls, "warmup": WARMUP,
        }
        for side, tree in (("before", args.before), ("after", args.after)):
            result[side] = {"tree": tree,
                            "instructions_per_call": per_call(args.python, tree, script, data,
                                                              args.calls)}
    result["after_over_before"] = round(result["after"]["instructions_per_call"]
                                        / result["before"]["instructions_per_call"], 3)
    jsonlines.emit(result, args.out, indent=1)
    return 0


def _main_daemon(args: argparse.Namespace) -> int:
    result: Dict[str, Any] = {
        "command": " ".join(["python -m bench.instructions", *sys.argv[1:]]),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "python": subprocess.run([args.python, "-VV"], capture_output=True,
                                 text=True).stdout.strip(),
        "calls": args.calls, "warmup": DAEMON_WARMUP, "mode": "daemon",
    }
    with tempfile.TemporaryDirectory(prefix="lrk-instr-") as tmp:
        for side, tree in (("before", args.before), ("after", args.after)):
            result[side] = {"tree": tree, "per_call": daemon_per_call(
                os.path.abspath(args.python), os.path.abspath(tree), args.calls, tmp)}
    before, after = result["before"]["per_call"], result["after"]["per_call"]
    result["after_over_before"] = {
        role: {name: round(after[role][name] / before[role][name], 3)
               for name in _DAEMON_FIGURES if before[role][name]}
        for role in ("daemon", "worker", "total")}
    jsonlines.emit(result, args.out, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
