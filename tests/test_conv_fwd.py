"""Forward DFP16 convolution: bit-exact against dfpgen.reference (both overflow modes), the
overflow machinery, the float API against torch float64, and input validation."""
import warnings

import numpy as np
import pytest
import torch

import dfpgen
from dfpgen import conv, pack, reference
from dfpgen.dfp import quantize
from conv_cases import SHAPES, conv_bound, ids, operands


def _ref(xq, wq, shape, info, bias=None):
    _, _, _, _, _, _, _, u, p, d = shape
    return reference.conv2d_fwd(xq, wq, bias, u, p, d, c_block=info.c_block, flush_taps=info.flush_taps,
                                saturate=info.overflow == "fast")


@pytest.mark.parametrize("mode", ["exact", "fast"])
@pytest.mark.parametrize("shape", SHAPES, ids=ids(SHAPES))
def test_forward_bit_exact(shape, mode):
    xq, wq, _ = operands(shape, seed=1)
    u, p, d = shape[7:]
    with warnings.catch_warnings():
        # a 7x7 x 4-channel chain (196 products) can saturate on Gaussian data in fast mode
        warnings.simplefilter("ignore", dfpgen.OverflowWarning)
        y, info = conv.conv2d(xq, wq, stride=u, padding=p, dilation=d, overflow=mode, return_info=True)
    ref = _ref(xq, wq, shape, info)
    assert y.dtype == np.float32 and y.shape == ref.fp32.shape
    assert np.array_equal(y, ref.fp32)
    assert info.overflow == mode and info.pass_kind == "fwd" and info.saturated == ref.saturated
    assert info.flush == info.c_block * info.flush_taps
    if mode == "exact":
        assert not ref.overflowed and info.saturated == 0


def test_bias_added_after_last_partial():
    shape = (2, 5, 9, 11, 7, 3, 3, 1, 1, 1)
    xq, wq, _ = operands(shape, seed=2)
    bias = np.random.default_rng(3).standard_normal(7).astype(np.float32)
    for mode in ("exact", "fast"):
        y, info = conv.conv2d(xq, wq, bias, padding=1, overflow=mode, return_info=True)
        assert np.array_equal(y, _ref(xq, wq, shape, info, bias).fp32)
        assert "_b_" in info.symbol


