"""The AF_XDP steering program, loaded and typed (steer.bpf.c): UDP to the relay's media
ports into the AF_XDP socket of the receiving queue, the rest to the kernel.

`SteerProgram.load` compiles (cached) and loads it, `configure` sets the port range,
`attach` puts it on an interface (native first, generic when the driver refuses),
`register` names the socket of a queue, `close` detaches and releases everything.
"""

from __future__ import annotations

import logging
import os
import socket
import struct
from typing import Dict, List, Optional, Sequence, Tuple

from fastpath.xdp import build
from fastpath.xdp.errors import XdpAttachError
from fastpath.xdp.layout import verdict_totals
from fastpath.xdp.libbpf import (
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
from fastpath.xdp.program import MODES, detach_attached

log = logging.getLogger("lrk.xdp")

SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "steer.bpf.c")
#: per-CPU verdict counters, in the order of steer.bpf.c's enum
VERDICTS = ("steered", "pass_other", "pass_port", "pass_fragment", "pass_no_socket",
            "pass_address")


def addr_key(ip: str) -> bytes:
    """The map key of an address: 16 bytes, IPv4 as ::ffff:a.b.c.d."""
    if ":" in ip:
        return socket.inet_pton(socket.AF_INET6, ip.split("%", 1)[0])
    return b"\0" * 10 + b"\xff\xff" + socket.inet_aton(ip)


class SteerProgram:
    """One loaded steer.bpf.c: its XSKMAP (queue -> socket), its port range, its
    attachments."""

    def __init__(self, obj: BpfObject) -> None:
        self.obj = obj
        self.ncpus = num_cpus()
        self.xsks = BpfMap(obj.map_fd("xsks"), 4, 4)
        self.addrs = BpfMap(obj.map_fd("steer_addrs"), 16, 4)
        self.verdicts = BpfMap(obj.map_fd("steer_verdicts"), 4, 8, self.ncpus)
        self.prog_fd = obj.prog_fd("lrk_steer")
        #: ifindex -> (interface name, mode flags) of every attachment made here
        self.attached: Dict[int, Tuple[str, int]] = {}

    @classmethod
    def load(cls, path: Optional[str] = None) -> SteerProgram:
        obj = BpfObject(path or build.object_path(SOURCE))
        try:
            return cls(obj)
        except BaseException:
            obj.close()
            raise

    def configure(self, ranges: Sequence[Tuple[str, int, int]]) -> None:
        """Steer UDP to each (relay address, first port, last port); nothing else."""
        for ip, port_min, port_max in ranges:
            if not 0 < port_min <= port_max <= 65535:
                raise ValueError(f"port range {port_min}-{port_max} is not within 1-65535")
            self.addrs.update(addr_key(ip), struct.pack("HH", port_min, port_max))

    def register(self, queue: int, xsk_fd: int) -> None:
        """Frames steered on `queue` go to the AF_XDP socket `xsk_fd` from now on."""
        self.xsks.update(struct.pack("I", queue), struct.pack("I", xsk_fd))

    def attach(self, ifname: str, mode: str = "auto") -> str:
        """Attach to `ifname` (native, else generic for "auto"); returns the mode used.
        Another tool's XDP program is refused, never replaced; lrk's steering program
        left by a crashed run is detached first."""
        try:
            ifindex = if_nametoindex(ifname)
        except OSError as exc:
            raise XdpAttachError(f"no interface {ifname!r} in this network namespace") from exc
        for name, flags in MODES.items():
            prog_id = xdp_query_id(ifindex, flags)
            if not prog_id:
                continue
            owner = prog_name(prog_id)
            if owner != "lrk_steer":
                raise XdpAttachError(f"{ifname} already has an XDP program ({name} mode, id "
                                     f"{prog_id}, name {owner!r}): detach it (ip link set "
                                     f"dev {ifname} xdp off) or use packet_io = \"tap\"")
            # a crashed run's: its sockets are gone with their process, so it only passes
            log.warning("xdp: detaching lrk's steering program id %d left on %s by an "
                        "earlier run", prog_id, ifname)
            xdp_detach(ifindex, flags)
        tried: List[str] = []
        for name in (["native", "generic"] if mode == "auto" else [mode]):
            try:
                xdp_attach(ifindex, self.prog_fd, MODES[name])
            except XdpAttachError as exc:
                tried.append(f"{name}: {exc}")
                continue
            self.attached[ifindex] = (ifname, MODES[name])
            return name
        raise XdpAttachError(f"cannot attach the AF_XDP steering program to {ifname}: "
                             + "; ".join(tried) + " (needs root and a kernel with XDP)")

    def verdict_counts(self) -> Dict[str, int]:
        raws = [self.verdicts.lookup(struct.pack("I", i)) or bytes(8 * self.ncpus)
                for i in range(len(VERDICTS))]
        return verdict_totals(raws, self.ncpus, VERDICTS)

    def test_run(self, frame: bytes, ingress_ifindex: int = 0,
                 rx_queue: int = 0) -> Tuple[int, bytes]:
        verdict, out, _ = test_run(self.prog_fd, frame, ingress_ifindex, rx_queue=rx_queue)
        return verdict, out

    def close(self) -> None:
        """Detach from every interface attached here, then release the object."""
        detach_attached(self.attached)
        self.obj.close()
