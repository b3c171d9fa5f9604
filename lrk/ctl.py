"""`lrkproxy ctl`: ask a running relay, print readable tables (or JSON)."""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any, Dict, List, Sequence, TextIO

from lrk.client import LrkClient
from lrk.client.errors import ClientError
from lrk.client.protocol import NO_KEY, resolve_key
from lrk.control.auth import default_key_dir


def table(headers: Sequence[str], rows: List[Sequence[Any]]) -> str:
    cells = [[str(h) for h in headers]] + [[_fmt(v) for v in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = ["  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row)).rstrip()
             for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, dict) and set(value) >= {"ip", "port"}:
        return f"{value['ip']}:{value['port']}"
    if isinstance(value, dict):
        return ",".join(f"{k}={v}" for k, v in value.items()) or "-"
    if isinstance(value, float):
        return f"{value:.1f}"
    return str(value)


def render(command: str, reply: Dict[str, Any]) -> str:
    if command == "ping":
        return "PONG"
    if command == "list":
        rows = [(s["call_id"], s["state"], s["age"], s["idle"],
                 "/".join(str(p) for p in s["ports"]), s["packets"]) for s in reply["sessions"]]
        text = table(("CALL-ID", "STATE", "AGE s", "IDLE s", "PORTS A/B", "PACKETS"), rows)
        return f"{text}\n{reply['total']} session(s)"
    if command in ("query", "delete"):
        s = reply["session"]
        head = (f"call {s['call_id']}  state {s['state']}  age {s['age']:.1f}s  "
                f"idle {s['idle']:.1f}s  timeout {s['timeout']:.0f}s")
        rows = []
        for name, leg in sorted(s["legs"].items()):
            c = leg["counters"]
            rows.append((name, leg["tag"], leg["relay"], leg["announced"], leg["latched"],
                         c["in_packets"], c["in_bytes"], c["out_packets"], c["out_bytes"],
                         c["drops"]))
        return head + "\n" + table(("LEG", "TAG", "RELAY", "ANNOUNCED", "LATCHED", "IN PKTS",
                                    "IN BYTES", "OUT PKTS", "OUT BYTES", "DROPS"), rows)
    if command == "stats":
        ports = reply["ports"]
        head = (f"uptime {reply['uptime']:.0f}s  sessions {reply['sessions']}  ports: "
                f"{ports['in_use']} in use, {ports['quarantined']} quarantined, "
                f"{ports['free']} free of {ports['total']}")
        rows = sorted(reply["counters"].items())
        return head + "\n" + table(("COUNTER", "VALUE"), rows)
    rows = [(k, v) for k, v in reply.items() if k not in ("v", "cookie", "ok")]
    return table(("KEY", "VALUE"), rows)


def run_ctl(args: argparse.Namespace, out: TextIO = sys.stdout) -> int:
    if args.command in ("query", "delete") and not args.call_id:
        print(f"lrkproxy ctl {args.command}: a Call-ID is required", file=sys.stderr)
        return 2
    if args.command == "takeover" and not args.call_id:
        print("lrkproxy ctl takeover: the node_id of the node whose calls to adopt is "
              "required", file=sys.stderr)
        return 2
    if getattr(args, "token", None):
        print("lrkproxy ctl: --token is gone: requests are signed with a key file; use --key "
              f"FILE (default: admin.key in {default_key_dir()}; docs/security.md)",
              file=sys.stderr)
        return 2
    try:
        # an admin key by default: ctl may see and end every call (docs/security.md)
        key = resolve_key(getattr(args, "key", None), admin=True) or NO_KEY
        with LrkClient([args.node], timeout=args.timeout, retries=2, key=key) as client:
            if args.command == "ping":
                reply = client.ping()
            elif args.command == "list":
                reply = client.list(limit=1000)
            elif args.command == "query":
                reply = client.query(args.call_id)
            elif args.command == "delete":
                reply = client.delete(args.call_id)
            elif args.command == "stats":
                reply = client.stats()
            elif args.command in ("drain", "undrain"):
                reply = client.drain(args.command == "drain")
                if args.command == "drain" and getattr(args, "wait", False):
                    reply = _wait_drained(client, reply, getattr(args, "wait_timeout", 0.0),
                                          out, args.json)
                    if reply is None:
                        return 3
            elif args.command == "reload":
                reply = client.reload()
            elif args.command == "shutdown":
                reply = client.shutdown()
            elif args.command == "takeover":
                reply = client.takeover(args.call_id)
            elif args.command == "top":
                return run_top(client, out, getattr(args, "count", 0),
                               getattr(args, "interval", 1.0), args.json)
            else:
                reply = client.capabilities()
    except ClientError as exc:
        print(f"lrkproxy ctl: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(reply, indent=2, default=_json_default), file=out)
    else:
        print(render(args.command, reply), file=out)
    return 0


def _wait_drained(client: LrkClient, reply: Dict[str, Any], limit: float, out: TextIO,
                  as_json: bool, poll: float = 0.5) -> Any:
    """Poll `stats` until the relay holds no call; None on `limit` (exit code 3)."""
    deadline = time.monotonic() + limit if limit > 0 else None
    sessions = reply.get("sessions", 0)
    while sessions:
        if deadline is not None and time.monotonic() >= deadline:
            print(f"lrkproxy ctl drain: {sessions} call(s) still up after {limit:.0f} s",
                  file=sys.stderr)
            return None
        if not as_json:
            print(f"draining: {sessions} call(s) left", file=out, flush=True)
        time.sleep(poll)  # pacing the poll of an observable, bounded by --wait-timeout
        sessions = client.stats()["sessions"]
    return dict(reply, sessions=0, drained=True)


#: counters `top` turns into rates (per second, from the difference of two readings)
TOP_RATES = (("pps in", ("media.received.packets", "media.forwarded.packets")),
             ("pps out", ("media.forwarded.packets",)))


def top_view(prev: Dict[str, Any], cur: Dict[str, Any], dt: float) -> Dict[str, Any]:
    """One `top` frame from two `stats` replies `dt` seconds apart (sans-IO, testable)."""
    c0, c1 = prev.get("counters", {}), cur.get("counters", {})

    def rate(names: Sequence[str]) -> float:
        for name in names:  # the first counter this mode keeps
            if name in c1:
                return max(0, c1[name] - c0.get(name, 0)) / dt if dt > 0 else 0.0
        return 0.0

    drops = {k[len("media.dropped."):]: v for k, v in sorted(c1.items())
             if k.startswith("media.dropped.") and v}
    return {
        "sessions": cur.get("sessions", 0),
        "draining": cur.get("draining", False),
        "pps_in": round(rate(TOP_RATES[0][1]), 1),
        "pps_out": round(rate(TOP_RATES[1][1]), 1),
        "drops": drops,
        "ports": cur.get("ports", {}),
        "uptime": cur.get("uptime", 0.0),
    }


def render_top(frame: Dict[str, Any]) -> str:
    ports = frame["ports"]
    lines = [
        f"lrk  up {frame['uptime']:.0f}s  sessions {frame['sessions']}"
        + ("  DRAINING" if frame["draining"] else ""),
        f"pps in {frame['pps_in']:.1f}  pps out {frame['pps_out']:.1f}",
        f"ports: {ports.get('in_use', 0)} in use, {ports.get('quarantined', 0)} quarantined, "
        f"{ports.get('free', 0)} free of {ports.get('total', 0)}",
    ]
    if frame["drops"]:
        lines.append(table(("DROPPED", "PACKETS"), sorted(frame["drops"].items())))
    else:
        lines.append("no drops")
    return "\n".join(lines)


def run_top(client: LrkClient, out: TextIO, count: int = 0, interval: float = 1.0,
            as_json: bool = False) -> int:
    """A live view refreshing every `interval` s; `count` frames (0: until Ctrl-C)."""
    prev = client.stats()
    t_prev = time.monotonic()
    shown = 0
    try:
        while count <= 0 or shown < count:
            time.sleep(interval)  # the refresh period of the view
            cur = client.stats()
            now = time.monotonic()
            frame = top_view(prev, cur, now - t_prev)
            prev, t_prev = cur, now
            if as_json:
                print(json.dumps(frame), file=out, flush=True)
            else:
                clear = "\x1b[H\x1b[2J" if out.isatty() else ""
                print(clear + render_top(frame), file=out, flush=True)
            shown += 1
    except KeyboardInterrupt:
        pass
    return 0


def _json_default(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    raise TypeError(type(value).__name__)
