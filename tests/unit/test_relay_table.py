"""Unit tests of fastpath.worker.relay_table.RelayTable: latching and forwarding decisions."""

from __future__ import annotations

from fastpath.contract import LegReport, LegSpec, StreamSpec
from fastpath.worker.relay_table import (
    DROP_NAMES,
    NO_DESTINATION,
    RTCP,
    RTP,
    SEND_ERROR,
    UNEXPECTED_SOURCE,
    RelayTable,
)

CALLER_IP = "198.51.100.10"
CALLEE_IP = "198.51.100.20"
FDS = [10, 11, 12, 13]  # A-RTP, A-RTCP, B-RTP, B-RTCP


def leg(ip, port, rtcp=None, gen=1, latch_any=False, name="A"):
    """A leg spec; `setup` names it A or B by position, `update` callers pass `name`."""
    return LegSpec(name, "10.0.0.1", 30000, (ip, port),
                   (ip, rtcp if rtcp is not None else port + 1), latch_any, gen)


def unannounced(name, gen):
    return LegSpec(name, "10.0.0.1", 30000, None, None, False, gen)


def setup(a=None, b=None, sid=7):
    table = RelayTable()
    spec = StreamSpec(0, (a or unannounced("A", 0))._replace(name="A"),
                      (b or unannounced("B", 0))._replace(name="B"))
    session = table.install(sid, FDS, spec)
    eps = [table.by_fd[fd] for fd in FDS]
    return table, session, eps


def both():
    return setup(leg(CALLER_IP, 4000), leg(CALLEE_IP, 5000))


def test_install_wires_endpoints():
    table, session, (a_rtp, a_rtcp, b_rtp, b_rtcp) = both()
    assert table.sessions[7] is session
    assert session.endpoints == [a_rtp, a_rtcp, b_rtp, b_rtcp]
    assert (a_rtp.leg, a_rtp.kind, b_rtcp.leg, b_rtcp.kind) == ("A", RTP, "B", RTCP)
    assert a_rtp.partner is b_rtp and b_rtp.partner is a_rtp
    assert a_rtcp.partner is b_rtcp and b_rtcp.partner is a_rtcp
    assert a_rtp.announced == (CALLER_IP, 4000)
    assert a_rtcp.announced == (CALLER_IP, 4001)
    assert a_rtp.expected_ip == CALLER_IP
    assert all(ep.sid == 7 and ep.session is session for ep in session.endpoints)


def test_latches_first_packet_from_announced_ip_with_nat_port():
    table, session, (a_rtp, _, b_rtp, _) = both()
    nat = (CALLER_IP, 61000)
    ep, out = table.forward(a_rtp, [(b"x" * 160, nat)], 5.0)
    assert a_rtp.peer == nat
    assert ep is b_rtp
    assert out == [(b"x" * 160, (CALLEE_IP, 5000))]  # B not latched: its announced address
    assert a_rtp.in_packets == 1 and a_rtp.in_bytes == 160
    assert session.last_rx == 5.0
    assert table.latched == 1


def test_latched_peer_is_sticky_other_sources_dropped():
    table, session, (a_rtp, *_rest) = both()
    nat = (CALLER_IP, 61000)
    batch = [
        (b"1", nat),
        (b"22", (CALLER_IP, 61002)),  # same IP, other port
        (b"333", ("192.0.2.66", 61000)),  # other IP
        (b"4444", nat),
    ]
    ep, out = table.forward(a_rtp, batch, 1.0)
    assert [d for d, _ in out] == [b"1", b"4444"]
    assert a_rtp.peer == nat
    assert a_rtp.in_packets == 2 and a_rtp.in_bytes == 5
    assert a_rtp.drops[UNEXPECTED_SOURCE] == 2
    assert table.dropped[UNEXPECTED_SOURCE] == 2
    assert table.latched == 1


def test_packets_from_unannounced_ip_do_not_latch():
    table, session, (a_rtp, *_rest) = both()
    ep, out = table.forward(a_rtp, [(b"evil", ("192.0.2.66", 4000))], 1.0)
    assert ep is None and out == []
    assert a_rtp.peer is None
    assert a_rtp.in_packets == 0
    assert a_rtp.drops[UNEXPECTED_SOURCE] == 1
    assert session.last_rx is None  # no accepted media: the session still ages
    # the real peer can still latch afterwards
    ep, out = table.forward(a_rtp, [(b"ok", (CALLER_IP, 4000))], 2.0)
    assert a_rtp.peer == (CALLER_IP, 4000) and len(out) == 1
    assert session.last_rx == 2.0


