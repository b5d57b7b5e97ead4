"""Public numpy API: DFP16 convolution passes with PyTorch's conventions.

``conv2d`` mirrors ``torch.nn.functional.conv2d`` (groups = 1), ``conv2d_input`` /
``conv2d_weight`` mirror ``torch.nn.grad.conv2d_input`` / ``conv2d_weight``, ``linear``
mirrors ``torch.nn.functional.linear``. Float operands are quantized to DFP16 inside
(``fmt``, ``seed`` for stochastic rounding); already-quantized :class:`dfpgen.DfpTensor`
operands are used as they are. Outputs are float32 NCHW arrays (views of the kernels' NHWC
buffers: channels_last memory).

Overflow modes:

- ``"exact"`` (the default): non-saturating ``vpdpwssd`` with the longest flush schedule
  that a bound on the actual operands proves safe (``dfpgen.plan_exact``); bit-exact with
  ``dfpgen.reference`` and the same bits for every tuning config, tier and thread count.
- ``"fast"`` (the paper's kernels): chains of ``c_block x R x S`` products (16 x 9 for a 3x3
  layer) accumulate with the saturating ``vpdpwssds``; at every flush the lanes equal to
  INT32_MAX / INT32_MIN are counted and a :class:`dfpgen.OverflowWarning` reports them.
  When the count is 0 the result equals the exact computation of that flush schedule
  (``dfpgen.reference`` with ``saturate=True`` gives the same bits in every case). A lane that
  saturates and is pulled back into range before the flush is not among them; a sticky
  check in the forward / backward-data kernels reports it in ``RunInfo.possibly_saturated``
  (an upper bound on the partials that clipped at any step; 0 proves none did).

Exact is the default because it is never silently wrong and costs little: on ResNet-50
layers (batch 8, one thread) it took 1.1-1.6x the time of fast mode (the per-call bound
analysis plus shorter partials; less at larger batches, where the analysis is amortised),
while fast mode does saturate on real inputs (DFP16 puts the largest mantissa
at 2**14..2**15, so e.g. a 3-channel 3x3 first layer over images with many near-maximal
pixels clips). ``overflow="fast"`` is one keyword away and reports every saturation it sees.
"""
from __future__ import annotations

import operator
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from typing import NamedTuple

import numpy as np

from .dfp import DFP16, DfpFormat, DfpTensor, quantize
from .errors import DfpError, OverflowWarning, deferred_warnings, reissue
from . import passes, bwd_weight
from .fwd_family import FMA_MIN_SCALE_EXP, PackedWeight, execute
from .pass_kernels import get_kernel
from .pack import channel_range_of, quantize_pack
from .plan_exact import exact_blocks, exact_schedule
from .runinfo import RunInfo
from .threads import num_threads
from .decisions import resolve_config
from .target import CpuTarget, host_target
from .spec import ConvSpec, _pair, spec_of
from .tuning import TuningConfig

DEFAULT_OVERFLOW = "exact"


class ConvResult(NamedTuple):
    """``(output, info)`` returned with ``return_info=True``."""
    output: np.ndarray
    info: RunInfo


def _quantize_act(a, fmt: DfpFormat, seed: int, name: str, threads) -> DfpTensor:
    if isinstance(a, DfpTensor):
        if a.mantissa.ndim != 4:
            raise DfpError(f"{name}: expected 4-D NCHW, got shape {a.shape}")
        return a
    arr = _as_array(a, name)
    if arr.ndim != 4:
        raise DfpError(f"{name}: expected a 4-D NCHW array, got shape {arr.shape}")
    if arr.dtype != np.float32:  # float64 keeps quantize's float64 math
        return quantize(arr, fmt, seed=seed, name=name)
    return quantize_pack(arr, fmt, seed=seed, name=name, threads=threads)


def _as_array(a, name: str) -> np.ndarray:
    """``np.asarray(a)``; an object numpy cannot read (e.g. a torch tensor that requires
    grad) is a :class:`DfpError` naming the operand instead of the object's own error."""
    try:
        return np.asarray(a)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise DfpError(f"{name}: cannot read {type(a).__name__} as a numpy array "
                       f"({' '.join(str(exc).split())})") from None


