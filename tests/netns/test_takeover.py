"""Calls survive the loss of a node: two relay namespaces share one Redis (started here,
on a unix socket); node 2 stands by for node 1. 50 calls on node 1 (some still in early
dialog, one with a second early dialog of a forked INVITE), node 1 killed (-9), its media
address moved to node 2 (as keepalived would): every call's media flows again through
node 2 within 2 s, counters continue from the stored records, and once the calls are
deleted no Redis key, port or process is left. Then the same with 10 calls in kernel,
xdp, nfqueue and packet modes (node 2's table, or its taps' filter, built for node 1's
media: `standby_media`).

    client ns: br0 198.51.100.10 (callers) .11 (callees)
      |-- veth -- node 1 ns: 198.51.100.21, shared 198.51.100.100 (moves)
      '-- veth -- node 2 ns: 198.51.100.22
"""

from __future__ import annotations

import contextlib
import json
import socket
import statistics
import sys
import time
from typing import Dict, Iterator, List, Tuple

import pytest

from bench.netns import run
from bench.redis_server import RedisServer
from bench.takeover_gap import CALLEE, CALLER, VIP_CONTROL, TwoNodes, audio, start_node
from lrk.client import LrkClient
from lrk.demo.media import rtp_packet
from lrk.demo.relay_process import RelayProcess

from .hosts import endpoint, wait

pytestmark = pytest.mark.netns

CALLS = 50
EARLY = 10  # calls left in early dialog (183 only); the first of them forked
#: how long the calls' media may take to come back through node 2 before the test fails:
#: a bound on the wait, not a speed target (bench/takeover_gap.py measures the gap)
MEDIA_BACK_WITHIN = 15.0


@pytest.fixture
def nodes() -> Iterator[TwoNodes]:
    t = TwoNodes()
    try:
        yield t
    finally:
        t.destroy()


Call = Tuple[socket.socket, socket.socket, tuple, tuple]


@contextlib.contextmanager
def _held() -> Iterator[Tuple[List[RelayProcess], List[socket.socket]]]:
    """A test's relays and sockets: every relay still running is stopped (its control
    directory removed) and every socket closed at the end, whatever happened."""
    relays: List[RelayProcess] = []
    socks: List[socket.socket] = []
    try:
        yield relays, socks
    finally:
        for relay in relays:
            if relay.proc is not None and relay.proc.poll() is None:
                relay.stop()
            if relay._tmp is not None:
                relay._tmp.cleanup()
        for s in socks:
            s.close()


def _two_nodes(nodes: TwoNodes, redis: RedisServer, tmp_path, relays: List[RelayProcess],
               mode: str = "socket") -> Tuple[RelayProcess, RelayProcess]:
    """Node 1 and node 2 (standing by for node 1), started in `mode`."""
    for i in (0, 1):
        relays.append(start_node(nodes, i, redis, str(tmp_path), poll=0.1, mode=mode))
    return relays[0], relays[1]


def _calls(c1: LrkClient, nodes: TwoNodes, n: int, early: int,
           socks: List[socket.socket]) -> Dict[str, Call]:
    """`n` calls on node 1, the first `early` left in early dialog (183 only), call-0
    forked (a second early dialog to the callee's port 7000): per call (caller socket,
    callee socket, relay A addr, relay B addr)."""
    calls: Dict[str, Call] = {}
    for i in range(n):
        cid = f"call-{i}"
        caller = endpoint(nodes.client, CALLER, 4000 + 2 * i, timeout=0.05)
        callee = endpoint(nodes.client, CALLEE, 5000 + 2 * i, timeout=0.05)
        socks += [caller, callee]
        offer = c1.offer(cid, "a", sdp=audio(CALLER, 4000 + 2 * i))
        answer = c1.answer(cid, "a", "b", sdp=audio(CALLEE, 5000 + 2 * i),
                           provisional=i < early)
        to_b = (offer["streams"][0]["ip"], offer["streams"][0]["port"])
        to_a = (answer["streams"][0]["ip"], answer["streams"][0]["port"])
        calls[cid] = (caller, callee, to_a, to_b)
    c1.answer("call-0", "a", "b2", sdp=audio(CALLEE, 7000), provisional=True)
    return calls


def _taken_over(c2: LrkClient, n: int) -> dict:
    """Node 2's stats once it holds node 1's `n` calls, every one adopted."""
    stats = c2.stats()
    assert stats["sessions"] == n
    assert stats["counters"]["takeover.sessions"] == n
    assert stats["counters"]["takeover.refused"] == 0
    return stats


