"""Exact overflow mode: the longest flush schedule that provably keeps every INT32 partial in range.

A partial of the forward pass for output channel k covers the channels c of one reduction
block and the taps t of one flush group (``dfpgen.reference`` order). Every running value
of the lane (checked after each ``vpdpwssd`` pair step) is a sub-sum of that partial, so

    |running partial| <= sum_{c in block, t in group} max_c |X| * |W[k, c, t]| =: B(k, block, group)

and ``max B <= 2**31 - 1`` proves the non-saturating kernel exact (the same with dY and K for
backward-data). ``max_c |X|`` is the per-channel max of the actual mantissas, which is much
tighter than the naive ``L * max|X| * max|W|`` (that bound gives one pair per partial for
DFP16, whose maxima sit in [2**14, 2**15)).

Where the activation has one sign (X after ReLU, or padding zeros and values >= 0) the
products can be split by sign: with ``x >= 0`` every running value is (positive products so
far) - (negative products so far), so it lies in ``[-B-, B+]`` with
``B+ = sum max_c|X| * max(W, 0)`` and ``B- = sum max_c|X| * max(-W, 0)``, and
``max(B+, B-) <= 2**31 - 1`` proves the kernel exact (``one_signed=True``). With weights of
both signs in every group that is about half of ``B``: partials about twice as long.

The schedule depends on the data only, never on the register blocking, so every tuning
config gives the same bits in exact mode. Candidates: ``c_block`` in 2 ... 128 (powers of
two, :func:`exact_blocks`) x ``flush_taps`` in R*S ... 1; among the proven ones the cheapest
for the kernel wins
(see ``exact_schedule``), ties to the larger block; blocks that cannot beat the best so far
are not evaluated. (2, 1)
(one pair per partial) always holds for mantissas within +/-32767 since 2 * 32767**2 < 2**31.

Backward-weight reduces over pixels instead, so its schedule is a flush interval in pixels
proven from per-pixel maxima (:func:`exact_flush`); this one module serves all three passes.
"""
from __future__ import annotations

import math
import threading
from functools import lru_cache

import numpy as np

from .dfp import INT32_MAX

# Estimated from the generated code for a 2 x 14 tile (28 vpdpwssd per pair step): about 15
# instructions of loop set-up per (tap, block) and about 100 per flush.
TAP_COST, FLUSH_COST = 0.5, 3.5
_BLOCKS = (128, 64, 32, 16, 8, 4, 2)


@lru_cache(maxsize=4096)
def _table_layout(out: int, red: int, blocks: tuple[int, ...]):
    """What :func:`_level_table` lays out for a (taps, out, red) operand, per shape: the
    table's lane count; per block (ascending) its index, its column slice and its lanes per
    output (``widths``); and the halving steps ``(half, odd, the block it completes or 0)``."""
    order = tuple(sorted(blocks))
    index, cols, widths, steps = {}, {}, {}, []
    at, size, width = 0, 1, red
    for i, b in enumerate(order):
        while size < b:
            half, odd = width // 2, width % 2
            width, size = half + odd, size * 2
            steps.append((half, odd, b if size == b else 0))
        index[b], widths[b] = i, width
        cols[b] = slice(at, at + out * width)
        at += out * width
    return at, index, cols, widths, tuple(steps)


_tls = threading.local()


def _scratch(name: str, shape: tuple[int, ...], dtype=np.float32) -> np.ndarray:
    """An uninitialised array from the calling thread's pool, reused by the next search on
    this thread: the operand and level tables of a 512 x 512 3x3 layer are ~20 MB, and fresh
    pages would cost a page fault per 4 KiB on every call. Valid until the thread's next
    :func:`exact_schedule` (nothing it returns refers to them)."""
    dtype = np.dtype(dtype)
    n = math.prod(shape) * dtype.itemsize  # Python ints: np.prod costs more than the lookup
    pool = getattr(_tls, "pool", None)
    if pool is None:
        pool = _tls.pool = {}
    raw = pool.get(name)
    if raw is None or raw.size < n:
        raw = pool[name] = np.empty(max(n, 1), np.uint8)
    return raw[:n].view(dtype).reshape(shape)


