#!/usr/bin/env python3
"""Cost of fast mode's sticky saturation check (``RunInfo.possibly_saturated``).

For each layer and pass (forward, backward-data; stride 1), the fast-mode kernel of this
tree and the same plan rendered from another tree's ``templates/`` (``--base``: a checkout
of a commit before the check) are compiled and timed in one process on the same buffers,
alternating A/B, median of ``--repeats``; the exact-mode kernel and PyTorch FP32 are timed
in the same run for scale. Kernel time only (operands already quantized and packed).

    git worktree add /tmp/base <commit>
    python benchmarks/fast_mode_check.py --base /tmp/base
"""
from __future__ import annotations

import argparse
import statistics
import time
import warnings

import jinja2
import numpy as np
import torch

import dfpgen
from dfpgen import conv, fwd_family, jit, kernels, pass_kernels
from dfpgen.spec import parse_layer
from dfpgen.threads import num_threads


class _LegacyPlan:
    """A plan as templates before the shared dot macro read it: ``p.dot``, ``p.dot_intrinsic``,
    ``p.even_mask``, ``p.odd_mask`` beside the plan's own fields (they now live in ``p.dp``)."""

    def __init__(self, plan):
        self._plan = plan

    def __getattr__(self, name):
        dp = self._plan.dp
        legacy = {"dot": dp.dot, "dot_intrinsic": dp.intrinsic, "even_mask": dp.even_mask,
                  "odd_mask": dp.odd_mask}
        return legacy[name] if name in legacy else getattr(self._plan, name)


def _base_kernel(part: fwd_family.SubKernel, base_templates: str) -> fwd_family.SubKernel:
    """``part``'s plan rendered from ``base_templates``, under its own symbol."""
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(base_templates),
                             undefined=jinja2.StrictUndefined, trim_blocks=True,
                             lstrip_blocks=True, keep_trailing_newline=True)
    sym = part.plan.symbol
    ir = env.get_template(fwd_family.TEMPLATE).render(p=_LegacyPlan(part.plan)).replace(f"@{sym}(", f"@{sym}_base(")
    target = dfpgen.host_target()
    obj = jit.compile_ir(ir, cpu=target.compile_cpu, features=target.compile_features,
                         name=sym + "_base").obj
    addr = jit.load(obj, [sym + "_base"])[sym + "_base"]
    k = object.__new__(fwd_family.SubKernel)
    k.sub, k.plan, k.spec_s, k.transposed = part.sub, part.plan, part.spec_s, part.transposed
    k.loaded = kernels.LoadedKernel(sym + "_base", addr, "built", 0.0)
    k.fn = fwd_family._PROTO(addr)
    return k


def _buffers(kernel, act, wq):
    part = kernel.parts[0]
    p = part.plan
    xbuf = fwd_family._activation_buffer(act, kernel.pad, 2 * p.red_pairs)
    spec = kernel.spec
    n, _, oh, ow = spec.result_shape
    ybuf = np.empty((n, oh, ow, p.out_pad), np.float32)
    return xbuf, part.pack_weights(fwd_family.weights_krsc(wq)), ybuf


def _median(fn, repeats):
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", required=True, help="a checkout whose templates/ lack the check")
    ap.add_argument("--layers", default="3x3x64,3x3x128,3x3x256")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=9)
    args = ap.parse_args()
    threads = num_threads()
    torch.set_num_threads(threads)
    rng = np.random.default_rng(0)
    print(f"tier {dfpgen.host_target().tier}, {threads} threads, batch {args.batch}, "
          f"median of {args.repeats}, kernel only\n")
    print("| pass | layer | fast, no check (ms) | fast, sticky check (ms) | check cost | exact (ms) "
          "| PyTorch FP32 (ms) |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for name in args.layers.split(","):
        for pass_kind in ("fwd", "bwd_data"):
            spec = parse_layer(name, batch=args.batch, pass_kind=pass_kind)
            # post-ReLU-like X (half zeros) and Gaussian W at DFP16 scale
            x = np.maximum(rng.standard_normal(spec.input_shape if pass_kind == "fwd" else spec.output_shape), 0)
            act = dfpgen.quantize(x.astype(np.float32))
            wq = dfpgen.quantize(rng.standard_normal(spec.weight_shape).astype(np.float32))
            new = pass_kernels.get_kernel(spec, overflow="fast")
            base = _base_kernel(new.parts[0], f"{args.base}/templates")
            xbuf, wpack, ybuf = _buffers(new, act, wq)
            # exact mode's schedule comes from the operands, as in dfpgen.conv2d
            exact = pass_kernels.get_kernel(spec, conv._schedule(spec, "exact", None, act, wq)[0], overflow="exact")
            exbuf, ewpack, eybuf = _buffers(exact, act, wq)
            n = spec.N
            runs = {
                "base": lambda: base.run(xbuf, wpack, ybuf, None, 1.0, n, threads),
                "new": lambda: new.parts[0].run(xbuf, wpack, ybuf, None, 1.0, n, threads),
                "exact": lambda: exact.parts[0].run(exbuf, ewpack, eybuf, None, 1.0, n, threads),
            }
            xt = torch.randn(spec.input_shape).contiguous(memory_format=torch.channels_last)
            wt = torch.randn(spec.weight_shape)
            if pass_kind == "fwd":
                runs["torch"] = lambda: torch.nn.functional.conv2d(xt, wt, None, spec.stride, spec.padding)
            else:
                gt = torch.randn(spec.output_shape).contiguous(memory_format=torch.channels_last)
                runs["torch"] = lambda: torch.nn.grad.conv2d_input(spec.input_shape, wt, gt, spec.stride, spec.padding)
            for fn in runs.values():
                fn()
            times = {k: [] for k in runs}
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                for _ in range(args.repeats):  # interleaved: drift hits every variant alike
                    for k, fn in runs.items():
                        times[k].append(_median(fn, 1))
            med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
            print(f"| {pass_kind} | {spec.geometry()} | {med['base']:.2f} | {med['new']:.2f} | "
                  f"{med['new'] / med['base']:.2f}x | {med['exact']:.2f} | {med['torch']:.2f} |", flush=True)


if __name__ == "__main__":
    main()
