"""Typed errors of the client library, so callers can tell bad input from dead relays."""

from __future__ import annotations

from typing import Any, Dict, Optional

from lrk.errors import LrkError


class ClientError(LrkError):
    """Base of every error the control client raises on purpose."""

    code = "client"


class InvalidArgument(ClientError, ValueError):
    """A constructor or method argument is unusable; the message names it."""

    code = "invalid_argument"


class NodeAddressError(InvalidArgument):
    """A relay node string is not `udp:HOST:PORT`, `udp6:[HOST]:PORT` or `unix:PATH`."""

    code = "bad_node_address"

    def __init__(self, address: str, reason: str) -> None:
        self.address = address
        self.reason = reason
        super().__init__(
            f"bad relay node address {address!r}: {reason} "
            "(expected udp:HOST:PORT, udp6:[HOST]:PORT or unix:PATH, optionally =WEIGHT)"
        )


class NoNodeAvailable(ClientError):
    """Every node of the set is disabled or did not answer; nothing can be sent."""

    code = "no_node"

    def __init__(self, message: str, set_id: Optional[int] = None,
                 retry_at: Optional[float] = None) -> None:
        self.set_id = set_id
        self.retry_at = retry_at  # clock time when the first node becomes selectable again
        super().__init__(message)


class NodeTimeout(ClientError):
    """A request bound to one node (a known call, or an explicit node) got no answer."""

    code = "timeout"

    def __init__(self, node: str, tries: int, timeout: float) -> None:
        self.node = node
        self.tries = tries
        self.timeout = timeout
        super().__init__(
            f"relay node {node} did not answer {tries} tries of {timeout:g} s each; "
            "it is disabled for the disable period (check that the relay runs and that "
            "this host is in its control_allow list)"
        )


class RelayError(ClientError):
    """The relay answered `ok: false`; `code` is the protocol error code."""

    def __init__(self, code: str, message: str, node: Optional[str] = None,
                 reply: Optional[Dict[str, Any]] = None) -> None:
        self.code = code
        self.message = message
        self.node = node
        self.reply = reply if reply is not None else {}
        where = f" from {node}" if node else ""
        super().__init__(f"relay error{where}: {code}: {message}")


class ProtocolError(ClientError):
    """The relay answered something that does not follow docs/protocol.md."""

    code = "protocol"


class SipParseError(ClientError, ValueError):
    """A SIP message or SDP body could not be parsed; the message says where."""

    code = "sip_parse"
