"""``TuningConfig``: the schedule of a kernel, kept apart from the algorithm (``ConvSpec``).

Field meanings per pass (the planner of each pass documents the details):

- ``k_vecs``: register blocking, output-channel vectors per block (``k_vecs * lanes`` channels;
  for backward-data the "output channels" are C, for backward-weight K).
- ``pixels``: register blocking, the second accumulator dimension: output pixels along Q
  (forward, backward-data) or input channels C (backward-weight).
- ``c_block``: reduction channels per block (C for forward, K for backward-data; pixels
  for backward-weight), even, since VNNI consumes INT16 pairs.
- ``flush``: flush interval, INT16 products accumulated per INT32 lane before the partial is
  converted to FP32 (``vcvtdq2ps``) and added to the output; 0 lets the planner choose it from
  the overflow mode (exact: a proven bound; fast: the paper's ``c_block x R x S``). Forward /
  backward-data: a multiple of ``c_block`` (``c_block x flush_taps``); in exact mode
  ``dfpgen.conv`` replaces ``c_block`` and ``flush`` by the longest schedule the operands
  prove safe (``dfpgen.plan_exact``), so exact results do not depend on the config.
- ``unroll``: ``"none"``, or ``"4vnni"``: Knights Mill's ``vp4dpwssd`` blocking (four
  consecutive channel pairs against four weight registers per step), built from ``vpdpwssd``.
- ``threads``: 0 = the runtime's thread count.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from functools import lru_cache

from .errors import DfpError

UNROLLS = ("none", "4vnni")


# What TuningConfig.short writes, as a regular expression (groups: k_vecs, pixels, c_block,
# flush, the 4VNNI suffix).
SHORT_PATTERN = r"kb(\d+)_wb(\d+)_cb(\d+)_fl(\d+)(_u4)?"


@dataclass(frozen=True)
class TuningConfig:
    """One schedule of a conv pass; the fields are read through the pass's register tile
    (``ConvSpec.tile_channels`` x ``ConvSpec.tile_row``, see dfpgen/passes.py):

    - ``k_vecs``: vectors of ``tile_channels`` per register block (output channels forward,
      input channels backward-data, output channels backward-weight);
    - ``pixels``: extent of the block along ``tile_row`` (output pixels forward / backward-data,
      input channels backward-weight);
    - ``c_block``: forward family: reduction channels per INT32 partial block (even, INT16
      pairs); backward-weight: pixel pairs per cache block;
    - ``flush``: INT16 products per partial before the FP32 flush (forward family: a multiple
      of ``c_block``; backward-weight: pixels, even); 0: chosen by the overflow mode;
    - ``unroll``: ``"none"`` or ``"4vnni"`` (four pair steps in flight, VNNI tiers);
    - ``threads``: 0 for the runtime's count.
    """
    k_vecs: int = 2
    pixels: int = 14
    c_block: int = 16
    flush: int = 0
    unroll: str = "none"
    threads: int = 0

    def __post_init__(self):
        for f in ("k_vecs", "pixels", "c_block"):
            v = getattr(self, f)
            if not isinstance(v, int) or v < 1:
                raise DfpError(f"TuningConfig.{f} must be a positive int, got {v!r}")
        if self.c_block % 2:
            raise DfpError(f"TuningConfig.c_block must be even (INT16 pairs), got {self.c_block}")
        if self.flush < 0 or self.threads < 0:
            raise DfpError("TuningConfig.flush and .threads must be >= 0")
        if self.unroll not in UNROLLS:
            raise DfpError(f"TuningConfig.unroll must be one of {UNROLLS}, got {self.unroll!r}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TuningConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise DfpError(f"unknown TuningConfig fields {sorted(unknown)}")
        return cls(**d)

    def replace(self, **kw) -> "TuningConfig":
        return replace(self, **kw)

    def short(self) -> str:
        """Symbol fragment, e.g. ``kb2_wb14_cb16_fl144`` (``_u4`` with the 4VNNI unroll);
        :data:`SHORT_PATTERN` matches it."""
        s = f"kb{self.k_vecs}_wb{self.pixels}_cb{self.c_block}_fl{self.flush}"
        return s + ("_u4" if self.unroll == "4vnni" else "")


# --- forward / backward-data schedules (the backward-weight planner has its own) -------------

def _reduction_and_output(spec) -> tuple[int, int, int]:
    """(reduction channels, output-vector channels, output pixels per row) of a fwd-family pass.

    Backward-data runs as stride-1 sub-convolutions over dY (one per output phase), so its
    reduction is over K, its output vectors hold C, and a row holds ceil(W / stride_w) pixels.
    """
    return spec.reduction_size, spec.tile_channels, spec.tile_row


def accumulator_budget(k_vecs: int, pixels: int, unroll: str, isa) -> int:
    """Vector registers a forward-family block needs on tier ``isa`` (a ``dfpgen.isa.IsaTier``):
    ``k_vecs x pixels`` accumulators, the weight vectors (``k_vecs``, or ``4 k_vecs`` with the
    4VNNI unroll: four channel pairs in flight; none where ``isa.fold_weights`` reads them as
    the dot's memory operand), the X-pair broadcast (0 registers where it
    folds into the instruction), the dot step's temporaries (the ``vpmaddwd`` product, which
    the flush's convert reuses) and the flush's live scale (``isa.flush_regs``). The template keeps one broadcast live at a time
    and the FP32 output tile in memory where it would not fit (``templates/conv_fwd.ll.j2``).
    The planner rejects blocks over ``isa.registers``."""
    weights = 0 if isa.fold_weights else k_vecs * (4 if unroll == "4vnni" else 1)
    return k_vecs * pixels + weights + isa.broadcast_regs + isa.dot_temps + isa.flush_regs


def max_pixels(k_vecs: int, unroll: str, isa) -> int:
    """The widest pixel block of ``k_vecs`` vectors within ``isa``'s register budget."""
    return (isa.registers - accumulator_budget(k_vecs, 0, unroll, isa)) // k_vecs


