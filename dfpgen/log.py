"""``DFPGEN_VERBOSE=1``: one CSV-like stderr line per kernel build, cache hit or tuning lookup,
with its time, in the spirit of oneDNN's ``ONEDNN_VERBOSE``
(``dfpgen_verbose,<what>,<source>,<name>,<detail>``)."""
from __future__ import annotations

import sys

from .env import flag

ENV_VERBOSE = "DFPGEN_VERBOSE"


def verbose() -> bool:
    """``$DFPGEN_VERBOSE``: 1/on/yes/true or 0/off/no/false (default off); another value
    raises :class:`dfpgen.DfpError` naming the variable."""
    return flag(ENV_VERBOSE, False)


def line(*fields) -> None:
    """Print one verbose line (call only when :func:`verbose` is true)."""
    print(",".join(["dfpgen_verbose", *map(str, fields)]), file=sys.stderr)
