"""Tuned vs default heuristic on ResNet-50 layers, all three passes.

Each layer is tuned from scratch (a temporary tuning cache, ``force=True``) within
``--budget`` seconds per pass; the table gives the default config's and the tuned config's
GMAC/s as the tuner measured them (kernel time, median of repeats, this process's thread
count), the speed-up, how long the tune took and how many candidates it timed / rejected.
Writes the ``tuning`` section of benchmarks/RESULTS.md (``--no-write`` to only print).

    .venv/bin/python benchmarks/tuned_vs_default.py [--batch 32] [--budget 12] [--layers a,b]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

DEFAULT_LAYERS = "res2_branch2b,res3_branch2b,res4_branch2b,res5_branch2b,res4_branch2c,res4bf_branch2a"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--budget", type=float, default=12.0, help="seconds per layer and pass")
    ap.add_argument("--layers", default=DEFAULT_LAYERS)
    ap.add_argument("--passes", default="fwd,bwd_data,bwd_weight")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    os.environ["DFPGEN_CACHE_DIR"] = tempfile.mkdtemp(prefix="dfpgen-tune-bench-")

    from dfpgen import autotune
    from dfpgen.layer_tables import find_layer
    from dfpgen.spec import parse_full
    from dfpgen.target import host_target
    from dfpgen.threads import num_threads
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from results_md import write_section

    target = host_target()
    rows = ["| layer | pass | default config | default GMAC/s | tuned config | tuned GMAC/s | speed-up | "
            "tune s (budget) | timed / rejected |", "|---|---|---|---|---|---|---|---|---|"]
    speedups: dict[str, list[float]] = {}
    tune_times = []
    for name in args.layers.split(","):
        _, _, geo = find_layer("resnet50", name)
        for pk in args.passes.split(","):
            spec = parse_full(f"n{args.batch}{geo}", pk)
            t0 = time.perf_counter()
            r = autotune.tune(spec, target=target, budget=args.budget, force=True)
            took = time.perf_counter() - t0
            tune_times.append(took)
            speedups.setdefault(pk, []).append(r.speedup)
            row = (f"| {name} | {pk} | {r.default_config.short()} | {r.default_gmacs:.1f} | {r.config.short()} | "
                   f"{r.gmacs:.1f} | {r.speedup:.2f}x | {took:.1f} ({args.budget:g}) | "
                   f"{len(r.candidates)} / {len(r.rejected)} |")
            print(row, flush=True)
            rows.append(row)
    allsp = [s for v in speedups.values() for s in v]
    summary = [f"Median speed-up over the default heuristic: {statistics.median(allsp):.2f}x over all "
               f"{len(allsp)} layer-passes (goal >= 1.1x on the median layer); per pass: "
               + ", ".join(f"{pk} {statistics.median(v):.2f}x" for pk, v in speedups.items())
               + f". Longest single-layer tune: {max(tune_times):.1f} s for a {args.budget:g} s budget."]
    body = "\n".join([f"## Autotuner: tuned vs default, ResNet-50, batch {args.batch}, {num_threads()} thread(s)", "",
                      f"Exact overflow mode (the default), {target.cpu} / {target.tier}. Command: "
                      f"`python benchmarks/tuned_vs_default.py {' '.join(sys.argv[1:])}`.", "",
                      *rows, "", *summary])
    print("\n".join(summary))
    if not args.no_write:
        write_section("tuning", body)


if __name__ == "__main__":
    main()
