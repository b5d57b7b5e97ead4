"""``dfpgen``: the command line of the kernel generator (console script ``dfpgen``).

::

    dfpgen info [--json]                       CPU, ISA tier, LLVM, cache, measured peaks
    dfpgen tune --layer L [--pass P|all] [--budget S] [--force] [--json]
    dfpgen tune --model resnet50 [--budget S] [--pass P|all]
    dfpgen show --layer L [--pass P] [--plan | --ir | --asm] [--config k_vecs=2,pixels=14]
    dfpgen bench --layer L [--pass P|all] [--json]
    dfpgen cache ls [--json] | clear | verify

Layer strings: ``3x3x256`` (R x S x C, spatial size from the matching ResNet-50 layer),
``n32c256h14w14k256r3s3u1p1`` (full form), ``resnet50:res4_branch2b`` (named); ``--batch``,
``--hw``, ``--k``, ``--stride``, ``--pad`` override. Bad arguments exit with code 2 and a
one-line error. Environment: ``DFPGEN_CACHE_DIR`` (cache location), ``DFPGEN_CACHE=0`` (no
disk cache), ``DFPGEN_ISA`` (force an ISA tier), ``DFPGEN_NUM_THREADS``, ``DFPGEN_VERBOSE=1``
(one line per kernel build or cache hit, with its time, on stderr).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import warnings

from .errors import CacheWarning, DfpError, OverflowWarning, UnderflowWarning
from .log import verbose
from .spec import PASSES
from .target import quiet_tier_note

RELEVANT_FEATURES = ("avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512vnni", "avxvnni",
                     "avx512bf16", "amx-int8")


class _Parser(argparse.ArgumentParser):
    """argparse with a one-line error (no usage block) and exit code 2."""

    def error(self, message):  # noqa: D401 - argparse hook
        sys.stderr.write(f"dfpgen: error: {message}\n")
        raise SystemExit(2)


class UsageError(Exception):
    """A bad command line detected after parsing (exit code 2)."""


def _hw(text: str):
    try:
        parts = [int(p) for p in text.lower().split("x")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--hw wants H or HxW (e.g. 14 or 14x14), got {text!r}") from None
    if len(parts) not in (1, 2) or min(parts) < 1:
        raise argparse.ArgumentTypeError(f"--hw wants H or HxW with positive sizes, got {text!r}")
    return parts[0] if len(parts) == 1 else tuple(parts)


def _int_at_least(low: int):
    """An argparse type: an integer >= ``low`` (``--batch 0`` must not mean the default)."""
    def parse(text: str) -> int:
        try:
            v = int(text, 10)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got {text!r}") from None
        if v < low:
            raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got {text!r}")
        return v
    return parse


def _positive_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seconds, got {text!r}") from None
    if not v > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number of seconds, got {text!r}")
    return v


def _layer_args(p: argparse.ArgumentParser, passes_all: bool, required: bool = True) -> None:
    p.add_argument("--layer", required=required, help="3x3x256 | n32c256h14w14k256r3s3u1p1 | resnet50:res4_branch2b")
    choices = (*PASSES, "all") if passes_all else PASSES
    p.add_argument("--pass", dest="pass_kind", choices=choices, default="fwd",
                   help="forward, backward-data or backward-weight (a pass: prefix in --layer wins)")
    p.add_argument("--batch", type=_int_at_least(1), help="batch size N (default 32 for short and named layers)")
    p.add_argument("--hw", type=_hw, help="input size H or HxW")
    p.add_argument("--k", type=_int_at_least(1), help="output channels K")
    p.add_argument("--stride", type=_int_at_least(1), help="stride u (both axes)")
    p.add_argument("--pad", type=_int_at_least(0), help="padding p (both axes)")
    p.add_argument("--overflow", choices=("exact", "fast"), default="exact",
                   help="exact: proven flush interval, bit-exact (the runtime's default); fast: "
                        "saturating vpdpwssds with long chains")


def build_parser() -> argparse.ArgumentParser:
    ap = _Parser(prog="dfpgen", description="DFP16 (INT16 dynamic fixed point) conv kernel generator: VNNI and AVX2 tiers")
    sub = ap.add_subparsers(dest="command", required=True, metavar="{info,tune,show,bench,cache}")

    p = sub.add_parser("info", help="CPU, ISA tier, LLVM versions, cache, measured peaks")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("tune", help="autotune a layer (or a whole model) and store the decision")
    _layer_args(p, passes_all=True, required=False)
    p.add_argument("--model", choices=("resnet50",), help="tune every layer of the model")
    p.add_argument("--budget", type=_positive_float, help="seconds per layer and pass (default 30), or in total with --model (default 600)")
    p.add_argument("--force", action="store_true", help="tune again even if a decision is cached")
    p.add_argument("--no-baseline", action="store_true", help="skip the PyTorch FP32 timing")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("show", help="print a kernel's plan, LLVM IR or assembly")
    _layer_args(p, passes_all=False)
    what = p.add_mutually_exclusive_group()
    what.add_argument("--plan", action="store_const", dest="what", const="plan")
    what.add_argument("--ir", action="store_const", dest="what", const="ir")
    what.add_argument("--asm", action="store_const", dest="what", const="asm")
    p.add_argument("--config", help="schedule fields, e.g. k_vecs=2,pixels=14 (default: tuned or heuristic)")

    p = sub.add_parser("bench", help="quick benchmark against PyTorch FP32 and bf16")
    _layer_args(p, passes_all=True)
    p.add_argument("--repeats", type=_int_at_least(1), default=5,
                   help="timed calls per measurement (at most about 2 s of them)")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("cache", help="list, clear or verify cached kernels and tuning decisions")
    p.add_argument("action", choices=("ls", "clear", "verify"))
    p.add_argument("--json", action="store_true")
    return ap


# ----------------------------------------------------------------------------- helpers
def _specs(args) -> list:
    """The ConvSpecs named by --layer and the overrides; ``--pass all`` gives all three
    passes; a pass prefix in the layer string (``bwd_data:3x3x64``) wins over ``--pass``."""
    from .spec import parse_layer
    every = args.pass_kind == "all"
    spec = parse_layer(args.layer, batch=args.batch, hw=args.hw, k=args.k, stride=args.stride,
                       pad=args.pad, pass_kind="fwd" if every else args.pass_kind)
    return [spec.with_pass(p) for p in PASSES] if every else [spec]


def _physical_bytes() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return None


def _check_fits(specs, hint: str) -> None:
    """Refuse (one-line error) a layer whose operands cannot fit in this machine's memory:
    tune and bench allocate them, and numpy's MemoryError (or the OOM killer) is no answer."""
    total = _physical_bytes()
    if not total:
        return
    for spec in specs:
        # FP32 X, W, Y plus their DFP16 / packed copies and PyTorch's baseline: ~3x the FP32 bytes.
        need = 3 * 4 * (math.prod(spec.input_shape) + math.prod(spec.weight_shape) + math.prod(spec.output_shape))
        if need > total:
            raise UsageError(f"layer {spec.geometry()} needs about {need / 2**30:.3g} GiB for its operands; "
                             f"this machine has {total / 2**30:.3g} GiB; use a smaller {hint}")


