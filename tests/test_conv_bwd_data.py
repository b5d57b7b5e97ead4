"""Backward-data DFP16 convolution: bit-exact against dfpgen.reference, the stride
decomposition (one stride-1 sub-convolution per output phase, no wasted taps), overflow
modes and the float API against torch.nn.grad.conv2d_input in float64."""
import warnings

import numpy as np
import pytest
import torch

import dfpgen
from dfpgen import conv, reference
from dfpgen.dfp import quantize
from dfpgen.errors import DfpError
from dfpgen.plan_bwd_data import plan_bwd_data
from dfpgen.target import host_target
from dfpgen.tuning import default_config
from conv_cases import SHAPES, ids, operands


def _run(shape, mode, seed=1, adversarial=False, **kw):
    n, c, h, w, k, r, s, u, p, d = shape
    _, wq, dyq = operands(shape, seed=seed, adversarial=adversarial)
    dx, info = conv.conv2d_input((n, c, h, w), wq, dyq, u, p, d, overflow=mode, return_info=True, **kw)
    ref = reference.conv2d_bwd_data(dyq, wq, (h, w), u, p, d, k_block=info.c_block,
                                    flush_taps=info.flush_taps, saturate=mode == "fast")
    return dx, info, ref, wq, dyq


@pytest.mark.parametrize("mode", ["exact", "fast"])
@pytest.mark.parametrize("shape", SHAPES, ids=ids(SHAPES))
def test_backward_data_bit_exact(shape, mode):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", dfpgen.OverflowWarning)
        dx, info, ref, _, _ = _run(shape, mode)
    assert dx.dtype == np.float32 and dx.shape == ref.fp32.shape
    assert np.array_equal(dx, ref.fp32)
    assert info.pass_kind == "bwd_data" and info.saturated == ref.saturated
    if mode == "exact":
        assert not ref.overflowed and info.saturated == 0


@pytest.mark.parametrize("stride, taps", [((2, 2), [4, 2, 2, 1]), ((1, 2), [6, 3]), ((3, 3), [1] * 9)])
def test_stride_decomposes_into_phases_without_wasted_taps(stride, taps):
    spec = dfpgen.ConvSpec(1, 8, 9, 9, 8, 3, 3, stride=stride, padding=(1, 1), pass_kind="bwd_data")
    bp = plan_bwd_data(spec, default_config(spec, host_target()), host_target(), mode="exact")
    assert sorted((len(sub.taps) for sub, _ in bp.phases), reverse=True) == taps
    # every (output pixel, tap) pair that the full correlation visits is computed exactly once
    assert sum(sub.rows * sub.cols * len(sub.taps) for sub, _ in bp.phases) <= 9 * 9 * 9
    assert len({p.symbol for _, p in bp.phases}) == len(bp.phases)


def test_stride_larger_than_filter_leaves_untouched_rows_zero():
    shape = (1, 3, 7, 7, 4, 1, 1, 2, 0, 1)
    dx, info, ref, _, _ = _run(shape, "exact")
    assert np.array_equal(dx, ref.fp32)
    assert (dx[:, :, 1::2, :] == 0).all() and len(info.symbols) == 1


def test_exact_mode_adversarial_mantissas():
    shape = (1, 18, 6, 7, 20, 3, 3, 1, 1, 1)
    dx, info, ref, _, _ = _run(shape, "exact", adversarial=True)
    assert (info.c_block, info.flush_taps) == (2, 1)
    assert not ref.overflowed and np.array_equal(dx, ref.fp32)


def test_fast_mode_saturation_count_matches_reference_and_warns():
    shape = (1, 18, 6, 7, 20, 3, 3, 2, 1, 1)
    with pytest.warns(dfpgen.OverflowWarning):
        dx, info, ref, _, _ = _run(shape, "fast", adversarial=True)
    assert info.saturated > 0 and info.saturated == ref.saturated
    assert np.array_equal(dx, ref.fp32)


