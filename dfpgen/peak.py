"""The machine's measured peak: a generated register-only loop timed in-process.

``vnni_peak()`` times ``vpdpwssd`` on independent accumulators (no memory traffic: the two
INT16 operands stay in registers), i.e. the instruction throughput every conv kernel is
measured against ("% of peak"). ``fma_peak()`` does the same for FP32 ``vfmadd231ps`` so the
two can be compared. Both report GMAC/s on one core (one thread): a ``vpdpwssd`` on a zmm
register is 16 lanes x 2 INT16 products = 32 MACs; an FP32 FMA on a zmm register is 16 MACs.

Enough independent accumulators hide the instruction latency (4-5 cycles on current cores,
up to two issue ports): ``ACCUMULATORS`` of them, plus two operand registers, fit in 32 zmm.
"""
from __future__ import annotations

import ctypes
import time
from dataclasses import dataclass
from functools import lru_cache

from .errors import DfpError
from .target import CpuTarget, host_target

ACCUMULATORS = 24
ABI_VERSION = 1


@dataclass(frozen=True)
class Peak:
    """A measured peak: ``gmacs`` (10**9 multiply-accumulates per second, one core),
    the instruction timed, the vector width in bits and how long the timed run took."""
    gmacs: float
    instruction: str
    vector_bits: int
    seconds: float


def _loop_ir(symbol: str, vec_ty: str, op_ty: str, body: str, decl: str) -> str:
    """``void symbol(i64 iters, ptr operands, ptr out)``: ``iters`` times, update every
    accumulator with ``body`` (``{acc}``, ``{new}`` placeholders); store the lane sum so the
    loop is not dead code. Operands come from memory so LLVM cannot constant-fold them."""
    n = ACCUMULATORS
    phis = "\n".join(f"  %a{i} = phi {vec_ty} [ zeroinitializer, %entry ], [ %b{i}, %loop ]" for i in range(n))
    ops = "\n".join(body.format(acc=f"%a{i}", new=f"%b{i}") for i in range(n))
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


def _vnni_ir(symbol: str, bits: int) -> str:
    lanes = bits // 32
    v, o = f"<{lanes} x i32>", f"<{2 * lanes} x i16>"
    name = f"@llvm.x86.avx512.vpdpwssd.{bits}"
    decl = f"declare {v} {name}({v}, {o}, {o})"
    body = f"  {{new}} = call {v} {name}({v} {{acc}}, {o} %x, {o} %y)"
    return _loop_ir(symbol, v, o, body, decl)


def _fma_ir(symbol: str, bits: int) -> str:
    v = f"<{bits // 32} x float>"
    decl = f"declare {v} @llvm.fma.v{bits // 32}f32({v}, {v}, {v})"
    body = f"  {{new}} = call {v} @llvm.fma.v{bits // 32}f32({v} %x, {v} %y, {v} {{acc}})"
    return _loop_ir(symbol, v, v, body, decl)


def _time_loop(symbol: str, ir: str, target: CpuTarget, macs_per_iter: int, min_seconds: float) -> tuple[float, float]:
    from .kernels import load_kernel
    k = load_kernel(symbol, {"kind": "peak", "abi": ABI_VERSION, "accumulators": ACCUMULATORS},
                    lambda: ir, target)
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


@lru_cache(maxsize=None)
def vnni_peak(target: CpuTarget | None = None, min_seconds: float = 0.1) -> Peak:
    """Measured ``vpdpwssd`` throughput of one core in GMAC/s (AVX512_VNNI or 256-bit VNNI tiers).

    Raises :class:`DfpError` on a tier without VNNI (``avx2``, ``generic``).
    """
    target = target or host_target()
    if target.tier not in ("avx512_vnni", "vnni256"):
        raise DfpError(f"no vpdpwssd on ISA tier {target.tier!r}; the VNNI peak needs avx512_vnni or vnni256")
    bits = target.vector_bits
    g, s = _time_loop(f"dfp_peak_vnni{bits}_a{ACCUMULATORS}", _vnni_ir(f"dfp_peak_vnni{bits}_a{ACCUMULATORS}", bits),
                      target, ACCUMULATORS * bits // 16, min_seconds)
    return Peak(g, "vpdpwssd", bits, s)


@lru_cache(maxsize=None)
def fma_peak(target: CpuTarget | None = None, min_seconds: float = 0.1) -> Peak:
    """Measured FP32 FMA throughput of one core in GMAC/s (512-bit vectors on AVX-512 tiers,
    else 256-bit)."""
    target = target or host_target()
    bits = 512 if target.tier == "avx512_vnni" else 256
    sym = f"dfp_peak_fma{bits}_a{ACCUMULATORS}"
    g, s = _time_loop(sym, _fma_ir(sym, bits), target, ACCUMULATORS * bits // 32, min_seconds)
    return Peak(g, "vfmadd231ps", bits, s)


def peak_or_none(target: CpuTarget | None = None) -> float | None:
    """The VNNI peak in GMAC/s, or ``None`` where the tier has no VNNI (for "% of peak" columns)."""
    try:
        return vnni_peak(target).gmacs
    except DfpError:
        return None
