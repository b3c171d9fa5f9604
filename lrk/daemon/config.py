"""Relay configuration: defaults, a TOML file, then command-line overrides; all validated."""

from __future__ import annotations

import ipaddress
import re
import socket
import sys
from dataclasses import dataclass, field, fields
from typing import Any, Dict, List, Optional, Tuple, Union

from netaddr import AddrFormatError, IPSet

from fastpath import jit
from fastpath.kernel.kernel_rules import COUNTER_SOURCES
from fastpath.worker.xsk import RING_DEFAULT, RING_MAX, RING_MIN, TX_CHECKSUM
from lrk.errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # PyPy 3.9
    import tomli as tomllib

MODES = ("socket", "kernel", "nfqueue", "packet", "xdp")
#: packet mode's ways in and out: AF_PACKET taps + raw sockets, or AF_XDP sockets
PACKET_IO = ("tap", "af_xdp")
#: relay addresses per side (internal_ips, external_ips)
MAX_ADDRESSES = 64
STORES = ("sqlite", "redis")
#: packet mode reads every session from one tap and sends with one sendmmsg per round, so
#: gathering packets for a moment pays off most there; socket mode gains too (fewer
#: wake-ups) but keeps 0 by default, its latency the lowest (docs/operations.md)
DEFAULT_COALESCE_US = {"packet": 500}
MAX_COALESCE_US = 5000
LOG_LEVELS = ("debug", "info", "warning", "error")
METRICS_OFF = ("off", "none", "")
#: max_control_rate's ceiling: far above what one control layer sends, low enough to mean a limit
MAX_CONTROL_RATE = 1_000_000.0
#: options that no longer exist, and what to use instead
RETIRED = {
    "control_token": "msgpack requests are now signed (HMAC-SHA256) with key files, and a "
                     "plaintext token is no longer accepted; remove control_token, keep "
                     "control_auth = \"hmac\" and give each client a key (control_keys, "
                     "docs/security.md)",
}


def _check_redis_url(url: str) -> None:
    """What redis-py makes of the URL at start, judged by --check-config already (a URL
    it cannot read would otherwise pass the check and then exit 1 at every restart)."""
    from redis.connection import parse_url

    try:
        parse_url(url)
    except ValueError as exc:
        raise ConfigError(f"redis_url {url!r}: {exc} (e.g. redis://127.0.0.1:6379/0 or "
                          "unix:///run/redis/redis.sock)") from None


