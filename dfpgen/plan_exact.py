"""Exact overflow mode: the longest flush schedule that provably keeps every INT32 partial in range.

A partial of the forward pass for output channel k covers the channels c of one reduction
block and the taps t of one flush group (``dfpgen.reference`` order). Every running value
of the lane (checked after each ``vpdpwssd`` pair step) is a sub-sum of that partial, so

    |running partial| <= sum_{c in block, t in group} max_c |X| * |W[k, c, t]| =: B(k, block, group)

and ``max B <= 2**31 - 1`` proves the non-saturating kernel exact (the same with dY and K for
backward-data). ``max_c |X|`` is the per-channel max of the actual mantissas, which is much
tighter than the naive ``L * max|X| * max|W|`` (that bound gives one pair per partial for
DFP16, whose maxima sit in [2**14, 2**15)).

The schedule depends on the data only, never on the register blocking, so every tuning
config gives the same bits in exact mode. Candidates: ``c_block`` in 128 ... 2 (powers of
two) x ``flush_taps`` in R*S ... 1, longest partial first (ties: the larger block); (2, 1)
(one pair per partial) always holds for mantissas within +/-32767 since 2 * 32767**2 < 2**31.
"""
from __future__ import annotations

import numpy as np

INT32_MAX = 2**31 - 1
_BLOCKS = (128, 64, 32, 16, 8, 4, 2)


def _block_sums(a: np.ndarray, block: int) -> np.ndarray:
    """a (OUT, RED, T) -> sums over reduction blocks of ``block`` channels (OUT, nb, T)."""
    out, red, taps = a.shape
    nb = -(-red // block)
    pad = nb * block - red
    if pad:
        a = np.concatenate([a, np.zeros((out, pad, taps), a.dtype)], axis=1)
    return a.reshape(out, nb, block, taps).sum(axis=2)


def _max_group_sum(bs: np.ndarray, ft: int) -> int:
    out, nb, taps = bs.shape
    ng = -(-taps // ft)
    pad = ng * ft - taps
    if pad:
        bs = np.concatenate([bs, np.zeros((out, nb, pad), bs.dtype)], axis=2)
    return int(bs.reshape(out, nb, ng, ft).sum(axis=3).max(initial=0))


def exact_schedule(w_abs: np.ndarray, act_max: np.ndarray) -> tuple[int, int]:
    """``(c_block, flush_taps)`` for exact mode.

    ``w_abs``: |weights| as (OUT, RED, R*S) integers (OUT = output channels of the pass,
    RED = reduction channels), taps in reference order; ``act_max``: (RED,) per-channel max
    |mantissa| of the activation operand (X forward, dY backward-data).
    """
    a = w_abs.astype(np.int64) * act_max.astype(np.int64)[None, :, None]
    taps = a.shape[2]
    redp = a.shape[1] + a.shape[1] % 2
    # a block already covering every channel makes larger ones the same schedule
    blocks = [b for b in _BLOCKS if b == 2 or b // 2 < redp]
    cands = sorted(((b, ft) for b in blocks for ft in range(taps, 0, -1)),
                   key=lambda c: (-c[0] * c[1], -c[0]))
    sums = {}
    for block, ft in cands:
        if block not in sums:
            sums[block] = _block_sums(a, block)
        if _max_group_sum(sums[block], ft) <= INT32_MAX:
            return block, ft
    return 2, 1