def _move_and_time(nodes: TwoNodes, calls: Dict[str, Call], label: str) -> None:
    """Move node 1's address to node 2 and wait (bounded) for every call's media through
    node 2; the gaps are printed, their figures are the benchmark's."""
    t0 = time.monotonic()
    nodes.move_vip()
    gaps = _media_back(calls, t0)
    print(f"{label}takeover gap: median {statistics.median(gaps.values()):.3f} s, "
          f"worst {max(gaps.values()):.3f} s over {len(gaps)} calls")


@pytest.mark.parametrize("redis_down", [False, True], ids=["redis_up", "redis_down"])
def test_a_standby_takes_over_every_call_when_the_address_moves(nodes, tmp_path,
                                                               redis_down):
    """redis_down: Redis stops before node 1 dies; node 2 takes over from its warm copy
    and writes the calls once Redis is back (a new, empty server)."""
    with RedisServer() as redis:
        with _held() as (relays, socks):
            node1, node2 = _two_nodes(nodes, redis, tmp_path, relays)
            fork_callee = endpoint(nodes.client, CALLEE, 7000)
            socks.append(fork_callee)
            with LrkClient([node1.node]) as c1:
                calls = _calls(c1, nodes, CALLS, EARLY, socks)
                assert c1.query("call-0")["session"]["state"] == "early"
                # media before the failure: each call latches both ways (written to Redis)
                for cid, (caller, callee, to_a, to_b) in calls.items():
                    caller.sendto(rtp_packet(1, 0x100), to_a)
                    assert callee.recvfrom(2048)[0] == rtp_packet(1, 0x100), cid
                    callee.sendto(rtp_packet(1, 0x200), to_b)
                    assert caller.recvfrom(2048)[0] == rtp_packet(1, 0x200), cid
                wait(lambda: c1.query("call-49")["session"]["legs"]["A"]["latched"]
                     is not None)
                before = {cid: c1.query(cid)["session"]["legs"]["A"]["counters"]["in_packets"]
                          for cid in calls}
            assert _stats_at_vip(nodes)["store"]["node"] == "node1"
            with LrkClient([node2.node]) as c2:
                wait(lambda: c2.stats()["store"]["standby_for"] == {"node1": CALLS})
                assert c2.stats()["sessions"] == 0
                udp_before = _udp_sockets(node2)
                if redis_down:
                    redis.stop()
                assert node1.kill() == -9
                wait(lambda: nodes.pids(0) == [])  # its worker saw EOF
                _move_and_time(nodes, calls, "")
                stats = _taken_over(c2, CALLS)
                if redis_down:
                    assert stats["store"]["state"] == "degraded"
                    redis.start()
                    wait(lambda: c2.stats()["store"]["state"] == "up")
                for cid in calls:  # counters continued from node 1's records
                    legs = c2.query(cid)["session"]["legs"]
                    assert legs["A"]["counters"]["in_packets"] > before[cid] - 1 >= 0, cid
                    assert (legs["A"]["relay"]["ip"], legs["A"]["relay"]["port"]) == \
                        calls[cid][2]
                assert c2.query("call-0")["session"]["state"] == "early"
                # the control address moved with the media address (control_extra)
                at_vip = _stats_at_vip(nodes)
                assert (at_vip["store"]["node"], at_vip["sessions"]) == ("node2", CALLS)
                # the forked early dialog is relayed too (its own caller-side port)
                _early_fork_flows(c2, calls, fork_callee)
                keys = redis.keys("lrk:*:session:*")
                assert len(keys) == CALLS and all(k.startswith("lrk:node2:") for k in keys)
                assert _udp_sockets(node2) >= udp_before + 4 * CALLS  # bound while up
                for cid in calls:
                    c2.delete(cid)
                assert c2.stats()["ports"]["in_use"] == 0
                assert redis.keys("lrk:*:session:*") == []
                # every socket of the taken-over calls closed (daemon and worker)
                wait(lambda: _udp_sockets(node2) == udp_before)
            assert node2.stop() == 0, node2.output
            assert "took over 50 call(s) of node node1 (0 refused)" in node2.output
            if redis_down:  # said once, however often the standby's poll found it down
                assert node2.output.count("is down") == 1, node2.output
            assert nodes.pids(1) == []
        assert redis.keys("lrk:*:session:*") == []


KCALLS = 10
KEARLY = 3


