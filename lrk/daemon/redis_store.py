"""The session store in Redis: the same interface as the embedded SQLite store
(`lrk.daemon.store.SqliteStore`), for nodes that stand by for each other.

Layout: one string key per session, ``lrk:<node>:session:<sid>`` holding the record
(msgpack, written by one Lua script call per burst: atomic, and one command for
redis-py to pack and one reply to parse), with a TTL as a safety net (`ttl`: the
relay's max_lifetime plus a margin, as the configuration says at each write: a reload
changes it; so a key whose node died and that nobody took over goes away by itself);
and a generation
counter ``lrk:<node>:gen`` bumped in every write transaction, which a standby polls to
know when to re-read a peer (`lrk.daemon.takeover`). A session that ends leaves no key.

Redis down is survivable: a failed write marks the store down (`up` False, logged once,
`store.up` 0, `store.failed` counted) and remembers the sids it could not write (at
most `MAX_PENDING`; beyond that the next catch-up rewrites everything). While down no
write touches the network: the relay's timer calls `handle_timer` every `RETRY`
seconds, which asks Redis for its run_id and, once it answers, writes what the relay
holds now for the pending sids (records for live sessions, deletes for ended ones), or
for every session when Redis restarted meanwhile (a new run_id: it may have lost its
keys) or the pending set overflowed. Every command has
a short socket timeout (`timeout`) and no retries, so the event loop never waits long.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple, Union

import msgpack
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from lrk.errors import ConfigError

log = logging.getLogger("lrk.store")

Record = Dict[str, Any]
Puts = List[Tuple[int, str, Record]]
#: what the relay holds now for some sids (None: every session): (puts, deletes)
Source = Callable[[Optional[List[int]]], Tuple[Puts, List[int]]]
#: a key's TTL in seconds (None or 0: none), or what tells it at each write
Ttl = Union[None, int, Callable[[], Optional[int]]]

#: seconds between reconnection attempts while Redis is down
RETRY = 1.0
#: sids remembered while Redis is down; beyond this the catch-up rewrites every session
MAX_PENDING = 100000
#: keys read per SCAN step and per MGET
SCAN_COUNT = 500
#: socket timeout of every Redis command (seconds): the event loop waits at most this
TIMEOUT = 0.25
#: socket timeout of the reconnection probe while Redis is down
PROBE_TIMEOUT = 0.05

REDIS_ERRORS = (redis.RedisError, OSError)


#: one burst's writes, atomically: KEYS = gen key, keys to delete, keys to set;
#: ARGV = number of deletes, TTL (0: none), the records to set (in KEYS' order)
WRITE_SCRIPT = """
local ndel = tonumber(ARGV[1])
local ttl = tonumber(ARGV[2])
for i = 2, ndel + 1 do redis.call('DEL', KEYS[i]) end
for i = ndel + 2, #KEYS do
  if ttl > 0 then
    redis.call('SET', KEYS[i], ARGV[i - ndel + 1], 'EX', ttl)
  else
    redis.call('SET', KEYS[i], ARGV[i - ndel + 1])
  end
