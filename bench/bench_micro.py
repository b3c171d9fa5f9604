"""Micro-benchmarks of the hot pieces, sans-IO (pytest-benchmark; timings go to the report,
only results are asserted):

* packet path: the relay table's forwarding decision for a batch, a tapped packet's
  parse (packet mode), the IPv4/UDP header + checksum of raw egress, and one poll round
  of packet mode over AF_XDP through the worker (sockets faked: its Python per packet);
* protocol codecs: a msgpack control request, a legacy lrkproxy request, an NG message;
* the control path with SDP bodies: scan + rewrite of one body, a whole offer + answer +
  delete through the msgpack codec and the engine, and packing a delete's reply;
* session lookup: by Call-ID among 10,000 sessions, and by relay address (packet mode).

    python -m pytest bench/bench_micro.py --benchmark-columns=mean,ops
"""

from __future__ import annotations

import itertools
import socket
from typing import List, Tuple

import msgpack
import pytest

from bench.ng import audio_sdp, decode_message, encode_message
from fastpath import channel
from fastpath.contract import LegSpec, StreamSpec, unit_id
from fastpath.packet import parse_media
from fastpath.worker.loop import SocketWorker
from fastpath.worker.nexthop import Hop
from fastpath.worker.raw_egress import ipv4_udp_header, udp_checksum
from fastpath.worker.relay_table import RelayTable
from fastpath.worker.xsk import TX_META_LEN
from fastpath.worker.xsk_io import XskEgress, XskReader
from lrk.control import wire
from lrk.control.legacy import LegacyControl
from lrk.control.msgpack_proto import MsgpackControl
from lrk.core import sdp
from lrk.core.engine import Engine, EngineConfig
from lrk.demo.media import rtp_packet
from tests.unit.test_xsk_io import FakeHops, FakeXsk

CALLER = ("198.51.100.10", 4000)
CALLEE = ("198.51.100.70", 5000)
RELAY_A = ("198.51.100.1", 30000)
BATCH = 64


def _table() -> RelayTable:
    table = RelayTable()
    stream = StreamSpec(
        0, LegSpec("A", RELAY_A[0], RELAY_A[1], CALLER, (CALLER[0], CALLER[1] + 1), False, 1),
        LegSpec("B", RELAY_A[0], RELAY_A[1] + 2, CALLEE, (CALLEE[0], CALLEE[1] + 1), False, 1))
    table.install(1, [10, 11, 12, 13], stream)
    return table


def test_micro_forward_batch(benchmark):
    """One batch of 64 RTP packets from the latched caller: all go to the callee."""
    table = _table()
    ep = table.by_fd[10]
    batch = [(rtp_packet(i, 0xABC), CALLER) for i in range(BATCH)]
    src, out = benchmark(table.forward, ep, batch, 1.0)
    assert src is table.by_fd[12] and len(out) == BATCH
    assert all(dest == CALLEE for _data, dest in out)
    benchmark.extra_info["packets_per_call"] = BATCH


def _l3_packet() -> bytes:
    payload = rtp_packet(7, 0xABC)
    src, dst = socket.inet_aton(CALLER[0]), socket.inet_aton(RELAY_A[0])
    return ipv4_udp_header(src, dst, CALLER[1], RELAY_A[1], payload) + payload


def test_micro_parse_tapped_packet(benchmark):
    pkt = _l3_packet()
    media = benchmark(parse_media, pkt)
    assert media is not None
    assert (media[1], media[2], media[3], media[4]) == (*CALLER, *RELAY_A)
    assert media[5] == rtp_packet(7, 0xABC)


def test_micro_raw_egress_header(benchmark):
    payload = rtp_packet(9, 0xABC)
    src, dst = socket.inet_aton(RELAY_A[0]), socket.inet_aton(CALLEE[0])
    header = benchmark(ipv4_udp_header, src, dst, RELAY_A[1], CALLEE[1], payload)
    assert len(header) == 28
    checksum = int.from_bytes(header[26:28], "big")
    assert checksum == udp_checksum(src, dst, RELAY_A[1], CALLEE[1], payload)


def test_micro_msgpack_control_offer(benchmark):
    """Decode + validate + execute + encode one offer (a fresh Call-ID each time)."""
    control = MsgpackControl(Engine(EngineConfig(port_start=10000, port_end=60000,
                                                 quarantine=0)))
    state = {"n": 0}

    def offer() -> dict:
        state["n"] += 1
        n = state["n"]
        data = msgpack.packb({"cookie": f"c{n}", "cmd": "offer", "call_id": f"m{n}",
                              "from_tag": "a", "media": {"ip": CALLER[0], "port": CALLER[1]}})
        reply = msgpack.unpackb(control.handle(data, ("127.0.0.1", 9), float(n)).reply,
                                raw=False)
        control.engine.delete(float(n), f"m{n}")
        return reply

    reply = benchmark(offer)
    assert reply["ok"] is True and reply["relay"]["port"] >= 10000


