"""``DFPMaxPool2d``: ``nn.MaxPool2d`` whose autograd keeps only the argmax positions.

PyTorch's max pooling saves its float32 input and int64 indices for backward; backward
needs only the indices (where each output's gradient goes). After ResNet's stem (conv ->
fused BatchNorm + ReLU -> max pool) that input is the largest float32 activation autograd
would otherwise keep (32 x 64 x 112 x 112 float32 at batch 32: 103 MB, plus 51 MB of
indices), against the DFP16 path's aim of INT16 activations end to end (Das et al., ICLR
2018, §3). Here backward keeps the indices as int32 (they index one H x W plane, < 2**31)
and scatters the output gradient with ``scatter_add_``, adding into each input position in
the order of the outputs that chose it, as PyTorch's own backward does: the same bits
(``tests/test_fused_bn.py``). Forward is PyTorch's.

``convert()`` swaps every ``nn.MaxPool2d`` (exact type, without ``return_indices``) for it
when it fuses BatchNorm; ``revert()`` swaps it back. It runs PyTorch's pooling unchanged
when no gradient is needed, for ``return_indices=True``, for inputs other than 4-D
float32, and when DFP16 is switched off (``dfp.enabled(False)``).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import config


class _MaxPoolArgmax(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, kernel_size, stride, padding, dilation, ceil_mode):
        y, idx = F.max_pool2d(x, kernel_size, stride, padding, dilation, ceil_mode=ceil_mode,
                              return_indices=True)
        ctx.save_for_backward(idx.to(torch.int32))
        ctx.in_shape = x.shape
        ctx.channels_last = not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)
        ctx.mark_non_differentiable(idx)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        (idx,) = ctx.saved_tensors
        n, c, h, w = ctx.in_shape
        gx = grad_y.new_zeros((n, c, h * w))
        gx.scatter_add_(2, idx.reshape(n, c, -1).long(), grad_y.reshape(n, c, -1))
        gx = gx.view(n, c, h, w)
        if ctx.channels_last:
            gx = gx.contiguous(memory_format=torch.channels_last)
        return gx, None, None, None, None, None


class DFPMaxPool2d(nn.MaxPool2d):
    """``nn.MaxPool2d`` (same constructor and results) saving int32 argmax positions only
    for backward (see the module docstring). Input (N, C, H, W) float32, NCHW or
    channels_last; output as ``nn.MaxPool2d``'s."""

    def forward(self, x: Tensor) -> Tensor:
        if (not config.is_enabled() or self.return_indices or x.dim() != 4 or x.dtype != torch.float32
                or not (torch.is_grad_enabled() and x.requires_grad)
                or x.shape[2] * x.shape[3] >= 2 ** 31 or torch.compiler.is_compiling()):
            return super().forward(x)
        return _MaxPoolArgmax.apply(x, self.kernel_size, self.stride, self.padding, self.dilation,
                                    self.ceil_mode)
