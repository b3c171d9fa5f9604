"""Where a relay keeps its sessions across a restart: one interface, an embedded SQLite
store that needs no server.

The relay writes a session's record (lrk.core.persist) on every change before the reply
that announces the change leaves, deletes it when the session ends, and reads every
record back when it starts. The store runs in the daemon's event loop: SQLite in WAL
mode with synchronous=NORMAL commits without an fsync per write (a power cut may lose
the last writes; a crashed or killed process loses nothing it committed).

A store failure (disk full, file removed) never ends a call: the write is counted
(`store.failed`) and logged once until the store works again.
"""

from __future__ import annotations

import logging
import os
import re
import sqlite3
from typing import Any, Dict, List, Optional, Tuple

import msgpack

from lrk.errors import ConfigError

log = logging.getLogger("lrk.store")

Record = Dict[str, Any]


class SqliteStore:
    """Session records in one SQLite file (one file per relay: see `path_for`)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.counters: Dict[str, int] = {"store.written": 0, "store.deleted": 0,
                                         "store.failed": 0}
        self._failing = False
        try:
            os.makedirs(os.path.dirname(path) or ".", mode=0o750, exist_ok=True)
            self.db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
            # every statement is stepped to its end and its cursor closed: PyPy's sqlite3
            # otherwise keeps it open, and with it a lock other connections wait for
            self._query("PRAGMA journal_mode=WAL")
            self._query("PRAGMA synchronous=NORMAL")
            self.db.execute("CREATE TABLE IF NOT EXISTS sessions ("
                            "sid INTEGER PRIMARY KEY, call_id TEXT NOT NULL, record BLOB)")
        except (OSError, sqlite3.Error) as exc:
            raise ConfigError(f"session store {path}: {exc} (state_dir must be a writable "
                              "directory)") from exc

    @property
    def up(self) -> bool:
        """False while writes fail (logged once, counted in store.failed)."""
        return not self._failing

    def write(self, puts: List[Tuple[int, str, Record]], deletes: List[int]) -> None:
        """Several changes in one transaction (one burst of requests: one commit)."""
        if not puts and not deletes:
            return
        try:
            cur = self.db.cursor()
            try:
                cur.execute("BEGIN")
                if deletes:
                    cur.executemany("DELETE FROM sessions WHERE sid = ?",
                                    [(sid,) for sid in deletes])
                if puts:
                    cur.executemany(
                        "INSERT OR REPLACE INTO sessions (sid, call_id, record) "
                        "VALUES (?, ?, ?)",
                        [(sid, call_id, msgpack.packb(rec, use_bin_type=True))
                         for sid, call_id, rec in puts])
                cur.execute("COMMIT")
            finally:
                cur.close()
        except sqlite3.Error as exc:
            with_rollback(self.db)
            self._failed(exc)
            return
        self._works()
        self.counters["store.written"] += len(puts)
        self.counters["store.deleted"] += len(deletes)

    def put(self, sid: int, call_id: str, record: Record) -> None:
        self._run("INSERT OR REPLACE INTO sessions (sid, call_id, record) VALUES (?, ?, ?)",
                  (sid, call_id, msgpack.packb(record, use_bin_type=True)), "store.written")

    def delete(self, sid: int) -> None:
        self._run("DELETE FROM sessions WHERE sid = ?", (sid,), "store.deleted")

    def clear(self) -> None:
        self._run("DELETE FROM sessions", (), "store.deleted")

    def load(self) -> List[Tuple[int, Any]]:
        """Every stored (sid, record); a record that is not msgpack comes back as None."""
        rows = self._query("SELECT sid, record FROM sessions ORDER BY sid")
        out: List[Tuple[int, Any]] = []
        for sid, blob in rows:
            try:
                out.append((sid, msgpack.unpackb(blob, raw=False)))
            except Exception:  # a damaged row: the caller counts and removes it
                out.append((sid, None))
        return out

    def count(self) -> int:
        return int(self._query("SELECT COUNT(*) FROM sessions")[0][0])

    def _query(self, sql: str) -> List[Any]:
        cur = self.db.cursor()
        try:
            cur.execute(sql)
            return cur.fetchall()
        finally:
            cur.close()

    def close(self) -> None:
        try:
            self.db.close()
        except sqlite3.Error:
            pass

    def _run(self, sql: str, args: tuple, counter: str) -> None:
        try:
            cur = self.db.cursor()
            try:
                cur.execute(sql, args)
            finally:
                cur.close()
        except sqlite3.Error as exc:
            self._failed(exc)
            return
        self._works()
        self.counters[counter] += 1

    def _failed(self, exc: Exception) -> None:
        self.counters["store.failed"] += 1
        if not self._failing:
            log.error("session store %s failed (%s): calls go on, but a restart would "
                      "lose the changes since", self.path, exc)
            self._failing = True

    def _works(self) -> None:
        if self._failing:
            log.warning("session store %s works again", self.path)
            self._failing = False


def with_rollback(db: sqlite3.Connection) -> None:
    """End a failed transaction (if one is open) so the next write starts clean."""
    try:
        if db.in_transaction:
            db.execute("ROLLBACK")
    except sqlite3.Error:
        pass


def path_for(state_dir: str, control: str, ports: str) -> str:
    """The store file of one relay: named after its control address and port range, so
    two relays on one host (different control ports) never share one."""
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", f"{control}-{ports}").strip("_")
    return os.path.join(state_dir, f"sessions-{slug}.sqlite")


def open_store(state_dir: Optional[str], control: str, ports: str) -> Optional[SqliteStore]:
    """The relay's store, or None when no state_dir is configured (sessions die with the
    process, as before)."""
    if not state_dir:
        return None
    return SqliteStore(path_for(state_dir, control, ports))


__all__ = ["SqliteStore", "open_store", "path_for"]
