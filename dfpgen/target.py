"""The CPU the kernels are generated for: LLVM's host CPU name and features, and the ISA tier.

The ISA tiers (best first) are the records of ``dfpgen.isa``; this module only detects the
host and binds a tier to it. The tier is picked from the host features, or forced with the env var ``DFPGEN_ISA``
(one of the names above). Forcing a tier the host cannot execute is allowed for code
generation (render / compile / ``dfpgen show``) but kernels refuse to run
(:meth:`CpuTarget.require_executable`).
"""
from __future__ import annotations

import platform
import sys
import threading
from dataclasses import dataclass
from functools import lru_cache

import llvmlite.binding as llvm

from . import isa
from .env import choice
from .errors import DfpError
from .isa import IsaTier
from .jit import host_cpu

TIERS = isa.NAMES
ENV_ISA = "DFPGEN_ISA"


def _features_set(flat: str) -> frozenset[str]:
    return frozenset(f[1:] for f in flat.split(",") if f.startswith("+"))


def tier_supported(tier: str, features: frozenset[str]) -> bool:
    """Whether a CPU with LLVM ``features`` can execute code of ``tier``."""
    return isa.tier(tier).supported(features)


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
    def native_bf16(self) -> bool:
        """Whether the host has bf16 arithmetic (AVX512_BF16 or AMX-BF16). Without it
        PyTorch's bf16 autocast on CPU is emulated and runs many times slower than FP32."""
        return bool({"avx512bf16", "amx-bf16"} & self.feature_set)

    @property
    def is_x86(self) -> bool:
        return self.triple.startswith(("x86_64", "i386", "i686"))

    @property
    def isa(self) -> IsaTier:
        """The tier's record in the ISA table (``dfpgen.isa``)."""
        return isa.tier(self.tier)

    @property
    def vector_bits(self) -> int:
        return self.isa.vector_bits

    @property
    def lanes(self) -> int:
        """INT32 accumulator lanes per vector register (16 for zmm, 8 for ymm)."""
        return self.isa.lanes

    @property
    def registers(self) -> int:
        """Architectural vector registers (32 zmm/ymm with AVX-512, 16 ymm with AVX2)."""
        return self.isa.registers

    @property
    def executable(self) -> bool:
        if not self.isa.needs and self.isa.needs_alt is None:
            return True
        return self.is_x86 and self.isa.supported(self.feature_set)

    @property
    def compile_cpu(self) -> str:
        if self.is_x86 and self.isa.compile_cpu:
            return self.isa.compile_cpu
        if self.is_x86 and not self.executable:
            # Code of a tier the host lacks is compiled for a CPU that has it (assembly to
            # read, never to run: require_executable refuses that).
            return self.isa.foreign_cpu[0]
        return self.cpu

    @property
    def compile_features(self) -> str:
        if not self.is_x86:
            return self.features
        if self.isa.compile_cpu:
            base = ""
        elif not self.executable:
            base = self.isa.foreign_cpu[1]
        else:
            base = self.features
        return ",".join(f for f in (base, self.isa.tuning_features) if f)

    def require_executable(self) -> None:
        """Raise :class:`DfpError` if this host cannot run the tier's code."""
        if not self.executable:
            raise DfpError(f"ISA tier {self.tier!r} (from {ENV_ISA}) cannot run on this CPU "
                           f"({self.cpu}); it lacks {self.isa.missing(self.feature_set)}")

    def with_tier(self, tier: str) -> "CpuTarget":
        isa.tier(tier)  # DfpError for an unknown name
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
    cpu, feats = host_cpu()
    triple = llvm.get_process_triple()
    is_x86 = platform.machine().lower() in ("x86_64", "amd64", "i386", "i686")
    base = CpuTarget(triple, cpu, feats, best_tier(_features_set(feats), is_x86))
    if isa:
        return base.with_tier(isa.strip().lower())
    return base


def native_target() -> CpuTarget:
    """The host with its best tier, ignoring ``$DFPGEN_ISA`` (what a subprocess started
    without that variable runs)."""
    return _host(None)


def host_target(tier: str | None = None) -> CpuTarget:
    """The host target; ``tier`` (or ``$DFPGEN_ISA``) forces an ISA tier.

    Raises :class:`DfpError` for an unknown tier name.
    """
    target, forced = configured_target(tier)
    if tier is None:
        _announce(target.tier, forced)
    return target


def configured_target(tier: str | None = None) -> tuple[CpuTarget, bool]:
    """What :func:`host_target` returns, and whether ``$DFPGEN_ISA`` forced its tier, without
    the stderr tier note (for validating the environment: a note must not add a line to the
    one-line error that may follow). Raises :class:`DfpError` for an unknown tier name."""
    env = None if tier is not None else choice(ENV_ISA, TIERS)
    return _host(tier or env), bool(env)


_announced: set = set()
_announce_lock = threading.Lock()
_quiet = False


def quiet_tier_note() -> None:
    """Suppress the stderr tier note (the CLI prints the tier where it belongs: ``dfpgen info``
    and the headers of ``tune`` / ``bench``, so the note never adds a line to an error)."""
    global _quiet
    _quiet = True


def _announce(tier: str, forced: bool) -> None:
    # One stderr line per process when the kernels do not use VNNI, or a tier was forced:
    # a silent fallback would look like a slow machine. Locked: two threads making their
    # first call at once print it once.
    with _announce_lock:
        if _quiet or (tier, forced) in _announced:
            return
        _announced.add((tier, forced))
    if forced:
        print(f"dfpgen: ISA tier {tier} (forced by {ENV_ISA})", file=sys.stderr)
    elif not isa.tier(tier).vnni:
        print(f"dfpgen: ISA tier {tier} (this CPU has no AVX512_VNNI / AVX-VNNI)", file=sys.stderr)
