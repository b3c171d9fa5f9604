"""bench.pmqos: the CPU latency request is written while the block runs and its file
descriptor is closed after it (a regular file stands in for /dev/cpu_dma_latency)."""

from __future__ import annotations

import os
import struct

import pytest

from bench.pmqos import PmQosError, cpu_latency, current


def test_the_request_is_written_and_held_for_the_block(tmp_path):
    dev = tmp_path / "cpu_dma_latency"
    dev.write_bytes(struct.pack("=i", 2_000_000_000))
    before = len(os.listdir("/proc/self/fd"))
    with cpu_latency(0, str(dev)) as held:
        assert held == 0
        assert len(os.listdir("/proc/self/fd")) == before + 1  # held open
    assert len(os.listdir("/proc/self/fd")) == before  # released
    assert current(str(dev)) == 0


def test_none_holds_nothing_and_a_negative_request_is_refused(tmp_path):
    dev = tmp_path / "absent"
    with cpu_latency(None, str(dev)) as held:
        assert held is None
    assert not dev.exists()
    with pytest.raises(PmQosError, match=">= 0 us"), cpu_latency(-1, str(dev)):
        pass


def test_a_missing_device_names_what_it_needs(tmp_path):
    missing = str(tmp_path / "nodir" / "cpu_dma_latency")
    with pytest.raises(PmQosError, match="needs root and a kernel with PM QoS"), \
            cpu_latency(0, missing):
        pass
