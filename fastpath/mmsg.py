"""Batched UDP datagram I/O for the data plane.

Two implementations behind one small interface (:class:`BatchIO`):

* ``"mmsg"`` -- recvmmsg(2)/sendmmsg(2) called through cffi in ABI mode
  (``ffi.cdef`` + ``ffi.dlopen(None)``; no C compiler at run time), so it
  works the same on PyPy and CPython.  All mmsghdr/iovec/payload/sockaddr
  arrays are allocated once per instance and reused.
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
  is still sent.  A pending ICMP error (which belongs to an earlier
  datagram) is counted and the datagram retried once.  EAGAIN (socket
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
import socket
import sys
from typing import Dict, List, Optional, Protocol, Tuple

__all__ = [
    "ADDR_CACHE_MAX",
    "MAX_BATCH",
    "SLOT_SIZE",
    "BatchIO",
    "MmsgBatchIO",
    "PlainBatchIO",
    "make_batch_io",
    "mmsg_available",
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
# errors a UDP socket reports asynchronously (from an ICMP message about an
# earlier datagram); consuming them clears them, so a retry is meaningful
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


def _load():
    """Load cffi + libc once; returns (ffi, lib) or (None, None)."""
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


def mmsg_available() -> bool:
    """True when recvmmsg/sendmmsg can be used (cffi importable, symbols present,
    and the kernel implements the syscalls).  The probe runs once."""
    global _available, _load_error
    if _available is not None:
        return _available
    ffi, lib = _load()
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


class MmsgBatchIO:
    """recvmmsg/sendmmsg through cffi with preallocated arrays."""

    name = "mmsg"

    def __init__(self, batch: int = 64) -> None:
        ffi, lib = _load()
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

        # receive side: mmsghdr[i] -> iov[i] -> rbuf[i*SLOT:], name -> rname[i*NAME:]
        self._rhdrs = rh = ffi.new("struct mmsghdr[]", batch)
        self._riov = riov = ffi.new("struct iovec[]", batch)
        self._rbuf = rbuf = ffi.new("char[]", batch * SLOT_SIZE)
        self._rname = rname = ffi.new("char[]", batch * NAME_SIZE)
        for i in range(batch):
            riov[i].iov_base = rbuf + i * SLOT_SIZE
            riov[i].iov_len = SLOT_SIZE
            m = rh[i].msg_hdr
            m.msg_name = rname + i * NAME_SIZE
            m.msg_namelen = NAME_SIZE
            m.msg_iov = riov + i
            m.msg_iovlen = 1
        self._rh_list = [rh[i] for i in range(batch)]
        self._rm_list = [rh[i].msg_hdr for i in range(batch)]
        self._rbuf_view = ffi.buffer(rbuf)
        self._rname_view = ffi.buffer(rname)
        self._rdirty = 0  # slots whose msg_namelen the kernel overwrote

        # send side: mmsghdr[i] -> iov[i] -> sbuf[i*SLOT:], name -> cached sockaddr
        self._shdrs = sh = ffi.new("struct mmsghdr[]", batch)
        self._siov = siov = ffi.new("struct iovec[]", batch)
        self._sbuf = sbuf = ffi.new("char[]", batch * SLOT_SIZE)
        self._sslot = [sbuf + i * SLOT_SIZE for i in range(batch)]
        for i in range(batch):
            siov[i].iov_base = self._sslot[i]
            m = sh[i].msg_hdr
            m.msg_iov = siov + i
            m.msg_iovlen = 1
        self._sm_list = [sh[i].msg_hdr for i in range(batch)]
        self._siov_list = [siov[i] for i in range(batch)]
        self._sh_ptrs = [sh + i for i in range(batch)]

    # -- receive ----------------------------------------------------------

    def recv(self, fd: int) -> List[Packet]:
        rm = self._rm_list
        for i in range(self._rdirty):
            rm[i].msg_namelen = NAME_SIZE
        self._rdirty = 0
        retries = 0
        while True:
            n = self._recvmmsg(fd, self._rhdrs, self.batch, MSG_DONTWAIT, self._null)
            if n > 0:
                break
            if n == 0:
                return []
            e = self._ffi.errno
            if e in _EAGAIN:
                return []
            if e == _EINTR:
                continue
            if e in _SOFT_ERRNOS and retries < _MAX_SOFT_RETRIES:
                retries += 1
                name = _errname(e)
                self.recv_errors[name] = self.recv_errors.get(name, 0) + 1
                continue
            raise OSError(e, os.strerror(e))
        self._rdirty = n
        rh = self._rh_list
        bufv = self._rbuf_view
        namev = self._rname_view
        cache = self._from_cache
        out = []
        append = out.append
        for i in range(n):
            m = rm[i]
            if m.msg_flags & MSG_TRUNC:
                self.truncated += 1
                continue
            off = i * SLOT_SIZE
            noff = i * NAME_SIZE
            key = namev[noff : noff + m.msg_namelen]
            addr = cache.get(key)
            if addr is None:
                addr = self._decode(key)
            append((bufv[off : off + rh[i].msg_len], addr))
        return out

    def _decode(self, key: bytes) -> Addr:
        cache = self._from_cache
        if len(cache) >= ADDR_CACHE_MAX:
            cache.clear()
        addr = cache[key] = decode_sockaddr(key)
        return addr

    # -- send -------------------------------------------------------------

    def send(self, fd: int, packets: List[Packet]) -> int:
        total = len(packets)
        if not total:
            return 0
        cache = self._to_cache
        if len(cache) >= ADDR_CACHE_MAX:
            # only cleared here, so sockaddrs referenced by this call stay alive
            cache.clear()
        ffi = self._ffi
        memmove = ffi.memmove
        sm = self._sm_list
        siov = self._siov_list
        sslot = self._sslot
        batch = self.batch
        sent = 0
        pos = 0
        keep = None  # out-of-slot payload copies for oversized datagrams
        big = None  # slots whose iov_base points outside sbuf
        while pos < total:
            k = 0
            while k < batch and pos < total:
                data, addr = packets[pos]
                pos += 1
                ent = cache.get(addr)
                if ent is None:
                    ent = self._encode(addr)
                    if ent is None:
                        continue
                m = sm[k]
                m.msg_name = ent[0]
                m.msg_namelen = ent[1]
                ln = len(data)
                iov = siov[k]
                if ln <= SLOT_SIZE:
                    if big is not None and k in big:
                        iov.iov_base = sslot[k]
                        big.discard(k)
                    memmove(sslot[k], data, ln)
                else:
                    copy = ffi.new("char[]", bytes(data))
                    if keep is None:
                        keep = []
                        big = set()
                    keep.append(copy)
                    big.add(k)
                    iov.iov_base = copy
                iov.iov_len = ln
                k += 1
            if k:
                sent += self._send_slots(fd, k)
                if self._eagain:
                    self._eagain = False
                    self._count("EAGAIN", total - pos)
                    break
        if big:
            for k in big:
                siov[k].iov_base = sslot[k]
        return sent

    _eagain = False

    def _send_slots(self, fd: int, k: int) -> int:
        """sendmmsg slots [0, k); returns how many were sent.  Sets
        self._eagain (and counts the unsent slots) when the socket is full."""
        sendmmsg = self._sendmmsg
        ptrs = self._sh_ptrs
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
            if e in _SOFT_ERRNOS and retried != off:
                retried = off  # a pending ICMP error: retry this datagram once
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
        s = socket.socket(fileno=fd)
        try:
            return self._send(s, packets)
        finally:
            s.detach()

    def _send(self, s: socket.socket, packets: List[Packet]) -> int:
        sendto = s.sendto
        sent = 0
        total = len(packets)
        i = 0
        retried = -1
        while i < total:
            data, addr = packets[i]
            try:
                sendto(data, MSG_DONTWAIT, addr)
            except BlockingIOError:
                self._count("EAGAIN", total - i)
                break
            except InterruptedError:
                continue
            except OSError as exc:
                e = exc.errno
                if isinstance(exc, socket.gaierror) or e is None:
                    # not a numeric address of this socket's family
                    sent += self._send_odd(s, data, addr)
                    i += 1
                    continue
                self._count(_errname(e), 1)
                if e in _SOFT_ERRNOS and retried != i:
                    retried = i  # a pending ICMP error: retry this datagram once
                    continue
                i += 1
                continue
            except (TypeError, ValueError, OverflowError):
                self._count("EINVAL", 1)
                i += 1
                continue
            sent += 1
            i += 1
        return sent

    def _send_odd(self, s: socket.socket, data: bytes, addr) -> int:
        """An IPv4 address on an IPv6 socket goes v4-mapped (as sendmmsg
        does); anything else unparseable counts as EINVAL."""
        mapped = _v4mapped(addr) if s.family == AF_INET6 else None
        if mapped is None:
            self._count("EINVAL", 1)
            return 0
        try:
            s.sendto(data, MSG_DONTWAIT, mapped)
        except OSError as exc:
            self._count(_errname(exc.errno or errno.EINVAL), 1)
            return 0
        return 1

    def _count(self, name: str, n: int) -> None:
        if n > 0:
            self.send_errors[name] = self.send_errors.get(name, 0) + n


def _v4mapped(addr) -> Optional[Addr]:
    try:
        ip = addr[0]
        if ":" in ip:
            return None
        socket.inet_pton(AF_INET, ip)
        return ("::ffff:" + ip, addr[1])
    except (OSError, TypeError, IndexError):
        return None


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
