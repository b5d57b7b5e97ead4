"""Running one conv pass for the autotuner and the CLI: random DFP16 operands, a runner
through the public numpy API, a timer of the generated kernel alone, median timing, and the
kernel sources ``dfpgen show`` prints.
"""
from __future__ import annotations

import statistics
import threading
import time
from typing import Callable

import numpy as np

from .spec import ConvSpec
from .target import CpuTarget
from .threads import num_threads
from .tuning import TuningConfig


def random_operands(spec: ConvSpec, seed: int = 0) -> dict:
    """Random DFP16 operands of ``spec``'s pass (normal floats, quantized): ``x``, ``w``, ``dy``."""
    from .dfp import quantize
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
    ``return_info``), through the public conv API. The operands are pre-quantized DFP16
    unless ``quantize``, which passes FP32 operands so the call includes quantize-and-pack."""
    from . import conv
    if quantize:
        ops = {k: v.dequantize() for k, v in ops.items()}
    kw = dict(stride=spec.stride, padding=spec.padding, dilation=spec.dilation, overflow=overflow,
              config=config, return_info=return_info)
    if spec.pass_kind == "fwd":
        return lambda: conv.conv2d(ops["x"], ops["w"], **kw)
    if spec.pass_kind == "bwd_data":
        return lambda: conv.conv2d_input(spec.input_shape, ops["w"], ops["dy"], **kw)
    return lambda: conv.conv2d_weight(ops["x"], spec.weight_shape, ops["dy"], **kw)


def kernel_sources(spec: ConvSpec, config: TuningConfig, target: CpuTarget,
                   overflow: str = "exact") -> list[tuple[str, dict, str]]:
    """``[(symbol, plan as a dict, LLVM IR)]`` of the kernel(s) of ``spec`` with ``config``
    (``dfpgen show``); backward-data with stride > 1 has one kernel per output phase."""
    if spec.pass_kind == "bwd_weight":
        from dataclasses import asdict, is_dataclass

        from . import plan_wgrad, wgrad
        from .render import render
        p = plan_wgrad.plan(spec, config, target, overflow)
        d = asdict(p) if is_dataclass(p) else dict(p.key())
        d = {k: v for k, v in d.items() if not isinstance(v, (list, tuple)) or len(v) <= 64}
        return [(p.symbol, d, render(wgrad.TEMPLATE, p=p))]
    from . import kernels
    return kernels.kernel_sources(spec, config, target=target, overflow=overflow)


_instrument_lock = threading.Lock()


def kernel_timer(spec: ConvSpec, config: TuningConfig, target: CpuTarget, ops: dict,
                 overflow: str = "exact") -> Callable[[], float] | None:
    """A callable that makes one public call of ``spec``'s pass with ``config`` and returns
    the seconds spent inside the generated kernel(s) only, so per-call packing, padding and
    the exact-mode schedule analysis do not drown the differences between schedules.
    ``None`` where the kernel modules offer no way to tell (then the whole call is timed).

    Backward-weight: ``dfpgen.wgrad.last_times.kernel``. Forward / backward-data: the calls
    of ``dfpgen.fwd.SubKernel.run`` (the ctypes entry of each generated kernel) are timed by
    wrapping that method for the duration of the call (a measuring process only: a
    concurrent conv in another Python thread would be counted too)."""
    run = make_runner(spec, config, target, ops, overflow)
    if spec.pass_kind == "bwd_weight":
        from . import wgrad
        if not hasattr(wgrad, "last_times"):
            return None

        def timed_wgrad() -> float:
            run()
            return wgrad.last_times.kernel
        return timed_wgrad
    from . import fwd
    cls = getattr(fwd, "SubKernel", None)
    orig = getattr(cls, "run", None)
    if orig is None:
        return None

    def timed() -> float:
        spent = [0.0]

        def wrapper(self, *args, **kwargs):
            t0 = time.perf_counter()
            try:
                return orig(self, *args, **kwargs)
            finally:
                spent[0] += time.perf_counter() - t0
        with _instrument_lock:
            cls.run = wrapper
            try:
                run()
            finally:
                cls.run = orig
        return spent[0]
    return timed


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
