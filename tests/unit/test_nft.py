"""Tests of fastpath.kernel.nft: the libnftables/cffi shell and its nft-binary fallback.

These need no kernel; the tests that apply rules (root only, in namespaces of their own)
are in tests/netns/test_nft_apply.py.
"""

from __future__ import annotations

import json
import shutil

import pytest

from fastpath.kernel import nft as nft_mod
from fastpath.kernel.nft import Nft, NftError, merge_json


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
    assert shutil.which("nft") or shutil.which("nft", path="/usr/sbin:/sbin"), \
        "no nft binary: scripts/install.sh installs the nftables package"
    nft = Nft()
    assert nft.backend == "subprocess"
    assert nft.load_error and "liblrk-no-such-nftables" in nft.load_error
    with pytest.raises(NftError, match="backend='subprocess'"):
        Nft("library")
    monkeypatch.setattr(nft_mod.shutil, "which", lambda *a, **k: None)
    with pytest.raises(NftError, match="install the nftables package"):
        Nft()
