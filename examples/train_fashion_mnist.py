#!/usr/bin/env python3
"""Train a ResNet-20-style network on Fashion-MNIST in FP32, DFP16 (dfpgen) or bf16 autocast.

    python examples/train_fashion_mnist.py --precision dfp16
    python examples/train_fashion_mnist.py --compare            # FP32 vs DFP16 (+ bf16), same seed, table

``--compare`` runs bf16 only where the CPU has bf16 arithmetic (AVX512_BF16 / AMX): elsewhere
PyTorch emulates it, many times slower than FP32 (about 10x on AMD Zen 3), which says nothing
about 16-bit training; ``--bf16 on`` measures it anyway.

DFP16 follows Das et al. (ICLR 2018): every conv / linear pass runs on INT16 mantissas with a
shared exponent (dfpgen's generated VNNI kernels), FP32 master weights and FP32 SGD;
BatchNorm, ReLU, pooling and the loss stay FP32. bf16 is ``torch.autocast("cpu", bfloat16)``.

Reports per epoch: mean training loss, test loss and accuracy, training images/s (the first
step, which compiles or loads the kernels, is left out), peak resident memory of the process
(``resource.getrusage(RUSAGE_SELF).ru_maxrss``: each precision of ``--compare`` runs in its
own process so the peaks are separate) and the bytes autograd saves for backward in one step
(``torch.autograd.graph.saved_tensors_hooks``, unique storages, parameters excluded). Writes
``<out>/fmnist_<precision>_steps.csv`` (loss per step), ``..._evals.csv`` (test loss and
accuracy at ``--eval-points`` points), ``..._epochs.csv``, ``fmnist_compare.csv`` and
``fmnist_curves.png``.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import os
import resource
import subprocess
import sys
import time


import torch
import torch.nn.functional as F

import dfpgen.runtime as dfp
from dfpgen.errors import DfpError
from dfpgen.examples import data, models

PRECISIONS = ("fp32", "dfp16", "bf16")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--precision", choices=PRECISIONS, default="dfp16")
    p.add_argument("--compare", action="store_true",
                   help="train fp32, dfp16 (and bf16, see --bf16) from the same seed and print a table")
    p.add_argument("--bf16", choices=("auto", "on", "off"), default="auto",
                   help="with --compare: bf16 too (auto: only where the CPU has native bf16)")
    p.add_argument("--data", default=data.default_dir(), help="directory of the idx(.gz) files")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--max-steps", type=int, default=0, help="stop after this many steps (0: no cap)")
    p.add_argument("--train-subset", type=int, default=6000, help="first N training images (0: all 60000)")
    p.add_argument("--test-subset", type=int, default=2000, help="first N test images (0: all 10000)")
    p.add_argument("--widths", default="16,32,64", help="channels of the three stages")
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch and dfpgen threads (0: default)")
    p.add_argument("--skip", action="append", default=[],
                   help="layer name/glob kept in FP32 under dfp16 (repeatable), e.g. conv1")
    p.add_argument("--overflow", choices=("exact", "fast"), default="exact")
    p.add_argument("--grad-rounding", choices=("nearest", "stochastic"), default="nearest")
    p.add_argument("--bits", type=int, default=15, choices=range(8, 16), metavar="{8..15}",
                   help="DFP16 mantissa magnitude bits (15: full INT16; fewer leave INT32 headroom)")
    p.add_argument("--eval-points", type=int, default=3,
                   help="test-set evaluations spread over the run (epoch ends always evaluate)")
    p.add_argument("--out", default="runs", help="directory for CSV files and the plot")
    p.add_argument("--numerics", type=int, nargs="?", const=10, default=0, metavar="N",
                   help="dfp16: attach dfp.NumericsMonitor (statistics and the FP32 comparison "
                        "every N steps, default 10); print its table, write "
                        "fmnist_dfp16_numerics.csv/.png")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--seeds", default=None,
                   help="with --compare: comma-separated seeds (e.g. 0,1,2); the table gives means")
    p.add_argument("--results-md", action="store_true",
                   help="with --compare: also write the table into benchmarks/RESULTS.md")
    p.add_argument("--json", default=None, help=argparse.SUPPRESS)  # --compare's children
    return p.parse_args(argv)


def build_model(args) -> torch.nn.Module:
    torch.manual_seed(args.seed)
    widths = tuple(int(w) for w in args.widths.split(","))
    model = models.resnet20(widths=widths)
    if args.precision == "dfp16":
        from dfpgen.dfp import DfpFormat
        dfp.convert(model, skip=args.skip or None, overflow=args.overflow,
                    grad_rounding=args.grad_rounding)
        if args.bits != 15:
            dfp.set_default_format(DfpFormat(bits=args.bits))
        if not dfp.is_enabled():
            print("note: $DFPGEN_DISABLE is set, so this dfp16 run computes in FP32 (the A/B switch)",
                  file=sys.stderr)
    return model.to(memory_format=torch.channels_last)


def autocast(args):
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.precision == "bf16")


def saved_bytes(model, x, y) -> int:
    """Bytes autograd keeps for backward in one forward (unique storages, no parameters)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in params:
            seen[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        F.cross_entropy(model(x), y).backward()
    model.zero_grad(set_to_none=True)
    return sum(seen.values())


@torch.no_grad()
def evaluate(model, x, y, args, batch=500):
    model.eval()
    loss, correct = 0.0, 0
    with autocast(args):
        for i in range(0, len(x), batch):
            out = model(x[i:i + batch].contiguous(memory_format=torch.channels_last)).float()
            loss += F.cross_entropy(out, y[i:i + batch], reduction="sum").item()
            correct += (out.argmax(1) == y[i:i + batch]).sum().item()
    model.train()
    return loss / len(x), correct / len(x)


def progress(args, total):
    if args.no_progress:
        return None
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                               TimeRemainingColumn)
    bar = Progress(TextColumn(f"[bold]{args.precision:>5}[/] epoch {{task.fields[epoch]}}"),
                   BarColumn(), MofNCompleteColumn(), TextColumn("loss {task.fields[loss]:.3f}"),
                   TimeRemainingColumn(), transient=True)
    bar.start()
    bar.add_task("train", total=total, epoch=1, loss=float("nan"))
    return bar


