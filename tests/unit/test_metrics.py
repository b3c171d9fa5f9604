"""Unit tests of lrk.daemon.metrics: the counter mapping, the exposition (parsed back with
prometheus_client's parsers), the latency histogram and the HTTP endpoint."""

from __future__ import annotations

import asyncio
import re
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from prometheus_client.openmetrics.parser import (
    text_string_to_metric_families as openmetrics_families,
)
from prometheus_client.parser import text_string_to_metric_families

from fastpath.worker.relay_table import DROP_NAMES
from lrk import __version__
from lrk.control.legacy import LEGACY_COUNTERS
from lrk.control.msgpack_proto import COMMANDS, ERROR_CODES
from lrk.core.engine import ENGINE_COUNTERS, Engine, EngineConfig
from lrk.daemon import metrics
from lrk.daemon.metrics import (
    COUNTER_MAP,
    FAMILIES,
    MetricsServer,
    NoMetrics,
    RelayCollector,
    RequestLatency,
    legacy_command,
    map_counter,
    relay_snapshot,
    sanitize,
)

ROOT = Path(__file__).resolve().parents[2]
DEADLINE = 10.0  # bound of every wait below; none is expected to come near it

#: dotted counter -> (sample name, labels): the names dashboards and alerts rely on
EXPECTED = {
    "control.requests.offer": ("lrk_control_requests_total",
                               {"protocol": "msgpack", "command": "offer"}),
    "control.requests.stats": ("lrk_control_requests_total",
                               {"protocol": "msgpack", "command": "stats"}),
    "legacy.requests.S": ("lrk_control_requests_total", {"protocol": "legacy", "command": "S"}),
    "control.errors.not_found": ("lrk_control_errors_total",
                                 {"protocol": "msgpack", "code": "not_found"}),
    "control.dropped.not_allowed": ("lrk_control_dropped_total",
                                    {"protocol": "msgpack", "reason": "not_allowed"}),
    "control.dropped.too_short": ("lrk_control_dropped_total",
                                  {"protocol": "msgpack", "reason": "too_short"}),
    "legacy.dropped.malformed": ("lrk_control_dropped_total",
                                 {"protocol": "legacy", "reason": "malformed"}),
    "legacy.dropped.stream_timeout": ("lrk_control_dropped_total",
                                      {"protocol": "legacy", "reason": "stream_timeout"}),
    "control.retransmissions": ("lrk_control_retransmissions_total",
                                {"protocol": "msgpack", "outcome": "replayed"}),
    "control.retransmissions.in_flight": ("lrk_control_retransmissions_total",
                                          {"protocol": "msgpack", "outcome": "in_flight"}),
    "legacy.retransmissions": ("lrk_control_retransmissions_total",
                               {"protocol": "legacy", "outcome": "replayed"}),
    "control.send_errors": ("lrk_control_send_errors_total", {"protocol": "msgpack"}),
    "legacy.send_errors": ("lrk_control_send_errors_total", {"protocol": "legacy"}),
    "control.internal_errors": ("lrk_control_internal_errors_total", {"protocol": "msgpack"}),
    "legacy.internal_errors": ("lrk_control_internal_errors_total", {"protocol": "legacy"}),
    "legacy.sessions.created": ("lrk_legacy_sessions_total", {"outcome": "created"}),
    "legacy.sessions.refused": ("lrk_legacy_sessions_total", {"outcome": "refused"}),
    "legacy.refused.bad_relay_address": ("lrk_legacy_refused_total",
                                         {"reason": "bad_relay_address"}),
    "legacy.conflicts.replaced": ("lrk_legacy_conflicts_total", {"outcome": "replaced"}),
    "legacy.ports_outside_range": ("lrk_legacy_ports_outside_range_total", {}),
    "sessions.created": ("lrk_sessions_created_total", {}),
    "sessions.offers": ("lrk_sessions_offers_total", {}),
    "sessions.answers": ("lrk_sessions_answers_total", {}),
    "sessions.rebound": ("lrk_sessions_rebound_total", {}),
    "sessions.deleted": ("lrk_sessions_ended_total", {"reason": "deleted"}),
    "sessions.expired.silence": ("lrk_sessions_ended_total", {"reason": "silence"}),
    "sessions.expired.lifetime": ("lrk_sessions_ended_total", {"reason": "lifetime"}),
    "sessions.failed": ("lrk_sessions_ended_total", {"reason": "failed"}),
    "sessions.failed.bind": ("lrk_sessions_failed_total", {"reason": "bind"}),
    "sessions.refused.max_sessions": ("lrk_sessions_refused_total", {"reason": "max_sessions"}),
    "streams.removed": ("lrk_streams_removed_total", {}),
    "ports.exhausted": ("lrk_ports_exhausted_total", {}),
    "media.forwarded.packets": ("lrk_media_forwarded_packets_total", {}),
    "media.forwarded.bytes": ("lrk_media_forwarded_bytes_total", {}),
    "media.received.packets": ("lrk_media_received_packets", {}),
    "media.received.bytes": ("lrk_media_received_bytes", {}),
    "media.latched": ("lrk_media_latched_total", {}),
    "media.latched.announced": ("lrk_media_latches_total", {"kind": "announced"}),
    "media.latched.learned": ("lrk_media_latches_total", {"kind": "learned"}),
    "media.relatched": ("lrk_media_latches_total", {"kind": "relatched"}),
    "media.dropped.unexpected_source": ("lrk_media_dropped_packets_total",
                                        {"reason": "unexpected_source"}),
    "media.dropped.no_destination": ("lrk_media_dropped_packets_total",
                                     {"reason": "no_destination"}),
    "media.dropped.oversized": ("lrk_media_dropped_packets_total", {"reason": "oversized"}),
    "media.send_errors.ENOBUFS": ("lrk_media_send_errors_total", {"errno": "ENOBUFS"}),
    "media.recv_errors.ECONNREFUSED": ("lrk_media_recv_errors_total",
                                       {"errno": "ECONNREFUSED"}),
    "media.egress.raw.packets": ("lrk_media_egress_packets_total", {"path": "raw"}),
    "media.egress.fallback.packets": ("lrk_media_egress_packets_total", {"path": "fallback"}),
    "media.egress.raw.calls": ("lrk_media_egress_raw_calls_total", {}),
    "media.egress.raw.rejected": ("lrk_media_egress_raw_rejected_packets_total", {}),
    "media.egress.raw.errors.EPERM": ("lrk_media_egress_raw_errors_total", {"errno": "EPERM"}),
    "media.egress.raw.disabled": ("lrk_media_egress_raw_disabled", {}),
    "workers.restarts": ("lrk_worker_restarts_total", {}),
    "workers.channel.full": ("lrk_worker_channel_full_total", {}),
    "workers.channel.bad_messages": ("lrk_worker_channel_bad_messages_total", {}),
    "worker.channel.bad_messages": ("lrk_worker_received_bad_messages_total", {}),
    "plane.bind_failures": ("lrk_plane_bind_failures_total", {}),
    "plane.flush_timeouts": ("lrk_plane_flush_timeouts_total", {}),
    "plane.no_worker": ("lrk_plane_no_worker_total", {}),
    "kernel.errors": ("lrk_kernel_errors_total", {}),
    "kernel.sessions.installed": ("lrk_kernel_sessions_installed_total", {}),
    "kernel.flows.flushed": ("lrk_kernel_flows_flushed_total", {}),
    "kernel.flows.dumped": ("lrk_kernel_flows_dumped_total", {}),
    "kernel.sessions.adopted": ("lrk_kernel_sessions_adopted_total", {}),
    "kernel.adopt.removed_elements": ("lrk_kernel_adopt_removed_elements_total", {}),
    "kernel.adopt.flushed_marks": ("lrk_kernel_adopt_flushed_marks_total", {}),
    "nfqueue.packets": ("lrk_nfqueue_packets_total", {}),
    "nfqueue.requeued": ("lrk_nfqueue_requeued_packets_total", {}),
    "nfqueue.batches.retried": ("lrk_nfqueue_retried_batches_total", {}),
    "nfqueue.queued": ("lrk_nfqueue_queued_packets_total", {}),
    "nfqueue.admitted": ("lrk_nfqueue_admitted_flows_total", {}),
    "nfqueue.verdict_errors": ("lrk_nfqueue_verdict_errors_total", {}),
}


