"""Prometheus metrics of a relay, served at `/metrics` (prometheus_client formats).

The relay's counters are one flat dict of dotted names (`lrk ctl stats` shows the same):
`control.requests.offer`, `media.forwarded.packets`, `sessions.expired.silence`, ...
`COUNTER_MAP` turns each into a Prometheus series with the prefix `lrk_` and labels where
names form a family (`media.dropped.unexpected_source` becomes
`lrk_media_dropped_packets_total{reason="unexpected_source"}`). A name the table does not
know is still exported, under its sanitized name (`lrk_<name with _ for .>_total`), and
logged once; a counter the relay did not report is absent, not a made-up zero.

The HTTP server runs in its own thread, never in the packet path. Given the relay's event
loop (`loop=`), each scrape runs `snapshot()` on that loop (one callback, the cost of
copying the counters and counting sessions by state), so the relay's dicts are never read
while the loop changes them; a loop that does not answer within `snapshot_timeout` gets
the scrape a 503.

    server = MetricsServer("127.0.0.1", 9103, snapshot, loop=asyncio.get_running_loop())
    host, port = server.start()
    server.observe_request("msgpack", "offer", 0.0004)  # control-request latency
    server.stop()

`snapshot()` returns a mapping:

    counters  {dotted name: number}   every counter of the relay (required)
    sessions  {state: count}          sessions now relayed by state (offered, early, answered)
    ports     {total, in_use, free, quarantined}: RTP/RTCP port *pairs*, as
              lrk.core.ports.AddressPorts.snapshot() gives them (every address)
    ports_by_address  {address: the same}  per relay address (optional)
    mode      "socket" | "kernel" | "nfqueue" | "packet" | "xdp"
    uptime    seconds since the relay started (optional)
    workers   worker processes (optional)

`relay_snapshot()` builds one from the relay's parts.
"""

from __future__ import annotations

import bisect
import concurrent.futures
import logging
import math
import platform
import re
import socket
import socketserver
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import (
    Any,
    Callable,
    Dict,
    Iterable,
    Iterator,
    List,
    Mapping,
    Optional,
    Sequence,
    Set,
    Tuple,
)

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.exposition import choose_encoder
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector, CollectorRegistry
from prometheus_client.utils import floatToGoString

from lrk import __version__

log = logging.getLogger("lrk.metrics")

PREFIX = "lrk_"

Snapshot = Mapping[str, Any]