def _quantize_weight(w, fmt: DfpFormat, name: str) -> DfpTensor:
    if isinstance(w, PackedWeight):
        return w
    if isinstance(w, DfpTensor):
        q = w
    else:
        arr = _as_array(w, name)
        if arr.ndim == 4 and arr.dtype == np.float32:
            # KCRS as (N, C, H, W): the pack kernel leaves a KRSC buffer, the forward layout
            q = quantize_pack(arr, fmt, name=name)
        else:
            q = quantize(arr, fmt, name=name)
    if q.mantissa.ndim != 4:
        raise DfpError(f"{name}: expected 4-D KCRS weights, got shape {q.shape}")
    return q


def _one_signed(hi: np.ndarray, lo: np.ndarray) -> bool:
    """Whether every value lies on one side of 0 (ReLU outputs: all >= 0), which lets the
    exact bound split the products by sign (``plan_exact`` module docstring)."""
    return bool(lo.min(initial=0) >= 0 or hi.max(initial=0) <= 0)


def _check_no_int16_min(amax: np.ndarray, what: str) -> None:
    if amax.size and amax.max() > 32767:
        raise DfpError(f"{what}: a mantissa is -32768; DFP mantissas are clamped to +/-32767 (a "
                       "-32768 x -32768 pair overflows the pair sum), build operands with dfpgen.quantize")


# Exact mode's kernels per layer shape: one per reduction block of ``plan_exact.exact_blocks``
# (the flush interval is a run-time kernel argument), all loaded on the first call of a shape
# (built in parallel when not on disk), so a training run loads kernels only in its first
# step however the operands' bound moves. Keyed without the batch size (kernels serve any N).
_families: set[tuple] = set()
_families_lock = threading.Lock()


def _exact_config(spec: ConvSpec, base: TuningConfig, c_block: int) -> TuningConfig:
    """The kernel config of an exact-mode block: planned with all R*S taps per partial; the
    actual flush interval is passed at run time."""
    key = (base, c_block, spec.R * spec.S)
    hit = _exact_configs.get(key)
    if hit is None:
        hit = _exact_configs[key] = base.replace(c_block=c_block, flush=c_block * spec.R * spec.S)
    return hit


_exact_configs: dict[tuple, TuningConfig] = {}
_seen: set[tuple] = set()  # (spec with its batch, ...) already checked by load_exact_family


def exact_family(spec: ConvSpec, base: TuningConfig) -> list[TuningConfig]:
    """The configs of every exact-mode kernel ``spec`` can be given, largest block first:
    one per block of :func:`plan_exact.exact_blocks` over the pass's reduction channels
    (C forward, K backward-data), register blocking of ``base``."""
    return [_exact_config(spec, base, cb) for cb in exact_blocks(spec.reduction_size)]


def load_exact_family(spec: ConvSpec, base: TuningConfig, target, bias: bool, fma: bool) -> None:
    """Load every exact-mode kernel ``spec`` can be given (one per block of
    :func:`plan_exact.exact_blocks`, register blocking of ``base``); a no-op after the first
    call for a shape."""
    fast_key = (spec, base, bias, fma, target)
    if fast_key in _seen:
        return
    _load_once((replace(spec, N=1), base, bias, fma, target), spec, exact_family(spec, base), target,
               bias=bias, fma=fma)
    _seen.add(fast_key)


def _load_once(key: tuple, spec: ConvSpec, cfgs, target, **variant) -> None:
    """Load the exact-mode kernels ``cfgs`` of ``spec`` unless ``key`` (the shape's family) was
    loaded before: a shape's first call builds every kernel its drifting operands may need."""
    if key in _families:
        return
    # LLVM compiles without the GIL (llvmlite's ctypes calls release it)
    def build(cfg):
        with deferred_warnings() as kept:  # issued below, from the caller's thread
            _kernel(spec, cfg, "exact", target, **variant)
        return kept

    with ThreadPoolExecutor(max(1, min(num_threads(), len(cfgs)))) as pool:
        kept = [w for ws in pool.map(build, cfgs) for w in ws]
    reissue(kept)
    with _families_lock:
        _families.add(key)


_kernels: dict[tuple, object] = {}