def test_micro_sdp_scan_and_rewrite(benchmark):
    """The control path's SDP work per offer or answer: read the body once, point its
    one audio stream at the relay (docs/benchmarks.md section 1)."""
    body = audio_sdp(*CALLER)
    relays = [sdp.StreamRelay.of_relay(RELAY_A[0], RELAY_A[1], False)]

    def scan_rewrite() -> str:
        return sdp.scan(body).rewrite(relays)

    out = benchmark(scan_rewrite)
    assert f"c=IN IP4 {RELAY_A[0]}\r\n" in out and f"m=audio {RELAY_A[1]} " in out
    assert CALLER[0] not in out.split("o=", 1)[1].split("\r\n", 1)[1]


def test_micro_msgpack_sdp_call(benchmark):
    """offer + answer + delete with SDP bodies (a fresh Call-ID each time), as the judged
    control-plane figure sends them: codec, SDP, engine, reply packing."""
    control = MsgpackControl(Engine(EngineConfig(port_start=10000, port_end=60000,
                                                 quarantine=0)))
    offer_sdp, answer_sdp = audio_sdp(*CALLER), audio_sdp(*CALLEE)
    state = {"n": 0}

    def call() -> list:
        state["n"] += 1
        n = state["n"]
        requests = [
            {"cookie": f"o{n}", "cmd": "offer", "call_id": f"s{n}", "from_tag": "a",
             "sdp": offer_sdp, "interface": "external"},
            {"cookie": f"a{n}", "cmd": "answer", "call_id": f"s{n}", "from_tag": "a",
             "to_tag": "b", "sdp": answer_sdp},
            {"cookie": f"d{n}", "cmd": "delete", "call_id": f"s{n}"},
        ]
        return [msgpack.unpackb(control.handle(msgpack.packb(r), ("127.0.0.1", 9),
                                               float(n)).reply, raw=False)
                for r in requests]

    offer, answer, delete = benchmark(call)
    assert offer["ok"] and answer["ok"] and delete["ok"], (offer, answer, delete)
    assert f"m=audio {offer['relay']['port']} " in offer["sdp"]
    assert delete["session"]["legs"]["B"]["tag"] == "b"
    assert not control.engine.by_call


def test_micro_reply_packing(benchmark):
    """A delete's reply (the largest of a call: per-stream counters) as the relay packs
    it: msgpack's C packer on CPython, lrk.control.wire's packer on PyPy."""
    control = MsgpackControl(Engine(EngineConfig(port_start=10000, port_end=60000,
                                                 quarantine=0)))
    control.handle(msgpack.packb({"cookie": "o", "cmd": "offer", "call_id": "p",
                                  "from_tag": "a", "sdp": audio_sdp(*CALLER)}), CALLER, 1.0)
    data = control.handle(msgpack.packb({"cookie": "d", "cmd": "delete", "call_id": "p"}),
                          CALLER, 2.0).reply
    reply = msgpack.unpackb(data, raw=False)
    packed = benchmark(wire.packb, reply)
    assert packed == data == msgpack.packb(reply, use_bin_type=True)
    benchmark.extra_info["bytes"] = len(packed)


def test_micro_legacy_ping(benchmark):
    """A new ping each time (a fresh cookie): one cached reply answers only 16 resends."""
    legacy = LegacyControl(Engine(EngineConfig()))
    cookies = itertools.count(4711)

    def ping():
        n = next(cookies)
        return n, legacy.handle(b"%d_1 P" % n, ("127.0.0.1", 9), 1.0)

    n, outcome = benchmark(ping)
    assert outcome.reply == b"%d_1 P PONG" % n


def test_micro_ng_codec(benchmark):
    message = {"command": "offer", "call-id": "c1@host", "from-tag": "a",
               "sdp": audio_sdp(*CALLER), "flags": ["trust-address"],
               "replace": ["origin", "session-connection"], "ICE": "remove"}

    def round_trip():
        return decode_message(encode_message("ck1", message))

    cookie, back = benchmark(round_trip)
    assert cookie == "ck1" and back == message


def test_micro_session_lookup_by_call_id(benchmark):
    engine = Engine(EngineConfig(port_start=2000, port_end=65000, quarantine=0))
    for i in range(10000):
        engine.offer(0.0, f"call-{i}", "a", CALLER)
    session = benchmark(engine.get, "call-7777")
    assert session.call_id == "call-7777" and len(engine.by_call) == 10000


