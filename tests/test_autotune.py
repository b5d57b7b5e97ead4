"""Autotuner: the staged search over the real search space, the exactness gate (a rejected
candidate is never stored, even when it is the fastest), the budget, the stored decision and
``lookup``. Search logic is tested with a deterministic cost per config (no timed assertions);
the end-to-end test on real kernels runs when ``dfpgen.conv`` is in the tree."""
from __future__ import annotations

import numpy as np
import pytest

from dfpgen import autotune, cache, tuning
from dfpgen.spec import parse_layer
from dfpgen.target import host_target

SPEC = parse_layer("n1c32h8w8k48r3s3p1")


@pytest.fixture
def fresh(tmp_path, monkeypatch):
    monkeypatch.setenv(cache.ENV_DIR, str(tmp_path / "cache"))
    monkeypatch.delenv(cache.ENV_CACHE, raising=False)
    monkeypatch.delenv(autotune.ENV_CORRUPT, raising=False)
    cache.forget_memory()
    autotune.forget_lookups()
    yield tmp_path
    cache.forget_memory()
    autotune.forget_lookups()


def cost(cfg: tuning.TuningConfig) -> float:
    """A made-up cost: prefers many accumulators, c_block 32, no unroll."""
    return 1.0 / (cfg.k_vecs * cfg.pixels) + (0.01 if cfg.c_block != 32 else 0) + (0.002 if cfg.unroll != "none" else 0)


class Fake:
    """Deterministic runner/timer: every config gives the same output except ``wrong``;
    the 'seconds' are ``cost(cfg)``. Counts runs per config."""

    def __init__(self, wrong=None):
        self.wrong, self.runs = wrong, []

    def make_runner(self, spec, cfg, target, ops, overflow="exact", **kw):
        def run():
            self.runs.append(cfg)
            out = np.arange(12, dtype=np.float32)
            if cfg == self.wrong:
                out[3] += 1
            return out
        run.cfg = cfg
        return run

    def time_runner(self, run, repeats=5, max_seconds=2.0, **kw):
        return cost(run.cfg), run()


def install(monkeypatch, fake: Fake):
    monkeypatch.setattr(autotune, "make_runner", fake.make_runner)
    monkeypatch.setattr(autotune, "time_runner", fake.time_runner)
    monkeypatch.setattr(autotune, "random_operands", lambda spec, seed=0: {})


def test_search_space_is_pruned_by_the_register_budget():
    t = host_target()
    space = tuning.search_space(SPEC, t)
    assert space[0] == tuning.default_config(SPEC, t)
    assert all(tuning.accumulator_budget(c.k_vecs, c.pixels, c.unroll, t.isa) <= t.registers for c in space)
    stage1, around = autotune.staged_candidates(SPEC, t, space[0], space)
    assert stage1 and all((c.c_block, c.unroll) == (space[0].c_block, space[0].unroll) for c in stage1)
    assert all((c.k_vecs, c.pixels) == (stage1[0].k_vecs, stage1[0].pixels) for c in around(stage1[0]))


def test_picks_the_fastest_exact_config_and_never_stores_a_rejected_one(fresh, monkeypatch):
    t = host_target()
    space = tuning.search_space(SPEC, t)
    # The wrong config is the cheapest of all: the gate, not the timing, must keep it out.
    wrong = min(space[1:], key=cost)
    fake = Fake(wrong=wrong)
    install(monkeypatch, fake)
    r = autotune.tune(SPEC, target=t, budget=1000.0, overflow="fast")
    assert wrong in [c.config for c in r.rejected]
    assert r.config != wrong
    ok = [c for c in r.candidates if c.status == "ok"]
    assert r.config == min(ok, key=lambda c: c.seconds).config
    assert r.seconds == cost(r.config) and r.default_seconds == cost(space[0])
    assert cache.load_tuning(autotune.tuning_fields(SPEC, t)) is None  # exact mode: not tuned
    stored = cache.load_tuning(autotune.tuning_fields(SPEC, t, "fast"))
    assert stored["config"] == r.config.to_dict() and stored["config"] != wrong.to_dict()
    assert wrong.short() in [c["short"] for c in stored["candidates"] if c["status"] == "rejected"]
    # lookup: memory first, then disk in a "new process" (memory layers dropped)
    assert autotune.lookup(SPEC, t, "fast") == r.config
    cache.forget_memory()
    autotune.forget_lookups()
    assert autotune.lookup(SPEC, t, "fast") == r.config and autotune.lookup(SPEC, t) is None
    # Kernels serve any batch: another N falls back to this decision until it is tuned itself.
    assert autotune.lookup(SPEC.__class__(**{**SPEC.__dict__, "N": 7}), t, "fast") == r.config
    assert autotune.lookup(parse_layer("n1c32h8w8k48r3s3p0"), t, "fast") is None


def test_exact_mode_times_each_register_blocking_once(fresh, monkeypatch):
    # In exact mode dfpgen.conv picks c_block / flush from the operands: configs that differ
    # only there run the same kernel and are timed once.
    fake = Fake()
    install(monkeypatch, fake)
    r = autotune.tune(SPEC, budget=1000.0)
    keys = [(c.config.k_vecs, c.config.pixels, c.config.unroll) for c in r.candidates]
    assert len(keys) == len(set(keys))
    space = tuning.search_space(SPEC, host_target())
    assert len(set(keys)) == len({(c.k_vecs, c.pixels, c.unroll) for c in space})


def test_tuned_layer_returns_at_once_unless_forced(fresh, monkeypatch):
    fake = Fake()
    install(monkeypatch, fake)
    first = autotune.tune(SPEC, budget=1000.0)
    n = len(fake.runs)
    again = autotune.tune(SPEC, budget=1000.0)
    assert again.cached and again.config == first.config and len(fake.runs) == n
    forced = autotune.tune(SPEC, budget=1000.0, force=True)
    assert not forced.cached and len(fake.runs) > n


