"""Bad input and faults: NaN/Inf (raise naming layer and pass, or skip the step), zero
gradients, N=1, huge and tiny magnitudes, unusable / corrupt cache directories, two processes
building the same kernels, and a CPU without VNNI (forced ISA tier)."""
import json
import os
import subprocess
import sys
import textwrap
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dfpgen
import dfpgen.runtime as dfp
from dfpgen import DfpError
from dfpgen.dfp import DfpFormat
from dfpgen.runtime import nonfinite


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1)
        self.conv2 = nn.Conv2d(6, 6, 3, stride=2, padding=1, bias=False)
        self.fc = nn.Linear(6 * 3 * 3, 4)

    def forward(self, x):
        return self.fc(F.relu(self.conv2(F.relu(self.conv1(x)))).flatten(1))


def _net():
    torch.manual_seed(0)
    return dfp.convert(Net(), overflow="exact")


def _x(n=3):
    return torch.randn(n, 3, 6, 6, generator=torch.Generator().manual_seed(7))


@pytest.fixture
def skip_policy():
    dfp.set_nonfinite_policy("skip")
    nonfinite.clear_events()
    yield
    dfp.set_nonfinite_policy("raise")
    nonfinite.clear_events()


# --- NaN / Inf ------------------------------------------------------------------------


def test_nan_activation_names_layer_and_pass():
    x = _x()
    x[1, 2, 3, 4] = float("nan")
    with pytest.raises(DfpError, match=r"layer 'conv1' fwd: conv2d input X: .*1 NaN"):
        _net()(x)


def test_inf_weight_names_layer_and_pass():
    model = _net()
    with torch.no_grad():
        model.conv2.weight[0, 0, 0, 0] = float("inf")
    with pytest.raises(DfpError, match=r"layer 'conv2' fwd: conv2d weight W: .*1 Inf"):
        model(_x())


def test_nonfinite_gradient_names_layer_and_backward_passes():
    model = _net()
    y = model(_x())
    g = torch.zeros_like(y)
    g[0, 1] = float("nan")
    with pytest.raises(DfpError, match=r"layer 'fc' bwd_data/bwd_weight: grad_output dY .*1 NaN"):
        y.backward(g)


def test_unknown_policy_is_an_error():
    with pytest.raises(DfpError, match="non-finite policy"):
        dfp.set_nonfinite_policy("ignore")


def test_skip_policy_skips_the_step_and_reports_it(skip_policy):
    model = _net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = _x()
    x[0, 0, 0, 0] = float("inf")
    loss = model(x).sum()
    loss.backward()
    events = dfp.nonfinite_events()
    assert [(e.layer, e.pass_kind) for e in events][0] == ("conv1", "fwd")
    with pytest.warns(dfp.NonfiniteStepWarning, match="conv1 fwd"):
        assert dfp.step_if_finite(opt) is False
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert all(p.grad is None or not p.grad.any() for p in model.parameters())
    assert dfp.nonfinite_events() == []
    # A finite step afterwards runs normally.
    opt.zero_grad()
    model(_x()).sum().backward()
    assert dfp.step_if_finite(opt) is True
    assert not torch.equal(model.conv1.weight, before["conv1.weight"])


def test_skip_policy_zeros_gradients_of_a_nonfinite_dy(skip_policy):
    model = _net()
    y = model(_x())
    g = torch.ones_like(y)
    g[2, 3] = float("-inf")
    y.backward(g)
    events = dfp.nonfinite_events()
    assert ("fc", "bwd_data/bwd_weight") in [(e.layer, e.pass_kind) for e in events]
    assert "1 Inf" in events[0].detail
    for p in model.parameters():
        assert torch.equal(p.grad, torch.zeros_like(p))


# --- zero gradients, N=1, magnitudes ---------------------------------------------------


def test_zero_gradients_give_zero_weight_and_input_gradients():
    model = _net()
    x = _x().requires_grad_()
    y = model(x)
    y.backward(torch.zeros_like(y))
    assert torch.equal(x.grad, torch.zeros_like(x))
    for p in model.parameters():
        assert torch.equal(p.grad, torch.zeros_like(p))