def test_latch_any():
    table, _, (a_rtp, a_rtcp, _, _) = setup(
        leg(CALLER_IP, 4000, latch_any=True), leg(CALLEE_IP, 5000)
    )
    src = ("192.0.2.99", 40000)
    ep, out = table.forward(a_rtp, [(b"a", src), (b"b", ("192.0.2.98", 1))], 1.0)
    assert a_rtp.peer == src
    assert len(out) == 1
    assert a_rtp.drops[UNEXPECTED_SOURCE] == 1
    assert a_rtcp.latch_any is True


def test_no_destination_is_counted_drop():
    table, session, (a_rtp, _, b_rtp, _) = setup(leg(CALLER_IP, 4000))  # offer only
    ep, out = table.forward(a_rtp, [(b"abc", (CALLER_IP, 4000)), (b"de", (CALLER_IP, 4000))], 3.0)
    assert ep is None and out == []
    assert a_rtp.peer == (CALLER_IP, 4000)  # still latched and counted as received
    assert a_rtp.in_packets == 2 and a_rtp.in_bytes == 5
    assert a_rtp.drops[NO_DESTINATION] == 2
    assert table.dropped[NO_DESTINATION] == 2
    assert session.last_rx == 3.0


def test_destination_is_partner_latched_peer():
    table, _, (a_rtp, _, b_rtp, _) = both()
    callee_nat = (CALLEE_IP, 62000)
    table.forward(b_rtp, [(b"from-b", callee_nat)], 1.0)
    assert b_rtp.peer == callee_nat
    ep, out = table.forward(a_rtp, [(b"from-a", (CALLER_IP, 4000))], 2.0)
    assert ep is b_rtp
    assert out == [(b"from-a", callee_nat)]
    # and back: B's packets go to A's latched address
    ep, out = table.forward(b_rtp, [(b"again", callee_nat)], 3.0)
    assert ep is a_rtp
    assert out == [(b"again", (CALLER_IP, 4000))]


def test_port_zero_means_no_destination():
    table, _, (a_rtp, _, _, _) = setup(leg(CALLER_IP, 4000), leg(CALLEE_IP, 0, rtcp=0))
    ep, out = table.forward(a_rtp, [(b"x", (CALLER_IP, 4000))], 1.0)
    assert ep is None and out == []
    assert a_rtp.drops[NO_DESTINATION] == 1


def test_rtcp_latches_independently():
    table, _, (a_rtp, a_rtcp, b_rtp, b_rtcp) = setup(
        leg(CALLER_IP, 4000), leg(CALLEE_IP, 5000, rtcp=5011)
    )
    table.forward(a_rtp, [(b"rtp", (CALLER_IP, 61000))], 1.0)
    assert a_rtp.peer == (CALLER_IP, 61000)
    assert a_rtcp.peer is None
    ep, out = table.forward(a_rtcp, [(b"rtcp", (CALLER_IP, 61001))], 1.0)
    assert a_rtcp.peer == (CALLER_IP, 61001)
    assert ep is b_rtcp
    assert out == [(b"rtcp", (CALLEE_IP, 5011))]  # a=rtcp port of B
    # RTP packets on the RTCP port's peer address are not accepted on RTP
    ep, out = table.forward(a_rtp, [(b"x", (CALLER_IP, 61001))], 2.0)
    assert out == [] and a_rtp.drops[UNEXPECTED_SOURCE] == 1
    assert b_rtp.peer is None and b_rtcp.peer is None


