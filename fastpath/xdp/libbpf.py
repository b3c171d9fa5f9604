"""libbpf through cffi in ABI mode (no compiler at run time; CPython and PyPy alike).

Only what lrk needs: open and load an object, program and map fds, XDP attach, detach
and query, map element calls (per-CPU values come as one buffer of n_cpus slots) and
BPF_PROG_TEST_RUN for the tests. libbpf 1.x returns -errno; errors become XdpError
with the call and the errno's text.
"""

from __future__ import annotations

import errno
import os
import threading
from typing import Dict, Optional, Tuple

from cffi import FFI

from fastpath.xdp.errors import XdpAttachError, XdpError

LIBBPF = "libbpf.so.1"

XDP_FLAGS_UPDATE_IF_NOEXIST = 1
XDP_FLAGS_SKB_MODE = 2
XDP_FLAGS_DRV_MODE = 4
BPF_ANY = 0

#: verdicts (linux/bpf.h enum xdp_action)
XDP_ABORTED, XDP_DROP, XDP_PASS, XDP_TX, XDP_REDIRECT = range(5)

_CDEF = """
struct bpf_object;
struct bpf_program;
struct bpf_map;
struct bpf_object_open_opts {
    size_t sz;
    const char *object_name;
    bool relaxed_maps;
    const char *pin_root_path;
    uint32_t :32;
    const char *kconfig;
    const char *btf_custom_path;
    char *kernel_log_buf;
    size_t kernel_log_size;
    uint32_t kernel_log_level;
    ...;
};
struct bpf_test_run_opts {
    size_t sz;
    const void *data_in;
    void *data_out;
    uint32_t data_size_in;
    uint32_t data_size_out;
    const void *ctx_in;
    void *ctx_out;
    uint32_t ctx_size_in;
    uint32_t ctx_size_out;
    uint32_t retval;
    int repeat;
    uint32_t duration;
    uint32_t flags;
    uint32_t cpu;
    uint32_t batch_size;
};
struct bpf_object *bpf_object__open_file(const char *path,
                                         const struct bpf_object_open_opts *opts);
int bpf_object__load(struct bpf_object *obj);
void bpf_object__close(struct bpf_object *obj);
struct bpf_program *bpf_object__find_program_by_name(const struct bpf_object *obj,
                                                     const char *name);
int bpf_program__fd(const struct bpf_program *prog);
int bpf_program__set_autoload(struct bpf_program *prog, bool autoload);
struct bpf_map *bpf_object__find_map_by_name(const struct bpf_object *obj, const char *name);
int bpf_map__fd(const struct bpf_map *map);
int bpf_map__set_max_entries(struct bpf_map *map, uint32_t max_entries);
int bpf_xdp_attach(int ifindex, int prog_fd, uint32_t flags, const void *opts);
int bpf_xdp_detach(int ifindex, uint32_t flags, const void *opts);
int bpf_xdp_query_id(int ifindex, int flags, uint32_t *prog_id);
int bpf_map_update_elem(int fd, const void *key, const void *value, uint64_t flags);
int bpf_map_lookup_elem(int fd, const void *key, void *value);
int bpf_map_delete_elem(int fd, const void *key);
int bpf_map_lookup_batch(int fd, void *in_batch, void *out_batch, void *keys,
                         void *values, uint32_t *count, const void *opts);
int bpf_prog_test_run_opts(int prog_fd, struct bpf_test_run_opts *opts);
int libbpf_num_possible_cpus(void);
void *libbpf_set_print(void *fn);
unsigned int if_nametoindex(const char *ifname);
int bpf_prog_get_fd_by_id(uint32_t id);
int bpf_obj_get_info_by_fd(int bpf_fd, void *info, uint32_t *info_len);
"""

_ffi = FFI()
_lib = None
_libc = None
_lock = threading.Lock()


