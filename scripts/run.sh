#!/usr/bin/env bash
# Install everything, then run the relay daemon on PyPy:
#   scripts/run.sh [lrkproxy run options]
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
install_args=()
[ "${LRK_NO_APT:-0}" = 1 ] && install_args+=(--no-apt)
bash scripts/install.sh "${install_args[@]}" >&2
exec .venv-pypy/bin/lrkproxy run "$@"
