"""Kamailio (app_python3, KEMI) drives lrk: every media stream, through `lrk.client`.

`etc/kamailio/lrk_kemi.py` is the script Kamailio loads; it reads a config with
`load_config()` and hands Kamailio an `LrkKemi`, whose `lrk_manage` takes the place of
the lrkproxy module's `lrkproxy_manage()`. See docs/kamailio.md, "Every stream through
KEMI".
"""

from lrk.kemi.config import KemiConfig, client_options, from_mapping, load_config
from lrk.kemi.handler import LrkKemi, ManageArgs, parse_args

__all__ = ["KemiConfig", "LrkKemi", "ManageArgs", "client_options", "from_mapping",
           "load_config", "parse_args"]
