"""The measuring commands behind ``dfpgen tune / bench / show / cache verify``: they run
kernels, time them against PyTorch and render rich tables. ``dfpgen/cli.py`` owns argument
parsing and exit codes; this module owns what the commands do.
"""
from __future__ import annotations

import json
import sys
import warnings

import numpy as np

from .errors import OverflowWarning
from .spec import PASSES, ConvSpec


def _fmt(v, spec: str = ".1f", na: str = "n/a") -> str:
    return na if v is None or (isinstance(v, float) and not np.isfinite(v)) else format(v, spec)


def _ratio(a, b):
    return None if a is None or b is None or not b else a / b


def _peak_note(target) -> str:
    """What the "% peak" column measures: the tier's INT16 dot instruction, or why there is none."""
    from .threads import num_threads
    if not target.isa.dot_mnemonic:
        return "% peak: n/a, the generic tier has no INT16 dot instruction"
    return f"% peak: of a register-only {target.isa.dot_insn} loop x {num_threads()} thread(s)"


def _peak_total(target) -> float | None:
    """The machine's INT16 dot peak (``dfpgen.peak.dot_peak``: ``vpdpwssd`` or ``vpmaddwd`` +
    ``vpaddd``, per the tier) for the runtime's thread count (GMAC/s); ``None`` where the
    host cannot run the tier or the tier has no dot instruction."""
    from .peak import peak_or_none
    from .threads import num_threads
    p = peak_or_none(target) if target.executable else None
    return None if p is None else p * num_threads()


# ----------------------------------------------------------------------------- exactness
def check_exact(spec: ConvSpec, config, overflow: str = "exact", seed: int = 1,
                target=None) -> tuple[bool, str]:
    """Run ``spec``'s pass with ``config`` on small random DFP16 operands (batch 1; for
    backward-weight as well) and compare its FP32 output bit for bit with
    :mod:`dfpgen.reference` under the flush schedule the kernel reports. ``target``: the
    CpuTarget to build and run for (default: the host's, ``$DFPGEN_ISA`` honoured).
    Returns (ok, note)."""
    from dataclasses import replace

    from . import passes
    from .autotune import make_runner, random_operands
    from .target import host_target
    small = replace(spec, N=1)
    ops = random_operands(small, seed)
    with warnings.catch_warnings():  # fast mode may saturate: the reference saturates alike
        warnings.simplefilter("ignore", OverflowWarning)
        out, info = make_runner(small, config, target or host_target(), ops, overflow, return_info=True)()
    ref = passes.of(spec).reference(small, ops, info, overflow == "fast")
    out = np.asarray(out)
    if out.shape != ref.fp32.shape:
        return False, f"output shape {out.shape} != reference {ref.fp32.shape}"
    if not np.array_equal(out, ref.fp32):
        bad = int(np.count_nonzero(out != ref.fp32))
        return False, f"{bad} of {out.size} outputs differ from dfpgen.reference"
    return True, f"exact on {small.geometry()} ({info.symbol})"


