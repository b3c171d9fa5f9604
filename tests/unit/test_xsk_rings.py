"""An AF_XDP socket's ring bookkeeping without a kernel: the rings are bytearrays laid out
as the kernel's (producer, consumer and flags words, then descriptors), and a fake
sendto consumes the TX ring as copy mode does (at most 32 frames a call, EAGAIN while
more wait). Free-running u32 indices wrap; no frame is lost or handed out twice."""

from __future__ import annotations

import errno
import os
import struct
from typing import List

import pytest

from fastpath.worker import xsk as xskmod
from fastpath.worker.xsk import XskSocket


class FakeRing:
    """What XskSocket reads of an mmap'ed ring: `words` (u32: producer 0, consumer 1,
    flags 2), `desc` (u64 slots: 2 a descriptor on RX/TX, 1 on fill/completion)."""

    def __init__(self, size: int, desc_words: int) -> None:
        self.mem_words = bytearray(16)
        self.mem_desc = bytearray(size * desc_words * 8)
        self.words = memoryview(self.mem_words).cast("I")
        self.desc = memoryview(self.mem_desc).cast("Q")
        self.prod, self.cons, self.flags = 0, 1, 2
        self.size = size
        self.mask = size - 1


class FakeLib:
    """sendto as copy mode does it: takes up to `batch` published TX descriptors, puts
    their addresses on the completion ring, EAGAIN while more wait; or fails with `fail`."""

    def __init__(self, sock: XskSocket, batch: int = 32, fail: int = 0,
                 stall: bool = False) -> None:
        self.sock = sock
        self.batch = batch
        self.fail = fail
        self.stall = stall
        self.calls = 0

    def sendto(self, *args) -> int:
        self.calls += 1
        if self.fail:
            xskmod._ffi.errno = self.fail
            return -1
        t, c = self.sock.tx_ring, self.sock.comp_ring
        cons, prod = t.words[t.cons], t.words[t.prod]
        n = 0 if self.stall else min(self.batch, (prod - cons) & 0xFFFFFFFF)
        for i in range(n):
            j = ((cons + i) & t.mask) * 2
            k = c.words[c.prod]
            c.desc[k & c.mask] = t.desc[j]
            c.words[c.prod] = (k + 1) & 0xFFFFFFFF
        t.words[t.cons] = (cons + n) & 0xFFFFFFFF
        if (prod - cons - n) & 0xFFFFFFFF:
            xskmod._ffi.errno = errno.EAGAIN
            return -1
        return 0


def _sock(ring: int = 8, frames: int = 32, start: int = 0) -> XskSocket:
    """A socket object over fake rings, all indices starting at `start` (to wrap)."""
    s = XskSocket.__new__(XskSocket)
    s.fd, s.ifindex, s.queue, s.frame_size = 99, 2, 0, 2048
    s.rx_packets = s.tx_packets = s.tx_no_frame = 0
    s.tx_errors = {}
    s.tx_checksum, s.tx_meta, s.tx_options, s._frame_mask = "worker", 0, 0, ~2047
    s.rx_ring, s.tx_ring = FakeRing(ring, 2), FakeRing(ring, 2)
    s.fill_ring, s.comp_ring = FakeRing(ring, 1), FakeRing(ring, 1)
    for r in (s.rx_ring, s.tx_ring, s.fill_ring, s.comp_ring):
        r.words[0] = r.words[1] = start
    s._rx_cons = s._tx_prod = s._comp_cons = s._fill_prod = start
    s._tx_pending = 0
    s._free_tx = [i * 2048 for i in range(ring, frames)]
    s._lib = FakeLib(s)
    return s


def _receive(s: XskSocket, frames: List[int], length: int = 60) -> None:
    r = s.rx_ring
    p = r.words[r.prod]
    for off in frames:
        j = (p & r.mask) * 2
        r.desc[j] = off
        r.desc[j + 1] = length | (7 << 32)  # options in the high half: ignored
        p = (p + 1) & 0xFFFFFFFF
    r.words[r.prod] = p


def test_rx_reads_across_the_u32_wrap_and_fill_gives_frames_back():
    s = _sock(start=0xFFFFFFFE)
    _receive(s, [256, 2304, 4352])
    assert s.rx(2) == [(256, 60), (2304, 60)]
    assert s.rx_ring.words[1] == 0  # consumer wrapped to 0
    assert s.rx(8) == [(4352, 60)] and s.rx(8) == []
    assert s.rx_ring.words[1] == 1 and s.rx_packets == 3
    s.release([256, 2304, 4352])
    f = s.fill_ring
    assert f.words[f.prod] == 1  # 0xFFFFFFFE + 3, wrapped
    assert [f.desc[(0xFFFFFFFE + i) & f.mask] for i in range(3)] == [256, 2304, 4352]


def test_a_full_tx_ring_takes_what_fits_and_frees_the_rest():
    s = _sock(ring=4)
    free = len(s._free_tx)
    offs = [s.tx_frame() for _ in range(6)]
    assert s.tx_put_many([x for off in offs[:3] for x in (off, 100)]) == 3
    assert s.tx_room() == 1
    assert s.tx_put_many([x for off in offs[3:] for x in (off, 100)]) == 1
    assert s.tx_no_frame == 2 and s.tx_free() == free - 4  # two went back
    assert s.kick() == 4 and s.tx_outstanding() == 0
    assert s.reclaim() == 4 and s.tx_free() == free


