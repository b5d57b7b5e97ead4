"""Fused BatchNorm + ReLU (+ residual add) on NHWC float32 activations, writing DFP16.

Das et al. (ICLR 2018, §4) ran BatchNorm with ReLU and the residual add fused into one pass
and moved activations between layers as DFP16. Here, for an activation X viewed as (M, C)
rows (M = N*H*W pixels of an NHWC tensor), generated kernels (``templates/bn_act.ll.j2``):

- ``stats``: per channel sum, sum of squares (float64), min and max (float32) in one read of
  X. Chunks of ``chunk`` pixels (:data:`CHUNK` by default) are summed in pixel order inside
  the kernel and the chunks' partials are added in chunk order by a second small kernel
  (``combine``), so the bits do not depend on the thread count. (The statistics come from
  their own read of the conv output, not from the conv kernel's epilogue: measured on a Zen
  3, an epilogue per output row cost about what this pass costs, and its call inside the
  forward kernel made LLVM keep the accumulators of some register blocks in stack slots.)
- ``fwd``: X -> its DFP16 mantissas Q (exponent Ex from the statistics' min/max: the same
  exponent and bits as :func:`dfpgen.dfp.quantize`), a = Q*sc + sh with
  ``sc = gamma*invstd*2**Ex`` and ``sh = beta - mean*gamma*invstd`` (float32, no fused
  multiply-add), optionally + R (the residual operand), ReLU, then the output's mantissas
  with an exponent Ey fixed *before* the pass (see :func:`output_bound`), written as INT16
  (the next conv's padded NHWC layout) and/or float32 (the same values).
- ``bwd_reduce`` / ``bwd_dx``: BatchNorm backward and ReLU backward from Q alone (the ReLU
  mask is the sign of a, recomputed bit for bit; with a residual add it is a saved bit mask):
  ``dX = g*invstd*(dY' - mean(dY') - xhat*mean(dY'*xhat))``, ``dY' = dY * [a > 0]``.

Exponent of the output (no max-abs pass):

- without residual: a is monotone in Q per channel (float32 multiply and add round
  monotonically), so the channel's extreme values of a are the images of its extreme
  mantissas ``Q(min_c)``, ``Q(max_c)``: the bound is exact, Ey equals what a max-abs pass
  over the output would give.
- with residual: ``fl(a + r)`` is monotone in both operands, so ``fl(hi_c + rhi_c)`` bounds
  channel c from above (and ``fl(lo_c + rlo_c)`` from below), from the residual's per-channel
  range. This is a bound, not the maximum: it costs ``floor(log2(bound)) -
  floor(log2(max))`` bits of the output's 15. When the residual is a ReLU output
  (``rlo >= 0``) and the BN branch's channel maximum is at least the residual's, the true
  maximum is at least ``hi_c``, so the bound is at most twice it: at most 1 bit.

Shapes: X, R, dY float32 (M, C) C-contiguous; per-channel arrays (C,). Threads split pixels
(elementwise passes) or chunks (reductions) with :func:`dfpgen.threads.parallel_call`.
"""
from __future__ import annotations

import ctypes
import math
from dataclasses import dataclass

import numpy as np

from . import threads as _threads
from .dfp import DFP16, DfpFormat, EXP_MIN, exponent_for, scale_factors
from .errors import DfpError
from .kernels import cfunction, load_kernel
from .dfp import raise_nonfinite
from .pack import aligned_zeros, data_ptr, empty_aligned
from .render import llvm_float, render
from .target import CpuTarget, host_target

# 2: the forward writes INT16 rows into a padded buffer (row mapping arguments); 3: the
# statistics' chunk length is an argument, and a kernel adds the chunks' partials
ABI_VERSION = 3
CHUNK = 64  # pixels per statistics chunk: fixed by the shape only, never by the thread count
KINDS = ("stats", "combine", "fwd", "bwd_reduce", "bwd_dx")
MIN_ELEMS_PER_THREAD = 1 << 15

