"""Adversarial review of the core numpy API (dfpgen.conv, dfp, spec, autotune lookup).

Each test below either pins a bug that was found and fixed (the test failed before the fix)
or hammers a promise that held up (random geometry in exact mode against dfpgen.reference,
memory layouts, Python threads sharing kernels). Small shapes only: the suite stays fast.
"""
from __future__ import annotations

import json
import threading
import warnings

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dfpgen import conv, reference
from dfpgen.dfp import DfpTensor, quantize
from dfpgen.errors import CacheWarning, DfpError
from dfpgen.spec import ConvSpec

RNG = np.random.default_rng(1234)


def _f32(*shape, rng=RNG):
    return rng.standard_normal(shape).astype(np.float32)


# ----------------------------------------------------------------------------- empty batches
def test_conv2d_weight_of_an_empty_batch_is_a_zero_gradient():
    # conv2d and conv2d_input accept N = 0; the weight gradient of no samples is zero (torch too).
    x, dy = _f32(0, 3, 5, 5), _f32(0, 4, 5, 5)
    dw, info = conv.conv2d_weight(x, (4, 3, 3, 3), dy, padding=1, return_info=True)
    want = torch.nn.grad.conv2d_weight(torch.from_numpy(x), (4, 3, 3, 3), torch.from_numpy(dy), padding=1)
    assert dw.dtype == np.float32 and dw.shape == (4, 3, 3, 3)
    assert np.array_equal(dw, want.numpy()) and not dw.any()
    assert info.pass_kind == "bwd_weight" and info.saturated == 0


def test_conv2d_weight_of_an_empty_batch_still_checks_shapes():
    with pytest.raises(DfpError, match="grad_output"):
        conv.conv2d_weight(_f32(0, 3, 5, 5), (4, 3, 3, 3), _f32(0, 4, 4, 4), padding=1)
    with pytest.raises(DfpError, match="C=2"):
        conv.conv2d_weight(_f32(0, 3, 5, 5), (4, 2, 3, 3), _f32(0, 4, 5, 5), padding=1)


def test_linear_of_an_empty_batch():
    w = _f32(5, 4)
    y = conv.linear(np.zeros((0, 4), np.float32), w)
    assert y.dtype == np.float32 and y.shape == (0, 5)
    with pytest.raises(DfpError, match="C=3"):
        conv.linear(np.zeros((0, 3), np.float32), w)


def test_conv2d_input_error_names_the_expected_empty_batch_shape():
    with pytest.raises(DfpError, match=r"\(0, 4, 5, 5\)"):
        conv.conv2d_input((0, 3, 5, 5), _f32(4, 3, 3, 3), _f32(2, 4, 5, 5), padding=1)


# ----------------------------------------------------------------------------- argument types
def test_numpy_integers_are_valid_geometry():
    x, w = _f32(1, 3, 9, 8), _f32(2, 3, 3, 3)
    want = conv.conv2d(x, w, stride=2, padding=1, dilation=1)
    got = conv.conv2d(x, w, stride=np.int64(2), padding=np.int32(1), dilation=(np.int8(1), 1))
    assert np.array_equal(got, want)
    assert ConvSpec(1, 3, 9, 8, 2, 3, 3, np.int64(2), (np.uint8(1), 1)).stride == (2, 2)


@pytest.mark.parametrize("bad", [(1.5, 1), 2.0, "12", (1, "2"), None, (2, None)])
def test_non_integer_geometry_is_rejected_not_truncated(bad):
    x, w = _f32(1, 3, 9, 8), _f32(2, 3, 3, 3)
    with pytest.raises(DfpError, match="stride must be an int or a pair of ints"):
        conv.conv2d(x, w, stride=bad)


@pytest.mark.parametrize("shape", [(1, 3, 7.5, 6), (1, 3, "7", 6), (1.0 + 1e-9, 3, 7, 6)])
def test_conv2d_input_rejects_a_non_integer_input_shape(shape):
    with pytest.raises(DfpError, match="input_shape"):
        conv.conv2d_input(shape, _f32(4, 3, 3, 3), _f32(1, 4, 7, 6), padding=1)


def test_conv2d_input_accepts_integer_like_input_shapes():
    w, dy = _f32(4, 3, 3, 3), _f32(1, 4, 7, 6)
    want = conv.conv2d_input((1, 3, 7, 6), w, dy, padding=1)
    for shape in (np.array([1, 3, 7, 6]), torch.Size([1, 3, 7, 6]), [1, 3, 7, 6]):
        assert np.array_equal(conv.conv2d_input(shape, w, dy, padding=1), want)


