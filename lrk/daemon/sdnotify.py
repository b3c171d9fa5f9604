"""systemd's service notification protocol (sd_notify(3)), without libsystemd.

systemd passes a UNIX datagram socket in `NOTIFY_SOCKET` (a path, or `@name` for an
abstract socket) to a `Type=notify` service; the service sends newline-separated
`KEY=VALUE` assignments there: `READY=1` once it serves, `RELOADING=1` / `STOPPING=1`
around a reload or a stop, `WATCHDOG=1` at least every `WATCHDOG_USEC` microseconds when
the unit has `WatchdogSec=`, and `STATUS=...` for `systemctl status`.

Without `NOTIFY_SOCKET` (not started by systemd) every call is a no-op that returns False.
A notification never raises: a full or vanished socket is logged once and reported as
False, so the daemon runs on whatever systemd does.

Usage (one instance per process, see `process_notifier`)::

    notifier = process_notifier()
    ...                                   # bind sockets, start workers
    notifier.ready("control 127.0.0.1:22222, 0 sessions")
    interval = notifier.watchdog_interval()
    if interval:                          # ping from the event loop: a hung loop stops pinging
        task = asyncio.ensure_future(notifier.run_watchdog())
    ...
    notifier.stopping()
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from typing import Callable, MutableMapping, Optional

log = logging.getLogger("lrk.sdnotify")

ENV_SOCKET = "NOTIFY_SOCKET"
ENV_WATCHDOG_USEC = "WATCHDOG_USEC"
ENV_WATCHDOG_PID = "WATCHDOG_PID"
#: systemd reads STATUS= lines of any length, but a datagram must fit the socket buffer
MAX_STATUS = 1024


class Notifier:
    """Sends notifications to the socket named by `NOTIFY_SOCKET` in `environ`.

    `unset_environment=True` removes NOTIFY_SOCKET, WATCHDOG_USEC and WATCHDOG_PID from
    `environ` once read, so child processes (the relay's workers) neither inherit nor use
    them. `monotonic` is the clock of RELOADING's MONOTONIC_USEC (tests pass a fixed one).
    """

    def __init__(self, environ: Optional[MutableMapping[str, str]] = None,
                 unset_environment: bool = False,
                 monotonic: Callable[[], float] = time.monotonic) -> None:
        env = os.environ if environ is None else environ
        self._monotonic = monotonic
        self._sock: Optional[socket.socket] = None
        self._warned = False
        self.address = _socket_address(env.get(ENV_SOCKET, ""))
        self._watchdog_usec = _watchdog_usec(env)
        if unset_environment:
            for name in (ENV_SOCKET, ENV_WATCHDOG_USEC, ENV_WATCHDOG_PID):
                env.pop(name, None)

    @property
    def enabled(self) -> bool:
        """Whether systemd listens (NOTIFY_SOCKET was set)."""
        return self.address is not None

    # -- the protocol ------------------------------------------------------------------
    def notify(self, *assignments: str) -> bool:
        """Send `KEY=VALUE` assignments as one datagram; True when it was sent."""
        if self.address is None:
            return False
        data = "\n".join(assignments).encode("utf-8", "replace")
        try:
            if self._sock is None:
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
                sock.setblocking(False)  # a stuck manager never stalls the event loop
                self._sock = sock
            self._sock.sendto(data, self.address)
        except OSError as exc:
            if not self._warned:
                self._warned = True
                log.warning("systemd notification to %s failed: %s (further failures are "
                            "not logged)", _printable(self.address), exc)
            return False
        return True

    def ready(self, status: Optional[str] = None) -> bool:
        """Startup (or a reload) is complete: `systemctl start` returns now."""
        return self.notify("READY=1", *self._status(status))

    def reloading(self, status: Optional[str] = None) -> bool:
        """A reload begins; send `ready()` when it is done. MONOTONIC_USEC is what
        `Type=notify-reload` (systemd 253+) needs; older managers ignore it."""
        usec = int(self._monotonic() * 1_000_000)
        return self.notify("RELOADING=1", f"MONOTONIC_USEC={usec}", *self._status(status))

    def stopping(self, status: Optional[str] = None) -> bool:
        """Shutdown begins (sessions are being ended)."""
        return self.notify("STOPPING=1", *self._status(status))

    def status(self, text: str) -> bool:
        """A one-line status for `systemctl status`."""
        return self.notify(*self._status(text))

    def watchdog(self) -> bool:
        """Keep-alive: due at least every `watchdog_interval()` seconds."""
        return self.notify("WATCHDOG=1")

    def watchdog_interval(self) -> Optional[float]:
        """systemd's watchdog timeout in seconds (`WatchdogSec=`), or None when there is
        none or it is meant for another process (WATCHDOG_PID). Ping at half of it."""
        if self._watchdog_usec is None or self.address is None:
            return None
        return self._watchdog_usec / 1_000_000

    async def run_watchdog(self) -> None:
        """Ping every half watchdog interval until cancelled; returns at once without one.
        Run it as a task on the relay's event loop, so a stalled loop stops the pings and
        systemd restarts the relay."""
        interval = self.watchdog_interval()
        if interval is None:
            return
        while True:
            self.watchdog()
            await asyncio.sleep(interval / 2)

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    @staticmethod
    def _status(text: Optional[str]):
        if text is None:
            return ()
        line = " ".join(str(text).split())  # one line: systemd splits assignments at \n
        return (f"STATUS={line[:MAX_STATUS]}",)


_process_notifier: Optional[Notifier] = None


def process_notifier() -> Notifier:
    """The process's notifier: made on first use from os.environ, which it then clears of
    the notification variables so that worker processes started later do not inherit
    them. The command line and the relay share this one instance."""
    global _process_notifier
    if _process_notifier is None:
        _process_notifier = Notifier(unset_environment=True)
    return _process_notifier


def _socket_address(value: str) -> Optional[str]:
    """NOTIFY_SOCKET as an AF_UNIX address: `@name` is the abstract socket `\\0name`.
    Anything else than an absolute path or `@name` (e.g. systemd 253's vsock:) is ignored."""
    if value.startswith("@") and len(value) > 1:
        return "\0" + value[1:]
    if value.startswith("/"):
        return value
    if value:
        log.warning("NOTIFY_SOCKET=%r is not a UNIX socket path; notifications are off", value)
    return None


def _watchdog_usec(env: MutableMapping[str, str]) -> Optional[int]:
    text = env.get(ENV_WATCHDOG_USEC, "")
    pid = env.get(ENV_WATCHDOG_PID, "")
    if not text:
        return None
    if pid and pid != str(os.getpid()):
        return None  # the manager watches another process (e.g. our parent)
    try:
        usec = int(text)
    except ValueError:
        log.warning("WATCHDOG_USEC=%r is not a number; the watchdog is off", text)
        return None
    return usec if usec > 0 else None


def _printable(address: str) -> str:
    return "@" + address[1:] if address.startswith("\0") else address


__all__ = ["Notifier", "process_notifier"]