def test_frames_with_tx_metadata_are_handed_out_past_it_and_come_back_whole():
    """With TX metadata a frame is written after it: tx_frame's offset and the
    descriptor's address point past it, the length carries the metadata option, and the
    frame's start goes back to the free list, from the completion ring or when the TX
    ring is full, so no frame drifts by the metadata's length."""
    s = _sock(ring=4)
    s.tx_meta, s.tx_options = xskmod.TX_META_LEN, xskmod.XDP_TX_METADATA << 32
    starts = set(s._free_tx)
    offs = [s.tx_frame() for _ in range(6)]
    assert all(off - xskmod.TX_META_LEN in starts for off in offs)
    assert s.tx_put_many([x for off in offs for x in (off, 60 | s.tx_options)]) == 4
    t = s.tx_ring
    assert [t.desc[2 * i] for i in range(4)] == offs[:4]
    assert [t.desc[2 * i + 1] for i in range(4)] == [60 | (2 << 32)] * 4
    assert s.kick() == 4 and s.reclaim() == 4
    assert set(s._free_tx) == starts and len(s._free_tx) == len(starts)


def test_kick_repeats_while_the_kernel_takes_32_a_call():
    s = _sock(ring=128, frames=512, start=0xFFFFFFF0)
    offs = [s.tx_frame() for _ in range(100)]
    s.tx_put_many([x for off in offs for x in (off, 60)])
    assert s.kick() == 100
    assert s._lib.calls == 4 and s.tx_outstanding() == 0  # 32 + 32 + 32 + 4
    assert s.reclaim() == 100 and sorted(s._free_tx) == sorted(set(s._free_tx))


def test_a_kernel_that_takes_nothing_ends_the_kick_and_the_next_flush_retries():
    s = _sock(ring=64, frames=256)
    s._lib = FakeLib(s, stall=True)
    off = s.tx_frame()
    s.tx_put_many([off, 60])
    assert s.kick() == 1 and s._lib.calls == 1  # EAGAIN, no progress: no spinning
    assert s.tx_outstanding() == 1
    s._lib.stall = False
    assert s.kick() == 0 and s.tx_outstanding() == 0  # nothing new, the old one goes


@pytest.mark.parametrize("err", [errno.ENXIO, errno.ENOMEM, errno.ENETDOWN])
def test_a_refused_kick_is_counted_never_raised(err):
    s = _sock()
    s._lib = FakeLib(s, fail=err)
    off = s.tx_frame()
    s.tx_put_many([off, 60])
    assert s.kick() == 1
    assert s.tx_errors == {errno.errorcode[err]: 1} and s.tx_outstanding() == 1


def test_a_mapped_ring_reads_and_writes_the_kernels_layout():
    """_Ring over a real shared mapping (a memfd in place of the socket): words and
    descriptors land at the offsets the kernel gave, little-endian, whichever accessor
    this interpreter uses (cffi pointers on PyPy, cast memoryviews on CPython), and the
    ring closes cleanly."""
    fd = os.memfd_create("ring")
    try:
        os.ftruncate(fd, 4096)
        ring = xskmod._Ring(fd, 8, 0, (0, 4, 64, 8), 16)  # prod, cons, desc, flags
        ring.words[ring.prod] = 0xFFFFFFFF
        ring.words[ring.cons] = 7
        ring.desc[2 * 7] = 0x1122334455667788
        ring.desc[2 * 7 + 1] = 172 | (1 << 32)
        raw = os.pread(fd, 64 + 8 * 16, 0)
        assert struct.unpack_from("<II", raw, 0) == (0xFFFFFFFF, 7)
        assert struct.unpack_from("<QQ", raw, 64 + 7 * 16) == (0x1122334455667788, 172 | 1 << 32)
        os.pwrite(fd, struct.pack("<I", 1), 8)  # the kernel sets XDP_RING_NEED_WAKEUP
        assert ring.need_wakeup()
        assert ring.desc[2 * 7 + 1] & 0xFFFFFFFF == 172
        ring.close()
    finally:
        os.close(fd)


@pytest.mark.parametrize("queues, per_queue", [
    (1, 16384), (2, 8192), (3, 4096), (16, 1024), (32, 512), (64, 512)])
def test_an_interfaces_ring_is_shared_by_its_queues(queues, per_queue):
    """af_xdp_ring is per interface: RSS splits the traffic, so each queue gets its share
    (a power of two, never below 512, never more than the whole)."""
    assert xskmod.ring_per_queue(xskmod.RING_DEFAULT, queues) == per_queue
    assert xskmod.ring_per_queue(4096, 1) == 4096
    assert xskmod.ring_per_queue(512, 8) == 512


def test_a_umem_over_the_pinned_memory_limit_says_what_to_do():
    err = xskmod._umem_error(errno.ENOBUFS, 64 << 20)
    assert "64 MiB" in str(err) and "RLIMIT_MEMLOCK" in str(err)
    assert "CAP_IPC_LOCK" in str(err) and "af_xdp_ring" in str(err)
    assert str(xskmod._umem_error(errno.EINVAL, 1 << 20)) == \
        f"setsockopt(XDP_UMEM_REG): {os.strerror(errno.EINVAL)}"
