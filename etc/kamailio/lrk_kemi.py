"""Kamailio's app_python3 script: every media stream of a call through lrk (lrk.kemi).

Loaded by etc/kamailio/lrk-kemi.cfg:

    loadmodule "app_python3.so"
    modparam("app_python3", "load", "/etc/kamailio/lrk_kemi.py")
    ... python_exec("lrk_manage", "$avp(lrk_flags)") where lrkproxy_manage() was ...

Kamailio embeds Debian's CPython 3.11 (libpython3.11). This script makes lrk importable
there without installing anything into the system Python:

* the lrk checkout: $LRK_ROOT, else the checkout this file sits in (etc/kamailio/ of a
  checkout, also through a symlink), else /opt/lrk;
* its dependencies (msgpack, ...): the site-packages of the checkout's CPython venv,
  $LRK_VENV (default <checkout>/.venv, made by scripts/install.sh with /usr/bin/python3,
  the same CPython 3.11 Kamailio embeds); LRK_VENV="" uses the system's packages instead
  (apt install python3-msgpack).

The configuration is $LRK_KEMI_CONFIG, else lrk-kemi.toml next to this file.
Nothing here opens a socket: each Kamailio worker makes its own client on its first
message (lrk.kemi.LrkKemi).
"""

import os
import site
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))


def _checkout():
    root = os.environ.get("LRK_ROOT")
    if root:
        return root
    guess = os.path.dirname(os.path.dirname(os.path.dirname(os.path.realpath(__file__))))
    if os.path.isfile(os.path.join(guess, "lrk", "kemi", "__init__.py")):
        return guess
    return "/opt/lrk"


LRK_ROOT = _checkout()
LRK_VENV = os.environ.get("LRK_VENV", os.path.join(LRK_ROOT, ".venv"))
CONFIG = os.environ.get("LRK_KEMI_CONFIG") or os.path.join(_HERE, "lrk-kemi.toml")

if not os.path.isfile(os.path.join(LRK_ROOT, "lrk", "kemi", "__init__.py")):
    raise ImportError(f"lrk_kemi: no lrk checkout at {LRK_ROOT!r}; set LRK_ROOT")
if LRK_VENV:
    _SITE = os.path.join(LRK_VENV, "lib", f"python{sys.version_info[0]}.{sys.version_info[1]}",
                         "site-packages")
    if not os.path.isdir(_SITE):
        raise ImportError(
            f"lrk_kemi: {_SITE!r} does not exist: Kamailio embeds Python "
            f"{sys.version.split()[0]}, so the venv must be built with that interpreter "
            "(scripts/install.sh builds .venv with /usr/bin/python3); or set LRK_VENV=\"\" "
            "and install python3-msgpack")
    site.addsitedir(_SITE)
if LRK_ROOT not in sys.path:
    sys.path.insert(1, LRK_ROOT)  # after this file's directory, before site-packages

from lrk.kemi import LrkKemi, load_config  # noqa: E402


def mod_init():
    """Called once by app_python3 in Kamailio's main process: read and check the config
    and the control key; no socket (each worker makes its client on its first message)."""
    handler = LrkKemi(load_config(CONFIG))
    packages = _SITE if LRK_VENV else "the system's site-packages"
    handler.log("info", f"{handler.describe()}; lrk from {LRK_ROOT}, packages from {packages}")
    return handler
