"""DFPBatchNorm2d and convert(fuse=True): against FP32 BatchNorm in float64 on the same
(dequantized) input, nn.BatchNorm2d's running statistics, eval / no_grad / state_dict, thread
independence, what autograd saves, and the patterns found in models dfpgen did not write."""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dfpgen.runtime as dfp
from dfpgen.runtime import fused_bn
from dfpgen import bn_reference, threads as dthreads
from dfpgen.dfp import quantize
from dfpgen.examples import models
from dfpgen.runtime.fuse import FusionWarning
from dfpgen.runtime.fused_bn import DFPBatchNorm2d, FusedReLU


def _pair(C=12, fuse="relu", **kw):
    torch.manual_seed(0)
    ref = nn.BatchNorm2d(C, **kw)
    if ref.affine:
        with torch.no_grad():
            ref.weight.uniform_(-2, 2)
            ref.bias.normal_()
    m = DFPBatchNorm2d(C, fuse=fuse, **kw)
    m.load_state_dict(ref.state_dict())
    return m, ref


def _x(shape=(4, 12, 5, 7), seed=1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * 2 + 0.5).contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("fuse", ["relu", "none", "add_relu"])
def test_training_forward_backward_match_float64_batchnorm_on_the_dequantized_input(fuse):
    m, _ = _pair(fuse=fuse)
    x = _x().requires_grad_()
    r = torch.relu(_x(seed=2)).requires_grad_() if fuse == "add_relu" else None
    y = m(x, r) if r is not None else m(x)
    gy = torch.randn_like(y)
    gx, gw, gb, *gr = torch.autograd.grad(y, [x, m.weight, m.bias] + ([r] if r is not None else []), gy)

    q = quantize(x.detach().numpy())  # the fused pass's DFP16 copy of X: same bits
    xd = torch.tensor(q.dequantize(np.float64), requires_grad=True)
    w = m.weight.detach().double().requires_grad_()
    b = m.bias.detach().double().requires_grad_()
    rd = r.detach().double().requires_grad_() if r is not None else None
    a = F.batch_norm(xd, None, None, w, b, training=True, eps=m.eps)
    if rd is not None:
        a = a + rd
    want = torch.relu(a) if fuse != "none" else a
    # ReLU's mask is the kernel's (a > 0 in float32, from the golden model); the float64 one
    # may differ where a ~ 0.
    live = torch.ones_like(y, dtype=torch.bool)
    if fuse != "none":
        live = torch.from_numpy(_kernel_mask(m, x, r)).view(4, 5, 7, 12).permute(0, 3, 1, 2)
    torch.where(live, a, torch.zeros_like(a)).backward(gy.double())
    # Output: one rounding to the output exponent (half a step) plus X's statistics against
    # its DFP16 copy's (2**-16 of max|X| per element, through invstd * gamma).
    step = 2.0 ** (np.frexp(float(want.detach().abs().max()))[1] - 15)
    assert (y.double() - want).abs().max() <= step + 1e-4 * want.abs().max()
    # Gradients: float32 arithmetic and the statistics of X vs its copy (see test_bn_kernels).
    for got, ref in [(gx, xd.grad), (gw, w.grad), (gb, b.grad)] + ([(gr[0], rd.grad)] if gr else []):
        assert (got.double() - ref).abs().max() <= 1e-4 * ref.abs().max() + 1e-6


def _kernel_mask(m, x, r=None):
    from dfpgen import bn
    rows = x.detach().permute(0, 2, 3, 1).reshape(-1, x.shape[1]).numpy()
    st = bn.batch_stats(rows)
    _, scale, shift = bn.affine_params(st.mean, st.var, m.weight.detach().double().numpy(),
                                       m.bias.detach().double().numpy(), m.eps)
    res = rng = None
    if r is not None:
        res = r.detach().contiguous(memory_format=torch.channels_last).permute(0, 2, 3, 1).reshape(rows.shape).numpy()
        rng = (res.min(axis=0), res.max(axis=0))
    return bn_reference.forward(rows, scale, shift, residual=res, residual_range=rng)["live"]


