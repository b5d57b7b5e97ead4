"""PyTorch custom ops on dfpgen's DFP16 kernels: ``dfpgen::conv2d``, ``dfpgen::linear`` and
their backward ops, with autograd (``register_autograd``) and fake (meta) implementations so
``torch.compile`` and ``torch.library.opcheck`` work.

Training recipe (Das et al., ICLR 2018, §3-4; docs/ARCHITECTURE.md §1): FP32 master weights; every pass
quantizes its two inputs to DFP16 and writes FP32 —

- forward ``Y = X * W``: X and W quantized (the format's rounding, nearest by default);
- backward-data ``dX = dY *^T W`` and backward-weight ``dW = X^T * dY``: dY quantized once
  (nearest or stochastic rounding) and used by both passes; W re-quantized (same bits as
  the forward, nearest rounding is deterministic); X is the forward's INT16 mantissas.

The forward op returns, besides Y, the INT16 mantissas of X (the kernels' NHWC buffer with
C padded as ``dfpgen.pack`` pads it) and X's shared exponent; autograd saves those instead of
the FP32 X: 2 bytes per element instead of 4 (plus one pad channel when C is odd). The
network-level saving depends on the graph: where another op keeps the FP32 X anyway (the
in-place ReLU before a ResNet conv saves its output), the INT16 copy is extra. Bias stays FP32.

Layout: a ``channels_last`` input (or weight) gives a ``channels_last`` output, otherwise
NCHW-contiguous; the numpy core accepts both without a repack (an NCHW-shaped array with
NHWC strides is what ``quantize_pack`` consumes).
"""
from __future__ import annotations

import threading
import weakref
from functools import partial
import warnings
from typing import List, Optional, Tuple

import numpy as np
import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from dfpgen.dfp import DfpFormat, DfpTensor
from dfpgen.errors import DfpError, OverflowWarning

# Observers (dfpgen.runtime.numerics.NumericsMonitor): callables that get one dict per pass
# that ran (pass_kind, info = RunInfo, seed, operands, output); nothing is built without one.
observers: list = []


def _observe(**event) -> None:
    for fn in tuple(observers):
        fn(event)

# --- layout helpers (shared by the real and the fake implementations) -----------------


def _strict_channels_last(t: Tensor) -> bool:
    # Decided by the strides, as PyTorch's suggest_memory_format: a C == 1 tensor made
    # channels_last (strides (HW, 1, W, 1)) counts as channels_last, one with exactly the
    # NCHW-contiguous strides as NCHW. (is_contiguous() alone calls both "contiguous", and
    # an NCHW output there sends the next BatchNorm down its much slower NCHW path.)
    if t.dim() != 4 or not t.is_contiguous(memory_format=torch.channels_last):
        return False
    _, c, h, w = t.shape
    return tuple(t.stride()) != (c * h * w, h * w, w, 1)


def output_channels_last(x: Tensor, weight: Tensor) -> bool:
    """The output is channels_last when the input or the weight is (as PyTorch's conv)."""
    return _strict_channels_last(x) or _strict_channels_last(weight)


def padded_channels(c):
    """Channels of the kernels' NHWC INT16 buffer: ``dfpgen.pack`` pads C to even,
    ``Cp = C + C % 2`` (VNNI reads INT16 pairs along C). Works on SymInts (fake impls)."""
    return c + c % 2


def _out_hw(h, w, r, s, stride, padding, dilation):
    p = (h + 2 * padding[0] - dilation[0] * (r - 1) - 1) // stride[0] + 1
    q = (w + 2 * padding[1] - dilation[1] * (s - 1) - 1) // stride[1] + 1
    return p, q


def _np_activation(t: Tensor) -> np.ndarray:
    """float32 numpy view of a 4-D activation, NCHW- or NHWC-strided (no copy when it
    already is one of those; stride-0 expanded gradients are materialised)."""
    t = t.detach()
    if t.dtype != torch.float32:
        t = t.float()
    if not (t.is_contiguous() or t.is_contiguous(memory_format=torch.channels_last)):
        t = t.contiguous(memory_format=torch.channels_last)
    return t.numpy()


def _np_weight(t: Tensor) -> np.ndarray:
    """float32 numpy KCRS weights, KCRS or KRSC memory (a channels_last model's: the quantize
    kernel reads either and writes the same KRSC buffer, so no relayout copy first)."""
    t = t.detach()
    if t.dtype != torch.float32:
        t = t.float()
    if t.dim() != 4 or not t.is_contiguous(memory_format=torch.channels_last):
        t = t.contiguous()
    return t.numpy()


