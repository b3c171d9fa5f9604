"""Relay node addresses, their enabled/disabled state, and node selection.

Sans-IO: nothing here opens a socket or reads a clock; every time-dependent
method takes `now` (the client's clock), so selection and disabling are tested
with a fake clock.
"""

from __future__ import annotations

import ipaddress
from typing import Collection, Dict, Iterable, List, Optional, Sequence, Union

from lrk.client.errors import InvalidArgument, NodeAddressError, NoNodeAvailable

ALGORITHMS = ("linear", "round-robin")


class NodeAddress:
    """A parsed node string; `str()` gives the canonical form back."""

    __slots__ = ("scheme", "host", "port", "path")

    def __init__(self, scheme: str, host: Optional[str] = None, port: Optional[int] = None,
                 path: Optional[str] = None) -> None:
        self.scheme = scheme  # "udp", "udp6" or "unix"
        self.host = host
        self.port = port
        self.path = path

    def __str__(self) -> str:
        if self.scheme == "unix":
            return f"unix:{self.path}"
        if self.scheme == "udp6":
            return f"udp6:[{self.host}]:{self.port}"
        return f"udp:{self.host}:{self.port}"

    def __repr__(self) -> str:
        return f"NodeAddress({str(self)!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, NodeAddress) and str(self) == str(other)

    def __hash__(self) -> int:
        return hash(str(self))


def _parse_port(text: str, original: str) -> int:
    if not text.isdigit():
        raise NodeAddressError(original, f"port {text!r} is not a number")
    port = int(text)
    if not 1 <= port <= 65535:
        raise NodeAddressError(original, f"port {port} is not in 1-65535")
    return port


def parse_node_address(text: str) -> NodeAddress:
    """Parse `udp:HOST:PORT`, `udp6:[HOST]:PORT` or `unix:PATH` (no weight suffix)."""
    if not isinstance(text, str):
        raise NodeAddressError(repr(text), "not a string")
    scheme, sep, rest = text.strip().partition(":")
    scheme = scheme.lower()
    if not sep:
        raise NodeAddressError(text, "no scheme")
    if scheme == "unix":
        if not rest:
            raise NodeAddressError(text, "empty socket path")
        if "\0" in rest:
            raise NodeAddressError(text, "NUL byte in socket path")
        return NodeAddress("unix", path=rest)
    if scheme == "udp":
        host, sep, port = rest.rpartition(":")
        if not sep or not host:
            raise NodeAddressError(text, "missing host or port")
        if ":" in host or host.startswith("["):
            raise NodeAddressError(text, "IPv6 addresses need the udp6:[HOST]:PORT form")
        return NodeAddress("udp", host=host, port=_parse_port(port, text))
    if scheme == "udp6":
        if not rest.startswith("[") or "]:" not in rest:
            raise NodeAddressError(text, "udp6 needs a bracketed address: udp6:[HOST]:PORT")
        host, _, port = rest[1:].partition("]:")
        try:
            ipaddress.IPv6Address(host.split("%", 1)[0])
        except ValueError:
            raise NodeAddressError(text, f"{host!r} is not an IPv6 address") from None
        return NodeAddress("udp6", host=host, port=_parse_port(port, text))
    raise NodeAddressError(text, f"unknown scheme {scheme!r}")


class Node:
    """One relay node: an address, a weight, and whether it may be selected now.

    `enabled` is the administrative switch; `disabled_until` is set when the node
    failed to answer, so it is skipped (not re-pinged) until that clock time.
    """

    __slots__ = ("address", "weight", "enabled", "disabled_until", "_current")

    def __init__(self, address: Union[str, NodeAddress], weight: int = 1,
                 enabled: bool = True, disabled_until: float = 0.0) -> None:
        self.address = (address if isinstance(address, NodeAddress)
                        else parse_node_address(address))
        if isinstance(weight, bool) or not isinstance(weight, int) or weight < 1:
            raise NodeAddressError(str(self.address), f"weight {weight!r} is not an integer >= 1")
        self.weight = weight
        self.enabled = enabled
        self.disabled_until = disabled_until
        self._current = 0  # smooth weighted round-robin state

    def __str__(self) -> str:
        return str(self.address)

    def __repr__(self) -> str:
        return (f"Node({str(self.address)!r}, weight={self.weight}, enabled={self.enabled}, "
                f"disabled_until={self.disabled_until})")

    def is_available(self, now: float) -> bool:
        """Whether the node may be sent a request at clock time `now`."""
        return self.enabled and now >= self.disabled_until

    def disable(self, now: float, period: float) -> None:
        """Skip this node until `now + period` (it failed all tries of a request)."""
        self.disabled_until = now + period

    def mark_alive(self) -> None:
        """The node answered: clear any disable period."""
        self.disabled_until = 0.0


