"""Node strings, node sets and the linear / round-robin / weighted selection."""

from __future__ import annotations

from collections import Counter

import pytest

from lrk.client.errors import ClientError, InvalidArgument, NodeAddressError, NoNodeAvailable
from lrk.client.nodes import Node, NodeSet, build_sets, parse_node, parse_node_address


@pytest.mark.parametrize(
    "text, scheme, host, port, path, canonical",
    [
        ("udp:127.0.0.1:22222", "udp", "127.0.0.1", 22222, None, "udp:127.0.0.1:22222"),
        ("udp:relay.example.net:1", "udp", "relay.example.net", 1, None,
         "udp:relay.example.net:1"),
        ("UDP:10.0.0.1:65535", "udp", "10.0.0.1", 65535, None, "udp:10.0.0.1:65535"),
        ("udp6:[::1]:22222", "udp6", "::1", 22222, None, "udp6:[::1]:22222"),
        ("udp6:[2001:db8::5]:9", "udp6", "2001:db8::5", 9, None, "udp6:[2001:db8::5]:9"),
        ("udp6:[fe80::1%eth0]:5", "udp6", "fe80::1%eth0", 5, None, "udp6:[fe80::1%eth0]:5"),
        ("unix:/run/lrk/control.sock", "unix", None, None, "/run/lrk/control.sock",
         "unix:/run/lrk/control.sock"),
        (" udp:127.0.0.1:5 ", "udp", "127.0.0.1", 5, None, "udp:127.0.0.1:5"),
    ],
)
def test_parse_good_node_addresses(text, scheme, host, port, path, canonical):
    addr = parse_node_address(text)
    assert (addr.scheme, addr.host, addr.port, addr.path) == (scheme, host, port, path)
    assert str(addr) == canonical
    assert parse_node_address(canonical) == addr


@pytest.mark.parametrize(
    "text",
    [
        "",
        "127.0.0.1:22222",
        "tcp:127.0.0.1:22222",
        "udp:127.0.0.1",
        "udp::22222",
        "udp:127.0.0.1:",
        "udp:127.0.0.1:0",
        "udp:127.0.0.1:65536",
        "udp:127.0.0.1:port",
        "udp:::1:22222",
        "udp:[::1]:22222",
        "udp6:::1:22222",
        "udp6:[not-an-ip]:22222",
        "udp6:[::1]",
        "udp6:[::1]:x",
        "unix:",
        "unix",
    ],
)
def test_parse_bad_node_addresses_name_the_string(text):
    with pytest.raises(NodeAddressError) as info:
        parse_node_address(text)
    assert isinstance(info.value, ClientError)
    assert repr(text) in str(info.value)
    assert info.value.address == text


def test_parse_node_weight_suffix():
    node = parse_node("udp:127.0.0.1:22222=3")
    assert node.weight == 3
    assert str(node) == "udp:127.0.0.1:22222"
    assert parse_node("unix:/tmp/a=b.sock").address.path == "/tmp/a=b.sock"
    assert parse_node("unix:/tmp/a.sock=2").weight == 2
    with pytest.raises(NodeAddressError, match="weight"):
        parse_node("udp:127.0.0.1:22222=0")
    with pytest.raises(NodeAddressError, match="weight"):
        Node("udp:127.0.0.1:1", weight=0)


def test_node_defaults_and_disable_period():
    node = Node("udp:127.0.0.1:1")
    assert (node.weight, node.enabled, node.disabled_until) == (1, True, 0.0)
    assert node.is_available(0.0)
    node.disable(100.0, 60.0)
    assert node.disabled_until == 160.0
    assert not node.is_available(159.999)
    assert node.is_available(160.0)
    node.mark_alive()
    assert node.is_available(100.0)
    node.enabled = False
    assert not node.is_available(10_000.0)


def _set(algorithm, *specs):
    return NodeSet(7, list(specs), algorithm)


def test_linear_picks_first_enabled_in_order():
    nodes = _set("linear", "udp:10.0.0.1:1", "udp:10.0.0.2:1", "udp:10.0.0.3:1")
    a, b, c = nodes.nodes
    assert [nodes.select(0.0) for _ in range(3)] == [a, a, a]
    a.disable(0.0, 60.0)
    assert nodes.select(1.0) is b
    b.enabled = False
    assert nodes.select(1.0) is c
    assert nodes.select(60.0) is a
    assert nodes.select(1.0, exclude=[c]) is None


def test_round_robin_cycles_and_skips_disabled():
    nodes = _set("round-robin", "udp:10.0.0.1:1", "udp:10.0.0.2:1", "udp:10.0.0.3:1")
    a, b, c = nodes.nodes
    assert [nodes.select(0.0) for _ in range(6)] == [a, b, c, a, b, c]
    b.disable(0.0, 60.0)
    picks = [nodes.select(1.0) for _ in range(4)]
    assert b not in picks
    assert Counter(picks) == {a: 2, c: 2}


def test_weighted_round_robin_gives_w_turns_per_cycle():
    nodes = _set("round-robin", "udp:10.0.0.1:1=3", "udp:10.0.0.2:1", "udp:10.0.0.3:1=2")
    a, b, c = nodes.nodes
    cycle = 3 + 1 + 2
    for _ in range(4):
        picks = [nodes.select(0.0) for _ in range(cycle)]
        assert Counter(picks) == {a: 3, b: 1, c: 2}
    # smooth: the heavy node is not sent a burst of three in a row
    picks = [nodes.select(0.0) for _ in range(cycle)]
    assert [a, a, a] not in [picks[i:i + 3] for i in range(cycle - 2)]


def test_all_disabled_raises_with_set_and_return_time():
    nodes = _set("linear", "udp:10.0.0.1:1", "udp:10.0.0.2:1")
    a, b = nodes.nodes
    a.disable(100.0, 60.0)
    b.disable(120.0, 60.0)
    assert nodes.select(130.0) is None
    with pytest.raises(NoNodeAvailable) as info:
        nodes.select_or_raise(130.0)
    err = info.value
    assert err.set_id == 7
    assert err.retry_at == 160.0
    assert "set 7" in str(err)
    assert "udp:10.0.0.1:1 in 30.0 s" in str(err)


def test_node_set_rejects_bad_configuration():
    with pytest.raises(InvalidArgument, match="round-robin"):
        NodeSet(0, ["udp:127.0.0.1:1"], "random")
    with pytest.raises(InvalidArgument, match="no nodes"):
        NodeSet(3, [], "linear")
    with pytest.raises(InvalidArgument, match="twice"):
        NodeSet(0, ["udp:127.0.0.1:1", "UDP:127.0.0.1:1"])


def test_build_sets_from_list_dict_and_string():
    assert list(build_sets(["udp:127.0.0.1:1"])) == [0]
    sets = build_sets({1: ["udp:127.0.0.1:1"], 2: "unix:/tmp/x"}, "round-robin")
    assert [str(n) for n in sets[2].nodes] == ["unix:/tmp/x"]
    assert sets[1].algorithm == "round-robin"
    with pytest.raises(InvalidArgument, match="set id"):
        build_sets({"a": ["udp:127.0.0.1:1"]})
    assert NodeSet(0, ["udp:127.0.0.1:1"]).find("udp:127.0.0.1:1") is not None
    assert NodeSet(0, ["udp:127.0.0.1:1"]).find("udp:127.0.0.1:2") is None
