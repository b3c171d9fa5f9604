"""RTP call generator and receiver: N two-way G.711 calls through a relay, with loss,
reordering, latency and jitter per stream (loopback or namespaces others create).

Every call has two streams, caller -> relay -> callee (stream 2i) and callee -> relay
-> caller (stream 2i+1).  A stream is a real RTP stream: its own SSRC, sequence
numbers +1 per packet (wrapping at 16 bits), RTP timestamp +160 per packet, marker bit
on the first packet of a run, payload type 0 (PCMU), 160 bytes of payload -> 172-byte
packets.  The payload starts with a tag (send time from ``time.monotonic_ns()``, the
stream id, the run id), the rest is a filler fixed per stream, so the receiver can
compute the one-way latency and tell damaged packets apart.

The receiver side is sans-IO (:class:`ReceiverStats`, :class:`StreamStats`: they take
bytes and an arrival time) so it is tested without sockets or sleeps.  :class:`CallGen`
is the I/O shell: batched sendmmsg/recvmmsg through cffi (``fastpath.worker.mmsg``), packets
patched in place in preallocated buffers (one ``struct.pack_into`` per packet).

Pacing: all streams together form one round-robin schedule of a total rate R
(paced mode: R = 50 packets/s x streams, which spreads the streams' phases evenly over
the 20 ms; flat-out mode: any R).  A loop sends what is due in ~1 ms ticks and
receives in between; when it falls behind by more than `MAX_BACKLOG` it skips the
backlog (skipped sends consume no sequence numbers) and ``generator_limited`` tells
that the generator, not the relay, missed the offered rate.

Latency is measured by the generator: arrival is taken right after recvmmsg returns,
so it includes the generator's own receive delay (an upper bound of what the relay
adds).  Two jitters per stream: ``jitter_ms`` is RFC 3550's interarrival jitter (RTP
timestamp vs arrival; it includes the generator's send-time quantisation to its ~1 ms
tick and is meaningless in flat-out mode), ``added_jitter_ms`` is the same filter on
the one-way latency, i.e. what the path itself adds.

Hard caps: duration <= 30 s, calls <= 20,000, rate <= 2,000,000 packets/s, grace <= 2 s.

    # standalone: sets up N calls on a running relay, 50 pkt/s per stream for D s
    python -m bench.callgen --node udp:127.0.0.1:22222 --calls 20 --duration 2
    python -m bench.callgen --node udp:127.0.0.1:22222 --calls 20 --rate 200000 --duration 2

    # driven by another process: JSON lines on stdin/stdout, sockets inherited by fd
    python -m bench.callgen --serve
"""

from __future__ import annotations

import argparse
import errno
import json
import math
import os
import random
import select
import socket
import struct
import sys
import time
from typing import IO, Any, Dict, List, Optional, Sequence, Tuple

from bench import jsonlines

Addr = Tuple[str, int]
#: (caller_fd, callee_fd, address the caller sends to, address the callee sends to)
CallSpec = Tuple[int, int, Addr, Addr]

MAX_DURATION = 30.0
MAX_CALLS = 20_000
MAX_STREAMS = 2 * MAX_CALLS
MAX_RATE = 2_000_000
MAX_GRACE = 2.0
#: commands a --serve process answers before it exits by itself
MAX_COMMANDS = 1000

PT_PCMU = 0
PTIME_PPS = 50  # 20 ms ptime
SAMPLES = 160  # RTP timestamp units (8 kHz) per packet
HEADER_BYTES = 12
PAYLOAD_BYTES = 160
PACKET_BYTES = HEADER_BYTES + PAYLOAD_BYTES  # 172
#: payload tag: send time (ns, CLOCK_MONOTONIC), stream id, run id
TAG_BYTES = 16
FILLER_OFF = HEADER_BYTES + TAG_BYTES  # 28
MIN_PACKET = FILLER_OFF  # shorter: cannot be one of ours
#: RTP timestamp units per ns (8 kHz)
NS_PER_TS = 125_000.0

#: pacing tick, seconds
TICK = 0.001
#: longest stall (s) whose backlog is still sent; beyond it the backlog is skipped
MAX_BACKLOG = 0.02
#: a pacing-loop iteration later than this (s) counts as a stall of the generator
STALL = 0.005
#: the drain after sending ends after this long without a packet (or at the grace end)
QUIET = 0.05
#: sends between two reads when behind schedule: 2 ticks' worth, within these bounds
CHUNK_MIN = 64
CHUNK_MAX = 512
#: recvmmsg vector length and slot size
BATCH = 256
SLOT = 2048
#: an achieved send rate below this fraction of the offered rate flags generator_limited
GENERATOR_SLACK = 0.97
#: duplicates are recognised within this many sequence numbers below the highest seen
DUP_WINDOW = 62
_DUP_MASK = (1 << DUP_WINDOW) - 1

_HDR = struct.Struct("!BBHII")  # first byte, marker|pt, seq, ts, ssrc
_TAG = struct.Struct("!QII")  # send ns, stream id, run id
_PATCH = struct.Struct("!BHIIQ")  # at offset 1: marker|pt, seq, ts, ssrc, send ns

MSG_DONTWAIT = int(getattr(socket, "MSG_DONTWAIT", 0x40))
_AGAIN = (errno.EAGAIN, errno.EWOULDBLOCK)


