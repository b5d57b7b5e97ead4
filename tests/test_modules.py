"""DFPConv2d / DFPLinear as drop-ins, convert() on a torchvision-shaped ResNet-50, FP32
fallbacks with one warning, the global switch and per-layer settings."""
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dfpgen
import dfpgen.runtime as dfp
from dfpgen import DfpFormat
from dfpgen.examples import models


def test_state_dict_round_trip_conv_and_linear():
    for make_fp32, make_dfp in [
        (lambda: nn.Conv2d(3, 8, 3, stride=2, padding=1, bias=True),
         lambda: dfp.DFPConv2d(3, 8, 3, stride=2, padding=1, bias=True)),
        (lambda: nn.Linear(12, 5), lambda: dfp.DFPLinear(12, 5)),
    ]:
        torch.manual_seed(0)
        a = make_fp32()
        torch.manual_seed(0)
        b = make_dfp()
        # Same constructor, same initialisation, same keys.
        assert a.state_dict().keys() == b.state_dict().keys()
        for k in a.state_dict():
            assert torch.equal(a.state_dict()[k], b.state_dict()[k])
        torch.manual_seed(1)
        src = make_fp32()
        b.load_state_dict(src.state_dict())
        back = make_fp32()
        back.load_state_dict(b.state_dict())
        for k, v in src.state_dict().items():
            assert torch.equal(back.state_dict()[k], v)


def test_convert_resnet50_counts_skip_and_shares_parameters():
    m = models.resnet50()
    params_before = [id(p) for p in m.parameters()]
    sd = {k: v.clone() for k, v in m.state_dict().items()}
    dfp.convert(m)
    layers = dict(dfp.dfp_layers(m))
    assert sum(isinstance(l, dfp.DFPConv2d) for l in layers.values()) == 53
    assert sum(isinstance(l, dfp.DFPLinear) for l in layers.values()) == 1
    assert [id(p) for p in m.parameters()] == params_before  # optimizer references stay valid
    assert all(torch.equal(v, sd[k]) for k, v in m.state_dict().items())
    assert layers["layer3.0.downsample.0"].dfp_name == "layer3.0.downsample.0"

    m2 = dfp.convert(models.resnet50(), skip=["conv1", "fc"])
    assert len(dfp.dfp_layers(m2)) == 52
    assert type(m2.conv1) is nn.Conv2d and type(m2.fc) is nn.Linear
    m3 = dfp.convert(models.resnet50(), skip="layer4.*", linear=False)
    assert len(dfp.dfp_layers(m3)) == 53 - 10  # layer4: 3 blocks x 3 convs + downsample
    m4 = dfp.convert(models.resnet50(), skip=lambda name, mod: mod.kernel_size == (1, 1)
                     if isinstance(mod, nn.Conv2d) else True)
    assert len(dfp.dfp_layers(m4)) == 16 + 1  # the 3x3 convs of the blocks, and the stem 7x7
    dfp.revert(m)
    assert not dfp.dfp_layers(m) and type(m.layer1[0].conv2) is nn.Conv2d


def test_converted_resnet50_forward_matches_fp32():
    torch.manual_seed(0)
    m = models.resnet50(num_classes=10).eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        ref = m(x)
        dfp.convert(m, overflow="exact")
        out = m(x)
        with dfp.enabled(False):
            assert torch.equal(m(x), ref)  # the switch gives back the FP32 path exactly
    # Budget: each of the 54 layers quantizes two operands with a relative (to max) error of
    # at most 2**-15 each; errors add through depth, a factor 4 for growth through the
    # residual sums and BatchNorm scaling.
    budget = 54 * 2 * 2.0 ** -15 * 4
    err = (out - ref).abs().max() / ref.abs().max()
    assert 0 < err < budget, (err, budget)


def _with_warnings(fn):
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        out = fn()
    return out, [x for x in w if issubclass(x.category, dfp.DfpFallbackWarning)]