@dataclass
class Config:
    """Every option of `lrkproxy run`; the TOML file uses the same names."""

    control: str = "127.0.0.1:22222"
    ports: str = "30000-40000"
    internal_ip: str = "127.0.0.1"
    external_ip: Optional[str] = None  # defaults to internal_ip
    # several relay addresses per side, each with its own port range (every mode; kernel,
    # nfqueue and xdp give each a ct mark slot): the first is internal_ip / external_ip;
    # empty = that one address only.
    # external_ips defaults to internal_ips (as external_ip to internal_ip)
    internal_ips: List[str] = field(default_factory=list)
    external_ips: List[str] = field(default_factory=list)
    mode: str = "socket"
    workers: int = 1
    batch: int = 64
    io: str = "auto"  # batched I/O: auto | mmsg | plain
    socket_rcvbuf: int = 1 << 20  # receive buffer per relay socket, bytes; 0 = kernel default
    # socket/packet worker: after a round that was not a full batch, wait this long (µs) so
    # the next wake-up carries more packets; adds at most that much latency.
    # -1: the mode's default (packet 500, others 0)
    coalesce_us: int = -1
    # PyPy JIT thresholds of the daemon and its workers (fastpath/jit.py): "tuned" compiles
    # hot paths after fewer calls, "pypy" keeps PyPy's defaults, or name=value,...
    pypy_jit: str = "tuned"
    kernel_table: str = "lrk"  # kernel mode: the nftables table (inet family) lrk owns
    kernel_poll: float = 2.0  # kernel mode: seconds between counter reads for expiry
    # kernel mode: per-leg media counters from conntrack accounting (sets the relay
    # namespace's net.netfilter.nf_conntrack_acct while running; established packets skip
    # the filter rules), from a per-packet nft counting rule ("rules", slower), or not at
    # all ("none": no sysctl touched, no per-packet conntrack extension; expiry as conntrack)
    kernel_counters: str = "conntrack"
    nfqueue_num: int = 0  # nfqueue mode: the queue number lrk reads
    nfqueue_bypass: bool = False  # nfqueue mode: accept new flows while lrk is not reading
    packet_interfaces: List[str] = field(default_factory=list)  # packet mode: taps
    # packet mode's I/O: "tap" (AF_PACKET taps, PREROUTING drop rules, raw-socket egress)
    # or "af_xdp" (an XDP program steers media into AF_XDP sockets; frames out of them)
    packet_io: str = "tap"
    # packet_io "af_xdp": who computes the UDP checksum of frames sent: "offload" (the
    # device, as for the kernel's own UDP packets; veth never, checksum-offloading NICs in
    # hardware, others the kernel), "kernel" (always the kernel, in software) or "worker"
    # (lrk, in Python: the fallback on kernels before 6.11, which lack TX metadata)
    af_xdp_checksum: str = "offload"
    # packet_io "af_xdp": RX slots of an interface, shared by its queues' sockets (a power
    # of two; each slot takes 4 KiB of pinned UMEM: 64 MiB an interface by default). What
    # a stall of the worker (a JIT compile, a GC pause) can be covered by without loss
    af_xdp_ring: int = RING_DEFAULT
    # xdp mode (kernel mode + an XDP program carrying established streams): the media
    # interfaces it attaches to, how (auto: native where the driver allows, else generic),
    # and how many stream directions its maps hold (4 per audio stream)
    xdp_interfaces: List[str] = field(default_factory=list)
    xdp_attach: str = "auto"
    xdp_max_streams: int = 65536
    silence_timeout: float = 60.0
    max_lifetime: float = 10800.0
    quarantine: float = 5.0
    max_sessions: int = 0
    control_allow: List[str] = field(default_factory=lambda: ["127.0.0.0/8", "::1/128"])
    # msgpack control authentication: "hmac" (every request signed, docs/security.md) or
    # "none" (anyone inside control_allow may do anything; logged as a warning)
    control_auth: str = "hmac"
    # key directories and/or key files; empty: lrk.control.auth.default_key_dir()
    # ($LRK_KEYS, /etc/lrk/keys as root, else ~/.config/lrk/keys), created on first start
    control_keys: List[str] = field(default_factory=list)
    # seconds a signed request's timestamp may differ from the relay's clock
    control_auth_window: float = 30.0
    # legacy lrkproxy protocol (Kamailio's module): HOST:PORT, [IPv6]:PORT, unix:/path
    legacy: List[str] = field(default_factory=lambda: ["127.0.0.1:22333"])
    legacy_allow: List[str] = field(default_factory=lambda: ["127.0.0.0/8", "::1/128"])
    legacy_takeover_idle: float = 30.0
    legacy_timeout: float = 0.0  # > 0: silence timeout for legacy sessions instead of S's field
    log_level: str = "warning"
    log_format: str = "kv"  # kv | json
    # Prometheus /metrics endpoint: HOST:PORT or [IPv6]:PORT; "off" (or "") serves none
    metrics: str = "off"
    # control listeners (msgpack and legacy): requests per second accepted from one source
    # address (IP); 0 = no limit
    max_control_rate: float = 0.0
    # media admission: false = a leg learns its peer from the first packet (NAT, as
    # rtpengine and rtpproxy do); true = only from the address its SDP announced
    strict_source: bool = False
    # a learning leg's latched peer may be replaced by a new source once silent this long
    relearn_after: float = 3.0
    # sessions survive a restart: kept in a SQLite file under this directory (one file per
    # relay, named after its control address and ports); "" = sessions die with the process
    state_dir: str = ""
    # where sessions are kept: "sqlite" (a file under state_dir, this host only) or
    # "redis" (redis_url; nodes that stand by for each other share one Redis)
    store: str = "sqlite"
    redis_url: str = ""
    # this node's name in the shared store (keys lrk:<node_id>:session:<sid>); "" = derived
    # from the host name and the control address
    node_id: str = ""
    # nodes whose calls this one keeps a warm copy of and takes over (store = "redis")
    standby_for: List[str] = field(default_factory=list)
    # seconds between reads of the peers' generation counters and local addresses
    standby_poll: float = 0.5
    # kernel/xdp/nfqueue/packet modes: the media addresses and port ranges of the standby_for nodes
    # ("ADDR:START-END", "[V6]:START-END"): the ruleset is built for them from the start,
    # so taken-over calls (which keep the peer's addresses and ports) are served at once
    standby_media: List[str] = field(default_factory=list)
    # more msgpack control addresses (HOST:PORT), bound with IP_FREEBIND: an address
    # keepalived moves (here now, or only after a takeover), so the control layer reaches
    # a node's calls at the same control address wherever they are served
    control_extra: List[str] = field(default_factory=list)

    # -- derived ---------------------------------------------------------------------
    @property
    def node_name(self) -> str:
        """node_id, or host name and control address (one name per relay on a host)."""
        if self.node_id:
            return self.node_id
        return re.sub(r"[^A-Za-z0-9._-]+", "_",
                      f"{socket.gethostname()}-{self.control}").strip("_")

    @property
    def port_range(self) -> Tuple[int, int]:
        return parse_ports(self.ports)

    @property
    def standby_media_ranges(self) -> List[Tuple[str, int, int]]:
        """`standby_media` parsed: (address, first port, last port) per entry."""
        out: List[Tuple[str, int, int]] = []
        if not isinstance(self.standby_media, list):
            raise ConfigError(f"standby_media {self.standby_media!r} must be a list of "
                              "\"ADDR:START-END\" strings")
        for item in self.standby_media:
            if not isinstance(item, str) or ":" not in item:
                raise ConfigError(f"standby_media entry {item!r} must be \"ADDR:START-END\" "
                                  "(IPv6: \"[ADDR]:START-END\")")
            host, _, ports = item.rpartition(":")
            host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
            try:
                ip = str(ipaddress.ip_address(host))
            except ValueError:
                raise ConfigError(f"standby_media entry {item!r}: {host!r} is not an IP "
                                  "address") from None
            start, end = parse_ports(ports)
            out.append((ip, start, end))
        return out

    @property
    def control_addr(self) -> Union[Tuple[str, int], str]:
        """(host, port) for UDP, or a filesystem path for `unix:PATH` (datagram socket)."""
        if self.control.startswith("unix:"):
            path = self.control[5:]
            if not path.startswith("/"):
                raise ConfigError(f"control {self.control!r}: unix: needs an absolute path")
            return path
        return parse_hostport(self.control, "control")

    @property
    def control_extra_addrs(self) -> List[Tuple[str, int]]:
        return [parse_hostport(a, "control_extra") for a in self.control_extra]

    @property
    def metrics_addr(self) -> Optional[Tuple[str, int]]:
        """(host, port) of the /metrics endpoint, or None when it is off."""
        if not isinstance(self.metrics, str):
            raise ConfigError(f"metrics {self.metrics!r} must be HOST:PORT or \"off\"")
        if self.metrics.strip().lower() in METRICS_OFF:
            return None
        return parse_hostport(self.metrics.strip(), "metrics")

    @property
    def allow_set(self) -> IPSet:
        return _ipset(self.control_allow, "control_allow")

    @property
    def legacy_allow_set(self) -> IPSet:
        return _ipset(self.legacy_allow, "legacy_allow")

    @property
    def legacy_addrs(self) -> List[Union[Tuple[str, int], str]]:
        """Legacy listeners: (host, port) for UDP/UDP6, a path for a UNIX stream socket."""
        if not isinstance(self.legacy, list) or not all(isinstance(a, str) for a in self.legacy):
            raise ConfigError(f"legacy {self.legacy!r} must be a list of addresses")
        out: List[Union[Tuple[str, int], str]] = []
        for text in self.legacy:
            if text in ("off", "none", ""):
                continue
            if text.startswith("unix:"):
                if not text[5:].startswith("/"):
                    raise ConfigError(f"legacy {text!r}: unix: needs an absolute path")
                out.append(text[5:])
            else:
                for prefix in ("udp6:", "udp:"):
                    if text.startswith(prefix):
                        text = text[len(prefix):]
                out.append(parse_hostport(text, "legacy"))
        return out

    def validate(self) -> Config:
        self._validate_addresses()
        start, end = self.port_range
        if start + (start & 1) + 3 > end:
            raise ConfigError(f"ports {self.ports!r}: the range needs room for two RTP/RTCP "
                              "pairs (at least 4 ports)")
        self.control_addr  # noqa: B018 - validates
        self.allow_set  # noqa: B018 - validates
        self.legacy_allow_set  # noqa: B018 - validates
        self.legacy_addrs  # noqa: B018 - validates
        if self.mode not in MODES:
            raise ConfigError(f"mode {self.mode!r} is not available; choose one of "
                              + ", ".join(MODES))
        if self.mode == "packet":
            if not self.packet_interfaces or not all(
                    isinstance(i, str) and i for i in self.packet_interfaces):
                raise ConfigError("packet mode needs packet_interfaces: the interfaces whose "
                                  "media lrk taps (e.g. --packet-interface eth0)")
            if self.workers != 1:
                raise ConfigError("packet mode runs one worker (every tap sees every packet)")
            if self.packet_io not in PACKET_IO:
                raise ConfigError(f"packet_io {self.packet_io!r} is not one of "
                                  + ", ".join(PACKET_IO))
        if self.af_xdp_checksum not in TX_CHECKSUM:
            raise ConfigError(f"af_xdp_checksum {self.af_xdp_checksum!r} is not one of "
                              + ", ".join(TX_CHECKSUM))
        ring = self.af_xdp_ring
        if ring & (ring - 1) or not RING_MIN <= ring <= RING_MAX:  # an int: load() checks types
            raise ConfigError(f"af_xdp_ring {ring!r} must be a power of two within "
                              f"{RING_MIN}..{RING_MAX} (RX slots of an interface; "
                              f"{RING_DEFAULT} by default)")
        if self.mode == "xdp" and (not self.xdp_interfaces or not all(
                isinstance(i, str) and i for i in self.xdp_interfaces)):
            raise ConfigError("xdp mode needs xdp_interfaces: the media interfaces the "
                              "XDP program attaches to (e.g. --xdp-interface eth0)")
        if self.xdp_attach not in ("auto", "native", "generic"):
            raise ConfigError(f"xdp_attach {self.xdp_attach!r} must be auto, native or generic")
        if isinstance(self.xdp_max_streams, bool) or not isinstance(self.xdp_max_streams, int) \
                or not 16 <= self.xdp_max_streams <= 1 << 22:
            raise ConfigError(f"xdp_max_streams {self.xdp_max_streams!r} must be within "
                              "16..4194304")
        if self.kernel_counters not in COUNTER_SOURCES:
            raise ConfigError(f"kernel_counters {self.kernel_counters!r} must be conntrack "
                              "(counted by conntrack accounting), none (not counted: "
                              "cheapest) or rules (counted by nftables)")
        if self.io not in ("auto", "mmsg", "plain"):
            raise ConfigError(f"io {self.io!r} must be auto, mmsg or plain")
        if not 1 <= self.workers <= 64:
            raise ConfigError(f"workers {self.workers} must be within 1..64")
        if not 0 <= self.socket_rcvbuf <= 1 << 30:
            raise ConfigError(f"socket_rcvbuf {self.socket_rcvbuf} must be within 0..1073741824")
        try:
            jit.resolve(self.pypy_jit)
        except jit.JitParamError as exc:
            raise ConfigError(str(exc)) from exc
        if self.coalesce_us == -1:
            self.coalesce_us = DEFAULT_COALESCE_US.get(self.mode, 0)
        if not 0 <= self.coalesce_us <= MAX_COALESCE_US:
            raise ConfigError(f"coalesce_us {self.coalesce_us} must be within "
                              f"0..{MAX_COALESCE_US} (it is added to every packet's latency)")
        if not isinstance(self.strict_source, bool):
            raise ConfigError(f"strict_source {self.strict_source!r} must be true or false")
        if not isinstance(self.state_dir, str):
            raise ConfigError(f"state_dir must be a directory path (a string), not "
                              f"{self.state_dir!r}")
        if self.store not in STORES:
            raise ConfigError(f"store {self.store!r} must be \"sqlite\" (a file under "
                              "state_dir) or \"redis\" (redis_url, shared by nodes)")
        if self.store == "redis" and not (isinstance(self.redis_url, str) and self.redis_url):
            raise ConfigError("store = \"redis\" needs redis_url (e.g. "
                              "redis://127.0.0.1:6379/0 or unix:///run/redis/redis.sock)")
        if self.store == "redis":
            _check_redis_url(self.redis_url)
        if not isinstance(self.node_id, str) or ":" in self.node_id:
            raise ConfigError(f"node_id {self.node_id!r} must be a name without ':'")
        if not isinstance(self.standby_for, list) or not all(
                isinstance(p, str) and p and ":" not in p for p in self.standby_for):
            raise ConfigError(f"standby_for {self.standby_for!r} must be a list of node_id "
                              "names")
        if self.standby_for and self.store != "redis":
            raise ConfigError("standby_for needs store = \"redis\": the peers' sessions are "
                              "read from the shared Redis")
        if self.node_id and self.node_id in self.standby_for:
            raise ConfigError(f"standby_for names this node itself ({self.node_id!r})")
        if not isinstance(self.control_extra, list):
            raise ConfigError(f"control_extra {self.control_extra!r} must be a list of "
                              "HOST:PORT control addresses")
        self.control_extra_addrs  # noqa: B018 - validates
        media = self.standby_media_ranges
        own = self.port_range
        for ip, start, end in media:
            if not (end < own[0] or start > own[1]):
                raise ConfigError(f"standby_media {ip}:{start}-{end} overlaps this node's "
                                  f"ports {self.ports!r}: nodes need disjoint port ranges")
        if media and not self.standby_for:
            raise ConfigError("standby_media names a peer's media, but standby_for is empty")
        poll = self.standby_poll
        if isinstance(poll, bool) or not isinstance(poll, (int, float)) or not (
                0.05 <= poll <= 60):
            raise ConfigError(f"standby_poll {poll!r} must be within 0.05..60 seconds")
        if isinstance(self.relearn_after, bool) or not isinstance(
                self.relearn_after, (int, float)) or not 0 < self.relearn_after <= 3600:
            raise ConfigError(f"relearn_after {self.relearn_after!r} must be within 0..3600 "
                              "seconds (and not 0)")
        if not 1 <= self.batch <= 1024:
            raise ConfigError(f"batch {self.batch} must be within 1..1024")
        if self.silence_timeout <= 0:
            raise ConfigError("silence_timeout must be positive (seconds)")
        if self.max_lifetime < 0 or self.quarantine < 0 or self.max_sessions < 0:
            raise ConfigError("max_lifetime, quarantine and max_sessions must not be negative")
        if self.log_level not in LOG_LEVELS:
            raise ConfigError(f"log_level {self.log_level!r}: choose one of "
                              + ", ".join(LOG_LEVELS))
        if self.log_format not in ("kv", "json"):
            raise ConfigError(f"log_format {self.log_format!r} must be kv or json")
        self.metrics_addr  # noqa: B018 - validates
        rate = self.max_control_rate
        if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not (
                0 <= rate <= MAX_CONTROL_RATE):  # NaN fails every comparison
            raise ConfigError(f"max_control_rate {rate!r} must be a number of requests per "
                              f"second within 0..{MAX_CONTROL_RATE:.0f} (0 = no limit)")
        self.max_control_rate = float(rate)
        if self.control_auth not in ("hmac", "none"):
            raise ConfigError(f"control_auth {self.control_auth!r} must be \"hmac\" (signed "
                              "requests, the default) or \"none\" (no authentication)")
        if not isinstance(self.control_keys, list) or not all(
                isinstance(p, str) and p for p in self.control_keys):
            raise ConfigError(f"control_keys {self.control_keys!r} must be a list of key "
                              "directories or key files")
        window = self.control_auth_window
        if isinstance(window, bool) or not isinstance(window, (int, float)) or not (
                0 < window <= 300):
            raise ConfigError(f"control_auth_window {window!r} must be within 0..300 seconds "
                              "(and not 0)")
        self.control_auth_window = float(window)
        return self


    def _validate_addresses(self) -> None:
        """internal_ip(s) / external_ip(s): one list per side whose first entry is the
        single-address option, every address literal, one family per side."""
        external_default = self.external_ip is None and not self.external_ips
        for side in ("internal", "external"):
            many = getattr(self, f"{side}_ips")
            if not isinstance(many, list) or not all(isinstance(a, str) for a in many):
                raise ConfigError(f"{side}_ips {many!r} must be a list of IP addresses")
            if not many:
                continue
            one = getattr(self, f"{side}_ip")
            default = "127.0.0.1" if side == "internal" else None
            if one not in (default, many[0]):
                raise ConfigError(f"{side}_ip {one!r} and {side}_ips {many!r} disagree: "
                                  f"{side}_ip is the first of {side}_ips; set one of them")
            setattr(self, f"{side}_ip", many[0])
        if self.external_ip is None:
            self.external_ip = self.internal_ip
        if external_default:
            self.external_ips = list(self.internal_ips)
        for side in ("internal", "external"):
            one = getattr(self, f"{side}_ip")
            try:
                setattr(self, f"{side}_ip", str(ipaddress.ip_address(one)))
            except ValueError:
                raise ConfigError(f"{side}_ip {one!r} is not an IP address") from None
            many = getattr(self, f"{side}_ips") or [getattr(self, f"{side}_ip")]
            parsed = []
            for value in many:
                try:
                    parsed.append(ipaddress.ip_address(value))
                except ValueError:
                    raise ConfigError(f"{side}_ips: {value!r} is not an IP address") from None
            if len(set(parsed)) != len(parsed):
                raise ConfigError(f"{side}_ips {many!r} names an address twice")
            if len({a.version for a in parsed}) > 1:
                raise ConfigError(f"{side}_ips {many!r} mixes IPv4 and IPv6: a side's "
                                  "addresses must be of one family (a leg may get any of them)")
            if len(parsed) > MAX_ADDRESSES:
                raise ConfigError(f"{side}_ips: {len(parsed)} addresses, at most "
                                  f"{MAX_ADDRESSES} per side")
            setattr(self, f"{side}_ips", [str(a) for a in parsed])

    @property
    def several_addresses(self) -> bool:
        """Whether a side has more than one relay address: then every address has a port
        space of its own (and, in kernel, nfqueue and xdp modes, a ct mark slot)."""
        return max(len(self.internal_ips), len(self.external_ips)) > 1

    @property
    def mark_slots(self) -> List[str]:
        """Kernel, nfqueue and xdp modes: the addresses in mark-slot order (slot = index,
        ct mark = port + slot * 0x10000), empty with one address per side (mark = port,
        one port space over the relay's addresses, as before several were possible)."""
        return self.relay_addresses if self.several_addresses else []

    @property
    def relay_addresses(self) -> List[str]:
        """Every relay address, internal side first, each once."""
        internal = self.internal_ips or [self.internal_ip]
        external = self.external_ips or (
            [self.external_ip] if self.external_ip else internal)
        return list(dict.fromkeys(internal + external))


