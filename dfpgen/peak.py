"""The machine's measured peaks: generated register-only loops timed in-process.

``dot_peak()`` times the tier's INT16 dot product (``dfpgen.isa``: ``vpdpwssd`` on the VNNI
tiers, ``vpmaddwd`` + ``vpaddd`` on AVX2; the generic tier has none) on independent
accumulators with no memory traffic (the two INT16 operands stay in registers): the
instruction throughput every conv kernel is measured against ("% of peak"). ``fma_peak()`` does
the same for FP32 ``vfmadd231ps`` so the two can be compared. Both report GMAC/s on one core
(one thread): one dot step on a vector of L INT32 lanes is 2L MACs; an FP32 FMA is L MACs.

Enough independent accumulators hide the instruction latency (4-5 cycles, up to two issue
ports), few enough that they, the two operands and the ``vpmaddwd`` temporaries stay in the
tier's registers (``IsaTier.peak_accumulators``: 24 of 32 zmm, 10 of 16 ymm). A loop that
spills measures the stack, not the core.
"""
from __future__ import annotations

import ctypes
import time
from dataclasses import dataclass
from functools import lru_cache

from .errors import DfpError
from .kernels import load_kernel
from .target import CpuTarget, host_target

ABI_VERSION = 2


@dataclass(frozen=True)
class Peak:
    """A measured peak: ``gmacs`` (10**9 multiply-accumulates per second, one core),
    the instruction timed, the vector width in bits and how long the timed run took."""
    gmacs: float
    instruction: str
    vector_bits: int
    seconds: float


def _loop_ir(symbol: str, vec_ty: str, op_ty: str, body: str, decl: str, n: int) -> str:
    """``void symbol(i64 iters, ptr operands, ptr out)``: ``iters`` times, update each of the
    ``n`` accumulators with ``body`` (``{acc}``, ``{new}``, ``{i}`` placeholders); store the lane
    sum so the loop is not dead code. Operands come from memory so LLVM cannot fold them."""
    phis = "\n".join(f"  %a{i} = phi {vec_ty} [ zeroinitializer, %entry ], [ %b{i}, %loop ]" for i in range(n))
    ops = "\n".join(body.format(acc=f"%a{i}", new=f"%b{i}", i=i) for i in range(n))
    adds, last = [], "%b0"
    for i in range(1, n):
        adds.append(f"  %s{i} = {'fadd' if 'float' in vec_ty else 'add'} {vec_ty} {last}, %b{i}")
        last = f"%s{i}"
    return f"""{decl}
define void @{symbol}(i64 %iters, ptr %operands, ptr %out) {{
entry:
  %x = load {op_ty}, ptr %operands, align 64
  %yp = getelementptr i8, ptr %operands, i64 64
  %y = load {op_ty}, ptr %yp, align 64
  br label %loop
loop:
  %i = phi i64 [ 0, %entry ], [ %i1, %loop ]
{phis}
{ops}
  %i1 = add i64 %i, 1
  %more = icmp ult i64 %i1, %iters
  br i1 %more, label %loop, label %exit
exit:
{chr(10).join(adds)}
  store {vec_ty} {last}, ptr %out, align 64
  ret void
}}
"""


def _dot_ir(symbol: str, isa, n: int) -> str:
    """The peak loop of ``isa``'s INT16 dot step (``dfpgen.isa.IsaTier``), ``n`` accumulators."""
    lanes = isa.lanes
    v, o = f"<{lanes} x i32>", f"<{2 * lanes} x i16>"
    if isa.dot == "vnni":
        name = "@" + isa.dot_intrinsic(False)
        decl = f"declare {v} {name}({v}, {o}, {o})"
        body = f"  {{new}} = call {v} {name}({v} {{acc}}, {o} %x, {o} %y)"
    elif isa.dot == "pmaddwd":
        # In a conv kernel every accumulator pairs a different broadcast with a weight vector;
        # here the operands are the same, so the product is inline assembly with a side
        # effect that LLVM cannot merge: one vpmaddwd + one vpaddd per 2L MACs, as in the kernels.
        decl = ""
        body = (f'  %m{{i}} = call {v} asm sideeffect "vpmaddwd $2, $1, $0", "=x,x,x"({o} %x, {o} %y)\n'
                f"  {{new}} = add {v} {{acc}}, %m{{i}}")
    else:
        raise DfpError(f"ISA tier {isa.name!r} has no INT16 dot instruction to time (plain LLVM "
                       "vector IR: its speed is whatever the target's legaliser makes of it)")
    return _loop_ir(symbol, v, o, body, decl, n)


