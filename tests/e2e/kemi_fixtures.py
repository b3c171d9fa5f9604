"""Real Kamailio with app_python3 running lrk.kemi (etc/kamailio/lrk-kemi.cfg as shipped),
in front of real lrk relays (socket mode), on loopback.

The shipped config and script are used unchanged: the ports, the script's path and the
flags come in as `kamailio -A NAME=VALUE` defines, the relay nodes in a lrk-kemi.toml
written here and named by $LRK_KEMI_CONFIG.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

from lrk.client import LrkClient
from lrk.control.auth import ensure_keys
from lrk.demo.relay_process import RelayProcess, free_udp_port, next_port_range

from .kemi_sipua import Msg, parse, unique

ROOT = Path(__file__).resolve().parents[2]
KEMI_CFG = ROOT / "etc" / "kamailio" / "lrk-kemi.cfg"
KEMI_SCRIPT = ROOT / "etc" / "kamailio" / "lrk_kemi.py"
KAMAILIO = shutil.which("kamailio") or "/usr/sbin/kamailio"
APP_PYTHON3 = "/usr/lib/x86_64-linux-gnu/kamailio/modules/app_python3.so"
SIPP = shutil.which("sipp") or "/usr/bin/sipp"
INTERNAL_IP, EXTERNAL_IP = "127.0.0.1", "127.0.0.2"


def wait_until(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def toml_config(nodes: Dict[int, Sequence[str]], **options: object) -> str:
    """A lrk-kemi.toml: top-level options, then [sets]."""
    lines = []
    for key, value in options.items():
        lines.append(f"{key} = {value!r}".replace("'", '"'))
    lines.append("[sets]")
    for set_id, members in nodes.items():
        lines.append(f"{set_id} = [{', '.join(repr(n) for n in members)}]".replace("'", '"'))
    return "\n".join(lines) + "\n"


class KemiKamailio:
    """kamailio -DD -E with lrk-kemi.cfg in the foreground, in its own run directory."""

    def __init__(self, workdir: Path, config_toml: str, flags: str = "",
                 children: int = 4, keys: Optional[Path] = None) -> None:
        self.keys = keys
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.sip_port = free_udp_port()
        self.children = children
        self.config = workdir / "lrk-kemi.toml"
        self.config.write_text(config_toml)
        self.log = workdir / "kamailio.log"
        self.flags = flags
        self.proc: Optional[subprocess.Popen] = None

    @property
    def addr(self):
        return (INTERNAL_IP, self.sip_port)

    def start(self, ready_timeout: float = 20.0) -> KemiKamailio:
        argv = [KAMAILIO, "-f", str(KEMI_CFG), "-DD", "-E", "-Y", str(self.workdir),
                "-P", str(self.workdir / "kamailio.pid"), "-w", str(self.workdir),
                "-m", "64", "-M", "16",
                "-A", f"SIP_PORT={self.sip_port}", "-A", f"CHILDREN={self.children}",
                "-A", f'LRK_KEMI_SCRIPT="{KEMI_SCRIPT}"', "-A", f'LRK_FLAGS="{self.flags}"']
        env = dict(os.environ, LRK_KEMI_CONFIG=str(self.config))
        env.pop("LRK_KEYS", None)
        if self.keys is not None:
            env["LRK_KEYS"] = str(self.keys)
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env,
                                         start_new_session=True)
        self._wait_ready(ready_timeout)
        return self

    def _wait_ready(self, timeout: float) -> None:
        """OPTIONS to the proxy until one is answered (every worker is up by then)."""
        deadline = time.monotonic() + timeout
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.bind((INTERNAL_IP, 0))
            here = s.getsockname()
            while time.monotonic() < deadline:
                assert self.proc is not None
                if self.proc.poll() is not None:
                    raise AssertionError(f"kamailio exited with {self.proc.returncode}: "
                                         f"{self.output()[-4000:]}")
                call_id = unique("ping-")
                ping = Msg(f"OPTIONS sip:{self.addr[0]}:{self.sip_port} SIP/2.0", [
                    ("Via", f"SIP/2.0/UDP {here[0]}:{here[1]};branch={unique('z9hG4bK')}"),
                    ("Max-Forwards", "70"), ("From", f"<sip:t@{here[0]}>;tag=p"),
                    ("To", f"<sip:{self.addr[0]}>"), ("Call-ID", call_id),
                    ("CSeq", "1 OPTIONS")])
                s.sendto(ping.encode(), self.addr)
                s.settimeout(0.2)
                try:
                    while True:
                        reply = parse(s.recv(65535))
                        if reply.call_id == call_id and reply.status == 200:
                            return
                except socket.timeout:
                    continue
        raise AssertionError(f"kamailio did not answer OPTIONS within {timeout} s: "
                             f"{self.output()[-4000:]}")

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self) -> int:
        proc = self.proc
        if proc is None:
            return 0
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        return proc.returncode


class KemiStack:
    """Starts relays and Kamailios for one test; `close()` stops and checks them all."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        # the control keys of this test's relays and clients (admin.key, client.key):
        # the relays, Kamailio's workers (lrk.kemi's clients) and the test's own clients
        # find them through $LRK_KEYS (the test sets it in its own environment too)
        self.keys = tmp_path / "keys"
        self.keys.mkdir(mode=0o700)
        ensure_keys(str(self.keys))
        self.relays: List[RelayProcess] = []
        self.kamailios: List[KemiKamailio] = []
        self.clients: List[LrkClient] = []
        self.expected_errors: List[str] = []

    def relay(self, config: str = "quarantine = 0\n", ports: str = "") -> RelayProcess:
        cfg = self.tmp_path / f"lrk{len(self.relays)}.toml"
        cfg.write_text(config)
        relay = RelayProcess(ports=ports or next_port_range(128), extra=[
            "--internal-ip", INTERNAL_IP, "--external-ip", EXTERNAL_IP, "--config", str(cfg)],
            env={"LRK_KEYS": str(self.keys)})
        self.relays.append(relay)
        return relay.start()

    def kamailio(self, nodes: Dict[int, Sequence[str]], flags: str = "", children: int = 4,
                 keys_env: bool = True, **options: object) -> KemiKamailio:
        """Kamailio with lrk-kemi.cfg; `options` go into its lrk-kemi.toml. Its workers
        find this test's client.key through $LRK_KEYS, or (keys_env=False) only through
        the config's `key` option."""
        if not os.path.exists(KAMAILIO) or not os.path.exists(APP_PYTHON3):
            raise AssertionError("kamailio or its app_python3 module is missing: run "
                                 "scripts/install.sh (kamailio, kamailio-python3-modules)")
        options.setdefault("timeout", 1.0)
        options.setdefault("retries", 3)
        kam = KemiKamailio(self.tmp_path / f"kamailio{len(self.kamailios)}",
                           toml_config(nodes, **options), flags, children,
                           self.keys if keys_env else None)
        self.kamailios.append(kam)
        return kam.start()

    def client(self, relay: RelayProcess) -> LrkClient:
        client = LrkClient([relay.node], timeout=1.0, retries=3)
        self.clients.append(client)
        return client

    def close(self) -> None:
        for client in self.clients:
            client.close()
        problems = []
        for kam in self.kamailios:
            code = kam.stop()
            out = kam.output()
            if code != 0:
                problems.append(f"kamailio exited with {code}: {out[-3000:]}")
            for line in out.splitlines():
                bad = "Traceback" in line or "lrk:" in line and "ERROR" in line \
                    or "app_python3" in line and "ERROR" in line
                if bad and not any(e in line for e in self.expected_errors):
                    problems.append(f"kamailio logged: {line}")
        for relay in self.relays:
            code = relay.stop()
            if code != 0 or "Traceback" in relay.output:
                problems.append(f"relay exited with {code}: {relay.output[-3000:]}")
        assert not problems, "\n".join(problems)
