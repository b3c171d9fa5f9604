"""The relay daemon: the asyncio shell that joins control sockets, engine, timer and data plane.

Sans-IO parts decide (`lrk.core.engine`, `lrk.control.*`); this file only moves bytes,
actions and events between them. One timer: armed at the earliest of the engine's
and the data plane's `get_timer()`. A reply leaves only once the data plane has what
it announces (`DataPlane.commit`); a failure the plane reports turns the reply into an
error and ends the session in the engine.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import platform
import signal
import socket
import stat
import time
from collections import Counter, deque
from typing import Any, Callable, Deque, Dict, List, Optional, Set, Tuple, Union

from fastpath import jit, logs
from fastpath.contract import Action, DataPlane, Event, PlaneFailure, Remove, SessionReport
from lrk import __version__
from lrk.control.allow import AllowList
from lrk.control.auth import relay_authenticator
from lrk.control.legacy import LegacyControl
from lrk.control.msgpack_proto import NEEDS_COUNTERS, MsgpackControl, Outcome, Request
from lrk.core.engine import Engine, EngineConfig
from lrk.core.persist import RECORD_VERSION, RecordError, from_record, owner_of, to_record
from lrk.core.session import Session
from lrk.daemon.config import Config
from lrk.daemon.kernel_plane import KernelPlane
from lrk.daemon.metrics import MetricsServer, NoMetrics, legacy_command, relay_snapshot
from lrk.daemon.nfqueue_plane import NfqueuePlane
from lrk.daemon.redis_store import RedisStore, open_session_store
from lrk.daemon.sdnotify import process_notifier
from lrk.daemon.socket_plane import SocketPlane
from lrk.daemon.store import SqliteStore
from lrk.daemon.takeover import Standby, Taken, session_media, take
from lrk.daemon.xdp_plane import XdpPlane
from lrk.errors import ConfigError, DescriptorsExhausted, LrkError

log = logging.getLogger("lrk.relay")
#: a restarted socket-mode relay waits at most this long for a killed predecessor's
#: worker to let go of a restored session's ports
RESTORE_PORT_WAIT = 3.0
#: the start and stop lines, shown whatever the log level (`fastpath.logs.setup`)
lifecycle = logging.getLogger("lrk.lifecycle")
MAX_LEGACY_STREAM = 8192
#: a reload's TTL rewrite of the stored calls: sessions a loop turn, and the pause between
TTL_CHUNK = 1000
TTL_PAUSE = 0.02
#: legacy UNIX stream connections served at once; more are closed unread (counted): each
#: holds a descriptor for up to two LEGACY_STREAM_TIMEOUTs
MAX_LEGACY_STREAMS = 64
LEGACY_STREAM_TIMEOUT = 2.0
READ_BURST = 64  # datagrams read per wake-up of a control socket
MAX_DATAGRAM = 65535
IP_FREEBIND = getattr(socket, "IP_FREEBIND", 15)  # Linux; binds an address not (yet) here


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
        on_datagram = self.on_datagram  # an attribute holding a callable: read it once
        for _ in range(READ_BURST):
            try:
                data, addr = recvfrom(MAX_DATAGRAM)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:  # an ICMP error for an earlier reply, queued on the socket
                self.counters[self.send_error_counter] += 1
                continue
            try:
                on_datagram(data, addr, self)
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


#: options a reload (SIGHUP, `ctl reload`) applies to a running relay; others need a restart
RELOADABLE = ("log_level", "log_format", "silence_timeout", "max_lifetime", "quarantine",
              "max_sessions", "control_allow", "legacy_allow", "legacy_takeover_idle",
              "legacy_timeout", "max_control_rate", "strict_source", "control_keys",
              "control_auth_window")


def _detach_xdp_leftovers(mode: str) -> None:
    """An xdp-mode run that kept its calls leaves its program attached for the next xdp
    run to replace; a relay started in another mode detaches it (it would take this
    relay's packets). A packet-mode run over AF_XDP that crashed leaves its steering
    program, detached whatever the mode (its sockets are gone). Without libbpf there is
    nothing of lrk's to find."""
    try:
        from fastpath.xdp.program import detach_leftovers
    except (ImportError, OSError, LrkError):
        return
    names = ("lrk_steer",) if mode == "xdp" else ("lrk_relay", "lrk_steer")
    try:
        found = detach_leftovers(names)
    except (OSError, LrkError) as exc:  # no libbpf.so: nothing of lrk's can be attached
        lifecycle.debug("xdp: leftovers not checked: %s", exc)
        return
    for where in found:
        lifecycle.warning("xdp: detached lrk's XDP program left on %s by an earlier run",
                          where)


#: a control request waiting to run: request, sender, endpoint, t0, its Call-ID (or None)
_Entry = Tuple[Request, Any, "_DatagramEndpoint", float, Optional[Union[str, bytes]]]


class _Waiting:
    """Control requests waiting to run (see `Relay.on_control`), in arrival order;
    `asked` once its refresh is asked for, `ready` once the counters are fresh."""

    __slots__ = ("items", "asked", "ready")

    def __init__(self, first: _Entry) -> None:
        self.items = [first]
        self.asked = False
        self.ready = False


class _Steps:
    """Clean-up steps that each run whatever the steps before them did: `with steps:`
    around each; `raise_first()` at the end raises the first error (later ones are
    logged), so it still reaches the caller and the exit status."""

    def __init__(self, what: str) -> None:
        self.what = what
        self.first: Optional[BaseException] = None

    def __enter__(self) -> _Steps:
        return self

    def __exit__(self, kind: Any, exc: Optional[BaseException], tb: Any) -> bool:
        if exc is None:
            return False
        if self.first is None:
            self.first = exc
        else:
            log.error("%s: a further step failed too", self.what, exc_info=exc)
        return True  # the next step runs

    def raise_first(self) -> None:
        first, self.first = self.first, None
        if first is not None:
            raise first


class Relay:
    """Owns the engine, the control endpoint and the data plane for one relay node."""

    def __init__(self, config: Config,
                 load_config: Optional[Callable[[], Config]] = None) -> None:
        self.config = config
        self.load_config = load_config
        start, end = config.port_range
        self.engine = Engine(EngineConfig(
            internal_ip=config.internal_ip,
            external_ip=config.external_ip or config.internal_ip,
            internal_ips=tuple(config.internal_ips),
            external_ips=tuple(config.external_ips),
            shared_ports=None,  # one space with one address per side, else per address
            port_start=start,
            port_end=end,
            silence_timeout=config.silence_timeout,
            max_lifetime=config.max_lifetime,
            quarantine=config.quarantine,
            max_sessions=config.max_sessions,
            strict_source=config.strict_source,
        ))
        relay_ips = config.relay_addresses
        self.plane: DataPlane
        # with a store, a restart adopts the kernel's table and flows (calls never pause)
        adopt = bool(config.state_dir) or config.store == "redis"
        if config.mode == "kernel":
            self.plane = KernelPlane(start, end, relay_ips, config.kernel_table,
                                     config.kernel_poll, counters=config.kernel_counters,
                                     adopt=adopt, extra=config.standby_media_ranges,
                                     mark_slots=config.mark_slots)
        elif config.mode == "xdp":
            self.plane = XdpPlane(start, end, relay_ips, config.xdp_interfaces,
                                  config.kernel_table, config.kernel_poll,
                                  counters=config.kernel_counters,
                                  attach_mode=config.xdp_attach,
                                  max_streams=config.xdp_max_streams, adopt=adopt,
                                  extra=config.standby_media_ranges,
                                  mark_slots=config.mark_slots)
        elif config.mode == "nfqueue":
            self.plane = NfqueuePlane(start, end, relay_ips, config.kernel_table,
                                      config.kernel_poll, config.nfqueue_num,
                                      config.nfqueue_bypass, adopt=adopt,
                                      extra=config.standby_media_ranges,
                                      mark_slots=config.mark_slots)
        else:
            socket_plane = SocketPlane(start, end, relay_ips, config.workers, config.batch,
                                       config.io, config.log_level, config.log_format,
                                       config.socket_rcvbuf,
                                       config.packet_interfaces if config.mode == "packet"
                                       else (), config.coalesce_us, config.relearn_after,
                                       standby_media=config.standby_media_ranges
                                       if config.mode == "packet" else (),
                                       pypy_jit=config.pypy_jit,
                                       packet_io=config.packet_io,
                                       af_xdp_checksum=config.af_xdp_checksum,
                                       af_xdp_ring=config.af_xdp_ring)
            self.engine.probe = socket_plane.probe  # ports are bound while allocating
            socket_plane.sockets_needed = 2 * self.engine.ports.total  # a socket a port
            self.plane = socket_plane
        self.plane.sink = self.on_plane_event
        self.control = MsgpackControl(
            self.engine,
            info={"mode": config.mode, "relay_version": __version__, "workers": config.workers},
            auth=relay_authenticator(config.control_auth, config.control_keys,
                                     config.control_auth_window),
            media_counters=self._extra_counters,
            started=time.monotonic(),
            allow=config.allow_set,
            rate=config.max_control_rate,
        )
        self.legacy = LegacyControl(self.engine, allow=config.legacy_allow_set,
                                    takeover_idle=config.legacy_takeover_idle,
                                    timeout=config.legacy_timeout,
                                    rate=config.max_control_rate)
        self.metrics: Any = NoMetrics()
        self._endpoint: Optional[_DatagramEndpoint] = None
        self._legacy_endpoints: List[_DatagramEndpoint] = []
        self._extra_endpoints: List[_DatagramEndpoint] = []
        self._legacy_servers: List[asyncio.AbstractServer] = []
        self._legacy_streams = 0  # legacy UNIX stream connections being served
        self._unix_paths: List[str] = []
        self.control_address: Any = None
        self._held: Optional[List[Tuple[_DatagramEndpoint, bytes, Any]]] = None
        #: requests waiting to run, in arrival order: each batch waits for one counter
        #: refresh (deletes, queries), and what arrives after it waits behind it
        self._batches: Deque[_Waiting] = deque()
        self._waiting_calls: Counter = Counter()  # Call-ID -> its requests waiting there
        self._timer: Optional[asyncio.TimerHandle] = None
        self._timer_at: Optional[float] = None
        self._expiring = False  # a refresh before expiry is under way
        self._stopping = False
        if load_config is not None:
            self.control.on_reload = self.reload
        #: sessions survive a restart when a state_dir (or store = "redis") is configured
        self.store: Optional[Union[SqliteStore, RedisStore]] = open_session_store(config)
        self.standby: Optional[Standby] = None
        if isinstance(self.store, RedisStore):
            self.store.source = self._records
            if config.standby_for:
                self.standby = Standby(self.store, config.standby_for, config.standby_poll)
        if config.standby_for and config.mode in ("kernel", "xdp", "nfqueue", "packet") and \
                not config.standby_media:
            log.warning("standby_for in %s mode without standby_media: the ruleset (packet "
                        "mode: the taps' filter) serves only this node's addresses and "
                        "ports, so the peers' calls are not relayed after a takeover "
                        "(docs/operations.md)", config.mode)
        self.control.on_takeover = self.take_over
        self.control.store_status = self._store_status
        self.end_calls = False  # `shutdown`: stop and end every call (store emptied)
        self._dirty: Dict[int, bool] = {}  # sid -> write (True) or delete, not yet stored
        #: sessions whose store keys a reload's longer TTL rewrites, TTL_CHUNK at a time
        self._ttl_rewrite: List[int] = []
        self._ttl_handle: Optional[asyncio.Handle] = None
        self.request_stop: Optional[Callable[[], None]] = None  # set by serve()
        self.control.on_shutdown = self.shutdown

    async def start(self) -> None:
        """Data plane, restore, listeners, metrics. A start that fails part of the way
        undoes what it did (`stop`: the plane's table, sysctls, programs and workers, the
        control sockets and their UNIX paths; restored calls stay in the store) and
        raises its own error."""
        self._loop = asyncio.get_running_loop()
        try:
            await self._start()
        except BaseException:
            try:
                await self.stop()
            except BaseException:
                log.exception("the clean-up after a failed start failed too")
            raise

    async def _start(self) -> None:
        loop = self._loop
        _detach_xdp_leftovers(self.config.mode)
        await self.plane.start()
        if self.store is not None:
            await self._restore()
        if isinstance(self.plane, (KernelPlane, XdpPlane)):
            self.plane.adopted()  # what no restored call claimed goes
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
        for extra in self.config.control_extra_addrs:  # e.g. on an address keepalived moves
            self._extra_endpoints.append(self._datagram_endpoint(
                extra, self.on_control, self.control.counters, "control.send_errors",
                freebind=True))
        self._endpoint = endpoint
        self._loop = loop
        if self.config.metrics_addr is not None:
            host, port = self.config.metrics_addr
            self.metrics = MetricsServer(host, port, self.metrics_snapshot, loop=loop)
            self.metrics.start()  # OSError if the port is taken, as for the control port
        self._rearm()
        cfg = self.engine.config
        mode = self.config.mode
        if mode == "packet":
            mode = f"packet({self.config.packet_io}:{','.join(self.config.packet_interfaces)})"
        lifecycle.info(
            "lrk %s serving: mode=%s control=%s legacy=%s media=%s ports=%d-%d workers=%s "
            "interpreter=%s",
            __version__, mode, _shown(self.control_address),
            ",".join(_shown(a) for a in self.config.legacy_addrs) or "off",
            ",".join(self.config.relay_addresses), cfg.port_start,
            cfg.port_end, self.config.workers if self.config.mode in ("socket", "packet")
            else "-", _interpreter())

    def _datagram_endpoint(self, address: Any, on_datagram: Any, counters: Counter,
                           send_error_counter: str, freebind: bool = False
                           ) -> _DatagramEndpoint:
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
                if freebind:  # the address may arrive later (keepalived moves it here)
                    sock.setsockopt(socket.IPPROTO_IP, IP_FREEBIND, 1)
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

    def reload(self) -> Tuple[List[str], List[str]]:
        """Re-read the configuration; apply what can change live (RELOADABLE) and name
        the rest. A bad file changes nothing (ConfigError propagates)."""
        assert self.load_config is not None
        fresh = self.load_config()
        old = self.config
        applied = [name for name in RELOADABLE if getattr(fresh, name) != getattr(old, name)]
        restart = [name for name in vars(fresh) if name not in RELOADABLE
                   and getattr(fresh, name) != getattr(old, name)]
        auth = self.control.auth
        if auth is not None and fresh.control_auth == "hmac":
            # key files are re-read every reload (rotation: add a key, later remove the
            # old one); the replay guard keeps what it has seen
            new_auth = relay_authenticator(fresh.control_auth, fresh.control_keys,
                                           fresh.control_auth_window)
            if new_auth is not None and _key_set(new_auth) != _key_set(auth):
                applied.append("keys")
            if new_auth is not None:
                new_auth.keep_guard(auth, time.time())
                self.control.auth = new_auth
        engine_cfg = self.engine.config
        engine_cfg.silence_timeout = fresh.silence_timeout  # new sessions; live ones keep
        engine_cfg.max_lifetime = fresh.max_lifetime
        engine_cfg.max_sessions = fresh.max_sessions
        engine_cfg.strict_source = fresh.strict_source
        self.engine.ports.quarantine = fresh.quarantine
        self.control.allow = AllowList(fresh.allow_set)
        self.control.limiter.reconfigure(fresh.max_control_rate)
        self.legacy.allow = AllowList(fresh.legacy_allow_set)
        self.legacy.limiter.reconfigure(fresh.max_control_rate)
        self.legacy.takeover_idle = fresh.legacy_takeover_idle
        self.legacy.timeout = fresh.legacy_timeout
        logs.setup(fresh.log_level, fresh.log_format)
        store = self.store
        ttl = store.ttl if isinstance(store, RedisStore) else None
        for name in RELOADABLE:
            setattr(old, name, getattr(fresh, name))  # the store's TTL reads these
        if isinstance(store, RedisStore) and ttl is not None and \
                (store.ttl is None or store.ttl > ttl):
            # a longer max_lifetime applies to live calls too: their keys, written with
            # the old TTL, would expire first (a restart would lose those calls). Rewritten
            # a chunk a loop turn: 100,000 in one script would stall the loop and time out
            self._ttl_rewrite = list(self.engine.by_sid)
            if self._ttl_handle is None:
                self._ttl_handle = self._loop.call_soon(self._rewrite_ttl_chunk)
        if restart:
            lifecycle.warning("reload: applied %s; changed but need a restart: %s",
                              ", ".join(applied) or "nothing", ", ".join(restart))
        else:
            lifecycle.info("reload: applied %s", ", ".join(applied) or "nothing (unchanged)")
        self._rearm()
        return applied, restart

    def metrics_snapshot(self) -> Dict[str, Any]:
        """What /metrics shows: the same counters as `stats`, plus sessions and ports."""
        return relay_snapshot(
            self.engine, self.config.mode,
            (self.control.counters, self.engine.counters, self._extra_counters()),
            started=self.control.started,
            workers=self.config.workers if self.config.mode in ("socket", "packet") else None)

    async def stop(self) -> None:
        """Listeners, then the calls (kept in the store, or ended), then the data plane
        and the store. Every step runs whatever the steps before it did (also after a
        start that failed part of the way); the first error is raised at the end."""
        self._stopping = True
        if self._ttl_handle is not None:
            self._ttl_handle.cancel()
            self._ttl_handle = None
        steps = _Steps("stop")
        with steps:
            self.metrics.stop()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        endpoints = [self._endpoint] if self._endpoint is not None else []
        endpoints += self._legacy_endpoints + self._extra_endpoints
        self._endpoint = None
        self._legacy_endpoints = []
        self._extra_endpoints = []
        for endpoint in endpoints:
            with steps:
                endpoint.close()
        servers, self._legacy_servers = self._legacy_servers, []
        for server in servers:
            with steps:
                server.close()
                await server.wait_closed()
        paths, self._unix_paths = self._unix_paths, []
        for path in paths:
            with contextlib.suppress(OSError):
                os.unlink(path)
        now = time.monotonic()
        actions: List[Action] = []
        if self.store is not None and not self.end_calls:
            # the calls outlive this process: their last counters into the store, then the
            # data plane lets go of them (the next start restores them)
            with steps:
                await self._refreshed()
            with steps:
                self._dirty = {sid: True for sid in self.engine.by_sid}
                self._flush_store()
            actions = [Remove(s.sid, s.call_id, "restart") for s in self.engine.sessions()]
            if actions and isinstance(self.store, RedisStore) and not self.store.up:
                lifecycle.warning("%d call(s) not written: the session store (Redis) is "
                                  "down; the next start cannot restore them (a standby "
                                  "has its copy)", len(actions))
            elif actions:
                lifecycle.info("%d call(s) kept in the session store for the next start",
                               len(actions))
        else:
            with steps:
                for session in list(self.engine.sessions()):
                    actions.extend(self.engine.delete(now, session.call_id,
                                                      reason="deleted")[1])
            if self.store is not None:
                with steps:
                    self.store.clear()
        with steps:
            self.plane.apply(actions)  # a failure here changes nothing: everything goes
        with steps:
            await self.plane.stop()
        if self.store is not None:
            with steps:
                self.store.close()
        steps.raise_first()

    def shutdown(self) -> None:
        """Stop, ending every call (`lrkproxy ctl shutdown`): nothing is kept."""
        self.end_calls = True
        if self.request_stop is not None:
            self._loop.call_soon(self.request_stop)

    async def _refreshed(self) -> None:
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(_future_of(self.plane.refresh), 2.0)

    # -- the session store -----------------------------------------------------------
    def _persist(self, actions: List[Action]) -> None:
        """Note what `actions` changed for the store; `_flush_store` writes it (one
        transaction per burst of requests) before any reply about it leaves."""
        if self.store is None or not actions:
            return
        dirty = self._dirty
        for action in actions:
            dirty[action.sid] = not isinstance(action, Remove)

    def _rewrite_ttl_chunk(self) -> None:
        """The next TTL_CHUNK sessions of a reload's TTL rewrite (see `reload`)."""
        self._ttl_handle = None
        if self._stopping or not self._ttl_rewrite:
            return
        chunk, self._ttl_rewrite = (self._ttl_rewrite[:TTL_CHUNK],
                                    self._ttl_rewrite[TTL_CHUNK:])
        by_sid = self.engine.by_sid
        self._dirty.update((sid, True) for sid in chunk if sid in by_sid)
        self._flush_store()
        if self._ttl_rewrite:
            self._ttl_handle = self._loop.call_later(TTL_PAUSE, self._rewrite_ttl_chunk)

    def _flush_store(self) -> None:
        store = self.store
        dirty = self._dirty
        if store is None or not dirty:
            return
        self._dirty = {}
        puts, deletes = self._records([sid for sid, live in dirty.items() if live])
        deletes.extend(sid for sid, live in dirty.items() if not live)
        if store.write(puts, deletes) is False:
            self._rearm()  # Redis is down: the store's catch-up timer

    def _records(self, sids: Optional[List[int]]) -> Tuple[list, List[int]]:
        """The store's view of `sids` now (None: every session): records of the live
        ones, and the ended ones to delete."""
        now, wall = time.monotonic(), time.time()
        owners = self.control.owners
        by_sid = self.engine.by_sid
        cfg = self.engine.config
        interfaces = (cfg.internal_ip, cfg.external_ip)
        puts = []
        deletes: List[int] = []
        for sid in (list(by_sid) if sids is None else sids):
            session = by_sid.get(sid)
            if session is None:
                deletes.append(sid)
            else:
                puts.append((sid, session.call_id,
                             to_record(session, now, wall, owners.get(sid), interfaces)))
        return puts, deletes

    async def _restore(self) -> None:
        """Take back the calls a previous run of this relay kept in the store."""
        assert self.store is not None
        records = self.store.load()
        restored = 0
        deadline = time.monotonic() + RESTORE_PORT_WAIT
        for sid, record in records:
            now, wall = time.monotonic(), time.time()
            try:
                session = from_record(record, now, wall)
            except RecordError as exc:
                self.engine.counters["sessions.restore_refused"] += 1
                version = record.get("v") if isinstance(record, dict) else None
                if type(version) is int and version > RECORD_VERSION:
                    # a newer lrk's call (a downgrade): left for it, not destroyed
                    log.error("session store: record %d is of a newer lrk (%s); left in "
                              "the store", sid, exc)
                    continue
                log.error("session store: record %d unreadable (%s); dropped", sid, exc)
                self.store.delete(sid)
                continue
            if isinstance(self.plane, SocketPlane):
                await self._claim_ports(session, deadline)
            # a call this node took over: its record names the peer's addresses, and its
            # ports lie in the peer's range (kept, as at the takeover)
            own = (self.engine.config.internal_ip, self.engine.config.external_ip)
            taken = session.interfaces is not None and tuple(session.interfaces) != own
            actions = self.engine.adopt(now, session, taken=taken)
            if not actions:
                log.error("session store: call %r not restored (its ports or Call-ID are "
                          "taken, or outside --ports)", session.call_id)
                self.store.delete(sid)
                self.plane.apply([])  # releases ports probed for it
                continue
            owner = owner_of(record)
            if owner is not None:
                self.control.owners[session.sid] = owner
            if not self._apply(actions):
                restored += 1
        self._flush_store()
        if records:
            lifecycle.info("restored %d of %d call(s) from %s", restored, len(records),
                           self.store.path)

    async def _claim_ports(self, session: Session, deadline: float) -> None:
        """Bind a restored session's ports (socket/packet mode), waiting (bounded) for a
        killed predecessor's worker to let go of them."""
        plane = self.plane
        assert isinstance(plane, SocketPlane)
        media = [m for leg in session.legs.values() for m in leg.media if m is not None]
        for fork in session.forks.values():
            media.extend(m for m in fork.a.media if m is not None)
        for m in media:
            while True:
                try:
                    if plane.probe(m.relay_ip, m.relay_port):
                        break
                except DescriptorsExhausted as exc:  # no room in the workers: not later
                    log.error("restore: call %r: %s", session.call_id, exc)
                    return  # the install fails and says so (bind_failed)
                if time.monotonic() >= deadline:
                    return  # the install fails and says so (bind_failed)
                await asyncio.sleep(0.05)

    def _extra_counters(self) -> Dict[str, int]:  # the plane's and the legacy protocol's
        counters = dict(self.plane.media_counters())
        counters.update(self.legacy.counters)
        if self.store is not None:
            counters.update(self.store.counters)
        if self.standby is not None:
            counters.update(self.standby.counters)
        return counters

    def _store_status(self) -> Optional[Dict[str, Any]]:
        """The `store` field of `stats`: which store, and whether it takes writes."""
        store = self.store
        if store is None:
            return None
        if isinstance(store, RedisStore):
            status: Dict[str, Any] = {"kind": "redis", "node": store.node,
                                      "state": "up" if store.up else "degraded",
                                      "pending": len(store.pending)}
            if self.standby is not None:
                status["standby_for"] = {p: len(c) for p, c in self.standby.copies.items()}
            return status
        return {"kind": "sqlite", "state": "up" if store.up else "degraded"}

    # -- standby: taking a dead peer's calls over ------------------------------------
    def take_over(self, peer: str, only: Optional[Set[str]] = None) -> Dict[str, Any]:
        """Adopt every session of node `peer` (its addresses must be local now: that is
        what keepalived moved; `only`: just those on these addresses): same relay
        addresses and ports, counters continued, the records moved to this node's keys.
        The reply leaves after the data plane has them (as any reply)."""
        store = self.store
        if not isinstance(store, RedisStore):
            raise ConfigError("takeover needs store = \"redis\" (the peers' sessions are "
                              "in the shared Redis)")
        if peer == store.node:
            raise ConfigError(f"{peer!r} is this node")
        standby = self.standby
        if standby is None:  # an operator's takeover of a node not in standby_for
            standby = Standby(store, [peer])
        elif peer not in standby.peers:
            standby.peers.append(peer)
            standby.copies[peer] = {}
            standby.gens[peer] = None
        records = standby.records(peer)
        taken = take(peer, records, time.monotonic(), time.time(), self._adopt_foreign,
                     only)
        self._taken(store, standby, taken)
        return taken.summary()

    def _adopt_foreign(self, session: Session, record: Any) -> bool:
        now = time.monotonic()
        if isinstance(self.plane, SocketPlane):
            for ip, port in session_media(session):
                try:
                    bound = self.plane.probe(ip, port)
                except DescriptorsExhausted as exc:
                    log.error("takeover: call %r: %s", session.call_id, exc)
                    bound = False
                else:
                    if not bound:
                        log.error("takeover: call %r: %s port %d cannot be bound here (the "
                                  "address is not local, or the port is taken)",
                                  session.call_id, ip, port)
                if not bound:
                    self.plane.apply([])  # lets go of the ports probed for it
                    return False
        actions = self.engine.adopt(now, session, foreign=True)
        if not actions:
            self.plane.apply([])
            return False
        owner = owner_of(record)
        if owner is not None:  # its control client may go on steering it
            self.control.owners[session.sid] = owner
        return not self._apply(actions)

    def _taken(self, store: RedisStore, standby: Standby, taken: Taken) -> None:
        """Move the adopted records to this node's keys (one transaction)."""
        puts, _ = self._records([s.sid for s in taken.adopted])
        store.write(puts, [], [(taken.peer, sid) for sid in taken.moved])
        for sid in taken.moved.values():
            self._dirty.pop(sid, None)  # written just now
        standby.forget(taken.peer, list(taken.moved) + list(taken.refused))
        counters = standby.counters
        counters["takeover.runs"] += 1
        counters["takeover.sessions"] += len(taken.adopted)
        counters["takeover.refused"] += len(taken.refused)
        lifecycle.warning("took over %d call(s) of node %s (%d refused)", len(taken.adopted),
                          taken.peer, len(taken.refused))

    # -- legacy protocol ---------------------------------------------------------------
    def on_legacy(self, data: bytes, addr: Any, endpoint: _DatagramEndpoint) -> None:
        t0 = time.perf_counter()
        outcome = self.legacy.handle(data, addr, time.monotonic())
        if self._apply(outcome.actions):
            self.legacy.plane_failed(data, addr)
            return
        self._send(endpoint, outcome.reply, addr)
        cmd = legacy_command(data)
        if cmd and outcome.reply is not None:
            self.metrics.observe_request("legacy", cmd, time.perf_counter() - t0)

    async def _legacy_stream(self, reader: asyncio.StreamReader,
                             writer: asyncio.StreamWriter) -> None:
        """One request per connection, without a cookie, as the module's unix: mode does;
        at most MAX_LEGACY_STREAMS at once (a local client opening thousands must not run
        the relay out of descriptors)."""
        if self._legacy_streams >= MAX_LEGACY_STREAMS:
            self.legacy.counters["legacy.dropped.too_many_streams"] += 1
            writer.close()
            return
        self._legacy_streams += 1
        try:
            data = await asyncio.wait_for(reader.read(MAX_LEGACY_STREAM), LEGACY_STREAM_TIMEOUT)
            if data:
                outcome = self.legacy.handle(data, "unix", time.monotonic(), with_cookie=False)
                if self._apply(outcome.actions):
                    self.legacy.plane_failed(data, "unix", with_cookie=False)
                elif outcome.reply is not None:
                    await self._committed()
                    writer.write(outcome.reply)
                    await asyncio.wait_for(writer.drain(), LEGACY_STREAM_TIMEOUT)
        except (asyncio.TimeoutError, OSError):
            self.legacy.counters["legacy.dropped.stream_timeout"] += 1
        finally:
            self._legacy_streams -= 1
            writer.close()

    # -- control ---------------------------------------------------------------------
    def on_control(self, data: bytes, addr: Any, endpoint: _DatagramEndpoint) -> None:
        t0 = time.perf_counter()
        received = self.control.receive(data, addr, time.monotonic())
        if isinstance(received, Outcome):
            self._send(endpoint, received.reply, addr)
            return
        needs = received.cmd in NEEDS_COUNTERS
        batches = self._batches
        call = received.args.get("call_id")
        if type(call) is not str and type(call) is not bytes:
            call = None  # not a Call-ID (the request fails when it runs): no order to keep
        if not needs and (not batches or call not in self._waiting_calls):
            self._finish(received, addr, endpoint, t0)  # nothing before it on its call
            return
        # a call's requests run in arrival order: one that needs fresh counters waits for
        # a refresh asked after it arrived; any other request of a call with a request
        # waiting (a retried INVITE's offer after its delete) waits behind that one
        entry = (received, addr, endpoint, t0, call)
        if call is not None:
            self._waiting_calls[call] += 1
        last = batches[-1] if batches else None
        if last is not None and (not last.asked or not needs):
            last.items.append(entry)
            return
        batch = _Waiting(entry)
        batches.append(batch)
        if self._held is None:  # outside a burst: ask now (in a burst: at its end)
            self._ask(batch)

    def _ask(self, batch: _Waiting) -> None:
        """One refresh for the batch; a plane that cannot refresh still has it run."""
        batch.asked = True
        try:
            self.plane.refresh(lambda: self._batch_refreshed(batch))
        except Exception:
            log.exception("counter refresh failed: %d request(s) run on the counters at "
                          "hand", len(batch.items))
            self.control.counters["control.internal_errors"] += 1
            self._batch_refreshed(batch)

    def _batch_refreshed(self, batch: _Waiting) -> None:
        """A batch's counters are fresh: it runs, with every ready batch behind it, as one
        burst (their data-plane messages, a delete's removes, leave as one message, then
        the replies). A batch whose refresh came early waits for those before it."""
        if batch.ready:
            return
        batch.ready = True
        outer = self._held is not None
        if not outer:
            self._hold_replies()
        try:
            batches = self._batches
            waiting = self._waiting_calls
            while batches and batches[0].ready:
                for request, addr, endpoint, t0, call in batches.popleft().items:
                    if call is not None:
                        waiting[call] -= 1
                        if waiting[call] <= 0:
                            del waiting[call]
                    try:
                        self._finish(request, addr, endpoint, t0)
                    except Exception:  # one request's failure never strands the others
                        log.exception("control request %s from %s failed", request.cmd, addr)
                        self.control.counters["control.internal_errors"] += 1
        finally:
            if not outer:
                self._release_replies()

    def _finish(self, request: Request, addr: Any, endpoint: _DatagramEndpoint,
                t0: float) -> None:
        now = time.monotonic()
        outcome = self.control.execute(request, now)
        failures = self._apply(outcome.actions)
        reply = outcome.reply
        if failures:
            reply = self.control.plane_failed(request, failures[0].detail, now).reply
        self._send(endpoint, reply, addr)
        self.metrics.observe_request("msgpack", request.cmd, time.perf_counter() - t0)

    # -- data plane ------------------------------------------------------------------
    def _apply(self, actions: List[Action]) -> List[PlaneFailure]:
        """Apply actions; what the plane refuses ends its session in the engine (and the
        Remove that follows is applied too). Returns the failures."""
        if not actions:
            return []
        failures = self.plane.apply(actions)
        if self.store is not None:
            self._persist(actions)
        if failures:
            now = time.monotonic()
            ends: List[Action] = []
            for failure in failures:
                log.error("session %d failed in the data plane (%s): %s", failure.sid,
                          failure.reason, failure.detail)
                ends.extend(self.engine.fail(now, failure))
            self.plane.apply(ends)
            self._persist(ends)
        else:
            for action in actions:
                if type(action) is not Remove:
                    break
            else:  # an ended call only makes deadlines later: the timer stands
                return failures
        self._rearm()
        return failures

    def on_plane_event(self, event: Event) -> None:
        """What the data plane observed: reports fold into sessions; a failure ends one."""
        if isinstance(event, PlaneFailure):
            log.error("session %d failed in the data plane (%s): %s", event.sid, event.reason,
                      event.detail)
        latches = None
        if self.store is not None and isinstance(event, SessionReport):
            latches = _latches(self.engine.by_sid.get(event.sid))
        actions = self.engine.handle_event(time.monotonic(), event)
        if actions:
            self._apply(actions)
        elif latches is not None:
            session = self.engine.by_sid.get(event.sid)  # type: ignore[union-attr]
            if session is not None and _latches(session) != latches:
                self._dirty[session.sid] = True  # a peer (re)latched
                self._flush_store()

    def _send(self, endpoint: _DatagramEndpoint, reply: Optional[bytes], addr: Any) -> None:
        """Replies leave only after the data plane has what they announce (a client may send
        media the moment it reads the reply); within a burst of requests they wait, so the
        burst's worker messages leave as one batch."""
        if reply is None:
            return
        if self._held is not None:
            self._held.append((endpoint, reply, addr))
            return
        if self._dirty:
            self._flush_store()
        self.plane.commit(lambda: endpoint.sendto(reply, addr))

    async def _committed(self) -> None:
        self._flush_store()
        await _future_of(self.plane.commit)

    def _hold_replies(self) -> None:
        if self._held is None:
            self._held = []

    def _release_replies(self) -> None:
        for batch in list(self._batches):  # this burst's: asked before the commit, so its
            if not batch.asked:             # messages and the refresh leave as one batch
                self._ask(batch)
        held, self._held = self._held, None
        if self._dirty:
            self._flush_store()
        if held:
            def send_all() -> None:
                for endpoint, reply, addr in held:
                    endpoint.sendto(reply, addr)

            self.plane.commit(send_all)

    # -- the timer -------------------------------------------------------------------
    def next_deadline(self) -> Optional[float]:
        """The earliest of the engine's and the data plane's deadlines (monotonic)."""
        times = [t for t in (self.engine.get_timer(), self.plane.get_timer(),
                             *(side.get_timer() for side in self._sides()))
                 if t is not None]
        return min(times) if times else None

    def _rearm(self) -> None:
        """Arm the one timer at the earliest deadline, unless it is armed earlier already
        (it then re-arms when it fires)."""
        if self._stopping or self._expiring:
            return
        armed = self._timer_at
        if armed is not None and self._armed_early_enough(armed):
            return
        at = self.next_deadline()
        if at is None or (self._timer_at is not None and self._timer_at <= at):
            return
        if self._timer is not None:
            self._timer.cancel()
        self._timer_at = at
        self._timer = self._loop.call_later(max(0.0, at - time.monotonic()), self._on_timer)

    def _armed_early_enough(self, armed: float) -> bool:
        """Whether nothing is due before `armed` (what `_rearm` asks after every request),
        from the engine's O(1) lower bound: a new call's deadline is later than the armed
        one, so the engine's heap is not cleaned up once per request (it is when the
        timer fires)."""
        floor = self.engine.timer_floor()
        if floor is not None and floor < armed:
            return False
        at = self.plane.get_timer()
        if at is not None and at < armed:
            return False
        if self.store is None and self.standby is None:
            return True
        for side in self._sides():
            at = side.get_timer()
            if at is not None and at < armed:
                return False
        return True

    def _on_timer(self) -> None:
        self._timer = None
        self._timer_at = None
        try:
            now = time.monotonic()
            self.plane.handle_timer(now)
            self._side_timers(now)
            if self.engine.due(now):
                # fresh last-media times before ending anything
                self._expiring = True
                self.plane.refresh(self._expire)
                return
        except Exception:  # the timer must survive anything: it ends every call
            log.exception("timer failed")
        self._rearm()

    def _sides(self) -> List[Any]:
        """The store (catching up after Redis was down) and the standby: on the timer."""
        return [side for side in (self.store, self.standby)
                if side is not None and hasattr(side, "get_timer")]

    def _side_timers(self, now: float) -> None:
        if isinstance(self.store, RedisStore):
            self.store.handle_timer(now)
        if self.standby is not None:
            due = self.standby.handle_timer(now)
            if due is not None:
                peer, here = due
                lifecycle.warning("%s of node %s's calls is local now: taking them over",
                                  ", ".join(sorted(here)), peer)
                self.take_over(peer, here)

    def _expire(self) -> None:
        self._expiring = False
        if self._stopping:
            return
        try:
            actions = self.engine.handle_timer(time.monotonic())
            for action in actions:
                log.info("session %s ended: %s", action.call_id, action.reason)
            self.plane.apply(actions)
            self._persist(actions)
            self._flush_store()
        except Exception:
            log.exception("expiry failed")
        self._rearm()

    async def tick(self) -> None:
        """Run what is due now (tests and tools; the daemon runs on its timer)."""
        done = asyncio.get_running_loop().create_future()
        now = time.monotonic()
        self.plane.handle_timer(now)
        if not self.engine.due(now):
            return

        def expire() -> None:
            actions = self.engine.handle_timer(time.monotonic())
            self.plane.apply(actions)
            self._persist(actions)
            self._flush_store()
            done.set_result(None)

        self.plane.refresh(expire)
        await done
        self._rearm()


def _key_set(auth: Any) -> set:
    """What a reload compares: each key's id, secret and rights."""
    return {(k.id, k.secret, k.admin, k.owner) for k in auth.keys.values()}


def _interpreter() -> str:
    """For the start line: PyPy with the GC nursery it started with, or CPython."""
    if platform.python_implementation() == "PyPy":
        return f"pypy(gc_nursery={jit.gc_nursery()})"
    return "cpython"


def _shown(address: Any) -> str:
    if isinstance(address, str):
        return f"unix:{address}"
    host, port = address[0], address[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _future_of(register: Callable[[Callable[[], None]], None]) -> asyncio.Future:
    """A future that is done once the callback handed to `register` (the plane's
    `commit` or `refresh`) has run."""
    done = asyncio.get_running_loop().create_future()
    register(lambda: done.done() or done.set_result(None))
    return done


def _latches(session: Optional[Session]) -> Optional[tuple]:
    """Every latched peer of a session (a change is written to the store)."""
    if session is None:
        return None
    return tuple((m.latched, m.rtcp_latched) for leg in session.legs.values()
                 for m in leg.media if m is not None)


async def serve(config: Config, stop_event: asyncio.Event,
                why: Optional[Callable[[], str]] = None,
                load_config: Optional[Callable[[], Config]] = None) -> None:
    """Run a relay until `stop_event`; SIGINT/SIGTERM set it (the reason is logged),
    SIGHUP reloads through `load_config` (when given)."""
    relay = Relay(config, load_config)
    relay.request_stop = stop_event.set
    await relay.start()  # a start that fails undoes itself (Relay.start) and raises
    if hasattr(gc, "freeze"):  # CPython: start-up's objects stay out of every GC pass
        gc.collect()
        gc.freeze()
    notifier = process_notifier()
    notifier.ready(f"serving: mode={config.mode} control={_shown(relay.control_address)}")
    signals: List[str] = []
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        def on_signal(sig: signal.Signals = sig) -> None:
            signals.append(f"signal {sig.name}")
            stop_event.set()

        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            loop.add_signal_handler(sig, on_signal)  # not in the main thread: the caller's
    if load_config is not None:
        def on_hup() -> None:
            notifier.reloading("reloading the configuration")
            try:
                relay.reload()
            except ConfigError as exc:
                lifecycle.error("reload: configuration not applied: %s", exc)
            notifier.ready("running")

        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            loop.add_signal_handler(signal.SIGHUP, on_hup)
    if why is None:
        def why() -> str:
            if relay.end_calls:
                return "shutdown requested over the control protocol: every call ended"
            return signals[0] if signals else "stop requested"
    reason = "stopped"
    try:
        await stop_event.wait()
        reason = why() if why is not None else "stop requested"
    except BaseException as exc:
        reason = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        raise
    finally:
        notifier.stopping(f"stopping: {reason}")
        sessions = len(relay.engine.by_call)
        try:
            await relay.stop()  # its error (a table or flows left behind) exits non-zero
        finally:
            lifecycle.info("lrk stopped: %s (%d sessions ended)", reason, sessions)
