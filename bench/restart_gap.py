"""Media gap and packets lost per call across a relay restart, per mode and signal.

    .venv/bin/python -m bench.restart_gap --calls 200 --mode socket,packet,kernel,nfqueue \\
        --signal term,kill --python .venv-pypy/bin/python \\
        --out bench/results/restart-gap-<date>.json

Root only: everything runs in a throwaway caller <-> relay <-> callee namespace topology
(`bench.netns.Topology`, documentation addresses), the same for every mode. For each
mode and each signal (`term`: SIGTERM, what `systemctl restart` does; `kill`: SIGKILL
of the daemon, a crash; `none`: no restart, the baseline of the same media on the same
machine): a fresh relay with a temporary state_dir, N two-way calls set
up through `lrk.client`, RTP from `bench.callgen` (in this process; 50 packets/s per
direction, 172-byte packets, caller sockets in the caller's namespace, callee sockets
in the callee's), `--warmup` s of media not counted (every flow set up and latched),
then `--before` s of measured media, then the relay is stopped and started again
with the same command line while media keeps flowing, and media goes on for about
`--after` s once the new relay answers.

Per call: packets lost (sent - received, both directions; `lost_inside`: the sequence
gaps, i.e. lost while later packets of the stream arrived; the rest were still in flight
or dropped at the end); per direction: the longest
interval between two arrivals (20 ms when nothing was lost). The figures: media gap
median and worst over every direction of every call, loss per call median and worst,
`generator_limited` if the generator could not keep the rate itself.

Leak check after each run: every call deleted, then no port in use, no UDP socket in
the port range (socket/packet), no nft map element and no conntrack flow with a mark of
lrk's (kernel/nfqueue), and after the relay's stop no table. Bounded: at most 2,000
calls and 30 s of media per run.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import socket
import statistics
import sys
import tempfile
import threading
import time
from typing import Any, Dict, List, Optional

from bench.callgen import CallGen
from bench.netns import Topology, run, socket_in
from lrk.client import LrkClient
from lrk.demo.relay_process import RelayProcess

MAX_CALLS = 2000
MAX_MEDIA = 30.0
MODES = ("socket", "packet", "kernel", "nfqueue", "xdp")
SIGNALS = ("none", "term", "kill")
PORTS = (30000, 34999)
#: a restart is expected to take at most this long (media runs on for --after past it;
#: PyPy relays on a loaded 2-core machine took up to 5 s, packet mode with 200 calls)
RESTART_BUDGET = 8.0


def _relay(topo: Topology, mode: str, state: str, python: Optional[str]) -> RelayProcess:
    extra = ["--mode", mode, "--internal-ip", topo.relay.ip4,
             "--external-ip", topo.relay_ext.ip4, "--state-dir", state]
    if mode == "packet":
        extra += ["--packet-interface", "vc1", "--packet-interface", "ve1"]
    if mode == "xdp":
        extra += ["--xdp-interface", "vc1", "--xdp-interface", "ve1"]
    return RelayProcess(ports=f"{PORTS[0]}-{PORTS[1]}", netns=topo.relay.ns, extra=extra,
                        python=python)


def _fds(relay: RelayProcess) -> int:
    """Open fds of the daemon and its workers."""
    assert relay.proc is not None
    pids = [relay.proc.pid]
    try:
        with open(f"/proc/{relay.proc.pid}/task/{relay.proc.pid}/children") as fh:
            pids += [int(p) for p in fh.read().split()]
    except OSError:
        pass
    return sum(len(os.listdir(f"/proc/{pid}/fd")) for pid in pids
               if os.path.exists(f"/proc/{pid}/fd"))


def leftovers(topo: Topology) -> Dict[str, int]:
    """What the relay namespace holds for lrk's port range: UDP sockets, nft map
    elements of the session maps, conntrack flows with a mark in lrk's ranges."""
    ns = topo.relay.ns
    sockets = 0
    for line in run("ss", "-uanH", ns=ns, check=False).stdout.splitlines():
        m = re.search(r":(\d+)\s", line)
        if m and PORTS[0] <= int(m.group(1)) <= PORTS[1]:
            sockets += 1
    elements = 0
    listing = run("nft", "-j", "list", "table", "inet", "lrk", ns=ns, check=False)
    if listing.returncode == 0:
        for obj in json.loads(listing.stdout)["nftables"]:
            body = obj.get("map") or obj.get("set")
            if body and re.match(r"^(fwd|mark|out|adm|seen|fmark|ffwd)[46]$", body["name"]):
                elements += len(body.get("elem", ()))
    flows = 0
    for line in run("conntrack", "-L", ns=ns, check=False).stdout.splitlines():
        m = re.search(r"mark=(\d+)", line)
        if m and int(m.group(1)) != 0:
            flows += 1
    table = "table inet lrk" in run("nft", "list", "tables", ns=ns, check=False).stdout
    return {"udp_sockets_in_range": sockets, "nft_elements": elements, "lrk_flows": flows,
            "table": int(table)}