# DFP16 weights, quantized and packed once per value of the parameter: id(weight) ->
# (weakref to it, its state, PackedWeight). The state is the tensor's version counter
# (bumped by every in-place update autograd sees: optimizer steps, ``with torch.no_grad():
# w.add_(...)``, ``load_state_dict``'s copy_), its data pointer, dtype, shape, strides and
# the DFP format, so any change that can alter the values misses; the weakref makes a new
# tensor that reuses an id miss too. Writes through ``w.data`` bypass the version counter:
# call :func:`clear_weight_cache` after those.
_weights: dict[int, tuple] = {}
_weights_lock = threading.Lock()


def clear_weight_cache() -> None:
    """Forget every cached DFP16 weight (needed only after writes through ``param.data``,
    which PyTorch's version counter does not see)."""
    with _weights_lock:
        _weights.clear()


def _drop_weight(key: int, ref) -> None:
    with _weights_lock:
        ent = _weights.get(key)
        if ent is not None and ent[0] is ref:
            del _weights[key]


def packed_weight(weight: Tensor, fmt: DfpFormat, name: str = "conv2d weight W"):
    """The DFP16 :class:`dfpgen.fwd_family.PackedWeight` of ``weight`` (float (K, C, R, S), or (O, F)
    read as (O, F, 1, 1)), from the cache while the tensor is unchanged; same bits as
    quantizing it afresh."""
    from dfpgen import conv
    from dfpgen.fwd_family import PackedWeight
    try:
        version = weight._version
    except RuntimeError:  # inference tensors keep no version counter: never cached
        version = None
    state = (version, weight.data_ptr(), weight.dtype, tuple(weight.shape), tuple(weight.stride()), fmt)
    key = id(weight)
    ent = _weights.get(key)
    if version is not None and ent is not None and ent[0]() is weight and ent[1] == state:
        return ent[2]
    w = _np_weight(weight)
    if w.ndim == 2:
        w = w.reshape(*w.shape, 1, 1)
    pw = PackedWeight(conv._quantize_weight(w, fmt, name))
    if version is not None:
        ref = weakref.ref(weight, lambda r, k=key: _drop_weight(k, r))
        with _weights_lock:
            _weights[key] = (ref, state, pw)
    return pw


def _to_torch(a: np.ndarray, channels_last: bool) -> Tensor:
    t = torch.from_numpy(np.asarray(a, dtype=np.float32))
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return t.contiguous(memory_format=fmt)


def _fmt(bits: int, rounding: str) -> DfpFormat:
    return DfpFormat(bits=bits, rounding=rounding)


def _threads(threads: int):
    return threads if threads > 0 else None


def saved_input(buf: Tensor, x_exp: Tensor, channels: int, bits: int, pad=(0, 0, 0, 0)) -> DfpTensor:
    """The forward's X as a DfpTensor: NCHW-shaped view of the saved NHWC INT16 buffer (of
    the image inside its zero padding ``pad`` = (top, bottom, left, right))."""
    b = buf.numpy()
    top, bottom, left, right = pad
    m = b[:, top:b.shape[1] - bottom, left:b.shape[2] - right, :channels].transpose(0, 3, 1, 2)
    return DfpTensor(m, int(x_exp.item()), _fmt(bits, "nearest"))


# --- fast-mode saturation: one warning per layer shape and pass ---------------------
# A training loop in fast mode would otherwise warn at every step with a new count (the
# warnings module shows each distinct message); NumericsMonitor keeps the counts per layer.
_saturation_warned: set[tuple] = set()


def _report_saturation(info, shape: tuple) -> None:
    """Warn :class:`OverflowWarning` the first time a (pass, layer shape) saturates."""
    if not (info.saturated or info.possibly_saturated):
        return
    key = (info.pass_kind, shape)
    if key in _saturation_warned:
        return
    _saturation_warned.add(key)
    seen = f"{info.saturated} lanes at a flush"
    if info.possibly_saturated:
        seen += f", up to {info.possibly_saturated} partials at some step"
    warnings.warn(f"DFP16 {info.pass_kind} of the layer with weight {shape[0]}: "
                  f"fast mode saturated INT32 partials ({seen}, flush interval {info.flush}); not "
                  "reported again for this layer shape and pass (dfpgen.runtime.NumericsMonitor "
                  "counts every call; overflow='exact' proves no partial saturates)",
                  OverflowWarning, stacklevel=2)