# -- the mapping table -------------------------------------------------------------------
#: metric families: name (without prefix and _total) -> (type, labels, help)
FAMILIES: Dict[str, Tuple[str, Tuple[str, ...], str]] = {
    # control plane (msgpack protocol and legacy lrkproxy protocol)
    "control_requests": ("counter", ("protocol", "command"),
                         "Control requests executed, by protocol (msgpack, legacy) and command "
                         "(legacy: P ping, G config, S set, D delete)."),
    "control_errors": ("counter", ("protocol", "code"),
                       "Error replies to msgpack control requests, by error code."),
    "control_dropped": ("counter", ("protocol", "reason"),
                        "Control requests dropped without a reply, by reason."),
    "control_retransmissions": ("counter", ("protocol", "outcome"),
                                "Retransmitted control requests: replayed (answered from the "
                                "reply cache) or in_flight (dropped while the first copy runs)."),
    "control_send_errors": ("counter", ("protocol",),
                            "Control replies the socket refused (the client retransmits)."),
    "control_internal_errors": ("counter", ("protocol",),
                                "Control requests that failed with an internal error (a bug; "
                                "the log has a traceback)."),
    "legacy_sessions": ("counter", ("outcome",),
                        "Legacy S (set) commands by outcome: created, updated, unchanged, "
                        "refused."),
    "legacy_refused": ("counter", ("reason",),
                       "Legacy S commands refused before reaching the engine, by reason."),
    "legacy_conflicts": ("counter", ("outcome",),
                         "Legacy S commands naming relay ports another session holds: refused, "
                         "or replaced (the holder was silent)."),
    "legacy_ports_outside_range": ("counter", (),
                                   "Legacy S commands naming relay ports outside the port range."),
    # sessions and ports
    "sessions_created": ("counter", (), "Sessions created (rtpengine: sessions_total)."),
    "sessions_offers": ("counter", (), "Offers applied to sessions (new or existing)."),
    "sessions_answers": ("counter", (), "Answers applied to sessions."),
    "sessions_rebound": ("counter", (),
                         "Session legs moved to a new relay port (e.g. another interface)."),
    "sessions_ended": ("counter", ("reason",),
                       "Sessions ended, by reason: deleted (by the control layer), silence, "
                       "lifetime, replaced, failed (rtpengine: closed_sessions_total)."),
    "sessions_failed": ("counter", ("reason",),
                        "Sessions ended because the data plane could not serve them, by "
                        "failure (a breakdown of lrk_sessions_ended_total{reason=\"failed\"})."),
    "sessions_refused": ("counter", ("reason",),
                         "Offers refused, by reason (max_sessions: the configured limit)."),
    "sessions_restored": ("counter", ("outcome",),
                          "Sessions read back from the session store at start (a restart): "
                          "restored, or refused (its ports or Call-ID taken, unreadable)."),
    "store_operations": ("counter", ("outcome",),
                         "Session store writes: written, deleted, failed (the store is down or "
                         "full: the relay goes on, calls are kept in memory)."),
    "store_up": ("gauge", (), "1 while the session store takes writes, 0 while it is down "
                 "(Redis unreachable: calls go on in memory, the store catches up later)."),
    "store_pending": ("gauge", (), "Sessions changed while the store was down, waiting to be "
                      "written when it answers again."),
    "standby_peer_sessions": ("gauge", (), "Sessions of the nodes this one stands by for, "
                              "in its warm copy."),
    "takeover_sessions": ("counter", ("outcome",), "Sessions of a dead peer taken over "
                          "(adopted) or not (refused), and takeovers run (runs)."),
    "early_dialogs": ("counter", ("outcome",),
                      "Early dialogs of forked INVITEs beyond the first (a 183 with SDP from "
                      "another To-tag): created, won (its 200 OK picked it), freed (lost)."),
    "streams_removed": ("counter", (),
                        "Media streams taken out of sessions (a re-offer dropping or disabling "
                        "a media section); their ports are released."),
    "ports_exhausted": ("counter", (),
                        "Port allocations that failed: every RTP/RTCP pair in use or in "
                        "quarantine."),
    # data plane
    "media_forwarded_packets": ("counter", (), "Media packets (RTP and RTCP) forwarded "
                                "(rtpengine: packets_total)."),
    "media_forwarded_bytes": ("counter", (), "Media bytes (UDP payload) forwarded (rtpengine: "
                              "bytes_total)."),
    "media_received_packets": ("gauge", (),
                               "Kernel modes: media packets received by the sessions now "
                               "installed (falls when sessions end)."),
    "media_received_bytes": ("gauge", (),
                             "Kernel modes: media bytes received by the sessions now installed "
                             "(falls when sessions end)."),
    "media_latched": ("counter", (), "Media sources latched onto (a leg learning its peer)."),
    "media_latches": ("counter", ("kind",),
                      "Latches by kind: announced (first packet from the SDP's address), "
                      "learned (from another address: NAT), relatched (a new source after "
                      "the peer fell silent); together lrk_media_latched_total."),
    "media_dropped_packets": ("counter", ("reason",),
                              "Media packets dropped, by reason: unexpected_source (not the "
                              "leg's peer), no_destination (other leg has no address yet), "
                              "send_error, oversized (over 2048 bytes), unknown_flow (packet "
                              "mode: no session's port)."),
    "media_send_errors": ("counter", ("errno",), "Media send failures, by errno name."),
    "media_recv_errors": ("counter", ("errno",), "Media receive failures, by errno name."),
    "media_egress_packets": ("counter", ("path",),
                             "Packet mode: packets sent through the batched raw sockets (raw), "
                             "the AF_XDP sockets (xsk) or the relay's UDP sockets (fallback)."),
    "media_egress_xsk_kicks": ("counter", (),
                               "Packet mode over AF_XDP: TX kicks (one a socket a round)."),
    "media_egress_xsk_rejected_packets": ("counter", (),
                                          "Packet mode over AF_XDP: packets handed back to "
                                          "the UDP fallback."),
    "media_egress_xsk_errors": ("counter", ("reason",),
                                "Packet mode over AF_XDP: packets not sent by AF_XDP, by "
                                "reason (no_route: no usable neighbour yet; no_frame, "
                                "too_big, family)."),
    "xsk_sockets": ("gauge", (), "Packet mode over AF_XDP: AF_XDP sockets open."),
    "xsk_rx_slots": ("gauge", (), "Packet mode over AF_XDP: RX ring slots of the open "
                     "AF_XDP sockets (af_xdp_ring; 4 KiB of pinned memory each)."),
    "xsk_tx_checksum_sockets": ("gauge", ("by",),
                                "Packet mode over AF_XDP: sockets by who computes the UDP "
                                "checksums of frames sent (offload, kernel, worker)."),
    "xsk_dropped_packets": ("counter", ("reason",),
                            "Packet mode over AF_XDP: frames the kernel could not hand to "
                            "the sockets, by reason (rx_ring_full, fill_ring_empty: the "
                            "worker fell behind; other: too big for a frame)."),
    "xsk_open_failures": ("counter", (),
                          "Packet mode over AF_XDP: interfaces whose socket the worker could "
                          "not open (their media takes the kernel path)."),
    "xsk_steering_packets": ("counter", ("verdict",),
                             "Packet mode over AF_XDP: the steering programs' verdicts "
                             "(steered, pass_no_socket, pass_address, pass_port, "
                             "pass_fragment, pass_other)."),
    "media_egress_raw_calls": ("counter", (), "Packet mode: sendmmsg calls on the raw sockets."),
    "media_egress_raw_rejected_packets": ("counter", (),
                                          "Packet mode: packets the raw path handed back to "
                                          "the UDP fallback."),
    "media_egress_raw_errors": ("counter", ("errno",),
                                "Packet mode: raw socket send failures, by errno name."),
    "media_egress_raw_disabled": ("gauge", (),
                                  "Packet mode: 1 when raw egress is off (UDP fallback only)."),
    # workers and kernel adapters
    "worker_restarts": ("counter", (), "Worker processes restarted after dying."),
    "worker_channel_full": ("counter", (),
                            "Messages to a worker that waited because its channel was full."),
    "worker_channel_bad_messages": ("counter", (),
                                    "Worker messages the daemon could not decode or did not "
                                    "expect."),
    "worker_received_bad_messages": ("counter", (),
                                     "Daemon messages a worker could not decode or apply "
                                     "(summed over the workers)."),
    "plane_bind_failures": ("counter", (),
                            "Socket mode: relay ports that could not be bound at install."),
    "plane_no_descriptors": ("counter", (),
                             "Socket and packet modes: calls refused, or sessions failed, "
                             "for want of file descriptors (a worker at RLIMIT_NOFILE less "
                             "its reserve; raise LimitNOFILE)."),
    "plane_flush_timeouts": ("counter", (),
                             "Socket mode: counter flushes the workers were slow to answer."),
    "plane_no_worker": ("counter", (),
                        "Socket and packet modes: sessions failed because no media worker "
                        "was running (every one died and could not be restarted)."),
    "kernel_errors": ("counter", (), "Kernel modes: failed kernel reads and writes."),
    "kernel_sessions_installed": ("counter", (),
                                  "Kernel modes: sessions installed in the nftables maps."),
    "kernel_flows_flushed": ("counter", (),
                             "Kernel modes: conntrack flows flushed on delete or re-latch."),
    "kernel_flows_dumped": ("counter", (), "Kernel modes: conntrack flows read for latching."),
    "kernel_sessions_adopted": ("counter", (),
                                "Kernel modes: restored sessions whose elements an adopted "
                                "table held (restart without a media pause)."),
    "kernel_adopt_removed_elements": ("counter", (),
                                      "Kernel modes: elements of an adopted table that no "
                                      "restored session owned, deleted."),
    "kernel_adopt_flushed_marks": ("counter", (),
                                   "Kernel modes: ct marks of an adopted table's flows that "
                                   "no restored session owned, flushed."),
    "nfqueue_packets": ("counter", (), "nfqueue mode: first packets of flows seen."),
    "nfqueue_retried_batches": ("counter", (),
                                "nfqueue mode: queue batches whose element writes failed "
                                "as one transaction and were written decision by decision."),
    "nfqueue_requeued_packets": ("counter", (),
                                 "nfqueue mode: packets queued behind their flow's first "
                                 "one, re-injected once it was admitted."),
    "xdp_packets": ("counter", ("verdict",),
                    "xdp mode: packets the XDP program judged, by verdict and reason "
                    "(redirect, tx, pass_*, drop_*)."),
    "xdp_entries_written": ("counter", (), "xdp mode: stream entries written to the map."),
    "xdp_errors": ("counter", (), "xdp mode: failed XDP map writes and reads."),
    "nfqueue_queued_packets": ("counter", (),
                               "nfqueue mode: packets the ruleset queued to lrk."),
    "nfqueue_admitted_flows": ("counter", (), "nfqueue mode: flows admitted (latched)."),
    "nfqueue_verdict_errors": ("counter", (), "nfqueue mode: verdicts that failed."),
}

