"""How a standby tells that a peer's address moved here: a bind, unless ip_nonlocal_bind
lets any bind succeed (keepalived hosts often set it); then the interfaces' addresses
from an rtnetlink dump. Before, such a host's standby took every call of a live peer
at its first poll."""

from __future__ import annotations

import socket
import struct

from fastpath.kernel import netlink
from lrk.daemon import takeover
from lrk.daemon.takeover import is_local, local_addresses, parse_addresses


def _newaddr(family: int, attrs: list) -> bytes:
    body = struct.pack("=BBBBI", family, 32, 0, 0, 2)
    for kind, raw in attrs:
        rta = struct.pack("=HH", 4 + len(raw), kind) + raw
        body += rta + b"\0" * (-len(rta) % 4)
    return struct.pack("=IHHII", 16 + len(body), takeover.RTM_NEWADDR, 2, 1, 0) + body


def test_the_address_dump_is_parsed_as_the_kernel_writes_it():
    """IPv4: IFA_LOCAL (on a point-to-point link IFA_ADDRESS is the peer's); IPv6:
    IFA_ADDRESS; other messages skipped."""
    ptp = _newaddr(socket.AF_INET, [(takeover.IFA_ADDRESS, bytes([198, 51, 100, 99])),
                                    (takeover.IFA_LOCAL, bytes([198, 51, 100, 1]))])
    v6 = _newaddr(socket.AF_INET6, [(takeover.IFA_ADDRESS,
                                     socket.inet_pton(socket.AF_INET6, "2001:db8::1"))])
    done = struct.pack("=IHHII", 20, netlink.NLMSG_DONE, 2, 1, 0) + b"\0" * 4
    assert parse_addresses(ptp + v6 + done) == {"198.51.100.1", "2001:db8::1"}
    assert parse_addresses(b"\x03\x00") == set()  # a runt: nothing, no error


def test_this_hosts_dump_names_its_loopback_addresses():
    assert {"127.0.0.1", "::1"} <= local_addresses()


def test_with_nonlocal_bind_only_the_interfaces_addresses_are_local(monkeypatch):
    monkeypatch.setattr(takeover, "_nonlocal_bind", lambda family: True)
    monkeypatch.setattr(takeover, "local_addresses", lambda: {"198.51.100.1", "2001:db8::1"})
    assert is_local("198.51.100.1") and is_local("2001:DB8::1")
    # a bind to 127.0.0.2 succeeds (all of 127/8 is loopback), but no interface has it
    assert not is_local("127.0.0.2")

    def broken() -> set:
        raise OSError("netlink unavailable")

    monkeypatch.setattr(takeover, "local_addresses", broken)
    assert not is_local("198.51.100.1")  # unknown is "not here": never a takeover


def test_without_nonlocal_bind_a_bind_decides(monkeypatch):
    monkeypatch.setattr(takeover, "_nonlocal_bind", lambda family: False)
    assert is_local("127.0.0.2") and not is_local("198.51.100.250")


def test_a_call_spanning_an_address_not_here_does_not_retrigger_every_poll():
    """A bridged call (leg A on one VIP, leg B on another) with only one VIP moved here
    is not taken yet; the trigger fires once for that state, not at every poll (each a
    full read of the peer), and again when the peer's records or the local addresses
    change."""
    from lrk.daemon.takeover import Standby

    records = {7: {"legs": [{"media": [{"ip": "198.51.100.1"}]},
                            {"media": [{"ip": "198.51.100.65"}]}]}}

    class Store:
        up = True
        gen = 1

        def generations(self, peers: list) -> list:
            return [self.gen for _ in peers]

        def load_node(self, peer: str) -> dict:
            return dict(records)

        def mark_down(self, exc: Exception) -> None:
            pass

    store = Store()
    here = {"198.51.100.1"}
    standby = Standby(store, ["n1"], poll=0.5, local=lambda ip: ip in here)  # type: ignore
    fired = [standby.handle_timer(i * 0.5) for i in range(10)]
    assert fired[0] == ("n1", {"198.51.100.1"}) and fired[1:] == [None] * 9
    here.add("198.51.100.65")  # the second VIP arrives: fires again
    assert standby.handle_timer(5.0) == ("n1", {"198.51.100.1", "198.51.100.65"})
    assert standby.handle_timer(5.5) is None
    store.gen = 2  # the peer's records changed: looked at again
    assert standby.handle_timer(6.0) is not None
