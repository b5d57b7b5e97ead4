"""Forward and backward-data execution: buffers, weight packing, kernel calls over threads.

Layouts (docs/ARCHITECTURE.md §3): activations NHWC INT16 with the reduction channels padded to even and
the spatial padding materialised as zeros (the kernel then needs no boundary tests; a
strided forward pass reads phase images instead, see ``plan.fwd_subconv``); weights packed
per call from the KRSC buffer as ``[out block][tap][channel pair][k_vecs * lanes][2]`` so one
vector load holds ``lanes`` output channels x one input-channel pair (backward-data: C is
the output and K the reduction); output FP32 NHWC with the channels padded to the block
(callers get a view without the padding).

The kernel ABI (``_PROTO``): ``(x, w, y, bias, scale, begin, end, rows, sat, flags)`` where
work items ``[begin, end)`` enumerate (output-channel block, image row) as
``block * rows + row``, ``sat`` (two int64) receives, in fast mode, the lanes found saturated
at a flush and an upper bound on the output partials that saturated at any pair step (see
:class:`RunInfo`), and ``flags`` (uint8, one per tap of the kernel) marks the taps that end a
flush group: the flush interval is a run-time argument, so one kernel per reduction block
serves every interval exact mode proves (the plan's own ``flush_taps`` is only the default
table).

Every work item (output-channel block x output row) writes its own part of the output and
sums its reduction in one fixed order, so any thread count gives the same bits.
"""
from __future__ import annotations

import ctypes
import time
from dataclasses import asdict, replace
from functools import lru_cache

import numpy as np

from .errors import DfpError
from .kernels import load_kernel
from .pack import aligned_zeros, copy_pixels, data_ptr, empty_aligned, nhwc_buffer, zero_bordered
from . import passes
from .plan import KernelPlan, SubConv
from .render import render
from .runinfo import RunInfo
from .threads import parallel_call, range_count, threads_for
from .tuning import TuningConfig

KERNEL_ABI = 3
TEMPLATE = passes.get("fwd").template
_PROTO = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
                          ctypes.c_float, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64,
                          ctypes.c_void_p, ctypes.c_void_p)
SCALE_EXP_RANGE = (-149, 127)  # 2**e exactly representable in float32 (subnormals included)
FMA_MIN_SCALE_EXP = -126       # normal scale: (float)partial * 2**e is exact, FMA == mul + add


