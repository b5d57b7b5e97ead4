"""PyTorch baselines for ``dfpgen tune`` / ``dfpgen bench``: the same convolution pass in
FP32 (channels_last, oneDNN) and bf16, timed in this process with the same thread count.

torch is optional for the CLI: it is imported inside :func:`torch_seconds` only, and a
missing torch gives ``None`` ("n/a" in the tables). The core package never imports torch at
module level.
"""
from __future__ import annotations

import statistics
import time

from . import passes
from .spec import ConvSpec
from .threads import num_threads


def median_seconds(fn, repeats: int = 5, max_seconds: float = 2.0) -> float:
    """One warm-up call, then the median of up to ``repeats`` calls (fewer past ``max_seconds``)."""
    fn()
    times, start = [], time.perf_counter()
    for _ in range(max(1, repeats)):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
        if time.perf_counter() - start > max_seconds:
            break
    return statistics.median(times)


def torch_seconds(spec: ConvSpec, dtype: str = "float32", repeats: int = 5) -> float | None:
    """Median seconds of ``spec``'s pass in PyTorch with ``dtype`` (``"float32"`` or
    ``"bfloat16"``), channels_last tensors, ``num_threads()`` threads; ``None`` without torch.

    Forward: ``torch.nn.functional.conv2d``; backward-data / backward-weight:
    ``aten.convolution_backward`` with the output mask of that pass only (what autograd runs).
    """
    try:
        import torch
    except ImportError:
        return None
    torch.set_num_threads(num_threads())
    dt = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    cl = torch.channels_last
    g = torch.Generator().manual_seed(0)
    x = torch.randn(spec.input_shape, generator=g).to(dt).contiguous(memory_format=cl)
    w = torch.randn(spec.weight_shape, generator=g).to(dt).contiguous(memory_format=cl)
    dy = torch.randn(spec.output_shape, generator=g).to(dt).contiguous(memory_format=cl)
    st, pd, dl = list(spec.stride), list(spec.padding), list(spec.dilation)
    mask = passes.of(spec).torch_grad_mask
    if mask is None:  # forward
        def run():
            return torch.nn.functional.conv2d(x, w, None, st, pd, dl)
    else:
        mask = list(mask)

        def run():
            return torch.ops.aten.convolution_backward(dy, x, w, None, st, pd, dl, False, [0, 0], 1, mask)
    with torch.no_grad():
        return median_seconds(run, repeats)
