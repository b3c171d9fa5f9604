"""Idle CPUs that poll instead of halting, for the length of a run (a rig setting).

This machine is a VM whose idle vCPUs halt at once (cpuidle ``haltpoll`` with
``guest_halt_poll_ns=0``): waking one goes through the host, which may take longer than a
veth ring of 256 frames lasts at millions of frames a second (34 us at 7.5 Mpps). A relay
core that idles between bursts then refuses frames at its ring while it wakes, though it
had time to spare. Low-latency deployments keep such cores out of deep idle (tuned's
``latency-performance`` profile: a PM QoS CPU latency request); this module holds one
for a benchmark run.

The request is the kernel's /dev/cpu_dma_latency interface: a value written to an open
file descriptor holds while it stays open and is dropped when it closes, a crash
included, so nothing outlives the run. It changes no sysctl, address or route. Idle time
spent polling is still idle time in /proc/stat and in no thread's run time, so the busy
shares a bench records do not change meaning.
"""

from __future__ import annotations

import contextlib
import os
import struct
from typing import Iterator, Optional

DEVICE = "/dev/cpu_dma_latency"


class PmQosError(RuntimeError):
    """The CPU latency request could not be made (not root, no PM QoS device)."""


def current(device: str = DEVICE) -> int:
    """The CPU latency limit in force now, in microseconds (all requests combined)."""
    with open(device, "rb") as fh:
        return int(struct.unpack("=i", fh.read(4))[0])


@contextlib.contextmanager
def cpu_latency(us: Optional[int], device: str = DEVICE) -> Iterator[Optional[int]]:
    """Hold a CPU latency request of `us` microseconds (0: idle CPUs poll) for the block;
    None holds nothing. Yields the limit in force inside the block."""
    if us is None:
        yield None
        return
    if us < 0:
        raise PmQosError(f"a CPU latency request is >= 0 us, not {us}")
    try:
        fd = os.open(device, os.O_WRONLY)
    except OSError as exc:
        raise PmQosError(f"cannot open {device} ({exc.strerror}): the idle-latency "
                         "setting needs root and a kernel with PM QoS") from exc
    try:
        os.write(fd, struct.pack("=i", us))
        yield current(device)
    finally:
        os.close(fd)
