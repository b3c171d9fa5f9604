"""Authenticated control (issue 11), sans-IO: keys, signatures, replay, ownership, bounds.

Every attack of the issue has a test here at the codec level; tests/integration/
test_security.py repeats the important ones against a live relay.
"""

from __future__ import annotations

import logging
import os
import stat
from typing import Any, Dict, Optional

import msgpack
import pytest

from lrk.client import LrkClient
from lrk.client.errors import InvalidArgument
from lrk.client.protocol import encode_request, resolve_key
from lrk.control.auth import (
    MAGIC,
    TRAILER_BYTES,
    Authenticator,
    Key,
    KeyFileError,
    ReplayGuard,
    create_key,
    default_key_dir,
    ensure_keys,
    find_key,
    load_key,
    load_keys,
    parse_key,
    relay_authenticator,
    sign,
    trailer_of,
)
from lrk.control.legacy import LegacyControl
from lrk.control.msgpack_proto import (
    LIST_REPLY_BUDGET,
    MAX_CALL_ID,
    MAX_ERROR_MESSAGE,
    MAX_REPLY_BYTES,
    MsgpackControl,
    Outcome,
    pack,
)
from lrk.core.engine import Engine, EngineConfig, Remove
from lrk.daemon.config import Config, load
from lrk.errors import ConfigError
from tests.control_keys import ADMIN_KEY, OTHER_KEY, TEST_KEY, WALL, authenticator, signed

A = ("127.0.0.1", 5060)
B = ("127.0.0.1", 5061)
CALLER = {"ip": "198.51.100.10", "port": 4000}
CALLEE = {"ip": "198.51.100.20", "port": 5000}
INTERNAL = "127.0.0.1"


def make(auth: bool = True, **engine_kw: Any) -> MsgpackControl:
    cfg = dict(internal_ip=INTERNAL, external_ip=INTERNAL, port_start=30000, port_end=30999,
               quarantine=0)
    cfg.update(engine_kw)
    return MsgpackControl(Engine(EngineConfig(**cfg)), auth=authenticator() if auth else None,
                          wall_clock=lambda: WALL)


def request(ctl: MsgpackControl, message: Dict[str, Any], key: Optional[Key] = TEST_KEY,
            sender: Any = A, now: float = 10.0) -> Optional[Dict[str, Any]]:
    """One request (signed with `key`, unsigned with None); the decoded reply or None."""
    message = dict(message)
    message.setdefault("v", 1)
    message.setdefault("cookie", os.urandom(6).hex())
    data = pack(message)
    out = ctl.handle(signed(data, key) if key is not None else data, sender, now)
    return None if out.reply is None else msgpack.unpackb(out.reply, raw=False)


def offer(ctl: MsgpackControl, call_id: str, key: Key = TEST_KEY, **kw: Any) -> Dict[str, Any]:
    reply = request(ctl, {"cmd": "offer", "call_id": call_id, "from_tag": "ft",
                          "media": CALLER, **kw}, key)
    assert reply is not None
    return reply


def dropped(ctl: MsgpackControl) -> Dict[str, int]:
    return {k: v for k, v in ctl.counters.items() if k.startswith("control.dropped.") and v}


# -- key files and where they live -----------------------------------------------------------
def test_default_key_dir_one_resolution_for_both_sides():
    assert default_key_dir({"LRK_KEYS": "/x/keys"}, euid=0) == "/x/keys"
    assert default_key_dir({}, euid=0) == "/etc/lrk/keys"
    assert default_key_dir({"XDG_CONFIG_HOME": "/cfg", "HOME": "/h"}, euid=1000) == \
        "/cfg/lrk/keys"
    assert default_key_dir({"HOME": "/home/u"}, euid=1000) == "/home/u/.config/lrk/keys"


def test_ensure_keys_creates_admin_and_client_once_mode_0600(tmp_path):
    directory = str(tmp_path / "keys")
    created = ensure_keys(directory)
    assert [os.path.basename(p) for p in created] == ["admin.key", "client.key"]
    assert ensure_keys(directory) == []  # never twice, never overwritten
    for path in created:
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(directory).st_mode) == 0o700
    keys = {k.id: k for k in load_keys([directory])}
    assert keys["admin"].admin and not keys["client"].admin
    assert keys["admin"].secret != keys["client"].secret and len(keys["client"].secret) == 32
    assert not [n for n in os.listdir(directory) if n.endswith(".tmp")]


