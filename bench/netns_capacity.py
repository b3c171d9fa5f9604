"""Kernel fast path in network namespaces: ways to relay media, measured side by side.

One topology (`bench.netns.Topology`: caller <-> relay <-> callee, each a network
namespace of its own, veth links), one direction caller -> relay -> callee, 172-byte
RTP packets, and for every session count the modes one after the other:

* ``routing``     plain kernel forwarding: the caller sends straight to the callee's
                  address, the relay namespace only routes (no ruleset, so no
                  conntrack either). The baseline.
* ``static-nat``  a hand-written static nftables ruleset in the relay namespace,
                  ``table inet benchnat``: one DNAT map (relay A address . port ->
                  callee address . port) and one SNAT map (callee address . port ->
                  relay B address . port), one element each per session, looked up
                  by two rules that only see a flow's first packet (nat chains);
                  conntrack does the rest. The second baseline.
* ``kernel``      ``lrkproxy run --mode kernel`` in the relay namespace, sessions
                  through `LrkClient` (offer from the caller, interface external;
                  answer from the callee, interface internal).
* ``nfqueue``     ``lrkproxy run --mode nfqueue``: each flow's first packet is admitted
                  and latched in userspace (NFQUEUE), the rest is kernel NAT.
* ``xdp``         ``lrkproxy run --mode xdp`` with the XDP program on the relay
                  namespace's two veths (native mode; ``xdp-generic``: generic/SKB
                  mode); only when asked for with --modes. Such a run sets GRO on
                  and TX checksum offload off on the hosts' veth ends for every mode
                  of the run (``options.xdp_links``):
                  native redirect into a veth needs NAPI at its far end, and a frame
                  XDP redirects must carry a full UDP checksum (docs/fastpath.md).
* ``socket``      ``lrkproxy run`` (socket mode, one worker, PyPy).
* ``packet``      ``lrkproxy run --mode packet`` with AF_PACKET taps on the relay
                  namespace's two veths (``vc1``, ``ve1``), userspace forwarding.
* ``packet-xdp``  the same over AF_XDP (``--packet-io af_xdp``): an XDP program steers
                  the media into AF_XDP sockets on both veths; only when asked for
                  with --modes.
* overload mitigations of the userspace modes (MITIGATIONS): ``socket-pinned`` and
  ``packet-pinned`` (relay on CPU 1, generator on CPU 0), ``socket-policed`` (an
  nftables policer on the relay's ports at 0.9x socket mode's capacity).
* ``rtpengine`` (only when asked for with --modes): Debian's rtpengine in the relay
  namespace through `bench.peers` (its own daemon and ng client), on lrk's relay ports.
  Another relay is one more `Bench.setups` entry like it.
* ``kernel-rules`` (above DAEMON_MAX_SESSIONS, where no lrk daemon fits: lrk hands out
  4 ports per session from one 16-bit range, so one daemon holds at most 16,128
  sessions): kernel mode's ruleset from `fastpath.kernel.kernel_rules` with its elements
  installed in bulk and no daemon, sessions spread over 5 relay address pairs added to
  the relay namespace's veths (explicit ct marks, since relay ports repeat).

Large rigs (above BULK_SESSIONS) share caller sockets (a session is a distinct flow by
its destination) and bind callee sockets to explicit ports on 5 callee addresses. This
VM caps RLIMIT_NOFILE at 20,000 (no CAP_SYS_RESOURCE), and a generator holds one callee
socket per session, so above GEN_MAX_SESSIONS several generator processes share the
sessions and are driven as one (`GeneratorGroup`, each at its share of the rate).

For each (mode, sessions) it measures

* capacity: the highest offered rate (pkt/s, all sessions) forwarded with < 1 % loss
  in a 1 s step -- the bounded doubling-then-bisection search of `bench.capacity`;
* overload: what is delivered when 2x the capacity is offered;
* CPU per packet at an equal load (default 50,000 pkt/s = 1,000 calls x 50 pkt/s),
  see "CPU" below;
* first-packet latency: for each of N fresh flows, install its session (timed), send
  its first packet at once and time the arrival at the callee; the flow's second
  packet gives the established-flow latency beside it (medians, µs, including one
  sendto + recv in this process);
* sessions per second: those N installs one after the other -- kernel and socket:
  offer + answer through `LrkClient`; static-nat: one libnftables transaction per
  session -- with the load sessions installed; then ending the N sessions one by
  one (delete through the client; static-nat: one transaction each).

The load generator is `bench.loadgen --serve` in a separate PyPy process: this
process makes the caller sockets inside the caller namespace and the callee sockets
inside the callee namespace (`socket_in`) and hands them over by file descriptor; a
socket stays in the namespace it was made in, whichever process holds it, so one
generator process drives both ends without `ip netns exec` and without threads. It
paces sendmmsg bursts in 1 ms ticks and receives with recvmmsg; it reports its own
achieved rate, and a step it could not deliver is flagged (``generator``).

CPU. Kernel forwarding and NAT run in softirq context -- on this veth topology
mostly inside the *sender's* sendmmsg (the packet is forwarded before the syscall
returns) -- so they are not attributable to the relay namespace through any
process. Measured over the equal-load steps:

* ``softirq``: softirq + hardirq time of all CPUs per delivered packet from
  /proc/stat (tick-sampled), minus the same columns' rate in an idle window just
  before (other tenants). This is the relay namespace's forwarding/NAT/conntrack
  work plus the callee's receive (veth + UDP delivery), which is the same in every
  mode (``routing`` shows it);
* ``relay``: run time (schedstat, ns) of the relay daemon's process tree (lrk's
  kernel mode: its counter polling; socket mode: the worker's Python and syscalls).
  A softirq that runs while the worker is current is in both figures (the callee's
  receive after the worker's sendmmsg), so socket mode's sum is an upper bound;
* ``relay_ns`` = softirq + relay: the relay namespace's CPU per packet;
* ``path``: run time (schedstat, ns-precise) of generator + relay daemon +
  ksoftirqd per packet. Without IRQ_TIME_ACCOUNTING a task's run time includes the
  softirq work done in its context, so this holds every cycle of the path; the
  generator's own share is the same in every mode, so differences between modes
  are the relay's differences. Less exposed to other tenants than the tick samples.

    .venv/bin/python -m bench.netns_capacity --sessions 1,1000,100000 \\
        --out bench/results/netns_capacity.json

Root only; addresses from 198.51.100.0/24 (and 2001:db8::/32 in the topology); the
root namespace's ruleset, addresses, routes and sysctls are never touched; every
namespace is deleted at the end, also on failure.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import os
import queue
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

from bench import jsonlines
from bench.capacity import LOSS_LIMIT, PRECISION, machine, search, verdict
from bench.interpreters import find_interpreters, pypy_or_current
from bench.loadgen import MAX_DURATION, MAX_RATE, tune_socket
from bench.netns import NETNS_DIR, Host, Topology, list_namespaces, run, socket_in
from lrk.client import LrkClient
from lrk.demo.media import rtp_packet
from lrk.demo.relay_process import RelayProcess

#: the modes measured at every session count a daemon holds (order of the run)
MODES = ("routing", "static-nat", "kernel", "nfqueue", "socket", "packet")
#: overload mitigations of the userspace modes, measured beside them in the full run:
#: ``-pinned`` puts the relay's processes on CPU 1 and the generator(s) on CPU 0;
#: ``-policed`` adds an nftables policer on the relay's ports (prerouting, before the
#: socket) at POLICE_FRACTION of the capacity the plain mode just measured
MITIGATIONS = ("socket-pinned", "socket-policed", "packet-pinned")
POLICE_FRACTION = 0.9
POLICE_TABLE = "benchpolice"
#: lrk's daemon modes (a relay process in the relay namespace, sessions through LrkClient)
#: other relays, through bench.peers (their own daemon and client, in the relay namespace)
PEER_MODES = ("rtpengine",)
#: opt-in daemon modes (--modes): not in the default run
XDP_MODES = ("xdp", "xdp-generic")
#: packet mode over AF_XDP sockets (--packet-io af_xdp), opt-in too
AFXDP_MODES = ("packet-xdp",)
DAEMON_MODES = ("kernel", "nfqueue", "socket", "packet") + MITIGATIONS + PEER_MODES + XDP_MODES \
    + AFXDP_MODES
#: above DAEMON_MAX_SESSIONS: the kernel datapath alone -- kernel mode's ruleset
#: (fastpath.kernel.kernel_rules) with its elements installed in bulk, no daemon
RULES_MODE = "kernel-rules"
SCALE_MODES = ("routing", "static-nat", RULES_MODE)
ALL_MODES = MODES + MITIGATIONS + PEER_MODES + XDP_MODES + AFXDP_MODES + (RULES_MODE,)
DEFAULT_SESSIONS = (1, 1000)
#: lrk hands out 4 ports per session (two RTP/RTCP pairs) from ONE range shared by both
#: relay addresses (kernel mode: ct marks are relay ports), so one relay holds at most
#: (65535 - 1024) / 4 = 16,128 sessions; this harness gives a daemon 20000-65535
#: (11,300 sessions with the latency flows) and runs daemon modes up to this count
DAEMON_MAX_SESSIONS = 10000
MAX_SESSIONS = 100000
#: above this many sessions the rig shares caller sockets and binds callee sockets to
#: explicit ports on several callee addresses (one address has ~28,000 ephemeral ports)
BULK_SESSIONS = 4000
CALLEE_PORT_BASE = 10000  # below the callee namespace's ephemeral range (32768-60999)
CALLEE_PER_IP = 20000
#: extra addresses for the scale rig, all in the topology's 198.51.100.0/24 links:
#: callee side 198.51.100.64/26 (relay B .65, callee .70), caller side .0/26 (relay A .1,
#: caller .10)
EXTRA_CALLEE_IPS = ("198.51.100.71", "198.51.100.72", "198.51.100.73", "198.51.100.74")
EXTRA_RELAY_A_IPS = ("198.51.100.2", "198.51.100.3", "198.51.100.4", "198.51.100.5")
EXTRA_RELAY_B_IPS = ("198.51.100.66", "198.51.100.67", "198.51.100.68", "198.51.100.69")
#: the equal-load point: 1,000 calls x 50 pkt/s
CPU_RATE = 50000
START_RATE = 20000
MAX_STEPS = 10
STEP_DURATION = 1.0
GRACE = 0.3
CPU_DURATION = 3.0
CPU_REPEATS = 3
LATENCY_FLOWS = 50
LATENCY_TIMEOUT = 1.0
#: quick form (bench/bench_netns.py)
#: (a step the generator could not offer -- a stall of this shared machine -- is measured
#: once more, as in the full form)
QUICK = {"start_rate": 10000, "max_steps": 4, "step_duration": 0.25, "cpu_duration": 0.3,
         "cpu_repeats": 1, "latency_flows": 5, "warm_duration": 0.5, "generator_retries": 1}
#: relay ports of lrk (daemon modes run one after the other, never together)
LRK_PORT_START = 20000
#: static-nat and kernel-rules: relay A port (caller side) = relay B port (callee side)
#: = base + 2 i on the (i // per address)-th relay address pair
STATIC_PORT_BASE = 20000
PORTS_PER_ADDRESS = (65534 - STATIC_PORT_BASE) // 2
STATIC_TABLE = "benchnat"
RULES_TABLE = "benchlrk"
#: kernel-rules: explicit ct marks (relay ports repeat across relay addresses)
RULES_MARK_BASE = 1 << 20
#: bulk installs: sessions per libnftables transaction (bounds nft's memory)
BULK_CHUNK = 2500
#: bound on a bulk install of one mode (seconds)
BULK_DEADLINE = 600.0
LATENCY_SSRC = 0x1A7E0000
#: stop the whole run after this long (every step is bounded; this bounds their number)
RUN_DEADLINE = 3600.0

Addr = Tuple[str, int]
Progress = Callable[[str], None]
_CLK_TCK = os.sysconf("SC_CLK_TCK")
_CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


class BenchError(RuntimeError):
    pass


# -- a thread that lives in one namespace ---------------------------------------------


class NsThread:
    """Runs calls inside namespace `ns` (libnftables, /proc/thread-self/net/...).

    The thread enters the namespace once (setns) and checks it is no longer in the
    namespace this process started in; a process it forks inherits the namespace,
    so even the nft binary fallback of `fastpath.kernel.nft.Nft` lands there.
    """

    def __init__(self, ns: str) -> None:
        self.ns = ns
        self._q: queue.Queue = queue.Queue()
        self._ready = threading.Event()
        self._error: Optional[BaseException] = None
        self._thread = threading.Thread(target=self._main, name=f"ns-{ns}", daemon=True)
        self._thread.start()
        if not self._ready.wait(10) or self._error is not None:
            self.close()
            raise BenchError(f"could not enter namespace {ns}: {self._error}")

    def _main(self) -> None:
        try:
            home = os.stat("/proc/self/ns/net").st_ino  # the main thread's namespace
            target = os.stat(os.path.join(NETNS_DIR, self.ns)).st_ino
            fd = os.open(os.path.join(NETNS_DIR, self.ns), os.O_RDONLY)
            try:
                if _libc.setns(fd, _CLONE_NEWNET) != 0:
                    err = ctypes.get_errno()
                    raise OSError(err, os.strerror(err))
            finally:
                os.close(fd)
            now = os.stat("/proc/thread-self/ns/net").st_ino
            if now != target or now == home:
                raise BenchError(f"setns({self.ns}) left the thread in the wrong namespace")
        except BaseException as exc:
            self._error = exc
            self._ready.set()
            return
        self._ready.set()
        while True:
            item = self._q.get()
            if item is None:
                return
            fn, args, box, done = item
            try:
                box.append((True, fn(*args)))
            except BaseException as exc:
                box.append((False, exc))
            done.set()

    def call(self, fn: Callable[..., Any], *args: Any, timeout: float = 300.0) -> Any:
        box: List[Tuple[bool, Any]] = []
        done = threading.Event()
        self._q.put((fn, args, box, done))
        if not done.wait(timeout):
            raise BenchError(f"call in namespace {self.ns} did not finish in {timeout}s")
        ok, value = box[0]
        if not ok:
            raise value
        return value

    def close(self) -> None:
        if self._thread.is_alive():
            self._q.put(None)
            self._thread.join(10)


def _snmp_udp() -> Dict[str, int]:
    """Udp counters of the calling thread's namespace."""
    with open("/proc/thread-self/net/snmp") as fh:
        rows = [line.split() for line in fh if line.startswith("Udp:")]
    return {k: int(v) for k, v in zip(rows[0][1:], rows[1][1:])}


