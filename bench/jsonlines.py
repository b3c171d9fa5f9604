"""The JSON-lines link between a benchmark and its load tools (`bench.loadgen --serve`,
`bench.callgen --serve`): one command line in, one reply line out.

The load tools run as child processes (PyPy, the faster generator) that inherit their
sockets by fd, so a socket made in a caller or callee namespace is used there whatever
process holds it. Both ends live here once: `serve` is the child's loop, `ChildProcess`
the parent's handle.
"""

from __future__ import annotations

import json
import os
import select
import subprocess
import sys
import tempfile
from typing import IO, Callable, Optional, Sequence, Tuple, Type

from lrk.demo.relay_process import read_log

#: exceptions a command handler may raise for a bad command: they become error replies
COMMAND_ERRORS: Tuple[Type[BaseException], ...] = (
    ValueError, KeyError, TypeError, AttributeError, OSError, RuntimeError)


def serve(handle: Callable[[dict], dict], max_commands: int,
          stdin: Optional[IO[str]] = None, stdout: Optional[IO[str]] = None) -> None:
    """Answer at most `max_commands` commands, then return (also on EOF or "quit").

    Every command gets exactly one reply line: `{"ok": true, **handle(cmd)}`, or
    `{"ok": false, "error": "Type: message"}` when the command is bad."""
    stdin = stdin or sys.stdin
    stdout = stdout or sys.stdout

    def reply(obj: dict) -> None:
        stdout.write(json.dumps(obj) + "\n")
        stdout.flush()

    for _ in range(max_commands):
        line = stdin.readline()
        if not line:
            return
        try:
            cmd = json.loads(line)
            if not isinstance(cmd, dict):
                raise ValueError("a command is a JSON object with a 'cmd' key")
            if cmd.get("cmd") == "quit":
                reply({"ok": True})
                return
            reply({"ok": True, **handle(cmd)})
        except COMMAND_ERRORS as exc:
            reply({"ok": False, "error": f"{type(exc).__name__}: {exc}"})


class ChildProcess:
    """`python -m MODULE --serve` with `socks` inherited by fd; a context manager that
    always ends it. `command` raises `error` (the caller's exception type) when the child
    answers with an error or not at all."""

    def __init__(self, module: str, socks: Sequence[object], python: str,
                 error: Type[Exception] = RuntimeError, what: str = "load generator") -> None:
        from bench.interpreters import REPO_ROOT

        self.error = error
        self.what = what
        env = dict(os.environ)
        env["PYTHONPATH"] = REPO_ROOT + os.pathsep + env.get("PYTHONPATH", "")
        self._err = tempfile.TemporaryFile()  # noqa: SIM115 - lives as long as the child
        try:
            self.proc = subprocess.Popen(
                [python, "-m", module, "--serve"], stdin=subprocess.PIPE,
                stdout=subprocess.PIPE, stderr=self._err,
                pass_fds=[s.fileno() for s in socks], cwd=REPO_ROOT, env=env, text=True)
        except BaseException:
            self._err.close()
            raise

    @property
    def pid(self) -> int:
        return self.proc.pid

    def send(self, cmd: dict) -> None:
        proc = self.proc
        assert proc.stdin is not None
        proc.stdin.write(json.dumps(cmd) + "\n")
        proc.stdin.flush()

    def reply(self, cmd: dict, timeout: float) -> dict:
        """The reply to `cmd` (sent before), without its "ok"."""
        proc = self.proc
        assert proc.stdout is not None
        poller = select.poll()  # not select(): with many sessions our fds pass 1024
        poller.register(proc.stdout.fileno(), select.POLLIN)
        line = proc.stdout.readline() if poller.poll(timeout * 1000) else ""
        if not line:
            err = read_log(self._err)[-2000:]
            raise self.error(f"{self.what} did not answer {cmd.get('cmd')!r} within "
                             f"{timeout:.0f} s (exit code {proc.poll()}): {err}")
        reply = json.loads(line)
        if not reply.pop("ok", False):
            raise self.error(f"{self.what}: {reply.get('error')}")
        return reply

    def command(self, cmd: dict, timeout: float) -> dict:
        self.send(cmd)
        return self.reply(cmd, timeout)

    def close(self) -> int:
        """Quit (kill if it hangs); returns the exit code. Safe to call twice."""
        proc = self.proc
        if self._err.closed:
            return proc.returncode
        try:
            if proc.poll() is None and proc.stdin is not None:
                proc.stdin.write(json.dumps({"cmd": "quit"}) + "\n")
                proc.stdin.flush()
            proc.wait(5.0)
        except (OSError, ValueError, subprocess.TimeoutExpired):
            proc.kill()
            proc.wait()
        for f in (proc.stdin, proc.stdout):
            if f is not None:
                f.close()
        self._err.close()
        return proc.returncode

    def __enter__(self) -> ChildProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def emit(result: dict, out: Optional[str], indent: int = 1) -> None:
    """A benchmark's result: printed as JSON, and written to `out` too when given."""
    text = json.dumps(result, indent=indent)
    print(text)
    if out:
        with open(out, "w") as fh:
            fh.write(text + "\n")
