"""kernel_counters = none: the plane writes no sysctl and says in its log whether new
flows still carry conntrack's extension (a sysctl someone else set) or go uncounted."""

from __future__ import annotations

import logging

import pytest

from lrk.daemon import kernel_plane
from lrk.daemon.kernel_plane import KernelPlane


@pytest.fixture
def sysctls(tmp_path, monkeypatch):
    """The two accounting sysctls as files (start values "0"); the plane reads these."""
    paths = {}
    for name in ("nf_conntrack_acct", "nf_conntrack_timestamp"):
        path = tmp_path / name
        path.write_text("0\n")
        paths[name] = str(path)
    monkeypatch.setattr(kernel_plane, "ACCT", paths)
    return paths


def _values(paths):
    return {name: open(path).read().strip() for name, path in paths.items()}


@pytest.mark.parametrize("preset,expected", [
    ({}, "media not counted (kernel_counters = none)"),
    ({"nf_conntrack_timestamp": "1"},
     "net.netfilter.nf_conntrack_timestamp is 1 in this namespace: new flows still carry"),
    ({"nf_conntrack_acct": "1", "nf_conntrack_timestamp": "1"},
     "net.netfilter.nf_conntrack_acct and net.netfilter.nf_conntrack_timestamp are 1"),
])
def test_uncounted_plane_logs_what_the_namespace_does_and_writes_nothing(
        sysctls, caplog, preset, expected):
    for name, value in preset.items():
        with open(sysctls[name], "w") as fh:
            fh.write(value + "\n")
    before = _values(sysctls)
    plane = KernelPlane(30000, 30099, ["198.51.100.5"], counters="none")
    with caplog.at_level(logging.INFO, logger=kernel_plane.log.name):
        plane._log_uncounted()
    assert expected in caplog.text
    assert _values(sysctls) == before
    assert plane._acct_old == {}  # nothing to restore on stop


def test_counted_plane_switches_accounting_on_and_back(sysctls):
    plane = KernelPlane(30000, 30099, ["198.51.100.5"], counters="conntrack")
    plane._enable_acct()
    assert _values(sysctls) == {"nf_conntrack_acct": "1", "nf_conntrack_timestamp": "1"}
    plane._restore_acct()
    assert _values(sysctls) == {"nf_conntrack_acct": "0", "nf_conntrack_timestamp": "0"}
