"""Socket-mode relay worker: a process that owns relay sockets and forwards media.

Run by the daemon as `python -m fastpath.worker.loop --channel-fd N`. It loops
on epoll over its sockets and the channel, reads datagrams in batches
(recvmmsg through cffi where available), forwards them through the
`RelayTable` and reports counters back every `REPORT_INTERVAL` seconds and on
request. Everything it owns dies with it; the daemon re-installs on restart.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import select
import signal
import socket
import time
from typing import Any, Dict, List, Optional, Tuple

from fastpath import channel, jit, logs
from fastpath.packet import parse_media
from fastpath.worker.mmsg import make_batch_io
from fastpath.worker.packet_io import PacketReader
from fastpath.worker.raw_egress import RawEgress, RawEgressError
from fastpath.worker.relay_table import Endpoint, RelayTable
from fastpath.worker.xsk import (
    MAX_QUEUES,
    RING_DEFAULT,
    RING_MAX,
    RING_MIN,
    TX_CHECKSUM,
    ring_per_queue,
)

log = logging.getLogger("lrk.worker")

REPORT_INTERVAL = 0.5
#: the worker's exit code when the channel could not pass it every fd of a message
EXIT_FDS_TRUNCATED = 3
#: packet mode's egress: "auto" (raw sockets, batched across sessions, when they can be
#: opened) or "udp" (each session's UDP socket; the comparison baseline, and a way out)
EGRESS_ENV = "LRK_PACKET_EGRESS"


class SocketWorker:
    """The hot loop. Not asyncio: a bare epoll loop is what PyPy's JIT makes fastest."""

    def __init__(self, chan: socket.socket, batch: int = 64, io: str = "auto",
                 coalesce: float = 0.0, relearn_after: float = 3.0,
                 xsk_checksum: str = "offload", xsk_ring: int = RING_DEFAULT) -> None:
        self.chan = chan
        # after a round that was not a full batch, wait this long (s) before polling again:
        # media gathers meanwhile, so one wake-up carries many packets (latency <= this)
        self.coalesce = coalesce
        self.round_packets = 0
        self.table = RelayTable(relearn_after)
        self.io = make_batch_io(batch, io)
        self.epoll = select.epoll()
        self.epoll.register(chan.fileno(), select.EPOLLIN)
        self.running = True
        self.next_report = 0.0
        # packet mode: media is read from AF_PACKET taps (the kernel drops it in PREROUTING)
        # and matched to endpoints by destination address; the UDP sockets only send
        self.by_addr: Dict[Tuple[str, int], object] = {}
        self.readers: Dict[int, PacketReader] = {}
        self.unknown_flow = 0
        self.batch = batch
        # packet mode's egress: raw sockets (None: each endpoint's UDP socket sends), the
        # runs queued in this poll round, and the packets the UDP sockets sent instead
        self.egress: Optional[RawEgress] = None
        self.egress_runs: List[Tuple[Endpoint, bytes, Tuple[str, int]]] = []
        self.egress_fallback = 0
        self.egress_disabled = 0
        self.bad_messages = 0
        #: the media sockets: fd -> local address (from the install). Raw fds, no socket
        #: objects (CPython's constructor asks the kernel for each one's name, a system
        #: call per socket and four per call)
        self.addrs: Dict[int, Tuple[str, int]] = {}
        #: packet mode over AF_XDP: the readers whose frames go back after each round, and
        #: interfaces whose socket could not be opened (their media takes the kernel path)
        self.xsk_readers: List[Any] = []
        self.xsk_failed = 0
        #: who computes the UDP checksums of frames the AF_XDP sockets send (asked for)
        self.xsk_checksum = xsk_checksum
        #: RX slots of an interface, shared by its queues' AF_XDP sockets (af_xdp_ring)
        self.xsk_ring = xsk_ring

    # -- channel ---------------------------------------------------------------------
    def _drain_channel(self) -> None:
        while True:
            try:
                got = channel.receive(self.chan, socket.MSG_DONTWAIT)
            except BlockingIOError:
                return
            except (ValueError, TypeError, EOFError) as exc:  # a bug on the daemon's side
                log.error("undecodable channel message: %s", exc)
                self.bad_messages += 1
                continue
            except channel.FdsTruncated as exc:
                # which sockets went with which session is lost: serving on would relay
                # calls through each other's. Exit: the daemon restarts this worker and
                # re-installs every session with fresh sockets (it keeps within the limit)
                log.error("%s; exiting so that the daemon re-installs the sessions", exc)
                raise SystemExit(EXIT_FDS_TRUNCATED) from None
            if got is None:
                self.running = False  # daemon gone: nothing to serve any more
                return
            message, fds = got
            try:
                self._handle(message, fds)
            except Exception:
                log.exception("bad channel message %s", type(message).__name__)
                self.bad_messages += 1
                for fd in fds:
                    with contextlib.suppress(OSError):
                        os.close(fd)

    def _handle_batch(self, batch: channel.Batch, fds: List[int]) -> None:
        """Several messages in one: each takes its `nfds` fds in order."""
        at = 0
        for message, n in zip(batch.messages, batch.nfds):
            mine, at = fds[at:at + n], at + n
            try:
                self._handle(message, mine)
            except Exception:
                log.exception("bad channel message %s", type(message).__name__)
                self.bad_messages += 1
                for fd in mine:
                    with contextlib.suppress(OSError):
                        os.close(fd)
        for fd in fds[at:]:
            os.close(fd)

    def _handle(self, message: object, fds: List[int]) -> None:
        if isinstance(message, channel.Batch):
            self._handle_batch(message, fds)
        elif isinstance(message, channel.InstallSession):
            self._install(message, fds)
        elif isinstance(message, channel.InstallFork):
            self._install_fork(message, fds)
        elif isinstance(message, channel.PromoteFork):
            for fd in self.table.promote(message.main_uid, message.fork_uid):
                self._close(fd)
        elif isinstance(message, channel.UpdateSession):
            self.table.update(message.uid, message.stream.a)
            self.table.update(message.uid, message.stream.b)
        elif isinstance(message, channel.RemoveSession):
            # no final report: the daemon forgets a unit when it sends the remove and
            # would drop the report (its counters came with the delete's Flush)
            self._remove(message.uid)
        elif isinstance(message, channel.Flush):
            self._report(None)
            channel.send(self.chan, channel.Flushed(message.req))
        elif isinstance(message, channel.Taps):  # packet mode: AF_PACKET sockets
            for fd in fds:
                reader = PacketReader(socket.socket(fileno=fd), self.batch)
                self.readers[fd] = reader
                self.epoll.register(fd, select.EPOLLIN)
            self._open_egress()
        elif isinstance(message, channel.XskQueues):  # packet mode over AF_XDP
            self._open_xsk(message.ifnames, fds)
        elif isinstance(message, channel.Stop):
            self._report(None)
            self.running = False
        else:
            raise ValueError(f"unexpected channel message {type(message).__name__}")

    def _install(self, message: channel.InstallSession, fds: List[int]) -> None:
        sid = message.uid
        if len(fds) != 4 or len(message.addrs) != 4:
            raise ValueError(f"install of {sid} carries {len(fds)} fds and "
                             f"{len(message.addrs)} addresses, not 4")
        if sid in self.table.sessions:
            self._remove(sid)
        session = self.table.install(sid, fds, message.stream)
        self._adopt(fds, message.addrs, session.endpoints)

    def _install_fork(self, message: channel.InstallFork, fds: List[int]) -> None:
        if len(message.addrs) != len(fds):  # each fd is closed by its address's entry
            raise ValueError(f"fork install of {message.uid} carries {len(fds)} fds and "
                             f"{len(message.addrs)} addresses")
        if message.uid in self.table.sessions:
            self._remove(message.uid)
        session = self.table.install_fork(message.uid, message.main_uid, fds, message.stream)
        self._adopt(fds, message.addrs, session.endpoints[:2])

    def _adopt(self, fds: List[int], addrs: Tuple[Any, ...],
               endpoints: List[Endpoint]) -> None:
        """Sockets that came with an install (non-blocking already): polled, and known by
        address (packet mode)."""
        register = self.epoll.register
        for fd in fds:
            register(fd, select.EPOLLIN)
        if self.readers:
            egress = self.egress
            by_fd = dict(zip(fds, addrs))
            for ep in endpoints:
                ip, port = by_fd[ep.fd]
                self.by_addr[(ip, port)] = ep
                if egress is not None:
                    egress.bind(ep.fd, ip, port)
        self.addrs.update(zip(fds, addrs))

    def _remove(self, sid: int) -> None:
        unit = self.table.sessions.get(sid)
        if unit is None:
            return
        for fork in list(unit.forks):  # they share its B sockets: gone first
            self._remove(fork)
        session = self.table.remove(sid)
        if session is None:
            return
        for ep in session.owned():
            self._close(ep.fd)

    def _close(self, fd: int) -> None:
        if self.egress is not None:
            self.egress.forget(fd)
        addr = self.addrs.pop(fd, None)
        if self.readers and addr is not None:
            self.by_addr.pop(addr, None)
        if addr is not None:
            # no EPOLL_CTL_DEL: the worker holds the only reference to the socket (the
            # daemon closes its copy once sent), so closing it leaves the epoll set too.
            # An install and its remove in one message can reach us before the daemon's
            # close: the socket then stays in the set for those microseconds, a spurious
            # wake-up at worst
            os.close(fd)

    def _report(self, only: object) -> None:
        """Send counters of changed sessions (or of the given sids) to the daemon."""
        sessions = self.table.sessions
        if only is None:
            sids = [sid for sid, s in sessions.items() if s.dirty]
        else:
            sids = [sid for sid in only if sid in sessions]  # type: ignore[attr-defined]
        chunk = []
        for sid in sids:
            session = sessions[sid]
            session.dirty = False
            chunk.append(session.report())
            if len(chunk) >= channel.REPORT_CHUNK:
                channel.send_bytes(self.chan, channel.encode_reports(chunk))
                chunk = []
        channel.send_bytes(self.chan, channel.encode_reports(chunk, self.totals()))

    def totals(self) -> Dict[str, int]:
        """Worker-wide counters: the table's plus what the batch I/O layer met."""
        totals = self.table.totals()
        totals["worker.channel.bad_messages"] = self.bad_messages
        io = self.io
        totals["media.dropped.oversized"] = io.truncated + sum(
            r.truncated for r in self.readers.values())
        if self.readers:
            totals["media.dropped.unknown_flow"] = self.unknown_flow
            totals["media.dropped.tap_overflow"] = sum(
                r.count_overflows() for r in self.readers.values())
            totals["media.egress.fallback.packets"] = self.egress_fallback
            totals["media.egress.raw.disabled"] = self.egress_disabled
            egress = self.egress
            if egress is not None and egress.kind == "xsk":
                totals["media.egress.xsk.packets"] = egress.packets
                totals["media.egress.xsk.calls"] = egress.calls
                totals["media.egress.xsk.rejected"] = egress.rejected
                for name, n in egress.errors.items():
                    totals[f"media.egress.xsk.errors.{name}"] = n
                for name, n in egress.kick_errors().items():
                    totals[f"media.egress.xsk.errors.{name}"] = n
            elif egress is not None:
                totals["media.egress.raw.packets"] = egress.packets
                totals["media.egress.raw.calls"] = egress.calls
                totals["media.egress.raw.rejected"] = egress.rejected
                for name, n in egress.errors.items():
                    totals[f"media.egress.raw.errors.{name}"] = n
            if self.xsk_readers or self.xsk_failed:
                totals["media.xsk.open_failed"] = self.xsk_failed
                totals["media.xsk.sockets"] = len(self.xsk_readers)
                # af_xdp_ring as opened: 4 KiB of pinned UMEM a slot
                totals["media.xsk.rx_slots"] = sum(r.xsk.rx_ring.size for r in self.xsk_readers)
                totals["media.xsk.not_ip"] = sum(r.not_ip for r in self.xsk_readers)
                for r in self.xsk_readers:  # sockets by who computes their UDP checksums
                    key = f"media.xsk.tx_checksum.{r.xsk.tx_checksum}"
                    totals[key] = totals.get(key, 0) + 1
                    # the kernel's reasons behind media.dropped.tap_overflow (read above)
                    for name, n in r.drops.items():
                        key = f"media.xsk.dropped.{name}"
                        totals[key] = totals.get(key, 0) + n
        for name, n in io.send_errors.items():
            totals[f"media.send_errors.{name}"] = n
        for name, n in io.recv_errors.items():
            totals[f"media.recv_errors.{name}"] = n
        return totals

    # -- media -----------------------------------------------------------------------
    def run(self) -> None:
        table = self.table
        by_fd = table.by_fd
        io = self.io
        chan_fd = self.chan.fileno()
        poll = self.epoll.poll
        monotonic = time.monotonic
        self.next_report = monotonic() + REPORT_INTERVAL
        coalesce = self.coalesce
        sleep = time.sleep
        full = io.batch
        while self.running:
            events = poll(REPORT_INTERVAL)
            now = monotonic()
            self.round_packets = 0
            # control first: an update sent before the client's reply must beat the media
            # that reply triggers, even when both wake us in the same poll
            for fd, _ev in events:
                if fd == chan_fd:
                    self._drain_channel()
            for fd, _ev in events:
                ep = by_fd.get(fd)
                if ep is None:
                    reader = self.readers.get(fd)
                    if reader is not None:
                        self._ingest(reader, now)
                    continue
                while True:
                    packets = io.recv(fd)
                    if not packets:
                        break
                    if ep.split:  # rtcp-mux on one leg only, or forked callees
                        for src_ep, out in table.forward_split(ep, packets, now):
                            if out:
                                table.sent(src_ep, out, io.send(src_ep.fd, out))
                    else:
                        src_ep, out = table.forward(ep, packets, now)
                        if out:
                            table.sent(src_ep, out, io.send(src_ep.fd, out))
                    self.round_packets += len(packets)
                    if len(packets) < io.batch:
                        break
            if self.egress_runs:  # packet mode: this round's packets, one send per family
                self._flush_egress()
            for xr in self.xsk_readers:  # AF_XDP: the round's frames are sent or copied
                xr.done()
            if now >= self.next_report:
                self.next_report = now + REPORT_INTERVAL
                self._report(None)
            if coalesce and 0 < self.round_packets < full:
                sleep(coalesce)
        for sid in list(table.sessions):
            self._remove(sid)
        for reader in self.readers.values():
            reader.close()
        if self.egress is not None:
            self.egress.close()

    def _ingest(self, reader: PacketReader, now: float) -> None:
        """Packet mode: a batch from the tap or AF_XDP socket, decided and queued one
        packet at a time (at call rates consecutive packets seldom share an endpoint;
        everything a packet calls here is loop-free, so PyPy's JIT compiles the batch
        into one loop)."""
        by_addr = self.by_addr
        forward_one = self.table.forward_one
        queue_one = self._queue_one
        for _ in range(16):  # bounded: other sockets and the channel get their turn
            frames = reader.recv_batch()
            if not frames:
                return
            self.round_packets += len(frames)
            for l3, _ifindex in frames:
                media = parse_media(l3)
                ep = by_addr.get((media[3], media[4])) if media else None
                if ep is None:
                    self.unknown_flow += 1
                    continue
                if ep.split:  # rtcp-mux on one leg only, or forked callees
                    self._forward_split(ep, media[5], (media[1], media[2]), now)
                    continue
                data = media[5]
                dest = forward_one(ep, data, (media[1], media[2]), now)
                if dest is not None:
                    queue_one(ep.partner, data, dest)
            if len(frames) < reader.batch:
                return

    def _forward_split(self, ep: Endpoint, data: bytes, src: Tuple[str, int],
                       now: float) -> None:
        """Packet mode: a packet on an endpoint shared by forks or split by type."""
        for src_ep, out in self.table.forward_split(ep, [(data, src)], now):
            if src_ep is not None:
                for pkt, dest in out:
                    self._queue_one(src_ep, pkt, dest)

    def _queue_one(self, src_ep: Endpoint, data: bytes, dest: Tuple[str, int]) -> None:
        """Packet mode: queue one packet for the round's raw send (flushed when full)."""
        egress = self.egress
        if egress is None:
            self._send_udp(src_ep, data, dest)
            return
        if egress.pending >= egress.capacity:
            self._flush_egress()
        egress.add_one(src_ep.fd, data, dest)
        self.egress_runs.append((src_ep, data, dest))

    def _send_udp(self, src_ep: Endpoint, data: bytes, dest: Tuple[str, int]) -> None:
        """Send one packet from the endpoint's UDP socket (packet mode's fallback)."""
        self.egress_fallback += 1
        if self.io.send(src_ep.fd, [(data, dest)]) == 1:
            self.table.sent_one(src_ep, len(data))
        else:
            self.table.send_failed(src_ep)

    def _flush_egress(self) -> None:
        """Send the queued packets; what the raw sockets could not send goes through each
        endpoint's UDP socket (counted), then every packet is accounted as socket mode
        does."""
        failed = self.egress.flush()  # type: ignore[union-attr]
        queued = self.egress_runs
        self.egress_runs = []
        sent_one = self.table.sent_one
        if not failed:
            for src_ep, data, _dest in queued:
                sent_one(src_ep, len(data))
            return
        fi = 0
        nf = len(failed)
        for pos in range(len(queued)):
            src_ep, data, dest = queued[pos]
            if fi < nf and failed[fi] == pos:
                fi += 1
                self._send_udp(src_ep, data, dest)
            else:
                sent_one(src_ep, len(data))

    def _open_xsk(self, ifnames: Tuple[str, ...], fds: List[int]) -> None:
        """Packet mode over AF_XDP: a socket per receive queue of each interface,
        registered in its steering program's map (whose fd came with the message), read
        like a tap; their egress.
        An interface whose socket fails is counted and logged: the program passes its
        media to the kernel, which delivers it to the relay's UDP sockets (socket mode's
        path in this same loop)."""
        from fastpath.worker.xsk_io import XskEgress
        from fastpath.xdp.libbpf import BpfMap

        owned = list(fds)
        del fds[:]  # closed here, once: a failure below must not have the caller close
        try:        # them again (their numbers may belong to new AF_XDP sockets by then)
            if len(owned) != len(ifnames):
                raise ValueError(f"{len(ifnames)} AF_XDP interfaces came with "
                                 f"{len(owned)} fds")
            xsks: Dict[int, Any] = {}
            for ifname, map_fd in zip(ifnames, owned):
                self._open_queues(ifname, BpfMap(map_fd, 4, 4), xsks)
        finally:
            for fd in owned:
                with contextlib.suppress(OSError):
                    os.close(fd)
        if not xsks or self.egress is not None:
            return
        self.egress = XskEgress(xsks)
        self._bind_egress()

    def _open_queues(self, ifname: str, xsk_map: Any, xsks: Dict[int, Any]) -> None:
        """One AF_XDP socket per receive queue of `ifname`, each registered under its
        queue in the interface's map and read like a tap; queue 0's also sends. The queues
        share the interface's `xsk_ring` RX slots (each socket has a frame per slot and as
        many for sending, 4 KiB a slot: 64 MiB an interface at the default, 2 MiB a queue
        where RING_MIN is reached; at most 64 queues, the size of the program's map)."""
        from fastpath.worker.nexthop import rx_queues
        from fastpath.worker.xsk import XskSocket
        from fastpath.worker.xsk_io import XskReader
        from fastpath.xdp.libbpf import if_nametoindex

        try:
            ifindex = if_nametoindex(ifname)
            queues = rx_queues(ifindex)
        except Exception as exc:  # the daemon probed this at start: a surprise
            log.error("packet mode: no AF_XDP socket on %s (%s); its media takes the "
                      "kernel path", ifname, exc)
            self.xsk_failed += 1
            return
        if queues > MAX_QUEUES:
            log.warning("packet mode: %s has %d receive queues; AF_XDP serves the first %d "
                        "(the others' media takes the kernel path)", ifname, queues,
                        MAX_QUEUES)
            queues = MAX_QUEUES
        ring = ring_per_queue(self.xsk_ring, queues)
        for queue in range(queues):
            xsk = None
            try:
                xsk = XskSocket(ifindex, queue, frames=2 * ring, ring=ring,
                                tx_checksum=self.xsk_checksum)
                xsk_map.update(queue.to_bytes(4, "little"), xsk.fd.to_bytes(4, "little"))
            except Exception as exc:  # the daemon probed this at start: a surprise
                log.error("packet mode: no AF_XDP socket on %s queue %d (%s); its media "
                          "takes the kernel path", ifname, queue, exc)
                self.xsk_failed += 1
                if xsk is not None:
                    xsk.close()
                continue
            if xsk.tx_checksum != self.xsk_checksum:
                log.warning("packet mode: the kernel has no AF_XDP TX metadata (Linux "
                            "6.11 or later); the worker computes UDP checksums on %s "
                            "queue %d", ifname, queue)
            xsks.setdefault(ifindex, xsk)  # queue 0's (the first that opened) sends
            reader = XskReader(xsk, self.batch)
            self.readers[xsk.fd] = reader
            self.xsk_readers.append(reader)
            self.epoll.register(xsk.fd, select.EPOLLIN)

    def _open_egress(self) -> None:
        """Raw egress for packet mode unless disabled; without it the UDP sockets send."""
        if self.egress is not None:
            return
        if os.environ.get(EGRESS_ENV, "auto") == "udp":
            self.egress_disabled = 1
            return
        try:
            self.egress = RawEgress.open()
        except RawEgressError as exc:
            self.egress_disabled = 1
            log.warning("packet mode: %s", exc)
            return
        self._bind_egress()

    def _bind_egress(self) -> None:
        """The new egress learns the relay address of every endpoint installed before it
        came (the taps or AF_XDP sockets arrive after the first installs may have)."""
        egress = self.egress
        for ep in self.table.by_fd.values():
            addr = self.addrs.get(ep.fd)
            if addr is not None:
                egress.bind(ep.fd, addr[0], addr[1])  # type: ignore[union-attr]


