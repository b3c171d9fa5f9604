"""Every stream of a call, through the engine and the msgpack protocol (sans-IO).

On 7d500b6 an offer with m=audio and m=video came back with the video port untouched
(nothing listened there), and a NATed phone was never relayed.
"""

from __future__ import annotations

from typing import Any, Dict

import msgpack

from fastpath.contract import Install, Update
from lrk.control.msgpack_proto import MsgpackControl
from lrk.core import sdp
from lrk.core.engine import Engine, EngineConfig
from lrk.core.session import StreamOffer

CALLER = "198.51.100.10"
CALLEE = "198.51.100.20"


def engine(**kw: Any) -> Engine:
    cfg = dict(internal_ip="10.0.0.1", external_ip="10.0.0.1", port_start=30000,
               port_end=30099, quarantine=0.0)
    cfg.update(kw)
    return Engine(EngineConfig(**cfg))


def av(ip: str, audio: int, video: int, mux: bool = False) -> str:
    m = "a=rtcp-mux\r\n" if mux else ""
    return (f"v=0\r\no=- 7 7 IN IP4 {ip}\r\ns=-\r\nc=IN IP4 {ip}\r\nt=0 0\r\n"
            f"m=audio {audio} RTP/AVP 0 8\r\na=rtpmap:0 PCMU/8000\r\n{m}"
            f"m=video {video} RTP/AVP 96\r\na=rtpmap:96 H264/90000\r\na=fmtp:96 "
            f"profile-level-id=42e01f\r\n{m}")


def cmd(ctl: MsgpackControl, name: str, **args: Any) -> Dict[str, Any]:
    args.update(v=1, cookie=f"{name}-{len(ctl.replay)}", cmd=name)
    out = ctl.handle(msgpack.packb(args), ("127.0.0.1", 5000), 1.0)
    return msgpack.unpackb(out.reply, raw=False)


# -- engine ----------------------------------------------------------------------------
def test_audio_and_video_each_get_ports_on_both_legs():
    e = engine()
    session, leg, actions = e.offer(0.0, "c", "ft", [StreamOffer(CALLER, 4000),
                                                     StreamOffer(CALLER, 5000, kind="video")])
    assert e.ports.in_use == 4  # pairs: RTP+RTCP on each leg, per stream: 8 ports
    assert len(set(session.ports())) == 4
    spec = actions[0].spec
    assert isinstance(actions[0], Install) and [s.index for s in spec.streams] == [0, 1]
    assert spec.streams[1].a.announced == (CALLER, 5000)
    assert spec.streams[1].b.announced is None  # the callee has not answered


def test_disabled_stream_keeps_its_place_and_holds_no_ports():
    e = engine()
    session, _, actions = e.offer(0.0, "c", "ft", [
        StreamOffer(CALLER, 4000), StreamOffer(CALLER, 0, kind="video"),
        StreamOffer(CALLER, 6000, kind="text")])
    assert [s.index for s in actions[0].spec.streams] == [0, 2]
    assert session.legs["A"].media[1] is None
    assert e.ports.in_use == 4


def test_reinvite_adds_video_then_disables_it_and_frees_its_ports():
    e = engine()
    e.offer(0.0, "c", "ft", [StreamOffer(CALLER, 4000)])
    e.answer(0.0, "c", "ft", "tt", [StreamOffer(CALLEE, 7000)])
    assert e.ports.in_use == 2
    _s, _l, actions = e.offer(5.0, "c", "ft", [StreamOffer(CALLER, 4000),
                                               StreamOffer(CALLER, 5000, kind="video")],
                              to_tag="tt")
    assert isinstance(actions[0], Update) and len(actions[0].spec.streams) == 2
    assert e.ports.in_use == 4
    legs = e.by_call["c"].legs
    video_ports = [(m.relay_ip, m.relay_port) for m in (legs["A"].media[1], legs["B"].media[1])]
    _s, _l, actions = e.offer(9.0, "c", "ft", [StreamOffer(CALLER, 4000),
                                               StreamOffer(CALLER, 0, kind="video")],
                              to_tag="tt")
    assert [s.index for s in actions[0].spec.streams] == [0]
    assert e.ports.in_use == 2
    assert not any(e.ports.is_in_use(ip, p) for ip, p in video_ports)
    assert e.counters["streams.removed"] == 1


