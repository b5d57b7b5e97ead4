#!/usr/bin/env python3
"""Convergence protocol: FP32 vs DFP16 (and the paper's ablations) trained to the end of a full
schedule on all of Fashion-MNIST, several seeds each, compared pairwise with a 95% interval.

    python examples/convergence.py                          # the default protocol
    python examples/convergence.py --variants fp32,dfp16 --seeds 0,1,2,3,4 --epochs 10
    python examples/convergence.py --results-md             # also write the RESULTS.md section

Every (variant, seed) is one run of ``examples/train_fashion_mnist.py`` in its own process with
the same data order for a given seed across variants (the example seeds its shuffling and its
initialisation with ``--seed``), so differences are paired: for each variant the table gives
the mean over seeds of (variant - FP32) final test accuracy and its 95% Student-t interval, and
FP32's own seed-to-seed standard deviation (the spread the schedule must push well below the
difference one wants to resolve).

Resumable: a finished run leaves ``<out>/<variant>/seed<s>/result.json`` and is not run again;
an interrupted run starts over (runs are the checkpoints). Variants (the paper's ablations):

- ``fp32``; ``dfp16`` (round-to-nearest, 15 magnitude bits, exact overflow mode);
- ``dfp16_sr``: stochastic rounding of the gradients dY;
- ``dfp16_b14`` / ``dfp16_b13``: 14 / 13 magnitude bits;
- ``dfp16_fast``: the paper's long saturating INT32 chains (fast overflow mode);
- ``dfp16_conv1_fp32``: the first convolution left in FP32;
- ``bf16``: PyTorch bf16 autocast; in the default set only where the CPU has native bf16
  (emulated bf16 is many times slower than FP32 and says nothing about DFP16).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
TRAIN = os.path.join(HERE, "train_fashion_mnist.py")

VARIANTS = {
    "fp32": ["--precision", "fp32"],
    "dfp16": ["--precision", "dfp16"],
    "dfp16_sr": ["--precision", "dfp16", "--grad-rounding", "stochastic"],
    "dfp16_b14": ["--precision", "dfp16", "--bits", "14"],
    "dfp16_b13": ["--precision", "dfp16", "--bits", "13"],
    "dfp16_fast": ["--precision", "dfp16", "--overflow", "fast"],
    "dfp16_conv1_fp32": ["--precision", "dfp16", "--skip", "conv1"],
    "bf16": ["--precision", "bf16"],
}

# Two-sided 95% quantiles of Student's t distribution, t_{0.975, df}, df = 1..30 (any
# statistics table); beyond 30 the normal quantile 1.96 is within 2%.
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228,
         2.201, 2.179, 2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086,
         2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


def t975(df: int) -> float:
    """t_{0.975, df}; ``ValueError`` for df < 1."""
    if df < 1:
        raise ValueError(f"degrees of freedom must be >= 1, got {df}")
    return _T975[df - 1] if df <= len(_T975) else 1.96


def paired_interval(diffs: list[float]) -> tuple[float, float, float]:
    """``(mean, low, high)``: the mean of paired differences and its 95% Student-t interval
    (``mean +/- t_{0.975, n-1} * sd / sqrt(n)``); with one pair the interval is undefined
    (``nan`` bounds)."""
    n = len(diffs)
    if n == 0:
        raise ValueError("no paired differences")
    mean = statistics.fmean(diffs)
    if n == 1:
        return mean, math.nan, math.nan
    half = t975(n - 1) * statistics.stdev(diffs) / math.sqrt(n)
    return mean, mean - half, mean + half


def native_bf16() -> bool:
    """Whether the CPU has bf16 arithmetic (AVX512_BF16 or AMX-BF16), from LLVM's host features."""
    from dfpgen.target import native_target
    return native_target().native_bf16


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--variants", default=None,
                   help=f"comma-separated, from {', '.join(VARIANTS)}; unset: all of them, bf16 only "
                        "where the CPU has native bf16")
    p.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (the same for every variant)")
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--train-subset", type=int, default=0, help="first N training images (0: all 60000)")
    p.add_argument("--test-subset", type=int, default=0, help="first N test images (0: all 10000)")
    p.add_argument("--out", default=os.path.join("runs", "convergence"))
    p.add_argument("--data", default=None, help="directory of the Fashion-MNIST idx(.gz) files")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--results-md", action="store_true", help="write the convergence section of benchmarks/RESULTS.md")
    args = p.parse_args(argv)
    try:
        seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    except ValueError:
        p.error(f"--seeds must be comma-separated integers, got {args.seeds!r}")
    if not seeds or len(set(seeds)) != len(seeds):
        p.error(f"--seeds needs distinct integers, got {args.seeds!r}")
    if args.variants is None:
        variants = [v for v in VARIANTS if v != "bf16" or native_bf16()]
    else:
        variants = [v.strip() for v in args.variants.split(",") if v.strip()]
        unknown = [v for v in variants if v not in VARIANTS]
        if unknown or not variants:
            p.error(f"unknown variant(s) {', '.join(unknown) or '(none given)'}; choose from {', '.join(VARIANTS)}")
    if "fp32" not in variants:
        variants.insert(0, "fp32")  # the paired baseline
    if args.epochs < 1:
        p.error(f"--epochs must be >= 1, got {args.epochs}")
    args.seed_list, args.variant_list = seeds, variants
    return args