def full_snapshot():
    """Every expected counter with a value of its own (1000 + its index)."""
    counters = {name: 1000 + i for i, name in enumerate(EXPECTED)}
    return {"counters": counters, "sessions": {"offered": 2, "answered": 5},
            "ports": {"total": 5000, "in_use": 14, "free": 4980, "quarantined": 6},
            "mode": "socket", "uptime": 42.5, "workers": 2}


def series(text, parser=text_string_to_metric_families):
    """{(sample name, labels): value} and {family name: type} of an exposition."""
    samples, types = {}, {}
    for fam in parser(text):
        types[fam.name] = fam.type
        for s in fam.samples:
            key = (s.name, tuple(sorted(s.labels.items())))
            assert key not in samples, f"duplicate series {key}"
            samples[key] = s.value
    return samples, types


def key(name, labels=None):
    return name, tuple(sorted((labels or {}).items()))


def exposition(snap, latency=None):
    server = MetricsServer("127.0.0.1", 0, lambda: snap, process_metrics=False)
    if latency:
        for args in latency:
            server.observe_request(*args)
    status, body, ctype = server.render()
    assert status == 200
    assert ctype.startswith("text/plain; version=0.0.4")
    return body.decode()


# -- the mapping table --------------------------------------------------------------------
def test_every_table_entry_names_a_family_with_its_labels():
    for name, family, labels in COUNTER_MAP:
        kind, labelnames, text = FAMILIES[family]
        assert kind in ("counter", "gauge")
        assert set(labels) == set(labelnames), name
        assert re.fullmatch(r"[a-z][a-z0-9_]*", family), family
        assert not family.endswith("_total"), family
        assert text.endswith("."), family
    assert set(FAMILIES) == {family for _, family, _ in COUNTER_MAP}, "a family nobody uses"