@pytest.mark.parametrize("momentum", [0.1, None])
def test_running_statistics_and_eval_follow_nn_batchnorm(momentum):
    m, ref = _pair(momentum=momentum)
    for seed in range(3):
        x = _x(seed=seed)
        m(x); ref(x)
    assert m.num_batches_tracked.item() == ref.num_batches_tracked.item() == 3
    torch.testing.assert_close(m.running_mean, ref.running_mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(m.running_var, ref.running_var, rtol=1e-5, atol=1e-6)
    m.eval(); ref.eval()
    x = _x(seed=9)
    with torch.no_grad():
        y, want = m(x), torch.relu(ref(x))
    step = 2.0 ** (np.frexp(float(want.abs().max()))[1] - 15)
    assert (y - want).abs().max() <= step + 1e-4 * want.abs().max()
    # eval mode with gradients: the running statistics are constants, dX = gamma*invstd*dY'
    x.requires_grad_()
    (gx,) = torch.autograd.grad(m(x).sum(), x)
    k = (m.weight / torch.sqrt(m.running_var + m.eps)).view(1, -1, 1, 1)
    torch.testing.assert_close(gx, k * (m(x) > 0), rtol=1e-6, atol=1e-6)


def test_no_running_stats_affine_false_and_state_dict_keys():
    m, ref = _pair(affine=False, track_running_stats=False)
    x = _x()
    m.eval(); ref.eval()  # batch statistics anyway (no running statistics)
    with torch.no_grad():
        y, want = m(x), torch.relu(ref(x))
    assert (y - want).abs().max() <= 1e-3
    m2, ref2 = _pair()
    assert list(m2.state_dict()) == list(ref2.state_dict())
    back = nn.BatchNorm2d(12)
    back.load_state_dict(m2.state_dict())


def test_no_grad_saves_nothing_and_disabled_is_pytorch_bit_for_bit():
    m, ref = _pair()
    x = _x()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        with torch.no_grad():
            m(x)
    assert not saved
    m2, ref2 = _pair()
    with dfp.enabled(False):
        assert torch.equal(m2(x), torch.relu(ref2(x)))
    assert torch.equal(m2.running_var, ref2.running_var)


@pytest.mark.parametrize("how", ["context", "env"])
def test_a_converted_model_trains_in_fp32_with_dfp16_switched_off(how, monkeypatch):
    # the README's A/B switch on a fused model: the unfused BatchNorm applies ReLU, the
    # in-place ReLU after it must not apply it again (autograd saved that output), and the
    # step is PyTorch's own, bit for bit
    torch.manual_seed(0)
    ref = models.resnet20()
    m = models.resnet20()
    m.load_state_dict(ref.state_dict())
    dfp.convert(m, fuse=True)
    assert any(isinstance(mod, FusedReLU) for mod in m.modules())
    x = torch.randn(4, 1, 28, 28)
    y = torch.randint(0, 10, (4,))
    if how == "env":
        monkeypatch.setenv("DFPGEN_DISABLE", "1")
        F.cross_entropy(m(x), y).backward()
    else:
        with dfp.enabled(False):
            F.cross_entropy(m(x), y).backward()
    F.cross_entropy(ref(x), y).backward()
    for (name, p), q in zip(m.named_parameters(), ref.parameters()):
        assert torch.equal(p.grad, q.grad), name


def test_autograd_keeps_int16_only_at_a_conv_bn_relu_junction():
    torch.manual_seed(0)
    model = dfp.convert(nn.Sequential(nn.Conv2d(8, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16),
                                      nn.ReLU(inplace=True), nn.Conv2d(16, 8, 3, padding=1, bias=False)))
    assert type(model[1]) is DFPBatchNorm2d and type(model[2]) is FusedReLU
    x = _x((2, 8, 6, 6))
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = model(x)
    saved = [t for t in saved if not isinstance(t, nn.Parameter)]
    acts = [t for t in saved if t.numel() >= 2 * 16 * 36 and t.dim() > 1 and t.dtype != torch.float32]
    assert not [t for t in saved if t.dtype == torch.float32 and t.numel() >= 2 * 8 * 36 and t.dim() == 4]
    assert {t.dtype for t in acts} == {torch.int16}
    y.sum().backward()
    assert model[0].weight.grad is not None and model[1].weight.grad is not None


def test_the_conv_after_a_fused_batchnorm_takes_its_int16_output_with_no_quantize_pass(monkeypatch):
    # convert() has the BatchNorm write its ReLU output's mantissas too: the next conv takes
    # them (and the proven per-channel range, for exact mode's schedule) instead of
    # quantizing and scanning the float32 output, and saves that same buffer for
    # backward-weight; from the second call on the BatchNorm writes them zero-padded as the
    # 3x3 conv reads them (no padding copy either). The bits are those of the path that
    # quantizes (without a residual the BatchNorm's exponent and range are exact, so even
    # the flush schedule is the same).
    from dfpgen import fwd_family, pack

    def make():
        torch.manual_seed(0)
        return dfp.convert(nn.Sequential(nn.Conv2d(8, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16),
                                         nn.ReLU(), nn.Conv2d(16, 8, 3, padding=1, bias=False)),
                           overflow="exact")
    a, b = make(), make()
    assert a[1].emit_int16
    b[1].emit_int16 = False
    calls = []
    real_q, real_qp, real_p = pack.quantize_pack, pack.quantize_padded, fwd_family.padded_nhwc
    monkeypatch.setattr(pack, "quantize_pack", lambda x, *args, name="", **kw: calls.append(name)
                        or real_q(x, *args, name=name, **kw))
    monkeypatch.setattr(pack, "quantize_padded", lambda x, *args, name="", **kw: calls.append(name)
                        or real_qp(x, *args, name=name, **kw))
    monkeypatch.setattr(fwd_family, "padded_nhwc", lambda *args: calls.append("pad") or real_p(*args))
    x = _x((2, 8, 6, 6))
    for step in range(2):
        outs = []
        for m in (a, b):
            calls.clear()
            held = []
            hook = m[2].register_forward_hook(lambda mod, inp, out: held.append(out))
            saved = []
            with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
                y = m(x)
            fwd = list(calls)
            hook.remove()
            m.zero_grad()
            y.sum().backward()
            outs.append((y.detach(), m[0].weight.grad, m[3].weight.grad))
            ptrs = {t.untyped_storage().data_ptr() for t in saved if t.dtype == torch.int16}
            if m is a:
                assert fwd.count("conv2d input X") == 1  # the first conv only
                h = fused_bn.dfp16_of(held[0])
                assert h.pad == ((0, 0, 0, 0), (1, 1, 1, 1))[step]
                # the first conv quantizes X straight into its padded layout; the second
                # pads the BatchNorm's buffer on its first call only
                assert fwd.count("pad") == (1, 0)[step]
                # saved padded as the BatchNorm writes it from the second call on (the same
                # shapes on every call, for a checkpoint's recomputation): on the first call
                # the copy the conv padded (and read), then the BatchNorm's buffer as it is
                shapes = {tuple(t.shape) for t in saved if t.dtype == torch.int16}
                assert (2, 8, 8, 16) in shapes and (2, 6, 6, 16) not in shapes
                assert (h.buffer.ctypes.data in ptrs) == (step == 1)
            else:
                assert fwd.count("conv2d input X") == 2 and fwd.count("pad") == 0
        for u, v in zip(*outs):
            assert torch.equal(u, v)
    # changed in place after the BatchNorm: the conv quantizes the new values
    with torch.no_grad():
        h = a[2](a[1](a[0](x)))
        h.mul_(0.5)
        assert torch.equal(a[3](h), a[3](h.clone()))


def test_bit_identical_for_one_and_two_threads():
    outs = []
    for n in (1, 2):
        dthreads.set_num_threads(n)
        try:
            m, _ = _pair(fuse="add_relu")
            x = _x((8, 12, 9, 9)).requires_grad_()
            r = torch.relu(_x((8, 12, 9, 9), seed=3))
            y = m(x, r)
            gx, gw = torch.autograd.grad(y, [x, m.weight], torch.ones_like(y))
            outs.append((y, gx, gw, m.running_var.clone()))
        finally:
            dthreads.set_num_threads(None)
    for a, b in zip(*outs):
        assert torch.equal(a, b)


def test_convert_fuses_every_resnet50_batchnorm_keeps_state_dict_and_reverts():
    torch.manual_seed(0)
    m = models.resnet50(num_classes=10)
    keys = list(m.state_dict())
    params = [id(p) for p in m.parameters()]
    with warnings.catch_warnings():
        warnings.simplefilter("error", FusionWarning)
        dfp.convert(m)
    kinds = [mod.fuse for mod in m.modules() if isinstance(mod, DFPBatchNorm2d)]
    assert len(kinds) == 53 and kinds.count("add_relu") == 16 and kinds.count("none") == 4
    assert kinds.count("relu") == 33  # the stem and 2 per bottleneck
    assert not [mod for mod in m.modules() if type(mod) is nn.BatchNorm2d]
    assert list(m.state_dict()) == keys and [id(p) for p in m.parameters()] == params
    x = torch.randn(2, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    F.cross_entropy(m(x), torch.tensor([1, 2])).backward()
    assert all(p.grad is not None for p in m.parameters())
    dfp.revert(m)
    assert type(m.layer1[0]) is models.Bottleneck and type(m.layer1[0].bn3) is nn.BatchNorm2d
    assert type(m.relu) is nn.ReLU and not dfp.dfp_layers(m) and list(m.state_dict()) == keys


def _three(make):
    torch.manual_seed(0)
    a, b, c = make(), make(), make()
    b.load_state_dict(a.state_dict())
    c.load_state_dict(a.state_dict())
    dfp.convert(a, overflow="exact")
    dfp.convert(b, overflow="exact", fuse=False)
    return a, b, c


def _rel(u, v):
    return ((u - v).abs().max() / v.abs().max()).item()


def test_fused_resnets_match_unfused_dfp16_to_the_fusion_rounding():
    # The fusion adds two roundings per BatchNorm (its input and its output to DFP16, each
    # within 2**-16 of the tensor's max) to the unfused path's two per conv; budget as in
    # test_modules: roundings x 2**-15, a factor 4 for growth through residual sums.
    a, b, c = _three(models.resnet20)  # training mode: batch statistics of 4 x 7 x 7 and more
    x = torch.randn(4, 1, 28, 28)
    ya, yb, yc = a(x), b(x), c(x)
    assert _rel(ya, yb) < 19 * 2 * 2.0 ** -15 * 4
    assert _rel(ya, yc) < (19 + 20) * 2 * 2.0 ** -15 * 4
    a, b, c = _three(lambda: models.resnet50(num_classes=10).eval())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ya, yb, yc = a(x), b(x), c(x)
    assert 0 < _rel(ya, yb) < 53 * 2 * 2.0 ** -15 * 4
    assert _rel(ya, yc) < (53 + 54) * 2 * 2.0 ** -15 * 4


def test_untraceable_block_runs_unfused_with_one_warning_naming_it():
    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, padding=1)
            self.bn = nn.BatchNorm2d(4)

        def forward(self, x):
            if x.sum() > 0:  # data-dependent control flow: torch.fx cannot trace it
                x = -x
            return torch.relu(self.bn(self.conv(x)))

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 3, 1), Odd())
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        dfp.convert(model)
    msgs = [str(x.message) for x in w if issubclass(x.category, FusionWarning)]
    assert len(msgs) == 1 and "'1'" in msgs[0] and "unfused" in msgs[0]
    assert type(model[1].bn) is nn.BatchNorm2d
    model(torch.randn(2, 3, 5, 5))


