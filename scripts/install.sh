#!/usr/bin/env bash
# Install everything lrk needs on Debian 12 (bookworm): apt packages, pypy3,
# a CPython venv (.venv, also holds tox) and a PyPy venv (.venv-pypy).
# Idempotent; reruns only redo what is missing or stale.
#
#   scripts/install.sh                  # as root (or with sudo available)
#   scripts/install.sh --no-apt         # skip the apt step (developer machines)
#   scripts/install.sh --systemd        # then install the lrkproxy systemd service
#   scripts/install.sh --systemd-only   # only the service (the venvs exist already)
#
# The service step (docs/running.md): user `lrk`, /etc/systemd/system/lrkproxy.service
# running this checkout's .venv-pypy/bin/lrkproxy, /etc/lrk/lrk.toml from etc/lrk.toml
# when absent, the privileged-modes drop-in when that config's mode needs it, and
# `systemctl daemon-reload` when systemd runs. It neither enables nor starts the service.
# LRK_DESTDIR=/some/dir stages the files under that root instead (no user, no systemctl).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

DO_APT=1
DO_VENV=1
DO_SYSTEMD=0
for arg in "$@"; do
    case "$arg" in
        --no-apt) DO_APT=0 ;;
        --systemd) DO_SYSTEMD=1 ;;
        --systemd-only) DO_SYSTEMD=1; DO_APT=0; DO_VENV=0 ;;
        -h|--help) sed -n '2,15p' "$0"; exit 0 ;;
        *) echo "install.sh: unknown option: $arg" >&2; exit 2 ;;
    esac
done

APT_PACKAGES=(python3 python3-venv python3-dev pypy3 pypy3-venv pypy3-dev gcc libffi-dev
              iproute2 nftables conntrack procps kamailio rtpengine-daemon prometheus
              kamailio-python3-modules sip-tester clang llvm libbpf-dev bpftool ethtool netsniff-ng
              redis-server)
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
        # kamailio, rtpengine and prometheus are only run by the tests and benchmarks,
        # each instance with its own config and ports: the distribution's services, which
        # a systemd machine starts on install (5060, media ports 30000-40000, 9090), stay
        # off. Without a running systemd (containers) the package still enables its unit
        # for the next boot: disable that too.
        if command -v systemctl >/dev/null; then
            now=()
            [ -d /run/systemd/system ] && now=(--now)
            for unit in kamailio rtpengine-daemon prometheus; do
                case " ${missing[*]} " in
                    *" $unit "*) "${SUDO[@]}" systemctl disable "${now[@]}" "$unit" >/dev/null 2>&1 || true ;;
                esac
            done
        fi
    fi
else
    say "apt: skipped (--no-apt)"
fi

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

if [ "$DO_VENV" = 1 ]; then
    [ -x "$CPYTHON" ] || die "$CPYTHON not found (install python3 python3-venv, or drop --no-apt)"
    [ -x "$PYPY" ] || die "$PYPY not found (install pypy3 pypy3-venv, or drop --no-apt)"
    setup_venv .venv "$CPYTHON" "tox>=4"
    setup_venv .venv-pypy "$PYPY"
    # xdp mode's BPF program, compiled now (also on first use when missing or stale)
    if command -v clang >/dev/null && [ -e /usr/include/bpf/bpf_helpers.h ]; then
        obj="$(.venv/bin/python -m fastpath.xdp.build)" || die "could not compile the XDP program"
        say "xdp: BPF program compiled: $obj"
    else
        say "xdp: no clang or libbpf-dev (--no-apt?): xdp mode compiles its program on first use"
    fi
    say "install done: .venv ($(.venv/bin/python -V)), .venv-pypy (PyPy $(.venv-pypy/bin/python -c 'import sys; print(".".join(map(str, sys.pypy_version_info[:3])))'))"
fi

