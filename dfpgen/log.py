"""``DFPGEN_VERBOSE=1``: one CSV-like stderr line per kernel build, cache hit or tuning lookup,
with its time, in the spirit of oneDNN's ``ONEDNN_VERBOSE``
(``dfpgen_verbose,<what>,<source>,<name>,<detail>``)."""
from __future__ import annotations

import os
import sys

ENV_VERBOSE = "DFPGEN_VERBOSE"


def verbose() -> bool:
    """Whether ``$DFPGEN_VERBOSE`` asks for the lines (unset, empty or ``0``: no)."""
    return os.environ.get(ENV_VERBOSE, "") not in ("", "0")


def line(*fields) -> None:
    """Print one verbose line (call only when :func:`verbose` is true)."""
    print(",".join(["dfpgen_verbose", *map(str, fields)]), file=sys.stderr)
