"""Unit tests of lrk.daemon.config: TOML loading, overrides, validation."""

from __future__ import annotations

import dataclasses
import re
import sys
from pathlib import Path

import pytest
from netaddr import IPAddress

from lrk import cli
from lrk.daemon.config import Config, load, parse_hostport, parse_ports
from lrk.errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # PyPy 3.9
    import tomli as tomllib


def write(tmp_path, text, name="lrk.toml"):
    path = tmp_path / name
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8")
    return str(path)


def test_defaults():
    config = load(None, {})
    assert config.control_addr == ("127.0.0.1", 22222)
    assert config.port_range == (30000, 40000)
    assert config.internal_ip == "127.0.0.1"
    assert config.external_ip == "127.0.0.1"
    assert config.silence_timeout == 60.0
    assert config.max_lifetime == 10800.0
    assert IPAddress("127.0.0.5") in config.allow_set
    assert IPAddress("::1") in config.allow_set
    assert IPAddress("192.0.2.1") not in config.allow_set
    assert config.control_auth == "hmac" and config.control_keys == []
    assert config.control_auth_window == 30.0


def test_load_toml_file(tmp_path):
    path = write(
        tmp_path,
        """
control = "10.0.0.1:22223"
ports = "31000-31999"
internal_ip = "10.0.0.1"
external_ip = "203.0.113.1"
workers = 4
silence_timeout = 30
max_lifetime = 3600.5
control_allow = ["10.0.0.0/8"]
control_auth = "none"
control_keys = ["/etc/lrk/keys/kamailio.key"]
control_auth_window = 10
log_level = "info"
log-format = "json"
""",
    )
    config = load(path, {})
    assert config.control_addr == ("10.0.0.1", 22223)
    assert config.port_range == (31000, 31999)
    assert config.internal_ip == "10.0.0.1"
    assert config.external_ip == "203.0.113.1"
    assert config.workers == 4
    assert config.silence_timeout == 30.0 and isinstance(config.silence_timeout, float)
    assert config.max_lifetime == 3600.5
    assert IPAddress("10.1.2.3") in config.allow_set
    assert IPAddress("127.0.0.1") not in config.allow_set
    assert config.control_auth == "none"
    assert config.control_keys == ["/etc/lrk/keys/kamailio.key"]
    assert config.control_auth_window == 10.0
    assert config.log_level == "info"
    assert config.log_format == "json"


def test_lrk_table(tmp_path):
    path = write(tmp_path, '[lrk]\nports = "32000-32099"\nworkers = 2.0\n')
    config = load(path, {})
    assert config.port_range == (32000, 32099)
    assert config.workers == 2 and isinstance(config.workers, int)


def test_cli_overrides_win(tmp_path):
    path = write(tmp_path, 'ports = "31000-31999"\ninternal_ip = "10.0.0.1"\nworkers = 4\n')
    config = load(path, {"ports": "33000-33999", "workers": None, "internal_ip": "10.0.0.2"})
    assert config.port_range == (33000, 33999)
    assert config.internal_ip == "10.0.0.2"
    assert config.workers == 4  # None: option not given on the command line


def test_external_ip_defaults_to_internal_ip():
    assert load(None, {"internal_ip": "10.9.8.7"}).external_ip == "10.9.8.7"
    config = load(None, {"internal_ip": "10.9.8.7", "external_ip": "203.0.113.9"})
    assert config.external_ip == "203.0.113.9"


def test_ips_normalised():
    config = load(None, {"internal_ip": "2001:db8:0:0::1"})
    assert config.internal_ip == "2001:db8::1"
    assert config.external_ip == "2001:db8::1"


def test_ipv6_control_address():
    config = load(None, {"control": "[::1]:22222"})
    assert config.control_addr == ("::1", 22222)


def test_unknown_key_is_named(tmp_path):
    path = write(tmp_path, 'ports = "30000-30099"\nsilence_timout = 30\n')
    with pytest.raises(ConfigError) as exc:
        load(path, {})
    assert "silence_timout" in str(exc.value)
    assert "silence_timeout" in str(exc.value)  # the list of known options helps


def test_unknown_override_is_named():
    with pytest.raises(ConfigError, match="frobnicate"):
        load(None, {"frobnicate": 1})


