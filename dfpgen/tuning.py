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
  the overflow mode (exact: a proven bound; fast: the paper's ``c_block x R x S``).
- ``unroll``: ``"none"``, or ``"4vnni"``: Knights Mill's ``vp4dpwssd`` blocking (four
  consecutive channel pairs against four weight registers per step), built from ``vpdpwssd``.
- ``threads``: 0 = the runtime's thread count.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace

from .errors import DfpError

UNROLLS = ("none", "4vnni")


@dataclass(frozen=True)
class TuningConfig:
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
        """Symbol fragment, e.g. ``kb2_wb14_cb16_fl144`` (``_u4`` with the 4VNNI unroll)."""
        s = f"kb{self.k_vecs}_wb{self.pixels}_cb{self.c_block}_fl{self.flush}"
        return s + ("_u4" if self.unroll == "4vnni" else "")