def test_hugging_face_resnet_is_fused_from_a_random_config():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.ResNetConfig(embedding_size=16, hidden_sizes=[32, 64], depths=[1, 2],
                                    layer_type="bottleneck")
    torch.manual_seed(0)
    m = transformers.ResNetModel(cfg)
    ref = transformers.ResNetModel(cfg)
    ref.load_state_dict(m.state_dict())
    keys = list(m.state_dict())
    dfp.convert(m)
    dfp.convert(ref, fuse=False)
    kinds = [mod.fuse for mod in m.modules() if isinstance(mod, DFPBatchNorm2d)]
    assert len(kinds) == 12 and kinds.count("add_relu") == 3 and kinds.count("none") == 2
    assert list(m.state_dict()) == keys
    x = torch.randn(2, 3, 32, 32)
    y, yr = m(x).last_hidden_state, ref(x).last_hidden_state
    assert ((y - yr).abs().max() / yr.abs().max()).item() < 12 * 2 * 2.0 ** -15 * 16
    y.sum().backward()
    assert all(p.grad is not None for p in m.parameters())
    m.eval()
    with torch.no_grad():
        m(x)


def test_golden_model_mask_agrees_with_module_output():
    # The mask the backward recomputes is the sign of the affine image: where the output is
    # positive the mask is set (the converse may fail only for values rounding to 0).
    m, _ = _pair()
    x = _x()
    y = m(x)
    live = _kernel_mask(m, x)
    ypos = (y.permute(0, 2, 3, 1).reshape(-1, 12) > 0).numpy()
    assert not (ypos & ~live).any() and live.any() and not live.all()


