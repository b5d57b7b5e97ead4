"""``RunInfo``: what one convolution pass actually ran (every pass reports it).

The caller always learns the overflow mode, the flush interval, how many INT32 lanes were
found saturated (fast mode), the ISA tier and the kernel symbol(s).
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class RunInfo:
    """Description of one pass (forward, backward-data or backward-weight).

    - ``pass_kind``: ``"fwd" | "bwd_data" | "bwd_weight"``.
    - ``overflow``: ``"exact"`` (non-saturating ``vpdpwssd``, flush interval from a proven
      bound on the operands: bit-exact with ``dfpgen.reference``) or ``"fast"`` (saturating
      ``vpdpwssds``, the paper's long chains).
    - ``flush``: the flush interval, the most INT16 products one INT32 partial accumulates
      before it is converted to FP32 (``c_block x flush_taps`` for forward / backward-data,
      pixels for backward-weight). This is the interval the call ran with; a kernel symbol's
      ``_fl<n>_`` field is the one it was planned with (exact mode plans all taps of a block
      and passes the proven, possibly shorter, interval at run time).
    - ``saturated``: INT32 lanes equal to INT32_MAX or INT32_MIN at a flush (fast mode); 0 in
      exact mode. A lane that saturates and is later pulled back into range is not counted
      here (it is in ``possibly_saturated``).
    - ``possibly_saturated``: forward / backward-data in fast mode: an upper bound on the
      output partials (one output channel x pixel x flush) that reached INT32_MAX or
      INT32_MIN at *any* pair step, pulled back before the flush or not. The kernel tracks,
      per output channel of a register tile, the largest |partial| of every step (a sticky
      check); a flagged channel counts all pixels of its tile. 0 proves no partial
      saturated, so the result equals the non-saturating computation of the same flush
      schedule. 0 in exact mode; ``None`` where a pass does not track it (backward-weight).
    - ``tier``: ISA tier that ran (``avx512_vnni | vnni256 | avx2 | generic``).
    - ``symbol``: the kernel symbol; ``symbols`` all of them when a pass runs several kernels
      (backward-data with stride > 1 runs one per output phase).
    - ``config``: the ``TuningConfig`` as a dict; ``c_block`` / ``flush_taps``: the reduction
      block and filter taps per partial (forward / backward-data); ``threads``: thread count;
      ``scale_exp``: ``Ea + Eb`` (the FP32 scale is ``2**scale_exp``).
    - ``kernel_seconds``: wall seconds spent inside the generated kernel(s) of this call
      (their launches over the threads), without packing, padding or schedule analysis: the
      clock the tuner and ``dfpgen bench`` compare schedules by.
    """
    pass_kind: str
    overflow: str
    flush: int
    saturated: int
    tier: str
    symbol: str
    symbols: tuple[str, ...] = ()
    config: dict = field(default_factory=dict)
    c_block: int = 0
    flush_taps: int = 0
    threads: int = 1
    scale_exp: int = 0
    possibly_saturated: int | None = 0
    kernel_seconds: float = 0.0