def _ipset(networks: Any, name: str) -> IPSet:
    if not isinstance(networks, list) or not all(isinstance(n, str) for n in networks):
        raise ConfigError(f"{name} {networks!r} must be a list of network strings such as "
                          "\"127.0.0.0/8\"")
    try:
        return IPSet(networks)
    except (AddrFormatError, ValueError, TypeError) as exc:
        raise ConfigError(f"{name} {networks!r} is not a list of networks: {exc}") from None


def parse_ports(text: str) -> Tuple[int, int]:
    try:
        start_s, end_s = str(text).split("-", 1)
        start, end = int(start_s), int(end_s)
    except ValueError:
        raise ConfigError(f"ports {text!r} must look like START-END, e.g. 30000-40000") from None
    if not (1024 <= start <= end <= 65535):
        raise ConfigError(f"ports {text!r} must lie within 1024-65535 with START <= END")
    return start, end


def parse_hostport(text: str, what: str) -> Tuple[str, int]:
    """`HOST:PORT` or `[IPv6]:PORT` with a literal IP address."""
    text = str(text)
    if text.startswith("["):
        host, sep, port_s = text[1:].partition("]:")
    else:
        host, sep, port_s = text.rpartition(":")
    if not sep or not port_s.isdigit() or not 0 < int(port_s) <= 65535:
        raise ConfigError(f"{what} {text!r} must be HOST:PORT or [IPv6]:PORT")
    try:
        host = str(ipaddress.ip_address(host))
    except ValueError:
        raise ConfigError(f"{what} {text!r}: {host!r} is not an IP address") from None
    return host, int(port_s)


