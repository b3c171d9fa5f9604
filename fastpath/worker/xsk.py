"""AF_XDP sockets for userspace media: frames from the driver's XDP hook, no skb, no syscall
per packet (worker side).

An AF_XDP socket (XSK) is bound to one interface queue. An XDP program steers chosen
frames into it (:mod:`fastpath.xdp.steer`), the kernel copies each into the socket's
UMEM (copy mode: veth and most virtual NICs) and publishes a descriptor on the RX ring;
frames written into the UMEM and published on the TX ring leave the interface as they
are, past routing, netfilter and qdiscs. Four rings, all shared memory:

* fill (userspace -> kernel): free UMEM frames the kernel may receive into;
* RX (kernel -> userspace): received frames (address, length);
* TX (userspace -> kernel): frames to send;
* completion (kernel -> userspace): sent frames, free again.

This module is the socket and its rings, no policy: :class:`XskSocket` hands out RX
descriptors, takes TX descriptors and keeps the frame accounting (RX frames go back to
the fill ring when released, TX frames come from a free list refilled by the
completion ring). Ring indices are free-running u32 counters; the producer and consumer
words are plain loads and stores, which x86-64's memory order makes safe without
fences (the module refuses other architectures rather than guess).

Syscalls through cffi in ABI mode (socket, setsockopt, getsockopt, bind, sendto, poll),
so the same code runs on PyPy and CPython; the rings and UMEM are ``mmap`` objects, read
through cffi pointers on PyPy (plain loads and stores once compiled) and memoryview casts
on CPython (cheaper there).
"""

from __future__ import annotations

import contextlib
import errno
import mmap
import os
import platform
import struct
import threading
import time
from typing import Dict, List, Optional, Tuple

from cffi import FFI

from fastpath.errors import LrkError

__all__ = ["XskError", "XskSocket", "memmove", "ring_per_queue", "xsk_available"]

AF_XDP = 44
SOCK_RAW = 3
SOL_XDP = 283
XDP_MMAP_OFFSETS = 1
XDP_RX_RING = 2
XDP_TX_RING = 3
XDP_UMEM_REG = 4
XDP_UMEM_FILL_RING = 5
XDP_UMEM_COMPLETION_RING = 6
XDP_STATISTICS = 7
XDP_COPY = 1 << 1
XDP_USE_NEED_WAKEUP = 1 << 3
XDP_RING_NEED_WAKEUP = 1
XDP_PGOFF_RX_RING = 0
XDP_PGOFF_TX_RING = 0x80000000
XDP_UMEM_PGOFF_FILL_RING = 0x100000000
XDP_UMEM_PGOFF_COMPLETION_RING = 0x180000000
MSG_DONTWAIT = 0x40

#: struct xdp_mmap_offsets: rx, tx, fill, completion; each producer, consumer, desc, flags
_OFFSETS = struct.Struct("16Q")
_UMEM_REG = struct.Struct("QQIII")  # addr, len, chunk_size, headroom, flags
#: the same with tx_metadata_len (Linux 6.8; its flag since 6.11)
_UMEM_REG_META = struct.Struct("QQIIII")
XDP_UMEM_TX_SW_CSUM = 1 << 1
XDP_UMEM_TX_METADATA_LEN = 1 << 2
#: struct xsk_tx_metadata: u64 flags; request {u16 csum_start, u16 csum_offset, u64
#: launch_time}; it sits right before a TX frame's first byte when XDP_TX_METADATA is set
TX_META_LEN = 24
XDP_TX_METADATA = 1 << 1
XDP_TXMD_FLAGS_CHECKSUM = 1 << 1
#: who computes the UDP checksum of frames sent: the device or the kernel's transmit
#: path ("offload": a checksum-offloading NIC in hardware, veth never, like a UDP
#: socket's own packets), the kernel in software before the frame leaves ("kernel"), or
#: the worker while it writes the frame ("worker": kernels before 6.11)
TX_CHECKSUM = ("offload", "kernel", "worker")
#: RX slots of one interface (af_xdp_ring), shared by its queues' sockets. Each socket
#: has that many fill slots and frames, and as many again for sending (2 KiB frames: 64
#: MiB of UMEM an interface at the default). The default holds 33 ms of 500,000 pkt/s: a
#: worker's JIT compiles a new path of the packet loop in 10-56 ms, and with 4,096 slots
#: (8 ms) a rate the worker carried lost packets whenever that happened in a step.
RING_DEFAULT = 16384
RING_MIN = 512
RING_MAX = 65536
#: receive queues of an interface that get a socket: the steering program's queue ->
#: socket map holds this many (steer.bpf.c: xsks)
MAX_QUEUES = 64
_SOCKADDR = struct.Struct("HHIII")  # family, flags, ifindex, queue_id, shared_umem_fd
_STATS = struct.Struct("6Q")


