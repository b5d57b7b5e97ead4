"""The ISA tier table: one frozen record per tier, everything the planners, templates, peak
loops and CLI need to know about an instruction set, in one place.

A tier is how the INT16 dot product ``acc[l] += a[2l]*b[2l] + a[2l+1]*b[2l+1]`` is issued:

- ``avx512_vnni``: ``vpdpwssd`` on zmm (AVX512_VNNI), 16 INT32 lanes, 32 registers; the X pair
  broadcast folds into the instruction's memory operand (``{1to16}``).
- ``vnni256``: ``vpdpwssd`` on ymm (AVX512VL + AVX512_VNNI, or AVX-VNNI), 8 lanes; 32 registers
  with AVX512VL (the AVX-VNNI-only case has 16, which the planner does not exploit).
- ``avx2``: ``vpmaddwd`` (pairwise products summed into INT32) then ``vpaddd``, 8 lanes, 16 ymm
  registers; the broadcast needs its own register and the product a temporary before the add.
- ``generic``: plain LLVM vector IR (sign-extend, multiply, add of even and odd lanes), any target.

Intel's instruction-set reference (vol. 2: VPDPWSSD, PMADDWD, PADDD) defines the operations;
the register counts are the architectural vector register files. Adding a tier means adding
a record here (and its intrinsic spelling to ``templates/isa.ll.j2``); host detection lives in
``dfpgen.target``.
"""
from __future__ import annotations

from dataclasses import dataclass

from .errors import DfpError


@dataclass(frozen=True)
class IsaTier:
    """What one ISA tier is.

    - ``needs`` / ``needs_alt``: LLVM feature names the host must have to execute the tier's
      code (either set suffices).
    - ``vector_bits``, ``registers``: vector width and architectural vector registers.
    - ``dot``: the template's dot-product spelling: ``"vnni"`` (``llvm.x86.avx512.vpdpwssd[s]``),
      ``"pmaddwd"`` (``llvm.x86.avx2.pmadd.wd`` + add) or ``"generic"`` (sext/mul/add).
    - ``dot_insn``: the instruction(s) as a kernel engineer reads them in the assembly;
      ``dot_mnemonic``: the mnemonic that must appear in a kernel's assembly.
    - ``broadcast_regs``: registers an X broadcast occupies in the forward register block
      (0 where it folds into the instruction); ``dot_temps``: temporaries a dot step needs
      (the ``vpmaddwd`` product before ``vpaddd``); ``sat_regs``: constants a saturating
      chain (fast mode) holds where the tier has no saturating dot instruction.
    - ``compile_cpu``: the CPU LLVM compiles this tier for when the host has it (``None``: the
      host CPU itself). Lower tiers compile for a baseline so their code runs on any machine
      of the tier. ``foreign_cpu``: the CPU (with features) to compile for when the host lacks
      the tier, so that ``dfpgen show --asm`` can print another machine's code.
    - ``fwd_single_vector``: the forward default uses one output-channel vector over the pixel
      block (measured faster on Zen 4, benchmarks/RESULTS.md, tuning section).
    - ``bwd_weight_blocks`` / ``bwd_weight_blocks_short``: backward-weight default register block
      (K-vectors, channels) for long and for short (< 64 pixels) flush intervals, and
      ``bwd_weight_search`` the blocks the tuner tries.
    - ``peak_accumulators``: independent accumulators of the peak loops (enough to hide the
      latency, few enough to stay in registers with the two operands).
    - ``flush_regs``: registers the forward-family flush keeps live through the dot loop (the
      broadcast FP32 scale ``2**(Ex+Ew)``), counted where registers are scarce; the 32-register
      tiers leave it out of the budget (their blocks leave room for it).
    - ``fold_weights``: the forward-family kernel reads each weight vector as the dot
      instruction's memory operand (``vpmaddwd ymm, ymm, m256``) once per pixel instead of
      holding it in a register: on 16 registers the freed ones go to accumulators, and
      L1 serves the extra loads.
    - ``tuning_features``: LLVM tuning flags added to every compile of the tier.
      ``+fast-dpwssd`` on the VNNI tiers: without it LLVM's machine combiner rewrites most
      ``vpdpwssd`` of a kernel into ``vpmaddwd`` + ``vpaddd`` (to shorten each accumulator's
      dependency chain) on every CPU model that lacks that tuning flag, all Intel ones and
      ``x86-64-v4`` included; the register blocking already hides the dot's latency, so the
      rewrite only doubles the vector instructions of a throughput-bound loop.
    """
    name: str
    needs: frozenset
    needs_alt: frozenset | None
    vector_bits: int
    registers: int
    dot: str
    dot_insn: str
    dot_mnemonic: str
    broadcast_regs: int
    dot_temps: int
    sat_regs: int
    compile_cpu: str | None
    foreign_cpu: tuple[str, str]
    fwd_single_vector: bool
    bwd_weight_blocks: tuple[int, int]
    bwd_weight_blocks_4vec: tuple[int, int]
    bwd_weight_blocks_short: tuple[int, int]
    bwd_weight_search: tuple[tuple[int, int], ...]
    peak_accumulators: int
    flush_regs: int = 0
    fold_weights: bool = False
    tuning_features: str = ""

    @property
    def lanes(self) -> int:
        """INT32 lanes per vector (16 for zmm, 8 for ymm)."""
        return self.vector_bits // 32

    @property
    def vnni(self) -> bool:
        return self.dot == "vnni"

    def supported(self, features: frozenset) -> bool:
        """Whether a CPU with LLVM ``features`` can execute this tier's code."""
        return self.needs <= features or (self.needs_alt is not None and self.needs_alt <= features)

    def missing(self, features: frozenset) -> list[str]:
        return sorted(self.needs - features)

    def dot_intrinsic(self, saturating: bool) -> str:
        """The LLVM intrinsic of one dot step (VNNI tiers) or of its product (``pmaddwd``)."""
        if self.dot == "vnni":
            return f"llvm.x86.avx512.vpdpwssd{'s' if saturating else ''}.{self.vector_bits}"
        if self.dot == "pmaddwd":
            return "llvm.x86.avx2.pmadd.wd"
        return ""