def load(path: Optional[str], overrides: Dict[str, Any]) -> Config:
    """Defaults < TOML file < command line; unknown keys and wrong types are errors."""
    values: Dict[str, Any] = {}
    if path:
        try:
            with open(path, "rb") as fh:
                data = tomllib.load(fh)
        except OSError as exc:
            raise ConfigError(f"config file {path!r}: {exc.strerror}") from None
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError(f"config file {path!r} is not valid TOML: {exc}") from None
        if "lrk" in data:  # options may sit in an [lrk] table, or at the top level
            table = data.pop("lrk")
            if not isinstance(table, dict):
                raise ConfigError(f"config file {path!r}: 'lrk' must be a table ([lrk])")
            clash = sorted(set(table) & set(data))
            if clash:
                raise ConfigError(f"config file {path!r}: {', '.join(clash)} set both at the "
                                  "top level and in [lrk]")
            data.update(table)
        values.update(data)
    values.update({k: v for k, v in overrides.items() if v is not None})
    known = {f.name: f for f in fields(Config)}
    config = Config()
    for key, value in values.items():
        name = key.replace("-", "_")
        if name in RETIRED:
            raise ConfigError(f"option {key!r} is gone: {RETIRED[name]}")
        if name not in known:
            raise ConfigError(f"unknown option {key!r}; known: " + ", ".join(sorted(known)))
        default = getattr(config, name)
        expected = type(default) if default is not None else str
        if expected is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if expected is int and isinstance(value, float) and value.is_integer():
            value = int(value)
        if not isinstance(value, expected) or isinstance(value, bool) != (expected is bool):
            raise ConfigError(f"option {key!r} must be of type {expected.__name__}, "
                              f"not {type(value).__name__} ({value!r})")
        setattr(config, name, value)
    return config.validate()
