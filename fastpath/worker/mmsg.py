"""Batched UDP datagram I/O for the data plane.

Two implementations behind one small interface (:class:`BatchIO`):

* ``"mmsg"`` -- recvmmsg(2)/sendmmsg(2) called through cffi in ABI mode
  (``ffi.cdef`` + ``ffi.dlopen(None)``; no C compiler at run time), so it
  works the same on PyPy and CPython.  All mmsghdr/iovec/payload/sockaddr
  arrays are allocated once per instance and reused (:class:`MsgVec`, the one
  mmsghdr setup of the worker: packet mode's tap reader and raw egress use it
  too, with the cffi binding from :func:`load`).
* ``"plain"`` -- a loop of ``recvfrom``/``sendto`` on a temporary socket
  object wrapping the fd, used when cffi or the syscalls are unavailable.

Both work on non-blocking IPv4 and IPv6 UDP sockets given by file
descriptor; every call uses ``MSG_DONTWAIT`` so a blocking socket never
blocks either.  Addresses are ``(ip_str, port)`` for both families (IPv6 as a
plain address string without scope; IPv4 senders on a dual-stack IPv6 socket
show up as ``::ffff:a.b.c.d``, as with ``socket.recvfrom``).

Error policy:

* recv: EAGAIN means "nothing (more)"; errors that a UDP socket reports for
  an earlier ICMP message (ECONNREFUSED, EHOSTUNREACH, ...) are consumed,
  counted in ``recv_errors`` and the receive is retried.  Anything else
  (EBADF, ENOTSOCK, ...) is raised as ``OSError``.
* send: never raises for a per-datagram failure.  A failed datagram is
  counted in ``send_errors`` (errno name -> count) and the rest of the batch
  is still sent.  A pending ECONNREFUSED (an ICMP port-unreachable about an
  earlier datagram) is counted and the datagram at hand retried once.  EAGAIN (socket
  buffer full) drops the datagrams not yet sent, each counted as "EAGAIN".
  An address that cannot be encoded is counted as "EINVAL".
* Datagrams longer than the 2048-byte slot are dropped on receive and
  counted in ``truncated``.

Instances are not thread-safe (they own reusable buffers); use one per
thread / event loop.
"""

from __future__ import annotations

import errno
import os
import platform
import socket
import sys
from typing import Dict, List, Optional, Protocol, Tuple

__all__ = [
    "ADDR_CACHE_MAX",
    "MAX_BATCH",
    "SLOT_SIZE",
    "BatchIO",
    "MmsgBatchIO",
    "MsgVec",
    "PlainBatchIO",
    "load",
    "make_batch_io",
    "mmsg_available",
    "unavailable_reason",
]

Addr = Tuple[str, int]
Packet = Tuple[bytes, Addr]

#: bytes per receive/send slot; larger datagrams are counted as truncated
SLOT_SIZE = 2048
#: sizeof(struct sockaddr_storage)
NAME_SIZE = 128
#: UIO_MAXIOV: the kernel clamps the vlen of recvmmsg/sendmmsg to this
MAX_BATCH = 1024
#: bound of each address conversion cache (cleared when exceeded)
ADDR_CACHE_MAX = 4096

# plain ints: the socket module's enum members are slow in arithmetic on CPython
AF_INET = int(socket.AF_INET)
AF_INET6 = int(socket.AF_INET6)
MSG_DONTWAIT = int(getattr(socket, "MSG_DONTWAIT", 0x40))
MSG_TRUNC = int(getattr(socket, "MSG_TRUNC", 0x20))

_EAGAIN = (errno.EAGAIN, errno.EWOULDBLOCK)
_EINTR = errno.EINTR
# errors a UDP socket may report on receive for an ICMP message about an
# earlier datagram (or that are transient); consuming them clears them, so
# the receive is retried
_SOFT_ERRNOS = frozenset(
    getattr(errno, name)
    for name in (
        "ECONNREFUSED",
        "EHOSTUNREACH",
        "ENETUNREACH",
        "EHOSTDOWN",
        "ENETDOWN",
        "ECONNRESET",
        "EPROTO",
        "ENOPROTOOPT",
        "EMSGSIZE",
        "EPERM",
        "EACCES",
    )
    if hasattr(errno, name)
)
# cap on consecutive soft-error retries in one recv() call
_MAX_SOFT_RETRIES = 32
# on send, errors that can only be a pending report about an earlier datagram
# (ICMP port unreachable); the datagram at hand is retried once after them
_PENDING_SEND_ERRNOS = frozenset((errno.ECONNREFUSED,))

