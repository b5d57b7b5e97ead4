#!/usr/bin/env python3
"""One training step (forward + backward + SGD update), DFP16 vs FP32 vs bf16 autocast.

Models: the torchvision-shaped ResNet-50 (in-repo, ``dfpgen.examples.models.resnet50``) at
224x224 and the Fashion-MNIST ResNet-20 (1x28x28), same run, same thread count. Each
precision gets ``--warmup`` untimed steps (DFP16 compiles or loads its kernels there), then
``--repeats`` timed steps; the table gives the median step time, images/s, the ratio to FP32
(> 1: faster than FP32) and the bytes autograd saved for backward in one step (unique
storages, parameters excluded). Figures, not a test: performance is never asserted.

    python benchmarks/train_step.py                     # ResNet-50 batch 32 + ResNet-20 batch 128
    python benchmarks/train_step.py --batch 8 --repeats 3 --models resnet50
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import tempfile
import sys
import time

import torch
import torch.nn.functional as F

import dfpgen.runtime as dfp
from dfpgen.examples import models

PRECISIONS = ("fp32", "dfp16", "bf16")  # also "dfp16_unfused": convert(fuse=False)


def build(name: str, precision: str):
    torch.manual_seed(0)
    if name == "resnet50":
        m, shape, classes = models.resnet50(), (3, 224, 224), 1000
    else:
        m, shape, classes = models.resnet20(), (1, 28, 28), 10
    if precision.startswith("dfp16"):
        dfp.convert(m, fuse=precision == "dfp16")
    return m.to(memory_format=torch.channels_last), shape, classes


def bench(name: str, precision: str, batch: int, warmup: int, repeats: int) -> dict:
    model, shape, classes = build(name, precision)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, *shape, generator=g).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, classes, (batch,), generator=g)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            loss = F.cross_entropy(model(x).float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(warmup):
        step()
    seen = {}

    def hook(t):
        st = t.untyped_storage()
        if st.data_ptr() not in params:
            seen[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(hook, lambda t: t):
        step()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    med = statistics.median(times)
    return {"model": name, "precision": precision, "batch": batch, "median_s": med,
            "min_s": min(times), "img_s": batch / med, "saved_mb": sum(seen.values()) / 2**20}


def table(rows) -> str:
    out = ["| model | precision | batch | median step (ms) | min (ms) | img/s | speed vs fp32 | "
           "saved for bwd (MB) |", "|---|---|---:|---:|---:|---:|---:|---:|"]
    base = {r["model"]: r["median_s"] for r in rows if r["precision"] == "fp32"}
    for r in rows:
        ratio = base.get(r["model"], float("nan")) / r["median_s"]
        out.append(f"| {r['model']} | {r['precision']} | {r['batch']} | {1e3 * r['median_s']:.0f} | "
                   f"{1e3 * r['min_s']:.0f} | {r['img_s']:.1f} | {ratio:.2f}x | {r['saved_mb']:.0f} |")
    return "\n".join(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="resnet50,resnet20")
    p.add_argument("--precisions", default=",".join(PRECISIONS))
    p.add_argument("--batch", type=int, default=32, help="ResNet-50 batch")
    p.add_argument("--batch-small", type=int, default=128, help="ResNet-20 batch")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--no-write", action="store_true", help="print only; do not update RESULTS.md")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)  # model,precision,json
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
        from dfpgen import threads
        threads.set_num_threads(args.threads)
    if args.child:
        name, prec, out = args.child.split(",", 2)
        batch = args.batch if name == "resnet50" else args.batch_small
        with open(out, "w") as f:
            json.dump(bench(name, prec, batch, args.warmup, args.repeats), f)
        return 0
    rows = []
    child_argv = [a for a in (argv if argv is not None else sys.argv[1:]) if a != "--no-write"]
    for name in args.models.split(","):
        for prec in args.precisions.split(","):
            # One process per run: its own peak memory and kernel state. Every precision
            # keeps OpenMP's default wait policy: DFP16's kernels run on PyTorch's OpenMP team
            # (dfpgen/openmp.py), so its spinning threads are the ones that pick them up.
            env = dict(os.environ)
            with tempfile.NamedTemporaryFile(suffix=".json") as tmp:
                subprocess.run([sys.executable, os.path.abspath(__file__), *child_argv,
                                "--child", f"{name},{prec},{tmp.name}"], env=env, check=True)
                with open(tmp.name) as f:
                    r = json.load(f)
            print(f"{name} {prec}: median {1e3 * r['median_s']:.0f} ms, {r['img_s']:.1f} img/s",
                  file=sys.stderr, flush=True)
            rows.append(r)
    head = (f"{torch.get_num_threads()} threads, {args.repeats} timed steps after "
            f"{args.warmup} warm-up, each run in its own process "
            f"(OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')}, DFPGEN_THREADING="
            f"{os.environ.get('DFPGEN_THREADING', 'unset')}), torch {torch.__version__}, overflow mode "
            f"{dfp.default_overflow()!r}; command: `python benchmarks/train_step.py "
            f"{' '.join(argv if argv is not None else sys.argv[1:])}`")
    body = table(rows)
    print(f"\n{head}\n\n{body}")
    if not args.no_write:
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        from results_md import write_section
        write_section("train_step", f"## Training step: DFP16 vs FP32 vs bf16 "
                      f"(benchmarks/train_step.py)\n\n{head}\n\n{body}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
