"""The loaded relay program and its maps, typed: what the XDP plane and the tests use.

`XdpProgram.load` compiles (cached) and loads relay.bpf.c; `attach` puts it on an
interface, native (driver) mode first and generic (SKB) mode when the driver refuses,
and says which; `close` detaches from every interface it attached and releases the
object, so no program or map of lrk outlives it (the kernel frees both with the last
fd and attachment).
"""

from __future__ import annotations

import logging
import socket
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

from fastpath.xdp import build, layout
from fastpath.xdp.errors import XdpAttachError, XdpError
from fastpath.xdp.libbpf import (
    XDP_FLAGS_DRV_MODE,
    XDP_FLAGS_SKB_MODE,
    BpfMap,
    BpfObject,
    if_nametoindex,
    num_cpus,
    prog_name,
    test_run,
    xdp_attach,
    xdp_detach,
    xdp_query_id,
)

log = logging.getLogger("lrk.xdp")

MODES = {"native": XDP_FLAGS_DRV_MODE, "generic": XDP_FLAGS_SKB_MODE}
#: from this many slots on, `read_counters` reads the array in batches
BATCH_FROM = 256


class XdpProgram:
    """One loaded copy of relay.bpf.c (a stream array of `stream_slots` entries, one per
    relay address and port, and `max_counters` counter slots)."""

    def __init__(self, obj: BpfObject, max_counters: int, stream_slots: int) -> None:
        self.obj = obj
        self.ncpus = num_cpus()
        self.max_counters = max_counters
        self.stream_slots = stream_slots
        #: relay address (packed) -> its block's first index; the range, from `configure`
        self._base: Dict[bytes, int] = {}
        #: the same by the address's spelling, filled as addresses are asked for (an
        #: install asks for each of its entries: no address parsing after the first)
        self._base_by_ip: Dict[str, Optional[int]] = {}
        self._range = (1, 0)
        self.streams = BpfMap(obj.map_fd("streams"), 4, layout.VAL_SIZE)
        self.counters = BpfMap(obj.map_fd("stream_counters"), 4, layout.COUNTER_SIZE,
                               self.ncpus)
        self.verdicts = BpfMap(obj.map_fd("verdicts"), 4, 8, self.ncpus)
        self.config = BpfMap(obj.map_fd("config"), 4, layout.CONFIG_SIZE)
        self.relay_addrs = BpfMap(obj.map_fd("relay_addrs"), 20, 4)
        self.tx_ifaces = BpfMap(obj.map_fd("tx_ifaces"), 4, 4)
        self.relay_fd = obj.prog_fd("lrk_relay")
        #: ifindex -> (interface name, mode flags) of every attachment made here
        self.attached: Dict[int, Tuple[str, int]] = {}

    @classmethod
    def load(cls, max_streams: int = 65536, max_counters: int = 65536,
             path: Optional[str] = None, stream_slots: Optional[int] = None) -> XdpProgram:
        """`stream_slots`: the stream array's size, at least the relay addresses times
        the ports of the range that `configure` will get (default `max_streams`)."""
        slots = max_streams if stream_slots is None else stream_slots
        obj = BpfObject(path or build.object_path(),
                        {"streams": slots, "stream_counters": max_counters})
        try:
            return cls(obj, max_counters, slots)
        except BaseException:
            obj.close()
            raise

    # -- configuration -------------------------------------------------------------------
    def configure(self, port_min: int, port_max: int, relay_ips: Sequence[str]) -> None:
        """The relay's port range and addresses: the program owns UDP to these only.
        Each address gets its block of the stream array, in the order given."""
        span = port_max - port_min + 1
        addrs = dict.fromkeys(layout.packed(ip) for ip in relay_ips)  # one block each
        need = len(addrs) * span
        if need > self.stream_slots:
            raise XdpError(f"the stream array has {self.stream_slots} entries and "
                           f"{len(addrs)} relay address(es) x {span} ports need {need}: "
                           f"load it with stream_slots >= {need}")
        self._range = (port_min, port_max)
        self._base = {addr: n * span for n, addr in enumerate(addrs)}
        self._base_by_ip = {}
        blocks = {layout.packed(ip): ip for ip in relay_ips}  # one spelling each
        for ip in relay_ips:
            self.relay_addrs.update(layout.addr_key(ip), layout.u32(self._block(ip)))
        self.config.update(layout.u32(0), layout.config_value(
            port_min, port_max, [(ip, self._base[addr]) for addr, ip in blocks.items()]))

    def _block(self, ip: str) -> Optional[int]:
        """The first index of `ip`'s block; None when the program does not serve it."""
        try:
            return self._base_by_ip[ip]
        except KeyError:
            base = self._base_by_ip[ip] = self._base.get(layout.packed(ip))
            return base

    def owns(self, ip: str) -> bool:
        """`ip` is one of the relay addresses the program serves (`configure`)."""
        return self._block(ip) is not None

    def index(self, relay: Tuple[str, int]) -> int:
        """The stream array index of a relay address and port (XdpError: not the
        relay's)."""
        base = self._block(relay[0])
        if base is None:
            raise XdpError(f"{relay[0]} is not one of the relay addresses the program "
                           "was configured with")
        try:
            return layout.stream_index(base, self._range[0], self._range[1], relay[1])
        except ValueError as exc:
            raise XdpError(str(exc)) from None

    def put(self, entry: layout.Entry, seen: int = layout.SEEN_NONE) -> None:
        peer = self.index(entry.peer) if entry.peer is not None \
            and self.owns(entry.peer[0]) else None
        self.streams.update(layout.u32(self.index(entry.relay)),
                            entry.value(seen, peer))

    def remove(self, relay: Tuple[str, int]) -> bool:
        """Zero a relay port's entry; False when no stream was there."""
        key = layout.u32(self.index(relay))
        raw = self.streams.lookup(key)
        if raw is None or not layout.live(raw):
            return False
        self.streams.update(key, bytes(layout.VAL_SIZE))
        return True

    def seen(self, relay: Tuple[str, int]) -> int:
        """What the program saw at an entry (layout.SEEN_*; SEEN_NONE without one)."""
        raw = self.streams.lookup(layout.u32(self.index(relay)))
        return layout.seen(raw) if raw is not None else layout.SEEN_NONE

    def read_counter(self, index: int) -> Tuple[int, int, int]:
        """(packets, payload bytes, last packet ns on CLOCK_MONOTONIC; 0: none)."""
        raw = self.counters.lookup(layout.u32(index))
        return layout.counters(raw, self.ncpus) if raw else (0, 0, 0)

    def read_counters(self, indexes: Iterable[int]) -> Dict[int, Tuple[int, int, int]]:
        """`read_counter` of many slots: a few batch reads of the array up to the highest
        index asked (one syscall per 8,192 slots) where there are many, one lookup each
        where there are few."""
        wanted = sorted(set(indexes))
        if len(wanted) < BATCH_FROM:
            return {i: self.read_counter(i) for i in wanted}
        raw = self.read_raw(wanted[-1] + 1)
        return {i: self.parse_slot(raw, i) for i in wanted}

    @property
    def slot_size(self) -> int:
        """Bytes of one slot in `read_raw`'s buffer (its per-CPU values)."""
        return self.counters._stride * self.ncpus

    def read_raw(self, count: int) -> bytes:
        """Slots 0..count-1 as one buffer, in batch reads (`parse_slot` reads one)."""
        return self.counters.lookup_array(count) if count > 0 else b""

    def parse_slot(self, raw: bytes, index: int) -> Tuple[int, int, int]:
        """`read_counter`'s value of slot `index` in a `read_raw` buffer."""
        offset = index * self.slot_size
        if offset + self.slot_size > len(raw):
            return (0, 0, 0)
        return layout.counters(raw, self.ncpus, offset)

    def reset_counter(self, index: int) -> None:
        self.counters.update(layout.u32(index), bytes(layout.COUNTER_SIZE))

    def verdict_counts(self) -> Dict[str, int]:
        raws = [self.verdicts.lookup(layout.u32(i)) or bytes(8 * self.ncpus)
                for i in range(len(layout.REASONS))]
        return layout.verdict_totals(raws, self.ncpus)

    # -- attachment ----------------------------------------------------------------------
    def attachable(self, ifname: str) -> int:
        """Check, without attaching, that `ifname` exists here and holds no other tool's
        XDP program (lrk's own leftover is replaced by `attach`); returns its ifindex.
        The plane checks at start and attaches once the restore is over."""
        try:
            ifindex = if_nametoindex(ifname)
        except OSError as exc:
            raise XdpAttachError(f"xdp_interfaces names {ifname!r}, which does not exist in "
                                 "the relay's network namespace") from exc
        self._leftover(ifname, ifindex)
        return ifindex

    def attach(self, ifname: str, mode: str = "auto") -> str:
        """Attach to `ifname`: native where the driver allows, else generic ("auto"), or
        the one mode asked for. Returns the mode used; raises XdpAttachError naming what
        is missing. lrk's program left by a crashed run is replaced in one step where the
        mode allows (the interface is never without a program meanwhile: the old one
        forwards with its entries until the new one takes over)."""
        ifindex = self.attachable(ifname)
        left = self._leftover(ifname, ifindex)
        names = ["native", "generic"] if mode == "auto" else [mode]
        if left is not None:
            prog_id, old = left
            if old in names:  # the same mode: an atomic replacement, tried first
                names.remove(old)
                names.insert(0, old)
                log.warning("xdp: replacing lrk's program id %d left on %s (%s mode) by an "
                            "earlier run", prog_id, ifname, old)
            else:
                log.warning("xdp: detaching lrk's program id %d left on %s (%s mode) by an "
                            "earlier run", prog_id, ifname, old)
                xdp_detach(ifindex, MODES[old])
        tried: List[str] = []
        for name in names:
            flags = MODES[name]
            try:
                xdp_attach(ifindex, self.relay_fd, flags)
            except XdpAttachError as exc:
                tried.append(f"{name}: {exc}")
                if left is not None and name == left[1]:  # not replaced: out of the way
                    xdp_detach(ifindex, flags)
                continue
            self.attached[ifindex] = (ifname, flags)
            self.allow_egress(ifindex)
            return name
        hint = ("attaching XDP needs CAP_NET_ADMIN and CAP_BPF (run as root) and a kernel "
                "with XDP; another XDP program on the interface is not replaced")
        raise XdpAttachError(f"cannot attach XDP to {ifname}: " + "; ".join(tried)
                             + f" ({hint}); --mode kernel works without XDP")

    def allow_egress(self, ifindex: int) -> None:
        """Let the program send out of `ifindex` (attach does it for its interface);
        frames whose next hop is elsewhere go to the kernel path."""
        key = layout.u32(ifindex)
        self.tx_ifaces.update(key, key)

    def _leftover(self, ifname: str, ifindex: int) -> Optional[Tuple[int, str]]:
        """(program id, mode) of lrk's program on the interface that this object did not
        attach (a crashed run's: an attachment outlives its process), or None. Another
        tool's program is never touched: XdpAttachError."""
        for name, flags in MODES.items():
            try:
                prog_id = xdp_query_id(ifindex, flags)
            except XdpError:
                continue
            if not prog_id or self.attached.get(ifindex, (None, None))[1] == flags:
                continue
            try:
                owner = prog_name(prog_id)
            except XdpError as exc:
                raise XdpAttachError(f"{ifname} already has an XDP program ({name} mode, id "
                                     f"{prog_id}) and lrk cannot tell whose: {exc}") from exc
            if owner != "lrk_relay":
                raise XdpAttachError(
                    f"{ifname} already has an XDP program ({name} mode, id {prog_id}, "
                    f"name {owner!r}) that is not lrk's: detach it "
                    f"(ip link set dev {ifname} xdp off) or use --mode kernel")
            return prog_id, name
        return None

    def detach_all(self) -> List[str]:
        """Detach from every interface attached here; errors logged, names returned."""
        return detach_attached(self.attached)

    def close(self) -> None:
        self.detach_all()
        self.obj.close()

    def release(self) -> None:
        """Let go of the object and keep every attachment: the kernel holds the program
        and its maps through them, and it forwards on with the entries it has until
        another `attach` replaces it (a restart that keeps calls)."""
        self.attached.clear()
        self.obj.close()

    def test_run(self, frame: bytes, ingress_ifindex: int = 0) -> Tuple[int, bytes]:
        verdict, out, _ = test_run(self.relay_fd, frame, ingress_ifindex)
        return verdict, out


