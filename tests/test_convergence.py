"""The convergence protocol (examples/convergence.py): its paired-difference interval, its
argument checks, and one small end-to-end run on real Fashion-MNIST that resumes from the
finished runs instead of training again."""
import json
import math
import os
import statistics
import subprocess
import sys

import pytest

from dfpgen.examples import data

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "examples"))
import convergence  # noqa: E402


def test_paired_interval_is_the_student_t_interval():
    diffs = [0.4, -0.1, 0.3, 0.2]
    m, lo, hi = convergence.paired_interval(diffs)
    half = convergence.t975(3) * statistics.stdev(diffs) / math.sqrt(4)
    assert m == pytest.approx(0.2) and lo == pytest.approx(0.2 - half) and hi == pytest.approx(0.2 + half)
    assert lo < 0 < hi  # four noisy seeds cannot tell +0.2 from 0
    assert math.isnan(convergence.paired_interval([0.5])[1])
    # t quantiles fall towards the normal quantile with more degrees of freedom
    assert convergence.t975(1) > convergence.t975(2) > convergence.t975(30) > convergence.t975(100) == 1.96
    with pytest.raises(ValueError):
        convergence.paired_interval([])


@pytest.mark.parametrize("argv,needle", [(["--seeds", "0,x"], "comma-separated integers"),
                                         (["--seeds", "1,1"], "distinct"),
                                         (["--variants", "fp32,dfp17"], "unknown variant"),
                                         (["--epochs", "0"], "--epochs")])
def test_bad_arguments_are_one_line_errors(argv, needle, capsys):
    with pytest.raises(SystemExit) as e:
        convergence.parse_args(argv)
    assert e.value.code == 2 and needle in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.skipif(not data.available(data.default_dir()), reason="Fashion-MNIST not installed")
def test_a_small_protocol_runs_pairs_and_resumes(tmp_path):
    argv = ["--variants", "dfp16", "--seeds", "0,1", "--epochs", "1", "--train-subset", "256",
            "--test-subset", "200", "--out", str(tmp_path), "--threads", "1"]
    cmd = [sys.executable, os.path.join(ROOT, "examples", "convergence.py"), *argv]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    results = {}
    for v in ("fp32", "dfp16"):  # fp32 joins as the paired baseline
        for s in (0, 1):
            with open(tmp_path / v / f"seed{s}" / "result.json") as f:
                results[(v, s)] = json.load(f)
            assert results[(v, s)]["steps"] == 4 and 0.0 <= results[(v, s)]["test_acc"] <= 1.0
    diff = statistics.fmean(100 * (results[("dfp16", s)]["test_acc"] - results[("fp32", s)]["test_acc"])
                            for s in (0, 1))
    assert "epoch 1" in r.stdout  # the children report their epochs
    row = next(l for l in r.stdout.splitlines() if l.startswith("| dfp16 |"))
    assert f"{diff:+.2f}" in row
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0 and "epoch 1" not in again.stdout  # nothing trained again
    assert row in again.stdout