def test_budget_bounds_the_search(fresh, monkeypatch):
    fake = Fake()
    install(monkeypatch, fake)
    clock = [0.0]
    real_time = fake.time_runner

    def slow(run, repeats=5, max_seconds=2.0, **kw):
        clock[0] += 1.0  # each candidate "takes" one second
        return real_time(run)
    monkeypatch.setattr(autotune, "time_runner", slow)
    monkeypatch.setattr(autotune.time, "perf_counter", lambda: clock[0])
    r = autotune.tune(SPEC, budget=4.0)
    assert len(tuning.search_space(SPEC, host_target())) > 6
    assert len(r.candidates) <= 5 and r.elapsed <= 5.0


def test_corrupt_hook_rejects_that_config(fresh, monkeypatch):
    fake = Fake()
    install(monkeypatch, fake)
    first = autotune.tune(SPEC, budget=1000.0)
    assert not first.rejected
    victim = min(first.candidates[1:], key=lambda c: c.seconds).config  # best non-default
    monkeypatch.setenv(autotune.ENV_CORRUPT, victim.short())
    r = autotune.tune(SPEC, budget=1000.0, force=True)
    assert [c.config for c in r.rejected] == [victim] and r.config != victim


def test_lookup_of_an_untuned_layer_is_none_and_bad_budget_raises(fresh):
    assert autotune.lookup(SPEC) is None
    from dfpgen import DfpError
    with pytest.raises(DfpError, match="budget"):
        autotune.tune(SPEC, budget=0)


def test_tuning_key_depends_on_pass_and_overflow():
    t = host_target()
    keys = {cache.tuning_key(autotune.tuning_fields(SPEC.with_pass(p), t, o))
            for p in ("fwd", "bwd_data", "bwd_weight") for o in ("exact", "fast")}
    assert len(keys) == 6


def _conv_ready() -> bool:
    try:
        from dfpgen import conv  # noqa: F401
        return True
    except ImportError:
        return False


@pytest.mark.skipif(not _conv_ready(), reason="dfpgen.conv not in this tree yet")
@pytest.mark.parametrize("pass_kind", ["fwd", "bwd_data", "bwd_weight"])
def test_real_kernels_tune_exactly(fresh, pass_kind):
    from dfpgen.cli_commands import check_exact
    spec = parse_layer("n1c16h8w8k16r3s3p1", pass_kind=pass_kind)
    r = autotune.tune(spec, budget=3.0, repeats=2)
    assert r.candidates[0].status == "ok" and r.seconds > 0
    assert r.timing == "kernel"  # kernel_timer still matches dfpgen.fwd_family / dfpgen.bwd_weight
    assert all(c.status != "error" for c in r.candidates), [c.note for c in r.candidates if c.status == "error"]
    assert autotune.lookup(spec) == r.config
    ok, note = check_exact(spec, r.config)
    assert ok, note
    # every pass consults lookup() when no config is given: the decision is what runs
    ops = autotune.random_operands(spec)
    _, info = autotune.make_runner(spec, None, host_target(), ops, "exact", return_info=True)()
    ran = {k: info.config[k] for k in ("k_vecs", "pixels", "unroll")}
    assert ran == {k: getattr(r.config, k) for k in ("k_vecs", "pixels", "unroll")}


def test_tune_model_tunes_every_layer_within_the_total_budget(fresh, monkeypatch):
    from dfpgen import layer_tables as models
    fake = Fake()
    install(monkeypatch, fake)
    clock = [0.0]

    def slow(run, repeats=5, max_seconds=2.0, **kw):
        clock[0] += 0.25  # each candidate "takes" a quarter second
        return fake.time_runner(run)
    monkeypatch.setattr(autotune, "time_runner", slow)
    monkeypatch.setattr(autotune.time, "perf_counter", lambda: clock[0])
    table = (("a", 1, "c32h8w8k48r3s3u1p1"), ("b", 3, "c16h8w8k32r1s1u1p0"), ("c", 1, "c32h4w4k16r3s3u1p1"))
    monkeypatch.setitem(models.MODELS, "tiny", table)
    seen = []
    res = autotune.tune_model("tiny", budget=6.0, batch=2, passes=("fwd", "bwd_data"),
                              progress=lambda spec, c, f: seen.append(str(spec)))
    assert [str(r.spec) for r in res] == [f"{p}:n2{geo}" for _, _, geo in table for p in ("fwd", "bwd_data")]
    assert all(not r.cached for r in res) and clock[0] <= 6.0 + 0.5 * len(res)
    assert set(seen) == {str(r.spec) for r in res}
    again = autotune.tune_model("tiny", budget=6.0, batch=2, passes=("fwd", "bwd_data"))
    assert all(r.cached for r in again)


def test_a_lucky_timing_does_not_become_the_decision(fresh, monkeypatch):
    fake = Fake()
    install(monkeypatch, fake)
    t = host_target()
    default = tuning.default_config(SPEC, t)
    calls: dict = {}

    def noisy(run, repeats=5, max_seconds=2.0, **kw):
        n = calls[run.cfg] = calls.get(run.cfg, 0) + 1
        if run.cfg == default:
            return 1.0, run()
        return (0.5 if n == 1 else 2.0), run()  # every other config: fast once, then slow
    monkeypatch.setattr(autotune, "time_runner", noisy)
    r = autotune.tune(SPEC, budget=1000.0)
    assert r.config == default and r.seconds == r.default_seconds == 1.0
    assert any(c.seconds == 0.5 for c in r.candidates[1:])  # the search did see the lucky run
    assert autotune.lookup(SPEC, t) == default
