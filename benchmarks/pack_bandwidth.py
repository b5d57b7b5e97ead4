"""Quantize-and-pack bandwidth against np.copyto of the same float32 tensor (goal:
>= 60% of the copy bandwidth measured in the same run).

GB/s counts the bytes each operation must move: copy = read + write of the FP32 tensor
(8 bytes/element); quantize_pack = two FP32 reads (max-abs, then pack) + the INT16 write
(10 bytes/element). The copy writes into a preallocated array; quantize_pack is timed both
into a reused ``out=`` buffer (like for like) and allocating its buffer per call (what a call
without ``out`` pays: fresh pages, page faults). ``copy/pack`` compares wall times too.

    .venv/bin/python benchmarks/pack_bandwidth.py [--shape 32 256 56 56] [--repeats 7] [--threads N]
"""
from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

from dfpgen import threads as dthreads
from dfpgen.dfp import DfpFormat
from dfpgen.pack import max_abs, quantize_pack


def median_time(fn, repeats: int) -> float:
    """Median wall time (or the best one with --best: on a shared machine other processes
    only ever add time)."""
    fn()  # warm-up: page faults, kernel compile
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return min(ts) if BEST else statistics.median(ts)


BEST = False


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", type=int, nargs=4, default=[32, 256, 56, 56], metavar=("N", "C", "H", "W"))
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--best", action="store_true", help="report the best time, not the median")
    args = ap.parse_args()
    global BEST
    BEST = args.best
    nt = args.threads or dthreads.num_threads()
    N, C, H, W = args.shape
    rng = np.random.default_rng(0)
    nchw = rng.standard_normal((N, C, H, W), dtype=np.float32)
    nhwc = np.ascontiguousarray(nchw.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2)
    dst = np.empty_like(nchw)
    n = nchw.size
    print(f"shape {tuple(args.shape)} ({n * 4 / 1e6:.1f} MB float32), threads {nt}, "
          f"{'best' if BEST else 'median'} of {args.repeats}")
    t_copy = median_time(lambda: np.copyto(dst, nchw), args.repeats)
    copy_gbs = 8 * n / t_copy / 1e9
    print(f"{'np.copyto':32s} {t_copy * 1e3:8.2f} ms {copy_gbs:7.2f} GB/s")
    t_max = median_time(lambda: max_abs(nchw.reshape(-1), threads=nt), args.repeats)
    print(f"{'max-abs pass only':32s} {t_max * 1e3:8.2f} ms {4 * n / t_max / 1e9:7.2f} GB/s (read)")
    out = np.empty((N, H, W, C + C % 2), np.int16)
    for layout, x in (("nhwc", nhwc), ("nchw", nchw)):
        for rounding in ("nearest", "stochastic"):
            fmt = DfpFormat(rounding=rounding)
            for how, kw in (("out=", {"out": out}), ("alloc", {})):
                t = median_time(lambda: quantize_pack(x, fmt, seed=1, threads=nt, **kw), args.repeats)
                gbs = 10 * n / t / 1e9
                print(f"{'quantize_pack ' + layout + ' ' + rounding + ' ' + how:32s} {t * 1e3:8.2f} ms "
                      f"{gbs:7.2f} GB/s = {100 * gbs / copy_gbs:5.1f}% of copy GB/s; copy/pack {t_copy / t:5.2f}")


if __name__ == "__main__":
    main()
