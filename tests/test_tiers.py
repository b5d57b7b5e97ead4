"""Every ISA tier the host can execute gives the same bits (exact and fast mode) for the
forward and backward-data kernels, and the generic tier's IR uses no x86 intrinsics."""
import warnings

import numpy as np
import pytest

import dfpgen
from dfpgen import conv, pass_kernels
from dfpgen.target import TIERS, host_target
from conv_cases import operands

SHAPE = (2, 7, 6, 9, 19, 3, 3, 2, 1, 1)   # odd C and K, stride 2 (4 backward-data phases)
RUNNABLE = [t for t in TIERS if host_target(t).executable]


def _both(tier, mode, adversarial=False):
    n, c, h, w, k, r, s, u, p, d = SHAPE
    xq, wq, dyq = operands(SHAPE, seed=3, adversarial=adversarial)
    t = host_target(tier)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", dfpgen.OverflowWarning)
        y, yi = conv.conv2d(xq, wq, None, u, p, d, overflow=mode, target=t, return_info=True)
        dx, di = conv.conv2d_input((n, c, h, w), wq, dyq, u, p, d, overflow=mode, target=t, return_info=True)
    assert yi.tier == di.tier == tier
    return y, dx, yi, di


@pytest.mark.parametrize("mode", ["exact", "fast"])
@pytest.mark.parametrize("tier", RUNNABLE)
def test_tier_gives_the_same_bits(tier, mode):
    base_y, base_dx, _, _ = _both(RUNNABLE[0], mode)
    y, dx, yi, di = _both(tier, mode)
    assert np.array_equal(y, base_y) and np.array_equal(dx, base_dx)
    assert yi.symbol.count(tier) == 1


@pytest.mark.parametrize("tier", RUNNABLE)
def test_tier_saturates_like_vpdpwssds(tier):
    base = _both(RUNNABLE[0], "fast", adversarial=True)
    got = _both(tier, "fast", adversarial=True)
    assert got[2].saturated == base[2].saturated > 0
    assert got[3].saturated == base[3].saturated > 0
    assert np.array_equal(got[0], base[0]) and np.array_equal(got[1], base[1])


@pytest.mark.parametrize("tier", TIERS)
@pytest.mark.parametrize("mode", ["exact", "fast"])
def test_every_tier_renders_with_its_instructions(tier, mode):
    spec = dfpgen.ConvSpec(1, 8, 5, 5, 16, 3, 3, padding=(1, 1))
    ir = pass_kernels.kernel_sources(spec, target=host_target(tier), overflow=mode)[0][2]
    want = {"avx512_vnni": "vpdpwssd", "vnni256": "vpdpwssd", "avx2": "pmadd.wd", "generic": "shufflevector"}[tier]
    assert want in ir
    if tier == "generic":
        assert "llvm.x86" not in ir
    if mode == "fast" and tier in ("avx512_vnni", "vnni256"):
        assert "vpdpwssds" in ir
    if tier in ("avx512_vnni", "vnni256"):
        assert f".{host_target(tier).lanes * 32}(" in ir


def test_host_runs_at_least_two_tiers():
    assert "generic" in RUNNABLE and len(RUNNABLE) >= 2
