"""Several relay addresses per side (issue 14): AddressPorts, the engine's pick and its
release/claim by (address, port), restores, the legacy S and the configuration."""

from __future__ import annotations

import pytest

from lrk import cli
from lrk.control.legacy import LegacyControl
from lrk.core.engine import Engine, EngineConfig, Install
from lrk.core.persist import from_record, to_record
from lrk.core.ports import AddressPorts
from lrk.daemon.config import Config, load
from lrk.errors import ConfigError, PortsExhausted

IN1, IN2 = "198.51.100.1", "198.51.100.2"
EX1, EX2 = "198.51.100.11", "198.51.100.12"
CALLER = ("198.51.100.50", 4000)
CALLEE = ("198.51.100.60", 5000)


def engine(**kw) -> Engine:
    cfg = dict(internal_ip=IN1, external_ip=EX1, internal_ips=(IN1, IN2),
               external_ips=(EX1, EX2), port_start=30000, port_end=30007, quarantine=0.0)
    cfg.update(kw)
    return Engine(EngineConfig(**cfg))


# -- AddressPorts ------------------------------------------------------------------------
def test_each_address_has_its_own_range():
    ports = AddressPorts([IN1, IN2], 30000, 30003)
    assert ports.total == 4 and ports.free == 4
    assert [ports.allocate(0.0, IN1), ports.allocate(0.0, IN1)] == [30000, 30002]
    with pytest.raises(PortsExhausted, match="198.51.100.1: .*add relay addresses"):
        ports.allocate(0.0, IN1)
    assert ports.allocate(0.0, IN2) == 30000  # the same number on the other address
    assert ports.is_in_use(IN2, 30000) and ports.is_in_use(IN1, 30000)
    ports.release(IN1, 30000, 1.0, quarantine=False)
    assert not ports.is_in_use(IN1, 30000) and ports.is_in_use(IN2, 30000)
    assert ports.snapshot() == {"total": 4, "in_use": 2, "quarantined": 0, "free": 2}
    assert ports.by_address()[IN1]["in_use"] == 1 and ports.by_address()[IN2]["in_use"] == 1


def test_pick_takes_the_address_with_most_free_pairs_first_on_a_tie():
    ports = AddressPorts([IN1, IN2], 30000, 30007)
    assert ports.pick([IN1, IN2]) == IN1
    ports.allocate(0.0, IN1)
    assert ports.pick([IN1, IN2]) == IN2
    ports.claim(IN2, 30000, 0.0)
    ports.claim(IN2, 30002, 0.0)
    assert ports.pick([IN1, IN2]) == IN1


def test_shared_keeps_one_port_space_over_every_address():
    ports = AddressPorts([IN1, EX1], 30000, 30003, shared=True)
    assert ports.total == 2
    assert ports.allocate(0.0, IN1) == 30000
    assert ports.allocate(0.0, EX1) == 30002
    assert ports.is_in_use(EX1, 30000)  # a port number is unique on the relay
    assert ports.claim("198.51.100.99", 30000, 0.0) is False  # foreign claims share it too


def test_foreign_addresses_are_tracked_apart_and_never_handed_out():
    ports = AddressPorts([IN1], 30000, 30003)
    assert ports.claim("198.51.100.99", 41000, 0.0)
    assert not ports.claim("198.51.100.99", 41000, 0.0)
    assert ports.is_in_use("198.51.100.99", 41001)
    assert ports.in_use == 1 and ports.free == 2
    with pytest.raises(PortsExhausted, match="not configured"):
        ports.allocate(0.0, "198.51.100.99")
    ports.release("198.51.100.99", 41000, 1.0)
    assert ports.in_use == 0


def test_quarantine_applies_to_every_address():
    ports = AddressPorts([IN1, IN2], 30000, 30003, quarantine=5.0)
    ports.quarantine = 0.0
    port = ports.allocate(0.0, IN2)
    ports.release(IN2, port, 1.0)
    assert ports.quarantined == 0


