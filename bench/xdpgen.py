"""An in-kernel traffic generator and sink for XDP-native capacity figures (veth test bed).

Why: frames that trafgen (AF_PACKET) or a socket sends reach the relay's veth as skbs
with little headroom, so veth's native XDP copies each into a page before the program
runs, and xdp mode looks no cheaper than kernel mode. A NIC hands the driver pages.
This generator does the same on a veth: `XdpGen` runs `bench/xdp/gen.bpf.c` with
BPF_PROG_TEST_RUN in live-frames mode (BPF_F_TEST_XDP_LIVE_FRAMES, kernel >= 5.18) on the
generator namespace's veth; the program writes flow i's headers into the page and
returns XDP_TX, which the kernel turns into a redirect out of that veth, so the relay's
veth receives an xdp_frame (veth_xdp_xmit -> its NAPI -> veth_xdp_rcv): the relay's XDP
program runs on it in place, and kernel mode builds its skb from it as a NIC driver does.

Frames: `bench.frames` builds every flow's frame byte for byte (checksums included); the
program copies the first SLOT bytes of flow (c mod n)'s frame into frame number c, so n
flows go out in rotation, one frame each, exact by construction (the rest of every frame
must be the same bytes: same length, same RTP payload). Pages are recycled without being
re-initialised and receivers rewrite headers in place, so whole headers are written every
time, never patched.

Rate: paced in the program, by the kernel's clock. One long live test run per `run`
(each call sets up and tears down a page pool, whose teardown waits for an RCU grace
period: tens of milliseconds on a busy machine, so calls per burst cannot pace): every
iteration waits in the program (bounded) until the next frame is due by
bpf_ktime_get_ns and sends it (XDP_TX); a page is dropped unsent (idle) only when the wait
runs out. Dropping instead of waiting cost the relay: each page returns to the run's page
pool, from the relay's CPU through a ring whose lock the dropping generator took millions
of times a second (gen.bpf.c); behind schedule by more than MAX_BURST frames, the schedule
moves up (counted: `lag_resets`), so a burst never exceeds MAX_BURST frames (veth's ring
holds 256). After `count` frames the program idles and this process ends the run with a
signal (the kernel checks between batches). The sending thread is pinned to `cpu` (a live
test run transmits on the calling CPU) at SCHED_FIFO (GEN_RT_PRIO; RT throttling leaves
others 5 % of that core), because it spins between frames and a shared machine would
otherwise preempt it for milliseconds. The rate achieved is the program's own (frames
between its first and last timestamp); the sink's count is the truth of what arrived.
Rate 0 sends unpaced (the generator's ceiling).

`XdpSink` counts and drops UDP to a port range at the callee's veth (`bench/xdp/sink.bpf.c`,
native XDP, per-CPU counters), the same cost for every mode under test.

Bounds: at most MAX_TEMPLATES flows, MAX_COUNT frames and MAX_DURATION seconds a run.
"""

from __future__ import annotations

import os
import signal
import struct
import threading
import time
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

from bench.frames import Flow, frame
from bench.netns import NetnsError, enter, in_netns, pin_thread, run
from bench.trafgen import run_deadline
from fastpath.xdp import build
from fastpath.xdp.errors import XdpError
from fastpath.xdp.libbpf import (
    XDP_FLAGS_DRV_MODE,
    BpfMap,
    BpfObject,
    LiveRun,
    if_nametoindex,
    num_cpus,
    xdp_attach,
    xdp_detach,
    xdp_query_id,
)

HERE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "xdp")
GEN_SOURCE = os.path.join(HERE, "gen.bpf.c")
SINK_SOURCE = os.path.join(HERE, "sink.bpf.c")
SLOT = 80  # gen.bpf.c's SLOT
MAX_TEMPLATES = 200_000
MAX_COUNT = 200_000_000
MAX_DURATION = 60.0
MAX_BURST = 128  # frames behind schedule sent back to back at most (veth ring: 256)
MAX_ITERS = (1 << 31) - 1
#: frames a live test run hands on per flush (the kernel's maximum): fewer wakeups of the
#: receiver's NAPI, as a NIC's interrupt coalescing
BATCH = 256
GEN_NICE = -20
GEN_RT_PRIO = 40  # 0: nice GEN_NICE instead
#: ends a live test run once the quota is sent (a handler is installed while a run lasts)
STOP_SIGNAL = signal.SIGRTMIN + 7
POLL_S = 0.001



