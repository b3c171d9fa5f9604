"""Unit tests of lrk.daemon.sdnotify against a NOTIFY_SOCKET the test binds, and of the
SIGHUP reload of `lrkproxy run` that notifies around it."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import uuid

import pytest

from lrk import cli
from lrk.daemon import sdnotify
from lrk.daemon.config import load
from lrk.daemon.sdnotify import Notifier

RECV_TIMEOUT = 5.0  # a datagram already sent arrives at once; this only bounds a failure


@pytest.fixture
def listener(tmp_path):
    """A UNIX datagram socket standing in for systemd's; yields (socket, NOTIFY_SOCKET)."""
    path = str(tmp_path / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(RECV_TIMEOUT)
    yield sock, path
    sock.close()


@pytest.fixture
def abstract_listener():
    name = f"lrk-test-{uuid.uuid4().hex}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind("\0" + name)
    sock.settimeout(RECV_TIMEOUT)
    yield sock, "@" + name
    sock.close()


def pending(sock):
    """Datagrams queued on `sock` right now (none is an empty list)."""
    out = []
    sock.setblocking(False)
    try:
        while True:
            out.append(sock.recv(4096))
    except BlockingIOError:
        return out
    finally:
        sock.settimeout(RECV_TIMEOUT)


def test_every_notification_is_one_exact_datagram(listener):
    sock, path = listener
    n = Notifier({"NOTIFY_SOCKET": path}, monotonic=lambda: 12.3456789)
    assert n.enabled
    assert n.ready() is True
    assert sock.recv(4096) == b"READY=1"
    assert n.ready("serving 2 sessions") is True
    assert sock.recv(4096) == b"READY=1\nSTATUS=serving 2 sessions"
    assert n.reloading() is True
    assert sock.recv(4096) == b"RELOADING=1\nMONOTONIC_USEC=12345678"
    assert n.reloading("re-reading lrk.toml")
    assert sock.recv(4096) == b"RELOADING=1\nMONOTONIC_USEC=12345678\nSTATUS=re-reading lrk.toml"
    assert n.stopping() is True
    assert sock.recv(4096) == b"STOPPING=1"
    assert n.stopping("ending 3 sessions")
    assert sock.recv(4096) == b"STOPPING=1\nSTATUS=ending 3 sessions"
    assert n.watchdog() is True
    assert sock.recv(4096) == b"WATCHDOG=1"
    assert n.status("a\nmulti-line\tstatus") is True
    assert sock.recv(4096) == b"STATUS=a multi-line status"
    assert n.notify("FDSTORE=1", "FDNAME=x") is True
    assert sock.recv(4096) == b"FDSTORE=1\nFDNAME=x"
    assert pending(sock) == []
    n.close()


def test_status_is_bounded_and_utf8(listener):
    sock, path = listener
    n = Notifier({"NOTIFY_SOCKET": path})
    n.status("é" * 5000)
    assert sock.recv(8192) == ("STATUS=" + "é" * sdnotify.MAX_STATUS).encode()


def test_abstract_socket(abstract_listener):
    sock, name = abstract_listener
    n = Notifier({"NOTIFY_SOCKET": name})
    assert n.address == "\0" + name[1:]
    assert n.ready("up")
    assert sock.recv(4096) == b"READY=1\nSTATUS=up"


@pytest.mark.parametrize("env", [{}, {"NOTIFY_SOCKET": ""}, {"NOTIFY_SOCKET": "@"},
                                 {"NOTIFY_SOCKET": "relative/path"},
                                 {"NOTIFY_SOCKET": "vsock:2:1234"}])
def test_no_socket_is_a_no_op(env):
    n = Notifier(dict(env, WATCHDOG_USEC="30000000"))
    assert not n.enabled
    assert n.ready("x") is False
    assert n.stopping() is False
    assert n.reloading() is False
    assert n.watchdog() is False
    assert n.watchdog_interval() is None
    asyncio.run(asyncio.wait_for(n.run_watchdog(), 5.0))  # returns at once


def test_vanished_socket_returns_false_and_never_raises(tmp_path, listener, caplog):
    sock, path = listener
    n = Notifier({"NOTIFY_SOCKET": str(tmp_path / "gone.sock")})
    assert n.enabled
    assert n.ready() is False
    assert n.watchdog() is False
    warnings = [r for r in caplog.records if r.name == "lrk.sdnotify"]
    assert len(warnings) == 1 and "gone.sock" in warnings[0].getMessage()


def test_watchdog_interval():
    pid = str(os.getpid())
    base = {"NOTIFY_SOCKET": "/run/systemd/notify"}
    assert Notifier(dict(base, WATCHDOG_USEC="30000000")).watchdog_interval() == 30.0
    assert Notifier(dict(base, WATCHDOG_USEC="500000", WATCHDOG_PID=pid)
                    ).watchdog_interval() == 0.5
    assert Notifier(dict(base, WATCHDOG_USEC="500000", WATCHDOG_PID="1")
                    ).watchdog_interval() is None  # meant for another process
    assert Notifier(dict(base)).watchdog_interval() is None
    assert Notifier(dict(base, WATCHDOG_USEC="0")).watchdog_interval() is None
    assert Notifier(dict(base, WATCHDOG_USEC="soon")).watchdog_interval() is None


def test_unset_environment():
    env = {"NOTIFY_SOCKET": "/run/systemd/notify", "WATCHDOG_USEC": "1000000",
           "WATCHDOG_PID": str(os.getpid()), "OTHER": "kept"}
    n = Notifier(env, unset_environment=True)
    assert env == {"OTHER": "kept"}
    assert n.enabled and n.watchdog_interval() == 1.0  # read before removal
    env2 = {"NOTIFY_SOCKET": "/run/systemd/notify"}
    Notifier(env2)
    assert env2 == {"NOTIFY_SOCKET": "/run/systemd/notify"}


def test_run_watchdog_pings_until_cancelled(listener):
    sock, path = listener
    n = Notifier({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "20000"})  # ping every 10 ms

    async def main():
        task = asyncio.ensure_future(n.run_watchdog())
        loop = asyncio.get_running_loop()
        got = []
        for _ in range(3):  # each recv is bounded by the socket timeout
            got.append(await loop.run_in_executor(None, sock.recv, 4096))
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return got

    assert asyncio.run(main()) == [b"WATCHDOG=1"] * 3


def test_process_notifier_is_shared_and_clears_the_environment(monkeypatch, listener):
    sock, path = listener
    monkeypatch.setattr(sdnotify, "_process_notifier", None)
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    monkeypatch.setenv("WATCHDOG_USEC", "4000000")
    first = sdnotify.process_notifier()
    assert sdnotify.process_notifier() is first
    assert "NOTIFY_SOCKET" not in os.environ and "WATCHDOG_USEC" not in os.environ
    assert first.watchdog_interval() == 4.0
    first.ready()
    assert sock.recv(4096) == b"READY=1"
    first.close()


# -- SIGHUP: lrkproxy run re-reads its configuration -------------------------------------
class Recorder:
    def __init__(self):
        self.sent = []

    def reloading(self, status=None):
        self.sent.append(("RELOADING", status))

    def ready(self, status=None):
        self.sent.append(("READY", status))


@pytest.fixture(autouse=True)
def lrk_logging():
    """_reload calls logs.setup, which rewires the "lrk" logger: put it back afterwards."""
    root, lifecycle = logging.getLogger("lrk"), logging.getLogger("lrk.lifecycle")
    saved = (root.handlers[:], root.level, root.propagate, lifecycle.level)
    yield
    root.handlers[:], root.level, root.propagate, lifecycle.level = (
        saved[0], saved[1], saved[2], saved[3])


def run_args(path):
    return cli.build_parser().parse_args(["run", "--config", path])


def test_reload_applies_log_settings_and_names_the_rest(tmp_path, capsys):
    path = tmp_path / "lrk.toml"
    path.write_text('ports = "31000-31999"\nlog_level = "warning"\n')
    args = run_args(str(path))
    config = load(str(path), cli._overrides(args))
    path.write_text('ports = "32000-32999"\nlog_level = "debug"\nlog_format = "json"\n')
    notifier = Recorder()
    cli._reload(args, config, notifier)
    assert config.log_level == "debug" and config.log_format == "json"
    assert config.ports == "31000-31999"  # takes a restart
    assert notifier.sent == [("RELOADING", "reloading the configuration"),
                             ("READY", "running")]
    root = logging.getLogger("lrk")
    assert root.level == logging.DEBUG
    assert type(root.handlers[0].formatter).__name__ == "JsonFormatter"
    err = capsys.readouterr().err  # the log, now JSON on stderr
    assert '"msg": "reload: log settings applied; ports changed and take a restart"' in err


def test_reload_with_a_bad_file_changes_nothing(tmp_path):
    path = tmp_path / "lrk.toml"
    path.write_text('log_level = "info"\n')
    args = run_args(str(path))
    config = load(str(path), cli._overrides(args))
    path.write_text('log_level = "loud"\n')
    notifier = Recorder()
    cli._reload(args, config, notifier)
    assert config.log_level == "info"
    assert notifier.sent == [("RELOADING", "reloading the configuration"),
                             ("READY", "reload failed, running with the previous configuration")]


def test_reload_datagrams(tmp_path, listener):
    sock, notify_path = listener
    path = tmp_path / "lrk.toml"
    path.write_text("")
    args = run_args(str(path))
    config = load(str(path), cli._overrides(args))
    n = Notifier({"NOTIFY_SOCKET": notify_path}, monotonic=lambda: 2.0)
    cli._reload(args, config, n)
    assert sock.recv(4096) == (b"RELOADING=1\nMONOTONIC_USEC=2000000\n"
                               b"STATUS=reloading the configuration")
    assert sock.recv(4096) == b"READY=1\nSTATUS=running"
