"""The CPU the kernels are generated for: LLVM's host CPU name and features, and the ISA tier.

ISA tiers (DESIGN §3), best first:

- ``avx512_vnni``: ``vpdpwssd`` on 512-bit vectors (AVX512_VNNI): 16 INT32 lanes, each
  accumulating two INT16 x INT16 products per instruction.
- ``vnni256``: ``vpdpwssd`` on 256-bit vectors (AVX512VL + AVX512_VNNI, or AVX-VNNI).
- ``avx2``: ``vpmaddwd`` (pairwise INT16 products summed into INT32) + ``vpaddd``.
- ``generic``: plain LLVM vector IR (sext to i32, mul, add); any target.

The tier is picked from the host features, or forced with the env var ``DFPGEN_ISA``
(one of the names above). Forcing a tier the host cannot execute is allowed for code
generation (render / compile / ``dfpgen show``) but kernels refuse to run
(:meth:`CpuTarget.require_executable`).
"""
from __future__ import annotations

import os
import platform
import sys
from dataclasses import dataclass
from functools import lru_cache

from .errors import DfpError

TIERS = ("avx512_vnni", "vnni256", "avx2", "generic")
ENV_ISA = "DFPGEN_ISA"

# Feature sets (LLVM names) each tier needs to *execute*.
_TIER_NEEDS = {
    "avx512_vnni": {"avx512f", "avx512bw", "avx512vnni"},
    "vnni256": {"avx512vl", "avx512vnni"},  # or AVX-VNNI, handled below
    "avx2": {"avx2"},
    "generic": set(),
}

# What the code of a tier is compiled for. Lower tiers compile for a baseline CPU so that
# their code really runs on a machine without AVX-512 (and tests on a VNNI host prove it).
_TIER_COMPILE = {
    "avx2": ("x86-64-v3", ""),
    "generic": ("x86-64-v2", ""),
}


def _features_set(flat: str) -> frozenset[str]:
    return frozenset(f[1:] for f in flat.split(",") if f.startswith("+"))


def tier_supported(tier: str, features: frozenset[str]) -> bool:
    """Whether a CPU with LLVM ``features`` can execute code of ``tier``."""
    if tier == "vnni256":
        return _TIER_NEEDS["vnni256"] <= features or "avxvnni" in features
    return _TIER_NEEDS[tier] <= features


@dataclass(frozen=True)
class CpuTarget:
    """Where kernels run and how they are compiled.

    ``cpu``/``features`` describe the host; ``compile_cpu``/``compile_features`` what LLVM
    is told for this tier; ``vector_bits`` the register width the templates use.
    """
    triple: str
    cpu: str
    features: str
    tier: str
    forced: bool = False

    @property
    def feature_set(self) -> frozenset[str]:
        return _features_set(self.features)

    @property
    def is_x86(self) -> bool:
        return self.triple.startswith(("x86_64", "i386", "i686"))

    @property
    def vector_bits(self) -> int:
        return {"avx512_vnni": 512, "vnni256": 256, "avx2": 256, "generic": 256}[self.tier]

    @property
    def lanes(self) -> int:
        """INT32 accumulator lanes per vector register (16 for zmm, 8 for ymm)."""
        return self.vector_bits // 32

    @property
    def registers(self) -> int:
        """Architectural vector registers (32 zmm/ymm with AVX-512, 16 ymm with AVX2)."""
        if self.tier in ("avx512_vnni", "vnni256"):
            return 32
        return 16

    @property
    def executable(self) -> bool:
        if self.tier == "generic":
            return True
        return self.is_x86 and tier_supported(self.tier, self.feature_set)

    @property
    def compile_cpu(self) -> str:
        if self.is_x86 and self.tier in _TIER_COMPILE:
            return _TIER_COMPILE[self.tier][0]
        return self.cpu

    @property
    def compile_features(self) -> str:
        if self.is_x86 and self.tier in _TIER_COMPILE:
            return _TIER_COMPILE[self.tier][1]
        return self.features

    def require_executable(self) -> None:
        """Raise :class:`DfpError` if this host cannot run the tier's code."""
        if not self.executable:
            raise DfpError(f"ISA tier {self.tier!r} (from {ENV_ISA}) cannot run on this CPU "
                           f"({self.cpu}); it lacks {sorted(_TIER_NEEDS[self.tier] - self.feature_set)}")

    def with_tier(self, tier: str) -> "CpuTarget":
        if tier not in TIERS:
            raise DfpError(f"unknown ISA tier {tier!r}; choose one of {', '.join(TIERS)}")
        return CpuTarget(self.triple, self.cpu, self.features, tier, forced=True)

    def key(self) -> dict:
        """The fields that change generated code (part of every cache key)."""
        return {"triple": self.triple, "cpu": self.cpu, "features": sorted(self.feature_set),
                "tier": self.tier, "compile_cpu": self.compile_cpu,
                "compile_features": self.compile_features}


def best_tier(features: frozenset[str], is_x86: bool) -> str:
    if not is_x86:
        return "generic"
    for tier in TIERS:
        if tier_supported(tier, features):
            return tier
    return "generic"


@lru_cache(maxsize=None)
def _host(isa: str | None) -> CpuTarget:
    import llvmlite.binding as llvm
    from .jit import host_cpu
    cpu, feats = host_cpu()
    triple = llvm.get_process_triple()
    is_x86 = platform.machine().lower() in ("x86_64", "amd64", "i386", "i686")
    base = CpuTarget(triple, cpu, feats, best_tier(_features_set(feats), is_x86))
    if isa:
        return base.with_tier(isa.strip().lower())
    return base


def host_target(tier: str | None = None) -> CpuTarget:
    """The host target; ``tier`` (or ``$DFPGEN_ISA``) forces an ISA tier.

    Raises :class:`DfpError` for an unknown tier name.
    """
    env = os.environ.get(ENV_ISA) or None
    target = _host(tier or env)
    if tier is None:
        _announce(target.tier, bool(env))
    return target


@lru_cache(maxsize=None)
def _announce(tier: str, forced: bool) -> None:
    # One stderr line per process when the kernels do not use VNNI, or a tier was forced:
    # a silent fallback would look like a slow machine.
    if forced:
        print(f"dfpgen: ISA tier {tier} (forced by {ENV_ISA})", file=sys.stderr)
    elif tier not in ("avx512_vnni", "vnni256"):
        print(f"dfpgen: ISA tier {tier} (this CPU has no AVX512_VNNI / AVX-VNNI)", file=sys.stderr)