def test_create_key_keeps_an_existing_file(tmp_path):
    first = create_key(str(tmp_path), "k1")
    before = load_key(first).secret
    assert create_key(str(tmp_path), "k1") == first
    assert load_key(first).secret == before


def test_find_key_picks_the_role_s_key(tmp_path):
    ensure_keys(str(tmp_path))
    assert find_key(str(tmp_path)).id == "client"
    assert find_key(str(tmp_path), admin=True).id == "admin"
    assert find_key(str(tmp_path / "client.key")).id == "client"
    with pytest.raises(KeyFileError, match="no key file"):
        find_key(str(tmp_path / "empty"))  # given explicitly: must exist


def test_find_key_with_default_dir_and_no_key_is_none(monkeypatch, tmp_path):
    monkeypatch.setenv("LRK_KEYS", str(tmp_path / "none-yet"))
    assert find_key() is None
    monkeypatch.setenv("LRK_KEYS", str(tmp_path / "one"))
    create_key(str(tmp_path / "one"), "kamailio", owner="proxy-1")
    assert find_key().owner == "proxy-1"  # the only key, whatever its name


@pytest.mark.parametrize("text, fragment", [
    ('secret = "00"', "id"),
    ('id = "a"', "secret"),
    ('id = "a"\nsecret = "zz"', "hexadecimal"),
    ('id = "a"\nsecret = "0011"', "16-64 bytes"),
    ('id = "a b"\nsecret = "' + "00" * 16 + '"', "1-16 characters"),
    ('id = "' + "x" * 17 + '"\nsecret = "' + "00" * 16 + '"', "1-16 characters"),
    ('id = "a"\nsecret = "' + "00" * 16 + '"\nadmin = "yes"', "admin"),
    ('id = "a"\nsecret = "' + "00" * 16 + '"\ntoken = "x"', "unknown field"),
    ('id = "a"\nsecret = "' + "00" * 16 + '"\nowner = "a b"', "owner"),
    ("id = ", "not valid TOML"),
])
def test_bad_key_files_are_refused_with_the_reason(text, fragment):
    with pytest.raises(KeyFileError, match=fragment):
        parse_key(text, "/k.key")


def test_a_key_file_others_can_read_is_refused(tmp_path):
    path = create_key(str(tmp_path), "k")
    os.chmod(path, 0o604)
    with pytest.raises(KeyFileError, match="chmod 600"):
        load_key(path)
    os.chmod(path, 0o640)  # the group may read it (shared with Kamailio's group)
    assert load_key(path).id == "k"


def test_duplicate_key_ids_are_refused(tmp_path):
    create_key(str(tmp_path / "a"), "same")
    create_key(str(tmp_path / "b"), "same")
    with pytest.raises(KeyFileError, match="used by both"):
        load_keys([str(tmp_path / "a"), str(tmp_path / "b")])


def test_key_repr_never_shows_the_secret():
    assert TEST_KEY.secret.hex() not in repr(TEST_KEY)
    assert "client" in repr(TEST_KEY)


# -- the relay's keys from its configuration -------------------------------------------------
def test_relay_creates_keys_on_first_start(tmp_path, caplog):
    directory = str(tmp_path / "keys")
    with caplog.at_level(logging.WARNING, "lrk.control"):
        auth = relay_authenticator("hmac", [directory])
    assert auth is not None and sorted(k.id for k in auth.keys.values()) == ["admin", "client"]
    assert "created control keys" in caplog.text
    assert relay_authenticator("hmac", [directory]) is not None  # reuses them


def test_relay_default_keys_come_from_default_key_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("LRK_KEYS", str(tmp_path / "default"))
    relay_authenticator("hmac", [])
    assert sorted(os.listdir(tmp_path / "default")) == ["admin.key", "client.key"]