@pytest.mark.parametrize("unbatched", [False, True])
def test_batch_of_one(unbatched):
    torch.manual_seed(1)
    conv = dfp.DFPConv2d(3, 5, 3, padding=1, overflow="exact")
    ref = nn.Conv2d(3, 5, 3, padding=1)
    ref.load_state_dict(conv.state_dict())
    x = _x(1)[0] if unbatched else _x(1)
    xd, xr = x.clone().requires_grad_(), x.clone().requires_grad_()
    yd, yr = conv(xd), ref(xr)
    assert yd.shape == yr.shape
    g = torch.randn(yr.shape, generator=torch.Generator().manual_seed(3))
    yd.backward(g)
    yr.backward(g)
    for a, b in ((yd, yr), (xd.grad, xr.grad), (conv.weight.grad, ref.weight.grad)):
        assert (a - b).norm() / b.norm() < 1e-3


@pytest.mark.parametrize("scale_exp", [100, -100])
def test_power_of_two_scaling_is_exact(scale_exp):
    # The shared exponent absorbs a power-of-two scale: the same mantissas, scaled outputs.
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 4, 6, 6)).astype(np.float32)
    w = rng.standard_normal((5, 4, 3, 3)).astype(np.float32)
    s = np.float32(2.0 ** scale_exp)
    y = dfpgen.conv2d(x, w, padding=1, overflow="exact")
    ys = dfpgen.conv2d(x * s, w, padding=1, overflow="exact")
    assert np.array_equal(ys, y * s)
    dw = dfpgen.conv2d_weight(x, w.shape, y, padding=1, overflow="exact")
    dws = dfpgen.conv2d_weight(x * s, w.shape, y, padding=1, overflow="exact")
    assert np.array_equal(dws, dw * s)


@pytest.mark.parametrize("scale", [1e30, 1e-30])
def test_very_large_and_very_small_magnitudes_train(scale):
    # Inputs scaled by 1e30 / 1e-30 and the loss gradient by the inverse, so that every FP32
    # result (Y ~ scale, dX ~ 1/scale, dW ~ 1) is representable: DFP16 must match FP32.
    model = _net()
    x = (_x() * scale).requires_grad_()
    y = model(x)
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(4)) / scale
    y.backward(g)
    ref = Net()
    ref.load_state_dict(model.state_dict())
    xr = x.detach().clone().requires_grad_()
    yr = ref(xr)
    yr.backward(g)
    for a, b in ((y, yr), (x.grad, xr.grad), (model.conv1.weight.grad, ref.conv1.weight.grad)):
        assert torch.isfinite(a).all()
        assert (a.double() - b.double()).norm() / b.double().norm() < 1e-3


# --- cache faults, concurrency, ISA override (fresh processes) --------------------------

CHILD = textwrap.dedent('''
    import errno, json, os, sys, tempfile, warnings
    import numpy as np
    mode, out = sys.argv[1], sys.argv[2]
    root = os.path.realpath(os.environ.get("DFPGEN_CACHE_DIR", "/nonexistent"))

    def under(p):
        try:
            return os.path.realpath(os.fspath(p)).startswith(root)
        except TypeError:
            return False

    if mode == "readonly":   # every create/open-for-write under the cache dir: EROFS
        real_open, real_mkdir = os.open, os.mkdir
        def ro_open(path, flags, *a, **k):
            if under(path) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
                raise OSError(errno.EROFS, "Read-only file system", path)
            return real_open(path, flags, *a, **k)
        def ro_mkdir(path, *a, **k):
            if under(path):
                raise OSError(errno.EROFS, "Read-only file system", path)
            return real_mkdir(path, *a, **k)
        os.open, os.mkdir = ro_open, ro_mkdir
    elif mode == "full":     # temp files under the cache dir write to /dev/full: ENOSPC
        real_mkstemp = tempfile.mkstemp
        def full_mkstemp(suffix=None, prefix=None, dir=None, text=False):
            if dir is not None and under(dir):
                return os.open("/dev/full", os.O_WRONLY), os.path.join(dir, "never-written.tmp")
            return real_mkstemp(suffix, prefix, dir, text)
        tempfile.mkstemp = full_mkstemp

    import dfpgen
    from dfpgen import cache
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 5, 7, 7)).astype(np.float32)
    w = rng.standard_normal((6, 5, 3, 3)).astype(np.float32)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if os.environ.get("CHILD_TUNE"):  # tune first: the conv below uses the decision
            from dfpgen import autotune
            autotune.tune(dfpgen.ConvSpec(2, 5, 7, 7, 6, 3, 3, (1, 1), (1, 1), (1, 1), "fwd"),
                          budget=1.0, repeats=1)
        y, info = dfpgen.conv2d(x, w, padding=1, overflow="exact", return_info=True)
        dx = dfpgen.conv2d_input(x.shape, w, y, padding=1, overflow="exact")
        dw = dfpgen.conv2d_weight(x, w.shape, y, padding=1, overflow="exact")
    np.savez(out, y=y, dx=dx, dw=dw)
    print(json.dumps({"tier": info.tier, "counters": cache.counters(),
                      "warnings": [[w.category.__name__, str(w.message)] for w in caught]}))
''')


