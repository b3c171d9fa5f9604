#!/usr/bin/env bash
# Install everything lrk needs on Debian 12 (bookworm): apt packages, pypy3,
# a CPython venv (.venv, also holds tox) and a PyPy venv (.venv-pypy).
# Idempotent; reruns only redo what is missing or stale.
#
#   scripts/install.sh            # as root (or with sudo available)
#   scripts/install.sh --no-apt   # skip the apt step (developer machines)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

DO_APT=1
for arg in "$@"; do
    case "$arg" in
        --no-apt) DO_APT=0 ;;
        -h|--help) sed -n '2,8p' "$0"; exit 0 ;;
        *) echo "install.sh: unknown option: $arg" >&2; exit 2 ;;
    esac
done

APT_PACKAGES=(python3 python3-venv python3-dev pypy3 pypy3-venv pypy3-dev gcc libffi-dev
              iproute2 nftables conntrack procps kamailio rtpengine-daemon)
CPYTHON=/usr/bin/python3
PYPY=/usr/bin/pypy3
export PIP_DISABLE_PIP_VERSION_CHECK=1

say() { printf '==> %s\n' "$*"; }
die() { printf 'install.sh: error: %s\n' "$*" >&2; exit 1; }

# ---------------------------------------------------------------- apt
if [ "$DO_APT" = 1 ]; then
    SUDO=()
    if [ "$(id -u)" != 0 ]; then
        command -v sudo >/dev/null || die "not root and no sudo; run as root or use --no-apt"
        SUDO=(sudo)
    fi
    missing=()
    for p in "${APT_PACKAGES[@]}"; do
        st="$(dpkg-query -W -f='${Status}' "$p" 2>/dev/null || true)"
        [ "$st" = "install ok installed" ] || missing+=("$p")
    done
    if [ "${#missing[@]}" -eq 0 ]; then
        say "apt: all ${#APT_PACKAGES[@]} packages already installed"
    else
        say "apt: installing ${missing[*]}"
        export DEBIAN_FRONTEND=noninteractive
        APT_OPTS=(-q -o DPkg::Lock::Timeout=600)
        "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get "${APT_OPTS[@]}" update >/dev/null
        "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get "${APT_OPTS[@]}" install -y \
            --no-install-recommends "${APT_PACKAGES[@]}" >/dev/null
        # kamailio and rtpengine are only run by the tests and benchmarks, each instance
        # with its own config and ports: the distribution's services, which a systemd
        # machine starts on install (5060, media ports 30000-40000), stay off
        if [ -d /run/systemd/system ] && command -v systemctl >/dev/null; then
            for unit in kamailio rtpengine-daemon; do
                case " ${missing[*]} " in
                    *" $unit "*) "${SUDO[@]}" systemctl disable --now "$unit" >/dev/null 2>&1 || true ;;
                esac
            done
        fi
    fi
else
    say "apt: skipped (--no-apt)"
fi

[ -x "$CPYTHON" ] || die "$CPYTHON not found (install python3 python3-venv, or drop --no-apt)"
[ -x "$PYPY" ] || die "$PYPY not found (install pypy3 pypy3-venv, or drop --no-apt)"

# ---------------------------------------------------------------- venvs
# venv_ok DIR INTERP: DIR is a venv built from INTERP whose python and pip run.
venv_ok() {
    local dir="$1" interp="$2"
    [ -x "$dir/bin/python" ] && [ -f "$dir/pyvenv.cfg" ] || return 1
    grep -qE "^home = $(dirname "$interp")\$" "$dir/pyvenv.cfg" || return 1
    local want got
    want="$("$interp" -c 'import sys; print(sys.implementation.name, sys.version_info[:2])')"
    got="$("$dir/bin/python" -c 'import sys; print(sys.implementation.name, sys.version_info[:2])' 2>/dev/null)" || return 1
    [ "$want" = "$got" ] || return 1
    "$dir/bin/python" -m pip --version >/dev/null 2>&1
}

# Stamp of what an install depends on: interpreter, pyproject, top-level packages.
stamp_of() {
    local dir="$1"
    {
        "$dir/bin/python" -c 'import sys; print(sys.version)'
        cat pyproject.toml
        cat setup.py setup.cfg 2>/dev/null || true
        ls -d lrk/__init__.py fastpath/__init__.py 2>/dev/null || true
        echo "${2:-}"
    } | sha256sum | cut -d' ' -f1
}

setup_venv() {
    local dir="$1" interp="$2" extra="${3:-}"
    if venv_ok "$dir" "$interp"; then
        say "$dir: present"
    else
        [ -e "$dir" ] && say "$dir: stale or broken, recreating" && rm -rf "$dir"
        say "$dir: creating with $interp"
        "$interp" -m venv "$dir"
        venv_ok "$dir" "$interp" || die "$dir: venv created but python/pip do not work"
    fi
    local stamp want
    stamp="$dir/.lrk-install-stamp"
    want="$(stamp_of "$dir" "$extra")"
    if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
        say "$dir: lrk[test] up to date"
        return 0
    fi
    say "$dir: pip install -e '.[test]' $extra"
    rm -f "$stamp"
    # shellcheck disable=SC2086
    "$dir/bin/python" -m pip install -q -e '.[test]' $extra
    echo "$want" > "$stamp"
}

setup_venv .venv "$CPYTHON" "tox>=4"
setup_venv .venv-pypy "$PYPY"

say "install done: .venv ($(.venv/bin/python -V)), .venv-pypy (PyPy $(.venv-pypy/bin/python -c 'import sys; print(".".join(map(str, sys.pypy_version_info[:3])))'))"
