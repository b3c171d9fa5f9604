"""A throwaway `redis-server` for tests and benchmarks: a unix socket in a temporary
directory (reachable from every network namespace, no TCP port), no persistence; stop()
and start() again on the same socket (Redis down during calls)."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from typing import List, Optional

import redis

REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"


class RedisServer:
    """`with RedisServer() as r: r.url` -- removed (process and directory) on exit."""

    def __init__(self) -> None:
        self.dir = tempfile.mkdtemp(prefix="lrk-redis-")
        self.sock = os.path.join(self.dir, "redis.sock")
        self.url = f"unix://{self.sock}"
        self.proc: Optional[subprocess.Popen] = None
        self.log = open(os.path.join(self.dir, "redis.log"), "wb")  # noqa: SIM115 - closed by close()

    def start(self, timeout: float = 10.0) -> RedisServer:
        assert self.proc is None, "already running"
        self.proc = subprocess.Popen(
            [REDIS_SERVER, "--port", "0", "--unixsocket", self.sock, "--unixsocketperm", "700",
             "--save", "", "--appendonly", "no", "--dir", self.dir],
            stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        client = redis.Redis.from_url(self.url, socket_timeout=0.5)
        try:
            while True:
                try:
                    if client.ping():
                        return self
                except (redis.RedisError, OSError):
                    pass
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"redis-server did not start: {self.output()}")
                time.sleep(0.02)  # polling readiness, bounded by the deadline
        finally:
            client.close()

    def stop(self) -> None:
        """Stop the server (its data is gone: no persistence); the socket file goes."""
        proc, self.proc = self.proc, None
        if proc is None:
            return
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)

    def client(self) -> redis.Redis:
        return redis.Redis.from_url(self.url, socket_timeout=1.0)

    def keys(self, pattern: str = "lrk:*") -> List[str]:
        """Every key matching `pattern`, sorted (a leak check)."""
        c = self.client()
        try:
            return sorted(k.decode() for k in c.scan_iter(match=pattern, count=1000))
        finally:
            c.close()

    def output(self) -> str:
        with open(os.path.join(self.dir, "redis.log"), "rb") as fh:
            return fh.read().decode(errors="replace")

    def close(self) -> None:
        self.stop()
        self.log.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()