def _shape_key(weight_shape, stride, padding, dilation) -> tuple:
    """A layer's shape for the once-only warning: its weight (K, C, R, S) and geometry, not the
    activation's size (a linear layer runs as a row of batch-many pixels)."""
    return (tuple(weight_shape), tuple(stride), tuple(padding), tuple(dilation))


# --- conv2d -------------------------------------------------------------------------


def _handed_over(x: Tensor, fmt: DfpFormat):
    """``(DfpTensor, (hi, lo) per-channel mantissa bounds, Dfp16Output)`` of X when a fused
    BatchNorm wrote X's DFP16 form (``emit_int16``) and its range, and X is unchanged since:
    the conv then needs no quantize pass and no scan of X. Quantizing its float32 values in
    DFP16 gives the same values (the BatchNorm's exponent may be one coarser than a max-abs
    pass would pick after a residual add: the values are the same, so is the product).
    ``(None, None, None)`` otherwise."""
    from dfpgen.dfp import DFP16
    from .fused_bn import dfp16_of, value_range
    if fmt != DFP16:  # the fused BatchNorm writes DFP16, rounded to nearest
        return None, None, None
    h = dfp16_of(x)
    r = value_range(x) if h is not None else None
    if r is None:
        return None, None, None
    scale = np.float64(2.0) ** -h.exponent
    # the range holds the quantized images of the proven bounds: whole mantissas
    hi = np.rint(r[1].astype(np.float64) * scale).astype(np.int64)
    lo = np.rint(r[0].astype(np.float64) * scale).astype(np.int64)
    return DfpTensor(h.mantissa, h.exponent, fmt), (hi, lo), h


NO_PAD = (0, 0, 0, 0)
_dy_pads: dict = {}


def _dy_padding(n, c, h, w, k, r, s, stride, padding, dilation) -> tuple:
    """Backward-data's dY padding for this layer (``dfpgen.plan_bwd_data.dy_padding``);
    NO_PAD where the pass runs as one row of pixels (1x1 over 1x1 images). Memoised."""
    key = (n, c, h, w, k, r, s, tuple(stride), tuple(padding), tuple(dilation))
    hit = _dy_pads.get(key)
    if hit is None:
        from dfpgen import conv, plan_bwd_data
        from dfpgen.spec import spec_of
        spec = spec_of(n, c, h, w, k, r, s, tuple(stride), tuple(padding), tuple(dilation), "bwd_data")
        hit = NO_PAD if conv._pointwise_on_pixels(spec) else plan_bwd_data.dy_padding(spec)
        _dy_pads[key] = hit
    return hit


def _conv2d_forward(x, weight, bias, stride, padding, dilation, bits, rounding, overflow,
                    threads, seed=None, wkey=None, keep_pad=False):
    """Returns (y, X's INT16 NHWC buffer, X's exponent tensor, the buffer's zero padding
    (top, bottom, left, right)); the padding is all 0 (the buffer (N, H, W, Cp)) unless
    ``keep_pad`` lets X be saved in the zero-padded layout a stride-1 conv reads: as a fused
    BatchNorm writes it once a conv asked (as it is from the next call on; padded here on
    that call), or as X is quantized here."""
    from dfpgen import conv, pack
    from dfpgen.fwd_family import padded_nhwc
    fmt = _fmt(bits, rounding)
    wq = packed_weight(weight if wkey is None else wkey, fmt)
    qx, bound, handed = _handed_over(x, fmt)
    xbuf = held = None
    pad = NO_PAD
    if qx is None:
        # quantized straight into the layout the kernel reads (zero-padded for a stride-1
        # conv when what is saved may keep that padding), keeping the mantissas' channel
        # range as they are written: exact mode's bound without a scan of X
        ph, pw = padding
        if keep_pad and tuple(stride) == (1, 1) and (ph or pw):
            pad = (ph, ph, pw, pw)
        qx, held, bound = pack.quantize_padded(_np_activation(x), pad, fmt, name="conv2d input X",
                                               threads=_threads(threads), channel_range=True)
        if pad != NO_PAD:
            xbuf = (held, pad)
    else:
        # a stride-1 conv reads X zero-padded: the BatchNorm writes it that way from its next
        # call on (a strided conv reads phase images; 1x1 unpadded ones the dense rows)
        ph, pw = padding
        want = (ph, ph, pw, pw) if tuple(stride) == (1, 1) else NO_PAD
        settled = handed.producer.want_int16_pad(want)
        if keep_pad and settled != NO_PAD:
            # What is saved for backward has the layout the BatchNorm writes from now on,
            # also on the call that asked (padded here once, for the kernel too): a
            # recomputation (non-reentrant torch.utils.checkpoint) must save tensors of the
            # shapes the original forward saved.
            pad = settled
            held = handed.buffer if handed.pad == pad else padded_nhwc(qx.mantissa, pad, handed.buffer.shape[-1])
        cand, cand_pad = (held, pad) if held is not None else (handed.buffer, handed.pad)
        if want != NO_PAD and cand_pad == want:
            xbuf = (cand, cand_pad)
    b = None if bias is None else bias.detach().float().contiguous().numpy()
    y, info = conv.conv2d(qx, wq, b, tuple(stride), tuple(padding),
                          tuple(dilation), overflow=overflow, fmt=fmt, threads=_threads(threads),
                          return_info=True, warn_overflow=False, x_channel_bound=bound,
                          x_buffer=xbuf)
    _report_saturation(info, _shape_key(weight.shape, stride, padding, dilation))
    if observers:
        _observe(pass_kind="fwd", info=info, seed=seed, x=x, weight=weight, bias=bias, x_q=qx,
                 output=y, stride=stride, padding=padding, dilation=dilation, fmt=fmt)
    if held is None:
        held = np.ascontiguousarray(pack.nhwc_buffer(qx))
    return (_to_torch(y, output_channels_last(x, weight)), torch.from_numpy(held),
            torch.tensor(qx.exponent, dtype=torch.int32), pad)


