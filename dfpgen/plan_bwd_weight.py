"""Pure planner of the backward-weight pass: ``(spec, config, target, mode) -> BwdWeightPlan``.

GEMM view per filter tap (r, s) (docs/ARCHITECTURE.md §3):

    dW[k, c, r, s] = sum_m dY[m, k] * X_rs[m, c],   m = (n*P + p)*Q + q
    X_rs[m, c]     = X[n, c, p*uh + r*dh - ph, q*uw + s*dw - pw]   (0 in the padding)

VNNI (``vpdpwssd``) multiplies INT16 *pairs*, so the pairs run along the reduction, i.e. along
pixels: pair j of an output row holds pixels q = 2j and 2j+1 (a row with odd Q ends with a
zero dY pixel, so whatever X is paired with it contributes 0).

Layouts the kernel reads (int16 pairs, one 32-bit lane each):

- dY packed ``[N][P][Q2][Ks][2]`` (Q2 = ceil(Q/2), Kp = K rounded up to 16, Ks = Kp or
  Kp + 16, see ``conflict_free``; likewise Xw rows hold Cs >= C channels): one vector load
  gives ``lanes`` output channels x one pixel pair.
- X packed once, shared by every tap: ``Xw[N][Hp][Wp][Cs][2]`` with
  ``Xw[n,h,w,c] = (Xpad[n,h,w,c], Xpad[n,h,w+uw,c])`` (Xpad = X zero-padded, NHWC). The pair
  (q, q+1) of tap (r, s) starts at ``w = 2j*uw + s*dw``, so one 32-bit broadcast gives one c x
  one pixel pair for *every* tap, and a tap is a constant offset (``tap_offsets``). This costs
  2x the input (instead of R*S x for a per-tap copy). With S == 1 only the columns w = 2j*uw
  are read, so Xw keeps those alone (``Wp = Q2``): the size of X for a stride-1 1x1 layer;
  with R == 1 only rows p*uh are kept (``Hp = P``).

Register blocking: ``k_vecs`` K-vectors x ``pixels`` input channels of INT32 accumulators
(``config.pixels`` is the C extent of the register block in this pass), plus ``k_vecs`` dY
vectors and one broadcast: the budget is asserted against the tier's register file. When
twice the accumulators still fit (short flush intervals, see ``default_config``), the FP32
dW accumulators stay in registers too and a flush is ``vcvtdq2ps`` + ``vaddps``.

Work: a *column block* is one (C-block, tap) pair, i.e. one register block of dW; a work
item is (K-block, group of column blocks, C-block-major). ``config.c_block`` = pixel *pairs*
per cache block: an item runs all its column blocks over one block of pixel pairs, whose dY
stays in L1, before moving on (every tap of a C-block reads the same dY). INT32 partials and
FP32 sums wait in tiles between blocks, so blocks and flushes are independent; the first
block initialises the tiles, and the item finally writes its dW in KCRS. Threads split the
items, never the reduction, so the bits do not depend on the thread count.

Flush points (``schedule``): chunks of ``flush`` consecutive pixels m, exactly as
``dfpgen.reference.conv2d_bwd_weight``. A segment is a run of pairs in one output row with an
in-loop countdown for the flushes inside it; a chunk boundary in the middle of a pair (odd Q)
runs that pair twice with one half of dY masked off.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from functools import lru_cache

import numpy as np

from .errors import DfpError
from .isa import DotStep, dot_step
from .spec import OVERFLOW_MODES, ConvSpec
from .target import CpuTarget
from .tuning import TuningConfig
from .bwd_weight_schedule import CNT_SHIFT, SEG_FIELDS

K_PAD = 16           # dY / dW K-padding: one zmm of INT32 lanes, also a multiple of 8 (ymm)
GROUP_TILE_BYTES = 256 * 1024  # INT32 + FP32 dW tiles of one work item: stay in L2
KB_GROUP_CHANNELS = 256  # K channels per work item (dY of a 128-pair block: 128 KiB)
EST_MACS = 100e9         # one core's VNNI MAC/s and streaming bytes/s, for work_split's estimate
EST_BYTES = 20e9
CONFLICT_MIN_LINES = 8  # pad row strides of >= 8 even lines (512 B: C or K >= 128)
COL_FIELDS = 4       # column table: xoff, tile offset, channels, KCRS offset (int64 each)


def round_up(a: int, b: int) -> int:
    return -(-a // b) * b


@dataclass(frozen=True)
class Variant:
    """One compiled inner block: ``kv`` K-vectors x ``cw`` channels of accumulators."""
    kv: int
    cw: int

    @property
    def name(self) -> str:
        return f"kv{self.kv}_c{self.cw}"


@dataclass(frozen=True)
class BwdWeightPlan:
    """Everything the backward-weight template prints; computed here, never in the template."""
    spec: ConvSpec
    config: TuningConfig
    tier: str
    dp: DotStep           # the tier's dot step (spelling, intrinsic, types): templates/isa_dot.ll.j2
    mode: str
    lanes: int            # INT32 lanes per vector
    i16_lanes: int        # 2 * lanes
    vec_bytes: int
    kv: int               # K-vectors per full K-block
    kv_tail: int          # K-vectors in the last K-block (== kv when none)
    n_kb: int
    cb: int               # channels per full C-block (register block)
    cb_tail: int          # channels in the last C-block of each tap (== cb when none)
    n_cb: int             # C-blocks per tap
    n_cols: int           # column blocks = taps x C-blocks (one register block of dW each)
    C: int
    K: int
    Kp: int
    Ks: int               # packed-dY i32 elements per pixel pair (Kp, + 16 against set conflicts)
    Cs: int               # Xw i32 elements per column (C, + 16 against set conflicts)
    RS: int
    Hp: int               # Xw rows per image
    x_row_step: int       # Xw rows between output rows: uh, or 1 when R == 1
    pack_hstep: int       # source rows between Xw rows: 1, or uh when R == 1
    Wp: int               # Xw columns
    Q2: int
    x_pair_stride: int    # i32 elements between pair j and j+1 in Xw (= col_per_pair*C)
    col_per_pair: int     # Xw columns between pairs: 2*uw, or 1 when S == 1
    pack_istep: int       # source columns between Xw columns: 1, or 2*uw when S == 1
    tap_offsets: tuple    # i32 elements, tap (r, s) -> r*dh*Wp*C + s*dw*C
    block_pairs: int      # pixel pairs per cache block (config.c_block)
    saturating: bool
    fp32_regs: bool       # FP32 dW accumulators live in registers (budget allows 2x the INT32 ones)
    scaled: bool          # flush multiplies by 2**E in-kernel (E outside [-126, 63]); else caller does
    symbol: str

    @property
    def variants(self) -> list[Variant]:
        vs = []
        for kv in sorted({self.kv, self.kv_tail}):
            for cw in sorted({self.cb, self.cb_tail}):
                vs.append(Variant(kv, cw))
        return vs

    @property
    def variant_fields(self) -> list[dict]:
        """Per register block: accumulator names and the i32 offsets the template prints."""
        out = []
        for v in self.variants:
            out.append({
                "name": v.name, "kv": v.kv, "cw": v.cw,
                "vecs": [{"i": i, "off": i * self.lanes} for i in range(v.kv)],
                "chans": [{"i": c} for c in range(v.cw)],
                # INT32 / FP32 tile [c][Kp]: channel c, K-vector i of this block
                "tile_off": [[c * self.Kp + i * self.lanes for i in range(v.kv)] for c in range(v.cw)],
            })
        return out

    @property
    def kb_channels(self) -> int:
        """K channels per K-block (dY / tile offset of K-block kb is kb * this)."""
        return self.kv * self.lanes

    @property
    def last_kb(self) -> int:
        return self.n_kb - 1

    @property
    def kb_tail_channels(self) -> int:
        return self.kv_tail * self.lanes

    @property
    def CRS(self) -> int:
        """KCRS stride of k in the final dW."""
        return self.C * self.RS

    col_fields = COL_FIELDS
    novec_md = 0         # metadata node numbers !0, !1 (loop.vectorize.enable false)
    novec_md_flag = 1

    seg_fields = SEG_FIELDS
    flush_bit = 1 << 32
    cnt_shift = CNT_SHIFT

    def describe(self) -> dict:
        """The plan's fields as a JSON-able dict (``dfpgen show --plan``), long tables left out."""
        d = asdict(self)
        return {k: v for k, v in d.items() if not isinstance(v, (list, tuple)) or len(v) <= 64}

    def key(self) -> dict:
        """What changes the generated code (for the kernel cache key)."""
        return {"pass": "bwd_weight", "spec": self.spec.geometry(), "config": self.config.to_dict(),
                "mode": self.mode, "tier": self.tier, "scaled": self.scaled, "abi": 3}


