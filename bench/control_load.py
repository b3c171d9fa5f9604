"""Control-plane load: pipelined offer+answer+delete cycles over UDP, lrk beside rtpengine.

    .venv/bin/python -m bench.control_load --cycles 10000 --rounds 3 \\
        --peers cpython,pypy,rtpengine --rtpengine-threads 1,2 --out /tmp/control.json

starts every peer once -- lrk (msgpack control protocol) on each interpreter named in
``--peers`` (``cpython``: CPython + uvloop, ``pypy``), and Debian's rtpengine (NG
protocol, bencode over UDP, userspace forwarding) once per ``--rtpengine-threads``
value -- warms each up, then runs ``--rounds`` rounds in which every peer in turn gets
the same load: ``--cycles`` calls, ``--window`` of them in flight, each call offer ->
answer -> delete in order (so its ports are freed), every reply checked. The figures
of each peer are those of its median round (by requests/s); all rounds are kept in the
JSON. Ratios are lrk ÷ rtpengine, from the same run.

Both peers get the same work per call: an SDP body to read and rewrite (one PCMU
stream), two port pairs to allocate and bind, a delete that frees them. lrk gets
``interface`` external on the offer and internal on the answer; rtpengine gets
``direction`` [internal, external] on the offer (see `bench.ng.setup_call`). Request
datagrams are built before the clock starts, so the client's cost per request is one
``sendto`` + one ``recv`` + decoding the reply; a lost request is resent with its
cookie after 1 s. Bounded: a cycle count and a deadline per round.

Per-core figures: rtpengine with ``--num-threads 1`` against one lrk control process
(lrk's control plane is one thread; its worker process only takes the sockets).
``server_us_per_request`` is the CPU time (user + system, /proc) the peer's processes
spent per request during the round, so it does not depend on how the two cores were
shared with the client.

``--lrk-body media`` sends lrk the media address instead of an SDP body (the form the
earlier figures in docs/benchmarks.md used).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import tempfile
import time
from contextlib import ExitStack
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import msgpack

from bench.inflight import pipeline
from bench.ng import CALL_FLAGS, NgError, audio_sdp, decode_message, encode_message
from lrk.control.auth import Key, sign
from lrk.demo.relay_process import RelayProcess

MAX_SECONDS = 60.0
Addr = Tuple[str, int]
STEPS = 3  # offer, answer, delete
CALLER: Addr = ("127.0.0.1", 7000)
CALLEE: Addr = ("127.0.0.1", 7002)
#: rtpengine: one port pair per leg and a call at most `window` deep, so this is ample
RTPENGINE_PORTS = "46000-49999"


# -- request datagrams -----------------------------------------------------------------

def _requests(cycle: int, tag: str, body: str = "media") -> List[Dict[str, object]]:
    """lrk's three msgpack requests of one call (without cookies)."""
    call_id = f"bench-{tag}-{cycle}"
    if body == "sdp":
        offer: Dict[str, object] = {"sdp": audio_sdp(*CALLER), "interface": "external"}
        answer: Dict[str, object] = {"sdp": audio_sdp(*CALLEE), "interface": "internal"}
    else:
        offer = {"media": {"ip": CALLER[0], "port": CALLER[1]}}
        answer = {"media": {"ip": CALLEE[0], "port": CALLEE[1]}}
    return [
        {"cmd": "offer", "call_id": call_id, "from_tag": "a", **offer},
        {"cmd": "answer", "call_id": call_id, "from_tag": "a", "to_tag": "b", **answer},
        {"cmd": "delete", "call_id": call_id},
    ]


def _ng_requests(cycle: int, tag: str) -> List[Dict[str, object]]:
    """rtpengine's three NG requests of one call (the same call as `_requests`)."""
    call_id = f"bench-{tag}-{cycle}"
    return [
        {"command": "offer", "call-id": call_id, "from-tag": "a", "sdp": audio_sdp(*CALLER),
         "direction": ["internal", "external"], **CALL_FLAGS},
        {"command": "answer", "call-id": call_id, "from-tag": "a", "to-tag": "b",
         "sdp": audio_sdp(*CALLEE), **CALL_FLAGS},
        {"command": "delete", "call-id": call_id, "from-tag": "a"},
    ]