def _kernel(spec: ConvSpec, cfg: TuningConfig, overflow: str, target, **variant):
    """``pass_kernels.get_kernel`` behind a dict keyed by a tuple (no per-call key hashing)."""
    if cfg is None:  # the tuned decision may change (dfpgen tune): resolved every call
        return get_kernel(spec, cfg, overflow=overflow, target=target, **variant)
    key = (spec, cfg, overflow, target, *variant.items())
    hit = _kernels.get(key)
    if hit is None:
        hit = _kernels[key] = get_kernel(spec, cfg, overflow=overflow, target=target, **variant)
    return hit


def _checked_bound(bound, c: int, what: str = "conv2d: x_channel_bound"):
    """A per-channel mantissa bound ``(hi, lo)`` (``what`` names the argument in errors) as
    two int64 (C,) arrays within the mantissa range, or None."""
    if bound is None:
        return None
    try:
        hi, lo = (np.asarray(v) for v in bound)
    except (TypeError, ValueError):
        raise DfpError(f"{what} must be a pair (hi, lo) of per-channel arrays") from None
    if hi.shape != (c,) or lo.shape != (c,) or hi.dtype.kind not in "iu" or lo.dtype.kind not in "iu":
        raise DfpError(f"{what} must be two integer arrays of shape ({c},), got "
                       f"{hi.dtype} {hi.shape} and {lo.dtype} {lo.shape}")
    # range-checked in the given dtype (both ends of both arrays): a cast first would wrap
    # uint64 values >= 2**63 into small negatives that pass as a (much too tight) bound
    if c and (max(hi.max(), lo.max()) > 32767 or min(hi.min(), lo.min()) < -32767):
        raise DfpError(f"{what} is no mantissa range (lo <= hi within +/-32767 per channel)")
    hi, lo = hi.astype(np.int64), lo.astype(np.int64)
    if c and (lo > hi).any():
        raise DfpError(f"{what} is no mantissa range (lo <= hi within +/-32767 per channel)")
    return hi, lo


def _schedule(spec: ConvSpec, overflow: str, config: TuningConfig | None, act: DfpTensor,
              wq, target=None, bias: bool = False, fma: bool = True, act_bound=None):
    """``(kernel config, flush_taps)`` of ``spec``; in exact mode the reduction block and the
    flush interval come from the operands (``flush_taps`` 0: the config's own interval).
    ``wq``: a DfpTensor or a :class:`PackedWeight`; ``act_bound``: ``(hi, lo)`` per-channel
    bounds of ``act``'s mantissas known to the caller (else they are scanned)."""
    passes.check_overflow(overflow)
    if overflow == "exact":
        base, target = resolve_config(spec, config, overflow="exact", target=target)
        density = passes.of(spec).tap_density(spec)
        hi, lo = channel_range_of(act.mantissa) if act_bound is None else act_bound
        amax = np.maximum(hi, -lo)
        _check_no_int16_min(amax, f"{spec.pass_kind} activation")
        pw = wq if isinstance(wq, PackedWeight) else PackedWeight(wq)
        if pw.has_int16_min:
            _check_no_int16_min(np.array([32768]), f"{spec.pass_kind} weight")
        cb, ft = exact_schedule(pw.bound_operand(spec), amax, density, one_signed=_one_signed(hi, lo))
        load_exact_family(spec, base, target, bias, fma)
        return _exact_config(spec, base, cb), ft
    return config, 0


def _check_call(overflow: str, threads, target=None, config=None):
    """Arguments every pass checks up front (an empty batch returns before any kernel would).
    Returns ``(target, config)``: a tier name such as ``"avx2"`` becomes
    ``host_target("avx2")``, a dict becomes ``TuningConfig.from_dict``."""
    passes.check_overflow(overflow)
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, (int, np.integer))
                                or threads < 0):
        raise DfpError(f"threads must be None or an int >= 0 (0 or None: the default count), got {threads!r}")
    if isinstance(target, str):
        target = host_target(target)
    elif target is not None and not isinstance(target, CpuTarget):
        raise DfpError(f"target must be None, an ISA tier name or a CpuTarget, got {type(target).__name__}")
    target = target or host_target()  # now: $DFPGEN_ISA may change between calls
    if isinstance(config, dict):
        config = TuningConfig.from_dict(config)
    elif config is not None and not isinstance(config, TuningConfig):
        raise DfpError(f"config must be None, a TuningConfig or a dict of its fields, got {type(config).__name__}")
    return target, config


