#!/usr/bin/env bash
# The one demo command: install everything, then run the relay demo on PyPy.
#   scripts/run-demo.sh [demo options]
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
install_args=()
[ "${LRK_NO_APT:-0}" = 1 ] && install_args+=(--no-apt)
bash scripts/install.sh "${install_args[@]}"
exec .venv-pypy/bin/lrkproxy demo "$@"
