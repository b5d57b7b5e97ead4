"""Quantize-and-pack: FP32 activations -> DFP16 mantissas in the conv kernels' layout.

Input: float32 (N, C, H, W) whose memory is NCHW (C-contiguous) or NHWC (torch
``channels_last``: ``x.transpose(0, 2, 3, 1)`` is C-contiguous); or (N, C) for Linear inputs
(treated as (N, C, 1, 1)). Output buffer: NHWC int16 with C padded to even,
``Cp = C + C % 2`` (pad channel = 0), so that VNNI reads INT16 pairs along C (docs/ARCHITECTURE.md §3).

Two passes over memory, both generated LLVM IR (``templates/quantize_pack.ll.j2``), split
over threads with :func:`dfpgen.threads.parallel_call` (the OpenMP team, or the Python pool):

1. ``dfp_maxabs_f32``: max of ``bits(x) & 0x7fffffff`` per chunk (a result >= 0x7f800000
   flags NaN/Inf; numpy then finds the count and first index, on the error path only);
   the shared exponent follows :func:`dfpgen.dfp.exponent_for`.
2. ``dfp_pack_{nchw,nhwc}_{nearest,stochastic}``: scale by ``2**-E``, round, clamp, write
   int16 NHWC-padded. Bits equal :func:`dfpgen.dfp.quantize` for both rounding modes (the
   stochastic hash uses each element's logical NCHW C-order index), for any thread count.

Other dtypes, 2-D/4-D arrays with other strides, fall back to ``dfp.quantize`` plus a copy
into the padded buffer (same bits, more passes).
"""
from __future__ import annotations

import ctypes
import math
from dataclasses import dataclass

import numpy as np
try:
    from numpy.lib.array_utils import byte_bounds
except ImportError:  # numpy < 2
    from numpy import byte_bounds
from numpy.lib.stride_tricks import as_strided

from . import threads as _threads
from .dfp import (DFP16, DfpFormat, DfpTensor, check_seed, exponent_for, quantize, raise_nonfinite, seed_mix,
                  scale_factors)
from .errors import DfpError
from .kernels import cfunction, load_kernel
from .render import llvm_float, render
from .target import CpuTarget, host_target

# 2: pack_nhwc writes rows into a zero-padded image (row mapping arguments); 3: and can keep
# the per-channel range of the mantissas it writes (one row pair per thread range)
ABI_VERSION = 3
NONFINITE_BITS = 0x7F800000
# Below this many elements per thread the pool hand-off costs more than the work.
MIN_ELEMS_PER_THREAD = 1 << 16
# NCHW kernel: output bytes per work item (a tile of pixel blocks of one image). Each transpose
# pass reads 32 channel planes as runs of tile pixels; the tile's NHWC output stays in L2
# between passes. Measured on Zen 4 (C=256, 56x56): 1 block/item 8.6 ms, 16: 5.2 ms,
# 49 (392 KiB): 3.7 ms, a whole image (1.6 MiB): 5.5 ms.
NCHW_TILE_BYTES = 384 << 10

_MAXABS_T = ctypes.CFUNCTYPE(ctypes.c_uint32, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64)
_NHWC_T = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64,
                           ctypes.c_int64, ctypes.c_int64, ctypes.c_float, ctypes.c_float, ctypes.c_uint32,
                           ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p)
_NCHW_T = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64,
                           ctypes.c_int64, ctypes.c_int64, ctypes.c_float, ctypes.c_float, ctypes.c_uint32,
                           ctypes.c_int64, ctypes.c_int64)
_PROTOS = {"maxabs": _MAXABS_T, "pack_nhwc": _NHWC_T, "pack_nchw": _NCHW_T}


def _i32(v: int) -> int:
    return v - (1 << 32) if v >= 1 << 31 else v


