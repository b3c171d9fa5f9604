"""`lrkproxy`: run the relay, talk to a running one, or run the built-in demo call."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import signal
import sys
from typing import Any, Dict, List, Optional

from fastpath import jit, logs
from lrk import __version__
from lrk.errors import ConfigError, LrkError

lifecycle = logging.getLogger("lrk.lifecycle")
#: options a SIGHUP applies while the relay is still starting (before it serves; then
#: the running relay's handler applies lrk.daemon.relay.RELOADABLE, far more)
RELOADABLE = ("log_level", "log_format")


def _use_uvloop() -> None:
    """uvloop on CPython when installed; PyPy keeps asyncio's loop (uvloop does not build there)."""
    if sys.implementation.name != "cpython":
        return
    try:
        import uvloop
    except ImportError:
        return
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


def _add_run(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("run", help="run the relay daemon")
    p.add_argument("--config", metavar="FILE", help="TOML file; every option can be set there")
    p.add_argument("--control", metavar="HOST:PORT", help="msgpack control address "
                   "(default 127.0.0.1:22222)")
    p.add_argument("--ports", metavar="START-END", help="relay port range (default 30000-40000)")
    p.add_argument("--internal-ip", action="append", metavar="IP",
                   help="relay address for the internal side; repeat for several, each with "
                   "its own port range (every mode; kernel, nfqueue and xdp give each its "
                   "own ct mark slot)")
    p.add_argument("--external-ip", action="append", metavar="IP",
                   help="relay address for the external side; repeat for several, each with "
                   "its own port range (as --internal-ip)")
    p.add_argument("--legacy", action="append", metavar="ADDR",
                   help="legacy lrkproxy (Kamailio module) listener: HOST:PORT, [IPv6]:PORT or "
                   "unix:/path; repeat for several; 'off' disables (default 127.0.0.1:22333)")
    p.add_argument("--packet-interface", action="append", metavar="IFACE",
                   dest="packet_interfaces",
                   help="packet mode: an interface whose media lrk reads with AF_PACKET "
                   "(repeat for several)")
    p.add_argument("--packet-io", choices=("tap", "af_xdp"),
                   help="packet mode: read media from AF_PACKET taps and send with raw "
                   "sockets (tap, default), or through AF_XDP sockets an XDP program "
                   "steers it into (af_xdp)")
    p.add_argument("--xdp-interface", action="append", metavar="IFACE",
                   dest="xdp_interfaces",
                   help="xdp mode: a media interface the XDP program attaches to "
                   "(repeat for several)")
    p.add_argument("--xdp-attach", choices=("auto", "native", "generic"),
                   help="xdp mode: native (driver) or generic (SKB) XDP; auto: native where "
                   "the driver allows (default)")
    p.add_argument("--mode", choices=("socket", "kernel", "nfqueue", "packet", "xdp"),
                   help="data plane: socket (default, no privileges), kernel (netfilter NAT) "
                   "nfqueue (NAT, each flow's first packet checked in userspace), packet "
                   "(AF_PACKET taps, userspace forwarding) or xdp (kernel mode with an XDP "
                   "program carrying established streams); all but socket need root")
    p.add_argument("--workers", type=int, metavar="N", help="relay worker processes (default 1)")
    p.add_argument("--silence-timeout", type=float, metavar="S", help="end sessions silent "
                   "this long (default 60)")
    p.add_argument("--max-lifetime", type=float, metavar="S", help="end sessions older than "
                   "this (default 10800, 0 = never)")
    p.add_argument("--log-level", choices=("debug", "info", "warning", "error"))
    p.add_argument("--log-format", choices=("kv", "json"))
    p.add_argument("--metrics", metavar="HOST:PORT", help="serve Prometheus metrics at "
                   "http://HOST:PORT/metrics ('off' disables; default off)")
    p.add_argument("--max-control-rate", type=float, metavar="N", help="control requests "
                   "per second accepted from one source address (default 0: no limit)")
    p.add_argument("--state-dir", metavar="DIR", help="keep sessions across restarts in a "
                   "SQLite file under DIR (default: off, sessions end with the process)")
    p.add_argument("--check-config", action="store_true", help="validate the configuration "
                   "(file and options), print a one-line summary and exit: 0 when valid, "
                   "2 with the error otherwise")


def _add_ctl(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("ctl", help="query or steer a running relay")
    p.add_argument("--node", default="udp:127.0.0.1:22222", help="relay control address "
                   "(udp:HOST:PORT, udp6:[HOST]:PORT or unix:/path; default "
                   "udp:127.0.0.1:22222)")
    p.add_argument("--timeout", type=float, default=1.0,
                   help="seconds to wait for a reply; a request is sent at most twice "
                   "(default 1)")
    p.add_argument("--json", action="store_true", help="print raw JSON instead of tables")
    p.add_argument("--key", metavar="FILE", help="control key to sign with: a key file or "
                   "directory, or 'none' for a relay with control_auth = \"none\" (default: "
                   "admin.key in $LRK_KEYS, /etc/lrk/keys as root, ~/.config/lrk/keys)")
    p.add_argument("--token", help=argparse.SUPPRESS)  # gone: says to use --key
    p.add_argument("--wait", action="store_true",
                   help="drain: return once the last call has ended")
    p.add_argument("--wait-timeout", type=float, default=0.0,
                   help="drain --wait: give up after this many seconds, exit code 3 "
                   "(0: never)")
    p.add_argument("--count", type=int, default=0,
                   help="top: refreshes before exiting (0: until Ctrl-C)")
    p.add_argument("--interval", type=float, default=1.0, help="top: seconds between refreshes")
    p.add_argument("command", choices=("ping", "list", "query", "stats", "delete", "capabilities",
                                       "drain", "undrain", "reload", "shutdown", "top",
                                       "takeover"))
    p.add_argument("call_id", nargs="?", help="Call-ID for query and delete; the node_id "
                   "whose calls to adopt for takeover")


def _add_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="relay a short simulated call on loopback and check it")
    p.add_argument("--packets", type=int, default=100, help="RTP packets each way (default 100)")
    p.add_argument("--ports", default="35000-35999", help="the demo relay's media port "
                   "range (default 35000-35999)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lrkproxy", description="lrk SIP media relay")
    parser.add_argument("--version", action="version", version=f"lrk {__version__}")
    sub = parser.add_subparsers(dest="action", required=True)
    _add_run(sub)
    _add_ctl(sub)
    _add_demo(sub)
    return parser


def _overrides(args: argparse.Namespace) -> Dict[str, Any]:
    return {
        "control": args.control, "ports": args.ports, **_addresses(args),
        "mode": args.mode, "workers": args.workers,
        "silence_timeout": args.silence_timeout, "max_lifetime": args.max_lifetime,
        "log_level": args.log_level, "log_format": args.log_format, "legacy": args.legacy,
        "packet_interfaces": args.packet_interfaces, "packet_io": args.packet_io,
        "metrics": args.metrics,
        "xdp_interfaces": args.xdp_interfaces, "xdp_attach": args.xdp_attach,
        "max_control_rate": args.max_control_rate, "state_dir": args.state_dir,
    }


def _addresses(args: argparse.Namespace) -> Dict[str, Any]:
    """--internal-ip / --external-ip replace the file's addresses of that side: one sets
    internal_ip (and internal_ips to it alone), several set internal_ips."""
    out: Dict[str, Any] = {}
    for side in ("internal", "external"):
        given = getattr(args, f"{side}_ip", None)
        if given is None:
            continue
        if isinstance(given, str):
            given = [given]
        out[f"{side}_ip"] = given[0]
        out[f"{side}_ips"] = list(given)
    return out


def config_summary(config: Any, path: Optional[str]) -> str:
    """One line: where the configuration came from and what the relay would serve."""
    start, end = config.port_range
    pairs = len(range(start + (start & 1), end, 2))
    if max(len(config.internal_ips), len(config.external_ips)) > 1:
        pairs *= len(config.relay_addresses)  # one range per relay address
    sessions = pairs // 2
    if config.max_sessions:
        sessions = min(sessions, config.max_sessions)
    legacy = ",".join(a for a in config.legacy if a not in ("off", "none", "")) or "off"
    rate = f"{config.max_control_rate:g}/s" if config.max_control_rate else "off"
    source = path if path else "defaults"
    metrics = "off"
    if config.metrics_addr is not None:
        host, port = config.metrics_addr
        metrics = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    mode = config.mode
    if mode == "packet":  # the I/O decides the capabilities (scripts/install.sh reads it)
        mode += f" packet_io={config.packet_io}"
    return (f"lrkproxy: configuration OK ({source}): mode={mode} "
            f"control={config.control} legacy={legacy} ports={config.ports} "
            f"({pairs} RTP/RTCP pairs, {sessions} sessions) "
            f"internal_ip={','.join(config.internal_ips)} "
            f"external_ip={','.join(config.external_ips)} workers={config.workers} "
            f"metrics={metrics} "
            f"max_control_rate={rate} log_level={config.log_level}")


def _reload(args: argparse.Namespace, config: Any, notifier: Any) -> None:
    """SIGHUP (`systemctl reload`): re-read and validate the configuration; apply the log
    settings; name the changed options that take a restart. A bad file changes nothing."""
    from lrk.daemon import config as config_mod

    notifier.reloading("reloading the configuration")
    try:
        fresh = config_mod.load(args.config, _overrides(args))
    except ConfigError as exc:
        lifecycle.error("reload: configuration not applied: %s", exc)
        notifier.ready("reload failed, running with the previous configuration")
        return
    logs.setup(fresh.log_level, fresh.log_format)
    restart = [f.name for f in dataclasses.fields(config)
               if f.name not in RELOADABLE and getattr(fresh, f.name) != getattr(config, f.name)]
    for name in RELOADABLE:
        setattr(config, name, getattr(fresh, name))
    if restart:
        lifecycle.warning("reload: log settings applied; %s changed and take a restart",
                          ", ".join(restart))
    else:
        lifecycle.info("reload: configuration re-read, log settings applied")
    notifier.ready("running")


def cmd_run(args: argparse.Namespace) -> int:
    from lrk.daemon import config as config_mod
    from lrk.daemon.sdnotify import process_notifier

    config = config_mod.load(args.config, _overrides(args))
    if args.check_config:
        print(config_summary(config, args.config))
        return 0
    # read NOTIFY_SOCKET before any worker starts, and keep it from them
    notifier = process_notifier()
    from lrk.daemon.relay import serve

    logs.setup(config.log_level, config.log_format)
    jit.apply(config.pypy_jit)  # before the hot paths warm up (no-op on CPython)
    _use_uvloop()

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()

        def on_stop() -> None:
            notifier.stopping("stopping")
            stop.set()

        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, on_stop)
        loop.add_signal_handler(signal.SIGHUP, _reload, args, config, notifier)  # until serve
        # WATCHDOG=1 from this loop (when the unit has WatchdogSec=): a stuck loop stops it
        watchdog = asyncio.ensure_future(notifier.run_watchdog())
        try:
            await serve(config, stop,
                        load_config=lambda: config_mod.load(args.config, _overrides(args)))
        finally:
            watchdog.cancel()

    try:
        asyncio.run(main())
    except (OSError, LrkError) as exc:
        print(f"lrkproxy: cannot start: {exc}", file=sys.stderr)
        return 1
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.action == "run":
            return cmd_run(args)
        if args.action == "ctl":
            from lrk.ctl import run_ctl

            return run_ctl(args)
        if args.action == "demo":
            from lrk.demo import run_demo

            return run_demo(args.packets, args.ports)
    except ConfigError as exc:
        print(f"lrkproxy: {exc}", file=sys.stderr)
        return 2
    except LrkError as exc:
        print(f"lrkproxy: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
