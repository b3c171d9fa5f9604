"""PyPy JIT thresholds for long-running relay processes.

PyPy compiles a loop after ~1,000 iterations and a function after ~1,600 calls (its
defaults suit short scripts as well as servers). A relay's control path runs a few dozen
functions per request, each with its own counters, so with the defaults a fresh daemon
serves its first several thousand calls half-interpreted (measured: ~105 µs CPU per
request in the first 6,000 calls after 2,000 warm-up calls, ~65 µs once compiled). Lower
thresholds compile the hot paths sooner; the cost is compiling a few colder paths too.

A no-op on CPython. The daemon and every worker apply the same setting.
"""

from __future__ import annotations

from fastpath.errors import LrkError

#: lrk's default: compile after ~200 loop iterations / ~300 calls
TUNED = "threshold=200,function_threshold=300,trace_eagerness=50"
#: the names `pypy_jit` takes besides an explicit parameter string
NAMED = {"tuned": TUNED, "pypy": ""}
#: PyPy's numeric JIT parameters (`pypy --jit help`)
PARAMS = ("threshold", "function_threshold", "trace_eagerness", "decay", "trace_limit",
          "inlining", "loop_longevity", "retrace_limit", "max_retrace_guards",
          "max_unroll_loops", "disable_unrolling", "max_unroll_recursion")


class JitParamError(LrkError):
    """The `pypy_jit` setting is not one PyPy accepts."""


def resolve(setting: str) -> str:
    """`tuned`, `pypy` (PyPy's own defaults) or `name=value,...` as `pypyjit.set_param` takes."""
    if setting in NAMED:
        return NAMED[setting]
    for part in setting.split(","):
        name, sep, value = part.partition("=")
        if not sep or name.strip() not in PARAMS or not value.strip().isdigit():
            raise JitParamError(f"pypy_jit {setting!r}: expected tuned, pypy, or "
                                f"name=number,... with names from {', '.join(PARAMS)} "
                                f"(e.g. {TUNED!r})")
    return setting


def apply(setting: str) -> bool:
    """Set this process's JIT parameters; False where there is no JIT (CPython)."""
    params = resolve(setting)
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