def test_dfp_tensor_rejects_a_fractional_exponent():
    m = np.ones((1, 1, 2, 2), np.int16)
    with pytest.raises(DfpError, match="exponent"):
        DfpTensor(m, 1.5)
    with pytest.raises(DfpError, match="exponent"):
        DfpTensor(m, "3")
    assert DfpTensor(m, np.int64(-3)).exponent == -3 and DfpTensor(m, -3.0).exponent == -3


@pytest.mark.parametrize("threads", [-1, 2.5, "2"])
def test_bad_thread_counts_are_rejected(threads):
    x, w = _f32(1, 3, 5, 5), _f32(2, 3, 3, 3)
    dy = _f32(1, 2, 5, 5)
    for call in (lambda: conv.conv2d(x, w, padding=1, threads=threads),
                 lambda: conv.conv2d_input(x.shape, w, dy, padding=1, threads=threads),
                 lambda: conv.conv2d_weight(x, w.shape, dy, padding=1, threads=threads),
                 lambda: conv.linear(x[:, :, 0, 0], w[:, :, 0, 0], threads=threads)):
        with pytest.raises(DfpError, match="threads"):
            call()


def test_an_unknown_overflow_mode_is_rejected_even_for_an_empty_batch():
    w = _f32(2, 3, 3, 3)
    for call in (lambda: conv.conv2d(_f32(0, 3, 5, 5), w, overflow="Exact"),
                 lambda: conv.conv2d_input((0, 3, 5, 5), w, _f32(0, 2, 3, 3), overflow="Exact"),
                 lambda: conv.conv2d_weight(_f32(0, 3, 5, 5), w.shape, _f32(0, 2, 3, 3), overflow="Exact"),
                 lambda: conv.linear(_f32(0, 3), w[:, :, 0, 0], overflow="Exact")):
        with pytest.raises(DfpError, match="overflow must be"):
            call()


# ----------------------------------------------------------------------------- tuning cache
@pytest.fixture
def fresh_cache(tmp_path, monkeypatch):
    from dfpgen import autotune, cache
    monkeypatch.setenv(cache.ENV_DIR, str(tmp_path / "cache"))
    monkeypatch.delenv(cache.ENV_CACHE, raising=False)
    cache.forget_memory()
    autotune.forget_lookups()
    yield
    cache.forget_memory()
    autotune.forget_lookups()


@pytest.mark.parametrize("pass_kind", ["fwd", "bwd_data", "bwd_weight"])
def test_an_unplannable_tuning_decision_is_ignored_with_a_warning(fresh_cache, pass_kind):
    # A decision whose config parses but cannot be planned (a hand-edited or corrupt entry:
    # 99 x 6 accumulators) used to make every call of that layer raise.
    from dfpgen import autotune, cache
    from dfpgen.target import host_target
    x, w, dy = _f32(1, 4, 6, 6), _f32(4, 4, 3, 3), _f32(1, 4, 6, 6)
    spec = ConvSpec(1, 4, 6, 6, 4, 3, 3, 1, 1, 1, pass_kind)
    bad = {"k_vecs": 99, "pixels": 6, "c_block": 4, "flush": 0, "unroll": "none", "threads": 0}
    if pass_kind == "bwd_weight":  # its planner clamps k_vecs to K; it has no 4vnni unroll
        bad["unroll"] = "4vnni"
    cache.store_tuning(autotune.tuning_fields(spec, host_target(), "exact"), {"config": bad})
    cache.forget_memory()
    with pytest.warns(CacheWarning, match="ignored"):
        assert autotune.lookup(spec) is None
    run = {"fwd": lambda: conv.conv2d(x, w, padding=1),
           "bwd_data": lambda: conv.conv2d_input(x.shape, w, dy, padding=1),
           "bwd_weight": lambda: conv.conv2d_weight(x, w.shape, dy, padding=1)}[pass_kind]
    out = run()
    xq, wq, dyq = quantize(x), quantize(w), quantize(dy)
    xd, wd, dyd = (torch.from_numpy(q.dequantize(np.float64)) for q in (xq, wq, dyq))
    want = {"fwd": lambda: torch.nn.functional.conv2d(xd, wd, padding=1),
            "bwd_data": lambda: torch.nn.grad.conv2d_input(x.shape, wd, dyd, padding=1),
            "bwd_weight": lambda: torch.nn.grad.conv2d_weight(xd, w.shape, dyd, padding=1)}[pass_kind]()
    np.testing.assert_allclose(out, want.numpy(), rtol=1e-5, atol=1e-5)


