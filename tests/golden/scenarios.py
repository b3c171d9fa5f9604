"""The golden scripts: requests in, exact replies out; packets in, exact bytes and sources out.

Each function runs one script against a freshly started `GoldenRelay` (relay ports are then
deterministic: leg A of the first call gets the range's first even port, leg B the next) and
is shared by every data-plane mode: `tests/golden/test_golden_socket.py` (socket mode on
loopback) and `tests/netns/test_golden_modes.py` (packet, kernel, nfqueue, xdp in namespaces).
Nothing may differ between modes: the same requests get the same replies, byte for byte,
and the same packets the same counters (the only layout differences are the addresses).

Expected values come from docs/protocol.md and docs/kamailio.md, and where those lag
behind an intended change (a commit that says so), from that commit; each such place
names it. Only genuinely variable values are loosened: `age`, `idle` and `uptime` (a float
within bounds).
"""

from __future__ import annotations

import select
import struct
from typing import Any, Dict, List, Tuple

import msgpack

from tests.golden.harness import (
    POLL_TIMEOUT,
    Between,
    GoldenRelay,
    Layout,
    assert_all_golden,
    assert_bytes,
    assert_golden,
    pending,
    poll,
    receive,
    udp_socket,
    unpack,
)

V = 1
SECONDS = Between(float, 0.0, 60.0)  # age / idle of a session this script just made
COMMANDS = ["ping", "capabilities", "offer", "answer", "delete", "query", "list", "stats",
            "drain", "reload", "shutdown", "takeover"]  # drain, reload: e2f0e0d; shutdown:
# the store; takeover: the Redis store (issue 13)
ERROR_CODES = ["malformed", "too_large", "bad_request", "unknown_command", "unsupported_version",
               "unauthorized", "not_found", "ports_exhausted", "data_plane", "draining",
               "capacity", "internal"]

#: requests rejected before they run carry this (an unknown key, ignored): a relay may send
#: an unverified sender no reply larger than its request (amplification), and these
#: scripts pin the error replies themselves
PAD = "p" * 300

# media ports on the test hosts
A_SDP, A_NAT, A_NAT_RTCP = 4000, 4444, 4447  # the caller announces 4000; its NAT uses others
B_SDP = 5000  # the callee sends from what it announces (RTCP from 5001)
STRANGER = 5999  # on the callee's host, sending to leg A: not leg A's peer


# -- fixed media ------------------------------------------------------------------------------
def _rtp(seq: int, ssrc: int, payload: bytes) -> bytes:
    return struct.pack("!BBHII", 0x80, 0, seq, 160 * seq, ssrc) + payload


PAYLOAD_A = bytes(range(160))  # 20 ms of G.711: 172-byte packets
PAYLOAD_B = bytes(range(255, 175, -1))  # 10 ms: 92-byte packets (the directions differ)
RTP_A = [_rtp(seq, 0xA1A1A1A1, PAYLOAD_A) for seq in (1, 2, 3)]
RTP_B = [_rtp(seq, 0xB2B2B2B2, PAYLOAD_B) for seq in (1, 2, 3)]
RTP_X = _rtp(1, 0xBADBAD00, b"\x00" * 160)  # the stranger's
# RTCP: a sender report (28 bytes) from A, a receiver report without blocks (8 bytes) from B
RTCP_A = bytes.fromhex("80c80006a1a1a1a1" "00000000000000000000000000000003000001e0")
RTCP_B = bytes.fromhex("81c90001b2b2b2b2")


def _body(*lines: str) -> str:
    return "".join(line + "\r\n" for line in lines)


def g711(origin: str, connection: str, port: int) -> str:
    """A plain G.711 body (PCMU, PCMA, 20 ms) as a phone sends it."""
    return _body("v=0", f"o=- 1 1 IN IP4 {origin}", "s=-", f"c=IN IP4 {connection}", "t=0 0",
                 f"m=audio {port} RTP/AVP 0 8", "a=rtpmap:0 PCMU/8000", "a=rtpmap:8 PCMA/8000",
                 "a=ptime:20", "a=sendrecv")


def _ok(cookie: str, **body: Any) -> Dict[str, Any]:
    reply: Dict[str, Any] = {"v": V, "cookie": cookie, "ok": True}
    reply.update(body)
    return reply


