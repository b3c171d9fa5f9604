"""fastpath.kernel.kernel_rules in a real kernel (root only): the generated nft text loaded,
updated and removed, then real forwarding caller <-> relay <-> callee through the rules.

Rules are loaded only inside network namespaces the tests create (tests/netns/throwaway.py)
and delete, also on failure, asserting that none is left; the host's ruleset is never
touched.  Code that must run inside a namespace runs as a subprocess under ``ip netns exec``
with a timeout.  "Nothing arrived" is never waited out: the ruleset's drop counter (or the
conntrack statistics) shows that the packet was handled first, then the receiving peer is
told to stop.  The generated text itself: tests/unit/test_kernel_rules.py.
"""

from __future__ import annotations

import json
import select
import shutil
import socket
import subprocess
import sys
import time
from typing import Any, Callable, Dict, List, Optional, Tuple

import pytest

from bench.netns import socket_in
from fastpath.kernel.kernel_rules import (
    KernelRuleset,
    LegSpec,
    SessionSpec,
    conntrack_marks,
    parse_counters,
    parse_drop_counter,
)

from .throwaway import Namespaces

pytestmark = pytest.mark.netns

A4, B4, PA4, PB4 = "198.51.100.1", "198.51.100.65", "198.51.100.10", "198.51.100.70"
A6, B6, PA6, PB6 = "2001:db8:1::1", "2001:db8:2::1", "2001:db8:1::10", "2001:db8:2::70"
CMD_TIMEOUT = 20.0
WAIT = 10.0  # deadline of every poll for something that must happen


def session4(**b_overrides: Any) -> SessionSpec:
    b = dict(relay_ip=B4, relay_port=30002, peer_ip=PB4, peer_port=5000)
    b.update(b_overrides)
    return SessionSpec(LegSpec(A4, 30000, PA4, 4000), LegSpec(**b))


def session6() -> SessionSpec:
    return SessionSpec(LegSpec(A6, 30000, PA6, 4000), LegSpec(B6, 30002, PB6, 5000))


def ruleset(**kw: Any) -> KernelRuleset:
    args: Dict[str, Any] = dict(port_start=30000, port_end=30999, relay_ips=[A4, B4, A6, B6])
    args.update(kw)
    return KernelRuleset(**args)


def sh(*argv: str, check: bool = True, timeout: float = CMD_TIMEOUT) -> str:
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(argv)} failed ({proc.returncode}): {proc.stderr}")
    return proc.stdout


def wait_until(predicate: Callable[[], bool], what: str, timeout: float = WAIT) -> None:
    """Poll an observable until `predicate()` holds; fail at the deadline."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout} s")
        time.sleep(0.02)


@pytest.fixture
def make_ns():
    spaces = Namespaces("kr")
    try:
        yield spaces.make
    finally:
        spaces.destroy()  # asserts that none of them is left


NFT_HELPER = r"""
import json, sys
from fastpath.kernel.nft import Nft, NftError
nft = Nft()
try:
    print(json.dumps({"ok": nft.run(sys.stdin.read())}))
except NftError as exc:
    print(json.dumps({"error": str(exc)}))