def test_update_resets_latch():
    table, session, (a_rtp, a_rtcp, b_rtp, _) = both()
    table.forward(a_rtp, [(b"x", (CALLER_IP, 61000))], 1.0)
    table.forward(a_rtcp, [(b"x", (CALLER_IP, 61001))], 1.0)
    session.dirty = False
    new_ip = "198.51.100.11"
    table.update(7, leg(new_ip, 4100, gen=2))
    assert session.dirty is False  # nothing new for the daemon: no report before media
    assert a_rtp.peer is None and a_rtcp.peer is None
    assert a_rtp.gen == 2 and a_rtcp.gen == 2
    assert a_rtp.announced == (new_ip, 4100)
    assert a_rtcp.announced == (new_ip, 4101)
    # the old peer can no longer latch; the new one can
    _, out = table.forward(a_rtp, [(b"old", (CALLER_IP, 61000))], 2.0)
    assert out == [] and a_rtp.peer is None
    _, out = table.forward(a_rtp, [(b"new", (new_ip, 7000))], 2.0)
    assert a_rtp.peer == (new_ip, 7000) and len(out) == 1
    # B's side untouched; counters kept
    assert b_rtp.announced == (CALLEE_IP, 5000)
    assert a_rtp.in_packets == 2


def test_update_of_unknown_session_is_noop():
    table, _, (a_rtp, *_rest) = both()
    table.update(999, leg("192.0.2.1", 1))
    assert a_rtp.announced == (CALLER_IP, 4000)


def test_update_without_announced_clears_destination():
    table, _, (a_rtp, _, b_rtp, _) = both()
    table.update(7, unannounced("B", 3))
    assert b_rtp.announced is None and b_rtp.expected_ip is None
    _, out = table.forward(a_rtp, [(b"x", (CALLER_IP, 4000))], 1.0)
    assert out == []
    assert a_rtp.drops[NO_DESTINATION] == 1


def test_remove():
    table, session, eps = both()
    table.install(8, [20, 21, 22, 23],
                  StreamSpec(0, leg(CALLER_IP, 4000), unannounced("B", 0)))
    assert table.remove(7) is session
    assert 7 not in table.sessions
    assert not any(fd in table.by_fd for fd in FDS)
    assert sorted(table.by_fd) == [20, 21, 22, 23]
    assert table.remove(7) is None


def test_sent_accounting():
    table, session, (a_rtp, _, b_rtp, _) = both()
    ep, out = table.forward(a_rtp, [(b"aaaa", (CALLER_IP, 4000)), (b"bb", (CALLER_IP, 4000))], 1.0)
    table.sent(ep, out, len(out))
    assert b_rtp.out_packets == 2 and b_rtp.out_bytes == 6
    assert a_rtp.out_packets == 0
    assert table.forwarded_packets == 2 and table.forwarded_bytes == 6
    assert table.dropped[SEND_ERROR] == 0


def test_sent_partial_failure_counts_send_error_on_receiving_side():
    table, session, (a_rtp, _, b_rtp, _) = both()
    batch = [(b"1", (CALLER_IP, 4000)), (b"22", (CALLER_IP, 4000)), (b"333", (CALLER_IP, 4000))]
    ep, out = table.forward(a_rtp, batch, 1.0)
    table.sent(ep, out, 1)
    assert b_rtp.out_packets == 1 and b_rtp.out_bytes == 1
    assert table.forwarded_packets == 1 and table.forwarded_bytes == 1
    assert a_rtp.drops[SEND_ERROR] == 2
    assert b_rtp.drops[SEND_ERROR] == 0
    assert table.dropped[SEND_ERROR] == 2
    rep = session.report()
    assert LegReport._make(rep[2]).drops == (("send_error", 2),)  # wire form: a tuple


def test_report_structure_and_gen():
    table, session, (a_rtp, a_rtcp, b_rtp, b_rtcp) = setup(
        leg(CALLER_IP, 4000, gen=3), leg(CALLEE_IP, 5000, gen=1)
    )
    ep, out = table.forward(a_rtp, [(b"x" * 10, (CALLER_IP, 61000))], 1.0)
    table.sent(ep, out, 1)
    ep, out = table.forward(a_rtcp, [(b"y" * 20, (CALLER_IP, 61001))], 2.0)
    table.sent(ep, out, 1)
    table.forward(a_rtp, [(b"z", ("192.0.2.1", 1))], 2.5)
    ep, out = table.forward(b_rtp, [(b"w" * 30, (CALLEE_IP, 5000))], 3.0)
    table.sent(ep, out, 1)
    rep = session.report()
    assert rep == (
        7, 3.0,
        LegReport(2, 30, 1, 30, (("unexpected_source", 1),), 3,
                  (CALLER_IP, 61000), (CALLER_IP, 61001)),
        LegReport(1, 30, 2, 30, (), 1, (CALLEE_IP, 5000), None),
    )


