"""Daemon side of socket and packet modes: binds relay ports, feeds worker processes.

The engine asks `probe(ip, port)` while allocating; the bound sockets wait here
until the `Install` action ships them (SCM_RIGHTS) to the session's worker, and
the daemon closes its copies. Workers report counters back over the same channel
(`fastpath.channel`); they reach the engine as `SessionReport` events. A worker that
dies is restarted and its sessions re-installed from the specs kept here; a session
that cannot be re-installed is reported as a `PlaneFailure`, as is an install whose
ports cannot be bound.
"""

from __future__ import annotations

import _socket
import asyncio
import errno
import itertools
import logging
import operator
import os
import resource
import signal
import socket
import subprocess
import sys
import time
from collections import Counter, deque
from typing import Any, Callable, Deque, Dict, List, Optional, Sequence, Set, Tuple

from fastpath import channel, jit
from fastpath.contract import (
    Action,
    EventSink,
    Install,
    LegReport,
    PlaneFailure,
    Remove,
    SessionReport,
    SessionSpec,
    StreamReport,
    StreamSpec,
    Update,
    unit_id,
    unit_of,
)
from fastpath.worker.xsk import MAX_QUEUES, RING_DEFAULT
from lrk.errors import ConfigError, DescriptorsExhausted

log = logging.getLogger("lrk.plane")


#: a bound socket's fd as a plain int, mapped in C over a request's sockets
_FILENO = operator.methodcaller("fileno")


def _family(ip: str) -> int:
    return socket.AF_INET6 if ":" in ip else socket.AF_INET


SO_RCVBUFFORCE = getattr(socket, "SO_RCVBUFFORCE", 33)
_NONBLOCK = getattr(socket, "SOCK_NONBLOCK", 0)
_DGRAM_NONBLOCK = int(socket.SOCK_DGRAM) | _NONBLOCK


def set_rcvbuf(sock: socket.socket, size: int) -> None:
    """A deep receive queue rides out GC pauses and bursts (the default holds ~2.6 ms of
    100k pkt/s). FORCE passes rmem_max where we are privileged; otherwise the kernel caps."""
    if size <= 0:
        return
    try:
        sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, size)
    except OSError:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, size)


#: socket() failing with these means the relay, not the port, is out of something
_NO_DESCRIPTORS = (errno.EMFILE, errno.ENFILE)
#: file descriptors a worker keeps for itself (channel, epoll, taps, AF_XDP sockets,
#: egress and netlink sockets, files): its media sockets get the rest of its limit
FD_RESERVE = 256
#: how many media sockets more than the lightest worker's a worker may hold and still get
#: the next new session of a burst it already has messages for (16 calls' sockets)
PLACE_SLACK = 64
#: what every descriptor refusal tells the operator to do
_RAISE_LIMIT = "raise LimitNOFILE in the unit (or ulimit -n) to 4 x calls + 1,000"


def raise_fd_limit() -> int:
    """The soft RLIMIT_NOFILE raised to the hard one (the workers inherit it), as any
    program that never calls select() may; returns the soft limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (OSError, ValueError):
            pass
    return soft


def no_descriptors(what: str, budget: int) -> DescriptorsExhausted:
    """The error a call gets when a worker's media sockets would exceed its limit."""
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    return DescriptorsExhausted(
        f"no file descriptor left for {what}: a worker may hold {budget} media sockets "
        f"(RLIMIT_NOFILE {soft} less {soft - budget} of its own), four a call; "
        + _RAISE_LIMIT)


def bind_pair(ip: str, port: int, rcvbuf: int = 0
              ) -> Optional[Tuple[socket.socket, socket.socket]]:
    """RTP and RTCP sockets on (ip, port) and (ip, port + 1); None if either is taken.
    DescriptorsExhausted when the process or system has no file descriptor left: every
    port would fail alike, so none of them may be judged taken.

    They are the C-level `_socket.socket`s (what `socket.socket` wraps): the daemon only
    binds them, passes their fds to a worker and closes them, and the Python wrapper's
    constructor cost more than the bind (four sockets per call)."""
    socks: List[socket.socket] = []
    try:
        for p in (port, port + 1):
            # non-blocking from birth: no FIONBIO ioctl per port (the control plane's cost
            # is mostly these few syscalls per port)
            s = _socket.socket(_family(ip), _DGRAM_NONBLOCK)
            socks.append(s)
            s.bind((ip, p))
            if p == port:  # RTCP (a few packets per second) keeps the kernel's default
                set_rcvbuf(s, rcvbuf)
    except OSError as exc:
        for s in socks:
            s.close()
        if exc.errno in _NO_DESCRIPTORS:
            soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
            raise DescriptorsExhausted(
                f"no file descriptor left for {ip}:{port}-{port + 1} ({exc.strerror}; "
                f"the daemon may open {soft}): " + _RAISE_LIMIT) from None
        return None
    return socks[0], socks[1]


def _ports(stream: StreamSpec) -> tuple:
    _index, a, b = stream  # unpacked: each NamedTuple field by name is a generic lookup
    return (a[1], a[2], b[1], b[2])  # LegSpec relay_ip, relay_port


def _add_leg(base: LegReport, new: LegReport) -> LegReport:
    drops = dict(base.drops)
    for reason, n in new.drops:
        drops[reason] = drops.get(reason, 0) + n
    return LegReport(base.in_packets + new.in_packets, base.in_bytes + new.in_bytes,
                     base.out_packets + new.out_packets, base.out_bytes + new.out_bytes,
                     tuple(drops.items()), new.generation, new.latched, new.rtcp_latched)


