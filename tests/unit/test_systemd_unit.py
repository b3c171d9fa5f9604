"""etc/systemd/lrkproxy.service: what it promises, `systemd-analyze verify` on it (with and
without the privileged-modes drop-in), and `scripts/install.sh --systemd-only` staging it."""

from __future__ import annotations

import configparser
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from lrk.daemon.config import Config

ROOT = Path(__file__).resolve().parents[2]
UNIT = ROOT / "etc" / "systemd" / "lrkproxy.service"
DROPIN = ROOT / "etc" / "systemd" / "lrkproxy.service.d" / "privileged-modes.conf"
SHIPPED_BIN = "/opt/lrk/.venv-pypy/bin/lrkproxy"


def read_unit(*paths):
    """The [Service] (etc.) settings of a unit and its drop-ins; a key set twice keeps the
    last value, an empty assignment resets (as systemd reads them)."""
    parser = configparser.ConfigParser(strict=False, interpolation=None, delimiters=("=",))
    parser.optionxform = str  # keys are case-sensitive
    for path in paths:
        parser.read_string(Path(path).read_text(encoding="utf-8"))
    return parser


def analyze():
    tool = shutil.which("systemd-analyze")
    if tool is None:
        pytest.fail("systemd-analyze not found: install systemd (Debian 12 has it)")
    return tool


def verify(unit_path: Path):
    """`systemd-analyze verify`; it exits 0 on unknown keys too, so any line naming the
    unit or its directory is a failure as well."""
    proc = subprocess.run([analyze(), "verify", "--man=no", str(unit_path)],
                          capture_output=True, text=True, timeout=120)
    out = proc.stdout + proc.stderr
    about_us = [line for line in out.splitlines()
                if str(unit_path.parent) in line or unit_path.name in line]
    assert proc.returncode == 0 and not about_us, out


def exposure(unit_path: Path) -> float:
    proc = subprocess.run([analyze(), "security", "--offline=true", "--no-pager",
                           str(unit_path)], capture_output=True, text=True, timeout=120)
    out = proc.stdout + proc.stderr
    m = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", out)
    assert m, out
    return float(m.group(1))


def staged_unit(tmp_path, dropin=False) -> Path:
    """A copy whose ExecStart is this interpreter's lrkproxy (verify wants it to exist)."""
    lrkproxy = Path(sys.executable).parent / "lrkproxy"
    assert lrkproxy.exists(), f"{lrkproxy}: install lrk into this environment"
    unit = tmp_path / "lrkproxy.service"
    unit.write_text(UNIT.read_text(encoding="utf-8").replace(SHIPPED_BIN, str(lrkproxy)),
                    encoding="utf-8")
    if dropin:
        (tmp_path / "lrkproxy.service.d").mkdir()
        shutil.copy(DROPIN, tmp_path / "lrkproxy.service.d" / DROPIN.name)
    return unit


# -- what the unit says -------------------------------------------------------------------
def test_unit_settings():
    s = read_unit(UNIT)["Service"]
    assert s["Type"] == "notify"
    assert s["NotifyAccess"] == "main"
    assert s["ExecStart"] == (f"{SHIPPED_BIN} run --config /etc/lrk/lrk.toml "
                              "--state-dir ${STATE_DIRECTORY}")
    assert s["ExecReload"] == "/bin/kill -HUP $MAINPID"
    assert s["Restart"] == "on-failure"
    assert s["RestartPreventExitStatus"] == "2"  # lrkproxy's exit code for a bad config
    assert s["WatchdogSec"] == "30s"
    assert s["KillMode"] == "mixed"
    assert s["StateDirectory"] == "lrk" and s["RuntimeDirectory"] == "lrk"
    assert s["User"] == "lrk" and s["Group"] == "lrk"
    # socket mode on ports > 1024 needs no privileges: none granted
    assert s["CapabilityBoundingSet"] == "" and s["AmbientCapabilities"] == ""
    for key, value in {"NoNewPrivileges": "yes", "ProtectSystem": "strict",
                       "ProtectHome": "yes", "PrivateTmp": "yes", "PrivateDevices": "yes",
                       "ProtectKernelTunables": "yes", "ProtectKernelModules": "yes",
                       "ProtectControlGroups": "yes", "RestrictNamespaces": "yes",
                       "RestrictSUIDSGID": "yes", "LockPersonality": "yes",
                       "SystemCallFilter": "@system-service",
                       "SystemCallArchitectures": "native"}.items():
        assert s[key] == value, key
    assert set(s["RestrictAddressFamilies"].split()) == {
        "AF_UNIX", "AF_INET", "AF_INET6", "AF_NETLINK"}
    # PyPy's JIT needs writable+executable memory
    assert "MemoryDenyWriteExecute" not in s
    assert read_unit(UNIT)["Install"]["WantedBy"] == "multi-user.target"


