"""Compile relay.bpf.c into a BPF object, once per source: a cache keyed by the hash
of the source, the headers beside it (``*.h``: what it can include with quotes) and the
compile command.

`scripts/install.sh` compiles at install time (``python -m fastpath.xdp.build``); a
clean clone compiles on first use. Objects go to ``$LRK_XDP_BUILD`` or
``build/xdp/`` beside the package (gitignored), else a per-user cache directory when
that is not writable. Debian 12: ``apt-get install clang llvm libbpf-dev``.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from typing import List, Optional

from fastpath.xdp.errors import XdpBuildError

SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "relay.bpf.c")
#: where bpf_helpers.h lives on Debian (libbpf-dev)
LIBBPF_HEADER = "/usr/include/bpf/bpf_helpers.h"


def _multiarch_include() -> Optional[str]:
    """asm/types.h lives under /usr/include/<triplet> on Debian (linux-libc-dev)."""
    triplet = sysconfig.get_config_var("MULTIARCH")
    if not triplet:
        try:
            triplet = subprocess.run(["gcc", "-dumpmachine"], capture_output=True, text=True,
                                     timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            triplet = ""
    path = f"/usr/include/{triplet}" if triplet else ""
    return path if path and os.path.isdir(path) else None


def command(clang: str, source: str, output: str) -> List[str]:
    cmd = [clang, "-O2", "-g", "-Wall", "-Werror", "-target", "bpf"]
    inc = _multiarch_include()
    if inc:
        cmd.append(f"-I{inc}")
    return cmd + ["-c", source, "-o", output]


def _build_dirs() -> List[str]:
    env = os.environ.get("LRK_XDP_BUILD")
    if env:
        return [env]
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return [os.path.join(repo, "build", "xdp"), os.path.join(cache, "lrk", "xdp")]


def source_digest(source: str) -> str:
    """What an object of `source` depends on, hashed: the source, every header in its
    directory (a changed shared header must not reuse a stale object) and the command."""
    h = hashlib.sha256()
    with open(source, "rb") as fh:
        h.update(fh.read())
    folder = os.path.dirname(os.path.abspath(source))
    for name in sorted(os.listdir(folder)):
        if name.endswith(".h"):
            h.update(name.encode() + b"\0")
            with open(os.path.join(folder, name), "rb") as fh:
                h.update(fh.read())
    h.update(repr(command("clang", "S", "O")).encode())
    return h.hexdigest()[:16]


def object_path(source: str = SOURCE, clang: Optional[str] = None) -> str:
    """The compiled object of `source`: built now if missing or stale. Raises
    XdpBuildError naming what is missing (clang, libbpf-dev) or clang's message."""
    clang = clang or shutil.which("clang")
    digest = source_digest(source)
    name = f"{os.path.basename(source).split('.')[0]}-{digest}.bpf.o"  # relay-, gen-, sink-
    dirs = _build_dirs()
    for d in dirs:
        path = os.path.join(d, name)
        if os.path.exists(path):
            return path
    if clang is None:
        raise XdpBuildError("xdp mode compiles its BPF program with clang, and there is no "
                            "clang on PATH: apt-get install clang llvm libbpf-dev "
                            "(scripts/install.sh does), or use --mode kernel")
    if not os.path.exists(LIBBPF_HEADER):
        raise XdpBuildError(f"xdp mode needs the libbpf headers ({LIBBPF_HEADER} is missing): "
                            "apt-get install libbpf-dev, or use --mode kernel")
    last: Optional[OSError] = None
    for d in dirs:
        try:
            os.makedirs(d, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=".build-", suffix=".o", dir=d)
            os.close(fd)
        except OSError as exc:
            last = exc
            continue
        try:
            res = subprocess.run(command(clang, source, tmp), capture_output=True, text=True,
                                 timeout=120)
            if res.returncode != 0:
                raise XdpBuildError(f"clang could not compile {source}:\n"
                                    + (res.stderr or res.stdout)[-3000:])
            path = os.path.join(d, name)
            os.replace(tmp, path)  # atomic: a concurrent build leaves one whole object
            return path
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    raise XdpBuildError(f"no writable directory for the BPF object among {dirs}: {last}")


def main() -> int:
    """Install-time build: print the object's path."""
    try:
        print(object_path())
    except XdpBuildError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