class SubKernel:
    """One loaded kernel: its sub-convolution, plan and ctypes entry point."""

    def __init__(self, sub: SubConv, plan: KernelPlan, target, spec_s: int, transposed: bool,
                 identity: dict | None = None):
        self.sub, self.plan, self.spec_s, self.transposed = sub, plan, spec_s, transposed
        # identity: the pass, spec (batch 1: a kernel serves any batch), config and mode it
        # was built for, kept in the cache entry for `dfpgen cache ls --verify`
        key = {"abi": KERNEL_ABI, "template": TEMPLATE, "sub": asdict(sub),
               "plan": plan.describe(), **(identity or {})}
        self.loaded = load_kernel(plan.symbol, key, lambda: render(TEMPLATE, p=plan), target)
        self.fn = _PROTO(self.loaded.address)
        self._flags = {0: np.array([t.flush for t in plan.taps], np.uint8)}
        # what the packed weight layout depends on (PackedWeight.packed's key)
        self.pack_key = (transposed, plan.kvl, plan.out_pad, plan.red_pairs, plan.tap_pairs, spec_s,
                         tuple((t.r, t.s) for t in sub.taps))

    def flags(self, flush_taps: int = 0) -> np.ndarray:
        """uint8 per tap: 1 where the tap ends a flush group of ``flush_taps`` taps in the
        reference order ``r*S + s`` (0: the plan's own groups)."""
        hit = self._flags.get(flush_taps)
        if hit is None:
            taps = self.sub.taps
            grp = [(t.r * self.spec_s + t.s) // flush_taps for t in taps]
            hit = np.array([i == len(taps) - 1 or grp[i + 1] != grp[i] for i in range(len(taps))],
                           np.uint8)
            self._flags[flush_taps] = hit
        return hit

    def pack_weights(self, w_ktc: np.ndarray) -> np.ndarray:
        """Weights as the KRSC buffer ``w_ktc`` int16 (K, R*S, C_even) -> the kernel's
        ``(out blocks, taps, red pairs, kvl, 2)``: forward OUT = K, RED = C; backward-data
        (``transposed``) OUT = C, RED = K."""
        p, sub = self.plan, self.sub
        ntaps = len(sub.taps)
        tap_idx = [t.r * self.spec_s + t.s for t in sub.taps]
        a = w_ktc if tap_idx == list(range(w_ktc.shape[1])) else w_ktc[:, tap_idx]
        if self.transposed:
            k, _, cp = a.shape
            if (k, cp) != (2 * p.red_pairs, p.out_pad):
                full = np.zeros((2 * p.red_pairs, ntaps, p.out_pad), np.int16)
                full[:k, :, :cp] = a
                a = full
            # interleave K rows 2k, 2k+1 (two strided copies with long inner loops), then move
            # the pairs as int32 with kvl contiguous channels innermost (4x one 2-byte copy)
            pairs = np.empty((p.red_pairs, ntaps, p.out_pad, 2), np.int16)
            pairs[..., 0] = a[0::2]
            pairs[..., 1] = a[1::2]
            p32 = pairs.view(np.int32).reshape(p.red_pairs, ntaps, p.out_blocks, p.kvl)
            packed = empty_aligned((p.out_blocks, ntaps, p.tap_pairs, p.kvl), np.int32)
            packed[:, :, :p.red_pairs] = p32.transpose(2, 1, 0, 3)
            return packed.view(np.int16).reshape(p.out_blocks, ntaps, p.tap_pairs, p.kvl, 2)
        out, _, redp = a.shape
        if (out, redp) != (p.out_pad, 2 * p.red_pairs):
            full = np.zeros((p.out_pad, ntaps, 2 * p.red_pairs), np.int16)
            full[:out, :, :redp] = a
            a = full
        # each INT16 pair is one int32, so the one transposing copy moves 4-byte elements and
        # its inner loop runs over kvl output channels
        w32 = np.ascontiguousarray(a).view(np.int32)
        packed = empty_aligned((p.out_blocks, ntaps, p.tap_pairs, p.kvl), np.int32)
        packed[:, :, :p.red_pairs] = w32.reshape(p.out_blocks, p.kvl, ntaps, p.red_pairs).transpose(0, 2, 3, 1)
        return packed.view(np.int16).reshape(p.out_blocks, ntaps, p.tap_pairs, p.kvl, 2)

    def run(self, xbuf: np.ndarray, wpack: np.ndarray, ybuf: np.ndarray, bias: np.ndarray | None,
            scale: float, batch: int, threads: int, flush_taps: int = 0) -> tuple[int, int]:
        """Run every work item, flushing after every ``flush_taps`` taps (0: the plan's
        interval); returns (lanes saturated at a flush, bound on partials that saturated at
        any step), both 0 in exact mode."""
        rows = batch * self.plan.po
        total = rows * self.plan.out_blocks
        if total == 0:
            return 0, 0
        b = bias if bias is not None else ybuf
        # one (saturated, possibly) counter pair per range (argument 8), summed after
        sat = np.zeros((range_count(total, threads), 2), np.int64)
        args = (data_ptr(xbuf), data_ptr(wpack), data_ptr(ybuf), data_ptr(b),
                ctypes.c_float(scale), rows, data_ptr(sat), data_ptr(self.flags(flush_taps)))
        parallel_call(self.fn, args, 5, total, threads, per_thread=(8, sat.strides[0]))
        return int(sat[:, 0].sum()), int(sat[:, 1].sum())


class ConvKernel:
    """The kernels of one forward or backward-data pass (one, or one per output phase), as
    its registry record plans them (``dfpgen.passes.ConvPass.plan_pass``)."""

    def __init__(self, spec, config: TuningConfig, target, mode: str, bias: bool = False,
                 fma: bool = True):
        self.spec, self.config, self.target, self.mode = spec, config, target, mode
        self.configs: dict[int, TuningConfig] = {}  # config with a run-time flush interval
        pp = passes.of(spec).plan_pass(spec, config, target, mode, has_bias=bias, fma=fma)
        self.pad = pp.pad
        identity = {"pass": spec.pass_kind, "spec": replace(spec, N=1).geometry(),
                    "config": config.to_dict(), "mode": mode}
        self.parts = [SubKernel(sub, plan, target, spec.S, pp.transposed, identity) for sub, plan in pp.phases]
        self.zero_fill = pp.zero_fill
        self.flush_taps = pp.flush_taps

    @property
    def symbols(self) -> tuple[str, ...]:
        return tuple(k.plan.symbol for k in self.parts)


# ----------------------------------------------------------------------------- buffers
def padded_nhwc(m: np.ndarray, pad: tuple[int, int, int, int], cpad: int) -> np.ndarray:
    """NCHW (any strides) int16 mantissas -> contiguous ``(N, top+H+bottom, left+W+right, cpad)``
    with zeros in the padding and the extra channels."""
    n, c, h, w = m.shape
    # 64-byte aligned, as every buffer the kernels read: numpy's large arrays start 16 bytes
    # past a page, which splits the weight vectors' loads across cache lines (measured on
    # Zen 5, res3_branch2b forward, one thread: 99 -> 113 GMAC/s with X and W aligned)
    buf, inner = zero_bordered(n, h, w, cpad, pad)
    copy_pixels(inner[..., :c], m.transpose(0, 2, 3, 1))
    if cpad > c:
        inner[..., c:] = 0
    return buf


def phase_buffer(m: np.ndarray, spec, sub: SubConv, cpad: int) -> np.ndarray:
    """The strided forward's input buffer (see ``plan.fwd_subconv``): for each phase (a, b)
    in ``sub.phases``, the padded image's pixels (a + u_h k, b + u_w l), zero outside X."""
    n, c, h, w = m.shape
    (uh, uw), (ph, pw) = spec.stride, spec.padding
    hph = sub.in_h // len(sub.phases)
    buf = aligned_zeros((n, len(sub.phases), hph, sub.in_w, cpad), np.int16)
    src = m.transpose(0, 2, 3, 1)
    for i, (a, b) in enumerate(sub.phases):
        # phase row k holds padded row a + uh k = input row a + uh k - ph
        k0 = max(0, -(-(ph - a) // uh)); k1 = min(hph, (h - 1 + ph - a) // uh + 1)
        l0 = max(0, -(-(pw - b) // uw)); l1 = min(sub.in_w, (w - 1 + pw - b) // uw + 1)
        if k1 > k0 and l1 > l0:
            copy_pixels(buf[:, i, k0:k1, l0:l1, :c],
                        src[:, a + uh * k0 - ph::uh, b + uw * l0 - pw::uw][:, :k1 - k0, :l1 - l0])
    return buf.reshape(n, sub.in_h, sub.in_w, cpad)


def _activation_buffer(q, pad, cpad: int) -> np.ndarray:
    """The kernel's input buffer for DfpTensor ``q``; reuses ``dfpgen.pack``'s NHWC buffer
    without a copy when no spatial padding is needed and the channel padding agrees."""
    if not any(pad):
        buf = nhwc_buffer(q)
        if buf.shape[-1] == cpad and buf.flags.c_contiguous:
            return buf
    return padded_nhwc(q.mantissa, pad, cpad)


def check_scale(scale_exp: int, what: str) -> float:
    lo, hi = SCALE_EXP_RANGE
    if not lo <= scale_exp <= hi:
        raise DfpError(f"{what}: the product scale 2**{scale_exp} (sum of the operands' shared "
                       f"exponents) is outside float32's range 2**{lo}..2**{hi}; rescale the operands")
    return float(2.0 ** scale_exp)


@lru_cache(maxsize=4096)
def _config_dict(cfg: TuningConfig) -> dict:
    return cfg.to_dict()


def run_info(kernel: ConvKernel, saturated: int, threads: int, scale_exp: int,
             possibly_saturated: int = 0, flush_taps: int = 0, kernel_seconds: float = 0.0) -> RunInfo:
    cfg = kernel.config
    ft = flush_taps or kernel.flush_taps
    if ft != kernel.flush_taps:
        cfg = kernel.configs.get(ft)
        if cfg is None:
            cfg = kernel.configs[ft] = kernel.config.replace(flush=kernel.config.c_block * ft)
    return RunInfo(pass_kind=kernel.spec.pass_kind, overflow=kernel.mode,
                   flush=cfg.c_block * ft, saturated=saturated,
                   possibly_saturated=possibly_saturated,
                   tier=kernel.target.tier, symbol=kernel.symbols[0] if kernel.symbols else "",
                   symbols=kernel.symbols, config=dict(_config_dict(cfg)), c_block=cfg.c_block,
                   flush_taps=ft, threads=threads, scale_exp=scale_exp, kernel_seconds=kernel_seconds)


def weights_krsc(wq) -> np.ndarray:
    """The weights as int16 (K, R*S, C_even), input channels innermost: the KRSC buffer
    behind a ``dfpgen.pack.quantize_pack`` result (no copy), else a packed copy. Both passes
    pack from it (:meth:`SubKernel.pack_weights`)."""
    m = wq.mantissa
    buf = nhwc_buffer(wq)
    return buf.reshape(m.shape[0], m.shape[2] * m.shape[3], buf.shape[-1])


class PackedWeight:
    """A DFP16 KCRS weight with everything the passes derive from it, computed on first use
    and kept: the KRSC buffer, each kernel family's packed layout (forward and the
    transposed one of backward-data) and the exact-mode bound operand. Reusing one object
    while the weight is unchanged (the runtime keys it on the parameter's version counter)
    gives the same bits as passing the DfpTensor, without re-quantizing or re-packing.

    ``q``: a 4-D :class:`dfpgen.DfpTensor` (K, C, R, S). Raises :class:`DfpError` for other
    ranks. ``shape``, ``exponent``, ``fmt``, ``mantissa`` mirror the DfpTensor's."""

    def __init__(self, q):
        if isinstance(q, PackedWeight):
            q = q.q
        if q.mantissa.ndim != 4:
            raise DfpError(f"PackedWeight: expected 4-D KCRS weights, got shape {q.shape}")
        self.q = q
        self.krsc = weights_krsc(q)
        self._packed: dict[tuple, np.ndarray] = {}
        self._bound: dict[str, np.ndarray] = {}
        self._has_int16_min: bool | None = None

    shape = property(lambda self: self.q.shape)
    exponent = property(lambda self: self.q.exponent)
    fmt = property(lambda self: self.q.fmt)
    mantissa = property(lambda self: self.q.mantissa)

    @property
    def has_int16_min(self) -> bool:
        """Whether a mantissa is -32768 (exact mode refuses it)."""
        if self._has_int16_min is None:
            k = self.krsc
            self._has_int16_min = bool(k.size) and int(k.min()) == np.iinfo(np.int16).min
        return self._has_int16_min

    def packed(self, part: "SubKernel") -> np.ndarray:
        """``part``'s packed weights (:meth:`SubKernel.pack_weights`), packed once per layout:
        every flush schedule of a register blocking shares one."""
        key = part.pack_key
        hit = self._packed.get(key)
        if hit is None:
            hit = self._packed[key] = part.pack_weights(self.krsc)
        return hit

    def bound_operand(self, spec) -> np.ndarray:
        """W (signed int16) as a (R*S, OUT, RED) view of the KRSC buffer for
        ``plan_exact.exact_schedule`` (forward: OUT = K, RED = C; backward-data: OUT = C,
        RED = K): no copy (the schedule's first multiply converts and relayouts it)."""
        hit = self._bound.get(spec.pass_kind)
        if hit is None:
            krsc = self.krsc[:, :, :spec.C]
            hit = self._bound[spec.pass_kind] = krsc.transpose(passes.of(spec).weight_bound_axes)
        return hit


def execute(kernel: ConvKernel, act, wq, bias: np.ndarray | None, scale_exp: int,
            threads: int | None, flush_taps: int = 0, padded=None) -> tuple[np.ndarray, RunInfo]:
    """Run ``kernel`` on activation DfpTensor ``act`` (X NCHW forward, dY NKPQ backward-data) and
    weight DfpTensor or :class:`PackedWeight` ``wq`` (KCRS), flushing after every
    ``flush_taps`` taps of a reduction block (0: the kernel's planned interval). ``padded``:
    optional ``(buffer, pad)``, ``act``'s mantissas already zero-padded in NHWC (see
    ``dfpgen.conv.conv2d``'s ``x_buffer``), read in place when they are the kernel's layout.
    Returns (FP32 NHWC output view (N, OH, OW, OUT), RunInfo)."""
    spec = kernel.spec
    if not (threads or kernel.config.threads):
        # the default count, capped so that each thread gets enough work to pay for its
        # hand-off (a small layer runs on the calling thread)
        threads = threads_for(spec.N * spec.P * spec.Q * spec.C * spec.K * spec.R * spec.S)
    threads = threads or kernel.config.threads
    scale = check_scale(scale_exp, spec.pass_kind)
    first = kernel.parts[0].plan if kernel.parts else None
    n, out, oh, ow = spec.result_shape
    if first is None:  # every output pixel meets no tap (e.g. 1x1, stride > 1 phases only)
        return np.zeros((n, oh, ow, out), np.float32), run_info(kernel, 0, threads, scale_exp,
                                                                flush_taps=flush_taps)
    if kernel.parts[0].sub.phases:
        xbuf = phase_buffer(act.mantissa, spec, kernel.parts[0].sub, 2 * first.red_pairs)
    elif (padded is not None and padded[1] == kernel.pad and padded[0].shape[-1] == 2 * first.red_pairs
          and padded[0].flags.c_contiguous):
        xbuf = padded[0]
    else:
        xbuf = _activation_buffer(act, kernel.pad, 2 * first.red_pairs)
    ybuf = (aligned_zeros if kernel.zero_fill else empty_aligned)((n, oh, ow, first.out_pad), np.float32)
    bpad = None
    if bias is not None:
        bpad = np.zeros(first.out_pad, np.float32)
        bpad[:out] = bias
    saturated = possibly = 0
    if isinstance(wq, PackedWeight):
        packs = [wq.packed(part) for part in kernel.parts]
    else:
        w_ktc = weights_krsc(wq)
        packs = [part.pack_weights(w_ktc) for part in kernel.parts]
    t0 = time.perf_counter()
    for part, wpack in zip(kernel.parts, packs):
        seen, bound = part.run(xbuf, wpack, ybuf, bpad, scale, n, threads, flush_taps)
        saturated += seen
        possibly += bound
    spent = time.perf_counter() - t0
    return ybuf[..., :out], run_info(kernel, saturated, threads, scale_exp, possibly, flush_taps, spent)
