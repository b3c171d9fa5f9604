"""Kernel mode's counter poll without the kernel: the conntrack dump parser's fast path
(inline attribute walk, tuple cache) against recorded kernel bytes and against the plain
reference parser, the named-counter (drop counter) dump, and the poll's error paths."""

from __future__ import annotations

import random
import socket
import struct
import sys
from typing import Any, Dict, List, Optional, Tuple

import pytest

from fastpath.contract import Install, LegSpec, SessionSpec, StreamSpec, unit_id
from fastpath.kernel import ctnetlink as ctn
from fastpath.kernel import netlink as nl
from fastpath.kernel import nft_setelem as se
from fastpath.kernel.ctnetlink import ConntrackSocket, CtFlow, parse_dump
from fastpath.kernel.kernel_rules import DROP_COUNTERS, KernelRuleError, drop_counter
from fastpath.kernel.nft import NftError
from lrk.daemon.kernel_plane import KernelPlane

# nlmsghdr and attribute headers are host-endian: these bytes came from an x86 kernel
little = pytest.mark.skipif(sys.byteorder != "little", reason="recorded on a little-endian host")

#: a ctnetlink dump (seq 1) recorded in a throwaway namespace (kernel 6.18, acct and
#: timestamps on): an IPv4 flow that was answered, an IPv6 flow that was not; then DONE
RECORDED_CT = bytes.fromhex(
    "ec0000000001220001000000297d000002000000340001801400018008000100c633640508000200c633"
    "64051c0002800500010011000000060002000fa000000600030075300000340002801400018008000100"
    "c633640508000200c63364051c00028005000100110000000600020075300000060003000fa000000800"
    "03000000000a080008000000753008000c009361346108000b0000000001080007000000001d1c000980"
    "0c00010000000000000000030c00020000000000000002341c000a800c00010000000000000000010c00"
    "02000000000000000080100014800c00010018edadb2ae21e7cb1c0100000001220001000000297d0000"
    "0a0000004c0001802c0001801400030020010db80000000000000000000000051400040020010db80000"
    "000000000000000000051c0002800500010011000000060002001770000006000300753200004c000280"
    "2c0001801400030020010db80000000000000000000000051400040020010db800000000000000000000"
    "00051c000280050001001100000006000200753200000600030017700000080003000000000808000800"
    "0000753208000c00ed124ac508000b0000000001080007000000001d1c0009800c000100000000000000"
    "00020c00020000000000000001a01c000a800c00010000000000000000000c0002000000000000000000"
    "100014800c00010018edadb2ae22ea94")
RECORDED_CT_DONE = bytes.fromhex("140000000300020001000000297d000000000000")
RECORDED_FLOWS = [
    CtFlow(30000, 17, "198.51.100.5", 4000, "198.51.100.5", 30000, True, "198.51.100.5",
           30000, "198.51.100.5", 4000, 3, 564, 1, 128, 2472621153, 1796282809327937483,
           0xA, 29),
    CtFlow(30002, 17, "2001:db8::5", 6000, "2001:db8::5", 30002, False, "2001:db8::5", 30002,
           "2001:db8::5", 6000, 2, 416, 0, 0, 3977398981, 1796282809328003732,
           0x8, 29),
]

#: NFT_MSG_GETOBJ dump (seq 1) of kernel mode's table: its two named drop counters
RECORDED_OBJ = bytes.fromhex(
    "64000000120a02080100000094bb709501000002080001006c726b0010000200756e6578706563746564"
    "340008000300000000010c000600000000000000000508000500000000011c0004000c00010000000000"
    "000000000c000200000000000000000064000000120a02080100000094bb709501000002080001006c72"
    "6b0010000200756e6578706563746564360008000300000000010c000600000000000000000608000500"
    "000000011c0004000c00010000000000000000000c0002000000000000000000")
RECORDED_OBJ_DONE = bytes.fromhex("14000000030002000100000094bb709500000000")


