"""What the XDP program itself costs per packet: BPF_PROG_TEST_RUN, one run per call.

The kernel runs the loaded program once on a crafted frame and reports how long that run
took (ns, JITed code, including `bpf_fib_lookup` and the map lookups, excluding the
driver and the redirect's transmit); the median of `calls` such runs is reported. A
single run's figure includes the kernel's timing of it (tens of ns). For the verdicts
that leave the frame as it is (drop, pass) the kernel's own loop (`repeat`) is also run:
`ns_repeat` is the median over 5 runs of `--repeat` iterations each, the program's cost
without the timing. (A relayed frame cannot be repeated: the kernel feeds the
*rewritten* frame to the next iteration, which is then no longer for the relay.) In a
namespace of its own with two veth pairs and permanent neighbour entries, as
`tests/netns/test_xdp_prog.py`.

    .venv/bin/python -m bench.xdp_prog_cost --calls 20000 --out bench/results/xdp-prog-cost.json

Root only; 198.51.100.0/24 and 2001:db8::/32 only; the namespace is deleted at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from typing import Dict, List, Optional

from bench.capacity import machine
from bench.frames import udp_frame as frame
from bench.netns import PREFIX, in_netns, list_namespaces, run
from fastpath.xdp.layout import Entry
from fastpath.xdp.libbpf import XDP_DROP, XDP_PASS, if_nametoindex, test_run
from fastpath.xdp.program import XdpProgram

RA_MAC, EA_MAC = "02:00:00:00:01:01", "02:00:00:00:02:01"
CALLER_MAC, CALLEE_MAC = "02:00:00:00:01:0a", "02:00:00:00:02:46"
NETS = {4: ("198.51.100.1", "198.51.100.65", "198.51.100.10", "198.51.100.70", 26),
        6: ("2001:db8:1::1", "2001:db8:2::1", "2001:db8:1::10", "2001:db8:2::70", 64)}
PAYLOAD = bytes(160)  # a 20 ms G.711 frame's size


def _setup(ns: str) -> None:
    run("ip", "netns", "add", ns)
    run("ip", "link", "set", "lo", "up", ns=ns)
    for dev, peer, mac in (("ra", "rap", RA_MAC), ("ea", "eap", EA_MAC)):
        run("ip", "link", "add", dev, "address", mac, "type", "veth", "peer", "name", peer,
            ns=ns)
        run("ip", "link", "set", dev, "up", ns=ns)
        run("ip", "link", "set", peer, "up", ns=ns)
    run("sysctl", "-qw", "net.ipv4.ip_forward=1", "net.ipv6.conf.all.forwarding=1", ns=ns)
    for fam, (ra, ea, caller, callee, plen) in NETS.items():
        for dev, ip in (("ra", ra), ("ea", ea)):
            run("ip", f"-{fam}", "addr", "add", f"{ip}/{plen}", "dev", dev,
                *(["nodad"] if fam == 6 else []), ns=ns)
        for ip, mac, dev in ((caller, CALLER_MAC, "ra"), (callee, CALLEE_MAC, "ea")):
            run("ip", f"-{fam}", "neigh", "replace", ip, "lladdr", mac, "dev", dev, "nud",
                "permanent", ns=ns)


def measure(calls: int, entries: int, repeat: int = 1_000_000) -> Dict[str, object]:
    ns = f"{PREFIX}{os.getpid()}-xcost"
    prog: Optional[XdpProgram] = None
    try:
        _setup(ns)
        addresses = [v[i] for v in NETS.values() for i in (0, 1)]
        prog = XdpProgram.load(max_streams=max(1024, entries + 16),
                               max_counters=max(1024, entries + 16),
                               stream_slots=len(addresses) * (65000 - 30000 + 1))
        prog.configure(30000, 65000, addresses)
        for fam, (ra, ea, caller, callee, _) in NETS.items():
            prog.put(Entry((ra, 30000), (caller, 4000), (ea, 30002), (callee, 5000), fam))
        # other sessions in the table (its size, not its hit path, is what they change)
        for i in range(entries):
            ra, ea, caller, callee, _ = NETS[4]
            port = 30004 + 2 * (i % 17000)
            host = f"198.51.100.{11 + i // 17000}"
            prog.put(Entry((ra, port), (host, 4000), (ea, port), (callee, 5000), 100 + i))
        ifindex = in_netns(ns, lambda: if_nametoindex("ra"))
        prog.allow_egress(ifindex)
        prog.allow_egress(in_netns(ns, lambda: if_nametoindex("ea")))
        cases: Dict[str, bytes] = {}
        for fam, (ra, _ea, caller, callee, _) in NETS.items():
            cases[f"ipv{fam} relayed (rewrite + fib + redirect)"] = frame(
                CALLER_MAC, RA_MAC, caller, ra, 4000, 30000, PAYLOAD)
            cases[f"ipv{fam} junk, unknown port (drop)"] = frame(
                CALLER_MAC, RA_MAC, caller, ra, 4000, 64998, PAYLOAD)
            cases[f"ipv{fam} junk, wrong source (drop)"] = frame(
                CALLER_MAC, RA_MAC, callee, ra, 4000, 30000, PAYLOAD)
            cases[f"ipv{fam} not for the relay (pass)"] = frame(
                CALLER_MAC, RA_MAC, caller, callee, 4000, 30000, PAYLOAD)
        out: Dict[str, object] = {}
        for name, data in cases.items():
            def runs(d: bytes = data) -> tuple:
                got = [test_run(prog.relay_fd, d, ifindex, 1) for _ in range(calls)]
                return got[0][0], [g[2] for g in got]

            verdict, durations = in_netns(ns, runs)
            durations.sort()
            out[name] = {"verdict": verdict,
                         "ns_median": statistics.median(durations),
                         "ns_p10": durations[len(durations) // 10],
                         "ns_p90": durations[9 * len(durations) // 10]}
            if verdict in (XDP_DROP, XDP_PASS) and repeat > 1:
                looped = in_netns(ns, lambda d=data: [
                    test_run(prog.relay_fd, d, ifindex, repeat)[2] for _ in range(5)])
                out[name]["ns_repeat"] = statistics.median(looped)
        return out
    finally:
        if prog is not None:
            prog.close()
        run("ip", "netns", "del", ns, check=False)
        if ns in list_namespaces():
            raise RuntimeError(f"namespace {ns} left behind")


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.xdp_prog_cost",
                                description=__doc__.split("\n")[0])
    p.add_argument("--calls", type=int, default=20000)
    p.add_argument("--entries", type=int, default=1000, help="other streams in the map")
    p.add_argument("--repeat", type=int, default=1_000_000,
                   help="iterations of the kernel's loop for drop / pass (1: none)")
    p.add_argument("--out")
    args = p.parse_args(argv)
    if os.geteuid() != 0:
        print("error: needs root (BPF, namespaces)", file=sys.stderr)
        return 2
    start = machine()
    results = measure(min(args.calls, 1_000_000), args.entries,
                      min(max(args.repeat, 1), 10_000_000))
    report = {"command": "python -m bench.xdp_prog_cost " + " ".join(
        argv if argv is not None else sys.argv[1:]), "machine": start,
        "loadavg_at_end": machine()["loadavg"], "calls": args.calls,
        "entries": args.entries, "repeat": args.repeat, "results": results}
    for name, r in results.items():
        looped = f", looped {r['ns_repeat']} ns" if "ns_repeat" in r else ""
        print(f"{name:45s} verdict {r['verdict']}  median {r['ns_median']} ns "
              f"(p10 {r['ns_p10']}, p90 {r['ns_p90']}){looped}")
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(report, fh, indent=1)
            fh.write("\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