def _error(cookie: Any, code: str, message: str) -> Dict[str, Any]:
    return {"v": V, "cookie": cookie, "ok": False, "error": {"code": code, "message": message}}


def _relay(ip: str, port: int) -> Dict[str, Any]:
    return {"ip": ip, "port": port, "rtcp_port": port + 1}


def _addr(ip: str, port: int) -> Dict[str, Any]:
    return {"ip": ip, "port": port}


def _counters(in_packets: int = 0, in_bytes: int = 0, out_packets: int = 0,
              out_bytes: int = 0, **drops: int) -> Dict[str, Any]:
    return {"in_packets": in_packets, "in_bytes": in_bytes, "out_packets": out_packets,
            "out_bytes": out_bytes, "drops": dict(drops)}


def _announce(relay: Dict[str, Any]) -> Dict[str, Any]:
    """An offer/answer reply: `relay` for the first stream (one-stream clients) and
    `streams`, one entry per m= line (since e14037f, "replies list every stream")."""
    return {"relay": relay, "streams": [dict(relay, rtcp_mux=False)]}


def _leg(tag: Any, relay: Dict[str, Any], announced: Any, latched: Any = None,
         rtcp_latched: Any = None, counters: Any = None) -> Dict[str, Any]:
    """A leg of `query`: its first stream's view (one-stream clients) and `streams`, every
    m= line's (one audio stream here, so the same values)."""
    counters = counters if counters is not None else _counters()
    stream = {"kind": "audio", "relay": relay, "rtcp_mux": False, "announced": announced,
              "latched": latched, "rtcp_latched": rtcp_latched, "counters": counters}
    # latch_any: NAT learning is the default since 7e93b9d (strict_source = false), and
    # query shows it as latch_any on every leg, legacy sessions included
    return {"tag": tag, "relay": relay, "announced": announced, "latched": latched,
            "rtcp_latched": rtcp_latched, "latch_any": True, "counters": counters,
            "streams": [stream]}


def _session(call_id: str, a: Dict[str, Any], b: Dict[str, Any], media_seen: bool,
             state: str = "answered") -> Dict[str, Any]:
    return {"call_id": call_id, "state": state, "age": SECONDS, "idle": SECONDS,
            "timeout": 60.0, "media_seen": media_seen, "legs": {"A": a, "B": b}}


def _offer(cookie: str, call_id: str, ip: str, port: int, **extra: Any) -> Dict[str, Any]:
    request = {"v": V, "cookie": cookie, "cmd": "offer", "call_id": call_id,
               "from_tag": "tag-a", "media": {"ip": ip, "port": port},
               "interface": "external"}
    request.update(extra)
    return request


def _answer(cookie: str, call_id: str, ip: str, port: int) -> Dict[str, Any]:
    return {"v": V, "cookie": cookie, "cmd": "answer", "call_id": call_id,
            "from_tag": "tag-a", "to_tag": "tag-b", "media": {"ip": ip, "port": port},
            "interface": "internal"}


def _picked(counters: Dict[str, int], want: Dict[str, int]) -> Dict[str, Any]:
    """The counters `want` names (None where one is missing). `stats` lists every counter
    of the relay, and a new one is no change of anything these scripts pin."""
    return {name: counters.get(name) for name in want}


