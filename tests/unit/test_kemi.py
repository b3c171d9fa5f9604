"""lrk.kemi without Kamailio: a fake KSR (pv, textops, htable, logs), fake relay nodes.

Two handler objects stand for two Kamailio worker processes; they share only what real
workers share (the htable and the transaction's AVPs).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import pytest

from lrk.client import LrkClient
from lrk.control.auth import KEYS_ENV, Key, ensure_keys
from lrk.errors import ConfigError
from lrk.kemi import LrkKemi, client_options, from_mapping, load_config, parse_args
from lrk.kemi.handler import DONE, FAILED, LATE_OFFER_AVP, NOTHING, REINVITE_AVP

try:
    from client_fakes import FakeClock, FakeNet, decode
except ImportError:  # tests/ collected as a package
    from tests.unit.client_fakes import FakeClock, FakeNet, decode

ROOT = Path(__file__).resolve().parents[2]
A, B = "udp:10.0.0.1:22222", "udp:10.0.0.2:22222"


# -- fakes --------------------------------------------------------------------------------
class FakePV:
    def __init__(self) -> None:
        self.values: Dict[str, Any] = {}

    def get(self, name: str) -> Any:
        return self.values.get(name)

    def sets(self, name: str, value: str) -> int:
        self.values[name] = value
        return 1


class FakeTextops:
    def __init__(self) -> None:
        self.bodies: List[Tuple[str, str]] = []
        self.result = 1

    def set_body(self, body: str, ctype: str) -> int:
        self.bodies.append((body, ctype))
        return self.result


class FakeHtable:
    def __init__(self, store: Dict[Tuple[str, str], Any]) -> None:
        self.store = store

    def sht_get(self, table: str, key: str) -> Any:
        return self.store.get((table, key))

    def sht_setxs(self, table: str, key: str, value: str, expires: int) -> int:
        assert isinstance(value, str) and isinstance(expires, int) and expires > 0
        self.store[(table, key)] = value
        return 1

    def sht_rm(self, table: str, key: str) -> int:
        self.store.pop((table, key), None)
        return 1


class FakeKSR:
    def __init__(self, store: Dict[Tuple[str, str], Any]) -> None:
        self.pv = FakePV()
        self.textops = FakeTextops()
        self.htable = FakeHtable(store)
        self.logs: List[Tuple[str, str]] = []
        for level in ("dbg", "info", "warn", "err"):
            setattr(self, level, lambda text, level=level: self.logs.append((level, text)))


class Worker:
    """One Kamailio worker process: its own KSR view, handler and client."""

    def __init__(self, handler: LrkKemi, ksr: FakeKSR) -> None:
        self.handler = handler
        self.ksr = ksr

    def manage(self, message: str, param: Optional[str] = None,
               avps: Optional[Dict[str, Any]] = None) -> int:
        """Run lrk_manage on `message`; `avps` are the transaction's AVPs (shared)."""
        pv = self.ksr.pv.values
        pv.clear()
        pv.update(avps if avps is not None else {})
        pv["$mb"] = message
        result = self.handler.lrk_manage(object(), param)
        if avps is not None:
            avps.update({k: v for k, v in pv.items() if k.startswith("$avp(")})
        return result

    @property
    def body(self) -> str:
        return self.ksr.textops.bodies[-1][0]

    @property
    def errors(self) -> List[str]:
        return [text for level, text in self.ksr.logs if level == "err"]


@pytest.fixture
def keys(tmp_path) -> str:
    """A key directory with admin.key and client.key."""
    directory = str(tmp_path / "keys")
    ensure_keys(directory)
    return directory


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def net(clock) -> FakeNet:
    return FakeNet(clock)


@pytest.fixture
def workers(net, clock):
    """workers(config) -> [Worker, Worker] sharing one htable and one fake network."""
    store: Dict[Tuple[str, str], Any] = {}

    def make(config: Dict[str, Any], count: int = 2) -> List[Worker]:
        cfg = from_mapping(dict(config, key="none"))  # the fake relays check no signature
        made = []
        for pid in range(count):
            ksr = FakeKSR(store)
            handler = LrkKemi(cfg, ksr=ksr, getpid=lambda pid=pid: 100 + pid,
                              client_factory=lambda c: c.new_client(
                                  transport_factory=net.factory, clock=clock))
            assert handler.child_init(pid + 1) == 0
            made.append(Worker(handler, ksr))
        return made

    make.store = store  # type: ignore[attr-defined]
    return make


