"""Golden SDP bodies as real user agents write them, and the exact body lrk makes of each.

Every case is checked as str and as bytes: the parsed streams' key fields, the exact
rewritten body (the relays are one StreamRelay or None per m= line), and that the
result reads back with the relay's ports. The rules are in lrk/core/sdp.py; what each
body shows is in its name.
"""

from __future__ import annotations

from typing import List, NamedTuple, Optional, Tuple

import pytest

from lrk.core import sdp
from lrk.core.sdp import Stream, StreamRelay


def R(port: int, rtcp: Optional[int] = None, mux: bool = False,  # noqa: N802
      ip: str = "203.0.113.1") -> StreamRelay:
    return StreamRelay(ip, port, rtcp, mux)


def R6(port: int, rtcp: Optional[int] = None, mux: bool = False) -> StreamRelay:  # noqa: N802
    return StreamRelay("2001:db8::100", port, rtcp, mux)


class Case(NamedTuple):
    name: str
    relays: List[Optional[StreamRelay]]
    streams: List[str]  # summary() of each parsed stream
    sent: Tuple[str, ...]  # the body's lines, as the user agent wrote them
    expected: Tuple[str, ...]  # the rewritten body's lines
    eol: str = "\r\n"
    end: bool = True  # the body ends with a line ending

    def body(self, lines: Tuple[str, ...]) -> str:
        return self.eol.join(lines) + (self.eol if self.end else "")


def summary(s: Stream) -> str:
    port = f"{s.port}/{s.port_count}" if s.port_count != 1 else str(s.port)
    text = f"{s.media} {port} {s.proto} {s.family or '-'} {s.address or '-'} {s.direction}"
    if s.rtcp_port is not None:
        text += f" rtcp={s.rtcp_port}" + (f"@{s.rtcp_address}" if s.rtcp_address else "")
    flags = [name for flag, name in (
        (s.media_connection, "media-c"), (s.rtcp_mux, "mux"), (s.hold, "hold"),
        (s.disabled, "disabled"), (s.ice, "ice"), (not s.relayable, "not-relayable"),
    ) if flag]
    return " ".join([text, *flags])