def _load():
    global _lib
    with _lock:
        if _lib is None:
            # the struct layouts above are libbpf 1.1's; '...' is not allowed in ABI mode
            _ffi.cdef(_CDEF.replace("    ...;\n", "    size_t _end;\n")
                      .replace("uint32_t :32;", "uint32_t _stub;"))
            try:
                _lib = _ffi.dlopen(LIBBPF)
            except OSError as exc:
                raise XdpError(f"xdp mode needs {LIBBPF} ({exc}): apt-get install libbpf1 "
                               "libbpf-dev, or use --mode kernel") from exc
            _lib.libbpf_set_print(_ffi.NULL)  # errors come back as -errno, typed here
    return _lib


def if_nametoindex(name: str) -> int:
    """The interface's index in the calling thread's namespace (PyPy 3.9's socket module
    has no if_nametoindex); raises OSError when there is no such interface."""
    global _libc
    _load()
    if _libc is None:
        _libc = _ffi.dlopen(None)
    index = _libc.if_nametoindex(name.encode())
    if not index:
        raise OSError(_ffi.errno, f"no interface {name!r}: {os.strerror(_ffi.errno)}")
    return int(index)


def _check(what: str, rc: int) -> int:
    if rc < 0:
        err = -rc
        raise XdpError(f"{what}: {os.strerror(err)} ({errno.errorcode.get(err, err)})")
    return rc


def num_cpus() -> int:
    """Slots in a per-CPU map value (possible CPUs, not online ones)."""
    return _check("libbpf_num_possible_cpus", _load().libbpf_num_possible_cpus())


class BpfObject:
    """A loaded BPF object: its programs and maps by name; closing it releases them
    (a program stays only while attached somewhere)."""

    def __init__(self, path: str, max_entries: Optional[Dict[str, int]] = None) -> None:
        lib = _load()
        self._log = _ffi.new("char[]", 1 << 20)
        opts = _ffi.new("struct bpf_object_open_opts *")
        opts.sz = _ffi.offsetof("struct bpf_object_open_opts", "_end")
        opts.kernel_log_buf = self._log
        opts.kernel_log_size = 1 << 20
        opts.kernel_log_level = 0  # the verifier's log only when it refuses
        self._opts = opts
        obj = lib.bpf_object__open_file(path.encode(), opts)
        if obj == _ffi.NULL:
            err = _ffi.errno or errno.EINVAL
            raise XdpError(f"cannot open BPF object {path}: {os.strerror(err)}")
        self._obj = obj
        try:
            for name, n in (max_entries or {}).items():
                _check(f"bpf_map__set_max_entries({name})",
                       lib.bpf_map__set_max_entries(self._map(name), n))
            rc = lib.bpf_object__load(obj)
            if rc < 0:
                log = _ffi.string(self._log).decode(errors="replace")[-4000:]
                hint = ""
                if -rc == errno.EPERM:
                    hint = (": loading BPF programs needs CAP_BPF and CAP_NET_ADMIN (or root; "
                            "kernels before 5.11 also a memlock limit that holds the maps)")
                raise XdpError(f"the kernel refused {os.path.basename(path)}: "
                               f"{os.strerror(-rc)}{hint}; --mode kernel works without BPF"
                               + (f"\n{log}" if log else ""))
        except BaseException:
            self.close()
            raise

    def _map(self, name: str):
        m = _load().bpf_object__find_map_by_name(self._obj, name.encode())
        if m == _ffi.NULL:
            raise XdpError(f"BPF object has no map {name!r}")
        return m

    def map_fd(self, name: str) -> int:
        return _check(f"bpf_map__fd({name})", _load().bpf_map__fd(self._map(name)))

    def prog_fd(self, name: str) -> int:
        p = _load().bpf_object__find_program_by_name(self._obj, name.encode())
        if p == _ffi.NULL:
            raise XdpError(f"BPF object has no program {name!r}")
        return _check(f"bpf_program__fd({name})", _load().bpf_program__fd(p))

    def close(self) -> None:
        if self._obj is not None:
            _load().bpf_object__close(self._obj)
            self._obj = None