def test_relay_without_authentication_says_so(caplog):
    with caplog.at_level(logging.WARNING, "lrk.control"):
        assert relay_authenticator("none", []) is None
    assert 'control_auth = "none"' in caplog.text and "NOT authenticated" in caplog.text


def test_a_missing_key_file_stops_the_relay(tmp_path):
    with pytest.raises(KeyFileError, match="does not exist"):
        relay_authenticator("hmac", [str(tmp_path / "kamailio.key")])


def test_config_options_and_the_retired_token(tmp_path):
    assert Config().control_auth == "hmac"
    path = tmp_path / "lrk.toml"
    path.write_text('control_token = "s3cret"\n')
    with pytest.raises(ConfigError, match="control_token.*is gone.*key"):
        load(str(path), {})
    for bad in ('control_auth = "token"', "control_auth_window = 0",
                "control_auth_window = 301", 'control_keys = "/etc/lrk/keys"'):
        path.write_text(bad + "\n")
        with pytest.raises(ConfigError):
            load(str(path), {})


# -- signatures --------------------------------------------------------------------------------
def test_the_trailer_layout():
    data = b"\x81\xa3cmd\xa4ping"
    out = sign(data, TEST_KEY, 1_700_000_000.123)
    assert len(out) == len(data) + TRAILER_BYTES == len(data) + 60
    assert out[:len(data)] == data
    assert out[len(data):len(data) + 4] == MAGIC == b"\xc1LK1"
    assert out[len(data) + 4:len(data) + 20] == b"client".ljust(16, b"\0")
    assert int.from_bytes(out[len(data) + 20:len(data) + 28], "big") == 1_700_000_000_123
    import hashlib
    import hmac

    assert out[-32:] == hmac.new(TEST_KEY.secret, out[:-32], hashlib.sha256).digest()
    assert trailer_of(out) == (data, b"client", 1_700_000_000_123)
    assert trailer_of(data) is None


def test_verify_verdicts():
    auth = authenticator()
    data = pack({"cookie": "c", "cmd": "ping"})
    good = sign(data, TEST_KEY, WALL)
    assert auth.verify(good, WALL)[1] == "fresh"
    assert auth.verify(good, WALL + 1)[1] == "repeat"
    assert auth.verify(data, WALL) == (None, "unauthenticated")
    stranger = Key("stranger", b"s" * 32)
    assert auth.verify(sign(data, stranger, WALL), WALL) == (None, "unauthenticated")
    forged = Key("client", b"f" * 32)  # right id, wrong secret
    assert auth.verify(sign(data, forged, WALL), WALL) == (None, "bad_signature")
    for i in range(len(good)):  # any byte changed: map, magic, id, time or MAC
        bad = bytearray(good)
        bad[i] ^= 0x01
        assert auth.verify(bytes(bad), WALL)[0] is None, i
    assert auth.verify(sign(data, TEST_KEY, WALL - 31), WALL) == (None, "expired")
    assert auth.verify(sign(data, TEST_KEY, WALL + 31), WALL) == (None, "expired")
    assert auth.verify(sign(data, TEST_KEY, WALL - 29.9), WALL)[1] == "fresh"


def test_replay_guard_forgets_only_what_has_expired_and_is_bounded():
    guard = ReplayGuard(window=30.0, max_entries=3)
    now = 1_000_000_000
    assert guard.check(now, b"a" * 32, now) == "fresh"
    assert guard.check(now, b"a" * 32, now + 29_000) == "repeat"
    assert guard.check(now + 1, b"b" * 32, now) == "fresh"
    assert guard.check(now + 2, b"c" * 32, now) == "fresh"
    assert guard.check(now + 3, b"d" * 32, now) == "full"  # fail closed, nothing forgotten
    assert guard.check(now, b"a" * 32, now + 29_000) == "repeat"
    # once every timestamp of a second is outside the window, its bucket goes
    assert guard.check(now + 32_000, b"e" * 32, now + 32_000) == "fresh"
    assert len(guard) == 1