@torch.library.custom_op("dfpgen::conv2d", mutates_args=())
def conv2d_op(x: Tensor, weight: Tensor, bias: Optional[Tensor], stride: List[int],
              padding: List[int], dilation: List[int], bits: int, rounding: str,
              overflow: str, grad_rounding: str, seed: Tensor,
              threads: int) -> Tuple[Tensor, Tensor, Tensor]:
    """DFP16 forward convolution. x float32 (N, C, H, W) NCHW or channels_last, weight
    float32 (K, C, R, S), bias float32 (K,) or None. Returns (y float32 (N, K, P, Q), the
    INT16 NHWC buffer of X (N, H, W, Cpad), X's exponent as an int32 scalar tensor).
    ``grad_rounding`` and ``seed`` (int64 scalar tensor, so a new seed per step does not
    re-trace under torch.compile) are kept for the backward pass's dY."""
    return _conv2d_forward(x, weight, bias, stride, padding, dilation, bits, rounding,
                           overflow, threads, seed)[:3]


@conv2d_op.register_fake
def _conv2d_fake(x, weight, bias, stride, padding, dilation, bits, rounding, overflow,
                 grad_rounding, seed, threads):
    n, c, h, w = x.shape
    k, _, r, s = weight.shape
    p, q = _out_hw(h, w, r, s, stride, padding, dilation)
    fmt = torch.channels_last if output_channels_last(x, weight) else torch.contiguous_format
    y = x.new_empty((n, k, p, q), dtype=torch.float32).contiguous(memory_format=fmt)
    buf = x.new_empty((n, h, w, padded_channels(c)), dtype=torch.int16)
    return y, buf, x.new_empty((), dtype=torch.int32)