def registers_needed(kv: int, cb: int, isa=None, saturating: bool = False) -> int:
    """Vector registers of a ``kv x cb`` block: accumulators, dY vectors, one broadcast X pair
    and the flush scale, plus what tier ``isa`` (a ``dfpgen.isa.IsaTier``) adds: the dot
    step's temporaries (the ``vpmaddwd`` product before ``vpaddd``) and, for a saturating
    chain (fast mode) without a saturating instruction, the constants of the emulated
    saturating add. Counted against LLVM's allocation by the no-spill assembly test."""
    need = kv * cb + kv + 2
    if isa is not None:
        need += isa.dot_temps + (isa.sat_regs if saturating else 0)
    return need


def _check_budget(kv: int, cb: int, target: CpuTarget, saturating: bool = False) -> None:
    need = registers_needed(kv, cb, target.isa, saturating)
    if need > target.registers:
        raise DfpError(f"backward-weight register block {kv} K-vectors x {cb} channels needs {need} "
                       f"vector registers; tier {target.tier} has {target.registers}")


@dataclass(frozen=True)
class WorkSplit:
    """Work items: ``kb_group`` K-blocks x ``group`` column blocks each."""
    kb_group: int
    group: int
    n_kgroups: int
    n_groups: int

    @property
    def items(self) -> int:
        return self.n_kgroups * self.n_groups


