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
SMALL = "n1c16h8w8k16r3s3u1p1"
TUNE = "n1c32h8w8k32r3s3u1p1"  # forward: a few register blockings to choose from


def dfpgen(cache_dir: Path, *args: str, env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    e = {**os.environ, "DFPGEN_CACHE_DIR": str(cache_dir), "DFPGEN_NUM_THREADS": "1", **(env or {})}
    for k in ("DFPGEN_CACHE", "DFPGEN_ISA", "DFPGEN_TUNE_CORRUPT", "DFPGEN_VERBOSE"):
        if env is None or k not in env:
            e.pop(k, None)
    return subprocess.run([sys.executable, "-m", "dfpgen.cli", *args], cwd=ROOT, env=e,
                          capture_output=True, text=True, timeout=timeout)




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
    assert info["int16_dot"].startswith(("vpdpwssd", "vpmaddwd", "LLVM"))
    if info["executable"] and info["tier"] != "generic":
        assert info["int16_dot_peak_gmacs_per_core"] > 1.0 and info["fp32_fma_peak_gmacs_per_core"] > 1.0
    # the CLI loads no PyTorch, so no OpenMP runtime to attach: its own pool, said so
    assert info["threading"].startswith("python pool here (no OpenMP runtime loaded)")
    forced = json.loads(dfpgen(tmp_path, "info", "--json", env={"DFPGEN_THREADING": "Python"}).stdout)
    assert forced["threading"] == "python pool ($DFPGEN_THREADING=python)"
    bad = dfpgen(tmp_path, "info", env={"DFPGEN_THREADING": "tbb"})
    assert bad.returncode == 2 and bad.stderr.strip().splitlines() == [
        "dfpgen: error: $DFPGEN_THREADING must be one of openmp, python, got 'tbb'"], bad.stderr
    assert info["dfp_layers"] == "DFP16 kernels" and info["verbose"] is False
    off = json.loads(dfpgen(tmp_path, "info", "--json", env={"DFPGEN_DISABLE": "yes"}).stdout)
    assert off["dfp_layers"].startswith("FP32")
    bad = dfpgen(tmp_path, "info", env={"DFPGEN_DISABLE": "2"})
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1, bad.stderr
    assert "$DFPGEN_DISABLE" in bad.stderr
    text = dfpgen(tmp_path, "info")
    assert text.returncode == 0 and info["cpu"] in text.stdout and "int16 dot peak" in text.stdout
    # one "key  value" line per field, the whole value on it, no padding after it
    lines = text.stdout.splitlines()
    assert len(lines) == len(info) and all(ln == ln.rstrip() for ln in lines)
    assert any(ln.endswith(info["threading"]) for ln in lines)


def test_an_unusable_cache_dir_is_one_warning_line_and_the_same_reason_as_info(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    r = dfpgen(blocker, "info", "--json")
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 0 and len(lines) == 1, r.stderr
    assert lines[0].startswith(f"dfpgen: warning: $DFPGEN_CACHE_DIR={blocker} is not usable") \
        and "a file, not a directory" in lines[0]
    info = json.loads(r.stdout)
    assert info["cache_enabled"] is False and "a file, not a directory" in info["cache_note"]


def test_cache_ls_verify_clear_on_peak_kernels(tmp_path):
    assert dfpgen(tmp_path, "info").returncode == 0  # compiles and caches the peak loops
    ls = json.loads(dfpgen(tmp_path, "cache", "ls", "--json").stdout)
    assert {e["kind"] for e in ls} == {"kernel"} and any("peak_dot" in e["symbol"] for e in ls)
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


def _tune(cache_dir, *extra, env=None):
    r = dfpgen(cache_dir, "tune", "--layer", TUNE, "--budget", "4", "--json", "--no-baseline", *extra,
               env={"DFPGEN_VERBOSE": "1", **(env or {})})
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout), r.stderr


def test_budgeted_tune_stores_and_reuses_its_decision(tmp_path):
    (row,), log = _tune(tmp_path)
    assert row["decision"] == "tuned" and row["spec"] == f"fwd:{TUNE}" and row["gmacs"] > 0
    assert row["speedup_default"] >= 1.0 and ",built," in log
    tuning = [e for e in json.loads(dfpgen(tmp_path, "cache", "ls", "--json").stdout) if e["kind"] == "tuning"]
    assert sorted(bool(e["value"].get("any_batch")) for e in tuning) == [False, True]  # this N, any N
    assert all(e["value"]["config"] == row["config_fields"] for e in tuning)
    (again,), log2 = _tune(tmp_path)
    assert again["decision"] == "cached" and again["config"] == row["config"]
    assert ",built," not in log2  # nothing compiled or timed: the decision came from the cache
    (forced,), _ = _tune(tmp_path, "--force")
    assert forced["decision"] == "tuned"
    text = dfpgen(tmp_path, "tune", "--layer", TUNE, "--no-baseline")
    assert text.returncode == 0 and "cached" in text.stdout and forced["config"] in text.stdout


def test_rejected_candidate_is_reported_and_never_stored(tmp_path):
    from dfpgen import autotune
    from dfpgen.spec import parse_layer
    from dfpgen.target import native_target  # the subprocess runs without DFPGEN_ISA
    from dfpgen.tuning import default_config, search_space
    spec, t = parse_layer(TUNE), native_target()
    default = default_config(spec, t)
    space = autotune._distinct(search_space(spec, t), default, "exact", spec)
    first, _ = autotune.staged_candidates(spec, t, default, space)
    victim = first[0].short()  # timed first after the default, whatever the budget
    (row,), _ = _tune(tmp_path, env={"DFPGEN_TUNE_CORRUPT": victim})
    assert row["rejected"] == [victim] and row["config"] != victim
    (entry,) = [e for e in json.loads(dfpgen(tmp_path, "cache", "ls", "--json").stdout)
                if e["kind"] == "tuning" and not e["value"].get("any_batch")]
    stored = entry["value"]
    assert stored["config"] == row["config_fields"]
    assert [c["status"] for c in stored["candidates"] if c["short"] == victim] == ["rejected"]
    text = dfpgen(tmp_path, "tune", "--layer", TUNE, "--force", "--budget", "2",
                  "--no-baseline", env={"DFPGEN_TUNE_CORRUPT": victim})
    assert text.returncode == 0 and f"rejected {victim}" in text.stdout


@pytest.mark.parametrize("pass_kind", ["fwd", "bwd_data", "bwd_weight"])
def test_show_plan_ir_and_asm(tmp_path, pass_kind):
    plan = dfpgen(tmp_path, "show", "--layer", SMALL, "--pass", pass_kind, "--plan")
    assert plan.returncode == 0, plan.stderr
    doc = json.loads(plan.stdout.split("\n}\n")[0] + "\n}")
    assert doc["spec"] == f"{pass_kind}:{SMALL}" and doc["symbol"].startswith("dfp_conv_")
    ir = dfpgen(tmp_path, "show", "--layer", SMALL, "--pass", pass_kind, "--ir")
    assert ir.returncode == 0 and f"define void @{doc['symbol']}" in ir.stdout
    asm = dfpgen(tmp_path, "show", "--layer", SMALL, "--pass", pass_kind, "--asm")
    from dfpgen.target import native_target  # the subprocess runs without DFPGEN_ISA
    assert asm.returncode == 0 and native_target().isa.dot_mnemonic in asm.stdout
    cfg = dfpgen(tmp_path, "show", "--layer", SMALL, "--pass", pass_kind, "--config", "k_vecs=1,pixels=4")
    assert cfg.returncode == 0 and json.loads(cfg.stdout.split("\n}\n")[0] + "\n}")["config"]["pixels"] == 4
    if pass_kind != "bwd_weight":
        # exact mode shows the block kernel the runtime loads (not the one-pair fallback), and
        # says that the operands pick the block
        blk = dfpgen(tmp_path, "show", "--layer", SMALL, "--pass", pass_kind, "--config", "c_block=4")
        d = json.loads(blk.stdout.split("\n}\n")[0] + "\n}")
        assert "_cb4_" in d["symbol"] and d["config"]["c_block"] == 4, d["symbol"]
        assert "come from the operands" in d["note"]


def test_cache_verify_checks_tuned_conv_kernels_exactly(tmp_path):
    _tune(tmp_path, "--pass", "all", "--budget", "1.5")
    r = dfpgen(tmp_path, "cache", "verify")
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.count(f"exact on {TUNE}") >= 3 and " 0 bad" in r.stdout
    before = json.loads(dfpgen(tmp_path, "cache", "ls", "--json").stdout)
    dfpgen(tmp_path, "cache", "verify")
    assert len(json.loads(dfpgen(tmp_path, "cache", "ls", "--json").stdout)) == len(before)


def test_cache_verify_checks_each_entry_on_its_own_tier(tmp_path):
    """Entries built under DFPGEN_ISA=avx2 and entries built for the host's tier share one
    cache: verify, with or without the variable, runs each on the tier it was built for."""
    for env in ({"DFPGEN_ISA": "avx2"}, {}):
        r = dfpgen(tmp_path, "bench", "--layer", SMALL, "--repeats", "1", env=env or None)
        assert r.returncode == 0, r.stderr
    for env in ({"DFPGEN_ISA": "avx2"}, None):
        v = dfpgen(tmp_path, "cache", "verify", env=env)
        assert v.returncode == 0 and " 0 bad" in v.stdout, v.stdout + v.stderr
        assert v.stdout.count("_avx2_") >= 1 and "exact on" in v.stdout, v.stdout


def test_bench_json(tmp_path):
    r = dfpgen(tmp_path, "bench", "--layer", SMALL, "--repeats", "2", "--json")
    assert r.returncode == 0, r.stderr
    (row,) = json.loads(r.stdout)
    assert row["pass"] == "fwd" and row["seconds"] > 0 and row["seconds_with_quantize"] > 0
    assert row["torch_fp32_seconds"] is None or row["speedup_fp32"] > 0
    from dfpgen.target import host_target
    assert row["torch_bf16_native"] is host_target().native_bf16


@pytest.mark.parametrize("tier", ["avx512_vnni", "vnni256", "avx2"])
def test_peak_loops_are_register_only_dot_and_fma_on_every_tier(tier):
    """Each tier's peak loops issue its dot instruction (and FP32 FMA) on registers only: no
    memory operand in the loop and no spill, whatever the host (compiled for the tier's CPU)."""
    from dfpgen import jit, peak
    from dfpgen.target import host_target
    t = host_target(tier)
    n = t.isa.peak_accumulators
    for ir, insn in ((peak._dot_ir("dfp_test_peak", t.isa, n), t.isa.dot_mnemonic),
                     (peak._fma_ir("dfp_test_fma", t.vector_bits, n), "vfmadd")):
        asm = jit.emit_assembly(ir, cpu=t.compile_cpu, features=t.compile_features)
        body = [l for l in asm.splitlines() if insn in l]
        assert len(body) >= n and not any("(" in l for l in body), (tier, insn)  # no memory operands
        assert not [l for l in asm.splitlines() if "(%rsp)" in l], tier
    if t.executable:
        p = peak.dot_peak(t)
        assert p.gmacs > 0 and p.instruction == t.isa.dot_insn


@pytest.mark.parametrize("layer,extra,spec", [
    ("3x3x256", [], "fwd:n32c256h14w14k256r3s3u1p1"),
    ("resnet50:res5_branch2b", ["--batch", "4"], "fwd:n4c512h7w7k512r3s3u1p1"),
    ("3x3x17", ["--hw", "10x12", "--k", "32", "--stride", "2", "--pad", "0"], "fwd:n32c17h10w12k32r3s3u2p0"),
    ("bwd_data:n2c8h6w6k8r3s3p1", [], "bwd_data:n2c8h6w6k8r3s3u1p1"),
])
def test_layer_grammar_round_trips_through_the_cli(tmp_path, layer, extra, spec):
    r = dfpgen(tmp_path, "show", "--layer", layer, *extra, "--plan")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout.split("\n}\n")[0] + "\n}")["spec"] == spec
    again = dfpgen(tmp_path, "show", "--layer", spec, "--plan")  # the printed form parses back
    assert again.returncode == 0 and json.loads(again.stdout.split("\n}\n")[0] + "\n}")["spec"] == spec


def test_a_reader_that_closes_early_ends_info_quietly(tmp_path):
    # `dfpgen info | head -1`: the pipe closes after one line; no traceback, exit 141
    e = {**os.environ, "DFPGEN_CACHE_DIR": str(tmp_path), "DFPGEN_NUM_THREADS": "1"}
    p = subprocess.Popen([sys.executable, "-m", "dfpgen.cli", "info"], cwd=ROOT, env=e,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    first = p.stdout.readline()
    p.stdout.close()  # the reader goes away with the rest unread
    err = p.stderr.read().decode()
    assert p.wait(timeout=120) in (0, 141) and first.startswith(b"cpu")
    assert "Traceback" not in err and "BrokenPipe" not in err, err