#: dotted counter name -> (family, labels). A name ending in ".*" matches every name one
#: or more components longer; the label whose value is "*" gets those components. Exact
#: names win over patterns, longer patterns over shorter.
COUNTER_MAP: Tuple[Tuple[str, str, Dict[str, str]], ...] = (
    ("control.requests.*", "control_requests", {"protocol": "msgpack", "command": "*"}),
    ("legacy.requests.*", "control_requests", {"protocol": "legacy", "command": "*"}),
    ("control.errors.*", "control_errors", {"protocol": "msgpack", "code": "*"}),
    ("control.dropped.*", "control_dropped", {"protocol": "msgpack", "reason": "*"}),
    ("legacy.dropped.*", "control_dropped", {"protocol": "legacy", "reason": "*"}),
    ("control.retransmissions", "control_retransmissions",
     {"protocol": "msgpack", "outcome": "replayed"}),
    ("control.retransmissions.in_flight", "control_retransmissions",
     {"protocol": "msgpack", "outcome": "in_flight"}),
    ("legacy.retransmissions", "control_retransmissions",
     {"protocol": "legacy", "outcome": "replayed"}),
    ("control.send_errors", "control_send_errors", {"protocol": "msgpack"}),
    ("legacy.send_errors", "control_send_errors", {"protocol": "legacy"}),
    ("control.internal_errors", "control_internal_errors", {"protocol": "msgpack"}),
    ("legacy.internal_errors", "control_internal_errors", {"protocol": "legacy"}),
    ("legacy.sessions.*", "legacy_sessions", {"outcome": "*"}),
    ("legacy.refused.*", "legacy_refused", {"reason": "*"}),
    ("legacy.conflicts.*", "legacy_conflicts", {"outcome": "*"}),
    ("legacy.ports_outside_range", "legacy_ports_outside_range", {}),
    ("sessions.created", "sessions_created", {}),
    ("sessions.offers", "sessions_offers", {}),
    ("sessions.answers", "sessions_answers", {}),
    ("sessions.rebound", "sessions_rebound", {}),
    ("sessions.deleted", "sessions_ended", {"reason": "deleted"}),
    ("sessions.expired.*", "sessions_ended", {"reason": "*"}),
    ("sessions.failed", "sessions_ended", {"reason": "failed"}),
    ("sessions.failed.*", "sessions_failed", {"reason": "*"}),
    ("sessions.refused.*", "sessions_refused", {"reason": "*"}),
    ("streams.removed", "streams_removed", {}),
    ("sessions.restored", "sessions_restored", {"outcome": "restored"}),
    ("sessions.restore_refused", "sessions_restored", {"outcome": "refused"}),
    ("store.*", "store_operations", {"outcome": "*"}),
    ("store.up", "store_up", {}),
    ("store.pending", "store_pending", {}),
    ("standby.peer_sessions", "standby_peer_sessions", {}),
    ("standby.refreshes", "store_operations", {"outcome": "standby_refreshes"}),
    ("takeover.runs", "takeover_sessions", {"outcome": "runs"}),
    ("takeover.sessions", "takeover_sessions", {"outcome": "adopted"}),
    ("takeover.refused", "takeover_sessions", {"outcome": "refused"}),
    ("sessions.early_dialogs", "early_dialogs", {"outcome": "created"}),
    ("sessions.early_dialogs.*", "early_dialogs", {"outcome": "*"}),
    ("ports.exhausted", "ports_exhausted", {}),
    ("media.forwarded.packets", "media_forwarded_packets", {}),
    ("media.forwarded.bytes", "media_forwarded_bytes", {}),
    ("media.received.packets", "media_received_packets", {}),
    ("media.received.bytes", "media_received_bytes", {}),
    ("media.latched", "media_latched", {}),
    ("media.latched.*", "media_latches", {"kind": "*"}),
    ("media.relatched", "media_latches", {"kind": "relatched"}),
    ("media.dropped.*", "media_dropped_packets", {"reason": "*"}),
    ("media.send_errors.*", "media_send_errors", {"errno": "*"}),
    ("media.recv_errors.*", "media_recv_errors", {"errno": "*"}),
    ("media.egress.raw.packets", "media_egress_packets", {"path": "raw"}),
    ("media.egress.fallback.packets", "media_egress_packets", {"path": "fallback"}),
    ("media.egress.raw.calls", "media_egress_raw_calls", {}),
    ("media.egress.raw.rejected", "media_egress_raw_rejected_packets", {}),
    ("media.egress.raw.errors.*", "media_egress_raw_errors", {"errno": "*"}),
    ("media.egress.raw.disabled", "media_egress_raw_disabled", {}),
    ("media.egress.xsk.packets", "media_egress_packets", {"path": "xsk"}),
    ("media.egress.xsk.calls", "media_egress_xsk_kicks", {}),
    ("media.egress.xsk.rejected", "media_egress_xsk_rejected_packets", {}),
    ("media.egress.xsk.errors.*", "media_egress_xsk_errors", {"reason": "*"}),
    ("media.xsk.sockets", "xsk_sockets", {}),
    ("media.xsk.rx_slots", "xsk_rx_slots", {}),
    ("media.xsk.open_failed", "xsk_open_failures", {}),
    ("media.xsk.tx_checksum.*", "xsk_tx_checksum_sockets", {"by": "*"}),
    ("media.xsk.dropped.*", "xsk_dropped_packets", {"reason": "*"}),
    ("media.xsk.not_ip", "media_dropped_packets", {"reason": "not_ip"}),
    *(("media.xsk." + v, "xsk_steering_packets", {"verdict": v}) for v in (
        "steered", "pass_no_socket", "pass_address", "pass_port", "pass_fragment",
        "pass_other")),
    ("workers.restarts", "worker_restarts", {}),
    ("workers.channel.full", "worker_channel_full", {}),
    ("workers.channel.bad_messages", "worker_channel_bad_messages", {}),
    ("worker.channel.bad_messages", "worker_received_bad_messages", {}),
    ("plane.bind_failures", "plane_bind_failures", {}),
    ("plane.no_descriptors", "plane_no_descriptors", {}),
    ("plane.flush_timeouts", "plane_flush_timeouts", {}),
    ("plane.no_worker", "plane_no_worker", {}),
    ("kernel.errors", "kernel_errors", {}),
    ("kernel.sessions.installed", "kernel_sessions_installed", {}),
    ("kernel.flows.flushed", "kernel_flows_flushed", {}),
    ("kernel.flows.dumped", "kernel_flows_dumped", {}),
    ("kernel.sessions.adopted", "kernel_sessions_adopted", {}),
    ("kernel.adopt.removed_elements", "kernel_adopt_removed_elements", {}),
    ("kernel.adopt.flushed_marks", "kernel_adopt_flushed_marks", {}),
    ("nfqueue.packets", "nfqueue_packets", {}),
    ("nfqueue.requeued", "nfqueue_requeued_packets", {}),
    ("nfqueue.batches.retried", "nfqueue_retried_batches", {}),
    ("xdp.verdicts.*", "xdp_packets", {"verdict": "*"}),
    ("xdp.entries.written", "xdp_entries_written", {}),
    ("xdp.errors", "xdp_errors", {}),
    ("nfqueue.queued", "nfqueue_queued_packets", {}),
    ("nfqueue.admitted", "nfqueue_admitted_flows", {}),
    ("nfqueue.verdict_errors", "nfqueue_verdict_errors", {}),
)

