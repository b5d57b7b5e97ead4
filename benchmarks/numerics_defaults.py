#!/usr/bin/env python3
"""Measurements behind the DFP16 defaults: magnitude bits P in {15, 14, 13, 12} x overflow
mode in {exact, fast}, on realistic tensors.

1. ResNet-50 layer shapes (in-repo ``dfpgen.examples.models.resnet50``, 10 classes) fed with
   real data: Fashion-MNIST images upsampled to ``--input`` pixels and repeated to 3
   channels, batch ``--l-batch``. After ``--warm`` FP32 SGD steps, one more step captures,
   for the layers in ``LAYERS``, the FP32 input X, weight W and output gradient dY. Every
   pass (forward, backward-data, backward-weight) then runs through dfpgen's numpy API for
   every (bits, overflow): saturated INT32 lanes (``RunInfo.saturated``), relative error
   ``||out - ref||_2 / ||ref||_2`` against PyTorch FP32 on the same FP32 tensors, and the
   median wall time of ``--repeats`` calls (quantization included; kernels warm).
2. The Fashion-MNIST ResNet-20 of ``examples/train_fashion_mnist.py``: ``--steps`` SGD steps
   (batch ``--batch``, real training images, same seed and batch order for every candidate
   and for FP32) with a :class:`dfpgen.runtime.NumericsMonitor` (saturations per pass, mean
   relative error vs FP32 on sampled steps), then the test accuracy on ``--test`` images and
   the median step time.

Prints markdown tables and writes them to the ``numerics`` section of benchmarks/RESULTS.md.
Times come from a shared machine; compare within one run only.

    python benchmarks/numerics_defaults.py                  # both parts
    python benchmarks/numerics_defaults.py --steps 0        # layer part only
"""
from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))

import dfpgen  # noqa: E402
import dfpgen.runtime as dfp  # noqa: E402
from dfpgen import OverflowWarning  # noqa: E402
from dfpgen.dfp import DfpFormat  # noqa: E402
from dfpgen.examples import data, models  # noqa: E402

BITS = (15, 14, 13, 12)
MODES = ("exact", "fast")
PASSES = ("fwd", "bwd_data", "bwd_weight")
# ResNet-50 module -> layer name of dfpgen/layer_tables.py (channels and kernel
# as there; spatial size scaled by --input / 224).
LAYERS = {
    "conv1": "conv1",
    "layer1.0.conv1": "res2a_branch2a",
    "layer1.1.conv2": "res2_branch2b",
    "layer1.1.conv3": "res2_branch2c",
    "layer2.0.conv2": "res3a_branch2b",
    "layer3.2.conv1": "res4bf_branch2a",
    "layer3.2.conv2": "res4_branch2b",
    "layer4.0.downsample.0": "res5a_branch1",
    "layer4.1.conv2": "res5_branch2b",
}


def rel_err(out, ref: torch.Tensor) -> float:
    o = torch.as_tensor(np.array(out, dtype=np.float64))
    r = ref.double()
    den = float(r.norm())
    return float((o - r).norm()) / den if den else 0.0


def fmnist_images(n: int, size: int | None = None, channels: int = 1):
    x, y = data.load_split("train", limit=n)
    if size:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    if channels > 1:
        x = x.repeat(1, channels, 1, 1)
    return x.contiguous(), y


# --- part 1: ResNet-50 layers on captured tensors ----------------------------------------


def capture(args) -> dict:
    torch.manual_seed(0)
    model = models.resnet50(num_classes=10)
    x, y = fmnist_images(args.l_batch * (args.warm + 1), args.input, 3)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    got: dict[str, dict] = {}

    def hook(name):
        def fn(module, inp, out):
            if not capturing:
                return
            got[name] = {"x": inp[0].detach().clone(), "w": module.weight.detach().clone(),
                         "stride": module.stride, "padding": module.padding}
            out.register_hook(lambda g: got[name].__setitem__("dy", g.detach().clone()))
        return fn

    handles = [model.get_submodule(n).register_forward_hook(hook(n)) for n in LAYERS]
    capturing = False
    for step in range(args.warm + 1):
        capturing = step == args.warm
        sl = slice(step * args.l_batch, (step + 1) * args.l_batch)
        loss = F.cross_entropy(model(x[sl]), y[sl])
        opt.zero_grad()
        loss.backward()
        opt.step()
    for h in handles:
        h.remove()
    return got


def timed(fn, repeats: int):
    out = fn()  # compiles (or loads) the kernels
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        ts.append(time.perf_counter() - t0)
    return out, statistics.median(ts)


