"""Flush schedule of the backward-weight kernel (pure): which pixel pairs each segment runs
and where the INT32 partials are flushed.

The reduction runs over pixels m = (n*P + p)*Q + q; chunks of ``flush`` consecutive m end in
a flush, exactly as :func:`dfpgen.reference.conv2d_bwd_weight`. The kernel reads pixel pairs
(2j, 2j+1) within output rows (``dfpgen.plan_bwd_weight``), so a chunk boundary at an odd pixel
splits a pair: that pair runs twice with one half of dY masked off. Pair-aligned boundaries
inside a row are taken by an in-loop countdown, so a row is one segment when Q is even.
"""
from __future__ import annotations

from functools import lru_cache

import numpy as np

from .errors import DfpError

MASK_NONE = -1       # segment control: run of whole pairs
MASK_LO = 0x0000FFFF  # keep element 0 (pixel 2j) of each pair: little-endian low half
MASK_HI = -65536      # 0xFFFF0000 as int32: keep element 1 (pixel 2j+1)
SEG_FIELDS = 4       # xoff, dyoff, npairs, ctl (= mask | flush << 32 | cnt0 << 33), int64 each
CNT_SHIFT = 33       # ctl bits 33..62: pairs until the run's first in-loop flush
NEVER = 1 << 29      # cnt0 of a run without in-loop flush (more pairs than any row holds)


@lru_cache(maxsize=64)
def _schedule_cached(N, P, Q, uh, cpp, C, Hp, Wp, Kp, flush, block_pairs):
    return _build_schedule(N, P, Q, uh, cpp, C, Hp, Wp, Kp, flush, block_pairs)


def schedule(p, flush: int) -> tuple[np.ndarray, np.ndarray]:
    """Segments and blocks of plan ``p`` (a ``plan_bwd_weight.BwdWeightPlan``) for a flush interval
    of ``flush`` pixels (even, >= 2).

    Returns ``(segments int64 [S, 4], blocks int64 [B + 1])``; a segment is a run of pixel
    pairs inside one output row (``xoff`` in Xw i32 units for tap (0, 0), ``dyoff`` in packed-dY
    i32 units, ``npairs``, ``ctl = mask | flush_after << 32 | cnt0 << 33``: a run flushes
    in its loop after ``cnt0`` pairs and then every ``flush/2``; a masked single pair, or a
    run's short last chunk, flushes after the segment); blocks are segment index bounds.
    Flush boundaries sit at m = i*flush (reference order). Raises :class:`DfpError` for an odd
    or non-positive ``flush``.
    """
    if flush < 2 or flush % 2:
        raise DfpError(f"backward-weight flush interval must be an even number of pixels >= 2, got {flush}")
    s = p.spec
    return _schedule_cached(s.N, s.P, s.Q, p.x_row_step, p.col_per_pair, p.Cs, p.Hp, p.Wp, p.Ks,
                            int(flush), p.block_pairs)


def _merge_runs(pieces, period, xoff, dyoff):
    """Segments of one row. Unmasked pieces become one run whose in-loop countdown flushes
    every ``period`` pairs (first after ``cnt0``); the pixel order of flushes is unchanged.
    A piece joins the run only where the countdown reproduces its flush exactly; a short
    final chunk (end of the reduction) keeps an explicit flush-after flag."""
    out = []
    cur = None  # [j0, npairs, cnt0, flag, fires_at_end]
    for j0, npairs, mask, fl in pieces:
        if mask != (MASK_NONE & 0xFFFFFFFF):
            if cur:
                out.append(cur)
                cur = None
            out.append([j0, npairs, NEVER, fl, False, mask])
            continue
        fires = fl and npairs == period
        if cur and cur[4] and cur[0] + cur[1] == j0 and (fires or npairs < period):
            cur[1] += npairs
            cur[3] = fl and not fires
            cur[4] = fires
            continue
        if cur:
            out.append(cur)
        if fl and npairs <= period:
            cur = [j0, npairs, npairs, False, True]
        else:
            cur = [j0, npairs, NEVER, fl, False]
    if cur:
        out.append(cur)
    segs = []
    for e in out:
        j0, npairs, cnt0, fl = e[:4]
        mask = e[5] if len(e) > 5 else (MASK_NONE & 0xFFFFFFFF)
        segs.append((xoff(j0), dyoff(j0), npairs, mask | (int(fl) << 32) | (cnt0 << CNT_SHIFT)))
    return segs