# -- the reference parser: the plain generator walk the fast path replaced ---------------
def _ref_counters(data: bytes, off: int, end: int) -> Tuple[int, int]:
    packets = nbytes = 0
    for kind, a, b in nl.attrs(data, off, end):
        size = b - a
        if size == 8 and kind in (1, 2):
            value = struct.unpack_from("!Q", data, a)[0]
        elif size == 4 and kind in (3, 4):
            value = struct.unpack_from("!I", data, a)[0]
        else:
            continue
        if kind in (1, 3):
            packets = value
        else:
            nbytes = value
    return packets, nbytes


def ref_flow(data: bytes, body: int, end: int) -> Optional[CtFlow]:
    mark = orig = reply = ct_id = start = timeout = None
    status = 0
    counts_o = counts_r = (0, 0)
    for akind, a, b in nl.attrs(data, body + 4, end):
        if akind == 8 and b - a == 4:
            mark = struct.unpack_from("!I", data, a)[0]
        elif akind == 3 and b - a == 4:
            status = struct.unpack_from("!I", data, a)[0]
        elif akind == 7 and b - a == 4:
            timeout = struct.unpack_from("!I", data, a)[0]
        elif akind == 1:
            orig = ctn._tuple(data, a, b)
        elif akind == 2:
            reply = ctn._tuple(data, a, b)
        elif akind == 9:
            counts_o = _ref_counters(data, a, b)
        elif akind == 10:
            counts_r = _ref_counters(data, a, b)
        elif akind == 12 and b - a == 4:
            ct_id = struct.unpack_from("!I", data, a)[0]
        elif akind == 20:
            for tkind, ta, tb in nl.attrs(data, a, b):
                if tkind == 1 and tb - ta == 8:
                    start = struct.unpack_from("!Q", data, ta)[0]
    if mark is None or orig is None:
        return None
    return CtFlow(mark, *orig, bool(status & 2), *(reply[1:] if reply else (None, 0, None, 0)),
                  *counts_o, *counts_r, ct_id, start, status, timeout)


def _outcome(fn, *args) -> Any:
    try:
        return fn(*args)
    except nl.NetlinkDecodeError:
        return "garbled"


# -- conntrack ------------------------------------------------------------------------------
@little
def test_recorded_dump_parses_to_the_flows_conntrack_listed():
    part = parse_dump(RECORDED_CT + RECORDED_CT_DONE, seq=1)
    assert part.flows == RECORDED_FLOWS and part.done and part.skipped == 0


@little
def test_fast_flow_parser_matches_the_reference_on_mutated_input():
    """Every flow of the recorded dump, with bytes flipped at random (deterministic seed):
    the fast parser and the reference agree on each result or both call it garbled."""
    spans = [(body, end) for _t, _f, _s, body, end in nl.messages(RECORDED_CT)]
    rng = random.Random(20240611)
    checked = garbled = 0
    for _ in range(3000):
        data = bytearray(RECORDED_CT)
        body, end = spans[rng.randrange(len(spans))]
        for _flip in range(rng.randint(1, 3)):
            pos = rng.randrange(body, end)
            data[pos] = rng.randrange(256) if rng.random() < 0.7 else data[pos] ^ 0x04
        raw = bytes(data)
        want = _outcome(ref_flow, raw, body, end)
        assert _outcome(ctn._flow, raw, body, end) == want
        cache: Dict[bytes, Any] = {}
        assert _outcome(ctn._flow, raw, body, end, cache, cache) == want
        assert _outcome(ctn._flow, raw, body, end, cache, {}) == want  # from the cache
        checked += 1
        garbled += want == "garbled"
    assert checked == 3000 and 0 < garbled < checked


class FakeSock:
    """Replays canned netlink buffers (their seq rewritten to the request's)."""

    def __init__(self, replies: List[bytes]) -> None:
        self.replies = list(replies)
        self.sent: List[bytes] = []
        self._pair = socket.socketpair()
        self._pair[1].send(b"!")

    def bind(self, _addr: Any) -> None:
        pass

    def setblocking(self, _flag: bool) -> None:
        pass

    def getsockname(self) -> Tuple[int, int]:
        return (4242, 0)

    def fileno(self) -> int:
        return self._pair[0].fileno()

    def sendto(self, data: bytes, _addr: Any) -> None:
        self.sent.append(data)

    def recv_into(self, buf: bytearray, _n: int, _flags: int) -> int:
        data = self.replies.pop(0)
        buf[:len(data)] = data
        return len(data)

    def close(self) -> None:
        for s in self._pair:
            s.close()


