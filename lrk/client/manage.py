"""What lrkproxy_manage() would do with a SIP message: offer, answer, delete or nothing.

Sans-IO: `plan_manage()` only parses and decides; the client sends the
command and `apply_reply()` splices the relay's SDP back into the message.

Rules (Kamailio's lrkproxy/rtpproxy_manage semantics):

* INVITE or UPDATE request with an SDP body -> offer;
* ACK with an SDP body -> answer from the caller to the callee's offer (late
  offer: the INVITE had no SDP, the 200 OK carried the offer), so its tags go the
  other way round: the callee (To) offered, the caller (From) answers;
* 1xx/2xx response to INVITE/UPDATE with an SDP body -> answer (From tag is
  still the caller's, To tag the callee's);
* BYE or CANCEL request -> delete;
* final response >= 300 to an INVITE -> delete;
* anything else (no SDP, OPTIONS, responses to BYE/CANCEL/UPDATE failures...) -> nothing.

The SDP is read and rewritten by lrk.core.sdp, the module the relay uses too, so the
client and the relay agree on which streams exist and which can be relayed.
"""

from __future__ import annotations

import ipaddress
from dataclasses import replace
from typing import Any, Dict, List, NamedTuple, Optional, Tuple

from lrk.client.errors import InvalidArgument, ProtocolError, SipParseError
from lrk.client.sip import SipData, SipMessage, parse_sip
from lrk.core import sdp as sdplib
from lrk.core.sdp import SessionDescription, StreamRelay
from lrk.errors import SdpError

OFFER, ANSWER, DELETE, NOTHING = "offer", "answer", "delete", "nothing"

INTERNAL, EXTERNAL = "internal", "external"


def parse_flags(flags: Optional[str]) -> Tuple[str, str]:
    """(offer interface, answer interface) for the lrkproxy_manage() flags.

    `ie`: the offer goes to the external side (callee) and the answer back to
    the internal one; `ei`: the inverse; none: internal both ways.
    """
    text = (flags or "").strip().lower()
    if text == "":
        return INTERNAL, INTERNAL
    if text == "ie":
        return EXTERNAL, INTERNAL
    if text == "ei":
        return INTERNAL, EXTERNAL
    raise InvalidArgument(f"unknown manage flags {flags!r}; use 'ie', 'ei' or none")


class ManagePlan(NamedTuple):
    """The command manage() will send (or NOTHING) and its arguments."""

    op: str
    message: SipMessage
    call_id: Optional[str] = None
    from_tag: Optional[str] = None
    to_tag: Optional[str] = None
    via_branch: Optional[str] = None
    interface: str = INTERNAL
    description: Optional[SessionDescription] = None  # the offer's or answer's SDP, parsed


def _detect(msg: SipMessage) -> str:
    if msg.is_request:
        method = msg.method
        if method in ("BYE", "CANCEL"):
            return DELETE
        if method in ("INVITE", "UPDATE") and msg.has_sdp():
            return OFFER
        if method == "ACK" and msg.has_sdp():
            return ANSWER
        return NOTHING
    assert msg.status is not None
    method = msg.cseq_method
    if method is None:
        raise SipParseError(f"response {msg.status} has no CSeq header (needed to know "
                            "which request it answers)")
    if method == "INVITE" and msg.status >= 300:
        return DELETE
    if method in ("INVITE", "UPDATE") and msg.status < 300 and msg.has_sdp():
        return ANSWER
    return NOTHING


def plan_manage(data: SipData, flags: Optional[str] = None) -> ManagePlan:
    """Parse `data` and decide the command; raises SipParseError / InvalidArgument."""
    offer_if, answer_if = parse_flags(flags)
    msg = parse_sip(data)
    op = _detect(msg)
    if op == NOTHING:
        return ManagePlan(NOTHING, msg)
    call_id = msg.call_id
    if call_id is None:
        raise SipParseError(f"{msg.start_line!r} has no Call-ID header")
    if op == DELETE:
        return ManagePlan(DELETE, msg, call_id=call_id, via_branch=msg.via_branch)
    from_tag = msg.from_tag
    if from_tag is None:
        raise SipParseError(f"{msg.start_line!r} has no From tag")
    to_tag = msg.to_tag
    if op == ANSWER and to_tag is None:
        raise SipParseError(f"{msg.start_line!r} carries an SDP answer but its To header "
                            "has no tag")
    if msg.is_request and msg.method == "ACK":  # late offer: the callee offered
        from_tag, to_tag = to_tag, from_tag
    return ManagePlan(op, msg, call_id=call_id, from_tag=from_tag, to_tag=to_tag,
                      via_branch=msg.via_branch,
                      interface=offer_if if op == OFFER else answer_if,
                      description=_describe(msg.sdp, f"{msg.start_line!r}"))


def _describe(body: SipData, where: str) -> SessionDescription:
    """Parse an SDP body before anything is sent: a body lrk cannot relay fails here."""
    try:
        return sdplib.parse(body)
    except SdpError as exc:
        raise SipParseError(f"{where} has an SDP body lrk cannot relay: {exc}") from exc


def check_ip_address(ip_address: Optional[str]) -> None:
    """Reject a bad manage() ip_address before anything is sent."""
    if ip_address is None:
        return
    try:
        ipaddress.ip_address(ip_address)
    except ValueError:
        raise InvalidArgument(f"ip_address {ip_address!r} is not an IPv4 or IPv6 address") \
            from None