def test_every_fresh_signature_verifies_once_warm():
    """2,000 requests signed a millisecond apart each verify to their key (what they cost
    is a benchmark: bench/bench_auth.py, never a timed assertion here)."""
    auth = authenticator()
    data = pack({"v": 1, "cookie": "x" * 12, "cmd": "offer", "call_id": "c" * 40,
                 "from_tag": "f" * 10, "media": CALLER})
    signed_ = [sign(data, TEST_KEY, WALL + i / 1000) for i in range(3000)]
    for s in signed_[:1000]:  # warm-up (PyPy's JIT)
        auth.verify(s, WALL)
    assert all(auth.verify(s, WALL)[0] is TEST_KEY for s in signed_[1000:])


# -- the protocol: unsigned, forged, replayed, expired: no reply, no effect --------------------
@pytest.mark.parametrize("how, reason", [
    ("unsigned", "unauthenticated"),
    ("unknown key", "unauthenticated"),
    ("wrong secret", "bad_signature"),
    ("expired", "expired"),
])
def test_unverified_requests_get_nothing_and_do_nothing(how, reason):
    ctl = make()
    data = pack({"v": 1, "cookie": "x", "cmd": "offer", "call_id": "c1", "from_tag": "ft",
                 "media": CALLER})
    if how == "unsigned":
        wire = data
    elif how == "unknown key":
        wire = sign(data, Key("nobody", b"n" * 32), WALL)
    elif how == "wrong secret":
        wire = sign(data, Key("client", b"w" * 32), WALL)
    else:
        wire = sign(data, TEST_KEY, WALL - 60)
    out = ctl.handle(wire, A, 10.0)
    assert out.reply is None and out.actions == []
    assert ctl.engine.by_call == {}
    assert dropped(ctl) == {f"control.dropped.{reason}": 1}
    assert sum(v for k, v in ctl.counters.items() if k.startswith("control.requests.")) == 0


def test_a_replay_from_another_socket_is_dropped_a_retransmission_is_answered():
    ctl = make()
    wire = signed(pack({"v": 1, "cookie": "d1", "cmd": "ping"}))
    first = ctl.handle(wire, A, 10.0)
    assert first.reply is not None
    assert ctl.handle(wire, A, 10.5).reply == first.reply  # the client's resend
    assert ctl.counters["control.retransmissions"] == 1
    assert ctl.handle(wire, B, 10.6).reply is None  # captured and replayed elsewhere
    assert ctl.counters["control.dropped.replayed"] == 1
    assert ctl.counters["control.requests.ping"] == 1


def test_a_replayed_delete_does_not_end_the_new_call_of_the_same_id():
    ctl = make()
    offer(ctl, "c1")
    delete = signed(pack({"v": 1, "cookie": "del", "cmd": "delete", "call_id": "c1"}))
    assert ctl.handle(delete, A, 10.0).reply is not None
    offer(ctl, "c1")  # the caller calls again, same Call-ID
    assert ctl.handle(delete, B, 11.0).reply is None  # the captured delete, replayed
    assert "c1" in ctl.engine.by_call


def test_one_captured_request_gets_a_bounded_number_of_resends():
    ctl = make()
    wire = signed(pack({"v": 1, "cookie": "s", "cmd": "stats"}))
    replies = [ctl.handle(wire, A, 10.0 + i / 100).reply for i in range(40)]
    assert sum(r is not None for r in replies) == 1 + ctl.replay.max_resends
    assert ctl.counters["control.dropped.resend_limit"] == 40 - 1 - ctl.replay.max_resends


def test_a_reused_cookie_gets_the_cached_reply_only_for_the_same_bytes_when_unverified():
    """A tiny datagram under a cookie whose reply is large is not a retransmission: an
    unverified sender gets nothing for it (it would be amplification)."""
    ctl = make(auth=False)
    stats = pack({"v": 1, "cookie": "s1", "cmd": "stats"})
    first = ctl.handle(stats, A, 10.0).reply
    assert ctl.handle(stats, A, 10.5).reply == first  # the same bytes: a retransmission
    tiny = pack({"cookie": "s1"})
    assert ctl.handle(tiny, A, 10.6).reply is None
    assert ctl.counters["control.dropped.cookie_reused"] == 1
    signed_ctl = make()  # a verified sender's resend may be signed anew: the cookie decides
    wire = pack({"v": 1, "cookie": "s2", "cmd": "stats"})
    first = signed_ctl.handle(signed(wire), A, 10.0).reply
    assert signed_ctl.handle(signed(wire), A, 10.5).reply == first