@pytest.mark.parametrize("kwargs,reason", [
    (dict(groups=2), "groups=2"),
    (dict(padding=1, padding_mode="reflect"), "padding_mode='reflect'"),
    (dict(kernel_size=2, padding="same"), "padding='same'"),
])
def test_unsupported_config_falls_back_with_one_warning_naming_the_layer(kwargs, reason):
    args = dict(in_channels=4, out_channels=6, kernel_size=3)
    args.update(kwargs)
    torch.manual_seed(0)
    ref = nn.Conv2d(**args)
    model = nn.Sequential(nn.Identity(), nn.Conv2d(**args))
    model[1].load_state_dict(ref.state_dict())
    x = torch.randn(2, 4, 7, 7)
    # convert names the layer once; the calls do not repeat it
    (_, y1, y2), w = _with_warnings(lambda: (dfp.convert(model), model(x), model(x)))
    assert len(w) == 1
    assert "'1'" in str(w[0].message) and reason in str(w[0].message)
    assert torch.equal(y1, ref(x)) and torch.equal(y2, ref(x))


def test_padding_strings_and_unbatched_input_run_on_dfp16():
    torch.manual_seed(0)
    for pad in ("same", "valid"):
        ref = nn.Conv2d(3, 4, 3, padding=pad, dilation=2)
        layer = dfp.DFPConv2d(3, 4, 3, padding=pad, dilation=2)
        layer.load_state_dict(ref.state_dict())
        x = torch.randn(3, 9, 9)  # unbatched (C, H, W)
        y, w = _with_warnings(lambda: layer(x))
        assert not w and y.shape == ref(x).shape
        err = (y - ref(x)).abs().max() / ref(x).abs().max()
        assert 0 < err < 4 * 2.0 ** -15 * 27  # two quantized operands, 27-term sums


def test_per_layer_format_overflow_and_global_switch(monkeypatch):
    torch.manual_seed(0)
    x = torch.randn(2, 8, 6, 6)
    ref = nn.Conv2d(8, 8, 3, padding=1)
    coarse = dfp.DFPConv2d(8, 8, 3, padding=1, dfp_format=DfpFormat(bits=6), overflow="fast")
    fine = dfp.DFPConv2d(8, 8, 3, padding=1, overflow="exact")
    for layer in (coarse, fine):
        layer.load_state_dict(ref.state_dict())
    with torch.no_grad():
        e_coarse = (coarse(x) - ref(x)).abs().max()
        e_fine = (fine(x) - ref(x)).abs().max()
    assert e_fine < e_coarse / 100  # 9 more mantissa bits: ~2**9 smaller error
    with pytest.raises(dfpgen.DfpError):
        dfp.DFPConv2d(2, 2, 1, overflow="sometimes")
    monkeypatch.setenv("DFPGEN_DISABLE", "1")
    assert not dfp.is_enabled()
    with torch.no_grad():
        assert torch.equal(fine(x), ref(x))
    with dfp.enabled(True):
        assert dfp.is_enabled()
    monkeypatch.delenv("DFPGEN_DISABLE")
    assert dfp.is_enabled()


def test_linear_module_and_bf16_autocast_input():
    torch.manual_seed(0)
    ref = nn.Linear(10, 4)
    lin = dfp.DFPLinear(10, 4)
    lin.load_state_dict(ref.state_dict())
    x = torch.randn(3, 10)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = lin(x.bfloat16())
    assert y.dtype == torch.bfloat16  # the input's dtype, as nn.Linear under autocast
    ref_y = ref(x.bfloat16().float())
    assert (y.float() - ref_y).abs().max() < 1e-2 * ref_y.abs().max()
    xd = torch.randn(3, 10, dtype=torch.float64)  # float64: not a DFP dtype -> FP32 path
    lin.double()
    yd, w = _with_warnings(lambda: lin(xd))
    assert len(w) == 1 and "float64" in str(w[0].message)
    assert torch.equal(yd, F.linear(xd, lin.weight, lin.bias))
