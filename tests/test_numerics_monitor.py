"""NumericsMonitor: per-layer, per-pass records (RunInfo, exponents, headroom, zero and
underflow fractions, saturation, relative error vs FP32), table / CSV / PNG, lifecycle."""
import csv
import math
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dfpgen
import dfpgen.runtime as dfp
from dfpgen import OverflowWarning
from dfpgen.dfp import DfpFormat, exponent_for
from dfpgen.examples import data
from dfpgen.runtime import ops
from dfpgen.target import TIERS
from dfpgen.runtime.numerics import NumericsMonitor, headroom_bits, relative_error


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, stride=2, padding=1, bias=False)
        self.fc = nn.Linear(8 * 4 * 4, 5)

    def forward(self, x):
        x = F.relu(self.conv1(x))
        x = F.relu(self.conv2(x))
        return self.fc(x.flatten(1))


def _model(**kw):
    torch.manual_seed(0)
    return dfp.convert(Tiny(), overflow="exact", **kw)


def _batch(step):
    g = torch.Generator().manual_seed(100 + step)
    return torch.randn(4, 3, 8, 8, generator=g), torch.randint(0, 5, (4,), generator=g)


def _train(model, steps, x0=None):
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    for i in range(steps):
        x, y = _batch(i)
        if i == 0 and x0 is not None:
            x = x0
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()


def test_records_every_layer_and_pass_per_step():
    model = _model()
    with NumericsMonitor(model, sample_every=2) as mon:
        _train(model, 3)
    assert mon.step == 2
    seen = {(r.step, r.layer, r.pass_kind) for r in mon.records}
    want = set()
    for s in range(3):
        want |= {(s, "conv1", "fwd"), (s, "conv1", "bwd_weight")}  # the input needs no grad
        for layer in ("conv2", "fc"):
            want |= {(s, layer, p) for p in ("fwd", "bwd_data", "bwd_weight")}
    assert seen == want
    assert len(mon.records) == len(want)
    for r in mon.records:
        assert r.overflow == "exact" and r.saturated == 0 and r.bits == 15
        assert r.tier in TIERS
        sampled = r.step in (0, 2)
        assert math.isnan(r.rel_err) != sampled
        assert math.isnan(r.zero_a) != sampled
    # Every layer learns what ran, per pass.
    assert set(model.conv2.last_info) == {"fwd", "bwd_data", "bwd_weight"}
    assert model.conv2.last_info["bwd_data"].pass_kind == "bwd_data"


def test_exponents_and_fractions_match_the_operands():
    model = _model()
    x, _ = _batch(0)
    x = x.clone()
    x[:, :, :4] = 0.0                     # half the input exactly zero
    x[0, 0, 7, 7] = 8.0                   # max |x| = 8 -> E = 4 - 15 = -11
    x[0, 1, 7, 7] = 2.0 ** -13            # below half of 2**-11: quantizes to 0 (underflow)
    w0, b0 = model.conv1.weight.detach().clone(), model.conv1.bias.detach().clone()
    with NumericsMonitor(model, sample_every=1) as mon:
        _train(model, 1, x0=x)
    rec = next(r for r in mon.records if r.layer == "conv1" and r.pass_kind == "fwd")
    assert rec.exp_a == exponent_for(8.0) == -11
    assert rec.exp_b == exponent_for(float(w0.abs().max()))
    nz = int((x != 0).sum())
    assert rec.zero_a == (x.numel() - nz + 1) / x.numel()
    assert rec.underflow_a == 1 / nz
    assert rec.headroom_a == 0 and rec.headroom_b == 0
    assert 0 < rec.rel_err < 1e-3
    ref = F.conv2d(x, w0, b0, padding=1)
    y = dfp.conv2d(x, w0, b0, padding=1, fmt=DfpFormat(), overflow="exact")
    assert abs(relative_error(y.numpy(), ref) - rec.rel_err) < 1e-7


def test_per_layer_headroom_format_and_overflow_mode_are_recorded():
    model = _model()
    model.conv2.dfp_format = DfpFormat(bits=13)
    model.fc.overflow = "fast"
    with NumericsMonitor(model, sample_every=1) as mon:
        _train(model, 1)
    for r in mon.records:
        if r.layer == "conv2":
            assert r.bits == 13 and r.headroom_a == 2 and r.headroom_b == 2
        if r.layer == "fc":
            assert r.overflow == "fast"
        else:
            assert r.overflow == "exact"


def test_saturation_is_counted_and_shows_in_the_relative_error():
    # All-ones X and W: mantissas 2**14, 36 products of 2**28 per fast-mode chain > 2**31.
    rows = {}
    for mode in ("fast", "exact"):
        torch.manual_seed(0)
        model = dfp.convert(nn.Sequential(nn.Conv2d(4, 16, 3, padding=1, bias=False)),
                            overflow=mode)
        with torch.no_grad():
            model[0].weight.fill_(1.0)
        x = torch.ones(1, 4, 6, 6, requires_grad=True)
        with NumericsMonitor(model, sample_every=1) as mon, \
                warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            model(x).sum().backward()
        rows[mode] = next(r for r in mon.records if r.pass_kind == "fwd")
        assert rows[mode].saturated == model[0].last_info["fwd"].saturated
        n_warn = sum(issubclass(w.category, OverflowWarning) for w in caught)
        assert (n_warn > 0) == (mode == "fast")
    assert rows["fast"].saturated > 0 and rows["fast"].rel_err > 0.1
    assert rows["exact"].saturated == 0 and rows["exact"].rel_err < 1e-6