def info_partials(info, channels, taps):
    return -(-channels // info.c_block) * -(-taps // info.flush_taps)


def test_exact_mode_adversarial_mantissas_never_overflow():
    shape = (1, 20, 6, 7, 18, 3, 3, 1, 1, 1)
    xq, wq, _ = operands(shape, adversarial=True)
    assert xq.max_abs_mantissa == wq.max_abs_mantissa == 32767
    y, info = conv.conv2d(xq, wq, padding=1, overflow="exact", return_info=True)
    # all products are 32767**2: only one pair (2 products) fits an INT32 partial.
    assert (info.c_block, info.flush_taps) == (2, 1)
    ref = _ref(xq, wq, shape, info)
    assert not ref.overflowed and np.array_equal(y, ref.fp32)
    # 90 partials of 2 * 32767**2 each: the float32 sum is within 90 roundings of the exact value
    exact = ref.exact.astype(np.float64) * 2.0 ** ref.scale_exp
    assert np.all(np.abs(y - exact) <= 2 * info_partials(info, 20, 9) * 2.0 ** -24 * np.abs(exact))


def test_exact_mode_picks_the_longest_proven_schedule():
    # Small mantissas in X (per channel) allow long partials: the whole 16 x 9 chain.
    shape = (1, 16, 5, 5, 16, 3, 3, 1, 1, 1)
    xq, wq, _ = operands(shape, seed=4)
    small = dfpgen.DfpTensor((xq.mantissa // 64).astype(np.int16), xq.exponent, xq.fmt)
    _, info = conv.conv2d(small, wq, padding=1, overflow="exact", return_info=True)
    assert (info.c_block, info.flush_taps) == (16, 9)
    _, info_big = conv.conv2d(xq, wq, padding=1, overflow="exact", return_info=True)
    assert info_big.flush < info.flush


def _alternating(shape, x_sign):
    """X all +32767 (``x_sign`` "+") or +/-32767 by channel ("+-"), W +/-32767 by channel:
    every product is +/-32767**2."""
    n, c, h, w, k, r, s = shape[:7]
    ch = np.where(np.arange(c) % 2 == 0, 1, -1).astype(np.int16)
    xm = np.full((n, c, h, w), 32767, np.int16)
    if x_sign == "+-":
        xm = xm * ch[None, :, None, None]
    wm = np.broadcast_to(32767 * ch[None, :, None, None], (k, c, r, s)).astype(np.int16)
    return dfpgen.DfpTensor(xm, -15), dfpgen.DfpTensor(wm, -15)


def test_exact_mode_splits_the_bound_by_sign_for_non_negative_activations():
    # X >= 0 (ReLU) and W alternating in sign: the positive and the negative products of any
    # 2 channels x 2 taps are 2 * 32767**2 each, which fits, while their absolute sum (the
    # bound without the split) does not: the schedule doubles, and stays bit-exact.
    shape = (1, 8, 5, 5, 4, 3, 3, 1, 1, 1)
    xq, wq = _alternating(shape, "+")
    y, info = conv.conv2d(xq, wq, padding=1, overflow="exact", return_info=True)
    assert info.c_block * info.flush_taps == 4 and (info.c_block, info.flush_taps) != (2, 1)
    ref = _ref(xq, wq, shape, info)
    assert not ref.overflowed and np.array_equal(y, ref.fp32)
    # the same magnitudes with X of both signs: every product may be +32767**2, no split
    xm, wq = _alternating(shape, "+-")
    y, info = conv.conv2d(xm, wq, padding=1, overflow="exact", return_info=True)
    assert (info.c_block, info.flush_taps) == (2, 1)
    ref = _ref(xm, wq, shape, info)
    assert not ref.overflowed and np.array_equal(y, ref.fp32)
    # and the longer schedule really would overflow there: the split is what proves it
    bad = reference.conv2d_fwd(xm, wq, None, 1, 1, 1, c_block=4, flush_taps=1)
    assert bad.overflowed


@pytest.mark.parametrize("seed", range(6))
def test_exact_schedule_is_a_proof_with_and_without_the_sign_split(seed):
    # brute force over every (output, block, tap group): the chosen schedule's worst case,
    # max(B+, B-) with the split or B without, fits INT32; ties no schedule the bound rejects
    from dfpgen.plan_exact import INT32_MAX, exact_schedule
    rng = np.random.default_rng(seed)
    taps, out, red = 9, 3, 12
    scale = [32767, 20000, 5000, 1000][seed % 4]
    w = rng.integers(-scale, scale + 1, (taps, out, red)).astype(np.float32)
    amax = rng.integers(0, 32768, red).astype(np.float32)
    for one_signed in (False, True):
        cb, ft = exact_schedule(w, amax, one_signed=one_signed)
        a = w.astype(np.float64) * amax[None, None, :]
        redp = -(-red // cb) * cb
        pad = np.zeros((taps, out, redp))
        pad[:, :, :red] = a
        worst = 0.0
        for t0 in range(0, taps, ft):
            for b0 in range(0, redp, cb):
                g = pad[t0:t0 + ft, :, b0:b0 + cb]
                pos, neg = np.maximum(g, 0).sum(axis=(0, 2)), np.maximum(-g, 0).sum(axis=(0, 2))
                worst = max(worst, (np.maximum(pos, neg) if one_signed else pos + neg).max())
        assert worst <= INT32_MAX, (one_signed, cb, ft, worst)


@pytest.mark.parametrize("seed", range(16))
def test_exact_schedule_is_the_best_scoring_proven_schedule(seed):
    # brute force in exact integer arithmetic over every (c_block, flush_taps) candidate:
    # the pick proves (as above) and no proven candidate scores higher (ties: larger block);
    # the search settles most candidates by bounds, the rest by prefix differences
    from dfpgen.plan_exact import INT32_MAX, exact_blocks, exact_schedule, score
    rng = np.random.default_rng(100 + seed)
    taps = [9, 4, 1, 25][seed % 4]
    out, red = int(rng.integers(1, 20)), int(rng.integers(1, 70))
    w = (rng.standard_normal((taps, out, red)) * [20000, 6000, 1500, 400][seed % 4]).clip(-32767, 32767)
    w = w.round().astype(np.float32)
    amax = rng.integers(0, [32768, 9000, 2000][seed % 3], red).astype(np.int64)
    for one_signed in (False, True):
        a = w.astype(np.int64) * amax[None, None, :]
        parts = [np.maximum(a, 0), np.maximum(-a, 0)] if one_signed else [np.abs(a)]

        def proven(cb, ft):
            redp = -(-red // cb) * cb
            for part in parts:
                pad = np.zeros((taps, out, redp), np.int64)
                pad[:, :, :red] = part
                for t0 in range(0, taps, ft):
                    sums = pad[t0:t0 + ft].sum(axis=0).reshape(out, -1, cb).sum(axis=2)
                    if sums.max(initial=0) > INT32_MAX:
                        return False
            return True

        cands = [(cb, ft) for cb in exact_blocks(red) for ft in range(1, taps + 1) if proven(cb, ft)]
        best = max(cands, key=lambda c: (score(*c), c[0]))
        got = exact_schedule(w, amax, one_signed=one_signed)
        assert proven(*got)
        # the search compares float32 sums against a limit shrunk by its rounding error, so
        # it may give up a candidate within about 2**-18 of INT32_MAX; this data never comes that close
        assert got == best, (one_signed, got, best)


def test_fast_mode_counts_saturation_and_warns():
    shape = (1, 20, 6, 7, 18, 3, 3, 1, 1, 1)
    xq, wq, _ = operands(shape, adversarial=True)
    with pytest.warns(dfpgen.OverflowWarning, match="saturated"):
        y, info = conv.conv2d(xq, wq, padding=1, overflow="fast", return_info=True)
    ref = _ref(xq, wq, shape, info)
    assert info.saturated > 0 and info.saturated == ref.saturated
    assert np.array_equal(y, ref.fp32)


def test_fast_mode_reports_lanes_pulled_back_before_the_flush():
    # Gaussian data: no lane is at a limit at the flush, yet two partials clipped on the way
    # (two outputs off by up to 1.8): the sticky check reports them.
    shape = (1, 20, 6, 7, 18, 3, 3, 1, 1, 1)
    xq, wq, _ = operands(shape, seed=5)
    with pytest.warns(dfpgen.OverflowWarning, match="0 INT32 lanes saturated at a flush"):
        y, info = conv.conv2d(xq, wq, padding=1, overflow="fast", return_info=True)
    ref = _ref(xq, wq, shape, info)
    assert np.array_equal(y, ref.fp32) and info.flush == 16 * 9
    assert info.saturated == ref.saturated == 0
    assert 0 < ref.clipped <= info.possibly_saturated


def test_fast_mode_small_data_no_warning():
    shape = (1, 20, 6, 7, 18, 3, 3, 1, 1, 1)
    xq, wq, _ = operands(shape, seed=5)
    small = dfpgen.DfpTensor((xq.mantissa // 8).astype(np.int16), xq.exponent)
    with warnings.catch_warnings():
        warnings.simplefilter("error", dfpgen.OverflowWarning)
        _, info = conv.conv2d(small, wq, padding=1, overflow="fast", return_info=True)
    assert info.saturated == info.possibly_saturated == 0 and info.flush == 16 * 9


@pytest.mark.parametrize("shape", [SHAPES[0], SHAPES[3], SHAPES[6]], ids=ids([SHAPES[0], SHAPES[3], SHAPES[6]]))
def test_float_api_against_torch_float64(shape):
    n, c, h, w, k, r, s, u, p, d = shape
    rng = np.random.default_rng(6)
    x = rng.standard_normal((n, c, h, w)).astype(np.float32)
    wt = rng.standard_normal((k, c, r, s)).astype(np.float32)
    bias = rng.standard_normal(k).astype(np.float32)
    y, info = conv.conv2d(x, wt, bias, u, p, d, overflow="exact", return_info=True)
    xd = quantize(x).dequantize(np.float64)
    wd = quantize(wt).dequantize(np.float64)
    want = torch.nn.functional.conv2d(torch.from_numpy(xd), torch.from_numpy(wd), torch.from_numpy(bias.astype(np.float64)),
                                      stride=u, padding=p, dilation=d).numpy()
    partials = -(-c // info.c_block) * -(-(r * s) // info.flush_taps)
    tol = conv_bound(xd, wd, partials + 1, u, p, d) + 2.0 ** -24 * np.abs(want)
    err = np.abs(y - want)
    assert (err <= tol).all(), float((err - tol).max())
    assert err.max() > 0 or partials == 1  # the comparison is not vacuous


def test_linear_matches_reference_gemm_and_torch():
    rng = np.random.default_rng(7)
    x = rng.standard_normal((19, 37)).astype(np.float32)
    w = rng.standard_normal((11, 37)).astype(np.float32)
    b = rng.standard_normal(11).astype(np.float32)
    y, info = conv.linear(x, w, b, overflow="exact", return_info=True)
    assert y.shape == (19, 11)
    xq, wq = quantize(x), quantize(w)
    ref = reference.conv2d_fwd(quantize(x.T[None, :, None, :]), quantize(w[:, :, None, None]), b,
                               c_block=info.c_block, flush_taps=info.flush_taps)
    assert np.array_equal(y, ref.fp32[0, :, 0, :].T)
    want = xq.dequantize(np.float64) @ wq.dequantize(np.float64).T + b
    assert np.allclose(y, want, rtol=1e-5, atol=1e-4)


def test_float_input_uses_packed_layout_and_channels_last_result():
    rng = np.random.default_rng(8)
    x = rng.standard_normal((2, 5, 6, 6)).astype(np.float32)
    w = rng.standard_normal((4, 5, 3, 3)).astype(np.float32)
    y = conv.conv2d(x, w, padding=1)
    y2 = conv.conv2d(np.ascontiguousarray(x.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2), w, padding=1)
    assert np.array_equal(y, y2)
    assert y.strides[1] == 4  # NCHW view of an NHWC buffer


@pytest.mark.parametrize("call, match", [
    (lambda x, w: conv.conv2d(x, w[:, :3]), "C=4 channels but weight expects 3"),
    (lambda x, w: conv.conv2d(x[0], w), "4-D"),
    (lambda x, w: conv.conv2d(x, w[0]), "4-D"),
    (lambda x, w: conv.conv2d(x, w, overflow="maybe"), "overflow"),
    (lambda x, w: conv.conv2d(x, w, np.zeros(3, np.float32)), "bias shape"),
    (lambda x, w: conv.conv2d(np.where(x > 1, np.nan, x), w), "NaN"),
    (lambda x, w: conv.conv2d(x, w, padding=-1), "padding"),
    (lambda x, w: conv.conv2d(x, w, stride=0), "stride"),
    (lambda x, w: conv.linear(x, w), "2-D"),
])
def test_bad_inputs_raise_named_errors(call, match):
    rng = np.random.default_rng(9)
    x = rng.standard_normal((1, 4, 5, 5)).astype(np.float32)
    w = rng.standard_normal((2, 4, 3, 3)).astype(np.float32)
    with pytest.raises(dfpgen.DfpError, match=match):
        call(x, w)


def test_get_kernel_is_memoised_and_symbol_names_the_layer():
    from dfpgen.pass_kernels import get_kernel
    spec = dfpgen.ConvSpec(1, 8, 6, 6, 16, 3, 3, padding=(1, 1))
    from dfpgen.target import host_target
    from dfpgen.tuning import default_config
    k1 = get_kernel(spec, overflow="fast")
    assert get_kernel(spec, overflow="fast") is k1
    # The register block is the tier's default (one 16-lane vector on AVX-512, 2 x 8 lanes on
    # AVX2); the 8-channel block x 3x3 taps gives the paper's fast-mode flush of 72 products.
    cfg = default_config(spec, host_target())
    assert cfg.k_vecs * host_target().lanes >= 16
    assert k1.symbols[0].startswith(f"dfp_conv_fwd_c8h6w6k16r3s3u1p1_kb{cfg.k_vecs}_wb{cfg.pixels}_cb8_fl72_"
                                    f"{host_target().tier}_fast")


def test_subnormal_scale_flushes_with_mul_then_add():
    # Ex + Ew = -140: the scale 2**-140 is a float32 subnormal, small partials land in the
    # subnormal range, where an FMA would round differently from the reference's mul-then-add.
    shape = (1, 6, 5, 5, 8, 3, 3, 1, 1, 1)
    xq, wq, _ = operands(shape, seed=12)
    xs = dfpgen.DfpTensor(xq.mantissa // 512, -70, xq.fmt)
    ws = dfpgen.DfpTensor(wq.mantissa // 512, -70, wq.fmt)
    y, info = conv.conv2d(xs, ws, padding=1, overflow="exact", return_info=True)
    ref = _ref(xs, ws, shape, info)
    assert np.array_equal(y, ref.fp32) and (np.abs(y[y != 0]) < 2.0 ** -126).any()
    with pytest.raises(dfpgen.DfpError, match="outside float32"):
        conv.conv2d(dfpgen.DfpTensor(xq.mantissa, -100, xq.fmt), ws, padding=1)


def test_empty_batch_and_wide_output_channel_tail():
    rng = np.random.default_rng(13)
    w = rng.standard_normal((6, 3, 3, 3)).astype(np.float32)
    assert conv.conv2d(np.zeros((0, 3, 5, 5), np.float32), w).shape == (0, 6, 3, 3)
    assert conv.conv2d_input((0, 3, 5, 5), w, np.zeros((0, 6, 3, 3), np.float32)).shape == (0, 3, 5, 5)
    # a classifier-sized K (1000 = 62 vectors of 16 + 8) over a batch of 5 "pixels"
    xq = quantize(rng.standard_normal((1, 40, 1, 5)).astype(np.float32))
    wq = quantize(rng.standard_normal((1000, 40, 1, 1)).astype(np.float32))
    y, info = conv.conv2d(xq, wq, overflow="exact", return_info=True)
    assert y.shape == (1, 1000, 1, 5)
    assert np.array_equal(y, _ref(xq, wq, (1, 40, 1, 5, 1000, 1, 1, 1, 0, 1), info).fp32)


def test_classifier_layer_on_1x1_images_runs_as_one_row_of_pixels():
    rng = np.random.default_rng(14)
    xq = quantize(rng.standard_normal((9, 30, 1, 1)).astype(np.float32))
    wq = quantize(rng.standard_normal((20, 30, 1, 1)).astype(np.float32))
    y, info = conv.conv2d(xq, wq, overflow="exact", return_info=True)
    assert y.shape == (9, 20, 1, 1) and "h1w9" in info.symbol
    assert np.array_equal(y, _ref(xq, wq, (9, 30, 1, 1, 20, 1, 1, 1, 0, 1), info).fp32)
    dyq = quantize(rng.standard_normal((9, 20, 1, 1)).astype(np.float32))
    dx, di = conv.conv2d_input((9, 30, 1, 1), wq, dyq, overflow="exact", return_info=True)
    ref = reference.conv2d_bwd_data(dyq, wq, (1, 1), k_block=di.c_block, flush_taps=di.flush_taps)
    assert dx.shape == (9, 30, 1, 1) and np.array_equal(dx, ref.fp32)


@pytest.mark.parametrize("shape", [(3, 5, 7, 9), (2, 64, 5, 5), (1, 3, 40, 40), (2, 4096, 1, 3)])
@pytest.mark.parametrize("channels_last", [False, True])
def test_channel_range_feeding_the_exact_bound(shape, channels_last):
    a = np.random.default_rng(15).integers(-32767, 32768, shape).astype(np.int16)
    if channels_last:
        a = np.ascontiguousarray(a.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2)
    hi, lo = pack.channel_range_of(a)
    assert np.array_equal(hi, a.max(axis=(0, 2, 3))) and np.array_equal(lo, a.min(axis=(0, 2, 3)))


def test_exact_mode_refuses_int16_min_mantissas():
    xq, wq, _ = operands((1, 4, 5, 5, 3, 3, 3, 1, 1, 1), seed=16)
    m = xq.mantissa.copy()
    m[0, 0, 0, 0] = -32768
    with pytest.raises(dfpgen.DfpError, match="-32768"):
        conv.conv2d(dfpgen.DfpTensor(m, xq.exponent), wq, padding=1, overflow="exact")
    wm = wq.mantissa.copy()
    wm[0, 0, 0, 0] = -32768
    with pytest.raises(dfpgen.DfpError, match="-32768"):
        conv.conv2d(xq, dfpgen.DfpTensor(wm, wq.exponent), padding=1, overflow="exact")


def test_a_caller_bound_on_x_replaces_the_scan_and_bad_bounds_are_one_line_errors():
    # x_channel_bound (a fused BatchNorm's proven range): the scan's own (max, min) gives the
    # same schedule and bits; a looser one only proves shorter partials, still exact
    shape = (2, 12, 7, 6, 10, 3, 3, 1, 1, 1)
    xq, wq, _ = operands(shape, seed=3)
    m = xq.mantissa.astype(np.int64)
    hi, lo = m.max(axis=(0, 2, 3)), m.min(axis=(0, 2, 3))
    y0, i0 = conv.conv2d(xq, wq, padding=1, return_info=True)
    y1, i1 = conv.conv2d(xq, wq, padding=1, return_info=True, x_channel_bound=(hi, lo))
    assert np.array_equal(y0, y1) and (i0.c_block, i0.flush_taps) == (i1.c_block, i1.flush_taps)
    full = np.full(12, 32767)
    y2, i2 = conv.conv2d(xq, wq, padding=1, return_info=True, x_channel_bound=(full, -full))
    ref = reference.conv2d_fwd(xq, wq, None, 1, 1, 1, c_block=i2.c_block, flush_taps=i2.flush_taps)
    assert not ref.overflowed and np.array_equal(y2, ref.fp32)
    for bad, msg in [((hi, lo[:5]), "shape"), ((hi.astype(float), lo), "integer"),
                     ((lo - 1, hi), "no mantissa range"), ((full + 1, lo), "no mantissa range"), (hi, "pair")]:
        with pytest.raises(dfpgen.DfpError, match=msg) as e:
            conv.conv2d(xq, wq, padding=1, x_channel_bound=bad)
        assert "\n" not in str(e.value)
    with pytest.raises(dfpgen.DfpError, match="DfpTensor"):
        conv.conv2d(np.zeros((2, 12, 7, 6), np.float32), wq, padding=1, x_channel_bound=(hi, lo))


def test_a_prepadded_input_buffer_is_read_in_place_with_the_same_bits():
    # x_buffer: X's mantissas already zero-padded as the kernel reads them (a fused
    # BatchNorm writes them so); other paddings are ignored (the kernel pads its own copy)
    from dfpgen.fwd_family import padded_nhwc
    shape = (2, 12, 7, 6, 10, 3, 3, 1, 1, 1)
    xq, wq, _ = operands(shape, seed=4)
    y0 = conv.conv2d(xq, wq, padding=1)
    for pad in [(1, 1, 1, 1), (0, 0, 0, 0), (2, 1, 0, 3)]:
        buf = padded_nhwc(xq.mantissa, pad, 12)
        m = buf[:, pad[0]:pad[0] + 7, pad[2]:pad[2] + 6].transpose(0, 3, 1, 2)
        y1 = conv.conv2d(dfpgen.DfpTensor(m, xq.exponent), wq, padding=1, x_buffer=(buf, pad))
        assert np.array_equal(y0, y1)
    buf = padded_nhwc(xq.mantissa, (1, 1, 1, 1), 12)
    for bad, msg in [((buf, (1, 1, 1)), "pair"), ((buf, (1, 1, 0, 1)), "shape"),
                     ((buf.astype(np.int32), (1, 1, 1, 1)), "int16"), (buf, "pair")]:
        with pytest.raises(dfpgen.DfpError, match=msg) as e:
            conv.conv2d(xq, wq, padding=1, x_buffer=bad)
        assert "\n" not in str(e.value)


@pytest.mark.parametrize("shape", [(9, 37), (1, 5), (25, 7001), (4, 1)])
def test_exact_schedule_column_sums_are_the_prefix_last_row(shape):
    # the quick bounds' totals and the prefix sums add the same float32 rows in the same
    # order: one numpy reduction must give the row-by-row float64 sums bit for bit
    from dfpgen.plan_exact import _column_sums, _prefix
    rng = np.random.default_rng(shape[1])
    flat = (rng.random(shape, dtype=np.float32) * 2.0 ** 30).astype(np.float32)
    assert np.array_equal(_column_sums(flat), _prefix(flat)[-1])
    acc = np.zeros(shape[1])
    for row in flat:
        acc += row
    assert np.array_equal(_column_sums(flat), acc)


def test_tap_padding_spreads_a_reduction_block_over_the_l1_sets():
    from dfpgen.plan import L1_SETS, LINE, tap_pad_pairs

    def fullest_set(red_pairs, pad, pair_bytes=128, cb2=8, ntaps=9):
        sets = [0] * L1_SETS
        for t in range(ntaps):
            start = t * (red_pairs + pad) * pair_bytes
            for line in range(start // LINE, (start + cb2 * pair_bytes - 1) // LINE + 1):
                sets[line % L1_SETS] += 1
        return max(sets)

    # 256 channels: taps 16 KiB apart, so a 16-channel block of all 9 taps sits in 16 sets,
    # 9 lines each, one more than the 8 ways
    assert fullest_set(128, 0) == 9
    pad = tap_pad_pairs(128, 128, 8, 9)
    assert 0 < pad <= 8 and fullest_set(128, pad) <= 3
    # already spread (C = 240), and one tap (1x1): no padding
    assert tap_pad_pairs(120, 128, 8, 9) == 0 and tap_pad_pairs(128, 128, 8, 1) == 0


@pytest.mark.parametrize("pass_kind", ["fwd", "bwd_data"])
def test_padded_tap_layout_of_the_16_register_tier_is_bit_exact(pass_kind):
    from dfpgen.pass_kernels import get_kernel
    from dfpgen.plan import tap_pad_pairs
    from dfpgen.spec import ConvSpec
    from dfpgen.target import host_target
    avx2 = host_target("avx2")  # every x86-64 host this suite runs on executes AVX2
    shape = (2, 64, 6, 7, 64, 3, 3, 1, 1, 1)
    xq, wq, dyq = operands(shape, seed=3)
    spec = ConvSpec(*shape[:7], stride=1, padding=1, pass_kind=pass_kind)
    plans = [part.plan for part in get_kernel(spec, target=avx2).parts]
    assert all(p.tap_pairs > p.red_pairs for p in plans)  # the layout under test is padded
    if pass_kind == "fwd":
        y, info = conv.conv2d(xq, wq, padding=1, return_info=True, target=avx2)
        ref = _ref(xq, wq, shape, info).fp32
    else:
        y, info = conv.conv2d_input(xq.shape, wq, dyq, padding=1, return_info=True, target=avx2)
        ref = reference.conv2d_bwd_data(dyq, wq, (6, 7), 1, 1, 1, k_block=info.c_block,
                                        flush_taps=info.flush_taps, saturate=False).fp32
    # the kernel that ran has a padded layout too: 32 reduction pairs of k_vecs x 8 lanes
    assert tap_pad_pairs(32, info.config["k_vecs"] * 8 * 4, info.c_block // 2, 9) > 0
    assert np.array_equal(y, ref)


def test_exact_schedule_split_over_threads_gives_the_one_pass_values(monkeypatch):
    # a large weight's operand, level table and per-block maxima are filled in output-channel
    # chunks on several threads: the table, the maxima and the picks must be those of one pass
    from dfpgen import plan_exact, threads
    rng = np.random.default_rng(11)
    cases = []
    for taps, out, red in [(9, 37, 70), (1, 64, 300), (4, 5, 9), (9, 3, 129), (25, 16, 33)]:
        w = rng.integers(-32767, 32768, (out, taps, red)).astype(np.int16)
        for view in (w.transpose(1, 0, 2), np.ascontiguousarray(w.transpose(1, 2, 0)).transpose(0, 2, 1)):
            amax = rng.integers(0, int(rng.choice([7, 300, 32767])) + 1, view.shape[2]).astype(np.int64)
            cases.append((view, amax))

    def run():
        tabs, picks = [], []
        for view, amax in cases:
            for signed in (False, True):
                blocks = plan_exact.exact_blocks(view.shape[2])
                t, singles, totals = plan_exact._operand_and_table(view, amax, blocks, signed)
                tabs.append((t.copy(), singles, totals))
                picks.append(plan_exact.exact_schedule(view, amax, one_signed=signed))
        return tabs, picks

    one_tabs, one_picks = run()
    monkeypatch.setattr(plan_exact, "PARALLEL_ENTRIES", 64)
    threads.set_num_threads(3)
    try:
        par_tabs, par_picks = run()
    finally:
        threads.set_num_threads(None)
    assert par_picks == one_picks
    for (t1, s1, m1), (t2, s2, m2) in zip(one_tabs, par_tabs):
        assert np.array_equal(t1, t2) and s1 == s2 and m1 == m2
    # the maxima are those of the whole table (the definition the search used before)
    view, amax = cases[0]
    blocks = plan_exact.exact_blocks(view.shape[2])
    t, singles, totals = plan_exact._operand_and_table(view, amax, blocks, False)
    starts = [plan_exact._table_layout(view.shape[1], view.shape[2], blocks)[2][b].start for b in sorted(blocks)]
    assert singles == np.maximum.reduceat(t.max(axis=0), starts).tolist()
    assert totals == np.maximum.reduceat(plan_exact._column_sums(t), starts).tolist()


def test_exact_schedule_scratch_reuse_gives_the_fresh_pool_picks():
    # the search's operand and level tables come from a per-thread pool: a pool left dirty
    # by a larger layer (other values everywhere) must give the picks of a fresh one
    from dfpgen.plan_exact import exact_schedule, release_scratch
    rng = np.random.default_rng(5)
    cases = []
    for taps, out, red in [(9, 5, 40), (1, 33, 70), (4, 2, 9), (9, 16, 16), (1, 1, 1)]:
        w = rng.integers(-32767, 32768, (taps, out, red)).astype(np.int16)
        cases.append((w, rng.integers(0, 32768, red).astype(np.int64)))
    release_scratch()
    fresh = []
    for w, amax in cases:
        fresh.append([exact_schedule(w, amax, one_signed=o) for o in (False, True)])
        release_scratch()
    big = rng.integers(-9, 10, (9, 64, 300)).astype(np.int16)
    exact_schedule(big, np.full(300, 7, np.int64), one_signed=True)  # fills the pool
    assert [[exact_schedule(w, amax, one_signed=o) for o in (False, True)] for w, amax in cases] == fresh
