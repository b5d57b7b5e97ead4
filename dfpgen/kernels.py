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
from typing import Callable

from . import cache, jit
from .log import verbose
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