def _fma_ir(symbol: str, bits: int, n: int) -> str:
    v = f"<{bits // 32} x float>"
    decl = f"declare {v} @llvm.fma.v{bits // 32}f32({v}, {v}, {v})"
    body = f"  {{new}} = call {v} @llvm.fma.v{bits // 32}f32({v} %x, {v} %y, {v} {{acc}})"
    return _loop_ir(symbol, v, v, body, decl, n)


def _time_loop(symbol: str, ir: str, target: CpuTarget, macs_per_iter: int, min_seconds: float) -> tuple[float, float]:
    k = load_kernel(symbol, {"kind": "peak", "abi": ABI_VERSION}, lambda: ir, target)
    fn = ctypes.CFUNCTYPE(None, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p)(k.address)
    buf = (ctypes.c_uint8 * 256)()
    base = ctypes.addressof(buf)
    aligned = (base + 63) & ~63  # 64-byte aligned operands and output inside the buffer
    # Small operand values: the integer loop never overflows into anything slower.
    ctypes.memset(aligned, 1, 128)
    ops, out = aligned, aligned + 128
    iters = 1000
    while True:  # grow until one run takes about 5 ms
        t0 = time.perf_counter()
        fn(iters, ops, out)
        dt = time.perf_counter() - t0
        if dt >= 0.005 or iters > 1 << 34:
            break
        iters *= 2
    # Best of many short runs: on a shared machine a short run is likelier to find the core
    # to itself than one long run, and the peak is what the core can do, not what it got.
    best, spent = float("inf"), 0.0
    while spent < min_seconds or best == float("inf"):
        t0 = time.perf_counter()
        fn(iters, ops, out)
        dt = time.perf_counter() - t0
        best, spent = min(best, dt), spent + dt
    return iters * macs_per_iter / best / 1e9, best


def dot_symbol(target: CpuTarget) -> str:
    t = target.isa
    return f"dfp_peak_dot_{t.name}_a{t.peak_accumulators}"


def fma_symbol(target: CpuTarget) -> str:
    return f"dfp_peak_fma{target.vector_bits}_a{target.isa.peak_accumulators}"


@lru_cache(maxsize=None)
def dot_peak(target: CpuTarget | None = None, min_seconds: float = 0.1) -> Peak:
    """Measured INT16 dot-product throughput of one core in GMAC/s on ``target``'s tier
    (``Peak.instruction`` names it: ``vpdpwssd`` or ``vpmaddwd + vpaddd``).

    Raises :class:`DfpError` where the host cannot execute the tier, and on the generic tier.
    """
    target = target or host_target()
    target.require_executable()
    t = target.isa
    n = t.peak_accumulators
    sym = dot_symbol(target)
    g, s = _time_loop(sym, _dot_ir(sym, t, n), target, n * 2 * t.lanes, min_seconds)
    return Peak(g, t.dot_insn, t.vector_bits, s)


@lru_cache(maxsize=None)
def fma_peak(target: CpuTarget | None = None, min_seconds: float = 0.1) -> Peak:
    """Measured FP32 FMA throughput of one core in GMAC/s at the tier's vector width
    (512-bit on ``avx512_vnni``, else 256-bit). Raises :class:`DfpError` where the host
    cannot execute the tier."""
    target = target or host_target()
    target.require_executable()
    bits, n = target.vector_bits, target.isa.peak_accumulators
    sym = fma_symbol(target)
    g, s = _time_loop(sym, _fma_ir(sym, bits, n), target, n * bits // 32, min_seconds)
    return Peak(g, "vfmadd231ps", bits, s)


def peak_or_none(target: CpuTarget | None = None) -> float | None:
    """The INT16 dot peak in GMAC/s, or ``None`` where the host cannot run the tier (for
    "% of peak" columns)."""
    target = target or host_target()
    if not target.executable or not target.isa.dot_mnemonic:
        return None
    return dot_peak(target).gmacs