def _stream_relay(entry: Any, where: str, rtcp_mux: bool = False) -> StreamRelay:
    if not isinstance(entry, dict):
        raise ProtocolError(f"reply field {where} is not a map: {entry!r}")
    try:
        return StreamRelay(entry.get("ip"), entry.get("port"), entry.get("rtcp_port"),
                           entry.get("rtcp_mux", rtcp_mux))
    except ValueError as exc:
        raise ProtocolError(f"reply field {where} is unusable ({exc}): {entry!r}") from None


def reply_relays(description: SessionDescription,
                 reply: Dict[str, Any]) -> Optional[List[Optional[StreamRelay]]]:
    """One StreamRelay (or None) per m= line from an offer/answer reply.

    A reply with `streams` (one `{ip, port, rtcp_port, rtcp_mux}` map or None per m=
    line) relays every stream it names (`rejected_streams` lists the enabled UDP
    streams it names no relay for: the rewrite disables them). A v1 reply only has
    `relay` ({ip, port, rtcp_port}) for the one stream the relay picked, the first
    enabled relayable one (lrk.core.sdp.parse_first); its a=rtcp-mux stays as offered,
    as v1 relays kept it.
    None when the reply names no relay address at all.
    """
    count = len(description.streams)
    streams = reply.get("streams")
    if streams is not None:
        if not isinstance(streams, list) or len(streams) != count:
            raise ProtocolError(f"reply 'streams' must list one entry per m= line ({count}), "
                                f"not {streams!r}")
        relays: List[Optional[StreamRelay]] = []
        for stream, entry in zip(description.streams, streams):
            if entry is not None and not stream.needs_relay:
                raise ProtocolError(f"reply streams[{stream.index}] relays a stream that is "
                                    f"disabled or not relayable (SDP line {stream.line})")
            relays.append(None if entry is None else
                          _stream_relay(entry, f"streams[{stream.index}]"))
        return relays
    relay = reply.get("relay")
    if relay is None:
        return None
    first = description.first_relayable()
    if first is None:
        raise ProtocolError("reply names a relay address but the SDP has no stream to relay")
    relays = [None] * count
    relays[first.index] = _stream_relay(relay, "relay", first.rtcp_mux)
    return relays


def rejected_streams(description: SessionDescription, reply: Dict[str, Any],
                     relays: List[Optional[StreamRelay]]) -> List[int]:
    """The m= lines a `streams` reply gives no relay although they are enabled UDP
    streams (an answer enabling a stream its offer disabled, or adding one): the relay
    does not carry their media, so the rewrite sets their port to 0 (as the relay's own
    `sdp` does) rather than pass the peer's address on. Empty for a v1 reply, which
    names only the first stream."""
    if reply.get("streams") is None:
        return []
    return sdplib.unrelayed(description.streams, relays)


def apply_reply(plan: ManagePlan, reply: Dict[str, Any],
                ip_address: Optional[str] = None) -> SipData:
    """The SIP message with its SDP pointed at the relay (`ip_address` in place of its IP).

    The client rewrites the message's own SDP with lrk.core.sdp from the reply's relay
    addresses, so every stream the relay names is rewritten the same way whatever the
    relay's version, and `ip_address` is just another relay address. An enabled UDP
    stream a `streams` reply gives no relay gets port 0 (`rejected_streams`). The reply's
    `sdp` is used as it is only when the reply names no relay address.
    """
    description = plan.description
    if description is None:
        description = _describe(plan.message.sdp, f"{plan.message.start_line!r}")
    relays = reply_relays(description, reply)
    if relays is None:
        body = reply.get("sdp")
        if not isinstance(body, (str, bytes)):
            raise ProtocolError(f"{plan.op} reply has neither 'streams', 'relay' nor 'sdp' "
                                f"although an SDP was sent: {reply!r}")
        if ip_address is not None:
            raise ProtocolError(f"{plan.op} reply names no relay address, so ip_address "
                                f"cannot replace it: {reply!r}")
        return plan.message.with_body(body)
    reject = rejected_streams(description, reply, relays)
    if ip_address is not None:
        relays = [None if r is None else replace(r, ip=ip_address) for r in relays]
    return plan.message.with_body(sdplib.rewrite(plan.message.sdp, relays, reject=reject))


# -- v1 SDP helpers, kept for callers of lrk.client.parse_sdp() / sdp_media() -----------


class SdpInfo(NamedTuple):
    """The first audio stream's connection address, its IP version and its port."""

    ip: Optional[str]
    ip_version: Optional[int]  # 4 or 6
    audio_port: Optional[int]


def parse_sdp(sdp: SipData) -> SdpInfo:
    """The first enabled m=audio stream's address and port, via lrk.core.sdp.

    Without an audio stream, `ip` is the first stream's address and `audio_port` None.
    Raises SipParseError for a body lrk.core.sdp rejects (no m= line, bad m=/c=/o=).
    """
    if not isinstance(sdp, (str, bytes, bytearray)):
        raise SipParseError(f"an SDP body must be bytes or str, not {type(sdp).__name__}")
    streams = _describe(sdp, "SDP").streams
    audio = [s for s in streams if s.media == "audio"]
    chosen = next((s for s in audio if not s.disabled), audio[0] if audio else None)
    stream = chosen or streams[0]
    version = None if stream.family is None else 6 if stream.family == "IP6" else 4
    return SdpInfo(stream.address, version, chosen.port if chosen else None)


def sdp_media(sdp: SipData) -> Tuple[str, int]:
    """(ip, audio port) for an offer/answer's `media` argument; raises if either is missing."""
    info = parse_sdp(sdp)
    if info.audio_port is None:
        raise SipParseError("SDP has no m=audio line")
    if info.ip is None:
        raise SipParseError("SDP has no c= connection line for its m=audio stream")
    return info.ip, info.audio_port
