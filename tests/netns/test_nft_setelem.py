"""The NFT_MSG_GETSETELEM dump against the kernel: same counters as nft's own listing."""

from __future__ import annotations

import json
import sys

import pytest

from bench.netns import run
from fastpath.kernel.kernel_rules import KernelRuleset, LegSpec, SessionSpec, parse_counters
from lrk.demo.media import rtp_packet

from .hosts import endpoint, receive

pytestmark = pytest.mark.netns

READ = """
import json, sys
from fastpath.kernel.nft_setelem import SetElemReader
r = SetElemReader()
out = {}
for name in sys.argv[1:]:
    out[name] = [[ip, port, p, b] for (ip, port), (p, b) in r.counters("lrk", name).items()]
try:
    r.counters("lrk", "no_such_set")
    out["missing"] = "no error"
except Exception as exc:
    out["missing"] = type(exc).__name__
r.close()
print(json.dumps(out))
"""


def test_dump_matches_nft_listing(topo, tmp_path):
    ns = topo.relay.ns
    rules = KernelRuleset(port_start=30000, port_end=30999, relay_ips=[
        topo.relay.ip4, topo.relay_ext.ip4, topo.relay.ip6, topo.relay_ext.ip6])
    v4 = [SessionSpec(LegSpec(topo.relay.ip4, 30000 + 4 * i, topo.caller.ip4, 4000),
                      LegSpec(topo.relay_ext.ip4, 30002 + 4 * i, topo.callee.ip4, 5000 + i))
          for i in range(50)]
    v6 = [SessionSpec(LegSpec(topo.relay.ip6, 30400, topo.caller.ip6, 4000),
                      LegSpec(topo.relay_ext.ip6, 30402, topo.callee.ip6, 5000))]
    text = tmp_path / "rules.nft"
    text.write_text(rules.create() + rules.install_commands(*v4, *v6))
    run("nft", "-f", str(text), ns=ns)
    sockets = []
    try:
        caller = endpoint(topo.caller.ns, topo.caller.ip4, 4000)
        callee = endpoint(topo.callee.ns, topo.callee.ip4, 5007)
        caller6 = endpoint(topo.caller.ns, topo.caller.ip6, 4000)
        callee6 = endpoint(topo.callee.ns, topo.callee.ip6, 5000)
        sockets += [caller, callee, caller6, callee6]
        for seq in range(7):  # session 7's leg A
            caller.sendto(rtp_packet(seq, 7), (topo.relay.ip4, 30028))
        assert len(receive(callee, 7)) == 7  # forwarded, so counted after admission
        for seq in range(3):
            caller6.sendto(rtp_packet(seq, 6), (topo.relay.ip6, 30400))
        assert len(receive(callee6, 3)) == 3
        proc = run("ip", "netns", "exec", ns, sys.executable, "-c", READ, "seen4", "seen6",
                   check=True)
        got = json.loads(proc.stdout)
        assert got["missing"] == "NftDumpError"
        for fam, sessions in ((4, v4), (6, v6)):
            dumped = {(ip, port): (p, b) for ip, port, p, b in got[f"seen{fam}"]}
            listed = parse_counters(json.loads(
                run("nft", "-j", "list", "set", "inet", "lrk", f"seen{fam}", ns=ns).stdout))
            assert dumped == listed
            assert len(dumped) == 4 * len(sessions)
        assert dumped[(topo.relay.ip6, 30400)][0] == 3
        dumped4 = {(ip, port): (p, b) for ip, port, p, b in got["seen4"]}
        assert dumped4[(topo.relay.ip4, 30028)] == (7, 7 * (28 + len(rtp_packet(0, 7))))
        assert sum(p for p, _ in dumped4.values()) == 7
    finally:
        for s in sockets:
            s.close()
        run("nft", "delete", "table", "inet", "lrk", ns=ns, check=False)
