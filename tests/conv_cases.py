"""Shared shape matrix and helpers of the forward / backward-data tests (not a test module)."""
from __future__ import annotations

import numpy as np

from dfpgen.dfp import DfpTensor, quantize
from dfpgen.spec import ConvSpec

# (N, C, H, W, K, R, S, stride, padding, dilation): tails in C and K (odd, not multiples of
# 16), W not a multiple of the pixel block, stride 2, padding, dilation 2, 1x1, 7x7 with C=3,
# batch 1, and a pair of 16-lane blocks with a channel tail.
SHAPES = [
    (2, 5, 9, 11, 7, 3, 3, 1, 1, 1),
    (1, 3, 13, 12, 17, 3, 3, 2, 1, 1),
    (2, 6, 10, 9, 5, 1, 1, 2, 0, 1),
    (1, 4, 11, 10, 9, 3, 3, 2, 2, 2),
    (1, 3, 16, 15, 8, 7, 7, 2, 3, 1),
    (1, 33, 7, 7, 19, 3, 3, 1, 0, 2),
    (2, 18, 6, 31, 37, 3, 1, 1, (1, 0), 1),
    (1, 2, 5, 5, 3, 2, 2, (1, 2), 0, 1),
    (1, 3, 4, 9, 5, 3, 2, (2, 1), (3, 2), (1, 2)),   # padding wider than the filter reach
]


def ids(shapes):
    return ["n{}c{}h{}w{}k{}r{}s{}u{}p{}d{}".format(*s).replace(" ", "").replace("(", "").replace(")", "")
            .replace(",", "_") for s in shapes]


def operands(shape, seed=0, adversarial=False):
    """DFP16 x (NCHW), w (KCRS) and dy (NKPQ) for ``shape``; ``adversarial``: every mantissa
    +/-32767 with aligned signs, the worst case for INT32 partials."""
    n, c, h, w, k, r, s, u, p, d = shape
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, c, h, w)).astype(np.float32)
    wt = rng.standard_normal((k, c, r, s)).astype(np.float32)
    out = ConvSpec(n, c, h, w, k, r, s, u, p, d).output_shape
    dy = rng.standard_normal(out).astype(np.float32)
    if adversarial:
        full = lambda a, v: DfpTensor(np.full(a.shape, v, np.int16), -15)
        return full(x, 32767), full(wt, 32767), full(dy, -32767)
    return quantize(x, name="x"), quantize(wt, name="w"), quantize(dy, name="dy")


def conv_bound(xd, wd, n_partials, stride, padding, dilation):
    """Rounding bound of a flushed FP32 result against float64 on the same operands:
    each of ``n_partials`` partials is rounded once to float32 (vcvtdq2ps) and each FP32
    addition rounds once, so |error| <= (2 n_partials) * 2**-24 * sum |x w| (recursive
    summation, Higham 2002 §4.2) computed from the absolute operands."""
    import torch
    a = torch.nn.functional.conv2d(torch.from_numpy(np.abs(xd)).double(), torch.from_numpy(np.abs(wd)).double(),
                                   stride=stride, padding=padding, dilation=dilation)
    return (2 * n_partials) * 2.0 ** -24 * a.numpy()
