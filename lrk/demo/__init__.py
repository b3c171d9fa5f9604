"""`lrkproxy demo`: one simulated call through a real relay on loopback, checked end to end.

A relay daemon starts as a child process; a caller and a callee (UDP sockets)
exchange SIP-shaped messages through the client library's `manage()` (INVITE,
200 OK, BYE) and RTP/RTCP both ways. Exits 0 only if every packet arrived intact
from the relay's ports.
"""

from __future__ import annotations

import sys
from typing import List

from lrk.client import LrkClient
from lrk.demo.media import MediaEndpoint, rtcp_sender_report, summarize
from lrk.demo.relay_process import RelayProcess

CALLER_SSRC = 0x11111111
CALLEE_SSRC = 0x22222222


def sip_message(first_line: str, call_id: str, from_tag: str, to_tag: str, cseq: str,
                sdp_body: str = "") -> str:
    to = "<sip:bob@example.test>" + (f";tag={to_tag}" if to_tag else "")
    lines = [
        first_line,
        "Via: SIP/2.0/UDP 127.0.0.1:5062;branch=z9hG4bK-demo-1",
        f"From: <sip:alice@example.test>;tag={from_tag}",
        f"To: {to}",
        f"Call-ID: {call_id}",
        f"CSeq: {cseq}",
    ]
    if sdp_body:
        lines.append("Content-Type: application/sdp")
    lines.append(f"Content-Length: {len(sdp_body.encode())}")
    return "\r\n".join(lines) + "\r\n\r\n" + sdp_body


def sdp_for(ip: str, port: int) -> str:
    return (f"v=0\r\no=- 1 1 IN IP4 {ip}\r\ns=demo\r\nc=IN IP4 {ip}\r\nt=0 0\r\n"
            f"m=audio {port} RTP/AVP 0\r\na=rtpmap:0 PCMU/8000\r\n")


def media_of(message: str) -> tuple:
    ip = port = None
    for line in message.split("\r\n"):
        if line.startswith("c=IN IP4 "):
            ip = line.split()[2]
        elif line.startswith("m=audio "):
            port = int(line.split()[1])
    return ip, port


def run_demo(packets: int = 100, ports: str = "35000-35999", out=None) -> int:
    out = out or sys.stdout
    say = lambda text: print(text, file=out)  # noqa: E731
    caller, callee = MediaEndpoint(), MediaEndpoint()
    failures: List[str] = []
    try:
        with RelayProcess(ports=ports) as relay, LrkClient([relay.node]) as client:
            say(f"relay up: control {relay.node}, ports {ports}")
            call_id, from_tag, to_tag = "demo-call-1@lrk", "alice-tag", "bob-tag"
            invite = sip_message("INVITE sip:bob@example.test SIP/2.0", call_id, from_tag, "",
                                 "1 INVITE", sdp_for(*caller.address))
            invite_out = client.manage(invite)
            callee_sees = media_of(invite_out)
            ok = sip_message("SIP/2.0 200 OK", call_id, from_tag, to_tag, "1 INVITE",
                             sdp_for(*callee.address))
            ok_out = client.manage(ok)
            caller_sees = media_of(ok_out)
            say(f"caller {caller.address} -> relay {caller_sees} ; "
                f"callee {callee.address} -> relay {callee_sees}")

            caller.send_rtp(caller_sees, packets, CALLER_SSRC)
            got_callee = callee.receive(callee.rtp, packets, 5.0)
            callee.send_rtp(callee_sees, packets, CALLEE_SSRC)
            got_caller = caller.receive(caller.rtp, packets, 5.0)
            caller.rtcp.sendto(rtcp_sender_report(CALLER_SSRC, packets, packets * 160),
                               (caller_sees[0], caller_sees[1] + 1))
            rtcp_at_callee = callee.receive(callee.rtcp, 1, 5.0)

            for who, got, ssrc, relay_addr in (
                ("callee", got_callee, CALLER_SSRC, callee_sees),
                ("caller", got_caller, CALLEE_SSRC, caller_sees),
            ):
                s = summarize(got, ssrc)
                say(f"{who} received {s['intact']}/{packets} intact RTP packets "
                    f"({s['damaged']} damaged) from {s['sources']}")
                if s["intact"] != packets or s["damaged"]:
                    failures.append(f"{who} got {s['intact']} of {packets} packets intact")
                if s["sources"] != [tuple(relay_addr)]:
                    failures.append(f"{who} saw media from {s['sources']}, not the relay")
            say(f"callee received {len(rtcp_at_callee)} RTCP report(s) on its RTCP port")
            if len(rtcp_at_callee) != 1:
                failures.append("RTCP was not relayed")

            session = client.query(call_id)["session"]
            for name, leg in session["legs"].items():
                c = leg["counters"]
                say(f"  leg {name}: latched {leg['latched']}, in {c['in_packets']} pkts "
                    f"/ {c['in_bytes']} B, out {c['out_packets']} pkts / {c['out_bytes']} B, "
                    f"drops {c['drops']}")
            bye = sip_message("BYE sip:bob@example.test SIP/2.0", call_id, from_tag, to_tag,
                              "2 BYE")
            client.manage(bye)
            remaining = client.list()["total"]
            say(f"after BYE the relay holds {remaining} session(s)")
            if remaining:
                failures.append("the session survived its BYE")
    finally:
        caller.close()
        callee.close()
    if failures:
        say("DEMO FAILED: " + "; ".join(failures))
        return 1
    say("demo OK: media relayed both ways intact")
    return 0
