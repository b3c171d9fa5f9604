"""Authenticated msgpack control: HMAC-SHA256 over the exact request bytes, sans-IO.

A signed request is the msgpack map followed by a fixed 60-byte trailer (docs/protocol.md,
"Authentication"):

    magic b"\\xc1LK1" (4) | key id, ASCII, NUL-padded (16) |
    timestamp, ms since the Unix epoch, unsigned big-endian (8) |
    HMAC-SHA256(secret, every byte before the MAC) (32)

A trailer rather than fields of the map: the relay checks the bytes it received, with no
re-packing (msgpack encoders differ), before it parses anything; 0xc1 is the one byte
msgpack never uses, so a trailer can never be mistaken for map data.

Keys are small TOML files (`*.key`: `id`, `secret` in hex, optional `admin`, `owner`), read
from a directory or a list of files; several keys may be valid at once (rotation). Where
both sides look by default is `default_key_dir()`: one function for the relay, `lrk.client`,
`lrkproxy ctl` and Kamailio's KEMI scripts. A relay with no key at first start creates
`admin.key` and `client.key` there (mode 0600).
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import re
import stat
import struct
import sys
from typing import Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Set, Tuple

from lrk.errors import ConfigError, LrkError

if sys.version_info >= (3, 11):
    import tomllib
else:  # PyPy 3.9
    import tomli as tomllib

log = logging.getLogger("lrk.control")

#: environment variable naming the key directory (or one key file) for both sides
KEYS_ENV = "LRK_KEYS"
#: where a relay running as root keeps its keys, and where root clients look
SYSTEM_KEY_DIR = "/etc/lrk/keys"
ADMIN_KEY = "admin"
CLIENT_KEY = "client"
KEY_SUFFIX = ".key"

MAGIC = b"\xc1LK1"
KEY_ID_BYTES = 16
MAC_BYTES = 32
TRAILER_BYTES = len(MAGIC) + KEY_ID_BYTES + 8 + MAC_BYTES  # 60
_TS = struct.Struct("!Q")
#: default and limits of the accepted clock difference (control_auth_window)
WINDOW = 30.0
MAX_WINDOW = 300.0
#: signed requests remembered for replay detection (about 110 bytes each under CPython, 90
#: under PyPy); beyond it new ones are refused (fail closed). 524,288 cover 16,900 signed
#: requests/s sustained with a 30 s window: more than one relay's control plane serves
MAX_SEEN = 1 << 19
#: secrets: 16..64 bytes (HMAC-SHA256's block size), written as hex
MIN_SECRET = 16
MAX_SECRET = 64
NEW_SECRET = 32
_ID = re.compile(r"[A-Za-z0-9._-]{1,16}\Z")
_OWNER = re.compile(r"[A-Za-z0-9._@:-]{1,64}\Z")

#: verdicts of `Authenticator.verify` that drop the request, as counted
#: (`control.dropped.<reason>`)
DROP_REASONS = ("unauthenticated", "bad_signature", "expired", "replayed",
                "replay_guard_full")


class KeyFileError(ConfigError):
    """A key file or key directory is missing, unreadable, unsafe or malformed."""


class NotOwner(LrkError):
    """A request of one control client for a call another client (or the legacy module)
    made; only that call's key, or an admin key, may change it."""

    code = "forbidden"


# -- where keys live ------------------------------------------------------------------------
def default_key_dir(env: Optional[Mapping[str, str]] = None,
                    euid: Optional[int] = None) -> str:
    """Where relay and clients keep keys unless told otherwise: `$LRK_KEYS`, else
    /etc/lrk/keys for root, else `$XDG_CONFIG_HOME/lrk/keys` (~/.config/lrk/keys). One
    function for both sides, so that they meet without configuration."""
    env = os.environ if env is None else env
    explicit = env.get(KEYS_ENV)
    if explicit:
        return explicit
    if (os.geteuid() if euid is None else euid) == 0:
        return SYSTEM_KEY_DIR
    base = env.get("XDG_CONFIG_HOME") or os.path.join(
        env.get("HOME") or os.path.expanduser("~"), ".config")
    return os.path.join(base, "lrk", "keys")


# -- keys -----------------------------------------------------------------------------------
def _openssl_hmac() -> Optional[Callable[[bytes, bytes, int], bytes]]:
    """HMAC-SHA256 in one libcrypto call (cffi, ABI mode, as fastpath's mmsg): under PyPy
    about 1 µs where hashlib's two state copies cost about 5 µs. None where it is not worth
    it (CPython: hashlib is C already, 0.7 µs) or not available (hashlib is used then)."""
    if sys.implementation.name != "pypy" or os.environ.get("LRK_HMAC") == "hashlib":
        return None
    try:
        import ctypes.util

        import cffi

        ffi = cffi.FFI()
        ffi.cdef("""
            typedef struct evp_md_st EVP_MD;
            const EVP_MD *EVP_sha256(void);
            unsigned char *HMAC(const EVP_MD *evp_md, const void *key, int key_len,
                                const unsigned char *data, size_t data_len,
                                unsigned char *md, unsigned int *md_len);
        """)
        lib = ffi.dlopen(ctypes.util.find_library("crypto") or "libcrypto.so.3")
        sha256 = lib.EVP_sha256()
        new, buffer, hmac_ = ffi.new, ffi.buffer, lib.HMAC

        def one_call(secret: bytes, data: bytes, end: int) -> bytes:
            out = new("unsigned char[32]")  # per call: signing may run in several threads
            if hmac_(sha256, secret, len(secret), data, end, out, new("unsigned int *")) \
                    == ffi.NULL:
                raise RuntimeError("libcrypto HMAC failed")
            return buffer(out, 32)[:]

        probe = bytes(range(32))
        if one_call(probe, b"lrk", 3) != hmac.new(probe, b"lrk", hashlib.sha256).digest():
            return None
        return one_call
    except Exception:  # no cffi, no libcrypto: hashlib it is
        return None


_ONE_CALL = _openssl_hmac()


class Key:
    """One control key: `id` goes on the wire; calls made with it belong to `owner` (the
    id unless the file names one: a rotated key keeps its predecessor's owner); `admin`
    keys may change, list and end every call (lrkproxy ctl)."""

    __slots__ = ("id", "secret", "admin", "owner", "path", "wire_id", "_inner", "_outer")

    def __init__(self, key_id: str, secret: bytes, admin: bool = False,
                 owner: Optional[str] = None, path: Optional[str] = None) -> None:
        if not isinstance(key_id, str) or not _ID.match(key_id):
            raise KeyFileError(f"key id {_clip(key_id)} must be 1-16 characters of "
                               "A-Z a-z 0-9 . _ -")
        if not isinstance(secret, bytes) or not MIN_SECRET <= len(secret) <= MAX_SECRET:
            raise KeyFileError(f"key {key_id}: the secret must be {MIN_SECRET}-{MAX_SECRET} "
                               "bytes")
        if owner is not None and (not isinstance(owner, str) or not _OWNER.match(owner)):
            raise KeyFileError(f"key {key_id}: owner {_clip(owner)} must be 1-64 characters "
                               "of A-Z a-z 0-9 . _ @ : -")
        self.id = key_id
        self.secret = secret
        self.admin = bool(admin)
        self.owner = owner or key_id
        self.path = path
        self.wire_id = key_id.encode("ascii").ljust(KEY_ID_BYTES, b"\0")
        # HMAC's inner and outer states, computed once: a signature then costs two hash
        # copies (about 5 µs under PyPy, 1 µs under CPython, for a small request)
        block = secret.ljust(64, b"\0")
        self._inner = hashlib.sha256(bytes(b ^ 0x36 for b in block))
        self._outer = hashlib.sha256(bytes(b ^ 0x5C for b in block))

    def mac(self, data: bytes, end: Optional[int] = None) -> bytes:
        """HMAC-SHA256(secret, data[:end]), without copying `data`."""
        if end is None:
            end = len(data)
        elif not 0 <= end <= len(data):  # libcrypto would read past the buffer
            raise ValueError(f"end {end} outside the {len(data)} bytes given")
        if _ONE_CALL is not None:
            return _ONE_CALL(self.secret, data, end)
        inner = self._inner.copy()
        inner.update(memoryview(data)[:end] if end != len(data) else data)
        outer = self._outer.copy()
        outer.update(inner.digest())
        return outer.digest()

    def __repr__(self) -> str:  # never the secret
        return (f"Key(id={self.id!r}, owner={self.owner!r}, admin={self.admin}, "
                f"path={self.path!r})")


def _clip(value: object, limit: int = 40) -> str:
    """A value for an error message, never more than `limit` characters of it."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def parse_key(text: str, path: str = "<key>") -> Key:
    """A key from the text of a key file (TOML: id, secret, admin, owner)."""
    try:
        data = tomllib.loads(text)
    except (tomllib.TOMLDecodeError, ValueError) as exc:
        raise KeyFileError(f"key file {path} is not valid TOML: {exc}") from None
    unknown = sorted(set(data) - {"id", "secret", "admin", "owner"})
    if unknown:
        raise KeyFileError(f"key file {path}: unknown field(s) {', '.join(unknown)}; a key "
                           "has id, secret, admin and owner")
    key_id, secret = data.get("id"), data.get("secret")
    if not isinstance(key_id, str):
        raise KeyFileError(f"key file {path}: `id` (a string) is required")
    if not isinstance(secret, str):
        raise KeyFileError(f"key file {path}: `secret` (hex) is required")
    try:
        raw = bytes.fromhex(secret)
    except ValueError:
        raise KeyFileError(f"key file {path}: `secret` must be hexadecimal") from None
    admin = data.get("admin", False)
    if not isinstance(admin, bool):
        raise KeyFileError(f"key file {path}: `admin` must be true or false")
    try:
        return Key(key_id, raw, admin, data.get("owner"), path)
    except KeyFileError as exc:
        raise KeyFileError(f"key file {path}: {exc}") from None


def load_key(path: str) -> Key:
    """One key file. Refused when others may read or write it: a key everyone on the host
    can read authenticates nobody."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        raise KeyFileError(f"key file {path} does not exist") from None
    except OSError as exc:
        raise KeyFileError(f"key file {path}: {exc.strerror} (the relay's keys are readable "
                           "by their owner only; copy the key this client needs, or run as "
                           "that user)") from None
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise KeyFileError(f"key file {path} is not a regular file")
        if mode & 0o007:
            raise KeyFileError(f"key file {path} is accessible to every user (mode "
                               f"{stat.S_IMODE(mode):04o}); run: chmod 600 {path}")
        with os.fdopen(os.dup(fd), "rb") as fh:
            data = fh.read(4097)
    finally:
        os.close(fd)
    if len(data) > 4096:
        raise KeyFileError(f"key file {path} is larger than 4096 bytes: not a key")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise KeyFileError(f"key file {path} is not UTF-8 text") from None
    return parse_key(text, path)


def key_files(directory: str) -> List[str]:
    """The `*.key` files of a directory, sorted (others are ignored)."""
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return []
    except OSError as exc:
        raise KeyFileError(f"key directory {directory}: {exc.strerror}") from None
    return [os.path.join(directory, n) for n in sorted(names)
            if n.endswith(KEY_SUFFIX) and not n.startswith(".")]


def load_keys(paths: Sequence[str]) -> List[Key]:
    """Every key of `paths` (directories: their `*.key` files; files: themselves; a path
    that does not exist is a directory unless it ends in `.key`); ids must be unique."""
    keys: List[Key] = []
    seen: Dict[str, str] = {}
    for path in paths:
        if os.path.isdir(path) or (not path.endswith(KEY_SUFFIX)
                                   and not os.path.lexists(path)):
            files = key_files(path)  # a directory (one that does not exist yet is empty)
        else:
            files = [path]
        for file in files:
            key = load_key(file)
            if key.id in seen:
                raise KeyFileError(f"key id {key.id!r} is used by both {seen[key.id]} and "
                                   f"{file}: give every key its own id")
            seen[key.id] = file
            keys.append(key)
    return keys


def render_key(key_id: str, secret: bytes, admin: bool, owner: Optional[str] = None) -> str:
    """The text of a key file."""
    lines = ["# lrk control key: keep it secret (mode 0600). docs/security.md",
             f'id = "{key_id}"', f'secret = "{secret.hex()}"',
             f"admin = {'true' if admin else 'false'}"]
    if owner:
        lines.append(f'owner = "{owner}"')
    return "\n".join(lines) + "\n"


def create_key(directory: str, key_id: str, admin: bool = False,
               owner: Optional[str] = None) -> str:
    """Write a new random key `<directory>/<id>.key` (mode 0600), atomically: a key file is
    complete or absent, and one that exists already is kept (another process won)."""
    Key(key_id, b"\0" * NEW_SECRET, admin, owner)  # validates id and owner
    os.makedirs(directory, mode=0o700, exist_ok=True)
    path = os.path.join(directory, key_id + KEY_SUFFIX)
    tmp = os.path.join(directory, f".{key_id}.{os.getpid()}.{os.urandom(4).hex()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, render_key(key_id, os.urandom(NEW_SECRET), admin, owner).encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    try:
        os.link(tmp, path)
    except FileExistsError:
        pass
    finally:
        os.unlink(tmp)
    return path


def ensure_keys(directory: str) -> List[str]:
    """A key directory with keys in it: when it holds no `*.key` file, create `admin.key`
    (admin: for lrkproxy ctl) and `client.key` (for SIP proxies). Returns what it created."""
    if key_files(directory):
        return []
    return [create_key(directory, ADMIN_KEY, admin=True), create_key(directory, CLIENT_KEY)]


def find_key(location: Optional[str] = None, admin: bool = False,
             required: bool = False) -> Optional[Key]:
    """The key a client signs with: `location` (a key file, or a directory), else
    `default_key_dir()`. In a directory: `admin.key` for admin tools, `client.key` for
    others, else its only key (or, for admin tools, its first admin key). None when there is
    none (an error when `required` or when `location` was given)."""
    where = location or default_key_dir()
    required = required or location is not None
    if os.path.isfile(where):
        return load_key(where)
    files = key_files(where) if os.path.isdir(where) else []
    preferred = os.path.join(where, (ADMIN_KEY if admin else CLIENT_KEY) + KEY_SUFFIX)
    if preferred in files:
        return load_key(preferred)
    if len(files) == 1:
        return load_key(files[0])
    if admin:
        for file in files:
            key = load_key(file)
            if key.admin:
                return key
    if required:
        what = "no key file (*.key)" if not files else \
            f"{len(files)} key files and none named {os.path.basename(preferred)}"
        raise KeyFileError(f"{where}: {what}; give the key file itself, or start the relay "
                           f"once with this key directory (it creates admin.key and "
                           f"client.key), or set {KEYS_ENV}")
    return None


# -- the wire -------------------------------------------------------------------------------
def sign(data: bytes, key: Key, wall: float) -> bytes:
    """`data` (one packed request) with its trailer; `wall` is Unix time in seconds."""
    head = data + MAGIC + key.wire_id + _TS.pack(max(0, int(wall * 1000)))
    return head + key.mac(head)


def trailer_of(data: bytes) -> Optional[Tuple[bytes, bytes, int]]:
    """(request bytes, key id, timestamp in ms) when `data` ends in a trailer, else None.
    Checks the form only, not the signature."""
    n = len(data)
    if n <= TRAILER_BYTES or data[n - TRAILER_BYTES:n - TRAILER_BYTES + 4] != MAGIC:
        return None
    kid = data[n - 56:n - 40].rstrip(b"\0")
    return data[:n - TRAILER_BYTES], kid, _TS.unpack_from(data, n - 40)[0]


class ReplayGuard:
    """The signed requests seen within the window, by the first 8 bytes of their MAC,
    bucketed by the second of their timestamp: a replay carries the same timestamp, so
    one set is looked at; whole buckets go once every timestamp in them has expired.
    Bounded: at most `max_entries`; when full, new requests are refused (`full`) rather
    than forgetting ones a replay could still reuse."""

    def __init__(self, window: float = WINDOW, max_entries: int = MAX_SEEN) -> None:
        self.window_ms = int(window * 1000)
        self.max_entries = max_entries
        self._buckets: Dict[int, Set[int]] = {}
        self._size = 0
        self._purged = -1

    def __len__(self) -> int:
        return self._size

    def check(self, ts_ms: int, mac: bytes, now_ms: int) -> str:
        """"fresh" (remembered now), "repeat" (seen before) or "full"."""
        second = now_ms // 1000
        if second != self._purged:
            self._purge(now_ms)
            self._purged = second
        # 63 bits: a machine integer, which PyPy keeps unboxed in the set (no GC object
        # per entry for its collector to walk)
        digest = int.from_bytes(mac[:8], "big") >> 1
        bucket = self._buckets.get(ts_ms // 1000)
        if bucket is not None and digest in bucket:
            return "repeat"
        if self._size >= self.max_entries:
            return "full"
        if bucket is None:
            bucket = self._buckets[ts_ms // 1000] = set()
        bucket.add(digest)
        self._size += 1
        return "fresh"

    def _purge(self, now_ms: int) -> None:
        oldest = (now_ms - self.window_ms) // 1000 - 1
        for second in [s for s in self._buckets if s < oldest]:
            self._size -= len(self._buckets.pop(second))


class Authenticator:
    """Checks signed requests: known key, valid MAC, timestamp within `window` seconds of
    the relay's clock, not seen before."""

    def __init__(self, keys: Iterable[Key], window: float = WINDOW,
                 max_seen: int = MAX_SEEN) -> None:
        self.keys: Dict[bytes, Key] = {}
        for key in keys:
            if key.wire_id in self.keys:
                raise KeyFileError(f"key id {key.id!r} is given twice")
            self.keys[key.wire_id] = key
        if not self.keys:
            raise KeyFileError("no control key: authenticated control needs at least one")
        if not 0 < window <= MAX_WINDOW:
            raise ConfigError(f"control_auth_window {window!r} must be within "
                              f"0..{MAX_WINDOW:.0f} seconds (and not 0)")
        self.window = float(window)
        self.window_ms = int(window * 1000)
        self.guard = ReplayGuard(window, max_seen)
        #: timestamps before this (ms) are refused as expired: set by a reload that widens
        #: the window, since the old guard forgot what it saw before its own window
        self.floor_ms = 0

    def keep_guard(self, previous: Authenticator, wall: float) -> None:
        """Take over the replay guard of the authenticator this one replaces (a reload at
        Unix time `wall`), remembering for this window from now on. A wider window does
        not reopen what the old guard already forgot: timestamps older than the old
        window at the reload stay expired (for as long as the new window would accept
        them). A narrower one lets the guard forget sooner (verify refuses the rest)."""
        guard = previous.guard
        guard.window_ms = self.window_ms
        self.guard = guard
        self.floor_ms = previous.floor_ms
        if self.window_ms > previous.window_ms:
            self.floor_ms = max(self.floor_ms, int(wall * 1000) - previous.window_ms)

    def verify(self, data: bytes, wall: float) -> Tuple[Optional[Key], str]:
        """(key, "fresh" or "repeat") for a request signed by a known key within the
        window; (None, reason) otherwise, reason one of DROP_REASONS. "repeat": the same
        signed bytes came before (a retransmission if from the same sender and still in
        the reply cache, else a replay)."""
        n = len(data)
        if n <= TRAILER_BYTES or data[n - TRAILER_BYTES:n - TRAILER_BYTES + 4] != MAGIC:
            return None, "unauthenticated"
        key = self.keys.get(data[n - 56:n - 40])
        if key is None:
            return None, "unauthenticated"  # a key this relay does not have
        mac = data[n - MAC_BYTES:]
        if not hmac.compare_digest(key.mac(data, n - MAC_BYTES), mac):
            return None, "bad_signature"
        ts = _TS.unpack_from(data, n - 40)[0]
        now_ms = int(wall * 1000)
        if abs(now_ms - ts) > self.window_ms or ts < self.floor_ms:
            return None, "expired"
        verdict = self.guard.check(ts, mac, now_ms)
        if verdict == "full":
            return None, "replay_guard_full"
        return key, verdict


def relay_authenticator(mode: str, paths: Sequence[str], window: float = WINDOW,
                        ) -> Optional[Authenticator]:
    """The relay's authenticator from its configuration (None: `control_auth = "none"`,
    logged as a warning). With no `control_keys`, the keys of `default_key_dir()`, created
    on first start; a single configured directory without keys gets them too."""
    if mode == "none":
        log.warning('control_auth = "none": msgpack control requests are NOT authenticated; '
                    "every process that can reach the control socket (control_allow) can "
                    "create, change, list and end every call (docs/security.md)")
        return None
    if mode != "hmac":
        raise ConfigError(f'control_auth {mode!r} must be "hmac" or "none"')
    paths = list(paths) or [default_key_dir()]
    keys = load_keys(paths)
    if not keys and len(paths) == 1 and not paths[0].endswith(KEY_SUFFIX):
        try:
            created = ensure_keys(paths[0])
        except OSError as exc:
            raise KeyFileError(f"cannot create control keys in {paths[0]}: {exc.strerror}; "
                               "create the directory (mode 0700) or set control_keys") from None
        if created:
            log.warning("created control keys %s (mode 0600): lrkproxy ctl uses admin.key, "
                        "lrk.client and Kamailio's KEMI scripts client.key; give each SIP "
                        "proxy a key of its own (docs/security.md)", ", ".join(created))
        keys = load_keys(paths)
    if not keys:
        raise KeyFileError(f"control_keys {paths}: no key file (*.key) found; add one "
                           '(docs/security.md) or set control_auth = "none" to run without '
                           "authentication")
    log.info("control authentication: HMAC-SHA256, %d key(s): %s", len(keys),
             ", ".join(f"{k.id}{' (admin)' if k.admin else ''}" for k in keys))
    return Authenticator(keys, window)