def _shape4(shape, what: str) -> tuple[int, int, int, int]:
    """A 4-tuple of Python ints (torch.Size, lists and numpy integers welcome; floats are not)."""
    try:
        vals = tuple(shape)
        if len(vals) != 4 or any(isinstance(v, (str, bytes)) for v in vals):
            raise TypeError
        return tuple(operator.index(v) for v in vals)
    except TypeError:
        raise DfpError(f"{what} must be four ints, got {shape!r}") from None


def _pointwise_on_pixels(spec: ConvSpec) -> bool:
    """A 1x1 filter over N > 1 images of 1x1 pixel without padding (a classifier layer)."""
    return (spec.H, spec.W, spec.R, spec.S, spec.padding) == (1, 1, 1, 1, (0, 0)) and spec.N > 1


def _from_row(res: ConvResult, return_info: bool):
    """Undo :func:`_as_row` on an output: one row of N pixels -> (N, K, 1, 1)."""
    out = res.output[0, :, 0, :].T[:, :, None, None]
    return ConvResult(out, res.info) if return_info else out


def _as_row(q: DfpTensor) -> DfpTensor:
    """(N, C, 1, 1) -> (1, C, 1, N): the same NHWC memory read as one row of N pixels."""
    return DfpTensor(q.mantissa[:, :, 0, 0].T[None, :, None, :], q.exponent, q.fmt)


def _empty(shape, spec: ConvSpec, overflow: str, return_info: bool):
    """An empty batch: no kernel runs; the output has the shape the batch implies."""
    out = np.zeros(shape, np.float32)
    info = RunInfo(pass_kind=spec.pass_kind, overflow=overflow, flush=0, saturated=0, tier="", symbol="")
    return ConvResult(out, info) if return_info else out


def _finish(y_nhwc: np.ndarray, info: RunInfo, return_info: bool, warn: bool = True):
    if warn and (info.saturated or info.possibly_saturated):
        warnings.warn(f"DFP16 {info.pass_kind}: {info.saturated} INT32 lanes saturated at a flush in fast "
                      f"mode, up to {info.possibly_saturated} output partials at some step (flush "
                      f"interval {info.flush}); use overflow='exact' for a proven result",
                      OverflowWarning, stacklevel=3)
    out = y_nhwc.transpose(0, 3, 1, 2)
    return ConvResult(out, info) if return_info else out


