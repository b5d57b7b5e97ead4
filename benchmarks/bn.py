#!/usr/bin/env python3
"""BatchNorm + ReLU (+ residual add) forward + backward on ResNet-50 shapes: dfpgen's fused
DFP16 pass (``DFPBatchNorm2d``) vs PyTorch FP32 (``nn.BatchNorm2d`` + ``nn.ReLU(inplace)``,
and ``+ identity`` before the ReLU for the bottleneck ends), channels_last, training mode,
same run and thread count. Figures, not a test: median of ``--repeats`` after a warm-up.

Also prints the bytes autograd keeps for backward per call, and how many bits the residual
bound cost on this data (0 or 1; see ``dfpgen/bn.py``).

    python benchmarks/bn.py                 # batch 32, every ResNet-50 BatchNorm shape
    python benchmarks/bn.py --batch 8 --repeats 3
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
from torch import nn

from dfpgen import threads as dthreads
from dfpgen.dfp import exponent_for
from dfpgen.runtime.fused_bn import DFPBatchNorm2d

# (name, C, H, W, count in ResNet-50, residual add before the ReLU)
SHAPES = [
    ("bn1 (stem)", 64, 112, 112, 1, False),
    ("res2 a/b", 64, 56, 56, 6, False),
    ("res2 c+add", 256, 56, 56, 3, True),
    ("res3a a", 128, 56, 56, 1, False),
    ("res3 a/b", 128, 28, 28, 7, False),
    ("res3 c+add", 512, 28, 28, 4, True),
    ("res4a a", 256, 28, 28, 1, False),
    ("res4 a/b", 256, 14, 14, 11, False),
    ("res4 c+add", 1024, 14, 14, 6, True),
    ("res5a a", 512, 14, 14, 1, False),
    ("res5 a/b", 512, 7, 7, 5, False),
    ("res5 c+add", 2048, 7, 7, 3, True),
]


def _time(fn, warmup: int, repeats: int) -> float:
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def run_shape(N, C, H, W, add, warmup, repeats):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N, C, H, W, generator=g).contiguous(memory_format=torch.channels_last).requires_grad_()
    r = torch.relu(torch.randn(N, C, H, W, generator=g)).contiguous(memory_format=torch.channels_last) if add else None
    dy = torch.randn(N, C, H, W, generator=g).contiguous(memory_format=torch.channels_last)
    ref, relu = nn.BatchNorm2d(C), nn.ReLU(inplace=True)
    fused = DFPBatchNorm2d(C, fuse="add_relu" if add else "relu")

    def torch_step():
        y = ref(x)
        if add:
            y = y + r
        relu(y).backward(dy)

    def fused_step():
        y = fused(x, r) if add else fused(x)
        y.backward(dy)

    t_ref = _time(torch_step, warmup, repeats)
    t_fused = _time(fused_step, warmup, repeats)
    saved = {}
    for name, step in (("fp32", torch_step), ("dfp16", fused_step)):
        seen = {}
        with torch.autograd.graph.saved_tensors_hooks(
                lambda t: seen.__setitem__(t.untyped_storage().data_ptr(), t.untyped_storage().nbytes()) or t,
                lambda t: t):
            step()
        saved[name] = sum(v for k, v in seen.items()
                          if k not in {p.untyped_storage().data_ptr() for p in (*ref.parameters(), *fused.parameters())})
    cost = ""
    if add:
        with torch.no_grad():
            y = fused(x.detach(), r)
            exact = exponent_for(float(y.abs().max()))
            e = int(torch.frexp(y.abs().max()).exponent) - 15
        cost = str(e - exact)
    return t_ref, t_fused, saved, cost


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=0, help="0: the CPUs this process may use")
    args = ap.parse_args(argv)
    n = args.threads or len(os.sched_getaffinity(0))
    torch.set_num_threads(n)
    dthreads.set_num_threads(n)
    print(f"# BN + ReLU (+ add) forward + backward, batch {args.batch}, {n} thread(s), channels_last, "
          f"median of {args.repeats}")
    print("| BN (ResNet-50) | N x C x H x W | count | PyTorch FP32 ms | fused DFP16 ms | speed-up | "
          "saved MB FP32 | saved MB DFP16 |")
    print("|---|---|---|---|---|---|---|---|")
    tot_ref = tot_fused = 0.0
    for name, C, H, W, count, add in SHAPES:
        t_ref, t_fused, saved, cost = run_shape(args.batch, C, H, W, add, args.warmup, args.repeats)
        tot_ref += count * t_ref
        tot_fused += count * t_fused
        extra = f" (bound cost {cost} bit)" if cost else ""
        print(f"| {name}{extra} | {args.batch}x{C}x{H}x{W} | {count} | {t_ref * 1e3:.2f} | {t_fused * 1e3:.2f} | "
              f"{t_ref / t_fused:.2f}x | {saved['fp32'] / 2**20:.1f} | {saved['dfp16'] / 2**20:.1f} |", flush=True)
    print(f"| **ResNet-50 total (53 BatchNorms, weighted by count)** | | 53 | {tot_ref * 1e3:.1f} | "
          f"{tot_fused * 1e3:.1f} | {tot_ref / tot_fused:.2f}x | | |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