# -- SIP ------------------------------------------------------------------------------------
def sdp(port: int, ip: str = "192.0.2.10") -> str:
    return (f"v=0\r\no=- 1 1 IN IP4 {ip}\r\ns=-\r\nc=IN IP4 {ip}\r\nt=0 0\r\n"
            f"m=audio {port} RTP/AVP 0\r\nm=video {port + 2} RTP/AVP 96\r\n")


def request(method: str, body: str = "", to_tag: str = "", call_id: str = "c1",
            branch: str = "z9hG4bK1", cseq: int = 1) -> str:
    to = "<sip:b@x>" + (f";tag={to_tag}" if to_tag else "")
    head = (f"{method} sip:b@192.0.2.20 SIP/2.0\r\nVia: SIP/2.0/UDP 192.0.2.10;branch={branch}"
            f"\r\nFrom: <sip:a@x>;tag=ft\r\nTo: {to}\r\nCall-ID: {call_id}\r\n"
            f"CSeq: {cseq} {method}\r\n")
    if body:
        head += "Content-Type: application/sdp\r\n"
    return head + f"Content-Length: {len(body)}\r\n\r\n{body}"


def response(status: str, method: str = "INVITE", body: str = "", call_id: str = "c1",
             cseq: int = 1, to_tag: str = "tt") -> str:
    head = (f"SIP/2.0 {status}\r\nVia: SIP/2.0/UDP 192.0.2.10;branch=z9hG4bK1\r\n"
            f"From: <sip:a@x>;tag=ft\r\nTo: <sip:b@x>;tag={to_tag}\r\nCall-ID: {call_id}\r\n"
            f"CSeq: {cseq} {method}\r\n")
    if body:
        head += "Content-Type: application/sdp\r\n"
    return head + f"Content-Length: {len(body)}\r\n\r\n{body}"


def commands(net: FakeNet, node: str) -> List[Tuple[str, Optional[str], Optional[str]]]:
    return [(r["cmd"], r.get("from_tag"), r.get("to_tag")) for r in net.requests_to(node)]


# -- arguments and configuration -------------------------------------------------------------
@pytest.mark.parametrize("text, expected", [
    (None, (None, None, None)),
    ("", (None, None, None)),
    ("<null>", (None, None, None)),
    ("IE", ("ie", None, None)),
    ("ei set=2", ("ei", 2, None)),
    ("ip=203.0.113.5 ie", ("ie", None, "203.0.113.5")),
    ("set=0 ip=2001:db8::5", (None, 0, "2001:db8::5")),
])
def test_parse_args(text, expected):
    assert tuple(parse_args(text)) == expected


@pytest.mark.parametrize("text, match", [
    ("ie ei", "flags given twice"), ("set=x", "not a set number"),
    ("ip=nowhere", "not an IP address"), ("force", "unknown word 'force'"),
])
def test_parse_args_rejects(text, match):
    with pytest.raises(ValueError, match=match):
        parse_args(text)


def test_shipped_config_loads(keys, monkeypatch):
    monkeypatch.setenv(KEYS_ENV, keys)  # the default key: client.key of $LRK_KEYS
    cfg = load_config(str(ROOT / "etc" / "kamailio" / "lrk-kemi.toml"))
    assert cfg.sets == {0: ["udp:127.0.0.1:22222"]}
    assert cfg.call_table == "lrk"
    assert isinstance(cfg.client["key"], Key) and cfg.client["key"].id == "client"


def test_config_maps_lrkproxy_parameters(tmp_path, keys):
    path = tmp_path / "k.toml"
    path.write_text('algorithm = "round-robin"\ntimeout = 0.5\nretries = 3\n'
                    'disable_period = 10\ntable_timeout = 600\ncall_table = ""\n'
                    f'key = "{keys}/admin.key"\n'
                    '[sets]\n1 = ["udp:10.0.0.1:22222=2", "' + B + '"]\n'
                    '0 = "' + A + '"\n')
    cfg = load_config(str(path))
    assert cfg.sets == {1: ["udp:10.0.0.1:22222=2", B], 0: [A]}
    assert cfg.call_table == ""
    with cfg.new_client() as client:  # no socket until a request
        assert client.sets[1].algorithm == "round-robin"
        assert client.sets[1].nodes[0].weight == 2
        assert client._core.timeout == 0.5 and client._core.retries == 3
        assert client._core.disable_period == 10.0
        assert client._core.default_set == 1  # the first set listed
        assert client.key_id == "admin"  # read once, when the config was loaded