def conv2d(x, w, bias=None, stride=1, padding=0, dilation=1, *, overflow: str = DEFAULT_OVERFLOW,
           fmt: DfpFormat = DFP16, seed: int = 0, threads: int | None = None,
           config: TuningConfig | None = None, return_info: bool = False, target=None,
           warn_overflow: bool = True, x_channel_bound=None, x_buffer=None):
    """DFP16 forward convolution.

    ``x``: float NCHW (N, C, H, W) (any strides; channels_last is cheapest) or a DfpTensor;
    ``w``: float KCRS (K, C, R, S) or a DfpTensor; ``bias``: float32 (K,) or None (added in FP32
    after the last partial). Returns float32 (N, K, P, Q), or ``ConvResult(output, RunInfo)``
    with ``return_info=True``. Raises :class:`DfpError` for mismatched shapes, wrong ndim,
    NaN/Inf operands (named), groups (C of w != C of x), an unknown overflow mode; warns
    :class:`OverflowWarning` with the count when fast mode saturated (``warn_overflow=False``:
    the caller reads ``RunInfo.saturated`` / ``possibly_saturated`` and reports it itself, as
    ``dfpgen.runtime`` does once per layer shape and pass). In exact mode the
    reduction block and flush interval come from the operands (``dfpgen.plan_exact``), not
    from ``config`` (whose register blocking still applies). An empty batch gives an empty
    output.

    ``x_channel_bound``: with a DfpTensor ``x``, optional ``(hi, lo)`` integer arrays (C,)
    with ``lo[c] <= x.mantissa[:, c] <= hi[c]``, which the caller guarantees (e.g. the proven
    output range of a fused BatchNorm, ``dfpgen.bn``); exact mode then proves its schedule
    from them instead of scanning X. A looser bound only shortens the proven partials.
    ``x_buffer``: with a DfpTensor ``x``, optional ``(buffer, pad)``: ``x``'s mantissas
    already in a zero-padded NHWC int16 buffer (N, top+H+bottom, left+W+right, Cp), pad =
    (top, bottom, left, right), zeros around the image and in channels >= C (e.g. written so
    by a fused BatchNorm, ``dfpgen.bn.forward(out_pad=...)``); the kernel reads it in place
    of its own padded copy when the padding and channel count are its own (stride 1).
    """
    target, config = _check_call(overflow, threads, target, config)
    for what, given in (("x_channel_bound", x_channel_bound), ("x_buffer", x_buffer)):
        if given is not None and not isinstance(x, DfpTensor):
            raise DfpError(f"conv2d: {what} describes the mantissas of a DfpTensor x; x is "
                           f"{type(x).__name__}")
    xq = _quantize_act(x, fmt, seed, "conv2d input X", threads)
    wq = _quantize_weight(w, fmt, "conv2d weight W")
    (n, c, h, wd), (k, c2, r, s) = xq.shape, wq.shape
    if c != c2:
        raise DfpError(f"conv2d: input has C={c} channels but weight expects {c2} (KCRS {wq.shape}); "
                       "groups > 1 are not supported")
    b = None
    if bias is not None:
        b0 = np.asarray(bias)
        with np.errstate(over="ignore"):
            b = b0.astype(np.float32)
        if b.shape != (k,):
            raise DfpError(f"conv2d: bias shape {b.shape} != (K,) = ({k},)")
        if not np.isfinite(b).all():
            what = "contains NaN or Inf" if not np.isfinite(b0).all() else "exceeds the float32 range"
            raise DfpError(f"conv2d: bias {what} (first at index {int(np.argmin(np.isfinite(b)))})")
    spec = spec_of(max(n, 1), c, h, wd, k, r, s, stride, padding, dilation, "fwd")
    if n == 0:
        return _empty((0, k, spec.P, spec.Q), spec, overflow, return_info)
    if _pointwise_on_pixels(spec):
        # N images of 1x1 = one row of N pixels (same NHWC memory): full register blocks
        res = conv2d(_as_row(xq), wq, b, overflow=overflow, threads=threads, config=config,
                     warn_overflow=warn_overflow, x_channel_bound=x_channel_bound,
                     return_info=True, target=target)
        return _from_row(res, return_info)
    fma = xq.exponent + wq.exponent >= FMA_MIN_SCALE_EXP
    cfg, ft = _schedule(spec, overflow, config, xq, wq, target, b is not None, fma,
                        _checked_bound(x_channel_bound, c))
    kern = _kernel(spec, cfg, overflow, target, bias=b is not None, fma=fma)
    y, info = execute(kern, xq, wq, b, xq.exponent + wq.exponent, threads, ft,
                      _checked_buffer(x_buffer, xq.shape))
    return _finish(y, info, return_info, warn_overflow)


def _checked_buffer(given, shape):
    """``x_buffer`` (or ``grad_output_buffer``) checked against the operand's (N, C, H, W)
    ``shape``, or None."""
    if given is None:
        return None
    try:
        buf, pad = given
        top, bottom, left, right = (operator.index(v) for v in pad)
    except (TypeError, ValueError):
        raise DfpError("conv2d: x_buffer / grad_output_buffer must be a pair (buffer, (top, bottom, "
                       "left, right))") from None
    n, c, h, w = shape
    want = (n, top + h + bottom, left + w + right)
    if (not isinstance(buf, np.ndarray) or buf.dtype != np.int16 or buf.ndim != 4
            or buf.shape[:3] != want or buf.shape[3] < c or min(top, bottom, left, right) < 0):
        raise DfpError(f"conv2d: x_buffer / grad_output_buffer must be an int16 array of shape {want} + (Cp >= {c},) for "
                       f"padding {(top, bottom, left, right)}, got {getattr(buf, 'dtype', type(buf))} "
                       f"{getattr(buf, 'shape', '')}")
    return buf, (top, bottom, left, right)