# ----------------------------------------------------------------------------- tune
def run_tune(args, specs: list[ConvSpec] | None, console) -> int:
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from . import autotune
    from .target import host_target
    target = host_target()
    target.require_executable()
    budget = args.budget or (autotune.DEFAULT_BUDGET_S if specs else 600.0)
    results = []
    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.fields[best]}"),
                  TimeElapsedColumn(), console=console, transient=True, disable=args.json) as bar:
        task = bar.add_task("tune", total=1.0, best="")

        def progress(spec, cand, frac):
            best = f"last {cand.config.short()} {_fmt(cand.gmacs)} GMAC/s {cand.status}" if cand else ""
            bar.update(task, description=f"{spec.pass_kind}:{spec.geometry()}", completed=min(frac, 1.0), best=best)

        if specs is None:
            which = autotune.PASSES if args.pass_kind == "all" else (args.pass_kind,)
            results = autotune.tune_model(args.model, budget, batch=args.batch or 32, passes=which,
                                          force=args.force, target=target, overflow=args.overflow,
                                          progress=progress)
        else:
            for spec in specs:
                bar.reset(task, total=1.0)
                results.append(autotune.tune(spec, target=target, budget=budget, force=args.force,
                                             overflow=args.overflow,
                                             progress=lambda c, f, spec=spec: progress(spec, c, f)))
    rows = []
    for r in results:
        torch_s = r.extra.get("torch_fp32_seconds")
        if torch_s is None and not args.no_baseline and not r.cached:
            from .baseline import torch_seconds
            torch_s = torch_seconds(r.spec, "float32")
            if torch_s is not None:
                autotune.annotate(r.spec, target, args.overflow, torch_fp32_seconds=torch_s)
        rows.append(_tune_row(r, target, torch_s))
    if args.json:
        sys.stdout.write(json.dumps(rows, indent=1, default=str) + "\n")
        return 0
    from rich.table import Table
    clock = ("the generated kernel alone" if all(r.timing == "kernel" for r in results)
             else "the numpy call (kernel-only timer unavailable)")
    tab = Table(title=f"dfpgen tune (ms: {clock}, median; {_peak_note(target)})", title_justify="left")
    for col in ("pass", "layer", "decision", "config", "ms", "GMAC/s", "% peak", "x default",
                "x PyTorch FP32", "candidates"):
        tab.add_column(col, justify="right" if col not in ("pass", "layer", "decision", "config") else "left")
    for row in rows:
        tab.add_row(row["pass"], row["layer"], row["decision"], row["config"], _fmt(row["seconds"] * 1e3, ".3f"),
                    _fmt(row["gmacs"]), _fmt(row["pct_peak"]), _fmt(row["speedup_default"], ".2f"),
                    _fmt(row["speedup_torch_fp32"], ".2f"), row["candidates"])
    console.print(tab)
    for r in results:
        if r.cached:
            console.print(f"{r.spec}: cached decision {r.config.short()} (use --force to tune again)")
        for c in r.rejected:
            console.print(f"{r.spec}: rejected {c.config.short()}: {c.note}")
    return 0


def _tune_row(r, target, torch_s) -> dict:
    peak = _peak_total(target)
    ok = sum(c.status == "ok" for c in r.candidates)
    return {"pass": r.spec.pass_kind, "layer": r.spec.geometry(), "spec": str(r.spec),
            "decision": "cached" if r.cached else "tuned", "config": r.config.short(),
            "config_fields": r.config.to_dict(), "seconds": r.seconds, "gmacs": r.gmacs,
            "pct_peak": None if peak is None else 100 * r.gmacs / peak,
            "default_config": r.default_config.short(), "default_seconds": r.default_seconds,
            "speedup_default": r.speedup, "torch_fp32_seconds": torch_s,
            "speedup_torch_fp32": _ratio(torch_s, r.seconds), "tune_seconds": r.elapsed,
            "timing": r.timing,
            "candidates": f"{ok} ok, {len(r.rejected)} rejected, {len(r.candidates) - ok - len(r.rejected)} failed",
            "rejected": [c.config.short() for c in r.rejected]}


# ----------------------------------------------------------------------------- bench
def run_bench(args, specs: list[ConvSpec], console) -> int:
    from . import autotune, passes
    from .baseline import median_seconds, torch_seconds
    from .target import host_target
    target = host_target()
    target.require_executable()
    peak = _peak_total(target)
    rows = []
    for spec in specs:
        cfg = autotune.lookup(spec, target, args.overflow)
        ops = autotune.random_operands(spec)
        run = autotune.make_runner(spec, cfg, target, ops, args.overflow)
        api = median_seconds(run, args.repeats)
        eff = cfg or passes.of(spec).default_config(spec, target)
        kern, _ = autotune.time_runner(run, args.repeats,
                                       kernel=lambda: autotune.kernel_timer(spec, eff, target, ops, args.overflow))
        full = median_seconds(autotune.make_runner(spec, cfg, target, ops, args.overflow, quantize=True),
                              args.repeats)
        fp32, bf16 = torch_seconds(spec, "float32", args.repeats), torch_seconds(spec, "bfloat16", args.repeats)
        g = spec.macs / kern / 1e9
        rows.append({"pass": spec.pass_kind, "layer": spec.geometry(), "config": (cfg or eff).short(),
                     "tuned": cfg is not None, "seconds": kern, "gmacs": g,
                     "pct_peak": None if peak is None else 100 * g / peak,
                     "peak_instruction": target.isa.dot_insn if peak is not None else None, "seconds_api": api,
                     "seconds_with_quantize": full, "torch_fp32_seconds": fp32, "torch_bf16_seconds": bf16,
                     "torch_bf16_native": target.native_bf16,
                     "speedup_fp32": _ratio(fp32, kern), "speedup_bf16": _ratio(bf16, kern),
                     "speedup_fp32_with_quantize": _ratio(fp32, full)})
    if args.json:
        sys.stdout.write(json.dumps(rows, indent=1) + "\n")
        return 0
    from rich.table import Table
    # PyTorch runs bf16 in software where the CPU has no native bf16: label the column so
    bf16 = "bf16" if target.native_bf16 else "bf16 (emulated)"
    tab = Table(title="dfpgen bench (ms, median; kernel = generated code alone, call = numpy API on "
                f"DFP16 operands, +quantize = from FP32; {_peak_note(target)})", title_justify="left")
    cols = ("pass", "layer", "config", "kernel", "GMAC/s", "% peak", "call", "+quantize", "FP32", bf16,
            "x FP32", f"x {bf16}", "x FP32 (+q)")
    for c in cols:
        tab.add_column(c, justify="left" if c in ("pass", "layer", "config") else "right")
    for r in rows:
        ms = lambda v: _fmt(None if v is None else v * 1e3, ".3f")  # noqa: E731
        tab.add_row(r["pass"], r["layer"], r["config"] + (" (tuned)" if r["tuned"] else ""), ms(r["seconds"]),
                    _fmt(r["gmacs"]), _fmt(r["pct_peak"]), ms(r["seconds_api"]), ms(r["seconds_with_quantize"]),
                    ms(r["torch_fp32_seconds"]), ms(r["torch_bf16_seconds"]),
                    _fmt(r["speedup_fp32"], ".2f"), _fmt(r["speedup_bf16"], ".2f"),
                    _fmt(r["speedup_fp32_with_quantize"], ".2f"))
    console.print(tab)
    return 0