#: unknown names whose sanitized name is taken land here, labelled with the dotted name
UNMAPPED_FAMILY = "unmapped_counters"
UNMAPPED_HELP = ("Relay counters with no metric of their own whose sanitized name is taken "
                 "by another metric, by dotted counter name.")

#: control-request latency buckets (seconds): requests take 0.1-2 ms on an idle relay
REQUEST_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
                   0.25, 0.5, 1.0, 2.5)
#: distinct (protocol, command) series of the latency histogram; more go to command="other"
MAX_REQUEST_SERIES = 64
#: session states always shown (as 0 when none), so a dashboard's series never vanish
SESSION_STATES = ("offered", "early", "answered")

#: metric names the collector emits besides FAMILIES (no unknown counter may take them)
OWN_NAMES = ("build_info", "uptime_seconds", "workers", "sessions", "ports", "ports_used",
             "address_ports_used", "address_ports_free",
             "ports_free", "ports_quarantined", "control_request_duration_seconds",
             UNMAPPED_FAMILY)

_SANITIZE = re.compile(r"[^a-zA-Z0-9_]+")


def _check_table() -> Tuple[Dict[str, Tuple[str, Dict[str, str]]],
                            Dict[str, Tuple[str, Dict[str, str]]]]:
    exact: Dict[str, Tuple[str, Dict[str, str]]] = {}
    prefixes: Dict[str, Tuple[str, Dict[str, str]]] = {}
    for name, family, labels in COUNTER_MAP:
        kind, labelnames, _help = FAMILIES[family]
        if set(labels) != set(labelnames):
            raise AssertionError(f"COUNTER_MAP {name}: labels {sorted(labels)} are not "
                                 f"{family}'s {sorted(labelnames)}")
        wild = name.endswith(".*")
        if wild != ("*" in labels.values()):
            raise AssertionError(f"COUNTER_MAP {name}: a pattern needs one '*' label, an "
                                 "exact name none")
        table = prefixes if wild else exact
        key = name[:-2] if wild else name
        if key in table:
            raise AssertionError(f"COUNTER_MAP: {name} listed twice")
        table[key] = (family, labels)
    return exact, prefixes


