"""Start a relay daemon as a child process and wait until it answers (demo, tests, benchmarks)."""

from __future__ import annotations

import itertools
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from typing import IO, Dict, List, Optional

import msgpack

from fastpath import jit
from lrk.control.auth import KEYS_ENV, Key, default_key_dir, ensure_keys, find_key, sign
from lrk.errors import LrkError

_OFFSET = (os.getpid() % 40) * 512
_slices = itertools.count()


def read_log(log: IO[bytes]) -> str:
    """Everything a child process has written to `log` (a file it shares as stdout/stderr).

    pread, not seek + read: the child's descriptors share this file's offset, so a seek
    here would make the child's next line overwrite the file's start."""
    fd = log.fileno()
    chunks = []
    offset = 0
    while True:
        chunk = os.pread(fd, 1 << 16, offset)
        if not chunk:
            return b"".join(chunks).decode(errors="replace")
        chunks.append(chunk)
        offset += len(chunk)


#: next_port_range's media ranges lie in MEDIA_PORTS_FROM..MEDIA_PORTS_TO - 1 (with
#: RelayProcess's default range, 30000-30999), below the kernel's ephemeral ports
#: (ip_local_port_range, 32768-60999 by default): a port a test relay freed is not one
#: the kernel then hands another socket bound to port 0; free_udp_port stays outside
MEDIA_PORTS_FROM = 8192
MEDIA_PORTS_TO = 31000
#: free_udp_port's own picks when the kernel offers only ports inside the media window
_FALLBACK_PORTS = range(33000, 41000)


def next_port_range(size: int = 64) -> str:
    """A media port range for one more relay of this process, distinct from its others and
    (by pid) most likely from those of other processes running tests at the same time."""
    start = MEDIA_PORTS_FROM + (_OFFSET + next(_slices) * size) % 20480
    return f"{start}-{start + size - 1}"


class LaunchError(LrkError):
    """The relay process did not come up; the message carries its output."""


def free_udp_port(host: str = "127.0.0.1", tries: int = 64) -> int:
    """A UDP port the kernel just considered free (good enough for a test control port),
    outside next_port_range's media window: a relay's listener there would look to a leak
    check like a media socket left open. (The kernel's ephemeral ports are above the
    window by default; with an ip_local_port_range that reaches into it, offers there stay
    bound until we return, so the kernel's next offer is another port.)"""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    held: List[socket.socket] = []
    try:
        for _ in range(tries):
            s = socket.socket(family, socket.SOCK_DGRAM)
            held.append(s)
            s.bind((host, 0))
            port = s.getsockname()[1]
            if not MEDIA_PORTS_FROM <= port < MEDIA_PORTS_TO:
                return port
        # an ip_local_port_range inside the media window: pick one ourselves
        for port in random.sample(_FALLBACK_PORTS, tries):
            s = socket.socket(family, socket.SOCK_DGRAM)
            held.append(s)
            try:
                s.bind((host, port))
            except OSError:
                continue
            return port
    finally:
        for s in held:
            s.close()
    raise OSError(f"no free UDP port on {host} outside {MEDIA_PORTS_FROM}-{MEDIA_PORTS_TO - 1} "
                  f"in {2 * tries} tries")


def ping(host: str, port: int = 0, timeout: float = 0.2, key: Optional[Key] = None) -> bool:
    """One msgpack ping to a UDP control address, or to a UNIX path (`host`, port 0),
    signed with `key` (unsigned without one: a relay with control_auth = "none")."""
    cookie = os.urandom(6).hex()
    request = msgpack.packb({"cookie": cookie, "cmd": "ping"})
    if key is not None:
        request = sign(request, key, time.time())
    if host.startswith("/"):
        with tempfile.TemporaryDirectory() as tmp, \
                socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
            s.bind(os.path.join(tmp, "ping.sock"))
            s.settimeout(timeout)
            try:
                s.sendto(request, host)
                reply = msgpack.unpackb(s.recv(65535), raw=False)
            except (OSError, ValueError):
                return False
    else:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        with socket.socket(family, socket.SOCK_DGRAM) as s:
            s.settimeout(timeout)
            try:
                s.sendto(request, (host, port))
                reply = msgpack.unpackb(s.recv(65535), raw=False)
            except (OSError, ValueError):
                return False
    return isinstance(reply, dict) and reply.get("cookie") == cookie and reply.get("ok") is True