def _conv2d_backward_impl(grad_y, x_buf, x_exp, weight, stride, padding, dilation, bits,
                          grad_rounding, overflow, seed, threads, channels_last, need_input,
                          need_weight, wkey=None, x_pad=NO_PAD):
    from dfpgen import conv, pack
    n, h, w, _ = x_buf.shape
    h, w = h - x_pad[0] - x_pad[1], w - x_pad[2] - x_pad[3]
    k, c, r, s = weight.shape
    gfmt = _fmt(bits, grad_rounding)
    qkw = dict(seed=int(seed.item()), name="conv2d grad_output dY", threads=_threads(threads))
    dy_buf = dy_bound = None
    if need_input:
        # straight into the zero-padded buffer backward-data reads (no padding copy; dense
        # where it reads no padding), keeping the mantissas' per-channel range as they are
        # written (exact mode's bound, no scan); backward-weight reads the image inside it
        dy_pad = _dy_padding(n, c, h, w, k, r, s, stride, padding, dilation)
        qdy, buf, dy_bound = pack.quantize_padded(_np_activation(grad_y), dy_pad, gfmt,
                                                  channel_range=True, **qkw)
        dy_buf = (buf, dy_pad) if dy_pad != NO_PAD else None
    else:
        qdy = pack.quantize_pack(_np_activation(grad_y), gfmt, **qkw)
    kw = dict(overflow=overflow, fmt=_fmt(bits, "nearest"), threads=_threads(threads), warn_overflow=False)
    args = (tuple(stride), tuple(padding), tuple(dilation))
    shape = _shape_key(weight.shape, stride, padding, dilation)
    gx = gw = grad_y.new_empty((0,))
    ev = dict(seed=seed, grad_y=grad_y, dy_q=qdy, weight=weight, stride=stride,
              padding=padding, dilation=dilation, fmt=gfmt)
    if need_input:
        wq = packed_weight(weight if wkey is None else wkey, kw["fmt"], "conv2d_input weight W")
        res = conv.conv2d_input((n, c, h, w), wq, qdy, *args, return_info=True,
                                grad_output_buffer=dy_buf, grad_output_bound=dy_bound, **kw)
        gx = _to_torch(res.output, channels_last)
        _report_saturation(res.info, shape)
        if observers:
            _observe(pass_kind="bwd_data", info=res.info, output=res.output, **ev)
    if need_weight:
        qx = saved_input(x_buf, x_exp, c, bits, x_pad)
        res = conv.conv2d_weight(qx, (k, c, r, s), qdy, *args, return_info=True, **kw)
        gw = _to_torch(res.output, False)
        _report_saturation(res.info, shape)
        if observers:
            _observe(pass_kind="bwd_weight", info=res.info, output=res.output, x_q=qx, **ev)
    return gx, gw


@torch.library.custom_op("dfpgen::conv2d_backward", mutates_args=())
def conv2d_backward_op(grad_y: Tensor, x_buf: Tensor, x_exp: Tensor, weight: Tensor,
                       stride: List[int], padding: List[int], dilation: List[int], bits: int,
                       grad_rounding: str, overflow: str, seed: Tensor, threads: int,
                       channels_last: bool, need_input: bool,
                       need_weight: bool) -> Tuple[Tensor, Tensor]:
    """DFP16 backward-data and backward-weight from one quantization of dY.

    grad_y float32 (N, K, P, Q); x_buf/x_exp as returned by ``dfpgen::conv2d``; weight
    float32 (K, C, R, S). Returns (dX float32 (N, C, H, W), dW float32 (K, C, R, S)); a pass
    not needed returns an empty (0,) tensor. ``seed`` (int64 scalar tensor) keys stochastic
    rounding of dY."""
    return _conv2d_backward_impl(grad_y, x_buf, x_exp, weight, stride, padding, dilation, bits,
                                 grad_rounding, overflow, seed, threads, channels_last,
                                 need_input, need_weight)


@conv2d_backward_op.register_fake
def _conv2d_backward_fake(grad_y, x_buf, x_exp, weight, stride, padding, dilation, bits,
                          grad_rounding, overflow, seed, threads, channels_last, need_input,
                          need_weight):
    n, h, w, _ = x_buf.shape
    k, c, r, s = weight.shape
    gx = gw = grad_y.new_empty((0,))
    if need_input:
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        gx = grad_y.new_empty((n, c, h, w)).contiguous(memory_format=fmt)
    if need_weight:
        gw = grad_y.new_empty((k, c, r, s))
    return gx, gw


def _conv2d_setup(ctx, inputs, output):
    (x, weight, bias, stride, padding, dilation, bits, rounding, overflow, grad_rounding,
     seed, threads) = inputs
    _, buf, exp = output
    ctx.save_for_backward(buf, exp, weight, seed)
    ctx.conf = (stride, padding, dilation, bits, grad_rounding, overflow, threads)
    ctx.channels_last = _strict_channels_last(x)
    ctx.has_bias = bias is not None


def _conv2d_backward(ctx, grad_y, _gbuf, _gexp, backward_op=None):
    buf, exp, weight, seed = ctx.saved_tensors
    stride, padding, dilation, bits, rounding, overflow, threads = ctx.conf
    need_x, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    gx = gw = gb = None
    if need_x or need_w:
        gx, gw = (backward_op or conv2d_backward_op)(
            grad_y, buf, exp, weight, stride, padding, dilation, bits, rounding, overflow, seed,
            threads, ctx.channels_last, need_x, need_w)
        gx = gx if need_x else None
        gw = gw if need_w else None
    if ctx.has_bias and ctx.needs_input_grad[2]:
        gb = grad_y.sum((0, 2, 3))
    return gx, gw, gb, None, None, None, None, None, None, None, None, None