def train(args) -> dict:
    if args.threads:
        torch.set_num_threads(args.threads)
        from dfpgen import threads
        threads.set_num_threads(args.threads)
    xtr, ytr = data.load_split("train", args.data, args.train_subset or None)
    xte, yte = data.load_split("test", args.data, args.test_subset or None)
    model = build_model(args)
    monitor = None
    if args.numerics and args.precision == "dfp16":
        monitor = dfp.NumericsMonitor(model, sample_every=args.numerics)
    steps_per_epoch = math.ceil(len(xtr) / args.batch_size)
    total = steps_per_epoch * args.epochs
    if args.max_steps:
        total = min(total, args.max_steps)
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, weight_decay=5e-4,
                          nesterov=True)
    # Linear warm-up over 5% of the steps, then cosine decay to 0.
    warm = max(1, total // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / warm if s < warm else 0.5 * (1 + math.cos(math.pi * (s - warm) / max(1, total - warm))))
    gen = torch.Generator().manual_seed(args.seed)
    os.makedirs(args.out, exist_ok=True)
    step_rows, epoch_rows, eval_rows = [], [], []
    points = max(1, args.eval_points)
    eval_at = {round(total * k / points) for k in range(1, points)}
    bar = progress(args, total)
    step, t_train, imgs_timed, saved = 0, 0.0, 0, 0
    start = time.perf_counter()
    for epoch in range(1, args.epochs + 1):
        if step >= total:
            break
        perm = torch.randperm(len(xtr), generator=gen)
        losses = []
        for i in range(0, len(xtr), args.batch_size):
            if step >= total:
                break
            idx = perm[i:i + args.batch_size]
            xb = xtr[idx].contiguous(memory_format=torch.channels_last)
            yb = ytr[idx]
            if step == 1:  # after the first step: kernels are loaded, shapes seen
                with autocast(args):
                    saved = saved_bytes(model, xb, yb)
            t0 = time.perf_counter()
            with autocast(args):
                loss = F.cross_entropy(model(xb).float(), yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            dt = time.perf_counter() - t0
            if step > 0:
                t_train += dt
                imgs_timed += len(idx)
            step += 1
            losses.append(loss.item())
            if not math.isfinite(losses[-1]):
                raise SystemExit(f"{args.precision}: loss is {losses[-1]} at step {step}")
            step_rows.append({"step": step, "epoch": epoch, "loss": losses[-1],
                              "lr": sched.get_last_lr()[0], "seconds": dt})
            if bar is not None:
                bar.update(0, advance=1, epoch=epoch, loss=sum(losses[-20:]) / len(losses[-20:]))
            if step in eval_at and step < total and i + args.batch_size < len(xtr):
                tl, ta = evaluate(model, xte, yte, args)
                eval_rows.append({"step": step, "epoch": epoch, "test_loss": tl, "test_acc": ta})
        test_loss, test_acc = evaluate(model, xte, yte, args)
        eval_rows.append({"step": step, "epoch": epoch, "test_loss": test_loss, "test_acc": test_acc})
        row = {"epoch": epoch, "step": step, "train_loss": sum(losses) / len(losses),
               "test_loss": test_loss, "test_acc": test_acc,
               "img_per_s": imgs_timed / t_train if t_train else float("nan"),
               "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
               "saved_mb": saved / 2**20, "elapsed_s": time.perf_counter() - start}
        epoch_rows.append(row)
        msg = (f"[{args.precision}] epoch {epoch}: train loss {row['train_loss']:.4f}  "
               f"test loss {test_loss:.4f}  test acc {100 * test_acc:.2f}%  "
               f"{speed(row['img_per_s'])} img/s  peak RSS {row['peak_rss_mb']:.0f} MB  "
               f"saved for backward {row['saved_mb']:.1f} MB")
        if bar is not None:
            # plain text through the bar's console: no markup ("[fp32]" is not a style tag)
            # and no wrapping at the console width
            bar.console.print(msg, markup=False, highlight=False, soft_wrap=True)
        else:
            print(msg)
    if bar is not None:
        bar.stop()
    if monitor is not None:
        monitor.close()
        print(monitor.table())
        monitor.to_csv(os.path.join(args.out, "fmnist_dfp16_numerics.csv"))
        monitor.plot(os.path.join(args.out, "fmnist_dfp16_numerics.png"))
        print(f"wrote {args.out}/fmnist_dfp16_numerics.csv and .png")
    write_csv(os.path.join(args.out, f"fmnist_{args.precision}_steps.csv"), step_rows)
    write_csv(os.path.join(args.out, f"fmnist_{args.precision}_epochs.csv"), epoch_rows)
    write_csv(os.path.join(args.out, f"fmnist_{args.precision}_evals.csv"), eval_rows)
    result = dict(epoch_rows[-1], precision=args.precision, steps=step,
                  train_seconds=t_train)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f)
    return result


def write_csv(path, rows):
    if not rows:
        return
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


def read_csv(path):
    with open(path) as f:
        return [{k: float(v) for k, v in r.items()} for r in csv.DictReader(f)]


def plot(out, precisions):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for p in precisions:
        steps = read_csv(os.path.join(out, f"fmnist_{p}_steps.csv"))
        evals = read_csv(os.path.join(out, f"fmnist_{p}_evals.csv"))
        k = max(1, len(steps) // 50)  # moving average over ~2% of the run
        ys = [sum(r["loss"] for r in steps[max(0, i - k + 1):i + 1]) / len(steps[max(0, i - k + 1):i + 1])
              for i in range(len(steps))]
        ax1.plot([r["step"] for r in steps], ys, label=p)
        ax2.plot([r["step"] for r in evals], [100 * r["test_acc"] for r in evals], "o-", label=p)
    ax1.set(xlabel="step", ylabel="training loss (moving average)", yscale="log")
    ax2.set(xlabel="step", ylabel="test accuracy (%)")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle("ResNet-20 on Fashion-MNIST: " + " vs ".join(
        {"fp32": "FP32", "dfp16": "DFP16 (dfpgen)", "bf16": "bf16"}[p] for p in precisions))
    fig.tight_layout()
    path = os.path.join(out, "fmnist_curves.png")
    fig.savefig(path, dpi=110)
    return path


def speed(value: float, spec: str = ".0f") -> str:
    """A throughput figure, or "n/a" when nothing was timed (a run of one step: the first
    step, which loads the kernels, is never timed)."""
    return "n/a" if math.isnan(value) else format(value, spec)


def _ratio(r: dict, base: dict | None) -> str:
    """img/s relative to FP32's: "-" without an FP32 run, "n/a" where either rate is unknown."""
    if base is None:
        return "-"
    v = r["img_per_s"] / base["img_per_s"] if base["img_per_s"] else float("nan")
    return "n/a" if not math.isfinite(v) else f"{v:.2f}x"


def table(results) -> str:
    base = next((r for r in results if r["precision"] == "fp32"), None)  # no FP32 run: "-"
    lines = ["| precision | test acc (%) | test loss | train loss | img/s | vs fp32 | "
             "peak RSS (MB) | saved for bwd (MB) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        lines.append(f"| {r['precision']} | {100 * r['test_acc']:.2f} | {r['test_loss']:.4f} | "
                     f"{r['train_loss']:.4f} | {speed(r['img_per_s'])} | "
                     f"{_ratio(r, base)} | "
                     f"{r['peak_rss_mb']:.0f} | "
                     f"{r['saved_mb']:.1f} |")
    return "\n".join(lines)


def seed_table(by_seed: dict) -> str:
    """Mean (and per-seed) test accuracy per precision, and the gap to FP32."""
    seeds = list(by_seed)
    ran = [r["precision"] for r in by_seed[seeds[0]]]
    acc = {p: [100 * next(r for r in by_seed[s] if r["precision"] == p)["test_acc"] for s in seeds]
           for p in ran}
    ips = {p: [next(r for r in by_seed[s] if r["precision"] == p)["img_per_s"] for s in seeds]
           for p in ran}
    mean = {p: sum(v) / len(v) for p, v in acc.items()}
    lines = [f"| precision | mean test acc (%), seeds {','.join(map(str, seeds))} | per seed | "
             "vs fp32 (points) | mean img/s |", "|---|---:|---|---:|---:|"]
    for p in ran:
        lines.append(f"| {p} | {mean[p]:.2f} | {' / '.join(f'{a:.2f}' for a in acc[p])} | "
                     f"{mean[p] - mean['fp32']:+.2f} | {speed(sum(ips[p]) / len(ips[p]))} |")
    return "\n".join(lines)


def compared_precisions(args) -> tuple[str, ...]:
    """The precisions ``--compare`` trains: FP32, DFP16 and bf16 as ``--bf16`` says (auto:
    where the CPU has native bf16; otherwise one line says why it is left out)."""
    from dfpgen.target import native_target
    native = native_target().native_bf16
    if args.bf16 == "on" or (args.bf16 == "auto" and native):
        return PRECISIONS
    if args.bf16 == "auto":
        print("bf16: left out, this CPU has no native bf16 (PyTorch emulates it, about 10x slower "
              "than FP32); --bf16 on to measure it", flush=True)
    return ("fp32", "dfp16")


def compare(args, argv) -> dict:
    """Run every precision (per seed) in its own process: separate peak RSS, same seed and
    data order. Returns {seed: [result per precision]}; per-seed files go to <out>/seed<s>
    when there are several seeds."""
    seeds = [int(s) for s in args.seeds.split(",")] if args.seeds else [args.seed]
    drop = {"--compare", "--results-md"}
    precisions = compared_precisions(args)
    base, skip = [], False
    for a in argv:  # the children get their own --seed / --out / --precision
        if skip:
            skip = False
        elif a in ("--seeds", "--seed", "--out", "--bf16"):
            skip = True
        elif not a.startswith(("--seeds=", "--seed=", "--out=", "--bf16=")) and a not in drop:
            base.append(a)
    by_seed = {}
    for seed in seeds:
        out = args.out if len(seeds) == 1 else os.path.join(args.out, f"seed{seed}")
        os.makedirs(out, exist_ok=True)
        by_seed[seed] = []
        for p in precisions:
            js = os.path.join(out, f"fmnist_{p}.json")
            cmd = [sys.executable, os.path.abspath(__file__), *base, "--precision", p,
                   "--seed", str(seed), "--out", out, "--json", js]
            rc = subprocess.call(cmd)
            if rc != 0:
                raise SystemExit(f"{p} run (seed {seed}) failed (exit code {rc})")
            with open(js) as f:
                by_seed[seed].append(json.load(f))
        write_csv(os.path.join(out, "fmnist_compare.csv"), by_seed[seed])
    return by_seed


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if not data.available(args.data):
        print(f"error: {data.how_to_get(args.data)}", file=sys.stderr)
        return 2
    try:
        dfp.check_environment()  # a bad DFPGEN_* variable: one line now, not a traceback later
    except DfpError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    by_seed = None
    if args.compare:
        by_seed = compare(args, argv)
        seed = next(iter(by_seed))
        results = by_seed[seed]
        precisions = tuple(r["precision"] for r in results)
        out = args.out if len(by_seed) == 1 else os.path.join(args.out, f"seed{seed}")
    else:
        results, precisions, seed, out = [train(args)], (args.precision,), args.seed, args.out
    if args.json:
        return 0
    png = plot(out, precisions)
    n = results[0]["steps"]
    head = (f"ResNet-20 ({args.widths}) on Fashion-MNIST: {args.train_subset or 60000} train "
            f"images, {n} steps of batch {args.batch_size}, tested on "
            f"{args.test_subset or 10000} images, {torch.get_num_threads()} threads")
    if by_seed and len(by_seed) > 1:
        body = f"seed {seed}:\n\n{table(results)}"
    else:
        head += f", seed {seed}"
        body = table(results)
    if by_seed and len(by_seed) > 1:
        body += f"\n\n{len(by_seed)} seeds:\n\n{seed_table(by_seed)}"
    print(f"\n{head}\n\n{body}")
    print(f"\nwrote {out}/fmnist_*.csv and {png}")
    if args.results_md and args.compare:
        sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                        "benchmarks"))
        from results_md import write_section
        cmd = " ".join(["python examples/train_fashion_mnist.py", *argv])
        write_section("fmnist_accuracy", f"## Fashion-MNIST: {' vs '.join(precisions)} "
                      f"(examples/train_fashion_mnist.py)\n\n`{cmd}`\n\n{head}; {body}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
