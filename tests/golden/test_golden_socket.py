"""Golden daemon tests, socket mode, no root: `lrkproxy run` on loopback addresses of its own
(127.77.N.1 internal, 127.77.N.65 external; caller 127.77.N.10, callee 127.77.N.70), a fresh
daemon per test, media ports 30000-30099. The scripts are in `tests/golden/scenarios.py`;
the same scripts run in packet, kernel and nfqueue mode in `tests/netns/test_golden_modes.py`.
"""

from __future__ import annotations

from typing import Iterator

import pytest

from tests.golden import scenarios
from tests.golden.harness import GoldenRelay, check_ports_free, loopback_layout

pytestmark = pytest.mark.integration


@pytest.fixture
def relay() -> Iterator[GoldenRelay]:
    layout = loopback_layout()
    check_ports_free([layout.internal, layout.external], layout.port_start, layout.port_end)
    golden = GoldenRelay(layout, "socket").start()
    try:
        yield golden
    finally:
        code = golden.stop()
    assert code == 0, f"relay exited with {code}: {golden.output}"
    assert "Traceback" not in golden.output, golden.output


def test_control_replies(relay):
    scenarios.control(relay)


def test_media_bytes_sources_and_counters(relay):
    scenarios.media(relay)


def test_legacy_protocol(relay):
    scenarios.legacy(relay)


def test_sdp_offer_answer(relay):
    scenarios.sdp(relay)