def test_config_without_a_key_stops_kamailio(tmp_path, monkeypatch):
    monkeypatch.setenv(KEYS_ENV, str(tmp_path / "empty"))
    with pytest.raises(ConfigError, match="no lrk control key in .*empty"):
        from_mapping({"sets": {"0": [A]}})
    with pytest.raises(ConfigError, match="key: .*missing"):
        from_mapping({"sets": {"0": [A]}, "key": str(tmp_path / "missing.key")})
    cfg = from_mapping({"sets": {"0": [A]}, "key": "none"})  # relays without auth
    with cfg.new_client() as client:
        assert client.key_id is None


@pytest.mark.parametrize("data, match", [
    ({}, "no \\[sets\\] table"),
    ({"sets": {}}, "must be a table"),
    ({"sets": {"x": [A]}}, "node set id 'x'"),
    ({"sets": {"0": []}}, "must list node strings"),
    ({"sets": {"0": ["tcp:1.2.3.4:5"]}}, "unknown scheme"),
    ({"sets": {"0": [A]}, "algorithm": "random"}, "unknown selection algorithm"),
    ({"sets": {"0": [A]}, "retries": 0}, "retries must be"),
    ({"sets": {"0": [A]}, "call_table": "a b"}, "call_table"),
    ({"sets": {"0": [A]}, "clock": 1}, "unknown key 'clock'"),
    ({"sets": {"0": [A]}, "lrkproxy_sock": A}, "unknown key 'lrkproxy_sock'"),
    ({"sets": {"0": [A]}, "token": "s3cret"}, "token= is gone"),
])
def test_config_errors_name_the_key(data, match):
    with pytest.raises(ConfigError, match=match):
        from_mapping(dict(data, key="none") if "sets" in data else data, "test.toml")


