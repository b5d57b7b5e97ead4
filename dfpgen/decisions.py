"""Stored tuning decisions: lookup, store and the given -> tuned -> default resolution of a
pass's schedule.

This module sits below both ``dfpgen.pass_kernels`` (``get_kernel``) and the tuner
(``dfpgen.autotune``): ``get_kernel`` asks it which config to build, the tuner tells it what
it decided, and neither imports the other. A decision is keyed like a kernel minus its config
(spec with its pass, target, overflow mode, thread count it was timed with) and stored in the
tuning cache (:func:`dfpgen.cache.store_tuning`); a memory dict in front of the disk makes a
lookup cheap enough for every call.
"""
from __future__ import annotations

import threading
import time

from . import cache, passes
from .errors import CacheWarning, DfpError, warn
from .log import line, verbose
from .spec import ConvSpec
from .target import CpuTarget, host_target
from .threads import num_threads
from .tuning import TuningConfig

TUNING_ABI = 1

_memo: dict[tuple, TuningConfig | None] = {}
_memo_lock = threading.Lock()
_one_pair: dict[TuningConfig, TuningConfig] = {}  # config -> its one-pair-per-partial form


def tuning_fields(spec: ConvSpec, target: CpuTarget, overflow: str = "exact") -> dict:
    """What a decision depends on: the spec (pass included), the target, the overflow mode,
    the thread count it was timed with (the kernel key minus the config)."""
    return {"kind": "tuning", "abi": TUNING_ABI, "spec": str(spec), "target": target.key(),
            "overflow": overflow, "threads": num_threads()}


def any_batch_fields(spec: ConvSpec, target: CpuTarget, overflow: str = "exact") -> dict:
    """The decision's second key, without the batch: kernels serve any N, so a layer tuned at
    batch 32 also schedules batch 64 until that batch is tuned itself."""
    geo = spec.geometry()
    return {**tuning_fields(spec, target, overflow), "spec": f"{spec.pass_kind}:{geo[geo.index('c'):]}",
            "batch": "any"}


def lookup(spec: ConvSpec, target: CpuTarget | None = None, overflow: str = "exact") -> TuningConfig | None:
    """The tuned config of ``spec`` on ``target`` or ``None``: the decision for this exact
    spec, else one tuned for the same layer at another batch size. An unplannable stored
    decision is ignored with a :class:`CacheWarning`."""
    target = target or host_target()
    mkey = (spec, target, overflow, num_threads())
    with _memo_lock:
        if mkey in _memo:
            return _memo[mkey]
    t0 = time.perf_counter()
    value = cache.load_tuning(tuning_fields(spec, target, overflow))
    if value is None:
        value = cache.load_tuning(any_batch_fields(spec, target, overflow))
    cfg = None
    if value is not None:
        try:
            cfg = TuningConfig.from_dict(value["config"])
            check_plannable(spec, cfg, target, overflow)
        except (DfpError, KeyError, TypeError) as exc:
            # A corrupt or hand-edited decision must not break every call of the layer.
            warn(f"dfpgen tuning decision for {spec} ignored ({exc}); using the default config", CacheWarning)
            cfg = None
    with _memo_lock:
        _memo[mkey] = cfg
    if verbose():  # next to the kernel lines of kernels.load_kernel
        line("tuning", "hit" if cfg else "none", spec, cfg.short() if cfg else "default",
             f"{(time.perf_counter() - t0) * 1e3:.2f}ms")
    return cfg


def store(spec: ConvSpec, target: CpuTarget, overflow: str, config: TuningConfig, value: dict) -> None:
    """Record the tuner's decision ``config`` (``value``: the JSON with its timings) for this
    spec and for any batch of the same layer; later lookups in this process see it at once."""
    cache.store_tuning(tuning_fields(spec, target, overflow), value)
    cache.store_tuning(any_batch_fields(spec, target, overflow), {**value, "any_batch": True})
    with _memo_lock:
        _memo[(spec, target, overflow, num_threads())] = config


def annotate(spec: ConvSpec, target: CpuTarget, overflow: str = "exact", **extra) -> None:
    """Add fields (e.g. ``torch_fp32_seconds``, measured by the CLI) to a stored decision."""
    for fields in (tuning_fields(spec, target, overflow), any_batch_fields(spec, target, overflow)):
        v = cache.load_tuning(fields)
        if v is not None:
            cache.store_tuning(fields, {**v, **extra})


def forget_lookups() -> None:
    """Drop the memory dict (after ``cache clear``, or in tests)."""
    with _memo_lock:
        _memo.clear()


def pass_default(spec: ConvSpec, target: CpuTarget) -> TuningConfig:
    """The heuristic schedule of ``spec``'s pass (nothing tuned)."""
    return passes.of(spec).default_config(spec, target)


def resolve_config(spec, config=None, *, overflow: str = "fast", target: CpuTarget | None = None):
    """``(config, target)``: the schedule a pass runs with — ``config`` if given, else the
    tuned decision (:func:`lookup`), else the heuristic default. In exact mode with
    ``flush == 0``, a pass whose schedule comes from the operands gets one pair per partial
    (``c_block`` 2, one tap), provably exact for any DFP16 operands; ``dfpgen.conv`` picks a
    longer one from the operands instead (``dfpgen.plan_exact``)."""
    target = target or host_target()
    if config is None:
        config = lookup(spec, target, overflow)
    if config is None:
        config = pass_default(spec, target)
    if overflow == "exact" and config.flush == 0 and passes.of(spec).schedule_from_operands:
        hit = _one_pair.get(config)
        if hit is None:  # dataclasses.replace costs ~50 us, a small layer's kernel about 100
            hit = _one_pair[config] = config.replace(c_block=2, flush=2)
        config = hit
    return config, target


def check_plannable(spec: ConvSpec, cfg: TuningConfig, target: CpuTarget, overflow: str) -> None:
    """Raise :class:`DfpError` if ``cfg`` cannot be planned for ``spec`` (register budget,
    unroll), as the kernel loader would plan it."""
    rec = passes.of(spec)
    if rec.schedule_from_operands:
        cfg, _ = resolve_config(spec, cfg, overflow=overflow, target=target)
    rec.plan_pass(spec, cfg, target, overflow)
