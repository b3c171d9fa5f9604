"""A load generator that is never the limit: Debian's trafgen (netsniff-ng) on a veth.

`bench.loadgen` sends through UDP sockets from Python and tops out near 115-120k pkt/s on
this 2-core machine, below what the kernel and XDP paths forward. trafgen writes whole
frames into a PACKET_MMAP ring (no socket layer, no qdisc, one C process pinned to one
CPU), so it offers several times the rate any relay here can take, and what it could not
send it says (its exit statistics and the device's tx counter are both read).

The frames are built here, byte for byte (Ethernet, IPv4 or IPv6 without options, UDP
with a correct checksum, a 12-byte RTP header and a fixed payload), and written into the
trafgen configuration as constant bytes: trafgen then only copies them, round-robin over
the flows, with no per-packet work of its own.

The receiving side is a `Sink`: an nftables table in the callee's namespace that counts
and drops the flows' UDP packets at the earliest hook (prerouting, raw priority), so the
receiver costs nearly nothing and sends no ICMP back; the count is read from the counter.

    gen = Trafgen(ns=caller_ns, dev="vc0", src_mac=..., dst_mac=..., flows=[Flow(...)])
    with Sink(callee_ns, ports=(30000, 40000)) as sink:
        sent = gen.run(rate=500_000, count=1_000_000)
        delivered = sink.packets()

Bounds: at most MAX_FLOWS flows (the config holds every frame), MAX_COUNT packets and
MAX_DURATION seconds a run (trafgen is killed at the deadline).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import tempfile
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

from bench import jsonlines
from bench.frames import Flow, frame
from bench.netns import NetnsError, run

MAX_FLOWS = 20_000
MAX_COUNT = 50_000_000
MAX_DURATION = 60.0



def run_deadline(rate: int, count: int, timeout: Optional[float], max_count: int) -> float:
    """A generator run's bounds checked, and how long it may take: `timeout`, or three times
    the expected duration plus 5 s, at most MAX_DURATION (both generators' rule)."""
    if not 0 < count <= max_count:
        raise ValueError(f"count {count} outside 1..{max_count}")
    if rate < 0:
        raise ValueError(f"rate {rate} must be positive (or 0: unpaced)")
    expected = count / rate if rate else count / 1e6
    return min(MAX_DURATION, timeout if timeout is not None else expected * 3 + 5)

class TrafgenError(NetnsError):
    """trafgen could not run or did not send what it was asked to; the message says why."""


def render(frames: Sequence[bytes]) -> str:
    """A trafgen configuration: one packet block of constant bytes per frame."""
    if not frames:
        raise ValueError("no frames to send")
    if len(frames) > MAX_FLOWS:
        raise ValueError(f"{len(frames)} flows: at most {MAX_FLOWS} fit one configuration")
    return "".join("{ " + ", ".join(f"0x{b:02x}" for b in f) + " }\n" for f in frames)


def link_mac(ns: str, dev: str) -> str:
    out = run("ip", "-j", "link", "show", "dev", dev, ns=ns).stdout
    return json.loads(out)[0]["address"]


def tx_packets(ns: str, dev: str) -> int:
    out = run("ip", "-j", "-s", "link", "show", "dev", dev, ns=ns).stdout
    return int(json.loads(out)[0]["stats64"]["tx"]["packets"])


_SENT = re.compile(r"(\d+)\s+packets outgoing")


@dataclass
class Trafgen:
    """trafgen in namespace `ns` sending `flows` out of `dev` to the next hop `dst_mac`."""

    ns: str
    dev: str
    src_mac: str
    dst_mac: str
    flows: Sequence[Flow]
    cpu: Optional[int] = None

    def run(self, rate: int, count: int, timeout: Optional[float] = None) -> int:
        """Send `count` frames at `rate` pkt/s (0: as fast as trafgen can); returns the frames
        sent, checked against trafgen's own statistics and the device's tx counter."""
        deadline = run_deadline(rate, count, timeout, MAX_COUNT)
        frames = [frame(f, self.src_mac, self.dst_mac) for f in self.flows]
        fd, path = tempfile.mkstemp(prefix="lrk-trafgen-", suffix=".cfg")
        try:
            with os.fdopen(fd, "w") as fh:
                fh.write(render(frames))
            before = tx_packets(self.ns, self.dev)
            cmd = ["ip", "netns", "exec", self.ns]
            if self.cpu is not None:
                cmd += ["taskset", "-c", str(self.cpu)]
            cmd += ["trafgen", "--dev", self.dev, "--conf", path, "--cpus", "1",
                    *(["--rate", f"{int(rate)}pps"] if rate else []), "--num", str(int(count)),
                    "--no-sock-mem", "--notouch-irq", "--qdisc-path"]
            try:
                proc = subprocess.run(cmd, capture_output=True, text=True, timeout=deadline)
            except subprocess.TimeoutExpired as exc:
                raise TrafgenError(f"trafgen did not finish {count} packets at {rate} pkt/s "
                                   f"within {deadline:.0f} s") from exc
            if proc.returncode != 0:
                raise TrafgenError(f"trafgen failed ({proc.returncode}): "
                                   f"{(proc.stderr or proc.stdout).strip()[-400:]}")
            on_wire = tx_packets(self.ns, self.dev) - before
        finally:
            os.unlink(path)
        reported = _SENT.search(proc.stdout + proc.stderr)
        if reported and int(reported.group(1)) != count:
            raise TrafgenError(f"trafgen sent {reported.group(1)} of {count} packets")
        # the device's own frames (ND, MLD) may add a few to the tx counter, never fewer
        if on_wire < count:
            raise TrafgenError(f"trafgen reports {count} packets but {self.dev} sent {on_wire}")
        return count


class Sink:
    """Counts and drops UDP to `ports` in namespace `ns` before routing (no socket, no ICMP)."""

    def __init__(self, ns: str, ports: Tuple[int, int], table: str = "lrksink") -> None:
        self.ns, self.ports, self.table = ns, ports, table

    def __enter__(self) -> Sink:
        lo, hi = self.ports
        rules = (f"table inet {self.table} {{\n"
                 f" counter rx {{ }}\n"
                 f" chain pre {{ type filter hook prerouting priority -300; policy accept;\n"
                 f"  udp dport {lo}-{hi} counter name rx drop\n }}\n}}\n")
        _nft_stdin(self.ns, rules)
        return self

    def packets(self) -> int:
        out = run("nft", "-j", "list", "counter", "inet", self.table, "rx", ns=self.ns).stdout
        for item in json.loads(out)["nftables"]:
            if "counter" in item:
                return int(item["counter"]["packets"])
        raise TrafgenError(f"sink counter missing in {self.ns}")

    def __exit__(self, *exc: object) -> None:
        run("nft", "delete", "table", "inet", self.table, ns=self.ns, check=False)


def _nft_stdin(ns: str, rules: str) -> None:
    proc = subprocess.run(["ip", "netns", "exec", ns, "nft", "-f", "-"], input=rules,
                          capture_output=True, text=True, timeout=20)
    if proc.returncode != 0:
        raise TrafgenError(f"nft in {ns} failed: {proc.stderr.strip()}")


def flows_for(caller: str, relay: str, sessions: int, first_port: int = 30000,
              sport: int = 4000) -> List[Flow]:
    """One flow per session from `caller` to consecutive even relay ports (bench layout)."""
    if first_port + 4 * sessions > 65536 or sport + 2 * min(sessions, 20000) > 65536:
        raise ValueError(f"{sessions} sessions do not fit one port range from {first_port}")
    return [Flow(caller, sport + 2 * (i % 20000), relay, first_port + 4 * i, ssrc=i + 1)
            for i in range(sessions)]


def _napi_threads(dev: str) -> Dict[int, str]:
    found = {}
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                with open(f"/proc/{pid}/comm") as fh:
                    comm = fh.read().strip()
            except OSError:
                continue
            if comm.startswith(f"napi/{dev}-"):
                found[int(pid)] = comm
    return found


def steer(relay_ns: str, relay_dev: str, sender_ns: str, sender_dev: str, cpu: int,
          rt_prio: int = 0) -> int:
    """Move the relay namespace's receive work off the sender's core onto `cpu`.

    On a veth pair the receiver's stack normally runs in the *sender's* softirq context, so
    a generator on core 0 also pays for the relay's forwarding and no relay core is busy.
    Here the relay's veth gets NAPI (GRO on; the sender's TSO off makes plain UDP eligible),
    threaded NAPI, and its thread is pinned to `cpu`; the sender's veth gets a real queue
    (pfifo) so a full ring pushes back on the generator instead of failing its send. The
    relay's forwarding, NAT, conntrack or XDP program then run on `cpu`, whose busy share
    (`cpu_busy`) is the relay's. Every setting is per device, inside the test namespaces.
    `rt_prio` > 0 runs the thread SCHED_FIFO at that priority: like a NIC's softirq, it is
    then not queued behind other processes of a shared machine (RT throttling still leaves
    them 5 % of the core). Returns the NAPI thread's pid."""
    before = set(_napi_threads(relay_dev))
    run("ethtool", "-K", relay_dev, "gro", "on", ns=relay_ns)
    run("ethtool", "-K", sender_dev, "tso", "off", ns=sender_ns)
    run("tc", "qdisc", "replace", "dev", sender_dev, "root", "pfifo", "limit", "1000",
        ns=sender_ns)
    run("sh", "-c", f"echo 1 > /sys/class/net/{relay_dev}/threaded", ns=relay_ns)
    new = sorted(set(_napi_threads(relay_dev)) - before)
    if len(new) != 1:
        raise TrafgenError(f"expected one new NAPI thread for {relay_dev}, found {new}")
    subprocess.run(["taskset", "-pc", str(cpu), str(new[0])], check=True, capture_output=True)
    if rt_prio:
        os.sched_setscheduler(new[0], os.SCHED_FIFO, os.sched_param(rt_prio))
    return new[0]


def cpu_times(cpu: int) -> Tuple[int, int]:
    """(busy, total) jiffies of one CPU from /proc/stat."""
    with open("/proc/stat") as fh:
        for line in fh:
            if line.startswith(f"cpu{cpu} "):
                v = [int(x) for x in line.split()[1:]]
                total = sum(v[:8])
                return total - v[3] - v[4], total
    raise TrafgenError(f"cpu{cpu} not in /proc/stat")


def busy_share(before: Tuple[int, int], after: Tuple[int, int]) -> float:
    total = after[1] - before[1]
    return (after[0] - before[0]) / total if total else 0.0


def headroom(count: int = 2_000_000, rates: Sequence[int] = (300_000, 600_000, 1_000_000),
             sessions: int = 1000, relay_cpu: int = 1) -> List[dict]:
    """What the generator reaches through plain routing into a sink (no relay), with the
    relay namespace's work steered to `relay_cpu` (`steer`) and trafgen on the other core:
    the ceiling any relay figure measured with it stays below, and which side saturated."""
    import time

    from bench.netns import Topology

    results = []
    with Topology("-tg") as topo:
        mac = link_mac(topo.callee.ns, "ve0")
        run("ip", "neigh", "replace", topo.callee.ip4, "lladdr", mac, "dev", "ve1", "nud",
            "permanent", ns=topo.relay.ns)
        steer(topo.relay.ns, "vc1", topo.caller.ns, "vc0", relay_cpu)
        flows = [Flow(topo.caller.ip4, 4000 + 2 * (i % 20000), topo.callee.ip4,
                      30000 + 4 * i, ssrc=i + 1) for i in range(sessions)]
        gen_cpu = 1 - relay_cpu if relay_cpu in (0, 1) else 0
        gen = Trafgen(topo.caller.ns, "vc0", link_mac(topo.caller.ns, "vc0"),
                      link_mac(topo.relay.ns, "vc1"), flows, cpu=gen_cpu)
        for rate in rates:
            with Sink(topo.callee.ns, (30000, 30000 + 4 * sessions)) as sink:
                t0, c_relay, c_gen = time.monotonic(), cpu_times(relay_cpu), cpu_times(gen_cpu)
                sent = gen.run(rate, count)
                wall = time.monotonic() - t0
                relay_busy = busy_share(c_relay, cpu_times(relay_cpu))
                gen_busy = busy_share(c_gen, cpu_times(gen_cpu))
                delivered = sink.packets()
                results.append({"offered": rate, "sent": sent, "delivered": delivered,
                                "wall_s": round(wall, 3), "sent_pps": round(sent / wall),
                                "relay_cpu_busy": round(relay_busy, 2),
                                "generator_cpu_busy": round(gen_busy, 2),
                                "saturated": ("relay core" if relay_busy > 0.95 else
                                              "generator" if gen_busy > 0.95 else "neither")})
    return results


def main(argv: Optional[List[str]] = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--count", type=int, default=2_000_000)
    ap.add_argument("--rates", default="300000,600000,1000000")
    ap.add_argument("--sessions", type=int, default=1000)
    ap.add_argument("--out")
    args = ap.parse_args(argv)
    res = {"machine": os.uname().release, "date": __import__("time").strftime("%Y-%m-%d %H:%M"),
           "headroom": headroom(args.count, [int(r) for r in args.rates.split(",")],
                               sessions=args.sessions)}
    jsonlines.emit(res, args.out, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