def add_reports(base: channel.UnitReport, new: channel.UnitReport) -> channel.UnitReport:
    """`new` (counted since a worker's re-install) on top of what the dead worker counted."""
    last_rx = new.last_rx if new.last_rx is not None else base.last_rx
    return channel.UnitReport(new.uid, last_rx, _add_leg(base.a, new.a),
                              _add_leg(base.b, new.b))


def _ignore_stop_signals() -> None:
    """In the forked child, before exec: a worker ignores SIGINT/SIGTERM from its first
    instruction (an ignored disposition survives exec), so a signal to the whole process
    group while it starts cannot kill it; the daemon stops it, or it exits on EOF."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


#: packet mode over AF_XDP: the steering programs' verdicts as counters
STEER_COUNTERS = {
    "steered": "media.xsk.steered", "pass_no_socket": "media.xsk.pass_no_socket",
    "pass_address": "media.xsk.pass_address", "pass_port": "media.xsk.pass_port",
    "pass_fragment": "media.xsk.pass_fragment", "pass_other": "media.xsk.pass_other",
}


class _FdCopy:
    """A duplicate of a non-socket fd (a BPF map) to pass to a worker: what the outbox
    needs (fileno, close) and nothing else."""

    def __init__(self, fd: int) -> None:
        self.fd = os.dup(fd)

    def fileno(self) -> int:
        return self.fd

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


#: messages that change what media sockets a worker holds
_FD_MESSAGES = (channel.InstallSession, channel.InstallFork, channel.RemoveSession,
                channel.PromoteFork)


class WorkerHandle:
    """One worker process and the daemon's end of its channel."""

    def __init__(self, index: int, plane: SocketPlane) -> None:
        self.index = index
        self.plane = plane
        self.proc: Optional[subprocess.Popen] = None
        self.chan: Optional[socket.socket] = None
        self.outbox: Deque[Tuple[object, List[socket.socket]]] = deque()
        self.totals: Dict[str, int] = {}
        self.restarts = 0
        self._scheduled = False  # a flush of the outbox is due in this loop iteration
        #: media sockets sent to this worker process and not removed since, per unit:
        #: what its file descriptor limit must hold (SocketPlane.fd_budget)
        self.media_fds = 0
        self._fds_of: Dict[int, int] = {}

    def start(self) -> None:
        self.media_fds = 0  # a new process: its predecessor's sockets died with it
        self._fds_of = {}
        mine, theirs = channel.pair()
        cmd = [sys.executable, "-m", "fastpath.worker.loop", "--channel-fd",
               str(theirs.fileno()), "--batch", str(self.plane.batch), "--io", self.plane.io,
               "--log-level", self.plane.log_level, "--log-format", self.plane.log_format,
               "--coalesce-us", str(self.plane.coalesce_us),
               "--relearn-after", repr(self.plane.relearn_after),
               "--pypy-jit", self.plane.pypy_jit,
               "--xsk-checksum", self.plane.af_xdp_checksum,
               "--xsk-ring", str(self.plane.af_xdp_ring)]
        try:
            self.proc = subprocess.Popen(cmd, pass_fds=(theirs.fileno(),), close_fds=True,
                                         preexec_fn=_ignore_stop_signals,
                                         env=jit.with_gc_nursery(os.environ))
        except BaseException:
            mine.close()  # no process to talk to: the daemon's end goes too
            raise
        finally:
            theirs.close()
        try:
            mine.setblocking(False)
            self.chan = mine
            loop = self.plane.loop
            loop.add_reader(mine.fileno(), self._readable)
            taps = self.plane.open_taps()
            if taps:
                self.send(channel.Taps(), taps)
            queues = self.plane.xsk_queues()
            if queues is not None:
                self.send(*queues)
        except BaseException:
            # e.g. a packet interface that cannot be opened: the worker goes (it would
            # serve without its taps, and the caller does not keep a handle that failed)
            if self.chan is None:
                mine.close()
            self.close()
            self.drop_outbox()
            proc, self.proc = self.proc, None
            if proc is not None:
                proc.kill()
                proc.wait()
            raise

    def send(self, message: object, socks: Sequence[socket.socket] = ()) -> None:
        """Queue a message; everything queued in one loop iteration leaves as one batch."""
        if isinstance(message, _FD_MESSAGES):
            self._account(message, len(socks))
        self.outbox.append((message, list(socks)))
        if not self._scheduled:
            self._scheduled = True
            self.plane.loop.call_soon(self._flush_outbox)

    def has_room(self, uid: int, nfds: int) -> bool:
        """Whether `nfds` sockets for unit `uid` (replacing what it holds) fit the limit."""
        return (self.media_fds - self._fds_of.get(uid, 0) + nfds
                <= self.plane.fd_budget)

    def _account(self, message: object, nfds: int) -> None:
        """Media sockets the worker holds after `message`: an install (again: it replaces
        the unit's) adds its own, a remove takes the unit's away, a promoted fork's two
        replace the main unit's two (the worker closes those)."""
        fds_of = self._fds_of
        if isinstance(message, (channel.InstallSession, channel.InstallFork)):
            self.media_fds += nfds - fds_of.get(message.uid, 0)
            fds_of[message.uid] = nfds
        elif isinstance(message, channel.RemoveSession):
            self.media_fds -= fds_of.pop(message.uid, 0)
        elif isinstance(message, channel.PromoteFork):
            self.media_fds -= fds_of.pop(message.fork_uid, 0)

    def _next_batch(self) -> Tuple[object, List[socket.socket], int]:
        """The head of the outbox, packed: (message, sockets, messages taken)."""
        first, socks = self.outbox[0]
        taken, nfds = 1, len(socks)
        for _message, more in itertools.islice(self.outbox, 1, channel.MAX_BATCH):
            if nfds + len(more) > channel.MAX_FDS:
                break
            taken += 1
            nfds += len(more)
        if taken == 1:
            return first, socks, 1
        msgs, counts, all_socks = [], [], []
        for message, more in itertools.islice(self.outbox, 0, taken):
            msgs.append(message)
            counts.append(len(more))
            all_socks.extend(more)
        return channel.Batch(tuple(msgs), tuple(counts)), all_socks, taken

    def _flush_outbox(self) -> None:
        self._scheduled = False
        chan = self.chan
        while self.outbox and chan is not None:
            message, socks, taken = self._next_batch()
            try:
                channel.send(chan, message, list(map(_FILENO, socks)))
            except BlockingIOError:  # the worker is behind: replies wait (see commit)
                self.plane.counters["workers.channel.full"] += 1
                self.plane.loop.add_writer(chan.fileno(), self._writable)
                return
            except OSError:
                return  # worker gone; _readable sees EOF and restarts
            for _ in range(taken):
                self.outbox.popleft()
            for s in socks:
                s.close()  # the worker holds its own copy now
        self.plane.committed()

    def _writable(self) -> None:
        if self.chan is not None:
            self.plane.loop.remove_writer(self.chan.fileno())
        self._flush_outbox()

    def _readable(self) -> None:
        chan = self.chan
        if chan is None:
            return
        while True:
            try:
                got = channel.receive(chan, socket.MSG_DONTWAIT)
            except BlockingIOError:
                return
            except (ValueError, TypeError, EOFError, channel.FdsTruncated) as exc:
                log.error("worker %d sent an undecodable message: %s", self.index, exc)
                self.plane.counters["workers.channel.bad_messages"] += 1
                continue
            except OSError:
                got = None
            if got is None:
                self._died()
                return
            message, fds = got
            for fd in fds:
                os.close(fd)
            self.plane.on_message(self, message)

    def _died(self) -> None:
        self.close()
        if self.plane.stopping:
            return
        code = None
        if self.proc is not None:
            # reap it first: only then has the kernel closed its media sockets, so their
            # ports can be bound again for the re-install
            try:
                code = self.proc.wait(5.0)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                code = self.proc.wait()
        log.error("worker %d exited (code %s); restarting and re-installing its sessions",
                  self.index, code)
        self.totals = {}  # a dead worker's last report says nothing of its successor
        self.restarts += 1
        self.plane.counters["workers.restarts"] += 1
        self.drop_outbox()
        try:
            self.start()
        except OSError as exc:
            log.error("worker %d could not be restarted: %s", self.index, exc)
            self.plane.lost(self, f"worker {self.index} could not be restarted: {exc}")
            return
        self.plane.reinstall(self)

    def drop_outbox(self) -> None:
        """Forget the messages not sent; their sockets (never handed over: a full or dead
        channel) are ours to close."""
        for _message, socks in self.outbox:
            for s in socks:
                s.close()
        self.outbox.clear()

    def close(self) -> None:
        if self.chan is not None:
            loop = self.plane.loop
            loop.remove_reader(self.chan.fileno())
            loop.remove_writer(self.chan.fileno())
            self.chan.close()
            self.chan = None


