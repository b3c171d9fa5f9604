"""Fixtures that start the real relay daemon as a child process on loopback."""

from __future__ import annotations

import socket
from typing import Callable, Iterator, List

import pytest

from lrk.client import LrkClient
from lrk.demo.media import MediaEndpoint
from lrk.demo.relay_process import RelayProcess, next_port_range

next_ports = next_port_range


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
    """Start relays with extra CLI args or TOML config; all are stopped and checked at the end."""
    started: List[RelayProcess] = []

    def start(*extra: str, config: str = "", host: str = "127.0.0.1",
              ports: str = "") -> RelayProcess:
        args = list(extra)
        if config:
            path = tmp_path / f"relay{len(started)}.toml"
            path.write_text(config)
            args += ["--config", str(path)]
        relay = RelayProcess(ports=ports or next_ports(), host=host, extra=args)
        started.append(relay)
        return relay.start()

    yield start
    for relay in started:
        code = relay.stop()
        assert code == 0, f"relay exited with {code}: {relay.output}"
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