def test_map_counter_exact_wins_and_patterns_capture_the_rest():
    assert map_counter("control.retransmissions.in_flight") == (
        "control_retransmissions", {"protocol": "msgpack", "outcome": "in_flight"})
    assert map_counter("media.egress.raw.errors.ENOBUFS") == (
        "media_egress_raw_errors", {"errno": "ENOBUFS"})
    assert map_counter("media.dropped.some.new_reason") == (
        "media_dropped_packets", {"reason": "some.new_reason"})
    assert map_counter("media.dropped") is None  # a pattern needs one more component
    assert map_counter("nothing.like.this") is None
    assert map_counter("") is None


def test_every_counter_the_code_defines_is_mapped():
    names = set(ENGINE_COUNTERS) | set(LEGACY_COUNTERS)
    names |= {f"control.requests.{c}" for c in COMMANDS}
    names |= {f"control.errors.{c}" for c in ERROR_CODES}
    names |= {f"media.dropped.{r}" for r in DROP_NAMES}
    assert not sorted(n for n in names if map_counter(n) is None)


def test_every_counter_literal_in_the_sources_is_mapped():
    """A counter added anywhere in lrk/ or fastpath/ must get a row in COUNTER_MAP (it would
    still be exported, as lrk_<name>_total, but without labels or help)."""
    prefixed = re.compile(r"""f?["']((?:control|legacy|sessions|streams|media|kernel|nfqueue|"""
                          r"""plane|workers|ports)\.[A-Za-z0-9_.{}\[\]]+)["']""")
    subscript = re.compile(r"""counters\[\s*f?["']([A-Za-z0-9_.{}\[\]]+)["']\s*\]""")
    not_counters = {"media.ip", "media.port", "media.rtcp_port", "control.sock"}
    missing = []
    for path in sorted([*ROOT.joinpath("lrk").rglob("*.py"),
                        *ROOT.joinpath("fastpath").rglob("*.py")]):
        source = path.read_text(encoding="utf-8")
        for m in [*prefixed.finditer(source), *subscript.finditer(source)]:
            text = m.group(1)
            if text in not_counters or text.endswith("."):
                continue
            name = re.sub(r"\{[^}]*\}", "x", text)
            if map_counter(name) is None:
                missing.append(f"{path.relative_to(ROOT)}: {text}")
    assert not missing, "counters without a metric mapping: " + ", ".join(missing)