class BpfMap:
    """Element calls on one map fd; `slots` > 1 for per-CPU maps."""

    def __init__(self, fd: int, key_size: int, value_size: int, slots: int = 1) -> None:
        self.fd = fd
        self.key_size = key_size
        self.value_size = value_size
        self.slots = slots
        # per-CPU values are rounded up to 8 bytes a slot
        self._stride = (value_size + 7) // 8 * 8 if slots > 1 else value_size
        self._buf = _ffi.new("char[]", self._stride * slots)

    def update(self, key: bytes, value: bytes, flags: int = BPF_ANY) -> None:
        if self.slots > 1 and len(value) == self.value_size:
            value = b"".join(value.ljust(self._stride, b"\0") for _ in range(self.slots))
        _check("bpf_map_update_elem", _load().bpf_map_update_elem(self.fd, key, value, flags))

    def lookup(self, key: bytes) -> Optional[bytes]:
        rc = _load().bpf_map_lookup_elem(self.fd, key, self._buf)
        if rc == -errno.ENOENT:
            return None
        _check("bpf_map_lookup_elem", rc)
        return _ffi.buffer(self._buf)[:]

    def lookup_array(self, count: int, chunk: int = 8192) -> bytes:
        """The values of array indexes 0..count-1 in a few BPF_MAP_LOOKUP_BATCH calls (one
        per `chunk`), as one buffer of `count` values (per-CPU: `slots` each): reading
        tens of thousands of counters one lookup at a time costs a syscall each."""
        lib = _load()
        stride = self._stride * self.slots
        out = bytearray()
        keys = _ffi.new("uint32_t[]", chunk)
        values = _ffi.new("char[]", stride * chunk)
        n = _ffi.new("uint32_t *")
        batch = _ffi.new("uint32_t *")
        start = 0
        while start < count:
            want = min(chunk, count - start)
            n[0] = want
            # in_batch: where the previous call stopped (NULL: from the first index)
            rc = lib.bpf_map_lookup_batch(self.fd, _ffi.NULL if start == 0 else batch,
                                          batch, keys, values, n, _ffi.NULL)
            if rc < 0 and rc != -errno.ENOENT:
                _check("bpf_map_lookup_batch", rc)
            got = n[0]
            out += _ffi.buffer(values, stride * got)
            start += got
            if rc == -errno.ENOENT or got == 0:
                break
        return bytes(out[:stride * count])

    def delete(self, key: bytes) -> bool:
        rc = _load().bpf_map_delete_elem(self.fd, key)
        if rc == -errno.ENOENT:
            return False
        _check("bpf_map_delete_elem", rc)
        return True


def xdp_attach(ifindex: int, prog_fd: int, flags: int) -> None:
    rc = _load().bpf_xdp_attach(ifindex, prog_fd, flags, _ffi.NULL)
    if rc < 0:
        raise XdpAttachError(f"bpf_xdp_attach(ifindex {ifindex}): {os.strerror(-rc)}")


def xdp_detach(ifindex: int, flags: int) -> None:
    _check(f"bpf_xdp_detach(ifindex {ifindex})",
           _load().bpf_xdp_detach(ifindex, flags, _ffi.NULL))


def xdp_query_id(ifindex: int, flags: int = 0) -> int:
    """Id of the XDP program attached to an interface in that mode (0: none)."""
    out = _ffi.new("uint32_t *")
    _check(f"bpf_xdp_query_id(ifindex {ifindex})",
           _load().bpf_xdp_query_id(ifindex, flags, out))
    return int(out[0])


#: struct bpf_prog_info up to the end of `name` (offset 64, 16 bytes)
_INFO_NAME = slice(64, 80)


def prog_name(prog_id: int) -> str:
    """The name of a loaded program by id ("" when it is gone)."""
    lib = _load()
    fd = lib.bpf_prog_get_fd_by_id(prog_id)
    if fd == -errno.EPERM:
        raise XdpError(f"cannot look at BPF program id {prog_id}: looking a program up by "
                       "id needs CAP_SYS_ADMIN")
    if fd < 0:
        return ""
    try:
        info = _ffi.new("char[]", 80)
        size = _ffi.new("uint32_t *", 80)
        _check("bpf_obj_get_info_by_fd", lib.bpf_obj_get_info_by_fd(fd, info, size))
        return _ffi.buffer(info)[_INFO_NAME].split(b"\0")[0].decode(errors="replace")
    finally:
        os.close(fd)


