"""Typed errors of the XDP quickpath (no `lrk` import: fastpath stays below lrk)."""

from __future__ import annotations

from fastpath.errors import LrkError


class XdpError(LrkError):
    """The XDP program could not be built, loaded, attached or driven."""

    code = "xdp"


class XdpBuildError(XdpError):
    """clang or the BPF headers are missing, or the program does not compile."""


class XdpAttachError(XdpError):
    """An interface refused the program (names the capability or driver limit)."""
