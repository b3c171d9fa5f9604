"""Many sessions on one relay (issue 14): install N calls through the daemon, then read
what holding them costs.

    .venv/bin/python -m bench.many_sessions daemon --sessions 4000 --addresses 4 \\
        --ports 30000-32047 --out bench/results/many-sessions-daemon.json
    .venv/bin/python -m bench.many_sessions engine --sessions 100000 --addresses 8 \\
        --out bench/results/many-sessions-engine.json
    .venv/bin/python -m bench.many_sessions kernel --sessions 100000 --addresses 4 \\
        --ports 10000-65535 --out bench/results/many-sessions-kernel.json

``daemon``: an lrk relay in socket mode on loopback with ``--addresses`` relay addresses
per side (127.0.0.1.. internal, 127.0.1.1.. external: loopback answers for all of
127/8, so no address is added anywhere). N calls are installed with msgpack offer
(interface external) + answer (internal), ``--window`` calls in flight, every reply
checked; the requests are packed and signed before the clock starts, so the client
costs one send + one recv + one unpack per request. Then: sessions/s, the relay's
RSS (daemon + workers) per session, the round trip of one ``stats`` at that size, and
that the calls spread over the addresses. ``--nursery``: ``launcher`` (default) runs a
PyPy relay with the GC nursery lrk's launchers give it (64 MB: the install rate of the
relay as operators run it; its RSS counts up to 64 MB a process of nursery filling),
``pypy`` with PyPy's own (1 MB here, `bench.peers.MEMORY_ENV`: the RSS per session
without that filling, the install rate without that tuning). Socket mode holds 4 sockets a
call, so N is bound by the fd limit (``ulimit -n``; 20000 here: about 4,800 calls).

``kernel`` (root): a relay in kernel mode (``--mode xdp``, ``nfqueue`` or ``socket`` too:
socket mode's four sockets a call are made room for by raising RLIMIT_NOFILE, or where
the hard limit cannot be raised by as many workers as it takes, the limit being per
process) in a
caller / relay / callee namespace topology of its own, ``--addresses`` (at most 8)
relay addresses per side on 198.51.100.0/24, each with its own port space and ct mark
slot; N calls installed over the relay's unix control socket, then ``--passes``
counter-read passes (a ``stats`` after ``kernel_poll``: the relay reads every call's
counters first), every call deleted, the relay stopped: sessions/s of install and
delete, daemon CPU and RSS, what is left (calls, ports, conntrack flows, the table).
Requests are signed right before each run (the relay's ``control_auth_window`` is set
to 60 s). ``--relay-python`` runs the relay under another interpreter.

``engine``: the sans-IO engine alone (the daemon's control plane without sockets) with
N calls on ``--addresses`` addresses per side and the full port range: offer + answer
per second, RSS per session, one expiry pass with nothing due and with 1% due, one
counter report folded in. No network, no processes.
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import socket
import sys
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import msgpack

from bench import jsonlines
from bench.capacity import cpu_seconds, worker_pids
from bench.inflight import pipeline
from bench.peers import MEMORY_ENV
from lrk.client import LrkClient
from lrk.control.auth import sign
from lrk.demo.relay_process import RelayProcess

Addr = Tuple[str, int]

MAX_SECONDS = 120.0
#: kernel: 100,000 calls at 1,000-2,000/s
KERNEL_SECONDS = 300.0


def _rss_kib(pid: int) -> int:
    """VmRSS of `pid` and its live children (the relay's workers), KiB."""
    total = 0
    pids = [pid]
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/children") as fh:
                pids.extend(int(c) for c in fh.read().split())
    except FileNotFoundError:
        pass
    for p in pids:
        try:
            with open(f"/proc/{p}/status") as fh:
                for line in fh:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1])
        except FileNotFoundError:
            continue
    return total


def _addresses(n: int) -> Tuple[List[str], List[str]]:
    return ([f"127.0.0.{i + 1}" for i in range(n)], [f"127.0.1.{i + 1}" for i in range(n)])


def _judge(errors: List[str], keep: Optional[Dict[str, Dict[str, Any]]] = None
           ) -> Callable[[bytes], Tuple[Optional[str], bool]]:
    """A reply's cookie and success; the first few errors' texts go to `errors`, and every
    reply to `keep` (by cookie) if given."""
    def judge(data: bytes) -> Tuple[Optional[str], bool]:
        try:
            reply = msgpack.unpackb(data, raw=False)
        except (ValueError, msgpack.ExtraData):
            return None, False
        ok = reply.get("ok") is True
        if not ok and len(errors) < 5:
            errors.append(str(reply.get("error")))
        if keep is not None and reply.get("cookie") is not None:
            keep[reply["cookie"]] = reply
        return reply.get("cookie"), ok
    return judge