def test_sanitize():
    assert sanitize("weird.thing-x") == "weird_thing_x"
    assert sanitize("a..b//c") == "a_b_c"
    assert sanitize(".x.") == "x"
    assert sanitize("ü") == "unnamed"


# -- the exposition -----------------------------------------------------------------------
def test_exposition_exact_values():
    samples, types = series(exposition(full_snapshot()))
    snap = full_snapshot()
    for name, (sample, labels) in EXPECTED.items():
        assert samples.pop(key(sample, labels)) == snap["counters"][name], name
    assert samples.pop(key("lrk_build_info", {
        "version": __version__, "mode": "socket", "interpreter": metrics.interpreter()})) == 1
    assert samples.pop(key("lrk_uptime_seconds")) == 42.5
    assert samples.pop(key("lrk_workers")) == 2
    assert samples.pop(key("lrk_sessions", {"state": "offered"})) == 2
    assert samples.pop(key("lrk_sessions", {"state": "answered"})) == 5
    assert samples.pop(key("lrk_ports")) == 10000  # ports: two per pair
    assert samples.pop(key("lrk_ports_used")) == 28
    assert samples.pop(key("lrk_ports_free")) == 9960
    assert samples.pop(key("lrk_ports_quarantined")) == 12
    assert samples == {}, "unexpected series"
    assert types["lrk_media_forwarded_packets"] == "counter"
    assert types["lrk_media_received_packets"] == "gauge"
    assert types["lrk_media_egress_raw_disabled"] == "gauge"
    assert types["lrk_sessions"] == "gauge"
    assert types["lrk_build_info"] == "gauge"


def test_help_text_for_every_family():
    text = exposition(full_snapshot())
    for fam in text_string_to_metric_families(text):
        assert len(fam.documentation) > 15, fam.name


def test_interpreter_label():
    label = metrics.interpreter()
    import platform
    import sys
    assert label.startswith(f"{sys.implementation.name}-{platform.python_version()}")


def test_counters_never_measured_are_absent():
    snap = {"counters": {"media.forwarded.packets": 7}, "mode": "kernel"}
    samples, types = series(exposition(snap))
    assert samples == {
        key("lrk_media_forwarded_packets_total"): 7,
        key("lrk_build_info", {"version": __version__, "mode": "kernel",
                               "interpreter": metrics.interpreter()}): 1,
    }
    assert set(types) == {"lrk_media_forwarded_packets", "lrk_build_info"}
    # a zero the relay did report is shown
    samples, _ = series(exposition({"counters": {"kernel.errors": 0}, "mode": "kernel"}))
    assert samples[key("lrk_kernel_errors_total")] == 0


def test_unknown_counters_are_exported_under_their_sanitized_name(caplog):
    snap = {"counters": {"brand.new-counter": 3, "media.forwarded.packets": 1,
                         "media.forwarded_packets": 4, "workers": 5, "x.total": 6},
            "mode": "socket"}
    samples, types = series(exposition(snap))
    assert samples[key("lrk_brand_new_counter_total")] == 3
    assert samples[key("lrk_x_total")] == 6
    # sanitized names already taken by other metrics: one family, labelled by dotted name
    assert samples[key("lrk_unmapped_counters_total",
                       {"counter": "media.forwarded_packets"})] == 4
    assert samples[key("lrk_unmapped_counters_total", {"counter": "workers"})] == 5
    assert samples[key("lrk_media_forwarded_packets_total")] == 1
    assert types["lrk_brand_new_counter"] == "counter"
    logged = [r.getMessage() for r in caplog.records if r.name == "lrk.metrics"]
    assert sum("brand.new-counter" in m for m in logged) == 1
    exposition(snap)
    logged = [r.getMessage() for r in caplog.records if r.name == "lrk.metrics"]
    assert sum("brand.new-counter" in m for m in logged) == 2  # one per collector, not scrape