def _reseq(data: bytes, seq: int) -> bytes:
    out = bytearray()
    for _t, _f, _s, body, end in nl.messages(data):
        start = body - nl.NLMSG_HDRLEN
        msg = bytearray(data[start:end])
        struct.pack_into("=I", msg, 8, seq)
        out += msg + b"\0" * (-len(msg) % 4)
    return bytes(out)


@little
def test_socket_dumps_reuse_decoded_tuples_and_forget_vanished_flows():
    only_v6 = RECORDED_CT[0xEC:]  # the second message alone
    sock = FakeSock([_reseq(RECORDED_CT, 1), _reseq(RECORDED_CT_DONE, 1),
                     _reseq(RECORDED_CT, 2), _reseq(RECORDED_CT_DONE, 2),
                     _reseq(only_v6, 3), _reseq(RECORDED_CT_DONE, 3)])
    ct = ConntrackSocket(sock=sock)  # type: ignore[arg-type]
    assert ct.flows([(29952, 0xFFFFFF00)]) == RECORDED_FLOWS
    assert len(ct._tuples) == 4  # two flows, two tuples each
    assert ct.flows([(29952, 0xFFFFFF00)]) == RECORDED_FLOWS  # decoded from the cache
    assert ct.flows([(29952, 0xFFFFFF00)]) == RECORDED_FLOWS[1:]
    assert len(ct._tuples) == 2  # the vanished IPv4 flow's tuples are gone
    ct.close()


# -- named counters -------------------------------------------------------------------------
@little
def test_recorded_counter_objects_and_the_drop_total():
    out: Dict[str, Tuple[int, int]] = {}
    assert se.parse_objects(RECORDED_OBJ + RECORDED_OBJ_DONE, 1, "lrk", out)
    assert out == {"unexpected4": (0, 0), "unexpected6": (0, 0)}
    assert se.parse_objects(RECORDED_OBJ, 1, "other", {}) is False  # no DONE yet
    other: Dict[str, Tuple[int, int]] = {}
    se.parse_objects(RECORDED_OBJ, 1, "other", other)
    assert other == {}  # another table's objects are left out


def _obj(seq: int, name: str, packets: int, nbytes: int, table: str = "lrk",
         otype: int = se.NFT_OBJECT_COUNTER) -> bytes:
    counter = nl.attr(se.NFTA_COUNTER_BYTES, struct.pack("!Q", nbytes)) + \
        nl.attr(se.NFTA_COUNTER_PACKETS, struct.pack("!Q", packets))
    return nl.nfmessage(se.NEWOBJ, nl.NLM_F_MULTI, seq, se.NFPROTO_INET, 0,
                        nl.attr_strz(se.NFTA_OBJ_TABLE, table)
                        + nl.attr_strz(se.NFTA_OBJ_NAME, name)
                        + nl.attr_be32(se.NFTA_OBJ_TYPE, otype)
                        + nl.nested(se.NFTA_OBJ_DATA, counter))


def _done(seq: int, flags: int = 0) -> bytes:
    return nl.message(nl.NLMSG_DONE, flags, seq, b"\0" * 4)


def test_objects_request_names_table_and_counter_type():
    req = se.objects_request("lrk", 9)
    length, kind, flags, seq, _pid = struct.unpack_from("=IHHII", req)
    assert (length, kind, flags, seq) == (len(req), se.GETOBJ, 0x301, 9)
    assert nl.attr_map(req, nl.NFGEN_HDRLEN) == {
        se.NFTA_OBJ_TABLE: b"lrk\0", se.NFTA_OBJ_TYPE: struct.pack("!I", 1)}


