"""DFP16 numerics: exponent rule, rounding, clamps, edge cases (dfpgen/dfp.py)."""
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import dfpgen
from dfpgen import DfpError
from dfpgen.dfp import (DFP16, DfpFormat, DfpTensor, _quantize_with_exponent, dequantize,
                        exponent_for, fmix32, quantize, random_bits24, seed_mix)

SR = DfpFormat(rounding="stochastic")


def test_format_validation():
    assert DFP16.bits == 15 and DFP16.rounding == "nearest" and DFP16.max_mantissa == 32767
    assert DfpFormat(bits=8).max_mantissa == 255
    for bad in (1, 16, 0, 15.0, True):
        with pytest.raises(DfpError, match="bits"):
            DfpFormat(bits=bad)
    with pytest.raises(DfpError, match="rounding"):
        DfpFormat(rounding="up")


def test_tensor_validation():
    with pytest.raises(DfpError, match="int16"):
        DfpTensor(np.zeros(3, np.int32), 0)
    with pytest.raises(DfpError, match="exponent"):
        DfpTensor(np.zeros(3, np.int16), 128)


@settings(max_examples=60, deadline=None)
@given(scale_exp=st.integers(-100, 100), seed=st.integers(0, 2**31), n=st.integers(1, 200))
def test_max_lands_in_top_binade(scale_exp, seed, n):
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal(n) * 2.0 ** scale_exp).astype(np.float32)
    if not np.any(x):
        return
    q = quantize(x)
    m = q.max_abs_mantissa
    # Rounding can lift the max to 2**15, which clamps to 32767.
    assert 2 ** 14 <= m <= 2 ** 15 - 1
    unclamped = float(np.max(np.abs(x))) * 2.0 ** -q.exponent
    assert 2 ** 14 <= unclamped < 2 ** 15
    # Round-to-nearest error is at most half a step (clamped max: at most one step).
    err = np.abs(dequantize(q).astype(np.float64) - x.astype(np.float64))
    step = 2.0 ** q.exponent
    clamped = np.abs(x.astype(np.float64)) * 2.0 ** -q.exponent > 32767
    assert np.all(err[~clamped] <= step / 2)
    assert np.all(err[clamped] <= step)


def test_exponent_rule_values():
    assert exponent_for(1.0) == 1 - 15  # 1.0 = 0.5 * 2**1 -> 1.0 * 2**14 = 16384
    assert exponent_for(0.75) == 0 - 15
    assert exponent_for(32767.0) == 0  # mantissa = the value itself
    assert exponent_for(32768.0) == 1
    assert exponent_for(0.0) == 0
    assert exponent_for(1.0, DfpFormat(bits=8)) == 1 - 8
    q = quantize(np.array([1.0, -0.5, 0.25], np.float32))
    assert q.exponent == -14
    assert np.array_equal(q.mantissa, [16384, -8192, 4096])


def test_round_half_even_exact():
    # Max 20000.5 -> e=15, E=0: scaled values are the values themselves.
    x = np.array([20000.5, 0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 3.49, 3.51, 20001.5], np.float32)
    q = quantize(x)
    assert q.exponent == 0
    assert np.array_equal(q.mantissa, [20000, 0, 2, 2, 0, -2, -2, 3, 4, 20002])
    # Same ties after a power-of-two scale: E = -3.
    q = quantize(x / 8)
    assert q.exponent == -3
    assert np.array_equal(q.mantissa, [20000, 0, 2, 2, 0, -2, -2, 3, 4, 20002])


def test_never_minus_32768():
    x = np.array([32767.6, -32767.6, 1.0, -32767.9], np.float32)
    q = quantize(x)
    assert q.exponent == 0
    assert np.array_equal(q.mantissa, [32767, -32767, 1, -32767])
    # min exactly -max: the max rounds up to 2**15 and both ends clamp symmetrically.
    y = np.array([-(2.0 ** 15 - 0.25), 2.0 ** 15 - 0.25, 0], np.float64)
    q = quantize(y)
    assert q.mantissa.min() == -32767 and q.mantissa.max() == 32767
    qs = quantize(y, SR, seed=5)
    assert qs.mantissa.min() >= -32767


def test_all_zero_and_empty():
    q = quantize(np.zeros((2, 3), np.float32))
    assert q.exponent == 0 and q.mantissa.shape == (2, 3) and not q.mantissa.any()
    assert np.array_equal(dequantize(q), np.zeros((2, 3), np.float32))
    q = quantize(np.zeros((0, 4), np.float32))
    assert q.exponent == 0 and q.mantissa.shape == (0, 4) and q.mantissa.dtype == np.int16
    assert q.max_abs_mantissa == 0
    assert dequantize(q).shape == (0, 4)