def test_unknown_names_are_logged_once_per_collector(caplog):
    snap = {"counters": {"brand.new": 1}, "mode": "socket"}
    collector = RelayCollector(lambda: snap)
    for _ in range(3):
        list(collector.collect())
    logged = [r for r in caplog.records if r.name == "lrk.metrics"]
    assert len(logged) == 1


def test_two_names_on_one_series_keep_both(caplog):
    snap = {"counters": {"sessions.deleted": 2, "sessions.expired.deleted": 9},
            "mode": "socket"}
    samples, _ = series(exposition(snap))
    assert samples[key("lrk_sessions_ended_total", {"reason": "deleted"})] == 2
    assert samples[key("lrk_sessions_expired_deleted_total")] == 9
    assert [r.getMessage() for r in caplog.records if r.name == "lrk.metrics"] == [
        "counter 'sessions.expired.deleted' maps onto the series of another counter; "
        "exported as lrk_sessions_expired_deleted_total"]


def test_non_numeric_values_are_skipped_and_logged(caplog):
    snap = {"counters": {"kernel.errors": "many", "kernel.flows.dumped": float("nan"),
                         "media.latched": 3}, "mode": "kernel"}
    samples, _ = series(exposition(snap))
    assert key("lrk_kernel_errors_total") not in samples
    assert key("lrk_kernel_flows_dumped_total") not in samples
    assert samples[key("lrk_media_latched_total")] == 3
    assert any("kernel.errors" in r.getMessage() for r in caplog.records)


def test_openmetrics_exposition_parses():
    server = MetricsServer("127.0.0.1", 0, full_snapshot, process_metrics=False)
    server.observe_request("msgpack", "offer", 0.001)
    status, body, ctype = server.render("application/openmetrics-text; version=1.0.0")
    assert status == 200 and ctype.startswith("application/openmetrics-text")
    samples, types = series(body.decode(), openmetrics_families)
    assert samples[key("lrk_media_forwarded_packets_total")] == \
        full_snapshot()["counters"]["media.forwarded.packets"]
    assert types["lrk_media_forwarded_packets"] == "counter"
    assert types["lrk_control_request_duration_seconds"] == "histogram"


# -- request latency ------------------------------------------------------------------------
def test_request_latency_histogram_exact():
    text = exposition({"counters": {}, "mode": "socket"}, latency=[
        ("msgpack", "offer", 0.0003), ("msgpack", "offer", 0.0005), ("msgpack", "offer", 3.0),
        ("legacy", "S", 0.00005)])
    samples, types = series(text)
    assert types["lrk_control_request_duration_seconds"] == "histogram"
    offer = {"protocol": "msgpack", "command": "offer"}

    def bucket(le, labels=offer):
        return samples[key("lrk_control_request_duration_seconds_bucket", dict(labels, le=le))]

    assert bucket("0.00025") == 0
    assert bucket("0.0005") == 2  # le: 0.0005 itself counts
    assert bucket("2.5") == 2
    assert bucket("+Inf") == 3
    assert samples[key("lrk_control_request_duration_seconds_count", offer)] == 3
    assert samples[key("lrk_control_request_duration_seconds_sum", offer)] == \
        pytest.approx(3.0008)
    legacy = {"protocol": "legacy", "command": "S"}
    assert bucket("0.0001", legacy) == 1
    assert samples[key("lrk_control_request_duration_seconds_count", legacy)] == 1
    buckets = [k for k in samples if k[0].endswith("_bucket") and dict(k[1])["command"] == "S"]
    assert len(buckets) == len(metrics.REQUEST_BUCKETS) + 1


def test_request_latency_series_are_bounded():
    latency = RequestLatency(max_series=3)
    for i in range(10):
        latency.observe("msgpack", f"cmd{i}", 0.001)
    fam = latency.family()
    counts = {(s.labels["protocol"], s.labels["command"]): s.value
              for s in fam.samples if s.name.endswith("_count")}
    assert counts == {("msgpack", "cmd0"): 1, ("msgpack", "cmd1"): 1, ("msgpack", "cmd2"): 1,
                      ("msgpack", "other"): 7}
    assert RequestLatency().family() is None  # nothing observed: no family