class SocketPlane:
    """Applies engine actions to worker processes in socket and packet modes."""

    def __init__(self, port_start: int, port_end: int, relay_ips: Sequence[str],
                 workers: int = 1, batch: int = 64, io: str = "auto",
                 log_level: str = "warning", log_format: str = "kv", rcvbuf: int = 0,
                 packet_ifaces: Sequence[str] = (), coalesce_us: int = 0,
                 relearn_after: float = 3.0,
                 flush_timeout: float = 1.0,
                 standby_media: Sequence[Tuple[str, int, int]] = (),
                 pypy_jit: str = "pypy", packet_io: str = "tap",
                 af_xdp_checksum: str = "offload", af_xdp_ring: int = RING_DEFAULT) -> None:
        self.port_start = port_start
        self.port_end = port_end
        self.relay_ips = sorted(set(relay_ips))
        self.packet_ifaces = list(packet_ifaces)
        #: packet mode's I/O: "tap" or "af_xdp" (then one steering program per interface)
        self.packet_io = packet_io
        self.af_xdp_checksum = af_xdp_checksum
        self.af_xdp_ring = af_xdp_ring
        self.steering: Dict[str, Any] = {}
        #: packet mode: peers' (address, first, last port) the taps read too (takeover)
        self.standby_media = list(standby_media)
        self.nft: Any = None
        self.rcvbuf = rcvbuf
        self.coalesce_us = coalesce_us
        self.relearn_after = relearn_after
        self.pypy_jit = pypy_jit  # the workers' JIT thresholds (fastpath.jit)
        self.log_level = log_level
        self.log_format = log_format
        self.nworkers = max(1, workers)
        self.batch = batch
        self.io = io
        self.flush_timeout = flush_timeout
        self.sink: EventSink = lambda event: None
        self.loop: asyncio.AbstractEventLoop = None  # type: ignore[assignment]
        self.workers: List[WorkerHandle] = []
        self.pending: Dict[Tuple[str, int], Tuple[socket.socket, socket.socket]] = {}
        #: each live session as last applied; its streams are the worker's units
        self.installed: Dict[int, SessionSpec] = {}
        #: the worker (index) of each session installed and not yet removed (`_place`)
        self.placed: Dict[int, int] = {}
        self._last_placed = 0
        #: per unit (one stream of one session), what a worker that died had counted
        #: (added to later reports), and the last report (a session's report is built
        #: from all of its units')
        self.base: Dict[int, channel.UnitReport] = {}
        self.last: Dict[int, channel.UnitReport] = {}
        self.counters: Counter = Counter({name: 0 for name in (
            "workers.restarts", "workers.channel.full", "workers.channel.bad_messages",
            "plane.bind_failures", "plane.no_descriptors", "plane.flush_timeouts",
            "plane.no_worker")})
        #: descriptors a worker keeps for itself: FD_RESERVE, and an AF_XDP socket per
        #: receive queue (up to 64) of each packet interface
        self.fd_reserve = FD_RESERVE + (MAX_QUEUES * len(self.packet_ifaces)
                                        if packet_io == "af_xdp" else 0)
        #: media sockets one worker may hold: its file descriptor limit less that
        #: (start() raises the soft limit to the hard one first)
        self.fd_budget = max(0, resource.getrlimit(resource.RLIMIT_NOFILE)[0]
                             - self.fd_reserve)
        #: sockets the configured ports could take (one a port; the relay sets it): what
        #: start() warns the limit cannot hold
        self.sockets_needed = 0
        self.stopping = False
        self._flush_seq = 0
        self._flush_waiters: Dict[int, list] = {}  # req -> [callbacks, workers left, timer]
        self._gathered: List[Callable[[], None]] = []  # refresh callbacks not yet sent
        self._commit_waiters: List[Callable[[], None]] = []
        self.units: Set[int] = set()  # unit ids the workers serve
        #: early dialogs of forked INVITEs, per session: (ForkSpec.key, stream index) ->
        #: [the worker's unit id for it (negative: never a contract unit id), the stream
        #: as installed]; and unit id -> session id, for its reports
        self.forks: Dict[int, Dict[Tuple[int, int], list]] = {}
        self.fork_of: Dict[int, int] = {}
        self._next_fork_uid = -1

    # -- lifecycle -------------------------------------------------------------------
    async def start(self) -> None:
        self.loop = asyncio.get_running_loop()
        soft = raise_fd_limit()
        self.fd_budget = max(0, soft - self.fd_reserve)
        ports = self.sockets_needed
        if self.fd_budget * self.nworkers < ports:
            log.warning("RLIMIT_NOFILE %d lets the workers hold %d media sockets (about %d "
                        "calls), fewer than the %d ports configured: raise LimitNOFILE (or "
                        "ulimit -n) to use them all", soft, self.fd_budget * self.nworkers,
                        self.fd_budget * self.nworkers // 4, ports)
        if self.packet_ifaces and self.packet_io == "af_xdp":
            self._open_steering()
        for i in range(self.nworkers):
            handle = WorkerHandle(i, self)
            handle.start()
            self.workers.append(handle)
        if self.packet_ifaces and self.packet_io == "tap":
            # packet mode: the taps (open and queueing already) read the media; only now may
            # the kernel stop handling it
            from fastpath.kernel.nft import Nft
            from fastpath.kernel.taps import DEFAULT_TABLE, drop_rules

            self.nft = Nft()
            self.nft.run(drop_rules(DEFAULT_TABLE, self.port_start, self.port_end,
                                    self.relay_ips, ifnames=self.packet_ifaces,
                                    extra=self.standby_media))

    def _open_steering(self) -> None:
        """Packet mode over AF_XDP: the steering program on every packet interface, and
        an AF_XDP socket made and closed on each, so that what this kernel or driver
        cannot do stops the daemon here with a clear error instead of in the worker.
        Until the worker registers its sockets the program passes media to the kernel
        (the relay's UDP sockets)."""
        from fastpath.worker.nexthop import rx_queues
        from fastpath.worker.xsk import XskSocket, ring_per_queue
        from fastpath.xdp.libbpf import if_nametoindex
        from fastpath.xdp.steer import SteerProgram

        ranges = [(ip, self.port_start, self.port_end) for ip in self.relay_ips]
        ranges += [tuple(r) for r in self.standby_media]
        seen: Dict[str, Tuple[int, int]] = {}
        for ip, lo, hi in ranges:
            if seen.setdefault(ip, (lo, hi)) != (lo, hi):
                raise ConfigError(
                    f"packet_io = \"af_xdp\" steers one port range per address, and {ip} has "
                    f"two ({seen[ip][0]}-{seen[ip][1]} and {lo}-{hi}: standby_media): give "
                    "the peer its own address, or use packet_io = \"tap\"")
        probes: List[Any] = []
        try:
            for ifname in self.packet_ifaces:
                prog = SteerProgram.load()
                self.steering[ifname] = prog
                prog.configure(ranges)
                how = prog.attach(ifname)
                # every socket the worker will open, all at once, then closed: a pinned-
                # memory limit too low for them all stops us here, by name
                ifindex = if_nametoindex(ifname)
                queues = min(rx_queues(ifindex), MAX_QUEUES)
                ring = ring_per_queue(self.af_xdp_ring, queues)
                for queue in range(queues):
                    probes.append(XskSocket(ifindex, queue, frames=2 * ring, ring=ring))
                log.info("packet mode: AF_XDP on %s (%s XDP, copy mode, %d queue(s) of %d "
                         "slots)", ifname, how, queues, ring)
        except BaseException:
            self._close_steering()
            raise
        finally:
            for xsk in probes:
                xsk.close()

    def _close_steering(self) -> None:
        for prog in self.steering.values():
            prog.close()
        self.steering.clear()

    def xsk_queues(self) -> Optional[Tuple[object, List[Any]]]:
        """Packet mode over AF_XDP: the message that gives a worker its interfaces and a
        copy of each steering program's socket map fd; None otherwise."""
        if not self.steering:
            return None
        names = tuple(self.steering)
        return (channel.XskQueues(names),
                [_FdCopy(self.steering[n].xsks.fd) for n in names])

    def open_taps(self) -> List[socket.socket]:
        """Packet mode: AF_PACKET sockets for a worker, opened here so that they queue
        media from this moment on, whenever the worker gets to read them."""
        if not self.packet_ifaces or self.packet_io != "tap":
            return []
        from fastpath.kernel.taps import open_packet_socket

        return [open_packet_socket(ifname, self.port_start, self.port_end,
                                   extra=self.standby_media)
                for ifname in self.packet_ifaces]

    async def stop(self) -> None:
        """The packet-mode drop table, the workers, the steering programs and the sockets
        not yet handed over: each step runs whatever the steps before it did; the first
        error is raised once all ran (later ones are logged)."""
        self.stopping = True
        errors: List[BaseException] = []
        nft, self.nft = self.nft, None
        if nft is not None:
            try:
                from fastpath.kernel.taps import DEFAULT_TABLE, destroy_rules

                nft.run(destroy_rules(DEFAULT_TABLE))
            except Exception as exc:
                log.error("packet mode: could not delete its drop table: %s", exc)
                errors.append(exc)
            try:
                nft.close()
            except Exception as exc:
                errors.append(exc)
        for w in self.workers:
            try:
                if w.chan is not None:
                    w.send(channel.Stop())
                    w._flush_outbox()
            except Exception as exc:
                errors.append(exc)
        deadline = time.monotonic() + 1.0
        for w in self.workers:
            proc = w.proc
            try:
                while proc is not None and proc.poll() is None \
                        and time.monotonic() < deadline:
                    await asyncio.sleep(0.02)  # bounded wait for a clean exit
            except BaseException as exc:  # cancelled: every worker is killed all the same
                errors.append(exc)
                deadline = 0.0
            try:
                if proc is not None and proc.poll() is None:
                    proc.kill()
                    proc.wait()
                w.close()
            except Exception as exc:
                errors.append(exc)
            w.drop_outbox()
        # after the workers: media never met a half-torn plane
        steering = list(self.steering.values())
        self.steering.clear()
        for prog in steering:
            try:
                prog.close()
            except Exception as exc:
                errors.append(exc)
        self._close_unclaimed()
        self.installed.clear()
        self.placed.clear()
        self._run(self._commit_waiters)
        self._commit_waiters = []
        for later in errors[1:]:
            log.error("socket plane stop: a further step failed too", exc_info=later)
        if errors:
            raise errors[0]

    # -- engine hooks ----------------------------------------------------------------
    def probe(self, ip: str, port: int) -> bool:
        if (ip, port) in self.pending:
            # bound for a request of this read burst that then failed (its ports went back
            # to the allocator; commit() releases the pair only at the burst's end): ours
            return True
        # room in the lightest live worker (where `_place` puts a new session unless
        # another has room too), less the pairs bound for this request already: a worker
        # beyond its limit would lose the fds in transit
        live = [w.media_fds for w in self.workers if w.chan is not None]
        held = min(live) if live else max((w.media_fds for w in self.workers), default=0)
        if held + 2 * len(self.pending) + 2 > self.fd_budget:
            self.counters["plane.no_descriptors"] += 1
            raise no_descriptors(f"{ip}:{port}-{port + 1}", self.fd_budget)
        try:
            bound = bind_pair(ip, port, self.rcvbuf)
        except DescriptorsExhausted:
            self.counters["plane.no_descriptors"] += 1
            raise  # the allocator keeps the port; the request fails with the reason
        if bound is None:
            return False
        self.pending[(ip, port)] = bound
        return True

    def worker_for(self, sid: int) -> WorkerHandle:
        """Every stream of a session goes to the same worker: the one it was placed on."""
        return self.workers[self.placed[sid]]

    def _place(self, sid: int, need: int) -> bool:
        """A new session's worker: the one holding the fewest media sockets, unless the
        worker this burst of requests already has messages queued for holds at most
        PLACE_SLACK more and has room for the session's `need` sockets. Then a burst's
        installs leave as one batch to one worker, one wake-up where a session per worker
        in turn woke every worker for each (21 workers at 100,000 calls spent 158 µs of
        CPU a call, docs/benchmarks.md section 11); one request at a time still goes to
        the lightest worker. False when no worker is running."""
        workers = self.workers
        # a worker that could not be restarted (no channel) gets nothing new
        live = [i for i in range(len(workers)) if workers[i].chan is not None]
        if not live:
            return False
        lightest = min(live, key=lambda i: workers[i].media_fds)
        last = self._last_placed
        if (last != lightest and last in live and workers[last].outbox
                and workers[last].media_fds <= workers[lightest].media_fds + PLACE_SLACK
                and workers[last].media_fds + need <= self.fd_budget):
            lightest = last
        self.placed[sid] = self._last_placed = lightest
        return True

    def apply(self, actions: Sequence[Action]) -> List[PlaneFailure]:
        failures: List[PlaneFailure] = []
        for action in actions:
            if isinstance(action, (Install, Update)):
                failure = self._converge(action[0])  # .spec
                if failure is not None:
                    failures.append(failure)
            elif isinstance(action, Remove):
                sid = action[0]  # .sid (fields by index: see _converge_streams)
                old = self.installed.pop(sid, None)
                if old is not None:
                    if sid in self.forks:
                        self._remove_forks(sid, keep=())
                    for stream in old[2]:  # .streams
                        self._remove_unit(sid, stream[0])  # .index
                    del self.placed[sid]
        self._close_unclaimed()
        return failures

    def _close_unclaimed(self) -> None:
        """Ports bound by a probe whose request then failed (e.g. the second pair ran out)."""
        for pair_ in self.pending.values():
            for s in pair_:
                s.close()
        self.pending.clear()

    def _converge(self, spec: SessionSpec) -> Optional[PlaneFailure]:
        """Make the worker serve `spec`: streams added, removed, moved to other relay ports
        (re-installed: counters restart there, the engine folded them) or re-latched."""
        sid, _call_id, streams, forks = spec
        old = self.installed.get(sid)
        if sid not in self.placed:  # a restarted worker's sessions stay on it
            need = 4 * (len(streams) + sum(len(f.streams) for f in forks))
            if not self._place(sid, need):
                self.counters["plane.no_worker"] += 1
                return PlaneFailure(sid, "worker_lost",
                                    "no media worker is running (every worker died and "
                                    "could not be restarted; see the log): restart the relay")
        self.installed[sid] = spec
        if not forks and sid not in self.forks:
            return self._converge_streams(spec, old)
        old_streams = {s.index: s for s in old.streams} if old is not None else {}
        new_forks = {(f.key, s.index): s for f in spec.forks for s in f.streams}
        promoted = self._promotions(sid, old_streams, spec)
        self._remove_forks(sid, keep=set(new_forks) | set(promoted.values()))
        for index in old_streams:
            if spec.stream(index) is None:
                self._remove_forks(sid, keep=set(new_forks), index=index)
                self._remove_unit(sid, index)
        for stream in spec.streams:
            before = old_streams.get(stream.index)
            fork = promoted.get(stream.index)
            if fork is not None:  # the early dialog that won: its sockets become the unit's
                uid = unit_id(sid, stream.index)
                fork_uid = self._drop_fork(sid, fork)
                worker = self.worker_for(sid)
                worker.send(channel.PromoteFork(uid, fork_uid))
                worker.send(channel.UpdateSession(uid, stream))
                continue
            failure = self._converge_stream(spec, stream, before, with_forks=True)
            if failure is not None:
                return failure
        mine = self.forks.get(sid, {})
        for key, stream in new_forks.items():
            entry = mine.get(key)
            if entry is None:
                failure = self._install_fork(sid, key, stream)
                if failure is not None:  # that early dialog has no media; the call goes on
                    log.error("session %d: %s", sid, failure.detail)
            elif entry[1] != stream:
                entry[1] = stream
                self.worker_for(sid).send(channel.UpdateSession(entry[0], stream))
        return None

    def _converge_streams(self, spec: SessionSpec, old: Optional[SessionSpec]
                          ) -> Optional[PlaneFailure]:
        """`_converge` of a session without early dialogs, before or now (nearly every
        request): the same steps with no fork bookkeeping. Fields by index (s[0]:
        StreamSpec.index): CPython 3.11 looks NamedTuple fields up by name generically."""
        sid, _call_id, streams, _forks = spec
        old_streams: Dict[int, StreamSpec] = {}
        if old is not None:  # plain loops: no comprehension objects per request
            for s in old[2]:  # .streams
                old_streams[s[0]] = s
            same = len(old_streams) == len(streams)
            if same:
                for s in streams:
                    if s[0] not in old_streams:
                        same = False
                        break
            if not same:
                wanted = {s.index for s in streams}
                for index in old_streams:
                    if index not in wanted:
                        self._remove_unit(sid, index)
        for stream in streams:
            failure = self._converge_stream(spec, stream, old_streams.get(stream[0]),
                                            with_forks=False)
            if failure is not None:
                return failure
        return None

    def _converge_stream(self, spec: SessionSpec, stream: StreamSpec,
                         before: Optional[StreamSpec], with_forks: bool
                         ) -> Optional[PlaneFailure]:
        """One stream of a converge: moved to other relay ports (re-installed), new
        (installed), or changed in place (updated). A failed install takes the whole
        session out of the worker (and its early dialogs, `with_forks`)."""
        sid = spec[0]  # .sid
        if before is not None and _ports(before) != _ports(stream):
            if with_forks:
                self._remove_forks(sid, keep=(), index=stream.index)
            self._remove_unit(sid, stream.index)
            before = None
        if before is None:
            failure = self._install_unit(spec, stream)
            if failure is not None:
                if with_forks:
                    self._remove_forks(sid, keep=())
                for other in spec.streams:
                    self._remove_unit(sid, other.index)
                del self.installed[sid]
                del self.placed[sid]
            return failure
        if before != stream:
            self.worker_for(sid).send(
                channel.UpdateSession(unit_id(sid, stream.index), stream))
        return None

    def _promotions(self, sid: int, old_streams: Dict[int, StreamSpec], spec: SessionSpec
                    ) -> Dict[int, Tuple[int, int]]:
        """Streams whose leg A moved onto an installed fork's A ports (its dialog won the
        final answer): stream index -> (fork key, index)."""
        promoted: Dict[int, Tuple[int, int]] = {}
        mine = self.forks.get(sid)
        if not mine:
            return promoted
        for stream in spec.streams:
            before = old_streams.get(stream.index)
            if before is None or before.a.relay_port == stream.a.relay_port:
                continue
            for (key, index), (_uid, fork) in mine.items():
                if index == stream.index and (fork.a.relay_ip, fork.a.relay_port,
                                              fork.b.relay_port) == (
                        stream.a.relay_ip, stream.a.relay_port, stream.b.relay_port):
                    promoted[stream.index] = (key, index)
        return promoted

    def _install_fork(self, sid: int, key: Tuple[int, int], stream: StreamSpec
                      ) -> Optional[PlaneFailure]:
        """Another early dialog: two sockets of its own on the A side."""
        main_uid = unit_id(sid, stream.index)
        if main_uid not in self.units:
            return None  # its stream is not relayed (yet): nothing to share
        leg = stream.a
        pair_ = self.pending.pop((leg.relay_ip, leg.relay_port), None)
        why = ""
        if pair_ is None:
            pair_, why = self._bind(leg.relay_ip, leg.relay_port)
        if pair_ is None:
            self.counters["plane.bind_failures"] += 1
            return PlaneFailure(sid, "bind_failed", why or f"early dialog: cannot bind "
                                f"{leg.relay_ip}:{leg.relay_port}-{leg.relay_port + 1}")
        if not self.worker_for(sid).has_room(0, 2):  # a new fork unit: nothing to replace
            return self._no_room(sid, f"an early dialog of session {sid}", pair_)
        uid = self._next_fork_uid
        self._next_fork_uid -= 1
        self.forks.setdefault(sid, {})[key] = [uid, stream]
        self.fork_of[uid] = sid
        addrs = ((leg.relay_ip, leg.relay_port), (leg.relay_ip, leg.relay_port + 1))
        self.worker_for(sid).send(
            channel.InstallFork(uid, main_uid, stream, addrs), pair_)
        return None

    def _drop_fork(self, sid: int, key: Tuple[int, int]) -> int:
        """Forget one fork unit of the session; returns its unit id."""
        mine = self.forks[sid]
        uid = mine.pop(key)[0]
        if not mine:
            del self.forks[sid]
        del self.fork_of[uid]
        self.last.pop(uid, None)
        return uid

    def _forget_forks(self, sid: int) -> None:
        """Drop what the plane knows of the session's fork units (their worker is gone)."""
        for key in list(self.forks.get(sid, ())):
            self._drop_fork(sid, key)

    def _remove_forks(self, sid: int, keep: Any, index: Optional[int] = None) -> None:
        """Remove the session's fork units not in `keep` ((key, index) pairs); only those
        of stream `index` when given."""
        for key in list(self.forks.get(sid, ())):
            if key in keep or (index is not None and key[1] != index):
                continue
            self.worker_for(sid).send(channel.RemoveSession(self._drop_fork(sid, key)))

    def _install_unit(self, spec: SessionSpec, stream: StreamSpec) -> Optional[PlaneFailure]:
        socks: List[socket.socket] = []
        index, a, b = stream
        for leg in (a, b):
            pair_ = self.pending.pop(leg[1:3], None)  # (relay_ip, relay_port)
            why = ""
            if pair_ is None:
                pair_, why = self._bind(leg.relay_ip, leg.relay_port)
            if pair_ is None:
                self.counters["plane.bind_failures"] += 1
                for s in socks:
                    s.close()
                return PlaneFailure(spec.sid, "bind_failed",
                                    why or f"cannot bind {leg.relay_ip}:{leg.relay_port}-"
                                    f"{leg.relay_port + 1} (in use by another process?)")
            socks.extend(pair_)
        sid = spec[0]
        uid = unit_id(sid, index)
        worker = self.worker_for(sid)
        if not worker.has_room(uid, len(socks)):  # restored, claimed
            return self._no_room(sid, f"session {sid}", socks)
        # what the worker would otherwise ask the kernel for, a system call per socket
        a_ip, a_port = a[1:3]
        b_ip, b_port = b[1:3]
        addrs = ((a_ip, a_port), (a_ip, a_port + 1), (b_ip, b_port), (b_ip, b_port + 1))
        self.units.add(uid)
        worker.send(channel.InstallSession(uid, stream, addrs), socks)
        return None

    def _no_room(self, sid: int, what: str, socks: Sequence[Any]) -> PlaneFailure:
        """Bound sockets the session's worker has no descriptors left for: closed, and
        the session fails with the reason (counted)."""
        self.counters["plane.no_descriptors"] += 1
        self.counters["plane.bind_failures"] += 1
        for s in socks:
            s.close()
        return PlaneFailure(sid, "bind_failed", str(no_descriptors(what, self.fd_budget)))

    def _bind(self, ip: str, port: int
              ) -> Tuple[Optional[Tuple[socket.socket, socket.socket]], str]:
        """A pair bound outside the allocator (a restarted worker's sessions, restored or
        claimed ports): the sockets, or None and why not when it is not "taken"."""
        try:
            return bind_pair(ip, port, self.rcvbuf), ""
        except DescriptorsExhausted as exc:
            self.counters["plane.no_descriptors"] += 1
            return None, str(exc)

    def _remove_unit(self, sid: int, index: int) -> None:
        uid = unit_id(sid, index)
        if uid in self.units:
            self.units.discard(uid)
            self.base.pop(uid, None)
            self.last.pop(uid, None)
            self.worker_for(sid).send(channel.RemoveSession(uid))

    def commit(self, then: Callable[[], None]) -> None:
        """Send every queued worker message now; `then` once all of it is in the channels
        (at once, unless a worker's channel is full: then when it has drained). Ports
        probed for a request and not installed by now belong to one that failed without
        actions (e.g. ports_exhausted on its second leg): they are let go here, where every
        reply passes, rather than at the next request that has actions."""
        if self.pending:
            self._close_unclaimed()
        if self._gathered:  # a refresh asked for in this iteration rides in this batch
            self._send_flush()
        waiting = False
        for w in self.workers:
            if w.outbox:
                w._flush_outbox()
                waiting = waiting or bool(w.outbox)
        if waiting:
            self._commit_waiters.append(then)
        else:
            then()

    def committed(self) -> None:
        """A worker's outbox drained: run the commits that waited for it."""
        if self._commit_waiters and not any(w.outbox for w in self.workers):
            waiters, self._commit_waiters = self._commit_waiters, []
            self._run(waiters)

    def reinstall(self, worker: WorkerHandle) -> None:
        """A restarted worker gets its sessions back; counters continue from the last
        report of the one that died."""
        failures: List[PlaneFailure] = []
        for sid, spec in list(self.installed.items()):
            if self.worker_for(sid) is not worker:
                continue
            for stream in spec.streams:
                uid = unit_id(sid, stream.index)
                last = self.last.get(uid)
                if last is not None:
                    self.base[uid] = last
                self.units.discard(uid)
            del self.installed[sid]
            self._forget_forks(sid)  # they died with the worker
            failure = self._converge(spec)
            if failure is not None:
                failures.append(failure)
        for failure in failures:
            self.sink(failure)

    def lost(self, worker: WorkerHandle, detail: str) -> None:
        """A worker is gone for good: every session it served fails."""
        for sid in [sid for sid in self.installed if self.worker_for(sid) is worker]:
            self._forget_forks(sid)
            for stream in self.installed.pop(sid).streams:
                self.units.discard(unit_id(sid, stream.index))
            del self.placed[sid]
            self.sink(PlaneFailure(sid, "worker_lost", detail))

    # -- reports ---------------------------------------------------------------------
    def on_message(self, worker: WorkerHandle, message: object) -> None:
        if isinstance(message, channel.Reports):
            base = self.base
            touched = set()
            for report in message.reports:
                fork_sid = self.fork_of.get(report.uid) if report.uid < 0 else None
                if fork_sid is not None:
                    self.last[report.uid] = report
                    touched.add(fork_sid)
                    continue
                if report.uid not in self.units:
                    continue  # a final report racing the Remove that caused it
                if base:
                    b = base.get(report.uid)
                    if b is not None:
                        report = add_reports(b, report)
                self.last[report.uid] = report
                touched.add(unit_of(report.uid)[0])
            for sid in touched:
                self.sink(self._session_report(sid))
            if message.totals is not None:
                worker.totals = message.totals
        elif isinstance(message, channel.Flushed):
            waiter = self._flush_waiters.get(message.req)
            if waiter is not None:
                waiter[1] -= 1
                if waiter[1] <= 0:
                    self._finish_flush(message.req)
        else:
            log.error("unexpected message from worker %d: %s", worker.index,
                      type(message).__name__)
            self.counters["workers.channel.bad_messages"] += 1

    def _session_report(self, sid: int) -> SessionReport:
        """A session's report from the last report of each of its units."""
        spec = self.installed[sid]
        streams = []
        last_rx = None
        for stream in spec.streams:
            unit = self.last.get(unit_id(sid, stream.index))
            if unit is None:
                continue
            streams.append(StreamReport(stream.index, unit.a, unit.b))
            if unit.last_rx is not None and (last_rx is None or unit.last_rx > last_rx):
                last_rx = unit.last_rx
        forks: List[Tuple[int, Tuple[StreamReport, ...]]] = []
        mine = self.forks.get(sid, {})
        for fork in spec.forks:
            reports = []
            for stream in fork.streams:
                entry = mine.get((fork.key, stream.index))
                unit = self.last.get(entry[0]) if entry is not None else None
                if unit is None:
                    continue
                reports.append(StreamReport(stream.index, unit.a, unit.b))
                if unit.last_rx is not None and (last_rx is None or unit.last_rx > last_rx):
                    last_rx = unit.last_rx  # early media keeps the call alive too
            if reports:
                forks.append((fork.key, tuple(reports)))
        return SessionReport(sid, last_rx, tuple(streams), tuple(forks))

    def refresh(self, then: Callable[[], None]) -> None:
        """Call `then` once every worker has reported its current counters (or after
        `flush_timeout`, counted, counters then possibly lagging). Plain callbacks: no
        task per request; the requests of one loop iteration share one round trip."""
        for w in self.workers:
            if w.chan is not None:
                break
        else:
            then()
            return
        self._gathered.append(then)
        if len(self._gathered) == 1:
            self.loop.call_soon(self._send_flush)

    def _send_flush(self) -> None:
        callbacks, self._gathered = self._gathered, []
        if not callbacks:  # a commit sent it already
            return
        live = [w for w in self.workers if w.chan is not None]
        if not live:
            self._run(callbacks)
            return
        self._flush_seq += 1
        req = self._flush_seq
        timer = self.loop.call_later(self.flush_timeout, self._flush_timed_out, req)
        self._flush_waiters[req] = [callbacks, len(live), timer]
        for w in live:
            w.send(channel.Flush(req))

    @staticmethod
    def _run(callbacks: List[Callable[[], None]]) -> None:
        for callback in callbacks:
            try:
                callback()
            except Exception:  # one request's failure never strands the others
                log.exception("data-plane callback failed")

    def _flush_timed_out(self, req: int) -> None:
        log.warning("workers did not report in time; counters may lag")
        self.counters["plane.flush_timeouts"] += 1
        self._finish_flush(req)

    def _finish_flush(self, req: int) -> None:
        waiter = self._flush_waiters.pop(req, None)
        if waiter is None:
            return
        callbacks, _count, timer = waiter
        timer.cancel()
        self._run(callbacks)

    def get_timer(self) -> Optional[float]:
        """Workers push their reports every 0.5 s: nothing to schedule here."""
        return None

    def handle_timer(self, now: float) -> None:
        """Nothing scheduled (see `get_timer`)."""

    def media_counters(self) -> Dict[str, int]:
        total: Dict[str, int] = dict(self.counters)
        for w in self.workers:
            for key, value in w.totals.items():
                total[key] = total.get(key, 0) + value
        for prog in self.steering.values():  # AF_XDP: what the steering programs did
            for name, n in prog.verdict_counts().items():
                key = STEER_COUNTERS[name]
                total[key] = total.get(key, 0) + n
        return total