def release_scratch() -> None:
    """Free the calling thread's search buffers (they keep the largest layer's sizes)."""
    _tls.__dict__.pop("pool", None)


def _level_table(a: np.ndarray, blocks, table: np.ndarray | None = None,
                 outs: tuple[int, int] | None = None) -> tuple[np.ndarray, dict[int, slice]]:
    """Sums of ``a`` (T, OUT, RED) over reduction blocks of b channels for every b in
    ``blocks`` (powers of two, each >= 2), by pairwise halving (strided adds, about one
    pass over ``a`` in all), side by side in one (T, lanes) float32 table: block b's (OUT,
    nb) lanes are the columns ``cols[b]``, so a few whole-table reductions give every
    block's bounds. Each level is written in place into the table (no concatenation).
    ``table`` and ``outs = (o0, o1)``: fill only outputs o0..o1 of the given table from
    ``a[:, o0:o1]`` (every output's sums are its own, so the parts of a table filled by
    different threads are the values of one filled whole)."""
    taps, out, red = a.shape
    lanes, _, cols, widths, steps = _table_layout(out, red, tuple(blocks))
    if table is None:
        table = _scratch("table", (taps, lanes))
    o0, o1 = outs or (0, out)
    level = a[:, o0:o1]
    for i, (half, odd, done) in enumerate(steps):
        if done:
            nxt = table[:, cols[done]].reshape(taps, out, widths[done])[:, o0:o1]
        else:  # two scratch levels in turn: a level is read only by the next one
            nxt = _scratch(f"level{i % 2}", (taps, o1 - o0, half + odd))
        np.add(level[:, :, 0:2 * half:2], level[:, :, 1:2 * half:2], out=nxt[:, :, :half])
        if odd:  # the last block has no partner: it keeps its one value
            nxt[:, :, half] = level[:, :, -1]
        level = nxt
    return table, cols


# A search over at least this many weight entries splits its operand and level table over
# output channels on dfpgen's thread pool (numpy releases the GIL in these passes); a
# ResNet-50 step's searches read ~0.1-2.4 M entries each, ResNet-20's at most 37 K.
PARALLEL_ENTRIES = 1 << 18