@dataclass(frozen=True)
class PackPlan:
    """What ``templates/quantize_pack.ll.j2`` prints for one kernel ``kind`` (maxabs |
    pack_nhwc | pack_nchw): symbol and tier, ``lanes`` FP32 lanes per vector (and the
    constants derived from it, so the template computes nothing), the format's rounding and
    mantissa limit (as LLVM float literals too), the stochastic hash's multipliers, and the
    NCHW kernel's register transpose (``stages``, ``shuffles``, ``tpairs``, ``trows``:
    :func:`_transpose_plan`)."""
    kind: str
    symbol: str
    tier: str
    lanes: int
    neg_lanes: int
    rounding: str
    max_mantissa: int
    max_f: str
    neg_max_f: str
    two24: str
    fmix_m1: int
    fmix_m2: int
    lane_ids_i64: str
    lane_ids_i32: str
    two_lanes: int
    neg_two_lanes: int
    lanes_m1: int
    lanes_x2_m1: int
    vec_bytes: int
    stages: int
    shuffles: tuple
    tpairs: tuple
    trows: tuple


def kernel_plan(kind: str, fmt: DfpFormat, target: CpuTarget) -> PackPlan:
    """The :class:`PackPlan` of ``kind`` in maxabs | pack_nhwc | pack_nchw."""
    lanes = target.vector_bits // 32
    if kind == "maxabs":
        symbol = f"dfp_maxabs_f32_v{lanes}_{target.tier}"
    else:
        symbol = f"dfp_{kind}_{fmt.rounding}_p{fmt.bits}_v{lanes}_{target.tier}"
    return PackPlan(
        kind=kind, symbol=symbol, tier=target.tier, lanes=lanes,
        neg_lanes=-lanes, rounding=fmt.rounding, max_mantissa=fmt.max_mantissa,
        max_f=llvm_float(fmt.max_mantissa), neg_max_f=llvm_float(-fmt.max_mantissa),
        two24=llvm_float(2.0 ** 24), fmix_m1=_i32(0x85EBCA6B), fmix_m2=_i32(0xC2B2AE35),
        lane_ids_i64=", ".join(f"i64 {i}" for i in range(lanes)),
        lane_ids_i32=", ".join(f"i32 {i}" for i in range(lanes)),
        two_lanes=2 * lanes, neg_two_lanes=-2 * lanes, lanes_m1=lanes - 1, lanes_x2_m1=2 * lanes - 1,
        vec_bytes=4 * lanes,
        **_transpose_plan(lanes),
    )


def _transpose_plan(lanes: int) -> dict:
    """The NCHW kernel's register transpose of ``lanes`` x ``lanes`` INT32 (INT16 pairs):
    rows ``%t0.q`` (pair q of every pixel) -> rows of one pixel each, in log2(lanes) stages.
    Stage with block size s pairs rows i and i+s (bit s of i clear) and swaps bit s of the row
    index with bit s of the lane index: lo[j] = j & s ? b[j-s] : a[j], hi[j] = j & s ? b[j] : a[j+s]."""
    names = [f"%t0.{q}" for q in range(lanes)]
    shuffles, s, stage = [], lanes // 2, 0
    while s >= 1:
        stage += 1
        new = list(names)
        lo = ", ".join(f"i32 {lanes + j - s if j & s else j}" for j in range(lanes))
        hi = ", ".join(f"i32 {lanes + j if j & s else j + s}" for j in range(lanes))
        for i in range(lanes):
            if i & s:
                continue
            new[i], new[i + s] = f"%t{stage}.{i}", f"%t{stage}.{i + s}"
            shuffles.append({"dst": new[i], "a": names[i], "b": names[i + s], "mask": lo})
            shuffles.append({"dst": new[i + s], "a": names[i], "b": names[i + s], "mask": hi})
        names, s = new, s // 2
    return {"stages": stage, "shuffles": tuple(shuffles),
            "tpairs": tuple({"q": q} for q in range(lanes)),
            "trows": tuple({"j": j, "src": names[j]} for j in range(lanes))}


def render_kernel(kind: str, fmt: DfpFormat = DFP16, target: CpuTarget | None = None) -> str:
    """LLVM IR of one quantize-and-pack kernel (for ``dfpgen show`` and tests)."""
    return render("quantize_pack.ll.j2", p=kernel_plan(kind, fmt, target or host_target()))