_PYPY = platform.python_implementation() == "PyPy"
_NATIVE = sys.byteorder
_FAM4 = AF_INET.to_bytes(2, _NATIVE)
_FAM6 = AF_INET6.to_bytes(2, _NATIVE)
_ZERO4 = bytes(4)
_ZERO8 = bytes(8)
_ERRNAMES = errno.errorcode


def _errname(code: int) -> str:
    return _ERRNAMES.get(code, str(code))


class BatchIO(Protocol):
    name: str
    batch: int
    truncated: int
    send_errors: Dict[str, int]
    recv_errors: Dict[str, int]

    def recv(self, fd: int) -> List[Packet]: ...

    def send(self, fd: int, packets: List[Packet]) -> int: ...


# ---------------------------------------------------------------------------
# sockaddr <-> (ip, port)


def decode_sockaddr(raw: bytes) -> Addr:
    """Raw sockaddr_in / sockaddr_in6 bytes -> (ip_str, port)."""
    if len(raw) < 4:
        return ("", 0)
    fam = int.from_bytes(raw[0:2], _NATIVE)
    port = (raw[2] << 8) | raw[3]
    if fam == AF_INET and len(raw) >= 8:
        return (socket.inet_ntop(AF_INET, raw[4:8]), port)
    if fam == AF_INET6 and len(raw) >= 24:
        return (socket.inet_ntop(AF_INET6, raw[8:24]), port)
    return ("", 0)


def encode_sockaddr(addr: Addr) -> bytes:
    """(ip_str, port) -> raw sockaddr_in / sockaddr_in6 bytes.

    The family follows the address string (':' means IPv6); an IPv6 ``%scope``
    suffix (interface name or index) is honoured.  Raises ValueError/OSError
    for something that is not a numeric address or a valid port.
    """
    ip = addr[0]
    port = int(addr[1]).to_bytes(2, "big")
    if ":" in ip:
        scope = 0
        if "%" in ip:
            ip, sc = ip.split("%", 1)
            scope = int(sc) if sc.isdigit() else socket.if_nametoindex(sc)
        return _FAM6 + port + _ZERO4 + socket.inet_pton(AF_INET6, ip) + scope.to_bytes(4, _NATIVE)
    return _FAM4 + port + socket.inet_pton(AF_INET, ip) + _ZERO8


# ---------------------------------------------------------------------------
# cffi (ABI mode)

_CDEF = """
typedef unsigned int socklen_t;
struct iovec {
    void *iov_base;
    size_t iov_len;
};
struct msghdr {
    void *msg_name;
    socklen_t msg_namelen;
    struct iovec *msg_iov;
    size_t msg_iovlen;
    void *msg_control;
    size_t msg_controllen;
    int msg_flags;
};
struct mmsghdr {
    struct msghdr msg_hdr;
    unsigned int msg_len;
};
struct timespec {
    long tv_sec;
    long tv_nsec;
};
int recvmmsg(int sockfd, struct mmsghdr *msgvec, unsigned int vlen, int flags,
             struct timespec *timeout);
int sendmmsg(int sockfd, struct mmsghdr *msgvec, unsigned int vlen, int flags);
"""

_ffi = None
_lib = None
_load_error: Optional[str] = None
_available: Optional[bool] = None


def load():
    """Load cffi + libc once; returns (ffi, lib), or (None, None) with the reason in
    :func:`unavailable_reason`.  The one cdef of recvmmsg/sendmmsg for the worker's
    batched I/O (this module), its packet taps and its raw egress."""
    global _ffi, _lib, _load_error
    if _ffi is not None or _load_error is not None:
        return _ffi, _lib
    try:
        if not sys.platform.startswith("linux"):
            raise OSError("recvmmsg/sendmmsg layout is only declared for Linux")
        import cffi

        ffi = cffi.FFI()
        ffi.cdef(_CDEF)
        lib = ffi.dlopen(None)
        # resolving the symbols raises AttributeError when libc lacks them
        lib.recvmmsg  # noqa: B018
        lib.sendmmsg  # noqa: B018
    except Exception as exc:  # ImportError, OSError, AttributeError, cffi errors
        _load_error = f"{type(exc).__name__}: {exc}"
        return None, None
    _ffi, _lib = ffi, lib
    return ffi, lib


