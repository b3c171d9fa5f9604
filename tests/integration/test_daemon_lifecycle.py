"""The daemon's start and stop, as an operator sees them: one line saying what it serves,
one line saying why it stopped, and an orderly stop whichever process the signal hits.

On 7d500b6 a SIGTERM to the whole process group (`systemctl stop`, `killpg`) killed the
worker first and the daemon restarted it during shutdown ("worker 0 exited (code -15);
restarting"), and nothing was printed once the relay was up.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import msgpack
import pytest

from lrk.demo.relay_process import free_udp_port, next_port_range
from tests.control_keys import sign_env

pytestmark = pytest.mark.integration


def _ping(port: int, deadline: float) -> None:
    """Wait (bounded) until the control socket answers: every listener is up then."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as c:
        c.settimeout(0.2)
        n = 0
        while time.monotonic() < deadline:
            n += 1
            c.sendto(sign_env(msgpack.packb({"v": 1, "cookie": f"p{n}", "cmd": "ping"})),
                     ("127.0.0.1", port))
            try:
                if msgpack.unpackb(c.recv(4096), raw=False).get("pong"):
                    return
            except socket.timeout:
                continue
    raise AssertionError("relay did not answer ping within its start deadline")


def _start(ports: str, workers: int = 2) -> tuple[subprocess.Popen, int, int]:
    control, legacy = free_udp_port(), free_udp_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "lrk.cli", "run", "--control", f"127.0.0.1:{control}",
         "--legacy", f"127.0.0.1:{legacy}", "--ports", ports, "--workers", str(workers)],
        stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        _ping(control, time.monotonic() + 20)
    except AssertionError:
        proc.kill()
        _out, err = proc.communicate(timeout=20)
        raise AssertionError(f"relay did not come up (exit {proc.returncode}): {err}") from None
    return proc, control, legacy


@pytest.mark.parametrize("how", ["daemon", "process group"])
def test_sigterm_stops_in_order_and_says_why(how: str):
    ports = next_port_range(100)  # apart from other relays of this and other test runs
    proc, control, legacy = _start(ports)
    if how == "daemon":
        proc.send_signal(signal.SIGTERM)
    else:
        os.killpg(proc.pid, signal.SIGTERM)  # as systemctl stop does
    _out, err = proc.communicate(timeout=20)
    lines = [line for line in err.splitlines() if line.strip()]
    assert proc.returncode == 0, err
    assert "restarting" not in err, err
    assert "level=error" not in err, err
    served = [line for line in lines if "lrk.lifecycle" in line and "serving" in line]
    stopped = [line for line in lines if "lrk.lifecycle" in line and "stopped" in line]
    assert len(served) == 1 and len(stopped) == 1, err
    assert f"control=127.0.0.1:{control}" in served[0]
    assert f"legacy=127.0.0.1:{legacy}" in served[0]
    assert "mode=socket" in served[0] and f"ports={ports}" in served[0]
    assert "signal SIGTERM" in stopped[0]
    # nothing of ours is left: the ports bind again at once
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", control))


def test_a_worker_killed_alone_is_restarted():
    proc, control, _legacy = _start(next_port_range(100), workers=1)
    try:
        workers = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True,
                                 text=True).stdout.split()
        assert len(workers) == 1
        os.kill(int(workers[0]), signal.SIGKILL)
        deadline = time.monotonic() + 20
        restarted = []
        while time.monotonic() < deadline:
            now = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True,
                                 text=True).stdout.split()
            restarted = [pid for pid in now if pid != workers[0]]
            if restarted:
                break
            time.sleep(0.05)  # polling an observable, bounded by the deadline
        assert restarted, "the daemon did not restart its killed worker"
        _ping(control, time.monotonic() + 10)
    finally:
        proc.send_signal(signal.SIGTERM)
        _out, err = proc.communicate(timeout=20)
    assert proc.returncode == 0, err
    assert "worker 0 exited" in err