def _even_q_segments(N, P, Q, uh, cpp, C, Hp, Wp, Kp, flush) -> np.ndarray:
    """Even Q: every chunk boundary (m = i*flush - 1, m0 = row*Q even) ends a pair, so each
    row is one run; its countdown starts at the pairs left in the current chunk."""
    rows = np.arange(N * P, dtype=np.int64)
    n, p = rows // P, rows % P
    m0 = rows * Q
    cnt0 = (flush - m0 % flush) // 2
    cnt0[cnt0 > Q // 2] = NEVER  # no boundary in this row
    last_flag = 0
    if (N * P * Q) % flush:  # the short last chunk ends the last row
        if cnt0[-1] == NEVER:
            cnt0[-1] = Q // 2        # ... and the countdown can end it
        else:
            last_flag = 1 << 32      # the countdown restarted inside the row: explicit flag
    seg = np.empty((rows.size, SEG_FIELDS), np.int64)
    seg[:, 0] = (n * Hp + p * uh) * Wp * C
    seg[:, 1] = rows * (Q // 2) * Kp
    seg[:, 2] = Q // 2
    seg[:, 3] = (MASK_NONE & 0xFFFFFFFF) | (cnt0 << CNT_SHIFT)
    seg[-1, 3] |= last_flag
    return seg


def _build_schedule(N, P, Q, uh, cpp, C, Hp, Wp, Kp, flush, block_pairs):
    make = _even_q_segments if Q % 2 == 0 else _row_segments
    seg = _split_long(make(N, P, Q, uh, cpp, C, Hp, Wp, Kp, flush), block_pairs, cpp * C, Kp, flush // 2)
    return _blocks(seg, block_pairs)


def _split_long(seg: np.ndarray, block_pairs: int, x_step: int, d_step: int, period: int) -> np.ndarray:
    """Cut runs longer than a cache block (a long row, or a 1x1 layer run as one row) into
    block-sized runs, carrying the flush countdown over; the flush-after flag stays on the
    last piece."""
    if not len(seg) or seg[:, 2].max() <= block_pairs:
        return seg
    out = []
    for xoff, dyoff, npairs, ctl in seg.tolist():
        mask, flag, cnt0 = ctl & 0xFFFFFFFF, (ctl >> 32) & 1, ctl >> CNT_SHIFT
        if npairs <= block_pairs or mask != (MASK_NONE & 0xFFFFFFFF):
            out.append((xoff, dyoff, npairs, ctl))
            continue
        for t in range(0, npairs, block_pairs):
            n = min(block_pairs, npairs - t)
            if cnt0 >= NEVER:
                c = NEVER
            elif t < cnt0:
                c = cnt0 - t
            else:
                c = period - (t - cnt0) % period
            last = t + n == npairs
            out.append((xoff + t * x_step, dyoff + t * d_step, n,
                        mask | ((flag if last else 0) << 32) | (c << CNT_SHIFT)))
    return np.array(out, dtype=np.int64).reshape(-1, SEG_FIELDS)


def _row_segments(N, P, Q, uh, cpp, C, Hp, Wp, Kp, flush) -> np.ndarray:
    """Any Q: rows split at every chunk boundary (masked halves for split pairs), then the
    pair-aligned pieces of a row merged back into runs with in-loop flushes."""
    Q2 = -(-Q // 2)
    M = N * P * Q
    segs: list[tuple[int, int, int, int]] = []

    def xoff(n, p, j):  # pair j of output row (n, p), tap (0, 0)
        return ((n * Hp + p * uh) * Wp + j * cpp) * C

    def dyoff(row, j):
        return (row * Q2 + j) * Kp

    period = flush // 2
    for row in range(N * P):
        n, p = divmod(row, P)
        m0 = row * Q
        pieces = []   # (j0, npairs, mask, flush_after): split at every chunk boundary
        q = 0
        while q < Q:
            nb = (m0 + q) // flush * flush + flush   # next chunk boundary after pixel m0+q
            q_end = min(Q, nb - m0)                 # pixels [q, q_end) in this chunk
            ends_chunk = (m0 + q_end == nb) or (m0 + q_end == M)
            j0, j_last = q // 2, (q_end - 1) // 2
            if q % 2:   # chunk starts on element 1 of a pair
                pieces.append([j0, 1, MASK_HI & 0xFFFFFFFF, False])
                j0 += 1
            odd_end = q_end % 2 and q_end < Q   # chunk ends on element 0 of a split pair
            j1 = j_last if odd_end else j_last + 1
            if j1 > j0:
                pieces.append([j0, j1 - j0, MASK_NONE & 0xFFFFFFFF, False])
            if odd_end:
                pieces.append([j_last, 1, MASK_LO, False])
            if ends_chunk:
                pieces[-1][3] = True
            q = q_end
        segs.extend(_merge_runs(pieces, period, lambda j: xoff(n, p, j), lambda j: dyoff(row, j)))
    return np.array(segs, dtype=np.int64).reshape(-1, SEG_FIELDS)


def _blocks(seg: np.ndarray, block_pairs: int) -> tuple[np.ndarray, np.ndarray]:
    """Cache blocks: cut after a segment once the block holds >= block_pairs pairs."""
    bounds, acc = [0], 0
    for i, n in enumerate(seg[:, 2].tolist()):
        acc += n
        if acc >= block_pairs:
            bounds.append(i + 1)
            acc = 0
    if bounds[-1] != len(seg):
        bounds.append(len(seg))
    return seg, np.array(bounds, dtype=np.int64)
