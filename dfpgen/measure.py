"""Running one conv pass for the autotuner and the CLI: random DFP16 operands, a runner
through the public numpy API, a timer of the generated kernel alone, median timing, and the
kernel sources ``dfpgen show`` prints.
"""
from __future__ import annotations

import statistics
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


def kernel_timer(spec: ConvSpec, config: TuningConfig, target: CpuTarget, ops: dict,
                 overflow: str = "exact") -> Callable[[], float] | None:
    """A callable that runs only the generated kernel(s) of ``spec`` with ``config`` on
    buffers prepared once, and returns the seconds it took; ``None`` where this pass offers
    no such entry point (then the whole public call is timed). Forward / backward-data:
    the activation buffer and packed weights of ``dfpgen.fwd`` are built once, so padding,
    weight packing and the exact-mode schedule analysis stay out of the measurement;
    backward-weight: ``dfpgen.wgrad.last_times.kernel`` of a public call."""
    try:
        if spec.pass_kind == "bwd_weight":
            from . import wgrad
            run = make_runner(spec, config, target, ops, overflow)

            def timed_wgrad() -> float:
                run()
                return wgrad.last_times.kernel
            return timed_wgrad if hasattr(wgrad, "last_times") else None
        from . import fwd, kernels
        fwd_pass = spec.pass_kind == "fwd"
        act = ops["x"] if fwd_pass else ops["dy"]
        # The config the public call really ran (exact mode replaces c_block / flush by the
        # schedule proven on these operands): the same kernel object, from get_kernel's cache.
        _, info = make_runner(spec, config, target, ops, overflow, return_info=True)()
        kern = kernels.get_kernel(spec, TuningConfig.from_dict(info.config), overflow=overflow,
                                  target=target)
        if not kern.parts:
            return None
        first = kern.parts[0].plan
        xbuf = fwd._activation_buffer(act, kern.pad, 2 * first.red_pairs)
        w_otc = fwd.weights_otc(ops["w"], spec.pass_kind)
        packed = [(part, part.pack_weights(w_otc)) for part in kern.parts]
        oh, ow = (spec.P, spec.Q) if fwd_pass else (spec.H, spec.W)
        ybuf = np.zeros((spec.N, oh, ow, first.out_pad), np.float32)
        scale = fwd.check_scale(act.exponent + ops["w"].exponent, spec.pass_kind)
        threads = num_threads()
    except Exception:  # noqa: BLE001 - the kernel modules changed shape: time the public call
        return None

    def timed() -> float:
        t0 = time.perf_counter()
        for part, wp in packed:
            part.run(xbuf, wp, ybuf, None, scale, spec.N, threads)
        return time.perf_counter() - t0
    return timed


def time_runner(run: Callable[[], np.ndarray], repeats: int = 5, max_seconds: float = 2.0, *,
                kernel: Callable[[], Callable[[], float] | None] | None = None) -> tuple[float, np.ndarray]:
    """One warm-up call of ``run`` (its output is returned for the exactness check), then the
    median of up to ``repeats`` timed calls (fewer when they would exceed ``max_seconds``).
    ``kernel``, when given, makes the callable whose own result is the kernel-only time
    (:func:`kernel_timer`); otherwise each whole ``run()`` is timed."""
    out = np.asarray(run())
    timed = kernel() if kernel is not None else None
    if timed is None:
        def timed() -> float:
            t0 = time.perf_counter()
            run()
            return time.perf_counter() - t0
    else:
        timed()  # warm-up of the prepared buffers
    times, t_start = [], time.perf_counter()
    for _ in range(max(1, repeats)):
        times.append(timed())
        if time.perf_counter() - t_start > max_seconds:
            break
    return statistics.median(times), out
