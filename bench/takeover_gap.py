"""Media gap per call when a standby takes over a dead node's calls (two nodes, one Redis).

    .venv/bin/python -m bench.takeover_gap --calls 50 --poll 0.5,0.1 \\
        --mode socket,kernel,xdp --python .venv-pypy/bin/python \\
        --out bench/results/takeover-gap-<date>.json

Root only. Namespaces made here (removed at the end, leaks asserted): a client
namespace with a bridge (callers 198.51.100.10, callees .11) and two relay namespaces
on it; node 1 holds the shared media address 198.51.100.100, node 2 stands by for it
(`standby_for = ["node1"]`, `standby_poll` = each value of --poll); one redis-server on
a unix socket. N calls on node 1 (a fifth of them left in early dialog: offer and 183
only), RTP at 50 packets/s per direction on every call; then node 1 gets SIGKILL and its
address moves to node 2 at once (`ip addr del` / `add`, and a neighbour flush standing
in for keepalived's gratuitous ARP). keepalived's own failure detection (advert_int x 3,
about 3 s by default) comes on top of these figures: they start at the address move.

Per call and direction: the longest interval between two packets that arrived (the
media gap; 20 ms when nothing was lost) and the packets lost. --mode: socket, kernel, xdp,
nfqueue (node 2's ruleset built for node 1's media too: `standby_media`; xdp: generic
attach on these veths, and taken-over calls ride node 2's kernel path; see
docs/operations.md), packet (AF_PACKET taps on e0 whose filter and drop rules cover
node 1's media too: the same `standby_media`).
"""

from __future__ import annotations

import argparse
import itertools
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

from bench.netns import PREFIX, list_namespaces, run, socket_in
from bench.redis_server import RedisServer
from lrk.client import LrkClient
from lrk.demo.relay_process import RelayProcess

VIP = "198.51.100.100"
VIP_CONTROL = f"{VIP}:22222"
CALLER, CALLEE = "198.51.100.10", "198.51.100.11"
NODE_IPS = ("198.51.100.21", "198.51.100.22")
NODE_PORTS = ("30000-33999", "34000-37999")
TICK = 0.020
MAX_CALLS = 1000
MAX_SECONDS = 30.0
_seq = itertools.count()


class TwoNodes:
    """Client namespace (bridge br0, callers and callees) and two relay namespaces; node
    1 holds VIP. `destroy` removes them and asserts none is left."""

    def __init__(self, tag: str = "tk") -> None:
        base = f"{PREFIX}{os.getpid()}-{tag}{next(_seq)}"
        self.client, self.node = f"{base}c", [f"{base}n1", f"{base}n2"]
        self.made: List[str] = []
        try:
            for ns in (self.client, *self.node):
                run("ip", "netns", "add", ns)
                self.made.append(ns)
                run("ip", "link", "set", "lo", "up", ns=ns)
            run("ip", "link", "add", "br0", "type", "bridge", ns=self.client)
            for i, ns in enumerate(self.node):
                run("ip", "link", "add", f"c{i}", "netns", self.client, "type", "veth",
                    "peer", "name", "e0", "netns", ns)
                run("ip", "link", "set", f"c{i}", "master", "br0", "up", ns=self.client)
                run("ip", "addr", "add", f"{NODE_IPS[i]}/24", "dev", "e0", ns=ns)
                run("ip", "link", "set", "e0", "up", ns=ns)
            for ip in (CALLER, CALLEE):
                run("ip", "addr", "add", f"{ip}/24", "dev", "br0", ns=self.client)
            run("ip", "link", "set", "br0", "up", ns=self.client)
            run("ip", "addr", "add", f"{VIP}/24", "dev", "e0", ns=self.node[0])
        except BaseException:
            self.destroy()
            raise

    def move_vip(self) -> None:
        """What keepalived does on failover: the address leaves node 1 and appears on
        node 2; its gratuitous ARP makes the neighbours forget node 1's MAC."""
        run("ip", "addr", "del", f"{VIP}/24", "dev", "e0", ns=self.node[0], check=False)
        run("ip", "addr", "add", f"{VIP}/24", "dev", "e0", ns=self.node[1])
        run("ip", "neigh", "flush", "dev", "br0", ns=self.client)

    def pids(self, i: int) -> List[str]:
        """Processes in node i's namespace (none once its relay and workers are gone)."""
        return run("ip", "netns", "pids", self.node[i]).stdout.split()

    def destroy(self) -> None:
        made, self.made = self.made, []
        for ns in reversed(made):
            run("ip", "netns", "del", ns, check=False)
        leaked = sorted(set(made) & set(list_namespaces()))
        assert not leaked, f"namespaces left behind: {leaked}"


