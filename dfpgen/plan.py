"""Pure planner of the forward-family kernel: ``(sub-convolution, config, target, mode) -> KernelPlan``.

Forward and backward-data share one kernel family (``templates/conv_fwd.ll.j2``): a
correlation of a pre-padded NHWC INT16 buffer (pairs along the reduction channels) with
packed weights ``[block][tap][pair][k_vecs * lanes][2]``, writing FP32 NHWC. A
:class:`SubConv` describes one such correlation in buffer coordinates (the forward pass is
one; backward-data with stride u is u_h * u_w of them, see ``plan_bwd_data``); the plan adds the
schedule: register blocking (``k_vecs`` output-channel vectors x ``pixels`` output pixels
along Q, with a pixel tail), reduction blocks of ``c_block`` channels (with a tail block),
the filter taps in the reference's order with a flush after every ``flush_taps`` taps and
at the end of each block (``dfpgen.reference`` defines the order), and every offset the
template prints. Templates do no arithmetic: all numbers come from here.

Registers: accumulators ``k_vecs x pixels`` + weight vectors + one broadcast must fit in
``target.registers`` (:func:`dfpgen.tuning.accumulator_budget`); the planner refuses more.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass

from .errors import DfpError
from .isa import DotStep, dot_step
from .spec import OVERFLOW_MODES
from .tuning import TuningConfig, accumulator_budget

# Packed weights up to this size stay in L2 (1 MiB per core on Zen 4, 2 MiB on recent Xeons)
# while the work items walk the image rows with the output-channel block fastest; larger
# weights make the block the outer loop instead, so each block's weights are reused by all rows.
WEIGHTS_L2_BYTES = 512 * 1024


@dataclass(frozen=True)
class SubTap:
    """One filter tap of a sub-convolution: input offset (dh, dw) in buffer pixels from the
    output pixel's origin, the original filter index (r, s), and its flush group (taps of the
    same group share an INT32 partial; the partial is flushed after the group's last tap)."""
    r: int
    s: int
    dh: int
    dw: int
    group: int


@dataclass(frozen=True)
class SubConv:
    """``Y[n, oh0 + i*ohs, ow0 + j*ows, k] (+)= sum_{tap, c} X[n, i*rs + tap.dh, j*cs + tap.dw, c]
    * W[tap][c][k]`` for i < rows, j < cols: one launch of the forward-family kernel.

    ``in_h, in_w``: the padded input buffer's spatial size; ``red``: reduction channels (C for
    forward, K for backward-data; padded to even in the buffer); ``out``: output channels;
    ``out_h, out_w``: the output buffer's spatial size (NHWC, channels padded to the block).
    """
    name: str
    in_h: int
    in_w: int
    red: int
    out: int
    rows: int
    cols: int
    row_step: int
    col_step: int
    taps: tuple[SubTap, ...]
    out_h: int
    out_w: int
    oh0: int = 0
    ow0: int = 0
    ohs: int = 1
    ows: int = 1
    phases: tuple = ()   # strided forward: input phase images in the buffer, see fwd_subconv


@dataclass(frozen=True)
class Tap:
    idx: int
    r: int
    s: int
    xoff: int   # int16 elements from the pixel's input origin
    woff: int   # int16 elements from the block's weights
    flush: bool


@dataclass(frozen=True)
class Block:
    """A reduction block as the template emits it: ``quads`` 4VNNI steps then ``singles``."""
    name: str
    pairs: int
    quads: int
    singles: int
    single_start: int


@dataclass(frozen=True)
class KernelPlan:
    symbol: str
    pass_kind: str
    tier: str
    dp: DotStep           # the tier's dot step (spelling, intrinsic, types): templates/isa_dot.ll.j2
    mode: str
    has_bias: bool
    lanes: int
    ivec: str
    hvec: str
    fvec: str
    bvec: str
    k_vecs: int
    kvl: int
    out_blocks: int       # blocks of kvl output channels (work items per row)
    out_pad: int          # output channels in the buffer (out_blocks * kvl)
    red_pairs: int        # reduction channel pairs
    pixels: int
    q_full: int
    wb_tail: int
    po: int
    x_img: int
    x_row: int
    x_qb: int
    x_tail: int
    y_img: int
    y_row: int
    y_base: int
    y_qb: int
    y_tail: int
    w_kb: int
    w_pair: int
    w_step: int
    c_block: int
    flush_taps: int
    flush: int
    cb_full: int
    cb2: int
    tail: Block | None
    full: Block | None
    c2_tail_start: int
    taps: tuple[Tap, ...]
    step: int
    x_ju: tuple[tuple[int, ...], ...]
    w_ukv: tuple[tuple[int, ...], ...]
    y_off: tuple[tuple[int, ...], ...]
    b_kv: tuple[int, ...]
    registers_used: int
    registers: int
    unroll: str
    fma: bool = True
    kb_inner: bool = False  # work order: output-channel block fastest (weights fit in L2)
    x_per_vec: bool = True  # one X broadcast per weight vector (folds into vpdpwssd's {1toN})
    y_in_memory: bool = False  # the FP32 output tile is not kept in registers over the loops
    cb_outer: bool = False  # reduction blocks outside the pixel tiles of a row (y in memory)
    w_fold: bool = False  # weights read per pixel as the dot's memory operand (no register)  # work order: output-channel block fastest (weights fit in L2)
    tap_pairs: int = 0  # pair rows per tap in the packed weights: red_pairs + unused padding

    def describe(self) -> dict:
        d = asdict(self)
        for k in ("x_ju", "w_ukv", "y_off"):
            d.pop(k)
        return d