def quiet(load: float, wait: float) -> Dict[str, Any]:
    """Wait (at most `wait` s) for the 1-minute load average to fall below `load`; what
    was found goes into the result (other work on the machine shows in the figures)."""
    deadline = time.monotonic() + wait
    while os.getloadavg()[0] >= load and time.monotonic() < deadline:
        time.sleep(2.0)
    return {"loadavg_at_start": [round(x, 2) for x in os.getloadavg()],
            "quiet": os.getloadavg()[0] < load}


def ct_stats(topo: Topology) -> Dict[str, int]:
    """The relay namespace's conntrack drop counters, summed over CPUs."""
    out: Dict[str, int] = {}
    for line in run("conntrack", "-S", ns=topo.relay.ns, check=False).stdout.splitlines():
        for key, value in re.findall(r"(\w+)=(\d+)", line):
            if key in ("drop", "early_drop", "insert_failed", "invalid", "error"):
                out[key] = out.get(key, 0) + int(value)
    return out


def run_once(topo: Topology, mode: str, signal: str, calls: int, before: float,
             after: float, python: Optional[str], warmup: float = 1.0) -> Dict[str, Any]:
    """One relay, `calls` calls, one restart by `signal`; the gaps and losses it caused."""
    state = tempfile.TemporaryDirectory(prefix="lrk-restart-")
    relay = _relay(topo, mode, state.name, python).start()
    fds_idle = _fds(relay)
    socks: List[socket.socket] = []
    current = relay
    try:
        spec = []
        with LrkClient([relay.node], timeout=2.0, retries=3) as client:
            for i in range(calls):
                caller = socket_in(topo.caller.ns)
                callee = socket_in(topo.callee.ns)
                socks += [caller, callee]
                caller.bind((topo.caller.ip4, 0))
                callee.bind((topo.callee.ip4, 0))
                to_b = client.offer(f"gap-{i}", "a", caller.getsockname(),
                                    interface="external")["relay"]
                to_a = client.answer(f"gap-{i}", "a", "b", callee.getsockname())["relay"]
                spec.append((caller.fileno(), callee.fileno(), (to_a["ip"], to_a["port"]),
                             (to_b["ip"], to_b["port"])))
        events: Dict[str, float] = {}
        second: List[RelayProcess] = []

        def restart() -> None:
            time.sleep(before)  # the media generator runs meanwhile (no check waits here)
            events["restart"] = time.monotonic()
            if signal == "none":  # the baseline: the same media, no restart
                events["old_gone"] = events["new_ready"] = events["restart"]
                second.append(relay)
                return
            twin = relay.again()
            if signal == "term":
                relay.stop()
            else:
                relay.kill()
            events["old_gone"] = time.monotonic()
            second.append(twin)
            twin.start()
            events["new_ready"] = time.monotonic()

        duration = min(MAX_MEDIA, before + RESTART_BUDGET + after)
        ct_before = ct_stats(topo)
        with CallGen(spec, seed=13) as gen:
            # every flow admitted and latched first (nfqueue mode queues the first packets
            # of 400 flows starting at once: that loss is not the restart's)
            warm = gen.run(warmup, grace=0.3)
            thread = threading.Thread(target=restart, daemon=True)
            t0 = time.monotonic()
            thread.start()
            result = gen.run(duration, detail=True, grace=1.0)
            thread.join(MAX_MEDIA)
        if not second or "new_ready" not in events:
            raise RuntimeError(f"the relay did not come back in {mode} mode: "
                               f"{second[0].read_output() if second else relay.output}")
        current = second[0]
        per = result["per_stream"]
        gaps = sorted(s["max_gap_ms"] for s in per)
        lost_call = [0] * calls
        inside = [0] * calls  # sequence gaps: lost while later packets of the stream came
        for s in per:
            lost_call[s["call"]] += s["sent"] - s["received"]
            inside[s["call"]] += s["lost"]
        ct_after = ct_stats(topo)
        with LrkClient([current.node], timeout=2.0, retries=3) as client:
            stats = client.stats()
            restored = stats["sessions"]
            relay_counters = {k: v for k, v in stats["counters"].items()
                              if k.startswith(("nfqueue.", "kernel.", "media.dropped",
                                               "media.latched", "workers.")) and v}
            for i in range(calls):
                client.delete(f"gap-{i}")
            in_use = client.stats()["ports"]["in_use"]
        left = leftovers(topo)
        fds_after = _fds(current)
        log = [line for line in current.read_output().splitlines()
               if "lrk.lifecycle" in line or "level=warning" in line or "level=error" in line]
        code = current.stop()
        current = relay  # stopped
        gone = leftovers(topo)
        return {
            "mode": mode, "signal": signal, "calls": calls,
            "relay_python": python or sys.executable,
            "restart_at_s": round(events["restart"] - t0, 3),
            "old_gone_s": round(events["old_gone"] - events["restart"], 3),
            "restart_s": round(events["new_ready"] - events["restart"], 3),
            "media_after_ready_s": round(t0 + result["send_wall"] - events["new_ready"], 3),
            # the media must outlast the restart for the gap to be measured
            "restart_outlasted_media": t0 + result["send_wall"] - events["new_ready"] < 1.0,
            "gap_ms_median": round(statistics.median(gaps), 1),
            "gap_ms_p90": round(gaps[int(0.9 * (len(gaps) - 1))], 1),
            "gap_ms_worst": round(gaps[-1], 1),
            "lost_per_call_median": statistics.median(lost_call),
            "lost_per_call_worst": max(lost_call),
            "calls_losing_packets": sum(1 for n in lost_call if n),
            "lost_inside_per_call_median": statistics.median(inside),
            "lost_inside_per_call_worst": max(inside),
            "lost_at_the_end": sum(lost_call) - sum(inside),
            "sent": result["sent"], "received": result["received"],
            "generator_limited": result["generator_limited"],
            "generator_max_gap_ms": result["max_gap_ms"],
            "warmup": {"seconds": warmup, "sent": warm["sent"], "lost": warm["lost"]},
            "restored_sessions": restored,
            "relay_counters_after": relay_counters,
            "conntrack_stats_delta": {k: ct_after.get(k, 0) - ct_before.get(k, 0)
                                      for k in ct_after},
            "lost_by_direction": [sum(s["sent"] - s["received"] for s in per
                                      if s["direction"] == d)
                                  for d in ("caller_to_callee", "callee_to_caller")],
            "new_relay_log": log[:20],
            "leak_check": {"ports_in_use": in_use, **left, "fds_idle_first": fds_idle,
                           "fds_after_delete": fds_after, "stop_exit": code,
                           "after_stop": gone},
        }
    finally:
        for s in socks:
            s.close()
        current.stop()
        state.cleanup()


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--calls", type=int, default=200)
    p.add_argument("--mode", default=",".join(MODES))
    p.add_argument("--signal", default=",".join(SIGNALS))
    p.add_argument("--before", type=float, default=2.0, help="media before the restart (s)")
    p.add_argument("--after", type=float, default=3.0,
                   help="media after the restart's budget (s)")
    p.add_argument("--python", help="the relay's interpreter (default: this one)")
    p.add_argument("--warmup", type=float, default=1.0,
                   help="media before the measured run (every flow set up), not counted")
    p.add_argument("--quiet-load", type=float, default=1.0,
                   help="before each run, wait for the 1-min load average to fall below this")
    p.add_argument("--quiet-wait", type=float, default=60.0, help="... at most this long (s)")
    p.add_argument("--out")
    args = p.parse_args(argv)
    if not 0 < args.calls <= MAX_CALLS:
        p.error(f"--calls must be 1..{MAX_CALLS}")
    modes = args.mode.split(",")
    signals = args.signal.split(",")
    if set(modes) - set(MODES) or set(signals) - set(SIGNALS):
        p.error(f"--mode takes {','.join(MODES)}; --signal takes {','.join(SIGNALS)}")
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = 2 * args.calls + 256
    if soft < need:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(need, hard), hard))
    results = []
    started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    with Topology("rg") as topo:
        if "xdp" in modes:  # the hosts' links as xdp mode needs, for every mode of the run
            from bench.netns_capacity import xdp_links

            xdp_links(topo)
        for mode in modes:
            for signal in signals:
                found = quiet(args.quiet_load, args.quiet_wait)
                res = run_once(topo, mode, signal, args.calls, args.before, args.after,
                               args.python, args.warmup)
                res.update(found)
                print(json.dumps(res), flush=True)
                results.append(res)
    if args.out:
        with open(args.out, "w") as fh:
            json.dump({"argv": sys.argv, "started": started, "loadavg": os.getloadavg(),
                       "cpus": os.cpu_count(), "results": results}, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
