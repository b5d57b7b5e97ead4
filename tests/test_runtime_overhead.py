"""The lean training path: kernels known from the layer shapes (no kernel loads after the
first step), DFP16 weights quantized once per value (never stale), the saved X is the
kernels' own buffer."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dfpgen.runtime as dfp
from dfpgen import conv, kernels
from dfpgen.runtime import ops


def _small_net():
    torch.manual_seed(0)
    return nn.Sequential(
        dfp.DFPConv2d(3, 8, 3, padding=1), nn.ReLU(),
        dfp.DFPConv2d(8, 16, 3, stride=2, padding=1), nn.ReLU(),
        dfp.DFPConv2d(16, 16, 3, padding=1, bias=False), nn.ReLU(),
        nn.Flatten(), dfp.DFPLinear(16 * 4 * 4, 10))


def test_training_loads_kernels_only_in_the_first_step():
    # 20 SGD steps with a large learning rate, so the operands' bounds (and with them exact
    # mode's proven flush schedules) move from step to step: every kernel a layer can need
    # follows from its shape and is loaded on its first call, none later.
    net = _small_net()
    opt = torch.optim.SGD(net.parameters(), lr=0.2, momentum=0.9)
    g = torch.Generator().manual_seed(1)
    first_seen: dict = {}  # (pass, kernels, c_block, flush_taps) -> first step using it
    step = 0

    def watch(ev):
        info = ev["info"]
        if ev["pass_kind"] != "bwd_weight":
            first_seen.setdefault((ev["pass_kind"], info.symbols, info.c_block, info.flush_taps), step)

    loads = []
    ops.observers.append(watch)
    try:
        for step in range(20):
            x = torch.randn(4, 3, 8, 8, generator=g) * 3
            y = torch.randint(0, 10, (4,), generator=g)
            before = sum(kernels.load_counts.values())
            loss = F.cross_entropy(net(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            loads.append(sum(kernels.load_counts.values()) - before)
    finally:
        ops.observers.remove(watch)
    assert loads[1:] == [0] * 19, loads
    # the test means something only if the schedules did move: some layer used a flush
    # schedule after step 0 that it had not used in step 0 (a new kernel before ABI 2)
    assert max(first_seen.values()) > 0, first_seen


def _fresh(layer, x):
    """The layer's forward from the float weights through the numpy API: no cache involved."""
    w = layer.weight.detach().numpy().copy()
    b = None if layer.bias is None else layer.bias.detach().numpy()
    return torch.from_numpy(np.ascontiguousarray(
        conv.conv2d(x.numpy(), w, b, layer.stride, layer.padding, layer.dilation)))


def test_weight_cache_is_reused_and_never_stale():
    torch.manual_seed(2)
    layer = dfp.DFPConv2d(5, 7, 3, padding=1)
    x = torch.randn(2, 5, 6, 6)
    key = id(layer.weight)
    y0 = layer(x)
    assert torch.equal(y0, _fresh(layer, x))
    cached = ops._weights[key][2]
    layer(x)
    assert ops._weights[key][2] is cached  # no update: the same packed weight is reused

    with torch.no_grad():  # in-place update outside autograd
        layer.weight.add_(0.05)
    y1 = layer(x)
    assert ops._weights[key][2] is not cached
    assert torch.equal(y1, _fresh(layer, x)) and not torch.equal(y1, y0)

    opt = torch.optim.SGD(layer.parameters(), lr=0.5)  # an optimizer step
    layer(x).square().sum().backward()
    opt.step()
    assert torch.equal(layer(x), _fresh(layer, x))

    other = dfp.DFPConv2d(5, 7, 3, padding=1)  # load_state_dict copies in place
    layer.load_state_dict(other.state_dict())
    assert torch.equal(layer(x), _fresh(layer, x))
    assert torch.equal(layer(x), other(x))

    with torch.no_grad():  # inference
        assert torch.equal(layer(x), _fresh(layer, x))

    layer.weight = nn.Parameter(torch.randn(7, 5, 3, 3))  # a new tensor
    assert torch.equal(layer(x), _fresh(layer, x))


def test_cached_weight_gives_the_uncached_bits_in_every_pass():
    torch.manual_seed(3)
    layer = dfp.DFPConv2d(6, 9, 3, stride=2, padding=1, bias=False)
    lin = dfp.DFPLinear(9 * 4 * 4, 5)
    x = torch.randn(3, 6, 8, 8, requires_grad=True)

    def run():
        out = lin(layer(x).flatten(1))
        gx, gw, gl = torch.autograd.grad(out.square().sum(), (x, layer.weight, lin.weight))
        return out, gx, gw, gl

    ops.clear_weight_cache()
    first = run()      # fills the cache
    second = run()     # every pass reads the cached weights
    ops.clear_weight_cache()
    with pytest.MonkeyPatch.context() as mp:  # and with no cache at all
        mp.setattr(ops, "_weights", _NoCache())
        third = run()
    for a, b, c in zip(first, second, third):
        assert torch.equal(a, b) and torch.equal(a, c)


class _NoCache(dict):
    def __setitem__(self, key, value):
        pass