def parse_node(spec: Union[str, Node]) -> Node:
    """Build a Node from `ADDRESS` or `ADDRESS=WEIGHT` (like Kamailio's rtpproxy sockets)."""
    if isinstance(spec, Node):
        return spec
    if not isinstance(spec, str):
        raise NodeAddressError(repr(spec), "not a string")
    text = spec.strip()
    weight = 1
    head, sep, tail = text.rpartition("=")
    if sep and tail.isdigit():
        text, weight = head, int(tail)
        if weight < 1:
            raise NodeAddressError(spec, f"weight {weight} is not >= 1")
    return Node(parse_node_address(text), weight=weight)


class NodeSet:
    """The nodes of one set (like an lrkproxy set) and the selection algorithm over them."""

    def __init__(self, set_id: int, nodes: Iterable[Union[str, Node]],
                 algorithm: str = "linear") -> None:
        if algorithm not in ALGORITHMS:
            raise InvalidArgument(
                f"unknown selection algorithm {algorithm!r}; use one of {', '.join(ALGORITHMS)}")
        self.set_id = set_id
        self.algorithm = algorithm
        self.nodes: List[Node] = [parse_node(n) for n in nodes]
        if not self.nodes:
            raise InvalidArgument(f"node set {set_id} has no nodes")
        seen = set()
        for node in self.nodes:
            key = str(node)
            if key in seen:
                raise InvalidArgument(f"node {key} is listed twice in set {set_id}")
            seen.add(key)

    def __repr__(self) -> str:
        return f"NodeSet({self.set_id}, {[str(n) for n in self.nodes]}, {self.algorithm!r})"

    def find(self, address: Union[str, NodeAddress]) -> Optional[Node]:
        """The configured node with that address, if any."""
        key = str(address if isinstance(address, NodeAddress) else parse_node_address(address))
        for node in self.nodes:
            if str(node) == key:
                return node
        return None

    def select(self, now: float, exclude: Collection[Node] = ()) -> Optional[Node]:
        """The next node to use, skipping disabled and excluded ones; None if none is left."""
        candidates = [n for n in self.nodes if n.is_available(now) and n not in exclude]
        if not candidates:
            return None
        if self.algorithm == "linear":
            return candidates[0]
        return _smooth_weighted(candidates)

    def select_or_raise(self, now: float, exclude: Collection[Node] = ()) -> Node:
        """Like select(), but raise NoNodeAvailable saying when a node comes back."""
        node = self.select(now, exclude)
        if node is None:
            raise self.unavailable(now, exclude)
        return node

    def unavailable(self, now: float, exclude: Collection[Node] = ()) -> NoNodeAvailable:
        """The NoNodeAvailable error describing this set's state at `now`."""
        parts = []
        if exclude:
            parts.append("no answer from " + ", ".join(str(n) for n in exclude))
        disabled = [n for n in self.nodes if n.enabled and n.disabled_until > now]
        retry_at: Optional[float] = None
        if disabled:
            first = min(disabled, key=lambda n: n.disabled_until)
            retry_at = first.disabled_until
            parts.append(f"first node back: {first} in {retry_at - now:.1f} s")
        off = [n for n in self.nodes if not n.enabled]
        if off:
            parts.append("administratively disabled: " + ", ".join(str(n) for n in off))
        detail = "; ".join(parts) if parts else "no node left to try"
        return NoNodeAvailable(f"no relay node available in set {self.set_id}: {detail}",
                               set_id=self.set_id, retry_at=retry_at)


def _smooth_weighted(candidates: Sequence[Node]) -> Node:
    """Smooth weighted round-robin (nginx): weight w gets w turns per cycle, interleaved."""
    total = 0
    best: Optional[Node] = None
    for node in candidates:
        node._current += node.weight
        total += node.weight
        if best is None or node._current > best._current:
            best = node
    assert best is not None
    best._current -= total
    return best


def build_sets(sets: Union[Dict[int, Iterable[Union[str, Node]]], Iterable[Union[str, Node]]],
               algorithm: str = "linear") -> Dict[int, NodeSet]:
    """Turn the constructor's `sets` (a dict of set id -> nodes, or one list) into NodeSets."""
    if isinstance(sets, (str, Node)):
        sets = [sets]
    if not isinstance(sets, dict):
        sets = {0: list(sets)}
    if not sets:
        raise InvalidArgument("no relay node sets given; pass e.g. ['udp:127.0.0.1:22222']")
    result: Dict[int, NodeSet] = {}
    for set_id, nodes in sets.items():
        if isinstance(set_id, bool) or not isinstance(set_id, int):
            raise InvalidArgument(f"node set id {set_id!r} is not an integer")
        if isinstance(nodes, (str, Node)):
            nodes = [nodes]
        result[set_id] = NodeSet(set_id, nodes, algorithm)
    return result