def _vec_types(tier: str, lanes: int) -> dict:
    return {"ivec": f"<{lanes} x i32>", "hvec": f"<{2 * lanes} x i16>",
            "fvec": f"<{lanes} x float>", "bvec": f"<{lanes} x i1>"}


def _block(name: str, pairs: int, step: int) -> Block:
    quads = pairs // step if step > 1 else 0
    return Block(name, pairs, quads, pairs - quads * step, quads * step)


def _descriptor_hash(fields: dict) -> str:
    blob = json.dumps(fields, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:8]


L1_SETS, LINE = 64, 64  # a 32 KiB 8-way L1D of 64-byte lines: 64 sets, 4 KiB apart


def tap_pad_pairs(red_pairs: int, pair_bytes: int, cb2: int, ntaps: int) -> int:
    """Unused pair rows to append to each tap's weights so that one reduction block's
    weights over all taps (``ntaps`` runs of ``cb2`` pair rows of ``pair_bytes``, one tap
    ``red_pairs`` rows after the other) spread over the L1 sets: with the reduction blocks
    walked outside the taps (the 16-register tiers), a tap stride that is a multiple of
    4 KiB puts every tap's block in the same sets and 9 taps evict each other from 8 ways.
    The smallest padding with the fewest lines in the fullest set."""
    block = cb2 * pair_bytes
    best, best_load = 0, None
    for pad in range(0, cb2 + 1):
        stride = (red_pairs + pad) * pair_bytes
        sets = [0] * L1_SETS
        for t in range(ntaps):
            first, last = t * stride // LINE, (t * stride + block - 1) // LINE
            for line in range(first, last + 1):
                sets[line % L1_SETS] += 1
        load = max(sets)
        if best_load is None or load < best_load:
            best, best_load = pad, load
    return best