def test_eval_forwards_are_not_recorded_and_close_detaches():
    model = _model()
    mon = NumericsMonitor(model, sample_every=0)
    _train(model, 1)
    n = len(mon.records)
    assert n > 0 and all(math.isnan(r.rel_err) for r in mon.records)
    with torch.no_grad():
        model(_batch(5)[0])
    model.eval()
    model(_batch(5)[0])
    model.train()
    assert len(mon.records) == n
    mon.close()
    assert mon._on_event not in ops.observers
    _train(model, 1)
    assert len(mon.records) == n


def test_table_csv_and_png(tmp_path):
    model = _model()
    with NumericsMonitor(model, sample_every=1) as mon:
        _train(model, 2)
    text = mon.table()
    for name in ("conv1", "conv2", "fc", "bwd_weight X/dY", "bwd_data dY/W"):
        assert name in text
    assert len(text.splitlines()) == 3 + len(mon.summary()) == 3 + 8
    mon.to_csv(tmp_path / "n.csv")
    rows = list(csv.DictReader(open(tmp_path / "n.csv")))
    assert len(rows) == len(mon.records)
    assert {r["pass_kind"] for r in rows} == {"fwd", "bwd_data", "bwd_weight"}
    assert all(float(r["rel_err"]) < 1e-3 for r in rows)
    mon.plot(tmp_path / "n.png")
    assert (tmp_path / "n.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bad_arguments():
    with pytest.raises(ValueError, match="sample_every"):
        NumericsMonitor(_model(), sample_every=-1)
    with pytest.raises(TypeError, match="no DFP layers"):
        NumericsMonitor(nn.Sequential(nn.Conv2d(1, 1, 1)))


def test_headroom_bits_definition():
    from dfpgen.dfp import DfpTensor
    assert headroom_bits(DfpTensor(np.array([0, 0], np.int16), 0)) == 15
    assert headroom_bits(DfpTensor(np.array([-32767, 3], np.int16), 0)) == 0
    assert headroom_bits(DfpTensor(np.array([4096, -8191], np.int16), 0)) == 2


def test_layer_policy_by_pattern_is_what_runs():
    from dfpgen.runtime.policy import layer_policies, set_layer_policy
    model = _model()
    changed = set_layer_policy(model, {"conv*": dict(overflow="fast"),
                                       "conv2": dict(dfp_format=DfpFormat(bits=13)),
                                       "re:f.": dict(overflow="exact")})
    assert changed == ["conv1", "conv2", "fc"]
    pol = layer_policies(model)
    assert pol["conv1"]["overflow"] == "fast" and pol["conv1"]["bits"] == 15
    assert pol["conv2"] == {"bits": 13, "rounding": "nearest", "overflow": "fast",
                            "grad_rounding": "nearest"}
    assert pol["fc"]["overflow"] == "exact"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", OverflowWarning)
        with NumericsMonitor(model, sample_every=0) as mon:
            _train(model, 1)
    for r in mon.records:
        assert (r.overflow, r.bits) == (pol[r.layer]["overflow"], pol[r.layer]["bits"])
        assert model.get_submodule(r.layer).last_info[r.pass_kind].overflow == r.overflow
    with pytest.raises(dfpgen.DfpError, match="matches no DFP layer"):
        set_layer_policy(model, {"conv3": dict(overflow="fast")})
    with pytest.raises(dfpgen.DfpError, match="unknown setting"):
        set_layer_policy(model, {"fc": dict(bits=13)})
    with pytest.raises(dfpgen.DfpError, match="overflow mode"):
        set_layer_policy(model, {"fc": dict(overflow="wrap")})


@pytest.mark.skipif(not data.available(), reason="Fashion-MNIST idx files not installed")
def test_training_example_numerics_report(tmp_path):
    import os
    import subprocess
    import sys
    example = os.path.join(os.path.dirname(__file__), "..", "examples", "train_fashion_mnist.py")
    r = subprocess.run([sys.executable, example, "--precision", "dfp16", "--numerics", "2",
                        "--max-steps", "3", "--train-subset", "192", "--test-subset", "100",
                        "--widths", "8,16,32", "--batch-size", "64", "--no-progress",
                        "--out", str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert "DFP16 numerics:" in r.stdout and "layer3.2.conv2" in r.stdout
    rows = list(csv.DictReader(open(tmp_path / "fmnist_dfp16_numerics.csv")))
    assert {r["pass_kind"] for r in rows} == {"fwd", "bwd_data", "bwd_weight"}
    sampled = [float(r["rel_err"]) for r in rows if r["rel_err"] != "nan"]
    assert sampled and max(sampled) < 0.5
    assert (tmp_path / "fmnist_dfp16_numerics.png").read_bytes()[:4] == b"\x89PNG"
