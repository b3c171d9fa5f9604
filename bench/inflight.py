"""Requests in flight over one connected datagram socket: the benchmarks' client loop.

Each item (a call) is a fixed sequence of request datagrams (offer, answer, ...), sent
in order: the next step leaves when the reply to the previous one arrives. `window`
items are in flight at once. A quiet second means a request or reply was lost: every
request in flight is resent with its own cookie (the relay's retransmission cache
answers a duplicate with the first reply), so a lossy moment costs time, not items.
Shared by `bench.control_load` and `bench.many_sessions`.
"""

from __future__ import annotations

import select
import socket
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

#: a reply's cookie (None: not one of ours) and whether it reports success
Judge = Callable[[bytes], Tuple[Optional[str], bool]]


@dataclass
class Outcome:
    """What a `pipeline` run did: items finished, requests answered and their latencies."""

    done: int = 0
    errors: int = 0
    resent: int = 0
    stray: int = 0
    seconds: float = 0.0
    latencies: List[float] = field(default_factory=list)


def pipeline(sock: socket.socket, datagrams: Sequence[Sequence[bytes]], window: int,
             deadline: float, judge: Judge, cookie: Callable[[int, int], str]) -> Outcome:
    """Run every item's requests in order, `window` items in flight, until all are done
    or `deadline` seconds passed. `sock` is connected and non-blocking; `cookie(item,
    step)` is the cookie that request carries, which `judge` reads back from a reply."""
    out = Outcome()
    in_flight: Dict[str, Tuple[int, int, float]] = {}  # cookie -> (item, step, sent at)
    next_item = 0
    started = time.monotonic()
    stop_at = started + deadline

    def send(item: int, step: int) -> None:
        try:
            sock.send(datagrams[item][step])
        except (BlockingIOError, ConnectionRefusedError):
            pass  # counted as lost: resent after the quiet second
        in_flight[cookie(item, step)] = (item, step, time.monotonic())

    while next_item < min(window, len(datagrams)):
        send(next_item, 0)
        next_item += 1
    while in_flight and time.monotonic() < stop_at:
        ready, _, _ = select.select([sock], [], [], 1.0)
        if not ready:
            for item, step, _t in list(in_flight.values()):  # lost: resend, same cookie
                out.resent += 1
                send(item, step)
            continue
        while True:
            try:
                data = sock.recv(65535)
            except BlockingIOError:
                break
            except ConnectionRefusedError:
                continue
            key, ok = judge(data)
            entry = in_flight.pop(key, None) if key is not None else None
            if entry is None:
                out.stray += 1  # a late reply to a resent request, or garbage
                continue
            item, step, sent_at = entry
            out.latencies.append(time.monotonic() - sent_at)
            if not ok:
                out.errors += 1
            if step < len(datagrams[item]) - 1:
                send(item, step + 1)
            else:
                out.done += 1
                if next_item < len(datagrams):
                    send(next_item, 0)
                    next_item += 1
    out.seconds = time.monotonic() - started
    return out
