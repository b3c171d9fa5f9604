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
from typing import Any, Callable, Dict, List, Optional, Tuple

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
READ_BURST = 64  # datagrams read per wake-up of a control socket
MAX_DATAGRAM = 65535


class _DatagramEndpoint:
    """A UDP (or UNIX datagram) control socket, read in bursts: one loop wake-up drains up
    to READ_BURST datagrams, so a client with many requests in flight costs one wake-up
    per burst (asyncio's datagram transport reads one datagram per loop iteration, which
    made the loop itself the control plane's cost under PyPy). Replies are sent at once;
    a reply the socket cannot take is dropped and counted (the client retransmits)."""

    def __init__(self, sock: socket.socket, on_datagram: Callable[[bytes, Any, Any], None],
                 counters: Counter, send_error_counter: str,
                 burst: Optional[Tuple[Callable[[], None], Callable[[], None]]] = None) -> None:
        sock.setblocking(False)
        self.sock = sock
        self.on_datagram = on_datagram
        self.burst = burst
        self.counters = counters
        self.send_error_counter = send_error_counter
        self.loop: Optional[asyncio.AbstractEventLoop] = None

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        loop.add_reader(self.sock.fileno(), self._readable)

    def _readable(self) -> None:
        if self.burst is None:
            self._read()
            return
        begin, end = self.burst
        begin()
        try:
            self._read()
        finally:
            end()

    def _read(self) -> None:
        recvfrom = self.sock.recvfrom
        for _ in range(READ_BURST):
            try:
                data, addr = recvfrom(MAX_DATAGRAM)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:  # an ICMP error for an earlier reply, queued on the socket
                self.counters[self.send_error_counter] += 1
                continue
            try:
                self.on_datagram(data, addr, self)
            except Exception:  # one bad request never stops the listener
                log.exception("control datagram from %s failed", addr)
                self.counters[self.send_error_counter.split(".")[0] + ".internal_errors"] += 1

    def sendto(self, data: bytes, addr: Any) -> None:
        try:
            self.sock.sendto(data, addr)
        except (OSError, TypeError):  # full, unreachable, or an unbound UNIX client
            self.counters[self.send_error_counter] += 1

    def close(self) -> None:
        if self.loop is not None:
            with contextlib.suppress(Exception):
                self.loop.remove_reader(self.sock.fileno())
            self.loop = None
        self.sock.close()


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
            self.plane: Any = KernelPlane(self.engine, config.kernel_table, config.kernel_poll,
                                          counters=config.kernel_counters)
        elif config.mode == "nfqueue":
            self.plane = NfqueuePlane(self.engine, config.kernel_table, config.kernel_poll,
                                      config.nfqueue_num, config.nfqueue_bypass)
        else:
            self.plane = SocketPlane(self.engine, config.workers, config.batch, config.io,
                                     config.log_level, config.log_format, config.socket_rcvbuf,
                                     config.packet_interfaces if config.mode == "packet"
                                     else (), config.coalesce_us)
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
        self._legacy_endpoints: List[_DatagramEndpoint] = []
        self._legacy_servers: List[asyncio.AbstractServer] = []
        self._unix_paths: List[str] = []
        self._ticker: Optional[asyncio.Task] = None
        self.control_address: Any = None
        self._held: Optional[List[Tuple[_DatagramEndpoint, bytes, Any]]] = None
        # send what the data plane has queued (socket mode batches worker messages)
        self._commit: Callable[[], None] = self.plane.commit

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
                self._legacy_endpoints.append(self._datagram_endpoint(
                    legacy, self.on_legacy, self.legacy.counters, "legacy.send_errors"))
        # the control socket opens last: once it answers a ping, every listener is up
        address = self.config.control_addr
        endpoint = self._datagram_endpoint(
            address, self.on_control, self.control.counters, "control.send_errors")
        self.control_address = (address if isinstance(address, str)
                                else endpoint.sock.getsockname()[:2])
        self._endpoint = endpoint
        self._ticker = loop.create_task(self._tick_loop())
        log.info("relay listening control=%s ports=%s mode=%s", self.config.control,
                 self.config.ports, self.config.mode)

    def _datagram_endpoint(self, address: Any, on_datagram: Any, counters: Counter,
                           send_error_counter: str) -> _DatagramEndpoint:
        if isinstance(address, str):
            self._claim_unix_path(address)
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            try:
                sock.bind(address)
                os.chmod(address, 0o660)
            except BaseException:
                sock.close()
                raise
        else:
            host, port = address
            sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET,
                                 socket.SOCK_DGRAM)
            try:
                sock.bind((host, port))
            except BaseException:
                sock.close()
                raise
        endpoint = _DatagramEndpoint(sock, on_datagram, counters, send_error_counter,
                                     (self._hold_replies, self._release_replies))
        endpoint.start(asyncio.get_running_loop())
        return endpoint

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
        if self._endpoint is not None:
            self._endpoint.close()
            self._endpoint = None
        for endpoint in self._legacy_endpoints:
            endpoint.close()
        self._legacy_endpoints = []
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
                    self._commit()
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

    def _send(self, endpoint: _DatagramEndpoint, reply: Optional[bytes], addr: Any) -> None:
        """Replies leave only after the data plane has what they announce (a client may send
        media the moment it reads the reply); within a burst of requests they wait, so the
        burst's worker messages leave as one batch."""
        if reply is None:
            return
        if self._held is not None:
            self._held.append((endpoint, reply, addr))
            return
        self._commit()
        endpoint.sendto(reply, addr)

    def _hold_replies(self) -> None:
        if self._held is None:
            self._held = []

    def _release_replies(self) -> None:
        held, self._held = self._held, None
        if held:
            self._commit()
            for endpoint, reply, addr in held:
                endpoint.sendto(reply, addr)

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