@pytest.mark.parametrize("mode", ["kernel", "xdp", "nfqueue", "socket", "packet"])
def test_a_standby_takes_over_per_mode_and_keeps_calls_over_a_restart(nodes, tmp_path, mode):
    """kernel, xdp, nfqueue and packet modes (socket mode too, for the restart): node 2's
    ruleset (packet mode: its taps' filter and drop rules) is built for node 1's address
    and ports too (`standby_media`); 10 calls
    (3 in early dialog, one forked) flow through node 2
    within 2 s of the move, counters continue, a restart of node 2 adopts its table and
    keeps them, and once deleted no nft element, no conntrack flow, no Redis key is left;
    after its stop no table (the taps' `lrkpkt` included) and no XDP program."""
    with RedisServer() as redis:
        with _held() as (relays, socks):
            node1, node2 = _two_nodes(nodes, redis, tmp_path, relays, mode)
            kernel = mode not in ("socket", "packet")  # a table to check
            assert not kernel or _sets(nodes) == {}  # nothing installed on the standby yet
            fork_callee = endpoint(nodes.client, CALLEE, 7000)
            socks.append(fork_callee)
            with LrkClient([node1.node]) as c1:
                calls = _calls(c1, nodes, KCALLS, KEARLY, socks)
                for cid, (caller, callee, to_a, to_b) in calls.items():
                    caller.sendto(rtp_packet(1, 0x100), to_a)
                    assert _recv(callee) == rtp_packet(1, 0x100), cid
                    callee.sendto(rtp_packet(1, 0x200), to_b)
                    assert _recv(caller) == rtp_packet(1, 0x200), cid
                # the kernel plane's poll reports the counts (and latches): stored
                wait(lambda: all(c1.query(cid)["session"]["legs"]["A"]["counters"]
                                 ["in_packets"] >= 1 for cid in calls))
                before = {cid: c1.query(cid)["session"]["legs"]["A"]["counters"]["in_packets"]
                          for cid in calls}
            with LrkClient([node2.node]) as c2:
                wait(lambda: c2.stats()["store"]["standby_for"] == {"node1": KCALLS})
                assert node1.kill() == -9
                wait(lambda: nodes.pids(0) == [])
                _move_and_time(nodes, calls, f"{mode} ")
                _taken_over(c2, KCALLS)
                assert c2.query("call-0")["session"]["state"] == "early"
                if kernel:
                    sets = _sets(nodes)
                    assert any(VIP_ADDR in str(e) for e in sets.get("fwd4", [])), sets
                if mode == "packet":  # node 1's media is dropped after node 2's taps
                    rules = run("nft", "list", "table", "inet", "lrkpkt",
                                ns=nodes.node[1]).stdout
                    assert f"ip daddr {VIP_ADDR} udp dport" in rules, rules
                # counters continued from node 1's records (and count node 2's packets)
                wait(lambda: all(
                    c2.query(cid)["session"]["legs"]["A"]["counters"]["in_packets"]
                    > before[cid] for cid in calls))
                _early_fork_flows(c2, calls, fork_callee)
                keys = redis.keys("lrk:*:session:*")
                assert len(keys) == KCALLS and all(k.startswith("lrk:node2:") for k in keys)
            # node 2 restarts keeping the calls: its table (same layout, node 1's ranges
            # in it) is adopted, the taken-over calls restored and relayed on
            assert node2.stop() == 0, node2.output
            assert "took over 10 call(s) of node node1 (0 refused)" in node2.output
            node2 = start_node(nodes, 1, redis, str(tmp_path), poll=0.1, mode=mode)
            relays.append(node2)
            with LrkClient([node2.node]) as c2:
                assert c2.stats()["sessions"] == KCALLS, node2.read_output()
                out = node2.read_output()
                assert "has another layout" not in out and "not restored" not in out, out
                assert "restored 10 of 10 call(s)" in out, out
                # call-0's A side moved to its promoted fork's port: the others flow on
                _media_back({cid: c for cid, c in calls.items() if cid != "call-0"},
                            time.monotonic())
                for cid in calls:
                    c2.delete(cid)
                assert c2.stats()["ports"]["in_use"] == 0
                assert redis.keys("lrk:*:session:*") == []
                if kernel:  # no element, and no flow of an ended call (by the VIP)
                    assert _sets(nodes) == {}
                    wait(lambda: _flows(nodes, VIP_ADDR) == 0)
            assert node2.stop() == 0, node2.output
            assert nodes.pids(1) == []
            tables = run("nft", "list", "tables", ns=nodes.node[1]).stdout
            assert "lrk" not in tables, tables
            assert _xdp_prog(nodes, 1) == 0
        assert redis.keys("lrk:*:session:*") == []


VIP_ADDR = VIP_CONTROL.split(":")[0]


def _recv(sock: socket.socket, timeout: float = 2.0) -> bytes:
    """One datagram within `timeout` (the pre-failure checks; kernel paths may need the
    neighbour resolved first)."""
    sock.settimeout(timeout)
    try:
        return sock.recvfrom(2048)[0]
    finally:
        sock.settimeout(0.05)


