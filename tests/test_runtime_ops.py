"""dfpgen::conv2d / dfpgen::linear custom ops: values and gradients against PyTorch on the
dequantized operands, opcheck, torch.compile, layouts, saved INT16 activations.

Tolerance (derived, not guessed). In exact mode every INT32 partial sum is exact; what is not
exact is converting each partial to FP32 (one rounding, relative 2**-24) and summing the
partials of an output element, at most L of them for a reduction of length L (flush interval
>= 1), in FP32: recursive summation adds at most (L - 1) roundings of the running sum. So

    |y - y_ref| <= (L + 1) * u * sum_i |a_i * b_i|,   u = 2**-24,

where ``sum |a_i b_i|`` is the same convolution on the absolute values of the dequantized
operands; one more rounding covers the FP32 bias add.
"""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

import dfpgen
import dfpgen.runtime as dfp
from dfpgen import DFP16, DfpFormat

U = 2.0 ** -24


def deq(t, fmt=DFP16, seed=0):
    q = dfpgen.quantize(t.detach().numpy(), fmt, seed=seed)
    return torch.from_numpy(dfpgen.dequantize(q, np.float64))


def bound(L, abs_sum, extra=0.0):
    return (L + 1) * U * abs_sum + U * extra + 1e-30


CASES = [  # (N, C, H, W, K, R, S, stride, padding, dilation, bias, channels_last)
    (2, 3, 7, 6, 5, 3, 3, 1, 1, 1, True, False),
    (2, 4, 9, 9, 6, 3, 3, 2, 1, 1, False, True),
    (1, 5, 8, 7, 3, 3, 3, 1, 2, 2, True, True),
    (3, 2, 5, 5, 17, 1, 1, 1, 0, 1, True, False),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "n{}c{}h{}w{}k{}r{}s{}u{}p{}d{}".format(*c[:10]))
def test_conv2d_values_and_gradients_match_torch_on_dequantized(case):
    n, c, h, w, k, r, s, st, pad, dil, has_bias, cl = case
    g = torch.Generator().manual_seed(hash(case) & 0xFFFF)
    x = torch.randn(n, c, h, w, generator=g)
    if cl:
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    wt = torch.randn(k, c, r, s, generator=g, requires_grad=True)
    b = torch.randn(k, generator=g, requires_grad=True) if has_bias else None
    y = dfp.conv2d(x, wt, b, st, pad, dil, fmt=DFP16, overflow="exact")
    assert y.dtype == torch.float32
    assert y.is_contiguous(memory_format=torch.channels_last if cl else torch.contiguous_format)
    gy = torch.randn(y.shape, generator=g)
    y.backward(gy)

    xq, wq, gq = deq(x), deq(wt), deq(gy)
    b64 = None if b is None else b.detach().double()
    y_ref = F.conv2d(xq, wq, b64, st, pad, dil)
    y_abs = F.conv2d(xq.abs(), wq.abs(), None, st, pad, dil)
    extra = 0 if b is None else y_ref.abs()
    assert ((y.detach().double() - y_ref).abs() <= bound(c * r * s, y_abs, extra)).all()

    gx_ref = torch.nn.grad.conv2d_input(x.shape, wq, gq, st, pad, dil)
    gx_abs = torch.nn.grad.conv2d_input(x.shape, wq.abs(), gq.abs(), st, pad, dil)
    assert ((x.grad.double() - gx_ref).abs() <= bound(k * r * s, gx_abs)).all()
    assert x.grad.is_contiguous(memory_format=torch.channels_last if cl else torch.contiguous_format)

    p, q = y.shape[2:]
    gw_ref = torch.nn.grad.conv2d_weight(xq, wt.shape, gq, st, pad, dil)
    gw_abs = torch.nn.grad.conv2d_weight(xq.abs(), wt.shape, gq.abs(), st, pad, dil)
    assert ((wt.grad.double() - gw_ref).abs() <= bound(n * p * q, gw_abs)).all()
    if b is not None:  # bias gradient is FP32 and not quantized
        torch.testing.assert_close(b.grad, gy.sum((0, 2, 3)))