def test_legacy_answers_a_reused_cookie_only_for_the_same_bytes():
    engine = Engine(EngineConfig(internal_ip=INTERNAL, external_ip=INTERNAL))
    legacy = LegacyControl(engine)
    s = s_req()
    assert legacy.handle(s, LEGACY, 0.0).reply == s + b"OK"
    assert legacy.handle(s, LEGACY, 0.5).reply == s + b"OK"  # Kamailio's resend
    assert legacy.handle(b"1_1 \x00", LEGACY, 0.6).reply is None  # 5 bytes for 70
    assert legacy.counters["legacy.dropped.cookie_reused"] == 1


def test_a_full_replay_guard_refuses_rather_than_forgets():
    ctl = MsgpackControl(Engine(EngineConfig()), auth=Authenticator([TEST_KEY], 30.0, 2),
                         wall_clock=lambda: WALL)
    assert request(ctl, {"cmd": "ping"}) is not None
    assert request(ctl, {"cmd": "ping"}) is not None
    assert request(ctl, {"cmd": "ping"}) is None
    assert ctl.counters["control.dropped.replay_guard_full"] == 1


def test_unauthenticated_relay_ignores_a_signature():
    ctl = make(auth=False)
    assert request(ctl, {"cmd": "ping"})["pong"] is True  # signed: the trailer is skipped
    assert request(ctl, {"cmd": "ping"}, key=None)["pong"] is True


# -- ownership ---------------------------------------------------------------------------------
def test_another_key_cannot_delete_query_answer_or_reoffer_a_call():
    ctl = make()
    first = offer(ctl, "c1")
    assert first["ok"] is True
    for message in ({"cmd": "delete", "call_id": "c1"},
                    {"cmd": "query", "call_id": "c1"},
                    {"cmd": "answer", "call_id": "c1", "from_tag": "ft", "to_tag": "tt",
                     "media": CALLEE}):
        reply = request(ctl, message, OTHER_KEY)
        assert reply["error"]["code"] == "not_found", reply
        assert reply["error"]["message"] == "no session with Call-ID 'c1'"  # as if absent
    # a re-offer with the caller's from-tag would move its media: refused
    hijack = offer(ctl, "c1", OTHER_KEY, media={"ip": "203.0.113.66", "port": 6666})
    assert hijack["error"]["code"] == "forbidden"
    session = ctl.engine.by_call["c1"]
    assert session.legs["A"].announced == (CALLER["ip"], CALLER["port"])
    assert request(ctl, {"cmd": "query", "call_id": "c1"})["ok"] is True  # the owner may


def test_list_shows_a_key_its_own_calls_and_an_admin_key_every_call():
    ctl = make()
    offer(ctl, "mine-1")
    offer(ctl, "mine-2")
    offer(ctl, "theirs", OTHER_KEY)
    ids = lambda key: sorted(s["call_id"] for s in request(  # noqa: E731
        ctl, {"cmd": "list"}, key)["sessions"])
    assert ids(TEST_KEY) == ["mine-1", "mine-2"]
    assert ids(OTHER_KEY) == ["theirs"]
    assert ids(ADMIN_KEY) == ["mine-1", "mine-2", "theirs"]
    assert request(ctl, {"cmd": "list"}, OTHER_KEY)["total"] == 1


def test_an_admin_key_may_end_any_call():
    ctl = make()
    offer(ctl, "c1")
    assert request(ctl, {"cmd": "delete", "call_id": "c1"}, ADMIN_KEY)["ok"] is True
    assert ctl.engine.by_call == {}