def test_report_fresh_session():
    table, session, _ = both()
    rep = session.report()
    assert rep[1] is None  # (unit id, last_rx, leg A, leg B)
    assert rep[2] == LegReport(0, 0, 0, 0, (), 1, None, None)


def test_totals():
    table, _, (a_rtp, _, b_rtp, _) = both()
    ep, out = table.forward(a_rtp, [(b"abc", (CALLER_IP, 4000)), (b"x", ("192.0.2.1", 9))], 1.0)
    table.sent(ep, out, 1)
    table.update(7, unannounced("B", 2))
    table.forward(a_rtp, [(b"d", (CALLER_IP, 4000))], 2.0)
    totals = table.totals()
    assert totals == {
        "media.forwarded.packets": 1,
        "media.forwarded.bytes": 3,
        "media.latched": 1,
        "media.latched.announced": 1,
        "media.latched.learned": 0,
        "media.relatched": 0,
        "media.dropped.unexpected_source": 1,
        "media.dropped.no_destination": 1,
        "media.dropped.send_error": 0,
    }
    assert set(DROP_NAMES) == {"unexpected_source", "no_destination", "send_error"}


# -- NAT learning (issue: every media stream) ---------------------------------------------
NATTED = ("203.0.113.77", 40000)  # what a NAT makes of a phone that announced CALLER_IP


def test_learning_leg_latches_the_first_source_from_anywhere():
    table, session, (a_rtp, _, b_rtp, _) = setup(leg(CALLER_IP, 4000, latch_any=True),
                                                 leg(CALLEE_IP, 5000))
    src_ep, out = table.forward(a_rtp, [(b"x", NATTED)], 1.0)
    assert a_rtp.peer == NATTED and out == [(b"x", (CALLEE_IP, 5000))]
    assert (table.latched_learned, table.latched_announced) == (1, 0)


def test_strict_leg_drops_what_its_sdp_did_not_announce():
    table, session, (a_rtp, *_rest) = both()  # latch_any=False: strict_source
    _, out = table.forward(a_rtp, [(b"x", NATTED)], 1.0)
    assert out == [] and a_rtp.peer is None
    assert a_rtp.drops[UNEXPECTED_SOURCE] == 1 and table.latched == 0


def test_latched_peer_is_kept_while_it_talks_and_replaced_after_silence():
    table, session, (a_rtp, *_rest) = setup(leg(CALLER_IP, 4000, latch_any=True),
                                           leg(CALLEE_IP, 5000))
    table.forward(a_rtp, [(b"x", (CALLER_IP, 4000))], 10.0)
    hijack = ("198.51.100.66", 6666)
    _, out = table.forward(a_rtp, [(b"evil", hijack)], 11.0)  # the phone talked 1 s ago
    assert out == [] and a_rtp.peer == (CALLER_IP, 4000)
    assert a_rtp.drops[UNEXPECTED_SOURCE] == 1
    table.forward(a_rtp, [(b"x", (CALLER_IP, 4000))], 12.0)
    # the phone's NAT binding changed: its old source fell silent for relearn_after
    _, out = table.forward(a_rtp, [(b"y", NATTED)], 12.0 + table.relearn_after)
    assert a_rtp.peer == NATTED and len(out) == 1 and table.relatched == 1


def test_strict_leg_never_relearns():
    table, session, (a_rtp, *_rest) = both()
    table.forward(a_rtp, [(b"x", (CALLER_IP, 4000))], 1.0)
    _, out = table.forward(a_rtp, [(b"y", (CALLER_IP, 4444))], 100.0)
    assert out == [] and a_rtp.peer == (CALLER_IP, 4000)


def test_rtcp_latches_only_to_rtps_address_or_the_announced_rtcp_address():
    """RTCP latch theft: another port on the caller's IP (or any stranger) must not take
    RTCP before the phone's RTP has latched."""
    table, session, (a_rtp, a_rtcp, b_rtp, b_rtcp) = setup(
        leg(CALLER_IP, 4000, latch_any=True), leg(CALLEE_IP, 5000))
    _, out = table.forward(a_rtcp, [(b"\x80\xc8", (CALLER_IP, 9999))], 1.0)
    assert out == [] and a_rtcp.peer is None
    _, out = table.forward(a_rtcp, [(b"\x80\xc8", ("198.51.100.66", 4001))], 1.0)
    assert out == [] and a_rtcp.drops[UNEXPECTED_SOURCE] == 2
    # the exact announced RTCP address is fine before RTP
    _, out = table.forward(a_rtcp, [(b"\x80\xc8", (CALLER_IP, 4001))], 1.0)
    assert a_rtcp.peer == (CALLER_IP, 4001) and len(out) == 1