def conv2d_input(input_shape, w, grad_output, stride=1, padding=0, dilation=1, *,
                 overflow: str = DEFAULT_OVERFLOW, fmt: DfpFormat = DFP16, seed: int = 0,
                 threads: int | None = None, config: TuningConfig | None = None,
                 return_info: bool = False, target=None,
                 warn_overflow: bool = True, grad_output_buffer=None, grad_output_bound=None):
    """DFP16 backward-data: dX (float32 NCHW ``input_shape``) from ``w`` (KCRS) and
    ``grad_output`` dY (N, K, P, Q), as ``torch.nn.grad.conv2d_input``. Stride > 1 runs one
    stride-1 sub-convolution per output phase. Same keywords, errors and return as
    :func:`conv2d`; ``grad_output_buffer``: as :func:`conv2d`'s ``x_buffer``, for a DfpTensor
    dY (the kernels' padding is :func:`dfpgen.plan_bwd_data.dy_padding`, e.g. from
    :func:`dfpgen.pack.quantize_padded`); ``grad_output_bound``: as :func:`conv2d`'s
    ``x_channel_bound``, ``(hi, lo)`` (K,) for dY's mantissas (e.g. the range
    ``quantize_padded(channel_range=True)`` kept while writing them)."""
    target, config = _check_call(overflow, threads, target, config)
    for what, given in (("grad_output_buffer", grad_output_buffer), ("grad_output_bound", grad_output_bound)):
        if given is not None and not isinstance(grad_output, DfpTensor):
            raise DfpError(f"conv2d_input: {what} describes the mantissas of a DfpTensor "
                           f"grad_output; it is {type(grad_output).__name__}")
    n, c, h, wd = _shape4(input_shape, "conv2d_input: input_shape (N, C, H, W)")
    dyq = _quantize_act(grad_output, fmt, seed, "conv2d_input grad_output dY", threads)
    wq = _quantize_weight(w, fmt, "conv2d_input weight W")
    k, c2, r, s = wq.shape
    if c != c2:
        raise DfpError(f"conv2d_input: input_shape has C={c} but weight has C={c2}; groups > 1 are not supported")
    spec = spec_of(max(n, 1), c, h, wd, k, r, s, stride, padding, dilation, "bwd_data")
    if dyq.shape != (n,) + spec.output_shape[1:]:
        raise DfpError(f"conv2d_input: grad_output shape {dyq.shape} != {(n,) + spec.output_shape[1:]}, the "
                       f"forward output of input {tuple(input_shape)} and weight {wq.shape}")
    bound = _checked_bound(grad_output_bound, k, "conv2d_input: grad_output_bound")  # empty batch too
    if n == 0:
        return _empty((0, c, h, wd), spec, overflow, return_info)
    if _pointwise_on_pixels(spec):
        res = conv2d_input((1, c, 1, n), wq, _as_row(dyq), overflow=overflow, threads=threads,
                           warn_overflow=warn_overflow, grad_output_bound=grad_output_bound,
                           config=config, return_info=True, target=target)
        return _from_row(res, return_info)
    fma = dyq.exponent + wq.exponent >= FMA_MIN_SCALE_EXP
    padded = _checked_buffer(grad_output_buffer, dyq.shape)
    if bound is None and padded is not None and padded[0].shape[3] == k and padded[0].flags.c_contiguous:
        # the scan reads the whole contiguous buffer (6x a strided view's speed); its zeros
        # change neither max |dY| per channel nor the one-sign test
        bound = channel_range_of(padded[0].transpose(0, 3, 1, 2))
    cfg, ft = _schedule(spec, overflow, config, dyq, wq, target, False, fma, bound)
    kern = _kernel(spec, cfg, overflow, target, bias=False, fma=fma)
    dx, info = execute(kern, dyq, wq, None, dyq.exponent + wq.exponent, threads, ft, padded)
    return _finish(dx, info, return_info, warn_overflow)


