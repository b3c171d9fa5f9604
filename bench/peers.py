"""The relays a comparison runs, behind one small interface, in the relay namespace of a
`bench.netns.Topology`: lrk in each of its modes and Debian's rtpengine.

A peer starts, sets up a call between a caller and a callee address (returning where
each side must send), ends calls, reports the pids whose CPU and memory are its cost,
and stops, leaving nothing behind. The caller faces the relay's 198.51.100.1, the
callee its 198.51.100.65, for every peer alike.
"""

from __future__ import annotations

import os
from typing import Dict, List, Optional, Tuple

from bench.netns import Topology
from bench.rtpengine import RtpengineProcess
from fastpath import jit
from lrk.client import LrkClient
from lrk.demo.relay_process import RelayProcess

Addr = Tuple[str, int]

LRK_MODES = ("kernel", "nfqueue", "socket", "packet")
PEERS = LRK_MODES + ("rtpengine",)
#: the veth ends in the relay namespace (packet mode taps them)
RELAY_IFACES = ("vc1", "ve1")


class PeerError(RuntimeError):
    """A relay could not be started or driven; the message says which and why."""


def tree_pids(pid: int) -> List[int]:
    """`pid` and its descendants (lrk's workers), from /proc."""
    children: Dict[int, List[int]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as fh:
                ppid = int(fh.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(name))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out


def rss_bytes(pids: List[int]) -> int:
    """Resident memory of these processes (threads of one process count once)."""
    page = os.sysconf("SC_PAGE_SIZE")
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/statm") as fh:
                total += int(fh.read().split()[1]) * page
        except (OSError, ValueError, IndexError):
            pass
    return total


class Peer:
    name = "peer"

    def start(self) -> None:
        raise NotImplementedError

    def call(self, call_id: str, caller: Addr, callee: Addr) -> Tuple[Addr, Addr]:
        """(where the caller sends, where the callee sends)."""
        raise NotImplementedError

    def hangup(self, call_id: str) -> None:
        raise NotImplementedError

    def pids(self) -> List[int]:
        raise NotImplementedError

    def stop(self) -> Optional[int]:
        raise NotImplementedError

    def rss_bytes(self) -> int:
        return rss_bytes(self.pids())

    def __enter__(self) -> Peer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


#: for a relay whose memory per session is measured: PyPy's own nursery size (1 MB here)
#: instead of the launchers' 64 MB, which a process fills once over its first 64 MB
#: allocated -- a fixed amount per process that a per-session figure must not count
MEMORY_ENV = {jit.GC_NURSERY_ENV: "1M"}


class LrkPeer(Peer):
    """`lrkproxy run --mode MODE` in the relay namespace, driven by `LrkClient`."""

    def __init__(self, topo: Topology, mode: str, ports: str, python: Optional[str] = None,
                 extra: Optional[List[str]] = None,
                 env: Optional[Dict[str, str]] = None) -> None:
        if mode not in LRK_MODES:
            raise PeerError(f"unknown lrk mode {mode!r}; choose from {', '.join(LRK_MODES)}")
        self.name = mode
        args = ["--mode", mode, "--internal-ip", topo.relay.ip4,
                "--external-ip", topo.relay_ext.ip4, "--silence-timeout", "3600",
                "--workers", "1", *(extra or [])]
        if mode == "packet":
            for iface in RELAY_IFACES:
                args += ["--packet-interface", iface]
        self.relay = RelayProcess(ports=ports, netns=topo.relay.ns, extra=args, python=python,
                                  env=env)
        self.client: Optional[LrkClient] = None
        self.exit_code: Optional[int] = None

    def start(self) -> None:
        self.relay.start(ready_timeout=60.0)
        self.client = LrkClient([self.relay.node], timeout=5.0, retries=2)

    def call(self, call_id: str, caller: Addr, callee: Addr) -> Tuple[Addr, Addr]:
        assert self.client is not None
        # offer: the SDP goes to the callee, who sends to the external (callee-side) address
        offer = self.client.offer(call_id, "a", caller, interface="external")
        answer = self.client.answer(call_id, "a", "b", callee, interface="internal")
        return ((answer["relay"]["ip"], int(answer["relay"]["port"])),
                (offer["relay"]["ip"], int(offer["relay"]["port"])))

    def hangup(self, call_id: str) -> None:
        assert self.client is not None
        self.client.delete(call_id)

    def counters(self) -> Dict[str, int]:
        assert self.client is not None
        return {k: int(v) for k, v in self.client.stats()["counters"].items()
                if isinstance(v, (int, float))}

    def pids(self) -> List[int]:
        proc = self.relay.proc
        if proc is None or proc.poll() is not None:
            return []
        # `ip netns exec` execs the interpreter: the child is lrk itself, workers below it
        return tree_pids(proc.pid)

    def stop(self) -> Optional[int]:
        if self.client is not None:
            self.client.close()
            self.client = None
        self.exit_code = self.relay.stop()
        return self.exit_code

    @property
    def output(self) -> str:
        return self.relay.output


class RtpenginePeer(Peer):
    """Debian's rtpengine (userspace forwarding, one thread by default: per-core figures)."""

    name = "rtpengine"

    def __init__(self, topo: Topology, ports: str, threads: int = 1) -> None:
        self.proc = RtpengineProcess(
            interfaces=[("internal", topo.relay.ip4), ("external", topo.relay_ext.ip4)],
            ports=ports, netns=topo.relay.ns, threads=threads)
        self.ng = None
        self.exit_code: Optional[int] = None
        self._tags: Dict[str, str] = {}

    def start(self) -> None:
        self.proc.start()
        self.ng = self.proc.client(timeout=2.0, retries=2)

    def call(self, call_id: str, caller: Addr, callee: Addr) -> Tuple[Addr, Addr]:
        from bench.ng import setup_call

        assert self.ng is not None
        relayed = setup_call(self.ng, call_id, caller, callee)
        self._tags[call_id] = relayed.from_tag
        return relayed.caller_sends_to, relayed.callee_sends_to

    def hangup(self, call_id: str) -> None:
        assert self.ng is not None
        self.ng.delete(call_id, self._tags.pop(call_id, "a"))

    def pids(self) -> List[int]:
        try:
            return [self.proc.pid]
        except Exception:
            return []

    def stop(self) -> Optional[int]:
        if self.ng is not None:
            self.ng.close()
            self.ng = None
        self.exit_code = self.proc.stop()
        return self.exit_code

    @property
    def output(self) -> str:
        return self.proc.log_text or ""


def make_peer(topo: Topology, name: str, ports: str, python: Optional[str] = None,
              env: Optional[Dict[str, str]] = None) -> Peer:
    if name == "rtpengine":
        return RtpenginePeer(topo, ports)
    return LrkPeer(topo, name, ports, python=python, env=env)
