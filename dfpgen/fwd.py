"""Forward and backward-data execution: buffers, weight packing, kernel calls over threads.

Layouts (DESIGN §3): activations NHWC INT16 with the reduction channels padded to even and
the spatial padding materialised as zeros (the kernel then needs no boundary tests); weights
packed per call as ``[out block][tap][channel pair][k_vecs * lanes][2]`` so one vector load
holds ``lanes`` output channels x one input-channel pair; output FP32 NHWC with the channels
padded to the block (callers get a view without the padding).

Every work item (output-channel block x output row) writes its own part of the output and
sums its reduction in one fixed order, so any thread count gives the same bits.
"""
from __future__ import annotations

import ctypes
import threading
from dataclasses import asdict

import numpy as np

from .errors import DfpError
from .kernels import load_kernel
from .plan import KernelPlan, SubConv, plan_fwd
from .plan_bwd import plan_bwd_data
from .render import render
from .runinfo import RunInfo
from .threads import num_threads, parallel_for
from .tuning import TuningConfig

KERNEL_ABI = 1
TEMPLATE = "conv_fwd.ll.j2"
_PROTO = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
                          ctypes.c_float, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64,
                          ctypes.c_void_p)
SCALE_EXP_RANGE = (-149, 127)  # 2**e exactly representable in float32 (subnormals included)
FMA_MIN_SCALE_EXP = -126       # normal scale: (float)partial * 2**e is exact, FMA == mul + add


class SubKernel:
    """One loaded kernel: its sub-convolution, plan and ctypes entry point."""

    def __init__(self, sub: SubConv, plan: KernelPlan, target):
        self.sub, self.plan = sub, plan
        key = {"abi": KERNEL_ABI, "template": TEMPLATE, "sub": asdict(sub),
               "plan": plan.describe()}
        self.loaded = load_kernel(plan.symbol, key, lambda: render(TEMPLATE, p=plan), target)
        self.fn = _PROTO(self.loaded.address)

    def pack_weights(self, wt: np.ndarray) -> np.ndarray:
        """``wt`` (OUT, RED, R, S) integer -> int16 ``(out blocks, taps, red pairs, kvl, 2)``."""
        p, sub = self.plan, self.sub
        out, red, r, s = wt.shape
        ntaps = len(sub.taps)
        w3 = wt.reshape(out, red, r * s) if wt.flags.c_contiguous else np.ascontiguousarray(wt).reshape(out, red, r * s)
        tap_idx = [t.r * s + t.s for t in sub.taps]
        if tap_idx != list(range(r * s)):
            w3 = w3[:, :, tap_idx]
        # Channels innermost first (OUT, T, RED), so each INT16 pair is one int32; then one
        # copy whose inner loop runs over kvl output channels (4x faster than pair-wise).
        if (out, red) != (p.out_pad, 2 * p.red_pairs):
            a = np.zeros((p.out_pad, ntaps, 2 * p.red_pairs), np.int16)
            a[:out, :, :red] = w3.transpose(0, 2, 1)
        else:
            a = np.ascontiguousarray(w3.transpose(0, 2, 1))
        w32 = a.view(np.int32)
        packed = np.empty((p.out_blocks, ntaps, p.red_pairs, p.kvl), np.int32)
        packed[...] = w32.reshape(p.out_blocks, p.kvl, ntaps, p.red_pairs).transpose(0, 2, 3, 1)
        return packed.view(np.int16).reshape(p.out_blocks, ntaps, p.red_pairs, p.kvl, 2)

    def run(self, xbuf: np.ndarray, wpack: np.ndarray, ybuf: np.ndarray, bias: np.ndarray | None,
            scale: float, batch: int, threads: int) -> int:
        """Run every work item; returns the saturated-lane count (fast mode)."""
        rows = batch * self.plan.po
        total = rows * self.plan.out_blocks
        if total == 0:
            return 0
        b = bias if bias is not None else ybuf
        ptrs = (xbuf.ctypes.data, wpack.ctypes.data, ybuf.ctypes.data, b.ctypes.data)
        counts, lock = [], threading.Lock()

        def chunk(begin: int, end: int) -> None:
            sat = np.zeros(1, np.int64)
            self.fn(*ptrs, ctypes.c_float(scale), begin, end, rows, sat.ctypes.data)
            with lock:
                counts.append(int(sat[0]))

        parallel_for(total, chunk, threads)
        return sum(counts)


class ConvKernel:
    """The kernels of one forward or backward-data pass (one, or one per output phase)."""

    def __init__(self, spec, config: TuningConfig, target, mode: str, has_bias: bool = False,
                 fma: bool = True):
        self.spec, self.config, self.target, self.mode = spec, config, target, mode
        if spec.pass_kind == "fwd":
            sub, plan = plan_fwd(spec, config, target, mode=mode, has_bias=has_bias, fma=fma)
            self.pad = (spec.padding[0],) * 2 + (spec.padding[1],) * 2
            self.parts = [SubKernel(sub, plan, target)]
            self.zero_fill = False
            self.flush_taps = plan.flush_taps
        elif spec.pass_kind == "bwd_data":
            bp = plan_bwd_data(spec, config, target, mode=mode, fma=fma)
            self.pad = bp.pad
            self.parts = [SubKernel(sub, plan, target) for sub, plan in bp.phases]
            self.zero_fill = bp.zero_fill
            self.flush_taps = bp.flush_taps
        else:
            raise DfpError(f"ConvKernel covers fwd and bwd_data, not {spec.pass_kind!r}")

    @property
    def symbols(self) -> tuple[str, ...]:
        return tuple(k.plan.symbol for k in self.parts)