def test_limit_nofile_covers_the_default_port_range():
    start, end = Config().port_range
    pairs = len(range(start + (start & 1), end, 2))
    fds = 4 * (pairs // 2)  # each call: RTP and RTCP sockets of both legs
    assert fds == 10000
    limit = int(read_unit(UNIT)["Service"]["LimitNOFILE"])
    assert limit >= fds + 1000, "no headroom above the media sockets"
    text = UNIT.read_text(encoding="utf-8")
    assert f"{pairs} RTP/RTCP pairs" in text and f"{fds} sockets" in text  # the arithmetic


def test_privileged_dropin_grants_what_the_kernel_modes_need():
    s = read_unit(UNIT, DROPIN)["Service"]
    caps = {"CAP_NET_ADMIN", "CAP_NET_RAW"}
    assert set(s["CapabilityBoundingSet"].split()) == caps
    assert set(s["AmbientCapabilities"].split()) == caps
    assert s["ProtectKernelTunables"] == "no"  # nf_conntrack_acct in /proc/sys
    assert s["RestrictAddressFamilies"] == "AF_PACKET"  # added to the unit's list


# -- systemd-analyze ------------------------------------------------------------------------
def test_systemd_analyze_verify(tmp_path):
    verify(staged_unit(tmp_path))


def test_systemd_analyze_verify_with_the_privileged_dropin(tmp_path):
    verify(staged_unit(tmp_path, dropin=True))


def test_verify_catches_a_bad_key(tmp_path):
    """The check above would see a typo: systemd-analyze warns (and still exits 0)."""
    unit = staged_unit(tmp_path)
    unit.write_text(unit.read_text().replace("ProtectHome=yes", "ProtectHomes=yes"))
    with pytest.raises(AssertionError, match="ProtectHomes"):
        verify(unit)


def test_exposure_is_low(tmp_path):
    """systemd's own score (0 = locked down, 10 = unprotected): rtpengine's upstream unit
    scores about 2 with its CAP_NET_ADMIN."""
    assert exposure(staged_unit(tmp_path)) <= 2.0
    privileged = tmp_path / "privileged"
    privileged.mkdir()
    assert exposure(staged_unit(privileged, dropin=True)) <= 3.0


# -- scripts/install.sh --systemd-only, staged ------------------------------------------------
def install(dest: Path):
    env = dict(os.environ, LRK_DESTDIR=str(dest))
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "install.sh"), "--systemd-only"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout + proc.stderr


def test_install_systemd_staged(tmp_path):
    dest = tmp_path / "root"
    out = install(dest)
    unit = dest / "etc/systemd/system/lrkproxy.service"
    config = dest / "etc/lrk/lrk.toml"
    checkout_bin = ROOT / ".venv-pypy" / "bin" / "lrkproxy"
    s = read_unit(unit)
    assert s["Service"]["ExecStart"] == (f"{checkout_bin} run --config /etc/lrk/lrk.toml "
                                         "--state-dir ${STATE_DIRECTORY}")
    assert s["Unit"]["Documentation"] == f"file:{ROOT}/docs/running.md"
    assert SHIPPED_BIN not in unit.read_text()
    assert config.read_text() == (ROOT / "etc" / "lrk.toml").read_text()
    assert config.stat().st_mode & 0o777 == 0o640
    assert not (dest / "etc/systemd/system/lrkproxy.service.d").exists()  # socket mode
    assert "daemon-reload" in out
    verify(unit)

    # an existing config is kept; its mode decides the privileged drop-in
    config.write_text('mode = "kernel"\n')
    out = install(dest)
    assert config.read_text() == 'mode = "kernel"\n'
    dropin = dest / "etc/systemd/system/lrkproxy.service.d/privileged-modes.conf"
    assert dropin.read_text() == DROPIN.read_text()
    assert "CAP_NET_ADMIN CAP_NET_RAW drop-in installed" in out
    verify(unit)
    afxdp = dest / "etc/systemd/system/lrkproxy.service.d/af-xdp.conf"
    assert not afxdp.exists()
    config.write_text('mode = "packet"\npacket_interfaces = ["eth0"]\npacket_io = "af_xdp"\n')
    out = install(dest)
    assert afxdp.read_text() == (ROOT / "etc/systemd/lrkproxy.service.d/af-xdp.conf").read_text()
    assert dropin.exists() and "packet mode over AF_XDP" in out
    verify(unit)
    config.write_text('mode = "packet"\npacket_interfaces = ["eth0"]\n')  # taps: not needed
    install(dest)
    assert dropin.exists() and not afxdp.exists()
    config.write_text('mode = "kernel"\n')
    install(dest)
    config.write_text('mode = "turbo"\n')  # invalid: warned about, the drop-in stays
    out = install(dest)
    assert "install.sh: warning:" in out and "mode 'turbo' is not available" in out
    assert dropin.exists()
    config.write_text('mode = "socket"\n')
    out = install(dest)
    assert not dropin.exists()
    assert "mode socket: privileged-modes drop-in removed" in out