def _umem_error(err: int, size: int) -> XskError:
    """What a refused UMEM registration means; ENOBUFS is the pinned-memory limit."""
    if err == errno.ENOBUFS:
        return PinnedMemoryError(
            f"setsockopt(XDP_UMEM_REG): the UMEM ({size >> 20} MiB) is more pinned memory "
            "than RLIMIT_MEMLOCK allows: give the relay CAP_IPC_LOCK (or "
            "LimitMEMLOCK=infinity under systemd), or lower af_xdp_ring")
    return XskError(f"setsockopt(XDP_UMEM_REG): {os.strerror(err)}")


def ring_per_queue(ring: int, queues: int) -> int:
    """Each queue's share of an interface's `ring` RX slots: a power of two, halved
    until the queues' rings together hold no more than `ring`, never below RING_MIN
    (RSS spreads the traffic, so each queue needs that share of the buffer)."""
    per = RING_MIN
    while per * 2 <= ring and per * 2 * max(1, queues) <= ring:
        per *= 2
    return per

_CDEF = """
int socket(int domain, int type, int protocol);
int setsockopt(int fd, int level, int name, const void *val, unsigned int len);
int getsockopt(int fd, int level, int name, void *val, unsigned int *len);
int bind(int fd, const void *addr, unsigned int len);
long sendto(int fd, const void *buf, size_t len, int flags, const void *addr, unsigned int alen);
long recvfrom(int fd, void *buf, size_t len, int flags, void *addr, unsigned int *alen);
int close(int fd);
"""

_ffi = FFI()
_libc = None
_PYPY = platform.python_implementation() == "PyPy"
#: copy bytes into a cffi pointer (the UMEM's, from XskSocket.pointer)
memmove = _ffi.memmove
_lock = threading.Lock()


class XskError(LrkError):
    """An AF_XDP socket could not be made or bound; the message names the capability."""


class PinnedMemoryError(XskError):
    """The UMEM is more pinned memory than the relay may lock (RLIMIT_MEMLOCK)."""


def _load():
    global _libc
    with _lock:
        if _libc is None:
            _ffi.cdef(_CDEF)
            _libc = _ffi.dlopen(None)
    return _libc


def xsk_available() -> Optional[str]:
    """None when AF_XDP sockets can be made here, else why not (one line)."""
    if platform.machine() not in ("x86_64", "AMD64"):
        return f"AF_XDP rings without fences need x86-64's memory order, not {platform.machine()}"
    lib = _load()
    fd = lib.socket(AF_XDP, SOCK_RAW, 0)
    if fd < 0:
        return f"socket(AF_XDP): {os.strerror(_ffi.errno)} (a kernel with CONFIG_XDP_SOCKETS)"
    lib.close(fd)
    return None


class _Ring:
    """One mmap'ed ring: producer, consumer and flags words (indices into `words`) and a
    descriptor array of `size` (a power of two) entries. The socket keeps its own side's
    index apart and publishes it.

    `words` and `desc` are indexed like arrays of u32 and u64. On PyPy they are cffi
    pointers into the map, which its JIT turns into plain loads and stores (an item of a
    cast memoryview costs about 120 ns there, a few of them a packet); on CPython cast
    memoryviews, faster there than cffi's indexing."""

    def __init__(self, fd: int, size: int, pgoff: int, off: Tuple[int, int, int, int],
                 desc_size: int) -> None:
        prod, cons, desc, flags = off
        self.map = mmap.mmap(fd, desc + size * desc_size, mmap.MAP_SHARED,
                             mmap.PROT_READ | mmap.PROT_WRITE, offset=pgoff)
        # u64 slots: two per RX/TX descriptor (address; length and options), one per
        # fill/completion entry (an address)
        self._buf = None
        if _PYPY:
            self._buf = _ffi.from_buffer(self.map)
            self.words = _ffi.cast("uint32_t *", self._buf)
            self.desc = _ffi.cast("uint64_t *", self._buf + desc)
        else:
            self.words = memoryview(self.map).cast("I")
            self.desc = memoryview(self.map)[desc:desc + size * desc_size].cast("Q")
        self.prod = prod // 4
        self.cons = cons // 4
        self.flags = flags // 4
        self.size = size
        self.mask = size - 1

    def need_wakeup(self) -> bool:
        return bool(self.words[self.flags] & XDP_RING_NEED_WAKEUP)

    def close(self) -> None:
        if self._buf is not None:
            self.words = self.desc = None
            _ffi.release(self._buf)
            self._buf = None
        else:
            self.desc.release()
            self.words.release()
        self.map.close()


