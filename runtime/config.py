"""Process-wide DFP16 settings: the on/off switch (for A/B runs), the default format, the
default overflow mode and gradient rounding. Per-layer settings on ``DFPConv2d`` /
``DFPLinear`` override these; ``None`` there means "use the default at call time".
"""
from __future__ import annotations

import contextlib
import threading

from dfpgen.dfp import DFP16, DfpFormat
from dfpgen.errors import DfpError
from dfpgen.spec import OVERFLOW_MODES

from dfpgen.env import dfp_disabled
ROUNDINGS = ("nearest", "stochastic")
NONFINITE_POLICIES = ("raise", "skip")  # see dfpgen.runtime.nonfinite

_lock = threading.Lock()
_enabled: bool | None = None  # None: follow $DFPGEN_DISABLE
_format: DfpFormat = DFP16
# Training defaults to exact: fast mode's long saturating chains clip whenever large X and
# W mantissas meet (measured: one lane of a 3x3x3 conv on Gaussian data saturated, 22% error
# in that output), and a training run must not go on with a clipped result.
_overflow = "exact"
_grad_rounding = "nearest"
_nonfinite = "raise"


def is_enabled() -> bool:
    """True when DFP16 layers run on dfpgen's kernels; False makes every DFP layer run the
    FP32 PyTorch op (same module, same parameters). Default: on unless ``$DFPGEN_DISABLE`` is
    1/on/yes/true (0/off/no/false or empty: on; another value raises :class:`DfpError`
    naming the variable); :func:`set_enabled` / :func:`enabled` win."""
    if _enabled is not None:
        return _enabled
    return not dfp_disabled()


def set_enabled(flag: bool | None) -> None:
    """Switch DFP16 on (True) or off (False) for the whole process; None returns to the
    environment variable."""
    global _enabled
    with _lock:
        _enabled = None if flag is None else bool(flag)


@contextlib.contextmanager
def enabled(flag: bool = True):
    """Context manager: ``with dfp.enabled(False): ...`` runs the block in FP32."""
    global _enabled
    with _lock:
        prev, _enabled = _enabled, bool(flag)
    try:
        yield
    finally:
        with _lock:
            _enabled = prev


def check_overflow(mode: str) -> str:
    if mode not in OVERFLOW_MODES:
        raise DfpError(f"overflow mode must be one of {OVERFLOW_MODES}, got {mode!r}")
    return mode


def check_rounding(mode: str) -> str:
    if mode not in ROUNDINGS:
        raise DfpError(f"gradient rounding must be one of {ROUNDINGS}, got {mode!r}")
    return mode


def set_default_format(fmt: DfpFormat | None = None, *, overflow: str | None = None,
                       grad_rounding: str | None = None) -> None:
    """Set the defaults used by layers that do not set their own: ``fmt`` (a
    :class:`dfpgen.DfpFormat`: magnitude bits; its rounding applies to the forward operands
    X and W), ``overflow`` (``"exact"``: provably no INT32 overflow; ``"fast"``: the
    paper's long saturating chains) and ``grad_rounding`` (``"nearest"`` or ``"stochastic"``
    for dY). Raises :class:`dfpgen.DfpError` for an unknown value."""
    global _format, _overflow, _grad_rounding
    if fmt is not None and not isinstance(fmt, DfpFormat):
        raise DfpError(f"fmt must be a dfpgen.DfpFormat, got {type(fmt).__name__}")
    with _lock:
        if fmt is not None:
            _format = fmt
        if overflow is not None:
            _overflow = check_overflow(overflow)
        if grad_rounding is not None:
            _grad_rounding = check_rounding(grad_rounding)


def default_format() -> DfpFormat:
    return _format


def default_overflow() -> str:
    """The overflow mode of layers that set none (``"exact"`` unless
    :func:`set_default_format` changed it)."""
    return _overflow


def default_grad_rounding() -> str:
    return _grad_rounding


def set_nonfinite_policy(policy: str) -> None:
    """What a DFP layer does with NaN/Inf operands (:mod:`dfpgen.runtime.nonfinite`):
    ``"raise"`` (default) a :class:`dfpgen.DfpError` naming the layer and pass; ``"skip"``
    records it, zeros that layer's gradients and lets :func:`step_if_finite` skip the
    optimizer step (AMP GradScaler style). Raises :class:`dfpgen.DfpError` otherwise."""
    global _nonfinite
    if policy not in NONFINITE_POLICIES:
        raise DfpError(f"non-finite policy must be one of {NONFINITE_POLICIES}, got {policy!r}")
    with _lock:
        _nonfinite = policy


def nonfinite_policy() -> str:
    return _nonfinite


def check_environment() -> None:
    """Read every ``DFPGEN_*`` variable the way dfpgen will (thread count and threading, cache switch and
    directory, ISA tier, verbosity, the DFP16 switch) and raise :class:`DfpError` naming the
    first bad one, so a script can refuse it in one line before any work starts instead of
    failing inside its first layer (``dfpgen/env.py`` lists the variables and their ranges)."""
    from dfpgen import cache, log, openmp, target, threads
    threads.num_threads()
    openmp.threading_mode()
    cache.disk_enabled()
    cache.cache_dir()
    t, forced = target.configured_target()  # no tier note here: an error may follow
    if forced and not t.executable:
        # compile-only uses (dfpgen show --asm) may force such a tier; training cannot run it
        raise DfpError(f"${target.ENV_ISA} is {t.tier!r}, an ISA tier this CPU ({t.cpu}) cannot run: "
                       f"it lacks {', '.join(t.isa.missing(t.feature_set))}")
    log.verbose()
    is_enabled()
