"""On-disk kernel and tuning cache (docs/ARCHITECTURE.md §4): key sensitivity, one build for N calls,
loading from disk in a fresh process, corrupt/partial entries, unusable directories, and
concurrent processes. Uses a one-instruction IR function, not conv kernels, to stay fast."""
from __future__ import annotations

import ctypes
import errno
import json
import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest

from dfpgen import CacheWarning, cache, jit, kernels
from dfpgen.target import host_target

ROOT = Path(__file__).resolve().parents[1]


def tiny_ir(symbol: str, addend: int) -> str:
    return (f"define i32 @{symbol}(i32 %x) {{\n  %y = add i32 %x, {addend}\n  ret i32 %y\n}}\n")


def tiny_build(symbol: str, addend: int, calls: list | None = None):
    def build() -> bytes:
        if calls is not None:
            calls.append(symbol)
        t = host_target()
        return jit.compile_ir(tiny_ir(symbol, addend), cpu=t.compile_cpu,
                              features=t.compile_features, name=symbol).obj
    return build


@pytest.fixture
def cache_tmp(tmp_path, monkeypatch):
    d = tmp_path / "cache"
    monkeypatch.setenv(cache.ENV_DIR, str(d))
    monkeypatch.delenv(cache.ENV_CACHE, raising=False)
    monkeypatch.setattr(cache, "_disk_warned", False)
    cache.forget_memory()
    yield d
    cache.forget_memory()


BASE = {"spec": "fwd:n1c16h8w8k16r3s3p1", "format": "dfp16", "config": {"k_vecs": 1, "flush": 0},
        "overflow": "exact", "abi": 1, "symbol": "f", "opt": 3,
        "target": {"triple": "x86_64", "cpu": "znver4", "features": ["avx512f"], "tier": "avx512_vnni"}}
CHANGES = {
    "spec": "fwd:n1c16h8w8k16r3s3p0",
    "format": "dfp16h2",
    "config": {"k_vecs": 2, "flush": 0},
    "overflow": "fast",
    "abi": 2,
    "symbol": "g",
    "opt": 2,
    "target": {"triple": "x86_64", "cpu": "znver4", "features": ["avx512f"], "tier": "avx2"},
    "new_field": 1,
}


@pytest.mark.parametrize("field", sorted(CHANGES))
def test_every_key_field_changes_the_key(field):
    assert cache.kernel_key({**BASE, field: CHANGES[field]}) != cache.kernel_key(BASE)


def test_flush_interval_inside_config_changes_the_key():
    assert cache.kernel_key({**BASE, "config": {"k_vecs": 1, "flush": 64}}) != cache.kernel_key(BASE)


@pytest.mark.parametrize("name", ["generator_hash", "llvm_versions"])
def test_generator_and_llvm_versions_change_the_key(monkeypatch, name):
    before = cache.kernel_key(BASE)
    fake = (lambda: "0" * 64) if name == "generator_hash" else (lambda: {"llvm": "0", "llvmlite": "0"})
    monkeypatch.setattr(cache, name, fake)
    assert cache.kernel_key(BASE) != before


def test_key_is_canonical_and_tuning_namespace_differs():
    reordered = dict(reversed(list(BASE.items())))
    assert cache.kernel_key(reordered) == cache.kernel_key(BASE)
    assert cache.tuning_key(BASE) != cache.kernel_key(BASE)


def test_isa_tier_changes_load_kernel_fields():
    t = host_target()
    assert t.with_tier("generic").key() != t.key()


def test_n_calls_build_once_then_disk_after_memory_is_dropped(cache_tmp):
    calls: list = []
    fields = {"test": "n_calls", "symbol": "dfp_test_ncalls"}
    before = cache.counters()
    outs = [cache.get_or_build(fields, tiny_build("dfp_test_ncalls", 3, calls)) for _ in range(5)]
    assert len(calls) == 1
    assert [s for _, s in outs] == ["built"] + ["memory"] * 4
    assert all(o == outs[0][0] for o, _ in outs)
    after = cache.counters()
    assert after["built"] - before["built"] == 1 and after["memory"] - before["memory"] == 4
    cache.forget_memory()
    obj, src = cache.get_or_build(fields, tiny_build("dfp_test_ncalls", 3, calls))
    assert src == "disk" and obj == outs[0][0] and len(calls) == 1
    meta = [e for e in cache.entries() if e["kind"] == "kernel"]
    assert len(meta) == 1 and meta[0]["symbol"] == "dfp_test_ncalls" and meta[0]["size"] == len(obj)
    assert cache.size_bytes() >= len(obj)


def _entry_files(cache_dir: Path) -> tuple[Path, Path]:
    (meta,) = list((cache_dir / "kernels").glob("*/*.json"))
    return meta.with_suffix(".o"), meta