def test_answer_rejecting_a_stream_frees_it():
    e = engine()
    e.offer(0.0, "c", "ft", [StreamOffer(CALLER, 4000), StreamOffer(CALLER, 5000)])
    _s, leg, actions = e.answer(0.0, "c", "ft", "tt", [StreamOffer(CALLEE, 7000),
                                                      StreamOffer(CALLEE, 0)])
    assert [s.index for s in actions[0].spec.streams] == [0]
    assert leg.media[1] is None and e.ports.in_use == 2


def test_ports_running_out_mid_offer_release_what_was_taken():
    e = engine(port_end=30005)  # three pairs: not enough for two streams on two legs
    try:
        e.offer(0.0, "c", "ft", [StreamOffer(CALLER, 4000), StreamOffer(CALLER, 5000)])
    except Exception as exc:
        assert "exhausted" in str(exc).lower() or exc.__class__.__name__ == "PortsExhausted"
    else:
        raise AssertionError("four pairs from a range of three")
    assert e.ports.in_use == 0 and e.by_call == {}


def test_old_style_hold_sends_nothing():
    e = engine()
    session, _, _ = e.offer(0.0, "c", "ft", [StreamOffer("0.0.0.0", 4000)])
    a = session.legs["A"].media[0]
    assert a.announced == ("0.0.0.0", 0) and a.rtcp_announced == ("0.0.0.0", 0)


def test_learning_is_the_default_and_strict_source_keeps_v01s_rule():
    learning = engine()
    session, _, actions = learning.offer(0.0, "c", "ft", [StreamOffer(CALLER, 4000)])
    assert actions[0].spec.streams[0].a.latch_any is True
    _s, _l, actions = learning.offer(1.0, "c", "ft", [StreamOffer(CALLER, 4000)],
                                     strict_source=True)
    assert actions[0].spec.streams[0].a.latch_any is False  # per session
    strict = engine(strict_source=True)  # per node
    _s, _l, actions = strict.offer(0.0, "c", "ft", [StreamOffer(CALLER, 4000)])
    assert actions[0].spec.streams[0].a.latch_any is False


# -- protocol and SDP ---------------------------------------------------------------------
def test_offer_rewrites_every_stream_and_lists_them():
    ctl = MsgpackControl(engine())
    reply = cmd(ctl, "offer", call_id="c", from_tag="ft", sdp=av(CALLER, 4000, 5000))
    streams = reply["streams"]
    assert [s["port"] for s in streams] == [streams[0]["port"], streams[1]["port"]]
    assert streams[0]["port"] != streams[1]["port"]
    desc = sdp.parse(reply["sdp"])
    assert [s.port for s in desc.streams] == [streams[0]["port"], streams[1]["port"]]
    assert desc.address == "10.0.0.1" and desc.version == 8
    assert "a=fmtp:96 profile-level-id=42e01f\r\n" in reply["sdp"]  # byte for byte


def test_rtcp_mux_is_accepted_for_an_offerer_even_if_the_answerer_declines():
    ctl = MsgpackControl(engine())
    offer = cmd(ctl, "offer", call_id="c", from_tag="ft", sdp=av(CALLER, 4000, 5000, mux=True))
    assert offer["sdp"].count("a=rtcp-mux") == 2  # passed on to the callee
    answer = cmd(ctl, "answer", call_id="c", from_tag="ft", to_tag="tt",
                 sdp=av(CALLEE, 7000, 7002, mux=False))
    assert answer["sdp"].count("a=rtcp-mux") == 2  # the caller may mux: lrk demuxes
    assert all(s["rtcp_mux"] and s["rtcp_port"] == s["port"] for s in answer["streams"])
    session = ctl.engine.by_call["c"]
    assert [m.rtcp_mux for m in session.legs["A"].media] == [True, True]
    assert [m.rtcp_mux for m in session.legs["B"].media] == [False, False]


def test_media_list_form_of_the_protocol():
    ctl = MsgpackControl(engine())
    reply = cmd(ctl, "offer", call_id="c", from_tag="ft",
                media=[{"ip": CALLER, "port": 4000}, {"ip": CALLER, "port": 0},
                       {"ip": CALLER, "port": 6000, "rtcp_mux": True}])
    assert reply["ok"] and reply["streams"][1] is None
    assert reply["streams"][2]["rtcp_mux"] is True