_load = load  # the old private name, still used by bench/callgen.py


def unavailable_reason() -> Optional[str]:
    """Why cffi's recvmmsg/sendmmsg cannot be used (None if nothing failed so far)."""
    return _load_error


def mmsg_available() -> bool:
    """True when recvmmsg/sendmmsg can be used (cffi importable, symbols present,
    and the kernel implements the syscalls).  The probe runs once."""
    global _available, _load_error
    if _available is not None:
        return _available
    ffi, lib = load()
    ok = False
    if ffi is not None:
        try:
            s = socket.socket(AF_INET, socket.SOCK_DGRAM)
        except OSError as exc:
            _load_error = f"probe socket: {exc}"
        else:
            try:
                hdr = ffi.new("struct mmsghdr[1]")
                r1 = lib.recvmmsg(s.fileno(), hdr, 1, MSG_DONTWAIT, ffi.NULL)
                e1 = ffi.errno if r1 < 0 else 0
                r2 = lib.sendmmsg(s.fileno(), hdr, 0, MSG_DONTWAIT)
                e2 = ffi.errno if r2 < 0 else 0
                bad = {errno.ENOSYS, errno.EPERM, errno.EACCES}
                if e1 in bad or e2 in bad:
                    _load_error = f"probe: {_errname(e1 or e2)}"
                else:
                    ok = True
            finally:
                s.close()
    _available = ok
    return ok


class MsgVec:
    """`n` mmsghdr for recvmmsg/sendmmsg, allocated once: header i has one iovec pointing at
    slot i (`slot` bytes) of one buffer and, with `name_size`, a sockaddr slot i of one
    name buffer.

    For receiving, every iov_len is the slot size and msg_namelen `name_size` (the kernel
    overwrites namelen, flags and msg_len: :meth:`reset` restores the first k headers);
    for sending (``recv=False``) lengths and names are the caller's to set per datagram.
    Besides the cdata arrays it keeps what the hot loops index: per-slot lists of the
    msghdr, mmsghdr and iovec structs and of header pointers (for a sendmmsg from slot
    i on), the header array as 32-bit words (``words``, ``stride`` and the word indexes
    of msg_namelen, msg_flags and msg_len: columns of a received batch in one slice),
    ``data`` (the buffer; slices are bytes) and ``view`` (the buffer for slice
    assignment: a memoryview, or with ``memview=False`` the ffi buffer, cheaper on PyPy).
    """

    def __init__(self, ffi, n: int, slot: int = SLOT_SIZE, name_size: int = 0, *,
                 recv: bool = True, memview: bool = not _PYPY) -> None:
        self.size = n
        self.slot = slot
        self.hdrs = hdrs = ffi.new("struct mmsghdr[]", n)
        self.iov = iov = ffi.new("struct iovec[]", n)
        self.buf = buf = ffi.new("char[]", n * slot)
        self.names = names = ffi.new("char[]", n * name_size) if name_size else None
        self.slots = [buf + i * slot for i in range(n)]
        for i in range(n):
            iov[i].iov_base = self.slots[i]
            m = hdrs[i].msg_hdr
            m.msg_iov = iov + i
            m.msg_iovlen = 1
            if recv:
                iov[i].iov_len = slot
            if names is not None:
                m.msg_name = names + i * name_size
                m.msg_namelen = name_size
        self.mmsgs = [hdrs[i] for i in range(n)]
        self.msgs = [hdrs[i].msg_hdr for i in range(n)]
        self.iovs = [iov[i] for i in range(n)]
        self.ptrs = [hdrs + i for i in range(n)]
        self.data = ffi.buffer(buf)
        self.view = memoryview(self.data) if memview else self.data
        self.name_data = ffi.buffer(names) if names is not None else None
        self.hsize = hsize = ffi.sizeof("struct mmsghdr")
        self.template = bytes(ffi.buffer(hdrs))  # pristine headers, for resets
        self.words = memoryview(ffi.buffer(hdrs)).cast("I")
        self.stride = hsize // 4
        self.w_namelen = ffi.offsetof("struct msghdr", "msg_namelen") // 4
        self.w_flags = ffi.offsetof("struct msghdr", "msg_flags") // 4
        self.w_len = ffi.offsetof("struct mmsghdr", "msg_len") // 4
        self._memmove = ffi.memmove

    def reset(self, k: int) -> None:
        """Restore the first `k` headers (what a recvmmsg of k datagrams wrote into)."""
        self._memmove(self.hdrs, self.template, k * self.hsize)