@pytest.mark.parametrize("damage", ["truncate_object", "garbage_metadata", "missing_metadata"])
def test_corrupt_entry_is_rebuilt_with_a_warning(cache_tmp, damage):
    calls: list = []
    fields = {"test": "corrupt", "symbol": "dfp_test_corrupt"}
    good, _ = cache.get_or_build(fields, tiny_build("dfp_test_corrupt", 5, calls))
    obj_path, meta_path = _entry_files(cache_tmp)
    if damage == "truncate_object":
        obj_path.write_bytes(good[: len(good) // 2])
    elif damage == "garbage_metadata":
        meta_path.write_text("{not json")
    else:
        meta_path.unlink()
    cache.forget_memory()
    with pytest.warns(CacheWarning) as rec:
        obj, src = cache.get_or_build(fields, tiny_build("dfp_test_corrupt", 5, calls))
    assert src == "built" and obj == good and len(calls) == 2
    bad_file = meta_path if damage != "truncate_object" else obj_path
    assert any(str(bad_file) in str(w.message) for w in rec)
    # The rebuilt entry is whole again: a fresh lookup loads it from disk, silently.
    cache.forget_memory()
    with warnings.catch_warnings():
        warnings.simplefilter("error", CacheWarning)
        assert cache.get_or_build(fields, tiny_build("dfp_test_corrupt", 5, calls))[1] == "disk"


def test_cache_dir_that_is_a_file_compiles_in_memory_with_one_warning(tmp_path, monkeypatch):
    blocker = tmp_path / "not_a_dir"
    blocker.write_text("x")
    monkeypatch.setenv(cache.ENV_DIR, str(blocker / "cache"))
    monkeypatch.setattr(cache, "_disk_warned", False)
    cache.forget_memory()
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        for i in range(3):
            obj, src = cache.get_or_build({"test": "ro", "i": i}, tiny_build(f"dfp_test_ro{i}", i))
            assert src == "built" and obj[:4] == b"\x7fELF"
        cache.store_tuning({"test": "ro"}, {"config": {"k_vecs": 1}})
    ours = [w for w in rec if issubclass(w.category, CacheWarning)]
    # the warning names the line that asked for the kernel, not dfpgen's internals
    assert len(ours) == 1 and ours[0].filename == __file__, ours[0].filename
    # the same reason as `dfpgen info` gives, whichever call met the file first
    why = f"({blocker} is a file, not a directory)"
    assert why in str(ours[0].message) and cache.disk_status() == (False, f"{blocker / 'cache'} is not usable {why}")
    # it names where the directory came from: the variable, set here
    assert str(ours[0].message).startswith(f"$DFPGEN_CACHE_DIR={blocker / 'cache'} is not usable")
    assert cache.load_tuning({"test": "ro"}) == {"config": {"k_vecs": 1}}  # memory layer
    cache.forget_memory()


def test_disk_full_on_replace_compiles_in_memory_with_one_warning(cache_tmp, monkeypatch):
    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(cache.os, "replace", full)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        for i in range(2):
            assert cache.get_or_build({"test": "full", "i": i}, tiny_build(f"dfp_test_full{i}", i))[1] == "built"
    msgs = [str(w.message) for w in rec if issubclass(w.category, CacheWarning)]
    assert len(msgs) == 1 and "No space left" in msgs[0]
    assert not list(cache_tmp.rglob("*.o")) and not list(cache_tmp.rglob("*.tmp"))


def test_disabled_disk_cache_writes_nothing(cache_tmp, monkeypatch):
    monkeypatch.setenv(cache.ENV_CACHE, "off")
    assert cache.get_or_build({"test": "off"}, tiny_build("dfp_test_off", 1))[1] == "built"
    assert not cache_tmp.exists()


def test_tuning_round_trip_entries_and_clear(cache_tmp):
    fields = {"spec": "fwd:n1c16h8w8k16r3s3p1", "target": "t"}
    assert cache.load_tuning(fields) is None
    value = {"config": {"k_vecs": 1, "pixels": 8}, "gmacs": 12.5}
    cache.store_tuning(fields, value)
    cache.forget_memory()
    assert cache.load_tuning(fields) == value
    cache.get_or_build({"test": "clear"}, tiny_build("dfp_test_clear", 2))
    kinds = sorted(e["kind"] for e in cache.entries())
    assert kinds == ["kernel", "tuning"]
    assert cache.clear() == 2
    assert list(cache.entries()) == [] and cache.size_bytes() == 0
    assert cache.load_tuning(fields) is None


def test_garbage_tuning_entry_warns_and_reads_as_absent(cache_tmp):
    fields = {"spec": "x"}
    cache.store_tuning(fields, {"config": {}})
    (path,) = list((cache_tmp / "tuning").glob("*/*.json"))
    path.write_text("[1, 2")
    cache.forget_memory()
    with pytest.warns(CacheWarning, match=str(path.name)):
        assert cache.load_tuning(fields) is None


CHILD = textwrap.dedent("""
    import ctypes, json, sys
    from dfpgen import cache, kernels
    from dfpgen.target import host_target
    sym = sys.argv[1]
    ir = "define i32 @%s(i32 %%x) {\\n  %%y = add i32 %%x, 7\\n  ret i32 %%y\\n}\\n" % sym
    k = kernels.load_kernel(sym, {"test": "subprocess"}, lambda: ir, host_target())
    f = ctypes.CFUNCTYPE(ctypes.c_int32, ctypes.c_int32)(k.address)
    print(json.dumps({"counters": cache.counters(), "source": k.source, "value": f(35)}))
""")


def _child(cache_dir: Path, symbol: str = "dfp_test_child") -> subprocess.Popen:
    env = {**os.environ, cache.ENV_DIR: str(cache_dir)}
    env.pop(cache.ENV_CACHE, None)
    return subprocess.Popen([sys.executable, "-c", CHILD, symbol], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _result(p: subprocess.Popen) -> dict:
    out, err = p.communicate(timeout=120)
    assert p.returncode == 0, err
    return json.loads(out.strip().splitlines()[-1])


def test_fresh_subprocess_loads_from_disk_without_compiling(tmp_path):
    first = _result(_child(tmp_path))
    assert first["counters"]["built"] == 1 and first["value"] == 42
    second = _result(_child(tmp_path))
    assert second["source"] == "disk" and second["value"] == 42
    assert second["counters"] == {"built": 0, "disk": 1, "memory": 0}


def test_two_processes_building_the_same_key_both_succeed(tmp_path):
    procs = [_child(tmp_path, "dfp_test_race") for _ in range(2)]
    results = [_result(p) for p in procs]
    assert all(r["value"] == 42 for r in results)
    assert sum(r["counters"]["built"] for r in results) == 1  # the loser waited, then loaded
    (entry,) = [e for e in cache_entries(tmp_path) if e["kind"] == "kernel"]
    assert "error" not in entry
    obj = Path(entry["object_path"]).read_bytes()
    import hashlib
    assert hashlib.sha256(obj).hexdigest() == entry["sha256"]


def cache_entries(d: Path) -> list[dict]:
    old = os.environ.get(cache.ENV_DIR)
    os.environ[cache.ENV_DIR] = str(d)
    try:
        return list(cache.entries())
    finally:
        if old is None:
            del os.environ[cache.ENV_DIR]
        else:
            os.environ[cache.ENV_DIR] = old


def test_load_kernel_goes_through_the_cache(cache_tmp):
    k = kernels.load_kernel("dfp_test_lk", {"test": "lk"}, lambda: tiny_ir("dfp_test_lk", 9), host_target())
    f = ctypes.CFUNCTYPE(ctypes.c_int32, ctypes.c_int32)(k.address)
    assert f(1) == 10 and k.source == "built"
    assert [e["symbol"] for e in cache.entries()] == ["dfp_test_lk"]


def test_the_suite_never_writes_into_the_users_cache():
    """tests/conftest.py points the suite at a cache of its own before dfpgen is imported."""
    import platformdirs

    from dfpgen import cache as c
    assert c.cache_dir() != Path(platformdirs.user_cache_dir("dfpgen"))


def test_rebuilt_entry_warnings_name_the_users_line_also_from_the_build_pool(tmp_path, monkeypatch):
    # a layer shape's first call builds its exact-mode kernels in a thread pool (conv._load_once):
    # warnings raised there are issued again from the calling thread, at the caller's line
    import subprocess
    import sys
    script = tmp_path / "user.py"
    script.write_text(
        "import warnings, numpy as np\n"
        "import dfpgen.conv as dc\n"
        "x = np.ones((1, 3, 6, 6), np.float32); w = np.ones((4, 3, 3, 3), np.float32)\n"
        "with warnings.catch_warnings(record=True) as ws:\n"
        "    warnings.simplefilter('always')\n"
        "    dc.conv2d(x, w, padding=1)\n"
        "print([(m.filename, m.lineno) for m in ws if 'rebuilt' in str(m.message)])\n")
    env = dict(os.environ, DFPGEN_CACHE_DIR=str(tmp_path / "c"))
    run = lambda: subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=120)  # noqa: E731
    assert run().returncode == 0
    objs = list((tmp_path / "c").rglob("*.o"))
    assert len(objs) >= 2  # the family of exact-mode kernels
    for o in objs:
        o.write_bytes(b"garbage")
    r = run()
    seen = eval(r.stdout.strip().splitlines()[-1])
    assert len(seen) == len(objs) and all(f == str(script) and ln == 6 for f, ln in seen), (seen, r.stderr)
