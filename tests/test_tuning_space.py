"""The forward / backward-data schedule space: every config of ``search_space`` on a small
shape renders, parses, verifies, compiles and is exact; exact mode gives the same bits for
every config; default configs of the ResNet-50 layers are legal on every tier."""
import warnings

import numpy as np
import pytest

import dfpgen
from dfpgen import conv, jit, reference
from dfpgen.pass_kernels import kernel_sources
from dfpgen.plan import plan_fwd
from dfpgen.plan_bwd_data import plan_bwd_data
from dfpgen.spec import ConvSpec, parse_full
from dfpgen.target import host_target
from dfpgen.tuning import TuningConfig, default_config, search_space
from conv_cases import operands

FWD = ConvSpec(1, 20, 5, 9, 40, 3, 3, padding=(1, 1))
BWD = ConvSpec(1, 20, 5, 9, 40, 3, 3, stride=(2, 2), padding=(1, 1), pass_kind="bwd_data")


def _run(spec, cfg, mode, xq, wq, dyq):
    kw = dict(stride=spec.stride, padding=spec.padding, dilation=spec.dilation, overflow=mode,
              config=cfg, return_info=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", dfpgen.OverflowWarning)
        if spec.pass_kind == "fwd":
            out, info = conv.conv2d(xq, wq, **kw)
            ref = reference.conv2d_fwd(xq, wq, None, spec.stride, spec.padding, spec.dilation,
                                       c_block=info.c_block, flush_taps=info.flush_taps,
                                       saturate=mode == "fast")
        else:
            out, info = conv.conv2d_input(spec.input_shape, wq, dyq, **kw)
            ref = reference.conv2d_bwd_data(dyq, wq, (spec.H, spec.W), spec.stride, spec.padding,
                                            spec.dilation, k_block=info.c_block,
                                            flush_taps=info.flush_taps, saturate=mode == "fast")
    return out, info, ref


@pytest.mark.parametrize("spec", [FWD, BWD], ids=["fwd", "bwd_data"])
def test_every_config_is_exact(spec):
    target = host_target()
    space = search_space(spec, target)
    assert space[0] == default_config(spec, target) and len(space) == len(set(space)) > 4
    # the 4VNNI unroll needs vpdpwssd's folded broadcast: VNNI tiers only
    assert {c.unroll for c in space} == ({"none", "4vnni"} if target.isa.vnni else {"none"})
    shape = (spec.N, spec.C, spec.H, spec.W, spec.K, spec.R, spec.S, spec.stride, spec.padding, spec.dilation)
    xq, wq, dyq = operands(shape, seed=5)
    exact_bits = None
    for cfg in space:
        for src in kernel_sources(spec, cfg, target=target, overflow="fast"):
            assert src[2].startswith(f"; {src[0]}") and "What it computes" in src[2]
        out, info, ref = _run(spec, cfg, "fast", xq, wq, dyq)
        assert info.c_block == cfg.c_block and np.array_equal(out, ref.fp32), cfg.short()
        out, info, ref = _run(spec, cfg, "exact", xq, wq, dyq)
        assert np.array_equal(out, ref.fp32) and not ref.overflowed, cfg.short()
        if exact_bits is None:
            exact_bits = out
        assert np.array_equal(out, exact_bits), f"{cfg.short()}: exact mode depends on the schedule"


def _resnet_specs():
    from pathlib import Path
    text = (Path(__file__).resolve().parents[2] / "shared/cases/resnet50_layers.txt")
    specs = []
    if text.exists():
        for line in text.read_text().splitlines():
            if line.strip() and not line.startswith("#"):
                specs.append(parse_full("n2" + line.split()[2]))
    return specs or [parse_full("n2c256h14w14k256r3s3u1p1"), parse_full("n2c3h224w224k64r7s7u2p3")]


@pytest.mark.parametrize("tier", ["avx512_vnni", "avx2"])
def test_resnet50_default_configs_are_legal_and_parse(tier):
    target = host_target(tier)
    for spec in _resnet_specs():
        for sp in (spec, spec.with_pass("bwd_data")):
            cfg = default_config(sp, target)
            for c in search_space(sp, target):
                if sp.pass_kind == "fwd":
                    plans = [plan_fwd(sp, c, target, mode="fast")[1]]
                else:
                    plans = [p for _, p in plan_bwd_data(sp, c, target, mode="fast").phases]
                assert all(p.registers_used <= target.registers for p in plans)
                if c == cfg:  # the default fills the register file reasonably
                    assert all(p.registers_used >= target.registers // 3 or p.k_vecs * p.pixels >= min(sp.Q, 7)
                               for p in plans)
            if spec.C >= 256 and spec.R == 3:  # parse + verify one big kernel per layer kind
                for _, _, ir in kernel_sources(sp, cfg, target=target, overflow="fast"):
                    jit._parse(ir, "check")


def test_register_budget_is_enforced():
    spec = ConvSpec(1, 16, 4, 30, 64, 3, 3)
    with pytest.raises(dfpgen.DfpError, match="vector registers"):
        plan_fwd(spec, TuningConfig(k_vecs=4, pixels=8), host_target("avx512_vnni"), mode="fast")
    with pytest.raises(dfpgen.DfpError, match="multiple of c_block"):
        plan_fwd(spec, TuningConfig(c_block=16, flush=24), host_target(), mode="fast")


def test_default_blocking_of_the_paper_layer():
    # AVX-512: one output-channel vector x 14 pixels (measured faster than the paper's 2 x 14);
    # AVX2 (16 registers): the budget-driven block, still the paper's chain of 16 channels.
    cfg = default_config(parse_full("n32c256h14w14k256r3s3p1"), host_target("avx512_vnni"))
    assert (cfg.k_vecs, cfg.pixels, cfg.c_block) == (1, 14, 16)
    cfg2 = default_config(parse_full("n32c256h14w14k256r3s3p1"), host_target("avx2"))
    assert cfg2.c_block == 16 and cfg2.k_vecs >= 1 and cfg2.pixels >= 3


def test_kernel_sources_name_every_phase_and_open_with_pseudo_code():
    spec = ConvSpec(1, 8, 9, 9, 16, 3, 3, stride=(2, 2), padding=(1, 1), pass_kind="bwd_data")
    srcs = kernel_sources(spec, target=host_target(), overflow="fast")
    assert len(srcs) == 4 and len({s for s, _, _ in srcs}) == 4
    for sym, plan, ir in srcs:
        assert "_ph" in sym and plan["symbol"] == sym and ir.startswith(f"; {sym}")
        assert f"define void @{sym}(" in ir and "for (tap in taps)" in ir


def test_get_kernel_builds_the_kernel_class_of_each_pass_family():
    from dfpgen import bwd_weight, fwd_family, pass_kernels, passes
    assert pass_kernels.KERNEL_CLASSES == {"fwd_family": fwd_family.ConvKernel,
                                           "bwd_weight": bwd_weight.BwdWeightKernel}
    cfg = TuningConfig(k_vecs=1, pixels=4, c_block=8)
    for p, tag in (("fwd", "_fwd_"), ("bwd_data", "_bwd_data_"), ("bwd_weight", "_bwdw_")):
        spec = ConvSpec(1, 4, 5, 5, 4, 3, 3, pass_kind=p)
        k = pass_kernels.get_kernel(spec, cfg.replace(flush=8) if p == "bwd_weight" else cfg, overflow="exact")
        assert isinstance(k, pass_kernels.KERNEL_CLASSES[passes.get(p).family]), p
        assert k.spec == spec and k.mode == "exact" and all(tag in s for s in k.symbols)
    with pytest.raises(dfpgen.DfpError, match="overflow"):
        pass_kernels.get_kernel(spec, overflow="sometimes")
    with pytest.raises(dfpgen.DfpError, match="pass must be one of"):
        passes.get("bwd_input")
    # options are the pass family's, normalised: the defaults spelt out give the same object
    fwd_spec = ConvSpec(1, 4, 5, 5, 4, 3, 3)
    assert pass_kernels.get_kernel(fwd_spec, cfg) is pass_kernels.get_kernel(fwd_spec, cfg, bias=0, fma=True)
    with pytest.raises(dfpgen.DfpError, match="bias is not an option of a bwd_weight kernel"):
        pass_kernels.get_kernel(spec, cfg.replace(flush=8), bias=True)
    with pytest.raises(dfpgen.DfpError, match="scaled is not an option of a fwd kernel"):
        pass_kernels.get_kernel(fwd_spec, cfg, scaled=True)