def _parse_config(text: str, default):
    from .tuning import TuningConfig
    kw = default.to_dict()
    seen = set()
    for part in filter(None, (t.strip() for t in text.split(","))):
        name, sep, val = part.partition("=")
        if not sep or name not in kw:
            raise UsageError(f"--config: {part!r} is not field=value with a field of {', '.join(kw)}")
        if name in seen:
            raise UsageError(f"--config: {name} is given twice")
        seen.add(name)
        kw[name] = val if name == "unroll" else int(val) if val.isdigit() else None
        if kw[name] is None:
            raise UsageError(f"--config: {name} needs a non-negative integer, got {val!r}")
    return TuningConfig.from_dict(kw)


def _console(json_mode: bool):
    from rich.console import Console
    stream = sys.stderr if json_mode else sys.stdout
    # Not a terminal (pipes, tests): wide enough that symbols and configs are never cut.
    width = None if stream.isatty() else 200
    return Console(stderr=json_mode, highlight=False, width=width)


def _emit_json(obj) -> None:
    sys.stdout.write(json.dumps(obj, indent=1, default=str) + "\n")


# ----------------------------------------------------------------------------- commands
def cmd_info(args) -> int:
    from . import cache, jit, openmp, peak
    from .target import host_target
    from .threads import num_threads
    t = host_target()
    feats = sorted(f for f in RELEVANT_FEATURES if f in t.feature_set)
    usable, why = cache.disk_status()
    info = {"cpu": t.cpu, "triple": t.triple, "tier": t.tier, "tier_forced": t.forced,
            "executable": t.executable, "features": feats, **jit.llvm_versions(), "threads": num_threads(),
            "cache_dir": str(cache.cache_dir()), "cache_enabled": usable,
            **({} if usable else {"cache_note": why + "; kernels are kept in memory only"}),
            "cache_bytes": cache.size_bytes(), "cache_entries": sum(1 for _ in cache.entries())}
    info["threading"] = openmp.describe()
    # the runtime's switches, read (and validated) as dfpgen.runtime reads them
    from .env import dfp_disabled
    info["dfp_layers"] = "FP32 PyTorch ops ($DFPGEN_DISABLE is set)" if dfp_disabled() else "DFP16 kernels"
    info["verbose"] = verbose()
    info["int16_dot"] = t.isa.dot_insn
    if t.executable:
        dp, fp = peak.peak_or_none(t), peak.fma_peak(t).gmacs
        info.update(int16_dot_peak_gmacs_per_core=dp, fp32_fma_peak_gmacs_per_core=fp,
                    int16_vs_fp32=dp / fp if dp else None)
    if args.json:
        _emit_json(info)
        return 0
    # plain "key  value" lines: no padding to the widest value, no wrapping (greppable)
    width = max(len(k) for k in info)
    for k, v in info.items():
        if isinstance(v, float):
            v = f"{v:.1f}"
        elif isinstance(v, list):
            v = " ".join(v)
        print(f"{k.replace('_', ' '):<{width}}  {v}")
    return 0