def test_linear_values_and_gradients_match_torch_on_dequantized():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 5, 19, generator=g, requires_grad=True)  # leading dims flattened
    wt = torch.randn(7, 19, generator=g, requires_grad=True)
    b = torch.randn(7, generator=g, requires_grad=True)
    y = dfp.linear(x, wt, b, fmt=DFP16, overflow="exact")
    assert y.shape == (2, 5, 7)
    gy = torch.randn(y.shape, generator=g)
    y.backward(gy)
    xq, wq, gq = deq(x), deq(wt), deq(gy)
    y_ref = xq @ wq.T + b.detach().double()
    assert ((y.detach().double() - y_ref).abs() <= bound(19, xq.abs() @ wq.abs().T, y_ref.abs())).all()
    gx_ref, gx_abs = gq @ wq, gq.abs() @ wq.abs()
    assert ((x.grad.double() - gx_ref).abs() <= bound(7, gx_abs)).all()
    gq2, xq2 = gq.reshape(-1, 7), xq.reshape(-1, 19)
    gw_ref, gw_abs = gq2.T @ xq2, gq2.abs().T @ xq2.abs()
    assert ((wt.grad.double() - gw_ref).abs() <= bound(10, gw_abs)).all()
    torch.testing.assert_close(b.grad, gy.sum((0, 1)))


def test_stochastic_gradient_rounding_is_seeded_and_reproducible():
    g = torch.Generator().manual_seed(5)
    x0 = torch.randn(2, 4, 6, 6, generator=g)
    w0 = torch.randn(3, 4, 3, 3, generator=g)
    gy = torch.randn(2, 3, 6, 6, generator=g)

    def grads(seed):
        x, wt = x0.clone().requires_grad_(), w0.clone().requires_grad_()
        dfp.conv2d(x, wt, None, 1, 1, fmt=DFP16, overflow="exact", grad_rounding="stochastic",
                   seed=seed).backward(gy)
        return x.grad, wt.grad

    a, b, c = grads(11), grads(11), grads(12)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])
    # The gradient is the one of dY rounded stochastically with that seed.
    gq = deq(gy, DfpFormat(rounding="stochastic"), seed=11)
    assert not torch.equal(gq, deq(gy))
    wq = deq(w0)
    ref = torch.nn.grad.conv2d_input(x0.shape, wq, gq, 1, 1)
    tol = bound(3 * 9, torch.nn.grad.conv2d_input(x0.shape, wq.abs(), gq.abs(), 1, 1))
    assert ((a[0].double() - ref).abs() <= tol).all()


