"""Run a kernel's work range on the OpenMP thread team of the process (the one PyTorch uses).

Why: PyTorch's CPU ops run on an OpenMP team (libgomp in the pip wheels) whose threads
spin for a while after every parallel region before they sleep (``OMP_WAIT_POLICY`` /
``GOMP_SPINCOUNT``, libgomp manual). A separate pool of dfpgen threads then competes with
spinning OpenMP threads for the same cores: on a 2-core machine a DFP16 ResNet-20 step ran
about 25% faster with ``OMP_WAIT_POLICY=PASSIVE`` (benchmarks/RESULTS.md). Handing the
work range to the same team instead turns that spin into a fast hand-off: the thread that
just finished a PyTorch op picks up the kernel's range at once, and no core is shared.

How: for each kernel prototype, a small generated function (LLVM IR, compiled once per
prototype and process) is the ``GOMP_parallel`` body: it reads the kernel's address and
arguments from a job array of 64-bit slots, computes its thread's part of ``[0, total)``
with :func:`dfpgen.threads.split`'s rule (the same ranges as the Python pool, so the
same bits), and calls the kernel with that ``(begin, end)``. One ctypes call from Python
(the GIL released) runs the whole team.

The core package never loads an OpenMP runtime itself: :func:`attach` takes one that is
already in the process (``dfpgen.runtime`` attaches PyTorch's at import). Without one, in a
forked child of the process that attached (libgomp's team does not survive ``fork``), or
with ``DFPGEN_THREADING=python``, :func:`dfpgen.threads.parallel_call` uses the Python
thread pool.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import struct
import threading

from . import env
from .errors import DfpError

ENV_THREADING = "DFPGEN_THREADING"
THREADING_CHOICES = ("openmp", "python")
_RUNTIME_NAMES = ("libgomp", "libiomp", "libomp")  # GNU, Intel and LLVM OpenMP runtimes

_lock = threading.Lock()
_attached: dict | None = None  # {"path", "pid"} once attach() succeeded
_launchers: dict[tuple, object] = {}

# job header slots; the kernel's arguments follow
_FN, _TOTAL, _RESULTS, _PT_INDEX, _PT_STRIDE, _ARGS = range(6)


def loaded_runtime() -> str | None:
    """The path of an OpenMP runtime already mapped into this process (Linux: read from
    ``/proc/self/maps``), or None."""
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                path = line.rsplit(None, 1)[-1] if line.count(" ") >= 5 else ""
                base = os.path.basename(path)
                if base.startswith(_RUNTIME_NAMES) and ".so" in base:
                    return path
    except OSError:
        return None
    return None


def attach(path: str | None = None) -> bool:
    """Use the OpenMP runtime at ``path`` (default: :func:`loaded_runtime`) for dfpgen's
    parallel kernels. Returns whether one is attached. Loading an already-mapped library
    by its path gives the same instance (and thread team) as its first user's. Raises
    :class:`DfpError` when ``path`` is given but is not an OpenMP runtime."""
    global _attached
    from llvmlite import binding as llvm
    path = path or loaded_runtime()
    if path is None:
        return False
    try:
        lib = ctypes.CDLL(path)
        syms = {name: ctypes.cast(getattr(lib, name), ctypes.c_void_p).value
                for name in ("GOMP_parallel", "omp_get_thread_num", "omp_get_num_threads")}
    except (OSError, AttributeError) as exc:
        raise DfpError(f"{path} is not a usable OpenMP runtime: {exc}") from None
    with _lock:
        for name, addr in syms.items():
            llvm.add_symbol(name, addr)
        _attached = {"path": path, "pid": os.getpid(), "lib": lib}
    return True


def active() -> bool:
    """Whether :func:`dfpgen.threads.parallel_call` runs on the OpenMP team now: attached in
    this very process (not a forked child) and not switched off by ``$DFPGEN_THREADING``."""
    mode = threading_mode()  # checked first: a bad value is an error, team or no team
    if _attached is None or _attached["pid"] != os.getpid():
        return False
    return mode == "openmp"


def threading_mode() -> str:
    """``$DFPGEN_THREADING``: ``openmp`` (default: the attached OpenMP team when there is
    one) or ``python`` (dfpgen's own thread pool); anything else raises :class:`DfpError`
    naming the variable."""
    return env.choice(ENV_THREADING, THREADING_CHOICES) or "openmp"


def describe() -> str:
    """One line on where parallel kernels run in this process (``dfpgen info``, the verbose
    log). Raises :class:`DfpError` for a bad ``$DFPGEN_THREADING``."""
    if threading_mode() == "python":
        return "python pool ($DFPGEN_THREADING=python)"
    if active():
        return f"openmp team of {attached_path()}"
    return ("python pool here (no OpenMP runtime loaded); import dfpgen.runtime runs kernels on "
            "PyTorch's OpenMP team")


def attached_path() -> str | None:
    """The attached runtime's path (None when none is)."""
    return None if _attached is None else _attached["path"]


# ----------------------------------------------------------------------------- launchers
_KINDS = {ctypes.c_void_p: "ptr", ctypes.c_int64: "i64", ctypes.c_int32: "i32", ctypes.c_uint32: "i32",
          ctypes.c_float: "float", ctypes.c_double: "double"}
_RET = {None: "void", ctypes.c_uint32: "u32", ctypes.c_int32: "i32", ctypes.c_int64: "i64"}
_WIDEN = {"u32": "zext i32 %r to i64", "i32": "sext i32 %r to i64", "i64": "add i64 %r, 0"}


def _signature(proto, begin_at: int) -> tuple:
    try:
        kinds = tuple(_KINDS[t] for t in proto._argtypes_)
        ret = _RET[proto._restype_]
    except KeyError as exc:
        raise DfpError(f"no OpenMP launcher for argument type {exc.args[0]!r}") from None
    if kinds[begin_at:begin_at + 2] != ("i64", "i64"):
        raise DfpError(f"kernel arguments {begin_at} and {begin_at + 1} must be the int64 work range")
    return kinds, ret, begin_at


def _launcher_ir(kinds: tuple, ret: str, begin_at: int, name: str) -> str:
    """The ``GOMP_parallel`` body and its entry ``void <name>(ptr job, i32 threads)``."""
    lines = [
        "declare void @GOMP_parallel(ptr, ptr, i32, i32)",
        "declare i32 @omp_get_thread_num()",
        "declare i32 @omp_get_num_threads()",
        f"define internal void @{name}_body(ptr %job) {{",
        "entry:",
        "  %tid32 = call i32 @omp_get_thread_num()",
        "  %n32 = call i32 @omp_get_num_threads()",
        "  %tid = sext i32 %tid32 to i64",
        "  %n = sext i32 %n32 to i64",
        f"  %totp = getelementptr i64, ptr %job, i64 {_TOTAL}",
        "  %total = load i64, ptr %totp, align 8",
        # threads.split: the first `extra` ranges are one longer
        "  %base = udiv i64 %total, %n",
        "  %extra = urem i64 %total, %n",
        "  %lt = icmp ult i64 %tid, %extra",
        "  %minx = select i1 %lt, i64 %tid, i64 %extra",
        "  %b0 = mul i64 %tid, %base",
        "  %begin = add i64 %b0, %minx",
        "  %one = zext i1 %lt to i64",
        "  %len = add i64 %base, %one",
        "  %end = add i64 %begin, %len",
        "  %empty = icmp eq i64 %len, 0",
        "  br i1 %empty, label %done, label %work",
        "work:",
        f"  %fnp = getelementptr i64, ptr %job, i64 {_FN}",
        "  %fni = load i64, ptr %fnp, align 8",
        "  %fn = inttoptr i64 %fni to ptr",
        f"  %ptip = getelementptr i64, ptr %job, i64 {_PT_INDEX}",
        "  %pti = load i64, ptr %ptip, align 8",
        f"  %ptsp = getelementptr i64, ptr %job, i64 {_PT_STRIDE}",
        "  %pts = load i64, ptr %ptsp, align 8",
        "  %ptoff = mul i64 %pts, %tid",
    ]
    args = []
    for i, kind in enumerate(kinds):
        if i == begin_at:
            args.append("i64 %begin")
            continue
        if i == begin_at + 1:
            args.append("i64 %end")
            continue
        lines += [f"  %p{i} = getelementptr i64, ptr %job, i64 {_ARGS + i}",
                  f"  %s{i} = load i64, ptr %p{i}, align 8"]
        if kind == "ptr":
            # the one per-thread pointer argument (if any) moves by tid * stride bytes
            lines += [f"  %is{i} = icmp eq i64 %pti, {i}",
                      f"  %o{i} = select i1 %is{i}, i64 %ptoff, i64 0",
                      f"  %q{i} = add i64 %s{i}, %o{i}",
                      f"  %a{i} = inttoptr i64 %q{i} to ptr"]
        elif kind == "i64":
            lines.append(f"  %a{i} = add i64 %s{i}, 0")
        elif kind == "i32":
            lines.append(f"  %a{i} = trunc i64 %s{i} to i32")
        elif kind == "float":
            lines += [f"  %t{i} = trunc i64 %s{i} to i32", f"  %a{i} = bitcast i32 %t{i} to float"]
        else:
            lines.append(f"  %a{i} = bitcast i64 %s{i} to double")
        args.append(f"{kind} %a{i}")
    call = f"call {'i32' if ret == 'u32' else ret} %fn({', '.join(args)})"
    if ret == "void":
        lines.append(f"  {call}")
    else:
        lines += [f"  %r = {call}",
                  "  %r64 = " + _WIDEN[ret],
                  f"  %resp = getelementptr i64, ptr %job, i64 {_RESULTS}",
                  "  %resi = load i64, ptr %resp, align 8",
                  "  %res = inttoptr i64 %resi to ptr",
                  "  %noout = icmp eq i64 %resi, 0",  # results not asked for
                  "  br i1 %noout, label %done, label %keep",
                  "keep:",
                  "  %slot = getelementptr i64, ptr %res, i64 %tid",
                  "  store i64 %r64, ptr %slot, align 8"]
    lines += ["  br label %done", "done:", "  ret void", "}",
              f"define void @{name}(ptr %job, i32 %threads) {{",
              f"  call void @GOMP_parallel(ptr @{name}_body, ptr %job, i32 %threads, i32 0)",
              "  ret void", "}"]
    return "\n".join(lines) + "\n"


_ENTRY = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_int32)


