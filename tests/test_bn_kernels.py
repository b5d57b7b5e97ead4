"""Fused BatchNorm kernels (dfpgen.bn): exact against the numpy golden model
(dfpgen.bn_reference), the output exponent rule, backward against float64, thread-count
independence, errors, and code generation for both vector widths."""
from __future__ import annotations

import numpy as np
import pytest

from dfpgen import bn, bn_reference as ref, jit
from dfpgen.dfp import exponent_for
from dfpgen.errors import DfpError
from dfpgen.target import host_target

SHAPES = [(1, 1), (63, 3), (64, 13), (65, 8), (300, 64), (130, 17)]


def _data(M, C, seed=0, residual=False):
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((M, C)) * rng.uniform(0.1, 4, C) + rng.uniform(-1, 1, C)).astype(np.float32)
    gamma = rng.uniform(-2, 2, C)  # negative gammas reverse the affine map's order
    beta = rng.standard_normal(C)
    r = np.maximum(rng.standard_normal((M, C)), 0).astype(np.float32) if residual else None
    return x, gamma, beta, r


def _forward(x, gamma, beta, r, relu=True, threads=None):
    st = bn.batch_stats(x, threads=threads)
    _, scale, shift = bn.affine_params(st.mean, st.var, gamma, beta, 1e-5)
    rr = None if r is None else (r.min(axis=0), r.max(axis=0))
    f = bn.forward(x, st, scale, shift, relu=relu, residual=r, residual_range=rr, threads=threads)
    return st, scale, shift, rr, f