def test_rtcp_of_a_natted_phone_follows_its_rtp():
    table, session, (a_rtp, a_rtcp, _, _) = setup(leg(CALLER_IP, 4000, latch_any=True),
                                                 leg(CALLEE_IP, 5000))
    _, out = table.forward(a_rtcp, [(b"\x80\xc8", (NATTED[0], 40001))], 1.0)
    assert out == []  # RTP has not latched: no RTCP from an address nobody announced
    table.forward(a_rtp, [(b"x", NATTED)], 1.5)
    _, out = table.forward(a_rtcp, [(b"\x80\xc8", (NATTED[0], 40001))], 2.0)
    assert a_rtcp.peer == (NATTED[0], 40001) and len(out) == 1


# -- forked INVITEs: early dialogs sharing leg B's sockets -----------------------------------
CALLEE2 = ("198.51.100.21", 6000)


def forked():
    """Main unit 7 (callee 1 announced) and fork -1 (callee 2) sharing its B sockets."""
    table, session, eps = both()
    fork_spec = StreamSpec(0, leg(CALLER_IP, 4000), leg(*CALLEE2, name="B"))
    fork = table.install_fork(-1, 7, [20, 21], fork_spec)
    return table, session, eps, fork


def test_a_fork_shares_the_main_units_b_sockets_and_owns_its_a_sockets():
    table, session, (a_rtp, a_rtcp, b_rtp, b_rtcp), fork = forked()
    f_a_rtp, f_a_rtcp, f_b_rtp, f_b_rtcp = fork.endpoints
    assert (f_b_rtp.fd, f_b_rtcp.fd) == (12, 13)
    assert table.by_fd[12] is b_rtp, "the shared socket stays the main unit's"
    assert table.by_fd[20] is f_a_rtp and table.by_fd[21] is f_a_rtcp
    assert b_rtp.split and b_rtcp.split and not a_rtp.split
    assert fork.owned() == [f_a_rtp, f_a_rtcp] and session.forks == [-1]


def test_packets_on_the_shared_socket_go_to_the_dialog_of_their_source():
    table, _session, (a_rtp, _, b_rtp, _), fork = forked()
    callee1 = (CALLEE_IP, 5000)
    batches = table.forward_split(b_rtp, [(b"one", callee1), (b"two", CALLEE2),
                                          (b"uno", callee1)], 1.0)
    by_sender = {ep.fd: out for ep, out in batches}
    caller = (CALLER_IP, 4000)
    # callee 1 leaves from leg A's socket, callee 2 from its dialog's own A socket
    assert by_sender == {10: [(b"one", caller), (b"uno", caller)], 20: [(b"two", caller)]}
    assert b_rtp.peer == callee1 and fork.endpoints[2].peer == CALLEE2
    assert b_rtp.in_packets == 2 and fork.endpoints[2].in_packets == 1
    # the caller reaches callee 2 through the fork's A socket, sent on the shared socket
    sender, out = table.forward(fork.endpoints[0], [(b"hi", caller)], 1.5)
    assert sender is fork.endpoints[2] and sender.fd == 12 and out == [(b"hi", CALLEE2)]


def test_a_stranger_on_the_shared_socket_is_judged_by_the_main_dialog():
    table, _session, (_, _, b_rtp, _), fork = forked()
    table.forward_split(b_rtp, [(b"a", (CALLEE_IP, 5000))], 1.0)
    batches = table.forward_split(b_rtp, [(b"x", ("203.0.113.99", 9))], 1.1)
    assert [out for _ep, out in batches] == [[]]
    assert b_rtp.drops[UNEXPECTED_SOURCE] == 1 and fork.endpoints[2].peer is None


