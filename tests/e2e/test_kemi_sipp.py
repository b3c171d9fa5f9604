"""End to end with a SIP tool nobody here wrote: SIPp (Debian's sip-tester) calls SIPp
through Kamailio (lrk-kemi.cfg) with audio and video RTP through lrk.

SIPp 3.6.1 sends RTP from a pcap file (`play_pcap_audio` / `play_pcap_video`, raw
sockets: root) and echoes what it receives (`-rtp_echo`). The test writes two small
deterministic pcaps with dpkt; the caller plays the audio one, the callee echoes it and
plays the video one (one pcap per SIPp call at a time: a second play would cancel the
first). The caller hangs up when the test, having seen lrk count every packet, sends it
an INFO: nothing here waits a fixed time.
"""

from __future__ import annotations

import os
import socket
import subprocess
from pathlib import Path
from typing import List

import dpkt
import pytest

from lrk.client import RelayError
from lrk.demo.media import rtp_packet

from .kemi_fixtures import INTERNAL_IP, SIPP, KemiStack, wait_until
from .kemi_sipua import Msg, unique

pytestmark = pytest.mark.kamailio

SCENARIOS = Path(__file__).resolve().parent / "sipp"
AUDIO_PACKETS, VIDEO_PACKETS = 20, 12


@pytest.fixture
def stack(tmp_path, monkeypatch):
    made = KemiStack(tmp_path)
    monkeypatch.setenv("LRK_KEYS", str(made.keys))
    yield made
    made.close()


def write_pcap(path: Path, count: int, ssrc: int, payload_type: int) -> List[bytes]:
    """`count` RTP packets (to UDP port 6000, all at one time stamp, so SIPp sends them at
    once); returns their payloads."""
    payloads = [rtp_packet(i, ssrc, pt=payload_type) for i in range(count)]
    with open(path, "wb") as fh:
        writer = dpkt.pcap.Writer(fh)
        for data in payloads:
            udp = dpkt.udp.UDP(sport=6000, dport=6000, data=data)
            udp.ulen = len(udp)
            ip = dpkt.ip.IP(src=socket.inet_aton("192.0.2.1"), dst=socket.inet_aton("192.0.2.2"),
                            p=dpkt.ip.IP_PROTO_UDP, data=udp)
            ip.len = len(ip)
            eth = dpkt.ethernet.Ethernet(src=b"\x02\x00\x00\x00\x00\x01",
                                         dst=b"\x02\x00\x00\x00\x00\x02",
                                         type=dpkt.ethernet.ETH_TYPE_IP, data=ip)
            writer.writepkt(bytes(eth), ts=1.0)
    return payloads


def port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.bind((INTERNAL_IP, port))
        except OSError:
            return False
    return True


def udp_bound(port: int) -> bool:
    """Whether some socket is bound to this UDP port on IPv4 (from /proc: no probing bind
    that could race the program about to bind it)."""
    with open("/proc/net/udp") as fh:
        next(fh)
        return any(int(line.split()[1].split(":")[1], 16) == port for line in fh)


def media_ports(count: int) -> List[int]:
    """`count` even ports p with p..p+3 free (SIPp binds p and p + 2)."""
    found: List[int] = []
    start = 20000 + (os.getpid() % 400) * 16
    for port in range(start, start + 4000, 4):
        if all(port_free(p) for p in range(port, port + 4)):
            found.append(port)
            if len(found) == count:
                return found
    raise AssertionError("no free media ports for SIPp")


def sipp(workdir: Path, name: str, *args: str) -> subprocess.Popen:
    out = open(workdir / f"{name}.out", "wb")  # noqa: SIM115 - closed with the process
    try:
        return subprocess.Popen([SIPP, *args, "-nostdin", "-m", "1", "-timeout", "25s",
                                 "-timeout_error", "-trace_err"],
                                cwd=workdir, stdout=out, stderr=subprocess.STDOUT)
    finally:
        out.close()


def stream_counters(session: dict) -> dict:
    """(leg, stream index) -> (in_packets, out_packets)."""
    out = {}
    for leg in ("A", "B"):
        for index, stream in enumerate(session["legs"][leg]["streams"]):
            c = stream["counters"]
            out[(leg, index)] = (c["in_packets"], c["out_packets"])
    return out


