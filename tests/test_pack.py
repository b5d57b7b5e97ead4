"""Quantize-and-pack kernels (dfpgen/pack.py, templates/quantize_pack.ll.j2): bit-exact with
dfp.quantize for both layouts and rounding modes, any thread count, in the padded NHWC layout."""
import numpy as np
import pytest

from dfpgen import DfpError, pack
from dfpgen.dfp import DFP16, DfpFormat, quantize
from dfpgen.pack import max_abs, nhwc_buffer, quantize_pack, render_kernel
from dfpgen.target import host_target

SR = DfpFormat(rounding="stochastic")
# Tails everywhere: odd C, C below/above the 32-channel register transpose of the NCHW kernel,
# H*W below/above/not a multiple of its 16-pixel block, and the 16-channel NHWC vectors.
SHAPES = [(2, 3, 5, 7), (1, 16, 4, 17), (2, 33, 3, 3), (3, 1, 2, 2), (1, 4, 1, 40), (1, 17, 2, 16),
          (2, 35, 4, 5), (1, 64, 4, 4), (2, 97, 3, 7)]


def _nhwc(x):
    """The same logical NCHW tensor with NHWC (channels_last) memory."""
    return np.ascontiguousarray(x.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2)


def _check(x, fmt, seed=0, **kw):
    q = quantize_pack(x, fmt, seed=seed, **kw)
    r = quantize(x, fmt, seed=seed)
    assert q.exponent == r.exponent
    assert q.mantissa.dtype == np.int16 and q.mantissa.shape == x.shape
    assert np.array_equal(q.mantissa, r.mantissa)
    return q