def test_reader_named_counters_retries_an_interrupted_dump_and_types_errors():
    sock = FakeSock([_obj(1, "unexpected4", 1, 10) + _done(1, nl.NLM_F_DUMP_INTR),
                     _obj(2, "unexpected4", 7, 700) + _obj(2, "unexpected6", 2, 96)
                     + _obj(2, "quota", 5, 5, otype=2) + _done(2)])
    reader = se.SetElemReader(sock=sock)  # type: ignore[arg-type]
    got = reader.named_counters("lrk")
    assert got == {"unexpected4": (7, 700), "unexpected6": (2, 96)}
    assert drop_counter(got) == (9, 796) and drop_counter(got, 6) == (2, 96)
    with pytest.raises(KernelRuleError, match="unexpected6"):
        drop_counter({"unexpected4": (1, 1)})
    reader.close()
    err = nl.message(nl.NLMSG_ERROR, 0, 1, struct.pack("=i", -1) + bytes(16))
    reader = se.SetElemReader(sock=FakeSock([err]))  # type: ignore[arg-type]
    with pytest.raises(se.NftDumpError, match="CAP_NET_ADMIN"):
        reader.named_counters("lrk")
    reader.close()


# -- the poll -------------------------------------------------------------------------------
class FakeNft:
    backend = "fake"

    def __init__(self, drops: int = 0, fail: bool = False) -> None:
        self.drops, self.fail, self.listings = drops, fail, 0

    def run(self, text: str) -> str:
        return ""

    def run_json(self, text: str) -> Dict[str, Any]:
        self.listings += 1
        if self.fail:
            raise NftError("Error: No such file or directory")
        return {"nftables": [{"counter": {"name": name, "packets": self.drops, "bytes": 0}}
                             for name in DROP_COUNTERS.values()]}


class FakeCt:
    def __init__(self) -> None:
        self.flows_now: List[CtFlow] = []

    def flush_marks(self, marks: Any) -> None:
        pass

    def flows(self, filters: Any, timeout: float = 0, max_flows: int = 0) -> List[CtFlow]:
        return list(self.flows_now)

    def close(self) -> None:
        pass


class FakeObjects:
    def __init__(self, result: Any) -> None:
        self.result, self.closed = result, False

    def named_counters(self, table: str) -> Dict[str, Tuple[int, int]]:
        if isinstance(self.result, Exception):
            raise self.result
        return self.result

    def close(self) -> None:
        self.closed = True


def _plane(nft: FakeNft, objects: Optional[FakeObjects]) -> Tuple[KernelPlane, list]:
    plane = KernelPlane(31000, 31099, ["198.51.100.1"], poll_interval=2.0)
    plane.nft = nft  # type: ignore[assignment]
    plane.ct = plane.ct_dump = FakeCt()  # type: ignore[assignment]
    plane.objects = objects  # type: ignore[assignment]
    events: list = []
    plane.sink = events.append
    a = LegSpec("A", "198.51.100.1", 31000, ("198.51.100.10", 4000))
    b = LegSpec("B", "198.51.100.1", 31002, ("198.51.100.70", 5000))
    assert plane.apply([Install(SessionSpec(1, "c1", (StreamSpec(0, a, b),)))]) == []
    return plane, events


def test_drop_counter_comes_from_the_netlink_dump_without_nft():
    nft = FakeNft(drops=99)
    plane, events = _plane(nft, FakeObjects({"unexpected4": (3, 84), "unexpected6": (1, 48)}))
    plane._poll(1.0)
    assert plane.counters["media.dropped.unexpected_source"] == 4
    assert nft.listings == 0 and len(events) == 1
    assert plane.counters["kernel.errors"] == 0


def test_a_failed_counter_dump_falls_back_to_nft_for_that_poll():
    nft = FakeNft(drops=5)
    objects = FakeObjects(se.NftDumpError("set element dump: Connection refused"))
    plane, events = _plane(nft, objects)
    plane._poll(1.0)
    assert plane.counters["media.dropped.unexpected_source"] == 10  # nft: 5 + 5
    assert objects.closed and plane.objects is None and nft.listings == 1
    assert plane.counters["kernel.errors"] == 0 and len(events) == 1


def test_unreadable_drop_counters_count_a_kernel_error_and_skip_the_poll():
    for objects, nft in ((FakeObjects(se.NftDumpError("x")), FakeNft(fail=True)),
                         (FakeObjects({"unexpected4": (1, 1)}), FakeNft()),  # one missing
                         (None, FakeNft(fail=True))):
        plane, events = _plane(nft, objects)
        plane._poll(1.0)
        assert plane.counters["kernel.errors"] == 1
        assert events == []  # no report from a poll that could not read the kernel


