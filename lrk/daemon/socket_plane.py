"""Control-plane side of socket mode: binds relay ports, feeds worker processes.

The engine asks `probe(ip, port)` while allocating; the bound sockets wait here
until the `Install` action ships them (SCM_RIGHTS) to the session's worker, and
the control plane closes its copies. Workers report counters back over the same
channel; a worker that dies is restarted and its sessions re-installed.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import socket
import subprocess
import sys
from collections import deque
from typing import Any, Callable, Deque, Dict, List, Optional, Sequence, Tuple

from fastpath import channel
from lrk.core.engine import Action, Engine, Install, Remove, Update
from lrk.core.session import LEG_A, LEG_B, Leg, Session

log = logging.getLogger("lrk.plane")


def _family(ip: str) -> int:
    return socket.AF_INET6 if ":" in ip else socket.AF_INET


SO_RCVBUFFORCE = getattr(socket, "SO_RCVBUFFORCE", 33)
_NONBLOCK = getattr(socket, "SOCK_NONBLOCK", 0)


def set_rcvbuf(sock: socket.socket, size: int) -> None:
    """A deep receive queue rides out GC pauses and bursts (the default holds ~2.6 ms of
    100k pkt/s). FORCE passes rmem_max where we are privileged; otherwise the kernel caps."""
    if size <= 0:
        return
    try:
        sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, size)
    except OSError:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, size)


def bind_pair(ip: str, port: int, rcvbuf: int = 0
              ) -> Optional[Tuple[socket.socket, socket.socket]]:
    """RTP and RTCP sockets on (ip, port) and (ip, port + 1); None if either is taken."""
    socks: List[socket.socket] = []
    try:
        for p in (port, port + 1):
            # non-blocking from birth: no FIONBIO ioctl per port (the control plane's cost
            # is mostly these few syscalls per port)
            s = socket.socket(_family(ip), socket.SOCK_DGRAM | _NONBLOCK)
            socks.append(s)
            s.bind((ip, p))
            if p == port:  # RTCP (a few packets per second) keeps the kernel's default
                set_rcvbuf(s, rcvbuf)
    except OSError:
        for s in socks:
            s.close()
        return None
    return socks[0], socks[1]


def leg_spec(leg: Leg) -> dict:
    return {
        "announced": list(leg.announced) if leg.announced else None,
        "rtcp_announced": list(leg.rtcp_announced) if leg.rtcp_announced else None,
        "latch_any": leg.latch_any,
        "gen": leg.generation,
    }


class WorkerHandle:
    """One worker process and the daemon's end of its channel."""

    def __init__(self, index: int, plane: SocketPlane) -> None:
        self.index = index
        self.plane = plane
        self.proc: Optional[subprocess.Popen] = None
        self.chan: Optional[socket.socket] = None
        self.outbox: Deque[Tuple[dict, List[socket.socket]]] = deque()
        self.totals: Dict[str, int] = {}
        self.restarts = 0
        self._scheduled = False  # a flush of the outbox is due in this loop iteration

    def start(self) -> None:
        mine, theirs = channel.pair()
        cmd = [sys.executable, "-m", "fastpath.worker.loop", "--channel-fd",
               str(theirs.fileno()), "--batch", str(self.plane.batch), "--io", self.plane.io,
               "--log-level", self.plane.log_level, "--log-format", self.plane.log_format,
               "--coalesce-us", str(self.plane.coalesce_us)]
        self.proc = subprocess.Popen(cmd, pass_fds=(theirs.fileno(),), close_fds=True)
        theirs.close()
        mine.setblocking(False)
        self.chan = mine
        loop = self.plane.loop
        loop.add_reader(mine.fileno(), self._readable)
        taps = self.plane.open_taps()
        if taps:
            self.send({"op": "taps"}, taps)

    def send(self, message: dict, socks: List[socket.socket] = ()) -> None:  # type: ignore[assignment]
        """Queue a message; everything queued in one loop iteration leaves as one batch."""
        self.outbox.append((message, list(socks)))
        if not self._scheduled:
            self._scheduled = True
            self.plane.loop.call_soon(self._flush_outbox)

    def _next_batch(self) -> Tuple[dict, List[socket.socket], int]:
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
        msgs, all_socks = [], []
        for message, more in itertools.islice(self.outbox, 0, taken):
            msgs.append(dict(message, nfds=len(more)))
            all_socks.extend(more)
        return {"op": "batch", "msgs": msgs}, all_socks, taken

    def _flush_outbox(self) -> None:
        self._scheduled = False
        chan = self.chan
        while self.outbox and chan is not None:
            message, socks, taken = self._next_batch()
            try:
                channel.send(chan, message, [s.fileno() for s in socks])
            except BlockingIOError:
                self.plane.loop.add_writer(chan.fileno(), self._writable)
                return
            except OSError:
                return  # worker gone; _readable sees EOF and restarts
            for _ in range(taken):
                self.outbox.popleft()
            for s in socks:
                s.close()  # the worker holds its own copy now

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
        self.restarts += 1
        self.plane.counters["workers.restarts"] += 1
        for _message, socks in self.outbox:
            for s in socks:
                s.close()
        self.outbox.clear()
        self.start()
        self.plane.reinstall(self)

    def close(self) -> None:
        if self.chan is not None:
            loop = self.plane.loop
            loop.remove_reader(self.chan.fileno())
            loop.remove_writer(self.chan.fileno())
            self.chan.close()
            self.chan = None