"""


def nft_apply(ns: str, text: str) -> Optional[str]:
    """Apply text through fastpath.kernel.nft.Nft inside ``ns``; nft's error, or None."""
    proc = subprocess.run(
        ["ip", "netns", "exec", ns, sys.executable, "-c", NFT_HELPER],
        input=text,
        capture_output=True,
        text=True,
        timeout=CMD_TIMEOUT * 3,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    return result.get("error")


def nft_ok(ns: str, text: str) -> None:
    error = nft_apply(ns, text)
    assert error is None, error


def nft_json(ns: str, *args: str) -> Dict[str, Any]:
    return json.loads(sh("ip", "netns", "exec", ns, "nft", "-j", *args))


def set_keys(ns: str, name: str) -> List[Any]:
    kind = "map" if name.startswith(("fwd", "mark", "out")) else "set"
    doc = nft_json(ns, "list", kind, "inet", "lrk", name)
    body = next(o for o in doc["nftables"] if "set" in o or "map" in o)
    return (body.get("set") or body.get("map")).get("elem", [])


@pytest.mark.parametrize("spec_fn", [session4, session6], ids=["v4", "v6"])
def test_kernel_accepts_ruleset_install_update_remove_destroy(make_ns, spec_fn):
    ns = make_ns()
    rs = ruleset()
    spec = spec_fn()
    fam = spec.family
    nft_ok(ns, rs.create())
    nft_ok(ns, rs.install_commands(spec))
    for kind in ("fwd", "mark", "out", "adm", "seen"):
        assert len(set_keys(ns, f"{kind}{fam}")) == 4, kind
    counters = parse_counters(nft_json(ns, "list", "set", "inet", "lrk", f"seen{fam}"))
    assert counters == {
        (spec.a.relay_ip, 30000): (0, 0),
        (spec.a.relay_ip, 30001): (0, 0),
        (spec.b.relay_ip, 30002): (0, 0),
        (spec.b.relay_ip, 30003): (0, 0),
    }
    assert parse_drop_counter(nft_json(ns, "list", "counters", "table", "inet", "lrk")) == (0, 0)

    moved = SessionSpec(spec.a, LegSpec(spec.b.relay_ip, 30002, spec.b.peer_ip, 5008))
    nft_ok(ns, rs.update_commands(spec, moved))
    fwd = {json.dumps(k): json.dumps(v) for k, v in set_keys(ns, f"fwd{fam}")}
    assert fwd[json.dumps({"concat": [spec.a.relay_ip, 30000]})] == json.dumps(
        {"concat": [spec.b.peer_ip, 5008]}
    )

    # removing with the stale spec fails as a whole and leaves everything in place
    error = nft_apply(ns, rs.remove_commands(spec) + rs.remove_commands(moved))
    assert error is not None and "No such file or directory" in error
    assert len(set_keys(ns, f"seen{fam}")) == 4
    nft_ok(ns, rs.remove_commands(moved))
    for kind in ("fwd", "mark", "out", "adm", "seen"):
        assert set_keys(ns, f"{kind}{fam}") == [], kind
    # a second removal: plain fails, idempotent succeeds
    assert nft_apply(ns, rs.remove_commands(moved)) is not None
    nft_ok(ns, rs.remove_commands(moved, idempotent=True))

    nft_ok(ns, rs.destroy())
    nft_ok(ns, rs.destroy())  # absent table: still fine
    assert sh("ip", "netns", "exec", ns, "nft", "list", "tables") == ""


def test_kernel_create_replaces_a_leftover_table_and_batches_are_atomic(make_ns):
    ns = make_ns()
    rs = ruleset()
    nft_ok(ns, rs.create())
    nft_ok(ns, rs.install_commands(session4()))
    nft_ok(ns, rs.create())  # e.g. after a crash: a fresh, empty table
    assert set_keys(ns, "seen4") == []
    nft_ok(ns, rs.install_commands(session4()))
    specs = [
        SessionSpec(
            LegSpec(A4, 30004 + 4 * i, PA4, 4000 + i), LegSpec(B4, 30006 + 4 * i, PB4, 5000)
        )
        for i in range(200)
    ]
    nft_ok(ns, rs.install_commands(*specs))
    assert len(set_keys(ns, "seen4")) == 4 * 201
    # one batch with a session that clashes with an installed one: nothing of it applies
    new = SessionSpec(LegSpec(A4, 30900, PA4, 4000), LegSpec(B4, 30902, PB4, 5000))
    clash = session4(peer_port=5555)
    error = nft_apply(ns, rs.install_commands(new, clash))
    assert error is not None and "File exists" in error
    assert (A4, 30900) not in parse_counters(nft_json(ns, "list", "set", "inet", "lrk", "seen4"))
    nft_ok(ns, rs.destroy())


def test_kernel_nfqueue_variant_loads_where_nft_queue_exists(make_ns):
    ns = make_ns()
    error = nft_apply(ns, ruleset(queue=3, queue_bypass=True).create())
    if error is not None:
        # a kernel without CONFIG_NFT_QUEUE (like CI's) refuses the rule by name, and the
        # transaction leaves nothing behind
        assert "queue num 3 bypass" in error and "No such file" in error, error
        assert "lrk" not in sh("ip", "netns", "exec", ns, "nft", "list", "tables")
        return
    listing = sh("ip", "netns", "exec", ns, "nft", "list", "chain", "inet", "lrk", "media4")
    assert "queue" in listing and "bypass" in listing


# -- real forwarding: caller <-> relay <-> callee --------------------------------

UDP_PEER = r"""
import json, select, socket, sys, time
cfg = json.loads(sys.argv[1])
fam = socket.AF_INET6 if ":" in cfg["bind"][0] else socket.AF_INET
s = socket.socket(fam, socket.SOCK_DGRAM)
s.bind((cfg["bind"][0], cfg["bind"][1]))
print("ready", flush=True)
for i in range(cfg.get("send", 0)):
    s.sendto(("%s-%d" % (cfg["tag"], i)).encode(), (cfg["to"][0], cfg["to"][1]))
    time.sleep(0.01)
got = []
deadline = time.monotonic() + cfg["wait"]
while len(got) < cfg["expect"]:
    left = deadline - time.monotonic()
    if left <= 0 or not select.select([s], [], [], left)[0]:
        break
    data, src = s.recvfrom(2048)
    if data == b"stop" and cfg.get("echo"):  # from the test: report what came so far
        break
    got.append([data.decode(), src[0], src[1]])
    if cfg.get("echo"):
        s.sendto(b"re:" + data, src)
print(json.dumps(got), flush=True)
"""

Got = List[Tuple[str, str, int]]


def _peer_argv(ns: str, **cfg: Any) -> List[str]:
    return ["ip", "netns", "exec", ns, sys.executable, "-c", UDP_PEER, json.dumps(cfg)]


def _parse_got(out: str) -> Got:
    return [tuple(x) for x in json.loads(out.strip().splitlines()[-1])]  # type: ignore[misc]


def run_peer(ns: str, **cfg: Any) -> Got:
    """Send cfg['send'] datagrams from cfg['bind'] to cfg['to']; the first cfg['expect']
    that came back within cfg['wait'] s (expect=0: send only, wait for nothing)."""
    cfg.setdefault("expect", 0)
    cfg.setdefault("wait", 0)
    proc = subprocess.run(
        _peer_argv(ns, **cfg), capture_output=True, text=True, timeout=cfg["wait"] + 30
    )
    assert proc.returncode == 0, proc.stderr
    return _parse_got(proc.stdout)


class Echo:
    """A UDP echo peer in a namespace, bound before the test sends anything.  It reports
    after `expect` datagrams, or when told to stop (`result(stop=True)`), or at `wait`."""

    def __init__(self, ns: str, bind: Tuple[str, int], expect: int, wait: float = WAIT) -> None:
        self.ns, self.bind = ns, bind
        self.proc = subprocess.Popen(
            _peer_argv(ns, bind=list(bind), expect=expect, wait=wait, echo=True),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.wait = wait
        ready, _, _ = select.select([self.proc.stdout], [], [], 30)
        line = self.proc.stdout.readline() if ready else ""
        if line.strip() != "ready":
            self.proc.kill()
            _, err = self.proc.communicate(timeout=10)
            raise AssertionError(f"echo peer did not start: {line!r} {err}")

    def done(self) -> bool:
        return self.proc.poll() is not None

    def result(self, stop: bool = False) -> Got:
        """What the peer received.  With `stop`, first tell it (from its own namespace) to
        report now: for "nothing arrived" once a counter showed the packet was handled."""
        if stop and not self.done():
            s = socket_in(self.ns, socket.AF_INET6 if ":" in self.bind[0] else socket.AF_INET)
            try:
                s.sendto(b"stop", self.bind)
            finally:
                s.close()
        try:
            out, err = self.proc.communicate(timeout=self.wait + 30)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.communicate(timeout=10)
        assert self.proc.returncode == 0, err
        return _parse_got(out)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.communicate(timeout=10)


@pytest.fixture
def echoes():
    started: List[Echo] = []

    def start(ns: str, bind: Tuple[str, int], expect: int, wait: float = WAIT) -> Echo:
        echo = Echo(ns, bind, expect, wait)
        started.append(echo)
        return echo

    yield start
    for echo in started:
        echo.stop()


TOPOLOGY = {
    4: dict(a=A4, b=B4, caller=PA4, rogue="198.51.100.11", callee=PB4, plen_a=26, plen_b=26),
    6: dict(a=A6, b=B6, caller=PA6, rogue="2001:db8:1::11", callee=PB6, plen_a=64, plen_b=64),
}
HEADER = {4: 20 + 8, 6: 40 + 8}  # the counters count IP packets


def build_topology(make_ns, fam: int) -> Tuple[str, str, str]:
    """caller --veth-- relay --veth-- callee; forwarding on in the relay namespace only."""
    t = TOPOLOGY[fam]
    caller, relay, callee = make_ns(), make_ns(), make_ns()
    # each pair is created inside a test namespace directly: the host never sees it
    veth = ("type", "veth", "peer", "name")
    sh("ip", "-n", caller, "link", "add", "c0", *veth, "r0", "netns", relay)
    sh("ip", "-n", callee, "link", "add", "e0", *veth, "r1", "netns", relay)
    nodad = ["nodad"] if fam == 6 else []
    for ns, dev, addrs, plen in (
        (caller, "c0", [t["caller"], t["rogue"]], t["plen_a"]),
        (relay, "r0", [t["a"]], t["plen_a"]),
        (relay, "r1", [t["b"]], t["plen_b"]),
        (callee, "e0", [t["callee"]], t["plen_b"]),
    ):
        for addr in addrs:
            sh("ip", "-n", ns, "addr", "add", f"{addr}/{plen}", "dev", dev, *nodad)
        sh("ip", "-n", ns, "link", "set", dev, "up")
    key = "net.ipv4.ip_forward" if fam == 4 else "net.ipv6.conf.all.forwarding"
    sh("ip", "netns", "exec", relay, "sysctl", "-q", "-w", f"{key}=1")
    return caller, relay, callee


@pytest.fixture
def conntrack_cli() -> str:
    """The conntrack binary; scripts/install.sh installs it, so its absence is a failure."""
    path = shutil.which("conntrack") or shutil.which("conntrack", path="/usr/sbin:/sbin")
    if path is None:
        pytest.fail("no conntrack CLI (scripts/install.sh installs the conntrack package)")
    return path


def conntrack_count(ns: str, fam: int, mark: int) -> int:
    out = sh("ip", "netns", "exec", ns, "conntrack", "-L", "-f", f"ipv{fam}", "-m", str(mark))
    return len([line for line in out.splitlines() if line.startswith("udp")])


def insert_failed(ns: str) -> int:
    """conntrack -S: flows that clashed at confirm (summed over CPUs)."""
    out = sh("ip", "netns", "exec", ns, "conntrack", "-S")
    return sum(int(word.split("=")[1]) for word in out.split()
               if word.startswith("insert_failed="))


def drops(ns: str, fam: Optional[int] = None) -> Tuple[int, int]:
    """The ruleset's counter of unadmitted new flows (dropped), packets and bytes."""
    return parse_drop_counter(nft_json(ns, "list", "counters", "table", "inet", "lrk"), fam)


@pytest.mark.parametrize("fam", [4, 6], ids=["v4", "v6"])
def test_kernel_forwards_a_natted_caller_drops_strangers_and_counts(
    make_ns, echoes, conntrack_cli, fam
):
    t = TOPOLOGY[fam]
    caller, relay, callee = build_topology(make_ns, fam)
    rs = KernelRuleset(port_start=30000, port_end=30999, relay_ips=[t["a"], t["b"]])
    # the SDP says the caller receives on 4000/4001; its NAT sends from 4444/4445
    spec = SessionSpec(
        LegSpec(t["a"], 30000, t["caller"], 4000), LegSpec(t["b"], 30002, t["callee"], 5000)
    )
    nft_ok(relay, rs.create())
    nft_ok(relay, rs.install_commands(spec))

    n, n_rtcp, n_rogue = 5, 2, 3
    rtp_echo = echoes(callee, (t["callee"], 5000), expect=n)
    rtcp_echo = echoes(callee, (t["callee"], 5001), expect=n_rtcp)
    # a stranger first: every one of its packets is counted as dropped, none reaches the
    # callee (its echo's list below is exactly the caller's packets)
    run_peer(caller, bind=[t["rogue"], 4444], to=[t["a"], 30000], send=n_rogue, tag="rogue")
    wait_until(lambda: drops(relay, fam)[0] >= n_rogue, "the stranger's drops counted")
    got_rtp = run_peer(
        caller, bind=[t["caller"], 4444], to=[t["a"], 30000], send=n, tag="rtp", expect=n,
        wait=WAIT,
    )  # fmt: skip
    got_rtcp = run_peer(
        caller, bind=[t["caller"], 4445], to=[t["a"], 30001], send=n_rtcp, tag="rtcp",
        expect=n_rtcp, wait=WAIT,
    )  # fmt: skip
    # the callee sees relay B's address/port, never the caller's
    assert rtp_echo.result() == [(f"rtp-{i}", t["b"], 30002) for i in range(n)]
    assert rtcp_echo.result() == [(f"rtcp-{i}", t["b"], 30003) for i in range(n_rtcp)]
    # replies reach the caller's real (NATed) port, from relay A
    assert got_rtp == [(f"re:rtp-{i}", t["a"], 30000) for i in range(n)]
    assert got_rtcp == [(f"re:rtcp-{i}", t["a"], 30001) for i in range(n_rtcp)]

    h = HEADER[fam]
    counters = parse_counters(nft_json(relay, "list", "set", "inet", "lrk", f"seen{fam}"))
    size = len("rtp-0")
    rogue_bytes = n_rogue * (h + len("rogue-0"))
    assert counters == {
        # every admitted packet; the strangers' show only in the drop counter
        (t["a"], 30000): (n, n * (h + size)),
        (t["a"], 30001): (n_rtcp, n_rtcp * (h + len("rtcp-0"))),
        # reply direction: conntrack reply-tuple packets count on relay B's port too
        (t["b"], 30002): (n, n * (h + len("re:rtp-0"))),
        (t["b"], 30003): (n_rtcp, n_rtcp * (h + len("re:rtcp-0"))),
    }
    assert drops(relay, fam) == (n_rogue, rogue_bytes)
    assert drops(relay) == (n_rogue, rogue_bytes)

    # removal stops new flows only: the established flow keeps its NAT in conntrack
    assert conntrack_count(relay, fam, 30000) == 1
    nft_ok(relay, rs.remove_commands(spec))
    late = echoes(callee, (t["callee"], 5000), expect=1)
    got = run_peer(
        caller, bind=[t["caller"], 4444], to=[t["a"], 30000], send=1, tag="late", expect=1,
        wait=WAIT,
    )  # fmt: skip
    assert late.result() == [("late-0", t["b"], 30002)] and len(got) == 1
    # ... until its conntrack entries (found by mark) are deleted (-D fails for a mark
    # without flows: the count below is the check)
    for mark in conntrack_marks(spec):
        sh("ip", "netns", "exec", relay, conntrack_cli, "-D", "-f", f"ipv{fam}", "-m",
           str(mark), check=False)
    assert conntrack_count(relay, fam, 30000) == 0
    rtp_again = echoes(callee, (t["callee"], 5000), expect=1)
    run_peer(caller, bind=[t["caller"], 4444], to=[t["a"], 30000], send=1, tag="gone")
    # the packet is dropped as a new, unadmitted flow: counted, then nothing reached the
    # callee (so nothing could come back to the caller either)
    wait_until(lambda: drops(relay, fam)[0] >= n_rogue + 1, "the removed flow's drop counted")
    assert drops(relay, fam)[0] == n_rogue + 1
    assert rtp_again.result(stop=True) == []
    nft_ok(relay, rs.destroy())


CT_DUMP = """
import json
from fastpath.kernel.ctnetlink import ConntrackSocket
ct = ConntrackSocket()
print(json.dumps([f._asdict() for f in ct.flows([(30000, 0xFFFFFFFC)])]))
ct.close()
"""


@pytest.mark.parametrize("fam", [4, 6], ids=["v4", "v6"])
def test_kernel_conntrack_counting_ruleset_forwards_and_conntrack_counts(make_ns, echoes, fam):
    """counters="conntrack": established packets skip the chain, accounting counts them."""
    t = TOPOLOGY[fam]
    caller, relay, callee = build_topology(make_ns, fam)
    sh("ip", "netns", "exec", relay, "sysctl", "-q", "-w", "net.netfilter.nf_conntrack_acct=1",
       "net.netfilter.nf_conntrack_timestamp=1")
    rs = KernelRuleset(port_start=30000, port_end=30999, relay_ips=[t["a"], t["b"]],
                       counters="conntrack")
    spec = SessionSpec(
        LegSpec(t["a"], 30000, t["caller"], 4000), LegSpec(t["b"], 30002, t["callee"], 5000)
    )
    nft_ok(relay, rs.create())
    nft_ok(relay, rs.install_commands(spec))
    n, n_rogue = 5, 3
    rtp_echo = echoes(callee, (t["callee"], 5000), expect=n)
    run_peer(caller, bind=[t["rogue"], 4444], to=[t["a"], 30000], send=n_rogue, tag="rogue")
    wait_until(lambda: drops(relay, fam)[0] >= n_rogue, "the stranger's drops counted")
    got = run_peer(caller, bind=[t["caller"], 4444], to=[t["a"], 30000], send=n, tag="rtp",
                   expect=n, wait=WAIT)
    assert rtp_echo.result() == [(f"rtp-{i}", t["b"], 30002) for i in range(n)]
    assert got == [(f"re:rtp-{i}", t["a"], 30000) for i in range(n)]
    assert drops(relay, fam)[0] == n_rogue  # admission is unchanged
    # our own ctnetlink dump, in the relay namespace, reads the per-direction counters
    proc = subprocess.run(["ip", "netns", "exec", relay, sys.executable, "-c", CT_DUMP],
                          capture_output=True, text=True, timeout=CMD_TIMEOUT, check=False)
    assert proc.returncode == 0, proc.stderr
    (flow,) = json.loads(proc.stdout)
    h = HEADER[fam]
    assert (flow["mark"], flow["src"], flow["sport"]) == (30000, t["caller"], 4444)
    assert (flow["orig_packets"], flow["orig_bytes"]) == (n, n * (h + len("rtp-0")))
    assert (flow["reply_packets"], flow["reply_bytes"]) == (n, n * (h + len("re:rtp-0")))
    assert isinstance(flow["id"], int) and flow["start"] > 0
    nft_ok(relay, rs.destroy())


def test_kernel_natted_caller_after_the_callee_spoke_first_is_dropped_at_confirm(
        make_ns, echoes, conntrack_cli):
    """The documented design limit (fastpath/kernel/kernel_rules.py, docs/fastpath.md): a
    callee-first flow owns the relay B <-> callee conntrack tuple, so the NATed caller's
    own flow clashes with it at conntrack confirm and is dropped (conntrack -S:
    insert_failed) for as long as the callee keeps sending. Should a kernel deliver them
    instead, this fails: the limit (and its documentation) is gone."""
    t = TOPOLOGY[4]
    caller, relay, callee = build_topology(make_ns, 4)
    rs = KernelRuleset(port_start=30000, port_end=30999, relay_ips=[t["a"], t["b"]])
    spec = SessionSpec(
        LegSpec(t["a"], 30000, t["caller"], 4000), LegSpec(t["b"], 30002, t["callee"], 5000)
    )
    nft_ok(relay, rs.create())
    nft_ok(relay, rs.install_commands(spec))
    # the callee's first packets go to the caller's SDP port 4000 (not where its NAT is)
    run_peer(callee, bind=[t["callee"], 5000], to=[t["b"], 30002], send=2, tag="early")
    wait_until(lambda: conntrack_count(relay, 4, 30002) == 1, "the callee-first flow")
    clashes = insert_failed(relay)
    echo = echoes(callee, (t["callee"], 5000), expect=2)
    run_peer(caller, bind=[t["caller"], 4444], to=[t["a"], 30000], send=2, tag="rtp")
    # either both packets reach the callee, or the kernel counted both as dropped at confirm
    wait_until(lambda: echo.done() or insert_failed(relay) >= clashes + 2,
               "the caller's packets delivered or counted as clashes")
    got = echo.result(stop=True)
    assert got == [], f"the callee got {got}: the caller's flow no longer clashes"
    assert insert_failed(relay) >= clashes + 2