conv2d_op.register_autograd(_conv2d_backward, setup_context=_conv2d_setup)


class _Conv2dEager(torch.autograd.Function):
    """``dfpgen::conv2d`` with its autograd, for eager mode: the same implementations and
    saved tensors, without the custom ops' dispatch (about 0.3 ms per forward + backward of
    a layer, measured on a Zen 3; a ResNet-20 step makes 21 of them). ``torch.compile``,
    fake tensors and ``opcheck`` go through the registered ops."""

    @staticmethod
    def forward(ctx, *inputs):
        (x, weight, bias, stride, padding, dilation, bits, rounding, overflow, grad_rounding,
         seed, threads) = inputs
        out = _conv2d_forward(x, weight, bias, stride, padding, dilation, bits, rounding,
                              overflow, threads, seed, keep_pad=True)
        _conv2d_setup(ctx, inputs, out[:3])
        ctx.x_pad = out[3]
        ctx.dfp_checks_dy = True  # see backward; dfpgen.runtime.nonfinite names the layer
        return out[0]

    @staticmethod
    @once_differentiable  # the kernels' backward has no graph: create_graph=True must raise
    def backward(ctx, grad_y):
        run = partial(_conv2d_backward, ctx, backward_op=partial(_conv2d_backward_impl, x_pad=ctx.x_pad))
        layer = getattr(ctx, "dfp_layer", None)
        if layer is None:
            return run(grad_y, None, None)
        from .nonfinite import _check_grad
        if not (ctx.needs_input_grad[0] or ctx.needs_input_grad[1]):
            # only the bias's gradient: dY is not quantized, so nothing else meets a NaN/Inf
            zeros = _check_grad(layer, grad_y)
            return run(grad_y if zeros is None else zeros, None, None)
        try:
            return run(grad_y, None, None)
        except DfpError:
            if _check_grad(layer, grad_y) is None:  # dY is finite: another error
                raise
            return run(torch.zeros_like(grad_y), None, None)  # policy "skip": dY taken as 0


def _eager(*tensors) -> bool:
    """Plain tensors outside ``torch.compile``: the custom ops' dispatch is not needed."""
    return not torch.compiler.is_compiling() and all(t is None or type(t) in (Tensor, torch.nn.Parameter)
                                                     for t in tensors)


_OP_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def check_threads(threads) -> int:
    """``threads`` as an int >= 0 (0: dfpgen's default count); raises DfpError otherwise,
    as ``dfpgen.conv2d`` does (a negative count is a mistake, not the default)."""
    import operator

    from dfpgen.errors import DfpError
    try:
        if isinstance(threads, bool):
            raise TypeError
        n = operator.index(threads)
    except TypeError:
        n = -1
    if n < 0:
        raise DfpError(f"threads must be an int >= 0 (0: the default count), got {threads!r}")
    return n


def _check_operands(*named):
    from dfpgen.errors import DfpError
    for what, t in named:
        if t is not None and t.dtype not in _OP_DTYPES:
            raise DfpError(f"{what} has dtype {t.dtype}; the DFP16 ops take float32, bfloat16 or "
                           "float16 (use torch.nn.functional for other dtypes)")


def _defaults(fmt, overflow, grad_rounding):
    from . import config
    if fmt is not None and not isinstance(fmt, DfpFormat):
        from dfpgen.errors import DfpError
        raise DfpError(f"fmt must be a dfpgen.DfpFormat, got {type(fmt).__name__}")
    return (fmt or config.default_format(),
            config.check_overflow(overflow or config.default_overflow()),
            config.check_rounding(grad_rounding or config.default_grad_rounding()))


def _seed_tensor(seed) -> Tensor:
    if isinstance(seed, Tensor):
        return seed
    return torch.tensor(int(seed) & 0x7FFFFFFF, dtype=torch.int64)


def _pair(v, name: str) -> List[int]:
    if isinstance(v, int):
        return [v, v]
    v = [int(i) for i in v]
    if len(v) != 2:
        from dfpgen.errors import DfpError
        raise DfpError(f"{name} must be an int or a pair, got {v!r}")
    return v