def run_layer(t: dict, bits: int, mode: str, repeats: int) -> dict:
    x, w, dy = t["x"].numpy(), t["w"].numpy(), t["dy"].numpy()
    kw = dict(stride=t["stride"], padding=t["padding"], overflow=mode,
              fmt=DfpFormat(bits=bits), return_info=True)
    calls = {
        "fwd": (lambda: dfpgen.conv2d(x, w, **kw),
                lambda: F.conv2d(t["x"], t["w"], None, t["stride"], t["padding"])),
        "bwd_data": (lambda: dfpgen.conv2d_input(x.shape, w, dy, **kw),
                     lambda: torch.nn.grad.conv2d_input(x.shape, t["w"], t["dy"], t["stride"],
                                                        t["padding"])),
        "bwd_weight": (lambda: dfpgen.conv2d_weight(x, w.shape, dy, **kw),
                       lambda: torch.nn.grad.conv2d_weight(t["x"], w.shape, t["dy"], t["stride"],
                                                           t["padding"])),
    }
    res = {}
    for p, (run, ref) in calls.items():
        (out, info), sec = timed(run, repeats)
        res[p] = {"err": rel_err(out, ref()), "sat": info.saturated, "sec": sec,
                  "flush": info.flush}
    return res


def layer_part(args) -> tuple[str, dict]:
    t0 = time.perf_counter()
    tensors = capture(args)
    print(f"captured {len(tensors)} layers in {time.perf_counter() - t0:.1f}s", flush=True)
    results = {}
    for mod, name in LAYERS.items():
        t = tensors[mod]
        for bits in BITS:
            for mode in MODES:
                results[(name, bits, mode)] = run_layer(t, bits, mode, args.repeats)
        print(f"  {name}: done ({time.perf_counter() - t0:.0f}s)", flush=True)
    lines = [f"### ResNet-50 layers, tensors captured from a real training step "
             f"(Fashion-MNIST upsampled to {args.input}x{args.input}x3, batch {args.l_batch}, "
             f"after {args.warm} SGD steps)", "",
             "Summary over the layers below: total saturated INT32 lanes, geometric mean and "
             "max relative error vs PyTorch FP32, summed median time of the three passes.", "",
             "| bits | overflow | " + " | ".join(f"{p} sat | {p} err gmean / max" for p in PASSES)
             + " | time (ms) |",
             "|---|---|" + "---|---|" * len(PASSES) + "---|"]
    for bits in BITS:
        for mode in MODES:
            rows = [results[(n, bits, mode)] for n in LAYERS.values()]
            cells = []
            for p in PASSES:
                errs = [max(r[p]["err"], 1e-12) for r in rows]
                gm = math.exp(sum(map(math.log, errs)) / len(errs))
                cells += [str(sum(r[p]["sat"] for r in rows)), f"{gm:.2e} / {max(errs):.2e}"]
            ms = 1e3 * sum(r[p]["sec"] for r in rows for p in PASSES)
            lines.append(f"| {bits} | {mode} | " + " | ".join(cells) + f" | {ms:.1f} |")
    lines += ["", "Per layer and pass: relative error (saturated lanes in brackets when > 0).", "",
              "| layer | X / W | pass | " + " | ".join(f"P{b} {m}" for b in BITS for m in MODES)
              + " |", "|---|---|---|" + "---|" * (len(BITS) * len(MODES))]
    for mod, name in LAYERS.items():
        t = tensors[mod]
        for p in PASSES:
            cells = []
            for bits in BITS:
                for mode in MODES:
                    r = results[(name, bits, mode)][p]
                    cells.append(f"{r['err']:.1e}" + (f" [{r['sat']}]" if r["sat"] else ""))
            shape = f"{tuple(t['x'].shape)} / {tuple(t['w'].shape)}"
            lines.append(f"| {name} | {shape} | {p} | " + " | ".join(cells) + " |")
    return "\n".join(lines), results


# --- part 2: Fashion-MNIST ResNet-20 training -----------------------------------------


