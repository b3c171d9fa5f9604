#!/usr/bin/env bash
# The one run command: install everything, then run the relay on PyPy in socket
# mode on loopback (control 127.0.0.1:22222, media ports 30000-40000).
#   scripts/run.sh [lrkproxy run options]   # the relay, until Ctrl-C / SIGTERM
#   scripts/run.sh --demo [demo options]    # a built-in demo call through a relay, then exit
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
install_args=()
[ "${LRK_NO_APT:-0}" = 1 ] && install_args+=(--no-apt)
bash scripts/install.sh "${install_args[@]}" >&2
# PyPy's GC nursery (fastpath/jit.py GC_NURSERY; yours wins when set)
export PYPY_GC_NURSERY="${PYPY_GC_NURSERY:-64M}"
if [ "${1:-}" = "--demo" ]; then
    shift
    exec .venv-pypy/bin/lrkproxy demo "$@"
fi
exec .venv-pypy/bin/lrkproxy run "$@"
