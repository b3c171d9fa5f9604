"""Which Python interpreters can run the relay (for the capacity benchmark).

Candidates, in order: the colon-separated paths of ``LRK_BENCH_PYTHONS`` (an
explicit choice wins), ``sys.executable``, then the repository's
``.venv/bin/python``, ``.venv-pypy/bin/python``, ``.tox/py311/bin/python`` and
``.tox/pypy3/bin/python``.  A candidate is kept when ``python -c "import lrk,
msgpack"`` works; the first usable one of each implementation is kept, labelled
``"cpython"`` or ``"pypy"``.

    python -m bench.interpreters          # prints what it found
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Dict, List, Optional

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

REPO_CANDIDATES = (
    ".venv/bin/python",
    ".venv-pypy/bin/python",
    ".tox/py311/bin/python",
    ".tox/pypy3/bin/python",
)
ENV_VAR = "LRK_BENCH_PYTHONS"
#: labels in the order results are listed
LABELS = ("cpython", "pypy")

_PROBE = (
    "import json, platform, sys; import lrk, msgpack; "
    "print(json.dumps({'impl': sys.implementation.name, "
    "'version': platform.python_version(), "
    "'pypy': '.'.join(map(str, sys.pypy_version_info[:3])) "
    "if hasattr(sys, 'pypy_version_info') else None}))"
)

_cache: Dict[str, Optional[dict]] = {}


def candidates(root: str = REPO_ROOT) -> List[str]:
    """Candidate interpreter paths, de-duplicated by absolute path (symlinks kept:
    a venv's python is a symlink whose venv-ness depends on its own path)."""
    paths: List[str] = []
    env = os.environ.get(ENV_VAR, "")
    paths.extend(p for p in env.split(":") if p.strip())
    if sys.executable:
        paths.append(sys.executable)
    paths.extend(os.path.join(root, rel) for rel in REPO_CANDIDATES)
    seen = set()
    out = []
    for p in paths:
        key = os.path.abspath(p.strip())
        if key not in seen:
            seen.add(key)
            out.append(key)
    return out


def probe(python: str, timeout: float = 60.0) -> Optional[dict]:
    """{"label", "python", "version"} when `python` can import lrk and msgpack, else None."""
    if python in _cache:
        return _cache[python]
    info = None
    if os.path.isfile(python) and os.access(python, os.X_OK):
        try:
            out = subprocess.run([python, "-c", _PROBE], capture_output=True, text=True,
                                 timeout=timeout, cwd=REPO_ROOT, check=False)
        except (OSError, subprocess.TimeoutExpired):
            out = None
        if out is not None and out.returncode == 0:
            try:
                data = json.loads(out.stdout.strip().splitlines()[-1])
            except (ValueError, IndexError):
                data = None
            if isinstance(data, dict) and data.get("impl") in LABELS:
                version = data["version"]
                if data.get("pypy"):
                    version += f" (PyPy {data['pypy']})"
                info = {"label": data["impl"], "python": python, "version": version}
    _cache[python] = info
    return info


def find_interpreters(root: str = REPO_ROOT) -> Dict[str, dict]:
    """{"cpython": info, "pypy": info}: one usable interpreter per implementation."""
    found: Dict[str, dict] = {}
    for python in candidates(root):
        info = probe(python)
        if info is not None and info["label"] not in found:
            found[info["label"]] = info
        if len(found) == len(LABELS):
            break
    return {label: found[label] for label in LABELS if label in found}


def pypy_or_current() -> str:
    """The PyPy interpreter when there is one (the faster load generator), else ours."""
    found = find_interpreters()
    if "pypy" in found:
        return found["pypy"]["python"]
    return sys.executable


def main() -> int:
    for label, info in find_interpreters().items():
        print(f"{label:8} {info['version']:28} {info['python']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