@pytest.mark.parametrize(
    "toml,key",
    [
        ('workers = "4"', "workers"),
        ("workers = 2.5", "workers"),
        ("workers = true", "workers"),
        ('silence_timeout = "60"', "silence_timeout"),
        ("silence_timeout = false", "silence_timeout"),
        ("ports = 30000", "ports"),
        ("internal_ip = 10", "internal_ip"),
        ('control_allow = "127.0.0.1/8"', "control_allow"),
        ("control_token = 1234", "control_token"),
        ('external_ip = ["10.0.0.1"]', "external_ip"),
    ],
)
def test_wrong_type(tmp_path, toml, key):
    with pytest.raises(ConfigError) as exc:
        load(write(tmp_path, toml + "\n"), {})
    assert key in str(exc.value)


@pytest.mark.parametrize(
    "overrides,fragment",
    [
        ({"ports": "30000"}, "ports"),
        ({"ports": "a-b"}, "ports"),
        ({"ports": "40000-30000"}, "ports"),
        ({"ports": "80-90"}, "ports"),
        ({"ports": "30000-70000"}, "ports"),
        ({"ports": "30000-30002"}, "ports"),  # room for one pair only
        ({"internal_ip": "localhost"}, "internal_ip"),
        ({"internal_ip": "10.0.0.256"}, "internal_ip"),
        ({"external_ip": "relay.example"}, "external_ip"),
        ({"control": "127.0.0.1"}, "control"),
        ({"control": "127.0.0.1:0"}, "control"),
        ({"control": "127.0.0.1:65536"}, "control"),
        ({"control": "127.0.0.1:http"}, "control"),
        ({"control": "localhost:22222"}, "control"),
        ({"control": "[::1]22222"}, "control"),
        ({"control": "[nothost]:22222"}, "control"),
        ({"control_allow": ["not-a-net"]}, "control_allow"),
        ({"mode": "turbo"}, "mode"),
        ({"io": "fast"}, "io"),
        ({"workers": 0}, "workers"),
        ({"workers": 65}, "workers"),
        ({"batch": 0}, "batch"),
        ({"silence_timeout": 0}, "silence_timeout"),
        ({"max_lifetime": -1}, "max_lifetime"),
        ({"log_level": "verbose"}, "log_level"),
        ({"log_format": "xml"}, "log_format"),
    ],
)
def test_bad_values(overrides, fragment):
    with pytest.raises(ConfigError) as exc:
        load(None, overrides)
    assert fragment in str(exc.value)


def test_odd_port_range_needs_two_pairs():
    """30001-30004 holds a single RTP/RTCP pair (30002/30003): too small, like 30000-30002."""
    with pytest.raises(ConfigError, match="ports"):
        load(None, {"ports": "30001-30004"})


def test_smallest_valid_range():
    assert load(None, {"ports": "30000-30003"}).port_range == (30000, 30003)


def test_control_allow_entries_must_be_networks(tmp_path):
    with pytest.raises(ConfigError, match="control_allow"):
        load(write(tmp_path, "control_allow = [1]\n"), {})


def test_missing_file():
    with pytest.raises(ConfigError, match="nope.toml"):
        load("/nonexistent/nope.toml", {})


def test_invalid_toml(tmp_path):
    with pytest.raises(ConfigError, match="not valid TOML"):
        load(write(tmp_path, "ports = \n"), {})


def test_non_utf8_file_is_config_error(tmp_path):
    with pytest.raises(ConfigError):
        load(write(tmp_path, b'ports = "30000-30099"\n# caf\xe9\n'), {})


def test_lrk_key_that_is_not_a_table(tmp_path):
    with pytest.raises(ConfigError, match="lrk"):
        load(write(tmp_path, "lrk = 5\n"), {})


def test_top_level_keys_beside_lrk_table_are_not_ignored(tmp_path):
    path = write(tmp_path, 'ports = "31000-31999"\n[lrk]\ninternal_ip = "10.0.0.1"\n')
    try:
        config = load(path, {})
    except ConfigError:
        return  # rejecting the ambiguous file is fine too
    assert config.port_range == (31000, 31999)


