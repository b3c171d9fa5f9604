"""Apply nftables command text: libnftables through cffi (ABI mode), else the nft binary.

:class:`Nft` runs a buffer of nft commands as ONE transaction (all commands
apply or none do) and returns nft's output; failures raise :class:`NftError`
carrying nft's own message and the offending command lines.

Network namespaces: libnftables talks netlink in the network namespace its
context's socket was opened in, i.e. the namespace of the thread that created
the :class:`Nft` -- a later ``setns`` of that thread does not move it (tested);
the ``nft`` binary runs in the caller's namespace.
The relay process itself runs inside its own namespace (``ip netns exec``),
so its rules never land in the host's ruleset; do not ``setns`` threads
around an :class:`Nft`.

Commands reach libnftables through a memfd (``nft_run_cmd_from_filename``):
from a buffer nft 1.0.6 quotes line 1 for every error.  Also in 1.0.6, several
``list`` commands in one call confuse its cache ("No such file or directory"
for a set that exists): run one listing per call.

Scale (1.0.6, 400,000 set elements = 100,000 sessions): adding/deleting a
session's elements stays ~0.3 ms; ``list set`` takes 13-20 s every time; a
``get element`` takes ~50 s the first time after any ruleset change (the
context refetches the set), then ~0.1 ms with fresh counters.

A context is not thread-safe; calls are serialised by a lock.  The library
call releases the GIL (cffi), so it can run in an executor thread.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import subprocess
import tempfile
import threading
from typing import Any, Dict, Iterator, List, Optional, Tuple

from fastpath.errors import LrkError

__all__ = ["LIBNFTABLES", "NFT_CTX_OUTPUT_JSON", "Nft", "NftError", "merge_json"]

LIBNFTABLES = "libnftables.so.1"
#: nft_ctx_output_set_flags bit for JSON output
NFT_CTX_OUTPUT_JSON = 1 << 4
#: characters of nft's error text kept in an NftError message
_MAX_ERROR_CHARS = 4000
#: offending command lines quoted in an NftError message
_MAX_QUOTED_LINES = 5
#: seconds the nft binary may take (a large element batch takes a while)
DEFAULT_TIMEOUT = 300.0

_CDEF = """
struct nft_ctx;
struct nft_ctx *nft_ctx_new(uint32_t flags);
void nft_ctx_free(struct nft_ctx *ctx);
int nft_ctx_buffer_output(struct nft_ctx *ctx);
int nft_ctx_buffer_error(struct nft_ctx *ctx);
const char *nft_ctx_get_output_buffer(struct nft_ctx *ctx);
const char *nft_ctx_get_error_buffer(struct nft_ctx *ctx);
unsigned int nft_ctx_output_get_flags(struct nft_ctx *ctx);
void nft_ctx_output_set_flags(struct nft_ctx *ctx, unsigned int flags);
int nft_run_cmd_from_buffer(struct nft_ctx *nft, const char *buf);
int nft_run_cmd_from_filename(struct nft_ctx *nft, const char *filename);
"""

# "<input>:3:5-9: Error: ...": the input name is the memfd path or /dev/stdin
_LOCATION_RE = re.compile(r"^([^\n:]+):(\d+):\d+(?:-\d+)?: ", re.MULTILINE)


class NftError(LrkError):
    """nft refused a command buffer (nothing of it was applied) or could not run at all."""

    code = "nft"

    def __init__(
        self, message: str, nft_error: str = "", commands: Optional[List[str]] = None
    ) -> None:
        super().__init__(message)
        self.nft_error = nft_error
        self.commands = commands or []


def _error(nft_error: str, text: str, how: str) -> NftError:
    """An NftError quoting nft's message and the input lines it points at."""
    lines = text.splitlines()
    numbers: List[int] = []
    for match in _LOCATION_RE.finditer(nft_error):
        n = int(match.group(2))
        if n not in numbers and 1 <= n <= len(lines):
            numbers.append(n)
    numbers = numbers[:_MAX_QUOTED_LINES]
    quoted = [lines[n - 1] for n in numbers]
    err = _LOCATION_RE.sub(lambda m: f"line {m.group(2)}: ", nft_error).strip()
    err = err or "(nft printed no error)"
    if len(err) > _MAX_ERROR_CHARS:
        err = err[:_MAX_ERROR_CHARS] + "..."
    message = f"nft ({how}) rejected the {len(lines)}-line transaction, nothing applied: {err}"
    for n, line in zip(numbers, quoted):
        shown = line if len(line) <= 300 else line[:300] + "..."
        message += f"\n  offending command (line {n}): {shown}"
    return NftError(message, nft_error, quoted)


def merge_json(output: str) -> Dict[str, Any]:
    """Parse nft JSON output; several documents (one per list command) merge into one."""
    decoder = json.JSONDecoder()
    merged: Dict[str, Any] = {"nftables": []}
    pos, end = 0, len(output)
    while True:
        while pos < end and output[pos].isspace():
            pos += 1
        if pos >= end:
            return merged
        try:
            doc, pos = decoder.raw_decode(output, pos)
        except ValueError as exc:
            raise NftError(f"nft output is not JSON ({exc}): {output[:200]!r}") from None
        if not isinstance(doc, dict) or not isinstance(doc.get("nftables"), list):
            raise NftError(f"nft JSON output lacks the 'nftables' list: {output[:200]!r}")
        merged["nftables"].extend(doc["nftables"])


