"""Batched reads from the AF_PACKET taps of the ``packet`` data-plane mode (worker side).

The daemon opens the taps (:mod:`fastpath.kernel.taps`: interface, BPF filter, drop
rules) and passes them to a worker, which reads them here: :class:`PacketReader`
batches with recvmmsg(2) through cffi in ABI mode (the shared mmsghdr setup of
:mod:`fastpath.worker.mmsg`) and falls back to a recvfrom loop. Each packet is then
parsed with :func:`fastpath.packet.parse_media`.

Caveat: the kernel never validated these packets; the UDP checksum is not
checked here either (a relay rewriting them recomputes it anyway).
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket
import struct
from typing import Dict, List, Tuple

from fastpath.packet import PacketIoError
from fastpath.worker import mmsg

__all__ = ["PacketIoError", "PacketReader"]

SIOCGIFINDEX = 0x8933
#: bytes per receive slot (an Ethernet MTU's L3 packet fits); longer ones are counted
SLOT_SIZE = mmsg.SLOT_SIZE
#: sizeof(struct sockaddr_ll) is 20; slots are 32 bytes so ifindex is every 8th int
NAME_SIZE = 32

SOL_PACKET = 263
PACKET_STATISTICS = 6
_TPACKET_STATS = struct.Struct("II")  # struct tpacket_stats: tp_packets, tp_drops
MSG_DONTWAIT = mmsg.MSG_DONTWAIT
MSG_TRUNC = mmsg.MSG_TRUNC
_SOFT_ERRNOS = frozenset((errno.ENETDOWN, errno.ENXIO, errno.EINTR, errno.ENOBUFS))
_MAX_SOFT_RETRIES = 8


def _ifindex(sock: socket.socket, ifname: str) -> int:
    """Interface index in the socket's own namespace (if_nametoindex would use ours)."""
    req = struct.pack("16si", ifname.encode(), 0).ljust(40, b"\0")  # a whole struct ifreq
    return struct.unpack_from("16si", fcntl.ioctl(sock.fileno(), SIOCGIFINDEX, req))[1]


class PacketReader:
    """Batched reads of L3 packets from a packet socket: ``[(packet, ifindex), ...]``.

    ``"mmsg"`` (recvmmsg via cffi, preallocated slots) when available, else
    ``"plain"`` (recvfrom loop; ifindex is the bound interface's).  Not thread-safe.
    """

    def __init__(self, sock: socket.socket, batch: int = 64, prefer: str = "auto") -> None:
        if prefer not in ("auto", "mmsg", "plain"):
            raise ValueError(f"prefer must be 'auto', 'mmsg' or 'plain', got {prefer!r}")
        self.sock = sock
        self.batch = max(1, min(int(batch), mmsg.MAX_BATCH))
        self.truncated = 0
        #: packets the kernel dropped at this tap because its buffer was full
        self.overflowed = 0
        self.recv_errors: Dict[str, int] = {}
        name = sock.getsockname()[0]
        self.ifindex = _ifindex(sock, name) if name else 0
        use_mmsg = prefer != "plain" and mmsg.mmsg_available()
        if prefer == "mmsg" and not use_mmsg:
            raise PacketIoError("recvmmsg through cffi is unavailable")
        self.name = "mmsg" if use_mmsg else "plain"
        if use_mmsg:
            self._setup_mmsg()

    def _setup_mmsg(self) -> None:
        ffi, lib = mmsg.load()
        self._ffi = ffi
        self._recvmmsg = lib.recvmmsg
        # header i -> slot i of the buffer, sockaddr_ll -> name slot i
        self._vec = vec = mmsg.MsgVec(ffi, self.batch, SLOT_SIZE, NAME_SIZE)
        self._dirty = 0
        # sll_ifindex of every name slot, read as a column of 32-bit words
        self._ifidx = memoryview(vec.name_data).cast("i")

    def fileno(self) -> int:
        return self.sock.fileno()

    def count_overflows(self) -> int:
        """Add what the kernel dropped at this tap since the last call (a full receive
        buffer: the worker fell behind) to `overflowed`, and return the total. The
        kernel resets its count on every read of PACKET_STATISTICS."""
        try:
            raw = self.sock.getsockopt(SOL_PACKET, PACKET_STATISTICS, _TPACKET_STATS.size)
        except OSError:
            return self.overflowed
        self.overflowed += _TPACKET_STATS.unpack(raw)[1]
        return self.overflowed

    def close(self) -> None:
        self.sock.close()

    def recv_batch(self, max_n: int = 0) -> List[Tuple[bytes, int]]:
        """Up to `max_n` (0: the batch size) queued packets without blocking."""
        n = self.batch if max_n <= 0 else min(max_n, self.batch)
        if self.name == "plain":
            return self._recv_plain(n)
        return self._recv_mmsg(n)

    def _recv_mmsg(self, want: int) -> List[Tuple[bytes, int]]:
        vec = self._vec
        if self._dirty:
            vec.reset(self._dirty)
            self._dirty = 0
        fd = self.sock.fileno()
        got = -1
        for _ in range(_MAX_SOFT_RETRIES):
            got = self._recvmmsg(fd, vec.hdrs, want, MSG_DONTWAIT, self._ffi.NULL)
            if got >= 0:
                break
            e = self._ffi.errno
            if e in (errno.EAGAIN, errno.EWOULDBLOCK):
                return []
            if e not in _SOFT_ERRNOS:
                raise OSError(e, os.strerror(e))
            self._count(e)
        if got <= 0:
            return []
        self._dirty = got
        words, stride = vec.words, vec.stride
        end = got * stride
        flags = words[vec.w_flags:end:stride].tolist()
        lens = words[vec.w_len:end:stride].tolist()
        idx = self._ifidx[1:got * (NAME_SIZE // 4):NAME_SIZE // 4].tolist()
        bufv = vec.data
        out = []
        off = 0
        for i in range(got):
            if flags[i] & MSG_TRUNC:
                self.truncated += 1
            else:
                out.append((bufv[off:off + lens[i]], idx[i]))
            off += SLOT_SIZE
        return out

    def _recv_plain(self, want: int) -> List[Tuple[bytes, int]]:
        out = []
        recvfrom = self.sock.recvfrom
        retries = 0
        while want > 0:
            try:
                data, _addr = recvfrom(SLOT_SIZE + 1, MSG_DONTWAIT)
            except BlockingIOError:
                break
            except OSError as exc:
                if exc.errno in _SOFT_ERRNOS and retries < _MAX_SOFT_RETRIES:
                    retries += 1
                    self._count(exc.errno)
                    continue
                raise
            want -= 1
            if len(data) > SLOT_SIZE:
                self.truncated += 1
            else:
                out.append((data, self.ifindex))
        return out

    def _count(self, e: int) -> None:
        name = errno.errorcode.get(e, str(e))
        self.recv_errors[name] = self.recv_errors.get(name, 0) + 1