def _pixel_block(q: int, cap: int) -> int:
    # Fewest blocks first, then the most even split: Q=56, cap 14 -> 4 x 14; Q=7 -> 7.
    blocks = -(-q // cap)
    return -(-q // blocks)


@lru_cache(maxsize=4096)
def default_config(spec, target) -> TuningConfig:
    """The heuristic schedule of a forward / backward-data ``spec`` on ``target`` (used when
    nothing is tuned): the register block (``k_vecs`` output-channel vectors dividing the
    channels x a pixel block that splits Q evenly) with the most accumulators the register
    budget allows, ties to 2 vectors (the paper's 2 x 14), then on AVX-512 tiers one vector over
    that pixel block (measured faster, see below), ``c_block`` 16 for 3x3 (the paper's
    chain of 16 input channels x R x S = 144 products; other filter sizes the largest power
    of two keeping the chain within 144),
    flush chosen by the overflow mode."""
    if spec.pass_kind not in ("fwd", "bwd_data"):
        raise DfpError(f"default_config here covers fwd/bwd_data, not {spec.pass_kind!r}")
    red, outc, q = _reduction_and_output(spec)
    lanes = target.lanes
    vecs = -(-outc // lanes)
    # The most accumulators (k_vecs x pixel block) without padded lanes; ties go to the
    # paper's 2 vectors (Q=14 -> 2 x 14, Q=56 -> 2 x 14, Q=7 -> 4 x 7).
    k_vecs, best = 1, 0
    for kv in (2, 1, 3, 4):
        cap_kv = max_pixels(kv, "none", target.isa)
        if vecs % kv == 0 and cap_kv >= 1:
            accs = kv * _pixel_block(q, cap_kv)
            if accs > best:
                k_vecs, best = kv, accs
    cap = max_pixels(k_vecs, "none", target.isa)
    pixels = _pixel_block(q, cap)
    if target.isa.fwd_single_vector:
        # Measured (benchmarks/RESULTS.md, tuning section; n32 ResNet-50 layers, 2 threads):
        # one output-channel vector over the same pixel block beat the paper's 2 x 14 by
        # 1.1-1.5x in both overflow modes on 9 of 10 layer-passes (exact mode flushes
        # often, and a flush then converts half the lanes). The pixel block stays the one
        # chosen for k_vecs above, which is within the budget of a single vector.
        k_vecs = 1
    # The paper's chain is 16 channels x 3x3 = 144 products: keep at most that length for
    # other filter sizes with a power-of-two block, which divides the usual channel counts
    # (1x1: 128, 5x5: 4, 7x7: 2), never longer than the channels.
    c_block = 2
    while c_block * 2 * spec.R * spec.S <= 144:
        c_block *= 2
    c_block = min(c_block, red + red % 2)
    return TuningConfig(k_vecs=k_vecs, pixels=pixels, c_block=c_block, flush=0,
                        unroll="none", threads=0)


def search_space(spec, target) -> list[TuningConfig]:
    """Legal forward / backward-data schedules for ``spec`` on ``target``, pruned by the
    register budget (:func:`accumulator_budget`) and by waste (no block wider than the
    output channels or the output row). The default config is always first."""
    red, outc, q = _reduction_and_output(spec)
    vecs = -(-outc // target.lanes)
    out = [default_config(spec, target)]
    seen = {out[0]}
    # The 4VNNI unroll keeps four X pairs per pixel in flight: it needs the folded broadcast
    # of vpdpwssd; with vpmaddwd they take registers the 16-register budget does not have.
    for unroll in ("none", "4vnni") if target.isa.vnni else ("none",):
        for kv in (1, 2, 4):
            if kv > max(1, vecs):
                continue
            cap = max_pixels(kv, unroll, target.isa)
            if cap < 1:
                continue
            for pix in sorted({_pixel_block(q, cap), min(q, cap), min(q, max(1, cap // 2))}):
                if pix < min(q, 3):  # too few pixels to hide the dot-product latency
                    continue
                for cb in (8, 16, 32):
                    if cb > max(2, red + red % 2) and cb != 8:
                        continue
                    cfg = TuningConfig(k_vecs=kv, pixels=pix, c_block=cb, flush=0, unroll=unroll)
                    if cfg not in seen:
                        seen.add(cfg)
                        out.append(cfg)
    return out