def plan_kernel(sub: SubConv, config: TuningConfig, target, *, mode: str, flush_taps: int,
                has_bias: bool, pass_kind: str, label: str, fma: bool = True) -> KernelPlan:
    """Schedule ``sub`` with ``config``. ``flush_taps``: taps per INT32 partial within a
    reduction block (the taps' ``group`` fields must already encode it). Raises
    :class:`DfpError` for an illegal schedule (register budget, mode)."""
    if mode not in OVERFLOW_MODES:
        raise DfpError(f"overflow mode must be one of {OVERFLOW_MODES}, got {mode!r}")
    lanes, regs = target.lanes, target.registers
    used = accumulator_budget(config.k_vecs, config.pixels, config.unroll, target.isa)
    if used > regs:
        raise DfpError(f"config {config.short()}: {config.k_vecs} x {config.pixels} accumulators + "
                       f"weights (+ broadcast) need {used} vector registers; the {target.tier} tier "
                       f"has {regs}")
    kv, kvl = config.k_vecs, config.k_vecs * lanes
    y_mem = target.isa.flush_regs > 0 or used + kv * min(config.pixels, sub.cols) > regs
    out_blocks = -(-sub.out // kvl)
    out_pad = out_blocks * kvl
    red_pairs = -(-sub.red // 2)
    cpad = 2 * red_pairs
    wb = min(config.pixels, sub.cols)
    q_full, wb_tail = divmod(sub.cols, wb)
    cb2 = config.c_block // 2
    cb_full, tail_pairs = divmod(red_pairs, cb2)
    step = 4 if config.unroll == "4vnni" else 1
    x_pix = cpad
    x_row = sub.row_step * sub.in_w * cpad
    x_col = sub.col_step * cpad
    y_col = sub.ows * out_pad
    w_pair = kvl * 2
    ntaps = len(sub.taps)
    cb_outer = target.isa.flush_regs > 0
    # the 16-register tiers walk the reduction blocks outside the taps: pad each tap's
    # weights so that one block over all taps does not crowd a few L1 sets
    tap_pairs = red_pairs + (tap_pad_pairs(red_pairs, w_pair * 2, cb2, ntaps) if cb_outer else 0)
    taps = []
    for t, tp in enumerate(sub.taps):
        last_of_group = t == ntaps - 1 or sub.taps[t + 1].group != tp.group
        taps.append(Tap(t, tp.r, tp.s, (tp.dh * sub.in_w + tp.dw) * x_pix, t * tap_pairs * w_pair,
                        last_of_group))
    fields = {"sub": asdict(sub), "config": config.to_dict(), "mode": mode, "ft": flush_taps,
              "bias": has_bias, "tier": target.tier, "fma": fma}
    if tap_pairs != red_pairs:
        fields["tap_pairs"] = tap_pairs
    symbol = (f"dfp_conv_{pass_kind}_{label}_kb{kv}_wb{wb}_cb{config.c_block}"
              f"_fl{config.c_block * flush_taps}{'_u4' if step == 4 else ''}"
              f"_{target.tier}_{mode}{'_b' if has_bias else ''}_{_descriptor_hash(fields)}")
    return KernelPlan(
        symbol=symbol, pass_kind=pass_kind, tier=target.tier, dp=dot_step(target.isa, mode == "fast"),
        mode=mode, has_bias=has_bias,
        lanes=lanes, **_vec_types(target.tier, lanes), k_vecs=kv, kvl=kvl,
        out_blocks=out_blocks, out_pad=out_pad, red_pairs=red_pairs,
        pixels=wb, q_full=q_full, wb_tail=wb_tail, po=sub.rows,
        x_img=sub.in_h * sub.in_w * cpad, x_row=x_row, x_qb=wb * x_col, x_tail=q_full * wb * x_col,
        y_img=sub.out_h * sub.out_w * out_pad, y_row=sub.ohs * sub.out_w * out_pad,
        y_base=(sub.oh0 * sub.out_w + sub.ow0) * out_pad, y_qb=wb * y_col, y_tail=q_full * wb * y_col,
        w_kb=ntaps * tap_pairs * w_pair, tap_pairs=tap_pairs, w_pair=w_pair, w_step=step * w_pair,
        c_block=config.c_block, flush_taps=flush_taps, flush=config.c_block * flush_taps,
        cb_full=cb_full, cb2=cb2,
        full=_block("F", cb2, step) if cb_full else None,
        tail=_block("T", tail_pairs, step) if tail_pairs else None,
        c2_tail_start=cb_full * cb2, taps=tuple(taps), step=step,
        x_ju=tuple(tuple(j * x_col + 2 * u for u in range(step)) for j in range(wb)),
        w_ukv=tuple(tuple(u * w_pair + v * 2 * lanes for v in range(kv)) for u in range(step)),
        y_off=tuple(tuple(j * y_col + v * lanes for v in range(kv)) for j in range(wb)),
        b_kv=tuple(v * lanes for v in range(kv)),
        registers_used=used, registers=regs, unroll=config.unroll, fma=fma,
        x_per_vec=target.isa.broadcast_regs == 0,
        # the FP32 tile in registers as well would not fit: keep it in memory; the
        # 16-register tiers always do (their budget counts no register for it) and walk the
        # reduction blocks outside the tiles, so a block's weights stay in L1 (the template)
        y_in_memory=y_mem, cb_outer=cb_outer,
        w_fold=target.isa.fold_weights,
        kb_inner=out_blocks > 1 and out_blocks * ntaps * red_pairs * w_pair * 2 <= WEIGHTS_L2_BYTES,
    )


def tap_groups(order: list[tuple[int, int]], flush_taps: int) -> dict[tuple[int, int], int]:
    """Flush group of each tap: consecutive runs of ``flush_taps`` taps in the reference's
    tap order (the last run may be shorter)."""
    return {rs: i // flush_taps for i, rs in enumerate(order)}


def fwd_subconv(spec, flush_taps: int) -> SubConv:
    """The forward pass as one sub-convolution; taps in the reference's order ``for r: for s``.

    Stride 1: over the padded input buffer ``(N, H + 2 ph, W + 2 pw, C + C % 2)``.
    Stride u > 1: over *phase images*: the padded input split by (row mod u_h, column mod u_w)
    into images of ``ceil((H + 2 ph) / u_h) x ceil((W + 2 pw) / u_w)`` pixels, stacked along
    the rows of the buffer (only the phases some tap reads: 1x1 stride 2 keeps one of four).
    Output pixel (i, j) then reads phase ((r d_h) mod u_h, (s d_w) mod u_w) at
    (i + r d_h div u_h, j + s d_w div u_w): a stride-1 access, so consecutive output pixels
    read consecutive input pixels (dense cache lines) instead of every u-th one.
    ``phases`` lists the phases in buffer order; execution builds the buffer to match."""
    (uh, uw), (ph, pw), (dh, dw) = spec.stride, spec.padding, spec.dilation
    order = [(r, s) for r in range(spec.R) for s in range(spec.S)]
    groups = tap_groups(order, flush_taps)
    hp, wp = spec.H + 2 * ph, spec.W + 2 * pw
    if (uh, uw) == (1, 1):
        taps = tuple(SubTap(r, s, r * dh, s * dw, groups[(r, s)]) for r, s in order)
        return SubConv(name="fwd", in_h=hp, in_w=wp, red=spec.C, out=spec.K, rows=spec.P,
                       cols=spec.Q, row_step=1, col_step=1, taps=taps, out_h=spec.P, out_w=spec.Q)
    hph, wph = -(-hp // uh), -(-wp // uw)
    phases = tuple(sorted({((r * dh) % uh, (s * dw) % uw) for r, s in order}))
    slot = {ab: i for i, ab in enumerate(phases)}
    taps = tuple(SubTap(r, s, slot[((r * dh) % uh, (s * dw) % uw)] * hph + (r * dh) // uh,
                        (s * dw) // uw, groups[(r, s)]) for r, s in order)
    return SubConv(name="fwd", in_h=len(phases) * hph, in_w=wph, red=spec.C, out=spec.K,
                   rows=spec.P, cols=spec.Q, row_step=1, col_step=1, taps=taps,
                   out_h=spec.P, out_w=spec.Q, phases=phases)


def spec_label(spec) -> str:
    """Symbol fragment from the geometry, without the batch (kernels serve any N)."""
    g = spec.geometry()
    return g[g.index("c"):]


def resolve_flush_taps(config: TuningConfig, taps: int, mode: str) -> int:
    """Taps per partial from ``config.flush`` (products per INT32 lane): 0 means the whole
    block (the paper's ``c_block x R x S`` chain); otherwise ``flush`` must be a multiple of
    ``c_block`` (a partial holds whole blocks of channels for a run of taps)."""
    if config.flush == 0:
        return max(1, taps)
    if config.flush % config.c_block:
        raise DfpError(f"flush interval {config.flush} must be a multiple of c_block "
                       f"{config.c_block} (a partial covers c_block channels x flush_taps taps)")
    return max(1, min(taps, config.flush // config.c_block))


@dataclass(frozen=True)
class ConvPassPlan:
    """Buffer geometry and kernels of one forward or backward-data pass.

    ``pad``: (top, bottom, left, right) zero rows/columns around the input (X forward, dY
    backward-data) in its NHWC buffer; ``phases``: (sub-convolution, kernel plan) per
    kernel (forward: one; backward-data: one per non-empty output phase); ``zero_fill``: some
    output pixels receive no tap (an empty phase) and the output buffer must start at 0;
    ``flush_taps``: filter taps per INT32 partial; ``transposed``: the weights are read
    transposed (backward-data: OUT = C, RED = K).
    """
    pad: tuple[int, int, int, int]
    phases: tuple[tuple["SubConv", "KernelPlan"], ...]
    zero_fill: bool
    flush_taps: int
    transposed: bool = False


def plan_fwd_pass(spec, config: TuningConfig, target, *, mode: str = "fast", has_bias: bool = False,
                  fma: bool = True) -> ConvPassPlan:
    """:func:`plan_fwd` as a :class:`ConvPassPlan` (the shape every forward-family pass plans to)."""
    sub, plan = plan_fwd(spec, config, target, mode=mode, has_bias=has_bias, fma=fma)
    (ph, pw) = spec.padding
    return ConvPassPlan((ph, ph, pw, pw), ((sub, plan),), False, plan.flush_taps)


def plan_fwd(spec, config: TuningConfig, target, *, mode: str = "fast", has_bias: bool = False,
             fma: bool = True) -> tuple[SubConv, KernelPlan]:
    """Plan the forward pass of ``spec``. Returns the sub-convolution (buffer geometry for the
    caller) and the kernel plan. ``fma``: flush with one FMA (exact while the scale
    2**(Ex+Ew) is a normal float32, i.e. Ex+Ew >= -126); else multiply, then add."""
    if spec.pass_kind != "fwd":
        raise DfpError(f"plan_fwd needs a forward spec, got {spec.pass_kind!r}")
    ft = resolve_flush_taps(config, spec.R * spec.S, mode)
    sub = fwd_subconv(spec, ft)
    return sub, plan_kernel(sub, config, target, mode=mode, flush_taps=ft, has_bias=has_bias,
                            pass_kind="fwd", label=spec_label(spec), fma=fma)
