"""Work splitting over threads. Kernels take a work range [begin, end); ctypes releases the GIL
during the call, so a Python thread pool runs them in parallel. Each work item writes a
disjoint part of the output and sums in a fixed order, so results are bit-identical for any
thread count (docs/ARCHITECTURE.md §3)."""
from __future__ import annotations

import operator
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

from . import env
from .errors import DfpError

ENV_THREADS = "DFPGEN_NUM_THREADS"
_pool: ThreadPoolExecutor | None = None
_pool_size = 0
_pool_pid = 0  # the process that made _pool: a forked child has none of its worker threads
_lock = threading.Lock()
_override: int | None = None


def set_num_threads(n: int | None) -> None:
    """Force the thread count; ``None`` or 0 returns to the default (as ``threads=0`` of the
    passes and ``$DFPGEN_NUM_THREADS=0``). Raises :class:`DfpError` for a negative or
    non-integer count."""
    global _override
    if n is not None:
        try:
            if isinstance(n, bool):
                raise TypeError
            n = operator.index(n)
        except TypeError:
            raise DfpError(f"thread count must be an integer >= 0 (0: the default), got {n!r}") from None
        if n < 0:
            raise DfpError(f"thread count must be an integer >= 0 (0: the default), got {n}")
    _override = n or None


def num_threads() -> int:
    """``set_num_threads`` > ``$DFPGEN_NUM_THREADS`` > the CPUs this process may use.

    ``$DFPGEN_NUM_THREADS`` takes what the API takes: an integer >= 0, 0 (or empty) meaning
    the default; anything else raises :class:`DfpError` naming the variable."""
    if _override:
        return _override
    n = env.integer(ENV_THREADS, 0, what="a thread count (an integer; 0: the default)")
    if n:
        return n
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


# Handing a range to a pool thread and waiting for it costs ~50-100 us in Python; 2**21 MACs
# take about that long, so a pass's default thread count gives each thread at least that many.
MIN_MACS_PER_THREAD = 1 << 21


def threads_for(macs: int) -> int:
    """The default thread count of a pass of ``macs`` multiply-accumulates: :func:`num_threads`,
    capped so that each thread gets at least ``MIN_MACS_PER_THREAD`` (a small layer runs on
    the calling thread)."""
    return max(1, min(num_threads(), macs // MIN_MACS_PER_THREAD))


def _get_pool(n: int) -> ThreadPoolExecutor:
    global _pool, _pool_size, _pool_pid
    with _lock:
        if _pool is None or _pool_size < n or _pool_pid != os.getpid():
            # The old pool is dropped, not shut down: another Python thread may be between
            # _get_pool and submit on it ("cannot schedule new futures after shutdown"). Its
            # idle workers exit once the last reference goes (sizes only grow: few pools).
            _pool = ThreadPoolExecutor(max_workers=n, thread_name_prefix="dfpgen")
            _pool_size, _pool_pid = n, os.getpid()
        return _pool


def split(total: int, parts: int) -> list[tuple[int, int]]:
    """``parts`` contiguous ranges covering [0, total), sizes differing by at most one."""
    parts = max(1, min(parts, total))
    base, extra = divmod(total, parts)
    out, b = [], 0
    for i in range(parts):
        e = b + base + (1 if i < extra else 0)
        out.append((b, e))
        b = e
    return out


def parallel_for(total: int, fn: Callable[[int, int], None], threads: int | None = None) -> None:
    """Run ``fn(begin, end)`` over a split of [0, total) on ``threads`` threads."""
    if total <= 0:
        return
    n = min(threads or num_threads(), total)
    if n <= 1:
        fn(0, total)
        return
    ranges = split(total, n)
    pool = _get_pool(n)
    futures = [pool.submit(fn, b, e) for b, e in ranges[1:]]
    fn(*ranges[0])
    for f in futures:
        f.result()


def parallel_call(fn, args: tuple, begin_at: int, total: int, threads: int | None = None,
                  per_thread: tuple[int, int] | None = None, results: bool = False):
    """Call kernel ``fn`` (a ctypes function) over a split of [0, total): its arguments are
    ``args`` with the work range ``(begin, end)`` inserted at position ``begin_at``.

    On the process's OpenMP team when one is attached (:mod:`dfpgen.openmp`), else on the
    Python pool; both split as :func:`split`. ``per_thread=(index, stride)``: the pointer
    argument at ``index`` (of the full argument list) moves ``stride`` bytes per range, for
    per-range counters. ``results=True`` returns the list of every range's return value
    (one per range). Returns None otherwise."""
    if total <= 0:
        return [] if results else None
    n = range_count(total, threads)
    full = list(args[:begin_at]) + [0, 0] + list(args[begin_at:])
    from . import openmp
    # read on every call, one thread or many: a bad $DFPGEN_THREADING stops any call
    if openmp.active() and n > 1:
        return openmp.run(fn, tuple(full), begin_at, total, n, per_thread, results)
    if n == 1:  # one range on the calling thread (a small tensor's pass): no closure, no pool
        full[begin_at + 1] = total
        out1 = fn(*full)
        return [out1] if results else None
    ranges = split(total, n)
    out = [0] * n

    def one(i: int, _end: int) -> None:  # parallel_for over the n ranges: item i is range i
        a = list(full)
        a[begin_at], a[begin_at + 1] = ranges[i]
        if per_thread is not None:
            idx, stride = per_thread
            a[idx] = _as_int(a[idx]) + i * stride
        out[i] = fn(*a)

    parallel_for(n, one, n)
    return out if results else None


def range_count(total: int, threads: int | None = None) -> int:
    """How many ranges :func:`parallel_call` splits ``total`` items into on ``threads``
    threads (None or 0: :func:`num_threads`): size per-range buffers with it."""
    return max(1, min(threads or num_threads(), total))


def _as_int(v) -> int:
    return int(v.value or 0) if hasattr(v, "value") else int(v)