@pytest.mark.parametrize("M,C", SHAPES)
def test_statistics_exact_against_reference(M, C):
    x, *_ = _data(M, C)
    st, want = bn.batch_stats(x), ref.stats(x)
    assert np.array_equal(st.sum, want.sum) and np.array_equal(st.sumsq, want.sumsq)
    assert np.array_equal(st.min, x.min(axis=0)) and np.array_equal(st.max, x.max(axis=0))
    np.testing.assert_allclose(st.mean, x.astype(np.float64).mean(axis=0), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("M,C", SHAPES)
@pytest.mark.parametrize("relu", [True, False])
@pytest.mark.parametrize("residual", [False, True])
def test_forward_mantissas_exact_against_reference(M, C, relu, residual):
    x, gamma, beta, r = _data(M, C, seed=M + C, residual=residual)
    st, scale, shift, rr, f = _forward(x, gamma, beta, r, relu)
    want = ref.forward(x, scale, shift, relu=relu, residual=r, residual_range=rr)
    assert f.x_exp == want["x_exp"] and f.y_exp == want["y_exp"]
    assert np.array_equal(f.x_q, want["x_q"])
    assert np.array_equal(f.y_q, want["y_q"])  # (M, Cp): the pad channel is 0
    assert np.array_equal(f.y_f.view(np.uint32), want["y_f"].view(np.uint32))
    if relu and residual:
        assert np.array_equal(ref.unpack_mask(f.mask, C), want["live"])
    else:
        assert f.mask is None


@pytest.mark.parametrize("relu", [True, False])
def test_output_exponent_is_exact_without_residual(relu):
    # The exponent fixed before the pass equals the max-abs rule applied to the values the
    # pass rounds (computed here in float64 from the golden model's float32 values).
    for seed in range(5):
        x, gamma, beta, _ = _data(500, 24, seed=seed)
        gamma[:3] = 0.0  # constant channels
        _, scale, shift, _, f = _forward(x, gamma, beta, None, relu)
        y = ref.forward(x, scale, shift, relu=relu)["y"]
        assert f.y_exp == exponent_for(float(np.abs(y.astype(np.float64)).max()))
        lo, hi = y.min(axis=0), y.max(axis=0)
        deq = lambda v: bn.mantissa_f32(v, f.y_exp) * bn.dequant_scale(f.y_exp)  # noqa: E731
        assert np.array_equal(f.lo, deq(lo)) and np.array_equal(f.hi, deq(hi))


def test_all_negative_input_after_relu_gives_zeros_and_exponent_zero():
    x = -np.abs(_data(100, 8)[0]) - 1
    st = bn.batch_stats(x)
    f = bn.forward(x, st, np.ones(8, np.float32), np.zeros(8, np.float32))
    assert f.y_exp == 0 and not f.y_q.any() and not f.y_f.any()


def test_residual_bound_holds_and_costs_at_most_one_bit_for_a_relu_residual():
    # Headroom cost of the residual bound: when the residual is a ReLU output (>= 0) and the BN
    # branch's channel maxima are at least the residual's, the bound is < 2x the true maximum.
    rng = np.random.default_rng(3)
    for seed in range(6):
        x, gamma, beta, _ = _data(400, 16, seed=seed)
        gamma = np.abs(gamma) + 0.5
        r = (np.maximum(rng.standard_normal((400, 16)), 0) * 0.3).astype(np.float32)
        st, scale, shift, rr, f = _forward(x, gamma, beta, r)
        y = ref.forward(x, scale, shift, residual=r, residual_range=rr)["y"]
        exact = exponent_for(float(np.abs(y).max()))
        assert exact <= f.y_exp <= exact + 1
        assert np.abs(y).max() * 2.0 ** -f.y_exp < 2 ** 15  # nothing beyond the format's range


def test_backward_matches_float64_batchnorm_on_the_dequantized_input():
    torch = pytest.importorskip("torch")
    for relu, residual in [(True, False), (False, False), (True, True)]:
        M, C = 700, 13
        x, gamma, beta, r = _data(M, C, seed=7, residual=residual)
        st, scale, shift, rr, f = _forward(x, gamma, beta, r, relu)
        invstd, _, _ = bn.affine_params(st.mean, st.var, gamma, beta, 1e-5)
        dy = np.random.default_rng(8).standard_normal((M, C)).astype(np.float32)
        got = bn.backward(dy, f.x_q, f.x_exp, f.sc, f.sh, st.mean, invstd, gamma, relu=relu,
                          mask=f.mask, residual=residual)
        live = ref.forward(x, scale, shift, relu=relu, residual=r, residual_range=rr)["live"]
        xd = torch.tensor(bn.dequantize_rows(f.x_q, f.x_exp), dtype=torch.float64, requires_grad=True)
        g = torch.tensor(gamma, requires_grad=True)
        b = torch.tensor(beta, requires_grad=True)
        xhat = (xd - xd.mean(0)) / torch.sqrt(xd.var(0, unbiased=False) + 1e-5)
        out = (xhat * g + b) * torch.tensor(live if relu else np.ones_like(live))
        out.backward(torch.tensor(dy, dtype=torch.float64))
        # Tolerance: the statistics are X's, the normalized values X's DFP16 copy's (each
        # element within 2**-16 of max|X|); float32 coefficients and dX add ~1e-7.
        tol = 3e-5
        assert np.abs(got.dx - xd.grad.numpy()).max() <= tol * np.abs(xd.grad.numpy()).max()
        assert np.abs(got.dgamma - g.grad.numpy()).max() <= tol * np.abs(g.grad.numpy()).max()
        assert np.abs(got.dbeta - b.grad.numpy()).max() <= 1e-9 * M
        if residual:
            assert np.array_equal(got.dres, np.where(live, dy, np.float32(0)))


def test_bit_identical_for_one_and_two_threads():
    x, gamma, beta, r = _data(1000, 40, residual=True)
    outs = []
    for threads in (1, 2):
        st, scale, shift, rr, f = _forward(x, gamma, beta, r, threads=threads)
        invstd, _, _ = bn.affine_params(st.mean, st.var, gamma, beta, 1e-5)
        dy = np.random.default_rng(1).standard_normal(x.shape).astype(np.float32)
        b = bn.backward(dy, f.x_q, f.x_exp, f.sc, f.sh, st.mean, invstd, gamma, mask=f.mask,
                        residual=True, threads=threads)
        outs.append((st.sum, st.sumsq, f.y_q, f.y_f, b.dx, b.dgamma, b.dbeta, b.dres))
    for a, b in zip(*outs):
        assert np.array_equal(a, b)


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("C,image,pad", [(13, (3, 5, 7), (1, 1, 1, 1)), (16, (2, 4, 9), (0, 2, 3, 1)),
                                         (8, (1, 1, 1), (2, 2, 2, 2)), (40, (4, 6, 3), (1, 1, 1, 1))])
def test_int16_output_into_the_padded_buffer_equals_padding_the_rows_afterwards(C, image, pad, threads):
    # out_pad: the kernel writes each pixel's row into the zero-padded NHWC image (the row
    # mapping stepped per pixel from where each thread's range starts): the same bits as the
    # dense rows padded afterwards by dfpgen.fwd_family.padded_nhwc, and the same float32
    from dfpgen.fwd_family import padded_nhwc
    n, h, w = image
    x, gamma, beta, r = _data(n * h * w, C, seed=C, residual=True)
    st = bn.batch_stats(x)
    _, scale, shift = bn.affine_params(st.mean, st.var, gamma, beta, 1e-5)
    rr = (r.min(axis=0), r.max(axis=0))
    dense = bn.forward(x, st, scale, shift, residual=r, residual_range=rr, threads=threads)
    padded = bn.forward(x, st, scale, shift, residual=r, residual_range=rr, threads=threads,
                        out_pad=(image, pad))
    cp = C + C % 2
    m = dense.y_q.reshape(n, h, w, cp)[..., :C].transpose(0, 3, 1, 2)
    assert padded.y_q.shape == (n, pad[0] + h + pad[1], pad[2] + w + pad[3], cp)
    assert np.array_equal(padded.y_q, padded_nhwc(m, pad, cp))
    assert np.array_equal(padded.y_f, dense.y_f) and padded.y_exp == dense.y_exp
    with pytest.raises(DfpError, match="do not fit"):
        bn.forward(x, st, scale, shift, out_pad=((n, h, w + 1), pad))


def test_bad_inputs_raise_one_line_errors():
    x, gamma, beta, r = _data(100, 8, residual=True)
    bad = x.copy(); bad[3, 2] = np.nan
    with pytest.raises(DfpError, match=r"conv out: .*1 NaN.*\(3, 2\)"):
        bn.batch_stats(bad, name="conv out")
    with pytest.raises(DfpError, match="C-contiguous float32"):
        bn.batch_stats(x.astype(np.float64))
    st = bn.batch_stats(x)
    with pytest.raises(DfpError, match="per-channel range"):
        bn.forward(x, st, np.ones(8), np.zeros(8), residual=r)
    with pytest.raises(DfpError, match=r"expected shape \(8,\)"):
        bn.forward(x, st, np.ones(7), np.zeros(8))
    f = bn.forward(x, st, np.ones(8), np.zeros(8), residual=r, residual_range=(r.min(0), r.max(0)))
    with pytest.raises(DfpError, match="bit mask"):
        bn.backward(x, f.x_q, f.x_exp, f.sc, f.sh, st.mean, np.ones(8), np.ones(8), residual=True)
    with pytest.raises(DfpError, match="unknown BatchNorm kernel kind"):
        bn.kernel_plan("nope", host_target())


@pytest.mark.parametrize("tier", ["avx512_vnni", "avx2", "generic"])
def test_every_kernel_renders_and_compiles_for_each_vector_width(tier):
    target = host_target().with_tier(tier)
    for kind in bn.KINDS:
        for relu, residual in [(True, False), (True, True), (False, False)]:
            flags = {} if kind == "stats" else dict(relu=relu, residual=residual)
            ir = bn.render_kernel(kind, target, **flags)
            assert f"<{target.lanes} x float>" in ir
            jit.compile_ir(ir, cpu=target.compile_cpu, features=target.compile_features, name=kind)


@pytest.mark.parametrize("threads", [1, 2])
def test_statistics_chunk_length_is_an_argument(threads):
    # chunks of `chunk` pixels summed in pixel order, then in chunk order: the golden model's
    # bits for any chunk length (one image row is what the runtime and the conv epilogue use)
    x = (np.random.default_rng(21).standard_normal((257, 19)) * 3 + 1).astype(np.float32)
    for chunk in (1, 7, 56, 64, 100, 257, 1000):
        st, want = bn.batch_stats(x, chunk=chunk, threads=threads), ref.stats(x, chunk)
        for f in ("sum", "sumsq", "min", "max"):
            assert np.array_equal(getattr(st, f), getattr(want, f)), (chunk, f)
    # a different chunking rounds the float64 sums differently (the test can tell them apart)
    a, b = bn.batch_stats(x, chunk=7), bn.batch_stats(x, chunk=64)
    assert not np.array_equal(a.sumsq, b.sumsq) and np.allclose(a.sumsq, b.sumsq, rtol=1e-13)
    for bad in (0, -3, 2.5, "7", True, np.bool_(True)):
        with pytest.raises(DfpError, match="chunk must be a positive number of pixels"):
            bn.batch_stats(x, chunk=bad)
    # a chunk longer than the activation is one chunk of M pixels, also past the kernel's
    # int64 argument (2**63 would wrap negative, 2**64 + 1 to a chunk of one pixel)
    whole = bn.batch_stats(x, chunk=257)
    for big in (2**31, 2**63, 2**64 + 1, np.uint64(2**64 - 1)):
        st = bn.batch_stats(x, chunk=big, threads=threads)
        assert all(np.array_equal(getattr(st, f), getattr(whole, f)) for f in ("sum", "sumsq", "min", "max"))


def test_combine_partials_adds_in_chunk_order_from_strided_rows():
    # the combine kernel adds the chunks' partials row after row (the golden model's loop),
    # reading rows through their stride; other layouts are refused with a one-line error
    rng = np.random.default_rng(22)
    lanes = host_target().lanes
    n, cv = 37, 3 * lanes
    both = rng.standard_normal((n, 2, cv)) * 10.0 ** rng.integers(-8, 8, (n, 2, cv))
    mm = rng.standard_normal((n, 2, cv)).astype(np.float32)
    st = bn.combine_partials(both[:, 0], both[:, 1], mm[:, 0], mm[:, 1], cv - 1, 999)
    want_s, want_q = np.zeros(cv), np.zeros(cv)
    for i in range(n):
        want_s += both[i, 0]; want_q += both[i, 1]
    assert st.count == 999 and st.sum.shape == (cv - 1,)
    assert np.array_equal(st.sum, want_s[:-1]) and np.array_equal(st.sumsq, want_q[:-1])
    assert np.array_equal(st.min, mm[:, 0].min(axis=0)[:-1]) and np.array_equal(st.max, mm[:, 1].max(axis=0)[:-1])
    with pytest.raises(DfpError, match="partials must be"):
        bn.combine_partials(both[:, 0], both[:, 1], mm[:, 0].astype(np.float64), mm[:, 1], cv, 1)
    # one row whose columns are strided: refused, not read as if contiguous
    wide = rng.standard_normal((1, 2 * cv))
    one, onef = wide[:, ::2], wide.astype(np.float32)[:, ::2]
    with pytest.raises(DfpError, match="contiguous columns"):
        bn.combine_partials(one, one, onef, onef, one.shape[1], 1)
    with pytest.raises(DfpError, match="do not fit"):
        bn.combine_partials(both[:, 0], both[:, 1], mm[:, 0], mm[:, 1], cv + 1, 1)
    with pytest.raises(DfpError, match="not a multiple"):
        c = np.ascontiguousarray
        bn.combine_partials(c(both[:, 0, :-1]), c(both[:, 1, :-1]), c(mm[:, 0, :-1]), c(mm[:, 1, :-1]), 2, 1)
