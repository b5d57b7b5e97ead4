"""LLVM IR -> object code -> callable address. The only module that owns llvmlite state.

``compile_ir`` is pure (IR text in, object bytes out) so the cache can store its result;
``load`` adds object code to the process's single MCJIT engine. One engine per process:
``create_mcjit_compiler(module, tm)`` takes ownership of ``tm`` and a TargetMachine reused for
a second engine crashes the process (llvmlite 0.50 / LLVM 22).
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass

import llvmlite
import llvmlite.binding as llvm

from .errors import KernelBuildError

_init_lock = threading.RLock()
_initialized = False
_engine = None
_loaded: dict[str, int] = {}


def _ensure_init() -> None:
    global _initialized
    with _init_lock:
        if not _initialized:
            llvm.initialize_native_target()
            llvm.initialize_native_asmprinter()
            llvm.initialize_native_asmparser()  # inline assembly (the AVX2 peak loop)
            _initialized = True


def llvm_versions() -> dict:
    """``{"llvm": "22.1.0", "llvmlite": "0.50.0"}`` for cache keys and ``dfpgen info``."""
    return {"llvm": ".".join(map(str, llvm.llvm_version_info)), "llvmlite": llvmlite.__version__}


def host_cpu() -> tuple[str, str]:
    """``(cpu_name, feature_string)`` of the host as LLVM sees it (e.g. ``znver4``, ``+avx512vnni,...``)."""
    _ensure_init()
    return llvm.get_host_cpu_name(), llvm.get_host_cpu_features().flatten()


def target_machine(cpu: str, features: str, opt: int = 3):
    """A fresh TargetMachine for the host triple. Callers must not share one between engines."""
    _ensure_init()
    target = llvm.Target.from_default_triple()
    # reloc="static": with "pic" the large code model reaches constant pools and globals
    # through GOT-relative (GOTOFF64) relocations, which RuntimeDyld resolves against the first
    # object's GOT, so every object loaded after it read wrong constants (seen: a kernel's tap
    # table shifted once another kernel was loaded first). Static + large = absolute addresses.
    return target.create_target_machine(cpu=cpu, features=features, opt=opt,
                                        reloc="static", codemodel="jitdefault")


def _parse(ir: str, name: str):
    _ensure_init()
    try:
        mod = llvm.parse_assembly(ir)
        mod.verify()
    except RuntimeError as exc:
        raise KernelBuildError(f"generated IR for {name!r} does not parse/verify: {exc}") from exc
    mod.name = name
    return mod


def _optimize(mod, tm, opt: int) -> None:
    pto = llvm.create_pipeline_tuning_options(speed_level=opt)
    pb = llvm.create_pass_builder(tm, pto)
    pb.getModulePassManager().run(mod, pb)


@dataclass(frozen=True)
class CompileResult:
    """Object code of one module plus how long LLVM took (seconds)."""
    obj: bytes
    seconds: float


def compile_ir(ir: str, *, cpu: str, features: str, opt: int = 3, name: str = "dfpgen") -> CompileResult:
    """Parse, verify, optimise (LLVM new pass manager at ``opt``) and emit an ELF object.

    Raises :class:`KernelBuildError` when the IR is invalid.
    """
    t0 = time.perf_counter()
    mod = _parse(ir, name)
    tm = target_machine(cpu, features, opt)
    if opt > 0:
        _optimize(mod, tm, opt)
    obj = tm.emit_object(mod)
    return CompileResult(obj=bytes(obj), seconds=time.perf_counter() - t0)


def emit_assembly(ir: str, *, cpu: str, features: str, opt: int = 3, name: str = "dfpgen") -> str:
    """The optimised assembly of ``ir`` (what ``dfpgen show --asm`` prints)."""
    mod = _parse(ir, name)
    tm = target_machine(cpu, features, opt)
    if opt > 0:
        _optimize(mod, tm, opt)
    return tm.emit_assembly(mod)


# Scalar moves: a stack slot they touch holds one float or integer (a kernel argument such as
# the flush scale, kept across the loop nest like the general-purpose registers LLVM also
# spills there), not a vector of the register blocking.
_SCALAR_MOVES = ("vmovss", "vmovsd", "vmovd", "vmovq", "movss", "movsd", "movd", "movq")


def vector_spills(asm: str) -> list[str]:
    """The lines of x86 AT&T ``asm`` that store a vector register to the stack or load one
    from it: any ``ymm`` / ``zmm`` operand next to an ``(%rsp)`` address, or an ``xmm`` one
    moved by a full-vector instruction. Scalar moves through ``xmm`` (``vmovss``, ``vmovd``
    ...) are not counted: those slots hold one value, not a vector of the blocking."""
    out = []
    for ln in asm.splitlines():
        if "(%rsp)" not in ln:
            continue
        mnemonic = ln.split()[0]
        if "%ymm" in ln or "%zmm" in ln or ("%xmm" in ln and mnemonic not in _SCALAR_MOVES):
            out.append(ln)
    return out


def optimized_ir(ir: str, *, cpu: str, features: str, opt: int = 3, name: str = "dfpgen") -> str:
    """The IR after LLVM's optimisation pipeline (for reading what LLVM did to a kernel)."""
    mod = _parse(ir, name)
    if opt > 0:
        _optimize(mod, target_machine(cpu, features, opt), opt)
    return str(mod)


def _get_engine():
    global _engine
    with _init_lock:
        if _engine is None:
            cpu, features = host_cpu()
            # The engine owns this TargetMachine; never hand it to anyone else.
            tm = target_machine(cpu, features, 3)
            _engine = llvm.create_mcjit_compiler(llvm.parse_assembly(""), tm)
        return _engine


def load(obj: bytes, symbols: list[str] | tuple[str, ...]) -> dict[str, int]:
    """Add object code to the process's engine and return ``{symbol: address}``.

    Symbols already loaded (same name -> same content, since names carry the content hash)
    are returned without loading twice. Raises :class:`KernelBuildError` if a symbol is missing.
    """
    with _init_lock:
        missing = [s for s in symbols if s not in _loaded]
        if missing:
            eng = _get_engine()
            eng.add_object_file(llvm.ObjectFileRef.from_data(obj))
            eng.finalize_object()
            for s in missing:
                addr = eng.get_function_address(s)
                if not addr:
                    raise KernelBuildError(f"symbol {s!r} not found in loaded object code")
                _loaded[s] = addr
        return {s: _loaded[s] for s in symbols}