def run_one(args, variant: str, seed: int) -> dict:
    """The result of one (variant, seed) run: read back if it finished before, else run."""
    out = os.path.join(args.out, variant, f"seed{seed}")
    res = os.path.join(out, "result.json")
    if os.path.exists(res):
        with open(res) as f:
            return json.load(f)
    os.makedirs(out, exist_ok=True)
    tmp = res + ".partial"
    cmd = [sys.executable, TRAIN, *VARIANTS[variant], "--seed", str(seed), "--epochs", str(args.epochs),
           "--train-subset", str(args.train_subset), "--test-subset", str(args.test_subset),
           "--eval-points", "1", "--out", out, "--json", tmp]
    if args.data:
        cmd += ["--data", args.data]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    rc = subprocess.call(cmd)
    if rc != 0:
        raise SystemExit(f"convergence: {variant} seed {seed} failed (exit code {rc}); rerun to resume")
    os.replace(tmp, res)  # only a finished run counts
    with open(res) as f:
        return json.load(f)


def table(results: dict[str, dict[int, dict]], seeds: list[int]) -> str:
    """Markdown: per variant the mean final test accuracy, the paired difference to FP32 with
    its 95% interval, the seed-to-seed sd, and the training speed."""
    base = results["fp32"]
    rows = ["| variant | test acc (%), mean | vs FP32 (points) | 95% interval | seed sd (points) | img/s | seeds |",
            "|---|---:|---:|---|---:|---:|---:|"]
    for v, by_seed in results.items():
        accs = [100 * by_seed[s]["test_acc"] for s in seeds]
        sd = statistics.stdev(accs) if len(accs) > 1 else math.nan
        speed = statistics.fmean(by_seed[s]["img_per_s"] for s in seeds)
        if v == "fp32":
            diff, iv = "—", "—"
        else:
            m, lo, hi = paired_interval([100 * (by_seed[s]["test_acc"] - base[s]["test_acc"]) for s in seeds])
            diff, iv = f"{m:+.2f}", (f"[{lo:+.2f}, {hi:+.2f}]" if not math.isnan(lo) else "n/a (1 seed)")
        rows.append(f"| {v} | {statistics.fmean(accs):.2f} | {diff} | {iv} | {sd:.2f} | {speed:.0f} | {len(seeds)} |")
    return "\n".join(rows)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    runs = [(v, s) for s in args.seed_list for v in args.variant_list]
    results: dict[str, dict[int, dict]] = {v: {} for v in args.variant_list}
    t0 = time.perf_counter()
    for i, (v, s) in enumerate(runs, 1):
        print(f"convergence [{i}/{len(runs)}] {v} seed {s} ({time.perf_counter() - t0:.0f} s so far)", flush=True)
        results[v][s] = run_one(args, v, s)
    steps = results["fp32"][args.seed_list[0]]["steps"]
    head = (f"ResNet-20 on Fashion-MNIST, {args.train_subset or 60000} train / {args.test_subset or 10000} "
            f"test images, {args.epochs} epochs ({steps} steps of batch 64), seeds {args.seeds}")
    body = table(results, args.seed_list)
    print(f"\n{head}\n\n{body}")
    if args.results_md:
        sys.path.insert(0, os.path.join(os.path.dirname(HERE), "benchmarks"))
        from results_md import write_section
        cmd = " ".join(["python examples/convergence.py", *argv])
        write_section("convergence", f"## Convergence: FP32 vs DFP16 and ablations (examples/convergence.py)\n\n"
                                     f"`{cmd}`\n\n{head}\n\n{body}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