class MmsgBatchIO:
    """recvmmsg/sendmmsg through cffi with preallocated arrays.

    Two tunings of the per-datagram loops, picked by interpreter: on PyPy the
    JIT makes cffi field access nearly free, so fields are read and written
    one by one; on CPython each cffi access costs tens of ns, so the
    received headers are read as whole columns through a memoryview and the
    receive headers are reset with one memmove from a template.
    """

    name = "mmsg"

    def __init__(self, batch: int = 64, vector_reads: Optional[bool] = None) -> None:
        ffi, lib = load()
        if ffi is None:
            raise RuntimeError(f"mmsg unavailable: {_load_error}")
        self.batch = batch = _check_batch(batch)
        self.truncated = 0
        self.send_errors: Dict[str, int] = {}
        self.recv_errors: Dict[str, int] = {}
        self._ffi = ffi
        self._recvmmsg = lib.recvmmsg
        self._sendmmsg = lib.sendmmsg
        self._null = ffi.NULL
        self._from_cache: Dict[bytes, Addr] = {}
        self._to_cache: Dict[Addr, tuple] = {}
        if vector_reads is None:
            vector_reads = not _PYPY
        self._vector_reads = bool(vector_reads)
        # receive: header i -> slot i of the buffer, sender's address -> name slot i
        self._rx = MsgVec(ffi, batch, SLOT_SIZE, NAME_SIZE)
        self._rdirty = 0  # leading slots the kernel wrote into (namelen etc.)
        # send: header i -> slot i; msg_name -> a cached sockaddr.  Slice assignment into
        # a buffer view is the cheapest copy on both interpreters (memoryview on CPython,
        # ffi.buffer on PyPy)
        self._tx = MsgVec(ffi, batch, SLOT_SIZE, recv=False, memview=self._vector_reads)
        # what each send slot currently holds, to skip redundant cffi writes;
        # _slot_ent also keeps the referenced sockaddr cdata alive
        self._slot_ent: List[Optional[tuple]] = [None] * batch
        self._slot_len = [-1] * batch
        self._eagain = False

    # -- receive ----------------------------------------------------------

    def recv(self, fd: int) -> List[Packet]:
        """Up to `batch` datagrams from non-blocking UDP socket `fd`."""
        rx = self._rx
        dirty = self._rdirty
        if dirty:
            if self._vector_reads:
                rx.reset(dirty)
            else:
                rm = rx.msgs
                for i in range(dirty):
                    rm[i].msg_namelen = NAME_SIZE
            self._rdirty = 0
        n = self._recvmmsg(fd, rx.hdrs, self.batch, MSG_DONTWAIT, self._null)
        if n <= 0:
            n = self._recv_retry(fd, n)
            if n <= 0:
                return []
        self._rdirty = n
        bufv = rx.data
        namev = rx.name_data
        cache = self._from_cache
        out = []
        append = out.append
        off = 0
        noff = 0
        if self._vector_reads:
            words = rx.words
            stride = rx.stride
            end = n * stride
            namelens = words[rx.w_namelen : end : stride].tolist()
            flags = words[rx.w_flags : end : stride].tolist()
            lens = words[rx.w_len : end : stride].tolist()
            for i in range(n):
                if flags[i] & MSG_TRUNC:
                    self.truncated += 1
                else:
                    key = namev[noff : noff + namelens[i]]
                    addr = cache.get(key)
                    if addr is None:
                        addr = self._decode(key)
                    append((bufv[off : off + lens[i]], addr))
                off += SLOT_SIZE
                noff += NAME_SIZE
        else:
            rm = rx.msgs
            rh = rx.mmsgs
            for i in range(n):
                m = rm[i]
                if m.msg_flags & MSG_TRUNC:
                    self.truncated += 1
                else:
                    key = namev[noff : noff + m.msg_namelen]
                    addr = cache.get(key)
                    if addr is None:
                        addr = self._decode(key)
                    append((bufv[off : off + rh[i].msg_len], addr))
                off += SLOT_SIZE
                noff += NAME_SIZE
        return out

    def _recv_retry(self, fd: int, n: int) -> int:
        """The slow path after recvmmsg returned n <= 0: EAGAIN -> 0, soft
        errors are counted and the call retried, the rest raise."""
        retries = 0
        while n < 0:
            e = self._ffi.errno
            if e in _EAGAIN:
                return 0
            if e != _EINTR:
                if e not in _SOFT_ERRNOS or retries >= _MAX_SOFT_RETRIES:
                    raise OSError(e, os.strerror(e))
                retries += 1
                name = _errname(e)
                self.recv_errors[name] = self.recv_errors.get(name, 0) + 1
            n = self._recvmmsg(fd, self._rx.hdrs, self.batch, MSG_DONTWAIT, self._null)
        return n

    def _decode(self, key: bytes) -> Addr:
        cache = self._from_cache
        if len(cache) >= ADDR_CACHE_MAX:
            cache.clear()
        addr = cache[key] = decode_sockaddr(key)
        return addr

    # -- send -------------------------------------------------------------

    def send(self, fd: int, packets: List[Packet]) -> int:
        """Send all `packets` in chunks of `batch`; returns how many were sent."""
        total = len(packets)
        if not total:
            return 0
        cache = self._to_cache
        if len(cache) >= ADDR_CACHE_MAX:
            cache.clear()  # slot_ent keeps entries still referenced by slots alive
        tx = self._tx
        sm = tx.msgs
        siov = tx.iovs
        sview = tx.view
        slot_ent = self._slot_ent
        slot_len = self._slot_len
        batch = self.batch
        sent = 0
        pos = 0
        big = None  # slot -> private copy of an over-slot-size payload
        while pos < total:
            k = 0
            off = 0
            while k < batch and pos < total:
                data, addr = packets[pos]
                pos += 1
                ent = cache.get(addr)
                if ent is None:
                    ent = self._encode(addr)
                    if ent is None:
                        continue
                if slot_ent[k] is not ent:
                    slot_ent[k] = ent
                    m = sm[k]
                    m.msg_name = ent[0]
                    m.msg_namelen = ent[1]
                ln = len(data)
                if ln <= SLOT_SIZE:
                    sview[off : off + ln] = data
                    if slot_len[k] != ln:
                        iov = siov[k]
                        if slot_len[k] < 0:  # fresh, or pointed at a big payload
                            iov.iov_base = tx.slots[k]
                        slot_len[k] = ln
                        iov.iov_len = ln
                else:
                    if big is None:
                        big = {}
                    big[k] = self._send_big(k, data)  # keeps the copy alive
                k += 1
                off += SLOT_SIZE
            if k:
                sent += self._send_slots(fd, k)
                if self._eagain:
                    self._eagain = False
                    self._count("EAGAIN", total - pos)
                    break
        if big:
            for k in big:
                siov[k].iov_base = tx.slots[k]
        return sent

    def _send_big(self, k: int, data) -> object:
        """Point slot k at a private copy of an over-slot-size payload."""
        copy = self._ffi.new("char[]", bytes(data))
        iov = self._tx.iovs[k]
        iov.iov_base = copy
        iov.iov_len = len(data)
        self._slot_len[k] = -1
        return copy  # kept alive by the caller until the call is done

    def _send_slots(self, fd: int, k: int) -> int:
        """sendmmsg slots [0, k); returns how many were sent.  Sets
        self._eagain (and counts the unsent slots) when the socket is full."""
        sendmmsg = self._sendmmsg
        ptrs = self._tx.ptrs
        off = 0
        sent = 0
        retried = -1
        while off < k:
            r = sendmmsg(fd, ptrs[off], k - off, MSG_DONTWAIT)
            if r > 0:
                sent += r
                off += r
                continue
            e = self._ffi.errno if r < 0 else errno.EIO
            if e == _EINTR:
                continue
            if e in _EAGAIN:
                self._count("EAGAIN", k - off)
                self._eagain = True
                return sent
            self._count(_errname(e), 1)
            if e in _PENDING_SEND_ERRNOS and retried != off:
                retried = off  # retry this datagram once
                continue
            off += 1  # drop this datagram, go on with the rest
        return sent

    def _encode(self, addr: Addr):
        try:
            raw = encode_sockaddr(addr)
        except (OSError, ValueError, TypeError, OverflowError, IndexError):
            self._count("EINVAL", 1)
            return None
        ent = (self._ffi.new("char[]", raw), len(raw))
        self._to_cache[addr] = ent
        return ent

    def _count(self, name: str, n: int) -> None:
        if n > 0:
            self.send_errors[name] = self.send_errors.get(name, 0) + n


