"""A burst of pipelined control requests: the replies, the batched worker messages and the
media they announce must all line up.

The relay reads control datagrams in bursts and sends the worker messages of a burst as
batches (at most 16 installs, 64 fds, per message) before the burst's replies. Here 40
offers, then 40 answers, then 40 deletes arrive back to back without waiting for replies,
so batches are full and split; every call must then carry media on its own ports, and
every delete must free its ports.
"""

from __future__ import annotations

import socket
import time

import msgpack

from lrk.demo.media import check_rtp, rtp_packet
from tests.control_keys import sign_env

from .conftest import next_ports, port_free

CALLS = 40
SSRC = 0x0B0B0B0B


def _burst(sock: socket.socket, addr, requests) -> dict:
    """Send every request at once, then collect one reply per cookie (bounded wait)."""
    for req in requests:
        sock.sendto(sign_env(msgpack.packb(req)), addr)
    replies: dict = {}
    deadline = time.monotonic() + 10.0
    while len(replies) < len(requests) and time.monotonic() < deadline:
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            data = sock.recv(65535)
        except socket.timeout:
            break
        reply = msgpack.unpackb(data, raw=False)
        replies[reply["cookie"]] = reply
    return replies


def test_pipelined_burst_installs_every_call(start_relay):
    relay = start_relay(ports=next_ports(4 * CALLS + 64))
    addr = ("127.0.0.1", relay.control_port)
    callers = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(CALLS)]
    callees = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(CALLS)]
    ctl = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        for s in callers + callees:
            s.bind(("127.0.0.1", 0))
            s.settimeout(5.0)
        offers = [{"cmd": "offer", "cookie": f"o{i}", "call_id": f"burst-{i}", "from_tag": "a",
                   "media": {"ip": "127.0.0.1", "port": callers[i].getsockname()[1]}}
                  for i in range(CALLS)]
        answers = [{"cmd": "answer", "cookie": f"a{i}", "call_id": f"burst-{i}",
                    "from_tag": "a", "to_tag": "b",
                    "media": {"ip": "127.0.0.1", "port": callees[i].getsockname()[1]}}
                   for i in range(CALLS)]
        got = _burst(ctl, addr, offers)
        assert len(got) == CALLS, sorted(got)
        assert [r for r in got.values() if not r["ok"]] == []
        got = _burst(ctl, addr, answers)
        assert len(got) == CALLS, sorted(got)
        assert [r for r in got.values() if not r["ok"]] == []
        relay_ports = []
        for i in range(CALLS):
            dest = (got[f"a{i}"]["relay"]["ip"], got[f"a{i}"]["relay"]["port"])
            relay_ports.append(dest[1])
            callers[i].sendto(rtp_packet(i, SSRC), dest)
        for i in range(CALLS):
            data, src = callees[i].recvfrom(2048)
            assert check_rtp(data, SSRC) == i  # each call's own packet, on its own ports
        assert len(set(relay_ports)) == CALLS
        deletes = [{"cmd": "delete", "cookie": f"d{i}", "call_id": f"burst-{i}"}
                   for i in range(CALLS)]
        got = _burst(ctl, addr, deletes)
        assert len(got) == CALLS, sorted(got)
        assert [r for r in got.values() if not r["ok"]] == []
        # each delete's reply carries that call's final counters (one packet in on leg A)
        for i in range(CALLS):
            legs = got[f"d{i}"]["session"]["legs"]
            assert legs["A"]["counters"]["in_packets"] == 1, legs
        # and the ports are free again once the worker has closed them
        deadline = time.monotonic() + 5.0
        while not all(port_free("127.0.0.1", p) for p in relay_ports):
            assert time.monotonic() < deadline, "relay ports still bound after delete"
            time.sleep(0.02)
    finally:
        for s in callers + callees + [ctl]:
            s.close()