class RelayProcess:
    """`lrkproxy run` in a child process; a context manager that always stops it.

    Control keys: the relay's default key directory (`$LRK_KEYS` of `env` or of this
    process, else the user's) gets admin.key and client.key before the relay starts, so
    that the relay, `lrk.client` in this process and the readiness ping all use them;
    `keys` names another directory (passed to the relay as $LRK_KEYS). A relay started
    with `control_auth = "none"` is pinged unsigned (`auth="none"`)."""

    def __init__(self, ports: str = "30000-30999", host: str = "127.0.0.1",
                 extra: Optional[List[str]] = None, python: Optional[str] = None,
                 env: Optional[Dict[str, str]] = None, netns: Optional[str] = None,
                 keys: Optional[str] = None, auth: str = "hmac") -> None:
        self.ports = ports
        env = dict(env or {})
        if keys is not None:
            env[KEYS_ENV] = keys
        #: the key directory the relay uses (unless its config names control_keys)
        self.keys = env.get(KEYS_ENV) or default_key_dir()
        self.auth = auth
        self.netns = netns
        self._tmp: Optional[tempfile.TemporaryDirectory] = None
        if netns:
            # the relay lives in another namespace: reach its control socket through the
            # file system, which namespaces share
            self._tmp = tempfile.TemporaryDirectory(prefix="lrk-ctl-")
            self.host = os.path.join(self._tmp.name, "control.sock")
            self.control_port = 0
            control = f"unix:{self.host}"
        else:
            self.host = host
            self.control_port = free_udp_port(host)
            control = (f"[{host}]:{self.control_port}" if ":" in host
                       else f"{host}:{self.control_port}")
        extra = list(extra or [])
        if "--legacy" not in extra:
            extra += ["--legacy", "off"]  # many relays side by side: no fixed default port
        self.argv = [python or sys.executable, "-m", "lrk.cli", "run", "--control", control,
                     "--ports", ports, *extra]
        if netns:
            self.argv = ["ip", "netns", "exec", netns, *self.argv]
        self.env = env
        self.proc: Optional[subprocess.Popen] = None
        self.output = ""

    @property
    def node(self) -> str:
        if self.netns:
            return f"unix:{self.host}"
        if ":" in self.host:
            return f"udp6:[{self.host}]:{self.control_port}"
        return f"udp:{self.host}:{self.control_port}"

    def ping_key(self) -> Optional[Key]:
        """The key the readiness ping signs with (admin.key: it may do anything)."""
        if self.auth == "none":
            return None
        ensure_keys(self.keys)
        return find_key(self.keys, admin=True)

    def start(self, ready_timeout: float = 20.0) -> RelayProcess:
        env = dict(os.environ)
        env.update(self.env or {})
        env = jit.with_gc_nursery(env)  # as the systemd unit and scripts/run.sh do
        key = self.ping_key()  # creates the keys first: the relay then finds them
        # a file, not a pipe: a chatty relay must never block on a full pipe
        self._log = tempfile.TemporaryFile()  # noqa: SIM115 - lives as long as the child
        self.proc = subprocess.Popen(self.argv, stdout=self._log, stderr=subprocess.STDOUT,
                                     env=env)
        deadline = time.monotonic() + ready_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise LaunchError(f"relay exited with code {self.proc.returncode}: "
                                  f"{self.read_output()}")
            if ping(self.host, self.control_port, key=key):
                return self
        self.stop()
        raise LaunchError(f"relay did not answer ping within {ready_timeout}s")

    def stop(self, timeout: float = 10.0) -> int:
        """SIGTERM, wait, SIGKILL if it hangs; returns the exit code."""
        proc = self.proc
        if proc is None:
            return 0
        if self._log.closed:  # stopped before
            return proc.returncode
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.output = self.read_output()
        self._log.close()
        if self._tmp is not None:
            self._tmp.cleanup()
        return proc.returncode

    def again(self) -> RelayProcess:
        """A relay with this one's exact command line and environment (same control
        address, ports and state directory: a restart), not started yet."""
        twin = RelayProcess.__new__(RelayProcess)
        twin.__dict__.update(self.__dict__)
        twin.proc = None
        twin.output = ""
        # in a namespace the control socket's directory goes with the twin (take the twin
        # before stopping this one, or stop() removes the directory)
        self._tmp = None
        return twin

    def kill(self) -> int:
        """SIGKILL the daemon only (a crash): its workers see the channel close and exit."""
        proc = self.proc
        assert proc is not None
        proc.kill()
        proc.wait()
        self.output = self.read_output()
        self._log.close()
        return proc.returncode

    def read_output(self) -> str:
        return read_log(self._log)

    def __enter__(self) -> RelayProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