@contextlib.contextmanager
def _command_file(data: bytes) -> Iterator[Tuple[int, str]]:
    """(fd, path) of a file holding ``data``: a memfd, else an unlinked-on-exit temp file."""
    if hasattr(os, "memfd_create"):
        fd = os.memfd_create("lrk-nft")  # close-on-exec; the nft binary gets it via pass_fds
        path = f"/proc/self/fd/{fd}"
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            yield fd, path
        finally:
            os.close(fd)
        return
    with tempfile.NamedTemporaryFile(prefix="lrk-nft-", suffix=".nft") as tmp:
        tmp.write(data)
        tmp.flush()
        yield tmp.fileno(), tmp.name


_lib_lock = threading.Lock()
_lib: Any = None  # (ffi, lib), or the exception that prevented loading


def _load_library() -> Any:
    """cffi + libnftables once per process; returns (ffi, lib) or raises the loading error."""
    global _lib
    with _lib_lock:
        if _lib is None:
            try:
                import cffi

                ffi = cffi.FFI()
                ffi.cdef(_CDEF)
                _lib = (ffi, ffi.dlopen(LIBNFTABLES))
            except Exception as exc:  # ImportError, OSError, cffi errors
                _lib = exc
        if isinstance(_lib, Exception):
            raise _lib
        return _lib


def _string(ffi: Any, ptr: Any) -> str:
    return "" if ptr == ffi.NULL else ffi.string(ptr).decode(errors="replace")


class Nft:
    """Runs nft command text as one transaction in the current network namespace.

    ``backend``: ``"library"`` (libnftables, required), ``"subprocess"`` (the
    ``nft`` binary), or None: the library when it loads, else the binary.
    """

    def __init__(
        self,
        backend: Optional[str] = None,
        nft_path: Optional[str] = None,
        timeout: float = DEFAULT_TIMEOUT,
    ) -> None:
        if backend not in (None, "library", "subprocess"):
            raise NftError(f"unknown nft backend {backend!r}: use 'library' or 'subprocess'")
        self._lock = threading.Lock()
        self._ctx: Any = None
        self._ffi: Any = None
        self._lib: Any = None
        self._timeout = timeout
        self._nft_path = nft_path
        self.load_error: Optional[str] = None
        if backend in (None, "library"):
            try:
                self._ffi, self._lib = _load_library()
                ctx = self._lib.nft_ctx_new(0)
                if ctx == self._ffi.NULL:
                    raise OSError("nft_ctx_new returned NULL")
                if self._lib.nft_ctx_buffer_output(ctx) or self._lib.nft_ctx_buffer_error(ctx):
                    self._lib.nft_ctx_free(ctx)
                    raise OSError("nft_ctx_buffer_output/error failed")
                self._ctx = ctx
                self._flags = int(self._lib.nft_ctx_output_get_flags(ctx))
            except Exception as exc:
                self.load_error = f"{type(exc).__name__}: {exc}"
                if backend == "library":
                    raise NftError(
                        f"cannot use {LIBNFTABLES} through cffi ({self.load_error}); install "
                        "libnftables1 and cffi, or use backend='subprocess'"
                    ) from None
        if self._ctx is None:
            path = nft_path or shutil.which("nft") or shutil.which("nft", path="/usr/sbin:/sbin")
            if not path:
                raise NftError(
                    f"neither {LIBNFTABLES} ({self.load_error}) nor an nft binary is available; "
                    "install the nftables package"
                )
            self._nft_path = path
        self.backend = "library" if self._ctx is not None else "subprocess"

    def run(self, text: str) -> str:
        """Apply ``text`` (newline-separated commands) atomically; returns nft's output."""
        return self._run(text, json_output=False)

    def run_json(self, text: str) -> Dict[str, Any]:
        """Run list commands with JSON output; several listings merge into one document."""
        return merge_json(self._run(text, json_output=True))

    def _run(self, text: str, json_output: bool) -> str:
        if self.backend == "library":
            return self._run_library(text, json_output)
        return self._run_binary(text, json_output)

    def _run_library(self, text: str, json_output: bool) -> str:
        lib, ffi = self._lib, self._ffi
        data = text.encode()
        with self._lock:
            ctx = self._ctx
            if ctx is None:
                raise NftError("this Nft is closed")
            flags = self._flags | NFT_CTX_OUTPUT_JSON if json_output else self._flags
            lib.nft_ctx_output_set_flags(ctx, flags)
            # from a file nft reports the right line of an error; from a
            # buffer nft 1.0.6 quotes line 1 for every error
            with _command_file(data) as (_, path):
                rc = lib.nft_run_cmd_from_filename(ctx, path.encode())
            # reading a buffer also resets it for the next command
            out = _string(ffi, lib.nft_ctx_get_output_buffer(ctx))
            err = _string(ffi, lib.nft_ctx_get_error_buffer(ctx))
        if rc != 0:
            raise _error(err, text, "libnftables")
        return out

    def _run_binary(self, text: str, json_output: bool) -> str:
        # a file, not stdin: with -j nft 1.0.6 prints nothing for commands read from a pipe
        with _command_file(text.encode()) as (fd, path):
            argv = [str(self._nft_path)] + (["-j"] if json_output else []) + ["-f", path]
            try:
                proc = subprocess.run(
                    argv, capture_output=True, timeout=self._timeout, check=False, pass_fds=(fd,)
                )
            except (OSError, subprocess.TimeoutExpired) as exc:
                raise NftError(f"cannot run {' '.join(argv)}: {exc}") from None
        if proc.returncode != 0:
            raise _error(proc.stderr.decode(errors="replace"), text, "nft -f")
        return proc.stdout.decode(errors="replace")

    def close(self) -> None:
        """Free the library context (idempotent)."""
        with self._lock:
            if self._ctx is not None:
                self._lib.nft_ctx_free(self._ctx)
                self._ctx = None

    def __enter__(self) -> Nft:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass
