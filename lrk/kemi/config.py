"""The KEMI module's configuration: a small TOML file mapping the lrkproxy module's modparams.

Read once in Kamailio's main process (app_python3's mod_init) and checked there, so a bad
file stops Kamailio at start with one line naming the key; no socket is opened here (the
clients are made later, one per SIP worker process).

    [sets]                            # lrkproxy_sock: one list of nodes per set id
    0 = ["udp:127.0.0.1:22222"]
    algorithm = "linear"              # lrkp_alg 0 (linear) or 1 ("round-robin")
    timeout = 1.0                     # lrkproxy_tout: seconds per try
    retries = 5                       # lrkproxy_retr: tries per node
    disable_period = 60.0             # lrkproxy_disable_tout
    table_timeout = 3600.0            # hash_table_tout
    call_table = "lrk"                # Kamailio htable shared by all workers ("" = none)
    key = "/etc/kamailio/lrk/client.key"   # control key (default: $LRK_KEYS, /etc/lrk/keys)

Every other top-level key must be a keyword argument of `lrk.client.LrkClient` (what
later client versions add too); it is passed on as it is. The key is read here, once.
"""

from __future__ import annotations

import inspect
import re
import sys
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping

from lrk.client import ClientError, LrkClient
from lrk.client.protocol import NO_KEY, resolve_key
from lrk.control.auth import default_key_dir
from lrk.errors import ConfigError, LrkError

if sys.version_info >= (3, 11):
    import tomllib
else:  # PyPy 3.9
    import tomli as tomllib

#: LrkClient arguments that cannot come from a file (functions) or come from [sets]
_NOT_FROM_FILE = frozenset({"self", "sets", "clock", "transport_factory"})
#: keys of this module itself, not passed to the client
_OWN_KEYS = frozenset({"sets", "call_table"})
_HTABLE_NAME = re.compile(r"[A-Za-z0-9_]{1,64}\Z")


def client_options() -> List[str]:
    """The LrkClient keyword arguments a config file may set."""
    params = inspect.signature(LrkClient.__init__).parameters
    return [name for name, p in params.items()
            if name not in _NOT_FROM_FILE and p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)]


@dataclass(frozen=True)
class KemiConfig:
    """Node sets, the client's options and the htable that all Kamailio workers share."""

    sets: Dict[int, List[str]]
    client: Dict[str, Any] = field(default_factory=dict)
    call_table: str = "lrk"
    source: str = "<mapping>"

    def new_client(self, **extra: Any) -> LrkClient:
        """A client with this configuration (one per Kamailio worker process)."""
        options = dict(self.client)
        options.update(extra)
        return LrkClient({k: list(v) for k, v in self.sets.items()}, **options)

    @property
    def table_timeout(self) -> float:
        return float(self.client.get("table_timeout", 3600.0))

    @property
    def disable_period(self) -> float:
        return float(self.client.get("disable_period", 60.0))


def _sets(value: Any, where: str) -> Dict[int, List[str]]:
    if not isinstance(value, Mapping) or not value:
        raise ConfigError(f"{where}: [sets] must be a table of set id = [node, ...], e.g. "
                          '[sets] 0 = ["udp:127.0.0.1:22222"]')
    sets: Dict[int, List[str]] = {}
    for key, nodes in value.items():
        text = str(key).strip()
        if not text.isdigit():
            raise ConfigError(f"{where}: node set id {key!r} is not a number >= 0")
        if isinstance(nodes, str):
            nodes = [nodes]
        if not isinstance(nodes, list) or not nodes or \
                not all(isinstance(n, str) for n in nodes):
            raise ConfigError(f"{where}: set {text} must list node strings, e.g. "
                              '["udp:127.0.0.1:22222"], not ' + repr(nodes))
        sets[int(text)] = list(nodes)
    return sets


def from_mapping(data: Mapping[str, Any], source: str = "<mapping>") -> KemiConfig:
    """Check a parsed config and build a KemiConfig; ConfigError names the bad key."""
    if "sets" not in data:
        raise ConfigError(f"{source}: no [sets] table: which lrk relays should Kamailio use?")
    sets = _sets(data["sets"], source)
    call_table = data.get("call_table", "lrk")
    if not isinstance(call_table, str) or (call_table and not _HTABLE_NAME.match(call_table)):
        raise ConfigError(f"{source}: call_table {call_table!r} must be an htable name "
                          "(letters, digits, _) or \"\" for none")
    allowed = client_options()
    client: Dict[str, Any] = {}
    for key, value in data.items():
        if key in _OWN_KEYS:
            continue
        if key not in allowed:
            raise ConfigError(f"{source}: unknown key {key!r}; known: sets, call_table, "
                              f"{', '.join(allowed)}")
        client[key] = value
    if "key" in allowed:
        client["key"] = _signing_key(client.get("key"), source)
    # check every value as the workers' clients will take it: a client that cannot open
    # a socket (transports are made on a first request, and this one never makes any)
    try:
        LrkClient({k: list(v) for k, v in sets.items()}, transport_factory=_no_transport,
                  **client).close()
    except (ClientError, TypeError, ValueError) as exc:
        raise ConfigError(f"{source}: {exc}") from None
    return KemiConfig(sets, client, call_table, source)


def _no_transport(address: Any) -> Any:
    raise AssertionError(f"the configuration check must not reach {address}")


def _signing_key(key: Any, source: str) -> Any:
    """The key every worker signs with, read here, once, in Kamailio's main process (which
    still runs as the user that started Kamailio, before it drops privileges): a key file
    only root may read works. A missing key stops Kamailio: unsigned requests would only
    time out at the relay."""
    if isinstance(key, str) and key == NO_KEY:
        return key
    try:
        found = resolve_key(key)
    except (ClientError, LrkError) as exc:
        raise ConfigError(f"{source}: key: {exc}") from None
    if found is None:
        raise ConfigError(
            f"{source}: no lrk control key in {default_key_dir()}: the relays would drop "
            "every request. Set key = \"/path/to/client.key\" (a key the relay knows), or "
            "$LRK_KEYS for Kamailio, or key = \"none\" for relays with control_auth = "
            "\"none\" (docs/security.md)")
    return found


def load_config(path: str) -> KemiConfig:
    """Read and check the TOML file at `path`."""
    try:
        with open(path, "rb") as fh:
            data = tomllib.load(fh)
    except OSError as exc:
        raise ConfigError(f"lrk KEMI config {path!r}: {exc.strerror}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"lrk KEMI config {path!r} is not valid TOML: {exc}") from None
    return from_mapping(data, path)