# ---------------------------------------------------------------- systemd service
install_systemd() {
    local dest="${LRK_DESTDIR:-}" staged=0
    [ -n "$dest" ] && staged=1
    if [ "$staged" = 0 ] && [ "$(id -u)" != 0 ]; then
        die "--systemd writes /etc: run as root (or stage with LRK_DESTDIR=DIR)"
    fi
    local bin="$ROOT/.venv-pypy/bin/lrkproxy"
    [ -x "$bin" ] || die "$bin not found: run scripts/install.sh without --systemd-only first"
    local unitdir="$dest/etc/systemd/system" etcdir="$dest/etc/lrk"
    local unit="$unitdir/lrkproxy.service" dropdir="$unitdir/lrkproxy.service.d"
    local config="$etcdir/lrk.toml"

    if [ "$staged" = 0 ] && ! getent passwd lrk >/dev/null; then
        say "systemd: creating system user lrk"
        useradd --system --user-group --home-dir /var/lib/lrk --no-create-home \
            --shell /usr/sbin/nologin --comment "lrk media relay" lrk
    fi
    if [ "$staged" = 0 ] && command -v setpriv >/dev/null &&
            ! setpriv --reuid=lrk --regid=lrk --clear-groups test -x "$bin"; then
        die "user lrk cannot run $bin: a directory above the checkout is closed to" \
            "others; put the checkout under /opt (e.g. /opt/lrk) or make its parents" \
            "searchable (chmod o+x)"
    fi

    install -d -m 0755 "$unitdir" "$etcdir"
    # ExecStart (and the docs link) point at this checkout
    sed -e "s#/opt/lrk/.venv-pypy/bin/lrkproxy#$bin#g" \
        -e "s#file:/opt/lrk/docs/#file:$ROOT/docs/#g" \
        etc/systemd/lrkproxy.service > "$unit.tmp"
    chmod 0644 "$unit.tmp"
    mv -f "$unit.tmp" "$unit"
    say "systemd: $unit (ExecStart=$bin run --config /etc/lrk/lrk.toml --state-dir \${STATE_DIRECTORY})"

    if [ -e "$config" ]; then
        say "systemd: $config exists, left as it is"
    else
        install -m 0640 etc/lrk.toml "$config"
        # root writes it, the relay (group lrk) reads it: it may hold control_token
        if [ "$staged" = 0 ]; then chgrp lrk "$config"; fi
        say "systemd: $config installed from etc/lrk.toml (every option at its default)"
    fi

    # control keys: the relay runs as lrk with /etc read-only, so they are made here (the
    # unit points LRK_KEYS at them); root's lrkproxy ctl finds /etc/lrk/keys by default
    local keydir="$etcdir/keys"
    install -d -m 0700 "$keydir"
    "$ROOT/.venv/bin/python" -c 'import sys; from lrk.control.auth import ensure_keys; \
print(" ".join(ensure_keys(sys.argv[1])) or "present")' "$keydir" >/dev/null
    if [ "$staged" = 0 ]; then chown -R lrk:lrk "$keydir"; fi
    chmod 0700 "$keydir" && chmod 0600 "$keydir"/*.key
    say "systemd: control keys in $keydir (admin.key for lrkproxy ctl, client.key for SIP proxies)"

    # the unit cannot reach a checkout under /home, /root or /run/user (ProtectHome=yes)
    case "$ROOT/" in
        /home/*|/root/*|/run/user/*)
            install -d -m 0755 "$dropdir"
            printf '%s\n' "# written by scripts/install.sh: the checkout ($ROOT) is under a home" \
                "[Service]" "ProtectHome=read-only" > "$dropdir/checkout-in-home.conf"
            say "systemd: checkout under a home directory: ProtectHome=read-only drop-in" ;;
        *) rm -f "$dropdir/checkout-in-home.conf" ;;
    esac

    # kernel, nfqueue and packet modes need capabilities: the drop-in when the config asks
    local summary mode=""
    if summary="$("$bin" run --check-config --config "$config" 2>&1)"; then
        mode="$(printf '%s\n' "$summary" | sed -n 's/.* mode=\([a-z]*\) .*/\1/p')"
    else
        printf 'install.sh: warning: %s is not valid yet: %s\n' "$config" "$summary" >&2
    fi
    case "$mode" in
        kernel|nfqueue|packet|xdp)
            install -d -m 0755 "$dropdir"
            install -m 0644 etc/systemd/lrkproxy.service.d/privileged-modes.conf "$dropdir/"
            say "systemd: mode $mode: CAP_NET_ADMIN CAP_NET_RAW drop-in installed"
            if [ "$mode" = xdp ]; then
                install -m 0644 etc/systemd/lrkproxy.service.d/xdp-mode.conf "$dropdir/"
                say "systemd: mode xdp: CAP_BPF CAP_SYS_ADMIN, bpf() drop-in installed"
            else
                rm -f "$dropdir/xdp-mode.conf"
            fi
            if [ "$mode" = packet ] && printf '%s\n' "$summary" | grep -q ' packet_io=af_xdp '; then
                install -m 0644 etc/systemd/lrkproxy.service.d/af-xdp.conf "$dropdir/"
                say "systemd: packet mode over AF_XDP: CAP_BPF CAP_SYS_ADMIN CAP_IPC_LOCK, bpf() drop-in installed"
            else
                rm -f "$dropdir/af-xdp.conf"
            fi ;;
        "") ;;  # config invalid: leave the drop-in as it is
        *)
            rm -f "$dropdir/xdp-mode.conf" "$dropdir/af-xdp.conf"
            if [ -e "$dropdir/privileged-modes.conf" ]; then
                rm -f "$dropdir/privileged-modes.conf"
                say "systemd: mode $mode: privileged-modes drop-in removed"
            fi ;;
    esac
    rmdir "$dropdir" 2>/dev/null || true

    if [ "$staged" = 0 ] && [ -d /run/systemd/system ] && command -v systemctl >/dev/null; then
        systemctl daemon-reload
        say "systemd: daemon-reload done; start with: systemctl enable --now lrkproxy"
    else
        say "systemd: not running here (no daemon-reload); on a systemd host:" \
            "systemctl daemon-reload && systemctl enable --now lrkproxy"
    fi
}

if [ "$DO_SYSTEMD" = 1 ]; then
    install_systemd
fi
