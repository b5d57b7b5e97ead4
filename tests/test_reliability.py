"""Bad input and odd settings, tried as a user would: every environment variable against its
range, assembly of tiers the host lacks, models cast to bf16 / fp16 after ``convert``, the
non-finite policy under ``torch.compile``, layers ``convert`` leaves in FP32, a thread race on
the ISA notice, an unusable cache directory in ``dfpgen info``, and magnitudes below the
exponent range."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dfpgen
import dfpgen.runtime as dfp
from dfpgen import DfpError, UnderflowWarning
from dfpgen.runtime import nonfinite

ROOT = Path(__file__).resolve().parents[1]
ENV_VARS = ("DFPGEN_CACHE", "DFPGEN_CACHE_DIR", "DFPGEN_ISA", "DFPGEN_NUM_THREADS",
            "DFPGEN_VERBOSE", "DFPGEN_DISABLE", "DFPGEN_TUNE_CORRUPT")


def cli(cache_dir: Path, *args: str, env: dict | None = None, timeout: float = 180):
    e = {k: v for k, v in os.environ.items() if k not in ENV_VARS}
    e.update({"DFPGEN_CACHE_DIR": str(cache_dir), "DFPGEN_NUM_THREADS": "1", **(env or {})})
    return subprocess.run([sys.executable, "-m", "dfpgen.cli", *args], cwd=ROOT, env=e,
                          capture_output=True, text=True, timeout=timeout)


def error_line(r: subprocess.CompletedProcess) -> str:
    """The one error line of a failed command (the ISA tier notice may precede it)."""
    assert r.returncode == 2, (r.returncode, r.stderr)
    assert "Traceback" not in r.stderr and r.stdout == ""
    lines = [ln for ln in r.stderr.strip().splitlines() if not ln.startswith("dfpgen: ISA tier")]
    assert len(lines) == 1 and lines[0].startswith("dfpgen: error:"), r.stderr
    return lines[0]


def _cpus() -> int:
    return len(os.sched_getaffinity(0))


# --- 1. assembly of an ISA tier this host lacks -------------------------------------------


@pytest.mark.parametrize("pass_kind", ["fwd", "bwd_data", "bwd_weight"])
@pytest.mark.parametrize("tier, insn, reg", [("avx512_vnni", "vpdpwssd", "zmm"),
                                             ("vnni256", "vpdpwssd", "ymm"),
                                             ("avx2", "vpmaddwd", "ymm")])
def test_show_asm_of_every_tier_works_on_any_host(tmp_path, tier, insn, reg, pass_kind):
    # LLVM used to abort the process (exit 134, "Cannot select: X86ISD::VPDPWSSD") when the
    # host CPU lacked the forced tier: the code is now compiled for a CPU that has it.
    r = cli(tmp_path, "show", "--layer", "3x3x64", "--pass", pass_kind, "--asm",
            env={"DFPGEN_ISA": tier})
    assert r.returncode == 0, r.stderr[-2000:]
    assert insn in r.stdout and reg in r.stdout
    if tier == "avx512_vnni":
        assert "zmm" in r.stdout


def test_fast_mode_asm_of_a_vnni_tier_uses_the_saturating_instruction(tmp_path):
    r = cli(tmp_path, "show", "--layer", "3x3x64", "--asm", "--overflow", "fast",
            env={"DFPGEN_ISA": "avx512_vnni"})
    assert r.returncode == 0, r.stderr[-2000:]
    assert "vpdpwssds" in r.stdout


@pytest.mark.parametrize("tier", ["avx512_vnni", "vnni256"])
def test_a_vnni_tier_runs_where_the_host_has_it_and_is_refused_elsewhere(tier):
    from dfpgen.target import host_target
    t = host_target(tier)
    x = np.random.default_rng(0).standard_normal((1, 4, 5, 5)).astype(np.float32)
    w = np.random.default_rng(1).standard_normal((4, 4, 3, 3)).astype(np.float32)
    if t.executable:
        # exact mode gives the same bits on every tier: the portable tier is the reference
        y = dfpgen.conv2d(x, w, padding=1, target=tier)
        assert np.array_equal(y, dfpgen.conv2d(x, w, padding=1, target="generic"))
        return
    assert t.compile_cpu != t.cpu  # compiled for a CPU that has the tier, never loaded here
    with pytest.raises(DfpError, match=f"ISA tier '{tier}'.*cannot run on this CPU"):
        dfpgen.conv2d(x, w, padding=1, target=tier)


def test_the_host_tier_still_compiles_for_the_host_or_its_baseline():
    from dfpgen.target import host_target
    t = host_target()
    if t.tier in ("avx512_vnni", "vnni256"):
        assert t.compile_cpu == t.cpu
    else:
        assert t.compile_cpu in ("x86-64-v3", "x86-64-v2", t.cpu)


# --- 2. environment variables, validated like their API twins ---------------------------


@pytest.mark.parametrize("value", ["-3", "-1", "abc", "1.5", "2 threads", "0x4"])
def test_a_bad_thread_count_variable_is_an_error_naming_it(monkeypatch, value):
    from dfpgen.threads import num_threads
    monkeypatch.setenv("DFPGEN_NUM_THREADS", value)
    with pytest.raises(DfpError, match=r"\$DFPGEN_NUM_THREADS must be a thread count"):
        num_threads()


@pytest.mark.parametrize("value", ["0", "", "  ", " 0 "])
def test_thread_count_variable_zero_or_empty_means_the_default(monkeypatch, value):
    # As the API: threads=0 is the default (the CPUs this process may use), never 1.
    from dfpgen.threads import num_threads
    monkeypatch.setenv("DFPGEN_NUM_THREADS", value)
    assert num_threads() == _cpus()
    monkeypatch.setenv("DFPGEN_NUM_THREADS", " 2 ")
    assert num_threads() == 2


def test_set_num_threads_takes_what_the_variable_takes():
    from dfpgen.threads import num_threads, set_num_threads
    try:
        set_num_threads(0)
        assert num_threads() == _cpus()
        set_num_threads(3)
        assert num_threads() == 3
        for bad in (-1, 2.5, "2", True):
            with pytest.raises(DfpError, match="thread count must be an integer >= 0"):
                set_num_threads(bad)
        assert num_threads() == 3  # a rejected value changes nothing
    finally:
        set_num_threads(None)


@pytest.mark.parametrize("value", ["-3", "0"])
def test_cli_thread_count_variable(tmp_path, value):
    r = cli(tmp_path, "info", "--json", env={"DFPGEN_NUM_THREADS": value})
    if value == "0":
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout)["threads"] == _cpus()
    else:
        assert "DFPGEN_NUM_THREADS" in error_line(r) and "'-3'" in error_line(r)


@pytest.mark.parametrize("var, read", [
    ("DFPGEN_CACHE", lambda: dfpgen.cache.disk_enabled()),
    ("DFPGEN_VERBOSE", lambda: dfpgen.kernels.verbose()),
    ("DFPGEN_DISABLE", lambda: not dfp.is_enabled()),
])
def test_boolean_variables_take_the_same_words_and_reject_others(monkeypatch, var, read):
    import dfpgen.cache
    import dfpgen.kernels
    default = {"DFPGEN_CACHE": True, "DFPGEN_VERBOSE": False, "DFPGEN_DISABLE": False}[var]
    monkeypatch.delenv(var, raising=False)
    assert read() is default
    for value, want in [("", default), (" ", default), ("1", True), ("on", True), ("YES", True),
                        ("true", True), ("0", False), ("off", False), ("No", False),
                        ("false", False), (" 1 ", True)]:
        monkeypatch.setenv(var, value)
        assert read() is want, (var, value)
    for value in ("maybe", "2", "enabled", "-1"):
        monkeypatch.setenv(var, value)
        with pytest.raises(DfpError, match=rf"\${var} must be one of 1/on/yes/true or 0/off/no/false, got '{value}'"):
            read()


def test_isa_variable_is_validated_and_named(monkeypatch):
    from dfpgen.target import host_target
    monkeypatch.setenv("DFPGEN_ISA", "avx9")
    with pytest.raises(DfpError, match=r"\$DFPGEN_ISA must be one of avx512_vnni, vnni256, avx2, generic, got 'avx9'"):
        host_target()
    monkeypatch.setenv("DFPGEN_ISA", " Generic ")
    assert host_target().tier == "generic" and host_target().forced
    monkeypatch.setenv("DFPGEN_ISA", "")
    assert not host_target().forced


def test_empty_cache_dir_variable_means_the_default(monkeypatch):
    from dfpgen import cache
    monkeypatch.delenv("DFPGEN_CACHE_DIR", raising=False)
    default = cache.cache_dir()
    for value in ("", "   "):
        monkeypatch.setenv("DFPGEN_CACHE_DIR", value)
        assert cache.cache_dir() == default  # not the current directory


@pytest.mark.parametrize("var, value", [("DFPGEN_CACHE", "maybe"), ("DFPGEN_ISA", "avx9"),
                                        ("DFPGEN_NUM_THREADS", "-3")])
def test_cli_names_a_bad_variable_in_one_line(tmp_path, var, value):
    line = error_line(cli(tmp_path, "show", "--layer", "n1c3h5w5k2r3s3", "--plan", env={var: value}))
    assert f"${var}" in line and repr(value) in line


# --- 3. a model cast to bf16 / fp16 after convert ---------------------------------------


class ConvBnNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8 * 6 * 6, 5)

    def forward(self, x):
        return self.fc(F.relu(self.bn(self.conv(x))).flatten(1))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_model_cast_after_convert_runs_in_its_dtype_forward_and_backward(dtype):
    # The DFP layers returned float32, so the next bf16 BatchNorm raised "mixed dtype (CPU)".
    torch.manual_seed(0)
    ref = ConvBnNet()
    model = ConvBnNet()
    model.load_state_dict(ref.state_dict())
    dfp.convert(model)
    model.to(dtype)
    x = torch.randn(4, 3, 6, 6).to(dtype).requires_grad_()
    y = model(x)
    assert y.dtype == dtype
    assert model.conv(x).dtype == dtype
    y.float().square().sum().backward()
    assert x.grad is not None and x.grad.dtype == dtype
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.dtype == dtype, name
    # The same computation in float32 from the same (rounded) values: DFP16 and the dtype's
    # rounding of activations and outputs are the only differences.
    ref.load_state_dict({k: v.float() for k, v in model.state_dict().items()})
    x32 = x.detach().float().requires_grad_()
    y32 = ref(x32)
    y32.square().sum().backward()
    assert (y.float() - y32).abs().max() <= 0.05 * y32.abs().max()
    assert (x.grad.float() - x32.grad).abs().max() <= 0.05 * x32.grad.abs().max()
    gw, gw32 = model.conv.weight.grad.float(), ref.conv.weight.grad
    assert (gw - gw32).abs().max() <= 0.05 * gw32.abs().max()


def test_float32_layers_still_return_float32():
    layer = dfp.DFPConv2d(3, 4, 3)
    assert layer(torch.randn(1, 3, 5, 5)).dtype == torch.float32


# --- 4. non-finite policy "skip" under torch.compile ------------------------------------


class SmallNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1)
        self.fc = nn.Linear(6 * 4 * 4, 4)

    def forward(self, x):
        return self.fc(F.relu(self.conv1(x)).flatten(1))


@pytest.fixture
def skip_policy():
    dfp.set_nonfinite_policy("skip")
    nonfinite.clear_events()
    yield
    dfp.set_nonfinite_policy("raise")
    nonfinite.clear_events()


@pytest.mark.parametrize("compiled", [False, True])
def test_skip_policy_works_eager_and_compiled(skip_policy, compiled):
    # Under torch.compile a NaN raised a DfpError without a layer name instead of skipping.
    torch.manual_seed(0)
    model = dfp.convert(SmallNet())
    run = torch.compile(model) if compiled else model
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.randn(2, 3, 4, 4)
    run(x).sum().backward()
    assert dfp.step_if_finite(opt) is True
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt.zero_grad()
    x[0, 0, 0, 0] = float("nan")
    run(x).sum().backward()
    assert ("conv1", "fwd") in [(e.layer, e.pass_kind) for e in dfp.nonfinite_events()]
    with pytest.warns(dfp.NonfiniteStepWarning, match="conv1 fwd"):
        assert dfp.step_if_finite(opt) is False
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    # a NaN arriving as dY is skipped as well
    opt.zero_grad()
    y = run(torch.randn(2, 3, 4, 4))
    g = torch.ones_like(y)
    g[1, 2] = float("nan")
    y.backward(g)
    assert ("fc", "bwd_data/bwd_weight") in [(e.layer, e.pass_kind) for e in dfp.nonfinite_events()]
    with pytest.warns(dfp.NonfiniteStepWarning, match="fc bwd_data/bwd_weight"):
        assert dfp.step_if_finite(opt) is False


# --- 6. layers convert leaves in FP32 are named, once -----------------------------------


class MyConv(nn.Conv2d):
    """A library's own conv class (as EfficientNet's depthwise conv): its forward may differ."""

    def forward(self, x):
        return super().forward(x) * 2


class Mixed(nn.Module):
    def __init__(self):
        super().__init__()
        self.plain = nn.Conv2d(4, 4, 3, padding=1)
        self.mine = MyConv(4, 4, 1)
        self.dw = nn.Conv2d(4, 4, 3, padding=1, groups=4)
        self.skipped = MyConv(4, 4, 1)
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        x = self.skipped(self.dw(self.mine(self.plain(x))))
        return self.head(x.mean((2, 3)))


def _fallback_warnings(fn):
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        out = fn()
    return out, [str(x.message) for x in w if issubclass(x.category, dfp.DfpFallbackWarning)]


def test_convert_names_every_layer_it_leaves_in_fp32_once():
    model = Mixed()
    x = torch.randn(2, 4, 5, 5)
    _, msgs = _fallback_warnings(lambda: dfp.convert(model, skip=["skipped"]))
    assert len(msgs) == 1, msgs
    msg = msgs[0]
    assert "2 layer(s)" in msg
    assert "'mine'" in msg and "MyConv is a subclass of nn.Conv2d" in msg
    assert "'dw'" in msg and "groups=4" in msg
    assert "'plain'" not in msg and "'skipped'" not in msg and "'head'" not in msg
    assert type(model.plain) is dfp.DFPConv2d and type(model.mine) is MyConv
    # the calls do not repeat what convert said
    _, again = _fallback_warnings(lambda: (model(x), model(x)))
    assert again == []


def test_convert_of_a_model_it_fully_covers_is_silent():
    _, msgs = _fallback_warnings(lambda: dfp.convert(SmallNet()))
    assert msgs == []


# --- 7. the ISA notice, the cache in `dfpgen info`, magnitudes below the exponent range --


def test_isa_notice_is_printed_once_when_threads_race_to_the_first_call():
    code = textwrap.dedent("""
        import sys, threading, time
        class Slow:  # a slow stderr widens the race window to certainty
            def __init__(self, s): self.s = s
            def write(self, t): time.sleep(0.05); return self.s.write(t)
            def flush(self): self.s.flush()
        sys.stderr = Slow(sys.stderr)
        from dfpgen.target import host_target
        barrier = threading.Barrier(8)
        def go():
            barrier.wait(); host_target()
        ts = [threading.Thread(target=go) for _ in range(8)]
        [t.start() for t in ts]; [t.join() for t in ts]
    """)
    env = {k: v for k, v in os.environ.items() if k not in ENV_VARS}
    env["DFPGEN_ISA"] = "generic"
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stderr.count("dfpgen: ISA tier generic (forced by DFPGEN_ISA)") == 1, r.stderr


def test_info_reports_an_unusable_cache_directory_as_not_enabled(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    r = cli(blocker / "cache", "info", "--json")
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["cache_enabled"] is False
    assert "not usable" in info["cache_note"] and "memory" in info["cache_note"]
    ok = json.loads(cli(tmp_path / "cache", "info", "--json").stdout)
    assert ok["cache_enabled"] is True and "cache_note" not in ok
    off = json.loads(cli(tmp_path / "cache", "info", "--json", env={"DFPGEN_CACHE": "0"}).stdout)
    assert off["cache_enabled"] is False and "DFPGEN_CACHE" in off["cache_note"]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_magnitudes_below_the_exponent_range_warn(dtype):
    from dfpgen.pack import quantize_pack
    tiny = np.full((1, 2, 3, 3), 1e-40, dtype)
    with pytest.warns(UnderflowWarning, match=r"tiny X: max \|x\| < 2\*\*-114 .* clamped at -128"):
        q = dfpgen.quantize(tiny, name="tiny X")
    assert q.exponent == -128 and not q.mantissa.any()  # what the warning says
    if dtype == np.float32:
        with pytest.warns(UnderflowWarning, match="packed X"):
            qp = quantize_pack(tiny, name="packed X")
        assert qp.exponent == -128
    # the edge: 2**-114 still has all 15 bits, just below it does not
    with warnings.catch_warnings():
        warnings.simplefilter("error", UnderflowWarning)
        q = dfpgen.quantize(np.array([2.0 ** -114], np.float64))
        assert q.exponent == -128 and q.mantissa[0] == 2 ** 14
        dfpgen.quantize(np.zeros(3, np.float32))  # all-zero: no warning
    with pytest.warns(UnderflowWarning):
        q = dfpgen.quantize(np.array([2.0 ** -115], np.float64))
    assert q.mantissa[0] == 2 ** 13  # one bit lost, as warned


# --- 5. fast mode: a lane that saturates and is pulled back is still reported ------------

from dfpgen import conv, reference  # noqa: E402
from dfpgen.target import TIERS, host_target  # noqa: E402
from dfpgen.tuning import TuningConfig  # noqa: E402

RUNNABLE = [t for t in TIERS if host_target(t).executable]


def _pull_back_operands():
    # C = 4 (two pairs) x 2 taps, all mantissas at 32767: the first tap adds 2 * 2 * 32767**2
    # (clips at INT32_MAX), the second subtracts as much; the true partial is 0.
    x = np.full((1, 4, 1, 2), 32767, np.int16)
    w = np.zeros((1, 4, 1, 2), np.int16)
    w[:, :, 0, 0], w[:, :, 0, 1] = 32767, -32767
    return dfpgen.DfpTensor(x, -10), dfpgen.DfpTensor(w, -10)


@pytest.mark.parametrize("tier", RUNNABLE)
def test_fast_mode_reports_a_lane_saturated_then_pulled_back(tier):
    xq, wq = _pull_back_operands()
    cfg = TuningConfig(k_vecs=1, pixels=1, c_block=4, flush=8)
    with pytest.warns(dfpgen.OverflowWarning, match="up to 1 output partials"):
        y, info = conv.conv2d(xq, wq, overflow="fast", config=cfg, target=tier, return_info=True)
    ref = reference.conv2d_fwd(xq, wq, None, (1, 1), (0, 0), (1, 1), c_block=info.c_block,
                               flush_taps=info.flush_taps, saturate=True)
    assert np.array_equal(y, ref.fp32)  # still bit-exact with the saturating reference
    assert y.ravel()[0] != 0 and ref.exact.ravel()[0] == 0  # ...which is wrong
    assert info.saturated == ref.saturated == 0  # invisible at the flush
    assert ref.clipped == 1 and info.possibly_saturated >= 1  # but reported


def _relu_signed(shape, seed):
    """Post-ReLU activations x signed weights at full DFP16 scale (the case fast mode
    undercounted on): many X mantissas near 2**15, half of them zero."""
    n, c, h, w, k, r, s = shape
    rng = np.random.default_rng(seed)
    x = np.maximum(rng.standard_normal((n, c, h, w)), 0).astype(np.float32) ** 0.25
    wt = rng.standard_normal((k, c, r, s)).astype(np.float32)
    return dfpgen.quantize(x), dfpgen.quantize(wt)


@pytest.mark.parametrize("tier", RUNNABLE)
@pytest.mark.parametrize("pass_kind", ["fwd", "bwd_data"])
def test_fast_mode_bound_covers_every_clipped_partial(tier, pass_kind):
    shape = (2, 64, 6, 6, 32, 3, 3)
    xq, wq = _relu_signed(shape, seed=11)
    cfg = TuningConfig(k_vecs=1, pixels=6, c_block=64, flush=64 * 9)  # long chains: clips
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", dfpgen.OverflowWarning)
        if pass_kind == "fwd":
            y, info = conv.conv2d(xq, wq, padding=1, overflow="fast", config=cfg, target=tier,
                                  return_info=True)
            ref = reference.conv2d_fwd(xq, wq, None, (1, 1), (1, 1), (1, 1), c_block=info.c_block,
                                       flush_taps=info.flush_taps, saturate=True)
        else:
            dyq = dfpgen.quantize(np.abs(np.random.default_rng(3).standard_normal(
                (2, 32, 6, 6))).astype(np.float32) ** 0.25)
            y, info = conv.conv2d_input((2, 64, 6, 6), wq, dyq, 1, 1, 1, overflow="fast",
                                        config=cfg, target=tier, return_info=True)
            ref = reference.conv2d_bwd_data(dyq, wq, (6, 6), (1, 1), (1, 1), (1, 1),
                                            k_block=info.c_block, flush_taps=info.flush_taps,
                                            saturate=True)
    assert np.array_equal(y, ref.fp32)
    assert ref.clipped > ref.saturated  # the blind spot is real on this data
    assert info.saturated == ref.saturated
    assert ref.clipped <= info.possibly_saturated <= y.size * ref.partials


@pytest.mark.parametrize("tier", RUNNABLE)
def test_fast_mode_without_clipping_reports_zero_and_is_the_unsaturated_result(tier):
    shape = (1, 16, 5, 5, 16, 3, 3)
    xq, wq = _relu_signed(shape, seed=2)
    small = dfpgen.DfpTensor((xq.mantissa // 64).astype(np.int16), xq.exponent)
    with warnings.catch_warnings():
        warnings.simplefilter("error", dfpgen.OverflowWarning)
        y, info = conv.conv2d(small, wq, padding=1, overflow="fast", target=tier, return_info=True)
    assert info.saturated == info.possibly_saturated == 0
    ref = reference.conv2d_fwd(small, wq, None, (1, 1), (1, 1), (1, 1), c_block=info.c_block,
                               flush_taps=info.flush_taps, saturate=False)
    assert not ref.overflowed and np.array_equal(y, ref.fp32)


def test_exact_mode_reports_no_possible_saturation():
    xq, wq = _relu_signed((1, 16, 5, 5, 16, 3, 3), seed=2)
    _, info = conv.conv2d(xq, wq, padding=1, overflow="exact", return_info=True)
    assert info.saturated == info.possibly_saturated == 0


# --- the rest of the surface, tried as a user would --------------------------------------


@pytest.mark.parametrize("args, flag", [
    (["tune", "--model", "resnet50", "--batch", "0"], "--batch"),  # used to tune batch 32
    (["show", "--layer", "3x3x64", "--batch", "-1", "--plan"], "--batch"),
    (["show", "--layer", "3x3x64", "--k", "0", "--plan"], "--k"),
    (["show", "--layer", "3x3x64", "--stride", "x", "--plan"], "--stride"),
    (["show", "--layer", "3x3x64", "--pad", "-1", "--plan"], "--pad"),
    (["bench", "--layer", "n1c3h5w5k2r3s3", "--repeats", "0"], "--repeats"),
])
def test_cli_integer_flags_are_checked_against_their_range(tmp_path, args, flag):
    line = error_line(cli(tmp_path, *args, timeout=60))
    assert f"argument {flag}: expected an integer >=" in line


def test_cli_config_field_given_twice_is_an_error(tmp_path):
    # the last one used to win silently
    line = error_line(cli(tmp_path, "show", "--layer", "n1c3h5w5k2r3s3", "--config", "k_vecs=2,k_vecs=3"))
    assert "k_vecs is given twice" in line


def test_forced_exponent_must_be_an_integer():
    x = np.ones(3, np.float32)
    with pytest.raises(DfpError, match="forced exponent must be an integer, got 1.5"):
        dfpgen.quantize(x, exponent=1.5)  # used to truncate to 1
    assert dfpgen.quantize(x, exponent=np.int8(-3)).exponent == -3


def test_numpy_api_names_an_operand_it_cannot_read():
    x = torch.randn(1, 2, 4, 4, requires_grad=True)
    with pytest.raises(DfpError, match="conv2d input X: cannot read Tensor as a numpy array"):
        dfpgen.conv2d(x, np.ones((2, 2, 3, 3), np.float32))
    with pytest.raises(DfpError, match="conv2d weight W: cannot read"):
        dfpgen.conv2d(np.ones((1, 2, 4, 4), np.float32), torch.ones(2, 2, 3, 3, requires_grad=True))


@pytest.mark.parametrize("dtype", [torch.float64, torch.int32])
def test_runtime_functionals_refuse_dtypes_they_do_not_compute_in(dtype):
    # float64 used to come back float32 (silently less precise), int32 as float32 results
    x = torch.ones(1, 4, 5, 5, dtype=dtype)
    with pytest.raises(DfpError, match=f"conv2d input x has dtype {dtype}"):
        dfp.conv2d(x, torch.randn(3, 4, 3, 3))
    with pytest.raises(DfpError, match=f"linear weight has dtype {dtype}"):
        dfp.linear(torch.randn(2, 4), torch.ones(3, 4, dtype=dtype))


@pytest.mark.parametrize("threads", [-1, "2", 1.5, True])
def test_runtime_thread_counts_are_checked_like_the_numpy_api(threads):
    # -1 used to mean the default silently; "2" was int()-ed
    with pytest.raises(DfpError, match="threads must be an int >= 0"):
        dfp.conv2d(torch.randn(1, 4, 5, 5), torch.randn(3, 4, 3, 3), threads=threads)
    with pytest.raises(DfpError, match="threads must be an int >= 0"):
        dfp.DFPConv2d(4, 3, 3, threads=threads)
    with pytest.raises(DfpError, match="threads must be an int >= 0"):
        dfp.convert(nn.Sequential(nn.Conv2d(1, 1, 1)), threads=threads)


def test_a_bogus_tuner_test_hook_is_a_one_line_error_not_a_silent_no_op(tmp_path):
    line = error_line(cli(tmp_path, "tune", "--layer", "n1c3h5w5k2r3s3", "--budget", "1",
                          env={"DFPGEN_TUNE_CORRUPT": "kb2-wb6"}))
    assert "$DFPGEN_TUNE_CORRUPT" in line and "'kb2-wb6'" in line
