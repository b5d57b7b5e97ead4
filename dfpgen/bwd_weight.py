"""Backward-weight convolution on DFP16 operands: FP32 dW (KCRS) from DFP16 X and DFP16 dY.

``dW[k, c, r, s] = 2**(Ex + Edy) * sum_m dY[n, k, p, q] * X[n, c, p*uh + r*dh - ph, q*uw + s*dw - pw]``
over pixels m = (n*P + p)*Q + q (docs/ARCHITECTURE.md §3). The reduction runs in INT32 lanes with
VNNI (``vpdpwssd``, INT16 pairs along the pixel dimension) and is flushed to FP32 every
``flush`` pixels, in the order of :func:`dfpgen.reference.conv2d_bwd_weight`.

The pass runs in the same steps as the other two (``dfpgen.conv.conv2d_weight`` calls them):
:func:`prepare` checks and packs the operands (layouts in :mod:`dfpgen.plan_bwd_weight`) with a
generated one-pass packer (``templates/conv_bwd_weight_pack.ll.j2``, which also returns the
maxima the mantissa check and the exact bound read) and picks the flush interval (exact:
proven on the operands, :func:`dfpgen.plan_exact.exact_flush` over :func:`tap_max`, computed
by one compiled pass, :func:`flush_bound`; fast: ``FAST_FLUSH``); ``dfpgen.pass_kernels.get_kernel`` loads the :class:`BwdWeightKernel`
(``templates/conv_bwd_weight.ll.j2``); :func:`execute` runs its work items over threads.

Measured (Zen 4, 1 thread, thread CPU time on a shared machine, so approximate; vpdpwssd peak
117 GMAC/s): n8c128h28w28k128r3s3p1 kernel ~90 GMAC/s fast / ~80 exact, packing 6-9 % of
the call, 1.6-1.7x (fast) / 1.4-1.5x (exact) ``torch.nn.grad.conv2d_weight`` FP32
(channels_last, oneDNN). 1x1 layers pay 15-35 % for packing (X and dY are each read and
written once; the GEMM has only C*K MACs per pixel to hide it).
"""
from __future__ import annotations

import ctypes
import math
import threading
import time
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from . import passes
from . import plan_bwd_weight as pw
from . import bwd_weight_schedule as ws
from .decisions import lookup
from .errors import DfpError
from .kernels import load_kernel
from .pack import aligned_zeros, data_ptr
from .passes import check_overflow
from .render import render
from .runinfo import RunInfo
from .spec import ConvSpec, spec_of
from .target import CpuTarget, host_target
from .threads import num_threads, parallel_call, threads_for
from .tuning import TuningConfig

# Fast mode default: 256 pixels per INT32 partial (the forward's c_block x R x S is 144 for a
# 3x3 layer). A partial of dense Gaussian DFP16 data (sigma ~ max/5 on both operands) then has
# an RMS of ~ 2**29.5, so saturation is a > 3 sigma event; 1024 pixels saturated visibly on
# such data. ReLU activations and sparse gradients stay far below. Flush cost: ~5% of the
# kernel at 256 (128 pairs of 26 vpdpwssds per flush of 26 accumulators).
FAST_FLUSH = 256
TEMPLATE = passes.get("bwd_weight").template

_KERNEL_TYPE = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
                                ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_float,
                                ctypes.c_float, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
                                ctypes.c_float, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64,
                                ctypes.c_int64, ctypes.c_int64)

def _mantissa(t, name: str, ndim: int) -> np.ndarray:
    m = getattr(t, "mantissa", None)
    if m is None or not hasattr(t, "exponent"):
        raise DfpError(f"{name} must be a DfpTensor (mantissa int16 + exponent), got {type(t).__name__}")
    if m.dtype != np.int16 or m.ndim != ndim:
        raise DfpError(f"{name}.mantissa must be an int16 array with {ndim} dims, got {m.dtype} {m.shape}")
    return m


PACK_TEMPLATE = "conv_bwd_weight_pack.ll.j2"
PACK_PARAMS = ("Hout", "Wout", "H", "W", "C", "Cout", "sN", "sH", "sW", "ph", "pw", "istep", "delta", "hstep")
_PACK_TYPE = ctypes.CFUNCTYPE(ctypes.c_int32, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
                              ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64)
PACK_CHUNK = 16      # channels per vector step of the pack kernel (256-bit loads, 512-bit stores)
MIN_PACK_ROWS_PER_THREAD = 8


