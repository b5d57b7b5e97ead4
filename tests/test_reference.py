"""Golden model (dfpgen/reference.py): exact integer passes against torch float64, and the
flush model against scalar loops written from the module docstring."""
import zlib

import numpy as np
import pytest
import torch

from dfpgen import DfpError
from dfpgen import reference as ref
from dfpgen.dfp import DfpTensor, dequantize

MAXM = 32767

# (N, C, H, W, K, R, S, stride, padding, dilation)
SHAPES = [
    (2, 3, 7, 6, 4, 3, 3, 1, 1, 1),
    (1, 5, 9, 9, 3, 3, 3, 2, 1, 1),            # stride 2, batch 1, odd C/K
    (2, 4, 8, 7, 5, 3, 3, 1, 2, 2),            # dilation 2
    (2, 6, 5, 5, 7, 1, 1, 1, 0, 1),            # 1x1
    (1, 3, 11, 11, 4, 7, 7, 2, 3, 1),          # 7x7, C=3, stride 2
    (1, 2, 6, 9, 3, 2, 3, (2, 1), (1, 0), (1, 2)),  # non-square everything
    (3, 1, 4, 4, 1, 3, 3, 1, 0, 1),            # C = K = 1
    (1, 3, 8, 8, 2, 3, 3, 2, 0, 1),            # stride 2 where the last input row is never read
]


def _dfp(rng, shape, exponent):
    return DfpTensor(rng.integers(-MAXM, MAXM + 1, shape).astype(np.int16), exponent)


def _t(a):
    return torch.from_numpy(np.asarray(a, np.float64))


def _pair(v):
    return (v, v) if isinstance(v, int) else v


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "n{}c{}h{}w{}k{}r{}s{}".format(*s[:7]))
def test_exact_passes_match_torch_float64(shape):
    N, C, H, W, K, R, S, u, p, d = shape
    rng = np.random.default_rng(zlib.crc32(str(shape).encode()))
    xq, wq = _dfp(rng, (N, C, H, W), -20), _dfp(rng, (K, C, R, S), -9)
    y = ref.conv2d_fwd_int(xq.mantissa, wq.mantissa, u, p, d)
    ty = torch.nn.functional.conv2d(_t(dequantize(xq, np.float64)), _t(dequantize(wq, np.float64)),
                                    stride=u, padding=p, dilation=d)
    assert y.dtype == np.int64 and y.shape == tuple(ty.shape)
    # Dequantized operands in float64: every product and sum is exact (< 2**53).
    assert np.array_equal(y * 2.0 ** -29, ty.numpy())
    assert np.array_equal(y, ty.numpy() * 2.0 ** 29)

    dyq = _dfp(rng, y.shape, -3)
    dx = ref.conv2d_bwd_data_int(dyq.mantissa, wq.mantissa, (H, W), u, p, d)
    tdx = torch.nn.grad.conv2d_input((N, C, H, W), _t(wq.mantissa), _t(dyq.mantissa), stride=u, padding=p, dilation=d)
    assert dx.shape == (N, C, H, W) and np.array_equal(dx, tdx.numpy())

    dw = ref.conv2d_bwd_weight_int(xq.mantissa, dyq.mantissa, (R, S), u, p, d)
    tdw = torch.nn.grad.conv2d_weight(_t(xq.mantissa), (K, C, R, S), _t(dyq.mantissa), stride=u, padding=p, dilation=d)
    assert dw.shape == (K, C, R, S) and np.array_equal(dw, tdw.numpy())


def test_gemm_int_matches_int64_matmul():
    rng = np.random.default_rng(3)
    a = rng.integers(-MAXM, MAXM + 1, (5, 37)).astype(np.int16)
    b = rng.integers(-MAXM, MAXM + 1, (37, 3)).astype(np.int16)
    c = ref.gemm_int(a, b)
    assert c.dtype == np.int64
    assert np.array_equal(c, a.astype(np.int64) @ b.astype(np.int64))
    # int16 matmul would wrap; the reference must not.
    assert not np.array_equal(c, (a @ b).astype(np.int64))
    with pytest.raises(DfpError, match="do not agree"):
        ref.gemm_int(a, b.T)


