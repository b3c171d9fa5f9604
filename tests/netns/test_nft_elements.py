"""Element text written as an nf_tables netlink batch (fastpath.kernel.nft_elements): the
kernel holds exactly what nft itself would have written (read back through nft's own
listing), IPv4 and IPv6, slotted marks and a fork's elements; a conflicting batch is
refused whole; removals leave nothing."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from .throwaway import Namespaces

pytestmark = pytest.mark.netns

CHECK = r"""
import json
from fastpath.kernel.kernel_rules import KernelRuleset, SessionSpec, elements, parse_table
from fastpath.kernel.nft import Nft, NftError
from fastpath.kernel.nft_elements import ElementWriter

A = ["198.51.100.1", "198.51.100.2", "2001:db8:1::1"]
B = ["198.51.100.65", "198.51.100.66", "2001:db8:2::1"]
out = {}
for counters in ("rules", "conntrack"):
    rs = KernelRuleset(port_start=10000, port_end=65535, relay_ips=A + B, mark_slots=A + B,
                       counters=counters)
    nft, w = Nft(), ElementWriter()
    nft.run(rs.create())
    s1 = SessionSpec(rs.leg(A[1], 10000, "198.51.100.10", 7000, 7005),
                     rs.leg(B[1], 10002, "198.51.100.70", 7002))
    s2 = SessionSpec(rs.leg(A[2], 10000, "2001:db8:1::10", 7000),
                     rs.leg(B[2], 10002, "2001:db8:2::70", 7002))
    f1 = rs.fork(rs.leg(A[0], 10010, "198.51.100.10", 7000),
                 rs.leg(B[1], 10002, "198.51.100.71", 6000))
    w.run(rs.install_commands(s1, s2, f1))
    want = {}
    for s in (s1, s2, f1):
        for k, v in elements(s, rs.seen).items():
            want.setdefault(k, {}).update(v)

    def held():
        got = parse_table(nft.run_json(rs.adopt_query())).elements
        return {k: v for k, v in got.items() if v}

    r = {"installed": held() == {k: v for k, v in want.items() if v}}
    s1b = SessionSpec(s1.a, rs.leg(B[1], 10002, "198.51.100.77", 7002))
    w.run(rs.update_commands(s1, s1b))
    r["updated"] = held()["fwd4"]["198.51.100.2 . 10000"] == "198.51.100.77 . 7002"
    before = held()
    clash = SessionSpec(rs.leg(A[0], 10020, "198.51.100.9", 1),
                        rs.leg(A[1], 10000, "198.51.100.9", 2))
    try:
        w.run(rs.install_commands(clash))  # A[1] 10000 is s1's: refused, nothing applied
        r["clash"] = "accepted"
    except NftError as exc:
        r["clash"] = "refused" if held() == before else "partly applied"
    w.run(rs.remove_commands(s1b, s2, f1))
    r["removed"] = held() == {}
    nft.run(rs.destroy())
    w.close()
    out[counters] = r
print(json.dumps(out))
"""


def test_netlink_elements_are_what_nft_writes():
    spaces = Namespaces("nle")
    try:
        ns = spaces.make()
        root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        env = dict(os.environ, PYTHONPATH=root)
        proc = subprocess.run(["ip", "netns", "exec", ns, sys.executable, "-c", CHECK],
                              capture_output=True, text=True, timeout=60, env=env)
        assert proc.returncode == 0, proc.stderr[-2000:]
        got = json.loads(proc.stdout.strip().splitlines()[-1])
        want = {"installed": True, "updated": True, "clash": "refused", "removed": True}
        assert got == {"rules": want, "conntrack": want}
    finally:
        spaces.destroy()