_P, _I, _F, _D = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float, ctypes.c_double
_PROTOS = {
    "stats": ctypes.CFUNCTYPE(None, _P, _P, _P, _P, _P, _I, _I, _I, _I, _I, _I),
    "combine": ctypes.CFUNCTYPE(None, _P, _P, _P, _P, _I, _I, _I, _I, _P, _P, _P, _P),
    "fwd": ctypes.CFUNCTYPE(None, _P, _P, _P, _P, _P, _P, _P, _P, _I, _I, _I, _F, _F, _F, _F, _F,
                            _I, _I, _I, _I, _I),
    "bwd_reduce": ctypes.CFUNCTYPE(None, _P, _P, _P, _P, _P, _P, _P, _P, _I, _I, _I, _I, _I, _D),
    "bwd_dx": ctypes.CFUNCTYPE(None, _P, _P, _P, _P, _P, _P, _P, _P, _P, _P, _I, _I, _I),
}


@dataclass(frozen=True)
class BnPlan:
    """What ``templates/bn_act.ll.j2`` prints for one kernel: ``kind`` (stats | fwd |
    bwd_reduce | bwd_dx), symbol, tier, ``lanes`` FP32 lanes per vector (and -lanes, lanes-1),
    ``chunk`` rows per statistics partial, the fused operations (``relu``, ``residual``), what
    the forward writes (``save_x``: the INT16 input for backward, ``write_q``: the DFP16
    output, ``write_f``: the FP32 output), the format's mantissa limit (also as LLVM float
    literals) and the lane index vector."""
    kind: str
    symbol: str
    tier: str
    lanes: int
    lanes_m1: int
    neg_lanes: int
    chunk: int
    relu: bool
    residual: bool
    save_x: bool
    write_q: bool
    write_f: bool
    max_mantissa: int
    max_f: str
    neg_max_f: str
    lane_ids_i32: str


def kernel_plan(kind: str, target: CpuTarget, *, relu: bool = True, residual: bool = False,
                save_x: bool = True, write_q: bool = True, write_f: bool = True,
                fmt: DfpFormat = DFP16) -> "BnPlan":
    """The :class:`BnPlan` of one kernel ``kind`` (see :data:`KINDS`); DfpError for another kind."""
    if kind not in KINDS:
        raise DfpError(f"unknown BatchNorm kernel kind {kind!r}; one of {KINDS}")
    lanes = target.lanes
    flags = ""
    if kind not in ("stats", "combine"):
        flags = ("_relu" if relu else "_id") + ("_res" if residual else "")
    if kind == "fwd":
        flags += ("_x" if save_x else "") + ("_q" if write_q else "") + ("_f" if write_f else "") + f"_p{fmt.bits}"
    return BnPlan(
        kind=kind, symbol=f"dfp_bn_{kind}{flags}_v{lanes}_{target.tier}", tier=target.tier,
        lanes=lanes, lanes_m1=lanes - 1, neg_lanes=-lanes, chunk=CHUNK,
        relu=bool(relu), residual=bool(residual), save_x=bool(save_x),
        write_q=bool(write_q), write_f=bool(write_f), max_mantissa=fmt.max_mantissa,
        max_f=llvm_float(fmt.max_mantissa), neg_max_f=llvm_float(-fmt.max_mantissa),
        lane_ids_i32=", ".join(f"i32 {i}" for i in range(lanes)),
    )


def render_kernel(kind: str, target: CpuTarget | None = None, **flags) -> str:
    """LLVM IR of one BatchNorm kernel (for tests and reading)."""
    return render("bn_act.ll.j2", p=kernel_plan(kind, target or host_target(), **flags))


_by_flags: dict[tuple, object] = {}


def _kernel(kind: str, target: CpuTarget, **flags):
    # Per call only a dict lookup: the cache key (JSON + sha256 of the target) is built once.
    memo = (kind, target, tuple(sorted(flags.items())))
    fn = _by_flags.get(memo)
    if fn is None:
        fn = _by_flags.setdefault(memo, _load(kind, target, **flags))
    return fn