class CallGenError(ValueError):
    """A bad argument or command of the call generator (the message says what is allowed)."""


def filler(stream_id: int) -> bytes:
    """The payload bytes after the tag: fixed per stream, so damage and mix-ups show."""
    return bytes(((stream_id * 131 + i * 7 + 0x55) & 0xFF) for i in range(PACKET_BYTES
                                                                            - FILLER_OFF))


def build_packet(stream_id: int, ssrc: int, seq: int, ts: int, send_ns: int, run_id: int = 0,
                 marker: bool = False, pt: int = PT_PCMU) -> bytes:
    """One generator packet (the receiver tests build their synthetic streams with it)."""
    head = _HDR.pack(0x80, (0x80 if marker else 0) | (pt & 0x7F), seq & 0xFFFF,
                     ts & 0xFFFFFFFF, ssrc & 0xFFFFFFFF)
    return head + _TAG.pack(send_ns & 0xFFFFFFFFFFFFFFFF, stream_id, run_id) + filler(stream_id)


# ---------------------------------------------------------------------------
# sans-IO receiver statistics


class LatencyHistogram:
    """Log-linear histogram of latencies in µs: exact below 1,024 µs, then 512 buckets
    per power of two (< 0.2 % error) up to ~30 s; fixed memory whatever the count."""

    LINEAR = 1024
    SUB = 512
    OCTAVES = 16
    SIZE = LINEAR + OCTAVES * SUB

    __slots__ = ("counts", "n", "total_ns", "min_ns", "max_ns")

    def __init__(self) -> None:
        self.counts = [0] * self.SIZE
        self.n = 0
        self.total_ns = 0
        self.min_ns = -1
        self.max_ns = 0

    def add(self, ns: int) -> None:
        v = ns // 1000
        if v < 1024:
            idx = v
        else:
            e = v.bit_length() - 10
            idx = 1024 + (e - 1) * 512 + ((v >> e) - 512)
            if idx >= self.SIZE:
                idx = self.SIZE - 1
        self.counts[idx] += 1
        self.n += 1
        self.total_ns += ns
        if ns > self.max_ns:
            self.max_ns = ns
        if self.min_ns < 0 or ns < self.min_ns:
            self.min_ns = ns

    @classmethod
    def _value_us(cls, idx: int) -> float:
        """The middle of a bucket, in µs."""
        if idx < cls.LINEAR:
            return idx + 0.5
        e = (idx - cls.LINEAR) // cls.SUB + 1
        m = (idx - cls.LINEAR) % cls.SUB + cls.SUB
        return (m << e) + (1 << e) / 2.0

    def percentile_ms(self, q: float) -> Optional[float]:
        """Nearest-rank percentile (q in [0, 1]) in ms, clamped to the exact min/max."""
        if self.n == 0:
            return None
        rank = max(1, math.ceil(q * self.n))
        if rank >= self.n:
            return self.max_ns / 1e6
        seen = 0
        last = self.SIZE - 1  # also holds everything clamped into it: its middle means nothing
        for idx, c in enumerate(self.counts):
            seen += c
            if seen >= rank:
                if idx == last:
                    return self.max_ns / 1e6
                us = min(max(self._value_us(idx), self.min_ns / 1e3), self.max_ns / 1e3)
                return us / 1e3
        return self.max_ns / 1e6

    def summary(self) -> dict:
        """p50/p90/p99/max/min/mean in ms and the sample count."""
        if self.n == 0:
            return {"samples": 0, "p50": None, "p90": None, "p99": None, "max": None,
                    "min": None, "mean": None}
        return {"samples": self.n,
                "p50": round(self.percentile_ms(0.50), 4),
                "p90": round(self.percentile_ms(0.90), 4),
                "p99": round(self.percentile_ms(0.99), 4),
                "max": round(self.max_ns / 1e6, 4),
                "min": round(self.min_ns / 1e6, 4),
                "mean": round(self.total_ns / self.n / 1e6, 4)}