@pytest.mark.parametrize("shape", [SHAPES[1], SHAPES[3], SHAPES[7]], ids=ids([SHAPES[1], SHAPES[3], SHAPES[7]]))
def test_float_api_against_torch_conv2d_input(shape):
    n, c, h, w, k, r, s, u, p, d = shape
    rng = np.random.default_rng(11)
    wt = rng.standard_normal((k, c, r, s)).astype(np.float32)
    out = torch.nn.functional.conv2d(torch.zeros(n, c, h, w), torch.from_numpy(wt), stride=u, padding=p, dilation=d)
    dy = rng.standard_normal(tuple(out.shape)).astype(np.float32)
    dx, info = conv.conv2d_input((n, c, h, w), wt, dy, u, p, d, overflow="exact", return_info=True)
    wd, dyd = quantize(wt).dequantize(np.float64), quantize(dy).dequantize(np.float64)
    want = torch.nn.grad.conv2d_input((n, c, h, w), torch.from_numpy(wd), torch.from_numpy(dyd), u, p, d).numpy()
    absum = torch.nn.grad.conv2d_input((n, c, h, w), torch.from_numpy(np.abs(wd)), torch.from_numpy(np.abs(dyd)),
                                       u, p, d).numpy()
    partials = -(-k // info.c_block) * -(-(r * s) // info.flush_taps)
    tol = 2 * (partials + 1) * 2.0 ** -24 * absum  # one rounding per partial and per FP32 add
    assert (np.abs(dx - want) <= tol).all()


def test_grad_output_shape_mismatch_is_named():
    w = np.ones((4, 3, 3, 3), np.float32)
    with pytest.raises(dfpgen.DfpError, match="grad_output shape"):
        conv.conv2d_input((1, 3, 8, 8), w, np.ones((1, 4, 5, 5), np.float32), padding=1)
    with pytest.raises(dfpgen.DfpError, match="C=2"):
        conv.conv2d_input((1, 2, 8, 8), w, np.ones((1, 4, 8, 8), np.float32), padding=1)


def test_a_pass_where_no_output_meets_a_tap_reports_nothing_saturated():
    # 1x1 filter, stride 2, padding 1 on a 1x1 input: dX's only pixel meets no dY pixel
    w = np.ones((4, 4, 1, 1), np.float32)
    dy = np.ones((1, 4, 2, 2), np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an OverflowWarning here would be a false alarm
        dx, info = conv.conv2d_input((1, 4, 1, 1), w, dy, stride=2, padding=1, overflow="exact",
                                     return_info=True)
    assert np.array_equal(dx, np.zeros((1, 4, 1, 1), np.float32))
    assert (info.saturated, info.possibly_saturated, info.overflow) == (0, 0, "exact")


@pytest.mark.parametrize("shape", [(2, 12, 7, 6, 10, 3, 3, 1, 1, 1), (2, 8, 9, 8, 6, 3, 3, 2, 1, 1),
                                   (1, 6, 9, 9, 8, 3, 3, 1, 2, 2), (2, 8, 5, 5, 6, 1, 1, 1, 0, 1)])
def test_dy_quantized_into_the_padded_buffer_gives_the_same_bits(shape, monkeypatch):
    # the runtime quantizes dY straight into the zero-padded buffer backward-data reads
    # (plan_bwd_data.dy_padding, the plan's own padding) and passes it as grad_output_buffer
    from dfpgen import pack, plan_bwd_data
    from dfpgen.pass_kernels import get_kernel
    from dfpgen.spec import ConvSpec
    n, c, h, w, k, r, s, u, p, d = shape
    _, wq, _ = operands(shape, seed=2)
    spec = ConvSpec(n, c, h, w, k, r, s, u, p, d, pass_kind="bwd_data")
    pad = plan_bwd_data.dy_padding(spec)
    assert pad == get_kernel(spec, overflow="exact").pad
    dy = np.random.default_rng(7).standard_normal(spec.output_shape).astype(np.float32)
    dy = np.ascontiguousarray(dy.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2)  # NHWC, as torch's
    qdy, buf = pack.quantize_padded(dy, pad, seed=3)
    ref = conv.conv2d_input((n, c, h, w), wq, pack.quantize_pack(dy, seed=3), u, p, d)
    from dfpgen import fwd_family

    def no_copy(*args):
        raise AssertionError("padded dY copied again")
    monkeypatch.setattr(fwd_family, "padded_nhwc", no_copy)
    got = conv.conv2d_input((n, c, h, w), wq, qdy, u, p, d, grad_output_buffer=(buf, pad))
    assert np.array_equal(got, ref)
    # with the range the quantize pass kept, no scan of dY either: the same schedule and bits
    qdy2, buf2, bound = pack.quantize_padded(dy, pad, seed=3, channel_range=True)

    def no_scan(*args):
        raise AssertionError("dY scanned for its channel range")
    monkeypatch.setattr(conv, "channel_range_of", no_scan)
    got2, info = conv.conv2d_input((n, c, h, w), wq, qdy2, u, p, d, grad_output_buffer=(buf2, pad),
                                   grad_output_bound=bound, return_info=True)
    assert np.array_equal(got2, ref)


def test_grad_output_bound_is_checked():
    _, wq, _ = operands((1, 4, 5, 5, 3, 3, 3, 1, 1, 1), seed=3)
    dyq = quantize(np.random.default_rng(1).standard_normal((1, 3, 5, 5)).astype(np.float32))
    hi = dyq.mantissa.max(axis=(0, 2, 3)).astype(np.int64)
    lo = dyq.mantissa.min(axis=(0, 2, 3)).astype(np.int64)
    good = conv.conv2d_input((1, 4, 5, 5), wq, dyq, 1, 1, grad_output_bound=(hi, lo))
    assert np.array_equal(good, conv.conv2d_input((1, 4, 5, 5), wq, dyq, 1, 1))
    for bad, msg in [((hi[:2], lo[:2]), r"shape \(3,\)"), ((lo - 1, hi + 1), "no mantissa range"),
                     (5, "must be a pair"), ((hi + 40000, lo), "no mantissa range"),
                     # uint64 values that a cast to int64 would wrap into a tight, wrong bound
                     ((np.full(3, 2**64 - 1, np.uint64), np.full(3, 2**64 - 2, np.uint64)), "no mantissa range"),
                     ((hi, np.full(3, 2**64 - 5, np.uint64)), "no mantissa range")]:
        with pytest.raises(DfpError, match=f"grad_output_bound.*{msg}|{msg}"):
            conv.conv2d_input((1, 4, 5, 5), wq, dyq, 1, 1, grad_output_bound=bad)
    with pytest.raises(DfpError, match="grad_output_bound must be a pair"):  # an empty batch checks it too
        conv.conv2d_input((0, 4, 5, 5), wq, quantize(np.zeros((0, 3, 5, 5), np.float32)), 1, 1,
                          grad_output_bound="garbage")
    with pytest.raises(DfpError, match="grad_output_bound describes the mantissas of a DfpTensor"):
        conv.conv2d_input((1, 4, 5, 5), wq, dyq.dequantize(), 1, 1, grad_output_bound=(hi, lo))
