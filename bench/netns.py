"""Network-namespace test topologies: caller <-> relay <-> callee, each in its own namespace.

Used by the privileged tests and benchmarks (root). Addresses come only from the
documentation ranges 198.51.100.0/24 and 2001:db8::/32; the root namespace is never
touched. Sockets for any namespace are made from this process by a short-lived
thread that enters the namespace (setns), so a test holds endpoints on every host.
"""

from __future__ import annotations

import ctypes
import os
import socket
import subprocess
import threading
from dataclasses import dataclass
from typing import Callable, List, Optional, Tuple, TypeVar

from lrk.errors import LrkError

T = TypeVar("T")

PREFIX = "lrk-t"
CLONE_NEWNET = 0x40000000
NETNS_DIR = "/var/run/netns"


class NetnsError(LrkError):
    """A namespace command failed; the message has the command and its output."""


def run(*args: str, ns: Optional[str] = None, check: bool = True,
        timeout: float = 20.0) -> subprocess.CompletedProcess:
    cmd = (["ip", "netns", "exec", ns] if ns else []) + list(args)
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise NetnsError(f"{' '.join(cmd)} failed ({proc.returncode}): "
                         f"{proc.stderr.strip() or proc.stdout.strip()}")
    return proc


def set_napi_deferral(ns: str, dev: str, defer: int, flush_timeout_ns: int) -> None:
    """Defer `dev`'s receive re-poll (its `napi_defer_hard_irqs` and `gro_flush_timeout`,
    inside namespace `ns`): a veth's receive interrupt moderation (docs/operations.md).
    0, 0 is the kernel's default."""
    run("sh", "-c", f"echo {int(defer)} > /sys/class/net/{dev}/napi_defer_hard_irqs && "
        f"echo {int(flush_timeout_ns)} > /sys/class/net/{dev}/gro_flush_timeout", ns=ns)


def list_namespaces() -> List[str]:
    out = run("ip", "netns", "list", check=False).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def sweep(prefix: str = PREFIX) -> List[str]:
    """Delete namespaces that crashed earlier runs left behind: ours by prefix, and only
    those whose creating process (the pid in the name) is gone."""
    gone = []
    for name in list_namespaces():
        if not name.startswith(prefix):
            continue
        digits = ""
        for ch in name[len(prefix):]:
            if not ch.isdigit():
                break
            digits += ch
        if digits and os.path.exists(f"/proc/{digits}"):
            continue  # its test run is still alive
        run("ip", "netns", "del", name, check=False)
        gone.append(name)
    return gone


_libc = ctypes.CDLL(None, use_errno=True)


def pin_thread(tid: int, cpu: int) -> None:
    """Pin one thread (0: the calling one) to `cpu` (PyPy 3.9's os has no
    sched_setaffinity, so through libc)."""
    mask = ctypes.c_ulong(1 << cpu)
    if _libc.sched_setaffinity(tid, ctypes.sizeof(mask), ctypes.byref(mask)) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"sched_setaffinity({tid}, cpu {cpu}): {os.strerror(err)}")


def enter(ns: str) -> None:
    """Move the calling thread into network namespace `ns` (setns: this thread only)."""
    fd = os.open(os.path.join(NETNS_DIR, ns), os.O_RDONLY)
    try:
        if _libc.setns(fd, CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), f"setns({ns})")
    finally:
        os.close(fd)


def in_netns(ns: str, fn: Callable[[], T], timeout: float = 30.0) -> T:
    """Run `fn` on a throwaway thread inside namespace `ns` (BPF_PROG_TEST_RUN resolves
    ingress_ifindex and bpf_fib_lookup in the caller's namespace)."""
    result: List[object] = []

    def run() -> None:
        try:
            enter(ns)
            result.append(fn())
        except BaseException as exc:
            result.append(exc)

    t = threading.Thread(target=run, name=f"in-{ns}")
    t.start()
    t.join(timeout)
    if not result:
        raise NetnsError(f"no result from a thread in {ns} within {timeout:.0f} s")
    if isinstance(result[0], BaseException):
        raise result[0]
    return result[0]  # type: ignore[return-value]


def socket_in(ns: str, family: int = socket.AF_INET,
              kind: int = socket.SOCK_DGRAM, proto: int = 0) -> socket.socket:
    """A socket that lives in namespace `ns` (a socket stays in the namespace it was made in)."""
    return in_netns(ns, lambda: socket.socket(family, kind, proto))


@dataclass
class Host:
    ns: str
    ip4: str
    ip6: str


class Topology:
    """Three namespaces and two veth links; the relay forwards between them.

    caller 198.51.100.10 / 2001:db8:1::10  <->  relay 198.51.100.1 / 2001:db8:1::1
    callee 198.51.100.70 / 2001:db8:2::70  <->  relay 198.51.100.65 / 2001:db8:2::1
    """

    def __init__(self, tag: str = "", queues: int = 1) -> None:
        base = f"{PREFIX}{os.getpid()}{tag}"
        #: receive and transmit queues of every veth end (1: the kernel's default)
        self.queues = queues
        self.caller = Host(f"{base}-a", "198.51.100.10", "2001:db8:1::10")
        self.relay = Host(f"{base}-r", "198.51.100.1", "2001:db8:1::1")
        self.callee = Host(f"{base}-b", "198.51.100.70", "2001:db8:2::70")
        self.relay_ext = Host(self.relay.ns, "198.51.100.65", "2001:db8:2::1")
        self.created: List[str] = []

    @property
    def namespaces(self) -> Tuple[str, str, str]:
        return self.caller.ns, self.relay.ns, self.callee.ns

    def create(self) -> Topology:
        try:
            for ns in self.namespaces:
                run("ip", "netns", "add", ns)
                self.created.append(ns)
                run("ip", "link", "set", "lo", "up", ns=ns)
            self._link(self.caller, "c", self.relay, "26", "64")
            self._link(self.callee, "e", self.relay_ext, "26", "64")
            for host, gw in ((self.caller, self.relay), (self.callee, self.relay_ext)):
                run("ip", "route", "add", "default", "via", gw.ip4, ns=host.ns)
                run("ip", "-6", "route", "add", "default", "via", gw.ip6, ns=host.ns)
            for key in ("net.ipv4.ip_forward=1", "net.ipv6.conf.all.forwarding=1"):
                run("sysctl", "-qw", key, ns=self.relay.ns)
        except BaseException:
            self.destroy()
            raise
        return self

    def _link(self, host: Host, tag: str, relay: Host, plen4: str, plen6: str) -> None:
        mine, theirs = f"v{tag}0", f"v{tag}1"
        q = [] if self.queues == 1 else ["numtxqueues", str(self.queues), "numrxqueues",
                                         str(self.queues)]
        run("ip", "link", "add", mine, "netns", host.ns, *q, "type", "veth", "peer", "name",
            theirs, "netns", relay.ns, *q)
        for ns, dev, h in ((host.ns, mine, host), (relay.ns, theirs, relay)):
            run("ip", "addr", "add", f"{h.ip4}/{plen4}", "dev", dev, ns=ns)
            run("ip", "-6", "addr", "add", f"{h.ip6}/{plen6}", "dev", dev, "nodad", ns=ns)
            run("ip", "link", "set", dev, "up", ns=ns)

    def destroy(self) -> None:
        """Deleting a namespace takes its veth ends, rules and conntrack table with it."""
        for ns in reversed(self.created):
            run("ip", "netns", "del", ns, check=False)
        self.created.clear()

    def __enter__(self) -> Topology:
        return self.create()

    def __exit__(self, *exc: object) -> None:
        self.destroy()