class StreamStats:
    """One RTP stream as seen by a receiver: RFC 3550 sequence accounting and jitter.

    Fed with the fields of an intact packet by :class:`ReceiverStats` (which does
    the parsing and validation).  Duplicates are recognised within `DUP_WINDOW`
    sequence numbers below the highest; an older packet counts as reordered.
    """

    __slots__ = ("stream_id", "ssrc", "filler", "hist", "received", "duplicates", "reordered",
                 "damaged", "markers", "inconsistent", "negative_latency", "base_ext",
                 "max_ext", "mask", "ts0", "ext0", "last_ts", "last_arrival", "last_lat",
                 "jitter", "added_jitter", "lat_n", "lat_sum", "lat_max", "max_gap")

    def __init__(self, stream_id: int, ssrc: Optional[int] = None,
                 hist: Optional[LatencyHistogram] = None) -> None:
        self.stream_id = stream_id
        self.ssrc = ssrc  # None: taken from the first packet
        self.filler = filler(stream_id)
        self.hist = hist if hist is not None else LatencyHistogram()
        self.received = self.duplicates = self.reordered = self.damaged = 0
        self.markers = self.inconsistent = self.negative_latency = 0
        self.base_ext = self.max_ext = self.mask = 0
        self.ts0 = self.ext0 = self.last_ts = self.last_arrival = self.last_lat = 0
        self.jitter = 0.0  # RFC 3550 J, in timestamp units
        self.added_jitter = 0.0  # the same filter on the one-way latency, ns
        self.lat_n = self.lat_sum = self.lat_max = 0
        self.max_gap = 0  # longest time between two arrivals, ns (a restart's media gap)

    def packet(self, seq: int, ts: int, marker: int, send_ns: int, arrival_ns: int) -> None:
        """Account one intact packet (seq 16-bit, ts 32-bit, times in ns)."""
        if marker:
            self.markers += 1
        if self.received == 0:
            self.base_ext = self.max_ext = self.ext0 = seq
            self.mask = 1
            self.ts0 = ts
            ext = seq
        else:
            delta = (seq - self.max_ext) & 0xFFFF
            if delta == 0:
                self.duplicates += 1
                return
            if delta < 0x8000:  # newer (a gap is loss until proven otherwise)
                ext = self.max_ext + delta
                self.max_ext = ext
                mask = self.mask
                self.mask = 1 if delta >= DUP_WINDOW else (((mask & (_DUP_MASK >> delta))
                                                            << delta) | 1)
            else:  # older than the highest seen
                back = 0x10000 - delta
                ext = self.max_ext - back
                if back < DUP_WINDOW:
                    bit = 1 << back
                    if self.mask & bit:
                        self.duplicates += 1
                        return
                    self.mask |= bit
                self.reordered += 1
                if ext < self.base_ext:
                    self.base_ext = ext
            if ((ts - self.ts0) - (ext - self.ext0) * SAMPLES) & 0xFFFFFFFF:
                self.inconsistent += 1
            dts = (ts - self.last_ts) & 0xFFFFFFFF
            if dts >= 0x80000000:
                dts -= 0x100000000
            between = arrival_ns - self.last_arrival
            if between > self.max_gap:
                self.max_gap = between
            d = between / NS_PER_TS - dts
            self.jitter += (abs(d) - self.jitter) / 16.0
        self.received += 1
        self.last_ts = ts
        self.last_arrival = arrival_ns
        lat = arrival_ns - send_ns
        if lat < 0:
            self.negative_latency += 1
            return
        if self.lat_n:
            self.added_jitter += (abs(lat - self.last_lat) - self.added_jitter) / 16.0
        self.last_lat = lat
        self.lat_n += 1
        self.lat_sum += lat
        if lat > self.lat_max:
            self.lat_max = lat
        self.hist.add(lat)

    @property
    def expected(self) -> int:
        """RFC 3550: extended highest sequence number - lowest seen + 1."""
        return self.max_ext - self.base_ext + 1 if self.received else 0

    @property
    def lost(self) -> int:
        """Gaps below the highest sequence number (losses after it are not visible here)."""
        return max(0, self.expected - self.received)

    @property
    def jitter_ms(self) -> float:
        return self.jitter / 8.0

    @property
    def added_jitter_ms(self) -> float:
        return self.added_jitter / 1e6

    def summary(self) -> dict:
        """This stream's counts, jitters and latency min/mean/max (ms)."""
        return {"stream": self.stream_id, "ssrc": self.ssrc, "received": self.received,
                "expected": self.expected, "lost": self.lost, "reordered": self.reordered,
                "duplicates": self.duplicates, "damaged": self.damaged,
                "markers": self.markers, "inconsistent": self.inconsistent,
                "jitter_ms": round(self.jitter_ms, 4),
                "added_jitter_ms": round(self.added_jitter_ms, 4),
                "latency_mean_ms": (round(self.lat_sum / self.lat_n / 1e6, 4)
                                    if self.lat_n else None),
                "latency_max_ms": round(self.lat_max / 1e6, 4) if self.lat_n else None,
                "max_gap_ms": round(self.max_gap / 1e6, 3)}