def launcher(proto, begin_at: int):
    """``(entry, argument kinds)`` for kernels of ctypes prototype ``proto`` whose work range
    is arguments ``begin_at, begin_at + 1``; the compiled entry is ``entry(job_address,
    threads)``."""
    hit = _launchers.get((proto, begin_at))
    if hit is not None:
        return hit
    sig = _signature(proto, begin_at)
    from . import jit
    name = "dfpgen_omp_" + hashlib.sha1(repr(sig).encode()).hexdigest()[:16]
    ir = _launcher_ir(*sig, name)
    # generic x86-64 code: the body only moves arguments; the kernel carries the ISA
    obj = jit.compile_ir(ir, cpu="x86-64", features="", opt=2, name=name).obj
    addr = jit.load(obj, [name])[name]
    with _lock:
        hit = _launchers.setdefault((proto, begin_at), (_ENTRY(addr), sig[0]))
    return hit


def _slot(kind: str, value) -> int:
    if isinstance(value, ctypes._SimpleCData):
        value = value.value
    if kind == "ptr":
        return int(value or 0)
    if kind in ("i64", "i32"):
        return int(value)
    if kind == "float":  # as ctypes converts: out-of-range values become +-inf
        return struct.unpack("<I", bytes(ctypes.c_float(value)))[0]
    return struct.unpack("<q", struct.pack("<d", value))[0]