def _candidates(n: int) -> list[int]:
    """Group sizes for ``n`` blocks: the powers of two below ``n``, ``n``, and the sizes that
    split ``n`` evenly into as many groups as each power of two makes."""
    out, v = {n}, 1
    while v < n:
        out.add(v)
        out.add(-(-n // -(-n // v)))  # sizes that split n evenly
        v *= 2
    return sorted(out)


def _even_sizes(n: int) -> list[int]:
    """Every group size that splits ``n`` blocks into a distinct number of groups as evenly as
    that count allows (``ceil(n / ceil(n / g))``): ~2 sqrt(n) sizes, so an item count can match
    the thread count. Powers of two alone miss those (measured on a 16-core Xeon, 16 threads:
    64 channels at 56x56 in 46 items of 4 column blocks ran 1.23x slower than in 16 items of
    12; benchmarks/RESULTS.md, ``bwd_weight_split``)."""
    return sorted({-(-n // k) for k in range(1, n + 1)})


@lru_cache(maxsize=256)
def work_split(p: BwdWeightPlan, threads: int) -> WorkSplit:
    """Group K-blocks and column blocks into work items (pure, memoised).

    An item streams the packed X of its columns once per K-group and the packed dY of its
    K-blocks once per column group: memory traffic ~ ``n_kgroups * |Xw| + n_groups * |dYp|``.
    Fewer, larger items cut traffic; more items balance the threads. The estimate is
    ``macs / EST_MACS * ceil(items / threads) / items + traffic / EST_BYTES / min(threads,
    items)`` (one core's VNNI rate and streaming bandwidth), subject to an item's tiles
    (``GROUP_TILE_BYTES``) and its dY block (``KB_GROUP_CHANNELS``) staying in L2.
    Column groups come in every size that splits the columns evenly (:func:`_even_sizes`),
    K-groups in powers of two and their even splits (:func:`_candidates`). The split never
    changes the bits (each item owns its dW tiles and sums its pixels in order).
    """
    s = p.spec
    threads = max(1, threads)
    xw_bytes = s.N * p.Hp * p.Wp * p.Cs * 4
    dy_bytes = s.N * s.P * p.Q2 * p.Ks * 4
    best = None
    for w in legal_splits(p):
        items = w.items
        t = (s.macs / EST_MACS * -(-items // threads) / items
             + (w.n_kgroups * xw_bytes + w.n_groups * dy_bytes) / EST_BYTES / min(threads, items))
        if best is None or (t, items) < best[0]:
            best = ((t, items), w)
    return best[1]


def legal_splits(p: BwdWeightPlan):
    """Every split :func:`work_split` weighs, in its order: K-groups of :func:`_candidates`
    sizes within ``KB_GROUP_CHANNELS``, column groups of :func:`_even_sizes` sizes whose tiles
    stay within ``GROUP_TILE_BYTES`` (a group of one always qualifies)."""
    tile = 2 * p.cb * p.kv * p.lanes * 4
    for kbg in _candidates(p.n_kb):
        if kbg > 1 and kbg * p.kv * p.lanes > KB_GROUP_CHANNELS:
            continue
        nkg = -(-p.n_kb // kbg)
        for g in _even_sizes(p.n_cols):
            if g > 1 and kbg * g * tile > GROUP_TILE_BYTES:
                continue
            yield WorkSplit(kbg, g, nkg, -(-p.n_cols // g))


@lru_cache(maxsize=1024)
def column_table(p: BwdWeightPlan) -> np.ndarray:
    """int64 [n_cols, 4], read-only (memoised per plan: a Python loop over every column
    block): per column block (C-block b, tap rs), C-block-major: the Xw
    offset (i32 units) of its first channel at pair 0 of the output row, the offset of its
    FP32 tile in ``out[rs][c][Kp]``, its channel count and the offset of (k=0, c0, r, s) in
    the final KCRS dW."""
    t = np.empty((p.n_cols, COL_FIELDS), np.int64)
    i = 0
    # C-block-major: a group holds every tap of its channels, so the final KCRS stores of one
    # k cover a contiguous run, and taps (shifted windows of the same X rows) hit in cache.
    for b in range(p.n_cb):
        for rs in range(p.RS):
            c0 = b * p.cb
            t[i] = (p.tap_offsets[rs] + c0, (rs * p.C + c0) * p.Kp, p.cb_tail if b == p.n_cb - 1 else p.cb,
                    c0 * p.RS + rs)
            i += 1
    t.setflags(write=False)
    return t


def conflict_free(n: int) -> int:
    """Row stride (i32 elements) for rows of ``n``: when rows are an even number of 64-byte
    lines, add one line. A power-of-two stride (C or K = 128, 256, 2048 ...) maps the rows a
    block walks through onto a few L1/L2 sets, which then thrash; an odd line count spreads
    them over all sets. Shorter rows (< 8 lines) leave enough sets and are not padded (the
    padding would be pure extra traffic there)."""
    lines = n // 16
    if n % 16 == 0 and lines % 2 == 0 and lines >= CONFLICT_MIN_LINES:
        return n + 16
    return n


def unscaled_ok(scale_exp: int) -> bool:
    """Whether the kernel may flush unscaled (see the template): nonzero sums are integer-valued
    floats >= 1 and < 2**64, so 2**E keeps them normal for -126 <= E <= 63."""
    return -126 <= scale_exp <= 63


def plan(spec: ConvSpec, config: TuningConfig, target: CpuTarget, mode: str = "exact",
         scaled: bool = False) -> BwdWeightPlan:
    """Plan one backward-weight kernel. Raises :class:`DfpError` on an illegal config
    (register budget exceeded, unroll other than 'none', unknown mode)."""
    if mode not in OVERFLOW_MODES:
        raise DfpError(f"overflow mode must be one of {OVERFLOW_MODES}, got {mode!r}")
    if mode == "fast" and config.flush % 2:
        # fast mode flushes every config.flush pixels; the exact mode only caps with it (evened)
        raise DfpError(f"backward-weight flush interval must be even (INT16 pairs), got {config.flush}")
    if config.unroll != "none":
        # vp4dpwssd's pattern (four channel pairs against four weight registers) has no
        # counterpart here: the reduction runs along pixels and dY is a vector load per pair.
        raise DfpError(f"backward-weight kernels support unroll='none' only, got {config.unroll!r}")
    lanes = target.lanes
    Kp = round_up(spec.K, K_PAD)
    kvecs_total = Kp // lanes
    kv = min(config.k_vecs, kvecs_total)
    cb = min(config.pixels, spec.C)
    _check_budget(kv, cb, target, mode == "fast")
    n_kb = -(-kvecs_total // kv)
    kv_tail = kvecs_total - (n_kb - 1) * kv
    n_cb = -(-spec.C // cb)
    cb_tail = spec.C - (n_cb - 1) * cb
    RS = spec.R * spec.S
    n_cols = RS * n_cb
    # Column blocks per work item: as many as keep their INT32 + FP32 tiles within
    # GROUP_TILE_BYTES (L2), and few enough that there are MIN_ITEMS items for the threads.
    (uh, uw), (dh, dw) = spec.stride, spec.dilation
    P, Q = spec.P, spec.Q
    Q2 = -(-Q // 2)
    if spec.R == 1:
        # One filter row: only input rows p*uh are read, so Xw keeps just those (stride-2
        # 1x1 layers would otherwise pack every other row for nothing).
        Hp, row_step = P, 1
    else:
        Hp, row_step = (P - 1) * uh + (spec.R - 1) * dh + 1, uh
    C = spec.C
    Cs, Ks = conflict_free(C), conflict_free(Kp)
    if spec.S == 1:
        # One filter column: only pairs starting at w = 2j*uw are read, so Xw keeps just those
        # (Q2 columns, the size of X for stride 1) instead of every column.
        Wp, cpp, istep = Q2, 1, 2 * uw
        taps = tuple(r * dh * Wp * Cs for r in range(spec.R))
    else:
        # The last pair of a row starts at column (2*Q2 - 2)*uw + (S-1)*dw.
        Wp, cpp, istep = (2 * Q2 - 2) * uw + (spec.S - 1) * dw + 1, 2 * uw, 1
        taps = tuple(r * dh * Wp * Cs + s * dw * Cs for r in range(spec.R) for s in range(spec.S))
    # FP32 accumulators in registers too when twice the INT32 block fits (short flushes).
    fp32_regs = registers_needed(kv, cb, target.isa, mode == "fast") + kv * cb <= target.registers
    sym = (f"dfp_conv_bwdw_{spec.geometry()}_kb{kv}_cb{cb}_pp{config.c_block}_{target.tier}_{mode}"
           + ("_sc" if scaled else ""))
    return BwdWeightPlan(
        spec=spec, config=config, tier=target.tier, dp=dot_step(target.isa, mode == "fast"), mode=mode, lanes=lanes, i16_lanes=2 * lanes,
        vec_bytes=4 * lanes, kv=kv, kv_tail=kv_tail, n_kb=n_kb, cb=cb, cb_tail=cb_tail, n_cb=n_cb,
        n_cols=n_cols,
        C=C, K=spec.K, Kp=Kp, Ks=Ks, Cs=Cs, RS=RS, Hp=Hp, Wp=Wp, Q2=Q2, x_pair_stride=cpp * Cs,
        x_row_step=row_step, pack_hstep=uh // row_step,
        col_per_pair=cpp,
        pack_istep=istep,
        tap_offsets=taps, block_pairs=config.c_block,
        saturating=(mode == "fast"), fp32_regs=fp32_regs, scaled=scaled, symbol=sym)


SHORT_FLUSH = 64     # pixels: below this the flush dominates, keep FP32 accumulators in registers


def default_config(spec: ConvSpec, target: CpuTarget, flush: int | None = None) -> TuningConfig:
    """Heuristic register block. Long flush intervals (``flush`` None or >= 64 pixels): 2
    K-vectors x 13 channels (29 zmm; 4 x 6 when K is one 64-channel block), FP32 dW in an L1
    tile. Short ones (exact mode on full-range DFP16 data: a flush every few pixels): 2 x 7,
    so 14 INT32 + 14 FP32 accumulators stay in registers and a flush is vcvtdq2ps + vaddps.
    Per tier the blocks come from ``dfpgen.isa`` (16-register tiers: see there). 128 pairs per cache block (dY block = 128 x 32 k x 4 B =
    16 KiB, half of L1D)."""
    lanes = target.lanes
    kvecs_total = round_up(spec.K, K_PAD) // lanes
    short = flush is not None and flush < SHORT_FLUSH
    t = target.isa
    kv, cb = t.bwd_weight_blocks_short if short else (
        t.bwd_weight_blocks_4vec if kvecs_total == 4 else t.bwd_weight_blocks)
    kv = min(kv, kvecs_total)
    cb = min(cb, spec.C)
    return TuningConfig(k_vecs=kv, pixels=cb, c_block=128, flush=0, unroll="none", threads=0)


def search_space(spec: ConvSpec, target: CpuTarget) -> list[TuningConfig]:
    """Legal register blocks (budget-checked) x cache block sizes, for the autotuner."""
    out = []
    for kv, cb in target.isa.bwd_weight_search:
        if registers_needed(kv, cb, target.isa, saturating=True) > target.registers:  # both modes
            continue
        for pp in (64, 256):
            out.append(TuningConfig(k_vecs=kv, pixels=cb, c_block=pp, flush=0))
    return out