MODES = ("socket", "kernel", "xdp", "nfqueue", "packet")


def start_node(nodes: TwoNodes, i: int, redis: RedisServer, tmp: str, poll: float,
               python: Optional[str] = None, mode: str = "socket") -> RelayProcess:
    """Node i+1 in its namespace: Redis store; node 2 stands by for node 1. kernel and
    xdp modes: forwarding on in the node's namespace, node 2's ruleset built for node 1's
    media too (`standby_media`), the XDP program on e0. packet mode: taps on e0, node
    2's filter and drop rules covering node 1's media (`standby_media`)."""
    if mode not in MODES:
        raise ValueError(f"mode {mode!r} is not one of {MODES}")
    name = f"node{i + 1}"
    cfg = os.path.join(tmp, f"{name}.toml")
    with open(cfg, "w") as fh:
        fh.write(f"quarantine = 0\nstore = \"redis\"\nredis_url = \"{redis.url}\"\n"
                 f"node_id = \"{name}\"\n"
                 # the control address on the moving address: whichever node holds it
                 f"control_extra = [\"{VIP_CONTROL}\"]\n"
                 "control_allow = [\"127.0.0.0/8\", \"198.51.100.0/24\"]\n")
        if i == 1:
            fh.write(f"standby_for = [\"node1\"]\nstandby_poll = {poll}\n")
        if mode in ("kernel", "xdp", "nfqueue"):
            fh.write("kernel_poll = 0.2\n")
            if mode == "xdp":
                # generic XDP: native XDP_TX on this veth back into the client's bridge
                # reaches the bridge but never a socket here (a NIC has no such hop)
                fh.write("xdp_attach = \"generic\"\n")
        if mode != "socket" and i == 1:
            fh.write(f"standby_media = [\"{VIP}:{NODE_PORTS[0]}\"]\n")
    extra = ["--mode", mode]
    if mode in ("kernel", "xdp", "nfqueue"):
        run("sysctl", "-qw", "net.ipv4.ip_forward=1", ns=nodes.node[i])
    if mode == "packet":
        extra += ["--packet-interface", "e0"]
    if mode == "xdp":
        # native XDP_TX on a veth needs NAPI at its far end (GRO on); frames from the
        # bridge carry complete checksums (tx offload off), as a NIC's would
        run("ethtool", "-K", f"c{i}", "gro", "on", "tx", "off", ns=nodes.client)
        run("ethtool", "-K", "br0", "tx", "off", ns=nodes.client)
        extra += ["--xdp-interface", "e0"]
    ip = VIP if i == 0 else NODE_IPS[1]
    return RelayProcess(ports=NODE_PORTS[i], netns=nodes.node[i], python=python, extra=[
        *extra, "--internal-ip", ip, "--external-ip", ip, "--config", cfg]).start()


def audio(ip: str, port: int) -> str:
    return (f"v=0\r\no=- 1 1 IN IP4 {ip}\r\ns=-\r\nc=IN IP4 {ip}\r\nt=0 0\r\n"
            f"m=audio {port} RTP/AVP 0\r\na=rtpmap:0 PCMU/8000\r\n")


