"""The main job's example: a short DFP16 training run on real Fashion-MNIST whose loss falls
and whose test accuracy beats a floor, and the CLI's error when the data is missing."""
import csv
import json
import os
import subprocess
import sys

import pytest

from dfpgen.examples import data

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLE = os.path.join(ROOT, "examples", "train_fashion_mnist.py")
# Measured on this run (2000 images, 63 steps, lr 0.1): DFP16 70.1% / 69.3%, FP32 65.9% /
# 68.7% (seeds 0 / 1); chance is 10%. The floor leaves 10 points of margin.
ACC_FLOOR = 0.55


def run(args, timeout=600):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.run([sys.executable, EXAMPLE, *args], capture_output=True, text=True,
                          timeout=timeout, env=env)


def test_missing_data_gives_clear_error(tmp_path):
    r = run(["--data", str(tmp_path / "nowhere"), "--no-progress", "--out", str(tmp_path)])
    assert r.returncode != 0
    assert "apt-get install dataset-fashion-mnist" in r.stderr and "--data DIR" in r.stderr
    assert "Traceback" not in r.stderr


@pytest.mark.skipif(not data.available(), reason="Fashion-MNIST idx files not installed")
@pytest.mark.parametrize("var,value,tier", [("DFPGEN_NUM_THREADS", "-3", None), ("DFPGEN_ISA", "avx9", None),
                                            ("DFPGEN_CACHE", "maybe", None), ("DFPGEN_DISABLE", "2", None),
                                            # a forced tier (or a CPU without VNNI) has a stderr
                                            # tier note: it must not precede the error
                                            ("DFPGEN_DISABLE", "2", "generic"),
                                            ("DFPGEN_THREADING", "tbb", "generic")])
def test_a_bad_variable_stops_the_example_in_one_line(tmp_path, var, value, tier):
    env = dict(os.environ, **{var: value})
    if tier:
        env["DFPGEN_ISA"] = tier
    r = subprocess.run([sys.executable, EXAMPLE, "--epochs", "1", "--train-subset", "64",
                        "--test-subset", "64", "--no-progress", "--out", str(tmp_path)],
                       capture_output=True, text=True, timeout=120, env=env)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1, r.stderr
    assert lines[0].startswith("error: $" + var) and repr(value) in lines[0]


def _tier_this_cpu_cannot_run():
    from dfpgen import isa
    from dfpgen.target import native_target
    host = native_target()
    return next((t for t in isa.NAMES if not host.with_tier(t).executable), None)


@pytest.mark.skipif(not data.available(), reason="Fashion-MNIST idx files not installed")
@pytest.mark.skipif(_tier_this_cpu_cannot_run() is None, reason="this CPU runs every ISA tier")
def test_a_forced_tier_the_cpu_cannot_run_stops_the_example_in_one_line(tmp_path):
    tier = _tier_this_cpu_cannot_run()
    r = subprocess.run([sys.executable, EXAMPLE, "--epochs", "1", "--train-subset", "64",
                        "--test-subset", "64", "--no-progress", "--out", str(tmp_path)],
                       capture_output=True, text=True, timeout=120, env=dict(os.environ, DFPGEN_ISA=tier))
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1, r.stderr
    assert lines[0].startswith("error: $DFPGEN_ISA is " + repr(tier)) and "cannot run" in lines[0]


@pytest.mark.skipif(not data.available(), reason=f"Fashion-MNIST idx files not in {data.default_dir()} "
                    "(apt-get install dataset-fashion-mnist)")
def test_dfp16_short_training_run_learns(tmp_path):
    out = tmp_path / "runs"
    r = run(["--precision", "dfp16", "--train-subset", "2000", "--test-subset", "1000",
             "--epochs", "1", "--batch-size", "32", "--widths", "8,16,32", "--lr", "0.1",
             "--threads", "2", "--no-progress", "--out", str(out),
             "--json", str(tmp_path / "result.json")])
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    res = json.loads((tmp_path / "result.json").read_text())
    assert res["precision"] == "dfp16" and res["steps"] == 63
    with open(out / "fmnist_dfp16_steps.csv") as f:
        losses = [float(row["loss"]) for row in csv.DictReader(f)]
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    assert last < 0.6 * first, (first, last)
    assert res["test_acc"] > ACC_FLOOR, res
    assert (out / "fmnist_dfp16_epochs.csv").exists()


@pytest.mark.skipif(not data.available(), reason=f"Fashion-MNIST idx files not in {data.default_dir()} "
                    "(apt-get install dataset-fashion-mnist)")
def test_compare_trains_bf16_only_where_the_cpu_has_it(tmp_path):
    from dfpgen.target import native_target
    r = run(["--compare", "--max-steps", "1", "--train-subset", "64", "--test-subset", "64",
             "--batch-size", "32", "--widths", "8,8,8", "--threads", "1", "--no-progress",
             "--out", str(tmp_path)])
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    rows = [line.split("|")[1].strip() for line in r.stdout.splitlines() if line.startswith("| ")]
    native = native_target().native_bf16
    assert rows[1:] == (["fp32", "dfp16", "bf16"] if native else ["fp32", "dfp16"]), r.stdout
    assert ("this CPU has no native bf16" in r.stdout) == (not native)
    # one step is never timed (it loads the kernels): the speed is "n/a", not "nan"
    assert "nan" not in r.stdout.lower() and "| n/a |" in r.stdout


def test_table_ratio_column_without_fp32_or_without_timing():
    import importlib.util
    spec = importlib.util.spec_from_file_location("train_fashion_mnist", EXAMPLE)
    ex = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ex)
    row = lambda p, ips: {"precision": p, "test_acc": 0.5, "test_loss": 1.0, "train_loss": 1.0,  # noqa: E731
                          "img_per_s": ips, "peak_rss_mb": 1.0, "saved_mb": 1.0}
    assert ex.table([row("dfp16", 10.0)]).splitlines()[-1].split(" | ")[5] == "-"
    both = ex.table([row("fp32", 20.0), row("dfp16", 10.0)]).splitlines()
    assert both[-1].split(" | ")[5] == "0.50x"
    untimed = ex.table([row("fp32", float("nan")), row("dfp16", float("nan"))]).splitlines()
    assert untimed[-1].split(" | ")[4:6] == ["n/a", "n/a"]
