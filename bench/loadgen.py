"""RTP load generator for relay-capacity measurements (one process, loopback only).

Each session is a caller socket that sends 172-byte G.711 RTP packets to a relay
address and a callee socket where the relay should deliver them.  `LoadGen.run`
offers a total rate R packets/s for D seconds, paced in ~1 ms ticks: every tick
sends what is due since the start as sendmmsg bursts, round-robin over the
sessions.  The mmsghdr arrays are filled once (a pool of packets per session
whose sequence numbers cycle), so a burst costs one syscall and no per-packet
Python work.  Callee sockets are drained with recvmmsg in between ticks and for
a short grace period after sending stops; a sample of received packets is
compared byte for byte with what was sent on that session.

The generator reports its own achieved send rate: when it cannot keep up with R
(a stall longer than `MAX_BACKLOG` drops the backlog instead of bursting it),
`generator_limited` is set, so a limit of the generator is not mistaken for one
of the relay.

Hard caps: duration <= 10 s, rate <= 2,000,000 packets/s, grace <= 1 s.

Modes:

    # standalone: sets up N calls on a running relay, offers R pkt/s for D s
    python -m bench.loadgen --node udp:127.0.0.1:22222 --sessions 10 --rate 50000 \\
        --duration 2 --json

    # driven by bench.capacity: JSON lines on stdin/stdout, sockets inherited by fd
    python -m bench.loadgen --serve
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import select
import socket
import sys
import time
from typing import Dict, List, Optional, Sequence, Tuple

from bench import jsonlines
from lrk.demo.media import rtp_packet

Addr = Tuple[str, int]

MAX_DURATION = 10.0
MAX_RATE = 2_000_000
MAX_GRACE = 1.0
#: pacing tick, seconds
TICK = 0.001
#: longest stall (s) whose backlog is still sent; beyond it the backlog is dropped
MAX_BACKLOG = 0.02
#: a pacing-loop iteration later than this (s) counts as a stall of the generator
STALL = 0.005
#: a drain ends after this long without a packet (or at the end of the grace period)
QUIET = 0.02
#: sendmmsg / recvmmsg vector length (the kernel caps it at UIO_MAXIOV = 1024)
BATCH = 256
#: a step whose achieved send rate is below this fraction of the offered rate
GENERATOR_SLACK = 0.97
#: every CHECK_EVERY-th received datagram is compared byte for byte with the sent one
CHECK_EVERY = 8
#: RTP payload types of alternate runs (PCMU, PCMA): late packets of a run are recognised
EPOCH_PTS = (0, 8)
#: commands a --serve process answers before it exits by itself
MAX_COMMANDS = 1000
SSRC_BASE = 0x5EED0000
PACKET_BYTES = len(rtp_packet(0, 0))

_CDEF = """
struct iovec { void *iov_base; size_t iov_len; };
struct msghdr {
    void *msg_name; unsigned int msg_namelen;
    struct iovec *msg_iov; size_t msg_iovlen;
    void *msg_control; size_t msg_controllen;
    int msg_flags;
};
struct mmsghdr { struct msghdr msg_hdr; unsigned int msg_len; };
int recvmmsg(int sockfd, struct mmsghdr *msgvec, unsigned int vlen, int flags, void *timeout);
int sendmmsg(int sockfd, struct mmsghdr *msgvec, unsigned int vlen, int flags);
"""

MSG_DONTWAIT = int(getattr(socket, "MSG_DONTWAIT", 0x40))
_AGAIN = (errno.EAGAIN, errno.EWOULDBLOCK)


def _cffi():
    """(ffi, lib) for sendmmsg/recvmmsg, or (None, None) where unavailable."""
    if not sys.platform.startswith("linux"):
        return None, None
    try:
        import cffi

        ffi = cffi.FFI()
        ffi.cdef(_CDEF)
        lib = ffi.dlopen(None)
        lib.sendmmsg  # noqa: B018 - resolving raises when libc lacks it
        lib.recvmmsg  # noqa: B018
    except Exception:
        return None, None
    return ffi, lib


def pool_size(sessions: int) -> int:
    """Distinct packets per session (sequence numbers cycle through them)."""
    return max(16, min(BATCH * 2, 65536 // max(1, sessions)))


def tune_socket(sock: socket.socket, rcvbuf: int = 1 << 23, sndbuf: int = 1 << 22) -> None:
    """Large buffers (forced when privileged) and non-blocking."""
    for force, plain, size in ((33, socket.SO_RCVBUF, rcvbuf), (32, socket.SO_SNDBUF, sndbuf)):
        try:
            sock.setsockopt(socket.SOL_SOCKET, force, size)  # SO_RCVBUFFORCE / SO_SNDBUFFORCE
        except OSError:
            try:
                sock.setsockopt(socket.SOL_SOCKET, plain, size)
            except OSError:
                pass
    sock.setblocking(False)


def udp_socket(host: str = "127.0.0.1") -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_DGRAM)
    sock.bind((host, 0))
    tune_socket(sock)
    return sock


class _Session:
    __slots__ = ("caller_fd", "callee_fd", "dest", "ssrc", "pool", "packets", "sendable",
                 "pos", "hdrs", "keep", "received")

    def __init__(self, caller_fd: int, callee_fd: int, dest: Addr, ssrc: int, pool: int):
        self.caller_fd = caller_fd
        self.callee_fd = callee_fd
        self.dest = (dest[0], int(dest[1]))
        self.ssrc = ssrc
        self.pool = pool
        self.packets = [rtp_packet(i, ssrc) for i in range(pool)]
        self.sendable = self.packets  # plain I/O: the packets with this run's payload type
        self.pos = 0  # next pool index to send
        self.hdrs = None
        self.keep: list = []
        self.received = 0


class LoadGen:
    """Sends from caller sockets to the relay, receives at callee sockets (by fd).

    `sessions`: (caller_fd, callee_fd, (relay_ip, relay_port)) per call; the fds
    stay owned by the caller of this class.  `io`: "mmsg" (cffi), "plain"
    (sendto/recv loops) or "auto".
    """

    def __init__(self, sessions: Sequence[Tuple[int, int, Addr]], io: str = "auto") -> None:
        if not sessions:
            raise ValueError("no sessions")
        pool = pool_size(len(sessions))
        self.sessions = [_Session(c, r, d, SSRC_BASE + i, pool)
                         for i, (c, r, d) in enumerate(sessions)]
        self.by_callee: Dict[int, _Session] = {s.callee_fd: s for s in self.sessions}
        if len(self.by_callee) != len(self.sessions):
            raise ValueError("callee sockets must be distinct")
        ffi, lib = (None, None) if io == "plain" else _cffi()
        if ffi is None and io == "mmsg":
            raise RuntimeError("sendmmsg/recvmmsg unavailable")
        self.ffi, self.lib = ffi, lib
        self.io = "mmsg" if ffi is not None else "plain"
        self.epoll = select.epoll()
        for s in self.sessions:
            self.epoll.register(s.callee_fd, select.EPOLLIN)
        self._socks: Dict[int, socket.socket] = {}
        if ffi is not None:
            self._setup_mmsg()
        else:
            for s in self.sessions:
                for fd in (s.caller_fd, s.callee_fd):
                    self._socks[fd] = socket.socket(fileno=fd)
        self.rr = 0
        self.checked = self.damaged = self.recv_errors = self.late = 0
        self.runs = 0
        self.pt = EPOCH_PTS[0]

    def _setup_mmsg(self) -> None:
        from fastpath.worker.mmsg import encode_sockaddr

        ffi = self.ffi
        for s in self.sessions:
            raw = encode_sockaddr(s.dest)
            name = ffi.new("char[]", raw)
            n = s.pool
            hdrs = ffi.new("struct mmsghdr[]", n)
            iov = ffi.new("struct iovec[]", n)
            buf = ffi.new("unsigned char[]", n * PACKET_BYTES)
            for i, data in enumerate(s.packets):
                ffi.memmove(buf + i * PACKET_BYTES, data, PACKET_BYTES)
                iov[i].iov_base = buf + i * PACKET_BYTES
                iov[i].iov_len = PACKET_BYTES
                h = hdrs[i].msg_hdr
                h.msg_name = name
                h.msg_namelen = len(raw)
                h.msg_iov = iov + i
                h.msg_iovlen = 1
            s.hdrs = hdrs
            s.keep = [name, iov, buf]
        self._rh = rh = ffi.new("struct mmsghdr[]", BATCH)
        self._riov = riov = ffi.new("struct iovec[]", BATCH)
        self._rbuf = rbuf = ffi.new("unsigned char[]", BATCH * 2048)
        for i in range(BATCH):
            riov[i].iov_base = rbuf + i * 2048
            riov[i].iov_len = 2048
            rh[i].msg_hdr.msg_iov = riov + i
            rh[i].msg_hdr.msg_iovlen = 1
        self._rview = ffi.buffer(rbuf)

    def close(self) -> None:
        self.epoll.close()
        for sock in self._socks.values():
            sock.detach()  # the fds belong to whoever gave them to us
        self._socks.clear()

    # -- sending --------------------------------------------------------------------
    def _send_session(self, s: _Session, k: int) -> Tuple[int, int]:
        """Send k packets on one session; returns (sent, failed)."""
        sent = failed = 0
        if self.ffi is None:
            sock = self._socks[s.caller_fd]
            for _ in range(k):
                try:
                    sock.sendto(s.sendable[s.pos], MSG_DONTWAIT, s.dest)
                    sent += 1
                except OSError:
                    failed += 1
                s.pos = (s.pos + 1) % s.pool
            return sent, failed
        sendmmsg = self.lib.sendmmsg
        hdrs = s.hdrs
        fd = s.caller_fd
        pool = s.pool
        while k > 0:
            n = min(k, pool - s.pos, BATCH)
            r = sendmmsg(fd, hdrs + s.pos, n, MSG_DONTWAIT)
            if r < 0:
                e = self.ffi.errno
                if e == errno.EINTR:
                    continue
                r = 1  # skip one datagram (ICMP error from an earlier one, EAGAIN, ...)
                failed += 1
                if e in _AGAIN:  # socket buffer full: drop the rest of this burst
                    failed += k - 1
                    s.pos = (s.pos + k) % pool
                    return sent, failed
            else:
                sent += r
            k -= r
            s.pos = (s.pos + r) % pool
        return sent, failed

    def _send(self, k: int) -> Tuple[int, int]:
        """k packets spread round-robin over the sessions."""
        sessions = self.sessions
        n = len(sessions)
        per, extra = divmod(k, n)
        sent = failed = 0
        if per:
            for s in sessions:
                a, b = self._send_session(s, per)
                sent += a
                failed += b
        rr = self.rr
        for _ in range(extra):
            a, b = self._send_session(sessions[rr], 1)
            sent += a
            failed += b
            rr += 1
            if rr == n:
                rr = 0
        self.rr = rr
        return sent, failed

    # -- receiving ------------------------------------------------------------------
    def _drain(self, fd: int, check: bool) -> int:
        """Read everything queued on one callee socket; returns the datagrams of the
        current run (payload type `self.pt`); older ones count in `late`, others in
        `damaged`.  With check=False everything is read and counted, unchecked."""
        s = self.by_callee[fd]
        pt = self.pt
        got = 0
        if self.ffi is None:
            sock = self._socks[fd]
            while True:
                try:
                    data = sock.recv(2048, MSG_DONTWAIT)
                except BlockingIOError:
                    break
                except InterruptedError:
                    continue
                except OSError:
                    self.recv_errors += 1
                    break
                if not check:
                    got += 1
                elif len(data) > 1 and data[1] == pt:
                    got += 1
                    if got % CHECK_EVERY == 1:
                        self._check(s, data)
                else:
                    self._other(data[1] if len(data) > 1 else -1)
            return got
        recvmmsg = self.lib.recvmmsg
        rh = self._rh
        rbuf = self._rbuf
        null = self.ffi.NULL
        while True:
            n = recvmmsg(fd, rh, BATCH, MSG_DONTWAIT, null)
            if n <= 0:
                if n < 0:
                    e = self.ffi.errno
                    if e == errno.EINTR:
                        continue
                    if e not in _AGAIN:
                        self.recv_errors += 1
                break
            if not check:
                got += n
            else:
                view = self._rview
                for i in range(n):
                    off = i * 2048
                    b = rbuf[off + 1]
                    if b != pt:
                        self._other(b)
                        continue
                    got += 1
                    if got % CHECK_EVERY == 1:
                        self._check(s, view[off: off + rh[i].msg_len])
            if n < BATCH:
                break
        return got

    def _other(self, pt_byte: int) -> None:
        """A datagram not of this run: late (an earlier run's payload type) or damaged."""
        if pt_byte in EPOCH_PTS:
            self.late += 1
        else:
            self.damaged += 1

    def _check(self, s: _Session, data: bytes) -> None:
        """Byte-for-byte comparison with the packet sent (payload type aside)."""
        self.checked += 1
        if len(data) != PACKET_BYTES:
            self.damaged += 1
            return
        seq = (data[2] << 8) | data[3]
        if seq >= s.pool or data[0] != 0x80 or data[2:] != s.packets[seq][2:]:
            self.damaged += 1

    def _set_pt(self, pt: int) -> None:
        """Stamp every pool packet with this run's payload type (0 or 8, both G.711)."""
        self.pt = pt
        for s in self.sessions:
            if self.ffi is not None:
                buf = s.keep[2]
                for i in range(s.pool):
                    buf[i * PACKET_BYTES + 1] = pt
            else:
                s.sendable = [p[:1] + bytes([pt]) + p[2:] for p in s.packets]

    def _poll(self, timeout: float, check: bool = True) -> int:
        got = 0
        for fd, _ev in self.epoll.poll(timeout):
            n = self._drain(fd, check)
            self.by_callee[fd].received += n
            got += n
        return got

    def flush_stale(self) -> int:
        """Discard whatever is still queued (late packets of an earlier run)."""
        stale = 0
        for s in self.sessions:
            stale += self._drain(s.callee_fd, False)
        return stale

    # -- a load step ----------------------------------------------------------------
    def run(self, rate: float, duration: float, grace: float = 0.3) -> dict:
        """Offer `rate` packets/s in total for `duration` s; returns counts and rates."""
        rate = float(rate)
        duration = float(duration)
        grace = float(grace)
        if not 0 < rate <= MAX_RATE:
            raise ValueError(f"rate must be in (0, {MAX_RATE}], got {rate}")
        if not 0 < duration <= MAX_DURATION:
            raise ValueError(f"duration must be in (0, {MAX_DURATION}], got {duration}")
        grace = min(max(grace, 0.0), MAX_GRACE)
        self.checked = self.damaged = self.recv_errors = self.late = 0
        for s in self.sessions:
            s.received = 0
        stale = self.flush_stale()
        # alternate the payload type from run to run: what the relay still delivers
        # of the previous run is told apart (counted as late, not as received)
        self.runs += 1
        self._set_pt(EPOCH_PTS[self.runs % 2])
        max_burst = max(int(rate * MAX_BACKLOG), len(self.sessions), 1)
        total = int(rate * duration)
        monotonic = time.monotonic
        poll = self._poll
        send = self._send
        sent = failed = skipped = scheduled = received = 0
        stalls = 0  # loop iterations more than STALL apart
        max_gap = 0.0
        send_time = 0.0
        t0 = monotonic()
        end = t0 + duration
        last = t0
        while scheduled < total:
            now = monotonic()
            gap = now - last
            last = now
            if gap > max_gap:
                max_gap = gap
            if gap > STALL:
                stalls += 1
            # at the end, whatever is left of the total is due
            due = (total if now >= end else int((now - t0) * rate)) - scheduled
            if due > max_burst:  # we stalled: drop the backlog rather than burst it
                skipped += due - max_burst
                scheduled += due - max_burst
                due = max_burst
            if due > 0:
                scheduled += due
                a, b = send(due)
                sent += a
                failed += b
                send_time += monotonic() - now
            if scheduled >= total:  # reached once now >= end, at the latest
                break
            # sleep (receiving) until the next tick boundary t0 + k * TICK, or until the
            # time the next packet is due when that is later (low rates)
            after = monotonic() - t0
            wake = max((int(after / TICK) + 1) * TICK, (scheduled + 1) / rate)
            received += poll(min(wake - after, TICK * 20))
        # drain until the relay has been quiet for QUIET s (nothing of this step is left
        # in flight to leak into the next one) or the grace period is over
        send_end = monotonic()
        deadline = send_end + grace
        quiet_since = send_end
        while True:
            now = monotonic()
            if now >= deadline or now - quiet_since >= QUIET:
                break
            got = poll(min(deadline - now, QUIET / 4))
            if got:
                received += got
                quiet_since = monotonic()
        wall = send_end - t0
        achieved = sent / wall if wall > 0 else 0.0
        loss = 1.0 - received / sent if sent else 1.0
        per_session = [s.received for s in self.sessions]
        return {
            "rate": rate,
            "duration": duration,
            "sent": sent,
            "received": received,
            "loss": max(loss, 0.0),
            "achieved_rate": round(achieved, 1),
            "generator_limited": achieved < GENERATOR_SLACK * rate,
            "skipped": skipped,
            "send_failed": failed,
            "recv_errors": self.recv_errors,
            "checked": self.checked,
            "damaged": self.damaged,
            "stale": stale,
            "late": self.late,
            "send_wall": round(wall, 4),
            "send_call_s": round(send_time, 4),
            "stalls": stalls,
            "max_gap_ms": round(max_gap * 1e3, 2),
            "drain_wall": round(monotonic() - send_end, 4),
            "sessions": len(self.sessions),
            "min_session_received": min(per_session),
            "io": self.io,
        }


# ---------------------------------------------------------------------------
# command line


def serve(stdin=None, stdout=None) -> int:
    """JSON lines (`bench.jsonlines`): {"cmd": "setup", "sessions": [[caller_fd, callee_fd,
    [ip, port]], ...]}, {"cmd": "run", "rate": R, "duration": D, "grace": G}, {"cmd": "quit"}.
    Every command gets one JSON line back ({"ok": true, ...} or {"ok": false, "error"})."""
    gen: Optional[LoadGen] = None

    def handle(cmd: dict) -> dict:
        nonlocal gen
        op = cmd.get("cmd")
        if op == "setup":
            if gen is not None:
                gen.close()
                gen = None
            gen = LoadGen([(int(c), int(r), (d[0], int(d[1])))
                           for c, r, d in cmd["sessions"]], cmd.get("io", "auto"))
            return {"io": gen.io, "python": sys.executable, "impl": sys.implementation.name}
        if op == "run":
            if gen is None:
                raise ValueError("run before setup")
            return gen.run(cmd["rate"], cmd["duration"], cmd.get("grace", 0.3))
        raise ValueError(f"unknown command {op!r}")

    try:
        jsonlines.serve(handle, MAX_COMMANDS, stdin, stdout)
    finally:
        if gen is not None:
            gen.close()
    return 0


def standalone(node: str, sessions: int, rate: float, duration: float, grace: float,
               host: str = "127.0.0.1") -> dict:
    """Set up `sessions` calls on a running relay, run one load step, delete the calls."""
    from lrk.client import LrkClient

    callers = [udp_socket(host) for _ in range(sessions)]
    callees = [udp_socket(host) for _ in range(sessions)]
    call_ids = []
    try:
        with LrkClient([node], timeout=2.0, retries=3) as client:
            spec = []
            tag = f"{os.getpid()}-{int(time.time())}"
            for i, (a, b) in enumerate(zip(callers, callees)):
                call_id = f"loadgen-{tag}-{i}"
                client.offer(call_id, "lg-a", a.getsockname()[:2])
                call_ids.append(call_id)
                ans = client.answer(call_id, "lg-a", "lg-b", b.getsockname()[:2])
                spec.append((a.fileno(), b.fileno(), (ans["relay"]["ip"], ans["relay"]["port"])))
            gen = LoadGen(spec)
            try:
                return gen.run(rate, duration, grace)
            finally:
                gen.close()
                for call_id in call_ids:
                    try:
                        client.delete(call_id)
                    except Exception:
                        pass
    finally:
        for s in callers + callees:
            s.close()


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.loadgen", description=__doc__.split("\n")[0])
    p.add_argument("--serve", action="store_true", help="JSON-lines protocol on stdin/stdout")
    p.add_argument("--node", help="relay control address, e.g. udp:127.0.0.1:22222")
    p.add_argument("--sessions", type=int, default=1)
    p.add_argument("--rate", type=float, default=10000.0, help="total packets/s offered")
    p.add_argument("--duration", type=float, default=1.0, help=f"seconds (<= {MAX_DURATION})")
    p.add_argument("--grace", type=float, default=0.3, help="receive drain after sending, s")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    args = p.parse_args(argv)
    if args.serve:
        return serve()
    if not args.node:
        p.error("--node is required unless --serve")
    if not 1 <= args.sessions <= 5000:
        p.error("--sessions must be 1..5000")
    result = standalone(args.node, args.sessions, args.rate, args.duration, args.grace)
    if args.json:
        print(json.dumps(result))
    else:
        print(f"offered {result['rate']:.0f} pkt/s, achieved {result['achieved_rate']:.0f}; "
              f"sent {result['sent']} received {result['received']} "
              f"loss {100 * result['loss']:.2f}% damaged {result['damaged']}/{result['checked']}"
              + ("  [GENERATOR-LIMITED]" if result["generator_limited"] else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
