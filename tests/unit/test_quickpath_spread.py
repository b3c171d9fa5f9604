"""bench.quickpath's flow spreading: 100,000 sessions over several caller, callee and relay
addresses, every port within one 16-bit range, every flow distinct (no root needed)."""

from __future__ import annotations

from collections import Counter
from ipaddress import ip_address, ip_network

import pytest

from bench.many_sessions import kernel_addresses
from bench.netns import Topology
from bench.quickpath import (
    CALLEE_PORT,
    CALLER_PORT,
    MAX_SESSIONS,
    PORTS_PER_ADDRESS,
    RELAY_PORT,
    STRANGER,
    QuickpathError,
    addresses_for,
    flows_for,
    port_span,
    relay_addresses_for,
    relay_ports_end,
    spread,
)

DOC = ip_network("198.51.100.0/24")
CALLER_LINK, CALLEE_LINK = ip_network("198.51.100.0/26"), ip_network("198.51.100.64/26")


def test_small_counts_keep_one_address_and_todays_ports() -> None:
    """1 and 1,000 sessions: the flows of the earlier figures, unchanged."""
    topo = Topology()
    assert flows_for(topo, 1) == [(("198.51.100.10", CALLER_PORT), ("198.51.100.70",
                                                                    CALLEE_PORT))]
    flows = flows_for(topo, 1000)
    assert flows[999] == (("198.51.100.10", CALLER_PORT + 1998),
                          ("198.51.100.70", CALLEE_PORT + 1998))
    assert addresses_for(PORTS_PER_ADDRESS) == 1 and addresses_for(PORTS_PER_ADDRESS + 1) == 2


def test_100k_sessions_spread_evenly_over_seven_addresses_per_side() -> None:
    topo = Topology()
    flows = flows_for(topo, 100_000)
    assert len(flows) == 100_000 and len(set(flows)) == 100_000
    callers, callees = Counter(a[0] for a, _ in flows), Counter(b[0] for _, b in flows)
    assert len(callers) == len(callees) == 7 == addresses_for(100_000)
    assert max(callers.values()) - min(callers.values()) <= 1
    assert max(callees.values()) - min(callees.values()) <= 1
    assert len({a for a, _ in flows}) == len({b for _, b in flows}) == 100_000
    relay = set(kernel_addresses(7)[0]) | set(kernel_addresses(7)[1])
    for ip in callers:
        assert ip_address(ip) in CALLER_LINK and ip not in relay and ip != STRANGER
    for ip in callees:
        assert ip_address(ip) in CALLEE_LINK and ip not in relay
    ports = [p for a, b in flows for p in (a[1], b[1])]
    assert all(p % 2 == 0 and p + 1 <= 65535 for p in ports)
    # the sink's port range covers every callee port, and no more than one share
    span = port_span(100_000)
    assert max(b[1] for _, b in flows) < CALLEE_PORT + span <= CALLEE_PORT + 2 * PORTS_PER_ADDRESS


def test_relay_fronts_fit_the_relay_addresses() -> None:
    """static-nat's relay side: one (address, port) per session on the relay's addresses."""
    internal, _ = kernel_addresses(addresses_for(100_000))
    fronts = spread(100_000, internal, RELAY_PORT)
    assert len(set(fronts)) == 100_000 and {ip for ip, _ in fronts} == set(internal)
    assert max(p for _, p in fronts) + 1 <= 65535
    assert all(ip_address(ip) in DOC for ip in internal)


def test_too_many_sessions_or_too_few_addresses_say_why() -> None:
    with pytest.raises(QuickpathError, match="1..128,000"):
        addresses_for(MAX_SESSIONS + 1)
    with pytest.raises(QuickpathError, match="need 2 addresses, 1 given"):
        spread(PORTS_PER_ADDRESS + 1, ["198.51.100.10"], CALLER_PORT)
    assert len(flows_for(Topology(), MAX_SESSIONS)) == MAX_SESSIONS


def test_the_daemons_ports_fit_its_addresses() -> None:
    """One relay address per side shares one pool (4 ports a session): past 11,368
    sessions the daemon gets a second address per side; its range stays in 16 bits for
    every share it must hold."""
    assert relay_addresses_for(1000) == 1 and relay_ports_end(1000, 1) == RELAY_PORT + 4063
    assert relay_addresses_for(11_368) == 1 and relay_addresses_for(11_369) == 2
    assert relay_addresses_for(16_000) == 2 and relay_addresses_for(100_000) == 7
    for n in (1, 1000, 11_368, 11_369, 16_000, 16_001, 100_000, MAX_SESSIONS):
        k = relay_addresses_for(n)
        pairs_needed = -(-n // k) * (2 if k == 1 else 1)  # RTP/RTCP pairs on one pool
        pairs_held = (min(65535, relay_ports_end(n, k)) - RELAY_PORT + 1) // 2
        assert pairs_held >= pairs_needed, n