def _load(kind: str, target: CpuTarget, **flags):
    plan = kernel_plan(kind, target, **flags)
    fields = {"kernel": "bn_act", "abi": ABI_VERSION, "chunk": CHUNK,
              **{k: getattr(plan, k) for k in ("kind", "lanes", "relu", "residual", "save_x", "write_q",
                                               "write_f", "max_mantissa")}}
    k = load_kernel(plan.symbol, fields, lambda: render("bn_act.ll.j2", p=plan), target)
    return cfunction(k, _PROTOS[kind])


def _nthreads(threads: int | None, items: int, elems_per_item: int) -> int:
    n = threads or _threads.num_threads()
    if threads is None:
        n = min(n, max(1, items * elems_per_item // MIN_ELEMS_PER_THREAD))
    return max(1, min(n, items))


def _rows(a, name: str, dtype=np.float32) -> np.ndarray:
    if not isinstance(a, np.ndarray) or a.ndim != 2 or a.dtype != dtype or not a.flags.c_contiguous:
        raise DfpError(f"{name}: expected a C-contiguous {np.dtype(dtype).name} (M, C) array (NHWC rows), got "
                       f"{getattr(a, 'dtype', type(a).__name__)} {getattr(a, 'shape', '')}")
    return a


def _channels(a, C: int, name: str, dtype=np.float32, out: np.ndarray | None = None) -> np.ndarray:
    """(C,) per-channel array -> a (C,) copy of ``dtype``, or written into ``out`` (a (C,)
    array of ``dtype``, returned); :class:`DfpError` naming ``name`` for another shape or a
    NaN/Inf (checked before the cast)."""
    a = np.asarray(a, dtype=np.float64 if dtype == np.float64 else None)
    if a.shape != (C,):
        raise DfpError(f"{name}: expected shape ({C},), got {a.shape}")
    if not np.isfinite(a).all():
        raise DfpError(f"{name}: per-channel values must be finite")
    if out is None:
        return a.astype(dtype)
    out[...] = a
    return out


def _max_abs(lo: np.ndarray, hi: np.ndarray) -> float:
    """The largest magnitude in two (C,) arrays (:attr:`BnStats.max_abs`, C >= 1)."""
    return float(max(np.abs(lo).max(), np.abs(hi).max()))


def _pad(a: np.ndarray, Cv: int) -> np.ndarray:
    out = np.zeros(Cv, a.dtype)
    out[:a.shape[0]] = a
    return out


def _ptr(a: np.ndarray | None) -> int:
    """A kernel's pointer argument: ``a``'s data, or NULL for an absent operand."""
    return 0 if a is None else data_ptr(a)


def _cv(C: int, lanes: int) -> int:
    return -(-C // lanes) * lanes


# ----------------------------------------------------------------------------- statistics


@dataclass(frozen=True)
class BnStats:
    """Per-channel statistics of an (M, C) activation: ``sum``, ``sumsq`` float64 (C,),
    ``min``, ``max`` float32 (C,), ``count`` = M."""
    count: int
    sum: np.ndarray
    sumsq: np.ndarray
    min: np.ndarray
    max: np.ndarray

    @property
    def mean(self) -> np.ndarray:
        return self.sum / self.count

    @property
    def var(self) -> np.ndarray:
        """Biased variance (float64 (C,), clipped at 0), as BatchNorm normalizes with."""
        m = self.mean
        return np.maximum(self.sumsq / self.count - m * m, 0.0)

    @property
    def max_abs(self) -> float:
        return float(max(np.max(np.abs(self.min)), np.max(np.abs(self.max)))) if self.count else 0.0


def combine_partials(psum, psq, pmin, pmax, C: int, M: int, target: CpuTarget | None = None) -> BnStats:
    """Add the chunks' partials in chunk order (the golden model's explicit loop; tests compare
    the bits): the same bits for any split. ``psum``/``psq`` float64 and ``pmin``/``pmax``
    float32 (nchunks, Cv) arrays (rows may be strided, columns contiguous), Cv a multiple
    of the vector lanes. One pass of a small kernel (``combine``): numpy's axis-0 reduction
    costs about 0.1 us per chunk and array, which the thousands of chunks of a small-channel
    activation (ResNet-20: 16 channels at 32 x 32, batch 128) make a millisecond a call.
    Raises :class:`DfpError` for arrays of other shapes or layouts."""
    n, cv = psum.shape
    for a, dt in ((psum, np.float64), (psq, np.float64), (pmin, np.float32), (pmax, np.float32)):
        # the columns must be contiguous for any number of rows (one row too: the kernel
        # reads it with vector loads); a row stride matters only with more than one row
        if a.shape != (n, cv) or a.dtype != dt or (cv > 1 and a.strides[1] != a.itemsize):
            raise DfpError("combine_partials: partials must be (chunks, Cv) arrays with contiguous columns")
    if not 0 <= C <= cv:
        raise DfpError(f"combine_partials: {C} channels do not fit {cv} columns")
    if n > 1 and (psq.strides != psum.strides or pmax.strides != pmin.strides):
        raise DfpError("combine_partials: the sums and the min/max arrays must share their row strides")
    target = target or host_target()
    if cv % target.lanes:
        raise DfpError(f"combine_partials: {cv} columns is not a multiple of {target.lanes} lanes")
    s = np.empty(cv); q = np.empty(cv)
    lo = np.empty(cv, np.float32); hi = np.empty(cv, np.float32)
    sd = psum.strides[0] // 8 if n > 1 else cv
    sf = pmin.strides[0] // 4 if n > 1 else cv
    fn = _kernel("combine", target)
    fn(data_ptr(psum), data_ptr(psq), data_ptr(pmin), data_ptr(pmax), n, sd, sf, cv,
       data_ptr(s), data_ptr(q), data_ptr(lo), data_ptr(hi))
    return BnStats(M, s[:C], q[:C], lo[:C], hi[:C])


def batch_stats(x: np.ndarray, *, name: str = "BatchNorm input", threads: int | None = None,
                target: CpuTarget | None = None, chunk: int = CHUNK) -> BnStats:
    """Per-channel sum, sum of squares, min and max of ``x`` float32 (M, C) in one read.

    Sums run in pixel order over chunks of ``chunk`` pixels (float64), the chunks added in
    chunk order: bits independent of ``threads`` (and dependent on ``chunk``). Raises
    :class:`DfpError` naming ``name`` for a bad array, a chunk < 1, a NaN/Inf in ``x`` (count
    and first index), or M == 0.
    """
    x = _rows(x, name)
    M, C = x.shape
    if M == 0 or C == 0:
        raise DfpError(f"{name}: BatchNorm statistics of an empty activation ({M} pixels, {C} channels)")
    if not isinstance(chunk, (int, np.integer)) or isinstance(chunk, (bool, np.bool_)) or chunk < 1:
        raise DfpError(f"{name}: statistics chunk must be a positive number of pixels, got {chunk!r}")
    # one chunk of M pixels sums exactly as any longer one; the kernel's int64 argument
    # would wrap a chunk >= 2**63
    chunk = min(int(chunk), M)
    target = target or host_target()
    Cv = _cv(C, target.lanes)
    nch = -(-M // chunk)
    psum = np.empty((nch, Cv)); psq = np.empty((nch, Cv))
    pmin = np.empty((nch, Cv), np.float32); pmax = np.empty((nch, Cv), np.float32)
    fn = _kernel("stats", target)
    ptrs = [data_ptr(a) for a in (x, psum, psq, pmin, pmax)]
    _threads.parallel_call(fn, (*ptrs, M, C, Cv, chunk), 5, nch, _nthreads(threads, nch, chunk * C))
    return _finite(combine_partials(psum, psq, pmin, pmax, C, M, target), x, name)


def _finite(st: BnStats, x: np.ndarray, name: str) -> BnStats:
    """``st`` when its sums are finite; else :class:`DfpError`: the NaN/Inf of ``x`` (M, C)
    named by ``name`` (count and first index), or float64 overflow of the sum of squares."""
    if not (np.isfinite(st.sum).all() and np.isfinite(st.sumsq).all()):
        if not np.isfinite(x).all():
            raise_nonfinite(x, name=name)
        raise DfpError(f"{name}: the sum of squares overflows float64 (values too large for BatchNorm)")
    return st


# ----------------------------------------------------------------------------- forward


def affine_params(mean, var, gamma, beta, eps: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(invstd float64, scale float32, shift float32)`` (C,): y = x*scale + shift is
    BatchNorm's normalize with weight ``gamma`` and bias ``beta``."""
    mean = np.asarray(mean, np.float64); var = np.asarray(var, np.float64)
    invstd = 1.0 / np.sqrt(var + float(eps))
    scale = np.asarray(gamma, np.float64) * invstd
    shift = np.asarray(beta, np.float64) - mean * scale
    return invstd, scale.astype(np.float32), shift.astype(np.float32)


def mantissa_f32(v: np.ndarray, exponent: int, fmt: DfpFormat = DFP16) -> np.ndarray:
    """The kernels' mantissa of float32 ``v``: ``clamp(roundeven((v*s1)*s2))`` as float32."""
    s1, s2 = scale_factors(exponent)
    with np.errstate(over="ignore"):
        t = (np.asarray(v, np.float32) * np.float32(s1)) * np.float32(s2)
    m = np.float32(fmt.max_mantissa)
    # minimum/maximum rather than np.clip: the same values (NaN and -0.0 included), in less
    # than half the time on the (C,) arrays this is called with
    return np.minimum(np.maximum(np.rint(t), -m), m).astype(np.float32, copy=False)


def dequant_scale(exponent: int) -> np.float32:
    """``2**E`` as float32 (a subnormal below 2**-126; exact down to 2**-149)."""
    return np.float32(np.ldexp(1.0, exponent))


def mantissa_scale(scale: np.ndarray, x_exp: int) -> np.ndarray:
    """sc = scale * 2**Ex (float32; the float64 product is exact), the factor the kernels
    apply to X's mantissas."""
    with np.errstate(over="ignore", under="ignore"):
        return (np.asarray(scale, np.float32).astype(np.float64) * np.ldexp(1.0, x_exp)).astype(np.float32)


def affine_range(qmin: np.ndarray, qmax: np.ndarray, sc: np.ndarray, sh: np.ndarray):
    """Per-channel [lo, hi] of ``a = q*sc + sh`` (float32, two roundings) over q in
    [qmin, qmax]: a is monotone in q, so the ends are the images of the ends."""
    a1 = (qmin * sc) + sh
    a2 = (qmax * sc) + sh
    return np.minimum(a1, a2).astype(np.float32), np.maximum(a1, a2).astype(np.float32)


def output_bound(lo: np.ndarray, hi: np.ndarray, *, relu: bool, res_lo=None, res_hi=None):
    """Per-channel [lo, hi] of the output before quantization and the max |value| over all
    channels. ``res_lo``/``res_hi``: the residual's per-channel range (a bound: see the module
    docstring); ReLU clips at 0."""
    lo = np.asarray(lo, np.float32); hi = np.asarray(hi, np.float32)
    if res_lo is not None:
        lo = (lo + np.asarray(res_lo, np.float32)).astype(np.float32)
        hi = (hi + np.asarray(res_hi, np.float32)).astype(np.float32)
    if relu:
        lo = np.maximum(lo, np.float32(0)); hi = np.maximum(hi, np.float32(0))
    m = float(max(np.max(np.abs(lo)), np.max(np.abs(hi)))) if lo.size else 0.0
    return lo, hi, m


@dataclass
class BnForward:
    """Result of :func:`forward`. ``y_q`` int16 (M, Cp) (the next conv's NHWC rows, Cp = C + C
    % 2, pad channel 0), or with ``out_pad`` (N, top+H+bottom, left+W+right, Cp) with zeros
    around the image, or None; ``y_f`` float32 (M, C) or None (the same values);
    ``y_exp`` their exponent; ``x_q`` int16 (M, C) mantissas of X with ``x_exp`` (None unless
    ``save_x``); ``mask`` uint8 (M, nvec * lanes / 8) ReLU bits (residual + ReLU only);
    ``lo``/``hi`` float32 (C,): per-channel range of the output values (exact without
    residual, a bound with); ``sc``/``sh`` the float32 (C,) affine the kernel applied."""
    y_q: np.ndarray | None
    y_f: np.ndarray | None
    y_exp: int
    x_q: np.ndarray | None
    x_exp: int
    mask: np.ndarray | None
    lo: np.ndarray
    hi: np.ndarray
    sc: np.ndarray
    sh: np.ndarray


def forward(x: np.ndarray, stats: BnStats, scale, shift, *, relu: bool = True,
            residual: np.ndarray | None = None, residual_range=None, save_x: bool = True,
            write_q: bool = True, write_f: bool = True, fmt: DfpFormat = DFP16,
            threads: int | None = None, target: CpuTarget | None = None,
            name: str = "BatchNorm input", out_pad=None) -> BnForward:
    """One pass: X (M, C) float32 -> DFP16 output of ReLU(X*scale + shift [+ residual]).

    ``stats``: :func:`batch_stats` of ``x`` (its min/max fix X's exponent and, with
    ``scale``/``shift`` float32 (C,), the output's; see the module docstring).
    ``residual``: float32 (M, C) or None; ``residual_range``: ``(lo, hi)`` float32 (C,)
    containing every residual value of each channel (required with ``residual``).
    ``out_pad``: ``((N, H, W), (top, bottom, left, right))``, the rows as N images of H x W
    pixels: ``y_q`` is then the zero-padded NHWC buffer a stride-1 conv with that padding
    reads (``dfpgen.fwd_family``), written in the same pass (no padding copy).
    Raises :class:`DfpError` for bad shapes, stochastic rounding (activations round to
    nearest), non-finite parameters, or an exponent outside the format's range.
    """
    x = _rows(x, name)
    M, C = x.shape
    if fmt.rounding != "nearest":
        raise DfpError("fused BatchNorm writes activations with round-to-nearest; got rounding "
                       f"{fmt.rounding!r}")
    if stats.count != M or stats.min.shape != (C,):
        raise DfpError(f"{name}: statistics of {stats.count} x {stats.min.shape} do not match ({M}, {C})")
    target = target or host_target()
    lanes = target.lanes
    Cv = _cv(C, lanes)
    # sc and shift go straight into the kernels' zero-padded (Cv,) rows: the (C,) arrays
    # returned are views of them (one allocation, no _pad copies)
    pad = np.zeros((2, Cv), np.float32)
    scp, shp = pad[0], pad[1]
    sc = _channels(scale, C, "BatchNorm scale", np.float32, out=scp[:C])
    shift = _channels(shift, C, "BatchNorm shift", np.float32, out=shp[:C])
    x_exp = exponent_for(_max_abs(stats.min, stats.max) if stats.count else 0.0, fmt, name)
    with np.errstate(over="ignore", under="ignore"):  # as mantissa_scale: the float64 product is exact
        np.multiply(sc, math.ldexp(1.0, x_exp), out=sc, dtype=np.float64, casting="same_kind")
    # the ends of every channel as one (2, C) array: row 0 the lows, row 1 the highs
    q = mantissa_f32(np.concatenate((stats.min, stats.max)), x_exp, fmt).reshape(2, C)
    a = q * sc + shift  # as affine_range: float32, two roundings
    lohi = np.empty((2, C), np.float32)
    np.minimum(a[0], a[1], out=lohi[0]); np.maximum(a[0], a[1], out=lohi[1])
    if residual is not None:
        residual = _rows(residual, "residual operand")
        if residual.shape != x.shape:
            raise DfpError(f"residual operand: shape {residual.shape} does not match the BatchNorm input {x.shape}")
        if residual_range is None:
            raise DfpError("residual operand: its per-channel range (lo, hi) is needed to bound the output exponent")
        # as output_bound: float32 sums of the ends
        lohi[0] += _channels(residual_range[0], C, "residual range lo")
        lohi[1] += _channels(residual_range[1], C, "residual range hi")
    if relu:
        np.maximum(lohi, np.float32(0), out=lohi)
    mx = float(np.abs(lohi).max()) if C else 0.0
    y_exp = exponent_for(mx, fmt, "BatchNorm output")
    s1x, s2x = scale_factors(x_exp); s1y, s2y = scale_factors(y_exp)
    dqy = float(dequant_scale(y_exp))
    Cp = C + C % 2
    x_q = empty_aligned((M, C)) if save_x else None
    y_q, rowmap = _output_rows(M, Cp, out_pad, write_q)
    y_f = empty_aligned((M, C), np.float32) if write_f else None
    has_mask = relu and residual is not None
    nvec = Cv // lanes
    mask = np.empty((M, nvec * lanes // 8), np.uint8) if has_mask else None
    fn = _kernel("fwd", target, relu=relu, residual=residual is not None, save_x=save_x,
                 write_q=write_q, write_f=write_f, fmt=fmt)
    args = [_ptr(x), _ptr(residual), _ptr(scp), _ptr(shp), _ptr(x_q), _ptr(y_q), _ptr(y_f), _ptr(mask)]
    _threads.parallel_call(fn, (*args, C, s1x, s2x, s1y, s2y, dqy, *rowmap), 8, M, _nthreads(threads, M, C))
    # The output values' range: the quantized images of the bound (exact without residual).
    out_lo, out_hi = mantissa_f32(lohi, y_exp, fmt) * np.float32(dqy)
    return BnForward(y_q, y_f, y_exp, x_q, x_exp, mask, out_lo, out_hi, sc, shift)


def _output_rows(M: int, Cp: int, out_pad, write: bool = True):
    """The INT16 output buffer and the kernel's row mapping ``(W, H, row_skip, img_skip,
    ybase)`` (see ``templates/bn_act.ll.j2``): dense (M, Cp) rows, or the zero-padded NHWC
    buffer of ``out_pad`` (only its border is zeroed here; the kernel writes the rest);
    with ``write`` False no buffer (None) and the dense mapping."""
    if out_pad is None or not write:
        return (empty_aligned((M, Cp)) if write else None), (max(M, 1), 1, 0, 0, 0)
    try:
        (n, h, w), (top, bottom, left, right) = out_pad
        n, h, w, top, bottom, left, right = (int(v) for v in (n, h, w, top, bottom, left, right))
    except (TypeError, ValueError):
        raise DfpError(f"out_pad must be ((N, H, W), (top, bottom, left, right)), got {out_pad!r}") from None
    if n * h * w != M or min(n, h, w) < 1 or min(top, bottom, left, right) < 0:
        raise DfpError(f"out_pad: {n} x {h} x {w} images with padding {(top, bottom, left, right)} "
                       f"do not fit {M} rows")
    hp, wp = top + h + bottom, left + w + right
    # Zero-filled whole, not only the border (zero_bordered): the border's rows lie in every
    # page of the buffer, so zeroing them from here faulted in all of its fresh pages on the
    # calling thread (~1 ms for a ResNet-20 stage-1 output). calloc'd fresh pages come
    # zeroed and are faulted in by the kernel's threads as they write the image; memory the
    # allocator recycles costs a memset instead. The bits are the same: the kernel writes
    # every image element, the border stays 0 either way.
    buf = aligned_zeros((n, hp, wp, Cp))
    return buf, (w, h, wp - w, (hp - h) * wp, top * wp + left)


# ----------------------------------------------------------------------------- backward


@dataclass
class BnBackward:
    """Result of :func:`backward`: ``dx`` float32 (M, C) (BN's input gradient, the dY of the
    conv before it), ``dgamma``/``dbeta`` float64 (C,), ``dres`` float32 (M, C) (gradient of
    the residual operand) or None."""
    dx: np.ndarray
    dgamma: np.ndarray
    dbeta: np.ndarray
    dres: np.ndarray | None


def backward(dy: np.ndarray, x_q: np.ndarray, x_exp: int, sc, sh, mean, invstd, gamma, *,
             relu: bool = True, mask: np.ndarray | None = None, residual: bool = False,
             batch_stats_used: bool = True, threads: int | None = None,
             target: CpuTarget | None = None) -> BnBackward:
    """BatchNorm backward + ReLU backward from the saved INT16 ``x_q`` (M, C) alone.

    ``sc``/``sh``: the forward's :attr:`BnForward.sc`/``sh`` (the ReLU mask is recomputed from
    them bit for bit); ``mask``: the forward's bit mask (required with ``relu`` and
    ``residual``). ``mean``/``invstd`` float64 (C,) the statistics BN normalized with,
    ``gamma`` (C,). ``batch_stats_used=False`` (eval mode: running statistics are constants)
    gives ``dX = gamma*invstd*dY'``. Bits are independent of ``threads``.
    """
    dy = _rows(dy, "BatchNorm grad_output")
    x_q = _rows(x_q, "saved BatchNorm input", np.int16)
    if dy.shape != x_q.shape:
        raise DfpError(f"BatchNorm grad_output {dy.shape} does not match the saved input {x_q.shape}")
    M, C = dy.shape
    target = target or host_target()
    lanes = target.lanes
    Cv = _cv(C, lanes)
    if relu and residual and (mask is None or mask.shape != (M, Cv // 8) or mask.dtype != np.uint8):
        raise DfpError("BatchNorm backward with ReLU after a residual add needs the forward's bit mask")
    flags = dict(relu=relu, residual=residual)
    scp = _pad(_channels(sc, C, "BatchNorm sc"), Cv); shp = _pad(_channels(sh, C, "BatchNorm sh"), Cv)
    mean = _channels(mean, C, "BatchNorm mean", np.float64)
    invstd = _channels(invstd, C, "BatchNorm invstd", np.float64)
    gamma = _channels(gamma, C, "BatchNorm weight", np.float64)
    exs = float(np.ldexp(1.0, x_exp))
    nch = -(-M // CHUNK)
    p1 = np.empty((nch, Cv)); p2 = np.empty((nch, Cv))
    meanp = _pad(mean, Cv)
    red = _kernel("bwd_reduce", target, **flags)
    rargs = [_ptr(dy), _ptr(x_q), _ptr(mask), _ptr(scp), _ptr(shp), _ptr(meanp), _ptr(p1), _ptr(p2)]
    _threads.parallel_call(red, (*rargs, M, C, Cv, exs), 8, nch, _nthreads(threads, nch, CHUNK * C))
    s1 = p1.sum(axis=0); s2 = p2.sum(axis=0)  # chunk order: bit-identical for any split
    dbeta, sxc = s1[:C], s2[:C]
    dgamma = sxc * invstd
    k = gamma * invstd
    if batch_stats_used:
        k2x = -k * invstd * invstd * sxc / M          # coefficient of x
        k3 = -k * dbeta / M - k2x * mean
    else:
        k2x = np.zeros(C); k3 = np.zeros(C)
    k1 = _pad(k.astype(np.float32), Cv)
    k2 = _pad((k2x * exs).astype(np.float32), Cv)
    k3 = _pad(k3.astype(np.float32), Cv)
    dx = empty_aligned((M, C), np.float32)
    dres = empty_aligned((M, C), np.float32) if residual else None
    dxk = _kernel("bwd_dx", target, **flags)
    dargs = [_ptr(dy), _ptr(x_q), _ptr(mask), _ptr(scp), _ptr(shp), _ptr(k1), _ptr(k2), _ptr(k3), _ptr(dx), _ptr(dres)]
    _threads.parallel_call(dxk, (*dargs, C), 10, M, _nthreads(threads, M, C))
    return BnBackward(dx, dgamma, dbeta, dres)


def dequantize_rows(q: np.ndarray, exponent: int) -> np.ndarray:
    """float32 values ``q * 2**exponent`` of an int16 rows array (exact unless subnormal)."""
    return (q.astype(np.float32) * dequant_scale(exponent)).astype(np.float32)


__all__ = ["BnStats", "BnForward", "BnBackward", "batch_stats", "forward", "backward",
           "affine_params", "output_bound", "kernel_plan", "render_kernel", "CHUNK", "EXP_MIN"]