def detach_attached(attached: Dict[int, Tuple[str, int]]) -> List[str]:
    """Detach the program of each attachment in `attached` (ifindex -> (name, mode
    flags)) and drop it from there; one that fails is logged and kept. Returns the
    names of those that failed."""
    failed = []
    for ifindex, (ifname, flags) in list(attached.items()):
        try:
            if xdp_query_id(ifindex, flags) != 0:
                xdp_detach(ifindex, flags)
        except XdpError as exc:
            log.error("could not detach XDP from %s: %s", ifname, exc)
            failed.append(ifname)
            continue
        del attached[ifindex]
    return failed


#: lrk's XDP programs by name: xdp mode's relay, packet mode's AF_XDP steering
LRK_PROGRAMS = ("lrk_relay", "lrk_steer")


def detach_leftovers(names: Sequence[str] = LRK_PROGRAMS) -> List[str]:
    """Detach lrk's XDP programs named `names` left attached in this network namespace
    by a run that kept its calls or crashed (an attachment outlives its process): a
    relay started in another mode must not have them take its ports' packets, and a
    steering program is never adopted (its sockets died with their worker). Other
    tools' programs are never touched. Returns "ifname (mode, name)" for each one."""
    done: List[str] = []
    for ifindex, ifname in _interfaces():
        for mode, flags in MODES.items():
            try:
                prog_id = xdp_query_id(ifindex, flags)
                name = prog_name(prog_id) if prog_id else ""
                if name in names:
                    xdp_detach(ifindex, flags)
                    done.append(f"{ifname} ({mode}, {name})")
            except XdpError as exc:
                log.debug("xdp: cannot check %s (%s): %s", ifname, mode, exc)
    return done


def _interfaces() -> List[Tuple[int, str]]:
    """(ifindex, name) of this thread's network namespace (PyPy 3.9's socket module has
    no if_nameindex: /proc/thread-self/net/dev lists the same names)."""
    if hasattr(socket, "if_nameindex"):
        return list(socket.if_nameindex())
    out = []
    with open("/proc/thread-self/net/dev") as fh:
        for line in fh.readlines()[2:]:  # two header lines
            name = line.split(":", 1)[0].strip()
            try:
                out.append((if_nametoindex(name), name))
            except OSError:
                continue  # gone since
    return out