# -- CPU accounting --------------------------------------------------------------------


def cpu_ticks() -> Dict[str, Any]:
    """Aggregate /proc/stat cpu line (USER_HZ ticks), plus softirq + irq per CPU."""
    out: Dict[str, Any] = {}
    per_cpu: List[int] = []
    names = ("user", "nice", "system", "idle", "iowait", "irq", "softirq", "steal")
    with open("/proc/stat") as fh:
        for line in fh:
            if not line.startswith("cpu"):
                continue
            f = dict(zip(names, (int(x) for x in line.split()[1:])))
            if line.startswith("cpu "):
                out = f
                out["busy"] = sum(f[k] for k in ("user", "nice", "system", "irq", "softirq"))
                out["kirq"] = f["irq"] + f["softirq"]
            else:
                per_cpu.append(f["irq"] + f["softirq"])
    if not out:
        raise BenchError("/proc/stat has no cpu line")
    out["kirq_cpu"] = per_cpu
    return out


def backlog_drops() -> int:
    """Packets dropped because a CPU's input backlog (netdev_max_backlog) was full, all
    CPUs (/proc/net/softnet_stat, second column): where veth forwarding sheds overload."""
    total = 0
    with open("/proc/net/softnet_stat") as fh:
        for line in fh:
            cols = line.split()
            if len(cols) > 1:
                total += int(cols[1], 16)
    return total


def tree_pids(pid: int) -> List[int]:
    """pid and all its descendants."""
    out, todo = [], [pid]
    while todo and len(out) < 1000:
        p = todo.pop()
        out.append(p)
        try:
            for tid in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{tid}/children") as fh:
                    todo.extend(int(c) for c in fh.read().split())
        except OSError:
            pass
    return out


def _schedstat(pids: List[int], field: int) -> int:
    total = 0
    for pid in pids:
        try:
            tids = os.listdir(f"/proc/{pid}/task")
        except OSError:
            continue
        for tid in tids:
            try:
                with open(f"/proc/{pid}/task/{tid}/schedstat") as fh:
                    total += int(fh.read().split()[field])
            except (OSError, ValueError, IndexError):
                pass
    return total


def runtime_ns(pids: List[int]) -> int:
    """Run time (ns, schedstat) of these processes, all threads. Without
    IRQ_TIME_ACCOUNTING it includes the softirq work that ran in their context."""
    return _schedstat(pids, 0)


def timeslices(pids: List[int]) -> int:
    """Times these processes' threads were scheduled in (schedstat): their wake-ups,
    which is what a userspace relay's per-packet cost follows at media rates."""
    return _schedstat(pids, 2)


def ksoftirqd_pids() -> List[int]:
    out = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/comm") as fh:
                    if fh.read().startswith("ksoftirqd/"):
                        out.append(int(name))
            except OSError:
                pass
    return out


def _us(ticks: float) -> float:
    return ticks * 1e6 / _CLK_TCK


# -- the load generator process --------------------------------------------------------


class Generator(jsonlines.ChildProcess):
    """`bench.loadgen --serve` (PyPy) with the caller and callee sockets inherited by fd."""

    def __init__(self, python: str, socks: List[socket.socket]) -> None:
        super().__init__("bench.loadgen", socks, python, BenchError)


#: the most sessions one generator process drives: this VM caps RLIMIT_NOFILE at 20,000
#: (no CAP_SYS_RESOURCE to raise it) and a generator holds one callee socket per session
GEN_MAX_SESSIONS = 16000
GEN_CALLERS = 200


