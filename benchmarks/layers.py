"""ResNet-50 layer benchmark: dfpgen DFP16 kernels vs PyTorch FP32 and bf16 (oneDNN,
channels_last), all three passes, measured in the same run.

For each layer of the case file and each pass it reports GMAC/s of dfpgen with pre-quantized
operands ("kernel": weight packing included, activation quantization not) and from FP32
operands ("+quant": what a training step pays), % of the tier's INT16 dot peak measured in
this run by a generated register-only loop of the tier's instruction (``vpdpwssd`` on the VNNI
tiers, ``vpmaddwd`` + ``vpaddd`` on AVX2; times the thread count; "n/a" on the generic tier,
which has no dot instruction), and ratios to FP32 and bf16. The main columns run exact mode (the default: flush interval proven from the operands,
bit-exact with the reference); "fast" is the paper-length saturating chain (kernel only). It also measures quantize-and-pack bandwidth against
``np.copyto`` and the compile / cached-load time of a kernel. Writes the ``layers`` section of
benchmarks/RESULTS.md (``--no-write`` to only print).

    .venv/bin/python benchmarks/layers.py [--batch 32] [--threads N] [--layers res4_branch2b,...]
        [--no-bf16]   (skip PyTorch bf16: on CPUs without AVX512_BF16 it is emulated, 10x slower)
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import dfpgen
from dfpgen import threads as dthreads
from dfpgen.baseline import torch_seconds
from dfpgen.dfp import DfpFormat
from dfpgen.layer_tables import model_table
from dfpgen.pack import quantize_pack
from dfpgen.peak import dot_peak, fma_peak
from dfpgen.spec import parse_full
from dfpgen.target import host_target

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results_md import write_section  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CASES = ROOT.parent / "shared" / "cases" / "resnet50_layers.txt"
PASSES = ("fwd", "bwd_data", "bwd_weight")


def read_cases(path: Path) -> list[tuple[str, int, str]]:
    """``(name, count, geometry)`` rows of the case file, or the table embedded in dfpgen."""
    if not path.exists():
        return list(model_table("resnet50"))
    rows = []
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, count, geo = line.split()
            rows.append((name, int(count), geo))
    return rows


def median_seconds(fn, repeats: int, max_seconds: float = 3.0) -> float:
    fn()
    times, start = [], time.perf_counter()
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
        if time.perf_counter() - start > max_seconds and len(times) >= 3:
            break
    return statistics.median(times)


def channels_last(a: np.ndarray) -> np.ndarray:
    """An NCHW-shaped float32 view of NHWC memory (what torch's channels_last hands over)."""
    return np.ascontiguousarray(a.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2)


def dfp_runner(spec, quantized: bool, overflow: str, threads: int, x_dist: str = "normal",
               bits: int = 15):
    """One call of ``spec``'s pass. ``x_dist``: X standard normal, or ``relu`` (its positive
    part, as after ReLU: exact mode's bound then splits the products by sign); ``bits``:
    magnitude bits of the DFP format of every operand (15 = DFP16)."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal(spec.input_shape, dtype=np.float32)
    x = channels_last(np.maximum(x, 0) if x_dist == "relu" else x)
    w = rng.standard_normal(spec.weight_shape, dtype=np.float32)
    dy = channels_last(rng.standard_normal(spec.output_shape, dtype=np.float32))
    kw = dict(stride=spec.stride, padding=spec.padding, overflow=overflow, threads=threads)
    if quantized:
        f = DfpFormat(bits=bits)
        x, dy = quantize_pack(x, f, threads=threads), quantize_pack(dy, f, threads=threads)
        w = dfpgen.quantize(w, f)
    if spec.pass_kind == "fwd":
        return lambda: dfpgen.conv2d(x, w, **kw)
    if spec.pass_kind == "bwd_data":
        return lambda: dfpgen.conv2d_input(spec.input_shape, w, dy, **kw)
    return lambda: dfpgen.conv2d_weight(x, spec.weight_shape, dy, **kw)


def load_times() -> tuple[float, float]:
    """(compile ms, cached load ms) of one forward kernel, each in a fresh process."""
    code = ("import dfpgen, sys; from dfpgen.spec import parse_full; from dfpgen.pass_kernels import get_kernel\n"
            "k = get_kernel(parse_full('n32c256h14w14k256r3s3u1p1'))\n"
            "parts = getattr(k, 'parts', None) or [k]\n"
            "print(sum(p.loaded.seconds for p in parts) * 1e3, parts[0].loaded.source)\n")
    with tempfile.TemporaryDirectory() as d:
        env = {**os.environ, "DFPGEN_CACHE_DIR": d}
        out = []
        for expect in ("built", "disk"):
            r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
            ms, src = r.stdout.split()
            if src != expect:
                raise RuntimeError(f"expected a {expect} kernel, got {src}")
            out.append(float(ms))
    return out[0], out[1]


def pack_bandwidth(threads: int) -> tuple[float, float]:
    """(copy GB/s, quantize_pack GB/s) for a 32x256x56x56 float32 activation (channels_last)."""
    rng = np.random.default_rng(0)
    x = channels_last(rng.standard_normal((32, 256, 56, 56), dtype=np.float32))
    dst = np.empty_like(x)
    out = np.empty((32, 56, 56, 256), np.int16)
    n = x.size
    t_copy = median_seconds(lambda: np.copyto(dst, x), 7)
    t_pack = median_seconds(lambda: quantize_pack(x, threads=threads, out=out), 7)
    # copy moves 8 bytes/element (read + write FP32); quantize-and-pack 10 (two FP32 reads, INT16 write)
    return 8 * n / t_copy / 1e9, 10 * n / t_pack / 1e9


def fmt(v, spec=".2f", unit=""):
    return "n/a" if v is None else format(v, spec) + unit


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--threads", type=int, default=0, help="0: all CPUs of this process")
    ap.add_argument("--layers", default="", help="comma-separated layer names (default: all)")
    ap.add_argument("--passes", default=",".join(PASSES))
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--cases", type=Path, default=CASES)
    ap.add_argument("--no-write", action="store_true")
    ap.add_argument("--section", default="layers",
                    help="RESULTS.md section name (results_md adds the host tag; default: layers)")
    ap.add_argument("--title", default="", help="heading suffix naming the machine")
    ap.add_argument("--no-bf16", action="store_true", help="skip the PyTorch bf16 baseline")
    ap.add_argument("--x-dist", choices=("normal", "relu"), default="normal",
                    help="X standard normal, or its positive part (activations after ReLU)")
    ap.add_argument("--bits", type=int, default=15, choices=range(2, 16), metavar="{2..15}",
                    help="DFP magnitude bits of the quantized operands (15: DFP16)")
    args = ap.parse_args()

    threads = args.threads or dthreads.num_threads()
    dthreads.set_num_threads(threads)
    torch.set_num_threads(threads)
    target = host_target()
    # The generic tier has no dot instruction: no "% peak" there (dfpgen.peak.dot_peak refuses).
    dpeak = dot_peak(target) if target.isa.dot_mnemonic else None
    peak = dpeak.gmacs if dpeak else None
    peak_name = dpeak.instruction if dpeak else "no INT16 dot instruction on this tier"
    fpeak = fma_peak(target).gmacs
    rows = read_cases(args.cases)
    if args.layers:
        want = set(args.layers.split(","))
        rows = [r for r in rows if r[0] in want]
    passes = [p for p in args.passes.split(",") if p]

    lines = []
    head = ("| layer | pass | GMAC | dfp kernel GMAC/s | % dot peak | dfp +quant GMAC/s | FP32 GMAC/s | "
            "bf16 GMAC/s | kernel / FP32 | +quant / FP32 | kernel / bf16 |"
            + " fast kernel GMAC/s | fast / FP32 |")
    lines.append(head)
    lines.append("|" + "---|" * (head.count("|") - 1))
    summary = {p: [] for p in passes}
    for name, count, geo in rows:
        for pk in passes:
            spec = parse_full(f"n{args.batch}{geo}", pk)
            gmac = spec.macs / 1e9
            t_k = median_seconds(dfp_runner(spec, True, "exact", threads, args.x_dist, args.bits), args.repeats)
            t_q = median_seconds(dfp_runner(spec, False, "exact", threads, args.x_dist), args.repeats)
            t_f = torch_seconds(spec, "float32", args.repeats)
            t_b = None if args.no_bf16 else torch_seconds(spec, "bfloat16", args.repeats)
            t_e = median_seconds(dfp_runner(spec, True, "fast", threads, args.x_dist, args.bits), args.repeats)
            k_rate, q_rate = gmac / t_k, gmac / t_q
            f_rate = gmac / t_f if t_f else None
            b_rate = gmac / t_b if t_b else None
            r_f = t_f / t_k if t_f else None
            summary[pk].append((name, count, spec, t_k, t_q, t_f, t_b))
            pct = "n/a" if peak is None else f"{100 * k_rate / (peak * threads):.0f}%"
            row = (f"| {name} | {pk} | {gmac:.2f} | {k_rate:.1f} | {pct} | "
                   f"{q_rate:.1f} | {fmt(f_rate, '.1f')} | {fmt(b_rate, '.1f')} | {fmt(r_f, unit='x')} | "
                   f"{fmt(t_f / t_q if t_f else None, unit='x')} | {fmt(t_b / t_k if t_b else None, unit='x')} |")
            row += f" {gmac / t_e:.1f} | {fmt(t_f / t_e if t_f else None, unit='x')} |"
            print(row, flush=True)
            lines.append(row)

    tot = ["", "Network totals (each layer weighted by its count in ResNet-50):", "",
           "| pass | dfp kernel ms | dfp +quant ms | FP32 ms | bf16 ms | kernel / FP32 | +quant / FP32 |",
           "|---|---|---|---|---|---|---|"]
    for pk, items in summary.items():
        if not items:
            continue
        sk = sum(c * t for _, c, _, t, _, _, _ in items)
        sq = sum(c * t for _, c, _, _, t, _, _ in items)
        sf = sum(c * (t or 0) for _, c, _, _, _, t, _ in items)
        sb = None if args.no_bf16 else sum(c * (t or 0) for _, c, _, _, _, _, t in items)
        tot.append(f"| {pk} | {sk * 1e3:.1f} | {sq * 1e3:.1f} | {sf * 1e3:.1f} | {fmt(sb and sb * 1e3, '.1f')} | "
                   f"{sf / sk:.2f}x | {sf / sq:.2f}x |")
    copy_gbs, pack_gbs = pack_bandwidth(threads)
    compile_ms, load_ms = load_times()
    extra = ["",
             f"Quantize-and-pack (32x256x56x56 FP32 channels_last -> INT16 NHWC): {pack_gbs:.1f} GB/s "
             f"vs np.copyto {copy_gbs:.1f} GB/s = {100 * pack_gbs / copy_gbs:.0f}% of copy bandwidth "
             "(goal >= 60%).",
             f"Kernel build (render + LLVM -O3 + load, fwd n32c256h14w14k256r3s3u1p1, fresh process): "
             f"{compile_ms:.1f} ms (goal < 100 ms); cached load from disk in a fresh process: "
             f"{load_ms:.2f} ms (goal < 5 ms)."]
    hdr = [f"## ResNet-50 layers, batch {args.batch}, {threads} thread(s){(': ' + args.title) if args.title else ''}", "",
           f"Machine: {target.cpu} ({platform.machine()}), ISA tier {target.tier}; torch "
           f"{torch.__version__}; measured peaks this run: INT16 dot ({peak_name}) "
           f"{fmt(peak, '.1f')} GMAC/s/core (the \"% dot peak\" column, times {threads} thread(s)), "
           f"FP32 FMA {fpeak:.1f} GMAC/s/core. dfpgen in exact overflow mode unless marked fast. "
           f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')} (PASSIVE stops PyTorch's "
           "idle OpenMP threads from spinning on the cores dfpgen's kernel threads need, and the "
           f"other way round). Command: `{' '.join(['python', 'benchmarks/layers.py', *sys.argv[1:]])}`.", ""]
    body = "\n".join(hdr + lines + tot + extra)
    print("\n".join(tot + extra + [""] + hdr[2:3]))
    if not args.no_write:
        write_section(args.section, body)


if __name__ == "__main__":
    main()