def _quantiles(values: List[float]) -> dict:
    if not values:
        return {"p50": None, "max": None}
    values = sorted(values)
    return {"p50": round(values[(len(values) - 1) // 2], 4), "max": round(values[-1], 4)}


class ReceiverStats:
    """Everything a receiver learns from the packets of one run (sans-IO).

    `ssrcs` maps the stream ids to expect to their SSRCs; then a packet of another
    stream id is malformed and one with the wrong SSRC damaged.  Without it streams
    are created as they show up (at most `max_streams`), SSRC from the first packet.
    Packets tagged with another run id are counted as `stale` and otherwise ignored.
    """

    def __init__(self, run_id: int = 0, ssrcs: Optional[Dict[int, int]] = None,
                 max_streams: int = MAX_STREAMS) -> None:
        self.run_id = run_id
        self.hist = LatencyHistogram()
        self.streams: Dict[int, StreamStats] = {}
        self.fixed = ssrcs is not None
        self.max_streams = max_streams
        if ssrcs is not None:
            for sid, ssrc in ssrcs.items():
                self.streams[sid] = StreamStats(sid, ssrc, self.hist)
        self.malformed = self.stale = self.misrouted = 0

    def feed(self, data: bytes, arrival_ns: int, expect: int = -1) -> int:
        """Account one datagram; returns its stream id, or -1 when it was not counted
        in a stream (malformed, stale, misrouted).  `expect`: the only stream id that
        may arrive where this datagram did (-1: any)."""
        return self.feed_from(data, 0, len(data), arrival_ns, expect)

    def feed_from(self, buf: Any, off: int, length: int, arrival_ns: int, expect: int = -1) -> int:
        """`feed` on buf[off:off + length] (a receive buffer, without copying it)."""
        if length < MIN_PACKET:
            self.malformed += 1
            return -1
        b0, mpt, seq, ts, ssrc = _HDR.unpack_from(buf, off)
        if b0 >> 6 != 2:
            self.malformed += 1
            return -1
        send_ns, sid, run = _TAG.unpack_from(buf, off + HEADER_BYTES)
        if run != self.run_id:
            self.stale += 1
            return -1
        st = self.streams.get(sid)
        if st is None:
            if self.fixed or len(self.streams) >= self.max_streams:
                self.malformed += 1
                return -1
            st = self.streams[sid] = StreamStats(sid, None, self.hist)
        if expect >= 0 and sid != expect:
            self.misrouted += 1
            return -1
        if st.ssrc is None:
            st.ssrc = ssrc
        if (length != PACKET_BYTES or b0 != 0x80 or (mpt & 0x7F) != PT_PCMU or ssrc != st.ssrc
                or buf[off + FILLER_OFF: off + PACKET_BYTES] != st.filler):
            st.damaged += 1
            return sid
        st.packet(seq, ts, mpt & 0x80, send_ns, arrival_ns)
        return sid

    def summary(self) -> dict:
        """Totals over the streams, latency percentiles, jitter p50/max over streams."""
        streams = list(self.streams.values())
        got = [s for s in streams if s.received]
        received = sum(s.received for s in streams)
        expected = sum(s.expected for s in streams)
        lost = sum(s.lost for s in streams)
        return {
            "received": received,
            "expected": expected,
            "gaps_lost": lost,
            "gap_loss": round(lost / expected, 6) if expected else 0.0,
            "reordered": sum(s.reordered for s in streams),
            "duplicates": sum(s.duplicates for s in streams),
            "damaged": sum(s.damaged for s in streams),
            "inconsistent": sum(s.inconsistent for s in streams),
            "negative_latency": sum(s.negative_latency for s in streams),
            "malformed": self.malformed,
            "stale": self.stale,
            "misrouted": self.misrouted,
            "streams_heard": len(got),
            "latency_ms": self.hist.summary(),
            "jitter_ms": _quantiles([s.jitter_ms for s in got]),
            "added_jitter_ms": _quantiles([s.added_jitter_ms for s in got]),
        }


# ---------------------------------------------------------------------------
# the I/O shell


class _Stream:
    """Send state of one stream (the receiving end is a StreamStats)."""

    __slots__ = ("sid", "fd", "dest", "ssrc", "seq", "ts", "mpt", "sent", "off", "hdrs",
                 "template", "sock")

    def __init__(self, sid: int, fd: int, dest: Addr, ssrc: int, seq: int, ts: int) -> None:
        self.sid = sid
        self.fd = fd
        self.dest = (str(dest[0]), int(dest[1]))
        self.ssrc = ssrc
        self.seq = seq  # next sequence number, not masked (wraps when packed)
        self.ts = ts
        self.mpt = 0x80 | PT_PCMU
        self.sent = 0
        self.off = 0  # byte offset of this stream's first send slot
        self.hdrs = None
        self.template: Optional[bytearray] = None
        self.sock: Optional[socket.socket] = None


def _check_call(call: Sequence) -> CallSpec:
    try:
        caller, callee, a, b = call
        return (int(caller), int(callee), (str(a[0]), int(a[1])), (str(b[0]), int(b[1])))
    except (TypeError, ValueError, IndexError) as exc:
        raise CallGenError(f"a call is [caller_fd, callee_fd, [ip, port], [ip, port]], got "
                           f"{call!r}") from exc


class CallGen:
    """Two RTP streams per call between sockets given by fd (they stay the caller's).

    `calls`: (caller_fd, callee_fd, where the caller sends, where the callee sends).
    `io`: "mmsg" (cffi), "plain" (sendto/recv) or "auto".  `seed` makes SSRCs,
    first sequence numbers and timestamps reproducible; `first_seq` fixes every
    stream's first sequence number (e.g. 65500 to cross the 16-bit wrap).
    """

    def __init__(self, calls: Sequence[Sequence], io: str = "auto", seed: Optional[int] = None,
                 first_seq: Optional[int] = None) -> None:
        specs = [_check_call(c) for c in calls]
        if not 1 <= len(specs) <= MAX_CALLS:
            raise CallGenError(f"calls must number 1..{MAX_CALLS}, got {len(specs)}")
        if io not in ("auto", "mmsg", "plain"):
            raise CallGenError(f"io must be 'auto', 'mmsg' or 'plain', got {io!r}")
        rng = random.Random(seed)
        self.streams: List[_Stream] = []
        self.expect: Dict[int, int] = {}  # receiving fd -> stream id it should get
        for i, (caller, callee, to_a, to_b) in enumerate(specs):
            for sid, fd, dest, rx in ((2 * i, caller, to_a, callee), (2 * i + 1, callee, to_b,
                                                                       caller)):
                seq = rng.getrandbits(16) if first_seq is None else int(first_seq) & 0xFFFF
                self.streams.append(_Stream(sid, fd, dest, rng.getrandbits(32), seq,
                                            rng.getrandbits(32)))
                if rx in self.expect:
                    raise CallGenError(f"fd {rx} appears twice: every call needs two "
                                       "sockets of its own")
                self.expect[rx] = sid
        self.calls = len(specs)
        self.ssrcs = {s.sid: s.ssrc for s in self.streams}
        self.ffi = self.lib = None
        if io != "plain":
            from fastpath.worker import mmsg

            if mmsg.mmsg_available():
                self.ffi, self.lib = mmsg._load()
            elif io == "mmsg":
                raise CallGenError("io='mmsg' but sendmmsg/recvmmsg are unavailable "
                                   "(cffi missing?); use io='auto' or 'plain'")
        self.io = "mmsg" if self.ffi is not None else "plain"
        n = len(self.streams)
        self.slots = max(2, min(64, 65536 // n))
        self._keep: list = []
        self._socks: Dict[int, socket.socket] = {}
        self.epoll = select.epoll()
        try:
            for fd in self.expect:
                self.epoll.register(fd, select.EPOLLIN)
            if self.ffi is not None:
                self._setup_mmsg()
            else:
                self._setup_plain()
        except BaseException:
            self.close()
            raise
        self.run_id = rng.getrandbits(24) << 8  # runs count up from a random base
        self.receiver = ReceiverStats(self.run_id, self.ssrcs)
        self.recv_errors = 0
        self.rr = 0  # the stream the next round-robin send starts at

    def _template(self, st: _Stream) -> bytes:
        return build_packet(st.sid, st.ssrc, 0, 0, 0, 0)

    def _setup_mmsg(self) -> None:
        from fastpath.worker.mmsg import encode_sockaddr

        ffi = self.ffi
        slots = self.slots
        total = len(self.streams) * slots
        self._shdrs = shdrs = ffi.new("struct mmsghdr[]", total)
        siov = ffi.new("struct iovec[]", total)
        self._sbuf = sbuf = ffi.new("unsigned char[]", total * PACKET_BYTES)
        self._keep += [siov]
        names: Dict[Addr, object] = {}
        for j, st in enumerate(self.streams):
            raw = encode_sockaddr(st.dest)
            name = names.get(st.dest)
            if name is None:
                name = names[st.dest] = ffi.new("char[]", raw)
            st.off = j * slots * PACKET_BYTES
            st.hdrs = shdrs + j * slots
            tmpl = self._template(st)
            for k in range(slots):
                i = j * slots + k
                ffi.memmove(sbuf + i * PACKET_BYTES, tmpl, PACKET_BYTES)
                siov[i].iov_base = sbuf + i * PACKET_BYTES
                siov[i].iov_len = PACKET_BYTES
                h = shdrs[i].msg_hdr
                h.msg_name = name
                h.msg_namelen = len(raw)
                h.msg_iov = siov + i
                h.msg_iovlen = 1
        self._keep.append(list(names.values()))
        view = ffi.buffer(sbuf)
        # slice/pack into a memoryview is the cheap path on CPython, ffi.buffer on PyPy
        self._sview = view if sys.implementation.name == "pypy" else memoryview(view)
        self._rh = rh = ffi.new("struct mmsghdr[]", BATCH)
        riov = ffi.new("struct iovec[]", BATCH)
        self._rbuf = rbuf = ffi.new("unsigned char[]", BATCH * SLOT)
        self._keep.append(riov)
        for i in range(BATCH):
            riov[i].iov_base = rbuf + i * SLOT
            riov[i].iov_len = SLOT
            rh[i].msg_hdr.msg_iov = riov + i
            rh[i].msg_hdr.msg_iovlen = 1
        self._rh_list = [rh[i] for i in range(BATCH)]
        self._rview = ffi.buffer(rbuf)

    def _setup_plain(self) -> None:
        for st in self.streams:
            st.template = bytearray(self._template(st))
            if st.fd not in self._socks:
                self._socks[st.fd] = socket.socket(fileno=st.fd)
            st.sock = self._socks[st.fd]

    def close(self) -> None:
        """Release the epoll object and the fd wrappers; the fds stay open (not ours)."""
        self.epoll.close()
        for sock in self._socks.values():
            sock.detach()
        self._socks.clear()
        for st in self.streams:
            st.sock = None

    def __enter__(self) -> CallGen:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- sending ---------------------------------------------------------------------
    def _send_stream(self, st: _Stream, k: int) -> int:
        """Send k consecutive packets of one stream; returns how many failed.  Packets
        that were not sent consume no sequence numbers (the receiver sees no gap)."""
        pack = _PATCH.pack_into
        now_ns = time.monotonic_ns()
        if self.ffi is None:
            tmpl = st.template
            sock = st.sock
            for _ in range(k):
                pack(tmpl, 1, st.mpt, st.seq & 0xFFFF, st.ts & 0xFFFFFFFF, st.ssrc, now_ns)
                try:
                    sock.sendto(tmpl, MSG_DONTWAIT, st.dest)
                except InterruptedError:
                    continue
                except OSError:
                    return k
                st.mpt = PT_PCMU
                st.seq += 1
                st.ts += SAMPLES
                st.sent += 1
                k -= 1
            return 0
        view = self._sview
        slots = self.slots
        sendmmsg = self.lib.sendmmsg
        retries = 0
        while k > 0:
            n = k if k < slots else slots
            off = st.off + 1
            mpt = st.mpt
            seq = st.seq
            ts = st.ts
            ssrc = st.ssrc
            for _ in range(n):
                pack(view, off, mpt, seq & 0xFFFF, ts & 0xFFFFFFFF, ssrc, now_ns)
                mpt = PT_PCMU
                seq += 1
                ts += SAMPLES
                off += PACKET_BYTES
            r = sendmmsg(st.fd, st.hdrs, n, MSG_DONTWAIT)
            if r < 0:
                e = self.ffi.errno
                retries += 1
                # EINTR, or a pending ICMP error about an earlier datagram: retry (bounded)
                if e in (errno.EINTR, errno.ECONNREFUSED) and retries <= 3:
                    continue
                return k  # EAGAIN (buffer full) or worse: the rest of this burst fails
            st.mpt = PT_PCMU
            st.seq += r
            st.ts += SAMPLES * r
            st.sent += r
            k -= r
        return 0

    def _send(self, due: int) -> int:
        """`due` packets round-robin over the streams from the rotating start `self.rr`;
        returns how many failed."""
        streams = self.streams
        ns = len(streams)
        per, extra = divmod(due, ns)
        rr = self.rr
        failed = 0
        send = self._send_stream
        if per == 0:
            j = rr
            for _ in range(extra):
                failed += send(streams[j], 1)
                j += 1
                if j == ns:
                    j = 0
        else:
            for j in range(ns):
                k = per + (1 if (j - rr) % ns < extra else 0)
                failed += send(streams[j], k)
        self.rr = (rr + extra) % ns
        return failed

    # -- receiving -------------------------------------------------------------------
    def _drain(self, fd: int, feed) -> int:
        """Read everything queued on one socket into `feed`; returns the datagrams read."""
        expect = self.expect[fd]
        got = 0
        if self.ffi is None:
            sock = self._socks.get(fd)
            if sock is None:
                sock = self._socks[fd] = socket.socket(fileno=fd)
            for _ in range(1 << 20):
                try:
                    data = sock.recv(SLOT, MSG_DONTWAIT)
                except BlockingIOError:
                    break
                except InterruptedError:
                    continue
                except OSError:
                    self.recv_errors += 1
                    break
                got += 1
                if feed is not None:
                    feed(data, 0, len(data), time.monotonic_ns(), expect)
            return got
        recvmmsg = self.lib.recvmmsg
        rh = self._rh
        rl = self._rh_list
        view = self._rview
        null = self.ffi.NULL
        for _ in range(1 << 16):
            n = recvmmsg(fd, rh, BATCH, MSG_DONTWAIT, null)
            if n <= 0:
                if n < 0:
                    e = self.ffi.errno
                    if e == errno.EINTR:
                        continue
                    if e not in _AGAIN:
                        self.recv_errors += 1  # a soft error (ICMP) is consumed; retry
                        continue
                break
            got += n
            if feed is not None:
                arrival = time.monotonic_ns()
                off = 0
                for i in range(n):
                    feed(view, off, rl[i].msg_len, arrival, expect)
                    off += SLOT
            if n < BATCH:
                break
        return got

    def _poll(self, timeout: float) -> int:
        got = 0
        feed = self.receiver.feed_from
        for fd, _ev in self.epoll.poll(max(timeout, 0.0)):
            got += self._drain(fd, feed)
        return got

    def flush_stale(self) -> int:
        """Discard what is still queued (late packets of an earlier run)."""
        return sum(self._drain(fd, None) for fd in self.expect)

    # -- a run -----------------------------------------------------------------------
    def run(self, duration: float, pps_per_stream: Optional[float] = None,
            rate: Optional[float] = None, grace: float = 0.3, detail: bool = False) -> dict:
        """Send for `duration` s at `pps_per_stream` per stream (paced, default 50) or at
        a total `rate` over all streams (flat-out); returns the result dict."""
        ns = len(self.streams)
        if rate is not None and pps_per_stream is not None:
            raise CallGenError("give either pps_per_stream (paced) or rate (flat-out), "
                               "not both")
        mode = "flat" if rate is not None else "paced"
        total_rate = float(rate) if rate is not None else float(
            PTIME_PPS if pps_per_stream is None else pps_per_stream) * ns
        duration = float(duration)
        if not 0 < total_rate <= MAX_RATE:
            raise CallGenError(f"total rate must be in (0, {MAX_RATE}] packets/s, got "
                               f"{total_rate:.0f} ({ns} streams)")
        if not 0 < duration <= MAX_DURATION:
            raise CallGenError(f"duration must be in (0, {MAX_DURATION}] s, got {duration}")
        grace = min(max(float(grace), 0.0), MAX_GRACE)
        stale = self.flush_stale()
        self.run_id = (self.run_id + 1) & 0xFFFFFFFF
        self.receiver = rx = ReceiverStats(self.run_id, self.ssrcs)
        self.recv_errors = 0
        self.rr = 0
        for st in self.streams:
            st.sent = 0
            st.mpt = 0x80 | PT_PCMU  # a new talk spurt: marker on its first packet
        if self.ffi is not None:
            tag = struct.pack("!I", self.run_id)
            view = self._sview
            for i in range(ns * self.slots):
                view[i * PACKET_BYTES + 24: i * PACKET_BYTES + 28] = tag
        else:
            for st in self.streams:
                struct.pack_into("!I", st.template, 24, self.run_id)

        max_burst = max(int(total_rate * MAX_BACKLOG), ns, 1)
        # at most this many sends between two reads: receive queues stay short and the
        # arrival times honest when the generator runs behind (flat-out)
        chunk = min(max(int(total_rate * 2 * TICK), CHUNK_MIN), CHUNK_MAX)
        total = int(total_rate * duration)
        monotonic = time.monotonic
        poll = self._poll
        send = self._send
        scheduled = skipped = failed = received = stalls = 0
        max_gap = 0.0
        t0 = monotonic()
        end = t0 + duration
        hard_end = end + 1.0  # the loop ends by then whatever happens
        last = t0
        while scheduled < total:
            now = monotonic()
            gap = now - last
            last = now
            if gap > max_gap:
                max_gap = gap
            if gap > STALL:
                stalls += 1
            due = (total if now >= end else int((now - t0) * total_rate)) - scheduled
            if due > max_burst:  # we stalled: skip the backlog rather than burst it
                skipped += due - max_burst
                scheduled += due - max_burst
                due = max_burst
            if due > chunk:  # behind: send a chunk, read what came back, go on
                scheduled += chunk
                failed += send(chunk)
                if now < hard_end:
                    received += poll(0.0)
                    continue
            elif due > 0:
                scheduled += due
                failed += send(due)
            if scheduled >= total or now >= hard_end:
                break
            after = monotonic() - t0
            wake = max((int(after / TICK) + 1) * TICK, (scheduled + 1) / total_rate)
            received += poll(min(wake - after, TICK * 20))
        send_end = monotonic()
        sent = sum(st.sent for st in self.streams)
        deadline = send_end + grace
        quiet_since = send_end
        while received < sent:
            now = monotonic()
            if now >= deadline or now - quiet_since >= QUIET:
                break
            got = poll(min(deadline - now, QUIET / 5))
            if got:
                received += got
                quiet_since = monotonic()
        wall = send_end - t0
        achieved = sent / wall if wall > 0 else 0.0
        summary = rx.summary()
        intact = summary["received"]
        by_dir = [0, 0]
        silent = 0
        min_rx = None
        for st in self.streams:
            got = rx.streams[st.sid].received
            by_dir[st.sid & 1] += got
            if st.sent and not got:
                silent += 1
            min_rx = got if min_rx is None else min(min_rx, got)
        result = {
            "mode": mode,
            "calls": self.calls,
            "streams": ns,
            "duration": duration,
            "rate": total_rate,
            "pps_per_stream": round(total_rate / ns, 3),
            "sent": sent,
            "datagrams": received,
            "lost": max(0, sent - intact),
            "loss": round(max(0.0, 1.0 - intact / sent), 6) if sent else 1.0,
            **summary,
            "received_caller_to_callee": by_dir[0],
            "received_callee_to_caller": by_dir[1],
            "silent_streams": silent,
            "min_stream_received": min_rx or 0,
            "achieved_rate": round(achieved, 1),
            "achieved_per_stream": round(achieved / ns, 3),
            "generator_limited": achieved < GENERATOR_SLACK * total_rate,
            "skipped": skipped,
            "send_failed": failed,
            "recv_errors": self.recv_errors,
            "stale_flushed": stale,
            "stalls": stalls,
            "max_gap_ms": round(max_gap * 1e3, 2),
            "send_wall": round(wall, 4),
            "drain_wall": round(monotonic() - send_end, 4),
            "run_id": self.run_id,
            "io": self.io,
            "impl": sys.implementation.name,
        }
        if detail:
            per = []
            for st in self.streams:
                d = rx.streams[st.sid].summary()
                d["sent"] = st.sent
                d["call"] = st.sid // 2
                d["direction"] = "callee_to_caller" if st.sid & 1 else "caller_to_callee"
                per.append(d)
            result["per_stream"] = per
        return result


# ---------------------------------------------------------------------------
# command line


def _run_args(cmd: dict) -> dict:
    rate = cmd.get("rate")
    pps = cmd.get("pps_per_stream")
    if rate is None and pps is None:
        pps = PTIME_PPS
    return {"duration": cmd["duration"], "pps_per_stream": pps, "rate": rate,
            "grace": cmd.get("grace", 0.3), "detail": bool(cmd.get("detail", False))}


def serve(stdin: Optional[IO[str]] = None, stdout: Optional[IO[str]] = None) -> int:
    """JSON lines (`bench.jsonlines`): {"cmd": "setup", "calls": [[caller_fd, callee_fd,
    [ip, port], [ip, port]], ...], "io": "auto", "seed": null, "first_seq": null},
    {"cmd": "run", "duration": D, "pps_per_stream": 50 | "rate": R, "grace": G,
    "detail": false}, {"cmd": "quit"}."""
    gen: Optional[CallGen] = None

    def handle(cmd: dict) -> dict:
        nonlocal gen
        op = cmd.get("cmd")
        if op == "setup":
            if gen is not None:
                gen.close()
                gen = None
            gen = CallGen(cmd["calls"], cmd.get("io", "auto"), cmd.get("seed"),
                          cmd.get("first_seq"))
            return {"io": gen.io, "calls": gen.calls, "streams": len(gen.streams),
                    "python": sys.executable, "impl": sys.implementation.name}
        if op == "run":
            if gen is None:
                raise CallGenError("run before setup: send a setup command first")
            return gen.run(**_run_args(cmd))
        raise CallGenError(f"unknown command {op!r}: setup, run or quit")

    try:
        jsonlines.serve(handle, MAX_COMMANDS, stdin, stdout)
    finally:
        if gen is not None:
            gen.close()
    return 0


class CallGenProcess(jsonlines.ChildProcess):
    """The driving side of ``--serve``: a child process (PyPy by default, the faster
    generator) that inherits the sockets by fd.  A context manager that always ends it."""

    def __init__(self, socks: Sequence[socket.socket], python: Optional[str] = None) -> None:
        from bench.interpreters import pypy_or_current

        self.python = python or pypy_or_current()
        super().__init__("bench.callgen", socks, self.python, CallGenError, "call generator")
        self.info: dict = {}

    def setup(self, calls: Sequence[Sequence], **options: object) -> dict:
        """`calls` as for CallGen (fds valid in the child: inherited, same numbers)."""
        spec = [[int(c[0]), int(c[1]), [c[2][0], int(c[2][1])], [c[3][0], int(c[3][1])]]
                for c in calls]
        self.info = self.command({"cmd": "setup", "calls": spec, **options}, timeout=120.0)
        return self.info

    def run(self, duration: float, pps_per_stream: Optional[float] = None,
            rate: Optional[float] = None, grace: float = 0.3, detail: bool = False) -> dict:
        """One run in the child (see CallGen.run); its timeout covers duration + grace."""
        cmd: dict = {"cmd": "run", "duration": duration, "grace": grace, "detail": detail}
        if rate is not None:
            cmd["rate"] = rate
        if pps_per_stream is not None:
            cmd["pps_per_stream"] = pps_per_stream
        return self.command(cmd, timeout=min(float(duration), MAX_DURATION) + MAX_GRACE + 30.0)


def _raise_nofile(need: int) -> None:
    """Two sockets per call: lift the soft fd limit towards the hard one if needed."""
    try:
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft != resource.RLIM_INFINITY and soft < need:
            new = need if hard == resource.RLIM_INFINITY else min(need, hard)
            resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
    except (ImportError, ValueError, OSError):
        pass


def standalone(node: str, calls: int, duration: float, pps_per_stream: Optional[float] = None,
               rate: Optional[float] = None, grace: float = 0.3, host: str = "127.0.0.1",
               detail: bool = False, warmup: float = 0.0) -> dict:
    """Set up `calls` calls on a running relay (offer/answer), run once, delete them.
    A `warmup` run (s, same load, result discarded) lets PyPy's JIT compile first."""
    from bench.loadgen import udp_socket
    from lrk.client import LrkClient

    if not 1 <= calls <= MAX_CALLS:
        raise CallGenError(f"calls must be 1..{MAX_CALLS}, got {calls}")
    _raise_nofile(2 * calls + 256)
    socks: List[socket.socket] = []
    call_ids: List[str] = []
    try:
        with LrkClient([node], timeout=2.0, retries=3) as client:
            try:
                spec = []
                tag = f"{os.getpid()}-{int(time.time())}"
                for i in range(calls):
                    a, b = udp_socket(host), udp_socket(host)
                    socks += [a, b]
                    call_id = f"callgen-{tag}-{i}"
                    offer = client.offer(call_id, "cg-a", a.getsockname()[:2])
                    call_ids.append(call_id)
                    ans = client.answer(call_id, "cg-a", "cg-b", b.getsockname()[:2])
                    spec.append((a.fileno(), b.fileno(),
                                 (ans["relay"]["ip"], ans["relay"]["port"]),
                                 (offer["relay"]["ip"], offer["relay"]["port"])))
                with CallGen(spec) as gen:
                    if warmup > 0:
                        gen.run(min(warmup, MAX_DURATION), pps_per_stream, rate, grace)
                    return gen.run(duration, pps_per_stream, rate, grace, detail)
            finally:
                for call_id in call_ids:
                    try:
                        client.delete(call_id)
                    except Exception:
                        pass
    finally:
        for s in socks:
            s.close()


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.callgen",
                                description=__doc__.split("\n")[0])
    p.add_argument("--serve", action="store_true", help="JSON-lines protocol on stdin/stdout")
    p.add_argument("--node", help="relay control address, e.g. udp:127.0.0.1:22222")
    p.add_argument("--calls", type=int, default=1, help=f"concurrent calls (<= {MAX_CALLS})")
    p.add_argument("--duration", type=float, default=1.0, help=f"seconds (<= {MAX_DURATION})")
    p.add_argument("--pps", type=float, default=None,
                   help="packets/s per stream, paced (default 50)")
    p.add_argument("--rate", type=float, default=None,
                   help="flat-out: total packets/s over all streams")
    p.add_argument("--grace", type=float, default=0.3, help="receive drain after sending, s")
    p.add_argument("--warmup", type=float, default=0.0,
                   help="a discarded run of this many seconds first (JIT warm-up)")
    p.add_argument("--detail", action="store_true", help="add per-stream figures")
    args = p.parse_args(argv)
    if args.serve:
        return serve()
    if not args.node:
        p.error("--node is required unless --serve")
    if args.pps is not None and args.rate is not None:
        p.error("--pps and --rate exclude each other")
    try:
        result = standalone(args.node, args.calls, args.duration, args.pps, args.rate,
                            args.grace, detail=args.detail, warmup=args.warmup)
    except CallGenError as exc:
        p.error(str(exc))
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