def test_parse_ports():
    assert parse_ports("30000-40000") == (30000, 40000)
    assert parse_ports("1024-65535") == (1024, 65535)
    for bad in ("", "-", "30000-", "1023-2000", "30000-65536", "2-1"):
        with pytest.raises(ConfigError):
            parse_ports(bad)


def test_parse_hostport():
    assert parse_hostport("127.0.0.1:22222", "control") == ("127.0.0.1", 22222)
    assert parse_hostport("[2001:db8:0::1]:5", "control") == ("2001:db8::1", 5)
    assert parse_hostport("0.0.0.0:65535", "x") == ("0.0.0.0", 65535)
    with pytest.raises(ConfigError) as exc:
        parse_hostport("nowhere", "listen")
    assert "listen" in str(exc.value)


def test_config_validate_direct():
    config = Config(internal_ip="10.0.0.1").validate()
    assert config.external_ip == "10.0.0.1"
    with pytest.raises(ConfigError):
        Config(quarantine=-1).validate()


def test_coalesce_defaults_per_mode_and_bounds(tmp_path):
    # packet mode gathers packets by default (one tap, one sendmmsg per round); socket not
    assert load(None, {}).coalesce_us == 0
    packet = {"mode": "packet", "packet_interfaces": ["eth0"]}
    assert load(None, packet).coalesce_us == 500
    assert load(None, {**packet, "coalesce_us": 0}).coalesce_us == 0
    path = tmp_path / "c.toml"
    path.write_text("coalesce_us = 200\n")
    assert load(str(path), {}).coalesce_us == 200
    for bad in (-2, 5001):
        with pytest.raises(ConfigError, match="coalesce_us"):
            load(None, {"coalesce_us": bad})


# -- metrics and max_control_rate ---------------------------------------------------------
def test_metrics_default_off_and_addresses(tmp_path):
    assert load(None, {}).metrics == "off"
    assert load(None, {}).metrics_addr is None
    for off in ("off", "OFF", "none", "", " off "):
        assert load(None, {"metrics": off}).metrics_addr is None
    assert load(None, {"metrics": "127.0.0.1:9103"}).metrics_addr == ("127.0.0.1", 9103)
    assert load(None, {"metrics": "[::1]:9103"}).metrics_addr == ("::1", 9103)
    assert load(None, {"metrics": "0.0.0.0:9103"}).metrics_addr == ("0.0.0.0", 9103)
    path = write(tmp_path, 'metrics = "10.0.0.5:9200"\n')
    assert load(path, {}).metrics_addr == ("10.0.0.5", 9200)


@pytest.mark.parametrize("value", ["9103", "localhost:9103", "127.0.0.1:0", "127.0.0.1:65536",
                                   "127.0.0.1:http", "[::1]9103", "on"])
def test_metrics_bad_address(value):
    with pytest.raises(ConfigError, match="metrics"):
        load(None, {"metrics": value})


@pytest.mark.parametrize("toml", ["metrics = 9103", "metrics = true",
                                  'metrics = ["127.0.0.1:9103"]'])
def test_metrics_wrong_type(tmp_path, toml):
    with pytest.raises(ConfigError, match="metrics"):
        load(write(tmp_path, toml + "\n"), {})


def test_kernel_counters_sources(tmp_path):
    assert load(None, {}).kernel_counters == "conntrack"
    for source in ("conntrack", "none", "rules"):
        config = load(write(tmp_path, f'kernel_counters = "{source}"\n'), {})
        assert config.kernel_counters == source
    with pytest.raises(ConfigError) as exc:
        load(None, {"kernel_counters": "off"})
    message = str(exc.value)
    assert "kernel_counters 'off'" in message
    assert all(source in message for source in ("conntrack", "none", "rules"))


def test_max_control_rate(tmp_path):
    assert load(None, {}).max_control_rate == 0.0
    config = load(write(tmp_path, "max_control_rate = 50\n"), {})
    assert config.max_control_rate == 50.0 and isinstance(config.max_control_rate, float)
    assert load(None, {"max_control_rate": 0.5}).max_control_rate == 0.5
    assert load(None, {"max_control_rate": 1e6}).max_control_rate == 1e6
    assert Config(max_control_rate=7).validate().max_control_rate == 7.0


@pytest.mark.parametrize("toml", ["max_control_rate = -1", "max_control_rate = nan",
                                  "max_control_rate = inf", "max_control_rate = 1000001",
                                  'max_control_rate = "50"', "max_control_rate = true"])