# ----------------------------------------------------------------------------- buffers
def padded_nhwc(m: np.ndarray, pad: tuple[int, int, int, int], cpad: int) -> np.ndarray:
    """NCHW (any strides) int16 mantissas -> contiguous ``(N, top+H+bottom, left+W+right, cpad)``
    with zeros in the padding and the extra channels."""
    n, c, h, w = m.shape
    top, bottom, left, right = pad
    buf = np.empty((n, top + h + bottom, left + w + right, cpad), np.int16)
    buf[:, :top] = 0
    buf[:, top + h:] = 0
    buf[:, top:top + h, :left] = 0
    buf[:, top:top + h, left + w:] = 0
    inner = buf[:, top:top + h, left:left + w]
    inner[..., :c] = m.transpose(0, 2, 3, 1)
    if cpad > c:
        inner[..., c:] = 0
    return buf


def _activation_buffer(q, pad, cpad: int) -> np.ndarray:
    """The kernel's input buffer for DfpTensor ``q``; reuses ``dfpgen.pack``'s NHWC buffer
    without a copy when no spatial padding is needed and the channel padding agrees."""
    if not any(pad):
        try:
            from .pack import nhwc_buffer
        except ImportError:
            nhwc_buffer = None
        if nhwc_buffer is not None:
            buf = nhwc_buffer(q)
            if buf.shape[-1] == cpad and buf.flags.c_contiguous:
                return buf
    return padded_nhwc(q.mantissa, pad, cpad)


def channel_max(buf: np.ndarray, channels: int) -> np.ndarray:
    """Per-channel max |mantissa| of an NHWC int16 buffer (|-32768| never occurs)."""
    if buf.size == 0:
        return np.zeros(channels, np.int64)
    flat = buf.reshape(-1, buf.shape[-1])[:, :channels]
    return np.maximum(flat.max(axis=0).astype(np.int64), -flat.min(axis=0).astype(np.int64))


def check_scale(scale_exp: int, what: str) -> float:
    lo, hi = SCALE_EXP_RANGE
    if not lo <= scale_exp <= hi:
        raise DfpError(f"{what}: the product scale 2**{scale_exp} (sum of the operands' shared "
                       f"exponents) is outside float32's range 2**{lo}..2**{hi}; rescale the operands")
    return float(2.0 ** scale_exp)


def run_info(kernel: ConvKernel, saturated: int, threads: int, scale_exp: int) -> RunInfo:
    cfg = kernel.config
    return RunInfo(pass_kind=kernel.spec.pass_kind, overflow=kernel.mode,
                   flush=cfg.c_block * kernel.flush_taps, saturated=saturated,
                   tier=kernel.target.tier, symbol=kernel.symbols[0] if kernel.symbols else "",
                   symbols=kernel.symbols, config=cfg.to_dict(), c_block=cfg.c_block,
                   flush_taps=kernel.flush_taps, threads=threads, scale_exp=scale_exp)


def execute(kernel: ConvKernel, act, wt: np.ndarray, bias: np.ndarray | None, scale_exp: int,
            threads: int | None) -> tuple[np.ndarray, RunInfo]:
    """Run ``kernel`` on activation DfpTensor ``act`` (X NCHW forward, dY NKPQ backward-data) and
    integer weights ``wt`` (OUT, RED, R, S). Returns (FP32 NHWC output view (N, OH, OW, OUT),
    RunInfo)."""
    spec = kernel.spec
    threads = threads or num_threads()
    scale = check_scale(scale_exp, spec.pass_kind)
    first = kernel.parts[0].plan if kernel.parts else None
    red = spec.C if spec.pass_kind == "fwd" else spec.K
    out = spec.K if spec.pass_kind == "fwd" else spec.C
    oh, ow = (spec.P, spec.Q) if spec.pass_kind == "fwd" else (spec.H, spec.W)
    n = spec.N
    if first is None:  # every output pixel meets no tap (e.g. 1x1, stride > 1 phases only)
        return np.zeros((n, oh, ow, out), np.float32), run_info(kernel, 0, threads, scale_exp)
    xbuf = _activation_buffer(act, kernel.pad, 2 * first.red_pairs)
    alloc = np.zeros if kernel.zero_fill else np.empty
    ybuf = alloc((n, oh, ow, first.out_pad), np.float32)
    bpad = None
    if bias is not None:
        bpad = np.zeros(first.out_pad, np.float32)
        bpad[:out] = bias
    saturated = 0
    wt = np.ascontiguousarray(wt)  # backward-data passes W transposed: copy once, not per phase
    for part in kernel.parts:
        saturated += part.run(xbuf, part.pack_weights(wt), ybuf, bpad, scale, n, threads)
    return ybuf[..., :out], run_info(kernel, saturated, threads, scale_exp)
