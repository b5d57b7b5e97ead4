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

from functools import partial

import numpy as np

from .dfp import INT32_MAX

# Estimated from the generated code for a 2 x 14 tile (28 vpdpwssd per pair step): about 15
# instructions of loop set-up per (tap, block) and about 100 per flush.
TAP_COST, FLUSH_COST = 0.5, 3.5
_BLOCKS = (128, 64, 32, 16, 8, 4, 2)


def _levels(a: np.ndarray, blocks) -> dict[int, np.ndarray]:
    """Sums of ``a`` (T, OUT, RED) over reduction blocks of b channels for every b in
    ``blocks`` (powers of two), (T, OUT, nb) each, by pairwise halving: strided adds, about
    one pass over ``a`` in all."""
    out = {}
    level, size = a, 1
    for b in sorted(blocks):
        while size < b:
            if level.shape[2] % 2:
                level = np.concatenate([level, np.zeros_like(level[:, :, :1])], axis=2)
            level = level[:, :, 0::2] + level[:, :, 1::2]
            size *= 2
        out[b] = level
    return out


# largest (taps + 1)**2 x lanes table of all group sums _GroupSums builds at once (2 MB)
PAIR_TABLE_ELEMS = 1 << 18


class _GroupSums:
    """The largest sum over one flush group of ``ft`` taps of any (output, block) lane of
    ``level`` (taps, OUT, nb), for any ``ft``, from one float64 prefix sum over the taps:
    each group's sum is one subtraction of two prefix rows, so a flush interval costs a few
    whole-array numpy calls (not a Python loop over its groups and taps) and only the
    intervals the search visits are evaluated. No matrix product: numpy hands those to its
    BLAS, whose worker threads then spin for a while after every call, taking a core from
    the kernel threads (measured: a 2-thread forward of res4_branch2b ran at the speed of one
    thread).

    Rounding: the prefix sums add at most ``taps`` non-negative float32 values in float64, so
    each computed group sum is within ``slack`` (absolute; ``taps * 2**-51`` of the largest
    prefix, far below one unit at INT32 scale) of the exact sum of the float32 values; the
    caller compares ``max + slack`` against its shrunk limit."""

    def __init__(self, level: np.ndarray):
        taps = level.shape[0]
        self.taps = taps
        self.flat = level.reshape(taps, -1)
        self.prefix = None
        self.pairs = None
        self.slack = 0.0

    def max(self, ft: int) -> float:
        flat = self.flat
        if flat.shape[1] == 0:
            return 0.0
        if ft == 1:
            return float(flat.max())
        if self.prefix is None:
            self.prefix = np.zeros((self.taps + 1, flat.shape[1]), np.float64)
            np.cumsum(flat, axis=0, dtype=np.float64, out=self.prefix[1:])
            self.slack = self.taps * 2.0 ** -51 * float(self.prefix[-1].max())
            if (self.taps + 1) ** 2 * flat.shape[1] <= PAIR_TABLE_ELEMS:
                # small layers: every (first tap, end tap) group at once, then any interval
                # is a few lookups (the search visits up to ~20 of them per call)
                pre = self.prefix
                self.pairs = (pre[None, :, :] - pre[:, None, :]).max(axis=2).tolist()
        if self.pairs is not None:
            taps, pairs = self.taps, self.pairs
            return max(pairs[t0][min(t0 + ft, taps)] for t0 in range(0, taps, ft)) + self.slack
        # full groups as two strided views of the prefix rows (no gather copies), then the
        # shorter last group
        pre, taps = self.prefix, self.taps
        full = taps // ft * ft
        best = float(np.subtract(pre[ft:full + 1:ft], pre[0:full - ft + 1:ft]).max())
        if full < taps:
            best = max(best, float(np.subtract(pre[taps], pre[full]).max()))
        return best + self.slack


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
    loop set-up per tap and of flushes); ties go to the larger block.
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
    # |w| * max|x| = |w * max|x||: one relayout pass into C order, then abs in place
    a = np.multiply(w_tor, act_max.astype(np.float32)[None, None, :], dtype=np.float32, order="C")
    blocks = exact_blocks(red)  # descending
    if one_signed:
        # B+ and B- of the module docstring: the positive and the negative products apart
        pos = np.maximum(a, 0)
        np.subtract(pos, a, out=a)  # max(-a, 0), in place
        parts = [_levels(pos, blocks), _levels(a, blocks)]
    else:
        np.abs(a, out=a)
        parts = [_levels(a, blocks)]

    sums: dict[int, list[_GroupSums]] = {}

    def group_max(block: int, ft: int) -> float:
        hit = sums.get(block)
        if hit is None:
            hit = sums[block] = [_GroupSums(lv[block]) for lv in parts]
        return max(g.max(ft) for g in hit)

    rank = partial(score, tap_density=tap_density)
    best, best_score = (2, 1), rank(2, 1)
    for block in blocks:
        if rank(block, taps) <= best_score:
            continue  # even all taps in one partial cannot beat the best so far
        single = group_max(block, 1)
        if single > limit:
            continue  # even single taps overflow with blocks this large
        for ft in range(taps, 0, -1):
            if rank(block, ft) <= best_score:
                break
            if ft == 1 or group_max(block, ft) <= limit:
                best, best_score = (block, ft), rank(block, ft)
                break
    return best


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