def main(argv: List[str] = None) -> int:  # type: ignore[assignment]
    parser = argparse.ArgumentParser(description="lrk socket-mode relay worker (internal)")
    parser.add_argument("--channel-fd", type=int, required=True)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--io", choices=("auto", "mmsg", "plain"), default="auto")
    parser.add_argument("--log-level", default="warning")
    parser.add_argument("--log-format", default="kv")
    parser.add_argument("--coalesce-us", type=int, default=0)
    parser.add_argument("--relearn-after", type=float, default=3.0)
    parser.add_argument("--pypy-jit", default="pypy")
    parser.add_argument("--xsk-checksum", default="offload", choices=TX_CHECKSUM)
    parser.add_argument("--xsk-ring", type=int, default=RING_DEFAULT,
                        choices=[1 << b for b in range(RING_MIN.bit_length() - 1,
                                                       RING_MAX.bit_length())],
                        metavar="SLOTS")
    args = parser.parse_args(argv)
    logs.setup(args.log_level, args.log_format)
    jit.apply(args.pypy_jit, worker=True)
    # the daemon decides when we stop: a signal to the whole process group (Ctrl-C,
    # `systemctl stop`, killpg) must not kill the worker before the daemon stops it (it
    # would see a dead worker and restart it); a worker whose daemon died sees EOF
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    chan = socket.socket(fileno=args.channel_fd)
    chan.setblocking(True)
    worker = SocketWorker(chan, args.batch, args.io, max(0, args.coalesce_us) / 1e6,
                          args.relearn_after, args.xsk_checksum, args.xsk_ring)
    worker.run()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