def test_bad_inputs():
    x = np.zeros((1, 3, 5, 5), np.int16)
    w = np.zeros((2, 4, 3, 3), np.int16)
    with pytest.raises(DfpError, match="C=3.*C=4"):
        ref.conv2d_fwd_int(x, w)
    with pytest.raises(DfpError, match="integer"):
        ref.conv2d_fwd_int(x.astype(np.float32), w[:, :3])
    with pytest.raises(DfpError, match="4 dimensions"):
        ref.conv2d_fwd_int(x[0], w[:, :3])
    with pytest.raises(DfpError, match="larger than the padded input"):
        ref.conv2d_fwd_int(x, w[:, :3], dilation=3)
    with pytest.raises(DfpError, match="dY shape"):
        ref.conv2d_bwd_data_int(np.zeros((1, 2, 4, 4), np.int16), w[:, :3], (5, 5))
    with pytest.raises(DfpError, match="dY spatial"):
        ref.conv2d_bwd_weight_int(x, np.zeros((1, 2, 4, 4), np.int16), (3, 3))
    q = lambda a: DfpTensor(a, 0)  # noqa: E731
    with pytest.raises(DfpError, match="even"):
        ref.conv2d_fwd(q(x), q(w[:, :3]), c_block=3)
    with pytest.raises(DfpError, match="flush_pixels"):
        ref.conv2d_bwd_weight(q(x), q(np.zeros((1, 2, 3, 3), np.int16)), 3, flush_pixels=0)
    with pytest.raises(DfpError, match="bias"):
        ref.conv2d_fwd(q(x), q(w[:, :3]), bias=np.zeros(3))
    with pytest.raises(DfpError, match="DfpTensor"):
        ref.conv2d_fwd(x, q(w[:, :3]))


# ----------------------------------------------------------------------------- flush model
def _flush(acc, lane, E):
    return np.float32(acc + np.float32(float(np.float32(lane)) * 2.0 ** E))


def _scalar_fwd(x, w, E, bias, u, pad, d, c_block, flush_taps):
    """The forward flush order of reference.py's docstring, one output at a time."""
    N, C, H, W = x.shape
    K, _, R, S = w.shape
    P = (H + 2 * pad - d * (R - 1) - 1) // u + 1
    Q = (W + 2 * pad - d * (S - 1) - 1) // u + 1
    out = np.zeros((N, K, P, Q), np.float32)
    for n, k, p, q in np.ndindex(N, K, P, Q):
        acc = np.float32(0)
        for c0 in range(0, C, c_block):
            lane, t = 0, 0
            for r in range(R):
                for s in range(S):
                    h, ww = p * u + r * d - pad, q * u + s * d - pad
                    for c in range(c0, min(c0 + c_block, C)):
                        if 0 <= h < H and 0 <= ww < W:
                            lane += int(x[n, c, h, ww]) * int(w[k, c, r, s])
                    t += 1
                    if t % flush_taps == 0 or t == R * S:
                        acc, lane = _flush(acc, lane, E), 0
        out[n, k, p, q] = np.float32(acc + bias[k])
    return out


