"""Autotuner: search the TuningConfig space of one conv pass, time the candidates, check each
bit-exactly against the default kernel, and store the decision in the tuning cache.

Search (staged, in the spirit of Triton's autotuner and TVM's schedule search):

1. *register blocking*: the legal configs (``search_space``) that differ from the default
   only in ``k_vecs`` x ``pixels``, ordered by a cost model (useful fraction of the
   accumulator tile after K and Q tails, then accumulator count: more accumulators amortise
   the broadcasts and weight loads), timed until half the budget is spent;
2. *around the best blocking*: the other fields (``c_block``, ``flush``, ``unroll``) with the
   best blocking, in the same cost order, until 80% of the budget is spent;
3. *the rest* of the space in cost order, until the budget is spent (small spaces are
   searched completely);
4. *confirmation*: the default and the winner are timed again in alternation; the winner is
   kept only if it is still faster (:func:`_confirm`), so a lucky timing on a busy machine
   does not become the decision.

Timing: one warm-up call, then the median of ``repeats`` calls, on random DFP16 operands,
with the runtime's thread count (:func:`dfpgen.threads.num_threads`); the kernel alone is
timed on buffers prepared once (:func:`kernel_timer`), so per-call packing and padding do
not drown the differences between schedules. Every candidate's FP32 output must equal the
default kernel's bit for bit (``np.array_equal``) under the same flush schedule: in exact
mode (the default) every config gives the same bits; in fast mode the reference is the
default blocking run with the candidate's ``c_block`` / ``flush`` (``ConvPass.bit_fields``, dfpgen/passes.py).
A candidate that differs is reported as ``rejected`` and can never be the stored decision.

Test hook (documented, minimal): ``DFPGEN_TUNE_CORRUPT=<config.short()>`` makes the
exactness check see one flipped output element for that config, so tests can prove a
rejected candidate is never stored.

The decision (config, median seconds, GMAC/s of the chosen and of the default config, every
candidate's timing) goes to :func:`dfpgen.cache.store_tuning`; :func:`lookup` is what
``pass_kernels.get_kernel`` calls when it is given no config.
"""
from __future__ import annotations

import os
import re
import statistics
import time
import warnings
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from . import cache, decisions, passes
from .spec import model_specs
from .errors import DfpError, OverflowWarning
from .measure import kernel_timer, make_runner, random_operands, time_runner  # noqa: F401
from .spec import PASSES, ConvSpec  # noqa: F401  (autotune.PASSES: what tune_model and the CLI accept)
from .target import CpuTarget, host_target
from .threads import num_threads
from .tuning import SHORT_PATTERN, TuningConfig

ENV_CORRUPT = "DFPGEN_TUNE_CORRUPT"
DEFAULT_BUDGET_S = 30.0

# The stored decisions (lookup / store / resolve) live in dfpgen.decisions, below both the
# kernel cache and this tuner; re-exported here as the tuner's public API.
from .decisions import (annotate, any_batch_fields, check_plannable, forget_lookups,  # noqa: E402,F401
                        lookup, tuning_fields)


# ----------------------------------------------------------------------------- results
@dataclass
class Candidate:
    """One timed config: ``status`` is ``"ok"``, ``"rejected"`` (output differs from the
    default kernel's), or ``"error"`` (did not build or run; ``note`` says why)."""
    config: TuningConfig
    seconds: float | None = None
    gmacs: float | None = None
    status: str = "ok"
    note: str = ""
    stage: int = 1

    def to_dict(self) -> dict:
        return {"config": self.config.to_dict(), "short": self.config.short(), "seconds": self.seconds,
                "gmacs": self.gmacs, "status": self.status, "note": self.note, "stage": self.stage}


