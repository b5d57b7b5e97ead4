"""numpy golden model of the fused BatchNorm kernels (``dfpgen/bn.py``), bit for bit.

Same arithmetic, same order: float32 multiply then add (no fused multiply-add),
round-to-nearest-even mantissas clamped to the format, statistics summed in float64 over
chunks of ``bn.CHUNK`` (or the given) pixels in pixel order and the chunks added in chunk order.
"""
from __future__ import annotations

import numpy as np

from . import bn
from .dfp import DFP16, DfpFormat, exponent_for


def stats(x: np.ndarray, chunk: int = bn.CHUNK) -> bn.BnStats:
    """Per-channel sum / sumsq / min / max of float32 (M, C), summed as the kernel sums
    (chunks of ``chunk`` pixels)."""
    M, C = x.shape
    nch = -(-M // chunk)
    xd = np.zeros((nch * chunk, C)); xd[:M] = x
    xd = xd.reshape(nch, chunk, C)
    s = np.zeros((nch, C)); q = np.zeros((nch, C))
    for j in range(chunk):  # pixel order inside each chunk (padding pixels add 0)
        s += xd[:, j]
        q += xd[:, j] * xd[:, j]
    ts = np.zeros(C); tq = np.zeros(C)
    for i in range(nch):
        ts += s[i]; tq += q[i]
    return bn.BnStats(M, ts, tq, x.min(axis=0), x.max(axis=0))


def forward(x: np.ndarray, scale, shift, *, relu: bool = True, residual=None, residual_range=None,
            fmt: DfpFormat = DFP16) -> dict:
    """Mantissas, exponents, float32 output and ReLU mask of the fused forward pass.

    The exponents are recomputed here from the data (max-abs of x; the output's from the
    per-channel affine image without residual, else from the stated bound), so a test of
    the kernel's exponent against ``exponent_for(max |y|)`` is separate (see tests)."""
    x = np.asarray(x, np.float32)
    M, C = x.shape
    x_exp = exponent_for(float(np.max(np.abs(x))) if x.size else 0.0, fmt)
    q = bn.mantissa_f32(x, x_exp, fmt)
    sc = bn.mantissa_scale(np.asarray(scale, np.float32), x_exp)
    sh = np.asarray(shift, np.float32)
    a = (q * sc) + sh
    if residual is not None:
        a = a + np.asarray(residual, np.float32)
    else:
        a = a + np.float32(0)
    live = a > 0
    y = np.where(live, a, np.float32(0)).astype(np.float32) if relu else (a + np.float32(0))
    if residual is None:
        mx = float(np.max(np.abs(y)))  # the exact rule: the max |output| before rounding
    else:
        lo, hi = bn.affine_range(q.min(axis=0), q.max(axis=0), sc, sh)
        _, _, mx = bn.output_bound(lo, hi, relu=relu, res_lo=residual_range[0], res_hi=residual_range[1])
    y_exp = exponent_for(mx, fmt)
    k = bn.mantissa_f32(y, y_exp, fmt)
    y_q = np.zeros((M, C + C % 2), np.int16)
    y_q[:, :C] = k.astype(np.int16)
    return {"x_q": q.astype(np.int16), "x_exp": x_exp, "y_q": y_q, "y_exp": y_exp,
            "y_f": (k * bn.dequant_scale(y_exp)).astype(np.float32), "live": live, "a": a, "y": y}


def unpack_mask(mask: np.ndarray, C: int) -> np.ndarray:
    """bool (M, C) from the kernel's ReLU bit mask (bit j of byte b: channel 8*b + j)."""
    return np.unpackbits(mask, axis=1, bitorder="little")[:, :C].astype(bool)