def test_a_malformed_thread_count_variable_is_a_clear_error(monkeypatch):
    # $DFPGEN_NUM_THREADS=abc used to end in int()'s bare ValueError deep inside a pass.
    from dfpgen.threads import num_threads
    monkeypatch.setenv("DFPGEN_NUM_THREADS", "abc")
    with pytest.raises(DfpError, match="DFPGEN_NUM_THREADS.*'abc'"):
        num_threads()
    with pytest.raises(DfpError, match="DFPGEN_NUM_THREADS"):
        conv.conv2d(_f32(1, 3, 5, 5), _f32(2, 3, 3, 3), padding=1)
    monkeypatch.setenv("DFPGEN_NUM_THREADS", "3")
    assert num_threads() == 3


# ----------------------------------------------------------------------------- held up
def _layout(a: np.ndarray, how: int) -> np.ndarray:
    """The same values in another memory layout: C order, channels_last, Fortran, reversed."""
    if how == 1:
        return np.ascontiguousarray(a.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2)
    if how == 2:
        return np.asfortranarray(a)
    if how == 3:
        return np.ascontiguousarray(a[:, :, ::-1, ::-1])[:, :, ::-1, ::-1]
    return a


@st.composite
def geometries(draw):
    r, s = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    u = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    d = (draw(st.integers(1, 5)), draw(st.integers(1, 2)))
    p = (draw(st.integers(0, 6)), draw(st.integers(0, 3)))
    h = draw(st.integers(max(1, d[0] * (r - 1) + 1 - 2 * p[0]), 9))
    w = draw(st.integers(max(1, d[1] * (s - 1) + 1 - 2 * p[1]), 9))
    return (draw(st.integers(1, 2)), draw(st.integers(1, 19)), h, w, draw(st.integers(1, 35)), r, s, u, p, d)


@settings(max_examples=30, derandomize=True, deadline=None, suppress_health_check=list(HealthCheck))
@given(geo=geometries(), threads=st.sampled_from([1, 2, 3, 7, 64]), how=st.integers(0, 3),
       seed=st.integers(0, 2 ** 16))
def test_random_geometry_exact_mode_matches_the_reference(geo, threads, how, seed):
    n, c, h, w, k, r, s, u, p, d = geo
    sp = ConvSpec(n, c, h, w, k, r, s, u, p, d)
    rng = np.random.default_rng(seed)
    x, wt, dy = _f32(n, c, h, w, rng=rng), _f32(k, c, r, s, rng=rng), _f32(*sp.output_shape, rng=rng)
    xq, wq, dyq = quantize(x), quantize(wt), quantize(dy)
    x, wt, dy = _layout(x, how), _layout(wt, how), _layout(dy, how)
    y, i = conv.conv2d(x, wt, None, u, p, d, threads=threads, return_info=True)
    ref = reference.conv2d_fwd(xq, wq, None, u, p, d, c_block=i.c_block, flush_taps=i.flush_taps)
    assert np.array_equal(y, ref.fp32) and not ref.overflowed
    dx, i = conv.conv2d_input(x.shape, wt, dy, u, p, d, threads=threads, return_info=True)
    ref = reference.conv2d_bwd_data(dyq, wq, (h, w), u, p, d, k_block=i.c_block, flush_taps=i.flush_taps)
    assert np.array_equal(dx, ref.fp32) and not ref.overflowed
    dw, i = conv.conv2d_weight(x, wt.shape, dy, u, p, d, threads=threads, return_info=True)
    ref = reference.conv2d_bwd_weight(xq, dyq, (r, s), u, p, d, flush_pixels=i.flush)
    assert np.array_equal(dw, ref.fp32) and not ref.overflowed