# -- engine ------------------------------------------------------------------------------
def test_legs_spread_over_the_addresses_and_reuse_port_numbers():
    e = engine()
    sessions = [e.offer(0.0, f"c{i}", "ft", CALLER, interface="external")[0] for i in range(4)]
    a_ips = [s.legs["A"].relay_ip for s in sessions]
    b_ips = [s.legs["B"].relay_ip for s in sessions]
    assert a_ips == [IN1, IN2, IN1, IN2] and b_ips == [EX1, EX2, EX1, EX2]
    # 4 pairs per address, 16 in all: 4 calls of one stream use 8 pairs, 2 per address
    assert e.ports.in_use == 8 and e.ports.total == 16
    assert sessions[0].legs["A"].relay_port == sessions[1].legs["A"].relay_port == 30000
    assert {k for k in e.owner} == {(s.legs[n].relay_ip, s.legs[n].relay_port)
                                    for s in sessions for n in "AB"}
    # internal-only calls (both legs internal) fill IN1 and IN2: more than one range holds
    more = [e.offer(0.0, f"d{i}", "ft", CALLER)[0] for i in range(2)]
    assert [e.ports.by_address()[ip]["free"] for ip in (IN1, IN2, EX1, EX2)] == [0, 0, 2, 2]
    with pytest.raises(PortsExhausted):
        e.offer(0.0, "full", "ft", CALLER)
    assert "full" not in e.by_call and e.ports.in_use == 12
    # a delete releases by (address, port): the other address's same port stays held
    e.delete(1.0, "c0")
    assert not e.ports.is_in_use(IN1, 30000) and e.ports.is_in_use(IN2, 30000)
    assert (IN1, 30000) not in e.owner and e.owner[(IN2, 30000)] is sessions[1]
    assert len(more) == 2


def test_one_address_per_side_keeps_one_shared_range():
    e = engine(internal_ips=(IN1,), external_ips=(EX1,))
    session, _, _ = e.offer(0.0, "c1", "ft", CALLER, interface="external")
    assert (session.legs["A"].relay_port, session.legs["B"].relay_port) == (30000, 30002)
    assert e.ports.total == 4 and e.ports.is_in_use(EX1, 30000)
    forced = engine(shared_ports=True)  # kernel modes: shared whatever the addresses
    assert forced.ports.total == 4


def test_rebind_to_the_other_interface_picks_one_of_its_addresses():
    e = engine()
    session, _, _ = e.offer(0.0, "c1", "ft", CALLER)
    assert session.legs["B"].relay_ip == IN1
    e.ports.claim(EX1, 30000, 0.0)  # EX1 now has fewer free pairs than EX2
    e.offer(1.0, "c1", "ft", CALLER, interface="external")
    assert session.legs["B"].relay_ip == EX2
    assert (session.legs["A"].relay_ip, session.legs["A"].relay_port) == (IN1, 30000)
    assert not e.ports.is_in_use(IN1, 30002)  # leg B's old port, released on IN1
    e.offer(2.0, "c1", "ft", CALLER, interface="external")  # already external: no move
    assert session.legs["B"].relay_ip == EX2 and e.counters["sessions.rebound"] == 1


def test_restore_claims_by_address_and_refuses_a_clash_on_the_same_address():
    e = engine()
    s1 = e.offer(0.0, "c1", "ft", CALLER)[0]
    s2 = e.offer(0.0, "c2", "ft", CALLER)[0]
    assert s1.legs["A"].relay_port == s2.legs["A"].relay_port  # IN1 vs IN2
    fresh = engine()
    for s in (s1, s2):
        actions = fresh.adopt(5.0, from_record(to_record(s, 1.0, 1e6), 5.0, 1e6))
        assert [type(a) for a in actions] == [Install]
    assert fresh.ports.in_use == e.ports.in_use == 4
    assert fresh.owner.keys() == e.owner.keys()
    clash = from_record(to_record(s1, 1.0, 1e6), 5.0, 1e6)
    clash.call_id, clash.sid = "other", 99
    assert fresh.adopt(6.0, clash) == []
    assert fresh.counters["sessions.restore_refused"] == 1


def test_legacy_set_claims_on_the_address_it_names():
    e = engine(port_end=30099)
    legacy = LegacyControl(e)
    kam = ("127.0.0.1", 40000)

    def s_req(cookie: bytes, call_id: str, a_ip: str, b_ip: str) -> bytes:
        return (cookie + b" S 198.51.100.50 " + b_ip.encode() + b" " + a_ip.encode()
                + b" 198.51.100.60 4000 30010 30012 5000 60 " + call_id.encode())

    out1 = legacy.handle(s_req(b"1", "l1", IN1, IN1), kam, 0.0)
    out2 = legacy.handle(s_req(b"2", "l2", IN2, IN2), kam, 0.0)  # same ports, other address
    assert isinstance(out1.actions[-1], Install) and isinstance(out2.actions[-1], Install)
    assert e.owner[(IN1, 30010)].call_id == "l1" and e.owner[(IN2, 30010)].call_id == "l2"
    out3 = legacy.handle(s_req(b"3", "l3", IN2, IN2), kam, 0.0)  # held by a live call
    assert out3.actions == [] and legacy.counters["legacy.sessions.refused"] == 1