def _operand_and_table(w_tor: np.ndarray, act_max: np.ndarray, blocks, one_signed: bool):
    """The bound operand (|w| * max|x|, or the sign-split B+ / B- lanes side by side), its
    level table (:func:`_level_table`) and, per block (ascending), the largest single entry
    and the largest lane total (float64 sum over taps in tap order) of the block's lanes.
    Filled in output-channel chunks on up to ``dfpgen.threads.num_threads()`` threads when
    the weight is large: every entry, sum and lane total is computed per output channel, and
    the per-block maxima combine exactly, so the values are those of one pass.
    Returns ``(table, singles, totals)``."""
    taps, out, red = w_tor.shape
    amax = act_max.astype(np.float32)[None, None, :]
    outs = 2 * out if one_signed else out
    lanes, _, cols, widths, _ = _table_layout(outs, red, tuple(blocks))
    order = sorted(blocks)
    table = _scratch("table", (taps, lanes))
    if one_signed:
        # B+ and B- of the module docstring: the positive and the negative products apart,
        # side by side as lanes (a schedule must fit both)
        both = _scratch("operand", (taps, 2, out, red))
        a = both.reshape(taps, 2 * out, red)
    else:
        a = _scratch("operand", (taps, out, red))

    def maxima(ranges) -> tuple[list[float], list[float]]:
        # per block: max entry and max lane total over the lanes of outputs in ``ranges``
        if ranges == ((0, outs),):  # the whole table: two reductions and a reduceat each
            if not lanes:
                return [0.0] * len(order), [0.0] * len(order)
            starts = [cols[b].start for b in order]
            if taps == 1:  # one row: its column sums are its own values (float32 -> float64 exact)
                singles = np.maximum.reduceat(table[0], starts).tolist()
                return singles, list(singles)
            return (np.maximum.reduceat(table.max(axis=0), starts).tolist(),
                    np.maximum.reduceat(_column_sums(table), starts).tolist())
        singles, totals = [], []
        for b in order:
            c0, w = cols[b].start, widths[b]
            parts = [table[:, c0 + o0 * w:c0 + o1 * w] for o0, o1 in ranges if o1 > o0]
            if not parts or not w:
                singles.append(0.0)
                totals.append(0.0)
                continue
            singles.append(max(float(p.max()) for p in parts))
            totals.append(singles[-1] if taps == 1 else max(float(_column_sums(p).max()) for p in parts))
        return singles, totals

    def fill(o0: int, o1: int, whole: bool = False):
        if one_signed:
            pos, neg = both[:, 0, o0:o1], both[:, 1, o0:o1]
            np.multiply(w_tor[:, o0:o1], amax, out=neg)
            np.maximum(neg, 0, out=pos)
            np.subtract(pos, neg, out=neg)  # max(-a, 0)
            ranges = ((o0, o1), (out + o0, out + o1))
        else:
            # |w| * max|x| = |w * max|x||: one relayout pass into C order, then abs in place
            part = a[:, o0:o1]
            np.multiply(w_tor[:, o0:o1], amax, out=part)
            np.abs(part, out=part)
            ranges = ((o0, o1),)
        for r in ranges:
            _level_table(a, blocks, table, r)
        return maxima(((0, outs),) if whole else ranges)

    from .threads import num_threads, parallel_for
    parts = min(num_threads(), out, w_tor.size // PARALLEL_ENTRIES) if w_tor.size >= PARALLEL_ENTRIES else 1
    if parts <= 1:
        singles, totals = fill(0, out, whole=True)
        return table, singles, totals
    bounds = [out * i // parts for i in range(parts + 1)]
    found = [None] * parts

    def run(b: int, e: int) -> None:
        for i in range(b, e):
            found[i] = fill(bounds[i], bounds[i + 1])

    parallel_for(parts, run, parts)
    singles = [max(f[0][j] for f in found) for j in range(len(order))]
    totals = [max(f[1][j] for f in found) for j in range(len(order))]
    return table, singles, totals


def _prefix(flat: np.ndarray) -> np.ndarray:
    """float64 (T + 1, lanes) prefix sums over the rows of float32 ``flat`` (T, lanes), one
    row add at a time (numpy's casting cumsum over axis 0 runs about 10x slower)."""
    pre = np.empty((flat.shape[0] + 1, flat.shape[1]), np.float64)
    pre[0] = 0.0
    for t in range(flat.shape[0]):
        np.add(pre[t], flat[t], out=pre[t + 1])
    return pre


def _column_sums(flat: np.ndarray) -> np.ndarray:
    """float64 (lanes,) sums over the rows of ``flat``, added in row order (the last row of
    :func:`_prefix`, bit for bit: a reduction over the outer axis of a C-ordered array adds
    whole rows in order; ``tests/test_exact_schedule.py`` checks it). Only the quick
    reject bound of :meth:`_GroupSums.fits` reads them, with a margin far above rounding."""
    return np.add.reduce(flat, axis=0, dtype=np.float64)


class _GroupSums:
    """Whether the sums over flush groups of ``ft`` taps of every (output, block) lane of one
    block's level (taps, lanes) fit a limit, for any ``ft``: most intervals are settled by
    two bounds from the level's largest single tap and largest lane total (:meth:`fits`);
    the rest from one float64 prefix sum over the taps, built on first need: each group's
    sum is one subtraction of two prefix rows, so an interval costs a few whole-array numpy
    calls (not a Python loop over its groups and taps). No matrix product: numpy hands those to its
    BLAS, whose worker threads then spin for a while after every call, taking a core from
    the kernel threads (measured: a 2-thread forward of res4_branch2b ran at the speed of one
    thread).

    Rounding: the prefix sums add at most ``taps`` non-negative float32 values in float64, so
    each computed group sum is within ``slack`` (absolute; ``taps * 2**-51`` of the largest
    prefix, far below one unit at INT32 scale) of the exact sum of the float32 values; the
    caller compares ``max + slack`` against its shrunk limit."""

    def __init__(self, flat: np.ndarray, single: float, total: float):
        # flat: (taps, lanes); single: its largest entry; total: its largest column sum
        self.taps = flat.shape[0]
        self.flat, self.single, self.total = flat, single, total
        self.prefix = None
        self.slack = self.taps * 2.0 ** -51 * total

    def fits(self, ft: int, limit: float) -> bool:
        """Whether every group of ``ft`` taps has ``max + slack <= limit`` (``ft == 1``: the
        single-tap maximum, which carries no prefix rounding). Two bounds decide most
        intervals without evaluating the groups, and agree with the evaluation: a lane's groups
        sum to its total, so the largest group is at least ``total / groups`` (rejects, with
        a margin far above the prefix rounding); a group is at most ``ft`` single taps
        (accepts, with twice the slack)."""
        if ft == 1:
            return self.single <= limit
        if self.total / -(-self.taps // ft) * (1.0 - 1e-9) > limit:
            return False
        if ft * self.single + 2.0 * self.slack <= limit:
            return True
        return self.max(ft) + self.slack <= limit

    def max(self, ft: int) -> float:
        """The largest computed group sum over ``ft``-tap groups (``slack`` not included)."""
        flat, taps = self.flat, self.taps
        if flat.shape[1] == 0:
            return 0.0
        if ft == 1:
            return self.single
        if self.prefix is None:
            self.prefix = _prefix(flat)
        pre = self.prefix
        # full groups as two strided views of the prefix rows (no gather copies), then the
        # shorter last group
        full = taps // ft * ft
        best = float(np.subtract(pre[ft:full + 1:ft], pre[0:full - ft + 1:ft]).max())
        if full < taps:
            best = max(best, float(np.subtract(pre[taps], pre[full]).max()))
        return best


def score(block: int, ft: int, tap_density: float = 1.0) -> float:
    """The cost model ``exact_schedule`` ranks proven schedules by: the useful fraction of a
    kernel's work per partial, in pair steps (one ``vpdpwssd`` per accumulator): block/2 per
    tap met, plus ``TAP_COST`` per tap (loop set-up) and ``FLUSH_COST`` per flush (convert,
    scale, add, store of every accumulator)."""
    met = max(1.0, ft * tap_density)
    return met * block / 2 / (met * (block / 2 + TAP_COST) + FLUSH_COST)


def exact_blocks(red: int) -> tuple[int, ...]:
    """The ``c_block`` values exact mode may pick for ``red`` reduction channels, largest
    first (a block covering every channel makes larger ones the same schedule). The flush
    group length is a run-time argument of the kernels, so these blocks are all the kernels
    one pass of a layer shape can need, whatever its data."""
    redp = red + red % 2
    return tuple(b for b in _BLOCKS if b == 2 or b // 2 < redp)


def exact_schedule(w_tor: np.ndarray, act_max: np.ndarray, tap_density: float = 1.0,
                   one_signed: bool = False) -> tuple[int, int]:
    """``(c_block, flush_taps)`` for exact mode.

    ``w_tor``: weight mantissas as (R*S, OUT, RED) integers, any strides and signs (taps in
    reference order; OUT = output channels of the pass, RED = reduction channels; a view of
    the KRSC buffer needs no copy); ``act_max``: (RED,) per-channel max |mantissa| of the
    activation operand (X forward, dY backward-data); ``tap_density``: the fraction of a
    flush group's taps one kernel meets (backward-data with stride u runs phases that meet
    about 1/(u_h u_w) of them); ``one_signed``: every activation mantissa has the same sign
    (or is 0), which proves with the sign-split bound of the module docstring (``w_tor`` must
    then be signed). Among the proven schedules it picks the one whose kernel
    spends the largest fraction of its time in dot products (:func:`score`, a cost model of
    loop set-up per tap and of flushes); ties go to the larger block. A weight of at least
    ``PARALLEL_ENTRIES`` entries has its bound operand and level table filled on up to
    ``dfpgen.threads.num_threads()`` threads (same values, so the same pick).
    """
    taps, out, red = w_tor.shape
    # float32 halves the memory traffic of this (per-call) search. Every sum is of
    # non-negative terms: products rounded once, <= 8 pairwise-halving levels (blocks up to
    # 128), so each float32 level sum is within gamma_n = n u / (1 - n u) of the true one
    # (Higham 2002, §3.1; u = 2**-24, n = 9 here, taps + 9 kept as margin); the group sums
    # over taps are float64 prefix differences, within _GroupSums.slack of the exact sum of
    # those level values. Comparing (computed + slack) against a limit shrunk by 2 n u keeps
    # the proof: true <= (computed + slack) (1 + gamma_n) <= INT32_MAX.
    limit = INT32_MAX * (1.0 - 2.0 * (taps + 9) * 2.0 ** -24)
    blocks = exact_blocks(red)  # descending
    table, singles, totals = _operand_and_table(w_tor, act_max, blocks, one_signed)
    if one_signed:
        out = 2 * out  # the B+ and B- lanes
    _, index, cols, _, _ = _table_layout(out, red, blocks)
    sums: dict[int, _GroupSums] = {}

    def fits(block: int, ft: int) -> bool:
        g = sums.get(block)
        if g is None:  # built on first need: most blocks are settled by the ranks alone
            i = index[block]
            g = sums[block] = _GroupSums(table[:, cols[block]], singles[i], totals[i])
        return g.fits(ft, limit)

    rank = _ranks(taps, blocks, tap_density)
    best, best_score = (2, 1), rank[2, 1]
    for block in blocks:
        if rank[block, taps] <= best_score:
            continue  # even all taps in one partial cannot beat the best so far
        if not fits(block, 1):
            continue  # even single taps overflow with blocks this large
        total = totals[index[block]]
        for ft in range(taps, 0, -1):
            if rank[block, ft] <= best_score:
                break
            if ft > 1 and total / -(-taps // ft) * (1.0 - 1e-9) > limit:
                continue  # _GroupSums.fits's quick reject, inline: most intervals end here
            if fits(block, ft):
                best, best_score = (block, ft), rank[block, ft]
                break
    return best


@lru_cache(maxsize=1024)
def _ranks(taps: int, blocks: tuple[int, ...], tap_density: float) -> dict[tuple[int, int], float]:
    """:func:`score` of every candidate ``(block, flush_taps)`` of a layer shape (and of
    (2, 1), the schedule that always holds), computed once per shape."""
    out = {(2, 1): score(2, 1, tap_density)}
    for b in blocks:
        for ft in range(1, taps + 1):
            out[b, ft] = score(b, ft, tap_density)
    return out


# ----------------------------------------------------------------------------- backward-weight
def exact_flush(a_pix: np.ndarray, b_pix: np.ndarray) -> int:
    """Largest power-of-two flush interval (pixels, even) whose INT32 partials provably fit.

    ``a_pix[m] >= max_c |X_rs[m, c]|`` over all taps and ``b_pix[m] = max_k |dY[m, k]|``:
    every partial over a chunk of pixels is at most ``sum_chunk a_pix * b_pix`` (triangle
    inequality), so chunks whose such sums are <= 2**31 - 1 cannot overflow. This is never looser
    than ``flush * max|X| * max|dY| <= 2**31 - 1`` and far tighter on sparse (ReLU) data.
    Wrapping INT32 adds make intermediate overflow harmless: only the partial must fit.
    """
    # chunk sums for f = 2, 4, 8, ... by pairwise halving (chunks [0, f), [f, 2f), ...; the
    # last one shorter): about one pass over the pixels in all, stopping at the first overflow
    level = a_pix.reshape(-1).astype(np.int64) * b_pix.reshape(-1)
    best, f = 2, 1
    while True:
        if level.size % 2:
            level = np.append(level, 0)
        level = level[0::2] + level[1::2]
        f *= 2
        if level.max(initial=0) > INT32_MAX:
            return best
        best = f
        if level.size <= 1:
            return best
