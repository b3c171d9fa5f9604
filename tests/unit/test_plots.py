"""bench.plots draws every figure a report has data for, and none for missing sections.

Runs under both interpreters: the drawing itself always happens in a CPython child
(`draw_in_cpython`), which is how `bench.compare` draws after a PyPy run.
"""

from __future__ import annotations

import json

from bench.plots import draw_in_cpython

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _report() -> dict:
    def media(mode: str, n: int, cap: int) -> dict:
        steps = [{"rate": r, "achieved_rate": r, "loss": 0.0 if r <= cap else 0.2}
                 for r in (cap // 2, cap, 2 * cap)]
        return {"mode": mode, "sessions": n, "capacity_pps": cap, "steps": steps,
                "overload": {"rate": 2 * cap, "achieved_rate": 2 * cap, "loss": 0.3},
                "cpu": {"relay_ns_us": 1.5}}
    return {
        "media": {"options": {"cpu_rate": 50000},
                  "results": [media(m, n, c) for n in (1, 1000)
                              for m, c in (("kernel", 200000), ("socket", 150000),
                                           ("rtpengine", 60000))]},
        "calls": {"calls": 100, "pps_per_stream": 50, "results": [
            {"mode": "socket", "latency_ms": {"p50": 0.1, "p90": 0.2, "p99": 0.5},
             "memory": {"rss_bytes_per_session": 4096, "slab_bytes_per_session": 900}},
            {"mode": "rtpengine", "latency_ms": {"p50": 0.2, "p90": 0.4, "p99": 1.0},
             "memory": {"rss_bytes_per_session": 9000, "slab_bytes_per_session": None}}]},
        "control": {"results": [{"peer": "lrk-pypy", "req_per_s": 8000},
                                {"peer": "rtpengine", "req_per_s": 3000}]},
    }


def test_every_section_gives_a_png(tmp_path):
    path = tmp_path / "report.json"
    path.write_text(json.dumps(_report()))
    written = draw_in_cpython(str(path), str(tmp_path / "plots"))
    names = sorted(p.rsplit("/", 1)[-1] for p in written)
    assert names == ["capacity.png", "control.png", "cpu_per_packet.png", "latency.png",
                     "loss_vs_offered_1.png", "loss_vs_offered_1000.png",
                     "memory_per_session.png"]
    for p in written:
        with open(p, "rb") as fh:
            head = fh.read(8)
        assert head == PNG_MAGIC, p


def test_missing_sections_draw_nothing(tmp_path):
    path = tmp_path / "report.json"
    path.write_text(json.dumps({"media": {"results": []}, "control": {}}))
    assert draw_in_cpython(str(path), str(tmp_path / "plots")) == []
