"""PNG plots of a `bench.compare` report: one figure per question an operator asks.

Plotting is kept apart from measuring so that a report JSON from another machine can be
drawn again (`python -m bench.plots REPORT.json OUTDIR`), and so that the measuring
processes (PyPy) never import matplotlib: plots are drawn by CPython, after the run.
Every function takes the report dict and returns the paths it wrote; a section that is
missing from the report (a peer that could not run) yields no figure, not an error.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any, Callable, Dict, List, Optional, Sequence

#: fixed colours per relay, so every figure reads the same way
COLOURS = {
    "routing": "#9e9e9e", "static-nat": "#616161", "kernel": "#1565c0",
    "nfqueue": "#2e7d32", "socket": "#ef6c00", "packet": "#6a1b9a",
    "rtpengine": "#c62828", "lrk": "#ef6c00", "lrk-pypy": "#ef6c00",
    "lrk-cpython": "#ffb74d",
}


class PlotError(RuntimeError):
    """matplotlib is missing (install the `test` extra: scripts/install.sh does)."""


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError as exc:  # pragma: no cover - the test extra installs it
        raise PlotError("bench plots need matplotlib under CPython: run scripts/install.sh "
                        "(it installs the project's `test` extra)") from exc
    matplotlib.use("Agg")  # files only, never a display
    import matplotlib.pyplot as plt
    return plt


def _colour(name: str) -> str:
    return COLOURS.get(name, COLOURS.get(name.split("-")[0], "#455a64"))


def _save(fig: Any, outdir: str, name: str) -> str:
    path = os.path.join(outdir, name)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    _pyplot().close(fig)
    return path


def _grouped_bars(ax: Any, groups: Sequence[str], series: Dict[str, List[Optional[float]]],
                  fmt: str = "{:.0f}") -> None:
    """Bars per group (x) and series (colour), value labels on top; None leaves a gap."""
    n = max(len(series), 1)
    width = 0.8 / n
    for k, (name, values) in enumerate(series.items()):
        xs = [i - 0.4 + width * (k + 0.5) for i in range(len(groups))]
        hs = [v or 0.0 for v in values]
        bars = ax.bar(xs, hs, width, label=name, color=_colour(name))
        for bar, v in zip(bars, values):
            if v is not None:
                ax.annotate(fmt.format(v), (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                            ha="center", va="bottom", fontsize=7, rotation=90,
                            xytext=(0, 2), textcoords="offset points")
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels(groups)
    ax.legend(fontsize=8)
    ax.margins(y=0.2)


def _media(report: dict) -> List[dict]:
    return list((report.get("media") or {}).get("results") or [])


def _modes(results: List[dict]) -> List[str]:
    seen: List[str] = []
    for r in results:
        if r["mode"] not in seen:
            seen.append(r["mode"])
    return seen


def _per_session_count(report: dict, outdir: str, name: str, value: Callable[[dict], Any],
                       fmt: str, ylabel: str, title: str) -> List[str]:
    """One bar per media mode, grouped by session count."""
    results = _media(report)
    if not results:
        return []
    plt = _pyplot()
    counts = sorted({r["sessions"] for r in results})
    by = {(r["mode"], r["sessions"]): r for r in results}
    series = {m: [value(by.get((m, n)) or {}) for n in counts] for m in _modes(results)}
    fig, ax = plt.subplots(figsize=(9, 4.5))
    _grouped_bars(ax, [f"{n} session(s)" for n in counts], series, fmt)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    return [_save(fig, outdir, name)]


def capacity(report: dict, outdir: str) -> List[str]:
    return _per_session_count(
        report, outdir, "capacity.png", lambda r: r.get("capacity_pps"), "{:.0f}",
        "capacity, packets/s (< 1 % loss)",
        "Capacity: highest offered rate forwarded with < 1 % loss")


def loss_vs_offered(report: dict, outdir: str) -> List[str]:
    results = _media(report)
    if not results:
        return []
    plt = _pyplot()
    paths = []
    for n in sorted({r["sessions"] for r in results}):
        fig, ax = plt.subplots(figsize=(9, 4.5))
        for r in (r for r in results if r["sessions"] == n):
            steps = [s for s in r.get("steps") or [] if s.get("rate")]
            if r.get("overload"):
                steps.append(r["overload"])
            pts = sorted((s["achieved_rate"] or s["rate"], 100.0 * s["loss"]) for s in steps)
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", ms=3,
                        label=r["mode"], color=_colour(r["mode"]))
        ax.axhline(1.0, color="black", lw=0.6, ls="--")
        ax.set_yscale("symlog", linthresh=1.0)
        ax.set_ylim(bottom=0)
        ax.set_xlabel("offered (achieved by the generator), packets/s")
        ax.set_ylabel("loss, % (symlog)")
        ax.set_title(f"Loss against offered rate, {n} session(s)")
        ax.legend(fontsize=8)
        paths.append(_save(fig, outdir, f"loss_vs_offered_{n}.png"))
    return paths


def cpu_per_packet(report: dict, outdir: str) -> List[str]:
    rate = (report.get("media") or {}).get("options", {}).get("cpu_rate")
    return _per_session_count(
        report, outdir, "cpu_per_packet.png",
        lambda r: (r.get("cpu") or {}).get("relay_ns_us"), "{:.2f}",
        "CPU µs per packet (relay namespace)",
        f"CPU per packet at equal load ({rate} packets/s)")


def latency(report: dict, outdir: str) -> List[str]:
    calls = (report.get("calls") or {}).get("results") or []
    calls = [c for c in calls if c.get("latency_ms")]
    if not calls:
        return []
    plt = _pyplot()
    keys = ("p50", "p90", "p99")
    fig, ax = plt.subplots(figsize=(9, 4.5))
    _grouped_bars(ax, list(keys), {c["mode"]: [c["latency_ms"].get(k) for k in keys]
                                   for c in calls}, "{:.2f}")
    info = report.get("calls") or {}
    ax.set_ylabel("added one-way latency, ms")
    ax.set_title(f"Latency percentiles: {info.get('calls')} calls at "
                 f"{info.get('pps_per_stream')} packets/s per direction")
    return [_save(fig, outdir, "latency.png")]


def memory(report: dict, outdir: str) -> List[str]:
    rows = [r for r in (report.get("calls") or {}).get("results") or []
            if (r.get("memory") or {}).get("rss_bytes_per_session") is not None]
    if not rows:
        return []
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 4))
    groups = ["relay processes (RSS)", "kernel (slab)"]
    _grouped_bars(ax, groups, {
        r["mode"]: [r["memory"]["rss_bytes_per_session"] / 1024.0,
                    None if r["memory"].get("slab_bytes_per_session") is None
                    else r["memory"]["slab_bytes_per_session"] / 1024.0]
        for r in rows}, "{:.1f}")
    ax.set_ylabel("KiB per session")
    ax.set_title("Memory per session")
    return [_save(fig, outdir, "memory_per_session.png")]


def control(report: dict, outdir: str) -> List[str]:
    rows = [r for r in (report.get("control") or {}).get("results") or []
            if r.get("req_per_s")]
    if not rows:
        return []
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    _grouped_bars(ax, ["offer+answer+delete"], {r["peer"]: [r["req_per_s"]] for r in rows})
    ax.set_ylabel("requests/s")
    ax.set_title("Control plane: pipelined offer + answer + delete")
    return [_save(fig, outdir, "control.png")]


FIGURES = (capacity, loss_vs_offered, cpu_per_packet, latency, memory, control)


def draw_all(report: dict, outdir: str) -> List[str]:
    """Every figure the report has data for; returns the files written."""
    os.makedirs(outdir, exist_ok=True)
    paths: List[str] = []
    for figure in FIGURES:
        paths.extend(figure(report, outdir))
    return paths


def draw_in_cpython(report_path: str, outdir: str, python: Optional[str] = None) -> List[str]:
    """Draw from any interpreter: runs `python -m bench.plots` under CPython (PyPy has no
    matplotlib here). Raises PlotError with the child's message when it fails."""
    import subprocess

    from bench.interpreters import REPO_ROOT, find_interpreters

    python = python or (find_interpreters().get("cpython") or {}).get("python")
    if not python:
        raise PlotError("no CPython interpreter with lrk installed: run scripts/install.sh")
    env = dict(os.environ)
    env["PYTHONPATH"] = REPO_ROOT + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([python, "-m", "bench.plots", report_path, outdir], cwd=REPO_ROOT,
                          env=env, capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        raise PlotError(f"plotting failed: {proc.stderr.strip()[-1500:]}")
    return [line for line in proc.stdout.splitlines() if line.strip()]


def main(argv: Optional[List[str]] = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2:
        print("usage: python -m bench.plots REPORT.json OUTDIR", file=sys.stderr)
        return 2
    with open(args[0]) as fh:
        report = json.load(fh)
    for path in draw_all(report, args[1]):
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