def test_unreadable_config_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="No such file"):
        load_config(str(tmp_path / "missing.toml"))
    bad = tmp_path / "bad.toml"
    bad.write_text("[sets\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(str(bad))


def test_every_client_option_may_come_from_the_file():
    assert {"algorithm", "timeout", "retries", "disable_period", "table_timeout",
            "key"} <= set(client_options())
    assert "clock" not in client_options() and "sets" not in client_options()


# -- the handler ----------------------------------------------------------------------------
def test_client_is_made_per_process_on_first_message(net, clock):
    cfg = from_mapping({"sets": {"0": [A]}, "key": "none"})
    pid = [1]
    made: List[LrkClient] = []

    def factory(c):
        made.append(c.new_client(transport_factory=net.factory, clock=clock))
        return made[-1]

    handler = LrkKemi(cfg, ksr=FakeKSR({}), getpid=lambda: pid[0], client_factory=factory)
    assert handler.child_init(0) == 0 and made == []  # nothing at init
    first = handler.client()
    assert handler.client() is first and len(made) == 1
    pid[0] = 2  # a forked child: a client of its own; the parent's is left alone
    second = handler.client()
    assert second is not first and not first._closed
    assert handler.child_init(3) == 0 and handler.client() is second


def test_offer_answer_delete_rewrite_every_stream(workers, net):
    first, other = workers({"sets": {"0": [A]}})
    assert first.manage(request("INVITE", sdp(4000)), "ie") == DONE
    body, ctype = first.ksr.textops.bodies[-1]
    assert ctype == "application/sdp"
    assert "c=IN IP4 127.0.0.1" in body and "m=audio 30002 " in body
    assert workers.store[("lrk", "call:c1")] == A
    # the 200 is handled by another worker: same node (here the only one)
    assert other.manage(response("200 OK", body=sdp(5000)), "ie") == DONE
    assert "m=audio 30000 " in other.body
    assert other.manage(request("ACK", to_tag="tt")) == NOTHING
    assert first.manage(request("BYE", to_tag="tt", cseq=2)) == DONE
    assert ("lrk", "call:c1") not in workers.store
    assert [(r["cmd"], r.get("interface")) for r in net.requests_to(A)] == [
        ("offer", "external"), ("answer", "internal"), ("delete", None)]
    assert first.errors == [] and other.errors == []


def test_answers_follow_the_call_to_its_node_in_every_worker(workers, net):
    """round-robin: every worker's own rotation starts at the first node, so without the
    shared table a call offered on B would be answered on A."""
    w1, w2 = workers({"sets": {"0": [A, B]}, "algorithm": "round-robin"})
    assert w1.manage(request("INVITE", sdp(4000), call_id="c1")) == DONE  # A
    assert w1.manage(request("INVITE", sdp(4004), call_id="c2")) == DONE  # B
    assert workers.store[("lrk", "call:c2")] == B
    for call_id in ("c2", "c1"):
        assert w2.manage(response("183 Session Progress", body=sdp(5000), call_id=call_id)) \
            == DONE
        assert w2.manage(request("BYE", to_tag="tt", call_id=call_id, cseq=2)) == DONE
    assert [r["call_id"] for r in net.requests_to(B)] == ["c2", "c2", "c2"]
    assert [r["call_id"] for r in net.requests_to(A)] == ["c1", "c1", "c1"]


def test_without_a_call_table_each_worker_is_on_its_own(workers, net):
    w1, w2 = workers({"sets": {"0": [A, B]}, "algorithm": "round-robin", "call_table": ""})
    w1.manage(request("INVITE", sdp(4000), call_id="c1"))
    w1.manage(request("INVITE", sdp(4004), call_id="c2"))  # B
    assert workers.store == {}
    assert w2.manage(response("200 OK", body=sdp(5000), call_id="c2")) == FAILED
    assert "not_found" in w2.errors[0]


def test_a_silent_node_is_disabled_for_every_worker(workers, net, clock):
    w1, w2 = workers({"sets": {"0": [A, B]}, "timeout": 0.5, "retries": 2,
                      "disable_period": 30})
    net.dead.add(A)
    assert w1.manage(request("INVITE", sdp(4000), call_id="c1")) == DONE
    assert len(net.sent_to(A)) == 2 and float(workers.store[("lrk", "node:" + A)]) > 0
    assert any("did not answer" in text for _level, text in w1.ksr.logs)
    assert w2.manage(request("INVITE", sdp(4000), call_id="c2")) == DONE
    assert len(net.sent_to(A)) == 2  # the other worker did not try it
    clock.advance(31)  # the period is over: the next offer tries A again, and it answers
    net.dead.discard(A)
    assert w2.manage(request("INVITE", sdp(4000), call_id="c3")) == DONE
    assert len(net.sent_to(A)) == 3 and ("lrk", "node:" + A) not in workers.store


def test_no_node_fails_the_message(workers, net):
    (w1,) = workers({"sets": {"0": [A]}, "timeout": 0.1, "retries": 1}, count=1)
    net.dead.add(A)
    assert w1.manage(request("INVITE", sdp(4000))) == FAILED
    assert "no relay node available" in w1.errors[0]
    assert w1.ksr.textops.bodies == []


def test_late_offer_swaps_tags_and_interfaces(workers, net):
    """INVITE without SDP: the 200's SDP is the callee's offer, the ACK's the answer."""
    w1, w2 = workers({"sets": {"0": [A]}})
    transaction: Dict[str, Any] = {}
    assert w1.manage(request("INVITE"), "ie", transaction) == NOTHING
    assert transaction == {LATE_OFFER_AVP: "1"} and net.sent == []
    assert w2.manage(response("200 OK", body=sdp(5000)), "ie", transaction) == DONE
    assert "m=audio 30002 " in w2.body
    assert w1.manage(request("ACK", sdp(4000), to_tag="tt"), "ie") == DONE
    assert "m=audio 30000 " in w1.body
    sent = net.requests_to(A)
    assert [(r["cmd"], r["from_tag"], r["to_tag"], r["interface"]) for r in sent] == [
        ("offer", "tt", "ft", "internal"), ("answer", "tt", "ft", "external")]


def test_failed_reinvite_keeps_the_session(workers, net):
    w1, w2 = workers({"sets": {"0": [A]}})
    w1.manage(request("INVITE", sdp(4000)))
    w2.manage(response("200 OK", body=sdp(5000)))
    transaction: Dict[str, Any] = {}
    assert w1.manage(request("INVITE", sdp(4000), to_tag="tt", cseq=2), None,
                     transaction) == DONE
    assert transaction == {REINVITE_AVP: "1"}
    assert w2.manage(response("488 Not Acceptable Here", cseq=2), None, transaction) \
        == NOTHING
    assert [c for c, _f, _t in commands(net, A)] == ["offer", "answer", "offer"]
    # a failure to an initial INVITE (no AVP) ends the session, as lrkproxy_manage() does
    assert w2.manage(response("486 Busy Here", cseq=1), None, {}) == DONE
    assert [c for c, _f, _t in commands(net, A)][-1] == "delete"


def test_delete_of_an_ended_call_and_lrk_delete(workers, net):
    w1, w2 = workers({"sets": {"0": [A]}})
    assert w1.manage(request("CANCEL")) == DONE  # not_found: nothing left, no error
    assert w1.errors == []
    w1.manage(request("INVITE", sdp(4000)))
    w2.ksr.pv.values["$ci"] = "c1"
    assert w2.handler.lrk_delete(object()) == DONE
    assert w2.handler.lrk_delete(object(), "set=0") == DONE  # gone already: fine
    assert w2.handler.lrk_delete(object(), "ie") == FAILED
    assert ("lrk", "call:c1") not in workers.store
    assert [c for c, _f, _t in commands(net, A)] == ["delete", "offer", "delete", "delete"]


def test_other_messages_and_bad_input(workers, net):
    (w1,) = workers({"sets": {"0": [A]}}, count=1)
    assert w1.manage(request("OPTIONS")) == NOTHING
    assert w1.manage(response("180 Ringing")) == NOTHING
    assert w1.manage(request("INVITE", sdp(4000)), "sideways") == FAILED
    assert "unknown word 'sideways'" in w1.errors[-1]
    assert w1.manage("garbage") == FAILED
    assert w1.manage(request("INVITE", "v=0\r\n")) == FAILED  # no m= line
    assert "no m= line" in w1.errors[-1]
    assert net.sent == []
    w1.ksr.textops.result = -1
    assert w1.manage(request("INVITE", sdp(4000))) == FAILED
    assert "set_body() failed" in w1.errors[-1]


def test_unexpected_errors_are_logged_not_raised(workers):
    (w1,) = workers({"sets": {"0": [A]}}, count=1)

    def broken(*_args: Any) -> None:
        raise RuntimeError("boom")

    w1.ksr.pv.get = broken
    assert w1.handler.lrk_manage(object(), None) == FAILED
    assert "unexpected error" in w1.errors[-1] and "RuntimeError: boom" in w1.errors[-1]


def test_set_and_ip_reach_the_client(workers, net):
    (w1,) = workers({"sets": {"0": [A], "1": [B]}}, count=1)
    assert w1.manage(request("INVITE", sdp(4000)), "set=1 ip=203.0.113.7") == DONE
    assert net.requests_to(B)[0]["cmd"] == "offer" and net.sent_to(A) == []
    assert "c=IN IP4 203.0.113.7" in w1.body
    assert decode(net.sent_to(B)[0])["call_id"] == "c1"


def test_describe_and_log(keys):
    cfg = from_mapping({"sets": {"0": [A, B]}, "algorithm": "round-robin",
                        "key": f"{keys}/client.key"})
    ksr = FakeKSR({})
    handler = LrkKemi(cfg, ksr=ksr)
    line = handler.describe()
    assert line.startswith("lrk.kemi on ")
    assert line.endswith(f"set 0: {A} {B}; algorithm round-robin, key client, call table lrk")
    handler.log("info", "hello")
    assert ksr.logs == [("info", "lrk: hello\n")]
    ksr.info = None  # a broken logger does not fail the caller
    handler.log("info", "again")
    cfg = from_mapping({"sets": {"0": [A]}, "key": "none", "call_table": ""})
    assert LrkKemi(cfg, ksr=ksr).describe().endswith(
        "algorithm linear, key none (unsigned), call table none (each worker alone)")
