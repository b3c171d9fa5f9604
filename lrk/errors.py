"""Typed errors. Each carries a protocol error code and a message a user can act on."""

from __future__ import annotations

from fastpath.errors import LrkError

__all__ = ["AtCapacity", "BadRequest", "ConfigError", "DescriptorsExhausted", "Draining",
           "LrkError", "PortsExhausted", "SdpError", "SessionNotFound"]


class ConfigError(LrkError):
    """A command-line option or config file value is unusable."""

    code = "config"


class BadRequest(LrkError):
    """A control request is missing a field or has one of the wrong type or range."""

    code = "bad_request"


class SdpError(BadRequest):
    """An SDP body has no usable connection address or media port."""


class SessionNotFound(LrkError):
    """No live session matches the Call-ID (or tag) of a request."""

    code = "not_found"


class PortsExhausted(LrkError):
    """Every RTP/RTCP port pair of the configured range is taken or quarantined."""

    code = "ports_exhausted"


class Draining(LrkError):
    """The relay is draining: it keeps its calls but takes no new ones (try another node)."""

    code = "draining"


class AtCapacity(LrkError):
    """The relay holds `max_sessions` calls already (try another node)."""

    code = "capacity"


class DescriptorsExhausted(AtCapacity):
    """The relay has no file descriptor left for a call's sockets (EMFILE, ENFILE): it
    can take no new call until some end or the limit is raised (try another node)."""
