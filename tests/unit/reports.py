"""Build data-plane reports for engine tests from a compact description."""

from __future__ import annotations

from typing import Any, Dict, Optional

from fastpath.contract import LegReport, SessionReport, StreamReport


def leg_report(counts: Optional[list] = None, gen: int = -1, latched: Any = None) -> LegReport:
    in_p, in_b, out_p, out_b, drops = counts or [0, 0, 0, 0, {}]
    rtp, rtcp = latched or (None, None)
    return LegReport(in_p, in_b, out_p, out_b, tuple(drops.items()), gen,
                     tuple(rtp) if rtp else None, tuple(rtcp) if rtcp else None)


def session_report(sid: int, description: Dict[str, Any]) -> SessionReport:
    """`description`: {"last_rx": t, "legs": {"A": {"c": [...], "gen": g, "latched": [...]}}}."""
    legs = description.get("legs", {})

    def leg(name: str) -> LegReport:
        d = legs.get(name)
        if d is None:
            return LegReport()
        return leg_report(d.get("c"), d.get("gen", -1), d.get("latched"))

    return SessionReport(sid, description.get("last_rx"),
                         (StreamReport(0, leg("A"), leg("B")),))


def feed(engine: Any, sid: int, description: Dict[str, Any]) -> None:
    engine.apply_report(session_report(sid, description))