def conv2d(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None, stride=1, padding=0,
           dilation=1, *, fmt: Optional[DfpFormat] = None, overflow: Optional[str] = None,
           grad_rounding: Optional[str] = None, seed: int = 0, threads: int = 0) -> Tensor:
    """DFP16 ``torch.nn.functional.conv2d`` (groups=1, zero padding) with autograd.

    x float32 (N, C, H, W) (NCHW or channels_last), weight float32 (K, C, R, S), bias
    float32 (K,) or None; returns float32 (N, K, P, Q), channels_last if x or weight is.
    ``fmt`` quantizes X and W; ``grad_rounding`` (``"nearest"``/``"stochastic"``) with
    ``seed`` quantizes dY in the backward pass; ``overflow`` is ``"exact"`` or ``"fast"``;
    None takes the process default (:mod:`dfpgen.runtime.config`); ``threads=0`` uses
    dfpgen's thread count.
    Raises :class:`dfpgen.DfpError` on NaN/Inf operands (naming the tensor) or bad shapes.
    """
    fmt, overflow, grad_rounding = _defaults(fmt, overflow, grad_rounding)
    threads = check_threads(threads)
    _check_operands(("conv2d input x", x), ("conv2d weight", weight), ("conv2d bias", bias))
    if x.numel() == 0:  # an empty batch has nothing to quantize; PyTorch gives its shape
        return torch.nn.functional.conv2d(x, weight, bias, stride, padding, dilation)
    args = (x, weight, bias, _pair(stride, "stride"), _pair(padding, "padding"),
            _pair(dilation, "dilation"), fmt.bits, fmt.rounding, overflow, grad_rounding,
            _seed_tensor(seed), threads)
    if _eager(x, weight, bias):
        return _Conv2dEager.apply(*args)
    return conv2d_op(*args)[0]


# --- linear: a 1x1 convolution over the N rows as pixels (docs/ARCHITECTURE.md §2) -------------------


def _as_pixels(x2d: Tensor) -> Tensor:
    # (M, F) row-major is the NHWC buffer of a (1, F, 1, M) image: a view, no copy.
    m, f = x2d.shape
    return x2d.view(1, 1, m, f).permute(0, 3, 1, 2)


@torch.library.custom_op("dfpgen::linear", mutates_args=())
def linear_op(x: Tensor, weight: Tensor, bias: Optional[Tensor], bits: int, rounding: str,
              overflow: str, grad_rounding: str, seed: Tensor,
              threads: int) -> Tuple[Tensor, Tensor, Tensor]:
    """DFP16 ``x @ weight.T + bias``: x float32 (M, F), weight float32 (O, F), bias (O,) or
    None. Returns (y float32 (M, O), X's INT16 NHWC buffer (1, 1, M, Fpad), X's exponent).
    ``grad_rounding`` and ``seed`` are kept for the backward pass, as in ``dfpgen::conv2d``."""
    return _linear_forward(x, weight, bias, bits, rounding, overflow, grad_rounding, seed, threads)


def _linear_forward(x, weight, bias, bits, rounding, overflow, grad_rounding, seed, threads):
    xc = x.detach().float().contiguous()
    w4 = weight.detach().float().contiguous().view(weight.shape[0], weight.shape[1], 1, 1)
    y, buf, exp, _ = _conv2d_forward(_as_pixels(xc), w4, bias, [1, 1], [0, 0], [1, 1], bits,
                                  rounding, overflow, threads, seed, wkey=weight)
    # y is (1, O, 1, M) channels_last, whose buffer is (M, O) row-major.
    return y.permute(0, 2, 3, 1).reshape(x.shape[0], weight.shape[0]).clone(), buf, exp


@linear_op.register_fake
def _linear_fake(x, weight, bias, bits, rounding, overflow, grad_rounding, seed, threads):
    m, f = x.shape
    return (x.new_empty((m, weight.shape[0])),
            x.new_empty((1, 1, m, padded_channels(f)), dtype=torch.int16),
            x.new_empty((), dtype=torch.int32))


@torch.library.custom_op("dfpgen::linear_backward", mutates_args=())
def linear_backward_op(grad_y: Tensor, x_buf: Tensor, x_exp: Tensor, weight: Tensor, bits: int,
                       grad_rounding: str, overflow: str, seed: Tensor, threads: int,
                       need_input: bool, need_weight: bool) -> Tuple[Tensor, Tensor]:
    """Backward of ``dfpgen::linear``: (dX float32 (M, F), dW float32 (O, F)); a pass not
    needed returns an empty (0,) tensor."""
    return _linear_backward_impl(grad_y, x_buf, x_exp, weight, bits, grad_rounding, overflow, seed,
                                 threads, need_input, need_weight)


