"""`lrkproxy ctl`: ask a running relay, print readable tables (or JSON)."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any, Dict, List, Sequence, TextIO

from lrk.client import LrkClient
from lrk.client.errors import ClientError


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
    try:
        with LrkClient([args.node], timeout=args.timeout, retries=2,
                       token=args.token) as client:
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


def _json_default(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    raise TypeError(type(value).__name__)
