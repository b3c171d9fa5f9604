"""Per-core capacity of the kernel-side relay paths, with a generator that is never the limit.

    python -m bench.quickpath --generator xdp --sessions 1,1000 \
        --modes routing,static-nat,kernel,xdp --step 0.5 --out bench/results/quickpath-<date>.json
    python -m bench.quickpath --generator xdp --sessions 100000 \
        --modes routing,static-nat,kernel,xdp --step 0.5 --out ...
    python -m bench.quickpath --junk --sessions 1000 [--junk-rate R] --out ...

One topology (`bench.netns.Topology`: caller <-> relay <-> callee namespaces on veth
pairs), one direction caller -> relay -> callee, 214-byte frames (172-byte RTP datagrams).
The relay namespace's receive work -- routing, NAT, conntrack, lrk's nftables rules or XDP
program -- is steered onto the relay core (`bench.trafgen.steer`: threaded NAPI on the
relay's caller-side veth, pinned, SCHED_FIFO), and the generator runs on the other core:

* ``--generator xdp`` (default): `bench.xdpgen.XdpGen`, frames reach the relay's veth as
  XDP frames (as from a NIC's ring), counted by an `XdpSink` at the callee's veth;
* ``--generator trafgen``: `bench.trafgen.Trafgen` (AF_PACKET: frames arrive as skbs,
  which veth copies into a page before native XDP runs), counted by the nft `Sink`.

Sessions (1..128,000): session i's flow goes from caller address i mod k to callee
address i mod k, ports 4000 + 2 (i div k) and 30000 + 2 (i div k), with k =
ceil(sessions / 16,000) addresses per side (`addresses_for`, `spread`: one address and
today's ports up to 16,000 sessions; 7 at 100,000), so every port stays in one 16-bit
range; the relay gets k addresses per side too (`bench.many_sessions.kernel_addresses`:
198.51.100.1-8 on the caller's link, .65 and .81-.87 on the callee's; two past 11,368
sessions, where one address per side, whose port pool both sides share, runs out;
``--relay-addresses N``: at least N), the callee addresses permanent neighbour entries.
Each one-way flow through a NAT mode holds one conntrack entry in the relay namespace
(nf_conntrack_max is the machine's, read-only there; recorded per mode with the entries
counted after the warm-up).

Modes:
* ``routing``     plain IP forwarding, no NAT, no ruleset (the baseline);
* ``static-nat``  a static nftables DNAT/SNAT map pair, one element each per session;
* ``kernel``      ``lrkproxy run --mode kernel``, every call installed pipelined over the
                  daemon's unix control socket (`bench.many_sessions.install`, 64 in flight);
* ``kernel-noacct`` (opt-in) kernel mode with the namespace's ``nf_conntrack_acct``
                  switched off once it runs (its flows then count nothing): what the
                  per-packet accounting costs;
* ``kernel-noext`` (opt-in) the same with ``nf_conntrack_timestamp`` off too, so no flow
                  carries a conntrack extension at all (as static NAT's flows): what
                  touching the extension on every packet costs;
* ``kernel-nocount`` (opt-in) kernel mode with ``kernel_counters = "none"`` (the product's
                  way to that: no sysctl touched, media not counted);
* ``xdp``         ``lrkproxy run --mode xdp`` (native XDP on the relay's veths), the same way;
* ``xdp-generic`` the same with ``--xdp-attach generic`` (XDP on the skb, after the
                  stack built it);
* ``socket``, ``socket-coalesce``, ``packet``, ``packet-xdp`` (opt-in) the userspace
                  modes (``lrkproxy run``; the same with ``coalesce_us = 500``;
                  ``--mode packet`` with taps on vc1 and ve1, whose default coalescing is
                  500 us; the same over AF_XDP), the relay's processes pinned to the
                  relay core beside the NAPI thread; ``packet-xdp-ring4096`` over AF_XDP
                  with the rings used before 2026-12-05 (``af_xdp_ring = 4096``);
* ``rtpengine`` (opt-in) Debian's rtpengine (userspace, one thread: `bench.peers`),
                  pinned the same way, its calls through its own ng client; **a fresh
                  daemon with fresh calls before every step** (its flood protection stops
                  reading a socket for good after five receive-queue overloads, so an
                  overloaded step would depress every later one).

The userspace modes' work is the NAPI thread (receive up to the socket, tap or AF_XDP
ring) plus the relay's own threads, all on the relay core: a step records their run time
(``relay_threads_busy``, schedstat of every thread) and the relay core is full at
NAPI_FULL of the wall time.

For each (mode, sessions): a capacity search (`bench.capacity.search`: doubling, then
bisection; a step offers R pkt/s for `--step` seconds and passes with < 1 % loss; a step
that lost frames while neither side was saturated is measured once more), then
the capacity is *confirmed*: three runs in a row at that rate must pass, or the rate
steps down 5 % and tries again; then three runs at OVERLOAD_RATE (``--overload-rate``)
record what a full relay core forwards. Every step records the relay NAPI thread's busy
share (its run time: the relay's work whatever else runs on the core), both cores' busy share
(/proc/stat), the frames the relay's veth ring refused (XDP generator) and which side
saturated (relay: NAPI thread >= NAPI_FULL; generator: it fell behind its rate).

``--junk``: xdp mode with N calls, each call's media frame and a flood of junk frames in
one rotation from the XDP generator (`junk_flood`): media lost, junk dropped and counted
by the relay (`media.dropped.*`), three runs.

``--ct-ext-ab ROUNDS``: what a conntrack extension on every flow costs, inside one setup
of a NAT mode (``static-nat``, ``kernel-nocount``): per round, the flows re-created once
with ``nf_conntrack_acct`` and ``nf_conntrack_timestamp`` on and once off (alternating
order), three overload steps each (`ct_ext_ab`). Paired within a setup, so the rig's
setup-to-setup spread (up to 30-50 % at 100,000 sessions) does not enter the ratio.

``--idle-latency-us N``: hold a PM QoS CPU latency request of N us for the run
(`bench.pmqos`; 0: idle CPUs poll instead of halting, so a relay core that idles between
bursts wakes without the host's help). Recorded in the report as ``idle_latency_us``
(None: the machine's own idle behaviour).

``--equal-rate R``: first, three steps at R pkt/s on one relay (rtpengine: one fresh
daemon for the three; R is below its capacity, so its flood protection stays out of it),
``--equal-warmup-s S`` seconds at R before them (`warm_to_steady`), for every relay
alike: a long-running relay's steady state, lrk's PyPy JIT compiled. Recorded per mode
as ``warmup_packets``.

``--rx-moderation-us N``: the relay's receiving veth re-polls on a timer of N us after
a poll that found work (`napi_defer_hard_irqs` 2, `gro_flush_timeout` N us;
`bench.netns.set_napi_deferral`), as a NIC's receive interrupt moderation does, for every
mode of the run. Recorded as ``rx_moderation_us`` (0: none, the veth default).

Bounds: at most MAX_RATE pkt/s and `--step` <= 3 s per step, at most 14 steps per search,
3 confirmation attempts, 3 overload runs, INSTALL_DEADLINE_S for a daemon's calls; every
process, namespace, table, BPF program and conntrack entry is gone at the end (what a mode
left in the relay namespace is recorded: `leftovers`).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import time
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

from bench.capacity import LOSS_LIMIT, machine, search, verdict
from bench.compare import cpus_allowed
from bench.frames import Flow
from bench.interpreters import pypy_or_current
from bench.many_sessions import (
    MAX_KERNEL_ADDRESSES,
    add_relay_addresses,
    call_requests,
    install,
    kernel_addresses,
    relay_args,
    unix_socket,
)
from bench.netns import Topology, list_namespaces, run, set_napi_deferral
from bench.netns_capacity import runtime_ns, set_affinity, xdp_links
from bench.peers import tree_pids
from bench.pmqos import cpu_latency
from bench.trafgen import Sink, Trafgen, busy_share, cpu_times, link_mac, steer
from bench.xdpgen import XdpGen, XdpSink, thread_cpu_ns, xmit_errors

Addr = Tuple[str, int]

MAX_RATE = 2_000_000  # bench.capacity.search caps its ramp there too
#: offered three times after the search: what a full relay core still forwards (a stall of
#: the shared machine costs a run only the frames of the stall, not its verdict)
OVERLOAD_RATE = 2_000_000
#: --overload-rate: at most this (the XDP generator's unpaced rate is 6.5-8 Mpps)
MAX_OVERLOAD_RATE = 6_000_000
#: the sysctls whose flows carry a conntrack extension (set before the flows exist)
CT_EXT_SYSCTLS = ("nf_conntrack_acct", "nf_conntrack_timestamp")
#: --ct-ext-ab: NAT modes whose flows are conntrack's and whose counting leaves those
#: sysctls alone; at most MAX_CT_EXT_ROUNDS rounds (each: 2 x (flush, warm-up, 3 steps))
CT_EXT_MODES = ("static-nat", "kernel-nocount")
MAX_CT_EXT_ROUNDS = 10
MAX_STEP_S = 3.0
MAX_STEPS = 14
CONFIRM_RUNS = 3
CONFIRM_ATTEMPTS = 3
CALLER_PORT = 4000
CALLEE_PORT = 30000
RELAY_PORT = 20000
STATIC_TABLE = "qpnat"
RELAY_CPU, GEN_CPU = 1, 0
#: sessions one caller, callee or relay address carries: its ports (4000.., 20000..,
#: 30000.., two a session) stay within one 16-bit range
PORTS_PER_ADDRESS = 16_000
MAX_ADDRESSES = MAX_KERNEL_ADDRESSES  # relay addresses per side (bench.many_sessions)
MAX_SESSIONS = PORTS_PER_ADDRESS * MAX_ADDRESSES
#: caller and callee addresses beyond the topology's own (198.51.100.10 on the caller's
#: /26, .70 on the callee's): clear of the relay's (.1-.8, .65, .81-.87) and STRANGER
CALLER_EXTRA = tuple(f"198.51.100.{40 + i}" for i in range(MAX_ADDRESSES - 1))
CALLEE_EXTRA = tuple(f"198.51.100.{100 + i}" for i in range(MAX_ADDRESSES - 1))
#: calls in flight while a daemon mode installs its calls (bench.inflight)
INSTALL_WINDOW = 64
INSTALL_DEADLINE_S = 300.0
RELAY_STOP_S = 120.0
GENERATORS = ("xdp", "trafgen")
#: the relay's NAPI thread runs SCHED_FIFO: as a NIC's softirq, it is not queued behind
#: other processes of a shared machine (RT throttling still leaves them 5 %)
NAPI_RT_PRIO = 50
#: --napi-policy -> Rig's napi_rt_prio: "fifo" (the default) or "other" (SCHED_OTHER, as
#: the kernel's ksoftirqd, which takes over a softirq that keeps finding work)
NAPI_POLICIES = {"fifo": NAPI_RT_PRIO, "other": 0}
#: --rx-moderation-us: timer re-polls before the interface's "interrupt" is unmasked
RX_MODERATION_DEFER = 2
MAX_RX_MODERATION_US = 1000
#: --equal-warmup-s: at most this long at the equal rate before its steps
MAX_EQUAL_WARMUP_S = 30.0
#: the relay's NAPI thread at or above this share of the wall time: the relay core is full
NAPI_FULL = 0.9


class QuickpathError(RuntimeError):
    """The benchmark could not run; the message says what is missing."""


def addresses_for(sessions: int) -> int:
    """Addresses per side (caller, callee, relay) that `sessions` need: each carries at most
    PORTS_PER_ADDRESS sessions' ports."""
    if not 1 <= sessions <= MAX_SESSIONS:
        raise QuickpathError(f"{sessions} sessions: this rig holds 1..{MAX_SESSIONS:,} "
                             f"({MAX_ADDRESSES} addresses per side, {PORTS_PER_ADDRESS:,} "
                             "sessions an address)")
    return -(-sessions // PORTS_PER_ADDRESS)


def relay_addresses_for(sessions: int) -> int:
    """Relay addresses per side a daemon needs for `sessions`: with one per side lrk keeps
    one port pool for both (four ports a session from RELAY_PORT: at most 11,368), with
    several one pool an address (two ports a session each)."""
    k = addresses_for(sessions)
    if k == 1 and relay_ports_end(sessions, 1) > 65535:
        return 2
    return k


def relay_ports_end(sessions: int, k: int) -> int:
    """The top of the daemon's port range for `sessions` on `k` addresses per side: four
    ports a session on one shared pool, two an address on k > 1 pools, 64 spare."""
    share = -(-sessions // k)
    return RELAY_PORT + (4 if k == 1 else 2) * share + 63


def spread(sessions: int, ips: Sequence[str], base: int) -> List[Addr]:
    """Session i's address: ips[i mod k] (k = `addresses_for`), port base + 2 (i div k):
    the addresses take turns, so each holds an even share and the ports of one address
    stay below base + 2 * PORTS_PER_ADDRESS (one 16-bit range)."""
    k = addresses_for(sessions)
    if len(ips) < k:
        raise QuickpathError(f"{sessions} sessions need {k} addresses, {len(ips)} given")
    return [(ips[i % k], base + 2 * (i // k)) for i in range(sessions)]


def port_span(sessions: int) -> int:
    """Ports (even and odd) one address's share of `sessions` spans."""
    return 2 * -(-sessions // addresses_for(sessions))


def caller_ips(topo: Topology) -> List[str]:
    return [topo.caller.ip4, *CALLER_EXTRA]


def callee_ips(topo: Topology) -> List[str]:
    return [topo.callee.ip4, *CALLEE_EXTRA]


def flows_for(topo: Topology, sessions: int) -> List[Tuple[Addr, Addr]]:
    """(caller address, callee address) per session, spread over `addresses_for(sessions)`
    caller and callee addresses (one each up to PORTS_PER_ADDRESS sessions)."""
    return list(zip(spread(sessions, caller_ips(topo), CALLER_PORT),
                    spread(sessions, callee_ips(topo), CALLEE_PORT)))


class Rig:
    """The topology, steered, with a permanent neighbour entry for the callee; frames come
    from `generator` ("xdp": `bench.xdpgen.XdpGen`, counted by an `XdpSink`; "trafgen":
    `bench.trafgen.Trafgen`, counted by the nft `Sink`)."""

    def __init__(self, topo: Topology, generator: str = "xdp", relay_ips: int = 0,
                 rx_moderation_us: int = 0, napi_rt_prio: int = NAPI_RT_PRIO) -> None:
        if generator not in GENERATORS:
            raise QuickpathError(f"unknown generator {generator!r}; choose from {GENERATORS}")
        self.topo, self.kind = topo, generator
        mac = link_mac(topo.callee.ns, "ve0")
        for ip in callee_ips(topo):  # every callee address the flows may use
            run("ip", "neigh", "replace", ip, "lladdr", mac, "dev", "ve1", "nud",
                "permanent", ns=topo.relay.ns)
        self._relay_ips = 1  # relay addresses per side on the relay's veths so far
        #: at least this many relay addresses per side (0: as the sessions need)
        self.min_relay_ips = relay_ips
        add_relay_addresses(topo, [topo.relay.ip4], [topo.relay_ext.ip4],
                            INSTALL_WINDOW)  # none added: the control queue's depth
        xdp_links(topo)  # every mode of a run shares the hosts' link settings
        self.napi_pid = steer(topo.relay.ns, "vc1", topo.caller.ns, "vc0", RELAY_CPU,
                              rt_prio=napi_rt_prio)
        if rx_moderation_us:
            set_napi_deferral(topo.relay.ns, "vc1", RX_MODERATION_DEFER,
                              rx_moderation_us * 1000)
        self.client: Any = None  # the relay's LrkClient while a daemon mode is set up
        #: a userspace relay's processes (on the relay core), while one is set up
        self.relay_pids: List[int] = []
        #: a relay that must be fresh for every step (rtpengine): restarts it with fresh
        #: calls and returns where each caller now sends
        self.refresh: Optional[Callable[[], List[Addr]]] = None
        self.caller_mac = link_mac(topo.caller.ns, "vc0")
        self.relay_mac = link_mac(topo.relay.ns, "vc1")

    def relay_addresses(self, sessions: int) -> Tuple[List[str], List[str]]:
        """The relay's (internal, external) addresses for `sessions` (`relay_addresses_for`),
        added to its veths the first time a mode needs them (they stay for the rig)."""
        k = max(relay_addresses_for(sessions), self.min_relay_ips)
        internal, external = kernel_addresses(k)
        if k > self._relay_ips:
            have_i, have_e = kernel_addresses(self._relay_ips)
            add_relay_addresses(self.topo, [have_i[0], *internal[self._relay_ips:]],
                                [have_e[0], *external[self._relay_ips:]], INSTALL_WINDOW)
            self._relay_ips = k
        return internal, external

    def generator(self, pairs: List[Tuple[Addr, Addr]], dests: List[Addr]) -> Any:
        """The generator for these flows (an XdpGen holds BPF fds: close it, or use
        `generating`)."""
        flows = [Flow(a[0], a[1], d[0], d[1], ssrc=i + 1)
                 for i, ((a, _b), d) in enumerate(zip(pairs, dests))]
        if self.kind == "xdp":
            return XdpGen.for_flows(self.topo.caller.ns, "vc0", self.caller_mac,
                                    self.relay_mac, flows, cpu=GEN_CPU)
        return Trafgen(self.topo.caller.ns, "vc0", self.caller_mac, self.relay_mac, flows,
                       cpu=GEN_CPU)

    @contextlib.contextmanager
    def generating(self, pairs: List[Tuple[Addr, Addr]], dests: List[Addr]) -> Iterator[Any]:
        gen = self.generator(pairs, dests)
        try:
            yield gen
        finally:
            if isinstance(gen, XdpGen):
                gen.close()

    def sink(self, sessions: int) -> Any:
        """Counts and drops what reaches the callee on its ports (a context manager)."""
        ports = (CALLEE_PORT, CALLEE_PORT + port_span(sessions))
        if self.kind == "xdp":
            return XdpSink(self.topo.callee.ns, "ve0", ports)
        return Sink(self.topo.callee.ns, ports)


# -- modes: each yields where session i's caller sends -----------------------------------


@contextlib.contextmanager
def routing(rig: Rig, pairs: List[Tuple[Addr, Addr]], python: str) -> Iterator[List[Addr]]:
    yield [b for _a, b in pairs]


@contextlib.contextmanager
def static_nat(rig: Rig, pairs: List[Tuple[Addr, Addr]],
               python: str) -> Iterator[List[Addr]]:
    t, topo, n = STATIC_TABLE, rig.topo, len(pairs)
    internal, external = rig.relay_addresses(n)
    fronts = spread(n, internal, RELAY_PORT)  # where session i's caller sends
    backs = spread(n, external, RELAY_PORT)  # where the callee sees it come from
    dn = [f"{f[0]} . {f[1]} : {b[0]} . {b[1]}" for f, (_a, b) in zip(fronts, pairs)]
    sn = [f"{b[0]} . {b[1]} : {s[0]} . {s[1]}" for s, (_a, b) in zip(backs, pairs)]
    daddr = internal[0] if len(internal) == 1 else "{ " + ", ".join(internal) + " }"
    text = (f"table inet {t} {{\n"
            " map dnat4 { type ipv4_addr . inet_service : ipv4_addr . inet_service; }\n"
            " map snat4 { type ipv4_addr . inet_service : ipv4_addr . inet_service; }\n"
            " chain pre { type nat hook prerouting priority dstnat; policy accept;\n"
            f"  ip daddr {daddr} udp dport {RELAY_PORT}-{RELAY_PORT + port_span(n)} "
            "dnat ip to ip daddr . udp dport map @dnat4\n }\n"
            " chain post { type nat hook postrouting priority srcnat; policy accept;\n"
            "  ct status dnat snat ip to ip daddr . udp dport map @snat4\n }\n}\n")
    for lo in range(0, n, 2000):
        text += (f"add element inet {t} dnat4 {{ {', '.join(dn[lo:lo + 2000])} }}\n"
                 f"add element inet {t} snat4 {{ {', '.join(sn[lo:lo + 2000])} }}\n")
    _nft(topo.relay.ns, text)
    try:
        yield fronts
    finally:
        run("nft", "delete", "table", "inet", t, ns=topo.relay.ns, check=False)
        run("conntrack", "-F", ns=topo.relay.ns, check=False)


def _nft(ns: str, text: str) -> None:
    import subprocess

    proc = subprocess.run(["ip", "netns", "exec", ns, "nft", "-f", "-"], input=text,
                          capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        raise QuickpathError(f"nft in {ns}: {proc.stderr.strip()[:400]}")


def lrk_mode(mode: str, more_args: Sequence[str] = (), pin: bool = False,
             config: str = "") -> Callable[..., Any]:
    """A daemon mode: ``lrkproxy run --mode <mode>`` with `relay_addresses_for(sessions)`
    relay addresses per side, every call installed pipelined over its unix control socket
    (`bench.many_sessions.install`, INSTALL_WINDOW calls in flight); yields where each
    call's caller sends (the answer's relay address). `pin`: a userspace mode, whose
    processes go onto the relay core (`Rig.relay_pids`); `config`: lines added to its
    config file."""
    @contextlib.contextmanager
    def setup(rig: Rig, pairs: List[Tuple[Addr, Addr]], python: str) -> Iterator[List[Addr]]:
        import tempfile

        from lrk.client import LrkClient
        from lrk.demo.relay_process import RelayProcess

        topo, n = rig.topo, len(pairs)
        internal, external = rig.relay_addresses(n)
        ports = f"{RELAY_PORT}-{min(65535, relay_ports_end(n, len(internal)))}"
        client = relay = None
        with tempfile.TemporaryDirectory(prefix="lrk-qp-") as tmp:
            os.chmod(tmp, 0o755)  # the relay may drop privileges
            cfg = os.path.join(tmp, "lrk.toml")
            extra = [*relay_args(cfg, mode, n, internal, external), *more_args,
                     "--workers", "1"]
            with open(cfg, "a") as fh:
                fh.write(config)
            try:
                relay = RelayProcess(ports=ports, netns=topo.relay.ns, extra=extra,
                                     python=python)
                relay.start(ready_timeout=60.0)
                if pin:
                    rig.relay_pids = pin_tree(relay.proc.pid, RELAY_CPU)
                dests = install_calls(relay, pairs, tmp, topo.relay.ns)
                client = LrkClient([relay.node], timeout=5.0, retries=2)
                rig.client = client  # the junk bench reads the relay's counters
                yield dests
            finally:
                rig.client = None
                rig.relay_pids = []
                if client is not None:
                    client.close()
                code = relay.stop(timeout=RELAY_STOP_S) if relay is not None else None
                run("conntrack", "-F", ns=topo.relay.ns, check=False)
                if code not in (0, None):
                    raise QuickpathError(f"relay exited with {code}: {relay.output[-400:]}")
    return setup


def install_calls(relay: Any, pairs: List[Tuple[Addr, Addr]], tmp: str,
                  ns: str) -> List[Addr]:
    """Every call's offer + answer through the relay's unix control socket, pipelined;
    returns each call's relay address on the caller's side. Raises QuickpathError unless
    every call was installed."""
    keep: Dict[str, Dict[str, Any]] = {}
    datagrams = call_requests(relay, pairs, prefix="qp-")
    with unix_socket(relay.host, tmp, ns) as sock:
        res = install(sock, datagrams, INSTALL_WINDOW, deadline=INSTALL_DEADLINE_S,
                      keep=keep)
    if res["installed"] != len(pairs) or res["failed"]:
        raise QuickpathError(f"{res['installed']} of {len(pairs)} calls installed in "
                             f"{res['seconds']} s, {res['failed']} failed: {res['errors']}")
    print(f"quickpath: {len(pairs):,} calls installed in {res['seconds']} s "
          f"({res['sessions_per_s']:,.0f}/s)", file=sys.stderr, flush=True)
    return [(keep[f"{i}.1"]["relay"]["ip"], int(keep[f"{i}.1"]["relay"]["port"]))
            for i in range(len(pairs))]


#: the most calls the rtpengine mode sets up (one by one, before every step)
PEER_MAX_SESSIONS = 2000
#: packet mode's taps: the relay's two veths
_TAPS = ("--packet-interface", "vc1", "--packet-interface", "ve1")


def pin_tree(pid: int, cpu: int) -> List[int]:
    """Every thread of `pid` and its descendants onto `cpu`; returns the processes.
    Raises QuickpathError when a thread is not there after all (a relay off its core
    would make the per-core figures wrong)."""
    pids = tree_pids(pid)
    set_affinity(pids, {cpu})
    for p in pids:
        for task in os.listdir(f"/proc/{p}/task"):
            allowed = cpus_allowed(f"{p}/task/{task}")
            if allowed not in (None, str(cpu)):  # None: the thread is gone
                raise QuickpathError(f"thread {task} of {p} runs on {allowed}, not {cpu}")
    return pids


@contextlib.contextmanager
def rtpengine(rig: Rig, pairs: List[Tuple[Addr, Addr]], python: str) -> Iterator[List[Addr]]:
    """Debian's rtpengine in the relay namespace (one thread, userspace), pinned to the
    relay core, every call set up through its ng client; `Rig.refresh` restarts it with
    fresh calls (the fair best for every step: see the module's docstring)."""
    from bench.peers import RtpenginePeer

    if len(pairs) > PEER_MAX_SESSIONS:
        raise QuickpathError(f"rtpengine: at most {PEER_MAX_SESSIONS} sessions here")
    topo = rig.topo
    ports = f"{RELAY_PORT}-{RELAY_PORT + 4 * len(pairs) + 63}"
    peer: List[Any] = []

    def start() -> List[Addr]:
        stop()
        p = RtpenginePeer(topo, ports)
        peer.append(p)
        p.start()
        rig.relay_pids = pin_tree(p.pids()[0], RELAY_CPU)
        return [p.call(f"qp-{i}", a, b)[0] for i, (a, b) in enumerate(pairs)]

    def stop() -> None:
        while peer:
            p = peer.pop()
            code = p.stop()
            if code not in (0, None):
                raise QuickpathError(f"rtpengine exited with {code}: {p.output[-400:]}")

    try:
        dests = start()
        rig.refresh = start
        yield dests
    finally:
        rig.refresh = None
        rig.relay_pids = []
        stop()
        run("conntrack", "-F", ns=topo.relay.ns, check=False)


def set_netfilter_sysctls(ns: str, names: Sequence[str], value: int) -> None:
    """Write `value` to each ``net.netfilter.<name>`` of namespace `ns` (one process)."""
    run("sh", "-c", "; ".join(f"echo {value} > /proc/sys/net/netfilter/{name}"
                              for name in names), ns=ns)


@contextlib.contextmanager
def kernel_without_accounting(rig: Rig, pairs: List[Tuple[Addr, Addr]],
                              python: str) -> Iterator[List[Addr]]:
    """Kernel mode whose flows are not accounted: ``nf_conntrack_acct`` off after the
    daemon switched it on, before the warm-up creates the flows (measurement only: the
    relay's counters then read zero). Restored by the daemon's stop."""
    with lrk_mode("kernel")(rig, pairs, python) as dests:
        set_netfilter_sysctls(rig.topo.relay.ns, ["nf_conntrack_acct"], 0)
        yield dests


@contextlib.contextmanager
def kernel_without_extensions(rig: Rig, pairs: List[Tuple[Addr, Addr]],
                              python: str) -> Iterator[List[Addr]]:
    """Kernel mode whose flows carry no conntrack extension: ``nf_conntrack_acct`` and
    ``nf_conntrack_timestamp`` off before the warm-up creates the flows (measurement
    only). Restored by the daemon's stop."""
    with lrk_mode("kernel")(rig, pairs, python) as dests:
        set_netfilter_sysctls(rig.topo.relay.ns, CT_EXT_SYSCTLS, 0)
        yield dests


SETUPS: Dict[str, Callable[..., Any]] = {
    "routing": routing,
    "static-nat": static_nat,
    "kernel": lrk_mode("kernel"),
    "kernel-noacct": kernel_without_accounting,
    "kernel-noext": kernel_without_extensions,
    "kernel-nocount": lrk_mode("kernel", config='kernel_counters = "none"\n'),
    "xdp": lrk_mode("xdp"),
    "xdp-generic": lrk_mode("xdp", ["--xdp-attach", "generic"]),
    "socket": lrk_mode("socket", pin=True),
    "socket-coalesce": lrk_mode("socket", pin=True, config="coalesce_us = 500\n"),
    "packet": lrk_mode("packet", _TAPS, pin=True),
    "packet-xdp": lrk_mode("packet", ["--packet-io", "af_xdp", *_TAPS], pin=True),
    "packet-xdp-ring4096": lrk_mode("packet", ["--packet-io", "af_xdp", *_TAPS], pin=True,
                                    config="af_xdp_ring = 4096\n"),
    "rtpengine": rtpengine,
}


# -- measuring ---------------------------------------------------------------------------


def _settled(sink: Sink, deadline_s: float = 1.0) -> int:
    """The sink's count once it stops growing (frames still in queues land first)."""
    last, end = sink.packets(), time.monotonic() + deadline_s
    while time.monotonic() < end:
        time.sleep(0.05)
        now = sink.packets()
        if now == last:
            return now
        last = now
    return last


def _arrived(sink: Any, count: int, deadline_s: float = 5.0) -> int:
    """The sink's count once it reaches `count` (bounded), then once it stops growing: a
    warm-up's packets, which a cold relay may still be working through, must not land
    inside the next measured step."""
    end = time.monotonic() + deadline_s
    while sink.packets() < count and time.monotonic() < end:
        time.sleep(0.02)
    return _settled(sink)


def step(gen: Any, sink: Any, rate: int, seconds: float,
         napi_pid: Optional[int] = None, relay_pids: Sequence[int] = ()) -> dict:
    """Offer `rate` pkt/s for `seconds`; delivered, loss, both cores' busy share, the relay
    NAPI thread's share (the relay's own work, whatever else runs on its core) and, with
    the XDP generator, the frames the relay's veth ring refused. `relay_pids`: a userspace
    relay's processes, whose threads' run time is the relay's work too."""
    count = max(1000, int(rate * seconds))
    before = sink.packets()
    xdp = isinstance(gen, XdpGen)
    ring0 = xmit_errors(gen.ns, gen.dev) if xdp else 0
    napi0 = thread_cpu_ns(napi_pid) if napi_pid else 0
    threads0 = runtime_ns(list(relay_pids))
    c_relay, c_gen, t0 = cpu_times(RELAY_CPU), cpu_times(GEN_CPU), time.monotonic()
    sent = gen.run(rate, count)
    wall = time.monotonic() - t0
    relay_busy = busy_share(c_relay, cpu_times(RELAY_CPU))
    gen_busy = busy_share(c_gen, cpu_times(GEN_CPU))
    napi_busy = (thread_cpu_ns(napi_pid) - napi0) / 1e9 / wall if napi_pid else None
    threads_busy = (runtime_ns(list(relay_pids)) - threads0) / 1e9 / wall if relay_pids else None
    delivered = _settled(sink) - before
    if xdp:  # the program's own clock: first to last frame sent
        achieved = gen.last.rate
        limited = achieved < 0.97 * rate
    else:
        achieved = sent / wall if wall > 0 else 0.0
        limited = achieved < 0.97 * rate
    # delivered over the time the frames were sent (the XDP generator's own clock)
    span = sent / achieved if xdp and achieved else wall
    res = {"rate": rate, "sent": sent, "received": delivered, "wall_s": round(wall, 4),
           "loss": round(1 - delivered / sent, 5) if sent else 1.0,
           "achieved_rate": round(achieved), "delivered_rate": round(delivered / span),
           "generator_limited": limited,
           "relay_core_busy": round(relay_busy, 3), "generator_core_busy": round(gen_busy, 3),
           "relay_napi_busy": round(napi_busy, 3) if napi_busy is not None else None,
           "relay_threads_busy": (round(threads_busy, 3) if threads_busy is not None
                                  else None)}
    if xdp:
        res["ring_refused"] = xmit_errors(gen.ns, gen.dev) - ring0
        res["lag_resets"] = gen.last.lag_resets
    # the XDP generator spins between frames (its core reads ~100 % busy at any rate): it
    # saturated when it could not keep its schedule; trafgen when its core was full
    gen_full = limited or (not xdp and gen_busy > 0.95)
    relay_work = None if napi_busy is None else napi_busy + (threads_busy or 0.0)
    if relay_work is not None:
        res["relay_work_busy"] = round(relay_work, 3)
    relay_full = (relay_work >= NAPI_FULL if relay_work is not None else relay_busy > 0.95)
    res["saturated"] = ("relay core" if relay_full and not gen_full else
                        "generator" if gen_full and not relay_full else
                        "both" if gen_full else "neither")
    return res


def confirm(measure: Callable[[int], dict], rate: int) -> dict:
    """Three passing runs in a row at `rate`, stepping down 5 % after a failure."""
    attempts = []
    for _ in range(CONFIRM_ATTEMPTS):
        runs = []
        for _ in range(CONFIRM_RUNS):
            r = measure(rate)
            r["verdict"] = verdict(r, LOSS_LIMIT)
            runs.append(r)
            if r["verdict"] != "pass":
                break
        attempts.append({"rate": rate, "runs": runs})
        if len(runs) == CONFIRM_RUNS and all(r["verdict"] == "pass" for r in runs):
            return {"confirmed_pps": rate, "attempts": attempts}
        rate = int(rate * 0.95)
    return {"confirmed_pps": None, "attempts": attempts}


def conntrack_count(ns: str) -> int:
    """Conntrack entries in namespace `ns` (each one-way flow through a NAT mode holds one;
    nf_conntrack_max is the machine's, read-only in a namespace)."""
    out = run("sysctl", "-n", "net.netfilter.nf_conntrack_count", ns=ns, check=False)
    return int(out.stdout.strip() or 0)


def conntrack_max() -> int:
    with open("/proc/sys/net/netfilter/nf_conntrack_max") as fh:
        return int(fh.read())


def leftovers(rig: Rig) -> Dict[str, Any]:
    """What a mode left in the relay namespace after its teardown: nft tables, XDP
    programs on the relay's veths, conntrack entries (all should be none)."""
    ns = rig.topo.relay.ns
    tables = [t for t in run("nft", "list", "tables", ns=ns).stdout.splitlines() if t]
    xdp = [dev for dev in ("vc1", "ve1")
           if "xdp" in run("ip", "link", "show", "dev", dev, ns=ns).stdout]
    return {"nft_tables": tables, "xdp_on": xdp, "conntrack": conntrack_count(ns)}


#: relay counters a run records (deltas over its steps): what the packets met in the relay
RUN_COUNTERS = ("xdp.verdicts.", "media.egress.", "media.xsk.", "media.dropped.",
                "media.forwarded.")


def run_counters(rig: Rig) -> Dict[str, int]:
    """The relay's counters named by RUN_COUNTERS (empty for relays without a client)."""
    if rig.client is None:
        return {}
    return {k: v for k, v in _relay_counters(rig).items() if k.startswith(RUN_COUNTERS)}


def _delta(before: Dict[str, int], after: Dict[str, int]) -> Dict[str, int]:
    return {k: v - before.get(k, 0) for k, v in after.items() if v != before.get(k, 0)}


def work_us_per_packet(r: dict) -> Optional[float]:
    """The relay's work (NAPI thread + its own threads) per delivered packet in step `r`."""
    work = r.get("relay_work_busy")
    if work is None or not r["received"]:
        return None
    return round(work * r["wall_s"] / r["received"] * 1e6, 3)


def send_settled(gen: Any, sink: Any, rate: int, count: int) -> int:
    """Send `count` packets at `rate`, then wait (bounded) until the sink has them all or
    stops counting, so none lands in the next measured step. The packets delivered."""
    before = sink.packets()
    gen.run(rate, count)
    return _arrived(sink, before + count) - before


def warm_to_steady(gen: Any, sink: Any, rate: int, seconds: float) -> int:
    """`seconds` of traffic at `rate`, waited for: a long-running relay's steady state (a
    JIT compiled, caches warm) before it is judged. The packets sent."""
    count = int(rate * seconds)
    if count <= 0:
        return 0
    send_settled(gen, sink, rate, count)
    return count


def measure_mode(rig: Rig, mode: str, sessions: int, python: str, seconds: float,
                 start: int, equal_rate: int = 0, equal_warmup_s: float = 0.0,
                 overload_rate: int = OVERLOAD_RATE) -> dict:
    """Capacity of `mode` at `sessions` (search, confirmation, overload) and, with
    `equal_rate`, three steps at that rate first: the relay's work per packet at an equal
    load (``equal_load``)."""
    pairs = flows_for(rig.topo, sessions)
    t0 = time.monotonic()
    with SETUPS[mode](rig, pairs, python) as dests:
        setup_s = time.monotonic() - t0
        with rig.generating(pairs, dests) as gen, rig.sink(sessions) as sink:
            warm = max(1000, sessions)
            # first packets: latching, conntrack
            warm_delivered = send_settled(gen, sink, 10_000, warm)
            flows = conntrack_count(rig.topo.relay.ns)

            counts0 = run_counters(rig)

            @contextlib.contextmanager
            def relay() -> Iterator[Any]:
                """The generator towards the relay a step is judged on: the one set up,
                or, for a relay refreshed before every step, a fresh one, warmed."""
                if rig.refresh is None:
                    yield gen
                    return
                fresh = rig.refresh()  # a fresh relay with fresh calls
                with rig.generating(pairs, fresh) as g:
                    send_settled(g, sink, 10_000, warm)
                    yield g

            def judge(g: Any, rate: int) -> dict:
                return step(g, sink, rate, seconds, rig.napi_pid, rig.relay_pids)

            def measure(rate: int) -> dict:
                with relay() as g:
                    return judge(g, rate)

            equal: List[dict] = []
            equal_warm = 0
            if equal_rate:  # one relay, warmed alike, for all three (no overload here)
                with relay() as g:
                    equal_warm = warm_to_steady(g, sink, equal_rate, equal_warmup_s)
                    equal = [judge(g, equal_rate) for _ in range(CONFIRM_RUNS)]
            counts_equal = run_counters(rig)
            found = search(measure, start, MAX_STEPS, transient_retries=1)
            cap = found["capacity_pps"]
            conf = confirm(measure, cap) if cap else {"confirmed_pps": None, "attempts": []}
            over = [measure(overload_rate) for _ in range(CONFIRM_RUNS)]
            counts1 = run_counters(rig)
    last = [r for a in conf["attempts"] for r in a["runs"]]
    at_cap = [r for r in last if r.get("verdict") == "pass"]
    left = leftovers(rig)
    return {"mode": mode, "sessions": sessions, "setup_s": round(setup_s, 2),
            "addresses_per_side": addresses_for(sessions),
            "relay_addresses_per_side": (max(relay_addresses_for(sessions),
                                             rig.min_relay_ips) if mode != "routing" else 0),
            "warmup_sent": warm, "warmup_delivered": warm_delivered,
            "conntrack_after_warmup": flows, "nf_conntrack_max": conntrack_max(),
            "left_after_teardown": left,
            # whether the frames were relayed by the xdp program (redirect) or passed on
            # to the kernel's path (xdp modes; empty otherwise)
            "xdp_verdicts": {k: v for k, v in _delta(counts0, counts1).items()
                             if k.startswith("xdp.verdicts.")},
            # the relay's counters over the equal-load steps, and over the whole run after
            # them (search, confirmation, overload): fallbacks, refusals, drops
            "relay_counters": {"equal_load": _delta(counts0, counts_equal),
                               "after_equal_load": _delta(counts_equal, counts1)},
            "capacity_pps": conf["confirmed_pps"], "search": found,
            "confirmation": conf,
            "relay_core_busy_at_capacity": (round(statistics.median(
                r["relay_core_busy"] for r in at_cap), 3) if at_cap else None),
            "relay_napi_busy_at_capacity": (round(statistics.median(
                r["relay_napi_busy"] for r in at_cap), 3) if at_cap else None),
            "relay_work_busy_at_capacity": (round(statistics.median(
                r["relay_work_busy"] for r in at_cap), 3)
                if at_cap and "relay_work_busy" in at_cap[0] else None),
            "saturated": at_cap[-1]["saturated"] if at_cap else None,
            "upper_bound_pps": found["upper_bound_pps"],
            "overload": over, "overload_rate": overload_rate,
            "equal_load": {"rate": equal_rate, "warmup_packets": equal_warm, "steps": equal,
                           "relay_work_us_per_packet": [work_us_per_packet(r) for r in equal],
                           "loss": [r["loss"] for r in equal]} if equal else None,
            "forwarded_at_overload_pps": int(statistics.median(r["delivered_rate"]
                                                                for r in over))}


# -- conntrack extensions, within one setup -----------------------------------------------


def accounted_flows(ns: str) -> int:
    """Conntrack flows of `ns` that carry accounting (their listing shows packets=)."""
    return sum("packets=" in line for line in
               run("conntrack", "-L", ns=ns, check=False).stdout.splitlines())


def ct_ext_ab(rig: Rig, mode: str, sessions: int, python: str, seconds: float,
              rounds: int, rate: int = OVERLOAD_RATE) -> dict:
    """What a conntrack extension on every flow costs, inside one setup of a NAT mode: per
    round, once with `CT_EXT_SYSCTLS` on and once off (the order alternates), flush the
    relay namespace's conntrack, switch the sysctls, re-create the flows with the warm-up,
    then three steps at `rate` (OVERLOAD_RATE: what a full relay core forwards). The rules,
    the ruleset's memory and the relay addresses stay the same; only the flows (and so
    their extension) are new; each round records how many flows carry accounting."""
    if not 1 <= rounds <= MAX_CT_EXT_ROUNDS:
        raise QuickpathError(f"--ct-ext-ab {rounds} outside 1..{MAX_CT_EXT_ROUNDS}")
    ns = rig.topo.relay.ns
    pairs = flows_for(rig.topo, sessions)
    warm = max(1000, sessions)
    out: List[dict] = []
    with SETUPS[mode](rig, pairs, python) as dests, \
            rig.generating(pairs, dests) as gen, rig.sink(sessions) as sink:
        for i in range(rounds):
            for ext in ((True, False) if i % 2 == 0 else (False, True)):
                run("conntrack", "-F", ns=ns, check=False)
                set_netfilter_sysctls(ns, CT_EXT_SYSCTLS, int(ext))
                delivered = send_settled(gen, sink, 10_000, warm)
                accounted = accounted_flows(ns)
                steps = [step(gen, sink, rate, seconds, rig.napi_pid)
                         for _ in range(CONFIRM_RUNS)]
                out.append({"round": i, "extension": ext, "warmup_delivered": delivered,
                            "conntrack_after_warmup": conntrack_count(ns),
                            "accounted_flows": accounted,
                            "overload": steps,
                            "forwarded_at_overload_pps": int(statistics.median(
                                r["delivered_rate"] for r in steps))})
    pairs_ratio = []
    for i in range(rounds):
        by = {r["extension"]: r["forwarded_at_overload_pps"] for r in out if r["round"] == i}
        pairs_ratio.append(round(by[True] / by[False], 4) if by[False] else None)
    known = [r for r in pairs_ratio if r is not None]
    return {"mode": mode, "sessions": sessions, "rounds": out,
            "with_over_without": pairs_ratio,
            "with_over_without_median": (round(statistics.median(known), 4)
                                         if known else None),
            "left_after_teardown": leftovers(rig)}


# -- junk flood --------------------------------------------------------------------------

STRANGER = "198.51.100.11"  # on the caller's link, never a call's peer: its frames are junk
DROP_COUNTERS = ("media.dropped.unexpected_source", "media.dropped.no_destination")


def junk_frames(rig: Rig, pairs: List[Tuple[Addr, Addr]], dests: List[Addr],
                junk_per_media: int, sessions: int) -> Tuple[List[bytes], List[bool]]:
    """One rotation of the generator: per call, its media frame and `junk_per_media` junk
    frames from a stranger, alternately at the call's own relay port (unexpected source)
    and at relay ports beyond the allocated ones (no destination; never the caller's own
    address there, which another call's port would take for a NATed peer). Returns the
    frames and which of them are media."""
    from bench.frames import frame

    free_lo = RELAY_PORT + 4 * sessions  # lrk allocates 4 ports a session from the bottom
    frames, is_media = [], []
    for i, ((a, _b), d) in enumerate(zip(pairs, dests)):
        frames.append(frame(Flow(a[0], a[1], d[0], d[1], ssrc=i + 1), rig.caller_mac,
                            rig.relay_mac))
        is_media.append(True)
        for k in range(junk_per_media):
            if k % 2 == 0:
                f = Flow(STRANGER, 7000 + 2 * (k % 64), d[0], d[1], ssrc=0xBAD)
            else:
                f = Flow(STRANGER, 7001, d[0], free_lo + 2 * (k % 30), ssrc=0xBAD)
            frames.append(frame(f, rig.caller_mac, rig.relay_mac))
            is_media.append(False)
    return frames, is_media


def _relay_counters(rig: Rig) -> Dict[str, int]:
    return dict(rig.client.stats()["counters"])


def junk_flood(rig: Rig, sessions: int, junk_per_media: int, rounds: int, rate: int,
               python: str) -> dict:
    """xdp mode with `sessions` calls set up through the daemon; every call's media and a
    flood of junk from the XDP generator in one rotation, `rounds` times, at `rate` pkt/s
    (0: the generator's highest). Records media sent and delivered, junk sent and what the
    relay counted as dropped, the frames the relay's veth ring refused, and both sides'
    busy shares."""
    pairs = flows_for(rig.topo, sessions)
    with SETUPS["xdp"](rig, pairs, python) as dests:
        frames, is_media = junk_frames(rig, pairs, dests, junk_per_media, sessions)
        media_per_round = sum(is_media)
        gen = XdpGen(rig.topo.caller.ns, "vc0", frames, cpu=GEN_CPU)
        try:
            with XdpSink(rig.topo.callee.ns, "ve0", (CALLEE_PORT,
                                                     CALLEE_PORT + 2 * sessions)) as sink:
                # warm-up: one round of media only, paced (neighbours, latching)
                with XdpGen(rig.topo.caller.ns, "vc0",
                            [f for f, m in zip(frames, is_media) if m], cpu=GEN_CPU) as warm:
                    warm.run(50_000, media_per_round)
                _settled(sink)
                gen.reset_rotation()
                before, delivered0 = _relay_counters(rig), sink.packets()
                ring0 = xmit_errors(gen.ns, gen.dev)
                napi0 = thread_cpu_ns(rig.napi_pid)
                t0 = time.monotonic()
                count = len(frames) * rounds
                gen.run(rate, count)
                wall = time.monotonic() - t0
                napi_busy = (thread_cpu_ns(rig.napi_pid) - napi0) / 1e9 / wall
                delivered = _settled(sink) - delivered0
                refused = xmit_errors(gen.ns, gen.dev) - ring0
                after = _wait_counters(rig, before, count - media_per_round * rounds)
        finally:
            gen.close()
    media_sent = media_per_round * rounds
    junk_sent = count - media_sent
    dropped = {k: after.get(k, 0) - before.get(k, 0) for k in DROP_COUNTERS}
    total_rate = gen.last.rate
    return {"sessions": sessions, "junk_per_media": junk_per_media, "rounds": rounds,
            "offered_rate": rate or "unpaced", "total_rate": round(total_rate),
            "media_rate": round(total_rate * media_per_round / len(frames)),
            "junk_rate": round(total_rate * (len(frames) - media_per_round) / len(frames)),
            "media_sent": media_sent, "media_delivered": delivered,
            "media_lost": media_sent - delivered, "junk_sent": junk_sent,
            "junk_dropped_counted": sum(dropped.values()), "dropped": dropped,
            "redirected": (after.get("xdp.verdicts.redirect", 0)
                           - before.get("xdp.verdicts.redirect", 0)),
            "ring_refused": refused, "lag_resets": gen.last.lag_resets,
            "relay_napi_busy": round(napi_busy, 3), "wall_s": round(wall, 3)}


def _wait_counters(rig: Rig, before: Dict[str, int], junk: int,
                   deadline_s: float = 5.0) -> Dict[str, int]:
    """The relay's counters once its drop counters stop moving (or show every junk frame):
    the daemon reads the program's per-CPU verdicts when asked."""
    end, last = time.monotonic() + deadline_s, _relay_counters(rig)
    while time.monotonic() < end:
        if sum(last.get(k, 0) - before.get(k, 0) for k in DROP_COUNTERS) >= junk:
            return last
        time.sleep(0.2)
        now = _relay_counters(rig)
        if now == last:
            return now
        last = now
    return last


def table(results: List[dict]) -> str:
    lines = ["| mode | sessions | capacity (pkt/s, confirmed 3x) | relay NAPI thread busy there "
             "| relay core busy there | lowest rate that did not pass | why it did not | "
             "saturated there | forwarded at 2 Mpps offered (median of 3) | saturated there "
             "| relay work us/pkt at the equal load (3 steps) |",
             "|---|---:|---:|---:|---:|---:|---|---|---:|---|---|"]
    for r in results:
        up = r["upper_bound_pps"]
        bad = next((s for s in r["search"]["steps"]
                    if s["rate"] == up and s.get("verdict") != "pass"), None)
        lines.append(f"| {r['mode']} | {r['sessions']:,} | "
                     f"{r['capacity_pps'] or 0:,} | {r.get('relay_napi_busy_at_capacity')} | "
                     f"{r['relay_core_busy_at_capacity']} | "
                     f"{f'{up:,}' if up else '-'} | {bad['verdict'] if bad else '-'} | "
                     f"{bad['saturated'] if bad else '-'} | "
                     f"{_overload(r)} | {_equal(r)} |")
    return "\n".join(lines)


def _equal(r: dict) -> str:
    eq = r.get("equal_load")
    if not eq:
        return "-"
    return f"{' / '.join(str(x) for x in eq['relay_work_us_per_packet'])} at {eq['rate']:,}"


def _overload(r: dict) -> str:
    over = r.get("overload")
    if not over:
        return "- | -"
    return f"{r['forwarded_at_overload_pps']:,} | {over[-1]['saturated']}"


def load_average() -> List[float]:
    """The machine's 1-, 5- and 15-minute load (it is shared: figures say how busy)."""
    return [round(x, 2) for x in os.getloadavg()]


def _need_root() -> None:
    if os.geteuid() != 0:
        raise QuickpathError("bench.quickpath needs root (network namespaces, nftables)")


def _started() -> Tuple[List[float], str]:
    """The load average and the UTC date a run starts with (its report's)."""
    return load_average(), time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())


def _report(load_before: List[float], date: str, **fields: Any) -> dict:
    """A run's report: the machine, the date, the command, the rig's cores, the load
    before and after, and `fields`."""
    return {"machine": machine(), "date": date,
            "command": " ".join(["python -m bench.quickpath", *sys.argv[1:]]),
            "relay_cpu": RELAY_CPU, "generator_cpu": GEN_CPU, **fields,
            "load_before": load_before, "load_after": load_average()}


def _save(path: Optional[str], res: dict) -> None:
    if path:
        with open(path, "w") as fh:
            json.dump(res, fh, indent=1)


def run_bench(sessions: List[int], modes: List[str], seconds: float = 1.0,
              start: int = 200_000, python: Optional[str] = None,
              generator: str = "xdp", relay_ips: int = 0,
              idle_latency_us: Optional[int] = None, equal_rate: int = 0,
              rx_moderation_us: int = 0, napi_policy: str = "fifo",
              equal_warmup_s: float = 0.0, overload_rate: int = OVERLOAD_RATE) -> dict:
    if not 100_000 <= overload_rate <= MAX_OVERLOAD_RATE:
        raise QuickpathError(f"--overload-rate {overload_rate} outside "
                             f"100000..{MAX_OVERLOAD_RATE}")
    if napi_policy not in NAPI_POLICIES:
        raise QuickpathError(f"unknown NAPI policy {napi_policy!r}; choose from "
                             f"{list(NAPI_POLICIES)}")
    _need_root()
    if not 0 <= relay_ips <= MAX_ADDRESSES:
        raise QuickpathError(f"--relay-addresses {relay_ips} outside 0..{MAX_ADDRESSES}")
    if not 0 < seconds <= MAX_STEP_S:
        raise QuickpathError(f"--step {seconds} outside (0, {MAX_STEP_S}]")
    if not 0 <= equal_warmup_s <= MAX_EQUAL_WARMUP_S:
        raise QuickpathError(f"--equal-warmup-s {equal_warmup_s} outside "
                             f"0..{MAX_EQUAL_WARMUP_S}")
    if not 0 <= rx_moderation_us <= MAX_RX_MODERATION_US:
        raise QuickpathError(f"--rx-moderation-us {rx_moderation_us} outside "
                             f"0..{MAX_RX_MODERATION_US}")
    unknown = [m for m in modes if m not in SETUPS]
    if unknown:
        raise QuickpathError(f"unknown modes {unknown}; choose from {list(SETUPS)}")
    py = python or pypy_or_current()
    results = []
    load_before, date = _started()
    with Topology("-qp") as topo, cpu_latency(idle_latency_us) as idle:
        rig = Rig(topo, generator, relay_ips, rx_moderation_us, NAPI_POLICIES[napi_policy])
        for n in sessions:
            for mode in modes:
                print(f"quickpath: {mode} x {n} ...", file=sys.stderr, flush=True)
                res = measure_mode(rig, mode, n, py, seconds, start, equal_rate,
                                   equal_warmup_s, overload_rate)
                res["load_after"] = load_average()
                results.append(res)
    left = [ns for ns in list_namespaces() if ns in topo.namespaces]
    if left:
        raise QuickpathError(f"namespaces left after the run: {left}")
    return _report(load_before, date, generator=generator, step_s=seconds,
                   idle_latency_us=idle, rx_moderation_us=rx_moderation_us,
                   napi_policy=napi_policy, equal_warmup_s=equal_warmup_s,
                   overload_rate=overload_rate, results=results)


def run_junk(sessions: int, junk_per_media: int, rounds: int, rate: int,
             python: Optional[str] = None, runs: int = 3,
             idle_latency_us: Optional[int] = None) -> dict:
    """`runs` junk floods in a row on one set of calls' topology (the bench's record)."""
    _need_root()
    py = python or pypy_or_current()
    load_before, date = _started()
    out = []
    with Topology("-qj") as topo, cpu_latency(idle_latency_us) as idle:
        rig = Rig(topo, "xdp")
        for _ in range(runs):
            out.append(junk_flood(rig, sessions, junk_per_media, rounds, rate, py))
    return _report(load_before, date, generator="xdp", idle_latency_us=idle, runs=out)


def run_ct_ext_ab(sessions: int, modes: List[str], rounds: int, seconds: float,
                  python: Optional[str] = None) -> dict:
    """`ct_ext_ab` for each of `modes` (NAT modes), one after the other, one topology."""
    _need_root()
    if not 0 < seconds <= MAX_STEP_S:
        raise QuickpathError(f"--step {seconds} outside (0, {MAX_STEP_S}]")
    unfit = [m for m in modes if m not in CT_EXT_MODES]
    if unfit:
        raise QuickpathError(f"--ct-ext-ab measures NAT modes only: {unfit}; choose from "
                             f"{list(CT_EXT_MODES)}")
    py = python or pypy_or_current()
    load_before, date = _started()
    out = []
    with Topology("-qx") as topo:
        rig = Rig(topo, "xdp")
        for mode in modes:
            print(f"quickpath: conntrack extension A/B, {mode} x {sessions} ...",
                  file=sys.stderr, flush=True)
            out.append(ct_ext_ab(rig, mode, sessions, py, seconds, rounds))
    return _report(load_before, date, generator="xdp", step_s=seconds, results=out)


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sessions", default="1,1000")
    ap.add_argument("--modes", default="routing,static-nat,kernel,xdp")
    ap.add_argument("--generator", choices=GENERATORS, default="xdp",
                    help="xdp: bench.xdpgen (frames reach the relay as XDP frames, as from "
                         "a NIC); trafgen: AF_PACKET (as skbs)")
    ap.add_argument("--step", type=float, default=1.0, help="seconds per step")
    ap.add_argument("--start", type=int, default=200_000, help="first offered rate")
    ap.add_argument("--python", help="interpreter of the relay (default: pypy3)")
    ap.add_argument("--relay-addresses", type=int, default=0,
                    help="at least this many relay addresses per side (0: as many as the "
                         "sessions need: one up to 11,368, then one per 16,000)")
    ap.add_argument("--junk", action="store_true",
                    help="instead of capacity: xdp mode, --sessions calls (the first "
                         "number), media plus a junk flood at the generator's highest rate")
    ap.add_argument("--junk-per-media", type=int, default=39)
    ap.add_argument("--junk-rounds", type=int, default=100)
    ap.add_argument("--junk-rate", type=int, default=0, help="0: unpaced")
    ap.add_argument("--idle-latency-us", type=int, default=None,
                    help="hold a PM QoS CPU latency request of this many us for the run "
                         "(0: idle CPUs poll instead of halting; bench.pmqos)")
    ap.add_argument("--rx-moderation-us", type=int, default=0,
                    help="the relay's receiving veth re-polls on a timer of this many us "
                         "after a poll that found work, as NIC interrupt moderation does "
                         "(0: none)")
    ap.add_argument("--napi-policy", choices=list(NAPI_POLICIES), default="fifo",
                    help="the relay NAPI thread's scheduling: fifo (SCHED_FIFO, as a "
                         "softirq at interrupt exit) or other (SCHED_OTHER, as ksoftirqd, "
                         "which takes over a softirq that keeps finding work)")
    ap.add_argument("--equal-rate", type=int, default=0,
                    help="first, three steps at this rate: the relay's work per packet at "
                         "an equal load (0: none)")
    ap.add_argument("--equal-warmup-s", type=float, default=0.0,
                    help="before the equal-load steps, this many seconds at that rate, "
                         "for every relay alike, so each is judged in its steady state")
    ap.add_argument("--overload-rate", type=int, default=OVERLOAD_RATE,
                    help="the rate of the three overload steps after the search (default "
                         "2,000,000; up to 6,000,000, for a path that forwards 2 Mpps with "
                         "core to spare)")
    ap.add_argument("--ct-ext-ab", type=int, default=0, metavar="ROUNDS",
                    help="instead of capacity: per NAT mode (static-nat, kernel-nocount), "
                         "the first --sessions number of sessions, ROUNDS rounds of flows "
                         "with and without conntrack extensions in one setup (ct_ext_ab)")
    ap.add_argument("--out")
    args = ap.parse_args(argv)
    if args.ct_ext_ab:
        res = run_ct_ext_ab(int(args.sessions.split(",")[0]), args.modes.split(","),
                            args.ct_ext_ab, args.step, args.python)
        for r in res["results"]:
            print(f"{r['mode']} x {r['sessions']}: forwarded with / without conntrack "
                  f"extensions, per round {r['with_over_without']}, median "
                  f"{r['with_over_without_median']}")
        _save(args.out, res)
        return 0
    if args.junk:
        res = run_junk(int(args.sessions.split(",")[0]), args.junk_per_media, args.junk_rounds,
                       args.junk_rate, args.python, idle_latency_us=args.idle_latency_us)
        print(json.dumps(res["runs"], indent=1))
        _save(args.out, res)
        return 0
    res = run_bench([int(s) for s in args.sessions.split(",")], args.modes.split(","),
                    args.step, args.start, args.python, args.generator,
                    args.relay_addresses, args.idle_latency_us, args.equal_rate,
                    args.rx_moderation_us, args.napi_policy, args.equal_warmup_s,
                    args.overload_rate)
    print(table(res["results"]))
    _save(args.out, res)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
