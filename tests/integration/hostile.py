"""Helpers of the attack tests (test_security.py, test_fuzz_daemon.py): a relay with keys of
its own, raw signed requests, and what a process holds (RSS, file descriptors)."""

from __future__ import annotations

import os
import socket
import time
from contextlib import contextmanager
from typing import Any, Dict, Iterator, List, Optional, Tuple

import msgpack

from lrk.control.auth import Key, create_key, ensure_keys, load_key, sign
from lrk.demo.relay_process import RelayProcess, next_port_range
from tests.sockets import pending  # noqa: F401 - tests import it from here

Addr = Tuple[str, int]


class Keys:
    """A key directory: admin.key, client.key (created as a relay creates them on first
    start) and other.key (a second, non-admin client)."""

    def __init__(self, directory: str) -> None:
        self.directory = directory
        ensure_keys(directory)
        create_key(directory, "other")
        self.admin = load_key(os.path.join(directory, "admin.key"))
        self.client = load_key(os.path.join(directory, "client.key"))
        self.other = load_key(os.path.join(directory, "other.key"))

    def path(self, name: str) -> str:
        return os.path.join(self.directory, f"{name}.key")


@contextmanager
def keyed_relay(keys: Keys, *extra: str, config: str = "", ports: str = "",
                tmp: Optional[str] = None,
                env: Optional[Dict[str, str]] = None) -> Iterator[RelayProcess]:
    """A relay on its own key directory; stopped at the end, which must be clean."""
    args = list(extra)
    if config:
        path = os.path.join(tmp or keys.directory, f"relay-{os.urandom(3).hex()}.toml")
        with open(path, "w") as fh:
            fh.write(config)
        args += ["--config", path]
    relay = RelayProcess(ports=ports or next_port_range(), extra=args, keys=keys.directory,
                         env=env)
    relay.start()
    try:
        yield relay
    finally:
        code = relay.stop()
        assert code == 0, f"relay exited with {code}: {relay.output}"
        assert "Traceback" not in relay.output, relay.output


def packed(message: Dict[str, Any]) -> bytes:
    body = {"v": 1, "cookie": os.urandom(6).hex()}
    body.update(message)
    return msgpack.packb(body, use_bin_type=True)


def signed(message: Dict[str, Any], key: Key, wall: Optional[float] = None) -> bytes:
    return sign(packed(message), key, time.time() if wall is None else wall)


def udp(host: str = "127.0.0.1") -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind((host, 0))
    s.settimeout(5.0)
    return s


def ask(sock: socket.socket, to: Addr, data: bytes) -> Dict[str, Any]:
    """Send one datagram and read the reply carrying its cookie (bounded wait)."""
    cookie = msgpack.unpackb(data[:-60] if data[-60:-56] == b"\xc1LK1" else data,
                             raw=False)["cookie"]
    sock.sendto(data, to)
    deadline = time.monotonic() + 5.0
    while time.monotonic() < deadline:
        reply = msgpack.unpackb(sock.recv(65535), raw=False)
        if reply.get("cookie") == cookie:
            return reply
    raise AssertionError(f"no reply to {cookie}")


class Admin:
    """`stats` over the admin key, from a socket of its own."""

    def __init__(self, relay: RelayProcess, key: Key) -> None:
        self.to = ("127.0.0.1", relay.control_port)
        self.key = key
        self.sock = udp()

    def request(self, message: Dict[str, Any]) -> Dict[str, Any]:
        return ask(self.sock, self.to, signed(message, self.key))

    def counters(self) -> Dict[str, int]:
        return self.request({"cmd": "stats"})["counters"]

    def close(self) -> None:
        self.sock.close()


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def children(pid: int) -> List[int]:
    with open(f"/proc/{pid}/task/{pid}/children") as fh:
        return [int(p) for p in fh.read().split()]


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def tree_fds(pid: int) -> Dict[int, int]:
    """Open descriptors of the relay and of each of its workers."""
    return {p: fd_count(p) for p in [pid, *children(pid)]}


def bound_udp_ports(pids: List[int]) -> List[int]:
    """UDP ports bound by sockets these processes hold (from /proc/net/udp{,6}): what they
    keep, whoever else on the host uses the same ports."""
    inodes = set()
    for pid in pids:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    ports = []
    for table in ("/proc/net/udp", "/proc/net/udp6"):
        with open(table) as fh:
            next(fh)
            for line in fh:
                fields = line.split()
                if fields[9] in inodes:
                    ports.append(int(fields[1].rsplit(":", 1)[1], 16))
    return sorted(ports)