@dataclass(frozen=True)
class DotStep:
    """What the shared dot-product macro (``templates/isa_dot.ll.j2``) prints for one tier and
    overflow mode: the spelling ``dot`` and LLVM ``intrinsic``, whether the step saturates,
    ``lanes`` INT32 lanes and the IR vector types (``ivec`` <L x i32>, ``hvec`` <2L x i16>,
    ``wvec`` <2L x i32>, the even / odd lane shuffles of the plain-IR spelling)."""
    dot: str
    intrinsic: str
    saturating: bool
    mnemonic: str  # what the header comment calls the step (e.g. vpdpwssds, vpmaddwd + vpaddd)
    lanes: int
    ivec: str
    hvec: str
    wvec: str
    even_mask: str
    odd_mask: str


def dot_step(isa: "IsaTier", saturating: bool) -> DotStep:
    """The :class:`DotStep` of tier ``isa`` (``saturating``: fast mode)."""
    n = isa.lanes
    mnemonic = {"vnni": "vpdpwssds" if saturating else "vpdpwssd",
                "pmaddwd": "vpmaddwd + saturating add" if saturating else "vpmaddwd + vpaddd"}.get(
        isa.dot, "sext, mul, add")
    return DotStep(isa.dot, isa.dot_intrinsic(saturating), saturating, mnemonic, n, f"<{n} x i32>",
                   f"<{2 * n} x i16>", f"<{2 * n} x i32>",
                   "<" + ", ".join(f"i32 {2 * i}" for i in range(n)) + ">",
                   "<" + ", ".join(f"i32 {2 * i + 1}" for i in range(n)) + ">")


TIERS: dict[str, IsaTier] = {t.name: t for t in (
    IsaTier("avx512_vnni", frozenset({"avx512f", "avx512bw", "avx512vnni"}), None, 512, 32,
            "vnni", "vpdpwssd zmm", "vpdpwssd", 0, 0, 0, None,
            ("znver4", ""), True,
            (2, 13), (4, 6), (2, 7),
            ((1, 28), (2, 13), (2, 14), (3, 8), (4, 6), (5, 4)), 24, tuning_features="+fast-dpwssd"),
    IsaTier("vnni256", frozenset({"avx512vl", "avx512vnni"}), frozenset({"avxvnni"}), 256, 32,
            "vnni", "vpdpwssd ymm", "vpdpwssd", 0, 0, 0, None,
            ("znver4", ""), True,
            (2, 13), (4, 6), (2, 7),
            ((1, 28), (2, 13), (2, 14), (3, 8), (4, 6), (5, 4)), 24, tuning_features="+fast-dpwssd"),
    # 16 ymm, backward-weight: kv x cb accumulators + kv dY vectors + broadcast + flush scale
    # + the vpmaddwd product (+ 2 saturation constants in fast mode): 2 x 4 (14 exact, 16 fast),
    # for short flushes too: the FP32 sums then wait in an L1 tile (2 x 2 with them in
    # registers, 13, left 4 accumulator chains of 4 cycles each; measured on Zen 3, 2 threads,
    # flush 8-16 pixels: 2 x 4 is 1.3-1.4x faster on 16@28x28 up to 256@14x14 and 64@56x56)
    IsaTier("avx2", frozenset({"avx2"}), None, 256, 16,
            "pmaddwd", "vpmaddwd + vpaddd ymm", "vpmaddwd", 1, 1, 2, "x86-64-v3",
            ("x86-64-v3", ""), False,
            (2, 4), (2, 4), (2, 4),
            ((1, 10), (1, 8), (2, 4), (1, 5), (2, 2)), 10, 1, True),
    IsaTier("generic", frozenset(), None, 256, 16,
            "generic", "LLVM vector IR (sext, mul, add)", "", 1, 1, 2, "x86-64-v2",
            ("x86-64-v2", ""), False,
            (2, 4), (2, 4), (2, 2),
            ((1, 10), (1, 8), (2, 4), (1, 5), (2, 2)), 10, 1),
)}

NAMES = tuple(TIERS)


def tier(name: str) -> IsaTier:
    """The record of tier ``name``; :class:`DfpError` for an unknown name."""
    try:
        return TIERS[name]
    except KeyError:
        raise DfpError(f"unknown ISA tier {name!r}; choose one of {', '.join(NAMES)}") from None
