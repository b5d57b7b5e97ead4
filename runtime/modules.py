"""``DFPConv2d`` and ``DFPLinear``: drop-in DFP16 versions of ``nn.Conv2d`` / ``nn.Linear``.

They subclass the PyTorch modules, so constructor arguments, parameters (FP32 master
weights), ``state_dict`` keys and initialisation are identical: an FP32 checkpoint loads into
them and back. Per-layer settings (``dfp_format``, ``overflow``, ``grad_rounding``,
``threads``) are plain attributes, not state; ``None`` means the process default
(:mod:`dfpgen.runtime.config`).

A configuration the kernels do not cover runs the FP32 PyTorch op, with one
:class:`DfpFallbackWarning` per layer naming it and the reason — never a wrong result:
groups > 1, ``padding_mode`` other than ``"zeros"``, ``padding="same"`` whose total padding
is odd in a dimension (an even kernel at dilation 1), inputs that are not float32 / bfloat16 /
float16 or not on the CPU. float16 / bfloat16 inputs and parameters (autocast, or a model
cast with ``.bfloat16()`` / ``.half()`` after ``convert``) are computed in DFP16 like float32
ones (quantized from their float32 value) and the output has the input's dtype, as the
PyTorch layer's would; gradients come back in the dtypes of the input and parameters.
"""
from __future__ import annotations

import itertools
import warnings
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dfpgen.dfp import DfpFormat

from . import config, nonfinite, ops

_DFP_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_layer_ids = itertools.count()


class DfpFallbackWarning(UserWarning):
    """A DFP layer runs in FP32 because the kernels do not cover its configuration."""


class _DfpLayer:
    """Per-layer DFP16 settings and the bookkeeping shared by both layer types."""
    dfp_format: Optional[DfpFormat] = None
    overflow: Optional[str] = None
    grad_rounding: Optional[str] = None
    threads: int = 0
    dfp_name: Optional[str] = None

    def __init__(self, *args, dfp_format: Optional[DfpFormat] = None,
                 overflow: Optional[str] = None, grad_rounding: Optional[str] = None,
                 threads: int = 0, **kwargs):
        # Cooperative: the torch layer (nn.Conv2d / nn.Linear) follows in the MRO and takes
        # its own constructor arguments unchanged.
        super().__init__(*args, **kwargs)
        self._dfp_init(dfp_format, overflow, grad_rounding, threads)

    def _dfp_init(self, dfp_format=None, overflow=None, grad_rounding=None, threads=0,
                  name=None):
        if dfp_format is not None and not isinstance(dfp_format, DfpFormat):
            raise TypeError(f"dfp_format must be a dfpgen.DfpFormat, got {type(dfp_format).__name__}")
        self.dfp_format = dfp_format
        self.overflow = None if overflow is None else config.check_overflow(overflow)
        self.grad_rounding = None if grad_rounding is None else config.check_rounding(grad_rounding)
        self.threads = ops.check_threads(threads)
        self.dfp_name = name
        # Stochastic rounding of dY is keyed on (layer seed, call count): runs that build the
        # model in the same order and take the same steps round identically.
        self.dfp_seed = next(_layer_ids)
        self._dfp_warned = False
        # The call count is a tensor (a plain attribute: not in state_dict) so that
        # torch.compile traces one graph that increments it, instead of specialising on a
        # Python int and recompiling at every step.
        self._dfp_calls = torch.zeros((), dtype=torch.int64)

    @property
    def dfp_calls(self) -> int:
        """DFP16 forward calls of this layer so far."""
        return int(self._calls_tensor())

    def _calls_tensor(self) -> Tensor:
        t = self.__dict__.get("_dfp_calls")
        if not isinstance(t, Tensor):
            t = self.__dict__["_dfp_calls"] = torch.zeros((), dtype=torch.int64)
        return t

    def _settings(self) -> dict:
        calls = self._calls_tensor()
        calls.add_(1)
        seed = torch.bitwise_and(calls + getattr(self, "dfp_seed", 0) * 1_000_003, 0x7FFFFFFF)
        return dict(fmt=self.dfp_format or config.default_format(),
                    overflow=self.overflow or config.default_overflow(),
                    grad_rounding=self.grad_rounding or config.default_grad_rounding(),
                    seed=seed, threads=self.threads)

    def _input_reason(self, x: Tensor) -> Optional[str]:
        if x.dtype not in _DFP_DTYPES:
            return f"input dtype {x.dtype} (DFP16 layers take float32/bfloat16/float16)"
        if x.device.type != "cpu":
            return f"input on {x.device} (dfpgen's kernels run on the CPU)"
        return None

    def _params32(self):
        """Weight and bias as float32 (the ops' operands): a no-op for a float32 layer; for a
        bf16 / fp16 one a cast, whose backward casts the gradients back to the parameters'
        dtype."""
        w, b = self.weight, self.bias
        return (w if w.dtype == torch.float32 else w.float(),
                b if b is None or b.dtype == torch.float32 else b.float())

    def _fallback(self, reason: str) -> None:
        # A reason ``convert`` already named in its warning is not repeated at the first call.
        if reason == getattr(self, "_dfp_announced", None):
            return
        if not getattr(self, "_dfp_warned", False):
            self._dfp_warned = True
            name = self.dfp_name or f"{type(self).__name__}({self.extra_repr()})"
            warnings.warn(f"dfpgen: layer {name!r} runs in FP32: {reason}",
                          DfpFallbackWarning, stacklevel=3)

    def _dfp_repr(self) -> str:
        parts = []
        if self.dfp_format is not None:
            parts.append(f"dfp_format={self.dfp_format}")
        if self.overflow is not None:
            parts.append(f"overflow={self.overflow!r}")
        if self.grad_rounding is not None:
            parts.append(f"grad_rounding={self.grad_rounding!r}")
        return "".join(", " + p for p in parts)