class Protocol:
    """How one peer's datagrams are built and its replies judged."""

    name = "?"

    def build(self, cycles: int, tag: str) -> List[List[bytes]]:
        raise NotImplementedError

    def judge(self, data: bytes) -> Tuple[Optional[str], bool]:
        """(cookie, success) of one reply datagram; cookie None if unreadable."""
        raise NotImplementedError

    def reset(self) -> Dict[str, int]:
        """Counters of the run that ends (added to its result); start new ones."""
        return {}


class MsgpackProtocol(Protocol):
    """lrk's requests, signed with `key` (HMAC trailer, docs/protocol.md) when given; the
    signing happens while building, before the clock starts, like the packing."""

    name = "msgpack"

    def __init__(self, body: str = "sdp", key: Optional[Key] = None) -> None:
        self.body = body
        self.key = key

    def build(self, cycles: int, tag: str) -> List[List[bytes]]:
        key, wall = self.key, time.time()
        out = [[msgpack.packb(dict(request, cookie=f"{tag}.{cycle}.{step}"))
                for step, request in enumerate(_requests(cycle, tag, self.body))]
               for cycle in range(cycles)]
        if key is not None:
            out = [[sign(data, key, wall) for data in steps] for steps in out]
        return out

    def judge(self, data: bytes) -> Tuple[Optional[str], bool]:
        try:
            reply = msgpack.unpackb(data, raw=False)
        except ValueError:
            return None, False
        if not isinstance(reply, dict):
            return None, False
        return reply.get("cookie"), reply.get("ok") is True


class NgProtocol(Protocol):
    """Replies are judged by their top-level ``result``. Decoding every reply in Python
    (a delete's reply carries the call's statistics, about 1.5 kB) cost this client more
    than rtpengine spent answering, so the client is not the bottleneck only with a cheap
    check: ``6:result2:ok`` present and no ``6:result5:error``; every `verify_every`-th
    reply is decoded in full as well and must agree (a disagreement counts as an error)."""

    name = "ng"

    def __init__(self, verify_every: int = 16) -> None:
        self.verify_every = verify_every
        self.seen = 0
        self.verified = 0

    def build(self, cycles: int, tag: str) -> List[List[bytes]]:
        return [[encode_message(f"{tag}.{cycle}.{step}", request)
                 for step, request in enumerate(_ng_requests(cycle, tag))]
                for cycle in range(cycles)]

    def reset(self) -> Dict[str, int]:
        counts = {"replies_fully_decoded": self.verified}
        self.seen = self.verified = 0
        return counts

    def judge(self, data: bytes) -> Tuple[Optional[str], bool]:
        space = data.find(b" ")
        if space <= 0:
            return None, False
        ok = b"6:result2:ok" in data and b"6:result5:error" not in data
        self.seen += 1
        if self.seen % self.verify_every == 0:
            self.verified += 1
            try:
                cookie, reply = decode_message(data)
            except NgError:
                return None, False
            return cookie, ok and reply.get("result") == "ok"
        try:
            return data[:space].decode("ascii"), ok
        except UnicodeDecodeError:
            return None, False


# -- the load loop ---------------------------------------------------------------------

