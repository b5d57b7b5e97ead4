"""``DFPBatchNorm2d``: ``nn.BatchNorm2d`` fused with the ReLU after it (and the residual add
before that ReLU), on dfpgen's generated kernels (``dfpgen.bn``).

Forward, per call: one read of the input X for the per-channel statistics (sum, sum of
squares, min, max), then one pass that quantizes X to DFP16 (kept for backward), normalizes,
adds the residual, applies ReLU and writes the output with its shared exponent fixed before
the pass. Autograd keeps only X's INT16 mantissas (2 bytes per element; plus 1 bit per
element, the ReLU mask, when a residual add is fused) instead of FP32 BN input and ReLU output.
Backward: BN backward + ReLU backward from those INT16 values, two passes (a reduction, then
dX), writing float32 dX for the conv before.

The output is a float32 channels_last tensor whose values are exactly the DFP16 output
(mantissa * 2**E); it carries the per-channel range of its values (used when it becomes the
residual operand of a later fused add) and, with ``emit_int16``, the INT16 mantissas.

Semantics as ``nn.BatchNorm2d`` (momentum, ``momentum=None`` cumulative average, unbiased
running variance, eval mode on running statistics, ``track_running_stats=False``, affine or
not) and identical ``state_dict`` keys. Inputs the kernels do not cover (not 4-D float32 on
the CPU, a batch of one pixel per channel in training) and ``dfp.enabled(False)`` run the
PyTorch ops unfused, bit-identical to the unconverted model.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import config

FUSE_MODES = ("none", "relu", "add_relu")


def _rows(t: Tensor) -> tuple[np.ndarray, Tensor]:
    """(M, C) float32 numpy rows of an NCHW-shaped tensor's NHWC memory (a copy only when it
    is not channels_last float32), and the tensor that owns that memory."""
    t = t.detach()
    if t.dtype != torch.float32:
        t = t.float()
    t = t.contiguous(memory_format=torch.channels_last)
    n, c, h, w = t.shape
    return t.permute(0, 2, 3, 1).reshape(n * h * w, c).numpy(), t


def _nchw(rows: np.ndarray, shape) -> Tensor:
    n, c, h, w = shape
    return torch.from_numpy(rows).view(n, h, w, c).permute(0, 3, 1, 2)


class Dfp16Output(NamedTuple):
    """The DFP16 form of a fused BatchNorm's output (:func:`dfp16_of`): ``buffer`` int16
    (N, top+H+bottom, left+W+right, Cp) NHWC with zeros around the image (``pad`` = (top,
    bottom, left, right), all 0 for the dense (N, H, W, Cp) rows) and in the pad channel
    (Cp = C + C % 2); ``exponent`` the shared exponent; ``producer`` the BatchNorm module."""
    buffer: np.ndarray
    exponent: int
    pad: tuple
    producer: "DFPBatchNorm2d"

    @property
    def mantissa(self) -> np.ndarray:
        """int16 (N, C, H, W) view of the image (no copy)."""
        top, bottom, left, right = self.pad
        b = self.buffer
        return b[:, top:b.shape[1] - bottom, left:b.shape[2] - right, :self.producer.num_features
                 ].transpose(0, 3, 1, 2)


def dfp16_of(t: Tensor) -> Optional[Dfp16Output]:
    """The :class:`Dfp16Output` a fused BatchNorm with ``emit_int16`` attached to its output
    ``t``: the DFP16 form of exactly ``t``'s values, or None when ``t`` has none or was
    modified in place since."""
    h = getattr(t, "_dfp16", None)
    if h is None or h[1] != t._version:
        return None
    return h[0]


def value_range(t: Tensor):
    """The per-channel ``(lo, hi)`` float32 numpy ranges a fused BatchNorm attached to its
    output ``t``, or None when ``t`` has none or was modified in place since."""
    r = getattr(t, "_dfp_range", None)
    if r is None or r[2] != t._version:
        return None
    return r[0], r[1]


class _FusedBNFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, residual, mod, mean, var, batch_stats_used, pre, save, sink):
        from dfpgen import bn
        xr, stats = pre  # X's NHWC rows and their statistics, from the module's forward
        C = xr.shape[1]
        gamma = np.ones(C) if weight is None else weight.detach().double().numpy()
        beta = np.zeros(C) if bias is None else bias.detach().double().numpy()
        invstd, scale, shift = bn.affine_params(mean, var, gamma, beta, mod.eps)
        rr = rrange = None
        if residual is not None:
            rr, _ = _rows(residual)
            rrange = value_range(residual)
            if rrange is None:  # no stated range: one read of the residual for its min/max
                st_r = bn.batch_stats(rr, name="residual operand")
                rrange = (st_r.min, st_r.max)
        relu = mod.fuse != "none"
        pad = mod._dfp_int16_pad if mod.emit_int16 else None
        n, _, h, w = x.shape
        f = bn.forward(xr, stats, scale, shift, relu=relu, residual=rr, residual_range=rrange,
                       save_x=save, write_q=mod.emit_int16, write_f=True, name=mod._dfp_label(),
                       out_pad=((n, h, w), pad) if pad and any(pad) else None)
        y = _nchw(f.y_f, x.shape)
        if save:
            xq = torch.from_numpy(f.x_q)
            mask = torch.from_numpy(f.mask) if f.mask is not None else None
            ctx.save_for_backward(xq, mask)
            ctx.conf = (f.x_exp, f.sc, f.sh, np.asarray(mean, np.float64), invstd, gamma, relu,
                        residual is not None, batch_stats_used, x.shape)
            ctx.has = (weight is not None, bias is not None)
        sink.append((f.lo, f.hi, f.y_q, f.y_exp))  # the output's range and INT16 mantissas
        return y

    @staticmethod
    def backward(ctx, grad_y):
        from dfpgen import bn
        xq, mask = ctx.saved_tensors
        x_exp, sc, sh, mean, invstd, gamma, relu, has_res, bsu, shape = ctx.conf
        gr, _ = _rows(grad_y)
        r = bn.backward(gr, xq.numpy(), x_exp, sc, sh, mean, invstd, gamma, relu=relu,
                        mask=None if mask is None else mask.numpy(), residual=has_res,
                        batch_stats_used=bsu)
        gx = _nchw(r.dx, shape) if ctx.needs_input_grad[0] else None
        gw = torch.from_numpy(r.dgamma.astype(np.float32)) if ctx.has[0] and ctx.needs_input_grad[1] else None
        gb = torch.from_numpy(r.dbeta.astype(np.float32)) if ctx.has[1] and ctx.needs_input_grad[2] else None
        gres = _nchw(r.dres, shape) if has_res and ctx.needs_input_grad[3] else None
        return gx, gw, gb, gres, None, None, None, None, None, None, None


class DFPBatchNorm2d(nn.BatchNorm2d):
    """``nn.BatchNorm2d`` + ReLU (``fuse="relu"``), + residual add + ReLU (``"add_relu"``:
    ``forward(x, residual)`` returns ``relu(bn(x) + residual)``), or alone (``"none"``), with
    DFP16 activations. Same constructor arguments as ``nn.BatchNorm2d`` plus keyword-only
    ``fuse`` and ``emit_int16`` (also write the INT16 mantissas, attached to the output as
    ``_dfp16``, read by :func:`dfp16_of`: the next DFP16 conv takes them as its input with no
    quantize pass). Input float32 (N, C, H, W), NCHW or
    channels_last; output float32 (N, C, H, W) channels_last. Raises ``ValueError`` for an
    unknown ``fuse`` and ``dfpgen.DfpError`` for NaN/Inf in the input (naming the layer)."""

    _dfp_int16_pad = None  # the INT16 output's zero padding, decided by want_int16_pad

    def __init__(self, *args, fuse: str = "relu", emit_int16: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self._dfp_bn_init(fuse, emit_int16)

    def _dfp_bn_init(self, fuse: str = "relu", emit_int16: bool = False, name: Optional[str] = None):
        if fuse not in FUSE_MODES:
            raise ValueError(f"fuse must be one of {FUSE_MODES}, got {fuse!r}")
        self.fuse = fuse
        self.emit_int16 = bool(emit_int16)
        self.dfp_name = name
        self._dfp_int16_pad = None

    def want_int16_pad(self, pad: tuple) -> tuple:
        """A consumer (the next stride-1 DFP16 conv) reads the INT16 output with zero padding
        ``pad`` = (top, bottom, left, right): from the next call on the output is written
        that way, so the conv needs no padding copy. The first consumer to ask decides (an
        output read by convs of different padding would otherwise switch every call; the
        others copy, as without the request). Returns the padding decided."""
        if self._dfp_int16_pad is None:
            self._dfp_int16_pad = tuple(int(v) for v in pad)
        return self._dfp_int16_pad

    def _dfp_label(self) -> str:
        return f"BatchNorm {self.dfp_name!r} input" if self.dfp_name else "BatchNorm input"

    def _unfused(self, x: Tensor, residual: Optional[Tensor]) -> Tensor:
        y = super().forward(x)
        if residual is not None:
            y = y + residual
        if self.fuse == "none":
            return y
        y = F.relu(y)
        y._dfp_relu = y._version  # the FusedReLU after it passes it through (ReLU once, as fused)
        return y

    def _kernel_reason(self, x: Tensor, residual: Optional[Tensor]) -> Optional[str]:
        if x.dim() != 4 or x.dtype != torch.float32 or x.device.type != "cpu" or x.numel() == 0:
            return "input"
        if residual is not None and (residual.shape != x.shape or residual.dtype != torch.float32
                                     or residual.device.type != "cpu"):
            return "residual"
        if self.training and x.shape[0] * x.shape[2] * x.shape[3] <= 1:
            return "one value per channel"  # PyTorch's error message comes from the unfused op
        return None

    def forward(self, x: Tensor, residual: Optional[Tensor] = None) -> Tensor:
        if (residual is None) != (self.fuse != "add_relu"):
            raise ValueError(f"DFPBatchNorm2d(fuse={self.fuse!r}) "
                             + ("needs a residual operand" if residual is None else "takes no residual operand"))
        if not config.is_enabled() or self._kernel_reason(x, residual) is not None:
            return self._unfused(x, residual)
        self._check_input_dim(x)
        from dfpgen import bn
        xr, _ = _rows(x)
        stats = bn.batch_stats(xr, name=self._dfp_label())
        use_batch = self.training or self.running_mean is None
        if use_batch:
            mean, var = stats.mean, stats.var
            if self.training and self.track_running_stats:
                self._update_running(stats)
        else:
            mean = self.running_mean.double().numpy()
            var = self.running_var.double().numpy()
        need = torch.is_grad_enabled() and any(
            t is not None and t.requires_grad for t in (x, self.weight, self.bias, residual))
        sink: list = []
        y = _FusedBNFunction.apply(x, self.weight, self.bias, residual, self, mean, var, use_batch,
                                   (xr, stats), need, sink)
        return self._tag(y, *sink[0])

    def _update_running(self, stats) -> None:
        # As PyTorch's CPU batch norm: r = f*batch + (1-f)*r, the variance unbiased (n-1).
        with torch.no_grad():
            self.num_batches_tracked.add_(1)
            f = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
            n = stats.count
            uvar = stats.var * (n / (n - 1))
            self.running_mean.copy_(torch.from_numpy(f * stats.mean + (1 - f) * self.running_mean.double().numpy()))
            self.running_var.copy_(torch.from_numpy(f * uvar + (1 - f) * self.running_var.double().numpy()))

    def _tag(self, y: Tensor, lo, hi, y_q, y_exp) -> Tensor:
        y._dfp_range = (lo, hi, y._version)
        if self.fuse != "none":
            y._dfp_relu = y._version
        if y_q is not None:
            n, c, h, w = y.shape
            pad = (0, 0, 0, 0)
            if y_q.ndim == 2:
                y_q = y_q.reshape(n, h, w, y_q.shape[1])
            else:
                pad = self._dfp_int16_pad
            y._dfp16 = (Dfp16Output(y_q, y_exp, pad, self), y._version)
        return y

    def extra_repr(self) -> str:
        return super().extra_repr() + f", fuse={self.fuse!r}"


class FusedReLU(nn.ReLU):
    """The ``nn.ReLU`` after a fused ``DFPBatchNorm2d``: passes the BatchNorm's output through
    (ReLU was applied there) and applies ReLU to anything else, so a ReLU module shared by
    several call sites stays correct at every one of them."""

    def forward(self, x: Tensor) -> Tensor:
        # the tag, not the DFP16 switch: the unfused path (DFP16 off) applied ReLU too, and a
        # second, in-place ReLU would bump the version of the tensor ReLU's backward saved
        if getattr(x, "_dfp_relu", None) == x._version:
            return x
        return F.relu(x, inplace=self.inplace)