_EXACT, _PREFIXES = _check_table()


def sanitize(name: str) -> str:
    """A dotted counter name as a Prometheus name part: runs of other characters than
    letters, digits and _ become one _."""
    return _SANITIZE.sub("_", name).strip("_") or "unnamed"


def map_counter(name: str) -> Optional[Tuple[str, Dict[str, str]]]:
    """(family, labels) for a dotted counter name, or None when the table lacks it."""
    hit = _EXACT.get(name)
    if hit is not None:
        return hit[0], dict(hit[1])
    parts = name.split(".")
    for i in range(len(parts) - 1, 0, -1):
        hit = _PREFIXES.get(".".join(parts[:i]))
        if hit is not None:
            rest = ".".join(parts[i:])
            family, labels = hit
            return family, {k: (rest if v == "*" else v) for k, v in labels.items()}
    return None


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not (isinstance(value, float)
                                                    and math.isnan(value))


def interpreter() -> str:
    """`cpython-3.11.2`, `pypy-3.9.16` (PyPy adds its own version: `pypy-3.9.16-7.3.11`)."""
    name = sys.implementation.name
    text = f"{name}-{platform.python_version()}"
    pypy = getattr(sys, "pypy_version_info", None)
    if pypy is not None:
        text += "-" + ".".join(str(p) for p in pypy[:3])
    return text