class PlainBatchIO:
    """recvfrom/sendto loops; works everywhere the socket module does."""

    name = "plain"

    def __init__(self, batch: int = 64) -> None:
        self.batch = _check_batch(batch)
        self.truncated = 0
        self.send_errors: Dict[str, int] = {}
        self.recv_errors: Dict[str, int] = {}

    def recv(self, fd: int) -> List[Packet]:
        # a temporary non-owning wrapper; detach() leaves the fd open
        s = socket.socket(fileno=fd)
        try:
            return self._recv(s)
        finally:
            s.detach()

    def _recv(self, s: socket.socket) -> List[Packet]:
        recvfrom = s.recvfrom
        out = []
        append = out.append
        retries = 0
        limit = SLOT_SIZE + 1  # one extra byte tells an over-long datagram
        n = self.batch
        while n:
            try:
                data, addr = recvfrom(limit, MSG_DONTWAIT)
            except BlockingIOError:
                break
            except InterruptedError:
                continue
            except OSError as exc:
                if exc.errno in _SOFT_ERRNOS and retries < _MAX_SOFT_RETRIES:
                    retries += 1
                    name = _errname(exc.errno)
                    self.recv_errors[name] = self.recv_errors.get(name, 0) + 1
                    continue
                raise
            n -= 1
            if len(data) > SLOT_SIZE:
                self.truncated += 1
                continue
            if len(addr) != 2:
                ip = addr[0]
                if "%" in ip:
                    ip = ip.split("%", 1)[0]
                addr = (ip, addr[1])
            append((data, addr))
        return out

    def send(self, fd: int, packets: List[Packet]) -> int:
        if not packets:
            return 0
        # Temporary non-owning wrappers, one per destination family (so the
        # address tuple is parsed as that family's sockaddr, as with sendmmsg:
        # an IPv4 destination on a dual-stack IPv6 socket works, an IPv6 one
        # on an IPv4 socket fails with EAFNOSUPPORT).  detach() keeps the fd.
        wraps: List[Optional[socket.socket]] = [None, None]
        try:
            return self._send(fd, packets, wraps)
        finally:
            for w in wraps:
                if w is not None:
                    w.detach()

    def _send(self, fd: int, packets: List[Packet], wraps: list) -> int:
        sent = 0
        total = len(packets)
        i = 0
        retried = -1
        while i < total:
            data, addr = packets[i]
            try:
                v6 = 1 if ":" in addr[0] else 0
                w = wraps[v6]
                if w is None:
                    w = wraps[v6] = socket.socket(
                        AF_INET6 if v6 else AF_INET, socket.SOCK_DGRAM, 0, fd
                    )
                w.sendto(data, MSG_DONTWAIT, addr)
            except BlockingIOError:
                self._count("EAGAIN", total - i)
                break
            except InterruptedError:
                continue
            except OSError as exc:
                e = exc.errno
                if isinstance(exc, socket.gaierror) or e is None:
                    self._count("EINVAL", 1)  # not a numeric address
                    i += 1
                    continue
                self._count(_errname(e), 1)
                if e in _PENDING_SEND_ERRNOS and retried != i:
                    retried = i  # retry this datagram once
                    continue
                i += 1
                continue
            except (TypeError, ValueError, OverflowError, IndexError):
                self._count("EINVAL", 1)
                i += 1
                continue
            sent += 1
            i += 1
        return sent

    def _count(self, name: str, n: int) -> None:
        if n > 0:
            self.send_errors[name] = self.send_errors.get(name, 0) + n


def _check_batch(batch: int) -> int:
    batch = int(batch)
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    return min(batch, MAX_BATCH)


def make_batch_io(batch: int = 64, prefer: str = "auto") -> BatchIO:
    """Return a BatchIO.  prefer="auto" picks mmsg when available, else plain;
    "mmsg" insists (RuntimeError when unavailable); "plain" forces the fallback."""
    if prefer == "plain":
        return PlainBatchIO(batch)
    if prefer == "mmsg":
        if not mmsg_available():
            raise RuntimeError(f"mmsg unavailable: {_load_error}")
        return MmsgBatchIO(batch)
    if prefer == "auto":
        if mmsg_available():
            return MmsgBatchIO(batch)
        return PlainBatchIO(batch)
    raise ValueError(f"prefer must be 'auto', 'mmsg' or 'plain', got {prefer!r}")