def conv2d_weight(x, weight_shape, grad_output, stride=1, padding=0, dilation=1, *,
                  overflow: str = DEFAULT_OVERFLOW, fmt: DfpFormat = DFP16, seed: int = 0,
                  threads: int | None = None, config: TuningConfig | None = None,
                  return_info: bool = False, target=None,
                  warn_overflow: bool = True):
    """DFP16 backward-weight: dW (float32 KCRS ``weight_shape``) from ``x`` (NCHW) and
    ``grad_output`` dY, as ``torch.nn.grad.conv2d_weight`` (kernel: ``dfpgen.bwd_weight``)."""
    target, config = _check_call(overflow, threads, target, config)
    xq = _quantize_act(x, fmt, seed, "conv2d_weight input X", threads)
    dyq = _quantize_act(grad_output, fmt, seed, "conv2d_weight grad_output dY", threads)
    if xq.shape[0] == 0:  # no samples: a zero gradient of weight_shape, after the shape checks
        k, c, r, s = _shape4(weight_shape, "conv2d_weight: weight_shape (K, C, R, S)")
        if c != xq.shape[1]:
            raise DfpError(f"conv2d_weight: x has {xq.shape[1]} channels but weight_shape has C={c}")
        spec = ConvSpec(1, c, xq.shape[2], xq.shape[3], k, r, s, _pair(stride, "stride"),
                        _pair(padding, "padding"), _pair(dilation, "dilation"), "bwd_weight")
        if dyq.shape != (0,) + spec.output_shape[1:]:
            raise DfpError(f"conv2d_weight: grad_output shape {dyq.shape} != {(0,) + spec.output_shape[1:]}, "
                           f"the forward output of input {xq.shape} and weight {(k, c, r, s)}")
        return _empty((k, c, r, s), spec, overflow, return_info)
    ops = bwd_weight.prepare(xq, tuple(weight_shape), dyq, stride, padding, dilation, overflow=overflow,
                        threads=threads, config=config, target=target)
    cfg = bwd_weight.kernel_config(ops, target)
    if ops.config is None and overflow == "exact":
        # the register blocking follows the proven flush interval: both default kernels
        _load_once((ops.spec, target, ops.scaled), ops.spec, bwd_weight.exact_family(ops.spec, target),
                   target, scaled=ops.scaled)
    kern = _kernel(ops.spec, cfg, overflow, target, scaled=ops.scaled)
    dw, info = bwd_weight.execute(kern, ops)
    if warn_overflow and info.saturated:
        warnings.warn(f"DFP16 bwd_weight: {info.saturated} INT32 lanes saturated in fast mode "
                      f"(flush interval {info.flush})", OverflowWarning, stacklevel=2)
    return ConvResult(dw, info) if return_info else dw


def linear(x, w, bias=None, *, overflow: str = DEFAULT_OVERFLOW, fmt: DfpFormat = DFP16,
           seed: int = 0, threads: int | None = None, config: TuningConfig | None = None,
           return_info: bool = False, target=None,
           warn_overflow: bool = True):
    """DFP16 ``x @ w.T + bias``: x float (N, C) or a 2-D DfpTensor, w (K, C), bias (K,) or None.
    Runs as a 1x1 convolution over N pixels of one row. Returns float32 (N, K)."""
    target, config = _check_call(overflow, threads, target, config)
    if isinstance(x, DfpTensor):
        if x.mantissa.ndim != 2:
            raise DfpError(f"linear: x must be 2-D (N, C), got shape {x.shape}")
        xq = DfpTensor(x.mantissa.T[None, :, None, :], x.exponent, x.fmt)
    else:
        arr = np.asarray(x, np.float32)
        if arr.ndim != 2:
            raise DfpError(f"linear: x must be 2-D (N, C), got shape {arr.shape}")
        xq = quantize(arr.T[None, :, None, :], fmt, seed=seed, name="linear input X")
    if isinstance(w, DfpTensor):
        if w.mantissa.ndim != 2:
            raise DfpError(f"linear: w must be 2-D (K, C), got shape {w.shape}")
        wq = DfpTensor(w.mantissa[:, :, None, None], w.exponent, w.fmt)
    else:
        arr = np.asarray(w, np.float32)
        if arr.ndim != 2:
            raise DfpError(f"linear: w must be 2-D (K, C), got shape {arr.shape}")
        wq = quantize(arr[:, :, None, None], fmt, name="linear weight W")
    if xq.shape[3] == 0:  # an empty batch: conv2d's empty-batch path checks C and the bias
        xq = DfpTensor(np.zeros((0, xq.shape[1], 1, 1), np.int16), xq.exponent, xq.fmt)
        res = conv2d(xq, wq, bias, overflow=overflow, threads=threads, config=config,
                     warn_overflow=warn_overflow,
                     return_info=True, target=target)
        out = res.output[:, :, 0, 0]
        return ConvResult(out, res.info) if return_info else out
    res = conv2d(xq, wq, bias, overflow=overflow, threads=threads, config=config,
                 warn_overflow=warn_overflow,
                 return_info=True, target=target)
    out = res.output[0, :, 0, :].T
    return ConvResult(out, res.info) if return_info else out