# ----------------------------------------------------------------------------- show
def show_kernel(spec: ConvSpec, what: str, config_text: str | None, parse_config, overflow: str) -> str:
    """The plan (JSON), LLVM IR or assembly of ``spec``'s kernel(s) with the given, tuned or
    default config."""
    from . import autotune, jit, pass_kernels, passes
    from .target import host_target
    target = host_target()
    rec = passes.of(spec)
    cfg = autotune.lookup(spec, target, overflow) if target.executable else None
    cfg = cfg or rec.default_config(spec, target)
    if config_text:
        cfg = parse_config(config_text, cfg)
    note = None
    if overflow == "exact" and rec.schedule_from_operands and cfg.flush == 0:
        # What the runtime loads: one kernel per reduction block, planned with every tap per
        # partial; the block and the flush interval are picked from the operands per call.
        from .conv import exact_family
        family = exact_family(spec, cfg)
        cfg = next((c for c in family if c.c_block == cfg.c_block), family[0])
        note = (f"exact mode: at run time the reduction block (one of {[c.c_block for c in family]}) "
                f"and the flush interval come from the operands (dfpgen.plan_exact); this is the "
                f"kernel of c_block {cfg.c_block} (--config c_block=B for another), the flush taps "
                f"a run-time argument")
    kernels = pass_kernels.kernel_sources(spec, cfg, target, overflow)
    out = []
    for symbol, plan, ir in kernels:
        if what == "plan":
            doc = {"symbol": symbol, "spec": str(spec), "config": cfg.to_dict(), "plan": plan}
            if note:
                doc["note"] = note
            out.append(json.dumps(doc, indent=1, default=str))
        elif what == "ir":
            out.append(ir)
        else:
            out.append(jit.emit_assembly(ir, cpu=target.compile_cpu, features=target.compile_features,
                                         name=symbol))
    return "\n".join(out)


# ----------------------------------------------------------------------------- cache
def entries_table(rows: list[dict]):
    from rich.table import Table
    tab = Table(box=None)
    for c in ("kind", "key", "what", "config", "timing", "size", "created"):
        tab.add_column(c)
    for e in rows:
        f = e.get("fields", {}) if isinstance(e.get("fields"), dict) else {}
        if e["kind"] == "kernel":
            what = e.get("symbol") or f.get("spec", "")
            cfg = f.get("config")
            if cfg is None and "error" not in e:
                try:
                    conv = entry_conv(e)
                except Exception:  # noqa: BLE001 - a listing never fails on one odd entry
                    conv = None
                cfg = conv[1].short() if conv else None
            timing = f"compile {_fmt(e.get('compile_seconds', 0) * 1e3, '.1f')} ms" if "compile_seconds" in e else ""
            size = f"{e.get('size', 0) / 1024:.1f} KiB"
        else:
            v = e.get("value", {}) if isinstance(e.get("value"), dict) else {}
            what, cfg = v.get("spec", f.get("spec", "")), v.get("config")
            if v.get("any_batch"):
                what = f"{f.get('spec', what)} (any batch)"
            timing = f"{_fmt(v.get('gmacs'))} GMAC/s, {_fmt(v.get('seconds', 0) * 1e3, '.3f')} ms" if v else ""
            size = ""
        if isinstance(cfg, dict):
            from .tuning import TuningConfig
            try:
                cfg = TuningConfig.from_dict(cfg).short()
            except Exception:  # an entry written by another version: show it raw
                cfg = json.dumps(cfg)
        tab.add_row(e["kind"], e["key"][:12], str(what), str(cfg or ""), timing if "error" not in e else e["error"],
                    size, e.get("created", ""))
    return tab


