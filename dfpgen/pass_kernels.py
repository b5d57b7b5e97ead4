"""The kernel object of one conv pass: ``get_kernel`` resolves the schedule (given -> tuned ->
default, :mod:`dfpgen.decisions`), and the pass registry (:mod:`dfpgen.passes`) names the
execution module whose kernel class plans, renders and loads it through
:func:`dfpgen.kernels.load_kernel`; ``kernel_sources`` renders a pass's kernels without
compiling (``dfpgen show``).
"""
from __future__ import annotations

import threading
from functools import lru_cache

from . import bwd_weight, fwd_family, passes
from .decisions import resolve_config
from .errors import DfpError
from .render import render
from .target import CpuTarget

# ConvPass.family -> the kernel class of the module executing that family of passes, and the
# variant keywords that class takes with their defaults (every key holds all of them)
KERNEL_CLASSES = {"fwd_family": fwd_family.ConvKernel, "bwd_weight": bwd_weight.BwdWeightKernel}
VARIANTS = {"fwd_family": {"bias": False, "fma": True}, "bwd_weight": {"scaled": False}}

_kernels: dict[tuple, object] = {}
_lock = threading.Lock()


@lru_cache(maxsize=None)
def _target_key(target: CpuTarget) -> str:
    return repr(sorted(target.key().items(), key=str))


def get_kernel(spec, config=None, *, overflow: str = "fast", target: CpuTarget | None = None, **variant):
    """The kernel object of conv pass ``spec`` (memory -> disk -> render + compile), scheduled
    by :func:`dfpgen.decisions.resolve_config`. Forward / backward-data: a
    :class:`dfpgen.fwd_family.ConvKernel` (``.parts``: one loaded kernel, or one per output phase;
    ``variant``: ``bias``, and ``fma=False`` to flush with a separate multiply and add when the
    product scale 2**(Ea+Eb) is a float32 subnormal). Backward-weight: a
    :class:`dfpgen.bwd_weight.BwdWeightKernel` (``variant``: ``scaled``, the flush multiplies by 2**E
    in the kernel). Raises :class:`dfpgen.DfpError` for an unknown overflow mode, an option
    the pass's kernel does not take, or an illegal config."""
    passes.check_overflow(overflow)
    family = passes.of(spec).family
    allowed = VARIANTS[family]
    unknown = sorted(set(variant) - set(allowed))
    if unknown:
        raise DfpError(f"get_kernel: {', '.join(unknown)} is not an option of a {spec.pass_kind} kernel "
                       f"(options: {', '.join(allowed) or 'none'})")
    variant = {k: bool(variant.get(k, d)) for k, d in allowed.items()}
    config, target = resolve_config(spec, config, overflow=overflow, target=target)
    key = (spec, config, overflow, tuple(variant.items()), _target_key(target))
    with _lock:
        hit = _kernels.get(key)
    if hit is not None:
        return hit
    k = KERNEL_CLASSES[family](spec, config, target, overflow, **variant)
    with _lock:
        return _kernels.setdefault(key, k)


def kernel_sources(spec, config=None, target: CpuTarget | None = None, overflow: str = "exact"
                   ) -> list[tuple[str, dict, str]]:
    """``[(symbol, plan dict, LLVM IR)]`` of the kernel(s) of ``spec`` with ``config`` (given,
    tuned or default), without compiling; backward-data with stride > 1 has one kernel per
    output phase."""
    config, target = resolve_config(spec, config, overflow=overflow, target=target)
    rec = passes.of(spec)
    return [(p.symbol, p.describe(), render(rec.template, p=p))
            for p in rec.kernel_plans(spec, config, target, overflow)]