# -- configuration -----------------------------------------------------------------------
def test_config_lists_default_to_the_single_addresses():
    c = Config().validate()
    assert c.internal_ips == ["127.0.0.1"] and c.external_ips == ["127.0.0.1"]
    c = load(None, {"internal_ips": [IN1, IN2]})
    assert c.internal_ip == IN1 and c.external_ip == IN1
    assert c.external_ips == [IN1, IN2] and c.relay_addresses == [IN1, IN2]
    c = load(None, {"internal_ips": [IN1, IN2], "external_ip": EX1})
    assert c.external_ips == [EX1] and c.relay_addresses == [IN1, IN2, EX1]


@pytest.mark.parametrize("overrides, fragment", [
    ({"internal_ips": [IN1, "nope"]}, "'nope' is not an IP address"),
    ({"internal_ips": [IN1, IN1]}, "names an address twice"),
    ({"external_ips": [EX1, "2001:db8::1"]}, "mixes IPv4 and IPv6"),
    ({"internal_ip": IN2, "internal_ips": [IN1]}, "disagree"),
])
def test_config_refuses_bad_address_lists(overrides, fragment):
    with pytest.raises(ConfigError, match=fragment):
        load(None, overrides)


@pytest.mark.parametrize("mode, extra", [
    ("kernel", {}), ("nfqueue", {}), ("xdp", {"xdp_interfaces": ["eth0"]}),
    ("socket", {}), ("packet", {"packet_interfaces": ["eth0"]}),
])
def test_config_accepts_several_addresses_per_side_in_every_mode(mode, extra):
    c = load(None, dict(extra, mode=mode, internal_ips=[IN1, IN2], external_ips=[EX1, EX2]))
    assert c.several_addresses
    # mark slots in address order: internal side first (ct mark = port + slot * 0x10000)
    assert c.mark_slots == [IN1, IN2, EX1, EX2]
    one = load(None, dict(extra, mode=mode, internal_ip=IN1, external_ip=EX1))
    assert not one.several_addresses and one.mark_slots == []  # marks stay port numbers


@pytest.mark.parametrize("mode, extra", [
    ("kernel", {}), ("nfqueue", {}), ("xdp", {"xdp_interfaces": ["eth0"]})])
def test_the_relay_gives_kernel_modes_per_address_ports_and_mark_slots(tmp_path, mode, extra):
    from lrk.daemon.relay import Relay

    base = dict(extra, mode=mode, ports="30000-30007", control="127.0.0.1:22222",
                control_keys=[str(tmp_path / "keys")])
    relay = Relay(load(None, dict(base, internal_ips=[IN1, IN2], external_ips=[EX1, EX2])))
    rules = relay.plane.kernel.rules if mode == "xdp" else relay.plane.rules
    assert not relay.engine.ports.shared  # each address its own port space
    assert rules.slot_of == {IN1: 0, IN2: 1, EX1: 2, EX2: 3}
    single = Relay(load(None, dict(base, internal_ip=IN1, external_ip=EX1)))
    rules = single.plane.kernel.rules if mode == "xdp" else single.plane.rules
    assert single.engine.ports.shared and rules.slot_of == {}  # marks = ports, as before


def test_cli_flags_repeat():
    args = cli.build_parser().parse_args(["run", "--internal-ip", IN1, "--internal-ip", IN2,
                                          "--external-ip", EX1])
    over = cli._overrides(args)
    assert over["internal_ips"] == [IN1, IN2] and over["internal_ip"] == IN1
    assert over["external_ip"] == EX1 and over["external_ips"] == [EX1]


def test_cli_addresses_replace_the_files(tmp_path):
    path = tmp_path / "lrk.toml"
    path.write_text(f'internal_ips = ["{IN1}", "{IN2}"]\n')
    args = cli.build_parser().parse_args(["run", "--internal-ip", EX1])
    c = load(str(path), cli._overrides(args))
    assert c.internal_ips == [EX1] and c.external_ips == [EX1] and c.relay_addresses == [EX1]
    assert load(str(path), {}).relay_addresses == [IN1, IN2]


def test_metrics_show_ports_per_address():
    from lrk.daemon.metrics import RelayCollector, relay_snapshot

    e = engine()
    e.offer(0.0, "c1", "ft", CALLER, interface="external")
    snap = relay_snapshot(e, "socket", [{}])
    fams = {f.name: f for f in RelayCollector(lambda: snap).collect()}
    used = {s.labels["address"]: s.value for s in fams["lrk_address_ports_used"].samples}
    assert used == {IN1: 2.0, IN2: 0.0, EX1: 2.0, EX2: 0.0}  # ports: two per pair
    free = {s.labels["address"]: s.value for s in fams["lrk_address_ports_free"].samples}
    assert free[IN1] == 6.0 and free[IN2] == 8.0
    assert [s.value for s in fams["lrk_ports"].samples] == [32.0]
