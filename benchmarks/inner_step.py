#!/usr/bin/env python3
"""The forward kernel's inner step alone, on this core, for the host's ISA tier: ``kb`` weight
vectors times ``wb`` INT16-pair broadcasts, ``kb * wb`` accumulators, operands cycling through
an L1-resident buffer, no flushes and no tap or pixel loops around it. Compared with the
register-only peak of ``dfpgen.peak`` it tells how much of a kernel's shortfall the loads of the
inner step explain; the rest is the loop structure around it (flushes, tap and block set-up,
output tiles).

The step is spelled as the tier's kernels spell it (``templates/conv_fwd.ll.j2``):

- VNNI tiers: each broadcast a 4-byte load folded into ``vpdpwssd``'s ``{1toN}`` operand, the
  ``kb`` weight vectors in registers;
- AVX2: one ``vpbroadcastd`` per pixel shared by the ``kb`` vectors, each weight vector read
  again per pixel as ``vpmaddwd``'s memory operand (``w mem``), or, for comparison, loaded
  once per step into a register (``w reg``: ``kb`` more live registers).

``--nest N`` runs the steps as an inner loop of N steps inside an outer loop, as a kernel
runs one tap's pair steps (a 16-channel reduction block is 8 pair steps per tap).
Figures, not a test.

    python benchmarks/inner_step.py
    python benchmarks/inner_step.py --nest 8
"""
from __future__ import annotations

import argparse
import ctypes
import sys
import time

import numpy as np

from dfpgen.errors import DfpError
from dfpgen.kernels import load_kernel
from dfpgen.peak import dot_peak
from dfpgen.target import host_target

BLOCKINGS = {16: ((4, 3), (3, 4), (3, 3), (2, 6), (2, 5), (1, 12), (6, 2), (4, 2)),
             32: ((1, 8), (1, 12), (1, 14), (1, 15), (2, 6), (2, 7), (3, 4), (4, 3))}


def inner_step_ir(symbol: str, isa, kb: int, wb: int, w_in_memory: bool, nest: int) -> str:
    """``void symbol(i64 steps, ptr buf, ptr out)``; ``buf`` holds 64 rows of 512 bytes (64-byte
    aligned): row ``i % 64`` gives step i its ``kb`` weight vectors and ``wb`` pairs. ``nest``
    > 0: the steps run as an inner loop of ``nest`` steps (not unrolled) in an outer loop."""
    L, vb = isa.lanes, isa.vector_bits // 8
    V, O = f"<{L} x i32>", f"<{2 * L} x i16>"
    dot = isa.dot_intrinsic(False)
    acc = [(k, i) for k in range(kb) for i in range(wb)]
    body = ["  %t = add i64 %i, %j", "  %row = and i64 %t, 63", "  %off = mul i64 %row, 512",
            "  %p = getelementptr i8, ptr %buf, i64 %off"]
    for k in range(kb):
        body.append(f"  %wp{k} = getelementptr i8, ptr %p, i64 {vb * k}")
        if not w_in_memory:
            body.append(f"  %w{k} = load {O}, ptr %wp{k}, align {vb}")
    for i in range(wb):
        body += [f"  %xp{i} = getelementptr i8, ptr %p, i64 {vb * kb + 4 * i}",
                 f"  %xs{i} = load i32, ptr %xp{i}, align 4",
                 f"  %xa{i} = insertelement {V} poison, i32 %xs{i}, i64 0",
                 f"  %xv{i} = shufflevector {V} %xa{i}, {V} poison, <{L} x i32> zeroinitializer",
                 f"  %x{i} = bitcast {V} %xv{i} to {O}"]
        for k in range(kb):
            w = f"%w{k}"
            if w_in_memory:
                # volatile: re-read per pixel, folded into the instruction's memory operand
                body.append(f"  %wf{k}_{i} = load volatile {O}, ptr %wp{k}, align {vb}")
                w = f"%wf{k}_{i}"
            if isa.dot == "vnni":
                body.append(f"  %b{k}_{i} = call {V} @{dot}({V} %a{k}_{i}, {O} {w}, {O} %x{i})")
            else:
                body += [f"  %m{k}_{i} = call {V} @{dot}({O} {w}, {O} %x{i})",
                         f"  %b{k}_{i} = add {V} %a{k}_{i}, %m{k}_{i}"]
        if w_in_memory and i < wb - 1:
            # as in the kernels: the next broadcast stays after this pixel's dot steps
            body.append('  call void asm sideeffect "", "~{memory}"()')
    decl = (f"declare {V} @{dot}({V}, {O}, {O})" if isa.dot == "vnni" else f"declare {V} @{dot}({O}, {O})")
    sums, last = [], "%b0_0"
    for n, (k, i) in enumerate(acc[1:]):
        sums.append(f"  %s{n} = add {V} {last}, %b{k}_{i}")
        last = f"%s{n}"
    nl = "\n"
    inner = nest if nest else "%steps"  # 0: one flat loop over all steps
    outer_phis = [f"  %o{k}_{i} = phi {V} [ zeroinitializer, %entry ], [ %b{k}_{i}, %latch ]" for k, i in acc]
    inner_phis = [f"  %a{k}_{i} = phi {V} [ %o{k}_{i}, %outer ], [ %b{k}_{i}, %loop ]" for k, i in acc]
    return f"""{decl}
define void @{symbol}(i64 %steps, ptr %buf, ptr %out) {{
entry:
  br label %outer
outer:
  %i = phi i64 [ 0, %entry ], [ %i1, %latch ]
{nl.join(outer_phis)}
  br label %loop
loop:
  %j = phi i64 [ 0, %outer ], [ %j1, %loop ]
{nl.join(inner_phis)}
{nl.join(body)}
  %j1 = add i64 %j, 1
  %more_j = icmp ult i64 %j1, {inner}
  br i1 %more_j, label %loop, label %latch, !llvm.loop !1
latch:
  %i1 = add i64 %i, {inner}
  %more = icmp ult i64 %i1, %steps
  br i1 %more, label %outer, label %exit
exit:
{nl.join(sums)}
  store {V} {last}, ptr %out, align {vb}
  ret void
}}
!0 = !{{!"llvm.loop.unroll.disable"}}
!1 = distinct !{{!1, !0}}
"""