def test_owners_follow_installs_and_removals():
    plane, _events = _plane(FakeNft(), None)
    uid = unit_id(1, 0)
    first = plane._owners()
    assert sorted(first) == [31000, 31001, 31002, 31003]
    assert plane._owners() is first  # unchanged sessions: not rebuilt
    a = LegSpec("A", "198.51.100.1", 31010, ("198.51.100.10", 4000))
    b = LegSpec("B", "198.51.100.1", 31012, ("198.51.100.70", 5000))
    from fastpath.contract import Update
    assert plane.apply([Update(SessionSpec(1, "c1", (StreamSpec(0, a, b),)), "A")]) == []
    assert sorted(plane._owners()) == [31010, 31011, 31012, 31013]
    assert plane._owners()[31010][:3] == (uid, "A", False)
    from fastpath.contract import Remove
    plane.apply([Remove(1, "c1", "deleted")])
    assert plane._owners() == {}


# -- when media last flowed: the flows' remaining timeouts ----------------------------------
def _two_sessions() -> Tuple[KernelPlane, list, List[float]]:
    """A plane holding the recorded dump's sessions: IPv4 (leg A at 198.51.100.5:30000)
    and IPv6 (leg A at [2001:db8::5]:30002), on a clock the test sets."""
    plane = KernelPlane(30000, 30099, ["198.51.100.5", "2001:db8::5"], poll_interval=2.0)
    plane.nft = FakeNft()  # type: ignore[assignment]
    plane.ct = plane.ct_dump = FakeCt()  # type: ignore[assignment]
    plane.objects = FakeObjects({"unexpected4": (0, 0), "unexpected6": (0, 0)})  # type: ignore
    clock = [1000.0]
    plane.clock = lambda: clock[0]
    plane.wall_ns = lambda: 1_796_282_900 * 10**9 + int(clock[0] * 1e9)
    events: list = []
    plane.sink = events.append
    v4 = StreamSpec(0, LegSpec("A", "198.51.100.5", 30000, ("198.51.100.5", 4000)),
                    LegSpec("B", "198.51.100.5", 30004, ("198.51.100.5", 4002)))
    v6 = StreamSpec(0, LegSpec("A", "2001:db8::5", 30002, ("2001:db8::5", 6000)),
                    LegSpec("B", "2001:db8::5", 30006, ("2001:db8::5", 6002)))
    assert plane.apply([Install(SessionSpec(1, "v4", (v4,))),
                        Install(SessionSpec(2, "v6", (v6,)))]) == []
    return plane, events, clock


@little
def test_recorded_flows_date_their_last_packet():
    """The recorded flows had 29 s left of 30 (one replied, one not; neither assured):
    their last packets came within the second before the dump."""
    plane, events, clock = _two_sessions()
    plane.ct_dump.flows_now = parse_dump(RECORDED_CT + RECORDED_CT_DONE, seq=1).flows
    plane._poll(clock[0])
    assert {e.sid: e.last_rx for e in events} == {1: 1000.0, 2: 1000.0}
    assert events[0].a.in_packets == 3 and events[0].b.in_packets == 1


