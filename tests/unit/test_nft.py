"""Tests of fastpath.kernel.nft: the libnftables/cffi shell and its nft-binary fallback.

libnftables works in the network namespace its context was created in, so
every test that talks to the kernel runs its body as a subprocess under
``ip netns exec`` in a namespace it creates (``lrk-t<pid>-<n>``) and deletes,
also on failure.  The host's ruleset is never touched.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import shutil
import subprocess
import sys
from typing import Any, Dict, List

import pytest

from fastpath.kernel import nft as nft_mod
from fastpath.kernel.nft import Nft, NftError, merge_json

# -- without a kernel ---------------------------------------------------------------


def test_merge_json_joins_several_listings():
    doc1 = {"nftables": [{"metainfo": {}}, {"table": {"name": "a"}}]}
    doc2 = {"nftables": [{"metainfo": {}}, {"set": {"name": "s"}}]}
    merged = merge_json(json.dumps(doc1) + "\n" + json.dumps(doc2) + "\n")
    assert merged == {"nftables": doc1["nftables"] + doc2["nftables"]}
    assert merge_json("") == {"nftables": []}
    assert merge_json(" \n") == {"nftables": []}


@pytest.mark.parametrize("bad", ["table inet lrk", '{"tables": []}', "[1]"])
def test_merge_json_refuses_non_nft_json(bad):
    with pytest.raises(NftError):
        merge_json(bad)


def test_error_quotes_the_offending_lines():
    text = "add table inet t\nadd chain inet t c\nadd elemnt x\n"
    nft_error = (
        "/proc/self/fd/7:3:13-13: Error: syntax error, unexpected newline\nadd elemnt x\n    ^\n"
    )
    exc = nft_mod._error(nft_error, text, "libnftables")
    assert isinstance(exc, NftError) and exc.code == "nft"
    assert exc.commands == ["add elemnt x"]
    assert exc.nft_error == nft_error
    msg = str(exc)
    assert "line 3: Error: syntax error" in msg
    assert "offending command (line 3): add elemnt x" in msg
    assert "/proc/self" not in msg
    assert "3-line transaction, nothing applied" in msg
    # no location: nft's text only, no guessed line
    exc = nft_mod._error("netlink: Error: Could not process rule\n", text, "nft -f")
    assert exc.commands == [] and "offending" not in str(exc)


def test_unknown_backend_is_refused():
    with pytest.raises(NftError, match="unknown nft backend"):
        Nft("netlink")


def test_without_the_library_it_falls_back_to_the_binary(monkeypatch):
    monkeypatch.setattr(nft_mod, "LIBNFTABLES", "liblrk-no-such-nftables.so.0")
    monkeypatch.setattr(nft_mod, "_lib", None)
    if shutil.which("nft") or shutil.which("nft", path="/usr/sbin:/sbin"):
        nft = Nft()
        assert nft.backend == "subprocess"
        assert nft.load_error and "liblrk-no-such-nftables" in nft.load_error
    with pytest.raises(NftError, match="backend='subprocess'"):
        Nft("library")
    monkeypatch.setattr(nft_mod.shutil, "which", lambda *a, **k: None)
    with pytest.raises(NftError, match="install the nftables package"):
        Nft()


# -- in a throwaway namespace --------------------------------------------------------

CMD_TIMEOUT = 60.0
_IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0
_TOOLS = all(shutil.which(t) or shutil.which(t, path="/usr/sbin:/sbin") for t in ("ip", "nft"))
kernel = pytest.mark.skipif(
    not (_IS_ROOT and _TOOLS and sys.platform.startswith("linux")),
    reason="needs root, Linux, ip and nft (runs nft in a throwaway network namespace)",
)
_ns_seq = itertools.count(1000)  # apart from test_kernel_rules' numbers in the same process


def sh(*argv: str, check: bool = True) -> str:
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=CMD_TIMEOUT, check=False)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(argv)} failed ({proc.returncode}): {proc.stderr}")
    return proc.stdout


@pytest.fixture(scope="module", autouse=True)
def _remove_stale_namespaces():
    """Delete lrk-t<pid>-<n> namespaces whose creating test process is gone."""
    if _IS_ROOT and _TOOLS:
        for line in sh("ip", "netns", "list").splitlines():
            name = line.split()[0] if line.strip() else ""
            m = re.match(r"^lrk-t(\d+)-\d+$", name)
            if m and not os.path.exists(f"/proc/{m.group(1)}"):
                sh("ip", "netns", "del", name, check=False)
    yield


@pytest.fixture
def make_ns():
    made: List[str] = []

    def make() -> str:
        name = f"lrk-t{os.getpid()}-{next(_ns_seq)}"
        sh("ip", "netns", "add", name)
        made.append(name)
        return name

    yield make
    for name in reversed(made):
        sh("ip", "netns", "del", name, check=False)


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


@kernel
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


@kernel
def test_a_context_stays_in_the_namespace_it_was_created_in(make_ns):
    first, second = make_ns(), make_ns()
    sh("ip", "netns", "exec", first, "nft", "add", "table", "inet", "in_first")
    sh("ip", "netns", "exec", second, "nft", "add", "table", "inet", "in_second")
    res = run_in(first, SETNS, second)
    assert res == {"before": "table inet in_first\n", "after": "table inet in_second\n"}