def _scalar_bwd_data(dy, w, H, W, E, u, pad, d, k_block, flush_taps):
    N, K, P, Q = dy.shape
    _, C, R, S = w.shape
    out = np.zeros((N, C, H, W), np.float32)
    for n, c, h, ww in np.ndindex(N, C, H, W):
        acc = np.float32(0)
        for k0 in range(0, K, k_block):
            lane, t = 0, 0
            for r in range(R):
                for s in range(S):
                    pn, qn = h + pad - r * d, ww + pad - s * d
                    ok = pn % u == 0 and qn % u == 0 and 0 <= pn // u < P and 0 <= qn // u < Q
                    for k in range(k0, min(k0 + k_block, K)):
                        if ok:
                            lane += int(dy[n, k, pn // u, qn // u]) * int(w[k, c, r, s])
                    t += 1
                    if t % flush_taps == 0 or t == R * S:
                        acc, lane = _flush(acc, lane, E), 0
        out[n, c, h, ww] = acc
    return out


def _scalar_bwd_weight(x, dy, R, S, E, u, pad, d, flush_pixels):
    N, C, H, W = x.shape
    _, K, P, Q = dy.shape
    out = np.zeros((K, C, R, S), np.float32)
    for k, c, r, s in np.ndindex(K, C, R, S):
        acc, lane = np.float32(0), 0
        M = N * P * Q
        for m in range(M):
            n, p, q = m // (P * Q), (m // Q) % P, m % Q
            h, ww = p * u + r * d - pad, q * u + s * d - pad
            if 0 <= h < H and 0 <= ww < W:
                lane += int(dy[n, k, p, q]) * int(x[n, c, h, ww])
            if (m + 1) % flush_pixels == 0 or m == M - 1:
                acc, lane = _flush(acc, lane, E), 0
        out[k, c, r, s] = acc
    return out


@pytest.mark.parametrize("u,pad,d", [(1, 1, 1), (2, 1, 1), (1, 2, 2)])
def test_many_flushes_match_scalar_loops(u, pad, d):
    rng = np.random.default_rng(10 * u + d)
    # Small magnitudes: no INT32 overflow, but partial sums still exceed 2**24 so the FP32
    # rounding of partials and of the accumulator is exercised.
    x = DfpTensor(rng.integers(-9000, 9001, (2, 5, 6, 5)).astype(np.int16), -12)
    w = DfpTensor(rng.integers(-9000, 9001, (3, 5, 3, 3)).astype(np.int16), -7)
    bias = rng.standard_normal(3).astype(np.float32)
    for c_block, ft in ((2, 1), (2, 4), (4, 2), (16, None)):
        r = ref.conv2d_fwd(x, w, bias, u, pad, d, c_block=c_block, flush_taps=ft)
        exp = _scalar_fwd(x.mantissa, w.mantissa, -19, bias, u, pad, d, c_block, ft or 9)
        assert not r.overflowed and r.saturated == 0
        assert np.array_equal(r.fp32, exp), (c_block, ft)
    assert r.partials == 1
    assert ref.conv2d_fwd(x, w, c_block=2, flush_taps=4).partials == 3 * 3

    y = r.exact
    dy = DfpTensor(rng.integers(-9000, 9001, y.shape).astype(np.int16), 3)
    for k_block, ft in ((2, 1), (2, 5), (16, None)):
        r = ref.conv2d_bwd_data(dy, w, (6, 5), u, pad, d, k_block=k_block, flush_taps=ft)
        exp = _scalar_bwd_data(dy.mantissa, w.mantissa, 6, 5, -4, u, pad, d, k_block, ft or 9)
        assert np.array_equal(r.fp32, exp), (k_block, ft)
    for fp in (2, 6, 3, None):
        r = ref.conv2d_bwd_weight(x, dy, (3, 3), u, pad, d, flush_pixels=fp)
        exp = _scalar_bwd_weight(x.mantissa, dy.mantissa, 3, 3, -9, u, pad, d, fp or 10 ** 9)
        assert np.array_equal(r.fp32, exp), fp


def test_flush_changes_fp32_bits():
    """Evidence that the flush order is observable: fp32 differs between schedules while the
    exact integer result is the same (so the kernels must follow the documented order)."""
    rng = np.random.default_rng(7)
    x = DfpTensor(rng.integers(-3000, 3001, (1, 32, 6, 6)).astype(np.int16), 0)
    w = DfpTensor(rng.integers(-3000, 3001, (4, 32, 3, 3)).astype(np.int16), 0)
    a = ref.conv2d_fwd(x, w, c_block=2, flush_taps=1)
    b = ref.conv2d_fwd(x, w, c_block=32, flush_taps=None)
    assert not a.overflowed and not b.overflowed
    assert np.array_equal(a.exact, b.exact)
    assert np.abs(a.exact).max() > 2 ** 25  # partial sums beyond FP32's 24-bit significand
    assert not np.array_equal(a.fp32, b.fp32)


@pytest.mark.parametrize("bias", [None, np.array([0.25, -3.5], np.float32)])
def test_single_flush_equals_rounded_exact(bias):
    rng = np.random.default_rng(8)
    x = DfpTensor(rng.integers(-3000, 3001, (2, 7, 5, 5)).astype(np.int16), -14)
    w = DfpTensor(rng.integers(-3000, 3001, (2, 7, 3, 3)).astype(np.int16), -13)
    r = ref.conv2d_fwd(x, w, bias, padding=1, c_block=8, flush_taps=None)
    assert r.partials == 1 and not r.overflowed and r.scale_exp == -27
    exp = (r.exact.astype(np.float64) * 2.0 ** -27).astype(np.float32)
    if bias is not None:
        exp = exp + bias[None, :, None, None]
    assert np.array_equal(r.fp32, exp)
    dyq = DfpTensor(rng.integers(-3000, 3001, r.exact.shape).astype(np.int16), 2)
    g = ref.conv2d_bwd_weight(x, dyq, 3, padding=1)
    assert g.partials == 1
    assert np.array_equal(g.fp32, (g.exact.astype(np.float64) * 2.0 ** -12).astype(np.float32))
    a = DfpTensor(rng.integers(-MAXM, MAXM + 1, (4, 2)).astype(np.int16), -5)
    b = DfpTensor(rng.integers(-MAXM, MAXM + 1, (2, 3)).astype(np.int16), 1)
    gm = ref.gemm(a, b)
    assert np.array_equal(gm.fp32, (gm.exact * 2.0 ** -4).astype(np.float32))


def test_overflow_detection_adversarial():
    full = lambda shape, v=MAXM: DfpTensor(np.full(shape, v, np.int16), 0)  # noqa: E731
    x, w = full((1, 4, 3, 3)), full((2, 4, 1, 1))
    pair = 2 * MAXM * MAXM  # 2147352578: one VNNI pair step fits INT32, two do not
    one = ref.conv2d_fwd(x, w, c_block=2, flush_taps=1)
    assert not one.overflowed and one.partials == 2
    assert np.array_equal(one.fp32, np.full((1, 2, 3, 3), np.float32(pair) * 2, np.float32))
    long = ref.conv2d_fwd(x, w, c_block=4)
    assert long.overflowed and long.saturated == 0
    # A wrapping lane holds the sum modulo 2**32.
    wrapped = 2 * pair - 2 ** 32
    assert np.array_equal(long.fp32, np.full((1, 2, 3, 3), wrapped, np.float32))
    assert np.array_equal(long.exact, np.full((1, 2, 3, 3), 2 * pair))
    # Mixed signs with a positive pair first: the running partial overflows mid-chain even
    # though the final sum (0) fits; detection is per pair step, not only at the flush.
    wm = np.full((1, 6, 1, 1), MAXM, np.int16)
    wm[0, 4:] = -MAXM
    mid = ref.conv2d_fwd(full((1, 6, 1, 1)), DfpTensor(wm, 0), c_block=6)
    assert mid.overflowed and mid.exact[0, 0, 0, 0] == pair
    assert mid.fp32[0, 0, 0, 0] == pair  # wrapping arithmetic recovers the exact value
    # Backward-weight pairs run along pixels.
    xs, dys = full((1, 1, 2, 2)), full((1, 1, 2, 2))
    assert not ref.conv2d_bwd_weight(xs, dys, 1, flush_pixels=2).overflowed
    assert ref.conv2d_bwd_weight(xs, dys, 1, flush_pixels=4).overflowed
    # An odd interval splits pairs: 3 pixels = pair + half pair, a half pair cannot overflow.
    odd = ref.conv2d_bwd_weight(full((1, 1, 1, 3)), full((1, 1, 1, 3)), 1, flush_pixels=3)
    assert odd.overflowed and odd.partials == 1
    assert not ref.conv2d_bwd_weight(full((1, 1, 1, 4)), full((1, 1, 1, 4)), 1, flush_pixels=1).overflowed
    assert ref.conv2d_bwd_data(full((1, 4, 2, 2)), full((4, 1, 1, 1)), 2, k_block=4).overflowed
    assert not ref.conv2d_bwd_data(full((1, 4, 2, 2)), full((4, 1, 1, 1)), 2, k_block=2).overflowed
    g = ref.gemm(full((2, 6)), full((6, 1)), k_block=4)
    assert g.overflowed and g.partials == 2


def test_saturation_count():
    full = lambda shape, v=MAXM: DfpTensor(np.full(shape, v, np.int16), 0)  # noqa: E731
    x = full((1, 4, 3, 3))
    w = full((2, 4, 1, 1))
    r = ref.conv2d_fwd(x, w, c_block=4, saturate=True)
    assert r.saturated == 2 * 3 * 3 and not r.overflowed
    assert np.array_equal(r.fp32, np.full((1, 2, 3, 3), np.float32(2 ** 31 - 1), np.float32))
    neg = ref.conv2d_fwd(x, full((2, 4, 1, 1), -MAXM), c_block=4, saturate=True)
    assert neg.saturated == 18 and neg.fp32.min() == -(2.0 ** 31)
    # Two chunks per output, only the first saturates.
    wm = np.full((1, 8, 1, 1), 1, np.int16)
    wm[0, :4] = MAXM
    two = ref.conv2d_fwd(full((1, 8, 1, 1)), DfpTensor(wm, 0), c_block=4, saturate=True)
    assert two.saturated == 1 and two.partials == 2
    # Clipped and pulled back into range: invisible at the flush (count 0), value wrong.
    wm = np.full((1, 8, 1, 1), MAXM, np.int16)
    wm[0, 4:] = -MAXM
    back = ref.conv2d_fwd(full((1, 8, 1, 1)), DfpTensor(wm, 0), c_block=8, saturate=True)
    assert back.exact[0, 0, 0, 0] == 0 and back.saturated == 0
    pair = 2 * MAXM * MAXM
    assert back.fp32[0, 0, 0, 0] == np.float32(2 ** 31 - 1 - 2 * pair)
    # Same data without long chains: exact, nothing saturates.
    ok = ref.conv2d_fwd(full((1, 8, 1, 1)), DfpTensor(wm, 0), c_block=2, saturate=True)
    assert ok.saturated == 0 and ok.fp32[0, 0, 0, 0] == 0


def test_fp32_error_bound_holds_and_is_tight():
    rng = np.random.default_rng(14)
    x = DfpTensor(rng.integers(-MAXM, MAXM + 1, (2, 9, 6, 6)).astype(np.int16), -15)
    w = DfpTensor(rng.integers(-2000, 2001, (4, 9, 3, 3)).astype(np.int16), -11)
    bias = rng.standard_normal(4).astype(np.float32)
    abs_sum = ref.conv2d_fwd_int(np.abs(x.mantissa.astype(np.int64)), np.abs(w.mantissa.astype(np.int64)), 1, 1)
    for c_block, ft in ((2, 1), (4, 3), (16, None)):
        r = ref.conv2d_fwd(x, w, bias, 1, 1, c_block=c_block, flush_taps=ft)
        assert not r.overflowed
        err = np.abs(r.fp32.astype(np.float64) - (r.exact * 2.0 ** r.scale_exp + bias[None, :, None, None]))
        bound = ref.fp32_error_bound(abs_sum, r.scale_exp, r.partials, r.fp32)
        assert np.all(err <= bound)
        assert err.max() > 0  # the flushed FP32 result is really rounded
        # Not vacuous: the bound is within a few hundred ulps of the largest output.
        assert bound.max() < 2.0 ** -24 * 400 * np.abs(r.fp32).max()