def install(sock: socket.socket, datagrams: List[List[bytes]], window: int,
            prefix: str = "", deadline: float = MAX_SECONDS,
            keep: Optional[Dict[str, Dict[str, Any]]] = None) -> Dict[str, Any]:
    """Every call's requests in order (offer then answer, or a delete), `window` calls in
    flight, on a connected socket (`bench.inflight.pipeline`); replies checked (and kept
    in `keep` by cookie, if given: where the relay put each call)."""
    sock.setblocking(False)
    errors: List[str] = []
    run = pipeline(sock, datagrams, window, deadline, _judge(errors, keep),
                   lambda call, step: f"{prefix}{call}.{step}")
    return {"installed": run.done, "seconds": round(run.seconds, 3), "resent": run.resent,
            "failed": run.errors, "errors": errors,
            "sessions_per_s": round(run.done / run.seconds, 1) if run.seconds else 0.0}


def _udp(addr: Tuple[str, int]) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 22)
    sock.connect(addr)
    return sock


def unix_socket(path: str, directory: str, ns: str) -> socket.socket:
    """A datagram socket bound in `directory`, connected to a relay's unix control socket
    (how a relay in another network namespace is reached). Made in namespace `ns`, whose
    net.unix.max_dgram_qlen (the caller raised it) bounds the replies queued to it."""
    from bench.netns import socket_in

    local = os.path.join(directory, "bench.sock")
    if os.path.exists(local):
        os.unlink(local)  # the previous run's
    sock = socket_in(ns, socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 22)
    sock.bind(local)
    sock.connect(path)
    return sock


def _packer(relay: RelayProcess) -> Callable[[Dict[str, Any]], bytes]:
    """Packs and signs requests with one timestamp (now): the relay refuses a signature
    older than its control_auth_window, so sign right before a run."""
    key, wall = relay.ping_key(), time.time()

    def packed(request: Dict[str, Any]) -> bytes:
        data = msgpack.packb(request)
        return sign(data, key, wall) if key is not None else data
    return packed


def call_requests(relay: RelayProcess, media: Sequence[Tuple[Addr, Addr]],
                  prefix: str = "many-", cookies: str = "") -> List[List[bytes]]:
    """Call n's offer (its caller's media address, interface external) + answer (its
    callee's, internal), packed and signed before the clock starts (cookies
    "<cookies><n>.<step>", call ids "<prefix><n>")."""
    packed = _packer(relay)
    return [[packed({"cmd": "offer", "cookie": f"{cookies}{n}.0", "call_id": f"{prefix}{n}",
                      "from_tag": "a", "interface": "external",
                      "media": {"ip": a[0], "port": a[1]}}),
              packed({"cmd": "answer", "cookie": f"{cookies}{n}.1",
                      "call_id": f"{prefix}{n}",
                      "from_tag": "a", "to_tag": "b", "interface": "internal",
                      "media": {"ip": b[0], "port": b[1]}})]
             for n, (a, b) in enumerate(media)]


def _requests(relay: RelayProcess, sessions: int, caller: str, callee: str,
              prefix: str = "many-", cookies: str = "") -> List[List[bytes]]:
    """Every call's offer + answer from one caller and one callee address."""
    return call_requests(relay, [((caller, 7000 + 2 * (n % 20000)),
                                  (callee, 7000 + 2 * (n % 20000))) for n in range(sessions)],
                         prefix, cookies)


def _deletes(relay: RelayProcess, sessions: int, prefix: str = "many-",
             cookies: str = "d") -> List[List[bytes]]:
    """Every call's delete (cookies "<cookies><call>.0": a cookie seen before gets the
    relay's cached reply)."""
    packed = _packer(relay)
    return [[packed({"cmd": "delete", "cookie": f"{cookies}{n}.0", "call_id": f"{prefix}{n}",
                     "from_tag": "a"})] for n in range(sessions)]