class GeneratorGroup:
    """Several generator processes driven as one: a step is sent to all at once, each
    offering its share of the rate (rate x its sessions / all sessions, so every session
    sees the same rate), and their results are summed. One process when the sessions
    fit one (every rig up to GEN_MAX_SESSIONS)."""

    def __init__(self, gens: List[Generator], shares: List[int]) -> None:
        self.gens = gens
        self.shares = shares
        self.info: dict = {}

    @property
    def pids(self) -> List[int]:
        return [g.pid for g in self.gens]

    def setup(self, spec: List[list]) -> dict:
        lo = 0
        for g, n in zip(self.gens, self.shares):
            g.send({"cmd": "setup", "sessions": spec[lo:lo + n]})
            lo += n
        infos = [g.reply({"cmd": "setup"}, 120.0 + n / 500)
                 for g, n in zip(self.gens, self.shares)]
        self.info = {**infos[0], "processes": len(self.gens)}
        return self.info

    def step(self, rate: float, duration: float, grace: float = GRACE) -> dict:
        rate = min(float(rate), MAX_RATE)
        duration = min(float(duration), MAX_DURATION)
        total = sum(self.shares)
        cmds = [{"cmd": "run", "rate": rate * n / total, "duration": duration, "grace": grace}
                for n in self.shares]
        for g, cmd in zip(self.gens, cmds):
            g.send(cmd)
        parts = [g.reply(cmd, duration + grace + 30.0) for g, cmd in zip(self.gens, cmds)]
        if len(parts) == 1:
            res = parts[0]
        else:
            res = {"rate": rate, "duration": duration, "processes": len(parts)}
            for k in ("sent", "received", "skipped", "send_failed", "recv_errors", "checked",
                      "damaged", "stale", "late", "stalls", "sessions"):
                res[k] = sum(p.get(k, 0) for p in parts)
            for k in ("send_wall", "send_call_s", "max_gap_ms", "drain_wall"):
                res[k] = max(p.get(k, 0) for p in parts)
            res["achieved_rate"] = round(sum(p["achieved_rate"] for p in parts), 1)
            res["generator_limited"] = any(p["generator_limited"] for p in parts)
            res["min_session_received"] = min(p["min_session_received"] for p in parts)
            res["loss"] = (max(0.0, 1.0 - res["received"] / res["sent"]) if res["sent"]
                           else 1.0)
            res["io"] = parts[0].get("io")
        wall = res["send_wall"] or duration
        res["delivered_rate"] = round(res["received"] / wall, 1)
        return res

    def close(self) -> None:
        for g in self.gens:
            g.close()


# -- one session count: sockets, generator ----------------------------------------------


def _bound(host: Host, blocking: bool = False) -> socket.socket:
    s = socket_in(host.ns, socket.AF_INET)
    try:
        s.bind((host.ip4, 0))
        if blocking:
            s.settimeout(LATENCY_TIMEOUT)
        else:
            tune_socket(s)
    except BaseException:
        s.close()
        raise
    return s


def _bind_many(addrs: List[Addr]) -> List[socket.socket]:
    """Non-blocking UDP sockets bound to `addrs`, made by the calling thread (an NsThread:
    one setns for all of them, not one thread per socket)."""
    out: List[socket.socket] = []
    try:
        for addr in addrs:
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            out.append(s)
            s.bind(addr)
            tune_socket(s)
    except BaseException:
        for s in out:
            s.close()
        raise
    return out