def test_max_control_rate_bad(tmp_path, toml):
    with pytest.raises(ConfigError, match="max_control_rate"):
        load(write(tmp_path, toml + "\n"), {})


def test_max_control_rate_validated_on_direct_config():
    for bad in (-0.1, float("nan"), True, "5"):
        with pytest.raises(ConfigError, match="max_control_rate"):
            Config(max_control_rate=bad).validate()


# -- the example configuration etc/lrk.toml -------------------------------------------------
EXAMPLE = Path(__file__).resolve().parents[2] / "etc" / "lrk.toml"
OPTION_LINE = re.compile(r"^#([a-z_]+) =(.*)$")


def example_options():
    """{option: documented default} from the `#option = value` lines (None: `#option =`),
    and the line before each (its meaning)."""
    options, meaning = {}, {}
    lines = EXAMPLE.read_text(encoding="utf-8").splitlines()
    for i, line in enumerate(lines):
        m = OPTION_LINE.match(line)
        if not m:
            continue
        name, text = m.group(1), m.group(2).strip()
        assert name not in options, f"{name} documented twice"
        options[name] = tomllib.loads(f"v = {text}")["v"] if text else None
        meaning[name] = lines[i - 1]
    return options, meaning


def test_example_config_lists_every_option_with_its_default():
    options, meaning = example_options()
    defaults = Config()
    names = [f.name for f in dataclasses.fields(Config)]
    assert sorted(options) == sorted(names), "etc/lrk.toml and Config differ in options"
    for name in names:
        want, got = getattr(defaults, name), options[name]
        assert got == want, f"etc/lrk.toml documents {name} = {got!r}, Config has {want!r}"
        assert type(got) is type(want), f"{name}: {type(got).__name__} vs {type(want).__name__}"
        assert meaning[name].startswith("# ") and len(meaning[name]) > 10, (
            f"{name} has no line of meaning above it")


def test_example_config_loads_as_is_and_uncommented(tmp_path):
    assert load(str(EXAMPLE), {}) == load(None, {})  # everything commented out
    text = EXAMPLE.read_text(encoding="utf-8")
    uncommented = "\n".join(line[1:] if OPTION_LINE.match(line) and not line.endswith("=")
                            else line for line in text.splitlines())
    path = write(tmp_path, uncommented)
    assert load(path, {}) == load(None, {})


# -- lrkproxy run --check-config --------------------------------------------------------------
def test_check_config_valid(tmp_path, capsys):
    path = write(tmp_path, 'ports = "31000-31999"\nmetrics = "127.0.0.1:9103"\n'
                 "max_control_rate = 20\nmax_sessions = 10\n")
    assert cli.main(["run", "--check-config", "--config", path]) == 0
    out = capsys.readouterr()
    assert out.err == ""
    assert out.out == (
        f"lrkproxy: configuration OK ({path}): mode=socket control=127.0.0.1:22222 "
        "legacy=127.0.0.1:22333 ports=31000-31999 (500 RTP/RTCP pairs, 10 sessions) "
        "internal_ip=127.0.0.1 external_ip=127.0.0.1 workers=1 metrics=127.0.0.1:9103 "
        "max_control_rate=20/s log_level=warning\n")


def test_check_config_defaults_and_example(capsys):
    assert cli.main(["run", "--check-config"]) == 0
    assert "configuration OK (defaults): mode=socket" in capsys.readouterr().out
    assert cli.main(["run", "--check-config", "--config", str(EXAMPLE)]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"lrkproxy: configuration OK ({EXAMPLE}): mode=socket ")
    assert "(5000 RTP/RTCP pairs, 2500 sessions)" in out
    assert out.count("\n") == 1


def test_check_config_command_line_overrides(capsys):
    assert cli.main(["run", "--check-config", "--ports", "32000-32003", "--metrics",
                     "[::1]:9103", "--legacy", "off"]) == 0
    out = capsys.readouterr().out
    assert "ports=32000-32003 (2 RTP/RTCP pairs, 1 sessions)" in out
    assert "legacy=off" in out and "metrics=[::1]:9103" in out