def test_promote_gives_the_fork_sockets_to_the_main_unit():
    table, session, (a_rtp, a_rtcp, b_rtp, b_rtcp), fork = forked()
    f_a_rtp, f_a_rtcp = fork.endpoints[:2]
    closed = table.promote(7, -1)
    assert closed == [10, 11]
    assert session.endpoints[:2] == [f_a_rtp, f_a_rtcp]
    assert session.endpoints[2:] == [b_rtp, b_rtcp]
    assert -1 not in table.sessions and session.forks == [] and not b_rtp.forks
    assert 10 not in table.by_fd and table.by_fd[20] is f_a_rtp
    assert f_a_rtp.sid == 7 and f_a_rtp.session is session
    assert f_a_rtp.partner is b_rtp and b_rtp.partner is f_a_rtp
    assert f_a_rtcp.sibling is f_a_rtp and not b_rtp.split


def test_removing_a_fork_leaves_the_shared_sockets_alone():
    table, session, (_, _, b_rtp, b_rtcp), fork = forked()
    removed = table.remove(-1)
    assert removed is fork and [ep.fd for ep in removed.owned()] == [20, 21]
    assert table.by_fd[12] is b_rtp and table.by_fd[13] is b_rtcp
    assert 20 not in table.by_fd and not b_rtp.forks and not b_rtp.split


# -- forward_one: packet mode's per-packet path ------------------------------------------
def _state(table, session):
    eps = tuple((ep.peer, ep.in_packets, ep.in_bytes, ep.out_packets, ep.out_bytes,
                 tuple(ep.drops), ep.last) for ep in session.endpoints)
    return (eps, session.dirty, session.last_rx, tuple(table.dropped), table.latched,
            table.latched_learned, table.latched_announced, table.relatched,
            table.forwarded_packets, table.forwarded_bytes)


def test_forward_one_decides_and_counts_exactly_as_a_batch_of_one():
    """Every branch a packet can take (latch by announced IP, latch learned, stranger,
    relearn after silence, RTCP following RTP, no destination, port 0, send failure):
    forward_one + sent_one/send_failed leave the table as forward + sent do."""
    stranger = ("198.51.100.66", 6666)
    script = [  # (endpoint index, payload, source, now)
        (0, b"a" * 10, (CALLER_IP, 4000), 1.0),       # A latches its announced address
        (2, b"b" * 20, (CALLEE_IP, 5000), 1.1),       # B latches
        (0, b"evil", stranger, 1.2),                  # stranger, A talking: dropped
        (1, b"r" * 8, stranger, 1.3),                 # RTCP from a stranger: dropped
        (1, b"r" * 9, (CALLER_IP, 4001), 1.4),        # RTCP from the announced address
        (2, b"c", NATTED, 1.5),                       # strict B: dropped
        (0, b"d" * 3, NATTED, 9.0),                   # A silent: NAT relearn
        (3, b"e" * 7, (CALLEE_IP, 5001), 9.1),        # B's RTCP
        (0, b"f" * 5, NATTED, 9.2),
    ]

    def run(one: bool):
        table, session, eps = setup(leg(CALLER_IP, 4000, latch_any=True), leg(CALLEE_IP, 5000))
        outcomes = []
        for i, (idx, data, src, now) in enumerate(script):
            ep = eps[idx]
            session.dirty = False
            fail = i == 4  # one send fails
            if one:
                dest = table.forward_one(ep, data, src, now)
                if dest is not None:
                    if fail:
                        table.send_failed(ep.partner)
                    else:
                        table.sent_one(ep.partner, len(data))
                outcomes.append((eps.index(ep.partner) if dest else None, dest))
            else:
                src_ep, out = table.forward(ep, [(data, src)], now)
                if out:
                    table.sent(src_ep, out, 0 if fail else 1)
                outcomes.append((eps.index(src_ep) if out else None, out[0][1] if out else None))
            outcomes.append(_state(table, session))
        # no destination: B's announced port 0 (on hold), then no B at all
        table.update(7, leg(CALLEE_IP, 0, gen=2, name="B"))
        outcomes.append(table.forward_one(eps[0], b"g", NATTED, 9.3) if one
                        else table.forward(eps[0], [(b"g", NATTED)], 9.3)[1] or None)
        outcomes.append(_state(table, session))
        return outcomes

    got, want = run(True), run(False)
    assert got == want
    assert got[-1][3][UNEXPECTED_SOURCE] == 3 and got[-1][3][NO_DESTINATION] == 1
    assert got[-1][3][SEND_ERROR] == 1 and got[-1][1] is True  # a drop is news too
