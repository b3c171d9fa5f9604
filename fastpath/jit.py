"""PyPy JIT thresholds and GC nursery for long-running relay processes.

PyPy compiles a loop after ~1,000 iterations and a function after ~1,600 calls (its
defaults suit short scripts as well as servers). A relay's control path runs a few dozen
functions per request, each with its own counters, so with the defaults a fresh daemon
serves its first several thousand calls half-interpreted (measured: ~105 µs CPU per
request in the first 6,000 calls after 2,000 warm-up calls, ~65 µs once compiled). Lower
thresholds compile the hot paths sooner; the cost is compiling a few colder paths too.

The trace limit, in the workers only: a worker's per-packet loop inlines a packet's
whole path (parse, decide, write the frame) into one trace, longer than PyPy's default
limit of 6,000 operations allows when the JIT happens to trace it with more inlined at
once. Then the trace is aborted as too long, the process settles on a slower shape, and
keeps it for its lifetime. The AF_XDP worker's round (``bench/bench_micro.py -k
packet_worker``) in 8 fresh processes each: 13.5-15.5 us with the tuned thresholds and
the default limit (median 14.1), 12.7-13.6 with 15,000 (median 12.8); with PyPy's own
thresholds 5 of 8 processes were 15-20 % slower, none with 15,000 (docs/benchmarks.md,
section 9).
The daemon keeps the default: with 15,000 its control path compiled longer traces later,
and its first 30,000 calls ran 15-20 % slower (``bench.control_load``, 3+3 runs).

A no-op on CPython. The daemon and every worker apply the same setting (the workers add
the trace limit to "tuned").

The nursery (where PyPy allocates before a minor collection) can only be chosen before
the interpreter starts, by ``PYPY_GC_NURSERY``: PyPy sizes it from the CPU cache it finds
(1 MB on this project's VM, `gc.get_stats().nursery_size`), so a relay's short-lived
objects were collected every few requests. 64 MB cut the control plane's CPU per request
by about a quarter under PyPy (docs/benchmarks.md, section 1); 256 MB was no better.
The launchers set it (systemd unit, ``scripts/run.sh``, `lrk.demo.relay_process`), the
daemon passes it to its workers (`with_gc_nursery`); an operator's own value wins.
"""

from __future__ import annotations

import os
from typing import Dict, Mapping, Optional

from fastpath.errors import LrkError

#: lrk's default: compile after ~200 loop iterations / ~300 calls
TUNED = "threshold=200,function_threshold=300,trace_eagerness=50"
#: the same for a worker, whose per-packet loop is one trace up to 15,000 operations long
TUNED_WORKER = TUNED + ",trace_limit=15000"
#: the names `pypy_jit` takes besides an explicit parameter string
NAMED = {"tuned": TUNED, "pypy": ""}
#: PyPy's numeric JIT parameters (`pypy --jit help`)
PARAMS = ("threshold", "function_threshold", "trace_eagerness", "decay", "trace_limit",
          "inlining", "loop_longevity", "retrace_limit", "max_retrace_guards",
          "max_unroll_loops", "disable_unrolling", "max_unroll_recursion")


#: the nursery lrk's launchers give PyPy (``PYPY_GC_NURSERY``; ignored by CPython)
GC_NURSERY = "64M"
GC_NURSERY_ENV = "PYPY_GC_NURSERY"


def with_gc_nursery(env: Mapping[str, str]) -> Dict[str, str]:
    """A copy of `env` for a relay process: lrk's nursery unless `env` names one."""
    out = dict(env)
    if not out.get(GC_NURSERY_ENV):
        out[GC_NURSERY_ENV] = GC_NURSERY
    return out


def gc_nursery(env: Optional[Mapping[str, str]] = None) -> str:
    """The nursery this PyPy process started with, as its start line shows it."""
    value = (os.environ if env is None else env).get(GC_NURSERY_ENV)
    return value or "pypy-default"


class JitParamError(LrkError):
    """The `pypy_jit` setting is not one PyPy accepts."""


def resolve(setting: str, worker: bool = False) -> str:
    """`tuned`, `pypy` (PyPy's own defaults) or `name=value,...` as `pypyjit.set_param` takes;
    `worker`: for a worker process (`tuned` is `TUNED_WORKER` there)."""
    if worker and setting == "tuned":
        return TUNED_WORKER
    if setting in NAMED:
        return NAMED[setting]
    for part in setting.split(","):
        name, sep, value = part.partition("=")
        if not sep or name.strip() not in PARAMS or not value.strip().isdigit():
            raise JitParamError(f"pypy_jit {setting!r}: expected tuned, pypy, or "
                                f"name=number,... with names from {', '.join(PARAMS)} "
                                f"(e.g. {TUNED!r})")
    return setting


def apply(setting: str, worker: bool = False) -> bool:
    """Set this process's JIT parameters (`worker`: a worker's); False where there is no
    JIT (CPython)."""
    params = resolve(setting, worker)
    try:
        import pypyjit  # type: ignore[import-not-found]
    except ImportError:
        return False
    if params:
        try:
            pypyjit.set_param(params)
        except Exception as exc:  # PyPy raises its own errors for unknown names
            raise JitParamError(f"pypy_jit {setting!r}: PyPy refused it ({exc})") from exc
    return True