def _packet(stream: int, seq: int) -> bytes:
    return struct.pack("!BBHII", 0x80, 0, seq & 0xFFFF, seq * 160, stream) + bytes(160)


def run_once(calls: int, early: int, poll: float, before: float, after: float,
             python: Optional[str], mode: str = "socket") -> Dict[str, Any]:
    nodes = TwoNodes()
    redis = RedisServer().start()
    tmp = tempfile.TemporaryDirectory(prefix="lrk-takeover-")
    socks: List[socket.socket] = []
    relays: List[RelayProcess] = []
    try:
        relays.append(start_node(nodes, 0, redis, tmp.name, poll, python, mode))
        relays.append(start_node(nodes, 1, redis, tmp.name, poll, python, mode))
        legs = []
        with LrkClient([relays[0].node], timeout=2.0, retries=3) as client:
            for i in range(calls):
                caller = socket_in(nodes.client)
                callee = socket_in(nodes.client)
                caller.bind((CALLER, 4000 + 2 * i))
                callee.bind((CALLEE, 4000 + 2 * i))
                socks += [caller, callee]
                offer = client.offer(f"tk-{i}", "a", sdp=audio(CALLER, 4000 + 2 * i))
                answer = client.answer(f"tk-{i}", "a", "b", sdp=audio(CALLEE, 4000 + 2 * i),
                                       provisional=i < early)
                to_b = (offer["streams"][0]["ip"], offer["streams"][0]["port"])
                to_a = (answer["streams"][0]["ip"], answer["streams"][0]["port"])
                legs.append((caller, callee, to_a, to_b))
        for s in socks:
            s.setblocking(False)
        by_fd = {}
        for i, (caller, callee, _a, _b) in enumerate(legs):
            by_fd[callee.fileno()] = (callee, 2 * i)
            by_fd[caller.fileno()] = (caller, 2 * i + 1)
        n = 2 * calls
        sent, got = [0] * n, [0] * n
        last, gap = [0.0] * n, [0.0] * n
        first_after = [0.0] * n
        events: Dict[str, float] = {}
        moved = threading.Event()

        def fail_over() -> None:
            events["kill"] = time.monotonic()
            relays[0].kill()
            events["move"] = time.monotonic()
            nodes.move_vip()
            events["moved"] = time.monotonic()
            moved.set()

        poller = select.epoll()
        for fd in by_fd:
            poller.register(fd, select.EPOLLIN)
        t0 = time.monotonic()
        deadline, next_tick, late, seq = t0 + MAX_SECONDS, t0, 0, 0
        thread: Optional[threading.Thread] = None
        while True:
            now = time.monotonic()
            if now >= deadline:
                break
            if thread is None and now - t0 >= before:
                thread = threading.Thread(target=fail_over, daemon=True)
                thread.start()
            if moved.is_set() and now - events["moved"] >= after:
                break
            if now >= next_tick:
                if now - next_tick > TICK:
                    late += 1
                for i, (caller, callee, to_a, to_b) in enumerate(legs):
                    for sock, dest, stream in ((caller, to_a, 2 * i), (callee, to_b, 2 * i + 1)):
                        try:
                            sock.sendto(_packet(stream, seq), dest)
                            sent[stream] += 1
                        except OSError:
                            pass
                seq += 1
                next_tick += TICK
                if next_tick < now - 5 * TICK:
                    next_tick = now
            for fd, _ev in poller.poll(max(0.0, min(next_tick - time.monotonic(), TICK))):
                sock, stream = by_fd[fd]
                while True:
                    try:
                        sock.recv(2048)
                    except OSError:  # BlockingIOError, or an ICMP error queued
                        break
                    t = time.monotonic()
                    if last[stream]:
                        gap[stream] = max(gap[stream], t - last[stream])
                    last[stream] = t
                    got[stream] += 1
                    if "move" in events and not first_after[stream] and t > events["move"]:
                        first_after[stream] = t
        if thread is not None:
            thread.join(MAX_SECONDS)
        poller.close()
        with LrkClient([relays[1].node], timeout=2.0, retries=3) as client:
            stats = client.stats()
            for i in range(calls):
                client.delete(f"tk-{i}")
            keys_left = len(redis.keys("lrk:*:session:*"))
        gaps_ms = sorted(g * 1000 for g in gap)
        back_ms = sorted((t - events["move"]) * 1000 for t in first_after if t)
        lost = [sent[s] - got[s] for s in range(n)]
        per_call_lost = [lost[2 * i] + lost[2 * i + 1] for i in range(calls)]
        return {
            "mode": mode, "calls": calls, "early": early, "standby_poll": poll,
            "relay_python": python or sys.executable,
            "kill_to_move_s": round(events["move"] - events["kill"], 3),
            "move_s": round(events["moved"] - events["move"], 3),
            "gap_ms_median": round(statistics.median(gaps_ms), 1),
            "gap_ms_p90": round(gaps_ms[int(0.9 * (n - 1))], 1),
            "gap_ms_worst": round(gaps_ms[-1], 1),
            "back_after_move_ms_median": round(statistics.median(back_ms), 1) if back_ms
            else None,
            "back_after_move_ms_worst": round(back_ms[-1], 1) if back_ms else None,
            "directions_without_media_after": n - len(back_ms),
            "lost_per_call_median": statistics.median(per_call_lost),
            "lost_per_call_worst": max(per_call_lost),
            "taken_over": stats["counters"].get("takeover.sessions", 0),
            "redis_keys_left": keys_left,
            "sent": sum(sent), "received": sum(got), "late_ticks": late,
        }
    finally:
        for s in socks:
            s.close()
        for relay in relays:
            if relay.proc is not None and relay.proc.poll() is None:
                relay.stop()
            if relay._tmp is not None:
                relay._tmp.cleanup()
        redis.close()
        tmp.cleanup()
        nodes.destroy()


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--calls", type=int, default=50)
    p.add_argument("--early", type=int, default=-1, help="calls left in early dialog "
                   "(default: a fifth)")
    p.add_argument("--poll", default="0.5,0.1", help="standby_poll values, one run each")
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--before", type=float, default=2.0, help="media before the failure (s)")
    p.add_argument("--after", type=float, default=3.0, help="media after the move (s)")
    p.add_argument("--python", help="the relays' interpreter (default: this one)")
    p.add_argument("--mode", default="socket", help="data plane modes, one run each: "
                   + ", ".join(MODES))
    p.add_argument("--out")
    args = p.parse_args(argv)
    if os.geteuid() != 0:
        p.error("needs root (network namespaces)")
    if not 0 < args.calls <= MAX_CALLS:
        p.error(f"--calls must be 1..{MAX_CALLS}")
    early = args.calls // 5 if args.early < 0 else args.early
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = 2 * args.calls + 256
    if soft < need:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(need, hard), hard))
    modes = args.mode.split(",")
    for mode in modes:
        if mode not in MODES:
            p.error(f"--mode {mode!r}: takeover is built for {', '.join(MODES)}")
    results = []
    for rnd in range(1, max(1, min(args.rounds, 10)) + 1):
        for mode in modes:
            for poll in (float(v) for v in args.poll.split(",")):
                res = run_once(args.calls, early, poll, args.before, args.after, args.python,
                               mode)
                res["round"] = rnd
                print(json.dumps(res), flush=True)
                results.append(res)
    if args.out:
        with open(args.out, "w") as fh:
            json.dump({"argv": sys.argv, "finished": time.strftime("%Y-%m-%d %H:%M:%S UTC",
                                                                    time.gmtime()),
                       "machine": os.uname().nodename, "cpus": os.cpu_count(),
                       "results": results}, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
