"""Adversarial use of the ``dfpgen`` command line (subprocesses, own cache dir each): layers
too large for the machine, malformed layer strings, and --json outputs that must stay JSON.
Only layers that fail before any large allocation are used here (a test must never be able
to exhaust the machine's memory if the check it guards regresses)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def dfpgen(cache_dir: Path, *args: str, timeout: float = 120, env: dict | None = None) -> subprocess.CompletedProcess:
    extra = env or {}
    env = {**os.environ, "DFPGEN_CACHE_DIR": str(cache_dir), "DFPGEN_NUM_THREADS": "1"}
    for k in ("DFPGEN_CACHE", "DFPGEN_ISA", "DFPGEN_TUNE_CORRUPT", "DFPGEN_VERBOSE"):
        env.pop(k, None)
    env.update(extra)
    return subprocess.run([sys.executable, "-m", "dfpgen.cli", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def one_line_error(r: subprocess.CompletedProcess, code: int = 2) -> str:
    assert r.returncode == code, (r.returncode, r.stderr)
    assert "Traceback" not in r.stderr and r.stdout == ""
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("dfpgen: error:"), r.stderr
    return lines[0]


# 364 TiB of input; 1e20 x 1e20 pixels (numpy refuses the dimension). Both used to end in a
# numpy traceback (MemoryError / ValueError) instead of a one-line error; a layer of a few
# GiB more than the machine has was killed by the kernel's OOM killer.
HUGE = ["n100000c1000h1000w1000k16r1s1", "n1c1h99999999999999999999w99999999999999999999k16r1s1"]


@pytest.mark.parametrize("layer", HUGE)
@pytest.mark.parametrize("command", [["bench"], ["tune", "--budget", "2"]])
def test_a_layer_too_large_for_memory_is_a_one_line_error(tmp_path, command, layer):
    line = one_line_error(dfpgen(tmp_path, *command, "--layer", layer))
    assert "GiB" in line and layer in line


def test_a_model_batch_too_large_for_memory_is_a_one_line_error(tmp_path):
    line = one_line_error(dfpgen(tmp_path, "tune", "--model", "resnet50", "--batch", "10000000"))
    assert "GiB" in line and "--batch" in line


def test_show_of_a_huge_layer_still_works(tmp_path):
    # show only plans (no operands): a huge layer is legitimate there.
    r = dfpgen(tmp_path, "show", "--layer", HUGE[0], "--plan")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["spec"] == "fwd:" + HUGE[0] + "u1p0"


@pytest.mark.parametrize("layer,needle", [
    ("n1n2c3h5w5k2r3s3", "given twice"),
    ("n-1c3h5w5k2r3s3", "cannot parse"),
    ("n1c3h5w5k2r3s3uh2uw0", "stride must be >= 1"),
    ("n1c3h5w5k2r9s9", "larger than the padded input"),
    ("3x3x0", "positive"),
])
def test_malformed_layers(tmp_path, layer, needle):
    assert needle in one_line_error(dfpgen(tmp_path, "show", "--layer", layer))


def test_json_outputs_parse(tmp_path):
    layer = "n1c4h6w6k4r3s3u1p1"
    for args in (["info", "--json"], ["cache", "ls", "--json"],
                 ["bench", "--layer", layer, "--repeats", "1", "--json"]):
        r = dfpgen(tmp_path, *args)
        assert r.returncode == 0, r.stderr
        data = json.loads(r.stdout)
        assert data is not None
    assert data[0]["pass"] == "fwd" and data[0]["layer"] == layer and data[0]["seconds"] > 0


@pytest.mark.parametrize("args", [["info"], ["show", "--layer", "n1c3h5w5k2r3s3"]])
def test_a_malformed_thread_count_variable_is_a_one_line_error(tmp_path, args):
    line = one_line_error(dfpgen(tmp_path, *args, env={"DFPGEN_NUM_THREADS": "abc"}))
    assert "DFPGEN_NUM_THREADS" in line


def test_tune_replaces_an_unplannable_cached_decision(tmp_path):
    # A stored decision whose config cannot be planned (hand-edited or corrupt) was reported
    # as "cached" and kept forever; it must be tuned again (and `cache verify` flags it).
    layer = "n1c4h6w6k4r3s3u1p1"
    r = dfpgen(tmp_path, "tune", "--layer", layer, "--budget", "2", "--json")
    assert r.returncode == 0, r.stderr
    for f in (tmp_path / "tuning").rglob("*.json"):
        d = json.loads(f.read_text())
        d["value"]["config"]["k_vecs"] = 99
        f.write_text(json.dumps(d))
    r = dfpgen(tmp_path, "cache", "verify")
    assert r.returncode == 1 and "BAD tuning" in r.stdout and "registers" in r.stdout
    r = dfpgen(tmp_path, "tune", "--layer", layer, "--budget", "2", "--json")
    assert r.returncode == 0, r.stderr
    (row,) = json.loads(r.stdout)
    assert row["decision"] != "cached" and row["config_fields"]["k_vecs"] != 99
    r = dfpgen(tmp_path, "cache", "verify")
    assert r.returncode == 0, r.stdout


def test_show_rejects_the_odd_fast_flush_that_backward_weight_cannot_run(tmp_path):
    # `show` printed a plan for flush=7 that conv2d_weight then refused to run.
    layer = "n2c5h7w9k6r3s3u2p1"
    line = one_line_error(dfpgen(tmp_path, "show", "--layer", layer, "--pass", "bwd_weight", "--config",
                                 "flush=7", "--overflow", "fast", "--plan"))
    assert "flush interval must be even" in line
    r = dfpgen(tmp_path, "show", "--layer", layer, "--pass", "bwd_weight", "--config", "flush=8",
               "--overflow", "fast", "--plan")
    assert r.returncode == 0 and json.loads(r.stdout)["config"]["flush"] == 8