@pytest.mark.parametrize("text,message", [
    ('ports = "1-2"\n', "lrkproxy: ports '1-2' must lie within 1024-65535 with START <= END"),
    ("silence_timout = 3\n", "lrkproxy: unknown option 'silence_timout'; known: "),
    ('metrics = "localhost:9103"\n',
     "lrkproxy: metrics 'localhost:9103': 'localhost' is not an IP address"),
    ("max_control_rate = -5\n", "lrkproxy: max_control_rate -5.0 must be a number"),
    ('store = "redis"\nredis_url = "127.0.0.1:6379"\n',
     "lrkproxy: redis_url '127.0.0.1:6379': Redis URL must specify one of the following "
     "schemes"),
    ('store = "redis"\nredis_url = "redis://127.0.0.1:63x79/0"\n',
     "lrkproxy: redis_url 'redis://127.0.0.1:63x79/0': Port could not be cast"),
])
def test_check_config_invalid_exits_2(tmp_path, capsys, text, message):
    path = write(tmp_path, text)
    assert cli.main(["run", "--check-config", "--config", path]) == 2
    out = capsys.readouterr()
    assert out.out == ""
    assert out.err.startswith(message)
    assert out.err.count("\n") == 1


def test_check_config_missing_file(capsys):
    assert cli.main(["run", "--check-config", "--config", "/nonexistent/lrk.toml"]) == 2
    assert "/nonexistent/lrk.toml" in capsys.readouterr().err


def test_standby_media_is_parsed_and_checked():
    """kernel/xdp takeover: the peers' media addresses and port ranges."""
    cfg = Config(ports="34000-37999", store="redis", redis_url="redis://127.0.0.1:6379/0",
                 standby_for=["node1"],
                 standby_media=["198.51.100.100:30000-33999", "[2001:DB8::1]:38000-39999"])
    assert cfg.validate().standby_media_ranges == [("198.51.100.100", 30000, 33999),
                                                   ("2001:db8::1", 38000, 39999)]
    for bad, match in ((["198.51.100.100:35000-36000"], "overlaps"),
                       (["198.51.100.100"], "ADDR:START-END"),
                       (["nohost:30000-33999"], "not an IP address"),
                       (["198.51.100.100:3-1"], "START-END|within")):
        with pytest.raises(ConfigError, match=match):
            dataclasses.replace(cfg, standby_media=bad).validate()
    with pytest.raises(ConfigError, match="standby_for is empty"):
        Config(ports="34000-37999", standby_media=["198.51.100.100:30000-33999"]).validate()


def test_packet_io_is_tap_or_af_xdp():
    packet = {"mode": "packet", "packet_interfaces": ["eth0"]}
    assert load(None, packet).packet_io == "tap"
    assert load(None, {**packet, "packet_io": "af_xdp"}).packet_io == "af_xdp"
    with pytest.raises(ConfigError, match="packet_io 'xsk' is not one of tap, af_xdp"):
        load(None, {**packet, "packet_io": "xsk"})


def test_af_xdp_checksum_is_offload_kernel_or_worker():
    packet = {"mode": "packet", "packet_interfaces": ["eth0"], "packet_io": "af_xdp"}
    assert load(None, packet).af_xdp_checksum == "offload"
    for who in ("kernel", "worker"):
        assert load(None, {**packet, "af_xdp_checksum": who}).af_xdp_checksum == who
    with pytest.raises(ConfigError, match="af_xdp_checksum 'nic' is not one of offload, "
                                          "kernel, worker"):
        load(None, {**packet, "af_xdp_checksum": "nic"})


def test_af_xdp_ring_is_a_power_of_two_in_bounds():
    packet = {"mode": "packet", "packet_interfaces": ["eth0"], "packet_io": "af_xdp"}
    assert load(None, packet).af_xdp_ring == 16384
    for slots in (512, 4096, 65536):
        assert load(None, {**packet, "af_xdp_ring": slots}).af_xdp_ring == slots
    for bad in (256, 5000, 131072, 0):
        with pytest.raises(ConfigError, match=f"af_xdp_ring {bad} must be a power of two "
                                              "within 512..65536"):
            load(None, {**packet, "af_xdp_ring": bad})
    with pytest.raises(ConfigError, match="'af_xdp_ring' must be of type int"):
        load(None, {**packet, "af_xdp_ring": "big"})