CASES = [
    Case(
        "desk_phone_g711",
        relays=[R(30000)],
        streams=[
            "audio 2222 RTP/AVP IP4 192.168.1.20 sendrecv",
        ],
        sent=(
            "v=0",
            "o=- 1688042143 1688042143 IN IP4 192.168.1.20",
            "s=Polycom IP Phone",
            "c=IN IP4 192.168.1.20",
            "t=0 0",
            "a=sendrecv",
            "m=audio 2222 RTP/AVP 0 8 18 101",
            "a=rtpmap:0 PCMU/8000",
            "a=rtpmap:8 PCMA/8000",
            "a=rtpmap:18 G729/8000",
            "a=fmtp:18 annexb=no",
            "a=rtpmap:101 telephone-event/8000",
            "a=fmtp:101 0-15",
            "a=ptime:20",
        ),
        expected=(
            "v=0",
            "o=- 1688042143 1688042144 IN IP4 192.168.1.20",
            "s=Polycom IP Phone",
            "c=IN IP4 203.0.113.1",
            "t=0 0",
            "a=sendrecv",
            "m=audio 30000 RTP/AVP 0 8 18 101",
            "a=rtpmap:0 PCMU/8000",
            "a=rtpmap:8 PCMA/8000",
            "a=rtpmap:18 G729/8000",
            "a=fmtp:18 annexb=no",
            "a=rtpmap:101 telephone-event/8000",
            "a=fmtp:101 0-15",
            "a=ptime:20",
        ),
    ),
    Case(
        "desk_phone_rtcp_without_address",
        relays=[R(30002)],
        streams=[
            "audio 11796 RTP/AVP IP4 10.1.1.33 sendrecv rtcp=11797",
        ],
        sent=(
            "v=0",
            "o=- 20017 20017 IN IP4 10.1.1.33",
            "s=SDP data",
            "c=IN IP4 10.1.1.33",
            "t=0 0",
            "m=audio 11796 RTP/AVP 9 0 8 101",
            "a=rtpmap:9 G722/8000",
            "a=rtpmap:0 PCMU/8000",
            "a=rtpmap:8 PCMA/8000",
            "a=rtpmap:101 telephone-event/8000",
            "a=fmtp:101 0-15",
            "a=rtcp:11797",
            "a=ptime:20",
            "a=sendrecv",
        ),
        expected=(
            "v=0",
            "o=- 20017 20018 IN IP4 10.1.1.33",
            "s=SDP data",
            "c=IN IP4 203.0.113.1",
            "t=0 0",
            "m=audio 30002 RTP/AVP 9 0 8 101",
            "a=rtpmap:9 G722/8000",
            "a=rtpmap:0 PCMU/8000",
            "a=rtpmap:8 PCMA/8000",
            "a=rtpmap:101 telephone-event/8000",
            "a=fmtp:101 0-15",
            "a=rtcp:30003",
            "a=ptime:20",
            "a=sendrecv",
        ),
    ),
    Case(
        "gateway_media_c_and_rtcp_with_address",
        relays=[R(30004)],
        streams=[
            "audio 17542 RTP/AVP IP4 192.0.2.51 sendrecv rtcp=17543@192.0.2.51 media-c",
        ],
        sent=(
            "v=0",
            "o=CiscoSystemsSIP-GW-UserAgent 1738 4059 IN IP4 192.0.2.50",
            "s=SIP Call",
            "c=IN IP4 192.0.2.50",
            "t=0 0",
            "m=audio 17542 RTP/AVP 0 101 19",
            "c=IN IP4 192.0.2.51",
            "a=rtpmap:0 PCMU/8000",
            "a=rtpmap:101 telephone-event/8000",
            "a=fmtp:101 0-16",
            "a=rtpmap:19 CN/8000",
            "a=rtcp:17543 IN IP4 192.0.2.51",
            "a=ptime:20",
        ),
        expected=(
            "v=0",
            "o=CiscoSystemsSIP-GW-UserAgent 1738 4060 IN IP4 192.0.2.50",
            "s=SIP Call",
            "c=IN IP4 203.0.113.1",
            "t=0 0",
            "m=audio 30004 RTP/AVP 0 101 19",
            "c=IN IP4 203.0.113.1",
            "a=rtpmap:0 PCMU/8000",
            "a=rtpmap:101 telephone-event/8000",
            "a=fmtp:101 0-16",
            "a=rtpmap:19 CN/8000",
            "a=rtcp:30005 IN IP4 203.0.113.1",
            "a=ptime:20",
        ),
    ),
    Case(
        "linphone_audio_video_rtcp_mux",
        relays=[R(30010, 30011, mux=True), R(30012, 30013, mux=True)],
        streams=[
            "audio 7078 RTP/AVP IP4 192.168.1.101 sendrecv rtcp=7079 mux",
            "video 9078 RTP/AVP IP4 192.168.1.101 sendrecv rtcp=9079 mux",
        ],
        sent=(
            "v=0",
            "o=alice 2145 3598 IN IP4 192.168.1.101",
            "s=Talk",
            "c=IN IP4 192.168.1.101",
            "t=0 0",
            "a=rtcp-xr:rcvr-rtt=all:10000 stat-summary=loss,dup,jitt,TTL voip-metrics",
            "a=record:off",
            "m=audio 7078 RTP/AVP 96 97 98 0 8 18 101 99 100",
            "a=rtpmap:96 opus/48000/2",
            "a=fmtp:96 useinbandfec=1",
            "a=rtpmap:97 SILK/16000",
            "a=rtpmap:98 speex/16000",
            "a=fmtp:98 vbr=on",
            "a=fmtp:18 annexb=yes",
            "a=rtpmap:101 telephone-event/48000",
            "a=rtpmap:99 telephone-event/16000",
            "a=rtpmap:100 telephone-event/8000",
            "a=rtcp:7079",
            "a=rtcp-mux",
            "a=rtcp-fb:* trr-int 1000",
            "a=rtcp-fb:* ccm tmmbr",
            "m=video 9078 RTP/AVP 96 97",
            "a=rtpmap:96 VP8/90000",
            "a=rtpmap:97 H264/90000",
            "a=fmtp:97 profile-level-id=42801F",
            "a=rtcp:9079",
            "a=rtcp-mux",
            "a=rtcp-fb:* trr-int 1000",
            "a=rtcp-fb:* ccm tmmbr",
            "a=rtcp-fb:96 nack pli",
            "a=rtcp-fb:96 ccm fir",
            "a=rtcp-fb:97 nack pli",
            "a=rtcp-fb:97 ccm fir",
        ),
        expected=(
            "v=0",
            "o=alice 2145 3599 IN IP4 192.168.1.101",
            "s=Talk",
            "c=IN IP4 203.0.113.1",
            "t=0 0",
            "a=rtcp-xr:rcvr-rtt=all:10000 stat-summary=loss,dup,jitt,TTL voip-metrics",
            "a=record:off",
            "m=audio 30010 RTP/AVP 96 97 98 0 8 18 101 99 100",
            "a=rtpmap:96 opus/48000/2",
            "a=fmtp:96 useinbandfec=1",
            "a=rtpmap:97 SILK/16000",
            "a=rtpmap:98 speex/16000",
            "a=fmtp:98 vbr=on",
            "a=fmtp:18 annexb=yes",
            "a=rtpmap:101 telephone-event/48000",
            "a=rtpmap:99 telephone-event/16000",
            "a=rtpmap:100 telephone-event/8000",
            "a=rtcp:30011",
            "a=rtcp-mux",
            "a=rtcp-fb:* trr-int 1000",
            "a=rtcp-fb:* ccm tmmbr",
            "m=video 30012 RTP/AVP 96 97",
            "a=rtpmap:96 VP8/90000",
            "a=rtpmap:97 H264/90000",
            "a=fmtp:97 profile-level-id=42801F",
            "a=rtcp:30013",
            "a=rtcp-mux",
            "a=rtcp-fb:* trr-int 1000",
            "a=rtcp-fb:* ccm tmmbr",
            "a=rtcp-fb:96 nack pli",
            "a=rtcp-fb:96 ccm fir",
            "a=rtcp-fb:97 nack pli",
            "a=rtcp-fb:97 ccm fir",
        ),
    ),
    Case(
        "linphone_session_level_ice",
        relays=[R(30020)],
        streams=[
            "audio 7078 RTP/AVP IP4 192.168.1.102 sendrecv rtcp=7079 ice",
        ],
        sent=(
            "v=0",
            "o=bob 1523 2718 IN IP4 192.168.1.102",
            "s=Talk",
            "c=IN IP4 192.168.1.102",
            "t=0 0",
            "a=ice-pwd:31ec21eb38b2ec6d36e8dc7b",
            "a=ice-ufrag:0bf0ae8a",
            "a=rtcp-xr:rcvr-rtt=all:10000 stat-summary=loss,dup,jitt,TTL voip-metrics",
            "m=audio 7078 RTP/AVP 96 0 8 101",
            "a=rtpmap:96 opus/48000/2",
            "a=fmtp:96 useinbandfec=1",
            "a=rtpmap:101 telephone-event/8000",
            "a=rtcp:7079",
            "a=candidate:1 1 UDP 2130706431 192.168.1.102 7078 typ host",
            "a=candidate:1 2 UDP 2130706430 192.168.1.102 7079 typ host",
            "a=candidate:2 1 UDP 1694498815 198.51.100.102 47863 typ srflx raddr 192.168.1.102 "
            "rport 7078",
            "a=candidate:2 2 UDP 1694498814 198.51.100.102 47864 typ srflx raddr 192.168.1.102 "
            "rport 7079",
            "a=rtcp-fb:* trr-int 1000",
        ),
        expected=(
            "v=0",
            "o=bob 1523 2719 IN IP4 192.168.1.102",
            "s=Talk",
            "c=IN IP4 203.0.113.1",
            "t=0 0",
            "a=rtcp-xr:rcvr-rtt=all:10000 stat-summary=loss,dup,jitt,TTL voip-metrics",
            "m=audio 30020 RTP/AVP 96 0 8 101",
            "a=rtpmap:96 opus/48000/2",
            "a=fmtp:96 useinbandfec=1",
            "a=rtpmap:101 telephone-event/8000",
            "a=rtcp:30021",
            "a=rtcp-fb:* trr-int 1000",
        ),
    ),
    Case(
        "zoiper_audio_video_relay_without_mux",
        relays=[R(30024), R(30026)],
        streams=[
            "audio 8000 RTP/AVP IP4 192.168.0.105 sendrecv mux",
            "video 8002 RTP/AVP IP4 192.168.0.105 sendrecv mux",
        ],
        sent=(
            "v=0",
            "o=Z 1700000000123 1 IN IP4 192.168.0.105",
            "s=Z",
            "c=IN IP4 192.168.0.105",
            "t=0 0",
            "m=audio 8000 RTP/AVP 106 9 98 101 0 8 3",
            "a=rtpmap:106 opus/48000/2",
            "a=fmtp:106 sprop-maxcapturerate=16000; minptime=20; useinbandfec=1",
            "a=rtpmap:98 telephone-event/48000",
            "a=fmtp:98 0-16",
            "a=rtpmap:101 telephone-event/8000",
            "a=fmtp:101 0-16",
            "a=sendrecv",
            "a=rtcp-mux",
            "m=video 8002 RTP/AVP 99 34",
            "a=rtpmap:99 H264/90000",
            "a=fmtp:99 profile-level-id=42E01F; packetization-mode=1",
            "a=rtpmap:34 H263/90000",
            "a=rtcp-fb:* nack pli",
            "a=rtcp-fb:* ccm fir",
            "a=sendrecv",
            "a=rtcp-mux",
        ),
        expected=(
            "v=0",
            "o=Z 1700000000123 2 IN IP4 192.168.0.105",
            "s=Z",
            "c=IN IP4 203.0.113.1",
            "t=0 0",
            "m=audio 30024 RTP/AVP 106 9 98 101 0 8 3",
            "a=rtpmap:106 opus/48000/2",
            "a=fmtp:106 sprop-maxcapturerate=16000; minptime=20; useinbandfec=1",
            "a=rtpmap:98 telephone-event/48000",
            "a=fmtp:98 0-16",
            "a=rtpmap:101 telephone-event/8000",
            "a=fmtp:101 0-16",
            "a=sendrecv",
            "m=video 30026 RTP/AVP 99 34",
            "a=rtpmap:99 H264/90000",
            "a=fmtp:99 profile-level-id=42E01F; packetization-mode=1",
            "a=rtpmap:34 H263/90000",
            "a=rtcp-fb:* nack pli",
            "a=rtcp-fb:* ccm fir",
            "a=sendrecv",
        ),
    ),
    Case(
        "webrtc_chrome_bundle_datachannel",
        relays=[R(30030, mux=True), R(30032, mux=True), None],
        streams=[
            "audio 54400 UDP/TLS/RTP/SAVPF IP4 198.51.100.77 sendrecv rtcp=9@0.0.0.0 media-c mux "
            "ice",
            "video 54400 UDP/TLS/RTP/SAVPF IP4 198.51.100.77 sendrecv rtcp=9@0.0.0.0 media-c mux "
            "ice",
            "application 54400 UDP/DTLS/SCTP IP4 198.51.100.77 sendrecv media-c ice not-relayable",
        ],
        sent=(
            "v=0",
            "o=- 4611731400430051336 2 IN IP4 127.0.0.1",
            "s=-",
            "t=0 0",
            "a=group:BUNDLE 0 1 2",
            "a=extmap-allow-mixed",
            "a=msid-semantic: WMS 2a5a3b7e",
            "m=audio 54400 UDP/TLS/RTP/SAVPF 111 63 9 0 8 110 126",
            "c=IN IP4 198.51.100.77",
            "a=rtcp:9 IN IP4 0.0.0.0",
            "a=candidate:1467250027 1 udp 2122260223 192.168.0.196 54400 typ host generation 0 "
            "network-id 1",
            "a=candidate:435653019 1 udp 1686052607 198.51.100.77 54400 typ srflx raddr "
            "192.168.0.196 rport 54400 generation 0 network-id 1",
            "a=candidate:1853887674 1 tcp 1518280447 192.168.0.196 9 typ host tcptype active "
            "generation 0 network-id 1",
            "a=ice-ufrag:Oyef",
            "a=ice-pwd:7pQ3Oa7X4zpcvBXdvLbNsLMe",
            "a=ice-options:trickle",
            "a=fingerprint:sha-256 "
            "49:66:12:17:0D:1C:91:AE:57:4C:C6:36:DD:D5:97:D2:7D:62:C9:9A:7F:B9:A3:F4:70:03:E7:43:9"
            "1:73:23:5E",
            "a=setup:actpass",
            "a=mid:0",
            "a=extmap:1 urn:ietf:params:rtp-hdrext:ssrc-audio-level",
            "a=sendrecv",
            "a=msid:2a5a3b7e 1f0e0b36",
            "a=rtcp-mux",
            "a=rtpmap:111 opus/48000/2",
            "a=rtcp-fb:111 transport-cc",
            "a=fmtp:111 minptime=10;useinbandfec=1",
            "a=rtpmap:63 red/48000/2",
            "a=fmtp:63 111/111",
            "a=rtpmap:9 G722/8000",
            "a=rtpmap:0 PCMU/8000",
            "a=rtpmap:8 PCMA/8000",
            "a=rtpmap:110 telephone-event/48000",
            "a=rtpmap:126 telephone-event/8000",
            "a=ssrc:3570614608 cname:4TOk42mSjXCkVIa6",
            "m=video 54400 UDP/TLS/RTP/SAVPF 96 97",
            "c=IN IP4 198.51.100.77",
            "a=rtcp:9 IN IP4 0.0.0.0",
            "a=candidate:1467250027 1 udp 2122260223 192.168.0.196 54400 typ host generation 0 "
            "network-id 1",
            "a=ice-ufrag:Oyef",
            "a=ice-pwd:7pQ3Oa7X4zpcvBXdvLbNsLMe",
            "a=ice-options:trickle",
            "a=fingerprint:sha-256 "
            "49:66:12:17:0D:1C:91:AE:57:4C:C6:36:DD:D5:97:D2:7D:62:C9:9A:7F:B9:A3:F4:70:03:E7:43:9"
            "1:73:23:5E",
            "a=setup:actpass",
            "a=mid:1",
            "a=sendrecv",
            "a=msid:2a5a3b7e 7b5c4d1a",
            "a=rtcp-mux",
            "a=rtcp-rsize",
            "a=rtpmap:96 VP8/90000",
            "a=rtcp-fb:96 goog-remb",
            "a=rtcp-fb:96 nack pli",
            "a=rtpmap:97 rtx/90000",
            "a=fmtp:97 apt=96",
            "a=ssrc-group:FID 2231627014 632943048",
            "m=application 54400 UDP/DTLS/SCTP webrtc-datachannel",
            "c=IN IP4 198.51.100.77",
            "a=candidate:1467250027 1 udp 2122260223 192.168.0.196 54400 typ host generation 0 "
            "network-id 1",
            "a=ice-ufrag:Oyef",
            "a=ice-pwd:7pQ3Oa7X4zpcvBXdvLbNsLMe",
            "a=ice-options:trickle",
            "a=fingerprint:sha-256 "
            "49:66:12:17:0D:1C:91:AE:57:4C:C6:36:DD:D5:97:D2:7D:62:C9:9A:7F:B9:A3:F4:70:03:E7:43:9"
            "1:73:23:5E",
            "a=setup:actpass",
            "a=mid:2",
            "a=sctp-port:5000",
            "a=max-message-size:262144",
        ),
        expected=(
            "v=0",
            "o=- 4611731400430051336 3 IN IP4 127.0.0.1",
            "s=-",
            "t=0 0",
            "a=group:BUNDLE 0 1 2",
            "a=extmap-allow-mixed",
            "a=msid-semantic: WMS 2a5a3b7e",
            "m=audio 30030 UDP/TLS/RTP/SAVPF 111 63 9 0 8 110 126",
            "c=IN IP4 203.0.113.1",
            "a=rtcp:30030 IN IP4 203.0.113.1",
            "a=fingerprint:sha-256 "
            "49:66:12:17:0D:1C:91:AE:57:4C:C6:36:DD:D5:97:D2:7D:62:C9:9A:7F:B9:A3:F4:70:03:E7:43:9"
            "1:73:23:5E",
            "a=setup:actpass",
            "a=mid:0",
            "a=extmap:1 urn:ietf:params:rtp-hdrext:ssrc-audio-level",
            "a=sendrecv",
            "a=msid:2a5a3b7e 1f0e0b36",
            "a=rtcp-mux",
            "a=rtpmap:111 opus/48000/2",
            "a=rtcp-fb:111 transport-cc",
            "a=fmtp:111 minptime=10;useinbandfec=1",
            "a=rtpmap:63 red/48000/2",
            "a=fmtp:63 111/111",
            "a=rtpmap:9 G722/8000",
            "a=rtpmap:0 PCMU/8000",
            "a=rtpmap:8 PCMA/8000",
            "a=rtpmap:110 telephone-event/48000",
            "a=rtpmap:126 telephone-event/8000",
            "a=ssrc:3570614608 cname:4TOk42mSjXCkVIa6",
            "m=video 30032 UDP/TLS/RTP/SAVPF 96 97",
            "c=IN IP4 203.0.113.1",
            "a=rtcp:30032 IN IP4 203.0.113.1",
            "a=fingerprint:sha-256 "
            "49:66:12:17:0D:1C:91:AE:57:4C:C6:36:DD:D5:97:D2:7D:62:C9:9A:7F:B9:A3:F4:70:03:E7:43:9"
            "1:73:23:5E",
            "a=setup:actpass",
            "a=mid:1",
            "a=sendrecv",
            "a=msid:2a5a3b7e 7b5c4d1a",
            "a=rtcp-mux",
            "a=rtcp-rsize",
            "a=rtpmap:96 VP8/90000",
            "a=rtcp-fb:96 goog-remb",
            "a=rtcp-fb:96 nack pli",
            "a=rtpmap:97 rtx/90000",
            "a=fmtp:97 apt=96",
            "a=ssrc-group:FID 2231627014 632943048",
            "m=application 54400 UDP/DTLS/SCTP webrtc-datachannel",
            "c=IN IP4 198.51.100.77",
            "a=candidate:1467250027 1 udp 2122260223 192.168.0.196 54400 typ host generation 0 "
            "network-id 1",
            "a=ice-ufrag:Oyef",
            "a=ice-pwd:7pQ3Oa7X4zpcvBXdvLbNsLMe",
            "a=ice-options:trickle",
            "a=fingerprint:sha-256 "
            "49:66:12:17:0D:1C:91:AE:57:4C:C6:36:DD:D5:97:D2:7D:62:C9:9A:7F:B9:A3:F4:70:03:E7:43:9"
            "1:73:23:5E",
            "a=setup:actpass",
            "a=mid:2",
            "a=sctp-port:5000",
            "a=max-message-size:262144",
        ),
    ),
    Case(
        "webrtc_firefox_session_level_ice_options",
        relays=[R(30040)],
        streams=[
            "audio 61000 UDP/TLS/RTP/SAVPF IP4 198.51.100.88 sendrecv rtcp=61001@198.51.100.88 "
            "media-c mux ice",
        ],
        sent=(
            "v=0",
            "o=mozilla...THIS_IS_SDPARTA-99.0 6185396424349414085 0 IN IP4 0.0.0.0",
            "s=-",
            "t=0 0",
            "a=fingerprint:sha-256 "
            "7E:5C:0B:4E:91:11:2D:3A:CA:F5:71:7E:45:1B:4A:8F:0E:4C:1B:9B:61:A2:D4:9E:55:C0:13:7B:8"
            "E:5A:0D:21",
            "a=group:BUNDLE 0",
            "a=ice-options:trickle",
            "a=msid-semantic:WMS *",
            "m=audio 61000 UDP/TLS/RTP/SAVPF 109 9 0 8 101",
            "c=IN IP4 198.51.100.88",
            "a=candidate:0 1 UDP 2122252543 192.168.1.88 61000 typ host",
            "a=candidate:1 1 UDP 1686052863 198.51.100.88 61000 typ srflx raddr 192.168.1.88 "
            "rport 61000",
            "a=sendrecv",
            "a=end-of-candidates",
            "a=extmap:1 urn:ietf:params:rtp-hdrext:ssrc-audio-level",
            "a=fmtp:109 maxplaybackrate=48000;stereo=1;useinbandfec=1",
            "a=fmtp:101 0-15",
            "a=ice-pwd:2f3b2d1a6d0e4c3b9a8f7e6d5c4b3a29",
            "a=ice-ufrag:9c1b2a3d",
            "a=mid:0",
            "a=rtcp:61001 IN IP4 198.51.100.88",
            "a=rtcp-mux",
            "a=rtpmap:109 opus/48000/2",
            "a=rtpmap:9 G722/8000/1",
            "a=rtpmap:0 PCMU/8000",
            "a=rtpmap:8 PCMA/8000",
            "a=rtpmap:101 telephone-event/8000",
            "a=setup:actpass",
            "a=ssrc:1392857003 cname:{3f2b1c4d-5e6f-4a7b-8c9d-0e1f2a3b4c5d}",
        ),
        expected=(
            "v=0",
            "o=mozilla...THIS_IS_SDPARTA-99.0 6185396424349414085 1 IN IP4 0.0.0.0",
            "s=-",
            "t=0 0",
            "a=fingerprint:sha-256 "
            "7E:5C:0B:4E:91:11:2D:3A:CA:F5:71:7E:45:1B:4A:8F:0E:4C:1B:9B:61:A2:D4:9E:55:C0:13:7B:8"
            "E:5A:0D:21",
            "a=group:BUNDLE 0",
            "a=msid-semantic:WMS *",
            "m=audio 30040 UDP/TLS/RTP/SAVPF 109 9 0 8 101",
            "c=IN IP4 203.0.113.1",
            "a=sendrecv",
            "a=extmap:1 urn:ietf:params:rtp-hdrext:ssrc-audio-level",
            "a=fmtp:109 maxplaybackrate=48000;stereo=1;useinbandfec=1",
            "a=fmtp:101 0-15",
            "a=mid:0",
            "a=rtcp:30041 IN IP4 203.0.113.1",
            "a=rtpmap:109 opus/48000/2",
            "a=rtpmap:9 G722/8000/1",
            "a=rtpmap:0 PCMU/8000",
            "a=rtpmap:8 PCMA/8000",
            "a=rtpmap:101 telephone-event/8000",
            "a=setup:actpass",
            "a=ssrc:1392857003 cname:{3f2b1c4d-5e6f-4a7b-8c9d-0e1f2a3b4c5d}",
        ),
    ),
    Case(
        "ipv6_phone_ipv6_relay",
        relays=[R6(30100)],
        streams=[
            "audio 5004 RTP/AVP IP6 2001:db8:1::10 sendrecv rtcp=5005@2001:db8:1::10",
        ],
        sent=(
            "v=0",
            "o=- 1 1 IN IP6 2001:db8:1::10",
            "s=-",
            "c=IN IP6 2001:db8:1::10",
            "t=0 0",
            "m=audio 5004 RTP/AVP 9 0 101",
            "a=rtpmap:9 G722/8000",
            "a=rtpmap:101 telephone-event/8000",
            "a=rtcp:5005 IN IP6 2001:db8:1::10",
        ),
        expected=(
            "v=0",
            "o=- 1 2 IN IP6 2001:db8:1::10",
            "s=-",
            "c=IN IP6 2001:db8::100",
            "t=0 0",
            "m=audio 30100 RTP/AVP 9 0 101",
            "a=rtpmap:9 G722/8000",
            "a=rtpmap:101 telephone-event/8000",
            "a=rtcp:30101 IN IP6 2001:db8::100",
        ),
    ),
    Case(
        "ipv4_phone_ipv6_relay",
        relays=[R6(30102)],
        streams=[
            "audio 5006 RTP/AVP IP4 192.0.2.12 sendrecv rtcp=5007@192.0.2.12",
        ],
        sent=(
            "v=0",
            "o=- 77 77 IN IP4 192.0.2.12",
            "s=-",
            "c=IN IP4 192.0.2.12",
            "t=0 0",
            "m=audio 5006 RTP/AVP 0",
            "a=rtcp:5007 IN IP4 192.0.2.12",
        ),
        expected=(
            "v=0",
            "o=- 77 78 IN IP4 192.0.2.12",
            "s=-",
            "c=IN IP6 2001:db8::100",
            "t=0 0",
            "m=audio 30102 RTP/AVP 0",
            "a=rtcp:30103 IN IP6 2001:db8::100",
        ),
    ),
    Case(
        "ipv6_media_c_ipv4_relay",
        relays=[R(30104), R(30106)],
        streams=[
            "audio 5008 RTP/AVP IP6 2001:db8:2::20 sendrecv rtcp=5009@2001:db8:2::20 media-c",
            "video 5010 RTP/AVP IP6 2001:db8:2::21 sendrecv media-c",
        ],
        sent=(
            "v=0",
            "o=- 3 3 IN IP6 2001:db8:2::20",
            "s=-",
            "t=0 0",
            "m=audio 5008 RTP/AVP 0",
            "c=IN IP6 2001:db8:2::20",
            "a=rtcp:5009 IN IP6 2001:db8:2::20",
            "m=video 5010 RTP/AVP 96",
            "c=IN IP6 2001:db8:2::21",
            "a=rtpmap:96 H264/90000",
        ),
        expected=(
            "v=0",
            "o=- 3 4 IN IP6 2001:db8:2::20",
            "s=-",
            "t=0 0",
            "m=audio 30104 RTP/AVP 0",
            "c=IN IP4 203.0.113.1",
            "a=rtcp:30105 IN IP4 203.0.113.1",
            "m=video 30106 RTP/AVP 96",
            "c=IN IP4 203.0.113.1",
            "a=rtpmap:96 H264/90000",
        ),
    ),
    Case(
        "hold_sendonly",
        relays=[R(30110)],
        streams=[
            "audio 4000 RTP/AVP IP4 192.0.2.10 sendonly hold",
        ],
        sent=(
            "v=0",
            "o=- 1 2 IN IP4 192.0.2.10",
            "s=-",
            "c=IN IP4 192.0.2.10",
            "t=0 0",
            "m=audio 4000 RTP/AVP 0 101",
            "a=rtpmap:101 telephone-event/8000",
            "a=sendonly",
        ),
        expected=(
            "v=0",
            "o=- 1 3 IN IP4 192.0.2.10",
            "s=-",
            "c=IN IP4 203.0.113.1",
            "t=0 0",
            "m=audio 30110 RTP/AVP 0 101",
            "a=rtpmap:101 telephone-event/8000",
            "a=sendonly",
        ),
    ),
    Case(
        "hold_answer_recvonly",
        relays=[R(30112)],
        streams=[
            "audio 5000 RTP/AVP IP4 192.0.2.11 recvonly",
        ],
        sent=(
            "v=0",
            "o=- 9 10 IN IP4 192.0.2.11",
            "s=-",
            "c=IN IP4 192.0.2.11",
            "t=0 0",
            "m=audio 5000 RTP/AVP 0",
            "a=recvonly",
        ),
        expected=(
            "v=0",
            "o=- 9 11 IN IP4 192.0.2.11",
            "s=-",
            "c=IN IP4 203.0.113.1",
            "t=0 0",
            "m=audio 30112 RTP/AVP 0",
            "a=recvonly",
        ),
    ),
    Case(
        "hold_inactive_session_level",
        relays=[R(30114), R(30116)],
        streams=[
            "audio 5000 RTP/AVP IP4 192.0.2.20 inactive hold",
            "video 5002 RTP/AVP IP4 192.0.2.20 inactive hold",
        ],
        sent=(
            "v=0",
            "o=- 7 9 IN IP4 192.0.2.20",
            "s=-",
            "c=IN IP4 192.0.2.20",
            "t=0 0",
            "a=inactive",
            "m=audio 5000 RTP/AVP 0 8",
            "m=video 5002 RTP/AVP 96",
            "a=rtpmap:96 H264/90000",
        ),
        expected=(
            "v=0",
            "o=- 7 10 IN IP4 192.0.2.20",
            "s=-",
            "c=IN IP4 203.0.113.1",
            "t=0 0",
            "a=inactive",
            "m=audio 30114 RTP/AVP 0 8",
            "m=video 30116 RTP/AVP 96",
            "a=rtpmap:96 H264/90000",
        ),
    ),
    Case(
        "hold_old_style_0000",
        relays=[R(30120)],
        streams=[
            "audio 4000 RTP/AVP IP4 0.0.0.0 sendrecv rtcp=4001@0.0.0.0 hold",
        ],
        sent=(
            "v=0",
            "o=- 3 4 IN IP4 192.0.2.30",
            "s=-",
            "c=IN IP4 0.0.0.0",
            "t=0 0",
            "m=audio 4000 RTP/AVP 0",
            "a=rtcp:4001 IN IP4 0.0.0.0",
        ),
        expected=(
            "v=0",
            "o=- 3 5 IN IP4 192.0.2.30",
            "s=-",
            "c=IN IP4 0.0.0.0",
            "t=0 0",
            "m=audio 30120 RTP/AVP 0",
            "a=rtcp:30121 IN IP4 0.0.0.0",
        ),
    ),
    Case(
        "resume_after_old_style_hold",
        relays=[R(30120)],
        streams=[
            "audio 4000 RTP/AVP IP4 192.0.2.30 sendrecv rtcp=4001@192.0.2.30",
        ],
        sent=(
            "v=0",
            "o=- 3 5 IN IP4 192.0.2.30",
            "s=-",
            "c=IN IP4 192.0.2.30",
            "t=0 0",
            "m=audio 4000 RTP/AVP 0",
            "a=rtcp:4001 IN IP4 192.0.2.30",
        ),
        expected=(
            "v=0",
            "o=- 3 6 IN IP4 192.0.2.30",
            "s=-",
            "c=IN IP4 203.0.113.1",
            "t=0 0",
            "m=audio 30120 RTP/AVP 0",
            "a=rtcp:30121 IN IP4 203.0.113.1",
        ),
    ),
    Case(
        "hold_old_style_one_stream_of_two",
        relays=[R(30122), R(30124)],
        streams=[
            "audio 4000 RTP/AVP IP4 192.0.2.30 sendrecv",
            "video 4002 RTP/AVP IP4 0.0.0.0 sendrecv media-c hold",
        ],
        sent=(
            "v=0",
            "o=- 3 6 IN IP4 192.0.2.30",
            "s=-",
            "c=IN IP4 192.0.2.30",
            "t=0 0",
            "m=audio 4000 RTP/AVP 0",
            "m=video 4002 RTP/AVP 96",
            "c=IN IP4 0.0.0.0",
            "a=rtpmap:96 VP8/90000",
        ),
        expected=(
            "v=0",
            "o=- 3 7 IN IP4 192.0.2.30",
            "s=-",
            "c=IN IP4 203.0.113.1",
            "t=0 0",
            "m=audio 30122 RTP/AVP 0",
            "m=video 30124 RTP/AVP 96",
            "c=IN IP4 0.0.0.0",
            "a=rtpmap:96 VP8/90000",
        ),
    ),
    Case(
        "reinvite_adding_video",
        relays=[R(30130), R(30132)],
        streams=[
            "audio 6000 RTP/AVP IP4 192.0.2.40 sendrecv",
            "video 6002 RTP/AVP IP4 192.0.2.40 sendrecv",
        ],
        sent=(
            "v=0",
            "o=carol 100 101 IN IP4 192.0.2.40",
            "s=-",
            "c=IN IP4 192.0.2.40",
            "t=0 0",
            "m=audio 6000 RTP/AVP 0",
            "a=sendrecv",
            "m=video 6002 RTP/AVP 97",
            "a=rtpmap:97 H264/90000",
            "a=fmtp:97 profile-level-id=42e01f",
            "a=sendrecv",
        ),
        expected=(
            "v=0",
            "o=carol 100 102 IN IP4 192.0.2.40",
            "s=-",
            "c=IN IP4 203.0.113.1",
            "t=0 0",
            "m=audio 30130 RTP/AVP 0",
            "a=sendrecv",
            "m=video 30132 RTP/AVP 97",
            "a=rtpmap:97 H264/90000",
            "a=fmtp:97 profile-level-id=42e01f",
            "a=sendrecv",
        ),
    ),
    Case(
        "disabled_stream_between_live_ones",
        relays=[R(30140), None, R(30142)],
        streams=[
            "audio 7000 RTP/AVP IP4 192.0.2.50 sendrecv",
            "video 0 RTP/AVP IP4 192.0.2.50 sendrecv disabled",
            "video 7004 RTP/AVP IP4 192.0.2.50 sendrecv",
        ],
        sent=(
            "v=0",
            "o=- 55 56 IN IP4 192.0.2.50",
            "s=-",
            "c=IN IP4 192.0.2.50",
            "t=0 0",
            "m=audio 7000 RTP/AVP 0",
            "m=video 0 RTP/AVP 96",
            "a=content:main",
            "m=video 7004 RTP/AVP 96",
            "a=rtpmap:96 H264/90000",
            "a=content:slides",
        ),
        expected=(
            "v=0",
            "o=- 55 57 IN IP4 192.0.2.50",
            "s=-",
            "c=IN IP4 203.0.113.1",
            "t=0 0",
            "m=audio 30140 RTP/AVP 0",
            "m=video 0 RTP/AVP 96",
            "a=content:main",
            "m=video 30142 RTP/AVP 96",
            "a=rtpmap:96 H264/90000",
            "a=content:slides",
        ),
    ),
    Case(
        "session_c_only_relays_on_two_addresses",
        relays=[R(30150), R(30152, ip="203.0.113.2")],
        streams=[
            "audio 8000 RTP/AVP IP4 192.0.2.60 sendrecv",
            "video 8002 RTP/AVP IP4 192.0.2.60 sendrecv",
        ],
        sent=(
            "v=0",
            "o=- 60 60 IN IP4 192.0.2.60",
            "s=-",
            "c=IN IP4 192.0.2.60",
            "t=0 0",
            "m=audio 8000 RTP/AVP 0",
            "m=video 8002 RTP/AVP 96",
            "a=rtpmap:96 VP8/90000",
        ),
        expected=(
            "v=0",
            "o=- 60 61 IN IP4 192.0.2.60",
            "s=-",
            "c=IN IP4 192.0.2.60",
            "t=0 0",
            "m=audio 30150 RTP/AVP 0",
            "c=IN IP4 203.0.113.1",
            "m=video 30152 RTP/AVP 96",
            "c=IN IP4 203.0.113.2",
            "a=rtpmap:96 VP8/90000",
        ),
    ),
    Case(
        "media_c_only",
        relays=[R(30160), R(30162)],
        streams=[
            "audio 8000 RTP/AVP IP4 192.0.2.60 sendrecv media-c",
            "video 8002 RTP/AVP IP4 192.0.2.61 sendrecv media-c",
        ],
        sent=(
            "v=0",
            "o=- 8 8 IN IP4 192.0.2.60",
            "s=-",
            "t=0 0",
            "m=audio 8000 RTP/AVP 0",
            "c=IN IP4 192.0.2.60",
            "m=video 8002 RTP/AVP 96",
            "c=IN IP4 192.0.2.61",
            "a=rtpmap:96 VP8/90000",
        ),
        expected=(
            "v=0",
            "o=- 8 9 IN IP4 192.0.2.60",
            "s=-",
            "t=0 0",
            "m=audio 30160 RTP/AVP 0",
            "c=IN IP4 203.0.113.1",
            "m=video 30162 RTP/AVP 96",
            "c=IN IP4 203.0.113.1",
            "a=rtpmap:96 VP8/90000",
        ),
    ),
    Case(
        "mixed_session_and_media_c",
        relays=[R(30170), R(30172)],
        streams=[
            "audio 8000 RTP/AVP IP4 192.0.2.62 sendrecv",
            "video 8002 RTP/AVP IP4 192.0.2.63 sendrecv media-c",
        ],
        sent=(
            "v=0",
            "o=- 9 9 IN IP4 192.0.2.62",
            "s=-",
            "c=IN IP4 192.0.2.62",
            "t=0 0",
            "m=audio 8000 RTP/AVP 0",
            "m=video 8002 RTP/AVP 96",
            "c=IN IP4 192.0.2.63",
            "a=rtpmap:96 VP8/90000",
        ),
        expected=(
            "v=0",
            "o=- 9 10 IN IP4 192.0.2.62",
            "s=-",
            "c=IN IP4 203.0.113.1",
            "t=0 0",
            "m=audio 30170 RTP/AVP 0",
            "m=video 30172 RTP/AVP 96",
            "c=IN IP4 203.0.113.1",
            "a=rtpmap:96 VP8/90000",
        ),
    ),
    Case(
        "srtp_sdes_crypto",
        relays=[R(30180)],
        streams=[
            "audio 10000 RTP/SAVP IP4 192.0.2.70 sendrecv",
        ],
        sent=(
            "v=0",
            "o=- 1000 1000 IN IP4 192.0.2.70",
            "s=-",
            "c=IN IP4 192.0.2.70",
            "t=0 0",
            "m=audio 10000 RTP/SAVP 0 8 101",
            "a=crypto:1 AES_CM_128_HMAC_SHA1_80 "
            "inline:WVNfX19zZW1jdGwgKCkgewkyMjA7fQp9CnVubGVz|2^20|1:4",
            "a=crypto:2 AES_CM_128_HMAC_SHA1_32 "
            "inline:NzB4d1BINUAvLEw6UzF3WSJ+PSdFcGdUJShpX1Zj|2^20|1:4",
            "a=rtpmap:101 telephone-event/8000",
            "a=fmtp:101 0-16",
            "a=ptime:20",
        ),
        expected=(
            "v=0",
            "o=- 1000 1001 IN IP4 192.0.2.70",
            "s=-",
            "c=IN IP4 203.0.113.1",
            "t=0 0",
            "m=audio 30180 RTP/SAVP 0 8 101",
            "a=crypto:1 AES_CM_128_HMAC_SHA1_80 "
            "inline:WVNfX19zZW1jdGwgKCkgewkyMjA7fQp9CnVubGVz|2^20|1:4",
            "a=crypto:2 AES_CM_128_HMAC_SHA1_32 "
            "inline:NzB4d1BINUAvLEw6UzF3WSJ+PSdFcGdUJShpX1Zj|2^20|1:4",
            "a=rtpmap:101 telephone-event/8000",
            "a=fmtp:101 0-16",
            "a=ptime:20",
        ),
    ),
    Case(
        "t38_reinvite_image_udptl",
        relays=[None, R(30190)],
        streams=[
            "audio 0 RTP/AVP IP4 192.0.2.80 sendrecv disabled",
            "image 4006 udptl IP4 192.0.2.80 sendrecv",
        ],
        sent=(
            "v=0",
            "o=- 1 3 IN IP4 192.0.2.80",
            "s=-",
            "c=IN IP4 192.0.2.80",
            "t=0 0",
            "m=audio 0 RTP/AVP 0",
            "m=image 4006 udptl t38",
            "a=T38FaxVersion:0",
            "a=T38MaxBitRate:14400",
            "a=T38FaxFillBitRemoval:0",
            "a=T38FaxTranscodingMMR:0",
            "a=T38FaxTranscodingJBIG:0",
            "a=T38FaxRateManagement:transferredTCF",
            "a=T38FaxMaxBuffer:262",
            "a=T38FaxMaxDatagram:176",
            "a=T38FaxUdpEC:t38UDPRedundancy",
        ),
        expected=(
            "v=0",
            "o=- 1 4 IN IP4 192.0.2.80",
            "s=-",
            "c=IN IP4 203.0.113.1",
            "t=0 0",
            "m=audio 0 RTP/AVP 0",
            "m=image 30190 udptl t38",
            "a=T38FaxVersion:0",
            "a=T38MaxBitRate:14400",
            "a=T38FaxFillBitRemoval:0",
            "a=T38FaxTranscodingMMR:0",
            "a=T38FaxTranscodingJBIG:0",
            "a=T38FaxRateManagement:transferredTCF",
            "a=T38FaxMaxBuffer:262",
            "a=T38FaxMaxDatagram:176",
            "a=T38FaxUdpEC:t38UDPRedundancy",
        ),
    ),
    Case(
        "text_t140_with_audio",
        relays=[R(30200), R(30202)],
        streams=[
            "audio 4000 RTP/AVP IP4 192.0.2.90 sendrecv",
            "text 4002 RTP/AVP IP4 192.0.2.90 sendrecv",
        ],
        sent=(
            "v=0",
            "o=- 2 2 IN IP4 192.0.2.90",
            "s=-",
            "c=IN IP4 192.0.2.90",
            "t=0 0",
            "m=audio 4000 RTP/AVP 0",
            "m=text 4002 RTP/AVP 100 98",
            "a=rtpmap:98 t140/1000",
            "a=rtpmap:100 red/1000",
            "a=fmtp:100 98/98/98",
        ),
        expected=(
            "v=0",
            "o=- 2 3 IN IP4 192.0.2.90",
            "s=-",
            "c=IN IP4 203.0.113.1",
            "t=0 0",
            "m=audio 30200 RTP/AVP 0",
            "m=text 30202 RTP/AVP 100 98",
            "a=rtpmap:98 t140/1000",
            "a=rtpmap:100 red/1000",
            "a=fmtp:100 98/98/98",
        ),
    ),
    Case(
        "tcp_msrp_passed_through",
        relays=[R(30210), None],
        streams=[
            "audio 4000 RTP/AVP IP4 192.0.2.100 sendrecv",
            "message 2855 TCP/MSRP IP4 atlanta.example.com sendrecv media-c not-relayable",
        ],
        sent=(
            "v=0",
            "o=alice 2890844526 2890844527 IN IP4 atlanta.example.com",
            "s=-",
            "c=IN IP4 192.0.2.100",
            "t=0 0",
            "m=audio 4000 RTP/AVP 0",
            "m=message 2855 TCP/MSRP *",
            "c=IN IP4 atlanta.example.com",
            "a=accept-types:text/plain",
            "a=path:msrp://atlanta.example.com:2855/iau39soe2843z;tcp",
        ),
        expected=(
            "v=0",
            "o=alice 2890844526 2890844528 IN IP4 atlanta.example.com",
            "s=-",
            "c=IN IP4 203.0.113.1",
            "t=0 0",
            "m=audio 30210 RTP/AVP 0",
            "m=message 2855 TCP/MSRP *",
            "c=IN IP4 atlanta.example.com",
            "a=accept-types:text/plain",
            "a=path:msrp://atlanta.example.com:2855/iau39soe2843z;tcp",
        ),
    ),
    Case(
        "tcp_bfcp_shares_session_c",
        relays=[R(30220), R(30222), None],
        streams=[
            "audio 4000 RTP/AVP IP4 192.0.2.110 sendrecv",
            "video 4002 RTP/AVP IP4 192.0.2.110 sendrecv",
            "application 5070 TCP/BFCP IP4 192.0.2.110 sendrecv not-relayable",
        ],
        sent=(
            "v=0",
            "o=- 31 31 IN IP4 192.0.2.110",
            "s=-",
            "c=IN IP4 192.0.2.110",
            "t=0 0",
            "m=audio 4000 RTP/AVP 0",
            "m=video 4002 RTP/AVP 96",
            "i=presentation",
            "a=rtpmap:96 H264/90000",
            "a=content:slides",
            "a=label:12",
            "m=application 5070 TCP/BFCP *",
            "a=setup:passive",
            "a=connection:new",
            "a=floorctrl:s-only",
            "a=confid:4321",
            "a=userid:1234",
            "a=floorid:1 mstrm:12",
        ),
        expected=(
            "v=0",
            "o=- 31 32 IN IP4 192.0.2.110",
            "s=-",
            "c=IN IP4 192.0.2.110",
            "t=0 0",
            "m=audio 30220 RTP/AVP 0",
            "c=IN IP4 203.0.113.1",
            "m=video 30222 RTP/AVP 96",
            "i=presentation",
            "c=IN IP4 203.0.113.1",
            "a=rtpmap:96 H264/90000",
            "a=content:slides",
            "a=label:12",
            "m=application 5070 TCP/BFCP *",
            "a=setup:passive",
            "a=connection:new",
            "a=floorctrl:s-only",
            "a=confid:4321",
            "a=userid:1234",
            "a=floorid:1 mstrm:12",
        ),
    ),
    Case(
        "lf_only_line_endings",
        relays=[R(30230)],
        streams=[
            "audio 12000 RTP/AVP IP4 192.0.2.120 sendrecv",
        ],
        eol="\n",
        sent=(
            "v=0",
            "o=root 1392 1392 IN IP4 192.0.2.120",
            "s=Asterisk PBX",
            "c=IN IP4 192.0.2.120",
            "t=0 0",
            "m=audio 12000 RTP/AVP 0 8 101",
            "a=rtpmap:0 PCMU/8000",
            "a=rtpmap:8 PCMA/8000",
            "a=rtpmap:101 telephone-event/8000",
            "a=fmtp:101 0-16",
            "a=ptime:20",
            "a=maxptime:150",
            "a=sendrecv",
        ),
        expected=(
            "v=0",
            "o=root 1392 1393 IN IP4 192.0.2.120",
            "s=Asterisk PBX",
            "c=IN IP4 203.0.113.1",
            "t=0 0",
            "m=audio 30230 RTP/AVP 0 8 101",
            "a=rtpmap:0 PCMU/8000",
            "a=rtpmap:8 PCMA/8000",
            "a=rtpmap:101 telephone-event/8000",
            "a=fmtp:101 0-16",
            "a=ptime:20",
            "a=maxptime:150",
            "a=sendrecv",
        ),
    ),
    Case(
        "utf8_session_name_no_trailing_newline",
        relays=[R(30240)],
        streams=[
            "audio 4000 RTP/AVP IP4 192.0.2.130 sendrecv mux",
        ],
        end=False,
        sent=(
            "v=0",
            "o=- 4 4 IN IP4 192.0.2.130",
            "s=Café über ☎",
            "i=Sitzung mit Umlauten",
            "c=IN IP4 192.0.2.130",
            "t=0 0",
            "m=audio 4000 RTP/AVP 0",
            "a=rtcp-mux",
        ),
        expected=(
            "v=0",
            "o=- 4 5 IN IP4 192.0.2.130",
            "s=Café über ☎",
            "i=Sitzung mit Umlauten",
            "c=IN IP4 203.0.113.1",
            "t=0 0",
            "m=audio 30240 RTP/AVP 0",
        ),
    ),
    # RFC 4566 port count (layered coding): the relay has one port pair per stream, so
    # its m= line carries that one port without the count (a count would announce relay
    # ports +2/+3 that belong to no stream of this call, perhaps to another call's)
    Case(
        "layered_port_count",
        relays=[R(30250)],
        streams=[
            "video 4000/2 RTP/AVP IP4 192.0.2.140 sendrecv",
        ],
        sent=(
            "v=0",
            "o=- 5 5 IN IP4 192.0.2.140",
            "s=-",
            "c=IN IP4 192.0.2.140",
            "t=0 0",
            "m=video 4000/2 RTP/AVP 96",
            "a=rtpmap:96 H264/90000",
        ),
        expected=(
            "v=0",
            "o=- 5 6 IN IP4 192.0.2.140",
            "s=-",
            "c=IN IP4 203.0.113.1",
            "t=0 0",
            "m=video 30250 RTP/AVP 96",
            "a=rtpmap:96 H264/90000",
        ),
    ),
]