end
return redis.call('INCR', KEYS[1])
"""


def session_key(node: str, sid: int) -> str:
    return f"lrk:{node}:session:{sid}"


def gen_key(node: str) -> str:
    return f"lrk:{node}:gen"


def _sid_of(key: Any) -> Optional[int]:
    text = key.decode() if isinstance(key, bytes) else str(key)
    try:
        return int(text.rsplit(":", 1)[1])
    except (IndexError, ValueError):
        return None


class RedisStore:
    """Session records of one node (`node`) in Redis; reads peers' records too."""

    kind = "redis"

    def __init__(self, url: str, node: str, ttl: Ttl = None,
                 timeout: float = TIMEOUT,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if not node or ":" in node:
            raise ConfigError(f"node_id {node!r} must be non-empty and contain no ':'")
        self.url = url
        self.node = node
        self.path = f"{url} (node {node})"  # what log lines name
        self._ttl = ttl
        try:
            self.db = redis.Redis.from_url(url, socket_timeout=timeout,
                                           socket_connect_timeout=timeout,
                                           retry=Retry(NoBackoff(), 0))
            # asks, while Redis is down, whether it is back: a blackholed server costs
            # the event loop at most PROBE_TIMEOUT per RETRY
            self._probe = redis.Redis.from_url(url, socket_timeout=PROBE_TIMEOUT,
                                               socket_connect_timeout=PROBE_TIMEOUT,
                                               retry=Retry(NoBackoff(), 0))
        except ValueError as exc:
            raise ConfigError(f"redis_url {url!r}: {exc} (e.g. redis://127.0.0.1:6379/0 "
                              "or unix:///run/redis/redis.sock)") from exc
        self.counters: Dict[str, int] = {"store.written": 0, "store.deleted": 0,
                                         "store.failed": 0, "store.up": 1,
                                         "store.pending": 0, "store.caught_up": 0}
        self.up = True
        #: sids changed while Redis was down (value unused: the relay says what they are now)
        self.pending: Dict[int, bool] = {}
        #: (node, sid) keys of peers to delete once Redis answers (a takeover while down)
        self.pending_foreign: Dict[Tuple[str, int], bool] = {}
        self.overflow = False  # pending outgrew MAX_PENDING: rewrite everything
        self.source: Optional[Source] = None  # set by the relay
        self._write_script = self.db.register_script(WRITE_SCRIPT)
        self._retry_at: Optional[float] = None
        self.clock = clock
        #: the server's run_id: another one after an outage means a restarted Redis that
        #: may have lost every key (no persistence), so the catch-up rewrites everything
        self.run_id: Optional[str] = None
        try:
            self.run_id = self._server_id()
        except REDIS_ERRORS:
            pass  # down at start: load() says so; the first catch-up rewrites everything

    @property
    def ttl(self) -> Optional[int]:
        """The TTL (seconds) a key gets at this write; None: no TTL. From the relay's
        live settings when given as a function (a reload changes them)."""
        ttl = self._ttl() if callable(self._ttl) else self._ttl
        return ttl if ttl and ttl > 0 else None

    # -- the store interface (SqliteStore's) ----------------------------------------
    def write(self, puts: Puts, deletes: List[int],
              foreign: Iterable[Tuple[str, int]] = ()) -> bool:
        """Several changes atomically (one burst of requests: one round trip);
        `foreign`: peers' keys to delete in the same transaction (a takeover). False
        (and remembered for the catch-up) when Redis does not answer."""
        foreign = list(foreign)
        if not puts and not deletes and not foreign:
            return True
        if not self.up:
            self._remember([sid for sid, _, _ in puts] + list(deletes), foreign)
            return False
        try:
            self._transaction(puts, deletes, foreign)
        except REDIS_ERRORS as exc:
            self.mark_down(exc)
            self._remember([sid for sid, _, _ in puts] + list(deletes), foreign)
            return False
        return True

    def put(self, sid: int, call_id: str, record: Record) -> None:
        self.write([(sid, call_id, record)], [])

    def delete(self, sid: int) -> None:
        self.write([], [sid])

    def clear(self) -> None:
        """Remove every record of this node (`shutdown`: the calls end for good)."""
        try:
            keys = list(self._scan(self.node))
            if keys:
                self.db.delete(*keys)
            self.counters["store.deleted"] += len(keys)
        except REDIS_ERRORS as exc:
            self.mark_down(exc)

    def load(self) -> List[Tuple[int, Any]]:
        """Every (sid, record) of this node; an unreadable record comes back as None.
        Empty (and the store marked down) when Redis does not answer."""
        try:
            return sorted(self.load_node(self.node).items())
        except REDIS_ERRORS as exc:
            self.mark_down(exc)
            log.error("session store %s: could not read this node's records at start; "
                      "calls of an earlier run are not restored", self.path)
            return []

    def count(self) -> int:
        return sum(1 for _ in self._scan(self.node))

    def close(self) -> None:
        for db in (self.db, self._probe):
            try:
                db.close()
            except REDIS_ERRORS:
                pass

    # -- peers (warm standby, takeover) ----------------------------------------------
    def load_node(self, node: str) -> Dict[int, Any]:
        """Every record of `node` (sid -> record or None). Raises redis.RedisError or
        OSError when Redis does not answer."""
        out: Dict[int, Any] = {}
        keys = list(self._scan(node))
        for i in range(0, len(keys), SCAN_COUNT):
            chunk = keys[i:i + SCAN_COUNT]
            for key, blob in zip(chunk, self.db.mget(chunk)):
                sid = _sid_of(key)
                if sid is None or blob is None:
                    continue  # ended between SCAN and MGET
                try:
                    out[sid] = msgpack.unpackb(blob, raw=False)
                except Exception:  # a damaged record: the reader counts and drops it
                    out[sid] = None
        return out

    def generations(self, nodes: List[str]) -> List[Optional[int]]:
        """Each node's write generation (None: never written). Raises when down."""
        values = self.db.mget([gen_key(n) for n in nodes])
        return [None if v is None else int(v) for v in values]

    # -- Redis down ------------------------------------------------------------------
    def get_timer(self) -> Optional[float]:
        """When the relay's timer should call `handle_timer` (None: nothing to do)."""
        return None if self.up else self._retry_at

    def handle_timer(self, now: float) -> None:
        """While down: ping, and once Redis answers write what the pending sids are now."""
        if self.up or self._retry_at is None or now < self._retry_at:
            return
        self._retry_at = now + RETRY
        try:
            run_id = self._server_id(self._probe)
            if run_id != self.run_id or run_id is None:
                self.overflow = True  # a new server (or one never seen): everything
            self.catch_up()
            self.run_id = run_id
        except REDIS_ERRORS:
            return  # still down: try again at the next RETRY
        self.up = True
        self._retry_at = None
        self.counters["store.up"] = 1
        log.warning("session store %s works again: caught up", self.path)

    def catch_up(self) -> None:
        """Write the relay's present state of every pending sid (every session after an
        overflow, removing this node's keys of sessions that are gone)."""
        assert self.source is not None, "the relay sets RedisStore.source"
        if self.overflow:
            puts, deletes = self.source(None)
            live = {sid for sid, _, _ in puts}
            deletes = sorted({sid for sid in (_sid_of(k) for k in self._scan(self.node))
                              if sid is not None and sid not in live} | set(deletes))
        else:
            puts, deletes = self.source(sorted(self.pending))
        foreign = list(self.pending_foreign)
        self._transaction(puts, deletes, foreign)
        self.counters["store.caught_up"] += len(puts) + len(deletes) + len(foreign)
        self.pending = {}
        self.pending_foreign = {}
        self.overflow = False
        self.counters["store.pending"] = 0

    # -- internals -------------------------------------------------------------------
    def _transaction(self, puts: Puts, deletes: List[int],
                     foreign: List[Tuple[str, int]]) -> None:
        """One script call: atomic like MULTI/EXEC, but one command and one reply to
        parse (redis-py's per-command cost is most of a write's CPU)."""
        node = self.node
        gone = ([session_key(node, sid) for sid in deletes]
                + [session_key(n, sid) for n, sid in foreign])
        keys = [gen_key(node), *gone, *[session_key(node, sid) for sid, _, _ in puts]]
        args = [len(gone), self.ttl or 0,
                *[msgpack.packb(rec, use_bin_type=True) for _, _, rec in puts]]
        self._write_script(keys=keys, args=args)
        self.counters["store.written"] += len(puts)
        self.counters["store.deleted"] += len(deletes) + len(foreign)

    def _server_id(self, db: Optional[redis.Redis] = None) -> Optional[str]:
        run_id = (db or self.db).info("server").get("run_id")
        return None if run_id is None else str(run_id)

    def _scan(self, node: str) -> Iterable[bytes]:
        return self.db.scan_iter(match=f"lrk:{node}:session:*", count=SCAN_COUNT)

    def _remember(self, sids: List[int], foreign: List[Tuple[str, int]]) -> None:
        for key in foreign:
            self.pending_foreign[key] = True
        if self.overflow:
            return
        pending = self.pending
        for sid in sids:
            pending[sid] = True
        if len(pending) > MAX_PENDING:
            self.pending = pending = {}
            self.overflow = True
        self.counters["store.pending"] = len(self.pending)

    def mark_down(self, exc: BaseException) -> None:
        """Redis did not answer: count it, log once, retry on the timer (RETRY)."""
        self.counters["store.failed"] += 1
        if self.up:
            log.error("session store %s is down (%s): calls go on in memory; the store "
                      "catches up when Redis answers again", self.path, exc)
            self.up = False
            self.counters["store.up"] = 0
            self._retry_at = self.clock() + RETRY




def open_session_store(config: Any) -> Any:
    """The relay's store from its configuration (lrk.daemon.config.Config): a RedisStore
    for store = "redis", else the SQLite store under state_dir (or None: no store)."""
    if config.store != "redis":
        from lrk.daemon.store import open_store
        return open_store(config.state_dir, config.control, config.ports)
    # read at every write: a reload changes max_lifetime and silence_timeout in place
    return RedisStore(config.redis_url, config.node_name, lambda: session_ttl(config))


def session_ttl(config: Any) -> Optional[int]:
    """A session key's TTL under `config` as it is now (None: no max_lifetime): a
    session never outlives max_lifetime, so its key need not either (plus a margin)."""
    if config.max_lifetime > 0:
        return int(config.max_lifetime + 2 * config.silence_timeout + 60)
    return None

__all__ = ["MAX_PENDING", "REDIS_ERRORS", "RETRY", "RedisStore", "gen_key", "open_session_store",
           "session_key", "session_ttl"]
