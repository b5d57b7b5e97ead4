"""Backward-weight kernel (dfpgen.bwd_weight): bit-exact against dfpgen.reference in exact mode,
saturation reporting in fast mode, every tier / config / thread count, and PyTorch float64."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from dfpgen import plan_bwd_weight as pw
from dfpgen import bwd_weight_schedule as ws
from dfpgen import plan_exact, reference, bwd_weight
from dfpgen.conv import conv2d_weight
from dfpgen.dfp import DfpTensor, quantize
from dfpgen.errors import DfpError
from dfpgen.jit import compile_ir, emit_assembly, vector_spills
from dfpgen.render import render
from dfpgen.spec import ConvSpec, parse_full
from dfpgen.target import TIERS, host_target
from dfpgen.tuning import TuningConfig

MAXM = 32767
HOST = host_target()
RUNNABLE = [t for t in TIERS if host_target(t).executable]

# (N, C, H, W, K, R, S, stride, padding, dilation): tails in C and K (odd, not multiples of
# 16), odd N*P*Q, stride 2, padding, dilation 2, 1x1, 7x7 with C=3, batch 1.
SHAPES = [
    (2, 5, 6, 7, 20, 3, 3, 1, 1, 1),      # odd C, K = 16 + 4, odd Q (7)
    (1, 3, 9, 9, 17, 3, 3, 2, 1, 1),      # stride 2, batch 1, odd N*P*Q (25)
    (2, 4, 8, 8, 5, 3, 3, 1, 2, 2),       # dilation 2, padding 2, K < 16
    (1, 3, 13, 11, 8, 7, 7, 2, 3, 1),     # 7x7, C=3, stride 2
    (3, 33, 5, 5, 33, 1, 1, 1, 0, 1),     # 1x1, C and K = 32 + 1
    (2, 30, 6, 6, 70, 1, 1, 2, 0, 1),     # 1x1 stride 2, C > one register block, K = 4x16 + 6
    (1, 7, 5, 9, 3, 3, 1, (2, 1), (0, 1), (1, 2)),  # per-axis stride/padding/dilation, R != S
    (3, 2, 3, 4, 2, 1, 1, 2, 0, 1),       # Q = 2 (one pair per row), stride 2
    (1, 300, 3, 4, 20, 1, 1, 1, 0, 1),    # C beyond one C-group (work items split C)
    (1, 128, 4, 6, 128, 3, 3, 1, 1, 1),   # C = K = 128: X and dY rows padded to 144 (set conflicts)
    (2, 5, 7, 9, 6, 1, 3, 2, (0, 1), 1),  # R = 1, S = 3, stride 2: only rows p*uh packed
    (1, 20, 3, 4, 300, 1, 1, 1, 0, 1),    # K = 300: two K-groups of work items, K tail
    (2, 4, 3, 3, 5, 1, 1, 1, 1, 1),       # 1x1 with padding (not the single-row 1x1 path)
    (4, 16, 1, 1, 40, 1, 1, 1, 0, 1),     # Linear-like 1x1 over N = 4 pixels (H = W = 1)
    (4, 12, 8, 12, 20, 1, 1, 2, 0, 1),    # 1x1 stride 2, even Q, N*P = 16: packed row by row from the view
]


def spec_of(shape) -> ConvSpec:
    N, C, H, W, K, R, S, u, p, d = shape
    return ConvSpec(N, C, H, W, K, R, S, u, p, d, pass_kind="bwd_weight")


def operands(shape, rng, kind="real"):
    """DFP16 X and dY: 'real' = quantized ReLU activations and sparse gradients (full-range
    mantissas), 'small' = |mantissa| < 64, 'adversarial' = all +/-32767."""
    sp = spec_of(shape)
    xs, ys = sp.input_shape, sp.output_shape
    if kind == "real":
        x = np.maximum(rng.standard_normal(xs), 0).astype(np.float32)
        dy = (rng.standard_normal(ys) * (rng.random(ys) < 0.6)).astype(np.float32)
        return quantize(x), quantize(dy)
    if kind == "small":
        return (DfpTensor(rng.integers(-63, 64, xs).astype(np.int16), -6),
                DfpTensor(rng.integers(-63, 64, ys).astype(np.int16), -9))
    sign = lambda s: np.where(rng.random(s) < 0.5, -MAXM, MAXM).astype(np.int16)  # noqa: E731
    return DfpTensor(sign(xs), -15), DfpTensor(sign(ys), -20)


def run(shape, xq, dyq, **kw):
    sp = spec_of(shape)
    return conv2d_weight(xq, sp.weight_shape, dyq, sp.stride, sp.padding, sp.dilation, return_info=True, **kw)


def ref(shape, xq, dyq, flush, saturate=False):
    sp = spec_of(shape)
    return reference.conv2d_bwd_weight(xq, dyq, (sp.R, sp.S), sp.stride, sp.padding, sp.dilation,
                                       flush_pixels=flush, saturate=saturate)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: spec_of(s).geometry())
def test_exact_matches_reference(shape):
    rng = np.random.default_rng(1)
    for kind in ("real", "small"):
        xq, dyq = operands(shape, rng, kind)
        dw, info = run(shape, xq, dyq, overflow="exact", threads=2)
        r = ref(shape, xq, dyq, info.flush)
        assert info.overflow == "exact" and info.pass_kind == "bwd_weight" and info.saturated == 0
        assert not r.overflowed
        assert dw.dtype == np.float32 and dw.shape == spec_of(shape).weight_shape
        assert np.array_equal(dw, r.fp32), f"{kind}: max |diff| {np.abs(dw - r.fp32).max()}"
        assert np.count_nonzero(dw) > 0


@pytest.mark.parametrize("shape", SHAPES[:4], ids=lambda s: spec_of(s).geometry())
def test_adversarial_mantissas_exact(shape):
    """All +/-32767: the proven interval drops to one pair (2 * 32767**2 < 2**31)."""
    xq, dyq = operands(shape, np.random.default_rng(2), "adversarial")
    dw, info = run(shape, xq, dyq, overflow="exact")
    assert info.flush == 2
    r = ref(shape, xq, dyq, 2)
    assert not r.overflowed and np.array_equal(dw, r.fp32)


def test_exact_flush_is_proven_and_largest():
    rng = np.random.default_rng(3)
    a = rng.integers(0, 32768, 1000)
    b = rng.integers(0, 32768, 1000)
    f = plan_exact.exact_flush(a, b)
    prod = a * b
    sums = lambda F: np.add.reduceat(prod, np.arange(0, prod.size, F))  # noqa: E731
    assert f >= 2 and f % 2 == 0
    assert sums(f).max() <= 2 ** 31 - 1
    assert sums(2 * f).max() > 2 ** 31 - 1
    assert plan_exact.exact_flush(np.zeros(10, np.int64), b[:10]) >= 10  # all-zero X: one chunk


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: spec_of(s).geometry())
def test_tap_max_bounds_every_tap(shape):
    """The per-pixel bound of the exact flush interval is max over taps and channels of
    |X_rs[m, c]| (computed here by brute force from the unpacked X)."""
    sp = spec_of(shape)
    rng = np.random.default_rng(13)
    x = rng.integers(-32767, 32768, sp.input_shape).astype(np.int16)
    p = pw.plan(sp, pw.default_config(sp, HOST), HOST)
    _, xam, _ = bwd_weight.pack_pairs(x, (sp.N, p.Hp, p.Wp), pad=sp.padding, istep=p.pack_istep,
                              delta=sp.stride[1], cout=p.Cs, hstep=p.pack_hstep)
    (uh, uw), (ph, pw_), (dh, dw) = sp.stride, sp.padding, sp.dilation
    want = np.zeros((sp.N, sp.P, sp.Q), np.int32)
    for r in range(sp.R):
        for s in range(sp.S):
            for pp in range(sp.P):
                for q in range(sp.Q):
                    h, w = pp * uh + r * dh - ph, q * uw + s * dw - pw_
                    if 0 <= h < sp.H and 0 <= w < sp.W:
                        v = np.abs(x[:, :, h, w].astype(np.int32)).max(axis=1)
                        want[:, pp, q] = np.maximum(want[:, pp, q], v)
    assert np.array_equal(bwd_weight.tap_max(xam, p), want)


def _packed_maxima(sp, x, dy):
    p = pw.plan(sp, pw.default_config(sp, HOST), HOST)
    _, xam, xpeak = bwd_weight.pack_pairs(x, (sp.N, p.Hp, p.Wp), pad=sp.padding, istep=p.pack_istep,
                                          delta=sp.stride[1], cout=p.Cs, hstep=p.pack_hstep)
    _, dam, dpeak = bwd_weight.pack_pairs(dy, (sp.N, sp.P, p.Q2), istep=2, delta=1, cout=p.Ks)
    assert xpeak == xam.max(initial=0) and dpeak == dam.max(initial=0)
    return p, xam, dam


# beyond SHAPES: stride 3 columns (the kernel's run-time stride), long rows (several vector
# steps and the overlapping last one), Q = 8 and 9 around one vector step, dilation 3
FLUSH_SHAPES = SHAPES + [
    (2, 3, 9, 14, 4, 3, 3, 3, 1, 1),
    (1, 2, 5, 40, 3, 3, 3, 1, 1, 1),
    (2, 3, 6, 17, 5, 3, 3, 2, 1, 1),
    (1, 4, 4, 8, 4, 1, 3, 1, (0, 1), 1),
    (1, 4, 4, 9, 4, 3, 3, 1, 1, 1),
    (1, 2, 11, 12, 2, 3, 3, 1, 3, 3),
    (1, 2, 9, 21, 3, 3, 5, (1, 3), (0, 2), (2, 1)),
    (1, 5, 1, 37, 6, 1, 1, 1, 0, 1),   # odd pixel count in one row
]


@pytest.mark.parametrize("shape", FLUSH_SHAPES, ids=lambda s: spec_of(s).geometry())
@pytest.mark.parametrize("kind", ["full", "relu", "zero", "adversarial", "one_hot"])
def test_flush_bound_kernel_is_the_numpy_definition(shape, kind):
    """The compiled flush search (templates/conv_bwd_weight_flush.ll.j2) returns
    plan_exact.exact_flush(tap_max(xam), b_pix) exactly, on data that ends the search at
    every depth: all zero (one chunk), all +/-32767 (flush 2), one large value in a zero
    tensor (a long interval cut by one pixel), sparse ReLU-like and full-range data."""
    sp = spec_of(shape)
    rng = np.random.default_rng(hash((shape, kind)) % 2 ** 32)
    xs, ys = sp.input_shape, sp.output_shape
    if kind == "full":
        x, dy = rng.integers(-MAXM, MAXM + 1, xs), rng.integers(-MAXM, MAXM + 1, ys)
    elif kind == "relu":
        x = np.maximum(rng.integers(-MAXM, MAXM + 1, xs), 0) * (rng.random(xs) < 0.3)
        dy = rng.integers(-MAXM, MAXM + 1, ys) // 16
    elif kind == "zero":
        x, dy = np.zeros(xs, np.int64), rng.integers(-MAXM, MAXM + 1, ys)
    elif kind == "adversarial":
        x, dy = rng.choice([-MAXM, MAXM], xs), rng.choice([-MAXM, MAXM], ys)
    else:
        x, dy = np.zeros(xs, np.int64), np.full(ys, 3)
        x.reshape(-1)[rng.integers(x.size)] = -MAXM
    x, dy = x.astype(np.int16), dy.astype(np.int16)
    p, xam, dam = _packed_maxima(sp, x, dy)
    b_pix = dam.reshape(sp.N, sp.P, 2 * p.Q2)[:, :, :sp.Q]
    want = plan_exact.exact_flush(bwd_weight.tap_max(xam, p), b_pix)
    assert bwd_weight.flush_bound(xam, dam, p) == want


def test_flush_bound_kernel_of_one_pixel_row():
    """The 1x1 path's single row of N*P*Q pixels (S == 1 layout, one long row): the same
    interval as the numpy definition, for odd and even pixel counts."""
    rng = np.random.default_rng(21)
    for m in (1, 2, 7, 8, 9, 1000, 4097):
        sp = ConvSpec(1, 5, 1, m, 6, 1, 1, pass_kind="bwd_weight")
        x = rng.integers(-MAXM, MAXM + 1, sp.input_shape).astype(np.int16)
        dy = (rng.integers(-MAXM, MAXM + 1, sp.output_shape) // 64).astype(np.int16)
        p, xam, dam = _packed_maxima(sp, x, dy)
        b_pix = dam.reshape(1, 1, 2 * p.Q2)[:, :, :m]
        assert bwd_weight.flush_bound(xam, dam, p) == plan_exact.exact_flush(bwd_weight.tap_max(xam, p), b_pix), m


def test_flush_bound_rejects_foreign_maxima():
    sp = spec_of(SHAPES[0])
    p, xam, dam = _packed_maxima(sp, np.zeros(sp.input_shape, np.int16), np.zeros(sp.output_shape, np.int16))
    with pytest.raises(DfpError, match="do not match plan"):
        bwd_weight.flush_bound(xam[:1], dam, p)
    with pytest.raises(DfpError, match="do not match plan"):
        bwd_weight.flush_bound(xam.astype(np.int64), dam, p)


def test_config_flush_caps_exact_interval():
    shape = SHAPES[0]
    xq, dyq = operands(shape, np.random.default_rng(4), "small")
    cfg = pw.default_config(spec_of(shape), HOST).replace(flush=6)
    dw, info = run(shape, xq, dyq, config=cfg)
    assert info.flush == 4  # small data: the proven bound is far above; a cap rounds down to 2**k
    assert np.array_equal(dw, ref(shape, xq, dyq, 4).fp32)


@pytest.mark.parametrize("cap", [12, 6, 10])
def test_a_flush_cap_that_is_no_power_of_two_keeps_exact_mode_exact(cap):
    # the proof covers chunks [k f, (k+1) f) of a power of two f; a cap of 12 under a proven 16
    # made chunks like [12, 24) that straddle two proven ones, and their INT32 partial wrapped
    shape = (1, 19, 7, 1, 1, 1, 1, (2, 1), (2, 2), (2, 2))
    sp = spec_of(shape)
    xq = DfpTensor(np.full(sp.input_shape, MAXM, np.int16), -15)
    y = np.full(sp.output_shape, MAXM, np.int16)
    y.reshape(-1)[[4, 8, 25, 26]] = -MAXM
    dyq = DfpTensor(y, -16)
    dw, info = run(shape, xq, dyq, overflow="exact", config=pw.default_config(sp, HOST).replace(flush=cap))
    r = ref(shape, xq, dyq, info.flush)
    assert info.flush & (info.flush - 1) == 0 and info.flush <= cap
    assert not r.overflowed and np.array_equal(dw, r.fp32)


@pytest.mark.parametrize("tier", RUNNABLE)
def test_fast_mode_saturation_count(tier):
    t = host_target(tier)
    shape = SHAPES[0]
    xq, dyq = operands(shape, np.random.default_rng(5), "small")
    dw, info = run(shape, xq, dyq, overflow="fast", target=t)
    assert info.overflow == "fast" and info.saturated == 0 and info.tier == tier
    assert np.array_equal(dw, ref(shape, xq, dyq, info.flush).fp32)
    # Same sign everywhere: every partial over >= 2 pairs of 32767**2 saturates.
    sp = spec_of(shape)
    big_x = DfpTensor(np.full(sp.input_shape, MAXM, np.int16), -15)
    big_y = DfpTensor(np.full(sp.output_shape, MAXM, np.int16), -15)
    dw, info = run(shape, big_x, big_y, overflow="fast", target=t,
                   config=pw.default_config(sp, t).replace(flush=8))
    r = ref(shape, big_x, big_y, 8, saturate=True)
    assert info.saturated == r.saturated > 0
    assert np.array_equal(dw, r.fp32)
    # Mixed signs (adversarial): where a lane clips depends on the pair steps, and with Q = 7
    # (odd) the kernel pairs pixels within rows (the last one with a zero): the reference
    # steps the same pairs, so counts and bits still agree, flush interval odd or even.
    xa, ya = operands(shape, np.random.default_rng(5), "adversarial")
    for flush in (64, 10):
        dw, info = run(shape, xa, ya, overflow="fast", target=t,
                       config=pw.default_config(sp, t).replace(flush=flush))
        r = ref(shape, xa, ya, flush, saturate=True)
        assert info.saturated == r.saturated > 0 and np.array_equal(dw, r.fp32), flush


@pytest.mark.parametrize("tier", RUNNABLE)
@pytest.mark.parametrize("seed", range(1, 9))
def test_fast_mode_tuner_check_agrees_with_the_reference_on_odd_rows(tier, seed):
    # what `dfpgen tune` and `dfpgen cache verify` check for every fast-mode candidate: the
    # random operands of seeds 1 and 8 saturate a lane of this 7x7 layer (Q odd)
    from dfpgen.cli_commands import check_exact
    t = host_target(tier)
    sp = parse_full("n1c64h7w7k64r3s3u1p1", "bwd_weight")
    ok, note = check_exact(sp, pw.default_config(sp, t, None), "fast", seed, t)
    assert ok, note


@pytest.mark.parametrize("tier", RUNNABLE)
def test_every_tier_gives_the_same_bits(tier):
    shape = SHAPES[1]
    xq, dyq = operands(shape, np.random.default_rng(6), "real")
    base, info0 = run(shape, xq, dyq, target=host_target(RUNNABLE[0]))
    dw, info = run(shape, xq, dyq, target=host_target(tier))
    assert info.tier == tier and info.flush == info0.flush
    assert np.array_equal(dw, base)


def test_threads_and_buffer_reuse_do_not_change_bits():
    shape = SHAPES[5]
    xq, dyq = operands(shape, np.random.default_rng(7), "real")
    one, _ = run(shape, xq, dyq, threads=1)
    two, info = run(shape, xq, dyq, threads=2)
    assert info.threads == 2
    assert np.array_equal(one, two)
    bwd_weight.release_buffers()  # fresh pool: same bits as with reused (dirty) buffers
    again, _ = run(shape, xq, dyq, threads=2)
    assert np.array_equal(one, again)


def test_search_space_renders_verifies_and_is_exact():
    shape = (2, 19, 5, 6, 40, 3, 3, 1, 1, 1)
    sp = spec_of(shape)
    xq, dyq = operands(shape, np.random.default_rng(8), "real")
    space = pw.search_space(sp, HOST)
    assert len(space) >= 4
    expect = None
    for cfg in space:
        for mode in ("exact", "fast"):
            p = pw.plan(sp, cfg, HOST, mode)
            compile_ir(render(bwd_weight.TEMPLATE, p=p), cpu=HOST.compile_cpu, features=HOST.compile_features)
        dw, info = run(shape, xq, dyq, config=cfg)
        if expect is None:
            expect = ref(shape, xq, dyq, info.flush).fp32
        assert np.array_equal(dw, expect), cfg


def test_out_of_range_scale_exponent_uses_scaled_flush():
    """E = Ex + Edy outside [-126, 63]: the in-kernel two-multiply flush (subnormal results)."""
    shape = SHAPES[0]
    rng = np.random.default_rng(9)
    xs, dys = operands(shape, rng, "real")
    for ex, ey in ((-100, -60), (40, 30)):
        xq, dyq = DfpTensor(xs.mantissa, ex), DfpTensor(dys.mantissa, ey)
        dw, info = run(shape, xq, dyq)
        assert info.symbol.endswith("_sc") and info.scale_exp == ex + ey
        assert np.array_equal(dw, ref(shape, xq, dyq, info.flush).fp32)


@pytest.mark.parametrize("shape", [SHAPES[0], SHAPES[3]], ids=lambda s: spec_of(s).geometry())
def test_matches_torch_float64(shape):
    """Against torch.nn.grad.conv2d_weight in float64 on the dequantized operands. Each of the
    n flushes rounds the partial (vcvtdq2ps) and the FP32 sum once, each by at most 2**-24 of
    the sum of |products| it covers, so |error| <= (2n + 1) * 2**-24 * (|X| conv |dY|)."""
    sp = spec_of(shape)
    xq, dyq = operands(shape, np.random.default_rng(10), "real")
    dw, info = run(shape, xq, dyq)
    x = torch.from_numpy(xq.dequantize(np.float64))
    dy = torch.from_numpy(dyq.dequantize(np.float64))
    kw = dict(stride=sp.stride, padding=sp.padding, dilation=sp.dilation)
    want = torch.nn.grad.conv2d_weight(x, sp.weight_shape, dy, **kw).numpy()
    mag = torch.nn.grad.conv2d_weight(x.abs(), sp.weight_shape, dy.abs(), **kw).numpy()
    n = -(-sp.N * sp.P * sp.Q // info.flush)
    tol = (2 * n + 1) * 2.0 ** -24 * mag
    assert np.all(np.abs(dw - want) <= tol)
    assert np.abs(dw - want).max() > 0 or n == 1  # the check can see rounding


def test_plan_register_budget_and_layouts():
    sp = spec_of(SHAPES[4])  # C = K = 33
    with pytest.raises(DfpError, match="register"):
        pw.plan(sp, TuningConfig(k_vecs=2, pixels=20), HOST)
    with pytest.raises(DfpError, match="register"):
        pw.plan(sp, TuningConfig(k_vecs=2, pixels=7), host_target("avx2"))
    with pytest.raises(DfpError, match="unroll"):
        pw.plan(sp, TuningConfig(k_vecs=2, pixels=6, unroll="4vnni"), HOST)
    for cfg in pw.search_space(sp, HOST):
        p = pw.plan(sp, cfg, HOST)
        assert pw.registers_needed(p.kv, p.cb, HOST.isa, saturating=True) <= HOST.registers
        assert p.Kp % 16 == 0 and p.Kp >= sp.K
    # Planning needs no execution: the AVX-512 plan is checked on any host.
    p = pw.plan(sp, TuningConfig(k_vecs=2, pixels=13, c_block=128), host_target("avx512_vnni"))
    assert p.symbol == "dfp_conv_bwdw_n3c33h5w5k33r1s1u1p0_kb2_cb13_pp128_avx512_vnni_exact"
    # K = 33 -> Kp = 48 = 3 vectors: one block of 2 and a tail of 1; C = 33 -> 13 + 13 + 7
    assert (p.Kp, p.n_kb, p.kv_tail, p.n_cb, p.cb_tail) == (48, 2, 1, 3, 7) or HOST.lanes != 16
    cols = pw.column_table(p)
    assert cols.shape == (3, 4) and cols[:, 2].tolist() == [13, 13, 7] and cols[:, 3].tolist() == [0, 13, 26]
    for threads in (1, 2, 16):
        w = pw.work_split(p, threads)
        assert w.n_groups * w.group >= p.n_cols and w.n_kgroups * w.kb_group >= p.n_kb
        assert w.items >= min(threads, p.n_kb * p.n_cols)


def test_work_split_column_groups_can_match_many_threads():
    """Column groups of any even size: on 16 threads 64 channels at 56x56 (AVX-512 short-flush
    plan: 90 column blocks, 2 K-blocks) split into exactly 16 items (2 K-groups x 8 groups of
    12 columns), not the 46 (2 x 23 groups of 4) that powers of two allowed: three rounds of
    unequal items per thread; the sizes are exactly the distinct ceil(n / k)."""
    assert pw._even_sizes(10) == [1, 2, 3, 4, 5, 10]
    assert pw._even_sizes(1) == [1]
    for n in (7, 90, 333):
        sizes = pw._even_sizes(n)
        assert sorted({-(-n // (-(-n // g))) for g in range(1, n + 1)}) == sizes
    sp = parse_full("n32c64h56w56k64r3s3u1p1", "bwd_weight")
    t = host_target("avx512_vnni")
    p = pw.plan(sp, pw.default_config(sp, t, flush=8), t, "exact")
    assert (p.n_kb, p.n_cols) == (2, 90)
    w = pw.work_split(p, 16)
    assert w.items == 16 and w.n_groups * w.group >= p.n_cols
    # two threads keep few, large items (traffic wins there)
    assert pw.work_split(p, 2).items <= 4


def _simulate(seg: np.ndarray, p, flush: int):
    """The pixels m each segment runs (masks applied) and the m after which it flushes
    (in-loop countdowns and flush-after flags), as the kernel executes them."""
    sp = p.spec
    seen, flush_at, m = [], [], -1
    for xoff, dyoff, npairs, ctl in seg.tolist():
        row, j0 = divmod(dyoff // p.Ks, p.Q2)
        mask, cnt = ctl & 0xFFFFFFFF, ctl >> ws.CNT_SHIFT
        for j in range(j0, j0 + npairs):
            for e in (0, 1):
                q = 2 * j + e
                keep = mask == 0xFFFFFFFF or (mask == ws.MASK_LO and e == 0) or \
                    (mask == (ws.MASK_HI & 0xFFFFFFFF) and e == 1)
                if keep and q < sp.Q:
                    m = row * sp.Q + q
                    seen.append(m)
            if mask == 0xFFFFFFFF:  # the run loop's countdown
                cnt -= 1
                if cnt == 0:
                    flush_at.append(m)
                    cnt = flush // 2
        if (ctl >> 32) & 1:
            flush_at.append(m)
    return seen, flush_at


@pytest.mark.parametrize("geometry", ["n2c3h5w7k4r3s3p1", "n1c3h1w301k4", "n1c3h1w300k4", "n3c2h2w90k4r1s3"])
def test_schedule_covers_every_pixel_once(geometry):
    """Segments list each (row, pixel) exactly once (split pairs as two masked halves), none
    longer than a cache block, and flushes sit after pixel m = i*flush - 1 and at the end,
    once each; rows are not split at pair-aligned flushes."""
    sp = parse_full(geometry, "bwd_weight")
    p = pw.plan(sp, pw.default_config(sp, HOST).replace(c_block=64), HOST)
    M = sp.N * sp.P * sp.Q
    for flush in (2, 4, 6, 10, 14, 128, 1000):
        seg, blocks = ws.schedule(p, flush)
        assert blocks[0] == 0 and blocks[-1] == len(seg)
        assert seg[:, 2].max() <= 64
        seen, flush_at = _simulate(seg, p, flush)
        assert seen == list(range(M))
        assert flush_at == sorted(set(list(range(flush - 1, M, flush)) + [M - 1]))
        if flush >= 2 * sp.Q and p.Q2 <= 64:  # a chunk boundary per row at most
            assert len(seg) <= 3 * sp.N * sp.P
    with pytest.raises(DfpError, match="even"):
        ws.schedule(p, 5)


def test_even_q_rows_are_single_segments():
    # Even Q: every chunk boundary is pair-aligned, so each row is one segment.
    sp8 = ConvSpec(2, 3, 5, 8, 4, 3, 3, 1, 1, 1, pass_kind="bwd_weight")
    p8 = pw.plan(sp8, pw.default_config(sp8, HOST), HOST)
    seg, _ = ws.schedule(p8, 4)
    assert len(seg) == sp8.N * sp8.P and not np.any((seg[:, 3] >> 32) & 1)
    # ... and the vectorised even-Q builder agrees with the general row splitter
    for args in [(2, 5, 8, 1, 1, 3, 7, 10, 16), (3, 4, 6, 2, 1, 5, 9, 12, 32), (1, 3, 2, 1, 2, 2, 5, 9, 16)]:
        for flush in (2, 4, 6, 8, 10, 24, 1024):
            assert np.array_equal(ws._even_q_segments(*args, flush), ws._row_segments(*args, flush)), (args, flush)


def test_bad_inputs():
    shape = SHAPES[0]
    xq, dyq = operands(shape, np.random.default_rng(11), "small")
    sp = spec_of(shape)
    with pytest.raises(DfpError, match="channels"):
        bwd_weight.prepare(xq, (sp.K, sp.C + 1, 3, 3), dyq, 1, 1)
    with pytest.raises(DfpError, match="grad_output shape"):
        bwd_weight.prepare(xq, sp.weight_shape, dyq, 2, 1)
    with pytest.raises(DfpError, match="overflow"):
        run(shape, xq, dyq, overflow="maybe")
    with pytest.raises(DfpError, match="DfpTensor"):
        bwd_weight.prepare(xq.mantissa, sp.weight_shape, dyq, 1, 1)
    bad = xq.mantissa.copy()
    bad[0, 0, 0, 0] = -32768
    with pytest.raises(DfpError, match="-32768"):
        run(shape, DfpTensor(bad, xq.exponent), dyq)
    with pytest.raises(DfpError, match="even"):
        run(shape, xq, dyq, overflow="fast", config=pw.default_config(sp, HOST).replace(flush=7))


@pytest.mark.parametrize("flush", [None, 8])
def test_default_kernels_do_not_spill_vector_registers(flush):
    """The register budget the planner asserts holds after LLVM's register allocation: no
    vector register is stored to or loaded from the stack."""
    sp = ConvSpec(8, 128, 28, 28, 128, 3, 3, 1, 1, pass_kind="bwd_weight")
    for mode in ("exact", "fast"):
        p = pw.plan(sp, pw.default_config(sp, HOST, flush), HOST, mode)
        asm = emit_assembly(render(bwd_weight.TEMPLATE, p=p), cpu=HOST.compile_cpu, features=HOST.compile_features)
        assert "vpdpwssd" in asm or HOST.tier not in ("avx512_vnni", "vnni256")
        spills = vector_spills(asm)
        assert not spills, spills[:5]


@pytest.mark.parametrize("layout", ["nchw", "nhwc", "sliced"])
def test_pack_pairs_matches_numpy(layout):
    """The generated packer against a numpy model, for any source strides."""
    rng = np.random.default_rng(12)
    base = rng.integers(-32767, 32768, (2, 37, 5, 9)).astype(np.int16)
    if layout == "nhwc":
        src = np.ascontiguousarray(base.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2)
    elif layout == "sliced":  # channel stride 1 inside a wider NHWC buffer (padded C), odd W step
        buf = np.zeros((2, 5, 18, 40), np.int16)
        buf[:, :, ::2, :37] = base.transpose(0, 2, 3, 1)
        src = buf[:, :, ::2, :37].transpose(0, 3, 1, 2)
    else:
        src = base
    for pad, istep, delta, Hout, Wout, cout, hstep in (((1, 2), 1, 1, 7, 12, 37, 1), ((0, 0), 2, 1, 5, 5, 48, 1),
                                                       ((2, 1), 4, 2, 8, 3, 40, 1), ((1, 0), 4, 2, 4, 3, 37, 2)):
        dst, amax, peak = bwd_weight.pack_pairs(src, (2, Hout, Wout), pad=pad, istep=istep, delta=delta, cout=cout,
                                     hstep=hstep)
        xp = np.zeros((2, 37, Hout * hstep + 8, Wout * istep + delta + 8), np.int64)
        xp[:, :, pad[0]:pad[0] + 5, pad[1]:pad[1] + 9] = base
        want = np.zeros((2, Hout, Wout, cout, 2), np.int64)
        for e, off in ((0, 0), (1, delta)):
            cols = xp[:, :, :Hout * hstep:hstep, off:off + Wout * istep:istep]  # (N, C, Hout, Wout)
            want[:, :, :, :37, e] = cols.transpose(0, 2, 3, 1)
        assert np.array_equal(dst, want)
        assert np.array_equal(amax, np.abs(want).max(axis=3))
        assert peak == amax.max()


@pytest.mark.parametrize("C,M", [(3, 14), (16, 1568), (64, 2 * 3136), (130, 192), (5, 2 * 97), (4, 7)])
def test_one_long_pixel_row_packs_in_parallel_rows(C, M, monkeypatch):
    # a 1x1 layer's backward-weight packs its N*P*Q pixels as one row of disjoint pairs; the
    # packer splits that row into rows of whole pairs so that the threads share it (one
    # core did it all), with the layout and maxima of the single row
    from dfpgen import bwd_weight as bw
    ranges = []
    real = bw.parallel_call
    monkeypatch.setattr(bw, "parallel_call", lambda fn, args, at, total, nt, *a, **k:
                        ranges.append((total, nt)) or real(fn, args, at, total, nt, *a, **k))
    nhwc = np.random.default_rng(M).integers(-32767, 32768, (M, C)).astype(np.int16)
    src = nhwc.reshape(1, 1, M, C).transpose(0, 3, 1, 2)
    q2 = -(-M // 2)  # an odd row's last pair has a 0 partner
    dst, amax, peak = bw.pack_pairs(src, (1, 1, q2), istep=2, delta=1, cout=C + 3, threads=2)
    padded = np.zeros((2 * q2, C), np.int16)
    padded[:M] = nhwc
    want = np.zeros((1, 1, q2, C + 3, 2), np.int16)
    want[0, 0, :, :C, 0], want[0, 0, :, :C, 1] = padded[0::2], padded[1::2]
    a = np.abs(padded.astype(np.int32)).max(axis=1)
    assert np.array_equal(dst, want) and np.array_equal(amax, np.stack([a[0::2], a[1::2]], -1)[None, None])
    assert peak == amax.max()
    rows, nt = ranges[-1]
    # 97 pairs (a prime) or an odd pixel count: no split into whole pairs, one row
    assert (rows > 1) == (M % 2 == 0 and M // 2 != 97) and (nt == 2) == (rows >= 16), ranges