def test_legacy_command():
    assert legacy_command(b"1234_5 P") == "P"
    assert legacy_command(b"c G") == "G"
    assert legacy_command(b"c S call 10.0.0.1 30000 ...") == "S"
    assert legacy_command(b"c D call") == "D"
    assert legacy_command(b"D call\n", with_cookie=False) == "D"
    assert legacy_command(b"P\n", with_cookie=False) == "P"
    for junk in (b"c X", b"c PP", b"c", b"", b"c s call", b"c \xff"):
        assert legacy_command(junk) is None, junk


# -- relay_snapshot from a real engine ------------------------------------------------------
def test_relay_snapshot_from_an_engine():
    engine = Engine(EngineConfig(port_start=30000, port_end=30099))
    engine.offer(1.0, "call-1", "tag-a", ("192.0.2.1", 4000))
    engine.offer(1.0, "call-2", "tag-a", ("192.0.2.1", 4002))
    snap = relay_snapshot(engine, "socket", [{"a.b": 1, "media.latched": 1},
                                             {"media.latched": 5}, engine.counters],
                          started=10.0, workers=1, now=25.0)
    assert snap["mode"] == "socket"
    assert snap["sessions"] == {"offered": 2, "early": 0, "answered": 0}
    assert snap["ports"] == engine.ports.snapshot()
    assert snap["ports"]["in_use"] == 4
    assert snap["counters"]["media.latched"] == 5  # later dicts win
    assert snap["counters"]["sessions.created"] == 2
    assert snap["uptime"] == 15.0 and snap["workers"] == 1
    samples, _ = series(exposition(snap))
    assert samples[key("lrk_sessions", {"state": "offered"})] == 2
    assert samples[key("lrk_sessions", {"state": "answered"})] == 0
    assert samples[key("lrk_ports_used")] == 8
    assert samples[key("lrk_sessions_created_total")] == 2


# -- the HTTP endpoint --------------------------------------------------------------------
def fetch(url, accept=None, method="GET"):
    request = urllib.request.Request(url, method=method)
    if accept:
        request.add_header("Accept", accept)
    with urllib.request.urlopen(request, timeout=DEADLINE) as response:
        return response.status, response.headers, response.read()


def test_http_endpoint():
    snap = full_snapshot()
    server = MetricsServer("127.0.0.1", 0, lambda: snap)
    host, port = server.start()
    try:
        assert host == "127.0.0.1" and port > 0 and server.address == (host, port)
        status, headers, body = fetch(f"http://127.0.0.1:{port}/metrics")
        assert status == 200
        assert headers["Content-Type"].startswith("text/plain; version=0.0.4")
        assert int(headers["Content-Length"]) == len(body)
        samples, types = series(body.decode())
        assert samples[key("lrk_media_forwarded_packets_total")] == \
            snap["counters"]["media.forwarded.packets"]
        assert samples[key("lrk_media_dropped_packets_total",
                           {"reason": "unexpected_source"})] == \
            snap["counters"]["media.dropped.unexpected_source"]
        assert "process_open_fds" in types  # the daemon's own process metrics
        snap["counters"]["media.forwarded.packets"] = 123456789
        _, _, body = fetch(f"http://127.0.0.1:{port}/metrics?x=1")
        samples, _ = series(body.decode())
        assert samples[key("lrk_media_forwarded_packets_total")] == 123456789  # live
        status, headers, body = fetch(f"http://127.0.0.1:{port}/metrics",
                                      accept="application/openmetrics-text; version=1.0.0")
        assert headers["Content-Type"].startswith("application/openmetrics-text")
        assert body.endswith(b"# EOF\n")
        status, headers, body = fetch(f"http://127.0.0.1:{port}/metrics", method="HEAD")
        assert status == 200 and body == b"" and int(headers["Content-Length"]) > 0
        with pytest.raises(urllib.error.HTTPError) as exc:
            fetch(f"http://127.0.0.1:{port}/")
        assert exc.value.code == 404
    finally:
        server.stop()
    assert server.address is None
    with pytest.raises(urllib.error.URLError):
        fetch(f"http://127.0.0.1:{port}/metrics")
    server.stop()  # twice is fine