def measure(kb: int, wb: int, w_in_memory: bool, nest: int, target, steps: int = 2_000_000) -> float:
    """GMAC/s of one core (best of 5 runs of ``steps`` inner steps, rounded to the nest)."""
    isa = target.isa
    sym = f"dfp_inner_step_{isa.name}_kb{kb}_wb{wb}_{'m' if w_in_memory else 'r'}_n{nest}"
    k = load_kernel(sym, {"kind": "inner_step", "tier": isa.name, "kb": kb, "wb": wb,
                          "w_mem": w_in_memory, "nest": nest, "abi": 2},
                    lambda: inner_step_ir(sym, isa, kb, wb, w_in_memory, nest), target)
    fn = ctypes.CFUNCTYPE(None, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p)(k.address)
    raw = np.ones(64 * 512 // 2 + 64, np.int16)  # small values: no INT32 overflow
    buf = raw[(-(raw.ctypes.data // 2)) % 32:]
    outr = np.zeros(32, np.int32)
    out = outr[(-(outr.ctypes.data // 4)) % 16:]
    steps -= steps % max(nest, 1)
    fn(1000 - 1000 % max(nest, 1) or nest, buf.ctypes.data, out.ctypes.data)
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        fn(steps, buf.ctypes.data, out.ctypes.data)
        best = min(best, time.perf_counter() - t0)
    return steps * kb * wb * 2 * isa.lanes / best / 1e9


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--nest", type=int, default=0, help="inner loop of N steps inside an outer loop (0: one flat loop)")
    a = ap.parse_args(argv)
    if a.nest < 0:
        raise SystemExit(f"inner_step.py: --nest must be >= 0, got {a.nest}")
    target = host_target()
    isa = target.isa
    if not isa.dot_mnemonic:
        raise SystemExit(f"inner_step.py: the {target.tier!r} tier has no INT16 dot instruction")
    peak = dot_peak(target).gmacs
    print(f"{target.cpu}, tier {target.tier}, one core; register-only {isa.dot_insn} peak {peak:.1f} GMAC/s; "
          f"{'inner loops of ' + str(a.nest) + ' steps' if a.nest else 'one flat loop'}\n")
    variants = (True, False) if isa.dot != "vnni" else (False,)
    head = "weights" if isa.dot == "vnni" else "weights (w mem: vpmaddwd memory operand per pixel)"
    print(f"| kb (weight vectors) x wb (broadcasts) | {head} | dots per step | loads per step | GMAC/s | % of peak |")
    print("|---|---|---:|---:|---:|---:|")
    for kb, wb in BLOCKINGS[isa.registers]:
        for w_mem in variants:
            g = measure(kb, wb, w_mem, a.nest, target)
            loads = kb * wb + wb if w_mem else kb + wb
            print(f"| {kb} x {wb} | {'mem' if w_mem else 'reg'} | {kb * wb} | {loads} | {g:.1f} | {100 * g / peak:.0f}% |",
                  flush=True)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except DfpError as e:
        raise SystemExit(f"inner_step.py: {e}")