def _same_padding(kernel_size, dilation):
    """Explicit padding for ``padding="same"`` at stride 1, or None when it is asymmetric."""
    pads = []
    for k, d in zip(kernel_size, dilation):
        total = d * (k - 1)
        if total % 2:
            return None
        pads.append(total // 2)
    return pads


class DFPConv2d(_DfpLayer, nn.Conv2d):
    """``nn.Conv2d`` whose forward, backward-data and backward-weight run on DFP16 kernels.

    Same arguments as ``nn.Conv2d`` plus keyword-only ``dfp_format``
    (:class:`dfpgen.DfpFormat`), ``overflow`` (``"exact"``/``"fast"``), ``grad_rounding``
    (``"nearest"``/``"stochastic"``), ``threads`` (0: dfpgen's default). Input float32,
    bfloat16 or float16 ``(N, C, H, W)`` or ``(C, H, W)``, NCHW or channels_last; output of
    the input's dtype, channels_last when the input or weight is.
    """

    def unsupported_reason(self) -> Optional[str]:
        """Why the kernels cannot run this layer (None when they can)."""
        if self.groups != 1:
            return f"groups={self.groups} (kernels cover groups=1)"
        if self.padding_mode != "zeros":
            return f"padding_mode={self.padding_mode!r} (kernels pad with zeros)"
        if isinstance(self.padding, str) and self.padding == "same" \
                and _same_padding(self.kernel_size, self.dilation) is None:
            return (f"padding='same' with kernel {tuple(self.kernel_size)} and dilation "
                    f"{tuple(self.dilation)} needs asymmetric padding")
        return None

    def _explicit_padding(self):
        if isinstance(self.padding, str):
            if self.padding == "valid":
                return [0, 0]
            return _same_padding(self.kernel_size, self.dilation)
        return list(self.padding)

    def forward(self, x: Tensor) -> Tensor:
        if not config.is_enabled():
            return super().forward(x)
        reason = self.unsupported_reason() or self._input_reason(x)
        if reason is not None:
            self._fallback(reason)
            return super().forward(x)
        unbatched = x.dim() == 3
        if unbatched:
            x = x.unsqueeze(0)
        w, b = self._params32()
        y = nonfinite.guarded_forward(
            self, x, lambda: ops.conv2d(x.float(), w, b, list(self.stride),
                                        self._explicit_padding(), list(self.dilation),
                                        **self._settings()),
            lambda: self._conv_forward(x, self.weight, self.bias))
        if y.dtype != x.dtype:
            y = y.to(x.dtype)
        return y.squeeze(0) if unbatched else y

    def extra_repr(self) -> str:
        return super().extra_repr() + self._dfp_repr()


class DFPLinear(_DfpLayer, nn.Linear):
    """``nn.Linear`` on DFP16 kernels (a 1x1 convolution over the rows). Same arguments as
    ``nn.Linear`` plus the keyword-only DFP settings of :class:`DFPConv2d`. Input float32,
    bfloat16 or float16 ``(..., in_features)``, output ``(..., out_features)`` of the input's
    dtype."""

    def unsupported_reason(self) -> Optional[str]:
        return None

    def forward(self, x: Tensor) -> Tensor:
        if not config.is_enabled():
            return super().forward(x)
        reason = self._input_reason(x)
        if reason is not None:
            self._fallback(reason)
            return F.linear(x, self.weight, self.bias)
        w, b = self._params32()
        y = nonfinite.guarded_forward(
            self, x, lambda: ops.linear(x.float(), w, b, **self._settings()),
            lambda: F.linear(x, self.weight, self.bias))
        return y if y.dtype == x.dtype else y.to(x.dtype)

    def extra_repr(self) -> str:
        return super().extra_repr() + self._dfp_repr()
