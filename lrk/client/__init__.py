"""Control client for lrk relays: Kamailio lrkproxy-module semantics for Python SIP apps.

See docs/client.md. The sans-IO pieces (nodes, calltable, request, manage,
sip) are usable on their own; api holds the blocking and asyncio clients. SDP is
read and rewritten by lrk.core.sdp, shared with the relay.
"""

from lrk.client.api import AsyncLrkClient, LrkClient
from lrk.client.calltable import CallTable
from lrk.client.errors import (
    ClientError,
    InvalidArgument,
    NodeAddressError,
    NodeTimeout,
    NoNodeAvailable,
    ProtocolError,
    RelayError,
    SipParseError,
)
from lrk.client.manage import SdpInfo, parse_sdp, plan_manage, sdp_media
from lrk.client.nodes import Node, NodeAddress, NodeSet, parse_node, parse_node_address
from lrk.client.sip import SipMessage, parse_sip

__all__ = [
    "AsyncLrkClient",
    "CallTable",
    "ClientError",
    "InvalidArgument",
    "LrkClient",
    "NoNodeAvailable",
    "Node",
    "NodeAddress",
    "NodeAddressError",
    "NodeSet",
    "NodeTimeout",
    "ProtocolError",
    "RelayError",
    "SdpInfo",
    "SipMessage",
    "SipParseError",
    "parse_node",
    "parse_node_address",
    "parse_sdp",
    "parse_sip",
    "plan_manage",
    "sdp_media",
]