def daemon(args: argparse.Namespace) -> Dict[str, Any]:
    internal, external = _addresses(args.addresses)
    extra = ["--config", args.config] if args.config else []
    for ip in internal:
        extra += ["--internal-ip", ip]
    for ip in external:
        extra += ["--external-ip", ip]
    with RelayProcess(ports=args.ports, extra=extra, env=_relay_env(args)) as relay:
        pid = relay.proc.pid  # type: ignore[union-attr]
        datagrams = _requests(relay, args.sessions, "127.0.0.1", "127.0.0.1")
        rss0 = _rss_kib(pid)
        with _udp(("127.0.0.1", relay.control_port)) as sock:
            result = install(sock, datagrams, args.window)
        rss1 = _rss_kib(pid)
        times = []
        stats: Dict[str, Any] = {}
        with LrkClient([relay.node]) as client:  # signs each request afresh
            for _ in range(args.repeat):
                t0 = time.perf_counter()
                stats = dict(client.stats())
                times.append(time.perf_counter() - t0)
    times.sort()
    by_address = stats.get("ports_by_address", {})
    result.update({
        "mode": "socket", "addresses_per_side": args.addresses, "ports": args.ports,
        "sessions_held": stats.get("sessions"), "port_pairs": stats.get("ports"),
        "in_use_by_address": {ip: p["in_use"] for ip, p in by_address.items()},
        "rss_kib_before": rss0, "rss_kib_after": rss1,
        "rss_bytes_per_session": round((rss1 - rss0) * 1024 / max(1, result["installed"])),
        "stats_round_trip_ms_median": round(times[len(times) // 2] * 1000, 3),
    })
    return result


def _relay_env(args: argparse.Namespace) -> Optional[Dict[str, str]]:
    """`--nursery pypy`: PyPy's own GC nursery (RSS per session without the launchers'
    64 MB filling); `launcher`: the environment lrk's launchers give a relay."""
    return MEMORY_ENV if args.nursery == "pypy" else None


def _cpu_s(pid: int) -> float:
    """CPU seconds (user + system) of process `pid` so far."""
    with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _workers_cpu_s(pid: int) -> float:
    """CPU seconds of the daemon's live children (socket mode's workers) so far."""
    return float(sum(cpu_seconds(w) or 0.0 for w in worker_pids(pid)))


def _timed_stats(client: LrkClient, pid: int) -> Tuple[float, float, Dict[str, Any]]:
    """(wall s, daemon CPU s, reply) of one `stats`."""
    c0, t0 = _cpu_s(pid), time.perf_counter()
    reply = dict(client.stats())
    return time.perf_counter() - t0, _cpu_s(pid) - c0, reply


MAX_KERNEL_ADDRESSES = 8


def kernel_addresses(n: int) -> Tuple[List[str], List[str]]:
    """`n` relay addresses per side in a `bench.netns.Topology`: internal on the caller's
    link (198.51.100.1-8), external on the callee's (198.51.100.65, .81-.87); the first
    of each is the topology's own."""
    if not 1 <= n <= MAX_KERNEL_ADDRESSES:
        raise ValueError(f"{n} relay addresses per side: 1..{MAX_KERNEL_ADDRESSES}")
    return ([f"198.51.100.{i + 1}" for i in range(n)],
            ["198.51.100.65"] + [f"198.51.100.{81 + i}" for i in range(n - 1)])


def add_relay_addresses(topo: Any, internal: List[str], external: List[str],
                        window: int) -> None:
    """The relay's addresses beyond the topology's own on its veths (vc1 internal, ve1
    external), and a unix datagram queue deep enough for `window` requests in flight
    (the default 10 would drop replies)."""
    from bench.netns import run

    ns = topo.relay.ns
    run("sysctl", "-qw", f"net.unix.max_dgram_qlen={4 * window}", ns=ns)
    for ip in internal[1:]:
        run("ip", "addr", "add", f"{ip}/26", "dev", "vc1", ns=ns)
    for ip in external[1:]:
        run("ip", "addr", "add", f"{ip}/26", "dev", "ve1", ns=ns)


def relay_args(cfg: str, mode: str, sessions: int, internal: List[str], external: List[str],
               kernel_poll: float = 2.0) -> List[str]:
    """Writes the relay's config to `cfg` and returns its command-line arguments: `mode`
    (xdp: on the topology's vc1 and ve1), the addresses, no expiry; the control
    signature window is 60 s because each phase's requests (100,000 installs: up to 25 s)
    are signed before it starts. Not longer: the relay remembers every signed request of
    the window (524,288 at most, then it refuses new ones), and a run with warm-up rounds
    sends 600,000."""
    with open(cfg, "w") as fh:
        fh.write(f"kernel_poll = {kernel_poll}\nsilence_timeout = 3600\n"
                 "max_lifetime = 0\ncontrol_auth_window = 60\n")
        if mode == "xdp":  # four directions (map entries) a one-stream call
            fh.write(f"xdp_max_streams = {4 * sessions + 1024}\n")
    extra = ["--mode", mode, "--config", cfg]
    if mode == "xdp":
        extra += ["--xdp-interface", "vc1", "--xdp-interface", "ve1"]
    for ip in internal:
        extra += ["--internal-ip", ip]
    for ip in external:
        extra += ["--external-ip", ip]
    return extra


def _room_for_sockets(sessions: int) -> int:
    """Socket mode holds four sockets a call in its workers, which inherit this process's
    RLIMIT_NOFILE (through `ip netns exec`): raise it, hard limit too where allowed
    (CAP_SYS_RESOURCE), to hold them all beside a worker's reserve; where the hard limit
    stays, as many workers as it takes (the limit is per process). Returns the workers."""
    from lrk.daemon.socket_plane import FD_RESERVE

    need = 4 * sessions + FD_RESERVE + 1024
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard < need:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (need, need))
            return 1
        except (OSError, ValueError):
            pass  # no CAP_SYS_RESOURCE: the hard limit is what a process gets
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    per_worker = (hard - FD_RESERVE) // 4 * 4
    return max(1, -(-4 * sessions // per_worker))


def kernel(args: argparse.Namespace) -> Dict[str, Any]:
    """N calls through a kernel-mode (or xdp-mode) relay in a namespace of its own, with
    `--addresses` relay addresses per side on 198.51.100.0/24 (each its own port space
    and ct mark slot): install rate, RSS, one counter-read pass, delete-all, stop."""
    import tempfile

    from bench.netns import Topology, run

    if args.addresses > MAX_KERNEL_ADDRESSES:
        raise SystemExit("kernel: at most 8 addresses per side (198.51.100.1-8 internal, "
                         "198.51.100.65 and .81-.87 external)")
    if args.workers > 1 and args.mode != "socket":
        raise SystemExit("--workers: socket mode's only")
    workers = _room_for_sockets(args.sessions) if args.mode == "socket" else 1
    workers = max(workers, args.workers)
    topo = Topology(f"ms{os.getpid() % 1000}").create()
    try:
        ns = topo.relay.ns
        internal, external = kernel_addresses(args.addresses)
        add_relay_addresses(topo, internal, external, args.window)
        with tempfile.TemporaryDirectory(prefix="lrk-many-") as tmp:
            os.chmod(tmp, 0o755)
            extra = relay_args(os.path.join(tmp, "lrk.toml"), args.mode, args.sessions,
                               internal, external, args.kernel_poll)
            if args.mode == "socket":
                extra += ["--workers", str(workers)]
            relay = RelayProcess(ports=args.ports, netns=ns, extra=extra,
                                 python=args.relay_python, env=_relay_env(args)).start()
            try:
                result = _kernel_run(args, relay, topo, tmp)
            finally:
                t0 = time.perf_counter()
                code = relay.stop(timeout=120)
                stop_s = time.perf_counter() - t0
            result.update({"workers": workers,
                           "rlimit_nofile": resource.getrlimit(resource.RLIMIT_NOFILE)[0],
                           "stop_seconds": round(stop_s, 3), "stop_exit_code": code,
                           "table_left": "table inet lrk" in run("nft", "list", "tables",
                                                                 ns=ns).stdout})
    finally:
        topo.destroy()
    return result


def _kernel_run(args: argparse.Namespace, relay: RelayProcess, topo: Any, tmp: str
                ) -> Dict[str, Any]:
    from bench.netns import run

    pid = relay.proc.pid  # type: ignore[union-attr]  # ip netns exec execs the relay
    warm = []
    for r in range(args.warmup_rounds):  # the same calls set up and ended before, apart
        with unix_socket(relay.host, tmp, topo.relay.ns) as sock:
            up = install(sock, _requests(relay, args.sessions, topo.caller.ip4,
                                         topo.callee.ip4, f"warm{r}-", f"w{r}-"),
                         args.window, prefix=f"w{r}-", deadline=KERNEL_SECONDS)
            down = install(sock, _deletes(relay, args.sessions, f"warm{r}-", f"dw{r}-"),
                           args.window, prefix=f"dw{r}-", deadline=KERNEL_SECONDS)
        warm.append({"installed_per_s": up["sessions_per_s"], "failed": up["failed"],
                     "deleted_per_s": down["sessions_per_s"]})
    setup = _requests(relay, args.sessions, topo.caller.ip4, topo.callee.ip4)
    rss0, cpu0, wcpu0 = _rss_kib(pid), _cpu_s(pid), _workers_cpu_s(pid)
    me0 = time.process_time()
    with unix_socket(relay.host, tmp, topo.relay.ns) as sock:
        result = install(sock, setup, args.window, deadline=KERNEL_SECONDS)
    rss1, cpu1, wcpu1 = _rss_kib(pid), _cpu_s(pid), _workers_cpu_s(pid)
    result["daemon_cpu_s_install"] = round(cpu1 - cpu0, 2)
    # which side saturated: the daemon, its workers (socket mode) or this client
    result["workers_cpu_s_install"] = round(wcpu1 - wcpu0, 2)
    result["client_cpu_s_install"] = round(time.process_time() - me0, 2)
    passes, quick = [], []
    stats: Dict[str, Any] = {}
    with LrkClient([relay.node], timeout=30.0) as client:
        for _ in range(args.passes):
            # a stats after kernel_poll seconds reads every counter first (refresh): one
            # pass; the one right after it reuses that read
            time.sleep(args.kernel_poll + 0.1)
            passes.append(_timed_stats(client, pid)[:2])
            wall, cpu, stats = _timed_stats(client, pid)
            quick.append((wall, cpu))
    deletes = _deletes(relay, args.sessions)
    cpu2 = _cpu_s(pid)
    with unix_socket(relay.host, tmp, topo.relay.ns) as sock:
        removed = install(sock, deletes, args.window, prefix="d", deadline=KERNEL_SECONDS)
    cpu3 = _cpu_s(pid)
    with LrkClient([relay.node], timeout=30.0) as client:
        after = dict(client.stats())
    flows_left = [line for line in run("conntrack", "-L", ns=topo.relay.ns,
                                       check=False).stdout.splitlines()
                  if line.startswith("udp")]
    by_address = stats.get("ports_by_address", {})
    counters = stats.get("counters", {})

    def median(xs: List[float]) -> float:
        return sorted(xs)[len(xs) // 2] if xs else float("nan")

    result.update({
        "warmup_rounds": warm,
        "relay_python": args.relay_python or sys.executable,
        "mode": args.mode, "addresses_per_side": args.addresses, "ports": args.ports,
        "kernel_poll": args.kernel_poll,
        "sessions_held": stats.get("sessions"), "port_pairs": stats.get("ports"),
        "in_use_by_address": {ip: p["in_use"] for ip, p in by_address.items()},
        "kernel_units_installed": counters.get("kernel.sessions.installed"),
        "kernel_errors": counters.get("kernel.errors"),
        "rss_kib_before": rss0, "rss_kib_after": rss1,
        "rss_bytes_per_session": round((rss1 - rss0) * 1024 / max(1, result["installed"])),
        "counter_pass_stats_wall_ms_median": round(median([p[0] for p in passes]) * 1000, 1),
        "counter_pass_daemon_cpu_ms_median": round(median([p[1] for p in passes]) * 1000, 1),
        "stats_without_pass_wall_ms_median": round(median([q[0] for q in quick]) * 1000, 1),
        "counter_passes_timed": len(passes),
        "delete_all_seconds": removed["seconds"], "deleted": removed["installed"],
        "deletes_per_s": removed["sessions_per_s"], "delete_failed": removed["failed"],
        "delete_errors": removed["errors"], "delete_resent": removed["resent"],
        "counters_after_delete": {k: v for k, v in after.get("counters", {}).items()
                                  if k.startswith(("control.", "plane.", "workers."))
                                  and v},
        "daemon_cpu_s_delete_all": round(cpu3 - cpu2, 2),
        "sessions_after_delete": after.get("sessions"),
        "ports_in_use_after_delete": after.get("ports", {}).get("in_use"),
        "conntrack_flows_left": len(flows_left),
    })
    return result


def engine(args: argparse.Namespace) -> Dict[str, Any]:
    from fastpath.contract import LegReport, SessionReport, StreamReport
    from lrk.core.engine import Engine, EngineConfig

    internal, external = _addresses(args.addresses)
    lo, hi = (int(x) for x in args.ports.split("-"))
    e = Engine(EngineConfig(internal_ip=internal[0], external_ip=external[0],
                            internal_ips=tuple(internal), external_ips=tuple(external),
                            port_start=lo, port_end=hi, silence_timeout=60.0))
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    for n in range(args.sessions):
        call = f"many-{n}"
        e.offer(float(n) * 1e-4, call, "a", ("198.51.100.10", 7000), interface="external")
        e.answer(float(n) * 1e-4, call, "a", "b", ("198.51.100.20", 7002))
    install_s = time.perf_counter() - t0
    rss1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    in_use = e.ports.in_use
    now = 30.0  # nothing due yet
    t0 = time.perf_counter()
    for _ in range(args.repeat):
        assert e.handle_timer(now) == []
    idle_pass = (time.perf_counter() - t0) / args.repeat
    session = next(iter(e.sessions()))
    report = SessionReport(session.sid, 31.0, (StreamReport(
        0, LegReport(10, 1720, 10, 1720, (), 1, None),
        LegReport(10, 1720, 10, 1720, (), 1, None)),))
    t0 = time.perf_counter()
    for _ in range(args.repeat):
        e.apply_report(report)
    report_s = (time.perf_counter() - t0) / args.repeat
    due = args.sessions // 100  # the first 1% created are due at 60 s + their creation
    t0 = time.perf_counter()
    ended = e.handle_timer(60.0 + due * 1e-4)
    due_pass = time.perf_counter() - t0
    return {
        "mode": "engine (sans-IO)", "addresses_per_side": args.addresses, "ports": args.ports,
        "sessions": args.sessions, "install_seconds": round(install_s, 3),
        "sessions_per_s": round(args.sessions / install_s, 1),
        "ports_total": e.ports.total, "ports_in_use": in_use,
        "max_rss_kib_growth": rss1 - rss0,
        "rss_bytes_per_session": round((rss1 - rss0) * 1024 / args.sessions),
        "expiry_pass_nothing_due_us": round(idle_pass * 1e6, 2),
        "expiry_pass_1pct_due_ms": round(due_pass * 1000, 3), "ended_in_that_pass": len(ended),
        "report_fold_us": round(report_s * 1e6, 2),
    }


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("what", choices=("daemon", "engine", "kernel"))
    parser.add_argument("--mode", default="kernel",
                        choices=("kernel", "xdp", "nfqueue", "socket"),
                        help="the relay's mode (kernel)")
    parser.add_argument("--kernel-poll", type=float, default=2.0,
                        help="the relay's kernel_poll (kernel)")
    parser.add_argument("--relay-python", help="the relay's interpreter (kernel; default: "
                        "this one): a PyPy relay driven by a CPython client, whose msgpack "
                        "is C, measures the relay rather than the client")
    parser.add_argument("--passes", type=int, default=5,
                        help="counter-read passes timed (kernel)")
    parser.add_argument("--sessions", type=int, default=4000)
    parser.add_argument("--addresses", type=int, default=4, help="relay addresses per side")
    parser.add_argument("--ports", default="30000-32047")
    parser.add_argument("--window", type=int, default=64, help="calls in flight (daemon)")
    parser.add_argument("--warmup-rounds", type=int, default=0,
                        help="kernel: install and delete the calls this many times first "
                        "(other call ids and cookies), so the judged round meets a warm JIT")
    parser.add_argument("--workers", type=int, default=1,
                        help="socket mode's workers, at least (kernel --mode socket; more if "
                        "the descriptor limit needs them)")
    parser.add_argument("--nursery", choices=("launcher", "pypy"), default="launcher",
                        help="a PyPy relay's GC nursery: lrk's launchers' (64 MB, as "
                        "operators run it) or PyPy's own (1 MB here: RSS per session "
                        "without the nursery's filling)")
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument("--config", help="a TOML file for the relay (daemon)")
    parser.add_argument("--out", help="write the JSON here too")
    args = parser.parse_args(argv)
    if not 1 <= args.sessions <= 200_000 or not 1 <= args.addresses <= 64:
        parser.error("--sessions must be within 1..200000, --addresses within 1..64")
    result = {"daemon": daemon, "engine": engine, "kernel": kernel}[args.what](args)
    result.update({"python": f"{platform.python_implementation()} {platform.python_version()}",
                   "nursery": args.nursery,
                   "machine": f"{platform.machine()}, {os.cpu_count()} cores, shared",
                   "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                   "loadavg_before": os.getloadavg()[0],
                   "command": " ".join(["python -m bench.many_sessions", *sys.argv[1:]])})
    jsonlines.emit(result, args.out, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