@dataclass
class TuneResult:
    """The decision for one spec. ``cached`` is True when it came from the tuning cache
    (nothing was timed); ``candidates`` lists what this run timed."""
    spec: ConvSpec
    config: TuningConfig
    seconds: float
    gmacs: float
    default_config: TuningConfig
    default_seconds: float
    default_gmacs: float
    cached: bool = False
    elapsed: float = 0.0
    candidates: list[Candidate] = field(default_factory=list)
    extra: dict = field(default_factory=dict)  # annotations, e.g. torch_fp32_seconds
    timing: str = "kernel"  # "kernel": generated code alone (kernel_timer); "call": public call

    @property
    def speedup(self) -> float:
        return self.default_seconds / self.seconds if self.seconds else float("nan")

    @property
    def rejected(self) -> list[Candidate]:
        return [c for c in self.candidates if c.status == "rejected"]

    def to_value(self) -> dict:
        """The JSON stored in the tuning cache."""
        return {"config": self.config.to_dict(), "seconds": self.seconds, "gmacs": self.gmacs,
                "default_config": self.default_config.to_dict(), "default_seconds": self.default_seconds,
                "default_gmacs": self.default_gmacs, "spec": str(self.spec), "threads": num_threads(),
                "elapsed": self.elapsed, "timing": self.timing,
                "candidates": [c.to_dict() for c in self.candidates],
                **self.extra}

    @classmethod
    def from_value(cls, spec: ConvSpec, v: dict) -> "TuneResult":
        cands = [Candidate(TuningConfig.from_dict(c["config"]), c.get("seconds"), c.get("gmacs"),
                           c.get("status", "ok"), c.get("note", ""), c.get("stage", 1))
                 for c in v.get("candidates", [])]
        return cls(spec, TuningConfig.from_dict(v["config"]), v["seconds"], v["gmacs"],
                   TuningConfig.from_dict(v["default_config"]), v["default_seconds"], v["default_gmacs"],
                   cached=True, elapsed=0.0, candidates=cands,
                   extra={k: v[k] for k in v if k.startswith("torch_")}, timing=v.get("timing", "kernel"))