def test_subnormal_float32_clamps_exponent():
    tiny = np.float32(2.0 ** -140)  # subnormal; would need E = -139 - 15 < -128
    x = np.array([tiny, -tiny, 0], np.float32)
    with pytest.warns(dfpgen.UnderflowWarning, match="clamped at -128"):
        q = quantize(x)
    assert q.exponent == -128
    # 2**-140 * 2**128 = 2**-12: rounds to zero, documented.
    assert not q.mantissa.any()
    # A value just representable at E=-128 keeps its multiple of 2**-128.
    x = np.array([np.float32(2.0 ** -120), np.float32(3 * 2.0 ** -128)], np.float32)
    with pytest.warns(dfpgen.UnderflowWarning):
        q = quantize(x)
    assert q.exponent == -128
    assert np.array_equal(q.mantissa, [256, 3])
    assert np.array_equal(dequantize(q), x)


def test_huge_float64_raises_and_large_ok():
    with pytest.raises(DfpError, match=r"big.*exponent 650 > 127"):
        quantize(np.array([1.0, 1e200]), name="big")
    q = quantize(np.array([2.0 ** 141, 1.0]))
    assert q.exponent == 127 and q.mantissa[0] == 16384
    with pytest.raises(DfpError, match="float64"):
        dequantize(q)
    assert dequantize(q, np.float64)[0] == 2.0 ** 141
    fmax = np.finfo(np.float32).max
    q = quantize(np.array([fmax, -fmax], np.float32))
    assert q.exponent == 128 - 15 and np.array_equal(q.mantissa, [32767, -32767])


def test_dtypes_float16_float64_int():
    rng = np.random.default_rng(1)
    x32 = rng.standard_normal((5, 7)).astype(np.float32)
    x16 = x32.astype(np.float16)
    q16, q = quantize(x16), quantize(x16.astype(np.float32))
    assert q16.exponent == q.exponent and np.array_equal(q16.mantissa, q.mantissa)
    x64 = rng.standard_normal(50) * 1e-3
    q64 = quantize(x64)
    ref = np.clip(np.rint(x64 * 2.0 ** -q64.exponent), -32767, 32767)
    assert np.array_equal(q64.mantissa, ref)
    qi = quantize(np.arange(-6, 7, dtype=np.int32))
    assert qi.exponent == -12 and np.array_equal(qi.mantissa, np.arange(-6, 7) * 4096)
    qi = quantize([[1, 2], [3, 4]])  # nested list
    assert qi.shape == (2, 2) and qi.exponent == -12
    qb = quantize(x32.astype(">f4"))  # big-endian storage, same values
    assert qb.exponent == quantize(x32).exponent and np.array_equal(qb.mantissa, quantize(x32).mantissa)
    with pytest.raises(DfpError, match="dtype"):
        quantize(np.array(["a"]))


@pytest.mark.parametrize("fmt", [DFP16, SR])
def test_non_contiguous_equals_contiguous(fmt):
    rng = np.random.default_rng(2)
    base = rng.standard_normal((6, 8, 5)).astype(np.float32)
    for view in (base.transpose(2, 0, 1), base[::2, 1::3], base[:, ::-1]):
        assert not view.flags.c_contiguous
        a, b = quantize(view, fmt, seed=9), quantize(np.ascontiguousarray(view), fmt, seed=9)
        assert a.exponent == b.exponent
        assert np.array_equal(a.mantissa, b.mantissa)
        assert a.mantissa.shape == view.shape


def test_nan_inf_message():
    x = np.zeros((3, 4), np.float32)
    x[1, 2] = np.nan
    x[2, 0] = np.inf
    x[2, 3] = np.nan
    with pytest.raises(DfpError) as ei:
        quantize(x, name="layer3.grad")
    msg = str(ei.value)
    assert "layer3.grad" in msg and "2 NaN" in msg and "1 Inf" in msg and "(1, 2)" in msg
    y = np.ones(5, np.float64)
    y[3] = -np.inf
    with pytest.raises(DfpError, match=r"x0: .*1 Inf.*\(3,\)") as ei:
        quantize(y, name="x0")
    assert "NaN" not in str(ei.value)
    assert issubclass(DfpError, ValueError)


@pytest.mark.parametrize("bits", [2, 4, 8, 12, 14])
def test_fewer_bits_headroom(bits):
    fmt = DfpFormat(bits=bits)
    rng = np.random.default_rng(bits)
    x = rng.standard_normal(300).astype(np.float32) * 7
    q = quantize(x, fmt)
    assert 2 ** (bits - 1) <= q.max_abs_mantissa <= 2 ** bits - 1
    assert np.abs(q.mantissa.astype(np.int32)).max() <= fmt.max_mantissa
    ref = np.clip(np.rint(x.astype(np.float64) * 2.0 ** -q.exponent), -(2 ** bits - 1), 2 ** bits - 1)
    assert np.array_equal(q.mantissa, ref)