def test_python_threads_share_kernels_and_get_the_same_bits():
    shapes = [(2, 5, 9, 7, 6, 3, 3, 1, 1, 1), (1, 7, 8, 8, 9, 3, 3, 2, 1, 1), (2, 3, 6, 6, 17, 1, 1, 1, 0, 1)]
    cases = []
    for n, c, h, w, k, r, s, u, p, d in shapes:
        x, wt = _f32(n, c, h, w), _f32(k, c, r, s)
        y = conv.conv2d(x, wt, None, u, p, d, threads=1)
        dy = _f32(*y.shape)
        cases.append((x, wt, dy, (u, p, d), y, conv.conv2d_input(x.shape, wt, dy, u, p, d, threads=1),
                      conv.conv2d_weight(x, wt.shape, dy, u, p, d, threads=1)))
    bad, errors = [], []

    def work(i):
        try:
            for j in range(4):
                x, wt, dy, g, y, dx, dw = cases[(i + j) % len(cases)]
                t = 1 + (i + j) % 3
                bad.extend(name for name, a, b in (
                    ("fwd", conv.conv2d(x, wt, None, *g, threads=t), y),
                    ("bwd_data", conv.conv2d_input(x.shape, wt, dy, *g, threads=t), dx),
                    ("bwd_weight", conv.conv2d_weight(x, wt.shape, dy, *g, threads=t), dw)) if not np.array_equal(a, b))
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(repr(exc))
    ts = [threading.Thread(target=work, args=(i,)) for i in range(5)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert errors == [] and bad == []


# ----------------------------------------------------------------------------- packed views
def _channel_slice(m_even_nhwc: np.ndarray, c: int) -> np.ndarray:
    """(N, c, H, W) view of the first c channels of an (N, H, W, c+1) NHWC int16 array: the
    strides of a quantize_pack buffer, but the 'pad' channel c holds data."""
    return m_even_nhwc.transpose(0, 3, 1, 2)[:, :c]


@pytest.mark.parametrize("mode", ["exact", "fast"])
def test_a_channel_slice_of_an_nhwc_buffer_is_not_taken_for_a_packed_buffer(mode):
    # The odd-C window of an even-C NHWC array looked like quantize_pack's padded buffer, so
    # the forward paired channel C-1 with the sliced-off channel C: silent wrong results.
    rng = np.random.default_rng(7)
    n, c, h, w, k = 2, 5, 6, 6, 4
    xq = DfpTensor(_channel_slice(rng.integers(-999, 1000, (n, h, w, c + 1)).astype(np.int16), c), -10)
    wq = DfpTensor(_channel_slice(rng.integers(-999, 1000, (k, 3, 3, c + 1)).astype(np.int16), c), -10)
    # No padding: the activation buffer is then used in place (padding copies it).
    y, info = conv.conv2d(xq, wq, padding=0, overflow=mode, return_info=True)
    ref = reference.conv2d_fwd(xq, wq, None, 1, 0, c_block=info.c_block, flush_taps=info.flush_taps,
                               saturate=mode == "fast")
    assert np.array_equal(y, ref.fp32)
    dy = DfpTensor(rng.integers(-999, 1000, y.shape).astype(np.int16), -10)
    dx, info = conv.conv2d_input((n, c, h, w), wq, dy, padding=0, overflow=mode, return_info=True)
    ref = reference.conv2d_bwd_data(dy, wq, (h, w), 1, 0, k_block=info.c_block, flush_taps=info.flush_taps,
                                    saturate=mode == "fast")
    assert np.array_equal(dx, ref.fp32)


def test_linear_on_a_channel_slice_of_a_wider_array():
    rng = np.random.default_rng(8)
    x = rng.integers(-999, 1000, (3, 6)).astype(np.int16)
    w = rng.integers(-999, 1000, (4, 6)).astype(np.int16)
    y = conv.linear(DfpTensor(x[:, :5], -10), DfpTensor(w[:, :5], -10))
    want = (x[:, :5].astype(np.int64) @ w[:, :5].T.astype(np.int64)) * 2.0 ** -20
    assert np.array_equal(y, want.astype(np.float32))


def test_quantize_pack_buffers_are_still_used_without_a_copy():
    from dfpgen.pack import nhwc_buffer, quantize_pack
    q = quantize_pack(_f32(2, 5, 4, 3))
    buf = nhwc_buffer(q)
    assert buf.shape == (2, 4, 3, 6) and np.shares_memory(buf, q.mantissa) and not buf[..., 5].any()
    reused = np.full((2, 4, 3, 6), 7, np.int16)  # a dirty reused buffer: the pad channel is rewritten
    q2 = quantize_pack(_f32(2, 5, 4, 3), out=reused)
    assert np.shares_memory(nhwc_buffer(q2), reused) and not reused[..., 5].any()


@pytest.mark.parametrize("seed", [1.5, "a", None])
def test_a_non_integer_seed_is_rejected(seed):
    from dfpgen.dfp import DfpFormat
    from dfpgen.pack import quantize_pack
    sr = DfpFormat(15, "stochastic")
    x = _f32(1, 3, 4, 4)
    for call in (lambda: quantize(x, sr, seed=seed), lambda: quantize_pack(x, sr, seed=seed),
                 lambda: conv.conv2d(x, _f32(2, 3, 1, 1), fmt=sr, seed=seed)):
        with pytest.raises(DfpError, match="seed must be an integer"):
            call()
    assert np.array_equal(quantize(x, sr, seed=np.int64(5)).mantissa, quantize(x, sr, seed=5).mantissa)


def test_dfp_tensor_rejects_a_format_that_is_not_a_dfp_format():
    with pytest.raises(DfpError, match="fmt"):
        DfpTensor(np.ones(2, np.int16), 0, "dfp16")


def test_conv_spec_takes_numpy_integer_sizes():
    # Sizes taken from numpy shapes / arrays (np.int64) used to fail with "must be a positive
    # int, got 2", which reads as nonsense.
    sp = ConvSpec(*np.array([2, 3, 9, 8, 4, 3, 3]), stride=np.int64(2))
    assert sp == ConvSpec(2, 3, 9, 8, 4, 3, 3, 2) and type(sp.N) is int and hash(sp) == hash(ConvSpec(2, 3, 9, 8, 4, 3, 3, 2))
    for bad in (2.0, True, "2", 0):
        with pytest.raises(DfpError, match="ConvSpec.N must be a positive int"):
            ConvSpec(bad, 3, 9, 8, 4, 3, 3)


def test_parallel_for_from_many_python_threads_with_growing_thread_counts(monkeypatch):
    # A larger thread count replaced the shared pool with shutdown(); a Python thread that had
    # just fetched the old pool then failed with "cannot schedule new futures after shutdown".
    from dfpgen import threads as dthreads
    monkeypatch.setattr(dthreads, "_pool", None)  # start small, so the pool has to grow here
    monkeypatch.setattr(dthreads, "_pool_size", 0)
    errors = []

    def work(i):
        try:
            for j in range(150):
                out = np.zeros(64)

                def fn(b, e):
                    out[b:e] += 1
                dthreads.parallel_for(64, fn, 2 + (i * 7 + j) % 30)
                assert (out == 1).all()
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(repr(exc))
    ts = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert errors == []


def test_target_by_tier_name_and_config_by_dict():
    # target="avx2" and config={...} used to fail with AttributeError deep in the kernel cache.
    from dfpgen.target import host_target
    from dfpgen.tuning import TuningConfig
    x, w = _f32(1, 3, 5, 6), _f32(2, 3, 3, 3)
    y, info = conv.conv2d(x, w, padding=1, target="generic", return_info=True)
    assert info.tier == "generic" and np.array_equal(y, conv.conv2d(x, w, padding=1, target=host_target("generic")))
    dy = _f32(*y.shape)
    _, info = conv.conv2d_weight(x, w.shape, dy, padding=1, target="generic", return_info=True)
    assert info.tier == "generic"
    cfg = {"k_vecs": 1, "pixels": 3, "c_block": 4, "flush": 0, "unroll": "none", "threads": 0}
    _, info = conv.conv2d_input(x.shape, w, dy, padding=1, config=cfg, return_info=True)
    assert info.config["pixels"] == 3
    assert np.array_equal(conv.conv2d(x, w, config=cfg), conv.conv2d(x, w, config=TuningConfig(**cfg)))
    with pytest.raises(DfpError, match="unknown ISA tier"):
        conv.conv2d(x, w, target="avx1024")
    with pytest.raises(DfpError, match="target must be"):
        conv.conv2d(x, w, target=5)
    with pytest.raises(DfpError, match="config must be"):
        conv.linear(x[:, :, 0, 0], w[:, :, 0, 0], config="kb2")


def test_a_bias_beyond_float32_is_named_as_such():
    x, w = _f32(1, 3, 5, 5), _f32(2, 3, 3, 3)
    with pytest.raises(DfpError, match=r"bias exceeds the float32 range \(first at index 1\)"):
        conv.conv2d(x, w, np.array([0.0, 1e39]))
    with pytest.raises(DfpError, match=r"bias contains NaN or Inf \(first at index 0\)"):
        conv.conv2d(x, w, np.array([np.nan, 1.0]))
    b = np.array([0.5, -2.0])
    y0, yb = conv.conv2d(x, w), conv.conv2d(x, w, b)
    assert np.allclose(yb - y0, b[None, :, None, None], atol=1e-5)