class XskSocket:
    """An AF_XDP socket on `ifindex` queue `queue` with a UMEM of its own.

    `frames` frames of `frame_size` bytes: `ring` of them are given to the fill ring for
    receiving, the rest kept for sending. A queue another socket still holds is waited
    for up to `bind_wait` seconds (the kernel releases a closed socket's queue later).
    Receive with :meth:`rx` (descriptors, then :meth:`release` them), send with
    :meth:`tx_frame` + :meth:`tx_put` + :meth:`kick`; with TX metadata (``tx_meta``
    bytes, `tx_checksum` not "worker") a frame that wants its checksum completed has
    struct xsk_tx_metadata written at ``offset - tx_meta`` and ``tx_options`` in its
    length, else it leaves as written. Counters: ``rx_packets``,
    ``tx_packets``, ``tx_no_frame`` (no free frame or ring slot: the caller's fallback
    sends it), ``tx_errors`` (kicks the kernel refused, by errno name), and the kernel's own
    (:meth:`kernel_stats`).
    """

    def __init__(self, ifindex: int, queue: int = 0, frames: int = 4096,
                 frame_size: int = 2048, ring: int = 2048, copy: bool = True,
                 bind_wait: float = 2.0, tx_checksum: str = "offload") -> None:
        if tx_checksum not in TX_CHECKSUM:
            raise ValueError(f"tx_checksum must be one of {', '.join(TX_CHECKSUM)}, "
                             f"not {tx_checksum!r}")
        for name, v in (("frames", frames), ("ring", ring), ("frame_size", frame_size)):
            if v <= 0 or v & (v - 1):
                raise ValueError(f"{name} must be a power of two, got {v}")
        if frames < 2 * ring:
            raise ValueError(f"frames ({frames}) must be at least twice ring ({ring})")
        why = xsk_available()
        if why:
            raise XskError(why)
        lib = _load()
        fd = lib.socket(AF_XDP, SOCK_RAW, 0)
        if fd < 0:
            raise XskError(f"socket(AF_XDP): {os.strerror(_ffi.errno)}")
        self.fd = fd
        self.ifindex = ifindex
        self.queue = queue
        self.frame_size = frame_size
        self.rx_packets = 0
        self.tx_packets = 0
        self.tx_no_frame = 0
        self.tx_errors: Dict[str, int] = {}
        #: who computes sent frames' UDP checksums (see TX_CHECKSUM): what was asked for,
        #: or "worker" where the kernel has no TX metadata
        self.tx_checksum = tx_checksum
        #: bytes of struct xsk_tx_metadata before each TX frame (0: none, the worker sums)
        self.tx_meta = 0
        #: what a TX descriptor's length word carries to say its frame has metadata
        self.tx_options = 0
        self._frame_mask = ~(frame_size - 1)
        self._rings: List[_Ring] = []
        self.umem: Optional[mmap.mmap] = None
        try:
            self._setup(lib, frames, frame_size, ring, copy, bind_wait)
        except BaseException:
            self.close()
            raise

    def _sockopt(self, lib, name: int, value: bytes, what: str) -> None:
        buf = _ffi.new("char[]", value)
        if lib.setsockopt(self.fd, SOL_XDP, name, buf, len(value)) < 0:
            raise XskError(f"setsockopt({what}): {os.strerror(_ffi.errno)}")

    def _register_umem(self, lib, addr: int, size: int, frame_size: int) -> None:
        """Register the UMEM, with room for TX metadata when the checksum is not the
        worker's; a kernel without TX metadata (EINVAL: an unknown flag) gets the plain
        registration and the worker sums."""
        if self.tx_checksum != "worker":
            flags = XDP_UMEM_TX_METADATA_LEN | (
                XDP_UMEM_TX_SW_CSUM if self.tx_checksum == "kernel" else 0)
            value = _UMEM_REG_META.pack(addr, size, frame_size, 0, flags, TX_META_LEN)
            buf = _ffi.new("char[]", value)
            if lib.setsockopt(self.fd, SOL_XDP, XDP_UMEM_REG, buf, len(value)) == 0:
                self.tx_meta = TX_META_LEN
                self.tx_options = XDP_TX_METADATA << 32
                return
            if _ffi.errno != errno.EINVAL:
                raise _umem_error(_ffi.errno, size)
            self.tx_checksum = "worker"
        buf = _ffi.new("char[]", _UMEM_REG.pack(addr, size, frame_size, 0, 0))
        if lib.setsockopt(self.fd, SOL_XDP, XDP_UMEM_REG, buf, _UMEM_REG.size) < 0:
            raise _umem_error(_ffi.errno, size)

    def _setup(self, lib, frames: int, frame_size: int, ring: int, copy: bool,
               bind_wait: float) -> None:
        self.umem = mmap.mmap(-1, frames * frame_size, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS,
                              mmap.PROT_READ | mmap.PROT_WRITE)
        # huge pages where the kernel has them for the asking (THP "madvise"): the worker
        # touches two frames a packet anywhere in 8-16 MiB, a TLB miss each on 4 KiB pages
        with contextlib.suppress(AttributeError, OSError):
            self.umem.madvise(mmap.MADV_HUGEPAGE)
        self._umem_ptr = _ffi.from_buffer(self.umem)
        addr = int(_ffi.cast("uintptr_t", self._umem_ptr))
        if not copy:  # a zero-copy driver may ignore TX metadata: the worker sums
            self.tx_checksum = "worker"
        # pinned memory is charged to the user: a UMEM closed a moment ago (the daemon's
        # probe, a restarted worker's predecessor) is uncharged in deferred kernel work
        deadline = time.monotonic() + bind_wait
        while True:
            try:
                self._register_umem(lib, addr, frames * frame_size, frame_size)
                break
            except PinnedMemoryError:
                if time.monotonic() >= deadline:
                    raise
                time.sleep(0.005)
        n = struct.pack("I", ring)
        for opt, what in ((XDP_UMEM_FILL_RING, "fill ring"),
                          (XDP_UMEM_COMPLETION_RING, "completion ring"),
                          (XDP_RX_RING, "RX ring"), (XDP_TX_RING, "TX ring")):
            self._sockopt(lib, opt, n, what)
        out = _ffi.new("char[]", _OFFSETS.size)
        olen = _ffi.new("unsigned int *", _OFFSETS.size)
        if lib.getsockopt(self.fd, SOL_XDP, XDP_MMAP_OFFSETS, out, olen) < 0:
            raise XskError(f"getsockopt(XDP_MMAP_OFFSETS): {os.strerror(_ffi.errno)}")
        o = _OFFSETS.unpack(_ffi.buffer(out, _OFFSETS.size)[:])
        self.rx_ring = _Ring(self.fd, ring, XDP_PGOFF_RX_RING, o[0:4], 16)
        self._rings.append(self.rx_ring)
        self.tx_ring = _Ring(self.fd, ring, XDP_PGOFF_TX_RING, o[4:8], 16)
        self._rings.append(self.tx_ring)
        self.fill_ring = _Ring(self.fd, ring, XDP_UMEM_PGOFF_FILL_RING, o[8:12], 8)
        self._rings.append(self.fill_ring)
        self.comp_ring = _Ring(self.fd, ring, XDP_UMEM_PGOFF_COMPLETION_RING, o[12:16], 8)
        self._rings.append(self.comp_ring)
        # the first `ring` frames receive, the rest send
        fr = self.fill_ring
        for i in range(ring):
            fr.desc[i] = i * frame_size
        fr.words[fr.prod] = ring
        self._fill_prod = ring
        self._free_tx = [i * frame_size for i in range(ring, frames)]
        self._rx_cons = 0
        self._tx_prod = 0
        self._tx_pending = 0
        self._comp_cons = 0
        flags = XDP_USE_NEED_WAKEUP | (XDP_COPY if copy else 0)
        sa = _ffi.new("char[]", _SOCKADDR.pack(AF_XDP, flags, self.ifindex, self.queue, 0))
        # a socket closed on this queue a moment ago (a restarted worker's predecessor)
        # lets go of it in deferred kernel work: EBUSY until then
        deadline = time.monotonic() + bind_wait
        while lib.bind(self.fd, sa, _SOCKADDR.size) < 0:
            e = _ffi.errno
            if e == errno.EBUSY and time.monotonic() < deadline:
                time.sleep(0.005)
                continue
            raise XskError(f"bind(AF_XDP, ifindex {self.ifindex}, queue {self.queue}): "
                           f"{os.strerror(e)}" + (" (the queue has another AF_XDP socket)"
                                                   if e == errno.EBUSY else ""))
        self._lib = lib
        self._umem_view = memoryview(self.umem)

    # -- receive ---------------------------------------------------------------------------

    def rx(self, max_n: int = 64) -> List[Tuple[int, int]]:
        """Up to `max_n` received frames as (UMEM offset, length); read the bytes at
        ``umem[offset:offset + length]`` and hand the offsets back with :meth:`release`."""
        r = self.rx_ring
        cons = self._rx_cons
        avail = (r.words[r.prod] - cons) & 0xFFFFFFFF
        if not avail:
            return []
        n = avail if avail < max_n else max_n
        desc = r.desc
        mask = r.mask
        out = []
        for i in range(cons, cons + n):
            j = (i & mask) * 2
            out.append((desc[j], desc[j + 1] & 0xFFFFFFFF))
        cons = (cons + n) & 0xFFFFFFFF
        self._rx_cons = cons
        r.words[r.cons] = cons
        self.rx_packets += n
        return out

    def release(self, offsets: List[int]) -> None:
        """Give received frames back to the kernel (the fill ring)."""
        fr = self.fill_ring
        prod = self._fill_prod
        mask = fr.mask
        desc = fr.desc
        for off in offsets:
            desc[prod & mask] = off
            prod += 1
        prod &= 0xFFFFFFFF
        self._fill_prod = prod
        fr.words[fr.prod] = prod

    # -- send --------------------------------------------------------------------------------

    def reclaim(self) -> int:
        """Frames the kernel has sent go back to the free list; returns how many."""
        c = self.comp_ring
        cons = self._comp_cons
        avail = (c.words[c.prod] - cons) & 0xFFFFFFFF
        if avail:
            desc = c.desc
            mask = c.mask
            free = self._free_tx
            fmask = self._frame_mask  # a frame's start, before its TX metadata
            for i in range(cons, cons + avail):
                free.append(desc[i & mask] & fmask)
            cons = (cons + avail) & 0xFFFFFFFF
            self._comp_cons = cons
            c.words[c.cons] = cons
        return avail

    def tx_frame(self) -> int:
        """A free UMEM offset to write a frame into (the caller writes at
        ``umem[offset:]``, at most ``frame_size - tx_meta`` bytes), or -1 when none is
        free."""
        free = self._free_tx
        if not free:
            self.reclaim()
            if not free:
                self.tx_no_frame += 1
                return -1
        return free.pop() + self.tx_meta

    def tx_free(self) -> int:
        """Frames free for sending now (the completion ring not read yet)."""
        return len(self._free_tx)

    def free_frames(self) -> List[int]:
        """The free list itself, for a writer that pops many frames in a loop (and calls
        :meth:`reclaim` when it runs dry) instead of :meth:`tx_frame` each. These are
        frame starts: with TX metadata (``tx_meta`` bytes) the frame is written after it,
        its descriptor points past it, and its length carries ``tx_options``."""
        return self._free_tx

    def tx_room(self) -> int:
        """TX ring slots free for frames not queued yet."""
        t = self.tx_ring
        return t.size - ((self._tx_prod - t.words[t.cons]) & 0xFFFFFFFF)

    def tx_put_many(self, flat: List[int]) -> int:
        """Queue frames given as [offset, length, offset, length, ...] (a length may carry
        ``tx_options``: then the kernel reads the TX metadata the caller wrote before the
        frame), as many as the ring has room for; the rest go back to the free list,
        counted. Returns how many were queued."""
        n = len(flat) // 2
        room = self.tx_room()
        if n > room:
            fmask = self._frame_mask
            self._free_tx.extend(off & fmask for off in flat[2 * room::2])
            self.tx_no_frame += n - room
            n = room
        t = self.tx_ring
        desc = t.desc
        mask = t.mask
        prod = self._tx_prod
        for i in range(0, 2 * n, 2):
            j = (prod & mask) * 2
            desc[j] = flat[i]
            desc[j + 1] = flat[i + 1]
            prod += 1
        self._tx_prod = prod & 0xFFFFFFFF
        self._tx_pending += n
        return n

    def tx_put(self, offset: int, length: int) -> bool:
        """Queue the frame at `offset` for sending; False (counted, frame freed) when the
        TX ring is full."""
        return self.tx_put_many([offset, length]) == 1

    def kick(self) -> int:
        """Publish the queued frames and have the kernel send them and any it left in the
        ring before. In copy mode each sendto sends at most 32 frames (the kernel's TX
        batch) and says EAGAIN while more wait, so this calls it again while the kernel
        makes progress, until the ring is drained (bounded: a ring's worth). An error is
        counted by name in `tx_errors` and ends the kick; what stays in the ring goes with
        the next one. Returns how many frames were published now."""
        n = self._tx_pending
        t = self.tx_ring
        prod = self._tx_prod
        words = t.words
        cons_at = t.cons
        cons = words[cons_at]
        if not n and cons == prod:
            return 0
        if n:
            words[t.prod] = prod
            self._tx_pending = 0
            self.tx_packets += n
        lib = self._lib
        for _ in range(t.size // 32 + 2):
            if lib.sendto(self.fd, _ffi.NULL, 0, MSG_DONTWAIT, _ffi.NULL, 0) < 0:
                e = _ffi.errno
                if e not in (errno.EAGAIN, errno.EBUSY):
                    name = errno.errorcode.get(e, str(e))
                    self.tx_errors[name] = self.tx_errors.get(name, 0) + 1
                    break
            now = words[cons_at]
            if now in (prod, cons):  # drained, or the kernel took nothing more
                break
            cons = now
        return n

    def tx_outstanding(self) -> int:
        """Frames published to the TX ring that the kernel has not taken yet."""
        return (self._tx_prod - self.tx_ring.words[self.tx_ring.cons]) & 0xFFFFFFFF

    def wake_rx(self) -> None:
        """Tell the kernel the fill ring has frames again when it asked to be told."""
        if self.fill_ring.need_wakeup():
            self._lib.recvfrom(self.fd, _ffi.NULL, 0, MSG_DONTWAIT, _ffi.NULL, _ffi.NULL)

    def kernel_stats(self) -> dict:
        """The kernel's counters for this socket (struct xdp_statistics)."""
        out = _ffi.new("char[]", _STATS.size)
        olen = _ffi.new("unsigned int *", _STATS.size)
        if self._lib.getsockopt(self.fd, SOL_XDP, XDP_STATISTICS, out, olen) < 0:
            raise XskError(f"getsockopt(XDP_STATISTICS): {os.strerror(_ffi.errno)}")
        vals = _STATS.unpack(_ffi.buffer(out, _STATS.size)[:])
        return dict(zip(("rx_dropped", "rx_invalid_descs", "tx_invalid_descs",
                         "rx_ring_full", "rx_fill_ring_empty_descs",
                         "tx_ring_empty_descs"), vals))

    def fileno(self) -> int:
        return self.fd

    def pointer(self) -> object:
        """The UMEM as a cffi ``char *`` on PyPy, for copies its JIT makes a memcpy of
        (``ffi.memmove``: 22 ns for a 172-byte payload against 105 through the memoryview);
        None on CPython, where the memoryview copies faster."""
        return self._umem_ptr if _PYPY else None

    def view(self) -> memoryview:
        """The UMEM as a writable memoryview."""
        return self._umem_view

    def close(self) -> None:
        """Unmap the rings and UMEM and close the socket (idempotent)."""
        for r in self._rings:
            r.close()
        self._rings = []
        view = getattr(self, "_umem_view", None)
        if view is not None:
            view.release()
            self._umem_view = None
        ptr = getattr(self, "_umem_ptr", None)
        if ptr is not None:
            _ffi.release(ptr)
            self._umem_ptr = None
        if self.fd >= 0:
            _load().close(self.fd)
            self.fd = -1
        if self.umem is not None:
            self.umem.close()
            self.umem = None