def test_int16_output_is_the_next_convs_dfp16_input():
    # emit_int16: the output's mantissas in the conv kernels' padded NHWC layout, with the
    # exponent fixed before the pass; quantizing the float32 output gives the same bits.
    from dfpgen import pack
    m, _ = _pair(C=13)
    m.emit_int16 = True
    x = _x((2, 13, 5, 6))
    with torch.no_grad():
        y = m(x)
    h = fused_bn.dfp16_of(y)
    buf, exp = h.buffer, h.exponent
    assert h.pad == (0, 0, 0, 0) and np.array_equal(h.mantissa, buf[..., :13].transpose(0, 3, 1, 2))
    assert buf.shape == (2, 5, 6, 14) and not buf[..., 13].any()
    q = pack.quantize_pack(y.numpy())
    assert q.exponent == exp
    assert np.array_equal(pack.nhwc_buffer(q), buf)
    with torch.no_grad():
        y.mul_(2)  # an in-place change: the mantissas no longer hold y's values
    assert fused_bn.dfp16_of(y) is None


class _TwoConsumers(nn.Module):
    """conv -> BN -> ReLU read by a 3x3 conv (padding 1) and a 5x5 conv (padding 2)."""

    def __init__(self):
        super().__init__()
        self.conv0 = nn.Conv2d(3, 13, 3, padding=1, bias=False)
        self.bn0 = nn.BatchNorm2d(13)
        self.relu = nn.ReLU()
        self.conv1 = nn.Conv2d(13, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(13, 4, 5, padding=2)

    def forward(self, x):
        y = self.relu(self.bn0(self.conv0(x)))
        return self.conv1(y) + self.conv2(y)


def test_nonreentrant_checkpoint_recomputes_the_first_calls_saved_int16_input():
    # The first call is the one where the next convs ask the BatchNorm for a padded INT16
    # output; a non-reentrant checkpoint's recomputation then gets it padded, and must save
    # tensors of the shapes the first forward saved (else torch raises CheckpointError).
    # Outputs and gradients: the same bits as without the checkpoint, on every call.
    import copy
    from torch.utils.checkpoint import checkpoint
    torch.manual_seed(0)
    plain = dfp.convert(_TwoConsumers())
    ck = copy.deepcopy(plain)
    for step in range(2):
        x = torch.randn(2, 3, 6, 6, generator=torch.Generator().manual_seed(step)).contiguous(
            memory_format=torch.channels_last)
        ys = []
        for model, run in ((plain, lambda m: m(x)),
                           (ck, lambda m: checkpoint(m, x, use_reentrant=False))):
            model.zero_grad()
            y = run(model)
            y.backward(torch.cos(torch.arange(y.numel(), dtype=torch.float32)).view(y.shape))
            ys.append((y.detach(), [p.grad.clone() for p in model.parameters()]))
        (y0, g0), (y1, g1) = ys
        assert torch.equal(y0, y1)
        for a, b in zip(g0, g1):
            assert torch.equal(a, b)


@pytest.mark.parametrize("cl", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("args", [(3, 2, 1), (2, 2, 0), (3, 1, 1, 2)])
def test_maxpool_keeps_int32_argmax_only_with_pytorchs_bits(args, cl):
    # DFPMaxPool2d: the forward and the gradient (overlapping windows accumulate in PyTorch's
    # order) bit for bit as nn.MaxPool2d's, while autograd keeps one int32 tensor of the
    # output's size instead of the float32 input and int64 indices
    from dfpgen.runtime.pool import DFPMaxPool2d
    g = torch.Generator().manual_seed(4)
    x0 = torch.randn(2, 5, 9, 8, generator=g).round(decimals=1)  # ties: the first maximum wins
    if cl:
        x0 = x0.contiguous(memory_format=torch.channels_last)
    runs = []
    for cls in (nn.MaxPool2d, DFPMaxPool2d):
        x = x0.clone().requires_grad_()
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            y = cls(*args)(x)
        y.backward(torch.randn(y.shape, generator=torch.Generator().manual_seed(5)))
        runs.append((y.detach(), x.grad, saved))
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])
    assert runs[1][1].is_contiguous(memory_format=torch.channels_last) == cl
    assert [(t.dtype, t.shape) for t in runs[1][2]] == [(torch.int32, runs[1][0].shape)]
    assert {t.dtype for t in runs[0][2]} == {torch.float32, torch.int64}


def test_convert_swaps_max_pooling_and_revert_restores_it():
    from dfpgen.runtime.pool import DFPMaxPool2d
    torch.manual_seed(0)
    m = models.resnet50(num_classes=10)
    dfp.convert(m)
    assert type(m.maxpool) is DFPMaxPool2d
    dfp.revert(m)
    assert type(m.maxpool) is nn.MaxPool2d
    dfp.convert(m, fuse=False)
    assert type(m.maxpool) is nn.MaxPool2d
