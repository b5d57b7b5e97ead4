#!/usr/bin/env python3
"""Fixed cost of one DFP16 layer call: forward and forward + backward of a 0.1 M-MAC layer
(16 -> 16 channels, 3x3, 8x8 pixels, batch 1 by default), ``DFPConv2d`` vs ``nn.Conv2d`` with
the same weights, in the same process and thread count. At this size the kernels do almost
nothing, so the time is the Python and memory-pass overhead around them. Median of
``--repeats`` batches of ``--inner`` calls each; ratio = DFP16 time / FP32 time (goal <= 2).
Figures, not a test.

    python benchmarks/overhead.py                    # 16->16, 3x3, 8x8, batch 1
    python benchmarks/overhead.py --channels 64 --size 16 --batch 8
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

import dfpgen.runtime as dfp
import dfpgen.threads


def _median_ms(fn, inner: int, repeats: int) -> float:
    for _ in range(max(3, inner // 4)):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(inner):
            fn()
        times.append((time.perf_counter() - t0) / inner * 1e3)
    return statistics.median(times)


def measure(channels: int, size: int, batch: int, inner: int, repeats: int,
            channels_last: bool) -> list[tuple[str, float, float]]:
    torch.manual_seed(0)
    ref = nn.Conv2d(channels, channels, 3, padding=1)
    layer = dfp.DFPConv2d(channels, channels, 3, padding=1)
    layer.load_state_dict(ref.state_dict())
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(batch, channels, size, size).contiguous(memory_format=fmt)
    xg = x.clone().requires_grad_(True)
    rows = []
    for name, run in (("forward", lambda m: m(x)),
                      ("forward+backward", lambda m: m(xg).sum().backward())):
        fp32 = _median_ms(lambda: run(ref), inner, repeats)
        dfp16 = _median_ms(lambda: run(layer), inner, repeats)
        rows.append((name, fp32, dfp16))
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--channels", type=int, default=16)
    p.add_argument("--size", type=int, default=8)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--inner", type=int, default=50)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--channels-last", action="store_true")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    dfpgen.threads.set_num_threads(a.threads)
    rows = measure(a.channels, a.size, a.batch, a.inner, a.repeats, a.channels_last)
    macs = a.batch * a.size * a.size * a.channels * a.channels * 9
    print(f"layer {a.channels}->{a.channels}, 3x3, {a.size}x{a.size}, batch {a.batch} "
          f"({macs / 1e6:.2f} M MACs), {a.threads} threads, "
          f"{'channels_last' if a.channels_last else 'NCHW'}")
    print("| pass | nn.Conv2d FP32 (ms) | DFPConv2d DFP16 (ms) | DFP16 / FP32 |")
    print("|---|---|---|---|")
    for name, fp32, dfp16 in rows:
        print(f"| {name} | {fp32:.3f} | {dfp16:.3f} | {dfp16 / fp32:.1f}x |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
