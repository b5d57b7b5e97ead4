#!/usr/bin/env python3
"""Backward-weight work split: ``plan_bwd_weight.work_split``'s choice against other splits of
the same layer, kernel time only (``RunInfo.kernel_seconds``), the splits interleaved call by
call so that a drifting host moves them all alike. The split is a run-time argument of the
kernel (no rebuild) and never changes the bits: every split's dW is compared with the first.
Figures, not a test.

    python benchmarks/bwd_weight_split.py --threads 16 --layers n32c64h56w56k64r3s3u1p1
    python benchmarks/bwd_weight_split.py --threads 16 --all      # every legal split, ranked
    python benchmarks/bwd_weight_split.py --layers n32c64h56w56k64r3s3u1p1/1:12   # + split (1, 12)

A layer is a full spec (``n32c64h56w56k64r3s3u1p1``); ``/K:G`` adds a split of K K-blocks x G
column blocks per item. X is a ReLU'd standard normal, dY standard normal, both DFP16.
"""
from __future__ import annotations

import argparse
import statistics

import numpy as np

import dfpgen
from dfpgen import plan_bwd_weight as pw
from dfpgen import threads as dthreads
from dfpgen.dfp import DfpFormat
from dfpgen.pack import quantize_pack
from dfpgen.spec import parse_full

DEFAULT_LAYERS = ("n32c64h56w56k64r3s3u1p1,n32c256h56w56k64r1s1u1p0,n32c128h28w28k128r3s3u1p1,"
                  "n32c256h14w14k256r3s3u1p1,n32c512h7w7k512r3s3u1p1,n128c16h28w28k16r3s3u1p1")

_forced: list = [None]
_seen: dict = {}
_model = pw.work_split


def _work_split(p, threads):
    _seen["plan"] = p
    return _forced[0] or _model(p, threads)


def _channels_last(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2)


def _every_split(p, threads: int, model) -> list:
    """The splits ``work_split`` weighs with at most max(4 threads, 2 x the model's) items."""
    return [w for w in pw.legal_splits(p) if w.items <= max(4 * threads, 2 * model.items)]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=0, help="0: all CPUs of this process")
    ap.add_argument("--rounds", type=int, default=7, help="calls per split (interleaved)")
    ap.add_argument("--layers", default=DEFAULT_LAYERS)
    ap.add_argument("--all", action="store_true", help="time every legal split, not only the model's")
    args = ap.parse_args(argv)
    threads = args.threads or dthreads.num_threads()
    dthreads.set_num_threads(threads)
    pw.work_split = _work_split
    rng = np.random.default_rng(0)
    fmt = DfpFormat(bits=15)
    print(f"{threads} threads, {args.rounds} interleaved calls per split, kernel time (median)")
    try:
        for item in args.layers.split(","):
            geo, *extra = item.split("/")
            spec = parse_full(geo, "bwd_weight")
            x = _channels_last(np.maximum(rng.standard_normal(spec.input_shape, dtype=np.float32), 0))
            dy = _channels_last(rng.standard_normal(spec.output_shape, dtype=np.float32))
            xq, dyq = quantize_pack(x, fmt, threads=threads), quantize_pack(dy, fmt, threads=threads)

            def run():
                return dfpgen.conv2d_weight(xq, spec.weight_shape, dyq, stride=spec.stride,
                                            padding=spec.padding, overflow="exact", threads=threads,
                                            return_info=True)

            _forced[0] = None
            ref = run().output
            p = _seen["plan"]
            model = _model(p, threads)
            splits = [model]
            for e in extra:
                k, g = (int(v) for v in e.split(":"))
                splits.append(pw.WorkSplit(k, g, -(-p.n_kb // k), -(-p.n_cols // g)))
            if args.all:
                splits += [s for s in _every_split(p, threads, model) if s not in splits]
            times = [[] for _ in splits]
            for r in range(args.rounds):
                for i, s in enumerate(splits):
                    _forced[0] = s
                    res = run()
                    if r == 0 and not np.array_equal(res.output, ref):
                        raise SystemExit(f"{geo}: split {s} changed the bits")
                    times[i].append(res.info.kernel_seconds)
            med = [statistics.median(t) for t in times]
            order = sorted(range(len(splits)), key=med.__getitem__)
            shown = order[:5] if args.all else range(len(splits))
            cells = [f"({splits[i].kb_group},{splits[i].group},{splits[i].items}){' model' if i == 0 else ''} "
                     f"{med[i] * 1e3:.2f} ms" for i in shown]
            print(f"{geo}: flush {res.info.flush}, {p.n_kb} K-blocks x {p.n_cols} column blocks; "
                  f"(K-groups, columns, items): " + "; ".join(cells)
                  + f"; model / best {med[0] / med[order[0]]:.2f}x", flush=True)
    finally:
        pw.work_split = _model
        _forced[0] = None
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
