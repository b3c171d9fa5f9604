"""The relay daemon: the asyncio shell that joins control sockets, engine, timers and data plane."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import stat
import time
from typing import Any, Optional

from lrk import __version__
from lrk.control.msgpack_proto import NEEDS_COUNTERS, MsgpackControl, Outcome
from lrk.core.engine import Engine, EngineConfig
from lrk.daemon.config import Config
from lrk.daemon.socket_plane import SocketPlane

log = logging.getLogger("lrk.relay")

TICK = 0.5  # expiry scan period, seconds


class _ControlEndpoint(asyncio.DatagramProtocol):
    def __init__(self, relay: Relay) -> None:
        self.relay = relay
        self.transport: Optional[asyncio.DatagramTransport] = None

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.relay.on_control(data, addr, self)

    def error_received(self, exc: Exception) -> None:  # ICMP errors for earlier replies
        self.relay.control.counters["control.send_errors"] += 1


class Relay:
    """Owns the engine, the control endpoint and the data plane for one relay node."""

    def __init__(self, config: Config) -> None:
        self.config = config
        start, end = config.port_range
        self.engine = Engine(EngineConfig(
            internal_ip=config.internal_ip,
            external_ip=config.external_ip or config.internal_ip,
            port_start=start,
            port_end=end,
            silence_timeout=config.silence_timeout,
            max_lifetime=config.max_lifetime,
            quarantine=config.quarantine,
            max_sessions=config.max_sessions,
        ))
        self.plane = SocketPlane(self.engine, config.workers, config.batch, config.io,
                                 config.log_level, config.log_format)
        self.control = MsgpackControl(
            self.engine,
            info={"mode": config.mode, "relay_version": __version__, "workers": config.workers},
            token=config.control_token,
            media_counters=self.plane.media_counters,
            started=time.monotonic(),
            allow=config.allow_set,
        )
        self._endpoint: Optional[_ControlEndpoint] = None
        self._ticker: Optional[asyncio.Task] = None
        self._tasks: set = set()
        self.control_address: Any = None
        self._unix_path: Optional[str] = None

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        await self.plane.start()
        address = self.config.control_addr
        if isinstance(address, str):
            if os.path.exists(address) and stat.S_ISSOCK(os.stat(address).st_mode):
                os.unlink(address)  # left by a crashed run
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            sock.bind(address)
            os.chmod(address, 0o660)
            self._unix_path = address
            transport, endpoint = await loop.create_datagram_endpoint(
                lambda: _ControlEndpoint(self), sock=sock)
            self.control_address = address
        else:
            host, port = address
            family = socket.AF_INET6 if ":" in host else socket.AF_INET
            transport, endpoint = await loop.create_datagram_endpoint(
                lambda: _ControlEndpoint(self), local_addr=(host, port), family=family)
            self.control_address = transport.get_extra_info("sockname")[:2]
        self._endpoint = endpoint
        self._ticker = loop.create_task(self._tick_loop())
        log.info("relay listening control=%s ports=%s mode=%s", self.config.control,
                 self.config.ports, self.config.mode)

    async def stop(self) -> None:
        if self._ticker is not None:
            self._ticker.cancel()
        if self._endpoint is not None and self._endpoint.transport is not None:
            self._endpoint.transport.close()
        if self._unix_path is not None:
            with contextlib.suppress(OSError):
                os.unlink(self._unix_path)
        for task in list(self._tasks):
            task.cancel()
        now = time.monotonic()
        for session in list(self.engine.sessions()):
            self.engine.delete(now, session.call_id, reason="deleted")
        await self.plane.stop()

    # -- control ---------------------------------------------------------------------
    def on_control(self, data: bytes, addr: Any, endpoint: _ControlEndpoint) -> None:
        received = self.control.receive(data, addr, time.monotonic())
        if isinstance(received, Outcome):
            self._send(endpoint, received.reply, addr)
            return
        if received.cmd in NEEDS_COUNTERS:
            task = asyncio.get_running_loop().create_task(self._slow(received, addr, endpoint))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
            return
        self._finish(received, addr, endpoint)

    async def _slow(self, request: Any, addr: Any, endpoint: _ControlEndpoint) -> None:
        await self.plane.flush()
        self._finish(request, addr, endpoint)

    def _finish(self, request: Any, addr: Any, endpoint: _ControlEndpoint) -> None:
        outcome = self.control.execute(request, time.monotonic())
        self.plane.apply(outcome.actions)
        self._send(endpoint, outcome.reply, addr)

    @staticmethod
    def _send(endpoint: _ControlEndpoint, reply: Optional[bytes], addr: Any) -> None:
        if reply is not None and endpoint.transport is not None:
            endpoint.transport.sendto(reply, addr)

    # -- timers ----------------------------------------------------------------------
    async def _tick_loop(self) -> None:
        while True:
            await asyncio.sleep(TICK)
            try:
                await self.tick()
            except Exception:
                log.exception("expiry tick failed")

    async def tick(self) -> None:
        now = time.monotonic()
        if not self.engine.due(now):
            return
        await self.plane.flush()  # fresh last-media times before ending anything
        actions = self.engine.expire(time.monotonic())
        for action in actions:
            log.info("session %s ended: %s", action.session.call_id, action.reason)
        self.plane.apply(actions)


async def serve(config: Config, stop_event: asyncio.Event) -> None:
    relay = Relay(config)
    await relay.start()
    try:
        await stop_event.wait()
    finally:
        await relay.stop()