def test_relay_wide_commands_need_an_admin_key():
    ctl = make()
    for cmd in ("drain", "reload"):
        reply = request(ctl, {"cmd": cmd}, TEST_KEY)
        assert reply["error"]["code"] == "forbidden", reply
    assert ctl.engine.draining is False
    assert request(ctl, {"cmd": "drain"}, ADMIN_KEY)["draining"] is True
    assert request(ctl, {"cmd": "stats"}, TEST_KEY)["ok"] is True  # reading is for all


def test_a_rotated_key_with_the_same_owner_keeps_the_calls():
    rotated = Key("client-2026", bytes(range(100, 132)), owner=TEST_KEY.owner)
    ctl = MsgpackControl(Engine(EngineConfig(internal_ip=INTERNAL, external_ip=INTERNAL)),
                         auth=Authenticator([TEST_KEY, rotated]), wall_clock=lambda: WALL)
    offer(ctl, "c1")
    assert request(ctl, {"cmd": "delete", "call_id": "c1"}, rotated)["ok"] is True


def test_legacy_calls_are_admin_only_over_msgpack():
    ctl = make()
    legacy = LegacyControl(ctl.engine)
    s = (b"1_1 S 192.0.2.10 127.0.0.1 127.0.0.1 198.51.100.20 40000 30000 30002 50000 60 "
         b"leg@test ")
    assert legacy.handle(s, ("127.0.0.1", 41000), 1.0).reply == s + b"OK"
    assert request(ctl, {"cmd": "query", "call_id": "leg@test"})["error"]["code"] == \
        "not_found"
    assert request(ctl, {"cmd": "list"})["total"] == 0
    assert offer(ctl, "leg@test")["error"]["code"] == "forbidden"
    assert request(ctl, {"cmd": "query", "call_id": "leg@test"}, ADMIN_KEY)["ok"] is True


def test_without_authentication_everyone_may_do_everything():
    ctl = make(auth=False)
    offer(ctl, "c1", key=None)
    assert request(ctl, {"cmd": "delete", "call_id": "c1"}, key=None)["ok"] is True


def test_the_owner_table_stays_bounded():
    ctl = make()
    for i in range(500):
        offer(ctl, f"c{i}")
        request(ctl, {"cmd": "delete", "call_id": f"c{i}"})
    assert len(ctl.owners) <= 2 * len(ctl.engine.by_sid) + 64


# -- memory and size bounds ------------------------------------------------------------------
def test_a_16kb_version_field_gets_a_small_reply():
    ctl = make()
    reply = request(ctl, {"cmd": "ping", "v": "v" * 16384})
    assert reply["error"]["code"] == "unsupported_version"
    assert len(pack(reply)) < 300
    assert len(reply["error"]["message"].encode()) <= MAX_ERROR_MESSAGE


@pytest.mark.parametrize("field, value", [
    ("timeout", "t" * 16384), ("latch_any", b"\xff" * 16384), ("interface", ["x"] * 60),
    ("media", {"ip": "1" * 16384, "port": 1}), ("call_id", "c" * 16384),
])
def test_error_messages_quote_a_few_dozen_bytes_at_most(field, value):
    ctl = make()
    message = {"cmd": "offer", "call_id": "c1", "from_tag": "ft", "media": CALLER}
    message[field] = value
    reply = request(ctl, message)
    assert reply["ok"] is False
    assert len(reply["error"]["message"].encode()) <= MAX_ERROR_MESSAGE


def test_the_reply_cache_is_bounded_in_bytes_under_the_16kb_attack():
    ctl = make()
    for i in range(3000):  # each would have cached a 64 KB reply before
        request(ctl, {"cmd": "ping", "v": "v" * 16384, "cookie": f"m{i}"})
    assert ctl.replay.bytes <= ctl.replay.max_bytes
    assert len(ctl.replay) == 3000  # small replies: all kept, within the byte budget


def test_unauthenticated_relay_never_answers_more_than_it_got():
    ctl = make(auth=False)
    for data in (b"\xc1\xc1\xc1\xc1", b"\x91\x01\x02\x03", b"\x80\x80\x80\x80",
                 pack({"cookie": "x", "cmd": "nope"}), pack({"cmd": "ping"}),
                 pack({"cookie": "y", "cmd": "ping", "v": 2})):
        out = ctl.handle(data, A, 10.0)
        assert out.reply is None or len(out.reply) <= len(data), data
    assert ctl.counters["control.dropped.amplification"] >= 4