def test_forward_saves_int16_activation_not_fp32():
    x = torch.randn(4, 8, 10, 10).contiguous(memory_format=torch.channels_last).requires_grad_()
    wt = torch.randn(8, 8, 3, 3, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = dfp.conv2d(x, wt, None, 1, 1, fmt=DFP16, overflow="exact")
    act = [t for t in saved if t.data_ptr() != wt.data_ptr() and t.numel() > 1]
    assert [t.dtype for t in act] == [torch.int16]
    assert act[0].numel() >= x.numel() and act[0].nbytes < x.nbytes  # 2 bytes/element (+pad)
    y.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_first_layer_without_input_grad_and_nan_error():
    x = torch.randn(2, 1, 6, 6)  # input needs no gradient: backward-data is not run
    wt = torch.randn(4, 1, 3, 3, requires_grad=True)
    dfp.conv2d(x, wt, None, 1, 1, fmt=DFP16, overflow="exact").sum().backward()
    assert wt.grad.shape == wt.shape and x.grad is None
    x[0, 0, 1, 2] = float("nan")
    with pytest.raises(dfpgen.DfpError, match="NaN"):
        dfp.conv2d(x, wt, None, 1, 1, fmt=DFP16, overflow="exact")


@pytest.mark.parametrize("cl", [False, True], ids=["nchw", "channels_last"])
def test_opcheck_conv2d(cl):
    x = torch.randn(2, 3, 5, 5, requires_grad=True)
    if cl:
        x = x.detach().contiguous(memory_format=torch.channels_last).requires_grad_()
    wt = torch.randn(4, 3, 3, 3, requires_grad=True)
    b = torch.randn(4, requires_grad=True)
    args = (x, wt, b, [2, 2], [1, 1], [1, 1], 15, "nearest", "exact", "nearest",
            torch.tensor(7), 1)
    torch.library.opcheck(torch.ops.dfpgen.conv2d.default, args)
    _, buf, exp = torch.ops.dfpgen.conv2d(*args)
    gy = torch.randn(2, 4, 3, 3)
    torch.library.opcheck(torch.ops.dfpgen.conv2d_backward.default,
                          (gy, buf, exp, wt.detach(), [2, 2], [1, 1], [1, 1], 15, "stochastic",
                           "exact", torch.tensor(7), 1, cl, True, True))


@pytest.mark.parametrize("cl", [False, True], ids=["nchw", "channels_last"])
def test_eager_calls_skip_the_custom_op_dispatch_with_the_same_bits(cl):
    # dfp.conv2d in eager mode runs the ops' implementations under a torch.autograd.Function;
    # through torch.ops.dfpgen.conv2d's registered autograd the results are the same bits
    g = torch.Generator().manual_seed(3)
    x0 = torch.randn(2, 5, 7, 6, generator=g)
    if cl:
        x0 = x0.contiguous(memory_format=torch.channels_last)
    w0, b0 = torch.randn(4, 5, 3, 3, generator=g), torch.randn(4, generator=g)
    gy = torch.randn(2, 4, 4, 3, generator=g)
    runs = []
    for via_op in (False, True):
        x, wt, b = (t.clone().requires_grad_() for t in (x0, w0, b0))
        if via_op:
            y = torch.ops.dfpgen.conv2d(x, wt, b, [2, 2], [1, 1], [1, 1], 15, "nearest", "exact",
                                        "stochastic", torch.tensor(9), 0)[0]
        else:
            y = dfp.conv2d(x, wt, b, 2, 1, overflow="exact", grad_rounding="stochastic", seed=9)
            assert type(y.grad_fn).__name__ == "_Conv2dEagerBackward"
        y.backward(gy)
        runs.append((y.detach(), x.grad, wt.grad, b.grad))
    for u, v in zip(*runs):
        assert torch.equal(u, v)
    assert runs[0][0].is_contiguous(memory_format=torch.channels_last) == cl


@pytest.mark.parametrize("bias", [False, True], ids=["no_bias", "bias"])
def test_eager_linear_skips_the_custom_op_dispatch_with_the_same_bits(bias):
    # dfp.linear in eager mode: a torch.autograd.Function over the ops' implementations, the
    # same bits as torch.ops.dfpgen.linear's registered autograd (3-D input: rows flattened)
    g = torch.Generator().manual_seed(5)
    x0, w0 = torch.randn(3, 4, 9, generator=g), torch.randn(5, 9, generator=g)
    b0 = torch.randn(5, generator=g) if bias else None
    gy = torch.randn(3, 4, 5, generator=g)
    runs = []
    for via_op in (False, True):
        x, wt = x0.clone().requires_grad_(), w0.clone().requires_grad_()
        b = None if b0 is None else b0.clone().requires_grad_()
        if via_op:
            y = torch.ops.dfpgen.linear(x.reshape(12, 9), wt, b, 15, "nearest", "exact",
                                        "stochastic", torch.tensor(4), 0)[0].reshape(3, 4, 5)
        else:
            y = dfp.linear(x, wt, b, overflow="exact", grad_rounding="stochastic", seed=4)
            assert type(y.grad_fn).__name__ == "ViewBackward0"
            assert type(y.grad_fn.next_functions[0][0]).__name__ == "_LinearEagerBackward"
        y.backward(gy)
        runs.append((y.detach(), x.grad, wt.grad) + ((b.grad,) if bias else ()))
    for u, v in zip(*runs):
        assert torch.equal(u, v)
    assert runs[0][1].abs().sum() > 0 and runs[0][2].abs().sum() > 0


def test_opcheck_linear():
    x = torch.randn(6, 9, requires_grad=True)
    wt = torch.randn(5, 9, requires_grad=True)
    args = (x, wt, None, 15, "nearest", "exact", "nearest", torch.tensor(1), 1)
    torch.library.opcheck(torch.ops.dfpgen.linear.default, args)
    _, buf, exp = torch.ops.dfpgen.linear(*args)
    torch.library.opcheck(torch.ops.dfpgen.linear_backward.default,
                          (torch.randn(6, 5), buf, exp, wt.detach(), 15, "nearest", "exact",
                           torch.tensor(1), 1, True, False))


def test_torch_compile_traces_through_fake_impls():
    conv = dfp.DFPConv2d(3, 4, 3, padding=1)
    lin = dfp.DFPLinear(4 * 25, 3)

    def f(x):
        return lin(torch.relu(conv(x)).flatten(1))

    from torch._dynamo.utils import counters
    x = torch.randn(2, 3, 5, 5)
    eager = f(x)
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    out = compiled(x)
    assert torch.equal(out, eager)
    for _ in range(3):  # a new stochastic-rounding seed per call must not re-trace
        compiled(x).sum().backward()
    assert conv.weight.grad is not None and lin.weight.grad is not None
    assert conv.dfp_calls == 5 and counters["stats"]["unique_graphs"] == 1


def test_empty_batch_keeps_pytorch_shapes():
    wt = torch.randn(4, 3, 3, 3, requires_grad=True)
    y = dfp.conv2d(torch.randn(0, 3, 5, 5), wt, None, 1, 1)
    assert y.shape == (0, 4, 5, 5)
    y.sum().backward()
    assert torch.equal(wt.grad, torch.zeros_like(wt))
    assert dfp.linear(torch.randn(0, 7), torch.randn(2, 7)).shape == (0, 2)


def test_fast_mode_saturation_warns_once_per_layer_shape_and_pass(monkeypatch):
    import re
    import warnings

    from dfpgen.errors import OverflowWarning
    from dfpgen.runtime import ops
    monkeypatch.setattr(ops, "_saturation_warned", set())
    torch.manual_seed(0)
    # all-equal mantissas at the DFP16 maximum: every long fast-mode partial saturates
    x = torch.full((2, 64, 6, 6), 1.0, requires_grad=True)
    w = torch.full((8, 64, 3, 3), 1.0, requires_grad=True)
    w2 = torch.full((8, 64, 1, 1), 1.0, requires_grad=True)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        for _ in range(3):
            y = dfp.conv2d(x, w, padding=1, overflow="fast") + dfp.conv2d(x, w2, overflow="fast")
            y.sum().backward()
    msgs = [str(r.message) for r in rec if issubclass(r.category, OverflowWarning)]
    keys = {re.match(r"DFP16 (\w+) of the layer with weight (\(.*?\)):", m).groups() for m in msgs}
    # one per (pass, layer shape) that saturated, however many steps ran
    assert len(msgs) == len(keys) and len(keys) >= 2, msgs
    assert all("not reported again" in m for m in msgs)
    assert {k[1] for k in keys} == {"(8, 64, 3, 3)", "(8, 64, 1, 1)"}
    # a linear layer at several batch sizes is one layer
    wl = torch.full((8, 256), 1.0)
    with warnings.catch_warnings(record=True) as rec3:
        warnings.simplefilter("always")
        for n in (4, 4, 3, 5):
            dfp.linear(torch.full((n, 256), 1.0), wl, overflow="fast")
    assert sum(issubclass(r.category, OverflowWarning) for r in rec3) == 1
    # the numpy API still warns at every saturating call
    xq = dfpgen.quantize(np.ones((1, 64, 6, 6), np.float32))
    wq = dfpgen.quantize(np.ones((8, 64, 3, 3), np.float32))
    with warnings.catch_warnings(record=True) as rec2:
        warnings.simplefilter("always")
        for _ in range(2):
            dfpgen.conv2d(xq, wq, padding=1, overflow="fast")
    assert sum(issubclass(r.category, OverflowWarning) for r in rec2) == 2


@pytest.mark.parametrize("shape", [(8, 5, 3, 3), (6, 4, 1, 1), (7, 3)], ids=["3x3", "1x1", "linear"])
def test_channels_last_weights_quantize_in_place_to_the_same_bits(shape):
    # a channels_last model's weights (KRSC memory) are quantized without a relayout copy:
    # the same DFP16 weight, KRSC buffer included, as from the KCRS tensor
    from dfpgen.runtime import ops
    w = torch.randn(*shape, generator=torch.Generator().manual_seed(11))
    layouts = [w, w.contiguous(memory_format=torch.channels_last)] if w.dim() == 4 else [w]
    packed = [ops.packed_weight(t, DFP16) for t in layouts]
    for p in packed:
        assert p.exponent == packed[0].exponent
        np.testing.assert_array_equal(p.mantissa, packed[0].mantissa)
        np.testing.assert_array_equal(p.krsc, packed[0].krsc)
    ref = dfpgen.dfp.quantize(w.numpy() if w.dim() == 4 else w.numpy()[:, :, None, None], DFP16)
    np.testing.assert_array_equal(packed[-1].mantissa, ref.mantissa)
    assert packed[-1].exponent == ref.exponent


def test_eager_linear_double_backward_raises_instead_of_dropping_the_term():
    # The kernels' backward is not differentiable: a create_graph=True backward (gradient
    # penalties) must fail loudly, as the registered op's autograd did, never return a
    # gradient without a graph whose second-order term then silently vanishes.
    x = torch.randn(4, 6, requires_grad=True)
    wt = torch.randn(3, 6, requires_grad=True)
    y = dfp.linear(x, wt)
    g, = torch.autograd.grad((y ** 2).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="differentiate twice|no autograd formula"):
        (y.sum() + g.pow(2).sum()).backward()


def test_eager_conv2d_double_backward_raises_instead_of_dropping_the_term():
    x = torch.randn(2, 3, 5, 5, requires_grad=True)
    wt = torch.randn(4, 3, 3, 3, requires_grad=True)
    y = dfp.conv2d(x, wt, None, 1, 1)
    g, = torch.autograd.grad((y ** 2).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="differentiate twice|no autograd formula"):
        (y.sum() + g.pow(2).sum()).backward()
