"""Kernel loading: memory -> disk cache -> render + compile, then an address in this process.

``load_kernel`` is the one path every generated kernel (conv passes, quantize-and-pack)
goes through, so caching, verbose logging (``DFPGEN_VERBOSE=1``) and the one-engine rule
live in one place.
"""
from __future__ import annotations

import sys
import threading
import time
from dataclasses import dataclass
from functools import lru_cache
from typing import Callable

from . import cache, jit
from .decisions import resolve_config
from .log import ENV_VERBOSE, verbose  # noqa: F401  (kernels.verbose: the switch every module reads)
from .target import CpuTarget

OPT_LEVEL = 3


@dataclass(frozen=True)
class LoadedKernel:
    """A callable kernel: its symbol, address in this process and where it came from."""
    symbol: str
    address: int
    source: str  # "memory" | "disk" | "built"
    seconds: float


_loaded: dict[tuple, LoadedKernel] = {}
_lock = threading.RLock()
# Kernels this process brought into memory, by where they came from ("disk" | "built"):
# a training loop past its first step should add nothing here (its kernels follow from
# the layer shapes, see ``dfpgen.conv.exact_family``).
load_counts: dict[str, int] = {"disk": 0, "built": 0}


def load_kernel(symbol: str, key_fields: dict, ir_builder: Callable[[], str],
                target: CpuTarget) -> LoadedKernel:
    """Return the kernel ``symbol`` whose code is described by ``key_fields``.

    ``key_fields`` must contain everything that changes the generated code (spec, config,
    format...); the target, opt level and symbol are added here. ``ir_builder`` renders the
    IR and is called only when neither memory nor disk has the object.
    Raises :class:`dfpgen.DfpError` if the target cannot run on this host and
    :class:`dfpgen.KernelBuildError` if the IR is invalid.
    """
    target.require_executable()
    fields = {**key_fields, "symbol": symbol, "target": target.key(), "opt": OPT_LEVEL}
    mkey = (symbol, cache.kernel_key(fields))
    with _lock:
        hit = _loaded.get(mkey)
    if hit is not None:
        return hit
    t0 = time.perf_counter()

    def build() -> bytes:
        return jit.compile_ir(ir_builder(), cpu=target.compile_cpu, features=target.compile_features,
                              opt=OPT_LEVEL, name=symbol).obj

    obj, source = cache.get_or_build(fields, build)
    addr = jit.load(obj, [symbol])[symbol]
    k = LoadedKernel(symbol, addr, source, time.perf_counter() - t0)
    with _lock:
        if _loaded.setdefault(mkey, k) is k:
            load_counts[source] = load_counts.get(source, 0) + 1
    if verbose():
        print(f"dfpgen_verbose,kernel,{source},{symbol},{k.seconds * 1e3:.2f}ms", file=sys.stderr)
    return k


_cfuncs: dict[tuple, object] = {}


def cfunction(k: LoadedKernel, proto):
    """The ctypes callable of loaded kernel ``k`` with prototype ``proto`` (a
    ``ctypes.CFUNCTYPE``), made once per kernel address and prototype."""
    key = (k.symbol, k.address, proto)
    with _lock:
        fn = _cfuncs.get(key)
        if fn is None:
            fn = _cfuncs[key] = proto(k.address)
    return fn


# ----------------------------------------------------------------------------- conv kernels
# pass_kind -> "module:callable" building a kernel object from (spec, config, target, mode,
# has_bias). Another pass registers itself with ``register_builder``.
_BUILDERS: dict[str, str] = {"fwd": "dfpgen.fwd:ConvKernel", "bwd_data": "dfpgen.fwd:ConvKernel"}
_conv_kernels: dict[tuple, object] = {}
OVERFLOW_MODES = ("exact", "fast")


@lru_cache(maxsize=None)
def _target_key(target: CpuTarget) -> str:
    return repr(sorted(target.key().items(), key=str))


def register_builder(pass_kind: str, builder: str) -> None:
    """Register ``"module:callable"`` as the kernel builder of ``pass_kind``."""
    _BUILDERS[pass_kind] = builder


def _builder(pass_kind: str):
    from importlib import import_module
    from .errors import DfpError
    path = _BUILDERS.get(pass_kind)
    if path is None:
        raise DfpError(f"no kernel builder registered for pass {pass_kind!r}")
    mod, name = path.split(":")
    return getattr(import_module(mod), name)


def get_kernel(spec, config=None, *, overflow: str = "fast", target: CpuTarget | None = None,
               bias: bool = False, fma: bool = True):
    """The kernel object of a conv pass ``spec`` (memory -> disk via :func:`load_kernel` ->
    render + compile), scheduled by :func:`resolve_config`. Forward / backward-data return a
    :class:`dfpgen.fwd.ConvKernel` (``.parts``: one loaded kernel, or one per output phase).
    ``fma=False`` flushes with a separate multiply and add (needed only when the product scale
    2**(Ea+Eb) is a float32 subnormal). Raises :class:`dfpgen.DfpError` for an unknown
    overflow mode or an illegal config."""
    from .errors import DfpError
    if overflow not in OVERFLOW_MODES:
        raise DfpError(f"overflow must be one of {OVERFLOW_MODES}, got {overflow!r}")
    config, target = resolve_config(spec, config, overflow=overflow, target=target)
    key = (spec, config, overflow, bool(bias), bool(fma), _target_key(target))
    with _lock:
        hit = _conv_kernels.get(key)
    if hit is not None:
        return hit
    extra = {} if fma else {"fma": False}
    k = _builder(spec.pass_kind)(spec, config, target, overflow, bool(bias), **extra)
    with _lock:
        return _conv_kernels.setdefault(key, k)


def kernel_sources(spec, config=None, *, target: CpuTarget | None = None, overflow: str = "exact"
                   ) -> list[tuple[str, dict, str]]:
    """``[(symbol, plan dict, LLVM IR)]`` of the forward / backward-data kernel(s) of ``spec``
    (``dfpgen show``), without compiling."""
    from .plan import plan_fwd
    from .plan_bwd import plan_bwd_data
    from .render import render
    config, target = resolve_config(spec, config, overflow=overflow, target=target)
    if spec.pass_kind == "fwd":
        plans = [plan_fwd(spec, config, target, mode=overflow)[1]]
    elif spec.pass_kind == "bwd_data":
        plans = [p for _, p in plan_bwd_data(spec, config, target, mode=overflow).phases]
    else:
        from .errors import DfpError
        raise DfpError("kernel_sources covers fwd and bwd_data; see dfpgen.wgrad for bwd_weight")
    return [(p.symbol, p.describe(), render("conv_fwd.ll.j2", p=p)) for p in plans]
