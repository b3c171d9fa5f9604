"""Golden daemon tests for the privileged data planes (root): packet, kernel, nfqueue and xdp
mode.

Each test starts `lrkproxy run --mode MODE` in a relay namespace of its own, between a caller
(198.51.100.10) and a callee (198.51.100.70) namespace (`bench.netns.Topology`), with the
control and legacy listeners on the relay namespace's loopback (raw UDP from a socket made
in that namespace), relay addresses 198.51.100.1 (internal, leg A) and 198.51.100.65
(external, leg B), media ports 30000-30099, and runs the same scripts as socket mode
(`tests/golden/scenarios.py`): every reply and every relayed datagram must be the same.
The media script runs over IPv6 too (2001:db8:1::10 <-> 2001:db8:2::70).
"""

from __future__ import annotations

from typing import Callable, Iterator, List

import pytest

from bench.netns import run as bench_run
from tests.golden import scenarios
from tests.golden.harness import GoldenRelay, ipv6_ready, netns_layout

pytestmark = pytest.mark.netns

MODES = ("packet", "kernel", "nfqueue", "xdp")
#: kernel mode reads counters and latches every kernel_poll seconds: often, so that the
#: script's bounded waits for them are short
KERNEL_CONFIG = "kernel_poll = 0.2\n"
#: nfqueue mode keeps the default kernel_poll (2 s): the daemon polls once when the first
#: session is installed, then 2 s later, so no poll ever falls between the media script's
#: packets and what query shows of them is the same on every run (with 0.2 s a poll lands
#: between two of its packets now and then, and the latches shown depend on it)
NFQUEUE_CONFIG = "kernel_poll = 2.0\nnfqueue_num = 7\n"


@pytest.fixture
def start(topo, control_keys_env) -> Iterator[Callable[..., GoldenRelay]]:
    """Start a relay in `topo`'s relay namespace; each must stop cleanly (exit 0, no
    traceback in its log). The relays and the harness's signed requests share the session's
    control keys ($LRK_KEYS, `control_keys_env` of the root conftest.py)."""
    started: List[GoldenRelay] = []

    def run(mode: str, v6: bool = False) -> GoldenRelay:
        extra: tuple = ()
        config = ""
        if mode == "packet":
            extra = ("--packet-interface", "vc1", "--packet-interface", "ve1")
        elif mode == "kernel":
            config = KERNEL_CONFIG
        elif mode == "xdp":
            extra = ("--xdp-interface", "vc1", "--xdp-interface", "ve1")
            config = KERNEL_CONFIG
            # the hosts' veth ends as a wire (tests/netns/test_xdp_mode.py says why)
            for ns, dev in ((topo.caller.ns, "vc0"), (topo.callee.ns, "ve0")):
                bench_run("ethtool", "-K", dev, "gro", "on", "tx", "off", ns=ns)
        elif mode == "nfqueue":
            config = NFQUEUE_CONFIG
        if v6:
            ipv6_ready(topo.namespaces)
        golden = GoldenRelay(netns_layout(topo, v6), mode, extra, config).start()
        started.append(golden)  # one that failed to start has failed the test already
        return golden

    yield run
    for golden in started:
        code = golden.stop()
        assert code == 0, f"relay exited with {code}: {golden.output}"
        assert "Traceback" not in golden.output, golden.output


@pytest.mark.parametrize("mode", MODES)
def test_control_replies(start, mode):
    scenarios.control(start(mode))


@pytest.mark.parametrize("mode", MODES)
def test_media_bytes_sources_and_counters(start, mode):
    scenarios.media(start(mode))


@pytest.mark.parametrize("mode", MODES)
def test_media_ipv6(start, mode):
    scenarios.media(start(mode, v6=True))


@pytest.mark.parametrize("mode", MODES)
def test_legacy_protocol(start, mode):
    scenarios.legacy(start(mode))


@pytest.mark.parametrize("mode", MODES)
def test_sdp_offer_answer(start, mode):
    scenarios.sdp(start(mode))