def _expected():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 5, 7, 7)).astype(np.float32)
    w = rng.standard_normal((6, 5, 3, 3)).astype(np.float32)
    y = dfpgen.conv2d(x, w, padding=1, overflow="exact")
    return {"y": y, "dx": dfpgen.conv2d_input(x.shape, w, y, padding=1, overflow="exact"),
            "dw": dfpgen.conv2d_weight(x, w.shape, y, padding=1, overflow="exact")}


@pytest.fixture(scope="module")
def expected():
    return _expected()


def _spawn(tmp_path, mode, cache_dir, tag="", **env_extra):
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    env = {k: v for k, v in os.environ.items() if not k.startswith("DFPGEN_")}
    env.update({"DFPGEN_CACHE_DIR": str(cache_dir), **env_extra})
    out = tmp_path / f"out_{mode}{tag}.npz"
    return subprocess.Popen([sys.executable, str(script), mode, str(out)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True), out


def _finish(proc_out, expected):
    proc, out = proc_out
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr[-3000:]
    report = json.loads(stdout.strip().splitlines()[-1])
    got = np.load(out)
    for k, v in expected.items():
        assert np.array_equal(got[k], v), k
    report["stderr"] = stderr
    return report


def _cache_warnings(report, text=""):
    return [m for c, m in report["warnings"] if c == "CacheWarning" and text in m]


@pytest.mark.parametrize("mode", ["readonly", "full", "notadir"])
def test_unusable_cache_dir_compiles_in_memory_with_one_warning(tmp_path, expected, mode):
    cache_dir = tmp_path / "cache"
    if mode == "notadir":
        cache_dir.write_text("a file where the cache directory should be")
    else:
        cache_dir.mkdir()
    report = _finish(_spawn(tmp_path, "readonly" if mode == "readonly" else
                            ("full" if mode == "full" else "plain"), cache_dir), expected)
    assert len(_cache_warnings(report)) == 1, report["warnings"]
    assert "not usable" in _cache_warnings(report)[0]
    assert report["counters"]["built"] >= 3 and report["counters"]["disk"] == 0
    if mode != "notadir":
        assert not [p for p in cache_dir.rglob("*") if p.is_file() and p.suffix in (".o", ".json")]


def test_corrupt_and_truncated_cache_entries_are_rebuilt_with_a_warning(tmp_path, expected):
    cache_dir = tmp_path / "cache"
    first = _finish(_spawn(tmp_path, "plain", cache_dir, "1"), expected)
    assert first["counters"]["built"] >= 3 and not _cache_warnings(first)
    objs = sorted(cache_dir.rglob("*.o"))
    metas = sorted(cache_dir.rglob("*.json"))
    assert len(objs) >= 3
    objs[0].write_bytes(objs[0].read_bytes()[: len(objs[0].read_bytes()) // 2])  # truncated
    objs[1].write_bytes(b"\x7fELF garbage")                                      # corrupt
    meta2 = objs[2].with_suffix(".json")
    meta2.write_text(meta2.read_text()[:10])                                    # cut metadata
    second = _finish(_spawn(tmp_path, "plain", cache_dir, "2"), expected)
    rebuilt = _cache_warnings(second, "rebuilt")
    assert len(rebuilt) == 3, second["warnings"]
    assert second["counters"]["built"] == 3
    third = _finish(_spawn(tmp_path, "plain", cache_dir, "3"), expected)
    assert not _cache_warnings(third) and third["counters"]["built"] == 0
    assert len(sorted(cache_dir.rglob("*.json"))) == len(metas)


def test_two_processes_build_and_tune_the_same_kernels_at_once(tmp_path, expected):
    cache_dir = tmp_path / "cache"
    procs = [_spawn(tmp_path, "plain", cache_dir, f"p{i}", CHILD_TUNE="1") for i in range(2)]
    reports = [_finish(p, expected) for p in procs]
    for r in reports:
        assert not _cache_warnings(r), r["warnings"]
    assert not list(cache_dir.rglob("*.tmp"))
    from dfpgen import cache
    old = os.environ.get("DFPGEN_CACHE_DIR")
    os.environ["DFPGEN_CACHE_DIR"] = str(cache_dir)
    try:
        entries = list(cache.entries())
    finally:
        if old is None:
            del os.environ["DFPGEN_CACHE_DIR"]
        else:
            os.environ["DFPGEN_CACHE_DIR"] = old
    import hashlib
    assert all("error" not in e for e in entries), entries
    kernels = [e for e in entries if e["kind"] == "kernel"]
    assert len(kernels) >= 3 and any(e["kind"] == "tuning" for e in entries)
    for e in kernels:
        with open(e["object_path"], "rb") as f:
            assert hashlib.sha256(f.read()).hexdigest() == e["sha256"]
    third = _finish(_spawn(tmp_path, "plain", cache_dir, "p3"), expected)
    assert third["counters"]["built"] == 0 and not _cache_warnings(third)


@pytest.mark.parametrize("tier", ["avx2", "generic"])
def test_cpu_without_vnni_runs_a_lower_tier_with_the_same_bits(tmp_path, expected, tier):
    report = _finish(_spawn(tmp_path, "plain", tmp_path / "cache", DFPGEN_ISA=tier), expected)
    assert report["tier"] == tier
    lines = [l for l in report["stderr"].splitlines() if l.startswith("dfpgen: ISA tier")]
    assert lines == [f"dfpgen: ISA tier {tier} (forced by DFPGEN_ISA)"]


def _conv_dy_nan(model):
    # NaN in the dY of conv2 only: a backward hook of conv2 puts it there
    h = model.conv2.register_full_backward_pre_hook(lambda m, g: (torch.where(
        torch.arange(g[0].numel()).view_as(g[0]) == 5, torch.tensor(float("nan")), g[0]),))
    return model(_x()), h


def test_a_conv_names_itself_when_its_dy_is_not_finite():
    # conv layers apply the policy in their backward (no hook reads dY first): same message
    model = _net()
    y, _ = _conv_dy_nan(model)
    with pytest.raises(DfpError, match=r"layer 'conv2' bwd_data/bwd_weight: grad_output dY .*1 NaN"):
        y.sum().backward()


def test_skip_policy_zeros_a_convs_gradients_for_a_nonfinite_dy(skip_policy):
    model = _net()
    y, _ = _conv_dy_nan(model)
    y.sum().backward()
    events = dfp.nonfinite_events()
    assert [(e.layer, e.pass_kind) for e in events] == [("conv2", "bwd_data/bwd_weight")]
    assert "1 NaN" in events[0].detail
    assert torch.equal(model.conv2.weight.grad, torch.zeros_like(model.conv2.weight))
    assert torch.equal(model.conv1.weight.grad, torch.zeros_like(model.conv1.weight))  # dX was 0
    assert model.fc.weight.grad.abs().sum() > 0


def _bias_only_conv1(model):
    # conv1's weight frozen (its input X has no grad): its backward only reduces dY for the
    # bias, so no quantize pass meets the NaN that a hook puts in its dY; the policy must
    # still apply
    model.conv1.weight.requires_grad_(False)
    model.conv1.register_full_backward_pre_hook(lambda m, g: (torch.where(
        torch.arange(g[0].numel()).view_as(g[0]) == 5, torch.tensor(float("nan")), g[0]),))
    return model(_x())


@pytest.mark.filterwarnings("ignore:Full backward hook")
def test_a_conv_training_only_its_bias_names_itself_when_its_dy_is_not_finite():
    y = _bias_only_conv1(_net())
    with pytest.raises(DfpError, match=r"layer 'conv1' .*grad_output dY .*1 NaN"):
        y.sum().backward()


@pytest.mark.filterwarnings("ignore:Full backward hook")
def test_skip_policy_zeros_a_bias_only_convs_gradient_for_a_nonfinite_dy(skip_policy):
    model = _net()
    _bias_only_conv1(model).sum().backward()
    assert [e.layer for e in dfp.nonfinite_events()] == ["conv1"]
    assert torch.equal(model.conv1.bias.grad, torch.zeros_like(model.conv1.bias))
    assert model.conv2.weight.grad.abs().sum() > 0