class SocketPlane:
    """Applies engine actions to worker processes in socket mode."""

    def __init__(self, engine: Engine, workers: int = 1, batch: int = 64, io: str = "auto",
                 log_level: str = "warning", log_format: str = "kv", rcvbuf: int = 0,
                 packet_ifaces: Sequence[str] = (), coalesce_us: int = 0):
        self.engine = engine
        self.packet_ifaces = list(packet_ifaces)
        self.nft: Any = None
        self.rcvbuf = rcvbuf
        self.coalesce_us = coalesce_us
        self.log_level = log_level
        self.log_format = log_format
        self.nworkers = max(1, workers)
        self.batch = batch
        self.io = io
        self.loop: asyncio.AbstractEventLoop = None  # type: ignore[assignment]
        self.workers: List[WorkerHandle] = []
        self.pending: Dict[Tuple[str, int], Tuple[socket.socket, socket.socket]] = {}
        self.counters: Dict[str, int] = {"workers.restarts": 0}
        self.stopping = False
        self._flush_seq = 0
        self._flush_waiters: Dict[int, list] = {}  # req -> [callbacks, workers left, timer]
        self._gathered: List[Callable[[], None]] = []  # flush_then callbacks not yet sent
        engine.probe = self.probe

    # -- lifecycle -------------------------------------------------------------------
    async def start(self) -> None:
        self.loop = asyncio.get_running_loop()
        for i in range(self.nworkers):
            handle = WorkerHandle(i, self)
            handle.start()
            self.workers.append(handle)
        if self.packet_ifaces:
            # packet mode: the taps (open and queueing already) read the media; only now may
            # the kernel stop handling it
            from fastpath.kernel.nft import Nft
            from fastpath.worker.packet_io import DEFAULT_TABLE, drop_rules

            cfg = self.engine.config
            self.nft = Nft()
            self.nft.run(drop_rules(DEFAULT_TABLE, cfg.port_start, cfg.port_end,
                                    sorted({cfg.internal_ip, cfg.external_ip}),
                                    ifnames=self.packet_ifaces))

    def open_taps(self) -> List[socket.socket]:
        """Packet mode: AF_PACKET sockets for a worker, opened here so that they queue
        media from this moment on, whenever the worker gets to read them."""
        if not self.packet_ifaces:
            return []
        from fastpath.worker.packet_io import open_packet_socket

        cfg = self.engine.config
        return [open_packet_socket(ifname, cfg.port_start, cfg.port_end)
                for ifname in self.packet_ifaces]

    async def stop(self) -> None:
        self.stopping = True
        if self.nft is not None:
            from fastpath.worker.packet_io import DEFAULT_TABLE, destroy_rules

            self.nft.run(destroy_rules(DEFAULT_TABLE))
        for w in self.workers:
            if w.chan is not None:
                w.send({"op": "stop"})
        for w in self.workers:
            proc = w.proc
            if proc is None:
                continue
            for _ in range(50):
                if proc.poll() is not None:
                    break
                await asyncio.sleep(0.02)  # bounded wait for a clean exit
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            w.close()
        self._close_unclaimed()

    # -- engine hooks ----------------------------------------------------------------
    def probe(self, ip: str, port: int) -> bool:
        bound = bind_pair(ip, port, self.rcvbuf)
        if bound is None:
            return False
        self.pending[(ip, port)] = bound
        return True

    def worker_for(self, sid: int) -> WorkerHandle:
        return self.workers[sid % self.nworkers]

    def apply(self, actions: List[Action]) -> None:
        for action in actions:
            if isinstance(action, Install):
                self._install(action.session)
            elif isinstance(action, Update):
                leg = action.session.legs[action.leg]
                self.worker_for(action.session.sid).send(
                    {"op": "update", "sid": action.session.sid, "leg": leg.name,
                     "spec": leg_spec(leg)})
            elif isinstance(action, Remove):
                self.worker_for(action.session.sid).send(
                    {"op": "remove", "sid": action.session.sid})
        self._close_unclaimed()

    def _close_unclaimed(self) -> None:
        """Ports bound by a probe whose request then failed (e.g. the second pair ran out)."""
        for pair_ in self.pending.values():
            for s in pair_:
                s.close()
        self.pending.clear()

    def _install(self, session: Session) -> None:
        socks: List[socket.socket] = []
        for name in (LEG_A, LEG_B):
            leg = session.legs[name]
            pair_ = self.pending.pop((leg.relay_ip, leg.relay_port), None)
            if pair_ is None:
                pair_ = bind_pair(leg.relay_ip, leg.relay_port, self.rcvbuf)
            if pair_ is None:
                log.error("cannot bind %s:%d for %s", leg.relay_ip, leg.relay_port,
                          session.call_id)
                self.counters["plane.bind_failures"] = self.counters.get(
                    "plane.bind_failures", 0) + 1
                for s in socks:
                    s.close()
                return
            socks.extend(pair_)
        legs = {name: leg_spec(session.legs[name]) for name in (LEG_A, LEG_B)}
        # what the worker would otherwise ask the kernel for, four syscalls per socket
        addrs = [[session.legs[name].relay_ip, session.legs[name].relay_port + rtcp]
                 for name in (LEG_A, LEG_B) for rtcp in (0, 1)]
        self.worker_for(session.sid).send(
            {"op": "install", "sid": session.sid, "legs": legs,
             "families": [int(s.family) for s in socks], "addrs": addrs}, socks)

    def commit(self) -> None:
        """Send every queued worker message now (before a reply that announces it)."""
        for w in self.workers:
            if w.outbox:
                w._flush_outbox()

    def reinstall(self, worker: WorkerHandle) -> None:
        for session in list(self.engine.by_sid.values()):
            if self.worker_for(session.sid) is worker:
                for leg in session.legs.values():
                    leg.fold()
                self._install(session)

    # -- reports ---------------------------------------------------------------------
    def on_message(self, worker: WorkerHandle, message: dict) -> None:
        op = message.get("op")
        if op == "report":
            for sid, report in message.get("sessions", {}).items():
                self.engine.apply_report(int(sid), report)
            if "g" in message:
                worker.totals = message["g"]
        elif op == "flushed":
            waiter = self._flush_waiters.get(message.get("req"))
            if waiter is not None:
                waiter[1] -= 1
                if waiter[1] <= 0:
                    self._finish_flush(message["req"])

    def flush_then(self, callback: Callable[[], None], timeout: float = 1.0) -> None:
        """Call `callback` once every worker has reported its current counters (or after
        `timeout`, counters then possibly lagging). Plain callbacks: no task per request;
        the requests of one loop iteration share one round trip to the workers."""
        if not any(w.chan is not None for w in self.workers):
            callback()
            return
        self._gathered.append(callback)
        if len(self._gathered) == 1:
            self.loop.call_soon(self._send_flush, timeout)

    def _send_flush(self, timeout: float) -> None:
        callbacks, self._gathered = self._gathered, []
        live = [w for w in self.workers if w.chan is not None]
        if not live:
            self._run(callbacks)
            return
        self._flush_seq += 1
        req = self._flush_seq
        timer = self.loop.call_later(timeout, self._flush_timed_out, req)
        self._flush_waiters[req] = [callbacks, len(live), timer]
        for w in live:
            w.send({"op": "flush", "req": req})

    @staticmethod
    def _run(callbacks: List[Callable[[], None]]) -> None:
        for callback in callbacks:
            try:
                callback()
            except Exception:  # one request's failure never strands the others
                log.exception("flush callback failed")

    def _flush_timed_out(self, req: int) -> None:
        log.warning("workers did not report in time; counters may lag")
        self.counters["plane.flush_timeouts"] = self.counters.get("plane.flush_timeouts", 0) + 1
        self._finish_flush(req)

    def _finish_flush(self, req: int) -> None:
        waiter = self._flush_waiters.pop(req, None)
        if waiter is None:
            return
        callbacks, _count, timer = waiter
        timer.cancel()
        self._run(callbacks)

    async def flush(self, timeout: float = 1.0) -> None:
        """Wait until every worker has reported its current counters."""
        fut = self.loop.create_future()
        self.flush_then(lambda: fut.done() or fut.set_result(None), timeout)
        await fut

    def media_counters(self) -> Dict[str, int]:
        total: Dict[str, int] = dict(self.counters)
        for w in self.workers:
            for key, value in w.totals.items():
                total[key] = total.get(key, 0) + value
        return total
