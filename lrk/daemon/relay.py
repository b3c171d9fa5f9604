"""The relay daemon: the asyncio shell that joins control sockets, engine, timers and data plane."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import stat
import time
from collections import Counter
from typing import Any, Callable, Dict, List, Optional

from lrk import __version__
from lrk.control.legacy import LegacyControl
from lrk.control.msgpack_proto import NEEDS_COUNTERS, MsgpackControl, Outcome
from lrk.core.engine import Engine, EngineConfig
from lrk.daemon.config import Config
from lrk.daemon.kernel_plane import KernelPlane
from lrk.daemon.nfqueue_plane import NfqueuePlane
from lrk.daemon.socket_plane import SocketPlane
from lrk.errors import ConfigError

log = logging.getLogger("lrk.relay")

TICK = 0.5  # expiry scan period, seconds
MAX_LEGACY_STREAM = 8192
LEGACY_STREAM_TIMEOUT = 2.0


class _DatagramEndpoint(asyncio.DatagramProtocol):
    """A UDP (or UNIX datagram) control socket; `on_datagram(data, addr, endpoint)`."""

    def __init__(self, on_datagram: Callable[[bytes, Any, _DatagramEndpoint], None],
                 counters: Counter, send_error_counter: str) -> None:
        self.on_datagram = on_datagram
        self.counters = counters
        self.send_error_counter = send_error_counter
        self.transport: Optional[asyncio.DatagramTransport] = None

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.on_datagram(data, addr, self)

    def error_received(self, exc: Exception) -> None:  # ICMP errors for earlier replies
        self.counters[self.send_error_counter] += 1


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
        if config.mode == "kernel":
            self.plane: Any = KernelPlane(self.engine, config.kernel_table, config.kernel_poll)
        elif config.mode == "nfqueue":
            self.plane = NfqueuePlane(self.engine, config.kernel_table, config.kernel_poll,
                                      config.nfqueue_num, config.nfqueue_bypass)
        else:
            self.plane = SocketPlane(self.engine, config.workers, config.batch, config.io,
                                     config.log_level, config.log_format, config.socket_rcvbuf,
                                     config.packet_interfaces if config.mode == "packet"
                                     else ())
        self.control = MsgpackControl(
            self.engine,
            info={"mode": config.mode, "relay_version": __version__, "workers": config.workers},
            token=config.control_token,
            media_counters=self._extra_counters,
            started=time.monotonic(),
            allow=config.allow_set,
        )
        self.legacy = LegacyControl(self.engine, allow=config.legacy_allow_set,
                                    takeover_idle=config.legacy_takeover_idle,
                                    timeout=config.legacy_timeout)
        self._endpoint: Optional[_DatagramEndpoint] = None
        self._legacy_transports: List[Any] = []
        self._legacy_servers: List[asyncio.AbstractServer] = []
        self._unix_paths: List[str] = []
        self._ticker: Optional[asyncio.Task] = None
        self.control_address: Any = None

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        await self.plane.start()
        for legacy in self.config.legacy_addrs:
            if isinstance(legacy, str):
                self._claim_unix_path(legacy)
                server = await asyncio.start_unix_server(self._legacy_stream, path=legacy)
                os.chmod(legacy, 0o660)
                self._legacy_servers.append(server)
            else:
                transport, _ = await self._datagram_endpoint(
                    legacy, self.on_legacy, self.legacy.counters, "legacy.send_errors")
                self._legacy_transports.append(transport)
        # the control socket opens last: once it answers a ping, every listener is up
        address = self.config.control_addr
        transport, endpoint = await self._datagram_endpoint(
            address, self.on_control, self.control.counters, "control.send_errors")
        self.control_address = (address if isinstance(address, str)
                                else transport.get_extra_info("sockname")[:2])
        self._endpoint = endpoint
        self._ticker = loop.create_task(self._tick_loop())
        log.info("relay listening control=%s ports=%s mode=%s", self.config.control,
                 self.config.ports, self.config.mode)

    async def _datagram_endpoint(self, address: Any, on_datagram: Any, counters: Counter,
                                 send_error_counter: str) -> Any:
        loop = asyncio.get_running_loop()

        def factory() -> _DatagramEndpoint:
            return _DatagramEndpoint(on_datagram, counters, send_error_counter)

        if isinstance(address, str):
            self._claim_unix_path(address)
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            sock.bind(address)
            os.chmod(address, 0o660)
            return await loop.create_datagram_endpoint(factory, sock=sock)
        host, port = address
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        return await loop.create_datagram_endpoint(factory, local_addr=(host, port),
                                                   family=family)

    def _claim_unix_path(self, path: str) -> None:
        """Replace a socket file left by a crashed run; remember it for removal on stop."""
        if os.path.exists(path):
            if not stat.S_ISSOCK(os.stat(path).st_mode):
                raise ConfigError(f"{path} exists and is not a socket; refusing to replace it")
            os.unlink(path)
        self._unix_paths.append(path)

    async def stop(self) -> None:
        if self._ticker is not None:
            self._ticker.cancel()
        if self._endpoint is not None and self._endpoint.transport is not None:
            self._endpoint.transport.close()
        for transport in self._legacy_transports:
            transport.close()
        for server in self._legacy_servers:
            server.close()
            await server.wait_closed()
        for path in self._unix_paths:
            with contextlib.suppress(OSError):
                os.unlink(path)
        now = time.monotonic()
        for session in list(self.engine.sessions()):
            self.engine.delete(now, session.call_id, reason="deleted")
        await self.plane.stop()

    def _extra_counters(self) -> Dict[str, int]:
        counters = dict(self.plane.media_counters())
        counters.update(self.legacy.counters)
        return counters

    # -- legacy protocol ---------------------------------------------------------------
    def on_legacy(self, data: bytes, addr: Any, endpoint: _DatagramEndpoint) -> None:
        outcome = self.legacy.handle(data, addr, time.monotonic())
        self.plane.apply(outcome.actions)
        self._send(endpoint, outcome.reply, addr)

    async def _legacy_stream(self, reader: asyncio.StreamReader,
                             writer: asyncio.StreamWriter) -> None:
        """One request per connection, without a cookie, as the module's unix: mode does."""
        try:
            data = await asyncio.wait_for(reader.read(MAX_LEGACY_STREAM), LEGACY_STREAM_TIMEOUT)
            if data:
                outcome = self.legacy.handle(data, "unix", time.monotonic(), with_cookie=False)
                self.plane.apply(outcome.actions)
                if outcome.reply is not None:
                    writer.write(outcome.reply)
                    await asyncio.wait_for(writer.drain(), LEGACY_STREAM_TIMEOUT)
        except (asyncio.TimeoutError, OSError):
            self.legacy.counters["legacy.dropped.stream_timeout"] += 1
        finally:
            writer.close()

    # -- control ---------------------------------------------------------------------
    def on_control(self, data: bytes, addr: Any, endpoint: _DatagramEndpoint) -> None:
        received = self.control.receive(data, addr, time.monotonic())
        if isinstance(received, Outcome):
            self._send(endpoint, received.reply, addr)
            return
        if received.cmd in NEEDS_COUNTERS:
            self.plane.flush_then(lambda: self._finish(received, addr, endpoint))
            return
        self._finish(received, addr, endpoint)

    def _finish(self, request: Any, addr: Any, endpoint: _DatagramEndpoint) -> None:
        outcome = self.control.execute(request, time.monotonic())
        self.plane.apply(outcome.actions)
        self._send(endpoint, outcome.reply, addr)

    @staticmethod
    def _send(endpoint: _DatagramEndpoint, reply: Optional[bytes], addr: Any) -> None:
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