def train_candidate(bits, mode, args, xtr, ytr, xte, yte) -> dict:
    torch.manual_seed(args.seed)
    model = models.resnet20()
    mon = None
    if bits:
        dfp.convert(model, dfp_format=DfpFormat(bits=bits), overflow=mode)
        mon = dfp.NumericsMonitor(model, sample_every=args.sample_every)
    model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, weight_decay=5e-4,
                          nesterov=True)
    # The example's schedule: linear warm-up over 5% of the steps, then cosine decay to 0,
    # so that the short run ends on a settled model.
    warm = max(1, args.steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / warm if s < warm
        else 0.5 * (1 + math.cos(math.pi * (s - warm) / max(1, args.steps - warm))))
    gen = torch.Generator().manual_seed(args.seed)
    perm = torch.randperm(len(xtr), generator=gen)
    times, losses = [], []
    for step in range(args.steps):
        idx = perm[(step * args.batch) % len(xtr):][:args.batch]
        t0 = time.perf_counter()
        loss = F.cross_entropy(model(xtr[idx].contiguous(memory_format=torch.channels_last)),
                               ytr[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        times.append(time.perf_counter() - t0)
        losses.append(loss.item())
    model.eval()
    correct = 0
    with torch.no_grad():
        for i in range(0, len(xte), 500):
            correct += int((model(xte[i:i + 500]).argmax(1) == yte[i:i + 500]).sum())
    row = {"acc": correct / len(xte), "loss": sum(losses[-10:]) / len(losses[-10:]),
           "step_s": statistics.median(times[1:] or times)}
    if mon is not None:
        mon.close()
        for p in PASSES:
            rs = [r for r in mon.records if r.pass_kind == p]
            errs = [r.rel_err for r in rs if not math.isnan(r.rel_err)]
            row[f"{p}_sat"] = sum(r.saturated for r in rs)
            row[f"{p}_err"] = sum(errs) / len(errs) if errs else float("nan")
    return row


def candidates(spec: str) -> list[tuple[int, str]]:
    """``"all"`` or a comma list such as ``fp32,15:exact,13:fast`` -> [(bits, mode)];
    FP32 is (0, "fp32")."""
    if spec == "all":
        return [(0, "fp32")] + [(b, m) for b in BITS for m in MODES]
    out = []
    for item in spec.split(","):
        if item == "fp32":
            out.append((0, "fp32"))
        else:
            b, m = item.split(":")
            out.append((int(b), m))
    return out


def training_part(args) -> tuple[str, dict]:
    xtr, ytr = data.load_split("train", limit=args.train)
    xte, yte = data.load_split("test", limit=args.test)
    results = {}
    for bits, mode in candidates(args.candidates):
        t0 = time.perf_counter()
        results[(bits, mode)] = train_candidate(bits, mode, args, xtr, ytr, xte, yte)
        print(f"  train P{bits} {mode}: {results[(bits, mode)]} "
              f"({time.perf_counter() - t0:.0f}s)", flush=True)
    lines = [f"### Fashion-MNIST ResNet-20 (widths 16/32/64), {args.steps} SGD steps of batch "
             f"{args.batch} (first {args.train} training images; lr {args.lr}, Nesterov momentum, "
             f"warm-up + cosine) from seed {args.seed}, test accuracy on {args.test} images", "",
             "Saturated lanes summed over all layers and steps; relative error vs FP32: mean "
             f"over layers on every {args.sample_every}th step (NumericsMonitor).", "",
             "| bits | overflow | test acc % | train loss (last 10) | step (s) | "
             + " | ".join(f"{p} sat | {p} err" for p in PASSES) + " |",
             "|---|---|---|---|---|" + "---|---|" * len(PASSES)]
    for (bits, mode), r in results.items():
        cells = ([f"{r[f'{p}_sat']} | {r[f'{p}_err']:.2e}" for p in PASSES] if bits
                 else ["- | -"] * len(PASSES))
        lines.append(f"| {bits or 'FP32'} | {mode if bits else '-'} | {100 * r['acc']:.2f} | "
                     f"{r['loss']:.4f} | {r['step_s']:.3f} | " + " | ".join(cells) + " |")
    return "\n".join(lines), results


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--input", type=int, default=112, help="ResNet-50 input size (224: ImageNet)")
    p.add_argument("--l-batch", type=int, default=8, help="ResNet-50 capture batch")
    p.add_argument("--warm", type=int, default=3, help="FP32 SGD steps before the capture")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--steps", type=int, default=40, help="ResNet-20 steps per candidate (0: skip)")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--train", type=int, default=6000)
    p.add_argument("--test", type=int, default=2000)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sample-every", type=int, default=10)
    p.add_argument("--candidates", default="all", help="all, or e.g. fp32,15:exact,13:fast")
    p.add_argument("--no-layers", action="store_true", help="skip the ResNet-50 layer part")
    p.add_argument("--no-write", action="store_true", help="do not touch RESULTS.md")
    return p.parse_args(argv)


def main(argv=None):
    """Runs the parts asked for; each writes its own RESULTS.md section (``numerics`` for
    the layers, ``numerics_training`` for the training runs), so they can be refreshed
    separately."""
    args = parse_args(argv)
    warnings.simplefilter("ignore", OverflowWarning)  # counted from RunInfo instead
    host = (f"Host: {dfpgen.host_target().cpu} ({dfpgen.host_target().tier}), "
            f"{torch.get_num_threads()} torch threads, "
            f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.")
    sections = {}
    if not args.no_layers:
        text, _ = layer_part(args)
        sections["numerics"] = "\n".join([
            "## Numerics: magnitude bits x overflow mode (`benchmarks/numerics_defaults.py`)",
            "", host, "", text])
    if args.steps:
        text, _ = training_part(args)
        sections["numerics_training"] = "\n".join([host, "", text])
    for name, body in sections.items():
        print(body, flush=True)
        if not args.no_write:
            from results_md import write_section
            write_section(name, body)
    return sections


if __name__ == "__main__":
    main()