# -- 1. the control protocol --------------------------------------------------------------------
def control(relay: GoldenRelay) -> None:
    """ping, capabilities, offer, answer (twice), query, list, a retransmission, every error
    code a client can provoke, delete, stats: each reply exactly."""
    L: Layout = relay.layout
    P, E = L.port_start, L.port_end
    call = "golden-ctl@198.51.100.10"
    a_relay, b_relay = _relay(L.internal, P), _relay(L.external, P + 2)

    assert_golden(relay.request({"v": V, "cookie": "g-ping", "cmd": "ping"}),
                  _ok("g-ping", pong=True))
    assert_golden(relay.request({"v": V, "cookie": "g-caps", "cmd": "capabilities"}),
                  _ok("g-caps", version=1, commands=COMMANDS, port_range=[P, E],
                      internal_ip=L.internal, external_ip=L.external,
                      internal_ips=[L.internal], external_ips=[L.external], silence_timeout=60.0,
                      max_lifetime=10800.0, max_request_bytes=65000, mode=relay.mode,
                      relay_version="0.1.0", workers=1))

    offer = relay.signed(msgpack.packb(_offer("g-offer", call, L.caller, A_SDP),
                                       use_bin_type=True))
    first = relay.request_raw(offer, sign=False)
    assert_golden(unpack(first), _ok("g-offer", call_id=call, leg="B", **_announce(b_relay)))
    # a retransmission (same bytes, same sender) gets the byte-identical reply, no new session
    assert_bytes(relay.request_raw(offer, sign=False), first, "reply to a retransmitted offer")

    for cookie in ("g-answer-183", "g-answer-200"):  # idempotent: 183 then 200, same SDP
        assert_golden(relay.request(_answer(cookie, call, L.callee, B_SDP)),
                      _ok(cookie, call_id=call, leg="A", **_announce(a_relay)))

    quiet = _session(call, _leg("tag-a", a_relay, _addr(L.caller, A_SDP)),
                     _leg("tag-b", b_relay, _addr(L.callee, B_SDP)), media_seen=False)
    assert_golden(relay.request({"v": V, "cookie": "g-query", "cmd": "query", "call_id": call}),
                  _ok("g-query", session=quiet))
    assert_golden(relay.request({"v": V, "cookie": "g-list", "cmd": "list"}),
                  _ok("g-list", total=1, sessions=[{
                      "call_id": call, "state": "answered", "age": SECONDS, "idle": SECONDS,
                      "ports": [P, P + 2], "packets": 0}]))

    # errors: (request, code, message); replies carry the request's cookie when it had one
    nope = "golden-nope"
    good_media = {"ip": L.caller, "port": A_SDP}
    errors: List[Tuple[Dict[str, Any], str, str]] = [
        ({"cmd": "query", "call_id": nope}, "not_found", f"no session with Call-ID {nope!r}"),
        ({"cmd": "delete", "call_id": nope}, "not_found", f"no session with Call-ID {nope!r}"),
        ({"cmd": "answer", "call_id": nope, "from_tag": "x", "to_tag": "y",
          "media": good_media}, "not_found", f"no session with Call-ID {nope!r}"),
        ({"cmd": "delete", "call_id": call, "from_tag": "tag-x"}, "not_found",
         f"session {call!r} has no leg with tag 'tag-x'"),
        ({"cmd": "offer", "call_id": nope, "from_tag": "f",
          "media": {"ip": L.caller, "port": 70000}}, "bad_request",
         "media.port must be an integer in 0..65535, not 70000"),
        ({"cmd": "offer", "call_id": nope, "from_tag": "f",
          "media": {"ip": "not-an-ip", "port": 4000}}, "bad_request",
         "media.ip 'not-an-ip' is not an IP address"),
        ({"cmd": "offer", "call_id": nope, "from_tag": "f"}, "bad_request",
         "media {ip, port} (or a list of them) or sdp is required"),
        ({"cmd": "offer", "call_id": nope, "media": good_media}, "bad_request",
         "from_tag is required and must be a non-empty string"),
        ({"cmd": "offer", "call_id": "", "from_tag": "f", "media": good_media}, "bad_request",
         "call_id is required and must be a non-empty string"),
        ({"cmd": "offer", "call_id": nope, "from_tag": "f", "media": good_media,
          "interface": "dmz"}, "bad_request",
         "interface must be 'internal' or 'external', not 'dmz'"),
        ({"cmd": "offer", "call_id": nope, "from_tag": "f", "media": good_media,
          "timeout": 0}, "bad_request", "timeout must be an integer in 1..86400, not 0"),
        ({"cmd": "offer", "call_id": nope, "from_tag": "f", "media": good_media,
          "latch_any": "yes"}, "bad_request", "latch_any must be true or false, not 'yes'"),
        ({"cmd": "answer", "call_id": call, "from_tag": "tag-a", "media": good_media},
         "bad_request", "to_tag is required and must be a non-empty string"),
        ({"cmd": "list", "limit": 0}, "bad_request", "limit must be an integer in 1..1000, not 0"),
        ({"cmd": "frobnicate", "pad": PAD}, "unknown_command",
         "unknown command 'frobnicate'; known: " + ", ".join(COMMANDS)),
        ({"v": 2, "cmd": "ping", "pad": PAD}, "unsupported_version",
         "protocol version 2 is not supported; this relay speaks 1"),
    ]
    for i, (args, code, message) in enumerate(errors):
        cookie = f"g-err-{i}"
        request = {"v": V, "cookie": cookie}
        request.update(args)
        assert_golden(relay.request(request), _error(cookie, code, message), f"error reply {i}")
    # requests without a readable cookie: the reply's cookie is nil
    assert_golden(unpack(relay.request_raw(msgpack.packb([1, 2, 3, 4, PAD]))),
                  _error(None, "malformed", "request must be a msgpack map"))
    assert_golden(relay.request({"v": V, "cmd": "ping", "pad": PAD}),
                  _error(None, "bad_request", "cookie must be a string of 1-64 bytes"))

    assert_golden(relay.request({"v": V, "cookie": "g-delete", "cmd": "delete", "call_id": call}),
                  _ok("g-delete", call_id=call, session=quiet))
    assert_golden(relay.request({"v": V, "cookie": "g-gone", "cmd": "query", "call_id": call}),
                  _error("g-gone", "not_found", f"no session with Call-ID {call!r}"))

    stats = relay.request({"v": V, "cookie": "g-stats", "cmd": "stats"})
    assert_golden({k: v for k, v in stats.items() if k != "counters"},
                  _ok("g-stats", uptime=Between(float, 0.0, 120.0), draining=False, sessions=0,
                      ports={"total": (E - P + 1) // 2, "in_use": 0, "quarantined": 2,
                             "free": (E - P + 1) // 2 - 2},
                      ports_by_address={ip: {"total": (E - P + 1) // 2, "in_use": 0,
                                             "quarantined": 2, "free": (E - P + 1) // 2 - 2}
                                        for ip in (L.internal, L.external)}), "stats")
    requests = {cmd: 0 for cmd in COMMANDS}
    requests.update(ping=1, capabilities=1, offer=9, answer=4, delete=3, query=3, list=2,
                    stats=1)
    errors_by_code = {code: 0 for code in ERROR_CODES}
    errors_by_code.update(malformed=1, bad_request=11, unknown_command=1,
                          unsupported_version=1, not_found=5)
    want = {f"control.requests.{cmd}": n for cmd, n in requests.items()}
    want.update({f"control.errors.{code}": n for code, n in errors_by_code.items()})
    want.update({"control.dropped.too_short": 0, "control.dropped.not_allowed": 0,
                 "control.dropped.rate_limited": 0,
                 "control.retransmissions": 1, "control.retransmissions.in_flight": 0,
                 "sessions.created": 1, "sessions.offers": 1, "sessions.answers": 2,
                 "sessions.deleted": 1, "sessions.expired.silence": 0,
                 "sessions.expired.lifetime": 0, "sessions.expired.replaced": 0,
                 "sessions.rebound": 0, "sessions.refused.max_sessions": 0,
                 "sessions.refused.draining": 0,
                 "sessions.failed": 0})
    assert_golden(_picked(stats["counters"], want), want, "stats counters")

    # shorter than 4 bytes: no reply at all, a counted drop
    relay.no_reply(b"\x81\xa1", "control.dropped.too_short", 0)


# -- 2. media ----------------------------------------------------------------------------------
class _Hosts:
    """The caller's and the callee's sockets for one call (closed by `close`)."""

    def __init__(self, layout: Layout) -> None:
        self.sockets: List[Any] = []
        L = layout
        self.a_sdp = self._open(L.caller_ns, L.caller, A_SDP)
        self.a_nat = self._open(L.caller_ns, L.caller, A_NAT)
        self.a_nat_rtcp = self._open(L.caller_ns, L.caller, A_NAT_RTCP)
        self.b = self._open(L.callee_ns, L.callee, B_SDP)
        self.b_rtcp = self._open(L.callee_ns, L.callee, B_SDP + 1)
        self.stranger = self._open(L.callee_ns, L.callee, STRANGER)

    def _open(self, ns: Any, ip: str, port: int) -> Any:
        s = udp_socket(ns, ip, port)
        self.sockets.append(s)
        return s

    def close(self) -> None:
        for s in self.sockets:
            s.close()


def _relayed(sender: Any, packets: List[bytes], to: Tuple[str, int], receiver: Any,
             source: Tuple[str, int], what: str) -> None:
    """Each packet sent to the relay arrives intact, in order, from `source`, once."""
    for i, data in enumerate(packets):
        sender.sendto(data, to)
        got, src = receive(receiver, f"{what} #{i}")
        assert_bytes(got, data, f"{what} #{i}")
        assert src == source, f"{what} #{i} came from {src}, expected {source}"


def media(relay: GoldenRelay) -> None:
    """A call whose caller sits behind a NAT (announces 4000, sends RTP from 4444 and RTCP
    from 4447): RTP and RTCP both ways, byte for byte from the other leg's relay address;
    replies go to the latched ports; a stranger is dropped and counted once; query and
    delete show exact counters.

    The same counters in every mode: docs/protocol.md counts what the relay received from
    and sent to a leg's peer (its example: 172-byte RTP packets, 103,200 bytes for 600, so
    UDP payload bytes) and docs/operations.md shows per-leg drops by reason in `query`."""
    L = relay.layout
    P = L.port_start
    call = "golden-media@198.51.100.10"
    a_relay, b_relay = _relay(L.internal, P), _relay(L.external, P + 2)
    to_a, to_b = (L.internal, P), (L.external, P + 2)
    to_a_rtcp, to_b_rtcp = (L.internal, P + 1), (L.external, P + 3)
    hosts = _Hosts(L)
    try:
        assert_golden(relay.request(_offer("g-offer", call, L.caller, A_SDP)),
                      _ok("g-offer", call_id=call, leg="B", **_announce(b_relay)))
        assert_golden(relay.request(_answer("g-answer", call, L.callee, B_SDP)),
                      _ok("g-answer", call_id=call, leg="A", **_announce(a_relay)))

        # caller (from its NAT port) -> leg A -> callee, from leg B's relay address
        _relayed(hosts.a_nat, RTP_A, to_a, hosts.b, to_b, "RTP caller->callee")
        # and back: to the port the caller latched on, from leg A's relay address
        _relayed(hosts.b, RTP_B, to_b, hosts.a_nat, to_a, "RTP callee->caller")
        _relayed(hosts.a_nat_rtcp, [RTCP_A], to_a_rtcp, hosts.b_rtcp, to_b_rtcp,
                 "RTCP caller->callee")
        _relayed(hosts.b_rtcp, [RTCP_B], to_b_rtcp, hosts.a_nat_rtcp, to_a_rtcp,
                 "RTCP callee->caller")

        # a stranger on leg A (the callee's host, another port) while the caller talks:
        # dropped and counted exactly once, relayed nowhere
        names = ("a_sdp", "a_nat", "a_nat_rtcp", "b", "b_rtcp", "stranger")
        socks = [getattr(hosts, name) for name in names]
        before = relay.counter("media.dropped.unexpected_source")
        assert before == 0, f"media.dropped.unexpected_source was {before} before the stranger"
        hosts.stranger.sendto(RTP_X, to_a)
        # until the relay counted the drop, or something arrived somewhere (a relayed
        # stranger: then the comparison below says what happened instead)
        drops: List[int] = []

        def handled() -> bool:
            drops.append(relay.counter("media.dropped.unexpected_source"))
            return drops[-1] >= 1 or bool(select.select(socks, [], [], 0)[0])

        poll(handled, POLL_TIMEOUT, lambda: f"the stranger's packet handled (drops {drops})")
        # nothing arrived anywhere: no copy of the stranger's packet, no duplicate, nothing
        # at the caller's announced (not latched) port
        stranger = {"media.dropped.unexpected_source": relay.counter(
                        "media.dropped.unexpected_source"),
                    "arrived": {name: pending(s) for name, s in zip(names, socks)}}
        want_stranger = {"media.dropped.unexpected_source": 1,
                         "arrived": {name: [] for name in names}}

        a_bytes = sum(map(len, RTP_A)) + len(RTCP_A)  # 3 * 172 + 28 = 544
        b_bytes = sum(map(len, RTP_B)) + len(RTCP_B)  # 3 * 92 + 8 = 284
        # per-leg drops: kernel mode's admission drops happen in one table-wide nft rule
        # (xdp mode's in the XDP program's relay-wide counters), so they show relay-wide
        # only (docs/operations.md); every other mode, per leg too
        per_leg = {} if relay.mode in ("kernel", "xdp") else {"unexpected_source": 1}
        a_in = _counters(4, a_bytes, 4, b_bytes, **per_leg)
        b_in = _counters(4, b_bytes, 4, a_bytes)
        talked = _session(
            call,
            _leg("tag-a", a_relay, _addr(L.caller, A_SDP), _addr(L.caller, A_NAT),
                 _addr(L.caller, A_NAT_RTCP), a_in),
            _leg("tag-b", b_relay, _addr(L.callee, B_SDP), _addr(L.callee, B_SDP),
                 _addr(L.callee, B_SDP + 1), b_in),
            media_seen=True)
        # kernel modes read counters and latches from the kernel every kernel_poll: wait
        # until the packet counts are in, then compare the whole reply
        relay.wait_query(call, lambda s: s["legs"]["A"]["counters"]["in_packets"] >= 4
                         and s["legs"]["B"]["counters"]["in_packets"] >= 4)
        query = relay.request({"v": V, "cookie": "g-query", "cmd": "query", "call_id": call})
        delete = relay.request({"v": V, "cookie": "g-delete", "cmd": "delete", "call_id": call})
        assert_all_golden([(stranger, want_stranger, "stranger on leg A"),
                           (query, _ok("g-query", session=talked), "query after media"),
                           (delete, _ok("g-delete", call_id=call, session=talked),
                            "delete (final counters)")])
    finally:
        hosts.close()


# -- 3. the legacy protocol (Kamailio's lrkproxy module) -----------------------------------------
def legacy(relay: GoldenRelay) -> None:
    """P, G (exact 52 bytes for the range), S echoed with OK (and its retransmission), the
    session it made as `query` shows it, one RTP packet each way through it, G again (the
    advertised current port moves past the live call), D, and an unknown command."""
    L = relay.layout
    P, E = L.port_start, L.port_end
    end_port = P + ((E - 3 - P) // 4) * 4  # the last 4-port block that fits
    call = "golden-legacy@198.51.100.10"

    def config(current: int) -> bytes:
        return struct.pack("<iii20s20s", P, end_port, current, L.internal.encode(),
                           L.external.encode())

    assert_bytes(relay.legacy(b"1_1 P"), b"1_1 P PONG", "P")
    reply = relay.legacy(b"1_2 G")
    assert_bytes(reply, b"1_2 G " + config(P), "G")
    assert len(reply) - len(b"1_2 G ") == 52

    # the module's S: src dst snat dnat src_port dst_port snat_port dnat_port timeout callid;
    # dst = leg B's relay address (the offer told the callee), snat = leg A's (the answer)
    fields = (f"{L.caller} {L.external} {L.internal} {L.callee} {A_SDP} {P} {P + 2} {B_SDP} "
              f"60 {call} ").encode()
    s = b"1_3 S " + fields
    assert_bytes(relay.legacy(s), s + b"OK", "S")
    assert_bytes(relay.legacy(s), s + b"OK", "S retransmitted")  # from the replay cache

    a_relay, b_relay = _relay(L.internal, P + 2), _relay(L.external, P)
    assert_golden(relay.request({"v": V, "cookie": "g-query", "cmd": "query", "call_id": call}),
                  _ok("g-query", session=_session(
                      call, _leg(None, a_relay, _addr(L.caller, A_SDP)),
                      _leg(None, b_relay, _addr(L.callee, B_SDP)), media_seen=False)),
                  "legacy session")

    a = udp_socket(L.caller_ns, L.caller, A_SDP)
    b = udp_socket(L.callee_ns, L.callee, B_SDP)
    try:
        _relayed(a, RTP_A[:1], (L.internal, P + 2), b, (L.external, P), "legacy RTP A->B")
        _relayed(b, RTP_B[:1], (L.external, P), a, (L.internal, P + 2), "legacy RTP B->A")
    finally:
        a.close()
        b.close()

    assert_bytes(relay.legacy(b"1_4 G"), b"1_4 G " + config(P + 4), "G with a live call")
    d = b"1_5 D " + fields
    assert_bytes(relay.legacy(d), d + b"OK", "D")
    assert_golden(relay.request({"v": V, "cookie": "g-gone", "cmd": "query", "call_id": call}),
                  _error("g-gone", "not_found", f"no session with Call-ID {call!r}"))

    want = {"legacy.requests.P": 1, "legacy.requests.G": 2, "legacy.requests.S": 1,
            "legacy.requests.D": 1, "legacy.retransmissions": 1,
            "legacy.sessions.created": 1, "legacy.sessions.unchanged": 0,
            "legacy.sessions.updated": 0, "legacy.sessions.refused": 0,
            "legacy.dropped.malformed": 0, "legacy.dropped.not_allowed": 0,
            "legacy.dropped.unknown_command": 0, "legacy.dropped.too_large": 0,
            "legacy.dropped.stream_timeout": 0, "legacy.dropped.plane_failure": 0,
            "legacy.dropped.rate_limited": 0, "legacy.dropped.draining": 0}
    assert_golden(_picked(relay.stats()["counters"], want), want, "legacy counters")
    # an unknown command gets no reply (the module could not read one), counted
    relay.legacy_no_reply(b"1_6 X", "legacy.dropped.unknown_command", 0)


# -- 4. one exact SDP ------------------------------------------------------------------------------
def sdp(relay: GoldenRelay) -> None:
    """A plain G.711 offer and answer carrying `sdp`: the replies' bodies byte for byte
    (docs/protocol.md: c= and the m= port point at the relay; the o= version is bumped;
    every other byte stays; the reply's sdp has the request's type: str in, str out; bin
    in, bin out)."""
    L = relay.layout
    P = L.port_start
    call = "golden-sdp@198.51.100.10"
    offer_sdp = g711(L.caller, L.caller, A_SDP)
    # c= and the m= port name leg B's relay address, o='s version goes up by one (since
    # 7e93b9d: "o= bumped"; docs/protocol.md's example still keeps it), every other byte
    # as sent
    want_offer = _body("v=0", f"o=- 1 2 IN IP4 {L.caller}", "s=-", f"c=IN IP4 {L.external}",
                       "t=0 0", f"m=audio {P + 2} RTP/AVP 0 8", "a=rtpmap:0 PCMU/8000",
                       "a=rtpmap:8 PCMA/8000", "a=ptime:20", "a=sendrecv")
    request = {"v": V, "cookie": "g-sdp-offer", "cmd": "offer", "call_id": call,
               "from_tag": "tag-a", "sdp": offer_sdp, "interface": "external"}
    offer = relay.request(request)

    answer_sdp = g711(L.callee, L.callee, B_SDP).encode()
    want_answer = _body("v=0", f"o=- 1 2 IN IP4 {L.callee}", "s=-", f"c=IN IP4 {L.internal}",
                        "t=0 0", f"m=audio {P} RTP/AVP 0 8", "a=rtpmap:0 PCMU/8000",
                        "a=rtpmap:8 PCMA/8000", "a=ptime:20", "a=sendrecv").encode()
    request = {"v": V, "cookie": "g-sdp-answer", "cmd": "answer", "call_id": call,
               "from_tag": "tag-a", "to_tag": "tag-b", "sdp": answer_sdp,
               "interface": "internal"}
    answer = relay.request(request)
    query = relay.request({"v": V, "cookie": "g-query", "cmd": "query", "call_id": call})
    # all three compared at once: a body that differs does not hide the rest
    assert_all_golden([
        (offer, _ok("g-sdp-offer", call_id=call, leg="B",
                    **_announce(_relay(L.external, P + 2)), sdp=want_offer), "offer with sdp"),
        (answer, _ok("g-sdp-answer", call_id=call, leg="A", **_announce(_relay(L.internal, P)),
                     sdp=want_answer), "answer with sdp (bin)"),
        # the session learned the peers from the bodies' c= and m= lines
        (query, _ok("g-query", session=_session(
            call, _leg("tag-a", _relay(L.internal, P), _addr(L.caller, A_SDP)),
            _leg("tag-b", _relay(L.external, P + 2), _addr(L.callee, B_SDP)),
            media_seen=False)), "query after sdp offer/answer"),
    ])