def test_http_snapshot_failure_is_a_500():
    def broken():
        raise RuntimeError("boom")

    server = MetricsServer("127.0.0.1", 0, broken, process_metrics=False)
    _, port = server.start()
    try:
        with pytest.raises(urllib.error.HTTPError) as exc:
            fetch(f"http://127.0.0.1:{port}/metrics")
        assert exc.value.code == 500
    finally:
        server.stop()


def test_address_in_use_is_an_oserror():
    server = MetricsServer("127.0.0.1", 0, full_snapshot, process_metrics=False)
    _, port = server.start()
    try:
        with pytest.raises(OSError):
            MetricsServer("127.0.0.1", port, full_snapshot).start()
        with pytest.raises(RuntimeError):
            server.start()
    finally:
        server.stop()


def test_snapshot_runs_on_the_relay_loop():
    """With loop=, scrapes run snapshot() on that loop's thread, never in the server's."""
    seen = []

    def snapshot():
        seen.append(threading.get_ident())
        return full_snapshot()

    async def main():
        server = MetricsServer("127.0.0.1", 0, snapshot, loop=asyncio.get_running_loop(),
                               process_metrics=False)
        _, port = server.start()
        try:
            loop = asyncio.get_running_loop()
            status, _, body = await loop.run_in_executor(
                None, fetch, f"http://127.0.0.1:{port}/metrics")
        finally:
            server.stop()
        return status, body

    status, body = asyncio.run(main())
    assert status == 200 and b"lrk_media_forwarded_packets_total" in body
    assert seen == [threading.get_ident()]


def test_a_stalled_loop_gets_the_scrape_a_503():
    loop = asyncio.new_event_loop()  # never runs: the snapshot callback never happens
    try:
        server = MetricsServer("127.0.0.1", 0, full_snapshot, loop=loop, snapshot_timeout=0.2,
                               process_metrics=False)
        _, port = server.start()
        try:
            with pytest.raises(urllib.error.HTTPError) as exc:
                fetch(f"http://127.0.0.1:{port}/metrics")
            assert exc.value.code == 503
            assert b"did not answer" in exc.value.read()
        finally:
            server.stop()
    finally:
        loop.close()


def test_stop_releases_a_scrape_waiting_for_the_loop():
    loop = asyncio.new_event_loop()
    try:
        server = MetricsServer("127.0.0.1", 0, full_snapshot, loop=loop, snapshot_timeout=60,
                               process_metrics=False)
        _, port = server.start()
        with ThreadPoolExecutor(1) as pool:
            scrape = pool.submit(fetch, f"http://127.0.0.1:{port}/metrics")
            deadline = time.monotonic() + DEADLINE
            while not server._pending:  # the scrape is waiting for the loop
                assert time.monotonic() < deadline, "the scrape never reached the loop"
                time.sleep(0.01)
            server.stop()
            with pytest.raises(urllib.error.HTTPError) as exc:
                scrape.result(DEADLINE)  # well inside the 60 s snapshot timeout
            assert exc.value.code == 503
    finally:
        loop.close()


def test_closed_loop_is_a_503():
    loop = asyncio.new_event_loop()
    loop.close()
    server = MetricsServer("127.0.0.1", 0, full_snapshot, loop=loop, process_metrics=False)
    status, body, _ = server.render()
    assert status == 503 and b"closed" in body


def test_no_metrics_stand_in():
    none = NoMetrics()
    assert none.start() is None and none.address is None
    none.observe_request("msgpack", "offer", 0.1)
    none.stop()


def test_every_metric_is_documented():
    """docs/running.md has a row for every metric lrk exports."""
    text = (ROOT / "docs" / "running.md").read_text(encoding="utf-8")
    names = [f"lrk_{family}" + ("_total" if kind == "counter" else "")
             for family, (kind, _, _) in FAMILIES.items()]
    names += [f"lrk_{name}" + ("_total" if name == metrics.UNMAPPED_FAMILY else "")
              for name in metrics.OWN_NAMES]
    missing = [n for n in names if not re.search(f"`{n}[`{{]", text)]
    assert not missing, f"not in docs/running.md: {missing}"
