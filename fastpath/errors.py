"""The root of lrk's typed errors, here so that data-plane code never imports `lrk`.

`lrk.errors` re-exports `LrkError` and derives every control-plane error from it.
"""

from __future__ import annotations


class LrkError(Exception):
    """Base of every error lrk raises on purpose."""

    code = "internal"
