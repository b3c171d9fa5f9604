"""fastpath.kernel.nft against a kernel: libnftables/cffi and the nft binary, root only.

libnftables works in the network namespace its context was created in, so each test runs
its body as a subprocess under ``ip netns exec`` in namespaces it creates (tests/netns/
throwaway.py) and deletes, also on failure, asserting none is left.  The host's ruleset is
never touched.  The parts that need no kernel: tests/unit/test_nft.py.
"""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any, Dict

import pytest

from .throwaway import Namespaces

pytestmark = pytest.mark.netns

CMD_TIMEOUT = 60.0


def sh(*argv: str, check: bool = True) -> str:
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=CMD_TIMEOUT, check=False)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(argv)} failed ({proc.returncode}): {proc.stderr}")
    return proc.stdout


@pytest.fixture
def make_ns():
    spaces = Namespaces("nft")
    try:
        yield spaces.make
    finally:
        spaces.destroy()  # asserts that none of them is left


def run_in(ns: str, script: str, *args: str) -> Dict[str, Any]:
    """Run a Python script in ``ns``; it prints one JSON object as its last line."""
    proc = subprocess.run(
        ["ip", "netns", "exec", ns, sys.executable, "-c", script, *args],
        capture_output=True,
        text=True,
        timeout=CMD_TIMEOUT,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


SCENARIO = r"""
import json, sys, threading
from fastpath.kernel.nft import Nft, NftError
nft = Nft(sys.argv[1])
res = {"backend": nft.backend}
res["apply"] = nft.run(
    "add table inet t1\n"
    "add set inet t1 s { type ipv4_addr . inet_service; counter; }\n"
    "add element inet t1 s { 198.51.100.1 . 30000, 198.51.100.2 . 30002 }\n"
)
res["tables"] = nft.run("list tables")
res["json"] = nft.run_json("list set inet t1 s")
res["json_of_a_change"] = nft.run_json("add element inet t1 s { 198.51.100.3 . 1 }")
def err(text):
    try:
        nft.run(text)
    except NftError as exc:
        return {"msg": str(exc), "nft_error": exc.nft_error, "commands": exc.commands}
res["syntax"] = err("add table inet t2\nadd chain inet t2 c\nadd elemnt inet t2 s { 1 }\n")
res["kernel"] = err("add table inet t3\ndelete element inet t1 s { 198.51.100.9 . 9 }\n")
res["tables_after_errors"] = nft.run("list tables")
big = ", ".join("198.51.%d.%d . %d" % (i // 250, i % 250, 1000 + i) for i in range(20000))
nft.run("add element inet t1 s { %s }\n" % big)
res["big"] = len(nft.run_json("list set inet t1 s")["nftables"][1]["set"]["elem"])
def worker(k):
    for j in range(50):
        nft.run("add element inet t1 s { 198.51.200.%d . %d }\n" % (k, j + 1))
threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
for t in threads: t.start()
for t in threads: t.join(30)
res["threads"] = len(nft.run_json("list set inet t1 s")["nftables"][1]["set"]["elem"])
nft.run("delete table inet t1")
res["tables_at_end"] = nft.run("list tables")
nft.close(); nft.close()
res["closed"] = err("list tables") if nft.backend == "library" else None
print(json.dumps(res))
"""


@pytest.mark.parametrize("backend", ["library", "subprocess"])
def test_nft_applies_lists_and_reports_errors(make_ns, backend):
    res = run_in(make_ns(), SCENARIO, backend)
    assert res["backend"] == backend
    assert res["apply"] == ""
    assert res["tables"] == "table inet t1\n"
    objs = res["json"]["nftables"]
    assert objs[0]["metainfo"]["json_schema_version"] >= 1
    elems = objs[1]["set"]["elem"]
    assert {"val": {"concat": ["198.51.100.1", 30000]}, "counter": {"packets": 0, "bytes": 0}} in [
        e["elem"] for e in elems
    ]
    assert res["json_of_a_change"] == {"nftables": []}

    syntax = res["syntax"]
    assert "syntax error" in syntax["nft_error"]
    assert syntax["commands"] == ["add elemnt inet t2 s { 1 }"]
    assert "offending command (line 3): add elemnt inet t2 s { 1 }" in syntax["msg"]
    kernel_err = res["kernel"]
    assert "No such file or directory" in kernel_err["nft_error"]
    assert kernel_err["commands"] == ["delete element inet t1 s { 198.51.100.9 . 9 }"]
    # a failed transaction applies nothing: neither t2 nor t3 exists
    assert res["tables_after_errors"] == "table inet t1\n"

    assert res["big"] == 3 + 20000
    assert res["threads"] == 3 + 20000 + 4 * 50
    assert res["tables_at_end"] == ""
    if backend == "library":
        assert "closed" in res["closed"]["msg"]


SETNS = r"""
import ctypes, json, os, sys
from fastpath.kernel.nft import Nft
before = Nft("library")
libc = ctypes.CDLL(None, use_errno=True)
fd = os.open("/run/netns/" + sys.argv[1], os.O_RDONLY)
if libc.setns(fd, 0x40000000) != 0:  # CLONE_NEWNET, this thread only
    raise OSError(ctypes.get_errno(), "setns")
after = Nft("library")
print(json.dumps({"before": before.run("list tables"), "after": after.run("list tables")}))
"""


def test_a_context_stays_in_the_namespace_it_was_created_in(make_ns):
    first, second = make_ns(), make_ns()
    sh("ip", "netns", "exec", first, "nft", "add", "table", "inet", "in_first")
    sh("ip", "netns", "exec", second, "nft", "add", "table", "inet", "in_second")
    res = run_in(first, SETNS, second)
    assert res == {"before": "table inet in_first\n", "after": "table inet in_second\n"}
