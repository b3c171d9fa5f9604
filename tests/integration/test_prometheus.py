"""lrk's /metrics against the real thing: Debian's Prometheus scrapes a MetricsServer fed by
a fake snapshot, and promtool lints the exposition (both from the `prometheus` package,
which scripts/install.sh installs)."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Any, Dict, List, Optional

import pytest

from lrk import __version__
from lrk.daemon.metrics import MetricsServer, interpreter

pytestmark = pytest.mark.integration

DEADLINE = 90.0  # Prometheus starts in about a second and scrapes every second
FORWARDED = 1234567


def tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} not found: install Debian's prometheus package "
                    "(scripts/install.sh does)")
    return path


def snapshot_of(counters: Dict[str, Any]) -> Dict[str, Any]:
    return {"counters": counters, "sessions": {"offered": 1, "answered": 3},
            "ports": {"total": 5000, "in_use": 8, "free": 4990, "quarantined": 2},
            "mode": "socket", "uptime": 12.0, "workers": 1}


FED = {
    "media.forwarded.packets": FORWARDED,
    "media.forwarded.bytes": FORWARDED * 172,
    "media.dropped.unexpected_source": 17,
    "control.requests.offer": 41,
    "legacy.requests.S": 9,
    "sessions.created": 40,
    "sessions.expired.silence": 3,
    "workers.restarts": 0,
    "brand.new-thing": 5,  # no mapping: exported under its sanitized name
}


def test_promtool_check_metrics():
    server = MetricsServer("127.0.0.1", 0, lambda: snapshot_of(FED))
    server.observe_request("msgpack", "offer", 0.0004)
    server.observe_request("legacy", "S", 0.002)
    status, body, _ = server.render()
    assert status == 200
    proc = subprocess.run([tool("promtool"), "check", "metrics"], input=body,
                          capture_output=True, timeout=60)
    assert proc.returncode == 0, (proc.stdout + proc.stderr).decode()
    assert proc.stdout + proc.stderr == b"", (proc.stdout + proc.stderr).decode()
    # promtool does find problems in this format (so the pass above means something)
    bad = b"# HELP x_count n\n# TYPE x_count counter\nx_count 1\n"
    proc = subprocess.run([tool("promtool"), "check", "metrics"], input=bad,
                          capture_output=True, timeout=60)
    assert proc.returncode != 0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get_json(url: str) -> Optional[Dict[str, Any]]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return json.loads(response.read())
    except (urllib.error.URLError, ConnectionError, OSError, ValueError):
        return None  # not up yet


class Prometheus:
    """A throwaway Prometheus on a free loopback port scraping `target` every second."""

    def __init__(self, tmp_path, target: str) -> None:
        self.dir = tmp_path
        self.target = target
        self.proc: Optional[subprocess.Popen] = None
        self.port = 0
        self.log = tmp_path / "prometheus.log"

    def start(self) -> Prometheus:
        config = self.dir / "prometheus.yml"
        config.write_text(
            "global:\n"
            "  scrape_interval: 1s\n"
            "  evaluation_interval: 1s\n"
            "scrape_configs:\n"
            "  - job_name: lrk\n"
            "    scrape_interval: 1s\n"
            "    scrape_timeout: 1s\n"
            "    static_configs:\n"
            f"      - targets: ['{self.target}']\n")
        for _attempt in range(5):  # the free port may be taken between probe and bind
            self.port = free_port()
            log = open(self.log, "wb")  # noqa: SIM115 - closed with the process
            self.proc = subprocess.Popen(
                [tool("prometheus"), f"--config.file={config}",
                 f"--storage.tsdb.path={self.dir / 'data'}",
                 f"--web.listen-address=127.0.0.1:{self.port}"],
                stdout=log, stderr=subprocess.STDOUT)
            log.close()
            deadline = time.monotonic() + DEADLINE
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    break  # exited: retry if the port was taken
                if self._ready():
                    return self
                time.sleep(0.1)
            if self.proc.poll() is None:
                self.stop()
                pytest.fail(f"prometheus not ready in {DEADLINE} s:\n{self.output()}")
            if b"address already in use" not in self.log.read_bytes():
                pytest.fail(f"prometheus exited with {self.proc.returncode}:\n{self.output()}")
        pytest.fail("prometheus found no free port")

    def _ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/-/ready",
                                        timeout=5) as response:
                return response.status == 200
        except (urllib.error.URLError, ConnectionError, OSError):
            return False

    def query(self, promql: str) -> List[Dict[str, Any]]:
        url = (f"http://127.0.0.1:{self.port}/api/v1/query?"
               + urllib.parse.urlencode({"query": promql}))
        reply = get_json(url)
        if reply is None or reply.get("status") != "success":
            return []
        return reply["data"]["result"]

    def wait_for(self, promql: str, value: str) -> Dict[str, Any]:
        """Poll the query API until `promql` yields one series of `value`; its labels."""
        deadline = time.monotonic() + DEADLINE
        last: List[Dict[str, Any]] = []
        while time.monotonic() < deadline:
            last = self.query(promql)
            if len(last) == 1 and last[0]["value"][1] == value:
                return last[0]["metric"]
            time.sleep(0.2)
        pytest.fail(f"{promql} never became {value} (last: {last}); targets: "
                    f"{get_json(f'http://127.0.0.1:{self.port}/api/v1/targets')}\n"
                    f"{self.output()}")

    def output(self) -> str:
        return self.log.read_text(errors="replace")[-4000:]

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def test_prometheus_scrapes_the_relay_metrics(tmp_path):
    counters = dict(FED)
    server = MetricsServer("127.0.0.1", 0, lambda: snapshot_of(counters))
    server.observe_request("msgpack", "offer", 0.0004)
    host, port = server.start()
    prometheus = Prometheus(tmp_path, f"{host}:{port}")
    try:
        prometheus.start()
        labels = prometheus.wait_for("lrk_media_forwarded_packets_total", str(FORWARDED))
        assert labels == {"__name__": "lrk_media_forwarded_packets_total", "job": "lrk",
                          "instance": f"{host}:{port}"}
        # every scrape so far parsed (OpenMetrics, which Prometheus asks for first)
        prometheus.wait_for('up{job="lrk"}', "1")
        prometheus.wait_for('lrk_media_dropped_packets_total{reason="unexpected_source"}', "17")
        prometheus.wait_for('lrk_control_requests_total{protocol="msgpack",command="offer"}',
                            "41")
        prometheus.wait_for('lrk_control_requests_total{protocol="legacy",command="S"}', "9")
        prometheus.wait_for('lrk_sessions_ended_total{reason="silence"}', "3")
        prometheus.wait_for('lrk_sessions{state="answered"}', "3")
        prometheus.wait_for("lrk_ports_used", "16")
        prometheus.wait_for("lrk_brand_new_thing_total", "5")
        prometheus.wait_for('lrk_control_request_duration_seconds_count{command="offer"}', "1")
        info = prometheus.wait_for("lrk_build_info", "1")
        assert (info["version"], info["mode"], info["interpreter"]) == (
            __version__, "socket", interpreter())
        # live: a new value reaches Prometheus on a later scrape
        counters["media.forwarded.packets"] = FORWARDED + 1000
        prometheus.wait_for("lrk_media_forwarded_packets_total", str(FORWARDED + 1000))
        targets = get_json(f"http://127.0.0.1:{prometheus.port}/api/v1/targets")
        assert targets is not None
        active = targets["data"]["activeTargets"]
        assert [(t["health"], t["lastError"]) for t in active] == [("up", "")]
    finally:
        prometheus.stop()
        server.stop()
    assert prometheus.proc is not None and prometheus.proc.returncode is not None