def run_load(addr: Addr, cycles: int, window: int = 16, deadline: float = MAX_SECONDS,
             protocol: Optional[Protocol] = None,
             cpu: Optional[Callable[[], float]] = None) -> Dict[str, Any]:
    """`window` calls in flight at once, each running offer -> answer -> delete in order.

    `cpu` returns the server's CPU seconds so far; with it, the result has the
    server's CPU per request.
    """
    protocol = protocol or MsgpackProtocol(body="media")
    tag = os.urandom(3).hex()
    datagrams = protocol.build(cycles, tag)
    protocol.reset()
    prefix = f"{tag}."
    family = socket.AF_INET6 if ":" in addr[0] else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
    sock.connect(addr)
    sock.setblocking(False)
    server_cpu0 = cpu() if cpu else 0.0
    client_cpu0 = time.process_time()
    run = pipeline(sock, datagrams, window, deadline, protocol.judge,
                   lambda cycle, step: f"{prefix}{cycle}.{step}")
    latencies, errors, resent, stray = run.latencies, run.errors, run.resent, run.stray
    done, elapsed = run.done, run.seconds
    client_cpu = time.process_time() - client_cpu0
    server_cpu = (cpu() - server_cpu0) if cpu else None
    sock.close()
    latencies.sort()

    def pct(p: float) -> float:
        return latencies[min(len(latencies) - 1, int(p * len(latencies)))] * 1000 if latencies \
            else float("nan")

    n = len(latencies)
    result: Dict[str, Any] = {
        "protocol": protocol.name,
        "cycles": done,
        "requests": n,
        "errors": errors,
        "resent": resent,
        "stray_replies": stray,
        "seconds": round(elapsed, 3),
        "requests_per_s": round(n / elapsed, 1) if elapsed else 0.0,
        "cycles_per_s": round(done / elapsed, 1) if elapsed else 0.0,
        "p50_ms": round(pct(0.50), 3),
        "p99_ms": round(pct(0.99), 3),
        "client_us_per_request": round(client_cpu / n * 1e6, 1) if n else None,
    }
    result.update(protocol.reset())
    if server_cpu is not None:
        result["server_us_per_request"] = round(server_cpu / n * 1e6, 1) if n else None
    return result


# -- CPU of a process tree (lrk: control process + workers) ----------------------------

def _children(pid: int) -> List[int]:
    out: List[int] = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except FileNotFoundError:
        return out
    for tid in tasks:
        try:
            with open(f"/proc/{pid}/task/{tid}/children") as fh:
                out.extend(int(c) for c in fh.read().split())
        except FileNotFoundError:
            continue
    return out