def test_poll_reports_the_latest_packet_of_a_sessions_flows_and_keeps_it():
    """last_rx is the latest of the session's flows' last packets, whenever it is read,
    moved counters or not; a flow that expired leaves its time behind; a session whose
    flows carry no CTA_TIMEOUT falls back to the read that saw counters move."""
    plane, events, clock = _two_sessions()
    assured = CtFlow(30000, 17, "198.51.100.5", 4000, "198.51.100.5", 30000, True,
                     "198.51.100.5", 30004, "198.51.100.5", 4000, 500, 86000, 480, 82560,
                     7, 1, status=0xE, timeout=110)  # 10 s silent (assured: 120 s)
    rtcp = CtFlow(30001, 17, "198.51.100.5", 4001, "198.51.100.5", 30001, False,
                  "198.51.100.5", 30005, "198.51.100.5", 4001, 9, 900, 0, 0, 8, 1,
                  status=0x8, timeout=25)  # 5 s silent (unreplied: 30 s)
    untimed = CtFlow(30002, 17, "2001:db8::5", 6000, "2001:db8::5", 30002,
                     orig_packets=4, orig_bytes=400, id=9, start=1)
    plane.ct_dump.flows_now = [assured, rtcp, untimed]
    plane._poll(clock[0])
    assert {e.sid: e.last_rx for e in events} == {1: 1000.0 - 5 + 1, 2: 1000.0}
    # 20 s later: RTCP expired, RTP silent 30 s; the IPv6 counters did not move
    events.clear()
    clock[0] = 1020.0
    plane.ct_dump.flows_now = [assured._replace(timeout=90), untimed]
    plane._poll(clock[0])
    # session 2: counters, time and latches as last reported: not reported again
    assert {e.sid: e.last_rx for e in events} == {1: 996.0}
    assert events[0].a.in_packets == 509  # the expired flow's counts stay
    # media again on RTP
    events.clear()
    clock[0] = 1035.0
    plane.ct_dump.flows_now = [assured._replace(timeout=119, orig_packets=600)]
    plane._poll(clock[0])
    # session 2's flow is gone (its latch with it): reported, as its counts stay
    assert [(e.sid, e.last_rx) for e in events] == [(1, 1035.0), (2, None)]
    # a removed session takes its time with it
    from fastpath.contract import Remove
    plane.apply([Remove(1, "v4", "deleted")])
    assert unit_id(1, 0) not in plane._last_rx


def test_periodic_reads_are_sparse_refresh_keeps_kernel_poll():
    plane, events, clock = _two_sessions()
    plane.ct_dump.flows_now = []
    assert plane.udp_timeouts == (30, 120) and plane.sweep_interval == 15.0
    plane._poll(clock[0])
    assert plane.get_timer() == 1015.0
    plane.handle_timer(1014.9)
    assert plane._last_poll == 1000.0  # not yet
    clock[0] = 1001.9
    plane.refresh(lambda: None)
    assert plane._last_poll == 1000.0  # counters 1.9 s old: fresh enough
    clock[0] = 1002.0
    done: List[bool] = []
    plane.refresh(lambda: done.append(True))
    assert plane._last_poll == 1002.0 and done == [True]  # kernel_poll old: read first
    plane.handle_timer(1017.0)
    assert plane._last_poll == 1017.0
    for timeouts, poll, want in (((20, 60), 2.0, 10.0), ((300, 600), 2.0, 15.0),
                                 ((30, 120), 20.0, 20.0), ((2, 120), 2.0, 2.0)):
        plane.udp_timeouts, plane.poll_interval = timeouts, poll
        assert plane.sweep_interval == want, (timeouts, poll)
    rules = KernelPlane(30000, 30099, ["198.51.100.5"], poll_interval=2.0, counters="rules")
    assert rules.sweep_interval == 2.0  # no timeouts to date media by: every kernel_poll


def test_udp_timeouts_are_read_not_written(tmp_path):
    from lrk.daemon.kernel_plane import read_udp_timeouts
    udp, stream = tmp_path / "udp", tmp_path / "stream"
    udp.write_text("20\n")
    stream.write_text("90\n")
    assert read_udp_timeouts((str(udp), str(stream))) == (20, 90)
    assert (udp.read_text(), stream.read_text()) == ("20\n", "90\n")
    stream.write_text("garbage\n")
    assert read_udp_timeouts((str(udp), str(stream))) == (20, 120)  # default for that one
    assert read_udp_timeouts((str(tmp_path / "none"), str(udp))) == (30, 20)


def test_the_polls_inline_dating_is_udp_last_packet():
    """The poll dates flows inline in the common cases: the same times as the function,
    for every status and remaining time (rare cases included: it falls back to it)."""
    plane, _events, clock = _two_sessions()
    uid = unit_id(1, 0)
    for status in (0x8, 0xA, 0xE):
        for left in list(range(0, 130)) + [5000]:
            for age_s in (1.5, 500.0):
                flow = CtFlow(30000, 17, "198.51.100.5", 4000, "198.51.100.5", 30000,
                              bool(status & 2), id=1, start=plane.wall_ns() - int(age_s * 1e9),
                              status=status, timeout=left)
                plane._last_rx.clear()
                plane.ct_dump.flows_now = [flow]
                plane._poll(clock[0])
                want = ctn.udp_last_packet(flow, clock[0], 30, 120, plane.wall_ns())
                assert plane._last_rx[uid] == want, (status, left, age_s)