def test_sipp_call_through_kemi_with_audio_and_video(stack, tmp_path):
    assert os.path.exists(SIPP), "sipp is missing: run scripts/install.sh (sip-tester)"
    relay = stack.relay()
    kam = stack.kamailio({0: [relay.node]})
    client = stack.client(relay)
    write_pcap(tmp_path / "audio.pcap", AUDIO_PACKETS, 0x5150A0D1, 0)
    write_pcap(tmp_path / "video.pcap", VIDEO_PACKETS, 0x5150F1D0, 96)
    uac_media, uas_media = media_ports(2)
    uac_port, uas_port = (socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(2))
    with uac_port, uas_port:
        uac_port.bind((INTERNAL_IP, 0))
        uas_port.bind((INTERNAL_IP, 0))
        uac_sip, uas_sip = uac_port.getsockname()[1], uas_port.getsockname()[1]
    call_id = "lrk-sipp-1@test"
    uas = sipp(tmp_path, "uas", "-sf", str(SCENARIOS / "uas_av.xml"), "-i", INTERNAL_IP,
               "-p", str(uas_sip), "-mi", INTERNAL_IP, "-mp", str(uas_media), "-rtp_echo")
    procs = [uas]
    try:
        wait_until(lambda: udp_bound(uas_sip) or uas.poll() is not None, 10,
                   "the SIPp callee to listen")
        uac = sipp(tmp_path, "uac", f"{INTERNAL_IP}:{kam.sip_port}",
                   "-sf", str(SCENARIOS / "uac_av.xml"), "-s", "bob",
                   "-key", "uas", f"{INTERNAL_IP}:{uas_sip}", "-i", INTERNAL_IP,
                   "-p", str(uac_sip), "-mi", INTERNAL_IP, "-mp", str(uac_media),
                   "-cid_str", "lrk-sipp-%u@test")
        procs.append(uac)

        def media_counted() -> bool:
            try:
                session = client.query(call_id)["session"]
            except RelayError:
                return False  # not offered yet
            return stream_counters(session) == {
                ("A", 0): (AUDIO_PACKETS, AUDIO_PACKETS),  # caller's audio in, echo out
                ("B", 0): (AUDIO_PACKETS, AUDIO_PACKETS),  # to the callee, its echo back
                ("A", 1): (0, VIDEO_PACKETS),  # the callee's video, out to the caller
                ("B", 1): (VIDEO_PACKETS, 0),
            }

        wait_until(lambda: media_counted() or uac.poll() is not None, 15,
                   "lrk to count the SIPp call's audio and video")
        session = client.query(call_id)["session"]
        assert media_counted(), stream_counters(session)
        for leg in ("A", "B"):  # each leg's SDP was rewritten for both streams
            assert [s["kind"] for s in session["legs"][leg]["streams"]] == ["audio", "video"]
        # the test has seen the media: the caller may hang up
        info = Msg(f"INFO sip:alice@{INTERNAL_IP}:{uac_sip} SIP/2.0", [
            ("Via", f"SIP/2.0/UDP {INTERNAL_IP}:9;branch={unique('z9hG4bK')}"),
            ("Max-Forwards", "70"), ("From", f"<sip:bob@{INTERNAL_IP}>;tag=hangup"),
            ("To", f"<sip:alice@{INTERNAL_IP}>"), ("Call-ID", call_id), ("CSeq", "7 INFO")])
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.sendto(info.encode(), (INTERNAL_IP, uac_sip))
        for name, proc in (("uac", uac), ("uas", uas)):
            code = proc.wait(20)
            assert code == 0, f"sipp {name} exited with {code}: " + \
                (tmp_path / f"{name}.out").read_text(errors="replace")[-3000:]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    # the BYE ended the session on lrk
    assert client.list()["total"] == 0
    with pytest.raises(RelayError):
        client.query(call_id)
    counters = client.stats()["counters"]
    assert counters["media.forwarded.packets"] == 2 * AUDIO_PACKETS + VIDEO_PACKETS
    assert counters["sessions.deleted"] == 1