def callee_addresses(topo: Topology, sessions: int) -> List[Addr]:
    """Where session i's callee listens: an ephemeral port on the callee's address for a
    small rig, explicit ports over the callee's extra addresses for a large one."""
    if sessions <= BULK_SESSIONS:
        return [(topo.callee.ip4, 0)] * sessions
    ips = (topo.callee.ip4,) + EXTRA_CALLEE_IPS
    if sessions > len(ips) * CALLEE_PER_IP:
        raise BenchError(f"{sessions} sessions: more callee ports than this rig plans")
    return [(ips[i // CALLEE_PER_IP], CALLEE_PORT_BASE + i % CALLEE_PER_IP)
            for i in range(sessions)]


class Rig:
    """The topology's sockets for `sessions` calls and the generator(s) that drive them.

    Up to BULK_SESSIONS: one caller and one callee socket per session (ephemeral ports).
    Above: GEN_CALLERS caller sockets per generator, each sending to many sessions' relay
    addresses (a session is a distinct flow by its destination), and one callee socket
    per session on explicit ports of several callee addresses (the generator counts
    delivery per callee socket). Sockets are made a generator's worth at a time, handed
    over, and this process's copies closed: the generators hold them (same fd numbers).
    """

    def __init__(self, bench: Bench, sessions: int) -> None:
        self.topo = bench.topo
        self.sessions = sessions
        #: per session: (caller fd, callee fd) in its generator, and the addresses
        self._fds: List[Tuple[int, int]] = []
        self._addrs: List[Tuple[Addr, Addr]] = []
        self.gen: Optional[GeneratorGroup] = None
        bulk = sessions > BULK_SESSIONS
        if bulk:
            bench.scale_addresses()
        callee_addrs = callee_addresses(self.topo, sessions)
        gens: List[Generator] = []
        shares: List[int] = []
        try:
            n_gens = (sessions - 1) // GEN_MAX_SESSIONS + 1
            per = (sessions - 1) // n_gens + 1
            for lo in range(0, sessions, per):
                hi = min(lo + per, sessions)
                n_callers = min(hi - lo, GEN_CALLERS) if bulk else hi - lo
                callers = bench.caller_ns.call(
                    _bind_many, [(self.topo.caller.ip4, 0)] * n_callers, timeout=600.0)
                callees: List[socket.socket] = []
                try:
                    callees = bench.callee_ns.call(_bind_many, callee_addrs[lo:hi],
                                                   timeout=600.0)
                    gens.append(Generator(bench.gen_python, callers + callees))
                    shares.append(hi - lo)
                    for k, b in enumerate(callees):
                        a = callers[k % n_callers]
                        self._fds.append((a.fileno(), b.fileno()))
                        self._addrs.append((a.getsockname()[:2], b.getsockname()[:2]))
                finally:
                    for s in callers + callees:
                        s.close()
            self.gen = GeneratorGroup(gens, shares)
        except BaseException:
            for g in gens:
                g.close()
            raise

    def pairs(self) -> List[Tuple[Addr, Addr]]:
        """(caller address, callee address) per session."""
        return list(self._addrs)

    def spec(self, dests: List[Addr]) -> List[list]:
        return [[a, b, [d[0], int(d[1])]] for (a, b), d in zip(self._fds, dests)]

    def close(self) -> None:
        if self.gen is not None:
            self.gen.close()
            self.gen = None


# -- the modes -------------------------------------------------------------------------


class Mode:
    """One mode set up for a rig's sessions; fresh flows are installed one by one later."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.dests: List[Addr] = []
        #: (caller socket, callee socket) of flows for the first-packet measurement
        self.flow_pairs: List[Tuple[socket.socket, socket.socket]] = []
        #: installs flow j's session (nothing for routing); returns where its caller sends
        self.install: Callable[[int], Addr] = lambda j: self.flow_pairs[j][1].getsockname()[:2]
        #: ends flow j's session
        self.remove: Optional[Callable[[int], None]] = None
        self.load_setup_s = 0.0
        self.how = ""
        self.remove_how = ""
        self.relay: Optional[RelayProcess] = None
        self.client: Optional[LrkClient] = None
        self.exit_code: Optional[int] = None
        self.relay_traceback = False
        self.table_left: Optional[bool] = None
        #: a bench.peers relay (rtpengine): its own daemon and client
        self.peer: Any = None

    def relay_pids(self) -> List[int]:
        if self.peer is not None:
            return [p for pid in self.peer.pids() for p in tree_pids(pid)]
        if self.relay is None or self.relay.proc is None:
            return []
        return tree_pids(self.relay.proc.pid)

    def counters(self) -> Optional[Dict[str, int]]:
        if self.client is None:
            return None
        try:
            c = self.client.stats()["counters"]
        except Exception:
            return None
        return {k: int(v) for k, v in c.items()
                if k.startswith(("media.", "kernel.", "nfqueue."))
                and isinstance(v, (int, float))}


def relay_plan(topo: Topology, i: int) -> Tuple[str, str, int]:
    """static-nat and kernel-rules: session i's relay A address (caller side), relay B
    address (callee side) and port (the same on both: A and B are distinct addresses)."""
    k, j = divmod(i, PORTS_PER_ADDRESS)
    a_ips = (topo.relay.ip4,) + EXTRA_RELAY_A_IPS
    b_ips = (topo.relay_ext.ip4,) + EXTRA_RELAY_B_IPS
    if k >= len(a_ips):
        raise BenchError(f"session {i}: more relay ports than this rig plans")
    return a_ips[k], b_ips[k], STATIC_PORT_BASE + 2 * j


def _relay_ips(topo: Topology, total: int) -> Tuple[List[str], List[str]]:
    """The relay A and B addresses that `total` sessions of `relay_plan` use."""
    k = (max(total, 1) - 1) // PORTS_PER_ADDRESS + 1
    return ([relay_plan(topo, i * PORTS_PER_ADDRESS)[0] for i in range(k)],
            [relay_plan(topo, i * PORTS_PER_ADDRESS)[1] for i in range(k)])


def set_affinity(pids: List[int], cpus: set) -> None:
    """Every thread of these processes on `cpus` (a thread that is gone is skipped)."""
    for pid in pids:
        try:
            tids = [int(t) for t in os.listdir(f"/proc/{pid}/task")]
        except OSError:
            continue
        for tid in tids:
            with contextlib.suppress(OSError, subprocess.SubprocessError):
                if hasattr(os, "sched_setaffinity"):
                    os.sched_setaffinity(tid, cpus)
                else:  # PyPy has no sched_*affinity
                    subprocess.run(["taskset", "-p", "-c", ",".join(map(str, sorted(cpus))),
                                    str(tid)], capture_output=True, check=True, timeout=5)


class Bench:
    """The topology and the pieces shared by every session count.

    Modes are set up by one context manager each, registered in `setups` (name ->
    method(m, rig)). It fills `m.dests` (where session i's caller sends), optionally
    `m.install` / `m.remove` (one fresh flow's session) and the relay bookkeeping, and
    undoes everything on exit. Another relay (say rtpengine in the relay namespace,
    driven by its own client) is one more such method and one more name in MODES.
    """

    def __init__(self, topo: Topology, *, gen_python: str, socket_python: str,
                 kernel_python: str, progress: Progress) -> None:
        self.topo = topo
        self.gen_python = gen_python
        self.socket_python = socket_python
        self.kernel_python = kernel_python
        self.say = progress
        self._scaled = False
        self.setups: Dict[str, Callable[[Mode, Rig], Any]] = {
            "routing": self._routing,
            "static-nat": self._static_nat,
            "kernel": lambda m, rig: self._lrk(m, rig, ["--mode", "kernel"],
                                               self.kernel_python, "lrk"),
            "nfqueue": lambda m, rig: self._lrk(m, rig, ["--mode", "nfqueue"],
                                                self.kernel_python, "lrk"),
            "socket": lambda m, rig: self._lrk(m, rig, [], self.socket_python, None),
            "packet": lambda m, rig: self._lrk(
                m, rig, ["--mode", "packet", "--packet-interface", "vc1",
                         "--packet-interface", "ve1"], self.socket_python, "lrkpkt"),
            "packet-xdp": lambda m, rig: self._lrk(
                m, rig, ["--mode", "packet", "--packet-io", "af_xdp", "--packet-interface",
                         "vc1", "--packet-interface", "ve1"], self.socket_python, None),
            "xdp": lambda m, rig: self._lrk(
                m, rig, ["--mode", "xdp", "--xdp-interface", "vc1", "--xdp-interface", "ve1"],
                self.kernel_python, "lrk"),
            "xdp-generic": lambda m, rig: self._lrk(
                m, rig, ["--mode", "xdp", "--xdp-interface", "vc1", "--xdp-interface", "ve1",
                         "--xdp-attach", "generic"], self.kernel_python, "lrk"),
            RULES_MODE: self._kernel_rules,
            "socket-pinned": lambda m, rig: self._pinned(m, rig, "socket"),
            "packet-pinned": lambda m, rig: self._pinned(m, rig, "packet"),
            "socket-policed": lambda m, rig: self._policed(m, rig, "socket"),
            "rtpengine": lambda m, rig: self._peer(m, rig, "rtpengine"),
        }
        #: (mode, sessions) -> capacity measured in this run (the policer's rate)
        self.capacities: Dict[Tuple[str, int], int] = {}
        self.relay_ns = NsThread(topo.relay.ns)
        self.callee_ns = NsThread(topo.callee.ns)
        self.caller_ns = NsThread(topo.caller.ns)
        from fastpath.kernel.nft import Nft

        # now, while this process has few fds: libnftables waits on its netlink socket
        # with select(), which aborts the process for an fd above 1023 (FD_SETSIZE)
        self._nft: Any = self.relay_ns.call(Nft)

    def close(self) -> None:
        if self._nft is not None:
            with contextlib.suppress(Exception):
                self.relay_ns.call(self._nft.close)
            self._nft = None
        self.relay_ns.close()
        self.callee_ns.close()
        self.caller_ns.close()

    def nft(self, text: str, timeout: float = 300.0) -> str:
        """One nft transaction in the relay namespace."""
        return self.relay_ns.call(self._nft.run, text, timeout=timeout)

    def flush_conntrack(self) -> None:
        run("conntrack", "-F", ns=self.topo.relay.ns, check=False, timeout=120.0)

    def udp(self) -> Dict[str, Dict[str, int]]:
        return {"relay": self.relay_ns.call(_snmp_udp), "callee": self.callee_ns.call(_snmp_udp)}

    def scale_addresses(self) -> None:
        """Extra addresses for a large rig: callee side and relay A/B (our namespaces only;
        they go with the namespaces)."""
        if self._scaled:
            return
        t = self.topo
        for ip in EXTRA_CALLEE_IPS:
            run("ip", "addr", "add", f"{ip}/26", "dev", "ve0", ns=t.callee.ns)
        for ip in EXTRA_RELAY_A_IPS:
            run("ip", "addr", "add", f"{ip}/26", "dev", "vc1", ns=t.relay.ns)
        for ip in EXTRA_RELAY_B_IPS:
            run("ip", "addr", "add", f"{ip}/26", "dev", "ve1", ns=t.relay.ns)
        self._scaled = True

    def tables(self) -> str:
        return run("nft", "list", "tables", ns=self.topo.relay.ns, check=False).stdout

    # -- setting a mode up ---------------------------------------------------------
    @contextlib.contextmanager
    def mode(self, name: str, rig: Rig, flows: int) -> Iterator[Mode]:
        setup = self.setups.get(name)
        if setup is None:
            raise BenchError(f"unknown mode {name!r}")
        m = Mode(name)
        socks: List[socket.socket] = []
        try:
            for _ in range(flows):
                socks.append(_bound(self.topo.caller, True))
                socks.append(_bound(self.topo.callee, True))
            m.flow_pairs = [(socks[2 * i], socks[2 * i + 1]) for i in range(flows)]
            with setup(m, rig):
                yield m
        finally:
            for s in socks:
                s.close()

    @contextlib.contextmanager
    def _routing(self, m: Mode, rig: Rig) -> Iterator[None]:
        m.dests = [callee for _, callee in rig.pairs()]
        m.how = "nothing to install"
        yield

    def _bulk(self, m: Mode, chunks: Iterator[str]) -> None:
        """Apply install transactions one after the other, within BULK_DEADLINE."""
        t0 = time.perf_counter()
        for n, text in enumerate(chunks):
            self.nft(text)
            if time.perf_counter() - t0 > BULK_DEADLINE:
                raise BenchError(f"{m.name}: bulk install passed {BULK_DEADLINE:.0f} s "
                                 f"after {n + 1} transactions")
        m.load_setup_s = time.perf_counter() - t0

    @contextlib.contextmanager
    def _table_mode(self, m: Mode, rig: Rig, table: str, create: str, destroy: str,
                    chunks: Callable[[List[Tuple[Addr, Addr]]], Iterator[str]]
                    ) -> Iterator[None]:
        """A hand-loaded nftables table (no daemon): created, the load sessions installed
        in bulk at the relay addresses `relay_plan` gives, and deleted with its flows."""
        try:
            self.nft(create)
            for i in range(rig.sessions):
                a_ip, _, port = relay_plan(self.topo, i)
                m.dests.append((a_ip, port))
            self._bulk(m, chunks(rig.pairs()))
            yield
        finally:
            with contextlib.suppress(Exception):
                self.nft(destroy)
            self.flush_conntrack()
            m.table_left = f"inet {table}" in self.tables()

    @contextlib.contextmanager
    def _static_nat(self, m: Mode, rig: Rig) -> Iterator[None]:
        t = STATIC_TABLE
        total = rig.sessions + len(m.flow_pairs)
        a_ips, _ = _relay_ips(self.topo, total)
        daddr = a_ips[0] if len(a_ips) == 1 else "{ " + ", ".join(a_ips) + " }"
        hi = STATIC_PORT_BASE + 2 * min(total, PORTS_PER_ADDRESS)
        create = (
            f"add table inet {t}\ndelete table inet {t}\n"
            f"table inet {t} {{\n"
            "  map dnat4 { type ipv4_addr . inet_service : ipv4_addr . inet_service; }\n"
            "  map snat4 { type ipv4_addr . inet_service : ipv4_addr . inet_service; }\n"
            "  chain pre {\n"
            "    type nat hook prerouting priority dstnat; policy accept;\n"
            f"    ip daddr {daddr} udp dport {STATIC_PORT_BASE}-{hi} "
            "dnat ip to ip daddr . udp dport map @dnat4\n"
            "  }\n"
            "  chain post {\n"
            "    type nat hook postrouting priority srcnat; policy accept;\n"
            "    ct status dnat snat ip to ip daddr . udp dport map @snat4\n"
            "  }\n"
            "}\n")

        def elements(i: int, callee: Addr) -> Tuple[str, str]:
            a_ip, b_ip, port = relay_plan(self.topo, i)
            return (f"{a_ip} . {port} : {callee[0]} . {callee[1]}",
                    f"{callee[0]} . {callee[1]} : {b_ip} . {port}")

        def install(j: int) -> Addr:
            i = rig.sessions + j
            d, s = elements(i, m.flow_pairs[j][1].getsockname()[:2])
            self.nft(f"add element inet {t} dnat4 {{ {d} }}\n"
                     f"add element inet {t} snat4 {{ {s} }}\n")
            a_ip, _, port = relay_plan(self.topo, i)
            return a_ip, port

        def remove(j: int) -> None:
            callee = m.flow_pairs[j][1].getsockname()[:2]
            a_ip, _, port = relay_plan(self.topo, rig.sessions + j)
            self.nft(f"delete element inet {t} dnat4 {{ {a_ip} . {port} }}\n"
                     f"delete element inet {t} snat4 {{ {callee[0]} . {callee[1]} }}\n")

        def chunks(pairs: List[Tuple[Addr, Addr]]) -> Iterator[str]:
            for lo in range(0, len(pairs), BULK_CHUNK):
                dn, sn = [], []
                for i in range(lo, min(lo + BULK_CHUNK, len(pairs))):
                    d, s = elements(i, pairs[i][1])
                    dn.append(d)
                    sn.append(s)
                yield (f"add element inet {t} dnat4 {{ {', '.join(dn)} }}\n"
                       f"add element inet {t} snat4 {{ {', '.join(sn)} }}\n")

        with self._table_mode(m, rig, t, create, f"add table inet {t}\ndelete table inet {t}\n",
                              chunks):
            m.how = (f"one libnftables transaction per session (load sessions: "
                     f"{BULK_CHUNK} per transaction)")
            m.install, m.remove = install, remove
            m.remove_how = "one libnftables transaction per session, no conntrack flush"
            yield

    @contextlib.contextmanager
    def _kernel_rules(self, m: Mode, rig: Rig) -> Iterator[None]:
        """lrk kernel mode's ruleset and elements (fastpath.kernel.kernel_rules), no daemon: the
        datapath at session counts one daemon cannot hold. Relay ports repeat across the
        relay addresses, so every leg gets an explicit ct mark."""
        from fastpath.kernel.kernel_rules import KernelRuleset, LegSpec, SessionSpec

        total = rig.sessions + len(m.flow_pairs)
        a_ips, b_ips = _relay_ips(self.topo, total)
        rules = KernelRuleset(
            table=RULES_TABLE, port_start=STATIC_PORT_BASE,
            port_end=STATIC_PORT_BASE + 2 * min(total, PORTS_PER_ADDRESS) + 1,
            relay_ips=a_ips + b_ips,
            mark_range=(RULES_MARK_BASE, RULES_MARK_BASE + 4 * total + 4))
        specs: Dict[int, Any] = {}

        def spec(i: int, caller: Addr, callee: Addr) -> Any:
            a_ip, b_ip, port = relay_plan(self.topo, i)
            mark = RULES_MARK_BASE + 4 * i
            return SessionSpec(LegSpec(a_ip, port, caller[0], caller[1], mark=mark),
                               LegSpec(b_ip, port, callee[0], callee[1], mark=mark + 2))

        def install(j: int) -> Addr:
            a, b = m.flow_pairs[j]
            sp = spec(rig.sessions + j, a.getsockname()[:2], b.getsockname()[:2])
            self.nft(rules.install_commands(sp))
            specs[j] = sp
            return sp.a.relay_ip, sp.a.relay_port

        def remove(j: int) -> None:
            self.nft(rules.remove_commands(specs.pop(j)))

        def chunks(pairs: List[Tuple[Addr, Addr]]) -> Iterator[str]:
            for lo in range(0, len(pairs), BULK_CHUNK):
                hi = min(lo + BULK_CHUNK, len(pairs))
                yield rules.install_commands(*(spec(i, *pairs[i]) for i in range(lo, hi)))

        with self._table_mode(m, rig, RULES_TABLE, rules.create(), rules.destroy(), chunks):
            m.how = (f"kernel_rules.install_commands, one transaction per session (load "
                     f"sessions: {BULK_CHUNK} per transaction); no daemon, no control protocol")
            m.install, m.remove = install, remove
            m.remove_how = "kernel_rules.remove_commands, one transaction; no conntrack flush"
            yield

    @contextlib.contextmanager
    def _pinned(self, m: Mode, rig: Rig, base: str) -> Iterator[None]:
        """`base` with the relay's threads on CPU 1 and the generators' on CPU 0, so the
        generator's sending (and the forwarding softirq it runs) cannot starve the worker."""
        cpus = (sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                else list(range(os.cpu_count() or 1)))
        if len(cpus) < 2:
            raise BenchError(f"{m.name}: needs two CPUs, have {cpus}")
        assert rig.gen is not None
        with self.setups[base](m, rig):
            set_affinity(m.relay_pids(), {cpus[1]})
            set_affinity(rig.gen.pids, {cpus[0]})
            m.how += f"; relay on CPU {cpus[1]}, generator on CPU {cpus[0]}"
            try:
                yield
            finally:
                set_affinity(rig.gen.pids, set(cpus))

    @contextlib.contextmanager
    def _policed(self, m: Mode, rig: Rig, base: str) -> Iterator[None]:
        """`base` behind an nftables policer on the relay's ports: what exceeds
        POLICE_FRACTION x the capacity `base` measured is dropped at prerouting, before
        the relay's socket queues and the worker see it."""
        cap = self.capacities.get((base, rig.sessions))
        if not cap:
            raise BenchError(f"{m.name}: measure {base} first (the policer's rate)")
        rate = int(POLICE_FRACTION * cap)
        t = POLICE_TABLE
        hi = LRK_PORT_START + 4 * (rig.sessions + len(m.flow_pairs)) + 63
        self.nft(f"add table inet {t}\ndelete table inet {t}\n"
                 f"table inet {t} {{\n"
                 "  chain pre {\n"
                 "    type filter hook prerouting priority -200; policy accept;\n"
                 f"    ip daddr {self.topo.relay.ip4} udp dport {LRK_PORT_START}-{hi} "
                 f"limit rate over {rate}/second burst {max(1000, rate // 100)} packets "
                 "counter drop\n"
                 "  }\n"
                 "}\n")
        try:
            with self.setups[base](m, rig):
                m.how += f"; policer at {rate} pkt/s ({POLICE_FRACTION} x {base} capacity)"
                yield
        finally:
            with contextlib.suppress(Exception):
                self.nft(f"add table inet {t}\ndelete table inet {t}\n")
            m.table_left = f"inet {t}" in self.tables()

    @contextlib.contextmanager
    def _peer(self, m: Mode, rig: Rig, name: str) -> Iterator[None]:
        """A relay of `bench.peers` (rtpengine: its own daemon, set up with its own ng
        client) on the same relay ports as lrk's daemon modes."""
        from bench.peers import make_peer

        size = 4 * (rig.sessions + len(m.flow_pairs)) + 64
        if LRK_PORT_START + size - 1 > 65535:
            raise BenchError(f"{m.name}: {rig.sessions} sessions need too many relay ports")
        peer = make_peer(self.topo, name, f"{LRK_PORT_START}-{LRK_PORT_START + size - 1}")
        m.peer = peer

        def install(j: int) -> Addr:
            a, b = m.flow_pairs[j]
            to_b, _to_a = peer.call(f"nb-{name}-{rig.sessions + j}", a.getsockname()[:2],
                                    b.getsockname()[:2])
            return to_b

        def remove(j: int) -> None:
            peer.hangup(f"nb-{name}-{rig.sessions + j}")

        try:
            peer.start()
            t0 = time.perf_counter()
            m.dests = [peer.call(f"nb-{name}-{i}", caller, callee)[0]
                       for i, (caller, callee) in enumerate(rig.pairs())]
            m.load_setup_s = time.perf_counter() - t0
            m.how = f"{name}: offer + answer through its own client, one call after the other"
            m.install, m.remove = install, remove
            m.remove_how = f"{name}: delete through its own client"
            yield
        finally:
            m.exit_code = peer.stop()
            m.relay_traceback = "Traceback" in (getattr(peer, "output", "") or "")
            self.flush_conntrack()
            m.peer = None

    @contextlib.contextmanager
    def _lrk(self, m: Mode, rig: Rig, mode_args: List[str], python: str,
             table: Optional[str]) -> Iterator[None]:
        """`lrkproxy run` in the relay namespace; sessions through LrkClient."""
        size = 4 * (rig.sessions + len(m.flow_pairs)) + 64
        if LRK_PORT_START + size - 1 > 65535:
            raise BenchError(f"{m.name}: {rig.sessions} sessions need more relay ports than "
                             f"{LRK_PORT_START}-65535 (4 per session)")
        ports = f"{LRK_PORT_START}-{LRK_PORT_START + size - 1}"
        extra = [*mode_args, "--internal-ip", self.topo.relay.ip4,
                 "--external-ip", self.topo.relay_ext.ip4,
                 "--silence-timeout", "3600", "--workers", "1"]
        relay = RelayProcess(ports=ports, netns=self.topo.relay.ns, extra=extra, python=python)
        m.relay = relay

        def call(i: int, caller: Addr, callee: Addr) -> Addr:
            client = m.client
            assert client is not None
            call_id = f"nb-{m.name}-{i}"
            client.offer(call_id, "a", caller, interface="external")
            answer = client.answer(call_id, "a", "b", callee, interface="internal")
            # the answer's relay address is where the caller sends
            return answer["relay"]["ip"], int(answer["relay"]["port"])

        def install(j: int) -> Addr:
            a, b = m.flow_pairs[j]
            return call(rig.sessions + j, a.getsockname()[:2], b.getsockname()[:2])

        def remove(j: int) -> None:
            assert m.client is not None
            m.client.delete(f"nb-{m.name}-{rig.sessions + j}")

        try:
            relay.start(ready_timeout=60.0)
            m.client = LrkClient([relay.node], timeout=5.0, retries=2)
            t0 = time.perf_counter()
            m.dests = [call(i, caller, callee) for i, (caller, callee) in enumerate(rig.pairs())]
            m.load_setup_s = time.perf_counter() - t0
            m.how = "offer + answer through LrkClient, one call after the other"
            m.install, m.remove = install, remove
            m.remove_how = "delete through LrkClient"
            yield
        finally:
            if m.client is not None:
                m.client.close()
                m.client = None
            m.exit_code = relay.stop()
            m.relay_traceback = "Traceback" in (relay.output or "")
            if table is not None:
                m.table_left = f"inet {table}" in self.tables()
            self.flush_conntrack()
            m.relay = None


# -- measurements ----------------------------------------------------------------------

STEP_KEYS = ("rate", "achieved_rate", "delivered_rate", "loss", "sent", "received",
             "generator_limited", "skipped", "stalls", "max_gap_ms", "late", "damaged",
             "checked", "min_session_received", "verdict")


def cpu_point(bench: Bench, gen: GeneratorGroup, m: Mode, rate: float, duration: float,
              repeats: int, grace: float = GRACE) -> dict:
    """CPU per delivered packet at `rate` pkt/s, pooled over `repeats` steps, after an
    idle window of `duration` s that gives the background softirq/busy rate."""
    i0, it0 = cpu_ticks(), time.monotonic()
    rp0 = runtime_ns(m.relay_pids())
    time.sleep(duration)
    i1, it1 = cpu_ticks(), time.monotonic()
    rp1 = runtime_ns(m.relay_pids())
    idle_wall = it1 - it0
    bg_kirq = (i1["kirq"] - i0["kirq"]) / idle_wall
    bg_cpu = [(b - a) / idle_wall for a, b in zip(i0["kirq_cpu"], i1["kirq_cpu"])]
    d_cpu = [0.0] * len(bg_cpu)
    bg_busy = (i1["busy"] - i0["busy"]) / idle_wall
    relay_idle = (rp1 - rp0) / idle_wall
    steps = []
    d_kirq = d_busy = d_relay = d_gen = d_path = 0.0
    wakeups = 0
    received = 0
    wall = 0.0
    gpids = gen.pids
    kpids = ksoftirqd_pids()
    for _ in range(max(1, repeats)):
        rpids = m.relay_pids()
        c0, t0 = cpu_ticks(), time.monotonic()
        r0, g0, k0 = runtime_ns(rpids), runtime_ns(gpids), runtime_ns(kpids)
        w0 = timeslices(rpids)
        res = gen.step(rate, duration, grace)
        wakeups += timeslices(rpids) - w0
        c1, t1 = cpu_ticks(), time.monotonic()
        r1, g1, k1 = runtime_ns(rpids), runtime_ns(gpids), runtime_ns(kpids)
        res["verdict"] = verdict(res)
        steps.append({k: res.get(k) for k in STEP_KEYS})
        d_kirq += c1["kirq"] - c0["kirq"]
        d_cpu = [d + b - a for d, a, b in zip(d_cpu, c0["kirq_cpu"], c1["kirq_cpu"])]
        d_busy += c1["busy"] - c0["busy"]
        d_relay += (r1 - r0) / 1e3
        d_gen += (g1 - g0) / 1e3
        d_path += (r1 - r0 + g1 - g0 + k1 - k0) / 1e3
        received += res["received"]
        wall += t1 - t0
    if not received:
        return {"rate": rate, "received": 0, "steps": steps}
    softirq = max(0.0, _us(d_kirq - bg_kirq * wall)) / received
    relay = d_relay / received
    return {
        "rate": rate,
        "duration": duration,
        "repeats": repeats,
        "received": received,
        "loss": max(s["loss"] for s in steps),
        "sustained": all(s["verdict"] == "pass" for s in steps),
        "softirq_us": round(softirq, 3),
        "softirq_by_cpu_us": [round(max(0.0, _us(d - bg * wall)) / received, 3)
                              for d, bg in zip(d_cpu, bg_cpu)],
        "relay_us": round(relay, 3),
        "relay_packets_per_wakeup": round(received / wakeups, 2) if wakeups else None,
        "relay_ns_us": round(softirq + relay, 3),
        "generator_us": round(d_gen / received, 3),
        "path_us": round(d_path / received, 3),
        "machine_us": round(max(0.0, _us(d_busy - bg_busy * wall)) / received, 3),
        "background_softirq_pct": round(100 * bg_kirq / _CLK_TCK, 2),
        "background_busy_pct": round(100 * bg_busy / _CLK_TCK, 2),
        "relay_idle_pct": round(100 * relay_idle / 1e9, 2),
        "steps": steps,
    }


def _await(sock: socket.socket, pkt: bytes, t0: float) -> Tuple[Optional[float], int]:
    """(µs from t0 until `pkt` arrived or None, other datagrams seen meanwhile)."""
    others = 0
    deadline = t0 + LATENCY_TIMEOUT
    while True:
        left = deadline - time.perf_counter()
        if left <= 0:
            return None, others
        sock.settimeout(left)
        try:
            data = sock.recv(2048)
        except socket.timeout:
            return None, others
        if data == pkt:
            return (time.perf_counter() - t0) * 1e6, others
        others += 1


def first_packet_latency(m: Mode) -> dict:
    """For each fresh flow: install its session (timed), send its first packet straight
    away and time the arrival, then its second packet (established flow), in µs."""
    first: List[float] = []
    est: List[float] = []
    installs: List[float] = []
    lost_first = lost_second = others = 0
    for j, (a, b) in enumerate(m.flow_pairs):
        t0 = time.perf_counter()
        dest = m.install(j)
        installs.append(time.perf_counter() - t0)
        for seq, out in ((0, first), (1, est)):
            pkt = rtp_packet(seq, LATENCY_SSRC + j)
            t0 = time.perf_counter()
            a.sendto(pkt, dest)
            us, n = _await(b, pkt, t0)
            others += n
            if us is None:
                if seq == 0:
                    lost_first += 1
                else:
                    lost_second += 1
            else:
                out.append(us)
    total = sum(installs)
    return {
        "flows": len(m.flow_pairs),
        "lost_first": lost_first,
        "lost_second": lost_second,
        "lost": lost_first + lost_second,
        "unexpected": others,
        "first_median_us": round(statistics.median(first), 1) if first else None,
        "first_p90_us": round(_pct(first, 0.9), 1) if first else None,
        "first_max_us": round(max(first), 1) if first else None,
        "established_median_us": round(statistics.median(est), 1) if est else None,
        "install_median_ms": round(1e3 * statistics.median(installs), 3) if installs else None,
        "installs_per_second": (round(len(installs) / total, 1)
                                if installs and total > 0 and m.remove is not None else None),
    }


def teardown(m: Mode) -> dict:
    """End the flows' sessions one by one (timed)."""
    if m.remove is None or not m.flow_pairs:
        return {"count": 0, "seconds": 0.0, "per_second": None, "how": "nothing to end"}
    t0 = time.perf_counter()
    for j in range(len(m.flow_pairs)):
        m.remove(j)
    dt = time.perf_counter() - t0
    return {"count": len(m.flow_pairs), "seconds": round(dt, 4),
            "per_second": round(len(m.flow_pairs) / dt, 1) if dt > 0 else None,
            "how": m.remove_how}


def _pct(values: List[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))]


def _round_rate(rate: float) -> int:
    unit = 1000 if rate >= 20000 else 100
    return max(unit, int(rate / unit) * unit)


def measure_mode(bench: Bench, rig: Rig, mode: str, opts: dict) -> dict:
    """Every figure of one mode at the rig's session count."""
    say = bench.say
    label = f"[{mode} x{rig.sessions}]"
    t_start = time.monotonic()
    gen = rig.gen
    assert gen is not None
    with bench.mode(mode, rig, opts["latency_flows"]) as m:
        dests = list(m.dests)
        gen.setup(rig.spec(m.dests))
        say(f"{label} {rig.sessions} sessions set up in {m.load_setup_s:.3f} s; generator "
            f"{gen.info.get('impl')} io={gen.info.get('io')}")
        udp0 = bench.udp()
        warm_rate = min(opts["start_rate"], CPU_RATE)
        # every session's flow gets at least one packet (its first: conntrack + NAT set-up)
        # before anything is measured
        warm_s = min(MAX_DURATION, max(opts["warm_duration"], 1.5 * rig.sessions / warm_rate))
        warm = gen.step(warm_rate, warm_s)
        say(f"{label} warm-up {warm['rate']:.0f} pkt/s for {warm_s:.1f} s: loss "
            f"{100 * warm['loss']:.2f}%, received {warm['received']}, every session got "
            f">= {warm['min_session_received']}, damaged {warm['damaged']}/{warm['checked']}")
        all_steps = [warm]

        def measure(rate: int) -> dict:
            res = gen.step(rate, opts["step_duration"])
            all_steps.append(res)
            say(f"{label} step {rate:>8} pkt/s: achieved {res['achieved_rate']:>9.0f}, "
                f"delivered {res['delivered_rate']:>9.0f}, loss {100 * res['loss']:6.2f}%, "
                f"{verdict(res)}")
            return res

        found = search(measure, opts["start_rate"], opts["max_steps"], LOSS_LIMIT, PRECISION,
                       generator_retries=opts["generator_retries"])
        cap = found["capacity_pps"]
        bench.capacities[(mode, rig.sessions)] = cap
        overload = None
        if cap:
            drops0 = backlog_drops()
            res = gen.step(min(2 * cap, MAX_RATE), opts["step_duration"])
            all_steps.append(res)
            overload = {k: res.get(k) for k in STEP_KEYS if k != "verdict"}
            # the machine's, not only ours: another tenant's veth traffic would count too
            overload["backlog_drops"] = backlog_drops() - drops0
            overload["delivered_over_capacity"] = round(res["delivered_rate"] / cap, 3)
            say(f"{label} overload {res['rate']:.0f} pkt/s (2x capacity): achieved "
                f"{res['achieved_rate']:.0f}, delivered {res['delivered_rate']:.0f} = "
                f"{overload['delivered_over_capacity']:.2f}x capacity; backlog drops "
                f"{overload['backlog_drops']}")
        cpu = cpu_point(bench, gen, m, opts["cpu_rate"], opts["cpu_duration"],
                        opts["cpu_repeats"])
        all_steps.extend(cpu.get("steps", []))
        say(f"{label} equal load {opts['cpu_rate']} pkt/s: softirq {cpu.get('softirq_us')} "
            f"+ relay {cpu.get('relay_us')} = {cpu.get('relay_ns_us')} us/pkt "
            f"(generator {cpu.get('generator_us')}), loss {100 * cpu.get('loss', 1):.2f}%, "
            f"{cpu.get('relay_packets_per_wakeup')} packets per relay wake-up")
        latency = first_packet_latency(m)
        say(f"{label} {latency['flows']} new flows: install {latency['install_median_ms']} ms "
            f"({latency['installs_per_second']} /s), first packet "
            f"{latency['first_median_us']} us median (p90 {latency['first_p90_us']}), "
            f"established {latency['established_median_us']} us, lost "
            f"{latency['lost_first']} first / {latency['lost_second']} second packets")
        udp1 = bench.udp()
        counters = m.counters()
        setup = {"load_sessions": rig.sessions, "load_seconds": round(m.load_setup_s, 4),
                 "load_per_second": (round(rig.sessions / m.load_setup_s, 1)
                                     if m.remove is not None and m.load_setup_s > 0 else None),
                 "per_second": latency["installs_per_second"],
                 "install_median_ms": latency["install_median_ms"],
                 "how": m.how}
        ended = teardown(m)
        if ended["count"]:
            say(f"{label} ended {ended['count']} sessions in {ended['seconds']:.3f} s "
                f"({ended['per_second']} /s), {rig.sessions} others installed")
    # the mode is torn down here (relay stopped, tables deleted)
    udp = {ns: {k: udp1[ns][k] - udp0[ns].get(k, 0) for k in ("RcvbufErrors", "InErrors")}
           for ns in udp1}
    max_delivered = max((s["delivered_rate"] for s in all_steps if s["loss"] < LOSS_LIMIT),
                        default=0.0)
    return {
        "mode": mode,
        "sessions": rig.sessions,
        "generators": len(gen.gens),
        "relay_ips": sorted({d[0] for d in dests}),
        "capacity_pps": cap,
        "loss_at_capacity": found["loss_at_capacity"],
        "achieved_at_capacity": found["achieved_at_capacity"],
        "upper_bound_pps": found["upper_bound_pps"],
        "generator_bound": found["generator_bound"],
        "max_delivered_pps": max_delivered,
        "steps": [{k: s.get(k) for k in STEP_KEYS} for s in found["steps"]],
        "overload": overload,
        "cpu": cpu,
        "latency": latency,
        "setup": setup,
        "teardown": ended,
        "relay_counters": counters,
        "udp_errors": udp,
        "checked": sum(s["checked"] for s in all_steps),
        "damaged": sum(s["damaged"] for s in all_steps),
        "received_total": sum(s["received"] for s in all_steps),
        # the warm-up step may start before a cold relay forwards (socket mode: ~0.25 s);
        # steps that offered each session fewer than 2 packets say nothing per session
        "min_session_received": min((s["min_session_received"] for s in all_steps[1:]
                                     if s["sent"] >= 2 * rig.sessions),
                                    default=warm["min_session_received"]),
        "warm_min_session_received": warm["min_session_received"],
        "relay_exit_code": m.exit_code,
        "relay_traceback": m.relay_traceback,
        "table_left": m.table_left,
        "wall_s": round(time.monotonic() - t_start, 1),
    }


def cpu_only(bench: Bench, rig: Rig, mode: str, rate: float, opts: dict) -> dict:
    """The equal-load point alone (second pass at a rate every mode sustains)."""
    gen = rig.gen
    assert gen is not None
    with bench.mode(mode, rig, 0) as m:
        gen.setup(rig.spec(m.dests))
        gen.step(min(opts["start_rate"], rate), opts["warm_duration"])
        return cpu_point(bench, gen, m, rate, opts["cpu_duration"], opts["cpu_repeats"])


# -- the whole run ---------------------------------------------------------------------


def options(quick: bool = False, **over: Any) -> dict:
    opts = {"start_rate": START_RATE, "max_steps": MAX_STEPS, "step_duration": STEP_DURATION,
            "cpu_rate": CPU_RATE, "cpu_duration": CPU_DURATION, "cpu_repeats": CPU_REPEATS,
            "latency_flows": LATENCY_FLOWS, "warm_duration": 0.5, "generator_retries": 1}
    if quick:
        opts.update(QUICK)
    opts.update({k: v for k, v in over.items() if v is not None})
    opts["max_steps"] = min(int(opts["max_steps"]), 14)
    opts["step_duration"] = min(float(opts["step_duration"]), MAX_DURATION)
    opts["cpu_duration"] = min(float(opts["cpu_duration"]), MAX_DURATION)
    opts["cpu_repeats"] = max(1, min(int(opts["cpu_repeats"]), 10))
    opts["latency_flows"] = max(0, min(int(opts["latency_flows"]), 1000))
    return opts


def xdp_links(topo: Topology) -> None:
    """The hosts' veth ends as xdp mode needs them (and as a NIC-attached host would
    be): NAPI on (GRO) for native redirect into them, full UDP checksums (TX checksum
    offload off). Applied before any mode runs, so every mode of the run shares them."""
    for ns, dev in ((topo.caller.ns, "vc0"), (topo.callee.ns, "ve0")):
        run("ethtool", "-K", dev, "gro", "on", "tx", "off", ns=ns)


def modes_for(n: int, modes: Optional[List[str]]) -> Tuple[List[str], List[dict]]:
    """(modes measured at n sessions, modes skipped there with the reason)."""
    wanted = (list(modes) if modes else
              list(MODES + MITIGATIONS if n <= DAEMON_MAX_SESSIONS else SCALE_MODES))
    here, skipped = [], []
    for mode in wanted:
        if mode in DAEMON_MODES and n > DAEMON_MAX_SESSIONS:
            skipped.append({"mode": mode, "sessions": n, "why": (
                "lrk allocates 4 relay ports per session from one 16-bit range shared by "
                "both relay addresses (kernel mode: ct marks are relay ports), so one daemon "
                f"holds at most 16,128 sessions; this harness runs daemons up to "
                f"{DAEMON_MAX_SESSIONS}; measured instead: {RULES_MODE} (kernel mode's "
                "ruleset without the daemon)")})
        else:
            here.append(mode)
    return here, skipped


def run_bench(sessions: List[int], modes: Optional[List[str]] = None, *, quick: bool = False,
              progress: Optional[Progress] = None, tag: str = "nb",
              gen_python: Optional[str] = None, socket_python: Optional[str] = None,
              kernel_python: Optional[str] = None, **over: Any) -> dict:
    """Every mode at every session count in one topology; returns a JSON-able report.
    `modes` None: MODES up to DAEMON_MAX_SESSIONS sessions, SCALE_MODES above."""
    for n in sessions:
        if not 1 <= n <= MAX_SESSIONS:
            raise BenchError(f"{n} sessions: this harness handles 1..{MAX_SESSIONS}")
    for mode in modes or ():
        if mode not in ALL_MODES:
            raise BenchError(f"unknown mode {mode!r}; choose from {', '.join(ALL_MODES)}")
    if os.geteuid() != 0:
        raise BenchError("network namespaces need root")
    say = progress or (lambda _text: None)
    opts = options(quick, **over)
    found = find_interpreters()
    socket_python = socket_python or found.get("pypy", {}).get("python") or sys.executable
    kernel_python = kernel_python or found.get("cpython", {}).get("python") or sys.executable
    gen_python = gen_python or pypy_or_current()
    start = machine()
    t0 = time.monotonic()
    deadline = t0 + RUN_DEADLINE
    topo = Topology(tag)
    results: List[dict] = []
    skipped: List[dict] = []
    second_pass: Dict[int, dict] = {}
    leftover: List[str] = []
    bench: Optional[Bench] = None
    try:
        topo.create()
        if any(m in XDP_MODES for m in modes or ()):
            xdp_links(topo)
            opts["xdp_links"] = True
        bench = Bench(topo, gen_python=gen_python, socket_python=socket_python,
                      kernel_python=kernel_python, progress=say)
        for n in sessions:
            here_modes, skip = modes_for(n, modes)
            skipped.extend(skip)
            for sk in skip:
                say(f"[{sk['mode']} x{n}] skipped: {sk['why']}")
            if not here_modes:
                continue
            t_rig = time.monotonic()
            rig = Rig(bench, n)
            assert rig.gen is not None
            say(f"[x{n}] rig: {n} sessions, {len(rig.gen.gens)} generator process(es), "
                f"ready in {time.monotonic() - t_rig:.1f} s")
            try:
                here = []
                for mode in here_modes:
                    if time.monotonic() > deadline:
                        raise BenchError(f"run took longer than {RUN_DEADLINE:.0f} s")
                    here.append(measure_mode(bench, rig, mode, opts))
                results.extend(here)
                if not all(r["cpu"].get("sustained") for r in here):
                    caps = [r["capacity_pps"] for r in here if r["capacity_pps"]]
                    rate = _round_rate(0.8 * min(caps)) if caps else 0
                    if rate and rate < opts["cpu_rate"]:
                        say(f"[x{n}] not every mode sustained {opts['cpu_rate']} pkt/s: "
                            f"equal load again at {rate} pkt/s")
                        second_pass[n] = {"rate": rate, "cpu": {
                            r["mode"]: cpu_only(bench, rig, r["mode"], rate, opts)
                            for r in here}}
            finally:
                rig.close()
    finally:
        if bench is not None:
            bench.close()
        topo.destroy()
        leftover = sorted(set(topo.namespaces) & set(list_namespaces()))
    report = {
        "command": "python -m bench.netns_capacity",
        "machine": {**start, "loadavg_at_end": machine()["loadavg"]},
        "interpreters": {"generator": gen_python, "socket_relay": socket_python,
                         "kernel_relay": kernel_python},
        "options": opts,
        "loss_limit": LOSS_LIMIT,
        "results": results,
        "skipped": skipped,
        "second_pass": second_pass,
        "ratios": ratios(results),
        "namespaces_left": leftover,
        "wall_s": round(time.monotonic() - t0, 1),
    }
    return report


def ratios(results: List[dict]) -> List[dict]:
    """kernel / static-nat and socket / static-nat (and routing) per session count, from
    the same run. Capacity and delivered rates: mode / static-nat (higher is better).
    CPU: static-nat cost / mode cost, so that >= 1 means "as cheap or cheaper"."""
    by = {(r["mode"], r["sessions"]): r for r in results}
    out = []
    for n in sorted({r["sessions"] for r in results}):
        base = by.get(("static-nat", n))
        if base is None:
            continue
        for mode in ("kernel", "nfqueue", "socket", "packet", *MITIGATIONS, RULES_MODE, "routing",
                     *XDP_MODES, *AFXDP_MODES):
            r = by.get((mode, n))
            if r is None:
                continue
            out.append({
                "sessions": n,
                "mode": mode,
                "capacity": _ratio(r["capacity_pps"], base["capacity_pps"]),
                "max_delivered": _ratio(r["max_delivered_pps"], base["max_delivered_pps"]),
                "cpu_efficiency": _ratio(base["cpu"].get("relay_ns_us"),
                                         r["cpu"].get("relay_ns_us")),
                "path_efficiency": _ratio(base["cpu"].get("path_us"), r["cpu"].get("path_us")),
                "both_generator_bound": bool(r["generator_bound"] and base["generator_bound"]),
            })
    return out


def _ratio(a: Optional[float], b: Optional[float]) -> Optional[float]:
    return round(a / b, 3) if a and b else None


def _fmt(v: Any, spec: str = "") -> str:
    if v is None:
        return "-"
    return format(v, spec) if spec else str(v)


def table(report: dict) -> str:
    head = (f"{'mode':14} {'sess':>6} {'capacity':>8} {'gen':>3} {'maxdeliv':>8} "
            f"{'2x offer':>8} {'2x/cap':>6} {'2x loss':>7} {'softirq':>7} {'relay':>6} "
            f"{'ns us':>6} {'path':>6} {'+route':>6} {'1st us':>6} {'est us':>6} "
            f"{'setup/s':>7} {'end/s':>6}")
    rows = [head, "-" * len(head)]
    routing = {r["sessions"]: r["cpu"].get("path_us") for r in report["results"]
               if r["mode"] == "routing"}
    for r in report["results"]:
        c, lat, ov = r["cpu"], r["latency"], r["overload"] or {}
        base = routing.get(r["sessions"])
        extra = (c.get("path_us") - base) if base is not None and c.get("path_us") else None
        rows.append(
            f"{r['mode']:14} {r['sessions']:>6} {r['capacity_pps']:>8} "
            f"{'yes' if r['generator_bound'] else 'no':>3} {r['max_delivered_pps']:>8.0f} "
            f"{_fmt(ov.get('achieved_rate'), '.0f'):>8} "
            f"{_fmt(ov.get('delivered_over_capacity'), '.2f'):>6} "
            f"{_fmt(None if ov.get('loss') is None else 100 * ov['loss'], '.1f'):>6}% "
            f"{_fmt(c.get('softirq_us'), '.2f'):>7} {_fmt(c.get('relay_us'), '.2f'):>6} "
            f"{_fmt(c.get('relay_ns_us'), '.2f'):>6} {_fmt(c.get('path_us'), '.2f'):>6} "
            f"{_fmt(extra, '+.2f'):>6} "
            f"{_fmt(lat['first_median_us'], '.0f'):>6} "
            f"{_fmt(lat['established_median_us'], '.0f'):>6} "
            f"{_fmt(r['setup']['per_second'], '.0f'):>7} "
            f"{_fmt(r['teardown']['per_second'], '.0f'):>6}")
    rows.append("")
    for q in report["ratios"]:
        rows.append(f"{q['mode']} / static-nat, {q['sessions']} session(s): capacity "
                    f"x{q['capacity']}, max delivered x{q['max_delivered']}, CPU efficiency "
                    f"x{q['cpu_efficiency']} (relay ns), x{q['path_efficiency']} (path)"
                    + (" [both generator-bound]" if q["both_generator_bound"] else ""))
    for n, sp in sorted(report.get("second_pass", {}).items()):
        rows.append(f"{n} session(s), equal load again at {sp['rate']} pkt/s: " + ", ".join(
            f"{mode} {c.get('relay_ns_us')} us (path {c.get('path_us')})"
            for mode, c in sp["cpu"].items()))
    return "\n".join(rows)


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.netns_capacity",
                                description=__doc__.split("\n")[0])
    p.add_argument("--sessions", default=",".join(map(str, DEFAULT_SESSIONS)))
    p.add_argument("--modes", help=f"default: {','.join(MODES + MITIGATIONS)} up to "
                   f"{DAEMON_MAX_SESSIONS} "
                   f"sessions, {','.join(SCALE_MODES)} above")
    p.add_argument("--out", help="write the report as JSON here")
    p.add_argument("--quick", action="store_true", help="the short form of the test suite")
    p.add_argument("--cpu-rate", type=int, help=f"equal-load rate (default {CPU_RATE})")
    p.add_argument("--max-steps", type=int)
    p.add_argument("--latency-flows", type=int)
    args = p.parse_args(argv)
    sessions = [int(x) for x in args.sessions.split(",") if x.strip()]
    modes = [x.strip() for x in (args.modes or "").split(",") if x.strip()] or None

    def stop(signum: int, _frame: Any) -> None:
        raise SystemExit(128 + signum)  # unwinds: relays stopped, namespaces deleted

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGHUP, stop)

    def progress(text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    try:
        report = run_bench(sessions, modes, quick=args.quick, progress=progress,
                           cpu_rate=args.cpu_rate, max_steps=args.max_steps,
                           latency_flows=args.latency_flows)
    except BenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    report["command"] = "python -m bench.netns_capacity " + " ".join(
        argv if argv is not None else sys.argv[1:])
    print(table(report))
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as fh:
            json.dump(report, fh, indent=1)
            fh.write("\n")
    bad = [r for r in report["results"]
           if r["relay_exit_code"] not in (None, 0) or r["relay_traceback"] or r["damaged"]]
    return 1 if bad or report["namespaces_left"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