def test_forced_exponent_clamps():
    x = np.array([1.0, 100.0, -1000.0, 0.3], np.float32)
    q = quantize(x, exponent=-5)
    assert q.exponent == -5
    assert np.array_equal(q.mantissa, [32, 3200, -32000, 10])
    q = quantize(x, exponent=-10)
    assert np.array_equal(q.mantissa, [1024, 32767, -32767, 307])
    q = quantize(np.array([3e38], np.float32), exponent=-128)  # scaled value overflows float32
    assert q.mantissa[0] == 32767
    with pytest.raises(DfpError, match="forced exponent"):
        quantize(x, exponent=200)


def test_fmix32_known_values():
    # A plain-Python fmix32 on ints with explicit 32-bit wrapping.
    def ref(h):
        h ^= h >> 16
        h = (h * 0x85EBCA6B) & 0xFFFFFFFF
        h ^= h >> 13
        h = (h * 0xC2B2AE35) & 0xFFFFFFFF
        return h ^ (h >> 16)
    vals = np.array([0, 1, 2, 0xDEADBEEF, 0xFFFFFFFF], np.uint32)
    assert fmix32(vals).tolist() == [ref(int(v)) for v in vals]
    assert ref(1) == 0x514E28B7  # the published fmix32(1)
    # the kernels' seed hash: any int seed, taken modulo 2**32 (negative and huge ones too)
    for seed in (0, 1, 77, 0xDEADBEEF, 2 ** 32 + 5, -1, -(2 ** 40) + 3, 2 ** 70 + 9):
        assert seed_mix(seed) == ref(seed % 2 ** 32) == int(fmix32(np.array([seed & 0xFFFFFFFF], np.uint32))[0])
    idx = np.array([0, 5, 2 ** 32 + 5, 2 ** 40], np.uint64)
    seed = 77
    s = ref(seed)
    exp = [ref((ref((int(i) & 0xFFFFFFFF) ^ s) + (int(i) >> 32)) & 0xFFFFFFFF) >> 8 for i in idx]
    assert random_bits24(idx, seed).tolist() == exp
    assert max(exp) < 2 ** 24


def test_stochastic_unbiased():
    # Exponent forced to 0 so the scaled value v is x itself.
    v = 1000.3
    draws = np.array([quantize(np.array([v]), SR, seed=s, exponent=0).mantissa[0] for s in range(4000)],
                     np.float64)
    assert set(np.unique(draws)) == {1000.0, 1001.0}
    se = math.sqrt(0.3 * 0.7 / len(draws))
    assert abs(draws.mean() - v) < 4 * se
    # Negative values: floor -1001, fraction 0.7.
    x = np.full(4000, -1000.3, np.float64)
    m = quantize(x, SR, seed=1, exponent=0).mantissa.astype(np.float64)
    assert abs(m.mean() + 1000.3) < 4 * se
    # Integers never move.
    x = np.arange(-50, 50, dtype=np.float32)
    assert np.array_equal(quantize(x, SR, seed=3, exponent=0).mantissa, x.astype(np.int16))


def test_stochastic_chunked_equals_whole_and_seed_matters():
    rng = np.random.default_rng(4)
    x = rng.standard_normal((4, 5, 6)).astype(np.float32)
    whole = quantize(x, SR, seed=123)
    flat = x.ravel()
    parts = [_quantize_with_exponent(flat[b:e], whole.exponent, SR, 123, index_offset=b)
             for b, e in ((0, 7), (7, 64), (64, 119), (119, 120))]
    assert np.array_equal(np.concatenate(parts).reshape(x.shape), whole.mantissa)
    other = quantize(x, SR, seed=124)
    assert not np.array_equal(other.mantissa, whole.mantissa)
    assert np.abs(other.mantissa.astype(np.int32) - whole.mantissa).max() == 1
    again = quantize(x, SR, seed=123)
    assert np.array_equal(again.mantissa, whole.mantissa)
    near = quantize(x)
    assert np.abs(whole.mantissa.astype(np.int32) - near.mantissa).max() <= 1


def test_stochastic_matches_definition_float32():
    rng = np.random.default_rng(6)
    x = rng.standard_normal(1000).astype(np.float32)
    q = quantize(x, SR, seed=42)
    v = x * np.float32(2.0 ** -q.exponent)
    fl = np.floor(v)
    k = random_bits24(np.arange(1000, dtype=np.uint64), 42).astype(np.float32)
    up = k < (v - fl) * np.float32(2 ** 24)
    assert np.array_equal(q.mantissa, np.clip(fl + up, -32767, 32767).astype(np.int16))
