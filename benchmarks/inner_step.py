#!/usr/bin/env python3
"""The forward kernel's inner step alone, on this core: ``kb`` weight vectors (loaded from
memory) times ``wb`` INT16-pair broadcasts (each a 4-byte load, folded into ``vpdpwssd``'s
``{1to16}`` memory operand), ``kb * wb`` accumulators, operands cycling through an
L1-resident buffer, no flushes and no tap or pixel loops. Compared with the register-only
peak of ``dfpgen.peak`` it tells how much of a kernel's shortfall the loads of the inner step
explain; the rest is the loop structure around it (flushes, tap and block set-up, output
tiles). AVX512_VNNI tier only (``llvm.x86.avx512.vpdpwssd.512``). Figures, not a test.

    python benchmarks/inner_step.py
"""
from __future__ import annotations

import ctypes
import sys
import time

import numpy as np

from dfpgen.errors import DfpError
from dfpgen.kernels import load_kernel
from dfpgen.peak import dot_peak
from dfpgen.target import host_target

DOT = "llvm.x86.avx512.vpdpwssd.512"
V, O = "<16 x i32>", "<32 x i16>"
BLOCKINGS = ((1, 8), (1, 12), (1, 14), (1, 15), (2, 6), (2, 7), (3, 4), (4, 3))


def inner_step_ir(symbol: str, kb: int, wb: int) -> str:
    """``void symbol(i64 steps, ptr buf, ptr out)``; ``buf`` holds 64 rows of 256 bytes (64-byte
    aligned): row ``i % 64`` gives step i its ``kb`` weight vectors and ``wb`` pairs."""
    acc = [(k, i) for k in range(kb) for i in range(wb)]
    phis = [f"  %a{k}_{i} = phi {V} [ zeroinitializer, %entry ], [ %b{k}_{i}, %loop ]" for k, i in acc]
    body = ["  %row = and i64 %i, 63", "  %off = mul i64 %row, 256", "  %p = getelementptr i8, ptr %buf, i64 %off"]
    for k in range(kb):
        body += [f"  %wp{k} = getelementptr i8, ptr %p, i64 {64 * k}", f"  %w{k} = load {O}, ptr %wp{k}, align 64"]
    for i in range(wb):
        body += [f"  %xp{i} = getelementptr i8, ptr %p, i64 {64 * kb + 4 * i}",
                 f"  %xs{i} = load i32, ptr %xp{i}, align 4",
                 f"  %xa{i} = insertelement {V} poison, i32 %xs{i}, i64 0",
                 f"  %xv{i} = shufflevector {V} %xa{i}, {V} poison, {V} zeroinitializer",
                 f"  %x{i} = bitcast {V} %xv{i} to {O}"]
        body += [f"  %b{k}_{i} = call {V} @{DOT}({V} %a{k}_{i}, {O} %w{k}, {O} %x{i})" for k in range(kb)]
    sums, last = [], "%b0_0"
    for n, (k, i) in enumerate(acc[1:]):
        sums.append(f"  %s{n} = add {V} {last}, %b{k}_{i}")
        last = f"%s{n}"
    nl = "\n"
    return f"""declare {V} @{DOT}({V}, {O}, {O})
define void @{symbol}(i64 %steps, ptr %buf, ptr %out) {{
entry:
  br label %loop
loop:
  %i = phi i64 [ 0, %entry ], [ %i1, %loop ]
{nl.join(phis)}
{nl.join(body)}
  %i1 = add i64 %i, 1
  %more = icmp ult i64 %i1, %steps
  br i1 %more, label %loop, label %exit
exit:
{nl.join(sums)}
  store {V} {last}, ptr %out, align 64
  ret void
}}
"""


def measure(kb: int, wb: int, target, steps: int = 2_000_000) -> float:
    """GMAC/s of one core (best of 5 runs of ``steps`` inner steps)."""
    sym = f"dfp_inner_step_kb{kb}_wb{wb}"
    k = load_kernel(sym, {"kind": "inner_step", "kb": kb, "wb": wb, "abi": 1},
                    lambda: inner_step_ir(sym, kb, wb), target)
    fn = ctypes.CFUNCTYPE(None, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p)(k.address)
    raw = np.ones(64 * 256 // 2 + 64, np.int16)  # small values: no INT32 overflow
    buf = raw[(-(raw.ctypes.data // 2)) % 32:]
    outr = np.zeros(32, np.int32)
    out = outr[(-(outr.ctypes.data // 4)) % 16:]
    fn(1000, buf.ctypes.data, out.ctypes.data)
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        fn(steps, buf.ctypes.data, out.ctypes.data)
        best = min(best, time.perf_counter() - t0)
    return steps * kb * wb * 32 / best / 1e9


def main() -> int:
    target = host_target()
    if target.tier != "avx512_vnni":
        raise SystemExit(f"inner_step.py: needs the avx512_vnni tier, this process has {target.tier!r}")
    peak = dot_peak(target).gmacs
    print(f"{target.cpu}, tier {target.tier}, one core; register-only vpdpwssd zmm peak {peak:.1f} GMAC/s\n")
    print("| kb (weight vectors) x wb (broadcasts) | vpdpwssd per step | loads per step | GMAC/s | % of peak |")
    print("|---|---:|---:|---:|---:|")
    for kb, wb in BLOCKINGS:
        g = measure(kb, wb, target)
        print(f"| {kb} x {wb} | {kb * wb} | {kb + wb} | {g:.1f} | {100 * g / peak:.0f}% |")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except DfpError as e:
        raise SystemExit(f"inner_step.py: {e}")