def run(fn, args: tuple, begin_at: int, total: int, threads: int,
        per_thread: tuple[int, int] | None = None, results: bool = False) -> list[int] | None:
    """Call kernel ``fn`` (a ctypes function) with ``args`` (its arguments, the work range's
    two slots included as placeholders) on ``threads`` OpenMP threads, each with its part of
    ``[0, total)`` at ``begin_at``. ``per_thread=(index, stride)``: pointer argument ``index``
    moves ``stride`` bytes per thread. ``results``: return each thread's return value.
    Should the runtime give a smaller team (``OMP_THREAD_LIMIT``, ``OMP_DYNAMIC``), the ranges
    split ``total`` over that team and the missing threads' results read 0; every dfpgen
    kernel writes disjoint outputs per range, so the bits do not change."""
    entry, kinds = launcher(type(fn), begin_at)
    if len(args) != len(kinds):  # as ctypes would refuse the call
        raise DfpError(f"kernel takes {len(kinds)} arguments, got {len(args)}")
    if per_thread and kinds[per_thread[0]] != "ptr":
        raise DfpError(f"per-thread argument {per_thread[0]} is not a pointer")
    job = (ctypes.c_int64 * (_ARGS + len(kinds)))()
    job[_FN] = ctypes.cast(fn, ctypes.c_void_p).value
    job[_TOTAL] = total
    out = (ctypes.c_int64 * threads)() if results else None
    job[_RESULTS] = ctypes.addressof(out) if results else 0
    job[_PT_INDEX], job[_PT_STRIDE] = per_thread if per_thread else (-1, 0)
    for i, (kind, value) in enumerate(zip(kinds, args)):
        if begin_at <= i <= begin_at + 1:
            continue
        job[_ARGS + i] = _slot(kind, value)
    entry(ctypes.addressof(job), threads)
    return list(out) if results else None