@pytest.mark.parametrize("fmt", [DFP16, SR], ids=["nearest", "stochastic"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_bit_exact_both_layouts(shape, fmt):
    rng = np.random.default_rng(sum(shape))
    x = (rng.standard_normal(shape) * 3).astype(np.float32)
    for view in (x, _nhwc(x)):
        q = _check(view, fmt, seed=11)
        buf = nhwc_buffer(q)
        N, C, H, W = shape
        assert buf.shape == (N, H, W, C + C % 2) and buf.flags.c_contiguous
        assert buf.ctypes.data == q.mantissa.ctypes.data and buf.ctypes.data % 64 == 0  # no copy
        assert np.array_equal(buf[..., :C], q.mantissa.transpose(0, 2, 3, 1))
        assert not buf[..., C:].any()  # pad channel is zero


@pytest.mark.parametrize("fmt", [DFP16, SR], ids=["nearest", "stochastic"])
def test_threads_bit_identical(fmt):
    rng = np.random.default_rng(3)
    x = rng.standard_normal((4, 5, 9, 11)).astype(np.float32)
    for view in (x, _nhwc(x)):
        one = quantize_pack(view, fmt, seed=2, threads=1)
        two = quantize_pack(view, fmt, seed=2, threads=2)
        assert np.array_equal(nhwc_buffer(one), nhwc_buffer(two))
        assert np.array_equal(one.mantissa, quantize(x, fmt, seed=2).mantissa)


def test_seed_changes_stochastic_bits():
    x = np.random.default_rng(4).standard_normal((1, 6, 8, 8)).astype(np.float32)
    a, b = quantize_pack(x, SR, seed=1), quantize_pack(x, SR, seed=2)
    assert not np.array_equal(a.mantissa, b.mantissa)


def test_zero_and_extreme_exponents():
    z = quantize_pack(np.zeros((2, 3, 4, 4), np.float32))
    assert z.exponent == 0 and not nhwc_buffer(z).any()
    # Tiny values: E clamps to -128, where the kernel scales by 2**64 twice.
    rng = np.random.default_rng(5)
    tiny = (rng.standard_normal((1, 5, 3, 3)) * 2.0 ** -125).astype(np.float32)
    for fmt in (DFP16, SR):
        q = _check(tiny, fmt, seed=3)
        assert q.exponent == -128 and q.mantissa.any()
    huge = np.full((1, 2, 2, 2), np.finfo(np.float32).max, np.float32)
    huge[0, 1] *= -1
    q = _check(_nhwc(huge), DFP16)
    assert q.exponent == 113 and set(np.unique(q.mantissa)) == {-32767, 32767}


@pytest.mark.parametrize("bits", [4, 8, 14])
def test_fewer_bits(bits):
    x = np.random.default_rng(bits).standard_normal((2, 3, 4, 5)).astype(np.float32)
    q = _check(x, DfpFormat(bits=bits, rounding="stochastic"), seed=8)
    assert 2 ** (bits - 1) <= q.max_abs_mantissa <= 2 ** bits - 1


def test_nan_inf_error_names_logical_index():
    x = np.zeros((2, 3, 4, 5), np.float32)
    x[1, 2, 0, 3] = np.nan
    x[1, 0, 3, 4] = np.inf  # first in NCHW C order: (1, 0, 3, 4)
    for view in (x, _nhwc(x)):
        with pytest.raises(DfpError) as ei:
            quantize_pack(view, name="block2.conv1.input")
        msg = str(ei.value)
        assert "block2.conv1.input" in msg and "1 NaN" in msg and "1 Inf" in msg
        assert "(1, 0, 3, 4)" in msg


def test_max_abs_kernel():
    rng = np.random.default_rng(6)
    for n in (1, 15, 16, 17, 1000, 4099):
        x = rng.standard_normal(n).astype(np.float32)
        x[rng.integers(n)] = -7.5
        assert max_abs(x) == float(np.abs(x).max()) == 7.5
        assert max_abs(x, threads=2) == 7.5
    assert max_abs(np.array([-0.0, 0.0], np.float32)) == 0.0
    assert max_abs(np.zeros(0, np.float32)) == 0.0
    with pytest.raises(DfpError, match="NaN"):
        max_abs(np.array([1, np.nan, 2], np.float32), name="v")


def test_linear_2d_and_fallbacks():
    rng = np.random.default_rng(7)
    x = rng.standard_normal((6, 9)).astype(np.float32)
    q = _check(x, SR, seed=4)
    buf = nhwc_buffer(q)
    assert buf.shape == (6, 10) and np.shares_memory(buf, q.mantissa) and not buf[:, 9].any()
    # float64 input and other strides take dfp.quantize + a packed copy: same bits.
    x4 = rng.standard_normal((2, 3, 6, 4))
    _check(x4, SR, seed=1)
    strided = x4.astype(np.float32)[:, :, ::2, :]
    q = _check(strided, DFP16)
    assert np.array_equal(nhwc_buffer(q)[..., :3], q.mantissa.transpose(0, 2, 3, 1))
    assert _check(np.zeros((0, 3, 2, 2), np.float32), DFP16).mantissa.shape == (0, 3, 2, 2)
    with pytest.raises(DfpError, match="expects"):
        quantize_pack(np.zeros((2, 3, 4), np.float32))


def test_nhwc_buffer_of_plain_quantize():
    x = np.random.default_rng(8).standard_normal((2, 5, 3, 3)).astype(np.float32)
    q = quantize(x)
    buf = nhwc_buffer(q)
    assert buf.shape == (2, 3, 3, 6) and not np.shares_memory(buf, q.mantissa)
    assert np.array_equal(buf, nhwc_buffer(quantize_pack(x)))


@pytest.mark.parametrize("tier", ["avx2", "generic"])
def test_lower_tiers_same_bits(tier):
    target = host_target().with_tier(tier)
    if not target.executable:
        # a host without the tier still compiles its kernels (for a CPU that has it) and
        # checks that they use the tier's registers; only the bit comparison needs to run them
        from dfpgen.jit import emit_assembly
        from dfpgen.pack import kernel_plan
        for kind in ("maxabs", "pack_nhwc", "pack_nchw"):
            asm = emit_assembly(render_kernel(kind, SR, target), cpu=target.compile_cpu,
                                features=target.compile_features)
            assert kernel_plan(kind, SR, target).symbol + ":" in asm
            assert "zmm" not in asm
        return
    x = np.random.default_rng(9).standard_normal((2, 19, 3, 9)).astype(np.float32)
    for view in (x, _nhwc(x)):
        for fmt in (DFP16, SR):
            q = quantize_pack(view, fmt, seed=6, target=target)
            assert np.array_equal(q.mantissa, quantize(x, fmt, seed=6).mantissa)


def test_template_opens_with_pseudocode():
    for kind in ("maxabs", "pack_nhwc", "pack_nchw"):
        ir = render_kernel(kind, SR)
        assert ir.startswith("; dfpgen quantize-and-pack kernel") and "What it computes" in ir
        assert "define " in ir


@pytest.mark.parametrize("fmt", [DFP16, SR], ids=["nearest", "stochastic"])
@pytest.mark.parametrize("tile_blocks", [1, 2])
def test_nchw_tiles_within_an_image(monkeypatch, fmt, tile_blocks):
    """Several work items per image (tile of 1 or 2 pixel blocks; 45 pixels = 3 blocks of 16
    of which the last is partial), with 2 threads."""
    import dfpgen.pack as pack
    lanes = host_target().vector_bits // 32
    monkeypatch.setattr(pack, "NCHW_TILE_BYTES", tile_blocks * lanes * 36 * 2)
    x = np.random.default_rng(10).standard_normal((2, 35, 5, 9)).astype(np.float32)
    _check(x, fmt, seed=12, threads=2)


def test_out_buffer_reused():
    x = np.random.default_rng(11).standard_normal((2, 5, 3, 4)).astype(np.float32)
    out = np.full((2, 3, 4, 6), 7, np.int16)  # garbage in the pad channel must be overwritten
    for view in (x, _nhwc(x), x.astype(np.float64)):
        q = quantize_pack(view, out=out)
        buf = nhwc_buffer(q)
        assert buf.ctypes.data == out.ctypes.data and buf.strides == out.strides and not out[..., 5].any()
        assert np.array_equal(q.mantissa, quantize(x).mantissa)
        out[...] = 7
    x2 = x.reshape(2, -1)[:, :9]  # (N, C) Linear input, odd C
    out2 = np.full((2, 10), 7, np.int16)
    q2 = quantize_pack(x2, out=out2)
    assert nhwc_buffer(q2).ctypes.data == out2.ctypes.data and not out2[:, 9].any()
    assert np.array_equal(q2.mantissa, quantize(x2).mantissa)
    with pytest.raises(DfpError, match="out must be"):
        quantize_pack(x, out=np.zeros((2, 3, 4, 5), np.int16))
    with pytest.raises(DfpError, match="out must be"):
        quantize_pack(x, out=np.zeros((2, 3, 4, 6), np.int32))
    with pytest.raises(DfpError, match="out must be"):  # a strided (N, Cp) view would need a copy
        quantize_pack(x2, out=np.zeros((2, 20), np.int16)[:, ::2])


def test_stochastic_indices_beyond_2_to_32():
    """The kernels' 32-bit lane indices carry into the high half exactly as dfp's uint64
    definition says. Pointers are shifted so that image n (or pixel m) of a huge virtual
    tensor lands on a small real array; only that window is read and written."""
    import dfpgen.pack as pack
    from dfpgen.dfp import _quantize_with_exponent, fmix32
    target = host_target()
    E, seed = -14, 99
    mix = int(fmix32(np.array([seed], np.uint32))[0])
    s1, s2 = 2.0 ** 14, 1.0
    rng = np.random.default_rng(12)
    # NCHW: C=1, HW=25, image n = 171798691 covers indices 2**32-21 .. 2**32+3; the second pixel
    # block (16..24) crosses 2**32 inside one vector.
    n, C, HW = 171798691, 1, 25
    x = rng.standard_normal(C * HW).astype(np.float32)
    out = np.zeros((HW, 2), np.int16)
    fn = pack._kernel("pack_nchw", SR, target)
    lanes = target.vector_bits // 32
    ntiles = 1
    fn(x.ctypes.data - n * C * HW * 4, out.ctypes.data - n * HW * 2 * 2, n * ntiles, (n + 1) * ntiles,
       C, HW, s1, s2, mix, -(-HW // lanes), 0)
    want = _quantize_with_exponent(x, E, SR, seed, index_offset=n * C * HW)
    assert n * C * HW < 2 ** 32 < (n + 1) * C * HW
    assert np.array_equal(out[:, 0], want) and not out[:, 1].any()
    # The data is sensitive to the high half: dropping the carry (indices mod 2**32) differs.
    cut = 2 ** 32 - n * C * HW
    nocarry = np.concatenate([want[:cut], _quantize_with_exponent(x[cut:], E, SR, seed, index_offset=0)])
    assert not np.array_equal(nocarry, want)
    # NHWC: HW=1, C=13, pixel m = 330382099 has indices 2**32-9 .. 2**32+3 across its channels.
    m, C = 330382099, 13
    x = rng.standard_normal(C).astype(np.float32)
    out = np.zeros(14, np.int16)
    fn = pack._kernel("pack_nhwc", SR, target)
    fn(x.ctypes.data - m * C * 4, out.ctypes.data - m * 14 * 2, m, m + 1, C, 1, s1, s2, mix, 1, 0, 1, 0, None)
    assert m * C < 2 ** 32 < (m + 1) * C
    want = _quantize_with_exponent(x, E, SR, seed, index_offset=m * C)
    assert np.array_equal(out[:C], want) and out[C] == 0
    cut = 2 ** 32 - m * C
    nocarry = np.concatenate([want[:cut], _quantize_with_exponent(x[cut:], E, SR, seed, index_offset=0)])
    assert not np.array_equal(nocarry, want)


@pytest.mark.parametrize("fmt", [DFP16, SR], ids=["nearest", "stochastic"])
def test_nchw_block_grid_shifted_for_alignment(fmt):
    """Inputs at every 4-byte offset from a 64-byte line: the NCHW kernel shifts its pixel
    blocks by that many pixels (H*W*4 is a multiple of 64 here), with partial blocks at both
    ends of each image."""
    import dfpgen.pack as pack
    lanes = host_target().vector_bits // 32
    shape = (2, 35, 4, 2 * lanes)
    size = int(np.prod(shape))
    raw = pack.empty_aligned((size + lanes,), np.float32)
    raw[:] = np.random.default_rng(13).standard_normal(raw.size).astype(np.float32)
    for off in range(lanes):
        x = raw[off:off + size].reshape(shape)
        assert pack._nchw_pad(x, lanes) == off
        _check(x, fmt, seed=off, threads=2)


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("layout", ["nhwc", "nchw"])
@pytest.mark.parametrize("fmt", [DFP16, SR], ids=["nearest", "stochastic"])
def test_quantize_padded_equals_padding_the_packed_buffer_afterwards(fmt, layout, threads):
    # quantize_padded writes each pixel's row into the zero-padded image a stride-1 conv
    # reads (NHWC input: in the quantize pass itself): the same bits, rounding indices and
    # exponent as quantize_pack, then padded
    from dfpgen.fwd_family import padded_nhwc
    rng = np.random.default_rng(5)
    x = rng.standard_normal((3, 13, 5, 7)).astype(np.float32)
    if layout == "nhwc":
        x = np.ascontiguousarray(x.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2)
    for pad in [(1, 1, 1, 1), (0, 2, 3, 0), (0, 0, 0, 0)]:
        q, buf = pack.quantize_padded(x, pad, fmt, seed=11, threads=threads)
        ref = pack.quantize_pack(x, fmt, seed=11, threads=threads)
        assert q.exponent == ref.exponent and np.array_equal(q.mantissa, ref.mantissa)
        assert np.array_equal(buf, padded_nhwc(ref.mantissa, pad, 14))
    with pytest.raises(DfpError, match="pad must be"):
        pack.quantize_padded(x, (1, 1), fmt)


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("layout", ["nhwc", "nchw"])
@pytest.mark.parametrize("fmt", [DFP16, SR], ids=["nearest", "stochastic"])
def test_quantize_padded_keeps_the_mantissas_channel_range(fmt, layout, threads):
    # channel_range=True: the per-channel max and min of the mantissas written, kept by the
    # NHWC kernel as it writes them (per thread range, combined), equal to a scan of them,
    # with the buffer's bits unchanged; odd channel counts and ones that leave a partial
    # vector included, and channels of one sign (hi < 0 or lo > 0)
    from dfpgen.fwd_family import padded_nhwc
    rng = np.random.default_rng(8)
    for C in (1, 3, 8, 13, 17, 40):
        x = rng.standard_normal((3, C, 5, 6)).astype(np.float32)
        x[:, 0] = np.abs(x[:, 0]) + 0.5  # channel 0 positive: its min is above 0
        if C > 2:
            x[:, 2] = -np.abs(x[:, 2]) - 0.25  # channel 2 negative: its max is below 0
        if layout == "nhwc":
            x = np.ascontiguousarray(x.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2)
        for pad in [(1, 1, 1, 1), (0, 2, 3, 0), (0, 0, 0, 0)]:
            q, buf, (hi, lo) = pack.quantize_padded(x, pad, fmt, seed=4, threads=threads, channel_range=True)
            ref = pack.quantize_pack(x, fmt, seed=4, threads=threads)
            assert q.exponent == ref.exponent and np.array_equal(q.mantissa, ref.mantissa)
            assert np.array_equal(buf, padded_nhwc(ref.mantissa, pad, C + C % 2))
            m = ref.mantissa.astype(np.int64)
            assert hi.dtype == lo.dtype == np.int64 and hi.shape == lo.shape == (C,)
            assert np.array_equal(hi, m.max(axis=(0, 2, 3))) and np.array_equal(lo, m.min(axis=(0, 2, 3)))
            assert lo[0] > 0 and (C <= 2 or hi[2] < 0)


def test_channel_range_rows_of_ranges_a_smaller_team_never_ran(monkeypatch):
    # An OpenMP team smaller than asked (OMP_THREAD_LIMIT, OMP_DYNAMIC) runs fewer ranges
    # than the range rows were sized for; the rows it never writes must not count, whatever
    # np.empty left in them (here: the worst garbage, -32768 in the min rows)
    from dfpgen import threads as dthreads
    real_call, real_empty = dthreads.parallel_call, np.empty

    def team_of_one(fn, args, begin_at, total, threads=None, per_thread=None, results=False):
        return real_call(fn, args, begin_at, total, 1, per_thread, results)

    def garbage(shape, dtype=float, *a, **kw):
        out = real_empty(shape, dtype, *a, **kw)
        if np.dtype(dtype) == np.int16:
            out.fill(-32768)
        return out
    x = np.random.default_rng(9).standard_normal((2, 8, 6, 6)).astype(np.float32)
    x = np.ascontiguousarray(x.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2)
    monkeypatch.setattr(pack._threads, "parallel_call", team_of_one)
    monkeypatch.setattr(np, "empty", garbage)
    q, _, (hi, lo) = pack.quantize_padded(x, (1, 1, 1, 1), threads=4, channel_range=True)
    monkeypatch.undo()
    m = q.mantissa.astype(np.int64)
    assert np.array_equal(hi, m.max(axis=(0, 2, 3))) and np.array_equal(lo, m.min(axis=(0, 2, 3)))


def test_data_ptr_is_the_first_element_of_every_kind_of_array():
    # the kernels' argument pointers: the fast path (writable contiguous buffers) and the
    # fallback (read-only, strided, empty, 0-d) must both give numpy's own address
    a = np.arange(2 * 3 * 4 * 6, dtype=np.int16).reshape(2, 3, 4, 6)
    ro = a.copy()
    ro.setflags(write=False)
    views = {"c": a, "fortran": np.asfortranarray(a), "nhwc view": a.transpose(0, 2, 3, 1),
             "offset": a[1:], "strided": a[:, :, ::2], "window": a[:, 1:2, 1:3, 2:], "empty": a[:0],
             "read-only": ro, "0-d": np.array(7, np.float32), "aligned": pack.empty_aligned((5, 3), np.float32),
             "datetime64": np.zeros(4, "datetime64[s]"), "bool": np.zeros(3, bool),
             "complex": np.zeros(2, np.complex64), "float16": np.zeros(5, np.float16)}
    for what, v in views.items():
        assert pack.data_ptr(v) == v.ctypes.data, what
    assert pack.data_ptr(views["aligned"]) % 64 == 0


def test_copy_pixels_is_the_plain_assignment_for_every_view():
    # the void-dtype fast path (contiguous channels) and the fallback must both copy exactly
    rng = np.random.default_rng(4)
    buf = rng.integers(-32767, 32768, (3, 7, 9, 18)).astype(np.int16)
    views = [buf, buf[:, ::2, 1::3, :5], buf[..., :1], buf[:, :, :, 3:17], buf.transpose(0, 2, 1, 3),
             buf[:0], buf[..., ::2], buf[:, 1:, :, :].astype(np.float32)]
    for src in views:
        for dst in (np.zeros(src.shape, src.dtype),
                    np.zeros(src.shape[:-1] + (src.shape[-1] + 3,), src.dtype)[..., 1:1 + src.shape[-1]]):
            ref = dst.copy()
            ref[...] = src
            pack.copy_pixels(dst, src)
            assert np.array_equal(dst, ref) and dst.shape == src.shape