def cmd_tune(args) -> int:
    from .autotune import check_corrupt_hook
    from .cli_commands import run_tune
    if bool(args.model) == bool(args.layer):
        raise UsageError("tune needs exactly one of --layer or --model")
    check_corrupt_hook()  # before the header: a bad variable is the command's one line
    if args.layer:
        specs = _specs(args)
        _check_fits(specs, "--batch or --hw")
    else:
        from .spec import model_specs
        specs = None
        _check_fits([sp for _, _, sp in model_specs(args.model, batch=args.batch or 32)], "--batch")
    return run_tune(args, specs, _console(args.json))


def cmd_show(args) -> int:
    from .cli_commands import show_kernel
    (spec,) = _specs(args)
    text = show_kernel(spec, args.what or "plan", args.config, _parse_config, args.overflow)
    sys.stdout.write(text if text.endswith("\n") else text + "\n")
    return 0


def cmd_bench(args) -> int:
    from .cli_commands import run_bench
    if args.repeats < 1:
        raise UsageError(f"--repeats must be >= 1, got {args.repeats}")
    specs = _specs(args)
    _check_fits(specs, "--batch or --hw")
    return run_bench(args, specs, _console(args.json))


def cmd_cache(args) -> int:
    from . import autotune, cache
    if args.action == "clear":
        n = cache.clear()
        autotune.forget_lookups()
        print(f"removed {n} entries from {cache.cache_dir()}")
        return 0
    if args.action == "ls":
        rows = list(cache.entries())
        if args.json:
            _emit_json(rows)
            return 0
        from .cli_commands import entries_table
        con = _console(False)
        con.print(f"cache {cache.cache_dir()}: {len(rows)} entries, {cache.size_bytes() / 1024:.1f} KiB")
        con.print(entries_table(rows))
        return 0
    from .cli_commands import verify_entries
    return verify_entries(_console(False))


COMMANDS = {"info": cmd_info, "tune": cmd_tune, "show": cmd_show, "bench": cmd_bench, "cache": cmd_cache}


def _one_line_warnings():
    # dfpgen's own warnings (cache, overflow, underflow) as "dfpgen: warning: ..." lines: the
    # default format adds the source line of the console script, which says nothing here
    default = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):
        if issubclass(category, (CacheWarning, OverflowWarning, UnderflowWarning)):
            sys.stderr.write(f"dfpgen: warning: {' '.join(str(message).split())}\n")
        else:
            default(message, category, filename, lineno, file, line)
    warnings.showwarning = show
    return default


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``dfpgen`` console script; returns the exit code (2: bad arguments)."""
    args = build_parser().parse_args(argv)
    shown = _one_line_warnings()
    try:
        if not verbose():
            # The tier is part of what info / tune / bench print; a stderr note would add a
            # line to every one-line error.
            quiet_tier_note()
        rc = COMMANDS[args.command](args)
    except (DfpError, UsageError, CacheWarning, OverflowWarning, UnderflowWarning) as exc:
        # (dfpgen's warnings arrive here as exceptions under -W error / PYTHONWARNINGS=error)
        msg = " ".join(str(exc).split())
        sys.stderr.write(f"dfpgen: error: {msg}\n")
        rc = 2
    except MemoryError as exc:
        sys.stderr.write(f"dfpgen: error: out of memory ({' '.join(str(exc).split())})\n")
        rc = 1
    except KeyboardInterrupt:
        sys.stderr.write("dfpgen: interrupted\n")
        rc = 130
    except BrokenPipeError:
        # the reader went away (``dfpgen info | head``): stop quietly, as other tools do;
        # stdout goes to devnull so that the interpreter's final flush raises nothing more
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        rc = 141  # 128 + SIGPIPE, what a shell reports for a killed writer
    finally:
        warnings.showwarning = shown  # main() leaves the process's warning display as it was
    return rc


def _run() -> None:
    sys.exit(main())


if __name__ == "__main__":
    _run()