def test_a_reply_too_large_for_a_datagram_becomes_a_small_error():
    ctl = make()
    big = {"v": 1, "cookie": "big", "ok": True, "blob": "x" * (MAX_REPLY_BYTES + 1)}
    out = ctl._final(A, "big", 10.0, big)
    reply = msgpack.unpackb(out.reply, raw=False)
    assert reply["error"]["code"] == "too_large" and "carried out" in reply["error"]["message"]
    assert ctl.replay.lookup(A, "big", 10.0) == out.reply  # the small error is what stays


def test_list_pages_by_encoded_bytes_with_multibyte_call_ids():
    ctl = make(port_end=31999)
    wide = "\U0001F4DE" * (MAX_CALL_ID // 4)  # 64 characters, 256 bytes
    for i in range(200):
        offer(ctl, f"{i:03d}" + wide[3:])
    seen = []
    offset = 0
    while True:
        out = ctl.handle(signed(pack({"v": 1, "cookie": f"l{offset}", "cmd": "list",
                                      "limit": 1000, "offset": offset})), A, 10.0)
        assert out.reply is not None and len(out.reply) <= LIST_REPLY_BUDGET + 200
        page = msgpack.unpackb(out.reply, raw=False)
        seen += [s["call_id"] for s in page["sessions"]]
        if "next_offset" not in page:
            break
        offset = page["next_offset"]
    assert len(seen) == 200 and len(set(seen)) == 200


def test_call_id_limits_agree_between_the_protocols():
    ctl = make()
    legacy = LegacyControl(ctl.engine)
    longest = "x" * MAX_CALL_ID
    s = (f"1_1 S 192.0.2.10 127.0.0.1 127.0.0.1 198.51.100.20 40000 30000 30002 50000 60 "
         f"{longest} ").encode()
    legacy.handle(s, ("127.0.0.1", 41000), 1.0)
    reply = request(ctl, {"cmd": "delete", "call_id": longest}, ADMIN_KEY)
    assert reply["ok"] is True  # every legacy call can be reached over msgpack
    assert offer(ctl, "é" * 129)["error"]["code"] == "bad_request"  # 258 bytes
    assert offer(ctl, "é" * 128)["ok"] is True  # 256 bytes


# -- legacy: unusable peers, timeouts, msgpack calls untouchable -------------------------------
LEGACY = ("127.0.0.1", 41000)


def s_req(src="192.0.2.10", dnat="198.51.100.20", sp=40000, np=50000, timeout="60",
          call_id="leg@test", ports=(30000, 30002), cookie=b"1_1") -> bytes:
    return (cookie + f" S {src} 127.0.0.1 127.0.0.1 {dnat} {sp} {ports[0]} {ports[1]} {np} "
            f"{timeout} {call_id} ".encode())


@pytest.mark.parametrize("kw", [
    {"src": "0.0.0.0"}, {"dnat": "255.255.255.255"}, {"dnat": "224.0.0.1"},
    {"src": "240.0.0.1"}, {"sp": 0}, {"np": 0},
])
def test_legacy_s_refuses_unusable_peers(kw):
    engine = Engine(EngineConfig(internal_ip=INTERNAL, external_ip=INTERNAL))
    legacy = LegacyControl(engine)
    req = s_req(**kw)
    assert legacy.handle(req, LEGACY, 0.0).reply == req + b"OK"  # the module needs its OK
    assert engine.by_call == {}
    assert legacy.counters["legacy.refused.bad_peer_address"] == 1


def test_legacy_s_never_replaces_a_silent_msgpack_call_on_hold():
    ctl = make()
    legacy = LegacyControl(ctl.engine, takeover_idle=30.0)
    offer(ctl, "held", timeout=3600)  # on hold: silent, with a long timeout
    ports = ctl.engine.by_call["held"].ports()
    out = legacy.handle(s_req(ports=(ports[0], ports[0] + 2), call_id="new@test"), LEGACY,
                        1000.0)  # far beyond takeover_idle
    assert out.actions == [] and list(ctl.engine.by_call) == ["held"]
    assert legacy.counters["legacy.refused.msgpack_call"] == 1
    out = legacy.handle(s_req(call_id="held", cookie=b"1_2", ports=(30800, 30802)), LEGACY,
                        1000.0)
    assert out.actions == [] and ctl.engine.by_call["held"].ports() == ports


def test_legacy_d_does_not_end_a_msgpack_call_but_ends_its_own():
    ctl = make()
    legacy = LegacyControl(ctl.engine)
    offer(ctl, "mp")
    d = b"1_9 D 192.0.2.10 127.0.0.1 127.0.0.1 198.51.100.20 40000 30000 30002 50000 60 mp "
    assert legacy.handle(d, LEGACY, 1.0).reply == d + b"OK"
    assert "mp" in ctl.engine.by_call
    assert legacy.counters["legacy.refused.msgpack_call"] == 1
    legacy.handle(s_req(ports=(30800, 30802)), LEGACY, 1.0)
    d2 = b"1_10 D 1 2 3 4 5 6 7 8 9 leg@test "
    assert [type(a) for a in legacy.handle(d2, ("127.0.0.1", 41001), 2.0).actions] == [Remove]


def test_legacy_retransmissions_are_bounded_too():
    engine = Engine(EngineConfig(internal_ip=INTERNAL, external_ip=INTERNAL))
    legacy = LegacyControl(engine)
    replies = [legacy.handle(b"7_7 P", LEGACY, 1.0).reply for _ in range(30)]
    assert sum(r is not None for r in replies) == 1 + legacy.replay.max_resends
    assert legacy.counters["legacy.dropped.resend_limit"] == 30 - 1 - legacy.replay.max_resends


def test_engine_set_fixed_never_replaces_a_msgpack_call():
    engine = Engine(EngineConfig(internal_ip=INTERNAL, external_ip=INTERNAL))
    session, _leg, _ = engine.offer(0.0, "held", "ft", ("198.51.100.10", 4000),
                                    timeout=3600.0)
    port = session.ports()[0]
    _s, actions, outcome = engine.set_fixed(
        1000.0, "new@test", (INTERNAL, port), ("192.0.2.10", 40000), (INTERNAL, port + 2),
        ("198.51.100.20", 50000), 60.0, 30.0)
    assert outcome == "refused" and actions == []
    assert list(engine.by_call) == ["held"]


# -- the client signs ----------------------------------------------------------------------------
def test_client_signs_with_the_key_it_is_given(tmp_path):
    ensure_keys(str(tmp_path))
    with LrkClient(["udp:127.0.0.1:9"], key=str(tmp_path)) as client:
        assert client.key_id == "client"
    with LrkClient(["udp:127.0.0.1:9"], key=str(tmp_path / "admin.key")) as client:
        assert client.key_id == "admin"
    with LrkClient(["udp:127.0.0.1:9"], key="none") as client:
        assert client.key_id is None
    with pytest.raises(InvalidArgument, match="key="):
        LrkClient(["udp:127.0.0.1:9"], token="s3cret")
    with pytest.raises(InvalidArgument, match="does not exist|no key file"):
        LrkClient(["udp:127.0.0.1:9"], key=str(tmp_path / "missing.key"))


def test_client_default_key_and_the_warning_without_one(monkeypatch, tmp_path, caplog):
    monkeypatch.setenv("LRK_KEYS", str(tmp_path / "empty"))
    with caplog.at_level(logging.WARNING, "lrk.client"):
        assert resolve_key() is None
    assert "unsigned" in caplog.text
    ensure_keys(str(tmp_path / "empty"))
    assert resolve_key().id == "client" and resolve_key(admin=True).id == "admin"


def test_a_signed_client_request_is_verified_by_the_relay():
    data = encode_request({"cmd": "ping"}, "ck", key=TEST_KEY, wall=WALL)
    ctl = make()
    out = ctl.handle(data, A, 10.0)
    assert isinstance(out, Outcome) and msgpack.unpackb(out.reply, raw=False)["pong"] is True
