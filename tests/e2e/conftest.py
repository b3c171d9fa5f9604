"""Real Kamailio (Debian's package, lrkproxy module) in front of a real lrk relay, on loopback."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Callable, Iterator, List

import pytest

from lrk.client import LrkClient
from lrk.demo.relay_process import RelayProcess, free_udp_port
from lrk.demo.relay_process import next_port_range as next_ports

KAMAILIO = shutil.which("kamailio") or "/usr/sbin/kamailio"
MODULES = "/usr/lib/x86_64-linux-gnu/kamailio/modules/"
INTERNAL_IP, EXTERNAL_IP = "127.0.0.1", "127.0.0.2"

CONFIG = """#!KAMAILIO
debug=2
log_stderror=yes
children={children}
auto_aliases=no
listen=udp:127.0.0.1:{sip_port}
mpath="{modules}"
loadmodule "tm.so"
loadmodule "sl.so"
loadmodule "rr.so"
loadmodule "pv.so"
loadmodule "maxfwd.so"
loadmodule "textops.so"
loadmodule "siputils.so"
loadmodule "lrkproxy.so"
modparam("lrkproxy", "lrkproxy_sock", "{lrk_sock}")
modparam("lrkproxy", "lrkproxy_retr", 2)
modparam("lrkproxy", "lrkproxy_tout", 1)
request_route {{
    if (!mf_process_maxfwd_header("10")) {{ sl_send_reply("483", "Too Many Hops"); exit; }}
    if (has_totag()) {{
        if (loose_route()) {{ t_relay(); exit; }}
        if (is_method("ACK")) {{ if (t_check_trans()) {{ t_relay(); }} exit; }}
        sl_send_reply("404", "Not here"); exit;
    }}
    if (is_method("CANCEL")) {{ if (t_check_trans()) {{ t_relay(); }} exit; }}
    if (is_method("INVITE")) {{
        record_route();
        set_lrkproxy_set("0");
        lrkproxy_manage("$hdr(X-Lrk-Flags)");
    }}
    t_on_reply("REPLY");
    t_relay();
}}
onreply_route[REPLY] {{
    if (has_body("application/sdp")) {{
        set_lrkproxy_set("0");
        lrkproxy_manage("$hdr(X-Lrk-Flags)");
    }}
}}
"""


@pytest.fixture(autouse=True)
def _control_keys(control_keys_env: str) -> str:
    """Relays started here and the clients talking to them share a temporary key directory
    ($LRK_KEYS; see the root conftest.py), never the real home or /etc."""
    return control_keys_env


class Kamailio:
    """kamailio -DD -E in the foreground, in its own run directory; always stopped."""

    def __init__(self, workdir: Path, lrk_sock: str, children: int = 4) -> None:
        self.workdir = workdir
        self.sip_port = free_udp_port()
        self.children = children
        self.cfg = workdir / "kamailio.cfg"
        self.cfg.write_text(CONFIG.format(children=children, sip_port=self.sip_port,
                                          modules=MODULES, lrk_sock=lrk_sock))
        self.log = workdir / "kamailio.log"
        self.proc: subprocess.Popen = None  # type: ignore[assignment]

    @property
    def addr(self):
        return ("127.0.0.1", self.sip_port)

    def start(self) -> Kamailio:
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(
                [KAMAILIO, "-f", str(self.cfg), "-DD", "-E", "-Y", str(self.workdir),
                 "-P", str(self.workdir / "kamailio.pid"), "-w", str(self.workdir),
                 "-m", "64", "-M", "8"],
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        return self

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self) -> int:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            return self.proc.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            return self.proc.wait()


def wait_for(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def port_free(host: str, port: int) -> bool:
    """Nothing holds this UDP address: a datagram sent there reaches no socket."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET,
                       socket.SOCK_DGRAM) as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def legacy_counter(relay: RelayProcess, name: str) -> int:
    with LrkClient([relay.node]) as client:
        return client.stats()["counters"].get(name, 0)


@pytest.fixture
def stack(tmp_path) -> Iterator[Callable[..., tuple]]:
    """start(legacy_addr=None, config='') -> (relay, kamailio); all stopped afterwards."""
    if not os.path.exists(KAMAILIO):
        pytest.fail("kamailio is not installed: run scripts/install.sh (it installs it)")
    relays: List[RelayProcess] = []
    kamailios: List[Kamailio] = []

    def start_relay(legacy: str, config: str = "", ports: str = "") -> RelayProcess:
        cfg = tmp_path / f"lrk{len(relays)}.toml"
        cfg.write_text(config)
        relay = RelayProcess(ports=ports or next_ports(256), extra=[
            "--legacy", legacy, "--internal-ip", INTERNAL_IP, "--external-ip", EXTERNAL_IP,
            "--config", str(cfg)])
        relays.append(relay)
        return relay.start()

    # the silence timeout outlasts a call's setup through Kamailio however loaded the run
    # (seconds under PyPy, and a lost SIP datagram's retransmission adds 4 s): a session
    # that expires before its first packet has no media. The expiry test sets its own
    def start(config: str = "legacy_timeout = 30\nquarantine = 0\n", unix: bool = False):
        if unix:
            legacy = f"unix:{tmp_path / 'lrk.sock'}"
            module_sock = legacy
        else:
            port = free_udp_port()
            legacy = f"127.0.0.1:{port}"
            module_sock = f"udp:127.0.0.1:{port}"
        relay = start_relay(legacy, config)
        kam = Kamailio(tmp_path, module_sock).start()
        kamailios.append(kam)
        # every SIP worker pings and reads the config at start: then it is ready
        wait_for(lambda: legacy_counter(relay, "legacy.requests.G") >= kam.children, 20,
                 "Kamailio's workers to fetch lrk's config")
        return relay, kam, legacy, start_relay

    yield start
    for kam in kamailios:
        code = kam.stop()
        out = kam.output()
        assert code == 0, f"kamailio exited with {code}: {out[-3000:]}"
        assert "segfault" not in out.lower(), out[-3000:]
    for relay in relays:
        code = relay.stop()
        assert code == 0, relay.output
        assert "Traceback" not in relay.output, relay.output