# ----------------------------------------------------------------------------- search space
def _cost_order(spec: ConvSpec, target: CpuTarget, cfgs: list[TuningConfig]) -> list[TuningConfig]:
    """Cost model: useful fraction of the register tile after tails (the output-channel dim
    against ``k_vecs * lanes``, the pixel dim against ``pixels``), then more accumulators."""
    lanes = target.lanes
    out_ch, pix = spec.tile_channels, passes.of(spec).cost_pixels(spec)

    def useful(n: int, block: int) -> float:
        return n / (-(-n // block) * block)

    def score(c: TuningConfig):
        return (-round(useful(out_ch, c.k_vecs * lanes) * useful(pix, c.pixels), 3),
                -c.k_vecs * c.pixels, c.unroll != "none", c.flush, -c.c_block)
    return sorted(cfgs, key=score)


def staged_candidates(spec: ConvSpec, target: CpuTarget, default: TuningConfig,
                      space: list[TuningConfig]) -> tuple[list[TuningConfig], Callable[[TuningConfig], list[TuningConfig]]]:
    """Stage 1 list (register blocking) and a function giving stage 2 around a blocking."""
    space = [c for c in dict.fromkeys(space) if c != default]
    same_rest = [c for c in space if c.replace(k_vecs=default.k_vecs, pixels=default.pixels) == default]

    def around(best: TuningConfig) -> list[TuningConfig]:
        return _cost_order(spec, target, [c for c in space if (c.k_vecs, c.pixels) == (best.k_vecs, best.pixels)
                                          and c != best and c not in same_rest])
    return _cost_order(spec, target, same_rest), around


_SHORT_CONFIG = re.compile(SHORT_PATTERN)


def check_corrupt_hook() -> None:
    """A set ``$DFPGEN_TUNE_CORRUPT`` must name a config as ``TuningConfig.short`` writes it:
    a typo would otherwise silently test nothing."""
    v = os.environ.get(ENV_CORRUPT)
    if v and not _SHORT_CONFIG.fullmatch(v):
        raise DfpError(f"${ENV_CORRUPT}={v!r} is not a config such as kb2_wb6_cb16_fl0 "
                       "(TuningConfig.short(); unset it to tune normally)")


def _corrupt_hook(cfg: TuningConfig, out: np.ndarray) -> np.ndarray:
    if os.environ.get(ENV_CORRUPT) == cfg.short() and out.size:
        out = np.array(out, copy=True, order="C")
        t = out.dtype.type
        out.flat[0] = np.nextafter(t(out.flat[0]), t(np.inf))  # one ulp: the smallest difference
    return out


# ----------------------------------------------------------------------------- tuning
def _distinct(space: list[TuningConfig], default: TuningConfig, overflow: str,
              spec: ConvSpec) -> list[TuningConfig]:
    """Drop configs that run the same kernel as one already listed: in exact mode the
    forward-family ``c_block`` / ``flush`` are replaced by the data-chosen schedule."""
    if overflow != "exact" or not passes.of(spec).schedule_from_operands:
        return list(dict.fromkeys(space))
    seen, out = {default.replace(c_block=default.c_block, flush=0)}, []
    for c in space:
        k = c.replace(c_block=default.c_block, flush=0)
        if k not in seen:
            seen.add(k)
            out.append(k)
    return out


def tune(spec: ConvSpec, *, target: CpuTarget | None = None, budget: float = DEFAULT_BUDGET_S,
         force: bool = False, overflow: str = "exact", repeats: int = 5,
         progress: Callable[[Candidate, float], None] | None = None) -> TuneResult:
    """Tune ``spec`` within ``budget`` seconds and store the decision; returns at once with
    ``cached=True`` when a decision exists, unless ``force``.

    ``progress(candidate, fraction_of_budget_used)`` is called after every candidate.
    Raises :class:`DfpError` for a bad budget or when the default kernel itself fails.
    """
    if not budget or budget <= 0:
        raise DfpError(f"tuning budget must be > 0 seconds, got {budget!r}")
    check_corrupt_hook()
    target = target or host_target()
    fields = tuning_fields(spec, target, overflow)
    if not force:
        v = cache.load_tuning(fields)
        if v is not None:
            try:
                res = TuneResult.from_value(spec, v)
                check_plannable(spec, res.config, target, overflow)
                return res
            except (KeyError, TypeError, DfpError):
                pass  # unreadable or unplannable decision: tune again
    t0 = time.perf_counter()
    rec = passes.of(spec)
    default = rec.default_config(spec, target)
    ops = random_operands(spec)
    macs = spec.macs

    bit_fields = rec.bit_fields(overflow)  # config fields that may change the output bits
    refs: dict[tuple, np.ndarray] = {}

    def reference_for(cfg: TuningConfig) -> np.ndarray:
        """The default kernel's output under ``cfg``'s flush schedule (the bits a correct
        candidate must reproduce): the default blocking with ``cfg``'s bit fields."""
        key = tuple(getattr(cfg, f) for f in bit_fields)
        if key not in refs:
            ref_cfg = default.replace(**dict(zip(bit_fields, key)))
            refs[key] = np.array(make_runner(spec, ref_cfg, target, ops, overflow)(), copy=True)
        return refs[key]

    def measure(cfg: TuningConfig, stage: int) -> Candidate:
        with warnings.catch_warnings():  # fast mode on random data may saturate; the bits still count
            warnings.simplefilter("ignore", OverflowWarning)
            return _measure(cfg, stage)

    def _measure(cfg: TuningConfig, stage: int) -> Candidate:
        try:
            sec, out = time_runner(make_runner(spec, cfg, target, ops, overflow), repeats,
                                   kernel=lambda: kernel_timer(spec, cfg, target, ops, overflow))
            if cfg == default:
                refs.setdefault(tuple(getattr(cfg, f) for f in bit_fields), np.array(out, copy=True))
            ref = reference_for(cfg)
        except Exception as exc:  # a candidate that fails to build/run is reported, not fatal
            return Candidate(cfg, status="error", note=f"{type(exc).__name__}: {exc}"[:200], stage=stage)
        c = Candidate(cfg, sec, macs / sec / 1e9, stage=stage)
        if cfg != default and not np.array_equal(_corrupt_hook(cfg, out), ref):
            c.status, c.note = "rejected", "output differs from the default kernel (same flush schedule)"
        return c

    t_base = time.perf_counter()
    base = measure(default, 0)
    # Time kept back for the confirmation rounds (two timings each of default and winner).
    one = time.perf_counter() - t_base  # wall time of one candidate measurement
    reserve = min(4 * one, 0.2 * budget)
    # Say which clock the figures come from: the kernel alone, or (fallback) the whole call.
    timing = "call"
    try:
        probe = kernel_timer(spec, default, target, ops, overflow)
        if probe is not None and probe() > 0:
            timing = "kernel"
    except Exception:  # noqa: BLE001 - the label only; the default already ran above
        pass
    if base.status != "ok":
        raise DfpError(f"default kernel for {spec} failed: {base.note}")
    cands: list[Candidate] = [base]
    if progress:
        progress(base, (time.perf_counter() - t0) / budget)
    space = _distinct(list(rec.search_space(spec, target)), default, overflow, spec)
    stage1, around = staged_candidates(spec, target, default, space)
    best = base

    def run_stage(cfgs: list[TuningConfig], stage: int, until: float) -> None:
        nonlocal best
        last = 0.0
        for cfg in cfgs:
            now = time.perf_counter() - t0
            if now + last > until:
                break
            c = measure(cfg, stage)
            last = time.perf_counter() - t0 - now
            cands.append(c)
            if c.status == "ok" and c.seconds < best.seconds:
                best = c
            if progress:
                progress(c, (time.perf_counter() - t0) / budget)

    run_stage(stage1, 1, (budget - reserve) * 0.5)
    run_stage(around(best.config), 2, (budget - reserve) * 0.8)
    timed = {c.config for c in cands}
    run_stage(_cost_order(spec, target, [c for c in space if c not in timed]), 3, budget - reserve)
    chosen, sec, default_sec = _confirm(spec, target, ops, overflow, repeats, default, best, base,
                                        deadline=t0 + budget - 2 * one)
    result = TuneResult(spec, chosen, sec, macs / sec / 1e9, default, default_sec, macs / default_sec / 1e9,
                        elapsed=time.perf_counter() - t0, candidates=cands, timing=timing)
    best = next(c for c in cands if c.config == chosen)
    assert best.status == "ok"
    decisions.store(spec, target, overflow, best.config, result.to_value())
    return result


def _confirm(spec: ConvSpec, target: CpuTarget, ops: dict, overflow: str, repeats: int,
             default: TuningConfig, best: Candidate, base: Candidate,
             deadline: float) -> tuple[TuningConfig, float, float]:
    """Re-time the default and the search's winner in alternation (up to two rounds each,
    each started only before ``deadline``; the search's own timings count as a round) and keep
    the winner only if it is still faster: the minimum over many noisy timings favours a
    lucky candidate, and on a busy machine the noise is larger than many real differences.
    Returns ``(chosen config, its seconds, the default's seconds)``."""
    if best.config == default:
        return default, base.seconds, base.seconds

    def once(cfg: TuningConfig) -> float:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", OverflowWarning)
            return time_runner(make_runner(spec, cfg, target, ops, overflow), repeats,
                               kernel=lambda: kernel_timer(spec, cfg, target, ops, overflow))[0]
    d, b = [base.seconds], [best.seconds]
    for _ in range(2):
        if time.perf_counter() > deadline:  # the budget holds; fewer rounds are still a check
            break
        d.append(once(default))
        b.append(once(best.config))
    d_s, b_s = statistics.median(d), statistics.median(b)
    return (best.config, b_s, d_s) if b_s < d_s else (default, d_s, d_s)


def tune_model(model: str = "resnet50", budget: float = 600.0, *, batch: int = 32,
               passes: tuple[str, ...] = ("fwd",), force: bool = False, target: CpuTarget | None = None,
               overflow: str = "exact",
               progress: Callable[[ConvSpec, Candidate | None, float], None] | None = None) -> list[TuneResult]:
    """Tune every layer of ``model`` for ``passes`` within ``budget`` seconds in total.

    Each layer gets a share of what is left, weighted by its MACs x occurrence count (big,
    frequent layers get more time); already-tuned layers cost nothing unless ``force``.
    """
    layers = [(count, spec.with_pass(p)) for _, count, spec in model_specs(model, batch=batch) for p in passes]
    weights = [count * spec.macs for count, spec in layers]
    t0, results = time.perf_counter(), []
    for i, (count, spec) in enumerate(layers):
        left = budget - (time.perf_counter() - t0)
        share = max(left * weights[i] / sum(weights[i:]), 0.5)
        cb = (lambda c, f, spec=spec: progress(spec, c, f)) if progress else None
        results.append(tune(spec, target=target, budget=share, force=force, overflow=overflow, progress=cb))
    return results
