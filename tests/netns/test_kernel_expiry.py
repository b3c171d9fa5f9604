"""Kernel mode's silence expiry with sparse periodic reads: each conntrack flow's remaining
timeout dates its last packet, so a call ends at its last packet + timeout (to within a
second and kernel_poll), while the plane's own timer reads the kernel only every ~15 s and
a call whose media keeps flowing stays up."""

from __future__ import annotations

import threading
import time

import pytest

from bench.netns import run
from lrk.client import LrkClient
from lrk.demo.media import rtp_packet
from lrk.demo.relay_process import RelayProcess

from .hosts import endpoint, receive, wait

pytestmark = pytest.mark.netns

KERNEL_POLL = 2.0  # the default
TIMEOUT = 4  # the calls' silence timeout (s)
SLACK = 0.5  # timer, dump and observation delays


def _flow_to(ns: str, port: int) -> bool:
    """Whether conntrack in `ns` holds a UDP flow towards relay port `port`."""
    out = run("conntrack", "-L", "-p", "udp", "--orig-port-dst", str(port), ns=ns,
              check=False).stdout
    return any(line.startswith("udp") for line in out.splitlines())


@pytest.mark.parametrize("counters", ["conntrack", "none"])
def test_silence_expiry_is_exact_with_sparse_periodic_reads(topo, tmp_path, counters):
    """Also with kernel_counters = none (accounting left off): the timeouts alone date media."""
    caller_ip, callee_ip = topo.caller.ip4, topo.callee.ip4
    ns = topo.relay.ns
    run("sysctl", "-qw", "net.netfilter.nf_conntrack_acct=0",
        "net.netfilter.nf_conntrack_timestamp=0", ns=ns)
    cfg = tmp_path / "kernel.toml"
    cfg.write_text(f'kernel_poll = {KERNEL_POLL}\nquarantine = 0\nlog_level = "info"\n'
                   f'kernel_counters = "{counters}"\n')
    relay = RelayProcess(ports="30000-30099", netns=ns, extra=[
        "--mode", "kernel", "--internal-ip", topo.relay.ip4,
        "--external-ip", topo.relay_ext.ip4, "--config", str(cfg)]).start()
    sockets = []
    stop = threading.Event()
    try:
        with LrkClient([relay.node]) as client:
            # "quiet": media both ways (an assured flow: 120 s stream timeout) for 3 s, then
            # silence; "talk": one way (unreplied: 30 s timeout) for over 20 s
            caller_q = endpoint(topo.caller.ns, caller_ip, 4000)
            callee_q = endpoint(topo.callee.ns, callee_ip, 5000)
            caller_t = endpoint(topo.caller.ns, caller_ip, 4002)
            callee_t = endpoint(topo.callee.ns, callee_ip, 5002)
            sockets += [caller_q, callee_q, caller_t, callee_t]
            ends = {}
            for name, cport, bport in (("quiet", 4000, 5000), ("talk", 4002, 5002)):
                offer = client.offer(name, "a", (caller_ip, cport), interface="external",
                                     timeout=TIMEOUT)
                answer = client.answer(name, "a", "b", (callee_ip, bport),
                                       interface="internal")
                ends[name] = ((answer["relay"]["ip"], answer["relay"]["port"]),
                              (offer["relay"]["ip"], offer["relay"]["port"]))
            (q_to_a, q_to_b), (t_to_a, _t_to_b) = ends["quiet"], ends["talk"]
            sent = [0]

            def talk() -> None:  # 50 packets a second until told to stop
                while not stop.is_set():
                    caller_t.sendto(rtp_packet(sent[0] & 0xFFFF, 0x7A), t_to_a)
                    sent[0] += 1
                    time.sleep(0.02)

            talker = threading.Thread(target=talk, daemon=True)
            talker.start()
            talk_start = time.monotonic()
            # the caller's packet first (received), so the flow is the caller's: a callee's
            # first packet would start a flow of its own towards leg B's port
            caller_q.sendto(rtp_packet(0, 0x51), q_to_a)
            assert receive(callee_q, 1), "the quiet call relays nothing"
            until = time.monotonic() + 3.0
            seq = 1
            while True:
                last_packet = time.monotonic()
                caller_q.sendto(rtp_packet(seq, 0x51), q_to_a)
                callee_q.sendto(rtp_packet(seq, 0x52), q_to_b)
                seq += 1
                if last_packet >= until:
                    break
                time.sleep(0.02)
            assert _flow_to(ns, q_to_a[1]) and _flow_to(ns, t_to_a[1]), \
                (run("conntrack", "-L", ns=ns, check=False).stdout, relay.read_output())

            # the quiet call ends (its flow is flushed) at last packet + timeout: polled
            # without asking the relay anything (a query would read the kernel itself)
            deadline = last_packet + TIMEOUT + KERNEL_POLL + SLACK + 3.0
            ended = None
            while time.monotonic() < deadline:
                now = time.monotonic()
                if not _flow_to(ns, q_to_a[1]):
                    ended = now
                    break
                time.sleep(0.02)
            assert ended is not None, "the quiet call did not end"
            late = ended - (last_packet + TIMEOUT)
            print(f"quiet call ended {late:.3f} s after last packet + timeout")
            # not before its timeout (how soon after is the poll's: the wait is bounded)
            assert late >= -0.05, late

            # the talking call outlives a periodic read (every 15 s) and several timeouts
            wait(lambda: time.monotonic() - talk_start >= 20.0, timeout=25)
            assert _flow_to(ns, t_to_a[1]), "the talking call was ended"
            stop.set()
            talker.join(5)
            # every packet counted (a query shows counters at most kernel_poll old); none
            # counted without accounting
            counted = sent[0] if counters == "conntrack" else 0
            wait(lambda: client.query("talk")["session"]["legs"]["A"]["counters"]
                 ["in_packets"] == counted, timeout=KERNEL_POLL + 3)
            stats = client.stats()["counters"]
            assert stats["sessions.expired.silence"] == 1
            assert [s["call_id"] for s in client.list()["sessions"]] == ["talk"]
        assert relay.stop() == 0
        log = relay.output
        assert "counters read every 15 s, and at most 2 s old" in log, log[-2000:]
    finally:
        stop.set()
        relay.stop()
        for s in sockets:
            s.close()