class XdpGenError(NetnsError):
    """The XDP generator or sink could not run or did not send what was asked; says why."""


def _enter(ns: str, cpu: int) -> None:
    """This thread into namespace `ns`, pinned to `cpu`, at SCHED_FIFO GEN_RT_PRIO (on a
    shared machine the spinning generator keeps its schedule)."""
    enter(ns)
    pin_thread(0, cpu)  # 0: this thread only
    if GEN_RT_PRIO:
        os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(GEN_RT_PRIO))
    else:
        os.setpriority(os.PRIO_PROCESS, 0, GEN_NICE)  # Linux: per thread


def _check_frames(frames: Sequence[bytes]) -> None:
    if not frames:
        raise ValueError("no frames to send")
    if len(frames) > MAX_TEMPLATES:
        raise ValueError(f"{len(frames)} flows: at most {MAX_TEMPLATES} templates")
    size, tail = len(frames[0]), frames[0][SLOT:]
    if size < SLOT:
        raise ValueError(f"frames of {size} bytes: the generator writes {SLOT}-byte headers")
    for i, f in enumerate(frames):
        if len(f) != size or f[SLOT:] != tail:
            raise ValueError(f"frame {i} differs from frame 0 beyond byte {SLOT} (length or "
                             "payload): the generator only rewrites the first bytes")


def _sum_u64(raw: bytes, ncpus: int) -> int:
    return sum(struct.unpack_from("<Q", raw, 8 * c)[0] for c in range(ncpus))


#: gen.bpf.c's struct gen_state, in order
STATE_FIELDS = ("cursor", "tx", "aborted", "idle", "due", "quota", "first_ns", "last_ns",
                "lag_resets")
_STATE = struct.Struct("<" + "Q" * len(STATE_FIELDS))
_CONFIG = struct.Struct("<QQQ")
FP = 10  # gen.bpf.c's fixed point of the schedule


@dataclass
class Sent:
    """What one run did, from the program's own counters (all CPUs)."""

    frames: int
    idle: int
    lag_resets: int
    first_ns: int
    last_ns: int
    wall_s: float
    calls: int

    @property
    def rate(self) -> float:
        """Frames per second between the first and the last frame sent."""
        span = (self.last_ns - self.first_ns) / 1e9
        return (self.frames - 1) / span if self.frames > 1 and span > 0 else 0.0