# -- the collector -----------------------------------------------------------------------
class RequestLatency:
    """A histogram of control-request latencies by protocol and command, cheap enough for
    the control path (a bisect and three additions under an uncontended lock)."""

    def __init__(self, buckets: Sequence[float] = REQUEST_BUCKETS,
                 max_series: int = MAX_REQUEST_SERIES) -> None:
        self.bounds = tuple(sorted(float(b) for b in buckets))
        self.max_series = max_series
        self._lock = threading.Lock()
        #: (protocol, command) -> [per-bucket counts (last: above every bound), sum]
        self._series: Dict[Tuple[str, str], List[Any]] = {}

    def observe(self, protocol: str, command: str, seconds: float) -> None:
        key = (protocol, command)
        index = bisect.bisect_left(self.bounds, seconds)  # le buckets: value <= bound
        with self._lock:
            entry = self._series.get(key)
            if entry is None:
                if len(self._series) >= self.max_series:
                    key = (protocol, "other")
                    entry = self._series.get(key)
                if entry is None:
                    entry = [[0] * (len(self.bounds) + 1), 0.0]
                    self._series[key] = entry
            entry[0][index] += 1
            entry[1] += seconds

    def family(self) -> Optional[Metric]:
        with self._lock:
            series = {key: (list(counts), total) for key, (counts, total)
                      in self._series.items()}
        if not series:
            return None
        fam = HistogramMetricFamily(
            PREFIX + "control_request_duration_seconds",
            "Time to execute a control request, from the datagram read to the reply "
            "(rtpengine: request_seconds_total).",
            labels=("protocol", "command"))
        for (protocol, command), (counts, total) in sorted(series.items()):
            cumulative = 0
            buckets = []
            for bound, n in zip(self.bounds, counts):
                cumulative += n
                buckets.append((floatToGoString(bound), cumulative))
            buckets.append(("+Inf", cumulative + counts[-1]))
            fam.add_metric([protocol, command], buckets, total)
        return fam


class RelayCollector(Collector):
    """Turns one `snapshot()` per scrape into metric families (see the module doc)."""

    def __init__(self, fetch: Callable[[], Snapshot],
                 latency: Optional[RequestLatency] = None, version: str = __version__) -> None:
        self.fetch = fetch
        self.latency = latency
        self.version = version
        self.interpreter = interpreter()
        self._reported: Set[str] = set()  # unknown names already logged

    def collect(self) -> Iterator[Metric]:
        snap = self.fetch()
        yield from self.families(snap)

    def families(self, snap: Snapshot) -> List[Metric]:
        out: List[Metric] = []
        info = GaugeMetricFamily(PREFIX + "build_info",
                                 "Always 1: the relay's version, data-plane mode and "
                                 "interpreter as labels.",
                                 labels=("version", "mode", "interpreter"))
        info.add_metric([self.version, str(snap.get("mode", "")), self.interpreter], 1)
        out.append(info)
        if snap.get("uptime") is not None:
            out.append(GaugeMetricFamily(PREFIX + "uptime_seconds",
                                         "Seconds since the relay started.",
                                         value=float(snap["uptime"])))
        if snap.get("workers") is not None:
            out.append(GaugeMetricFamily(PREFIX + "workers",
                                         "Worker processes forwarding media.",
                                         value=float(snap["workers"])))
        sessions = snap.get("sessions")
        if sessions is not None:
            fam = GaugeMetricFamily(PREFIX + "sessions",
                                    "Sessions now relayed, by state: offered (waiting for "
                                    "the answer), early (a provisional answer: early media) "
                                    "or answered (rtpengine: sessions).",
                                    labels=("state",))
            for state, n in sorted(sessions.items()):
                fam.add_metric([str(state)], float(n))
            out.append(fam)
        ports = snap.get("ports")
        if ports is not None:
            out.extend(self._ports(ports))
        by_address = snap.get("ports_by_address")
        if by_address:
            out.extend(self._address_ports(by_address))
        out.extend(self._counters(snap.get("counters") or {}))
        if self.latency is not None:
            fam = self.latency.family()
            if fam is not None:
                out.append(fam)
        return out

    @staticmethod
    def _ports(ports: Mapping[str, int]) -> Iterable[Metric]:
        names = (("total", "ports", "Media ports of the port range the relay allocates from."),
                 ("in_use", "ports_used", "Media ports held by sessions."),
                 ("free", "ports_free", "Media ports free for new sessions."),
                 ("quarantined", "ports_quarantined",
                  "Media ports resting after their session ended (or found taken by another "
                  "program) before reuse."))
        for key, name, text in names:
            if key in ports:
                # the allocator counts RTP/RTCP pairs; rtpengine's figures count ports
                yield GaugeMetricFamily(PREFIX + name, text + " Two per RTP/RTCP pair.",
                                        value=float(ports[key]) * 2)

    @staticmethod
    def _address_ports(by_address: Mapping[str, Mapping[str, int]]) -> Iterable[Metric]:
        """Ports per relay address: which address fills first (several per side)."""
        for key, name, text in (
                ("in_use", "address_ports_used", "Media ports held by sessions"),
                ("free", "address_ports_free", "Media ports free for new sessions")):
            fam = GaugeMetricFamily(PREFIX + name, text + " on each relay address (one "
                                    "range each with several addresses per side, else one "
                                    "shared range). Two per RTP/RTCP pair.",
                                    labels=("address",))
            for address, counts in sorted(by_address.items()):
                if key in counts:
                    fam.add_metric([str(address)], float(counts[key]) * 2)
            yield fam

    def _counters(self, counters: Mapping[str, Any]) -> List[Metric]:
        grouped: Dict[str, Dict[Tuple[str, ...], float]] = {}
        generic: Dict[str, Tuple[str, float]] = {}  # family -> (dotted name, value)
        unmapped: Dict[str, float] = {}
        taken = {PREFIX + f for f in FAMILIES} | {PREFIX + f for f in OWN_NAMES}
        for name in sorted(counters):
            value = counters[name]
            if not _is_number(value):
                self._report(name, f"counter {name!r} has a non-numeric value {value!r}; "
                             "not exported")
                continue
            hit = map_counter(name)
            why = "has no metric mapping"
            if hit is not None:
                family, labels = hit
                labelnames = FAMILIES[family][1]
                key = tuple(labels[n] for n in labelnames)
                series = grouped.setdefault(family, {})
                if key not in series:
                    series[key] = float(value)
                    continue
                # two names mapped onto one series: keep both, the second as if unknown
                why = "maps onto the series of another counter"
            fam_name = PREFIX + sanitize(name)
            if fam_name.endswith("_total"):
                fam_name = fam_name[:-6]
            if fam_name in taken or fam_name in generic:
                unmapped[name] = float(value)
                self._report(name, f"counter {name!r} {why}; exported as "
                             f"{PREFIX}{UNMAPPED_FAMILY}_total{{counter=\"{name}\"}}")
            else:
                generic[fam_name] = (name, float(value))
                self._report(name, f"counter {name!r} {why}; exported as {fam_name}_total")
        out: List[Metric] = []
        for family in sorted(grouped):
            kind, labelnames, text = FAMILIES[family]
            cls = CounterMetricFamily if kind == "counter" else GaugeMetricFamily
            fam = cls(PREFIX + family, text, labels=labelnames)
            for key, value in sorted(grouped[family].items()):
                fam.add_metric(list(key), value)
            out.append(fam)
        for fam_name in sorted(generic):
            name, value = generic[fam_name]
            out.append(CounterMetricFamily(fam_name, f"Relay counter {name} (no metric "
                                           "mapping yet).", value=value))
        if unmapped:
            fam = CounterMetricFamily(PREFIX + UNMAPPED_FAMILY, UNMAPPED_HELP,
                                      labels=("counter",))
            for name, value in sorted(unmapped.items()):
                fam.add_metric([name], value)
            out.append(fam)
        return out

    def _report(self, name: str, message: str) -> None:
        if name not in self._reported and len(self._reported) < 10000:
            self._reported.add(name)
            log.warning("%s", message)


