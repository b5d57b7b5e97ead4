"""Running one conv pass for the autotuner and the CLI: random DFP16 operands, a runner
through the public numpy API, a timer of the generated kernel alone (the call's
``RunInfo.kernel_seconds``) and median timing.
"""
from __future__ import annotations

import statistics
import time
from typing import Callable

import numpy as np

from . import conv, passes
from .dfp import quantize
from .spec import ConvSpec
from .target import CpuTarget
from .tuning import TuningConfig


def random_operands(spec: ConvSpec, seed: int = 0) -> dict:
    """Random DFP16 operands of ``spec``'s pass (normal floats, quantized): ``x``, ``w``, ``dy``."""
    rng = np.random.default_rng(seed)
    ops = {}
    for name, shape in (("x", spec.input_shape), ("w", spec.weight_shape), ("dy", spec.output_shape)):
        ops[name] = quantize(rng.standard_normal(shape, dtype=np.float32), name=name)
    return ops


def make_runner(spec: ConvSpec, config: TuningConfig | None, target: CpuTarget, ops: dict,
                overflow: str = "exact", *, quantize: bool = False,
                return_info: bool = False) -> Callable[[], np.ndarray]:
    """A zero-argument callable running ``spec``'s pass with ``config`` (``None``: tuned or
    default) on ``ops`` and returning its FP32 output (``(output, RunInfo)`` with
    ``return_info``), through the public conv API (``ConvPass.api``). The operands are
    pre-quantized DFP16 unless ``quantize``, which passes FP32 operands so the call includes
    quantize-and-pack."""
    if quantize:
        ops = {k: v.dequantize() for k, v in ops.items()}
    rec = passes.of(spec)
    fn = getattr(conv, rec.api)
    args = [getattr(spec, a) if a.endswith("_shape") else ops[a] for a in rec.api_args]
    kw = dict(stride=spec.stride, padding=spec.padding, dilation=spec.dilation, overflow=overflow,
              config=config, return_info=return_info, target=target)
    return lambda: fn(*args, **kw)


def kernel_timer(spec: ConvSpec, config: TuningConfig, target: CpuTarget, ops: dict,
                 overflow: str = "exact") -> Callable[[], float]:
    """A callable that makes one public call of ``spec``'s pass with ``config`` and returns
    the seconds spent inside the generated kernel(s) only (``RunInfo.kernel_seconds``), so
    per-call packing, padding and the exact-mode schedule analysis do not drown the
    differences between schedules."""
    run = make_runner(spec, config, target, ops, overflow, return_info=True)
    return lambda: run()[1].kernel_seconds


def time_runner(run: Callable[[], np.ndarray], repeats: int = 5, max_seconds: float = 2.0, *,
                kernel: Callable[[], Callable[[], float] | None] | None = None) -> tuple[float, np.ndarray]:
    """One warm-up call of ``run`` (its output is returned for the exactness check), then the
    median of up to ``repeats`` timed calls (fewer when they would exceed ``max_seconds``).
    ``kernel``, when given, makes the callable whose own result is the kernel-only time
    (:func:`kernel_timer`); otherwise each whole ``run()`` is timed."""
    out = np.asarray(run())
    timed = kernel() if kernel is not None else None
    if timed is None or timed() <= 0:  # no timer, or it saw no kernel run: time the whole call
        def timed() -> float:
            t0 = time.perf_counter()
            run()
            return time.perf_counter() - t0
    times, t_start = [], time.perf_counter()
    for _ in range(max(1, repeats)):
        times.append(timed())
        if time.perf_counter() - t_start > max_seconds:
            break
    return statistics.median(times), out