class XdpGen:
    """Sends `frames` in rotation out of `dev` in namespace `ns` as XDP frames, from a
    thread pinned to `cpu` (the quota lives in that CPU's slot of the per-CPU state)."""

    def __init__(self, ns: str, dev: str, frames: Sequence[bytes], cpu: int = 0,
                 batch_size: int = BATCH, max_burst: int = MAX_BURST) -> None:
        _check_frames(frames)
        self.ns, self.dev, self.cpu, self.n = ns, dev, cpu, len(frames)
        self.batch_size, self.max_burst = batch_size, max_burst
        self._frame0 = bytes(frames[0])
        self.last: Optional[Sent] = None
        self.obj = BpfObject(build.object_path(GEN_SOURCE), {"templates": len(frames)})
        try:
            self.ncpus = num_cpus()
            self.prog_fd = self.obj.prog_fd("lrk_gen")
            templates = BpfMap(self.obj.map_fd("templates"), 4, SLOT)
            for i, f in enumerate(frames):
                templates.update(struct.pack("<I", i), bytes(f[:SLOT]))
            self._config = BpfMap(self.obj.map_fd("gen_config"), 4, _CONFIG.size)
            self._state = BpfMap(self.obj.map_fd("gen_state"), 4, _STATE.size, self.ncpus)
        except BaseException:
            self.obj.close()
            raise

    @classmethod
    def for_flows(cls, ns: str, dev: str, src_mac: str, dst_mac: str, flows: Sequence[Flow],
                  cpu: int = 0) -> XdpGen:
        return cls(ns, dev, [frame(f, src_mac, dst_mac) for f in flows], cpu=cpu)

    def state(self) -> dict:
        """gen_state summed over CPUs (first_ns: the earliest, last_ns: the latest)."""
        raw = self._state.lookup(b"\0\0\0\0") or bytes(_STATE.size * self.ncpus)
        stride = (_STATE.size + 7) // 8 * 8
        per = [dict(zip(STATE_FIELDS, _STATE.unpack_from(raw, stride * c)))
               for c in range(self.ncpus)]
        out = {k: sum(p[k] for p in per) for k in STATE_FIELDS}
        firsts = [p["first_ns"] for p in per if p["first_ns"]]
        out["first_ns"] = min(firsts) if firsts else 0
        out["last_ns"] = max(p["last_ns"] for p in per)
        return out

    def reset_rotation(self) -> None:
        """The next frame is template 0's (every CPU's state zeroed)."""
        self._state.update(b"\0\0\0\0", bytes(_STATE.size))

    def run(self, rate: int, count: int, timeout: Optional[float] = None) -> int:
        """Send `count` frames at `rate` pkt/s (0: unpaced); returns the frames sent, checked
        against the program's own XDP_TX count. `self.last` has the details."""
        deadline = run_deadline(rate, count, timeout, MAX_COUNT)
        interval = int((1e9 / rate) * (1 << FP)) if rate else 0
        self._config.update(b"\0\0\0\0", _CONFIG.pack(self.n, interval,
                                                      interval * self.max_burst))
        # the rotation goes on from where it was; the schedule and the quota start afresh
        cursor = self.state()["cursor"]
        # the calling CPU's slot carries the quota and the rotation
        cpu = self.cpu
        stride = (_STATE.size + 7) // 8 * 8
        slots = bytearray(stride * self.ncpus)
        _STATE.pack_into(slots, stride * cpu, cursor, 0, 0, 0, 0, count, 0, 0, 0)
        self._state.update(b"\0\0\0\0", bytes(slots))
        wall, calls = self._run_thread(rate, count, cpu, deadline)
        st = self.state()
        self.last = Sent(st["tx"], st["idle"], st["lag_resets"], st["first_ns"], st["last_ns"],
                         wall, calls)
        if st["aborted"]:
            raise XdpGenError(f"the generator program aborted {st['aborted']} frames")
        if st["tx"] != count:
            raise XdpGenError(f"asked for {count} frames, the program sent {st['tx']}")
        return count

    def _run_thread(self, rate: int, count: int, cpu: int,
                    deadline: float) -> Tuple[float, int]:
        """The sending thread runs one long live test run; this one watches the quota and
        ends the run with STOP_SIGNAL once it is sent (the kernel checks for a pending
        signal between batches), so a run lasts as long as its frames need."""
        out: List[object] = []
        started = threading.Event()

        def body() -> None:
            try:
                _enter(self.ns, cpu)
                live = LiveRun(self.prog_fd, self._frame0, if_nametoindex(self.dev),
                               self.batch_size)
                started.set()
                t0, calls, end = time.monotonic(), 0, time.monotonic() + deadline
                while self._quota(cpu) > 0:
                    if time.monotonic() > end:
                        raise XdpGenError(f"{count - self._quota(cpu)} of {count} frames at "
                                          f"{rate} pkt/s in {deadline:.0f} s: the generator "
                                          "could not keep up")
                    live.send(MAX_ITERS)
                    calls += 1
                out.append((time.monotonic() - t0, calls))
            except BaseException as exc:
                out.append(exc)
            finally:
                started.set()

        main = threading.current_thread() is threading.main_thread()
        old = signal.signal(STOP_SIGNAL, lambda *_: None) if main else None
        try:
            t = threading.Thread(target=body, name="xdpgen", daemon=True)
            t.start()
            started.wait(10)
            stop, end = time.monotonic() + deadline, time.monotonic() + deadline + 5
            while t.is_alive() and time.monotonic() < end:
                t.join(POLL_S)
                if t.is_alive() and t.ident is not None and (
                        self._quota(cpu) == 0 or time.monotonic() > stop):
                    if not main:
                        raise XdpGenError("XdpGen.run ends its test run with a signal: call "
                                          "it from the main thread")
                    signal.pthread_kill(t.ident, STOP_SIGNAL)
                    t.join(0.05)
            if t.is_alive():
                raise XdpGenError(f"the generator thread did not finish within "
                                  f"{deadline + 5:.0f} s")
        finally:
            if main:
                signal.signal(STOP_SIGNAL, old)
        if isinstance(out[0], BaseException):
            raise out[0]
        return out[0]  # type: ignore[return-value]

    def _quota(self, cpu: int) -> int:
        raw = self._state.lookup(b"\0\0\0\0")
        stride = (_STATE.size + 7) // 8 * 8
        return _STATE.unpack_from(raw, stride * cpu)[5] if raw else 0

    def close(self) -> None:
        self.obj.close()

    def __enter__(self) -> XdpGen:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class XdpSink:
    """Counts and drops UDP to `ports` (inclusive) at `dev` in `ns` (native XDP)."""

    def __init__(self, ns: str, dev: str, ports: Tuple[int, int]) -> None:
        self.ns, self.dev, self.ports = ns, dev, ports
        self.obj: Optional[BpfObject] = None
        self.ifindex = 0

    def __enter__(self) -> XdpSink:
        self.obj = BpfObject(build.object_path(SINK_SOURCE))
        try:
            self.ncpus = num_cpus()
            ports = BpfMap(self.obj.map_fd("sink_ports"), 4, 4)
            ports.update(struct.pack("<I", 0), struct.pack("<I", self.ports[0]))
            ports.update(struct.pack("<I", 1), struct.pack("<I", self.ports[1]))
            self._counts = BpfMap(self.obj.map_fd("sink_counts"), 4, 8, self.ncpus)
            fd = self.obj.prog_fd("lrk_sink")

            def attach() -> int:
                ifindex = if_nametoindex(self.dev)
                xdp_attach(ifindex, fd, XDP_FLAGS_DRV_MODE)
                return ifindex
            self.ifindex = in_netns(self.ns, attach)
        except BaseException:
            self.obj.close()
            self.obj = None
            raise
        return self

    def _read(self, key: int) -> int:
        raw = self._counts.lookup(struct.pack("<I", key)) or bytes(8 * self.ncpus)
        return _sum_u64(raw, self.ncpus)

    def packets(self) -> int:
        return self._read(0)

    def bytes(self) -> int:
        return self._read(1)

    def attached(self) -> bool:
        ifindex = self.ifindex
        return bool(ifindex) and in_netns(self.ns, lambda: xdp_query_id(ifindex,
                                                                        XDP_FLAGS_DRV_MODE)) != 0

    def __exit__(self, *exc: object) -> None:
        try:
            if self.ifindex:
                ifindex = self.ifindex
                try:
                    in_netns(self.ns, lambda: xdp_detach(ifindex, XDP_FLAGS_DRV_MODE))
                except (XdpError, NetnsError):
                    pass  # the namespace (and the veth with it) may be gone already
                self.ifindex = 0
        finally:
            if self.obj is not None:
                self.obj.close()
                self.obj = None


def thread_cpu_ns(pid: int) -> int:
    """Run time of one thread so far (schedstat, ns): where the steered work ran."""
    with open(f"/proc/{pid}/schedstat") as fh:
        return int(fh.read().split()[0])



def xmit_errors(ns: str, dev: str) -> int:
    """XDP frames `dev` could not hand to its veth peer (the peer's ring was full): where a
    receiver that cannot keep up loses frames sent by `XdpGen`."""
    out = run("ethtool", "-S", dev, ns=ns).stdout
    total = 0
    for line in out.splitlines():
        name, _, value = line.strip().partition(":")
        if name.endswith("_xdp_xmit_errors"):
            total += int(value)
    return total
