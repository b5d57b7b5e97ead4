"""Work splitting over threads. Kernels take a work range [begin, end); ctypes releases the GIL
during the call, so a Python thread pool runs them in parallel. Each work item writes a
disjoint part of the output and sums in a fixed order, so results are bit-identical for any
thread count (docs/ARCHITECTURE.md §3)."""
from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

from .errors import DfpError

ENV_THREADS = "DFPGEN_NUM_THREADS"
_pool: ThreadPoolExecutor | None = None
_pool_size = 0
_lock = threading.Lock()
_override: int | None = None


def set_num_threads(n: int | None) -> None:
    """Force the thread count (``None`` returns to the default)."""
    global _override
    if n is not None and n < 1:
        raise ValueError(f"thread count must be >= 1, got {n}")
    _override = n


def num_threads() -> int:
    """``set_num_threads`` > ``$DFPGEN_NUM_THREADS`` > the CPUs this process may use."""
    if _override:
        return _override
    env = os.environ.get(ENV_THREADS)
    if env and env.strip():
        try:
            return max(1, int(env))
        except ValueError:
            raise DfpError(f"${ENV_THREADS} must be an integer thread count, got {env!r}") from None
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _get_pool(n: int) -> ThreadPoolExecutor:
    global _pool, _pool_size
    with _lock:
        if _pool is None or _pool_size < n:
            # The old pool is dropped, not shut down: another Python thread may be between
            # _get_pool and submit on it ("cannot schedule new futures after shutdown"). Its
            # idle workers exit once the last reference goes (sizes only grow: few pools).
            _pool = ThreadPoolExecutor(max_workers=n, thread_name_prefix="dfpgen")
            _pool_size = n
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
