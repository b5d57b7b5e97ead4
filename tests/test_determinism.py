"""Determinism: with the same seed, the FP32 master weights after a few DFP16 training steps
are bit-identical for 1 and 2 dfpgen threads, for every ISA tier the host can run (exact
mode, forced with ``DFPGEN_ISA``), and across two runs (two fresh processes, stochastic
rounding of dY included)."""
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import dfpgen.runtime as dfp
from dfpgen.target import TIERS, host_target

STEPS = 3

TRAIN = textwrap.dedent('''
    import sys
    import torch
    import torch.nn.functional as F
    from torch import nn
    import dfpgen.runtime as dfp

    def build(seed=0):
        torch.manual_seed(seed)
        return nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
            nn.Conv2d(8, 12, 3, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(12, 12, 1), nn.ReLU(), nn.Flatten(), nn.Linear(12 * 5 * 5, 10))

    def batch(step):
        g = torch.Generator().manual_seed(1000 + step)
        return torch.randn(6, 3, 9, 9, generator=g), torch.randint(0, 10, (6,), generator=g)

    def train(model, opt, steps, start=0):
        for i in range(start, start + steps):
            x, y = batch(i)
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
        return model

    def make(threads=0, overflow="exact", grad_rounding="nearest"):
        model = dfp.convert(build(), overflow=overflow, grad_rounding=grad_rounding,
                            threads=threads)
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
        return model, opt

    if __name__ == "__main__":
        threads, rounding, out = int(sys.argv[1]), sys.argv[2], sys.argv[3]
        torch.set_num_threads(1)
        model, opt = make(threads, "exact", rounding)
        torch.save(train(model, opt, %d).state_dict(), out)
''' % STEPS)

_ns = {}
exec(compile(TRAIN, "<train>", "exec"), _ns)


def _weights(threads=0, overflow="exact", grad_rounding="nearest"):
    model, opt = _ns["make"](threads, overflow, grad_rounding)
    return _ns["train"](model, opt, STEPS).state_dict()


def _assert_same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def _initial():
    return _ns["build"]().state_dict()


def test_weights_change_and_two_runs_are_identical():
    a, b = _weights(), _weights()
    _assert_same(a, b)
    init = _initial()
    assert not torch.equal(a["0.weight"], init["0.weight"])
    assert not torch.equal(a["8.weight"], init["8.weight"])


def test_one_and_two_threads_are_identical():
    _assert_same(_weights(threads=1), _weights(threads=2))


@pytest.mark.filterwarnings("ignore::dfpgen.OverflowWarning")
def test_fast_mode_is_repeatable_across_threads():
    _assert_same(_weights(threads=1, overflow="fast"), _weights(threads=2, overflow="fast"))


def test_every_runnable_isa_tier_gives_the_same_weights(monkeypatch):
    host = host_target()
    tiers = [t for t in TIERS if host.with_tier(t).executable]
    assert "generic" in tiers and len(tiers) >= 2
    results = {}
    for tier in tiers:
        monkeypatch.setenv("DFPGEN_ISA", tier)
        assert host_target().tier == tier
        results[tier] = _weights()
    for tier in tiers[1:]:
        _assert_same(results[tiers[0]], results[tier])


def test_fresh_processes_with_stochastic_rounding_are_identical(tmp_path):
    script = tmp_path / "train.py"
    script.write_text(TRAIN)
    env = dict(os.environ)
    outs = []
    for threads in (1, 2):
        out = tmp_path / f"w{threads}.pt"
        r = subprocess.run([sys.executable, str(script), str(threads), "stochastic", str(out)],
                           env=env, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-2000:]
        outs.append(torch.load(out))
    _assert_same(outs[0], outs[1])
    # Stochastic rounding really ran: the weights differ from round-to-nearest.
    nearest = _weights()
    assert any(not torch.equal(outs[0][k], nearest[k]) for k in nearest if k.endswith("weight"))