def _kernel(kind: str, fmt: DfpFormat, target: CpuTarget):
    """The ctypes callable of one pack kernel; looked up in a dict keyed by a tuple first
    (``load_kernel`` hashes the key fields as JSON on every call)."""
    ckey = (kind, fmt if kind != "maxabs" else None, target)
    fn = _callables.get(ckey)
    if fn is None:
        fn = _callables[ckey] = _load(kind, fmt, target)
    return fn


_callables: dict[tuple, object] = {}


def _load(kind: str, fmt: DfpFormat, target: CpuTarget):
    plan = kernel_plan(kind, fmt, target)
    fields = {"kernel": "quantize_pack", "abi": ABI_VERSION, "kind": plan.kind, "lanes": plan.lanes}
    if kind != "maxabs":
        fields["format"] = fmt.key()
    k = load_kernel(plan.symbol, fields, lambda: render("quantize_pack.ll.j2", p=plan), target)
    return cfunction(k, _PROTOS[kind])


def _split_threads(threads: int | None, work_items: int, elems_per_item: int) -> int:
    n = threads or _threads.num_threads()
    cap = max(1, (work_items * elems_per_item) // MIN_ELEMS_PER_THREAD) if threads is None else n
    return max(1, min(n, cap, work_items))


def max_abs(flat: np.ndarray, *, name: str = "tensor", threads: int | None = None,
            target: CpuTarget | None = None, logical: np.ndarray | None = None) -> float:
    """max |x| of a C-contiguous float32 array with the generated kernel (pass 1).

    Raises :class:`DfpError` naming ``name`` (count and first index in ``logical``, the
    user's view of the same data, default ``flat``) if a NaN or Inf is present.
    """
    if flat.dtype != np.float32 or not flat.flags.c_contiguous:
        raise DfpError("max_abs needs a C-contiguous float32 array")
    total = flat.size
    if total == 0:
        return 0.0
    fn = _kernel("maxabs", DFP16, target or host_target())
    nt = _split_threads(threads, total, 1)
    out = _threads.parallel_call(fn, (data_ptr(flat),), 1, total, nt, results=True)
    bits = max(out)
    if bits >= NONFINITE_BITS:
        raise_nonfinite(flat if logical is None else logical, name=name)
    return float(np.array([bits], np.uint32).view(np.float32)[0])


def _layout(x: np.ndarray) -> str | None:
    """Which kernel reads ``x``'s memory: NHWC (also for H*W == 1, e.g. Linear inputs, where
    both layouts are the same memory and NHWC vectorises along C), NCHW, or None (copy)."""
    if x.transpose(0, 2, 3, 1).flags.c_contiguous and (x.shape[2] * x.shape[3] == 1 or not x.flags.c_contiguous):
        return "nhwc"
    if x.flags.c_contiguous:
        return "nchw"
    return None


def quantize_padded(x: np.ndarray, pad, fmt: DfpFormat = DFP16, *, seed: int = 0,
                    name: str = "tensor", threads: int | None = None,
                    target: CpuTarget | None = None, channel_range: bool = False):
    """:func:`quantize_pack` into a zero-padded NHWC buffer, as a stride-1 conv pass reads its
    input: ``pad`` = (top, bottom, left, right). Returns ``(q, buf)``: ``buf`` int16 (N,
    top+H+bottom, left+W+right, Cp), zero outside the image and in the pad channel, and ``q``
    the DfpTensor whose mantissa is the (N, C, H, W) view of the image inside it. Same bits
    and errors as :func:`quantize_pack`; an NHWC float32 ``x`` is quantized straight into
    ``buf`` (one pass), other layouts are quantized, then copied in (with no padding:
    :func:`quantize_pack`'s own buffer is ``buf``, no copy). ``channel_range=True``
    returns ``(q, buf, (hi, lo))`` with the per-channel max and min (int64 (C,)) of the
    mantissas (those of :func:`channel_range_of`), taken by the NHWC kernel as it writes
    them: exact mode's bound for a conv reading ``buf`` without another pass over it."""
    try:
        top, bottom, left, right = (int(v) for v in pad)
    except (TypeError, ValueError):
        raise DfpError(f"{name}: pad must be (top, bottom, left, right), got {pad!r}") from None
    x = np.asarray(x)
    if x.ndim != 4 or min(top, bottom, left, right) < 0:
        raise DfpError(f"{name}: quantize_padded expects (N, C, H, W) and a padding >= 0, got "
                       f"shape {x.shape}, pad {pad!r}")
    N, C, H, W = x.shape
    Cp = C + C % 2
    Hp, Wp = top + H + bottom, left + W + right
    if x.dtype == np.float32 and x.size and _layout(x) == "nhwc" and 16 * H * W < 2 ** 32:
        # one pass straight into the padded buffer; the kernel keeps the range as it writes
        buf, inner = zero_bordered(N, H, W, Cp, (top, bottom, left, right))
        q, rng = _quantize_nhwc(x, fmt, seed, name, threads, target, buf,
                                (W, Wp - W, Hp * Wp, top * Wp + left), channel_range)
        q = DfpTensor(_logical(inner, C), q.exponent, fmt)
    else:
        # another layout: quantize_pack's dense buffer, copied in when there is padding
        dense = quantize_pack(x, fmt, seed=seed, name=name, threads=threads, target=target)
        if top == bottom == left == right == 0:
            q, buf = dense, nhwc_buffer(dense)
        else:
            buf, inner = zero_bordered(N, H, W, Cp, (top, bottom, left, right))
            copy_pixels(inner, nhwc_buffer(dense))
            q = DfpTensor(_logical(inner, C), dense.exponent, fmt)
        rng = channel_range_of(dense.mantissa) if channel_range else None
    return (q, buf, rng) if channel_range else (q, buf)


def quantize_pack(x: np.ndarray, fmt: DfpFormat = DFP16, *, seed: int = 0, name: str = "tensor",
                  threads: int | None = None, target: CpuTarget | None = None,
                  out: np.ndarray | None = None) -> DfpTensor:
    """Quantize ``x`` to DFP and pack it for the conv kernels.

    ``x``: float32 (N, C, H, W), memory NCHW or NHWC (channels_last), or (N, C). Returns a
    :class:`DfpTensor` whose ``mantissa`` is the logical (N, C, H, W) (or (N, C)) int16 view
    ``buf[..., :C].transpose(0, 3, 1, 2)`` of an NHWC buffer ``buf`` (N, H, W, Cp) with
    ``Cp = C + C % 2`` (see :func:`nhwc_buffer`). Bits equal ``dfp.quantize(x, fmt, seed=seed)``
    for any ``threads``. Raises :class:`DfpError` on NaN/Inf (naming ``name``, the count and
    first index), on other ranks, or when the tensor exceeds the exponent range.
    ``out``: an int16 C-contiguous (N, H, W, Cp) buffer to write into (saves the allocation
    and its page faults when the caller reuses buffers); DfpError if it does not fit.
    """
    if not isinstance(fmt, DfpFormat):
        raise DfpError(f"fmt must be a DfpFormat, got {type(fmt).__name__}")
    check_seed(seed)
    x = np.asarray(x)
    if x.ndim == 2:
        out4 = out
        if isinstance(out, np.ndarray) and out.ndim == 2 and out.flags.c_contiguous:
            out4 = out.reshape(out.shape[0], 1, 1, out.shape[1])  # a view: the kernel writes into out
        q = quantize_pack(x.reshape(*x.shape, 1, 1), fmt, seed=seed, name=name, threads=threads, target=target,
                          out=out4)
        return DfpTensor(q.mantissa[:, :, 0, 0], q.exponent, q.fmt)
    if x.ndim != 4:
        raise DfpError(f"{name}: quantize_pack expects (N, C, H, W) or (N, C), got shape {x.shape}")
    # The stochastic hash steps lane indices by up to 16*H*W inside 32 bits (see the template).
    layout = _layout(x) if x.dtype == np.float32 and 16 * x.shape[2] * x.shape[3] < 2 ** 32 else None
    N, C, H, W = x.shape
    Cp = C + C % 2
    if out is not None and (not isinstance(out, np.ndarray) or out.dtype != np.int16
                            or out.shape != (N, H, W, Cp) or not out.flags.c_contiguous
                            or not out.flags.writeable):
        raise DfpError(f"{name}: out must be a writeable C-contiguous int16 array of shape "
                       f"{(N, H, W, Cp)}, got {getattr(out, 'dtype', type(out))} {getattr(out, 'shape', '')}")
    if layout is None or x.size == 0:
        q = quantize(x, fmt, seed=seed, name=name)
        buf = _pad_nhwc(q.mantissa, out)
        return DfpTensor(_logical(buf, C), q.exponent, fmt)
    buf = empty_aligned((N, H, W, Cp)) if out is None else out
    if layout == "nhwc":
        return _quantize_nhwc(x, fmt, seed, name, threads, target, buf, (H * W, 0, H * W, 0))[0]
    target = target or host_target()
    E = exponent_for(max_abs(x, name=name, threads=threads, target=target, logical=x), fmt, name)
    s1, s2 = scale_factors(E)
    seedmix = seed_mix(seed)
    fn = _kernel("pack_nchw", fmt, target)
    lanes = target.vector_bits // 32
    pad = _nchw_pad(x, lanes)
    nblk = -(-(H * W + pad) // lanes)  # blocks of `lanes` pixels per image
    tile = max(1, min(nblk, NCHW_TILE_BYTES // (lanes * Cp * 2)))
    items = N * (-(-nblk // tile))
    nt = _split_threads(threads, items, C * lanes * tile)
    _threads.parallel_call(fn, (data_ptr(x), data_ptr(buf), C, H * W, s1, s2, seedmix, tile, pad),
                           2, items, nt)
    return DfpTensor(_logical(buf, C), E, fmt)


def _quantize_nhwc(x, fmt, seed, name, threads, target, buf, rows, want_range: bool = False):
    """Pass 1 (max |x|) and pass 2 (quantize) of an NHWC float32 ``x`` (N, C, H, W) into
    ``buf``, pixel rows placed by ``rows`` = (W, row_skip, img_rows, ybase) (see
    ``templates/quantize_pack.ll.j2``; dense: (H*W, 0, H*W, 0)). Returns
    ``(q, range)``: the DfpTensor of the dense layout's view (callers with a padded ``buf``
    make their own) and, with ``want_range``, ``(hi, lo)``: the per-channel max and min of
    the mantissas written (int64 (C,) each), kept by pass 2 as it writes them (no further
    read of ``buf``); None without."""
    N, C, H, W = x.shape
    target = target or host_target()
    mem = x.transpose(0, 2, 3, 1)
    E = exponent_for(max_abs(mem, name=name, threads=threads, target=target, logical=x), fmt, name)
    s1, s2 = scale_factors(E)
    seedmix = seed_mix(seed)
    fn = _kernel("pack_nhwc", fmt, target)
    items = N * H * W
    nt = _split_threads(threads, items, C)
    args = (data_ptr(mem), data_ptr(buf), C, H * W, s1, s2, seedmix, *rows)
    q = DfpTensor(_logical(buf, C), E, fmt)
    if not want_range:
        _threads.parallel_call(fn, args + (None,), 2, items, nt)
        return q, None
    lanes = target.vector_bits // 32
    cr = -(-(C + C % 2) // lanes) * lanes
    # one (max, min) row pair per thread range; min / max are exact in any order, so the
    # combined range does not depend on the split
    part = np.empty((_threads.range_count(items, nt), 2, cr), np.int16)
    # Each range's kernel call initialises its rows, but an OpenMP team smaller than asked
    # (OMP_THREAD_LIMIT, OMP_DYNAMIC) runs fewer ranges and never writes the others' rows:
    # start every row at the identity of max / min so that unwritten rows change nothing.
    part[:, 0] = np.iinfo(np.int16).min
    part[:, 1] = np.iinfo(np.int16).max
    _threads.parallel_call(fn, args + (data_ptr(part),), 2, items, nt,
                           per_thread=(len(args) + 2, part.strides[0]))
    return q, (part[:, 0, :C].max(axis=0).astype(np.int64), part[:, 1, :C].min(axis=0).astype(np.int64))


def channel_range_of(m: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel (axis 1) ``(max, min)`` of an NCHW int16 array ``m`` (any strides), int64
    (C,) each (an empty array gives zeros): exact mode's activation bound
    (``dfpgen.plan_exact``)."""
    c = m.shape[1]
    if m.size == 0:
        return np.zeros(c, np.int64), np.zeros(c, np.int64)
    v = m.transpose(0, 2, 3, 1)
    if not v.flags.c_contiguous:  # not channels-last memory: numpy's general reduction
        return m.max(axis=(0, 2, 3)).astype(np.int64), m.min(axis=(0, 2, 3)).astype(np.int64)
    # Channels-last: reduce rows of ~4096 values (many pixels at once), then fold the pixels;
    # long contiguous rows keep numpy's reduction at memory speed (6x the (0, 2, 3) form).
    flat = v.reshape(-1, c)
    rows = max(1, 4096 // c)
    full = flat.shape[0] // rows * rows
    hi = lo = None  # at least one of the two parts below is non-empty (m is not)
    if full:
        wide = flat[:full].reshape(-1, rows * c)
        hi = wide.max(axis=0).reshape(rows, c).max(axis=0)
        lo = wide.min(axis=0).reshape(rows, c).min(axis=0)
    if full < flat.shape[0]:
        rest_hi, rest_lo = flat[full:].max(axis=0), flat[full:].min(axis=0)
        hi = rest_hi if hi is None else np.maximum(hi, rest_hi)
        lo = rest_lo if lo is None else np.minimum(lo, rest_lo)
    return hi.astype(np.int64), lo.astype(np.int64)


def _nchw_pad(x: np.ndarray, lanes: int) -> int:
    """Pixels the NCHW kernel's block grid is shifted by so that full blocks load from 64-byte
    aligned addresses: possible when every channel plane has the same alignment (H*W*4 a
    multiple of 64), as for 56x56 or 28x28; 0 otherwise."""
    N, C, H, W = x.shape
    vec_bytes = 4 * lanes
    if (H * W * 4) % vec_bytes or data_ptr(x) % 4:
        return 0
    return (data_ptr(x) % vec_bytes) // 4


def _logical(buf: np.ndarray, C: int) -> np.ndarray:
    return buf[..., :C].transpose(0, 3, 1, 2)


def _pad_nhwc(m: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    N, C, H, W = m.shape
    buf = np.zeros((N, H, W, C + C % 2), np.int16) if out is None else out
    copy_pixels(buf[..., :C], m.transpose(0, 2, 3, 1))
    buf[..., C:] = 0
    return buf


def copy_pixels(dst: np.ndarray, src: np.ndarray) -> None:
    """``dst[...] = src`` for NHWC-like arrays of the same shape and dtype whose last axis
    (channels) is contiguous in both: each pixel's channels move as one element of a void
    dtype, so numpy's strided copy runs per pixel instead of per channel value (2.3x faster
    for 16 int16 channels at stride 2, the phase images of a strided conv). Same bytes;
    other arrays take the plain assignment."""
    if (dst.shape == src.shape and dst.dtype == src.dtype and dst.ndim and dst.shape[-1] > 1
            and dst.strides[-1] == src.strides[-1] == dst.itemsize and dst.size):
        px = np.dtype((np.void, dst.shape[-1] * dst.itemsize))
        dst.view(px)[..., 0] = src.view(px)[..., 0]
    else:
        dst[...] = src


def data_ptr(a: np.ndarray) -> int:
    """The address of ``a``'s first element, as ``a.ctypes.data`` gives it, about 3x faster
    for the writable contiguous arrays the kernels take (a dozen per layer and pass: ~2 us
    each adds up on small layers); anything else goes through ``a.ctypes``."""
    f = a.flags
    if f.c_contiguous and f.writeable and a.size and a.dtype.kind in "biuf":
        return ctypes.addressof(ctypes.c_char.from_buffer(a))
    # read-only, strided, empty, or a dtype the buffer protocol refuses (datetime64): a
    # failed from_buffer would cost more than this
    return a.ctypes.data


def empty_aligned(shape: tuple[int, ...], dtype=np.int16, align: int = 64) -> np.ndarray:
    """An uninitialised C-contiguous array whose data starts on an ``align``-byte boundary
    (numpy's large allocations start 16 bytes past a page: every 64-byte vector store of
    the NCHW kernel would then split two cache lines)."""
    dtype = np.dtype(dtype)
    nbytes = math.prod(shape) * dtype.itemsize
    raw = np.empty(nbytes + align, np.uint8)
    off = (-data_ptr(raw)) % align
    return raw[off:off + nbytes].view(dtype).reshape(shape)


def aligned_zeros(shape: tuple[int, ...], dtype=np.int16, align: int = 64) -> np.ndarray:
    """:func:`empty_aligned`, zero-filled (fresh pages from the allocator come zeroed, so
    this costs no pass of its own for large arrays)."""
    dtype = np.dtype(dtype)
    nbytes = math.prod(shape) * dtype.itemsize
    raw = np.zeros(nbytes + align, np.uint8)
    off = (-data_ptr(raw)) % align
    return raw[off:off + nbytes].view(dtype).reshape(shape)


def zero_bordered(n: int, h: int, w: int, c: int, pad) -> tuple[np.ndarray, np.ndarray]:
    """``(buf, inner)``: a 64-byte aligned int16 (n, top+h+bottom, left+w+right, c) NHWC
    buffer whose padding ``pad`` = (top, bottom, left, right) is zero, and the (n, h, w, c)
    view of the image inside it, left uninitialised for the caller (a kernel or a copy) to
    fill: zeroing only the border spares a pass over the image."""
    top, bottom, left, right = pad
    buf = empty_aligned((n, top + h + bottom, left + w + right, c))
    buf[:, :top] = 0
    buf[:, top + h:] = 0
    buf[:, top:top + h, :left] = 0
    buf[:, top:top + h, left + w:] = 0
    return buf, buf[:, top:top + h, left:left + w]


def _packed_view(m: np.ndarray) -> np.ndarray | None:
    """(N, H, W, Cp) view of the padded NHWC buffer that the (N, C, H, W) int16 ``m`` is a
    window of, or None when ``m``'s strides or its memory owner say it is not one."""
    N, C, H, W = m.shape
    Cp = C + C % 2
    want = (H * W * Cp * 2, 2, W * Cp * 2, Cp * 2)
    if m.dtype != np.int16 or m.size == 0 or any(n > 1 and st != w for st, w, n in zip(m.strides, want, m.shape)):
        return None
    owner = m
    while isinstance(owner.base, np.ndarray):
        owner = owner.base
    lo, hi = byte_bounds(owner)
    start = data_ptr(m)
    if not (lo <= start and start + N * H * W * Cp * 2 <= hi):
        return None
    v = as_strided(m, (N, H, W, Cp), (want[0], want[2], want[3], 2), writeable=m.flags.writeable)
    if Cp > C and v[..., C].any():
        # A channel slice of an even-channel NHWC array: its "pad" channel holds data, which
        # the kernels would pair with channel C-1 (quantize_pack's pad channel is zero).
        return None
    return v


def nhwc_buffer(q: DfpTensor) -> np.ndarray:
    """The NHWC int16 buffer (N, H, W, Cp) (or (N, Cp) for a 2-D tensor) behind ``q``, with
    ``Cp = C + C % 2``: a view without copy when ``q.mantissa`` is a window of such a buffer
    (as :func:`quantize_pack` returns; its pad channel is zero), else a packed copy with a
    zero pad channel, for any DfpTensor of rank 2 or 4. Raises :class:`DfpError` for other ranks."""
    m = q.mantissa
    if m.ndim == 2:
        v = _packed_view(m[:, :, None, None])
        return v[:, 0, 0, :] if v is not None else _pad_nhwc(m[:, :, None, None])[:, 0, 0, :]
    if m.ndim != 4:
        raise DfpError(f"nhwc_buffer expects a rank-4 (N, C, H, W) or rank-2 tensor, got shape {m.shape}")
    v = _packed_view(m)
    return v if v is not None else _pad_nhwc(m)
