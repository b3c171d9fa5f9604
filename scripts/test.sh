#!/usr/bin/env bash
# The one test command: install everything, run the test suite on CPython 3.11
# and PyPy3 (via tox), then lint once with ruff. Non-zero exit on any failure
# (including pytest exit code 5, "no tests collected").
#
#   scripts/test.sh                 # everything
#   scripts/test.sh -k environment  # extra args go to pytest on both interpreters
#   LRK_NO_APT=1 scripts/test.sh    # skip the apt step of install.sh
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

install_args=()
[ "${LRK_NO_APT:-0}" = 1 ] && install_args+=(--no-apt)
bash scripts/install.sh "${install_args[@]}"

rc=0
echo "==> tests: tox -e py311,pypy3 -- $*"
.venv/bin/tox -e py311,pypy3 -- "$@" || rc=$?

echo "==> lint: ruff check ."
.venv/bin/ruff check . || rc=$((rc ? rc : 1))

if [ "$rc" -ne 0 ]; then
    echo "==> FAILED (exit $rc)" >&2
else
    echo "==> all tests and lint passed"
fi
exit "$rc"