def test_run(prog_fd: int, frame: bytes, ingress_ifindex: int = 0,
             repeat: int = 1, rx_queue: int = 0) -> Tuple[int, bytes, int]:
    """BPF_PROG_TEST_RUN: (verdict, frame out, ns per run). `ingress_ifindex` sets
    xdp_md.ingress_ifindex (an interface of the calling thread's namespace), `rx_queue`
    xdp_md.rx_queue_index (a queue of that interface)."""
    lib = _load()
    out = _ffi.new("char[]", len(frame) + 256)
    ctx = _ffi.new("uint32_t[6]")  # struct xdp_md: data, data_end, data_meta, ifindex, rxq, egress
    ctx[1] = len(frame)
    ctx[3] = ingress_ifindex
    ctx[4] = rx_queue
    opts = _ffi.new("struct bpf_test_run_opts *")
    opts.sz = _ffi.sizeof("struct bpf_test_run_opts")
    opts.data_in = _ffi.from_buffer(frame)
    opts.data_size_in = len(frame)
    opts.data_out = out
    opts.data_size_out = len(frame) + 256
    opts.ctx_in = ctx
    opts.ctx_size_in = _ffi.sizeof(ctx)
    opts.repeat = repeat
    _check("bpf_prog_test_run_opts", lib.bpf_prog_test_run_opts(prog_fd, opts))
    return int(opts.retval), _ffi.buffer(out, opts.data_size_out)[:], int(opts.duration)


#: bpf_test_run_opts.flags: the frames a test run's program returns XDP_TX/REDIRECT for are
#: really sent (kernel >= 5.18)
BPF_F_TEST_XDP_LIVE_FRAMES = 1 << 1
#: the kernel's cap on batch_size in a live test run (TEST_XDP_MAX_BATCH)
LIVE_MAX_BATCH = 256


class LiveRun:
    """BPF_PROG_TEST_RUN in live-frames mode, its arguments built once and reused: each
    `send(n)` runs the program on `n` copies of `frame` and transmits what it returns
    XDP_TX or XDP_REDIRECT for, on the calling CPU, in batches of `batch_size`.
    `ingress_ifindex` (in the calling thread's namespace) is where XDP_TX sends."""

    def __init__(self, prog_fd: int, frame: bytes, ingress_ifindex: int,
                 batch_size: int = 64) -> None:
        if not 0 < batch_size <= LIVE_MAX_BATCH:
            raise ValueError(f"batch_size {batch_size} outside 1..{LIVE_MAX_BATCH}")
        self._lib = _load()
        self._frame = _ffi.new("char[]", frame)
        self._ctx = _ffi.new("uint32_t[6]")
        self._ctx[1] = len(frame)
        self._ctx[3] = ingress_ifindex
        opts = _ffi.new("struct bpf_test_run_opts *")
        opts.sz = _ffi.sizeof("struct bpf_test_run_opts")
        opts.data_in = self._frame
        opts.data_size_in = len(frame)
        opts.ctx_in = self._ctx
        opts.ctx_size_in = _ffi.sizeof(self._ctx)
        opts.flags = BPF_F_TEST_XDP_LIVE_FRAMES
        opts.batch_size = batch_size
        self._opts = opts
        self._fd = prog_fd

    def send(self, n: int) -> bool:
        """Run the program `n` times and transmit what it returns XDP_TX for (the kernel
        loops; one syscall). False: a signal to this thread ended the run early (EINTR)."""
        self._opts.repeat = n
        rc = self._lib.bpf_prog_test_run_opts(self._fd, self._opts)
        if rc == -errno.EINTR:
            return False
        if rc < 0:
            hint = (" (live frames need kernel >= 5.18 and an interface that takes XDP "
                    "frames: a veth whose peer has NAPI, i.e. GRO on or an XDP program)"
                    if -rc in (errno.EINVAL, errno.EOPNOTSUPP) else "")
            raise XdpError(f"bpf_prog_test_run_opts (live frames): {os.strerror(-rc)}{hint}")
        return True
