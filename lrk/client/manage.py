"""What lrkproxy_manage() would do with a SIP message: offer, answer, delete or nothing.

Sans-IO: `plan_manage()` only parses and decides; the client sends the
command and `apply_reply()` splices the relay's SDP back into the message.

Rules (Kamailio's lrkproxy/rtpproxy_manage semantics):

* INVITE or UPDATE request with an SDP body -> offer;
* ACK with an SDP body -> answer (late-offer flows: the 200 OK carried the
  offer and went out as an answer too; the relay treats both as answers for
  the session, exactly like the lrkproxy module does);
* 1xx/2xx response to INVITE/UPDATE with an SDP body -> answer (From tag is
  still the caller's, To tag the callee's);
* BYE or CANCEL request -> delete;
* final response >= 300 to an INVITE -> delete;
* anything else (no SDP, OPTIONS, responses to BYE/CANCEL/UPDATE failures...) -> nothing.
"""

from __future__ import annotations

import ipaddress
from typing import Any, Dict, NamedTuple, Optional, Tuple

from lrk.client.errors import InvalidArgument, ProtocolError, SipParseError
from lrk.client.sip import SipData, SipMessage, parse_sip, rewrite_sdp_address

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
    return ManagePlan(op, msg, call_id=call_id, from_tag=from_tag, to_tag=to_tag,
                      via_branch=msg.via_branch,
                      interface=offer_if if op == OFFER else answer_if)


def check_ip_address(ip_address: Optional[str]) -> None:
    """Reject a bad manage() ip_address before anything is sent."""
    if ip_address is None:
        return
    try:
        ipaddress.ip_address(ip_address)
    except ValueError:
        raise InvalidArgument(f"ip_address {ip_address!r} is not an IPv4 or IPv6 address") \
            from None


def apply_reply(plan: ManagePlan, reply: Dict[str, Any],
                ip_address: Optional[str] = None) -> SipData:
    """The SIP message with the relay's SDP (and `ip_address` in c= lines, if given)."""
    sdp = reply.get("sdp")
    if not isinstance(sdp, (str, bytes)):
        raise ProtocolError(f"{plan.op} reply has no 'sdp' although an SDP was sent: {reply!r}")
    if ip_address is not None:
        relay = reply.get("relay")
        relay_ip = relay.get("ip") if isinstance(relay, dict) else None
        sdp = rewrite_sdp_address(sdp, ip_address, relay_ip)
    return plan.message.with_body(sdp)
