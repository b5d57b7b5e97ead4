"""Environment variables, read and validated in one place.

Each variable is checked like its Python API twin, against the same range, and a bad value is
a :class:`DfpError` whose one-line message names the variable, the accepted values and what
was found. An unset or empty (or all-blank) variable means the default.

========================  =====================================================  ===========
variable                  values                                                 default
========================  =====================================================  ===========
``DFPGEN_NUM_THREADS``    an integer >= 0; 0 means the default (as ``threads=0``)  CPUs of the process
``DFPGEN_THREADING``      openmp (the process's OpenMP team) or python (own pool)  openmp
``DFPGEN_CACHE``          1/on/yes/true (disk cache) or 0/off/no/false (memory)    on
``DFPGEN_CACHE_DIR``      a directory path (created on first write)               user cache dir
``DFPGEN_ISA``            avx512_vnni, vnni256, avx2, generic (any case)          best for the CPU
``DFPGEN_VERBOSE``        1/on/yes/true or 0/off/no/false                         off
``DFPGEN_DISABLE``        1/on/yes/true (DFP layers run FP32) or 0/off/no/false   off
========================  =====================================================  ===========
"""
from __future__ import annotations

import os

from .errors import DfpError

TRUE_WORDS = ("1", "on", "yes", "true")
FALSE_WORDS = ("0", "off", "no", "false")


# os.environ's own mapping of encoded names (POSIX CPython): every call of every pass reads a
# few of these variables, and os.environ.get encodes the name and decodes the value each time
# (~2 us; a small layer's forward + backward read about 40). Reading the live mapping with
# the name encoded once sees every os.environ change as os.environ.get does.
_ENVIRON = os.environ
_DATA = getattr(os.environ, "_data", None) if os.name == "posix" else None
_KEYS: dict[str, bytes] = {}


def raw(name: str) -> str | None:
    """The stripped value of ``name``, or None when it is unset or blank."""
    if _DATA is not None and os.environ is _ENVIRON:  # (os.environ replaced: read the new one)
        key = _KEYS.get(name)
        if key is None:
            key = _KEYS[name] = os.fsencode(name)
        found = _DATA.get(key)
        value = None if found is None else os.fsdecode(found)
    else:
        value = os.environ.get(name)
    if value is None or not value.strip():
        return None
    return value.strip()


def flag(name: str, default: bool) -> bool:
    """A boolean variable: 1/on/yes/true or 0/off/no/false (any case); unset or empty gives
    ``default``. Raises :class:`DfpError` naming ``name`` for anything else."""
    value = raw(name)
    if value is None:
        return default
    low = value.lower()
    if low in TRUE_WORDS:
        return True
    if low in FALSE_WORDS:
        return False
    raise DfpError(f"${name} must be one of {'/'.join(TRUE_WORDS)} or {'/'.join(FALSE_WORDS)}, "
                   f"got {os.environ[name]!r}")


def integer(name: str, lo: int, hi: int | None = None, what: str = "an integer") -> int | None:
    """An integer variable in ``[lo, hi]``; None when unset or empty. Raises
    :class:`DfpError` naming ``name`` for a non-integer or out-of-range value."""
    value = raw(name)
    if value is None:
        return None
    try:
        n = int(value, 10)
    except ValueError:
        raise DfpError(f"${name} must be {what}, got {os.environ[name]!r}") from None
    if n < lo or (hi is not None and n > hi):
        rng = f">= {lo}" if hi is None else f"in {lo}..{hi}"
        raise DfpError(f"${name} must be {what} {rng}, got {os.environ[name]!r}")
    return n


def choice(name: str, choices: tuple[str, ...]) -> str | None:
    """One of ``choices`` (case-insensitive, surrounding blanks ignored); None when unset or
    empty. Raises :class:`DfpError` naming ``name`` otherwise."""
    value = raw(name)
    if value is None:
        return None
    low = value.lower()
    if low not in choices:
        raise DfpError(f"${name} must be one of {', '.join(choices)}, got {os.environ[name]!r}")
    return low


ENV_DISABLE = "DFPGEN_DISABLE"


def dfp_disabled() -> bool:
    """``$DFPGEN_DISABLE``: whether DFP layers run the FP32 PyTorch op instead of dfpgen's
    kernels (what ``dfpgen.runtime.is_enabled`` follows unless set in code; ``dfpgen info``
    shows it). Raises :class:`DfpError` naming the variable for a bad value."""
    return flag(ENV_DISABLE, False)