def legacy_command(data: bytes, with_cookie: bool = True) -> Optional[str]:
    """The command letter (P, G, S or D) of a legacy lrkproxy request, for
    observe_request("legacy", ...); None for anything else, so junk makes no series."""
    body = data.partition(b" ")[2] if with_cookie else data.lstrip()
    letter = body[:1]
    if letter in (b"P", b"G", b"S", b"D") and body[1:2] in (b"", b" ", b"\r", b"\n", b"\0"):
        return letter.decode()
    return None


# -- the snapshot from the relay's parts ---------------------------------------------------
def relay_snapshot(engine: Any, mode: str, counters: Iterable[Mapping[str, Any]],
                   started: Optional[float] = None, workers: Optional[int] = None,
                   now: Optional[float] = None) -> Dict[str, Any]:
    """A snapshot from an lrk.core.engine.Engine (sessions, ports) and the counter dicts
    to merge, later ones winning (as `stats` merges them). `started` is a time.monotonic()
    reading taken at start."""
    merged: Dict[str, Any] = {}
    for part in counters:
        merged.update(part)
    states: Dict[str, int] = dict.fromkeys(SESSION_STATES, 0)
    for session in engine.sessions():
        states[session.state] = states.get(session.state, 0) + 1
    snap: Dict[str, Any] = {"counters": merged, "sessions": states,
                            "ports": engine.ports.snapshot(), "mode": mode}
    by_address = getattr(engine.ports, "by_address", None)
    if by_address is not None:
        snap["ports_by_address"] = by_address()
    if started is not None:
        snap["uptime"] = max(0.0, (time.monotonic() if now is None else now) - started)
    if workers is not None:
        snap["workers"] = workers
    return snap


# -- the HTTP server ---------------------------------------------------------------------
class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False  # stop() never waits for a slow client
    allow_reuse_address = True
    max_clients = 8

    def __init__(self, address: Tuple[str, int], owner: MetricsServer) -> None:
        self.address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        self.owner = owner
        self.clients = threading.BoundedSemaphore(self.max_clients)
        super().__init__(address, _Handler)

    def server_bind(self) -> None:
        # HTTPServer.server_bind would resolve the host's FQDN (a DNS query); not needed
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = self.server_address[:2]

    def handle_error(self, request: Any, client_address: Any) -> None:
        log.debug("metrics client %s: connection failed", client_address, exc_info=True)

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self.clients.acquire(blocking=False):  # a flood of scrapers: refuse
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except Exception:
            self.clients.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.clients.release()


class _Handler(BaseHTTPRequestHandler):
    server: _HTTPServer
    server_version = "lrk-metrics"
    protocol_version = "HTTP/1.0"
    timeout = 10.0  # a client that stalls mid-request is dropped

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        self._serve(body=True)

    def do_HEAD(self) -> None:  # noqa: N802
        self._serve(body=False)

    def _serve(self, body: bool) -> None:
        path = self.path.split("?", 1)[0]
        if path != "/metrics":
            self._reply(404, b"lrk serves its metrics at /metrics\n", "text/plain", body)
            return
        status, data, ctype = self.server.owner.render(self.headers.get("Accept", ""))
        self._reply(status, data, ctype, body)

    def _reply(self, status: int, data: bytes, ctype: str, body: bool) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if body:
            self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        log.debug("metrics %s: " + format, self.client_address[0], *args)