def test_micro_session_lookup_by_relay_address(benchmark):
    """Packet mode's per-packet lookup: (relay ip, port) -> endpoint, 40,000 entries."""
    by_addr = {("198.51.100.1", 20000 + i): i for i in range(40000)}
    key = ("198.51.100.1", 20000 + 31337)
    assert benchmark(by_addr.get, key) == 31337


class _RoundXsk(FakeXsk):
    """A fake AF_XDP socket that hands out `per_round` of its frames per round, cycling
    through them, and whose kick frees what it sends (nothing is kept)."""

    def __init__(self, frames: List[Tuple[int, int]], per_round: int, tx_meta: int = 0) -> None:
        super().__init__(frames=2 * len(frames), ring=len(frames), tx_meta=tx_meta)
        self.frames, self.per_round, self.at, self.left = frames, per_round, 0, 0

    def rx(self, n: int) -> List[Tuple[int, int]]:
        k = min(n, self.left)
        out = [self.frames[(self.at + i) % len(self.frames)] for i in range(k)]
        self.at, self.left = (self.at + k) % len(self.frames), self.left - k
        return out

    def kick(self) -> int:
        n = len(self.queued)
        self.kicks += 1
        self.free.extend(off & ~(self.frame_size - 1) for off, _len in self.queued)
        self.queued = []
        return n

    def release(self, offsets: List[int]) -> None:
        pass


@pytest.mark.parametrize("checksum", ["offload", "worker"])
def test_micro_packet_worker_round(benchmark, checksum):
    """Packet mode over AF_XDP at call rates: one poll round of 25 packets from 25 of 250
    calls (each alone on its endpoint), read, decided, written as frames and sent in one
    kick. Divide by 25 for the Python per packet. `checksum`: UDP checksums left to the
    kernel through TX metadata (the default), or summed by the worker."""
    calls, per_round, relay, callee = 250, 25, "127.0.0.1", ("198.51.100.70", 5000)
    payload = rtp_packet(7, 0xABC)
    mine, theirs = channel.pair()
    worker = SocketWorker(mine, batch=64)
    flows = []
    for i in range(calls):
        socks = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM | socket.SOCK_NONBLOCK)
                 for _ in range(4)]
        for s in socks:
            s.bind((relay, 0))
        ports = [s.getsockname()[1] for s in socks]
        flows.append(((CALLER[0], 4000 + i), ports, [s.detach() for s in socks]))
    xsk = _RoundXsk([(2048 * (calls + i), 0) for i in range(calls)], per_round,
                    TX_META_LEN if checksum == "offload" else 0)
    for i, ((src, sport), ports, _fds) in enumerate(flows):
        frame = (b"\x02" * 12 + b"\x08\x00"
                 + ipv4_udp_header(socket.inet_aton(src), socket.inet_aton(relay), sport,
                                   ports[0], payload) + payload)
        off = xsk.frames[i][0]
        xsk.umem[off:off + len(frame)] = frame
        xsk.frames[i] = (off, len(frame))
    xsk.free = [2048 * i for i in range(calls)]
    reader = XskReader(xsk, 64)  # type: ignore[arg-type]
    worker.readers[xsk.fileno()] = reader  # type: ignore[assignment]
    worker.xsk_readers.append(reader)
    worker.egress = XskEgress({xsk.ifindex: xsk},  # type: ignore[dict-item]
                              FakeHops({socket.inet_aton(callee[0]): Hop(2, b"\x02" * 6,
                                                                         b"\x04" * 6)}))
    for i, ((src, sport), ports, fds) in enumerate(flows):
        stream = StreamSpec(0, LegSpec("A", relay, ports[0], (src, sport)),
                            LegSpec("B", relay, ports[2], (callee[0], callee[1] + 2 * i)))
        worker._handle(channel.InstallSession(unit_id(i + 1, 0), stream,
                                              tuple((relay, p) for p in ports)), fds)

    def one_round() -> None:
        xsk.left = per_round
        worker._ingest(reader, 1.0)
        worker._flush_egress()
        reader.done()

    try:
        benchmark(one_round)
        rounds = worker.table.forwarded_packets // per_round
        assert rounds >= 1 and worker.table.forwarded_packets == rounds * per_round
        assert worker.egress.packets == worker.table.forwarded_packets
        assert worker.egress_fallback == 0 and worker.unknown_flow == 0
        assert xsk.kicks == rounds
        assert xsk.queued == [] and len(xsk.free) == calls  # every frame back, whole
        benchmark.extra_info["packets_per_call"] = per_round
    finally:
        for fd in list(worker.addrs):
            worker._close(fd)
        worker.epoll.close()
        mine.close()
        theirs.close()