def test_there_are_enough_golden_bodies():
    assert len(CASES) >= 25
    assert len({case.name for case in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=lambda case: case.name)
def test_streams(case):
    for body in (case.body(case.sent), case.body(case.sent).encode()):
        desc = sdp.parse(body)
        assert [summary(s) for s in desc.streams] == case.streams
        assert [s.index for s in desc.streams] == list(range(len(case.streams)))
        assert desc.eol == case.eol


@pytest.mark.parametrize("case", CASES, ids=lambda case: case.name)
def test_rewrite_is_exact(case):
    sent, expected = case.body(case.sent), case.body(case.expected)
    out = sdp.rewrite(sent, case.relays)
    assert isinstance(out, str)
    assert out == expected
    out = sdp.rewrite(sent.encode(), case.relays)
    assert isinstance(out, bytes)
    assert out == expected.encode()


@pytest.mark.parametrize("case", CASES, ids=lambda case: case.name)
def test_rewritten_body_reads_back(case):
    before = sdp.parse(case.body(case.sent))
    after = sdp.parse(case.body(case.expected))
    assert len(after.streams) == len(before.streams)
    assert after.version == before.version + 1
    sent_m = [line for line in case.sent if line.startswith("m=")]
    expected_m = [line for line in case.expected if line.startswith("m=")]
    for old, new, relay, m_before, m_after in zip(before.streams, after.streams, case.relays,
                                                  sent_m, expected_m):
        if relay is None:
            assert m_after == m_before
            if not old.disabled:  # a disabled stream may follow a moved session c=
                assert new.address == old.address
            continue
        assert new.port == relay.port
        assert new.port_count == 1  # the relay has one port pair per stream
        assert new.rtcp_mux == (old.rtcp_mux and relay.rtcp_mux)
        assert not new.ice
        if old.null_address:
            assert new.address == old.address  # held stays held
        else:
            assert (new.family, new.address) == (relay.family, relay.ip)
        if old.rtcp_port is not None:
            assert new.rtcp_port == relay.rtcp


def test_bytes_that_are_not_utf8_pass_through():
    sent = (b"v=0\r\no=- 1 1 IN IP4 192.0.2.1\r\ns=Caf\xe9\r\nc=IN IP4 192.0.2.1\r\nt=0 0\r\n"
            b"m=audio 4000 RTP/AVP 0\r\na=x-vendor:\xff\xfe\x00\r\n")
    assert sdp.rewrite(sent, [R(30000)]) == (
        b"v=0\r\no=- 1 2 IN IP4 192.0.2.1\r\ns=Caf\xe9\r\nc=IN IP4 203.0.113.1\r\nt=0 0\r\n"
        b"m=audio 30000 RTP/AVP 0\r\na=x-vendor:\xff\xfe\x00\r\n")


def test_untouched_body_is_returned_as_is():
    case = next(case for case in CASES if case.name == "t38_reinvite_image_udptl")
    for body in (case.body(case.sent), case.body(case.sent).encode()):
        assert sdp.rewrite(body, [None, None]) == body