def _sets(nodes: TwoNodes) -> Dict[str, list]:
    """Node 2's lrk table: every set and map of sessions with elements (name -> elements;
    not the table's own markers: its layout and the accounting sysctls' record)."""
    out = run("nft", "-j", "list", "table", "inet", "lrk", ns=nodes.node[1]).stdout
    found: Dict[str, list] = {}
    for item in json.loads(out)["nftables"]:
        body = item.get("set") or item.get("map")
        if body and body.get("elem") and body["name"] not in ("layout", "acct") \
                and not body["name"].startswith("relay_ips"):
            found[body["name"]] = body["elem"]
    return found


def _flows(nodes: TwoNodes, ip: str) -> int:
    """Conntrack flows in node 2's namespace to `ip` (the taken-over calls' address)."""
    out = run("conntrack", "-L", "-d", ip, ns=nodes.node[1], check=False)
    return sum(1 for line in out.stdout.splitlines() if "udp" in line)


def _xdp_prog(nodes: TwoNodes, i: int) -> int:
    """The id of the XDP program on node i+1's e0 (0: none)."""
    info = json.loads(run("ip", "-j", "link", "show", "e0", ns=nodes.node[i]).stdout)[0]
    return int(((info.get("xdp") or {}).get("prog") or {}).get("id", 0))


def _udp_sockets(relay: RelayProcess) -> int:
    """UDP sockets in the relay's namespace (daemon, workers: every media port)."""
    pid = relay.proc.pid  # type: ignore[union-attr]
    count = 0
    for table in ("udp", "udp6"):
        with open(f"/proc/{pid}/net/{table}") as fh:
            count += len(fh.read().splitlines()) - 1
    return count


def _stats_at_vip(nodes: TwoNodes) -> dict:
    """`lrkproxy ctl stats` from the client namespace to the control address on the
    moving address (the SIP proxy's view)."""
    out = run("ip", "netns", "exec", nodes.client, sys.executable, "-m", "lrk.cli", "ctl",
              "--node", f"udp:{VIP_CONTROL}", "--json", "stats")
    return json.loads(out.stdout)


def _media_back(calls, t0: float) -> Dict[str, float]:
    """Send on every call (both ways) every 20 ms until each got through node 2; the
    seconds from the address move to each call's first packet through (its gap)."""
    deadline = t0 + MEDIA_BACK_WITHIN
    gaps: Dict[str, float] = {}
    seq = 10
    while len(gaps) < len(calls) and time.monotonic() < deadline:
        seq += 1
        for cid, (caller, callee, to_a, to_b) in calls.items():
            if cid in gaps:
                continue
            caller.sendto(rtp_packet(seq, 0x100), to_a)
            callee.sendto(rtp_packet(seq, 0x200), to_b)
        time.sleep(0.02)  # the send pace (20 ms, as RTP); bounded by the deadline
        now = time.monotonic()
        for cid, (caller, callee, _a, _b) in calls.items():
            if cid in gaps:
                continue
            if _drained(callee) and _drained(caller):
                gaps[cid] = now - t0
    missing = sorted(set(calls) - set(gaps))
    assert not missing, f"no media through node 2 for {missing[:5]} ({len(missing)} calls)"
    return gaps


def _drained(sock: socket.socket) -> bool:
    """Whether anything arrived on `sock` (everything queued is read)."""
    got = False
    sock.setblocking(False)
    try:
        while True:
            try:
                sock.recv(2048)
                got = True
            except BlockingIOError:
                return got
    finally:
        sock.settimeout(0.05)


def _early_fork_flows(c2: LrkClient, calls, fork_callee: socket.socket) -> None:
    """call-0's second early dialog (To-tag b2): the caller reaches fork_callee through
    the fork's own A port on node 2 now."""
    session = c2.query("call-0")["session"]
    [fork] = session["early_dialogs"]
    assert fork["tag"] == "b2"
    relay = fork["legs"]["A"]["relay"]
    caller = calls["call-0"][0]
    fork_callee.settimeout(2.0)
    caller.sendto(rtp_packet(90, 0x300), (relay["ip"], relay["port"]))
    assert fork_callee.recvfrom(2048)[0] == rtp_packet(90, 0x300)
    # its 200 OK on node 2: the fork wins and is promoted, media flows on its ports
    final = c2.answer("call-0", "a", "b2", sdp=audio(CALLEE, 7000))
    to_a = (final["streams"][0]["ip"], final["streams"][0]["port"])
    assert to_a == (relay["ip"], relay["port"])
    assert c2.query("call-0")["session"]["state"] == "answered"
    caller.sendto(rtp_packet(91, 0x300), to_a)
    assert fork_callee.recvfrom(2048)[0] == rtp_packet(91, 0x300)