# -- forked INVITEs: a fork unit per further early dialog --------------------------------
def test_fork_units_are_installed_counted_promoted_and_removed():
    from fastpath.contract import ForkSpec, Remove, Update
    from fastpath.kernel.kernel_rules import FORK_MARK_OFFSET
    from fastpath.kernel.kernel_rules import ForkSpec as KernelFork

    plane, events = _plane(FakeNft(), FakeObjects({"unexpected4": (0, 0),
                                                    "unexpected6": (0, 0)}))
    caller, callee2 = ("198.51.100.10", 4000), ("198.51.100.71", 6000)
    a = LegSpec("A", "198.51.100.1", 31000, caller)
    b = LegSpec("B", "198.51.100.1", 31002, ("198.51.100.70", 5000))
    fa = LegSpec("A", "198.51.100.1", 31004, caller)
    fb = LegSpec("B", "198.51.100.1", 31002, callee2)
    early = SessionSpec(1, "c1", (StreamSpec(0, a, b),),
                        (ForkSpec(1, "t2", (StreamSpec(0, fa, fb),)),))
    assert plane.apply([Update(early, "B")]) == []
    (fork_uid,) = [uid for uid in plane.installed if uid < 0]
    assert isinstance(plane.installed[fork_uid], KernelFork)
    assert plane.fork_of[fork_uid] == (1, 1, 0)
    mark = 31004 + FORK_MARK_OFFSET
    owners = plane._owners()
    assert sorted(owners) == [31000, 31001, 31002, 31003, 31004, 31005, mark, mark + 1]
    assert owners[mark][:4] == (fork_uid, "B", False, ("198.51.100.1", 31002))
    # the second callee's early media: a flow of its own mark, replied by the caller
    plane.ct_dump.flows_now = [CtFlow(mark, 17, callee2[0], callee2[1], "198.51.100.1",
                                      31002, True, caller[0], caller[1], "198.51.100.1",
                                      31004, 2, 2 * 200, 1, 200)]
    plane._poll(1.0)
    (report,) = events
    assert report.sid == 1 and report.streams[0].b.in_packets == 0
    ((key, (fork_stream,)),) = report.forks
    assert key == 1 and fork_stream.b.in_packets == 2 and fork_stream.a.in_packets == 1
    assert fork_stream.b.latched == callee2 and fork_stream.a.latched == caller
    # the 200 picks the fork: the session's A side moves to its port, the fork unit goes
    won = SessionSpec(1, "c1", (StreamSpec(0, fa, fb),))
    assert plane.apply([Update(won, "B")]) == []
    assert [uid for uid in plane.installed if uid < 0] == [] and plane.fork_of == {}
    assert plane.session_forks == {}
    assert sorted(plane._owners()) == [31002, 31003, 31004, 31005]
    assert plane._owners()[31004][:2] == (unit_id(1, 0), "A")
    assert plane.apply([Update(early, "B")]) == []  # forks again, then all removed
    plane.apply([Remove(1, "c1", "deleted")])
    assert plane.installed == {} and plane.fork_of == {} and plane.session_forks == {}


def test_a_fork_whose_callee_already_sends_to_the_b_port_is_not_installed():
    from fastpath.contract import ForkSpec, Update

    plane, _events = _plane(FakeNft(), None)
    caller, callee = ("198.51.100.10", 4000), ("198.51.100.70", 5000)
    a = LegSpec("A", "198.51.100.1", 31000, caller)
    b = LegSpec("B", "198.51.100.1", 31002, callee)
    fork = StreamSpec(0, LegSpec("A", "198.51.100.1", 31004, caller),
                      LegSpec("B", "198.51.100.1", 31002, callee))
    spec = SessionSpec(1, "c1", (StreamSpec(0, a, b),), (ForkSpec(1, "t2", (fork,)),))
    assert plane.apply([Update(spec, "B")]) == []
    assert [uid for uid in plane.installed if uid < 0] == []
    assert sorted(plane._owners()) == [31000, 31001, 31002, 31003]