def _linear_backward_impl(grad_y, x_buf, x_exp, weight, bits, grad_rounding, overflow, seed,
                          threads, need_input, need_weight):
    m, o = grad_y.shape
    w4 = weight.detach().float().contiguous().view(o, weight.shape[1], 1, 1)
    gx, gw = _conv2d_backward_impl(_as_pixels(grad_y.detach().float().contiguous()), x_buf, x_exp,
                                w4, [1, 1], [0, 0], [1, 1], bits, grad_rounding, overflow,
                                seed, threads, True, need_input, need_weight, wkey=weight)
    if need_input:
        gx = gx.permute(0, 2, 3, 1).reshape(m, weight.shape[1]).clone()
    if need_weight:
        gw = gw.view(o, weight.shape[1]).clone()
    return gx, gw


@linear_backward_op.register_fake
def _linear_backward_fake(grad_y, x_buf, x_exp, weight, bits, grad_rounding, overflow, seed,
                          threads, need_input, need_weight):
    gx = gw = grad_y.new_empty((0,))
    if need_input:
        gx = grad_y.new_empty((grad_y.shape[0], weight.shape[1]))
    if need_weight:
        gw = grad_y.new_empty(weight.shape)
    return gx, gw


def _linear_setup(ctx, inputs, output):
    x, weight, bias, bits, rounding, overflow, grad_rounding, seed, threads = inputs
    _, buf, exp = output
    ctx.save_for_backward(buf, exp, weight, seed)
    ctx.conf = (bits, grad_rounding, overflow, threads)
    ctx.has_bias = bias is not None


def _linear_backward(ctx, grad_y, _gbuf, _gexp, backward_op=None):
    buf, exp, weight, seed = ctx.saved_tensors
    bits, rounding, overflow, threads = ctx.conf
    need_x, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    gx = gw = gb = None
    if need_x or need_w:
        gx, gw = (backward_op or linear_backward_op)(grad_y, buf, exp, weight, bits, rounding,
                                                     overflow, seed, threads, need_x, need_w)
        gx = gx if need_x else None
        gw = gw if need_w else None
    if ctx.has_bias and ctx.needs_input_grad[2]:
        gb = grad_y.sum(0)
    return gx, gw, gb, None, None, None, None, None, None


linear_op.register_autograd(_linear_backward, setup_context=_linear_setup)


class _LinearEager(torch.autograd.Function):
    """``dfpgen::linear`` with its autograd, for eager mode (as :class:`_Conv2dEager`): the
    same implementations and saved tensors without the custom ops' dispatch (a network's
    classifier pays it at every step); ``torch.compile``, fake tensors and ``opcheck`` go
    through the registered ops."""

    @staticmethod
    def forward(ctx, *inputs):
        out = _linear_forward(*inputs)
        _linear_setup(ctx, inputs, out)
        return out[0]

    @staticmethod
    @once_differentiable  # the kernels' backward has no graph: create_graph=True must raise
    def backward(ctx, grad_y):
        return _linear_backward(ctx, grad_y, None, None, backward_op=_linear_backward_impl)


def linear(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None, *,
           fmt: Optional[DfpFormat] = None, overflow: Optional[str] = None,
           grad_rounding: Optional[str] = None, seed: int = 0, threads: int = 0) -> Tensor:
    """DFP16 ``torch.nn.functional.linear`` with autograd: x float32 (..., F), weight float32
    (O, F), bias (O,) or None -> float32 (..., O). Leading dims are flattened into rows,
    which the kernels treat as pixels of a 1x1 convolution. Arguments as :func:`conv2d`."""
    fmt, overflow, grad_rounding = _defaults(fmt, overflow, grad_rounding)
    threads = check_threads(threads)
    _check_operands(("linear input x", x), ("linear weight", weight), ("linear bias", bias))
    if x.numel() == 0:
        return torch.nn.functional.linear(x, weight, bias)
    lead = x.shape[:-1]
    args = (x.reshape(-1, x.shape[-1]), weight, bias, fmt.bits, fmt.rounding, overflow,
            grad_rounding, _seed_tensor(seed), threads)
    y = _LinearEager.apply(*args) if _eager(x, weight, bias) else linear_op(*args)[0]
    return y.reshape(*lead, weight.shape[0])

