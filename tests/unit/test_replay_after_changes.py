"""What the control plane remembers of a request survives the changes made to it after it
ran: a reload that widens control_auth_window keeps replays refused, and a reply replaced
by a data-plane failure still answers only the request's own bytes."""

from __future__ import annotations

import msgpack

from lrk.control.auth import Authenticator, Key, sign
from lrk.control.msgpack_proto import MsgpackControl, Outcome, Request
from lrk.core.engine import Engine, EngineConfig

KEY = Key("client", bytes(range(32)), owner="p")
WALL = 1_800_000_000.0


def _engine() -> Engine:
    return Engine(EngineConfig(internal_ip="10.0.0.1", external_ip="10.0.0.2",
                               port_start=30000, port_end=30099))


def test_a_wider_window_after_a_reload_keeps_refusing_replays():
    """The reload's new authenticator takes the old guard (keep_guard): a request seen
    under the 30 s window and replayed 60 s later, inside the new 300 s window, from
    another address, is a replay; one the old guard had already forgotten (older than
    the old window at the reload) is expired, not fresh."""
    control = MsgpackControl(_engine(), auth=Authenticator([KEY], 30.0),
                             wall_clock=lambda: WALL)
    early = sign(msgpack.packb({"cookie": "k0", "cmd": "ping"}), KEY, WALL - 40)  # unseen
    request = sign(msgpack.packb({"cookie": "k1", "cmd": "ping"}), KEY, WALL)
    assert isinstance(control.receive(request, ("127.0.0.1", 5000), 100.0, wall=WALL),
                      Request)
    reloaded = Authenticator([KEY], 300.0)
    reloaded.keep_guard(control.auth, WALL)  # what Relay.reload does
    control.auth = reloaded
    again = control.receive(request, ("127.0.0.1", 6000), 160.0, wall=WALL + 60)
    assert isinstance(again, Outcome) and again.reply is None
    assert control.counters["control.dropped.replayed"] == 1
    old = control.receive(early, ("127.0.0.1", 6000), 161.0, wall=WALL + 60)
    assert isinstance(old, Outcome) and control.counters["control.dropped.expired"] == 1
    # fresh requests under the new window pass
    fresh = sign(msgpack.packb({"cookie": "k2", "cmd": "ping"}), KEY, WALL + 200)
    assert isinstance(control.receive(fresh, ("127.0.0.1", 6000), 170.0, wall=WALL + 60),
                      Request)


def test_a_narrower_window_after_a_reload_lets_the_guard_forget_sooner():
    """Reloading back to a narrow window: the guard keeps what it saw for that window only
    (a guard stuck at the widest window would fill ten times sooner under load)."""
    wide = Authenticator([KEY], 300.0)
    narrow = Authenticator([KEY], 30.0)
    narrow.keep_guard(wide, WALL)
    assert narrow.guard is wide.guard and narrow.guard.window_ms == 30_000
    assert narrow.floor_ms == 0


def test_a_reply_replaced_by_a_data_plane_failure_answers_only_identical_bytes():
    control = MsgpackControl(_engine(), auth=None)
    sender = ("127.0.0.1", 5000)
    request = msgpack.packb({"cookie": "k1", "cmd": "offer", "call_id": "c1",
                             "from_tag": "f", "media": {"ip": "192.0.2.1", "port": 4000}})
    received = control.receive(request, sender, 1.0)
    assert isinstance(received, Request)
    control.execute(received, 1.0)
    failed = control.plane_failed(received, "x" * 200, 1.0)  # as Relay does on a failure
    assert msgpack.unpackb(failed.reply, raw=False)["error"]["code"] == "data_plane"
    other = control.receive(msgpack.packb({"cookie": "k1"}), sender, 2.0)
    assert isinstance(other, Outcome) and other.reply is None  # not the cached reply
    resend = control.receive(request, sender, 2.0)
    assert isinstance(resend, Outcome) and resend.reply == failed.reply