@dataclass(frozen=True)
class PackPlan:
    """What ``templates/conv_bwd_weight_pack.ll.j2`` prints: ``chunk`` channels per vector
    step, ``pair_lanes`` = 2 * chunk INT16 lanes of a stored pair vector, ``lane_idx`` the
    chunk's lanes, ``interleave`` the shuffle that zips two columns into pairs, ``params`` the
    names of the int64 parameter block (``PACK_PARAMS``)."""
    symbol: str
    tier: str
    chunk: int
    pair_lanes: int
    lane_idx: tuple[int, ...]
    interleave: tuple[int, ...]
    params: tuple[str, ...]


@lru_cache(maxsize=None)
def _pack_kernel(target: CpuTarget):
    p = PackPlan(f"dfp_bwdw_pack_pairs_{target.tier}", target.tier, PACK_CHUNK, 2 * PACK_CHUNK,
                 tuple(range(PACK_CHUNK)), tuple(k for c in range(PACK_CHUNK) for k in (c, c + PACK_CHUNK)),
                 PACK_PARAMS)
    k = load_kernel(p.symbol, {"pass": "bwd_weight_pack", "chunk": PACK_CHUNK, "abi": 2},
                    lambda: render(PACK_TEMPLATE, p=p), target)
    return _PACK_TYPE(k.address)