class MetricsServer:
    """Serves the relay's metrics at http://HOST:PORT/metrics from a thread of its own.

    `snapshot` is called once per scrape: on `loop` (the relay's event loop) when given,
    else in the server's thread. `port` 0 picks a free port (`start()` returns it).
    """

    def __init__(self, host: str, port: int, snapshot: Callable[[], Snapshot],
                 loop: Any = None, snapshot_timeout: float = 5.0,
                 process_metrics: bool = True) -> None:
        self.host = host
        self.port = port
        self.snapshot = snapshot
        self.loop = loop
        self.snapshot_timeout = snapshot_timeout
        self.latency = RequestLatency()
        self.registry = CollectorRegistry(auto_describe=False)
        self.collector = RelayCollector(self._fetch, self.latency)
        self.registry.register(self.collector)
        if process_metrics:  # process_* (CPU, memory, open fds of the daemon), python_info
            ProcessCollector(registry=self.registry)
            PlatformCollector(registry=self.registry)
        self._server: Optional[_HTTPServer] = None
        self._thread: Optional[threading.Thread] = None
        self._pending: Set[concurrent.futures.Future] = set()
        self._pending_lock = threading.Lock()
        self._closing = False

    @property
    def address(self) -> Optional[Tuple[str, int]]:
        """(host, port) while serving."""
        if self._server is None:
            return None
        host, port = self._server.server_address[:2]
        return host, port

    def start(self) -> Tuple[str, int]:
        """Bind (OSError when the address is taken) and serve; returns (host, port)."""
        if self._server is not None:
            raise RuntimeError("metrics server already started")
        self._closing = False
        server = _HTTPServer((self.host, self.port), self)
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, kwargs={
            "poll_interval": 0.1}, name="lrk-metrics", daemon=True)
        self._thread.start()
        address = self.address
        assert address is not None
        log.info("metrics at http://%s/metrics", _hostport(*address))
        return address

    def stop(self) -> None:
        """Stop serving; safe from the relay's loop (a scrape waiting for it gets a 503)."""
        server, self._server = self._server, None
        if server is None:
            return
        self._closing = True
        with self._pending_lock:
            pending = list(self._pending)
        for fut in pending:
            fut.cancel()
        server.shutdown()
        server.server_close()
        if self._thread is not None:
            self._thread.join(5.0)
            self._thread = None

    def observe_request(self, protocol: str, command: str, seconds: float) -> None:
        """Record one control request's latency (`lrk_control_request_duration_seconds`)."""
        self.latency.observe(protocol, command, seconds)

    # -- scrapes ---------------------------------------------------------------------
    def render(self, accept: str = "") -> Tuple[int, bytes, str]:
        """(HTTP status, body, content type) of one scrape; the Accept header picks the
        text format (0.0.4) or OpenMetrics."""
        encoder, ctype = choose_encoder(accept)
        try:
            return 200, encoder(self.registry), ctype
        except _Unavailable as exc:
            return 503, f"lrk metrics unavailable: {exc}\n".encode(), "text/plain"
        except Exception:
            log.exception("metrics scrape failed")
            return 500, b"lrk metrics failed; see the relay's log\n", "text/plain"

    def _fetch(self) -> Snapshot:
        if self.loop is None:
            return self.snapshot()
        if self._closing:
            raise _Unavailable("the relay is stopping")
        fut: concurrent.futures.Future = concurrent.futures.Future()

        def run() -> None:
            if not fut.set_running_or_notify_cancel():
                return
            try:
                fut.set_result(self.snapshot())
            except BaseException as exc:  # handed to the scraping thread
                fut.set_exception(exc)

        with self._pending_lock:
            self._pending.add(fut)
        try:
            try:
                self.loop.call_soon_threadsafe(run)
            except RuntimeError:  # the loop is closed
                raise _Unavailable("the relay's event loop is closed") from None
            try:
                return fut.result(self.snapshot_timeout)
            except concurrent.futures.CancelledError:
                raise _Unavailable("the relay is stopping") from None
            except concurrent.futures.TimeoutError:
                fut.cancel()
                raise _Unavailable(f"the relay's event loop did not answer within "
                                   f"{self.snapshot_timeout} s") from None
        finally:
            with self._pending_lock:
                self._pending.discard(fut)


class _Unavailable(Exception):
    pass


class NoMetrics:
    """Stands in for MetricsServer when `metrics = "off"`: the relay calls the same API."""

    address = None

    def start(self) -> None:
        return None

    def stop(self) -> None:
        return None

    def observe_request(self, protocol: str, command: str, seconds: float) -> None:
        return None


def _hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


__all__ = ["COUNTER_MAP", "FAMILIES", "MetricsServer", "NoMetrics", "RelayCollector",
           "RequestLatency", "legacy_command", "map_counter", "relay_snapshot", "sanitize"]
