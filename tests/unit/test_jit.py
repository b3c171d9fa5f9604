"""fastpath.jit: the PyPy JIT setting of the daemon and its workers."""

import platform
import subprocess
import sys
from pathlib import Path

import pytest

from fastpath import jit
from lrk.daemon.config import load
from lrk.errors import ConfigError


def test_named_settings_resolve():
    assert jit.resolve("tuned") == jit.TUNED
    assert jit.resolve("pypy") == ""  # PyPy's own defaults: nothing set
    assert jit.resolve("threshold=500,function_threshold=800") == \
        "threshold=500,function_threshold=800"


@pytest.mark.parametrize("bad", ["fast", "threshold", "threshold=abc", "=5", "threshold=5,",
                                 "thres hold=5", "nosuchparam=5"])
def test_malformed_settings_are_refused_with_an_example(bad):
    with pytest.raises(jit.JitParamError, match="name=number"):
        jit.resolve(bad)


def test_config_default_is_tuned_and_bad_values_are_config_errors():
    assert load(None, {}).pypy_jit == "tuned"
    assert load(None, {"pypy_jit": "pypy"}).pypy_jit == "pypy"
    with pytest.raises(ConfigError, match="pypy_jit"):
        load(None, {"pypy_jit": "warp=9"})
    with pytest.raises(ConfigError, match="pypy_jit"):
        load(None, {"pypy_jit": 3})


def test_apply_sets_the_jit_on_pypy_only():
    assert jit.apply("pypy") is (platform.python_implementation() == "PyPy")


def test_pypy_takes_the_workers_tuned_profile_and_its_trace_limit():
    """In a child process (the parameters stay PyPy's in this one): PyPy refuses a trace
    limit above its maximum, so the worker profile's 15,000 is checked where it applies.
    The daemon's profile leaves the limit alone; explicit parameters are taken as they
    are in a worker too."""
    assert jit.resolve("tuned", worker=True) == jit.TUNED + ",trace_limit=15000"
    assert "trace_limit" not in jit.resolve("tuned")
    assert jit.resolve("pypy", worker=True) == ""
    assert jit.resolve("threshold=500", worker=True) == "threshold=500"
    code = "from fastpath import jit\nprint(jit.apply('tuned', worker=True))\n"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60, check=True).stdout
    assert out.strip() == str(platform.python_implementation() == "PyPy")


def test_a_value_pypy_refuses_is_a_typed_error_on_pypy():
    """In a child process: the parameters stay PyPy's in this one (a trace limit this
    high is refused by PyPy itself)."""
    code = ("from fastpath import jit\n"
            "try:\n    jit.apply('trace_limit=30000')\n"
            "except jit.JitParamError as e:\n    print('refused', e)\n"
            "else:\n    print('applied')\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60, check=True).stdout
    if platform.python_implementation() == "PyPy":
        assert out.startswith("refused") and "trace_limit=30000" in out
    else:
        assert out.startswith("applied")  # no JIT: nothing to refuse, nothing set


def test_the_nursery_is_added_unless_the_environment_names_one():
    base = {"PATH": "/bin"}
    assert jit.with_gc_nursery(base) == {"PATH": "/bin", jit.GC_NURSERY_ENV: jit.GC_NURSERY}
    assert base == {"PATH": "/bin"}, "the caller's mapping is left alone"
    assert jit.with_gc_nursery({jit.GC_NURSERY_ENV: "8M"})[jit.GC_NURSERY_ENV] == "8M"
    assert jit.with_gc_nursery({jit.GC_NURSERY_ENV: ""})[jit.GC_NURSERY_ENV] == jit.GC_NURSERY
    assert jit.gc_nursery({}) == "pypy-default"
    assert jit.gc_nursery({jit.GC_NURSERY_ENV: "8M"}) == "8M"


def test_every_launcher_gives_the_same_nursery():
    root = Path(__file__).resolve().parents[2]
    unit = (root / "etc" / "systemd" / "lrkproxy.service").read_text(encoding="utf-8")
    assert f"Environment={jit.GC_NURSERY_ENV}={jit.GC_NURSERY}\n" in unit
    run_sh = (root / "scripts" / "run.sh").read_text(encoding="utf-8")
    assert f'export {jit.GC_NURSERY_ENV}="${{{jit.GC_NURSERY_ENV}:-{jit.GC_NURSERY}}}"' in run_sh