def pack_pairs(src: np.ndarray, dst_shape, *, pad=(0, 0), istep=1, delta=1, cout=None, hstep=1,
               threads=None, target=None, buffer: str | None = None) -> tuple[np.ndarray, np.ndarray, int]:
    """Generated one-pass packer (``templates/conv_bwd_weight_pack.ll.j2``).

    ``src`` int16 (N, C, H, W) with any strides (channel stride 1 is read in place; anything
    else is first copied to NHWC). Output row r = n*Hout + h' (h = h'*hstep - pad[0]), position i:
    ``dst[n, h', i, c] = (src[n, c, h, i*istep - pad[1]], src[n, c, h, i*istep - pad[1] + delta])``
    (0 outside the image and for c >= C up to ``cout``), ``dst_shape = (N, Hout, Wout)``.
    Returns ``(dst int16 (N, Hout, Wout, cout, 2), amax int32 (N, Hout, Wout, 2), peak)``,
    ``amax`` the max |value| over c of each of the two pair elements (32768 flags a -32768
    mantissa), ``peak`` the largest of them (0 for an empty ``dst``; the kernel's ranges
    return theirs, so the mantissa check reads amax no second time); ``dst`` is 64-byte aligned, and taken from the per-thread pool under the name ``buffer``
    when given (valid until the next call that uses that name).
    """
    N, C, H, W = src.shape
    Hout, Wout = dst_shape[1], dst_shape[2]
    cout = C if cout is None else cout
    if src.strides[1] != 2:
        src = np.ascontiguousarray(src.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2)
    sN, _, sH, sW = (st // 2 for st in src.strides)
    shape = (N, Hout, Wout, cout, 2)
    dst = _buffer(buffer, shape, np.int16) if buffer else aligned_zeros(shape, np.int16)
    amax = np.empty((N, Hout, Wout, 2), np.int32)
    zeros = np.zeros(C + PACK_CHUNK, np.int16)
    kH, kW, kHout, kWout, ksH = H, W, Hout, Wout, sH
    if (N, H, Hout, hstep, istep, delta) == (1, 1, 1, 1, 2, 1) and tuple(pad) == (0, 0) and W == 2 * Wout:
        # One long row of disjoint pairs (a 1x1 layer's N*P*Q pixels, backward-weight's
        # pixel row): the same memory packs as R rows of Wout/R pairs each (no pair crosses
        # a row), so that the rows can be split over the threads; one row ran on one core.
        r = max((d for d in range(1, 65) if Wout % d == 0), default=1)
        kH, kW, kHout, kWout, ksH = r, W // r, r, Wout // r, (W // r) * sW
    prm = np.array([kHout, kWout, kH, kW, C, cout, sN, ksH, sW, pad[0], pad[1], istep, delta, hstep], np.int64)
    fn = _pack_kernel(target or host_target())
    rows = N * kHout
    nt = max(1, min(threads or num_threads(), rows // MIN_PACK_ROWS_PER_THREAD))
    # base pointer of src as a view may start anywhere: data_ptr is its first element
    args = (data_ptr(src), data_ptr(zeros), data_ptr(dst), data_ptr(amax), data_ptr(prm))
    peaks = parallel_call(fn, args, 5, rows, nt, results=True)
    return dst, amax, max(peaks, default=0)


def _pixel_row(m: np.ndarray) -> np.ndarray:
    """(N, C, P, Q) int16, any strides -> the same values as (1, C, 1, N*P*Q), pixels in
    m = (n*P + p)*Q + q order, channel stride 1 (a view when ``m`` is NHWC-contiguous)."""
    N, C, P, Q = m.shape
    nhwc = m.transpose(0, 2, 3, 1)
    if not nhwc.flags.c_contiguous:
        nhwc = np.ascontiguousarray(nhwc)
    return nhwc.reshape(1, 1, N * P * Q, C).transpose(0, 3, 1, 2)


def tap_max(xam: np.ndarray, p: pw.BwdWeightPlan) -> np.ndarray:
    """int32 (N, P, Q): for each output pixel m, max over taps (r, s) and channels c of
    |X_rs[m, c]|, from the packer's per-column maxima ``xam`` (N, Hp, Wp, 2) of Xw. The
    definition :func:`flush_bound` computes in one compiled pass (tests compare the two)."""
    spec = p.spec
    N, P, Q, R, S = spec.N, spec.P, spec.Q, spec.R, spec.S
    (_, uw), (dh, dw), uh = spec.stride, spec.dilation, p.x_row_step
    a_pix = np.zeros((N, P, Q), np.int32)
    if S == 1:  # Xw column j holds output pixels (2j, 2j+1) already
        for r in range(R):
            v = xam[:, r * dh: r * dh + (P - 1) * uh + 1: uh].reshape(N, P, -1)
            np.maximum(a_pix, v[..., :Q], out=a_pix)
        return a_pix
    # per padded pixel max over C, (N, Hp, Wp + uw): columns >= Wp only appear as the second
    # element of a pair, Xw[.., w, 1] = Xpad[.., w + uw]
    a_all = np.zeros((N, p.Hp, p.Wp + uw), np.int32)
    a_all[..., :p.Wp] = xam[..., 0]
    np.maximum(a_all[..., uw:], xam[..., 1], out=a_all[..., uw:])
    # the max over taps is separable: columns (s) first, then rows (r)
    cols = np.zeros((N, p.Hp, Q), np.int32)
    for s in range(S):
        np.maximum(cols, a_all[..., s * dw: s * dw + (Q - 1) * uw + 1: uw], out=cols)
    for r in range(R):
        np.maximum(a_pix, cols[:, r * dh: r * dh + (P - 1) * uh + 1: uh], out=a_pix)
    return a_pix


FLUSH_TEMPLATE = "conv_bwd_weight_flush.ll.j2"
FLUSH_PARAMS = ("rows", "P", "Q", "Hp", "Wp", "uh", "R", "S", "dh", "sS", "dw", "uw", "Qa", "Qv", "Q2",
                "sQ")
FLUSH_LANES = 8      # pixels per vector step of the flush kernel (256-bit)
_FLUSH_TYPE = ctypes.CFUNCTYPE(ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
                               ctypes.c_void_p, ctypes.c_void_p)
# q strides of xam compiled in (the loop vectoriser widens constant-stride loads only):
# S == 1 (1), S > 1 with column stride 1 or 2 (2, 4); others read it at run time
FLUSH_STRIDES = (1, 2, 4)


@dataclass(frozen=True)
class FlushPlan:
    """What ``templates/conv_bwd_weight_flush.ll.j2`` prints: ``q_stride`` the xam elements
    between neighbouring output pixels of a tap (0: the run-time ``sQ``, scalar loop),
    ``lanes`` pixels per vector step, ``load_lanes`` = lanes * q_stride elements loaded for
    them, ``pick`` the loaded lanes that are pixels, ``load_idx`` / ``lane_idx`` lane numbers
    (masks), ``even`` / ``odd`` the lanes of 2 * lanes values that pair up, ``params`` the
    names of the int64 parameter block (``FLUSH_PARAMS``)."""
    symbol: str
    tier: str
    q_stride: int
    lanes: int
    load_lanes: int
    pick: tuple[int, ...]
    load_idx: tuple[int, ...]
    lane_idx: tuple[int, ...]
    even: tuple[int, ...]
    odd: tuple[int, ...]
    params: tuple[str, ...]


def flush_plan(target: CpuTarget, q_stride: int) -> FlushPlan:
    """The flush kernel variant for xam stride ``q_stride`` (one of ``FLUSH_STRIDES``, or 0)."""
    L = FLUSH_LANES
    st = q_stride or 1
    return FlushPlan(f"dfp_bwdw_exact_flush_s{q_stride}_{target.tier}", target.tier, q_stride, L, L * st,
                     tuple(range(0, L * st, st)), tuple(range(L * st)), tuple(range(L)),
                     tuple(range(0, 2 * L, 2)), tuple(range(1, 2 * L, 2)), FLUSH_PARAMS)


@lru_cache(maxsize=None)
def _flush_kernel(target: CpuTarget, q_stride: int):
    p = flush_plan(target, q_stride)
    k = load_kernel(p.symbol, {"pass": "bwd_weight_flush", "q_stride": q_stride, "lanes": FLUSH_LANES, "abi": 1},
                    lambda: render(FLUSH_TEMPLATE, p=p), target)
    return _FLUSH_TYPE(k.address)


_flush_memo: dict[int, tuple] = {}


def _flush_params(p: pw.BwdWeightPlan) -> tuple:
    """``(p, q_stride, prm, prm address, xam shape, dam shape, pixels)`` of plan ``p`` for
    the flush kernel: its xam stride variant and int64 parameter block (read-only, shared
    by the calls of a shape). Memoised by identity: hashing the plan (an lru_cache key)
    took longer than the small layers' kernel; the entry holds ``p``, so its id stays its own."""
    e = _flush_memo.get(id(p))
    if e is not None and e[0] is p:
        return e
    spec = p.spec
    N, P, Q, R, S = spec.N, spec.P, spec.Q, spec.R, spec.S
    (_, uw), (dh, dw), uh = spec.stride, spec.dilation, p.x_row_step
    if S == 1:  # Xw column j holds output pixels (2j, 2j+1): pixel q is element q of the row
        s_s, s_q, qa = 0, 1, Q
        qv = Q  # 2*Wp >= Q: every load stays in the row
    else:
        # pixel q of tap s is padded column s*dw + q*uw, element 0 of that Xw column while
        # it is < Wp; the last columns are the partners (element 1) of columns uw before
        s_s, s_q = 2 * dw, 2 * uw
        qa = min(Q, (p.Wp - (S - 1) * dw + uw - 1) // uw)
        # a vector step's contiguous load ends at the last pixel's partner element and
        # beyond (stride 4): unmasked only while that stays inside the row, 2*Wp elements
        qv = min(qa, (p.Wp - (S - 1) * dw) // uw)
    vals = dict(rows=N * P, P=P, Q=Q, Hp=p.Hp, Wp=p.Wp, uh=uh, R=R, S=S, dh=dh, sS=s_s, dw=dw, uw=uw,
                Qa=qa, Qv=qv, Q2=p.Q2, sQ=s_q)
    prm = np.array([vals[k] for k in FLUSH_PARAMS], np.int64)
    prm.flags.writeable = False
    e = (p, s_q if s_q in FLUSH_STRIDES else 0, prm, prm.ctypes.data, (N, p.Hp, p.Wp, 2), (N, P, p.Q2, 2),
         N * P * Q)
    if len(_flush_memo) >= 1024:
        _flush_memo.clear()
    _flush_memo[id(p)] = e
    return e


def flush_bound(xam: np.ndarray, dam: np.ndarray, p: pw.BwdWeightPlan, target: CpuTarget | None = None) -> int:
    """The exact-mode flush interval of the packed operands of plan ``p`` in one compiled
    serial pass (``templates/conv_bwd_weight_flush.ll.j2``): ``exact_flush(tap_max(xam, p),
    b_pix)`` with b_pix the (N, P, Q) maxima of ``dam``, the same value for every input.
    ``xam`` int32 (N, Hp, Wp, 2) and ``dam`` int32 (N, P, Q2, 2), C-contiguous, as
    :func:`pack_pairs` returns them, free of the flag 32768 (:func:`prepare` checks the
    packer's peaks first). Raises :class:`DfpError` when they do not match ``p``."""
    _, q_stride, _, prm_addr, xshape, dshape, m = _flush_params(p)
    if xam.shape != xshape or dam.shape != dshape or xam.dtype != np.int32 or dam.dtype != np.int32 \
            or not (xam.flags.c_contiguous and dam.flags.c_contiguous):
        raise DfpError(f"flush_bound: xam {xam.dtype} {xam.shape} / dam {dam.dtype} {dam.shape} do not "
                       f"match plan {p.spec.geometry()}")
    # one scratch: the per-pixel bounds v (level 0; a row's last vector step may write
    # FLUSH_LANES past it), then lv, the levels ping-ponging between the two
    nv = m + FLUSH_LANES
    scratch = data_ptr(_buffer("flush", (nv + (m + 1) // 2,), np.int32))
    fn = _flush_kernel(target or host_target(), q_stride)
    return fn(data_ptr(xam), data_ptr(dam), scratch, scratch + 4 * nv, prm_addr)


def _scales(e: int) -> tuple[float, float]:
    """2**e as 2**e1 * 2**e2 with float32 factors; e1 keeps fp32(partial)*2**e1 a normal float
    (|partial| < 2**31), so only the second multiply rounds, like the reference's one rounding."""
    e1 = min(max(e, -126), 96)
    e2 = min(max(e - e1, -149), 127)
    return float(np.float32(2.0 ** e1)), float(np.float32(2.0 ** e2))


_tls = threading.local()


def _buffer(name: str, shape, dtype) -> np.ndarray:
    """A 64-byte aligned, uninitialised array from a per-thread pool, reused across calls:
    fresh pages cost a page fault per 4 KiB inside the kernels (for the tiles as much as dW
    itself). Only for data that does not outlive the call."""
    dtype = np.dtype(dtype)
    n = math.prod(shape) * dtype.itemsize
    pool = _tls.__dict__.setdefault("pool", {})
    raw = pool.get(name)
    if raw is None or raw.size < n + 64:
        raw = np.empty(n + 64, np.uint8)
        pool[name] = raw
    off = (-data_ptr(raw)) % 64
    return raw[off:off + n].view(dtype).reshape(shape)


def release_buffers() -> None:
    """Free the calling thread's pool of packed operands and tiles (it keeps the largest
    layer's sizes otherwise)."""
    _tls.__dict__.pop("pool", None)


@lru_cache(maxsize=1024)
def _plan(spec, config, target, overflow, scaled):
    return pw.plan(spec, config, target, overflow, scaled)


@lru_cache(maxsize=1024)
def _default_config(spec, target, flush):
    """``plan_bwd_weight.default_config`` memoised."""
    return pw.default_config(spec, target, flush)


@lru_cache(maxsize=256)
def _conv_kernel(p: pw.BwdWeightPlan, target: CpuTarget):
    """The kernel of plan ``p`` as a ctypes callable; memoised because ``load_kernel`` hashes
    the full key (JSON + sha256) on every call, ~0.1 ms that small layers notice."""
    k = load_kernel(p.symbol, p.key(), lambda: render(TEMPLATE, p=p), target)
    return _KERNEL_TYPE(k.address)


@dataclass(frozen=True)
class BwdWeightOperands:
    """Both operands of one backward-weight call, packed for the kernel, with the flush
    interval proven on them (:func:`prepare`).

    ``spec``: the pass as the kernel runs it (a 1x1 layer without padding becomes one row of
    N*P*Q pixels); ``weight_shape``: dW's (K, C, R, S); ``xw`` / ``dyp``: the packed X and dY
    (layouts in :mod:`dfpgen.plan_bwd_weight`, buffers valid until the calling thread's next call);
    ``flush``: pixels per INT32 partial; ``scaled``: the flush multiplies by 2**E in the
    kernel; ``scale_exp``: Ex + Edy; ``config``: the config given or tuned (``None``: the
    default follows the flush interval, :func:`kernel_config`); ``threads``: the count to run.
    """
    spec: ConvSpec
    weight_shape: tuple[int, int, int, int]
    xw: np.ndarray
    dyp: np.ndarray
    flush: int
    scaled: bool
    scale_exp: int
    config: TuningConfig | None
    threads: int
    seconds: float  # spent validating and packing


def prepare(xq, weight_shape, dyq, stride=1, padding=0, dilation=1, *, overflow: str = "exact",
            threads: int | None = None, config: TuningConfig | None = None,
            target: CpuTarget | None = None) -> BwdWeightOperands:
    """Check and pack DFP16 X (N, C, H, W) and DFP16 dY (N, K, P, Q) for dW (K, C, R, S), and
    pick the flush interval: ``overflow="exact"`` the largest power of two proven safe on these
    operands (:func:`dfpgen.plan_exact.exact_flush` over :func:`tap_max`, computed by
    :func:`flush_bound`), capped by ``config.flush`` when that is > 0; ``"fast"`` ``config.flush`` or ``FAST_FLUSH`` = 256.
    ``config=None`` takes the tuned decision if there is one. Raises :class:`DfpError` on
    shape mismatches, non-DFP operands, a -32768 mantissa, an odd fast-mode flush or an
    unknown mode."""
    t0 = time.perf_counter()
    x = _mantissa(xq, "x", 4)
    dy = _mantissa(dyq, "grad_output", 4)
    try:
        K, C, R, S = (int(v) for v in weight_shape)
    except (TypeError, ValueError):
        raise DfpError(f"weight_shape must be (K, C, R, S), got {weight_shape!r}") from None
    N, Cx, H, W = x.shape
    if Cx != C:
        raise DfpError(f"x has {Cx} channels but weight_shape {tuple(weight_shape)} has C={C}")
    spec = spec_of(N, C, H, W, K, R, S, stride, padding, dilation, "bwd_weight")
    if dy.shape != spec.output_shape:
        raise DfpError(f"grad_output shape {dy.shape} does not match the output {spec.output_shape} "
                       f"of {spec.geometry()}")
    check_overflow(overflow)
    target = target or host_target()
    if config is None:
        # a decision of `dfpgen tune` (the lookup kernels of the other passes get too)
        config = lookup(spec, target, overflow)
    scale_exp = int(xq.exponent) + int(dyq.exponent)
    scaled = not pw.unscaled_ok(scale_exp)
    if R == S == 1 and spec.padding == (0, 0):
        # A 1x1 layer is one GEMM over all N*P*Q pixels: run it as a single output row, so
        # the pixel pairs (m, m+1) and runs cross rows and images (no odd-Q padding pair, no
        # segment per row; Linear-like Q = 1 shapes would otherwise waste half the pairs).
        uh, uw = spec.stride
        x = x[:, :, ::uh, ::uw][:, :, :spec.P, :spec.Q]
        n1, p1, q1 = spec.N, spec.P, spec.Q
        spec = spec_of(1, C, 1, n1 * p1 * q1, K, pass_kind="bwd_weight")
        if q1 % 2 == 0 and n1 * p1 >= 2 * MIN_PACK_ROWS_PER_THREAD:
            # no pair crosses an image row: packed row by row from the (strided) views, the
            # bytes of the single row come out without copying X into pixel order first
            # (a stride-2 shortcut's X: ~0.25 ms a call); with rows enough for the threads
            rows = (n1, p1, q1 // 2)
        else:
            x, dy = _pixel_row(x), _pixel_row(dy)
            rows = None
    else:
        rows = None
    N = spec.N
    # Layouts depend on the spec only, so packing can use any plan of it.
    p = _plan(spec, config or _default_config(spec, target, None), target, overflow, scaled)
    nthreads = threads or (config.threads if config is not None else 0)
    if not nthreads:
        nthreads = threads_for(spec.N * spec.P * spec.Q * C * K * R * S)
    xw, xam, xpeak = pack_pairs(x, rows or (N, p.Hp, p.Wp), pad=spec.padding, istep=p.pack_istep,
                                delta=spec.stride[1], cout=p.Cs, hstep=p.pack_hstep, threads=nthreads,
                                target=target, buffer="xw")
    dyp, dam, dpeak = pack_pairs(dy, rows or (N, spec.P, p.Q2), istep=2, delta=1, cout=p.Ks, threads=nthreads,
                                 target=target, buffer="dy")
    if rows is not None:  # the single row's shapes (views: the arrays are contiguous)
        xw, xam = xw.reshape(1, 1, p.Wp, p.Cs, 2), xam.reshape(1, 1, p.Wp, 2)
        dyp, dam = dyp.reshape(1, 1, p.Q2, p.Ks, 2), dam.reshape(1, 1, p.Q2, 2)
    if xpeak > 32767 or dpeak > 32767:
        raise DfpError("x or grad_output holds the mantissa -32768; DFP16 mantissas are limited to +/-32767")
    if overflow == "exact":
        flush = flush_bound(xam, dam, p, target)
        if config is not None and config.flush:
            # a cap only shortens the proven chunks when it is a power of two too: its chunks
            # then nest in the proven ones ([12, 24) under a proven 16 would straddle two)
            cap = 1 << (max(config.flush, 2).bit_length() - 1)
            flush = max(2, min(flush, cap))
    else:
        flush = (config.flush if config is not None else 0) or FAST_FLUSH
        if flush % 2:
            raise DfpError(f"backward-weight flush interval must be even (INT16 pairs), got {flush}")
    return BwdWeightOperands(spec, (K, C, R, S), xw, dyp, flush, scaled, scale_exp, config, nthreads,
                         time.perf_counter() - t0)


def kernel_config(ops: BwdWeightOperands, target: CpuTarget) -> TuningConfig:
    """The config of the kernel to run on ``ops``: the given or tuned one, else the default
    register blocking for the proven flush interval (short intervals keep the FP32 sums in
    registers, :func:`dfpgen.plan_bwd_weight.default_config`)."""
    return ops.config or _default_config(ops.spec, target, ops.flush)


def exact_family(spec: ConvSpec, target: CpuTarget) -> tuple[TuningConfig, ...]:
    """The default configs an exact-mode layer can be given as its operands drift (short and
    long flush intervals): loaded together at a shape's first call, so none builds later."""
    return tuple(_default_config(spec, target, f) for f in (2, None))


class BwdWeightKernel:
    """The backward-weight kernel of ``(spec, config, target, mode)``: its plan
    (:func:`dfpgen.plan_bwd_weight.plan`; ``scaled``: the flush multiplies by 2**E in the kernel)
    and ctypes entry point, loaded through :func:`dfpgen.kernels.load_kernel`."""

    def __init__(self, spec: ConvSpec, config: TuningConfig, target: CpuTarget, mode: str,
                 scaled: bool = False):
        self.spec, self.config, self.target, self.mode = spec, config, target, mode
        self.plan = _plan(spec, config, target, mode, scaled)
        self.fn = _conv_kernel(self.plan, target)

    @property
    def symbols(self) -> tuple[str, ...]:
        return (self.plan.symbol,)


def execute(kernel: BwdWeightKernel, ops: BwdWeightOperands, threads: int | None = None) -> tuple[np.ndarray, RunInfo]:
    """Run ``kernel`` on the packed operands ``ops``. Returns ``(dW float32 (K, C, R, S)
    C-contiguous, RunInfo)``; bit-identical to ``reference.conv2d_bwd_weight(...,
    flush_pixels=info.flush)`` for every tier, config and thread count in exact mode."""
    p, flush = kernel.plan, ops.flush
    nthreads = threads or ops.threads
    seg, blocks = ws.schedule(p, flush)
    K, C, R, S = ops.weight_shape
    # tiles: the kernel's first cache block initialises them
    out = _buffer("out", (p.RS * C * p.Kp,), np.float32)
    acc = _buffer("acc", (p.RS * C * p.Kp,), np.int32)
    split = pw.work_split(p, nthreads)
    sat = np.zeros(split.items, np.int64)
    s1, s2 = _scales(ops.scale_exp) if ops.scaled else (1.0, 1.0)
    cols = pw.column_table(p)
    dw = np.empty((K, C, R, S), np.float32)
    # unscaled flushes: the kernel's last write multiplies by 2**E (exact: plan_bwd_weight.unscaled_ok)
    fs = 1.0 if ops.scaled else float(np.float32(2.0 ** ops.scale_exp))
    args = (data_ptr(ops.xw), data_ptr(ops.dyp), data_ptr(out), data_ptr(acc), data_ptr(seg),
            data_ptr(blocks), len(blocks) - 1, flush // 2, s1, s2, data_ptr(sat), data_ptr(cols),
            data_ptr(dw), fs, split.kb_group, split.group, split.n_groups)
    fn = kernel.fn
    t1 = time.perf_counter()
    parallel_call(fn, args, 17, split.items, nthreads)
    t_kernel = time.perf_counter() - t1
    config = kernel.config
    info = RunInfo(pass_kind="bwd_weight", overflow=kernel.mode, flush=flush, saturated=int(sat.sum()),
                   tier=kernel.target.tier, symbol=p.symbol, symbols=(p.symbol,), config=dict(config.__dict__),
                   c_block=config.c_block, threads=min(nthreads, split.items), scale_exp=ops.scale_exp,
                   possibly_saturated=None if kernel.mode == "fast" else 0,  # not tracked here
                   kernel_seconds=t_kernel)
    return dw, info