def tree_cpu_seconds(pid: int) -> float:
    """User + system CPU of `pid` and its live descendants (all threads), from /proc."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0
    stack = [pid]
    while stack:
        p = stack.pop()
        try:
            with open(f"/proc/{p}/stat") as fh:
                fields = fh.read().rsplit(")", 1)[1].split()
        except FileNotFoundError:
            continue
        total += int(fields[11]) + int(fields[12])
        stack.extend(_children(p))
    return total / tick


# -- peers -----------------------------------------------------------------------------

class Peer:
    """A running relay under load: its control address, protocol and CPU probe."""

    def __init__(self, label: str, addr: Addr, protocol: Protocol, cpu: Callable[[], float],
                 describe: str, stop: Callable[[], Any]) -> None:
        self.label = label
        self.addr = addr
        self.protocol = protocol
        self.cpu = cpu
        self.describe = describe
        self.stop = stop
        self.rounds: List[Dict[str, Any]] = []


def _lrk_peer(stack: ExitStack, label: str, python: str, body: str,
              auth: str = "hmac") -> Peer:
    """lrk on `python`; `auth` "none" runs it with control_auth = "none" (unsigned)."""
    with tempfile.NamedTemporaryFile("w", suffix=".toml", delete=False) as cfg:
        cfg.write("quarantine = 0.5\n")
        if auth == "none":
            cfg.write('control_auth = "none"\n')
    stack.callback(os.unlink, cfg.name)
    relay = RelayProcess(ports="10000-29999", python=python, extra=["--config", cfg.name],
                         auth=auth)
    relay.start()
    stack.callback(relay.stop)
    pid = relay.proc.pid  # type: ignore[union-attr]
    return Peer(label, ("127.0.0.1", relay.control_port),
                MsgpackProtocol(body, relay.ping_key()), lambda: tree_cpu_seconds(pid),
                f"lrk on {python}, msgpack ({body} body, control_auth {auth})", relay.stop)


def _rtpengine_peer(stack: ExitStack, threads: int) -> Peer:
    from bench.rtpengine import RtpengineProcess

    rtpe = RtpengineProcess(ports=RTPENGINE_PORTS, threads=threads, log_level=4)
    rtpe.start()
    stack.callback(rtpe.stop)
    return Peer(f"rtpengine-{threads}t", rtpe.ng, NgProtocol(), rtpe.cpu_seconds,
                f"rtpengine {rtpe.binary}, --num-threads {threads}, userspace (table -1), NG",
                rtpe.stop)


def measure(python: str, cycles: int, window: int = 16,
            body: str = "media") -> Dict[str, Any]:
    """Start a relay with interpreter `python` and load its control plane (one peer alone)."""
    with ExitStack() as stack:
        peer = _lrk_peer(stack, "lrk", python, body)
        run_load(peer.addr, min(200, cycles), window, protocol=peer.protocol)  # warm-up
        return run_load(peer.addr, cycles, window, protocol=peer.protocol, cpu=peer.cpu)


def measure_rtpengine(cycles: int, window: int = 16, threads: int = 1) -> Dict[str, Any]:
    """Start rtpengine (`threads` worker threads) and load its control plane the same way."""
    with ExitStack() as stack:
        peer = _rtpengine_peer(stack, threads)
        run_load(peer.addr, min(200, cycles), window, protocol=peer.protocol)  # warm-up
        return run_load(peer.addr, cycles, window, protocol=peer.protocol, cpu=peer.cpu)


def _median_round(rounds: List[Dict[str, Any]]) -> Dict[str, Any]:
    ranked = sorted(rounds, key=lambda r: r["requests_per_s"])
    return dict(ranked[(len(ranked) - 1) // 2])


def compare(cycles: int = 10000, window: int = 16, rounds: int = 3,
            peers: Sequence[str] = ("cpython", "pypy", "rtpengine"),
            rtpengine_threads: Sequence[int] = (1, 2), lrk_body: str = "sdp",
            warmup: int = 2000, quick: bool = False,
            progress: Optional[Callable[[str], None]] = None) -> Dict[str, Any]:
    """Every peer started once, then `rounds` interleaved rounds of the same load.

    Returns {"results": [per peer: median round + all rounds], "ratios": lrk ÷
    rtpengine requests/s and server CPU per request, ...}. `quick` is the test suite's
    short form (few cycles, one round).
    """
    from bench.interpreters import find_interpreters

    if quick:
        cycles, rounds, warmup = min(cycles, 500), 1, min(warmup, 100)
    say = progress or (lambda text: print(text, file=sys.stderr, flush=True))
    found = find_interpreters()
    skipped: Dict[str, str] = {}
    report: Dict[str, Any] = {
        "cycles": cycles, "window": window, "rounds": rounds, "warmup_cycles": warmup,
        "lrk_body": lrk_body, "time": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "loadavg": os.getloadavg(), "client": sys.executable, "results": [],
        "skipped": skipped,
    }
    with ExitStack() as stack:
        running: List[Peer] = []
        for name in peers:
            if name == "rtpengine":
                for threads in rtpengine_threads:
                    running.append(_rtpengine_peer(stack, threads))
            elif name.split("-")[0] in found:  # "pypy", or "pypy-noauth": control_auth none
                base, _, variant = name.partition("-")
                running.append(_lrk_peer(stack, f"lrk-{name}", found[base]["python"],
                                         lrk_body, "none" if variant == "noauth" else "hmac"))
            else:
                skipped[name] = "interpreter not available (scripts/install.sh makes it)"
                say(f"{name}: not available, skipped")
        for peer in running:
            say(f"{peer.label}: {peer.describe}; warm-up {warmup} cycles")
            run_load(peer.addr, warmup, window, protocol=peer.protocol)
        for r in range(rounds):
            for peer in running:
                result = run_load(peer.addr, cycles, window, protocol=peer.protocol,
                                  cpu=peer.cpu)
                peer.rounds.append(result)
                say(f"round {r + 1}/{rounds} {peer.label}: {result['requests_per_s']:,.0f} "
                    f"req/s, p50 {result['p50_ms']} ms, p99 {result['p99_ms']} ms, server "
                    f"{result.get('server_us_per_request')} µs/req, errors {result['errors']}")
        for peer in running:
            median = _median_round(peer.rounds)
            median.update(peer=peer.label, describe=peer.describe, req_per_s=median[
                "requests_per_s"], all_rounds=peer.rounds,
                exit_code=peer.stop())
            report["results"].append(median)
    report["ratios"] = ratios(report["results"])
    return report


def ratios(results: List[Dict[str, Any]]) -> Dict[str, float]:
    """lrk ÷ rtpengine for every pair: requests/s, and rtpengine's CPU per request ÷ lrk's
    (so > 1 means lrk is better in both)."""
    out: Dict[str, float] = {}
    by = {r["peer"]: r for r in results}
    for lrk in (p for p in by if p.startswith("lrk-")):
        for rtpe in (p for p in by if p.startswith("rtpengine")):
            a, b = by[lrk], by[rtpe]
            if b["requests_per_s"]:
                out[f"{lrk}/{rtpe} req_per_s"] = round(a["requests_per_s"]
                                                       / b["requests_per_s"], 2)
            if a.get("server_us_per_request") and b.get("server_us_per_request"):
                out[f"{lrk}/{rtpe} cpu_per_request (rtpe ÷ lrk)"] = round(
                    b["server_us_per_request"] / a["server_us_per_request"], 2)
    for base in ("lrk-cpython", "lrk-pypy"):  # the cost of signed requests (docs/security.md)
        on, off = by.get(base), by.get(base + "-noauth")
        if on and off and off["requests_per_s"]:
            out[f"{base} auth/noauth req_per_s"] = round(on["requests_per_s"]
                                                         / off["requests_per_s"], 3)
            if on.get("server_us_per_request") and off.get("server_us_per_request"):
                out[f"{base} auth/noauth cpu_per_request"] = round(
                    on["server_us_per_request"] / off["server_us_per_request"], 3)
    if "lrk-cpython" in by and "lrk-pypy" in by and by["lrk-cpython"]["requests_per_s"]:
        out["pypy_over_cpython req_per_s"] = round(
            by["lrk-pypy"]["requests_per_s"] / by["lrk-cpython"]["requests_per_s"], 2)
    return out


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cycles", type=int, default=10000, help="calls per round and peer")
    parser.add_argument("--window", type=int, default=16, help="calls in flight")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds")
    parser.add_argument("--warmup", type=int, default=2000, help="warm-up calls per peer")
    parser.add_argument("--peers", default="cpython,pypy,rtpengine",
                        help="lrk interpreters (cpython, pypy; cpython-noauth, pypy-noauth: "
                        "with control_auth = \"none\") and/or rtpengine")
    parser.add_argument("--interpreters", help=argparse.SUPPRESS)  # old name of --peers
    parser.add_argument("--rtpengine-threads", default="1,2",
                        help="one rtpengine per value (--num-threads); 1 = per-core figure")
    parser.add_argument("--lrk-body", choices=("sdp", "media"), default="sdp")
    parser.add_argument("--out", help="write JSON results here")
    args = parser.parse_args(argv)
    if args.cycles < 1 or args.window < 1 or args.rounds < 1:
        parser.error("--cycles, --window and --rounds must be >= 1")
    peers = [p.strip() for p in (args.interpreters or args.peers).split(",") if p.strip()]
    threads = [int(t) for t in args.rtpengine_threads.split(",") if t.strip()]
    report = compare(args.cycles, args.window, args.rounds, peers, threads, args.lrk_body,
                     args.warmup)
    report["command"] = "python -m bench.control_load " + " ".join(
        argv if argv is not None else sys.argv[1:])
    # compact: the per-round details go to --out only
    brief = {r["peer"]: {k: r[k] for k in ("requests_per_s", "p50_ms", "p99_ms",
                                           "server_us_per_request", "client_us_per_request",
                                           "errors", "cycles")}
             for r in report["results"]}
    print(json.dumps({"results": brief, "ratios": report["ratios"]}, indent=2))
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(report, fh, indent=2)
    bad = [r["peer"] for r in report["results"] if r["errors"] or r["cycles"] != args.cycles]
    if bad:
        print(f"peers with failed or missing replies: {', '.join(bad)}", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
