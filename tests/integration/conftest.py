"""Fixtures that start the real relay daemon as a child process on loopback."""

from __future__ import annotations

import socket
from typing import Callable, Iterator, List, Tuple

import pytest

from lrk.client import LrkClient
from lrk.demo.media import MediaEndpoint
from lrk.demo.relay_process import RelayProcess, next_port_range

next_ports = next_port_range


@pytest.fixture(autouse=True)
def _control_keys(control_keys_env: str) -> str:
    """Relays started here and the clients talking to them share a temporary key directory
    ($LRK_KEYS; see the root conftest.py), never the real home or /etc."""
    return control_keys_env


def port_free(host: str, port: int) -> bool:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def worker_pids(relay: RelayProcess) -> List[int]:
    """The relay's child processes (its workers), from /proc."""
    pid = relay.proc.pid
    with open(f"/proc/{pid}/task/{pid}/children") as fh:
        return [int(p) for p in fh.read().split()]


@pytest.fixture
def start_relay(tmp_path) -> Iterator[Callable[..., RelayProcess]]:
    """Start relays with extra CLI args or TOML config; all are stopped and checked at the end:
    each must exit with `expect_exit` (0, a clean stop on SIGTERM, unless the test kills it on
    purpose and says so) and log no traceback."""
    started: List[Tuple[RelayProcess, int]] = []

    def start(*extra: str, config: str = "", host: str = "127.0.0.1",
              ports: str = "", expect_exit: int = 0) -> RelayProcess:
        args = list(extra)
        if config:
            path = tmp_path / f"relay{len(started)}.toml"
            path.write_text(config)
            args += ["--config", str(path)]
        relay = RelayProcess(ports=ports or next_ports(), host=host, extra=args)
        started.append((relay, expect_exit))
        return relay.start()

    yield start
    for relay, expected in started:
        code = relay.stop()
        assert code == expected, f"relay exited with {code}, not {expected}: {relay.output}"
        assert "Traceback" not in relay.output, relay.output


@pytest.fixture
def relay(start_relay) -> RelayProcess:
    return start_relay()


@pytest.fixture
def client(relay) -> Iterator[LrkClient]:
    with LrkClient([relay.node], timeout=1.0, retries=3) as c:
        yield c


@pytest.fixture
def endpoints() -> Iterator[Callable[..., MediaEndpoint]]:
    made: List[MediaEndpoint] = []

    def make(host: str = "127.0.0.1") -> MediaEndpoint:
        ep = MediaEndpoint(host)
        made.append(ep)
        return ep

    yield make
    for ep in made:
        ep.close()