def entry_conv(e: dict):
    """``(spec, config, overflow)`` of a conv kernel or tuning entry, or ``None`` (other
    kernels, or fields this version cannot read): every conv kernel records its pass, spec
    (forward family: batch 1, its kernels serve any batch), config and mode in its fields."""
    from .spec import parse_full
    from .tuning import TuningConfig
    f = e.get("fields") if isinstance(e.get("fields"), dict) else {}
    if e["kind"] == "tuning":
        v = e["value"]
        return parse_full(v["spec"]), TuningConfig.from_dict(v["config"]), f.get("overflow", "exact")
    if isinstance(f.get("spec"), str) and isinstance(f.get("config"), dict) and f.get("pass") in PASSES:
        return (parse_full(f["spec"], f["pass"]), TuningConfig.from_dict(f["config"]),
                f.get("mode", "exact"))
    return None


def entry_target(e: dict):
    """``(tier, target)``: the ISA tier an entry's key fields name and the host target with
    that tier (an entry built under ``DFPGEN_ISA=avx2`` is checked as AVX2 code whatever
    ``DFPGEN_ISA`` says now); target ``None`` when this CPU cannot execute the tier. Entries
    that name no known tier use the host's."""
    from . import isa
    from .target import host_target
    f = e.get("fields") if isinstance(e.get("fields"), dict) else {}
    tier = f["target"].get("tier") if isinstance(f.get("target"), dict) else None
    if tier not in isa.NAMES:
        return tier, host_target()
    t = host_target(tier)
    return tier, (t if t.executable else None)


def verify_entry(e: dict) -> tuple[bool, str]:
    """Check one cache entry: metadata readable, object hash, loads into the JIT, and for
    conv kernels and tuning decisions: exact against the reference on a small input."""
    import hashlib
    from pathlib import Path

    from . import jit
    if "error" in e:
        return False, e["error"]
    try:
        if e["kind"] == "kernel":
            obj = Path(e["object_path"]).read_bytes()
            if hashlib.sha256(obj).hexdigest() != e.get("sha256"):
                return False, "object does not match its sha256"
            jit.load(obj, [e["symbol"]])
            note = "loads"
        else:
            note = "decision readable"
        conv = entry_conv(e)
        if conv is None:
            return True, note
        tier, target = entry_target(e)
        if target is None:
            return True, f"{note}; not run: built for ISA tier {tier!r}, which this CPU cannot execute"
        ok, why = check_exact(*conv, target=target)
        return ok, (f"{note}; {why}" if ok else why)
    except Exception as exc:  # any failure is a bad entry, reported, not a crash
        return False, f"{type(exc).__name__}: {exc}"[:300]


def verify_entries(console) -> int:
    """``dfpgen cache verify``: check every entry; exit code 1 if any is bad."""
    import os

    from . import cache
    bad = 0
    rows = list(cache.entries())
    # The exactness checks compile their own kernels: keep them out of the cache being verified.
    old = os.environ.get(cache.ENV_CACHE)
    os.environ[cache.ENV_CACHE] = "0"
    try:
        results = [verify_entry(e) for e in rows]
    finally:
        if old is None:
            os.environ.pop(cache.ENV_CACHE, None)
        else:
            os.environ[cache.ENV_CACHE] = old
    for e, (ok, note) in zip(rows, results):
        bad += not ok
        console.print(f"{'ok ' if ok else 'BAD'} {e['kind']:<6} {e['key'][:12]} {note}")
    console.print(f"{len(rows) - bad} ok, {bad} bad of {len(rows)} entries in {cache.cache_dir()}")
    return 1 if bad else 0
