"""Run Sipwise rtpengine as a benchmark peer: a child process that always stops.

rtpengine is the media relay most Kamailio installations use, so lrk's figures are
quoted beside it. Here it forwards in userspace only (``table = -1``: its kernel
module cannot load in these VMs), reads a private config file (never
/etc/rtpengine), logs to a private file, answers NG on one UDP address, and may run
inside a network namespace (``ip netns exec``; `NgClient` then needs a socket made
in that namespace, see `client`).

    with RtpengineProcess({"internal": "127.0.0.1", "external": "127.0.0.1"}) as rtpe:
        with rtpe.client() as ng:
            call = setup_call(ng, "call-1", caller=("127.0.0.1", 7000),
                              callee=("127.0.0.1", 7002))

Debian's package is ``rtpengine-daemon`` (scripts/install.sh installs it).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from typing import Dict, List, Mapping, Optional, Sequence, Tuple, Union

from bench.ng import Addr, NgClient, NgError
from fastpath.errors import LrkError
from lrk.demo.relay_process import free_udp_port, next_port_range

RTPENGINE = "/usr/bin/rtpengine"
INSTALL_HINT = ("install Debian's rtpengine-daemon package (apt-get install "
                "rtpengine-daemon, or bash scripts/install.sh)")
#: log lines that mean something went wrong (rtpengine prefixes each line with its level)
_PROBLEM = re.compile(r"\b(WARNING|ERR|ERROR|CRIT|ALERT|EMERG)\b:")


class RtpengineError(LrkError):
    """rtpengine is missing, did not come up, or did not stop; the message has its log."""

    code = "rtpengine"


def find_rtpengine(binary: Optional[str] = None) -> str:
    """Path of the rtpengine binary, or `RtpengineError` saying how to install it."""
    path = binary or shutil.which("rtpengine") or RTPENGINE
    if not os.access(path, os.X_OK):
        raise RtpengineError(f"no rtpengine binary at {path}: {INSTALL_HINT}")
    return path


def _parse_ports(ports: Union[str, Tuple[int, int]]) -> Tuple[int, int]:
    if isinstance(ports, str):
        low, _, high = ports.partition("-")
        try:
            first, last = int(low), int(high)
        except ValueError:
            raise RtpengineError(f"port range must look like 40000-40999, not {ports!r}") \
                from None
    else:
        first, last = ports
    if not 1024 <= first < last <= 65535:
        raise RtpengineError(f"port range {first}-{last} must be increasing within 1024-65535")
    return first, last


class RtpengineProcess:
    """``rtpengine --foreground`` with a private config; a context manager that always stops it.

    `interfaces` maps logical interface names to local addresses (the relay's side
    facing each endpoint); the NG ``direction`` flag picks them per call. `threads`
    is ``num-threads`` (1 by default: per-core figures). `ng` is the NG listen
    address (default: a free port on 127.0.0.1, inside `netns` when given).
    """

    def __init__(self, interfaces: Union[Mapping[str, str], Sequence[Tuple[str, str]]] = (
                     ("internal", "127.0.0.1"), ("external", "127.0.0.1")),
                 ports: Union[str, Tuple[int, int], None] = None,
                 ng: Optional[Addr] = None, threads: int = 1,
                 netns: Optional[str] = None, binary: Optional[str] = None,
                 log_level: int = 5, delete_delay: int = 0,
                 options: Optional[Mapping[str, str]] = None) -> None:
        pairs = list(interfaces.items()) if isinstance(interfaces, Mapping) else \
            list(interfaces)
        if not pairs:
            raise RtpengineError("rtpengine needs at least one interface (name -> address)")
        if threads < 1:
            raise RtpengineError(f"threads must be >= 1, got {threads}")
        self.binary = find_rtpengine(binary)
        self.interfaces: List[Tuple[str, str]] = [(str(n), str(a)) for n, a in pairs]
        self.port_min, self.port_max = _parse_ports(ports or next_port_range(512))
        self.netns = netns
        if ng is None:
            # inside a namespace its loopback is empty: any port is free there
            ng = ("127.0.0.1", free_udp_port() if netns is None else 22223)
        self.ng: Addr = ng
        self.threads = threads
        self.log_level = log_level
        self.delete_delay = delete_delay
        self.options = dict(options or {})
        self.proc: Optional[subprocess.Popen] = None
        self._tmp: Optional[tempfile.TemporaryDirectory] = None
        self.log_text = ""  # the whole log, kept after stop
        self.returncode: Optional[int] = None

    # -- config --------------------------------------------------------------------
    def config_text(self) -> str:
        """The ini file rtpengine reads (section [rtpengine]); nothing comes from /etc."""
        ng_host, ng_port = self.ng
        listen = f"[{ng_host}]:{ng_port}" if ":" in ng_host else f"{ng_host}:{ng_port}"
        interfaces = ";".join(f"{name}/{addr}" if name else addr
                              for name, addr in self.interfaces)
        settings: Dict[str, str] = {
            "table": "-1",                 # userspace forwarding only (no kernel module)
            "interface": interfaces,
            "listen-ng": listen,
            "port-min": str(self.port_min),
            "port-max": str(self.port_max),
            "num-threads": str(self.threads),
            "media-num-threads": "0",      # no media playback
            "delete-delay": str(self.delete_delay),  # 0: a delete frees the ports at once
            "log-level": str(self.log_level),
            "log-stderr": "true",
            "timeout": "3600",
            "silent-timeout": "3600",
        }
        settings.update(self.options)
        lines = ["[rtpengine]"] + [f"{key} = {value}" for key, value in settings.items()]
        return "\n".join(lines) + "\n"

    @property
    def argv(self) -> List[str]:
        assert self._tmp is not None
        cmd = [self.binary, f"--config-file={self._tmp.name}/rtpengine.conf",
               "--config-section=rtpengine", "--foreground"]
        if self.netns:
            cmd = ["ip", "netns", "exec", self.netns, *cmd]
        return cmd

    # -- lifecycle -----------------------------------------------------------------
    def start(self, ready_timeout: float = 20.0) -> RtpengineProcess:
        """Start and wait (bounded) until an NG ping is answered."""
        self._tmp = tempfile.TemporaryDirectory(prefix="lrk-rtpe-")
        with open(os.path.join(self._tmp.name, "rtpengine.conf"), "w") as fh:
            fh.write(self.config_text())
        # a file, not a pipe: a chatty daemon must never block on a full pipe; O_APPEND so
        # the child's writes never depend on the offset of anyone reading the file
        self._log_path = os.path.join(self._tmp.name, "rtpengine.log")
        self._log = open(self._log_path, "ab")  # noqa: SIM115 - lives as long as the child
        try:
            self.proc = subprocess.Popen(self.argv, stdout=self._log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL)
        except OSError as exc:
            self._cleanup()
            raise RtpengineError(f"could not run {self.argv[0]}: {exc}") from exc
        deadline = time.monotonic() + ready_timeout
        try:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise RtpengineError(
                        f"rtpengine exited with code {self.proc.returncode} at start; "
                        f"log:\n{self.read_log()}")
                try:
                    with self.client(timeout=0.2, retries=0) as ng:
                        if ng.ping():
                            return self
                except NgError:
                    continue
            raise RtpengineError(f"rtpengine did not answer an NG ping on "
                                 f"{self.ng[0]}:{self.ng[1]} within {ready_timeout}s; "
                                 f"log:\n{self.read_log()}")
        except BaseException:
            self.stop()
            raise

    def stop(self, timeout: float = 10.0) -> int:
        """SIGTERM, bounded wait, SIGKILL if it hangs; returns the exit code (idempotent)."""
        proc = self.proc
        if proc is None:
            return 0
        if self.returncode is not None:
            return self.returncode
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.returncode = proc.returncode
        self.log_text = self.read_log()
        self._cleanup()
        return proc.returncode

    def _cleanup(self) -> None:
        log = getattr(self, "_log", None)
        if log is not None and not log.closed:
            log.close()
        if self._tmp is not None:
            self._tmp.cleanup()

    def __enter__(self) -> RtpengineProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- use and observation -------------------------------------------------------
    def client(self, timeout: float = 1.0, retries: int = 2) -> NgClient:
        """An NG client for this daemon (its socket made inside `netns` when there is one)."""
        sock = None
        if self.netns:
            from bench.netns import socket_in

            family = socket.AF_INET6 if ":" in self.ng[0] else socket.AF_INET
            sock = socket_in(self.netns, family)
        return NgClient(self.ng, timeout=timeout, retries=retries, sock=sock)

    @property
    def pid(self) -> int:
        """The daemon's pid (``ip netns exec`` execs it, so this is rtpengine itself)."""
        if self.proc is None:
            raise RtpengineError("rtpengine is not started")
        return self.proc.pid

    @property
    def pids(self) -> List[int]:
        """Every thread id of the daemon (its CPU shows in /proc/PID/stat as a whole)."""
        try:
            return sorted(int(t) for t in os.listdir(f"/proc/{self.pid}/task"))
        except FileNotFoundError:
            return []

    def cpu_seconds(self) -> float:
        """User + system CPU of all its threads so far (from /proc/PID/stat)."""
        with open(f"/proc/{self.pid}/stat") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def rss_bytes(self) -> int:
        with open(f"/proc/{self.pid}/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def read_log(self) -> str:
        log = getattr(self, "_log", None)
        if log is None or log.closed:
            return self.log_text
        with open(self._log_path, "rb") as fh:
            return fh.read().decode(errors="replace")

    def log_problems(self) -> List[str]:
        """Log lines at warning level or worse (a healthy run has none)."""
        return [line for line in self.read_log().splitlines() if _PROBLEM.search(line)]
